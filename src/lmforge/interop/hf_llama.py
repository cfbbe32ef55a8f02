"""Hugging Face Llama / Mistral <-> lmforge Llama: the config and weight maps (registered in `lmforge.interop.hf`).

Our module names follow HF's (q/k/v/o_proj, gate/up/down_proj), so weights are a key map with no
transposes. Configs: HF `max_position_embeddings` is our `max_seq_len`; `rope_parameters` becomes
`rope_theta` + `rope_scaling` (`original_max_position_embeddings` is spelled `original_max_seq_len`).
An lmforge Llama with `sliding_window` exports as MistralForCausalLM (HF Llama has no window), one
without as LlamaForCausalLM. The RoPE / shared-layer helpers here are reused by `hf_mixtral`.

One config subtlety: HF "dynamic" (NTK) RoPE scales beyond `max_position_embeddings`, which is therefore
its *original* length; we call that `rope_scaling.original_max_seq_len` and read `max_seq_len` (the
longest input we accept) as original · factor, the length the factor is meant for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.interop.converter import HFConverter, transformers_module
from lmforge.models.llama import LlamaConfig

StateDict = dict[str, torch.Tensor]

_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_YARN_OPTIONAL = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


# --- configs -------------------------------------------------------------------------------------------
def require_exportable(cfg: LlamaConfig, hf_name: str) -> None:
    """ConfigError for settings an HF Llama-family config cannot express."""
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size", "is null; an HF config needs a concrete vocabulary size", "set model.vocab_size")
    if cfg.position != "rope":
        raise ConfigError("model.position", f"is {cfg.position!r}; HF {hf_name} only has RoPE", "export a model trained with model.position=rope")


def rope_to_hf(cfg: LlamaConfig) -> tuple[dict[str, Any], int]:
    """(HF rope_parameters, HF max_position_embeddings) for our RoPE settings."""
    s = cfg.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}, cfg.max_seq_len
    params: dict[str, Any] = {"rope_type": s["type"], "rope_theta": cfg.rope_theta, "factor": s["factor"]}
    if s["type"] == "dynamic":
        return params, s.get("original_max_seq_len") or cfg.max_seq_len
    if s["type"] in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = s.get("original_max_seq_len") or cfg.max_seq_len
    for key in ("low_freq_factor", "high_freq_factor", *_YARN_OPTIONAL):
        if key in s:
            params[key] = s[key]
    return params, cfg.max_seq_len


def rope_from_hf(hf_cfg: Any) -> dict[str, Any]:
    """Our rope_theta / rope_scaling / max_seq_len from an HF config, refusing RoPE variants we don't compute."""
    params = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError("hf_config.rope_parameters.rope_type", f"{kind!r} is not implemented in lmforge", f"use one of {_ROPE_TYPES}")
    partial = params.get("partial_rotary_factor", getattr(hf_cfg, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ConfigError("hf_config.partial_rotary_factor", f"is {partial}; lmforge rotates the whole head", "use a checkpoint with full RoPE")
    theta = float(params.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)))
    mpe = hf_cfg.max_position_embeddings
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": None, "max_seq_len": mpe}
    if kind == "default":
        return out
    factor = params.get("factor")
    if kind == "yarn" and factor is None:
        factor = mpe / params["original_max_position_embeddings"]
    if factor is None:
        raise ConfigError("hf_config.rope_parameters.factor", f"is missing for rope_type={kind}", "set rope_parameters.factor")
    scaling: dict[str, Any] = {"type": kind, "factor": factor}
    if kind == "dynamic":
        scaling["original_max_seq_len"] = mpe
        out["max_seq_len"] = int(mpe * factor)
    if kind in ("yarn", "llama3"):
        scaling["original_max_seq_len"] = params["original_max_position_embeddings"]
    keys = ("low_freq_factor", "high_freq_factor") if kind == "llama3" else _YARN_OPTIONAL if kind == "yarn" else ()
    for key in keys:
        if params.get(key) is not None:
            scaling[key] = params[key]
    out["rope_scaling"] = scaling
    return out


def common_config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """HF config kwargs shared by Llama, Mistral and Mixtral."""
    rope_parameters, max_positions = rope_to_hf(cfg)
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        "rope_parameters": rope_parameters,
        # Llama's 1/2 defaults are meaningless for another vocabulary; special tokens live in the tokenizer.
        "bos_token_id": None,
        "eos_token_id": None,
    }


