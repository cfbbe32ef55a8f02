"""Hugging Face T5 (T5ForConditionalGeneration) <-> lmforge T5: the config and weight maps.

The architectures are the same, so weights convert by a key map; two HF details need care:
  * HF keeps each stack's relative position table in block 0's self-attention (we keep it on the stack), and
    gives the encoder and decoder their own copy of the shared embedding (tied, so we read `shared`).
  * transformers v5 always ties `lm_head` to `shared` when it builds a T5 and encodes "untied" (v1.1) only as
    `scale_decoder_outputs=False`; checkpoints whose two tensors differ are untied while loading. `to_hf` of
    an untied model therefore unties the freshly built HF model (`untie_head`) before loading weights, and
    writes `tie_word_embeddings=false` to config.json, as Google's v1.1 checkpoints have it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.interop.converter import HFConverter, transformers_module
from lmforge.models.t5 import T5Config

_FEED_FORWARD = {"relu": "relu", "gated-gelu": "gated-gelu"}  # HF feed_forward_proj -> ours (the same names)


def _scaled_head(hf_cfg: Any) -> bool:
    """Whether HF scales the decoder output by d_model**-0.5: our tie_embeddings (v4 configs lack the key)."""
    scale = getattr(hf_cfg, "scale_decoder_outputs", None)
    return bool(hf_cfg.tie_word_embeddings if scale is None else scale)


def config_to_hf(cfg: T5Config) -> Any:
    """T5Config -> transformers T5Config. Special ids other than pad / decoder start live in the tokenizer."""
    if cfg.vocab_size is None:
        raise ConfigError(
            "model.vocab_size",
            "is null; an HF config needs a concrete vocabulary size",
            "set model.vocab_size",
        )
    hf_cfg = transformers_module().T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.n_embd,
        d_kv=cfg.head_dim,
        d_ff=cfg.intermediate_size,
        num_layers=cfg.n_layer,
        num_decoder_layers=cfg.decoder_depth,
        num_heads=cfg.n_head,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_factor=cfg.initializer_factor,
        feed_forward_proj=cfg.feed_forward,
        tie_word_embeddings=cfg.tie_embeddings,  # v5 turns False into scale_decoder_outputs=False
        pad_token_id=cfg.pad_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id
        if cfg.decoder_start_token_id is not None
        else cfg.pad_token_id,
        eos_token_id=None,  # T5's 1 is meaningless for another vocabulary
    )
    return hf_cfg


def config_from_hf(hf_cfg: Any) -> T5Config:
    """transformers T5Config -> ours, refusing (naming the HF key) what our T5 would compute differently."""
    ff = hf_cfg.feed_forward_proj
    if ff not in _FEED_FORWARD:
        raise ConfigError(
            "hf_config.feed_forward_proj",
            f"is {ff!r}; lmforge's T5 implements {sorted(_FEED_FORWARD)}",
            "use a T5 / T5 v1.1 checkpoint",
        )
    if getattr(hf_cfg, "is_decoder", False):
        raise ConfigError(
            "hf_config.is_decoder",
            "is true (a decoder-only T5 stack)",
            "use an encoder-decoder T5 checkpoint",
        )
    start = getattr(hf_cfg, "decoder_start_token_id", None)
    pad = hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else 0
    return T5Config(
        n_layer=hf_cfg.num_layers,
        n_decoder_layer=hf_cfg.num_decoder_layers,
        n_head=hf_cfg.num_heads,
        n_embd=hf_cfg.d_model,
        head_dim=hf_cfg.d_kv,
        intermediate_size=hf_cfg.d_ff,
        vocab_size=hf_cfg.vocab_size,
        relative_attention_num_buckets=hf_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=hf_cfg.relative_attention_max_distance,
        feed_forward=_FEED_FORWARD[ff],
        norm_eps=hf_cfg.layer_norm_epsilon,
        dropout=float(hf_cfg.dropout_rate),
        initializer_factor=hf_cfg.initializer_factor,
        tie_embeddings=_scaled_head(hf_cfg),
        pad_token_id=pad,
        decoder_start_token_id=None if start is None or start == pad else start,
    )


def _key_map(cfg: T5Config) -> Iterator[tuple[str, str]]:
    """(our key, HF T5ForConditionalGeneration key) for every parameter except `lm_head`."""
    yield "shared.weight", "shared.weight"
    for stack, n_layer in (("encoder", cfg.n_layer), ("decoder", cfg.decoder_depth)):
        decoder = stack == "decoder"
        attn = f"{stack}.block.0.layer.0.SelfAttention"
        yield (
            f"{stack}.position_bias.relative_attention_bias.weight",
            f"{attn}.relative_attention_bias.weight",
        )
        for i in range(n_layer):
            ours, theirs = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            ff = "2" if decoder else "1"  # the decoder's FF sub-layer comes after cross-attention
            pairs = [("ln_1", "0.layer_norm"), ("ln_2", f"{ff}.layer_norm")]
            pairs += [(f"attn.{p}", f"0.SelfAttention.{p}") for p in "qkvo"]
            if decoder:
                pairs += [("ln_cross", "1.layer_norm")] + [
                    (f"cross_attn.{p}", f"1.EncDecAttention.{p}") for p in "qkvo"
                ]
            wis = ("wi_0", "wi_1") if cfg.feed_forward == "gated-gelu" else ("wi",)
            pairs += [(f"mlp.{w}", f"{ff}.DenseReluDense.{w}") for w in (*wis, "wo")]
            for a, b in pairs:
                yield f"{ours}{a}.weight", f"{theirs}{b}.weight"
        yield f"{stack}.ln_f.weight", f"{stack}.final_layer_norm.weight"


def weights_from_hf(sd: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """HF T5ForConditionalGeneration state dict -> ours (complete: a tied head is `shared` again)."""
    ours = {k: sd[theirs] for k, theirs in _key_map(cfg)}
    head = sd.get("lm_head.weight", sd["shared.weight"])
    if cfg.tie_embeddings and not torch.equal(head, sd["shared.weight"]):
        raise ConfigError(
            "hf_config.tie_word_embeddings",
            "the decoder output is scaled as for a tied head, but lm_head differs from the shared embedding",
            "lmforge scales exactly when tied: use a checkpoint whose head is tied, "
            "or an untied one with tie_word_embeddings=false",
        )
    ours["lm_head.weight"] = sd["shared.weight"] if cfg.tie_embeddings else head
    return ours


def weights_to_hf(sd: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """Our state dict -> HF's. The stacks' embed_tokens (and a tied head) are left to HF's tying."""
    theirs = {t: sd[k].contiguous() for k, t in _key_map(cfg)}
    if not cfg.tie_embeddings:
        theirs["lm_head.weight"] = sd["lm_head.weight"].contiguous()
    return theirs


def untie_head(hf_model: Any, cfg: T5Config) -> None:
    """Give a freshly built HF T5 its own lm_head when ours is untied (transformers v5 ties it regardless)."""
    if cfg.tie_embeddings or hf_model.lm_head.weight is not hf_model.shared.weight:
        return
    hf_model.lm_head.weight = nn.Parameter(hf_model.shared.weight.detach().clone())
    tied = getattr(hf_model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)  # or save_pretrained would drop the head as a duplicate
    hf_model.config.tie_word_embeddings = (
        False  # config.json as in Google's v1.1 checkpoints (read by v4 too)
    )


CONVERTER = HFConverter(
    family="t5",
    model_types=("t5",),
    hf_class="T5ForConditionalGeneration",
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    weights_to_hf=weights_to_hf,
    weights_from_hf=weights_from_hf,
    prepare_hf=untie_head,
)
