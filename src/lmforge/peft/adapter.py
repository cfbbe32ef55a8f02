"""Bottleneck adapters (Houlsby et al., 2019): y + up(act(down(y))) after a block's attention and/or MLP.

Each targeted sublayer (e.g. `blocks.3.mlp`) gets a child `adapter` (down: d -> bottleneck, up: bottleneck
-> d) and a forward hook adding the adapter's output to the sublayer's, before the block's residual add as in
the paper. `up` starts at zero, so a fresh adapter is the identity and training starts from the base model.

A hook rather than a wrapper module: the sublayer keeps its type and attributes (Mixtral's stage reads
`block.mlp.router_logits`, GPT's init reads `block.attn.proj`), and the base keys of the state dict are
unchanged (`blocks.3.mlp.fc.weight`); the adapter adds `blocks.3.mlp.adapter.{down,up}.{weight,bias}`.
The hook is a module-level function that reads the adapter from the module it is called on, so a deep copy
of the model (a frozen reference) hooks its own copy of the adapter. Adapters cannot be merged into the
base weights (the activation sits between down and up); `remove_adapters` takes them out again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.peft.lora import as_patterns, name_matches, name_summary

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
ALIASES = {"attention": ("attn", "cross_attn"), "mlp": ("mlp",)}
HOOK_ATTR = "_peft_adapter_hook"


@dataclass(frozen=True)
class AdapterSettings:
    bottleneck: int = 16
    targets: tuple[str, ...] = ("mlp", "attention")
    activation: str = "gelu"

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> AdapterSettings:
        size = cfg.get("bottleneck", 16)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(
                "peft.bottleneck", f"must be a positive integer, got {size!r}", "e.g. peft.bottleneck=16"
            )
        activation = cfg.get("activation", "gelu")
        if activation not in ACTIVATIONS:
            raise ConfigError(
                "peft.activation",
                f"must be one of {list(ACTIVATIONS)}, got {activation!r}",
                "set peft.activation=gelu",
            )
        return cls(size, as_patterns(cfg.get("targets", ["mlp", "attention"]), "peft.targets"), activation)


class BottleneckAdapter(nn.Module):
    """down (d -> b) -> activation -> up (b -> d), `up` zero-initialised. `enabled=False` makes it a no-op."""

    def __init__(self, dim: int, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(y)))


def _adapter_hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    adapter = module.adapter
    return output + adapter(output) if adapter.enabled else output


def resolve_sublayers(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of the modules to adapt: aliases `attention` / `mlp` (modules named attn, cross_attn / mlp), or
    name suffixes / regexes; ConfigError for a pattern that selects nothing."""
    names = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in ALIASES:
            hits = [n for n in names if n.split(".")[-1] in ALIASES[pattern]]
        else:
            hits = [n for n in names if name_matches(n, pattern)]
        if not hits:
            sublayers = [n for n in names if n.split(".")[-1] in ("attn", "cross_attn", "mlp")]
            raise ConfigError(
                "peft.targets",
                f"pattern {pattern!r} matches no module of this model "
                f"(its sublayers: {name_summary(sublayers)})",
                f"use the aliases {list(ALIASES)} or a name suffix / regex over the module names",
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _output_dim(model: nn.Module, module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(model.config.n_embd)  # a block's sublayers map back to the residual width


def apply_adapters(model: nn.Module, settings: AdapterSettings) -> list[str]:
    """Add an adapter after each targeted sublayer (in place); returns the sublayers' names."""
    targets = resolve_sublayers(model, settings.targets)
    for name in targets:
        module = model.get_submodule(name)
        if hasattr(module, "adapter"):
            raise ValueError(
                f"{name} already has an `adapter` attribute: cannot add a bottleneck adapter to it"
            )
        ref = next(module.parameters(), None)
        adapter = BottleneckAdapter(_output_dim(model, module), settings.bottleneck, settings.activation)
        if ref is not None:
            adapter.to(device=ref.device, dtype=ref.dtype)
        module.adapter = adapter
        setattr(module, HOOK_ATTR, module.register_forward_hook(_adapter_hook))
    return targets


def adapter_modules(model: nn.Module) -> list[BottleneckAdapter]:
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for adapter in adapter_modules(model):
        adapter.enabled = enabled


def remove_adapters(model: nn.Module) -> None:
    """Take every adapter and its hook out: the model is the base again (same keys, same outputs)."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "adapter", None), BottleneckAdapter):
            getattr(module, HOOK_ATTR).remove()
            delattr(module, HOOK_ATTR)
            del module.adapter
