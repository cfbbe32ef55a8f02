"""T5 (Raffel et al., 2020) and T5 v1.1 as a plain nn.Module: an encoder and a decoder of pre-norm blocks.

How it differs from GPT, each detail taken from the reference so that Hugging Face checkpoints compute the
same logits:
  * no position embeddings: a learned relative position bias (`layers/relative_position.py`), computed once
    per stack and added to the self-attention scores of every layer of that stack;
  * attention scores are not divided by sqrt(head_dim): T5 folds that factor into the init of `q`;
  * RMSNorm without bias or mean subtraction ("T5LayerNorm"), and no biases anywhere;
  * decoder blocks add cross-attention over the encoder output (no position bias there);
  * feed-forward is ReLU (T5) or gated tanh-GELU (v1.1, `gelu_new`);
  * a tied LM head scales the decoder output by d_model**-0.5 first; an untied head (v1.1) does not.

Masks follow `layers/masks.py` (boolean, True = attend) and are turned into one additive float bias per stack
(position bias + masks), which both attention backends add to the scores.

Incremental decoding: `decode(..., cache=model.make_cache(B, max_len))` stores the decoder's self-attention
keys/values and, at the first call, each layer's cross-attention K/V of the encoder output, which later calls
reuse (they may then pass `memory=None`). Position biases of the new tokens are those of their absolute
decoder positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels.dropout import Dropout
from lmforge.kernels.linear import Linear
from lmforge.models.config import ATTN_BACKENDS, FamilyConfig, require_choice, require_positive_ints
from lmforge.models.layers.kv_cache import KVCache
from lmforge.models.layers.masks import build_attention_mask, causal_tril
from lmforge.models.layers.norm import RMSNorm
from lmforge.models.layers.relative_position import RelativePositionBias

FEED_FORWARDS = ("relu", "gated-gelu")
IGNORE_INDEX = -100  # the losses' "no target" label (lmforge.objectives.IGNORE_INDEX), replaced by pad here


@dataclass
class T5Config(FamilyConfig):
    """T5 encoder-decoder. Names follow GPTConfig; the T5 name of each size is in its comment."""

    kind: ClassVar[str] = "encoder_decoder"

    n_layer: int = 6  # encoder blocks (num_layers)
    n_decoder_layer: int | None = None  # decoder blocks (num_decoder_layers); null = n_layer
    n_head: int = 8  # num_heads
    n_embd: int = 512  # d_model
    head_dim: int = 64  # d_kv; n_head * head_dim need not equal n_embd
    intermediate_size: int = 2048  # d_ff
    vocab_size: int | None = None  # filled from the tokenizer when None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward: str = "relu"  # relu (T5) | gated-gelu (T5 v1.1)
    norm_eps: float = 1e-6
    dropout: float = 0.0
    initializer_factor: float = 1.0  # scales every init std (T5's fan-in based init); 1.0 = the reference
    tie_embeddings: bool = True  # tied head (with d_model**-0.5 output scaling) vs untied (v1.1)
    pad_token_id: int = 0  # replaces IGNORE_INDEX in shifted labels
    decoder_start_token_id: int | None = None  # first decoder input; null = pad_token_id (T5's convention)
    max_seq_len: int = 512  # relative positions have no hard limit: a bound for data checks only
    attn_backend: str = "sdpa"  # sdpa | eager
    family: str = "t5"

    def __post_init__(self) -> None:
        require_positive_ints(
            self,
            "n_layer",
            "n_head",
            "n_embd",
            "head_dim",
            "intermediate_size",
            "max_seq_len",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        if self.n_decoder_layer is not None:
            require_positive_ints(self, "n_decoder_layer")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(
                "model.vocab_size",
                f"must be positive, got {self.vocab_size}",
                "leave it null to take the tokenizer's size",
            )
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(
                "model.relative_attention_num_buckets",
                f"{self.relative_attention_num_buckets} leaves no exact bucket per direction",
                "use at least 4 (T5 uses 32)",
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise ConfigError(
                "model.relative_attention_max_distance",
                f"{self.relative_attention_max_distance} is not above "
                f"num_buckets // 2 = {self.relative_attention_num_buckets // 2}",
                "set it larger than half the number of buckets (T5 uses 128 for 32 buckets)",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                "model.dropout", f"must be in [0, 1), got {self.dropout}", "set model.dropout=0.0 .. 0.9"
            )
        if self.norm_eps <= 0 or self.initializer_factor <= 0:
            key = "model.norm_eps" if self.norm_eps <= 0 else "model.initializer_factor"
            raise ConfigError(key, "must be positive", f"set {key} > 0")
        for key in ("pad_token_id", "decoder_start_token_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(
                    f"model.{key}",
                    f"must be a token id >= 0, got {value!r}",
                    f"set model.{key} to a token id",
                )
        require_choice("feed_forward", self.feed_forward, FEED_FORWARDS)
        require_choice("attn_backend", self.attn_backend, ATTN_BACKENDS)

    @property
    def decoder_depth(self) -> int:
        return self.n_decoder_layer if self.n_decoder_layer is not None else self.n_layer


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> 0 / most negative float, added to the scores.

    finfo.min rather than -inf, as the reference: a row whose keys are all masked (an all-padding encoder
    row seen through cross-attention) gets a uniform softmax instead of NaN.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class T5Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections and unscaled scores plus an additive `bias`."""

    def __init__(self, n_embd: int, n_head: int, head_dim: int, dropout: float, backend: str) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.dropout, self.backend = n_head, head_dim, dropout, backend
        inner = n_head * head_dim
        self.q = Linear(n_embd, inner, bias=False)
        self.k = Linear(n_embd, inner, bias=False)
        self.v = Linear(n_embd, inner, bias=False)
        self.o = Linear(inner, n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        cross: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, C) queries; memory: (B, S, C) keys/values for cross-attention (None = self-attention);
        bias: additive, broadcastable to (B, n_head, T, S). With a `cache`, self-attention stores its keys and
        values under `layer` and attends over all cached ones; cross-attention (`cross=True`) computes the
        memory's K/V once and reuses them (memory may then be None)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        stored = cache.cross_kv(layer) if cache is not None and cross else None
        if stored is not None:
            k, v = stored
        else:
            kv = memory if cross else x
            if kv is None:
                raise ValueError("cross-attention needs the encoder output (memory) or a cache holding its K/V")
            k = self.k(kv).view(B, -1, self.n_head, self.head_dim).transpose(1, 2)
            v = self.v(kv).view(B, -1, self.n_head, self.head_dim).transpose(1, 2)
            if cache is not None:
                if cross:
                    cache.set_cross_kv(layer, k, v)
                else:
                    k, v = cache.update(layer, k, v)
        p = self.dropout if self.training else 0.0
        if self.backend == "sdpa":
            mask = None if bias is None else bias.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        else:
            scores = q @ k.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            y = F.dropout(scores.softmax(dim=-1), p=p, training=p > 0) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """Tanh-approximated GELU spelled out as in the reference (`gelu_new`): F.gelu(approximate="tanh") differs
    in the last bits, which the untied N(0, 1) head of v1.1 amplifies to ~1e-5 in the logits."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5FeedForward(nn.Module):
    """ReLU: wo(relu(wi x)). Gated GELU (v1.1): wo(gelu_tanh(wi_0 x) · wi_1 x). Dropout before wo, as T5."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        if gated:
            self.wi_0 = Linear(n_embd, hidden, bias=False)
            self.wi_1 = Linear(n_embd, hidden, bias=False)
        else:
            self.wi = Linear(n_embd, hidden, bias=False)
        self.wo = Linear(hidden, n_embd, bias=False)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_new(self.wi_0(x)) * self.wi_1(x) if self.gated else F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class T5Block(nn.Module):
    """x + attn(ln(x)) [+ cross_attn(ln(x), encoder output) in the decoder], then x + mlp(ln(x))."""

    def __init__(self, cfg: T5Config, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        self.ln_1 = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = T5Attention(cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.dropout, cfg.attn_backend)
        if cross:
            self.ln_cross = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
            self.cross_attn = T5Attention(cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.dropout, cfg.attn_backend)
        self.ln_2 = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = T5FeedForward(
            cfg.n_embd, cfg.intermediate_size, cfg.dropout, cfg.feed_forward == "gated-gelu"
        )
        self.drop = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        memory_bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), bias, None, cache, layer))
        if self.cross and (memory is not None or cache is not None):
            x = x + self.drop(self.cross_attn(self.ln_cross(x), memory_bias, memory, cache, layer, cross=True))
        return x + self.drop(self.mlp(self.ln_2(x)))


