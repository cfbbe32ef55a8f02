"""GPT-2's tanh-approximated GELU as one compiled CPU loop forward and one backward.

Why: `F.gelu(x, approximate="tanh")` and its backward each take ~2 ms for a (8, 256, 1536) activation on two
cores, ~8% of a small GPT's training step, because torch's vectorised tanh is slow on CPU. The same function
written with a sigmoid, tanh(z) = 2·sigmoid(2z) - 1, so

    gelu(x) = x · sigmoid(2·√(2/π)·(x + 0.044715·x³)),

compiled by inductor (kernels/compiled.py) into a single loop, takes ~0.7 ms forward and ~0.9 ms backward.
Both compute in float32 and round once to the input's dtype, as torch's kernel does: float32 results agree
with it to float32 rounding, bf16 ones to one bf16 unit in the last place on rounding ties
(tests/unit/test_compiled_kernels.py). Anywhere the compiled kernels do not apply (GPU, `cpu_kernels=torch`,
a compiled model, other dtypes) it is `F.gelu(approximate="tanh")`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import compiled

_K1 = 2.0 * math.sqrt(2.0 / math.pi)  # sigmoid(x · (_K1 + _K3·x²)) = (1 + tanh(√(2/π)(x + 0.044715x³))) / 2
_K3 = _K1 * 0.044715


def _gelu_forward(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.sigmoid(xf * (_K1 + _K3 * xf * xf))).to(x.dtype)


def _gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d gelu/dx = s + x·s·(1 - s)·(K1 + 3·K3·x²) with s = sigmoid(x·(K1 + K3·x²))."""
    xf = x.float()
    x2 = xf * xf
    s = torch.sigmoid(xf * (_K1 + _K3 * x2))
    return (grad.float() * (s + xf * s * (1.0 - s) * (_K1 + 3.0 * _K3 * x2))).to(grad.dtype)


_FORWARD = compiled.CompiledKernel(_gelu_forward)
_BACKWARD = compiled.CompiledKernel(_gelu_backward)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """Contiguous (an expanded gradient, as `.sum().backward()` sends, would be a stride-0 variant), 1-D."""
    return t.reshape(-1).contiguous()


class _GeluTanh(torch.autograd.Function):
    """Flat 1-D tensors into the kernels: one compiled variant per dtype, whatever the activation's rank."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _FORWARD(_flat(x)).view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _BACKWARD(_flat(grad), _flat(x)).view(x.shape)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), through the compiled CPU kernels where they apply."""
    compiled_ok = not (_FORWARD.failed or _BACKWARD.failed)  # else torch's one pass beats the eager sigmoid spelling
    # No size threshold, though a decode step's few rows would be faster eager (~25 µs a call): in bf16 the two
    # round differently on ties, and a model's outputs must not depend on the batch size it runs at.
    if compiled_ok and x.dtype in (torch.float32, torch.bfloat16) and compiled.usable(x):
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


class GeluTanh(nn.Module):
    """nn.GELU(approximate="tanh") computed by `gelu_tanh`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)
