"""`Linear`: `nn.Linear` whose float32 CPU matmuls run on oneDNN instead of ATen's default BLAS call.

Why: on CPU, torch sends a float32 `F.linear` / `mm` to MKL's sgemm. MKL picks its AVX-512 kernels only on
Intel CPUs; on AMD EPYC (Zen 4/5, which have AVX-512) it runs its AVX2 ones, at ~210 GFLOP/s on 2 cores
where oneDNN, the other GEMM library torch ships, reaches 440-500 (`python scripts/benchmark.py
gemm` measures it). A training step of a small model on CPU is ~80% float32 GEMMs, so the kernel choice is
most of its speed. Both are IEEE float32 GEMMs with float32 accumulation; they differ only in summation order
(~1e-6 relative, the same as between thread counts).

`linear(x, weight, bias)` routes to oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op Inductor lowers CPU
linears to) for the forward and both backward GEMMs when the GEMM has at least `MIN_MACS` multiply-adds
(oneDNN's per-call cost loses on a decode step's few rows), everything is plain float32 on CPU and nothing
else owns the matmul: not under autocast (bf16 matmuls already run on oneDNN), not DTensors (tensor
parallel), not while torch.compile traces (Inductor picks its own kernels), grad mode or not. Everything
else is `F.linear`, unchanged, as is everything when `cpu_kernels=torch` (kernels/cpu_kernels.py) or this
torch build lacks the op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import cpu_kernels

_ONEDNN_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
ONEDNN_AVAILABLE = _ONEDNN_OP is not None
# oneDNN pays ~12 us per call where MKL pays ~3: below ~1M multiply-adds (a decode step's M = 1..8 rows on a
# 128-384 wide model) MKL is faster, above it oneDNN (measured on 2 Zen cores, 1 and 2 threads).
MIN_MACS = 1 << 20


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x · wᵀ (+ b); x (..., in), w (out, in); w may be a transposed view (x is copied if it is one)."""
    return _ONEDNN_OP(x, w, b, "none", [], "")


def on_onednn(*tensors: torch.Tensor | None) -> bool:
    """Whether a GEMM of these tensors runs on oneDNN here: all plain float32 on CPU, routing on, and neither
    autocast nor torch.compile in charge."""
    return (
        _ONEDNN_OP is not None and cpu_kernels.enabled()
        and all(t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32)
                for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _big_enough(rows: int, inner: int, cols: int) -> bool:
    macs = rows * inner * cols
    return macs > 0 and macs >= MIN_MACS


def gemm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · bᵀ for 2-D a (M, K), b (N, K) (a transposed view of a (K, N) matrix is fine: no copy)."""
    return _onednn(a, b) if on_onednn(a, b) and _big_enough(*a.shape, b.size(0)) else a @ b.t()


def gemm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ · b for 2-D a (M, N), b (M, K): a weight gradient, contiguous (N, K). oneDNN reads its first operand
    row-major, so the narrower of a, b is the one transposed (copied): (bᵀ · a)ᵀ when N > K."""
    if not (on_onednn(a, b) and _big_enough(a.size(1), a.size(0), b.size(1))):
        return a.t() @ b
    if a.size(1) > b.size(1):
        return _onednn(b.t(), a.t()).t().contiguous()
    return _onednn(a.t(), b.t())


class _OneDNNLinear(torch.autograd.Function):
    """y = x · wᵀ + b with all three GEMMs (forward, grad of x, grad of w) on oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(g, weight.t()).view(x.shape)  # g · w
        if ctx.needs_input_grad[1]:
            grad_w = gemm_tn(g, x.reshape(-1, x.size(-1)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN where that is faster (see the module doc)."""
    if on_onednn(x, weight, bias) and x.dim() >= 2 and _big_enough(x.numel() // x.size(-1), *weight.shape):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state-dict keys, init) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """A Linear computing exactly x · wᵀ + b (torch's or this one), not a LoRA / quantised / other subclass."""
    return type(module) in (nn.Linear, Linear)