class T5Stack(nn.Module):
    """Blocks + final norm. The position bias is computed once here and shared by every block (Hugging Face
    stores its table in block 0's attention and passes the result on: the same computation)."""

    def __init__(self, cfg: T5Config, n_layer: int, decoder: bool) -> None:
        super().__init__()
        self.position_bias = RelativePositionBias(
            cfg.n_head,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            bidirectional=not decoder,
        )
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(T5Block(cfg, cross=decoder) for _ in range(n_layer))
        self.ln_f = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) embeddings; mask: bool self-attention mask (over past + T keys with a cache) or None;
        memory_mask: bool (B, 1, 1, S); cache: the decoder's KV cache (`past` stored tokens precede x)."""
        T = x.size(1)
        past = 0 if cache is None else cache.length
        bias = self.position_bias(T, past + T, past).to(x.dtype)
        if mask is not None:
            bias = bias + additive_mask(mask, bias.dtype)
        memory_bias = None if memory_mask is None else additive_mask(memory_mask, bias.dtype)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, bias, memory, memory_bias, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.drop(self.ln_f(x))


class T5(nn.Module):
    """`forward(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None) -> logits`
    of shape (B, T_dec, vocab). Teacher forcing: decoder inputs are the targets shifted right (`shift_right`).
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError(
                "model.vocab_size",
                "is null and no tokenizer filled it",
                "pass vocab_size to lmforge.models.build",
            )
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # input embedding of both stacks
        self.encoder = T5Stack(cfg, cfg.n_layer, decoder=False)
        self.decoder = T5Stack(cfg, cfg.decoder_depth, decoder=True)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's init (Mesh TensorFlow): normal with std = factor / sqrt(fan-in), embeddings N(0, factor).

        q's std is also divided by sqrt(head_dim): that stands in for the scaling the scores lack.
        """
        f, d, cfg = self.config.initializer_factor, self.config.n_embd, self.config
        inner = cfg.n_head * cfg.head_dim
        nn.init.normal_(self.shared.weight, std=f)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=f)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, f)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.relative_attention_bias.weight, std=f * d**-0.5)
            elif isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=f * (d * cfg.head_dim) ** -0.5)
                nn.init.normal_(module.k.weight, std=f * d**-0.5)
                nn.init.normal_(module.v.weight, std=f * d**-0.5)
                nn.init.normal_(module.o.weight, std=f * inner**-0.5)
            elif isinstance(module, T5FeedForward):
                for wi in (module.wi_0, module.wi_1) if module.gated else (module.wi,):
                    nn.init.normal_(wi.weight, std=f * d**-0.5)
                nn.init.normal_(module.wo.weight, std=f * cfg.intermediate_size**-0.5)

    # --- the two halves, usable on their own (generation encodes once, then decodes step by step) ---------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids [+ (B, S) padding mask, 1 = real token] -> (B, S, n_embd) encoder output."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "T5 takes a (B, S) padding mask for the encoder: cross-attention must know the padded keys"
            )
        mask = build_attention_mask(attention_mask, input_ids.size(1), input_ids.device, causal=False)
        return self.encoder(self.shared(input_ids), mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Decoder over (B, T) ids attending to `memory` (the encoder output) -> logits (B, T, vocab).

        `attention_mask` is the encoder's padding mask; `decoder_attention_mask` a (B, T) padding mask or a
        complete (B, 1, T, T) boolean mask (causality is then the caller's business). With a `cache` (from
        `make_cache`) the ids are the new tokens after `cache.length` stored ones, a padding mask covers all
        of them, and `memory` is only read at the first call (its K/V are cached)."""
        T = decoder_input_ids.size(1)
        device = decoder_input_ids.device
        past = 0 if cache is None else cache.length
        mask = build_attention_mask(decoder_attention_mask, T, device, causal=True, past_len=past)
        if mask is None and T > 1:  # the bias is additive anyway: spell the causal mask out
            mask = causal_tril(T, past + T, device)[None, None]
        memory_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        h = self.decoder(self.shared(decoder_input_ids), mask, memory, memory_mask, cache)
        if self.config.tie_embeddings:
            h = h * self.config.n_embd**-0.5  # the tied N(0, 1) embedding would otherwise give huge logits
        return self.lm_head(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty decoder cache (self-attention K/V for up to `max_len` decoder tokens + cross-attention K/V)."""
        cfg = self.config
        return KVCache(cfg.decoder_depth, batch_size, cfg.n_head, cfg.head_dim, max_len)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: [start, labels[:-1]], IGNORE_INDEX replaced by the pad id."""
        cfg = self.config
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        shifted = labels.new_full(labels.shape, start)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, cfg.pad_token_id)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the relative position tables (the analogue of GPT's position
        embeddings). The shared token embedding counts: it is also the tied head."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        return n - sum(
            s.position_bias.relative_attention_bias.weight.numel() for s in (self.encoder, self.decoder)
        )
