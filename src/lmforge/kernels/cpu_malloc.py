"""Keep freed heap memory in a CPU training process instead of handing it back to the OS (glibc).

Why: a training step allocates the same activations and gradients every step. glibc's defaults return memory
to the OS whenever the free top of the heap outgrows its (dynamic, at most 64 MB) trim threshold, as it does
after every backward pass, so the next step page-faults all of it back in: ~9% of the default experiment's
CPU step here (24.5K -> 26.6K tokens/s with the setting below). torch's own CPU launcher
(`python -m torch.backends.xeon.run_cpu`) preloads jemalloc or tcmalloc for the same reason; this does the
equivalent in-process with glibc's `mallopt`:

* M_MMAP_THRESHOLD = 32 MB (glibc's largest): blocks up to that come from the heap, not fresh mmaps;
* M_TRIM_THRESHOLD = 2 GB: the heap is not trimmed after each step.

The process keeps its peak heap (as torch's CUDA caching allocator keeps GPU memory). Root config key
`cpu_malloc: keep` (default) applies it to runs that train on the CPU; `system` leaves glibc's defaults.
Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # an int: 2 GB of free heap top before any is returned

_applied = False


def keep_freed_memory() -> bool:
    """Apply the two thresholds once per process; whether they are in effect (False off glibc)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
