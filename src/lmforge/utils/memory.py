"""Host memory of this process: what CPU runs report as their memory, and what building a sharded model cost."""

from __future__ import annotations

import sys


def peak_rss_gb() -> float | None:
    """This process's peak resident memory so far, in GB (1e9 bytes), from `getrusage`; None where it is not
    available (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
