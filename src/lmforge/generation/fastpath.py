"""A lean one-token decode step for GPT and Llama on CPU: the same math as the models' forward, fewer passes.

A decode step on CPU at batch 1 is a chain of matrix-vector products, bound by how fast the weights stream
from memory. Two things make the modules' forward slower than that floor: `nn.Linear` keeps its weight as
(out, in), and MKL's x·Wᵀ kernel for one row reads that layout markedly slower than x·W from an (in, out)
copy (HF's GPT-2 `Conv1D` stores (in, out) for the same reason); and every layer pays for generic code —
module calls, mask building, SDPA's dispatch for a single query, logits of every position at the prefill.

`DecodePlan.get(model)` returns, for a supported model, a plan holding (in, out)-contiguous copies of its
matrices — Q/K/V (Llama: q/k/v_proj, gate/up_proj) fused into one matrix each — and `plan.step` runs one new
token per row through them, writing its keys/values into the model's own `KVCache` exactly as the forward
would. Everything else (prefill, several tokens at once, speculative verification) keeps using the model.
The plan is cached per model and rebuilt when any of its parameters changes (storage or in-place version) and
after any torch optimizer step (fused optimizers change weights without bumping versions), so it can sit under
a training loop's sample callback or an RL stage's rollouts; it holds one extra copy of the weights while the
model lives (`clear()` drops them; models over `MAX_COPY_BYTES` get no plan). `tests/unit/test_generate.py` checks it gives the same tokens as the
forward, for every supported configuration.

Supported: exactly `GPT` (learned positions) and `Llama` (RoPE; GQA; sliding window) with their own
blocks, float32 weights on CPU, no forward hooks, no prefix-tuning hook, no LoRA / quantised Linears, not
under autocast. Anything else returns None and decodes through the forward, as before. `disabled()` turns
the plan off (tests, A/B benchmarks).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lmforge.models.layers.kv_cache import KVCache
from lmforge.models.layers.rope import apply_rotary

_enabled = True
MAX_COPY_BYTES = 4 << 30  # models with more weight bytes than this decode through the forward (no second copy)
_plans: weakref.WeakKeyDictionary[nn.Module, DecodePlan] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_optimizer_steps = 0  # every torch optimizer step in this process: part of each plan's signature


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Weights may have changed: torch's fused AdamW/Adam update parameters in place without bumping their version
    counters (torch 2.13), so a plan keyed on versions alone decoded RL rollouts and sample generations with the
    weights it was first built from, whatever training did since."""
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@contextmanager
def disabled() -> Iterator[None]:
    """Decode through the models' forward inside (the reference the plan is tested against)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def clear() -> None:
    """Drop every cached plan (and its copy of the weights)."""
    with _lock:
        _plans.clear()


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.detach().t().contiguous()


def _fused_t(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(in, sum of outs) weight and concatenated bias (or None) of Linears applied to the same input."""
    w = torch.cat([lin.weight.detach() for lin in linears], 0).t().contiguous()
    biases = [lin.bias for lin in linears]
    return w, None if biases[0] is None else torch.cat([b.detach() for b in biases], 0)


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


def _supported(model: nn.Module) -> str | None:
    """'gpt' / 'llama' where the plan reproduces the model's forward, else None."""
    from lmforge.models.gpt import GPT, Block
    from lmforge.models.layers.attention import CausalSelfAttention
    from lmforge.models.layers.gqa import GroupedQueryAttention
    from lmforge.models.layers.mlp import GeluMLP, SwiGLU
    from lmforge.models.layers.norm import RMSNorm
    from lmforge.models.llama import Llama, LlamaBlock

    if type(model) is GPT:
        kind, block_t, attn_t, mlp_t, norm_t = "gpt", Block, CausalSelfAttention, GeluMLP, nn.LayerNorm
        if model.wpe is None:  # ALiBi
            return None
    elif type(model) is Llama:
        kind, block_t, attn_t, mlp_t, norm_t = "llama", LlamaBlock, GroupedQueryAttention, SwiGLU, RMSNorm
        if model.rope is None:
            return None
    else:
        return None
    from lmforge.kernels.dropout import Dropout
    from lmforge.kernels.gelu import GeluTanh
    from lmforge.kernels.linear import Linear

    allowed = {block_t, attn_t, mlp_t, norm_t, nn.Linear, Linear, nn.Embedding, nn.Dropout, Dropout, nn.GELU, GeluTanh, nn.ModuleList,
               type(model)}
    if kind == "llama":
        from lmforge.models.layers.rope import RotaryEmbedding

        allowed.add(RotaryEmbedding)
    for m in model.modules():
        if type(m) not in allowed or m._forward_hooks or m._forward_pre_hooks:
            return None
        if isinstance(m, nn.GELU) and m.approximate != "tanh":
            return None
        if isinstance(m, (attn_t,)) and (m.kv_prefix is not None or m.capture_weights):
            return None
    params = list(model.parameters())
    if not params or any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return None
    if sum(p.numel() * p.element_size() for p in params) > MAX_COPY_BYTES:
        return None
    return kind


def _signature(model: nn.Module) -> tuple[Any, ...] | None:
    """What the plan's copies were made from: every parameter's storage and in-place version, and the count of
    optimizer steps so far (None when a parameter is an inference tensor, whose version is not tracked: then the
    plan is not cached)."""
    sig: list[Any] = [_optimizer_steps]
    for p in model.parameters():
        if p.is_inference():
            return None
        sig.append((p.data_ptr(), p._version, tuple(p.shape)))
    return tuple(sig)


