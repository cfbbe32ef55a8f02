"""Llama (and Mistral) as a plain nn.Module, readable top to bottom.

Token embedding → n_layer pre-norm blocks [RMSNorm → grouped-query attention with RoPE; RMSNorm → SwiGLU]
→ final RMSNorm → LM head (untied by default). Mistral is the same network with sliding-window attention
(`sliding_window=w`: each token sees itself and the w-1 tokens before it). `position=alibi` swaps RoPE for
ALiBi biases. Module names follow the Hugging Face checkpoints (q/k/v/o_proj, gate/up/down_proj) so the
converter in `lmforge.interop.hf_llama` is a key map.

Incremental decoding: `forward(..., cache=model.make_cache(B, max_len))` stores every layer's rotated keys and
values (n_kv_head heads, `layers/kv_cache.py`); later calls feed only the new tokens, rotated at their absolute
positions (past .. past + T - 1 unless `position_ids` says otherwise). The sliding window is applied by the
mask over the full-length cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels.linear import Linear
from lmforge.models.config import FamilyConfig, check_attn_backend, require_choice, require_positive_ints
from lmforge.models.decoder_lm import DecoderLM
from lmforge.models.layers.alibi import alibi_attention_mask, alibi_slopes
from lmforge.models.layers.gqa import GroupedQueryAttention
from lmforge.models.layers.kv_cache import KVCache
from lmforge.models.layers.masks import build_attention_mask
from lmforge.models.layers.mlp import SwiGLU
from lmforge.models.layers.norm import RMSNorm
from lmforge.models.layers.rope import RotaryEmbedding, check_rope_scaling

POSITIONS = ("rope", "alibi")


@dataclass
class LlamaConfig(FamilyConfig):
    """Llama / Mistral decoder. Keys follow GPTConfig's where they mean the same thing."""

    n_layer: int = 3
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (GQA); a divisor of n_head, 1 = MQA; null = n_head
    n_embd: int = 256
    intermediate_size: int = 688  # SwiGLU hidden width (Llama: ~8/3 · n_embd, rounded up)
    max_seq_len: int = 256
    vocab_size: int | None = None  # filled from the tokenizer when None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {type: linear|dynamic|yarn|llama3, factor, ...}; see layers/rope.py
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: attend to the last w positions only
    attn_backend: str = "sdpa"  # sdpa | eager | flex | flash_attn (GPU, flash-attn package)
    init_std: float = 0.02
    dropout: float = 0.0  # on attention probabilities (where HF Llama's attention_dropout acts)
    bias: bool = False  # biases on every attention and MLP projection
    position: str = "rope"  # rope | alibi
    family: str = "llama"

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        require_positive_ints(self, "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "max_seq_len")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                "model.n_embd",
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                f"choose model.n_embd as a multiple of model.n_head (e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))})",
            )
        if self.n_head % self.n_kv_head != 0:
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ConfigError(
                "model.n_kv_head",
                f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head} (each K/V head serves a whole group of query heads)",
                f"set model.n_kv_head to one of {divisors}",
            )
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError("model.vocab_size", f"must be positive, got {self.vocab_size}", "leave it null to take the tokenizer's size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}", "set model.dropout=0.0 .. 0.9")
        if self.norm_eps <= 0:
            raise ConfigError("model.norm_eps", f"must be positive, got {self.norm_eps}", "set model.norm_eps=1e-5")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError("model.sliding_window", f"must be null or a positive integer, got {self.sliding_window!r}", "e.g. model.sliding_window=4096")
        check_attn_backend(self)
        require_choice("position", self.position, POSITIONS)
        if self.position == "rope":
            if self.head_dim % 2:
                raise ConfigError("model.n_embd", f"head_dim={self.head_dim} is odd; RoPE rotates channel pairs", "make n_embd / n_head even")
            if self.rope_theta <= 0:
                raise ConfigError("model.rope_theta", f"must be positive, got {self.rope_theta}", "e.g. model.rope_theta=10000")
            self.rope_theta = float(self.rope_theta)
            check_rope_scaling(self.rope_scaling)
            if self.rope_scaling is not None:
                self.rope_scaling = dict(self.rope_scaling)
        elif self.rope_scaling is not None:
            raise ConfigError("model.rope_scaling", "only applies to position=rope", "set model.rope_scaling=null with position=alibi")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class LlamaBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). `mlp` defaults to SwiGLU; Mixtral passes its MoE layer."""

    def __init__(self, cfg: LlamaConfig, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = GroupedQueryAttention(
            cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dropout, cfg.bias, cfg.attn_backend
        )
        self.mlp_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = mlp if mlp is not None else SwiGLU(cfg.n_embd, cfg.intermediate_size, cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Llama(DecoderLM):
    """Decoder-only transformer. `forward(input_ids, attention_mask=None, position_ids=None, cache=None)
    -> logits (B, T, V)`."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size", "is null and no tokenizer filled it", "pass vocab_size to lmforge.models.build")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len) if cfg.position == "rope" else None
        self.blocks = nn.ModuleList(LlamaBlock(cfg, self.make_mlp(cfg)) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def make_mlp(self, cfg: LlamaConfig) -> nn.Module:
        """The feed-forward of one block; the hook Mixtral overrides."""
        return SwiGLU(cfg.n_embd, cfg.intermediate_size, cfg.bias)

    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix and embedding, zero biases, unit norms (HF Llama's init).
        A method so that FSDP / meta-device builds can re-run it after materialising."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def attention_inputs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        T: int,
        dtype: torch.dtype,
        past_len: int = 0,
        key_positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        default_start: int | None = None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """(rope cos/sin or None, mask) shared by all blocks: a boolean mask for RoPE (None = fused causal),
        an additive float mask carrying the biases for ALiBi. `past_len` cached tokens precede the T new ones;
        `key_positions` are the positions of all past_len + T keys (ALiBi with a cache); `cache` and
        `default_start` go to `rotary`."""
        cfg = self.config
        total = past_len + T
        window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < total else None
        allowed = build_attention_mask(
            attention_mask, T, position_ids.device, causal=True, sliding_window=window, past_len=past_len
        )
        if self.rope is not None:
            return self.rotary(position_ids, dtype, cache, default_start), allowed
        slopes = alibi_slopes(cfg.n_head, position_ids.device)
        return None, alibi_attention_mask(slopes, position_ids, allowed, dtype, key_positions)

    def rotary(
        self, position_ids: torch.Tensor, dtype: torch.dtype, cache: KVCache | None = None, start: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) of `position_ids`. While decoding with a cache, the table of every position up to
        the cache's length is computed once and indexed each step (the same float32 values: each entry depends
        on its own position only); dynamic NTK scaling depends on the current length, so it is recomputed.
        `start` says the positions are start .. start + T - 1 (the defaults): the table is then sliced."""
        assert self.rope is not None
        if cache is None or (self.rope.scaling is not None and self.rope.scaling["type"] == "dynamic"):
            return self.rope(position_ids, dtype)
        table = cache.memo.get("rope")
        if table is None or table[0].dtype != dtype or table[0].device != position_ids.device:
            table = cache.memo["rope"] = self.rope(torch.arange(cache.max_len, device=position_ids.device), dtype)
        cos, sin = table  # (1, max_len, head_dim)
        if start is not None:
            end = start + position_ids.size(-1)
            return cos[:, start:end], sin[:, start:end]
        ids = position_ids if position_ids.dim() == 2 else position_ids[None]
        return cos[0][ids], sin[0][ids]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states (B, T, n_embd): what reward and value heads read instead of logits."""
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        if self.config.position == "rope" and past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds model.max_seq_len={self.config.max_seq_len}")
        default_start = past if position_ids is None else None
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        x = self.wte(input_ids)
        key_positions = cache.store_positions(position_ids) if cache is not None and self.rope is None else None
        rope, mask = self.attention_inputs(
            attention_mask, position_ids, T, x.dtype, past, key_positions, cache, default_start
        )
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens; stores n_kv_head heads."""
        cfg = self.config
        kv_heads = self.blocks[0].attn.n_kv_head  # this rank's heads: n_kv_head / tensor_parallel_size under TP
        return KVCache(cfg.n_layer, batch_size, kv_heads, cfg.head_dim, max_len)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the input embedding table unless it is tied (then it is the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        return n
