"""Hugging Face Mixtral <-> lmforge Mixtral: the config and weight maps (registered in `lmforge.interop.hf`).

Attention, norms and embeddings map exactly as for Llama (`hf_llama`). The experts differ in layout:
HF stores each layer's experts as two stacked tensors, `experts.gate_up_proj` (E, 2·I, H) = gate rows then
up rows, and `experts.down_proj` (E, H, I); ours are E separate SwiGLU modules. Conversion stacks /
splits them, which copies values exactly. The router is `mlp.gate` in HF, `mlp.router` here.
HF has no router z-loss: `router_z_loss_coef` does not survive an export (it is a training setting only).
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.interop.converter import HFConverter, transformers_module
from lmforge.interop.hf_llama import (
    StateDict,
    common_config_from_hf,
    common_config_to_hf,
    head_from_hf,
    require_exportable,
    shared_key_map,
    with_causal_lm_prefix,
)
from lmforge.models.mixtral import MixtralConfig


def config_to_hf(cfg: MixtralConfig) -> Any:
    """MixtralConfig -> HF MixtralConfig."""
    require_exportable(cfg, "Mixtral")
    if cfg.bias:
        raise ConfigError("model.bias", "HF Mixtral has no biases", "use model.bias=false")
    kwargs = common_config_to_hf(cfg)
    return transformers_module().MixtralConfig(
        **kwargs,
        sliding_window=cfg.sliding_window,
        num_local_experts=cfg.n_expert,
        num_experts_per_tok=cfg.n_expert_per_token,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        router_jitter_noise=0.0,
    )


def config_from_hf(hf_cfg: Any) -> MixtralConfig:
    """HF MixtralConfig -> ours. Router jitter (multiplicative noise on the router input) is not implemented."""
    if getattr(hf_cfg, "router_jitter_noise", 0.0):
        raise ConfigError(
            "hf_config.router_jitter_noise",
            f"is {hf_cfg.router_jitter_noise}; lmforge's router has no input jitter",
            "set router_jitter_noise=0.0",
        )
    return MixtralConfig(
        **common_config_from_hf(hf_cfg),
        n_expert=hf_cfg.num_local_experts,
        n_expert_per_token=hf_cfg.num_experts_per_tok,
        router_aux_loss_coef=float(hf_cfg.router_aux_loss_coef),
        router_z_loss_coef=0.0,
    )


def weights_from_hf(sd: StateDict, cfg: MixtralConfig) -> StateDict:
    """HF MixtralForCausalLM (or bare MixtralModel) state dict -> ours: the in-memory layout (experts fused) or the
    one of its safetensors files (`block_sparse_moe.experts.<e>.w1/w2/w3`, what `read_hf_weights` reads)."""
    sd = with_causal_lm_prefix(sd)
    ours = {k: sd[theirs] for k, theirs in shared_key_map(cfg)}
    for i in range(cfg.n_layer):
        hf, mine = f"model.layers.{i}.mlp.", f"blocks.{i}.mlp."
        disk = f"model.layers.{i}.block_sparse_moe."
        if f"{disk}gate.weight" in sd:  # the files' per-expert layout (w1 gate, w3 up, w2 down), which HF fuses on load
            ours[f"{mine}router.weight"] = sd[f"{disk}gate.weight"]
            for e in range(cfg.n_expert):
                for name, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                    ours[f"{mine}experts.{e}.{name}.weight"] = sd[f"{disk}experts.{e}.{theirs}.weight"]
            continue
        ours[f"{mine}router.weight"] = sd[f"{hf}gate.weight"]
        gate_up, down = sd[f"{hf}experts.gate_up_proj"], sd[f"{hf}experts.down_proj"]
        for e in range(cfg.n_expert):
            gate, up = gate_up[e].chunk(2, dim=0)
            ours[f"{mine}experts.{e}.gate_proj.weight"] = gate
            ours[f"{mine}experts.{e}.up_proj.weight"] = up
            ours[f"{mine}experts.{e}.down_proj.weight"] = down[e]
    ours["lm_head.weight"] = head_from_hf(sd, cfg)
    return ours


def weights_to_hf(sd: StateDict, cfg: MixtralConfig) -> StateDict:
    """Our state dict -> MixtralForCausalLM's (a tied head is left out: HF ties it)."""
    theirs = {t: sd[k] for k, t in shared_key_map(cfg)}
    for i in range(cfg.n_layer):
        hf, mine = f"model.layers.{i}.mlp.", f"blocks.{i}.mlp."
        theirs[f"{hf}gate.weight"] = sd[f"{mine}router.weight"]
        experts = range(cfg.n_expert)
        theirs[f"{hf}experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{mine}experts.{e}.gate_proj.weight"], sd[f"{mine}experts.{e}.up_proj.weight"]]) for e in experts]
        )
        theirs[f"{hf}experts.down_proj"] = torch.stack([sd[f"{mine}experts.{e}.down_proj.weight"] for e in experts])
    if not cfg.tie_embeddings:
        theirs["lm_head.weight"] = sd["lm_head.weight"]
    return theirs


CONVERTER = HFConverter(
    family="mixtral",
    model_types=("mixtral",),
    hf_class="MixtralForCausalLM",
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    weights_to_hf=weights_to_hf,
    weights_from_hf=weights_from_hf,
)
