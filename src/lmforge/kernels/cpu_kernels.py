"""Which kernels CPU training uses: lmforge's choices (default) or exactly torch's defaults.

`lmforge` (root config key `cpu_kernels`):
* float32 Linears (models, chunked head + loss) on oneDNN instead of MKL: kernels/linear.py;
* bf16 causal self-attention as batched GEMMs instead of SDPA's CPU flash kernel: kernels/cpu_attention.py;
* dropout masks from 16 random bits per element instead of `bernoulli_`'s serial 32-bit draws, applied in one
  compiled pass (attention dropout inside the kernel above; `Dropout` for hidden states): kernels/dropout.py;
* elementwise chains (tanh-GELU, the chunked loss's softmax gradient, attention's d(scores)) as single loops
  that inductor compiles per function: kernels/compiled.py, kernels/gelu.py.
Each keeps float32-level (resp. flash-attention-level) accuracy and only applies where it is faster; all are
what makes lmforge's CPU training step faster than a stock PyTorch model's (README, "Training step vs Hugging
Face"). `torch` turns them off process-wide: A/B comparisons, or a torch version without the ops they use.
"""

from __future__ import annotations

from lmforge.errors import ConfigError

CPU_KERNELS = ("lmforge", "torch")
_kind = "lmforge"


def set_cpu_kernels(kind: str) -> None:
    global _kind
    if kind not in CPU_KERNELS:
        raise ConfigError("cpu_kernels", f"unknown value {kind!r}", f"use one of {', '.join(CPU_KERNELS)}")
    _kind = kind


def cpu_kernels() -> str:
    return _kind


def enabled() -> bool:
    """lmforge's CPU kernels are on."""
    return _kind == "lmforge"
