"""Attention kernels selectable per run (`model.attn_backend`) for the decoder families; all compute the same
softmax(QK^T/sqrt(d) + mask) V and are checked against `eager` in tests/unit/test_attention_backends.py.

* `sdpa` (default): torch's scaled_dot_product_attention (flash / memory-efficient / math kernels per device);
  on CPU in bf16, plain causal self-attention runs as GEMMs instead (kernels/cpu_attention.py: same precision,
  ~2x faster there than SDPA's CPU flash kernel) unless `cpu_kernels=torch`.
* `flex`: torch's FlexAttention. A boolean mask (padding, packed-document masks from `data.document_mask`,
  prefix-LM) becomes a `BlockMask` once per forward (it is reused by every layer), so blocks a document mask
  rules out are skipped instead of computed then masked; ALiBi's additive mask becomes a `score_mod`. Under
  `torch.compile` it runs as one fused kernel (CPU and CUDA); eager it runs a slower reference path. No
  attention dropout (refused at config time). Torch 2.13 has no flex backward on CPU: CPU training steps
  fall back to SDPA with the same mask (warned once); on CUDA flex trains.
* `flash_attn`: the flash-attn package (CUDA, fp16/bf16), imported only when chosen, with a clear error when
  absent. Plain causal attention and KV-cache decoding call `flash_attn_func`; packed documents (a block-
  diagonal causal mask) call `flash_attn_varlen_func` with the documents' `cu_seqlens`, so no (T, T) mask is
  ever formed. Masks it cannot express (left padding in batched generation, ALiBi) go through SDPA.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.kernels import cpu_attention
from lmforge.models.layers.masks import is_causal_query

# The last forward's BlockMask, with the mask tensor it came from (held, so its identity cannot be reused by a
# new tensor): every layer of one forward gets the same mask object and builds nothing.
_LAST_BLOCK_MASK: list[Any] = [None, None, None]  # [mask tensor or None, (B, T, T_k, device), BlockMask]


def attend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout_p: float = 0.0, enable_gqa: bool = False) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, H_kv, T_k, D); mask: None (causal), bool (B|1, 1, T, T_k) or additive float."""
    if backend == "flex":
        if not (q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            return _flex(q, k, v, mask, enable_gqa)
        _warn_cpu_flex_backward()
    if backend == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _flash(q, k, v, mask, dropout_p)
        if out is not None:
            return out
    elif backend == "flash_attn":
        _import_flash()  # a missing package fails loudly even on the SDPA fallback (CPU, fp32)
    elif backend == "sdpa" and cpu_attention.usable(q, k, v, mask, dropout_p):
        return cpu_attention.gemm_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal_query(mask, q.size(-2)),
                                          enable_gqa=enable_gqa)


def attend_packed(backend: str, qkv: torch.Tensor, n_head: int, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor | None:
    """Causal self-attention straight from a fused (B, T, 3·C) q|k|v projection output, as (B, T, C), where a kernel
    takes that layout (`cpu_attention.packed_gemm_attention`: CPU, bf16, no mask); None: split q, k, v and `attend`."""
    if backend == "sdpa" and mask is None and cpu_attention.packed_usable(qkv, n_head, dropout_p):
        return cpu_attention.packed_gemm_attention(qkv, n_head, dropout_p)
    return None


def _warn_cpu_flex_backward() -> None:
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn("attn_backend=flex: FlexAttention has no backward on CPU (torch 2.13); training steps on CPU use SDPA "
                      "with the same mask (forward-only passes, e.g. eval and generation, use flex)", stacklevel=3)


_WARNED: list[bool] = []


# --- flex ---------------------------------------------------------------------------------------------------
def _flex_block_mask(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    shape = (batch, q_len, k_len, str(device))
    cached_mask, cached_shape, block_mask = _LAST_BLOCK_MASK
    if block_mask is not None and cached_mask is mask and cached_shape == shape:
        return block_mask
    offset = k_len - q_len
    if mask is None:
        def causal(b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return ki <= qi + offset
        block_mask = create_block_mask(causal, None, None, q_len, k_len, device=device)
    else:
        dense = mask[:, 0] if mask.size(0) == batch else mask[:, 0].expand(batch, q_len, k_len)

        def allowed(b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return dense[b, qi, ki]
        block_mask = create_block_mask(allowed, batch, None, q_len, k_len, device=device)
    _LAST_BLOCK_MASK[:] = [mask, shape, block_mask]
    return block_mask


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, enable_gqa: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    B, _, T, _ = q.shape
    T_k = k.size(-2)
    if mask is not None and mask.is_floating_point():  # ALiBi: additive biases, -inf where not allowed
        bias = mask

        def score_mod(score: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return score + bias[b if bias.size(0) > 1 else 0, h if bias.size(1) > 1 else 0, qi, ki]
        return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=enable_gqa)
    if mask is None and T == 1:  # one decode step sees every cached key
        return flex_attention(q, k, v, enable_gqa=enable_gqa)
    return flex_attention(q, k, v, block_mask=_flex_block_mask(mask, B, T, T_k, q.device), enable_gqa=enable_gqa)


# --- flash_attn -----------------------------------------------------------------------------------------------
def _import_flash() -> Any:
    try:
        import flash_attn
    except ImportError as err:
        raise ConfigError("model.attn_backend", f"flash_attn needs the flash-attn package ({err})",
                          "pip install flash-attn --no-build-isolation on a CUDA machine, or use model.attn_backend=sdpa") from None
    return flash_attn


def document_starts(mask: torch.Tensor) -> torch.Tensor | None:
    """Each query's document start if `mask` (B, 1, T, T) is block-diagonal causal (packed documents), else None."""
    if mask.dim() != 4 or mask.size(1) != 1 or mask.size(-1) != mask.size(-2):
        return None
    rows = mask[:, 0]
    T = rows.size(-1)
    start = rows.int().argmax(dim=-1)  # first visible key of each query = its document's start
    idx = torch.arange(T, device=mask.device)
    rebuilt = (idx[None, None, :] >= start[:, :, None]) & (idx[None, None, :] <= idx[None, :, None])
    # documents: each query starts a new one (start == i) or continues the previous query's (same start)
    continues = torch.ones_like(start, dtype=torch.bool)
    continues[:, 1:] = (start[:, 1:] == start[:, :-1]) | (start[:, 1:] == idx[1:])
    if not (torch.equal(rebuilt, rows) and bool(continues.all())):
        return None
    return start  # (B, T): each query's document start


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor | None:
    flash_attn = _import_flash()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, T, H, D); GQA is native
    if mask is None:  # causal, bottom-right aligned (also a KV-cache decode step)
        return flash_attn.flash_attn_func(qt, kt, vt, dropout_p=dropout_p, causal=q.size(-2) > 1).transpose(1, 2)
    if mask.is_floating_point() or q.size(-2) != k.size(-2):
        return None
    starts = document_starts(mask)
    if starts is None:
        return None
    B, T = starts.shape
    new_doc = torch.ones_like(starts, dtype=torch.bool)
    new_doc[:, 1:] = starts[:, 1:] != starts[:, :-1]
    boundaries = (torch.nonzero(new_doc.reshape(-1)).flatten()).to(torch.int32)
    cu_seqlens = torch.cat([boundaries, torch.tensor([B * T], device=q.device, dtype=torch.int32)])
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    flat = [t.reshape(B * T, t.size(2), t.size(3)) for t in (qt, kt, vt)]
    out = flash_attn.flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout_p, causal=True)
    return out.reshape(B, T, q.size(1), q.size(3)).transpose(1, 2)
