"""Prefix tuning (Li & Liang, 2021): learned keys/values that every attention layer attends to first.

Each decoder attention layer gets `num_virtual_tokens` extra key/value vectors (its K/V head count: n_kv_head
for grouped-query attention) put before the tokens' own. Every real token attends to all of them, padding
and causality only restrict the real keys. With `reparameterize` (the paper's training trick) the prefixes
are MLP(embedding): embedding (P, n_embd) -> Linear -> tanh -> Linear -> all layers' K/V; else they are
trained directly, N(0, init_std).

Positions: the virtual tokens take no position. Real tokens keep theirs (0 .. T-1: learned tables, RoPE
and `max_seq_len` are as without a prefix); prefix keys are not rotated by RoPE (a fixed rotation of a
learned vector is just another learned vector) and get no ALiBi distance penalty (bias 0).

Mechanism: the attention layers' `kv_prefix` hook (layers/attention.py, layers/gqa.py) runs after the KV
cache update, so the cache holds real tokens only and the prefix is prepended again at every step: cached
generation (`lmforge.generation.generate`) works unchanged, as do beam search and speculative decoding.
The hook object is not a module: the parameters live in one `prefix_encoder` at the model's root, so their
keys are `prefix_encoder.*`. Encoder and encoder-decoder families are refused. Nothing to merge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.layers.attention import CausalSelfAttention
from lmforge.models.layers.gqa import GroupedQueryAttention
from lmforge.models.layers.masks import causal_tril

ENCODER_ATTR = "prefix_encoder"


@dataclass(frozen=True)
class PrefixSettings:
    num_virtual_tokens: int = 8
    reparameterize: bool = True
    hidden: int = 128  # width of the reparameterisation MLP (the paper: 512 / 800 on GPT-2 sizes)
    init_std: float = 0.02  # direct prefixes (reparameterize=false) start at N(0, init_std)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> PrefixSettings:
        for key, default in (("num_virtual_tokens", 8), ("hidden", 128)):
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"peft.{key}", f"must be a positive integer, got {value!r}", f"e.g. peft.{key}={default}"
                )
        std = cfg.get("init_std", 0.02)
        if isinstance(std, bool) or not isinstance(std, int | float) or std <= 0:
            raise ConfigError(
                "peft.init_std", f"must be a positive number, got {std!r}", "e.g. peft.init_std=0.02"
            )
        return cls(
            cfg.get("num_virtual_tokens", 8),
            bool(cfg.get("reparameterize", True)),
            cfg.get("hidden", 128),
            float(std),
        )


class PrefixEncoder(nn.Module):
    """The prefixes of all layers. `layer_kv(i)` -> (keys, values), each (kv_heads, P, head_dim)."""

    def __init__(
        self, n_layer: int, kv_heads: int, head_dim: int, n_embd: int, settings: PrefixSettings
    ) -> None:
        super().__init__()
        self.n_layer, self.kv_heads, self.head_dim = n_layer, kv_heads, head_dim
        self.num_virtual_tokens = P = settings.num_virtual_tokens
        self.width = 2 * kv_heads * head_dim  # one layer's keys and values per virtual token
        self.enabled = True
        self.tp_mesh: Any = None  # set under tensor parallelism: layer_kv gives this rank's heads (parallel/peft_parallel.py)
        if settings.reparameterize:
            self.embedding = nn.Parameter(torch.randn(P, n_embd))  # nn.Embedding's N(0, 1), as HF peft
            self.mlp_in = nn.Linear(n_embd, settings.hidden)
            self.mlp_out = nn.Linear(settings.hidden, n_layer * self.width)
        else:
            self.prefix = nn.Parameter(torch.randn(n_layer, P, self.width) * settings.init_std)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "mlp_out"):
            # only this layer's rows of the output projection: each call stands alone, no memo to go stale
            rows = slice(layer * self.width, (layer + 1) * self.width)
            hidden = torch.tanh(self.mlp_in(self.embedding))
            flat = F.linear(hidden, self.mlp_out.weight[rows], self.mlp_out.bias[rows])
        else:
            flat = self.prefix[layer]
        parts = flat.view(self.num_virtual_tokens, 2, self.kv_heads, self.head_dim)
        if self.tp_mesh is not None:  # tensor parallel: the heads this rank's attention computes
            from lmforge.parallel.peft_parallel import this_rank_heads

            parts = this_rank_heads(parts, self.tp_mesh, dim=2)
        k, v = parts.permute(1, 2, 0, 3)
        return k, v


def extend_mask(
    mask: torch.Tensor | None, n_prefix: int, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor | None:
    """The layer's mask over [prefix, real keys]: every query sees every prefix key.

    None (plain causal) stays None for one query (it sees every key) and becomes an explicit bottom-right
    causal mask otherwise (SDPA's `is_causal` would align the triangle top-left). A boolean mask gets True
    columns, an additive (ALiBi) one zero columns."""
    if mask is None:
        return None if q_len == 1 else causal_tril(q_len, n_prefix + k_len, device)[None, None]
    shape = (*mask.shape[:-1], n_prefix)
    head = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([head, mask], dim=-1)


class PrefixHook:
    """The `kv_prefix` of attention layer `layer`: prepends that layer's prefix to its keys/values."""

    def __init__(self, encoder: PrefixEncoder, layer: int) -> None:
        self.encoder, self.layer = encoder, layer

    def __call__(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, q_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self.encoder.enabled:
            return k, v, mask
        pk, pv = self.encoder.layer_kv(self.layer)
        B, P, k_len = k.size(0), self.encoder.num_virtual_tokens, k.size(2)
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        return k, v, extend_mask(mask, P, q_len, k_len, k.device)


def attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, CausalSelfAttention | GroupedQueryAttention)]


def apply_prefix(model: nn.Module, settings: PrefixSettings) -> PrefixEncoder:
    """Add a `prefix_encoder` to the model and hook every attention layer to it (in place)."""
    config = getattr(model, "config", None)
    kind, family = getattr(config, "kind", "decoder"), getattr(config, "family", type(model).__name__)
    layers = attention_layers(model)
    if kind != "decoder" or not layers:
        raise ConfigError(
            "peft.method",
            f"prefix tuning supports decoder families (gpt, llama, mixtral), not {family} ({kind})",
            "use peft=lora or peft=adapter for this model",
        )
    shapes = {(getattr(a, "n_kv_head", a.n_head), a.head_dim) for a in layers}
    if len(shapes) != 1:
        raise ValueError(f"prefix tuning needs one K/V shape in every layer, found {sorted(shapes)}")
    ((kv_heads, head_dim),) = shapes
    encoder = PrefixEncoder(len(layers), kv_heads, head_dim, int(config.n_embd), settings)
    ref = next(model.parameters())
    encoder.to(device=ref.device, dtype=ref.dtype)
    setattr(model, ENCODER_ATTR, encoder)
    for i, attn in enumerate(layers):
        attn.kv_prefix = PrefixHook(encoder, i)
    return encoder


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    encoder = getattr(model, ENCODER_ATTR, None)
    return encoder if isinstance(encoder, PrefixEncoder) else None


def remove_prefix(model: nn.Module) -> None:
    """Unhook every attention layer and drop the encoder: the model is the base again."""
    for attn in attention_layers(model):
        attn.__dict__.pop("kv_prefix", None)  # the class default (None) shows again
    if prefix_encoder(model) is not None:
        delattr(model, ENCODER_ATTR)
