"""Post-training int8 quantization of a model's nn.Linear layers, for inference (generate, eval, serve).

- `int8_dynamic`: PyTorch's dynamic quantization (`torch.ao.quantization.quantize_dynamic`): int8 weights
  (per-channel scales) and activations quantized on the fly per batch, int8 x int8 matmuls through the
  fbgemm/x86 kernels. CPU and fp32 only; decodes 2x faster than fp32 at 768 wide (4 x 768 GPT, batch 1, one
  thread: 179 vs 88 tokens/s), but slower for small models (gpt-nano 4 x 128: 449 vs 624).
- `int8_weight`: weight-only int8 with one scale per output channel (`Int8WeightOnlyLinear`): activations
  keep their dtype and the matmul runs on the weight cast back, so the output is x @ W_q^T * scale.
  A quarter of fp32's weight memory (half of bf16's), on CPU or GPU; not faster on CPU (67 vs 88 tokens/s).

Only nn.Linear layers change: embeddings and norms keep their dtype, so a tied LM head is quantized as
a Linear while the token embedding it was tied to stays exact. MoE routers are left in full precision:
they are tiny, and rounding their weights would flip which expert a token goes to.

torchao (`Int8WeightOnlyConfig`) was tried for `int8_weight` and not used: with it installed, every
`transformers` import loads it (+2 s per process, and warnings about CUDA-only kernels on CPU machines),
and its CPU path was no faster than the 20 lines below (243 vs 120 us fp32 for a 128x512 MLP at batch 1).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels.linear import is_plain_linear, linear

QUANTIZE_MODES = ("int8_dynamic", "int8_weight")
KEEP_FULL_PRECISION = ("router",)  # Linear layers whose name ends with one of these are not quantized


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ W_int8^T) * scale + bias, with W_int8 = round(W / scale) and scale = max|W_row| / 127."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.size(1), qweight.size(0)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Symmetric per-output-channel absmax: each row keeps its own range, so one large row (a frequent
        token in the LM head) does not crush the resolution of the others."""
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(qweight, scale.to(linear.weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scaling the (.., out) output is cheaper than dequantizing the (out, in) weight (measured 2.7x at 768)
        y = linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules a quantize mode replaces."""
    return [name for name, m in model.named_modules() if is_plain_linear(m) and not name.endswith(KEEP_FULL_PRECISION)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, mode: str | None) -> nn.Module:
    """Quantize `model` in place (and return it) for inference; `mode` None / "none" leaves it as it is.

    Call it after the weights are loaded and the model is on its final device and dtype.
    """
    if mode in (None, "none", "null", ""):
        return model
    if mode not in QUANTIZE_MODES:
        raise ConfigError("quantize", f"unknown mode {mode!r}", f"use one of {', '.join(QUANTIZE_MODES)} or null")
    names = quantizable_linears(model)
    model.eval()
    if mode == "int8_weight":
        for name in names:
            _replace(model, name, Int8WeightOnlyLinear.from_linear(model.get_submodule(name)))
        return model
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ConfigError("quantize", f"int8_dynamic runs fp32 models on CPU only (this model is {param.dtype} on {param.device.type})",
                          "use device=cpu dtype=fp32, or quantize=int8_weight")
    with warnings.catch_warnings():  # torch.ao's eager-mode API warns about its future move to torchao
        warnings.simplefilter("ignore")
        for name in names:  # torch.ao swaps exact nn.Linear types only; lmforge's Linear holds the same state
            model.get_submodule(name).__class__ = nn.Linear
        spec = dict.fromkeys(names, torch.ao.quantization.per_channel_dynamic_qconfig)
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model
