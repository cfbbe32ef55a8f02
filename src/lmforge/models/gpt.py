"""GPT (GPT-2 architecture) as a plain nn.Module, readable top to bottom.

Token + learned position embeddings → n_layer pre-LN blocks → final LayerNorm → LM head tied to the
token embedding. Weights follow GPT-2's init: N(0, 0.02), residual output projections scaled by
1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth.

With `position=alibi` there is no position table: attention scores get ALiBi's linear distance penalty
instead (`layers/alibi.py`), and sequences longer than max_seq_len are allowed (length extrapolation).

Incremental decoding: `forward(..., cache=model.make_cache(B, max_len))` stores every layer's keys/values
(`layers/kv_cache.py`); the next call feeds only the new tokens, whose positions continue from the cache
length unless `position_ids` says otherwise (left-padded batches pass them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels.dropout import Dropout
from lmforge.kernels.linear import Linear
from lmforge.models.config import GPTConfig
from lmforge.models.decoder_lm import DecoderLM
from lmforge.models.layers.alibi import alibi_attention_mask, alibi_slopes
from lmforge.models.layers.attention import CausalSelfAttention, causal_padding_mask
from lmforge.models.layers.kv_cache import KVCache
from lmforge.models.layers.mlp import GeluMLP


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias, cfg.attn_backend)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = GeluMLP(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, cfg.dropout, cfg.bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(DecoderLM):
    """Decoder-only transformer. `forward(input_ids, attention_mask=None, position_ids=None, cache=None)
    -> logits (B, T, vocab)`."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size", "is null and no tokenizer filled it", "pass vocab_size to lmforge.models.build")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init. Kept as a method so FSDP/meta-device builds can re-run it after materialising."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

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
        if self.wpe is not None and past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds model.max_seq_len={self.config.max_seq_len}")
        x = self.wte(input_ids)
        mask = causal_padding_mask(attention_mask, T, input_ids.device, past)
        if self.wpe is not None:
            # a slice of the table is the embedding of consecutive positions, without an index tensor
            x = x + (self.wpe.weight[past : past + T] if position_ids is None else self.wpe(position_ids))
        else:  # ALiBi: the positions enter as an additive bias on every layer's scores
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device)
            key_positions = None if cache is None else cache.store_positions(position_ids)
            attn = self.blocks[0].attn  # under tensor parallelism: this rank's heads' slopes
            slopes = alibi_slopes(self.config.n_head, x.device)[attn.head_offset : attn.head_offset + attn.n_head]
            mask = alibi_attention_mask(slopes, position_ids, mask, x.dtype, key_positions)
        if self.training:
            x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (prompt + generated)."""
        cfg = self.config
        heads = self.blocks[0].attn.n_head  # this rank's heads: n_head / tensor_parallel_size under TP
        return KVCache(cfg.n_layer, batch_size, heads, cfg.head_dim, max_len)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (the tied token embedding is the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n
