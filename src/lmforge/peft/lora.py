"""LoRA (Hu et al., 2021) on our nn.Linear layers, through the `peft` library.

A targeted Linear W becomes W x + (alpha / r) · B A dropout(x), with A (r × in) kaiming-uniform and
B (out × r) zero, so training starts from the base model exactly.

`peft.inject_adapter_in_model` (not `get_peft_model`) replaces each targeted Linear in place by a `peft`
LoRA layer and changes nothing else: no PeftModel wrapper, so the forward signature, the attributes the
stages read (`config`, `make_cache`, `aux_loss`) and the key prefix stay ours. State-dict keys stay
readable: `blocks.0.attn.qkv.weight` becomes `blocks.0.attn.qkv.base_layer.weight` next to
`blocks.0.attn.qkv.lora_A.default.weight` / `lora_B...`. `unload_lora(merge=True)` folds B A into W with
peft's per-layer `merge` and puts the plain Linear back, so the merged model has the original keys.

Targets are picked by name (`resolve_targets`): each pattern of `target_modules` is an alias, a suffix of a
Linear's qualified name, or a regex matching the whole name; every pattern must match at least one Linear.
Aliases: `attention` (Linears under an `attn` / `cross_attn` module), `mlp` (under an `mlp` module, Mixtral's
router included), `all-linear` (every Linear but `lm_head`). `peft` is imported only here, only when LoRA is
asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lmforge.errors import ConfigError

ALIASES = ("attention", "mlp", "all-linear")
BIAS_MODES = ("none", "all", "lora_only")
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("attention",)
    bias: str = (
        "none"  # none | all (every bias trains) | lora_only (biases of the LoRA-wrapped Linears train)
    )
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> LoraSettings:
        r, alpha, dropout = cfg.get("r", 8), cfg.get("alpha", 16.0), cfg.get("dropout", 0.0)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError("peft.r", f"must be a positive integer, got {r!r}", "e.g. peft.r=8")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
            raise ConfigError(
                "peft.alpha", f"must be a positive number, got {alpha!r}", "e.g. peft.alpha=16 (2·r)"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ConfigError("peft.dropout", f"must be in [0, 1), got {dropout!r}", "e.g. peft.dropout=0.05")
        bias = cfg.get("bias", "none")
        if bias not in BIAS_MODES:
            raise ConfigError(
                "peft.bias", f"must be one of {list(BIAS_MODES)}, got {bias!r}", "set peft.bias=none"
            )
        targets = as_patterns(cfg.get("target_modules", ["attention"]), "peft.target_modules")
        return cls(r, float(alpha), float(dropout), targets, bias, bool(cfg.get("use_rslora", False)))


def as_patterns(value: Any, key: str) -> tuple[str, ...]:
    """A string or a list of strings -> a non-empty tuple of patterns."""
    patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else ()
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(
            key, f"must be a non-empty list of names / regexes, got {value!r}", f"e.g. {key}=[attention]"
        )
    return patterns


def name_matches(name: str, pattern: str) -> bool:
    """`pattern` is the name, a dotted suffix of it, or a regex matching all of it."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _alias_matches(name: str, alias: str) -> bool:
    parents = name.split(".")[:-1]
    if alias == "attention":
        return "attn" in parents or "cross_attn" in parents
    if alias == "mlp":
        return "mlp" in parents
    return name.split(".")[-1] != "lm_head"  # all-linear


def name_summary(names: Iterable[str]) -> str:
    """Qualified names with layer indices folded (`blocks.<i>.attn.qkv`): short even for 32-layer models."""
    folded = dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".<i>", n) for n in names)
    return ", ".join(folded)


def resolve_targets(model: nn.Module, patterns: Iterable[str], key: str = "peft.target_modules") -> list[str]:
    """Qualified names of the nn.Linear layers the patterns select, in model order; ConfigError for a pattern
    that selects nothing (naming the model's Linear layers, so the fix is one look away)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [
            n
            for n in linears
            if (_alias_matches(n, pattern) if pattern in ALIASES else name_matches(n, pattern))
        ]
        if not hits:
            raise ConfigError(
                key,
                f"pattern {pattern!r} matches no Linear layer of this model "
                f"(its Linear layers: {name_summary(linears)})",
                f"use the aliases {list(ALIASES)}, a name suffix such as 'q_proj', "
                "or a regex over the names above",
            )
        chosen.update(hits)
    return [n for n in linears if n in chosen]


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            "peft.method=lora needs the `peft` library, which is not installed. "
            "Fix: pip install peft (or pip install 'lmforge[peft]')"
        ) from e
    return peft


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject LoRA into the targeted Linears (in place); returns their names."""
    targets = resolve_targets(model, settings.target_modules)
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False) and any(t.split(".")[-1] == "lm_head" for t in targets):
        raise ConfigError(
            "peft.target_modules",
            "lm_head is tied to the token embedding: merging LoRA into it would change the embedding too",
            "leave lm_head out of peft.target_modules (all-linear does), "
            "or train with model.tie_embeddings=false",
        )
    peft = _peft()
    lora_config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        use_rslora=settings.use_rslora,
    )
    peft.inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER_NAME)
    return targets


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in the model."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_adapter_names(module: nn.Module) -> list[str]:
    """Adapter names of a peft LoRA layer (the keys of its `lora_A`), [] for any other module. By its structure, not
    its class: callers that only look (tensor parallelism's plans) need not import peft."""
    lora_a = getattr(module, "lora_A", None)
    return list(lora_a.keys()) if isinstance(lora_a, nn.ModuleDict) and hasattr(module, "base_layer") else []


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on or off (off: the layer is its base Linear). Callers restore requires_grad,
    which peft's toggle also sets."""
    for _, layer in lora_layers(model):
        layer.enable_adapters(enabled)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def unload_lora(model: nn.Module, merge: bool) -> None:
    """Put each LoRA layer's base Linear back, B A folded into it when `merge` (else the update is lost)."""
    for name, layer in lora_layers(model):
        if merge:
            layer.merge()
        _replace(model, name, layer.get_base_layer())
    if hasattr(model, "peft_config"):  # set by peft.inject_adapter_in_model
        del model.peft_config
