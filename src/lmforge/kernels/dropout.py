"""`Dropout`: `nn.Dropout` whose CPU training masks are drawn 16 bits per element and applied in one compiled pass.

Why: on CPU, `F.dropout` draws its mask with `bernoulli_`, one serial 32-bit draw per element (~7 ms for a
(8, 512, 384) activation on two cores), then multiplies eagerly; a GPT block runs two of them, forward and
backward. Here the keep-mask comes from kernels/dropout_mask.py (~1 ms for the same tensor), is kept for
backward as one byte per element, and input and gradient are scaled in one compiled loop each.

Same semantics as `nn.Dropout` except that p is rounded to a multiple of 2⁻¹⁶ (0.1 drops with probability
0.1000061) and kept values are scaled by 1 / (1 − that), so each output's expectation is its input. In eval mode, with p = 0, off
CPU, under torch.compile, in place, for other dtypes, or with `cpu_kernels=torch` it is `nn.Dropout` exactly (and
`isinstance` of it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import compiled, dropout_mask

_SCALED = compiled.CompiledKernel(dropout_mask.masked_scale)


class _MaskedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = dropout_mask.keep_mask(x.shape, p).view(torch.uint8)
        keep_scale = dropout_mask.keep_scale(p)
        ctx.save_for_backward(keep, keep_scale)
        return _SCALED(x.contiguous(), keep, keep_scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        keep, keep_scale = ctx.saved_tensors
        return _SCALED(grad.contiguous(), keep, keep_scale), None


class Dropout(nn.Dropout):
    """`nn.Dropout(p)` (same constructor, no state), fast on CPU in training (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if (0.0 < self.p < 1.0 and not self.inplace and not _SCALED.failed and x.dtype in (torch.float32, torch.bfloat16)
                and compiled.usable(x)):
            return _MaskedDropout.apply(x, self.p)
        return F.dropout(x, self.p, True, self.inplace)