class DecodePlan:
    """One-token decode step of a supported model (see the module doc)."""

    @staticmethod
    def get(model: nn.Module) -> DecodePlan | None:
        """The model's plan (built or refreshed as needed), or None where it does not apply."""
        if not _enabled or torch.is_autocast_enabled("cpu") or model.training:
            return None
        kind = _supported(model)
        if kind is None:
            return None
        sig = _signature(model)
        with _lock:
            plan = _plans.get(model)
            if plan is None or sig is None or plan.signature != sig:
                plan = DecodePlan(model, kind, sig)
                if sig is not None:
                    _plans[model] = plan
        return plan

    def __init__(self, model: nn.Module, kind: str, signature: tuple[Any, ...] | None) -> None:
        self.kind, self.signature = kind, signature
        self.model_ref = weakref.ref(model)
        cfg = model.config
        self.n_head = cfg.n_head
        self.n_kv_head = getattr(cfg, "n_kv_head", None) or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.eps = cfg.norm_eps
        self.window = getattr(cfg, "sliding_window", None)
        self.wte = model.wte.weight.detach()
        self.head = _t(model.lm_head.weight)
        self.layers: list[tuple[Any, ...]] = []
        with torch.no_grad():
            if kind == "gpt":
                self.wpe = model.wpe.weight.detach()
                self.final = (model.ln_f.weight.detach(), None if model.ln_f.bias is None else model.ln_f.bias.detach())
                for b in model.blocks:
                    a, m = b.attn, b.mlp
                    self.layers.append((
                        b.ln_1.weight, b.ln_1.bias, _t(a.qkv.weight), a.qkv.bias, _t(a.proj.weight), a.proj.bias,
                        b.ln_2.weight, b.ln_2.bias, _t(m.fc.weight), m.fc.bias, _t(m.proj.weight), m.proj.bias,
                    ))
            else:
                self.final = (model.norm.weight.detach(), None)
                for b in model.blocks:
                    a, m = b.attn, b.mlp
                    qkv, qkv_b = _fused_t(a.q_proj, a.k_proj, a.v_proj)
                    gu, gu_b = _fused_t(m.gate_proj, m.up_proj)
                    self.layers.append((
                        b.attn_norm.weight, qkv, qkv_b, _t(a.o_proj.weight), a.o_proj.bias,
                        b.mlp_norm.weight, gu, gu_b, _t(m.down_proj.weight), m.down_proj.bias,
                    ))

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))  # RMSNorm, float32

    def _attend(self, q: torch.Tensor, layer: int, cache: KVCache, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None, first: int) -> torch.Tensor:
        """q (B, H, D); k, v (B, H_kv, D) of the new token -> attention output (B, H·D) over keys [first, end)."""
        B, pos = q.size(0), cache.length
        keys, values = cache.keys[layer], cache.values[layer]
        keys[:, :, pos] = k
        values[:, :, pos] = v
        keys, values = keys[:, :, first : pos + 1], values[:, :, first : pos + 1]
        q = q.view(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)  # query heads grouped by K/V head
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(1.0 / math.sqrt(self.head_dim))
        if bias is not None:
            scores = scores + bias
        return torch.matmul(scores.softmax(-1), values).view(B, self.n_head * self.head_dim)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor | None = None,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, 1, V) of one new token per row, ids (B, 1), stored after the cache's `length` tokens.

        `position_ids` (B, 1) where rows are left-padded (default: the cache length); `key_mask` (B, past + 1)
        True for the keys each row may attend to (its padding False)."""
        B, pos = ids.size(0), cache.length
        if pos + 1 > cache.max_len or cache.keys[0] is None:
            raise ValueError("DecodePlan.step needs a cache holding the prefill and room for one more token")
        first = 0 if self.window is None else max(0, pos + 1 - self.window)
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=torch.float32).masked_fill_(~key_mask, float("-inf"))
            bias = bias[:, None, None, first:]
        x = self.wte[ids[:, 0]]
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        if self.kind == "gpt":
            x = x + (self.wpe[pos] if position_ids is None else self.wpe[position_ids[:, 0]])
            C = x.size(-1)
            for i, (l1w, l1b, qkv_w, qkv_b, pw, pb, l2w, l2b, fw, fb, mw, mb) in enumerate(self.layers):
                qkv = _mm(F.layer_norm(x, (C,), l1w, l1b, self.eps), qkv_w, qkv_b).view(B, 3, H, D)
                y = self._attend(qkv[:, 0], i, cache, qkv[:, 1], qkv[:, 2], bias, first)
                x = x + _mm(y, pw, pb)
                h = F.gelu(_mm(F.layer_norm(x, (C,), l2w, l2b, self.eps), fw, fb), approximate="tanh")
                x = x + _mm(h, mw, mb)
            x = F.layer_norm(x, (C,), *self.final, self.eps)
        else:
            model = self.model_ref()
            start = pos if position_ids is None else None
            pids = torch.tensor([[pos]]) if position_ids is None else position_ids
            cos, sin = model.rotary(pids, x.dtype, cache, start)
            for i, (nw, qkv_w, qkv_b, ow, ob, mw, gu_w, gu_b, dw, db) in enumerate(self.layers):
                qkv = _mm(self._rms(x, nw), qkv_w, qkv_b)
                q = qkv[:, : H * D].view(B, H, 1, D)
                k = qkv[:, H * D : (H + Hk) * D].view(B, Hk, 1, D)
                v = qkv[:, (H + Hk) * D :].view(B, Hk, D)
                q, k = apply_rotary(q, k, cos, sin)
                y = self._attend(q.view(B, H, D), i, cache, k.view(B, Hk, D), v, bias, first)
                x = x + _mm(y, ow, ob)
                gate, up = _mm(self._rms(x, mw), gu_w, gu_b).chunk(2, dim=-1)
                x = x + _mm(F.silu(gate) * up, dw, db)
            x = self._rms(x, self.final[0])
        cache.advance(1)
        return torch.mm(x, self.head)[:, None]
