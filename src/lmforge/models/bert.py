"""BERT (the BertForMaskedLM architecture) as a plain nn.Module, readable top to bottom.

Word + learned position + token-type embeddings → LayerNorm → n_layer post-LN blocks (bidirectional
attention, exact-erf GELU MLP) → MLM head: dense → GELU → LayerNorm → decoder tied to the word
embedding, with its own per-token bias. Numerically the same function as Hugging Face's BertForMaskedLM (see
`lmforge.interop.hf_bert`); the module layout follows our GPT (fused QKV, `blocks`, `lm_head`).
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
from lmforge.models.layers.masks import build_attention_mask


@dataclass
class BertConfig(FamilyConfig):
    """BERT encoder. Defaults are BERT's where they matter for numerics (LayerNorm eps 1e-12, dropout 0.1)."""

    kind: ClassVar[str] = "encoder"

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 128
    intermediate_size: int = 512  # MLP hidden width (BERT: 4 · n_embd)
    max_seq_len: int = 512  # position-embedding table size
    vocab_size: int | None = None  # filled from the tokenizer when None
    type_vocab_size: int = 2  # segment (token-type) embeddings; 2 = sentence A / B
    norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden and attention-probability dropout alike
    init_std: float = 0.02
    attn_backend: str = "sdpa"  # sdpa | eager
    tie_embeddings: bool = True  # MLM decoder weight = word embedding
    family: str = "bert"

    def __post_init__(self) -> None:
        require_positive_ints(
            self, "n_layer", "n_head", "n_embd", "intermediate_size", "max_seq_len", "type_vocab_size"
        )
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                "model.n_embd",
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                f"use a multiple of model.n_head (e.g. model.n_embd={self.n_head * max(1, self.head_dim)})",
            )
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(
                "model.vocab_size",
                f"must be positive, got {self.vocab_size}",
                "leave it null to take the tokenizer's size",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                "model.dropout", f"must be in [0, 1), got {self.dropout}", "set model.dropout=0.0 .. 0.9"
            )
        if not self.norm_eps > 0:
            raise ConfigError(
                "model.norm_eps",
                f"must be > 0, got {self.norm_eps}",
                "set model.norm_eps=1e-12 (BERT's value)",
            )
        require_choice("attn_backend", self.attn_backend, ATTN_BACKENDS)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with one fused QKV projection (q | k | v along the output dim)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, backend: str = "sdpa") -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.backend = backend
        self.dropout = dropout  # on the attention probabilities, as BERT's attention_probs_dropout_prob
        self.qkv = Linear(n_embd, 3 * n_embd)
        self.proj = Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); mask: optional bool (B or 1, 1, T, T), True = may attend; None = attend to all."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.backend == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = F.dropout(scores.softmax(dim=-1), p=p, training=p > 0) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class ErfGeluMLP(nn.Module):
    """Linear → GELU (exact erf form: BERT's `gelu`, not GPT-2's tanh approximation) → Linear."""

    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.fc = Linear(n_embd, hidden)
        self.proj = Linear(hidden, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Post-LN: x = ln_1(x + attn(x)), then x = ln_2(x + mlp(x)) (dropout on each branch before the add)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.attn_backend)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = ErfGeluMLP(cfg.n_embd, cfg.intermediate_size)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, mask)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class MLMTransform(nn.Module):
    """The MLM head's transform before the vocabulary projection: dense → GELU (erf) → LayerNorm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.n_embd, cfg.n_embd)
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class Bert(nn.Module):
    """Encoder + MLM head: `forward(input_ids, attention_mask, token_type_ids, position_ids) -> (B, T, V)`."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError(
                "model.vocab_size",
                "is null and no tokenizer filled it",
                "pass vocab_size to lmforge.models.build",
            )
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # word
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)  # position
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)  # token type (segment)
        self.ln_emb = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = MLMTransform(cfg)
        # named lm_head like GPT's so optimiser grouping (e.g. Muon's) treats it as the output layer
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init: N(0, init_std) matrices and tables, zero biases, unit LayerNorms (no depth scaling)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attention_mask: (B, T) padding (1 = real) or (B, 1, T, T) bool; outputs at pads are junk."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.wte(input_ids) + self.wtt(token_type_ids) + self.wpe(position_ids)
        x = self.drop(self.ln_emb(x))
        mask = build_attention_mask(attention_mask, T, input_ids.device, causal=False)
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.head(x))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; by default without position / token-type tables (the tied word table is the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() - self.wtt.weight.numel() if non_embedding else n