def common_config_from_hf(hf_cfg: Any) -> dict[str, Any]:
    """Our LlamaConfig kwargs from any HF Llama-family config (ConfigError naming the key we can't compute)."""
    if hf_cfg.hidden_act != "silu":
        raise ConfigError("hf_config.hidden_act", f"is {hf_cfg.hidden_act!r}; lmforge's SwiGLU uses silu", "use a checkpoint with hidden_act='silu'")
    head_dim = getattr(hf_cfg, "head_dim", None)
    if head_dim not in (None, hf_cfg.hidden_size // hf_cfg.num_attention_heads):
        raise ConfigError(
            "hf_config.head_dim",
            f"is {head_dim}, not hidden_size / num_attention_heads = {hf_cfg.hidden_size // hf_cfg.num_attention_heads}",
            "use a checkpoint whose head_dim is hidden_size / num_attention_heads",
        )
    attention_bias, mlp_bias = bool(getattr(hf_cfg, "attention_bias", False)), bool(getattr(hf_cfg, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ConfigError(
            "hf_config.mlp_bias",
            f"attention_bias={attention_bias} but mlp_bias={mlp_bias}; lmforge has one model.bias for both",
            "use a checkpoint with attention_bias == mlp_bias",
        )
    return {
        "n_layer": hf_cfg.num_hidden_layers,
        "n_head": hf_cfg.num_attention_heads,
        "n_kv_head": hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
        "n_embd": hf_cfg.hidden_size,
        "intermediate_size": hf_cfg.intermediate_size,
        "vocab_size": hf_cfg.vocab_size,
        "norm_eps": hf_cfg.rms_norm_eps,
        "tie_embeddings": bool(hf_cfg.tie_word_embeddings),
        "sliding_window": getattr(hf_cfg, "sliding_window", None),
        "init_std": hf_cfg.initializer_range,
        "dropout": float(hf_cfg.attention_dropout or 0.0),
        "bias": attention_bias,
        **rope_from_hf(hf_cfg),
    }


def config_to_hf(cfg: LlamaConfig) -> Any:
    """LlamaConfig -> HF LlamaConfig, or MistralConfig when a sliding window is set."""
    require_exportable(cfg, "Llama/Mistral")
    transformers = transformers_module()
    kwargs = common_config_to_hf(cfg)
    if cfg.sliding_window is None:
        return transformers.LlamaConfig(**kwargs, attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if cfg.bias:
        raise ConfigError("model.bias", "HF Mistral (needed for sliding_window) has no biases", "use model.bias=false")
    return transformers.MistralConfig(**kwargs, sliding_window=cfg.sliding_window)


def config_from_hf(hf_cfg: Any) -> LlamaConfig:
    """HF LlamaConfig / MistralConfig -> our LlamaConfig."""
    return LlamaConfig(**common_config_from_hf(hf_cfg))


# --- weights -------------------------------------------------------------------------------------------
def shared_key_map(cfg: LlamaConfig) -> Iterator[tuple[str, str]]:
    """(our key, HF *ForCausalLM key) for everything but the feed-forward and the LM head."""
    yield "wte.weight", "model.embed_tokens.weight"
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{ours}attn.{proj}.weight", f"{theirs}self_attn.{proj}.weight"
            if cfg.bias:
                yield f"{ours}attn.{proj}.bias", f"{theirs}self_attn.{proj}.bias"
        yield f"{ours}attn_norm.weight", f"{theirs}input_layernorm.weight"
        yield f"{ours}mlp_norm.weight", f"{theirs}post_attention_layernorm.weight"
    yield "norm.weight", "model.norm.weight"


def _mlp_key_map(cfg: LlamaConfig) -> Iterator[tuple[str, str]]:
    for i in range(cfg.n_layer):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"blocks.{i}.mlp.{proj}.weight", f"model.layers.{i}.mlp.{proj}.weight"
            if cfg.bias:
                yield f"blocks.{i}.mlp.{proj}.bias", f"model.layers.{i}.mlp.{proj}.bias"


def with_causal_lm_prefix(sd: StateDict) -> StateDict:
    """Accept a bare *Model state dict (keys without `model.`) as well as a *ForCausalLM one."""
    return {f"model.{k}": v for k, v in sd.items()} if "embed_tokens.weight" in sd else sd


def head_from_hf(sd: StateDict, cfg: LlamaConfig) -> torch.Tensor:
    """Our lm_head: HF's, or the embedding when tied (or when a bare model has no head)."""
    return sd["model.embed_tokens.weight"] if cfg.tie_embeddings or "lm_head.weight" not in sd else sd["lm_head.weight"]


def weights_from_hf(sd: StateDict, cfg: LlamaConfig) -> StateDict:
    """HF LlamaForCausalLM / MistralForCausalLM (or bare *Model) state dict -> ours."""
    sd = with_causal_lm_prefix(sd)
    ours = {k: sd[theirs] for k, theirs in (*shared_key_map(cfg), *_mlp_key_map(cfg))}
    ours["lm_head.weight"] = head_from_hf(sd, cfg)
    return ours


def weights_to_hf(sd: StateDict, cfg: LlamaConfig) -> StateDict:
    """Our state dict -> LlamaForCausalLM's / MistralForCausalLM's (a tied head is left out: HF ties it)."""
    theirs = {t: sd[k] for k, t in (*shared_key_map(cfg), *_mlp_key_map(cfg))}
    if not cfg.tie_embeddings:
        theirs["lm_head.weight"] = sd["lm_head.weight"]
    return theirs


CONVERTER = HFConverter(
    family="llama",
    model_types=("llama", "mistral"),
    hf_class="LlamaForCausalLM",
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    weights_to_hf=weights_to_hf,
    weights_from_hf=weights_from_hf,
    hf_class_for=lambda hf_cfg: "MistralForCausalLM" if hf_cfg.model_type == "mistral" else "LlamaForCausalLM",
)
