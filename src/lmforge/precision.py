"""`trainer.precision=auto`: bf16 autocast only where the hardware has fast bf16 matmuls.

On CPUs without AMX / AVX512-BF16 (e.g. AVX2-only EPYC), bf16 matmuls are emulated and measured ~90×
slower than fp32 here (1.2 vs 107 GFLOP/s), so `auto` falls back to fp32 there.
"""

from __future__ import annotations

import torch

BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16, from torch's CPU probes: `torch.cpu` (torch >= 2.4; the only place in 2.13) or, on older
    torch, `torch._C._cpu`. No probe found means no claim of fast bf16."""
    for module in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        probes = [getattr(module, name) for name in BF16_PROBES if callable(getattr(module, name, None))]
        if probes:
            return any(bool(probe()) for probe in probes)
    return False


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str | int:
    """Map `auto` to bf16-mixed (CUDA with bf16, or a CPU with AMX/AVX512-BF16), else 32-true."""
    if str(precision) != "auto":
        return precision
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
