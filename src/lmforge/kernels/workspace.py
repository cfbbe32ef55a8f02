"""Per-thread CPU scratch buffers reused across calls, layers and steps.

Why: glibc hands large freed blocks back to the OS (above its dynamic mmap threshold, or when the heap's free
top grows past its trim threshold, as it does after each backward pass), so a multi-MB temporary allocated
afresh each call page-faults on first touch: filling a fresh 6 MB buffer took ~1 ms here against ~0.15 ms for
a reused one. Temporaries that never leave a kernel (attention's score matrices, the chunked loss's gathered
gradients) live here instead. Buffers over `MAX_KEPT_BYTES` are handed out but not kept, so one long-sequence
call does not pin GBs for the rest of the process. Never for tensors returned to autograd or saved for backward:
the next call would overwrite them.
"""

from __future__ import annotations

import threading

import torch

MAX_KEPT_BYTES = 64 << 20

_LOCAL = threading.local()


def scratch(name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised buffer of `shape`/`dtype`, the same one on each call with the same name in this thread
    (CPU; elsewhere torch's caching allocator already reuses memory, so a fresh tensor). Inside a torch.compile
    trace a fresh tensor too: inductor plans its own buffers, and a buffer created there and kept in this
    module's dict is a side effect dynamo refuses (a whole-model compile's first step on CPU)."""
    if torch.device(device).type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype:
        buf = torch.empty(shape, dtype=dtype)
        if buf.numel() * buf.element_size() <= MAX_KEPT_BYTES:
            buffers[name] = buf
        else:
            buffers.pop(name, None)
    return buf
