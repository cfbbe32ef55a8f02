"""Hugging Face BertForMaskedLM <-> lmforge Bert: config and weight maps (registered in `lmforge.interop.hf`).

Same function, different layout: HF keeps query / key / value as three Linears, we fuse them into one
`qkv` (concatenated along the output dim, q | k | v), so they are concatenated on import and split on
export - both exact copies, so a round trip is bit-identical.

The MLM bias: HF's BertLMPredictionHead has `cls.predictions.bias` and `cls.predictions.decoder.bias`.
They are one tensor when the embeddings are tied; when untied, only `decoder.bias` is used by the forward
pass and `cls.predictions.bias` is dead. We read the live one and write ours into both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.interop.converter import HFConverter, StateDict, transformers_module
from lmforge.models.bert import BertConfig

_GELU_ERF = ("gelu", "gelu_python")  # exact erf GELU, as our ErfGeluMLP / MLMTransform
_HEAD = "cls.predictions."


def config_to_hf(cfg: BertConfig) -> Any:
    """BertConfig (ours) -> transformers.BertConfig."""
    if cfg.vocab_size is None:
        raise ConfigError(
            "model.vocab_size",
            "is null; an HF config needs a concrete vocabulary size",
            "set model.vocab_size",
        )
    return transformers_module().BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        # BERT's pad id 0 is its WordPiece [PAD]; ours lives in the tokenizer, and padding_idx only affects
        # the gradient of that embedding row, which we do not freeze.
        pad_token_id=None,
    )


def config_from_hf(hf_cfg: Any) -> BertConfig:
    """transformers.BertConfig -> ours, refusing (naming the key) anything we would compute differently."""
    act = hf_cfg.hidden_act
    if act not in _GELU_ERF:
        raise ConfigError(
            "hf_config.hidden_act",
            f"is {act!r}; lmforge's BERT uses exact (erf) GELU",
            f"use one of {_GELU_ERF}",
        )
    position = getattr(hf_cfg, "position_embedding_type", "absolute")
    if position != "absolute":
        raise ConfigError(
            "hf_config.position_embedding_type",
            f"is {position!r}; lmforge's BERT has learned absolute positions only",
            "use a checkpoint with position_embedding_type='absolute'",
        )
    for key in ("is_decoder", "add_cross_attention"):
        if getattr(hf_cfg, key, False):
            raise ConfigError(
                f"hf_config.{key}",
                "is true; lmforge's BERT is a bidirectional encoder",
                f"use a checkpoint with {key}=False",
            )
    hidden, attn = float(hf_cfg.hidden_dropout_prob), float(hf_cfg.attention_probs_dropout_prob)
    if hidden != attn:
        raise ConfigError(
            "hf_config.hidden_dropout_prob",
            f"{hidden} differs from attention_probs_dropout_prob={attn}; lmforge has one model.dropout",
            "set both to the same value",
        )
    return BertConfig(
        n_layer=hf_cfg.num_hidden_layers,
        n_head=hf_cfg.num_attention_heads,
        n_embd=hf_cfg.hidden_size,
        intermediate_size=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        vocab_size=hf_cfg.vocab_size,
        type_vocab_size=hf_cfg.type_vocab_size,
        norm_eps=hf_cfg.layer_norm_eps,
        dropout=hidden,
        init_std=hf_cfg.initializer_range,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
    )


def _key_map(n_layer: int) -> Iterator[tuple[str, str]]:
    """(our key, HF BertForMaskedLM key) for every parameter except the fused QKV and the MLM decoder."""
    emb = "bert.embeddings."
    yield "wte.weight", f"{emb}word_embeddings.weight"
    yield "wpe.weight", f"{emb}position_embeddings.weight"
    yield "wtt.weight", f"{emb}token_type_embeddings.weight"
    for p in ("weight", "bias"):
        yield f"ln_emb.{p}", f"{emb}LayerNorm.{p}"
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for a, b in (
            ("attn.proj", "attention.output.dense"),
            ("ln_1", "attention.output.LayerNorm"),
            ("mlp.fc", "intermediate.dense"),
            ("mlp.proj", "output.dense"),
            ("ln_2", "output.LayerNorm"),
        ):
            for p in ("weight", "bias"):
                yield f"{ours}{a}.{p}", f"{theirs}{b}.{p}"
    for a, b in (("head.dense", "transform.dense"), ("head.norm", "transform.LayerNorm")):
        for p in ("weight", "bias"):
            yield f"{a}.{p}", f"{_HEAD}{b}.{p}"


def _qkv_keys(i: int, p: str) -> list[str]:
    return [f"bert.encoder.layer.{i}.attention.self.{name}.{p}" for name in ("query", "key", "value")]


def weights_from_hf(sd: StateDict, cfg: BertConfig) -> StateDict:
    """HF BertForMaskedLM (or BertForPreTraining: its pooler and NSP head are dropped) state dict -> ours."""
    if f"{_HEAD}transform.dense.weight" not in sd:
        raise LmforgeError(
            "this BERT checkpoint has no MLM head (cls.predictions.*). Fix: load it as BertForMaskedLM"
        )
    ours = {k: sd[theirs] for k, theirs in _key_map(cfg.n_layer)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[k] for k in _qkv_keys(i, p)], dim=0)
    untied = not cfg.tie_embeddings and f"{_HEAD}decoder.weight" in sd
    ours["lm_head.weight"] = sd[f"{_HEAD}decoder.weight"] if untied else ours["wte.weight"]
    ours["lm_head.bias"] = sd.get(f"{_HEAD}decoder.bias", sd.get(f"{_HEAD}bias"))  # the bias forward uses
    return ours


def weights_to_hf(sd: StateDict, cfg: BertConfig) -> StateDict:
    """Our state dict -> BertForMaskedLM's (a tied decoder is left out: HF ties it itself)."""
    theirs = {t: sd[k].contiguous() for k, t in _key_map(cfg.n_layer)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias"):
            for key, part in zip(_qkv_keys(i, p), sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)):
                theirs[key] = part.contiguous()
    theirs[f"{_HEAD}bias"] = sd["lm_head.bias"].contiguous()
    if not cfg.tie_embeddings:
        theirs[f"{_HEAD}decoder.weight"] = sd["lm_head.weight"].contiguous()
        theirs[f"{_HEAD}decoder.bias"] = sd["lm_head.bias"].contiguous()
    return theirs


CONVERTER = HFConverter(
    family="bert",
    model_types=("bert",),
    hf_class="BertForMaskedLM",
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    weights_to_hf=weights_to_hf,
    weights_from_hf=weights_from_hf,
)
