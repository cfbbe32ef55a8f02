"""Hugging Face GPT-2 <-> lmforge GPT: the config and weight maps (registered in `lmforge.interop.hf`).

Our GPT is GPT-2's architecture with different module names, so conversion is a key map. The one catch:
HF GPT-2 uses `Conv1D`, whose weight is stored (in, out) - the transpose of `nn.Linear`'s (out, in).
The fused `qkv` / `c_attn` share the q|k|v order, so they copy as-is (after the transpose).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.interop.converter import HFConverter, transformers_module
from lmforge.models.config import GPTConfig

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh-approximated GELU as our GeluMLP
_UNSUPPORTED = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention")


def config_to_hf(cfg: GPTConfig) -> Any:
    """GPTConfig -> GPT2Config. HF GPT-2 always has biases, so `bias=False` has no HF equivalent."""
    if not cfg.bias:
        raise ConfigError(
            "model.bias",
            "HF GPT-2 always has biases; a bias-free model cannot be exported",
            "train with model.bias=true",
        )
    if cfg.position != "learned":
        raise ConfigError("model.position", f"is {cfg.position!r}; HF GPT-2 has learned positions only", "export a model.position=learned GPT")
    if cfg.vocab_size is None:
        raise ConfigError(
            "model.vocab_size",
            "is null; an HF config needs a concrete vocabulary size",
            "set model.vocab_size",
        )
    return transformers_module().GPT2Config(
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        n_positions=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        n_inner=None if cfg.mlp_ratio == 4 else cfg.mlp_ratio * cfg.n_embd,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        # GPT-2's 50256 defaults are meaningless for another vocabulary; special tokens live in the tokenizer.
        bos_token_id=None,
        eos_token_id=None,
    )


def config_from_hf(hf_cfg: Any) -> GPTConfig:
    """GPT2Config -> GPTConfig, refusing (with the offending key) anything our GPT would compute differently."""
    for key in _UNSUPPORTED:
        if getattr(hf_cfg, key, False):
            raise ConfigError(
                f"hf_config.{key}",
                "is true, which lmforge's GPT does not implement",
                f"use a checkpoint with {key}=False",
            )
    if not getattr(hf_cfg, "scale_attn_weights", True):
        raise ConfigError(
            "hf_config.scale_attn_weights",
            "is false; lmforge always scales by 1/sqrt(head_dim)",
            "use a checkpoint with scale_attn_weights=True",
        )
    act = hf_cfg.activation_function
    if act not in _GELU_TANH:
        raise ConfigError(
            "hf_config.activation_function",
            f"is {act!r}; lmforge's GPT uses tanh-GELU",
            f"use one of {_GELU_TANH}",
        )
    dropouts = {k: float(getattr(hf_cfg, k)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(dropouts.values())) != 1:
        raise ConfigError(
            "hf_config.resid_pdrop",
            f"dropouts differ {dropouts}; lmforge has one model.dropout",
            "set all three to the same value",
        )
    n_inner = hf_cfg.n_inner
    if n_inner is None:
        mlp_ratio = 4
    elif n_inner % hf_cfg.n_embd == 0:
        mlp_ratio = n_inner // hf_cfg.n_embd
    else:
        raise ConfigError(
            "hf_config.n_inner",
            f"{n_inner} is not a multiple of n_embd={hf_cfg.n_embd}",
            "lmforge needs n_inner = k * n_embd",
        )
    return GPTConfig(
        n_layer=hf_cfg.n_layer,
        n_head=hf_cfg.n_head,
        n_embd=hf_cfg.n_embd,
        max_seq_len=hf_cfg.n_positions,
        vocab_size=hf_cfg.vocab_size,
        mlp_ratio=mlp_ratio,
        dropout=dropouts["resid_pdrop"],
        bias=True,
        norm_eps=hf_cfg.layer_norm_epsilon,
        init_std=hf_cfg.initializer_range,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )


def _key_map(n_layer: int, tied: bool) -> Iterator[tuple[str, str, bool]]:
    """(our key, HF GPT2LMHeadModel key, transpose?) for every parameter. A tied head reads the embedding."""
    yield "wte.weight", "transformer.wte.weight", False
    yield "wpe.weight", "transformer.wpe.weight", False
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b, conv in (
            ("ln_1", "ln_1", False),
            ("attn.qkv", "attn.c_attn", True),
            ("attn.proj", "attn.c_proj", True),
            ("ln_2", "ln_2", False),
            ("mlp.fc", "mlp.c_fc", True),
            ("mlp.proj", "mlp.c_proj", True),
        ):
            yield f"{ours}{a}.weight", f"{theirs}{b}.weight", conv
            yield f"{ours}{a}.bias", f"{theirs}{b}.bias", False
    yield "ln_f.weight", "transformer.ln_f.weight", False
    yield "ln_f.bias", "transformer.ln_f.bias", False
    yield "lm_head.weight", "transformer.wte.weight" if tied else "lm_head.weight", False



def weights_from_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel (or bare GPT2Model, keys without `transformer.`) state dict -> ours."""
    if "wte.weight" in sd:  # a bare GPT2Model: its head is the tied embedding
        sd = {f"transformer.{k}": v for k, v in sd.items()}
    tied = cfg.tie_embeddings or "lm_head.weight" not in sd
    return {k: sd[theirs].t() if conv else sd[theirs] for k, theirs, conv in _key_map(cfg.n_layer, tied)}


def weights_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> GPT2LMHeadModel's (a tied head is left out: HF ties it itself)."""
    theirs = {t: (sd[k].t() if conv else sd[k]).contiguous() for k, t, conv in _key_map(cfg.n_layer, False)}
    if cfg.tie_embeddings:
        del theirs["lm_head.weight"]
    return theirs


CONVERTER = HFConverter(
    family="gpt",
    model_types=("gpt2",),
    hf_class="GPT2LMHeadModel",
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    weights_to_hf=weights_to_hf,
    weights_from_hf=weights_from_hf,
)
