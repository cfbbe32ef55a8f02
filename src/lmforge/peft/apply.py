"""One entry point for parameter-efficient fine-tuning: `apply_peft(model, cfg)` and what follows from it.

`apply_peft` freezes every base parameter, adds the method's parameters (LoRA, bottleneck adapters or a
prefix; lora.py, adapter.py, prefix.py) and records on the model which parameters are the PEFT ones, so that
the optimizer (only `requires_grad` parameters), the adapter checkpoint (`trainable_state_dict`,
`save_adapter`) and DPO's frozen reference (`adapters_disabled`) agree on them.

`modules_to_save` (any method): modules trained in full next to the adapter, e.g. a reward model's fresh
scalar head, which must train; it defaults to `head` for a model with a scalar head (`ScalarHeadModel`) and
to nothing otherwise. Their parameters go into the adapter checkpoint, and `adapters_disabled` leaves them
as they are (they have no "base" value to fall back to). Same for biases trained by LoRA's `bias` option.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.parallel.zero_init import gathered
from lmforge.peft.adapter import AdapterSettings, apply_adapters, remove_adapters, set_adapters_enabled
from lmforge.peft.lora import (
    LoraSettings,
    apply_lora,
    as_patterns,
    lora_layers,
    name_matches,
    set_lora_enabled,
    unload_lora,
)
from lmforge.peft.prefix import PrefixSettings, apply_prefix, prefix_encoder, remove_prefix

log = logging.getLogger("lmforge")

METHODS = ("none", "lora", "adapter", "prefix")
COMMON_KEYS = {"method", "modules_to_save"}
METHOD_KEYS = {
    "none": set(),
    "lora": {"r", "alpha", "dropout", "target_modules", "bias", "use_rslora"},
    "adapter": {"bottleneck", "targets", "activation"},
    "prefix": {"num_virtual_tokens", "reparameterize", "hidden", "init_std"},
}
STATE_ATTR = "lmforge_peft"
FORMAT = "lmforge-peft/1"


@dataclass(frozen=True)
class PeftReport:
    """What trains after `apply_peft`: counts of unique parameters (a tied embedding counts once)."""

    trainable_params: int
    total_params: int
    trainable_pct: float
    method: str

    def __str__(self) -> str:
        counts = f"{self.trainable_params:,} of {self.total_params:,} parameters train"
        return f"peft {self.method}: {counts} ({self.trainable_pct:.4f}%)"


@dataclass(frozen=True)
class PeftState:
    """Kept on the model (attribute `lmforge_peft`): the method, its config, the PEFT parameters' names."""

    method: str
    config: dict[str, Any]
    names: tuple[str, ...]


def normalize_cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain dict with a valid `method` and no unknown keys (Hydra nodes are converted)."""
    if cfg is None:
        return {"method": "none"}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    cfg = dict(cfg)  # type: ignore[arg-type]
    method = cfg.get("method", "none")
    if method is None:
        method = "none"
    if method not in METHODS:
        raise ConfigError(
            "peft.method",
            f"must be one of {list(METHODS)}, got {method!r}",
            "e.g. peft=lora (conf/peft/lora.yaml)",
        )
    unknown = sorted(set(cfg) - COMMON_KEYS - METHOD_KEYS[method])
    if unknown:
        allowed = sorted(COMMON_KEYS | METHOD_KEYS[method])
        raise ConfigError(
            f"peft.{unknown[0]}",
            f"is not a setting of peft.method={method} (settings: {allowed})",
            "remove it or fix its name",
        )
    return cfg | {"method": method}


def peft_state(model: nn.Module) -> PeftState | None:
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, PeftState) else None


def _report(model: nn.Module, method: str) -> PeftReport:
    params = list(model.parameters())  # de-duplicated: a tied embedding counts once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return PeftReport(trainable, total, 100.0 * trainable / max(total, 1), method)


def _modules_to_save(model: nn.Module, cfg: Mapping[str, Any]) -> list[str]:
    value = cfg.get("modules_to_save")
    if value is None:  # a scalar head starts at zero: frozen, the reward model would score everything 0
        is_scalar_model = isinstance(getattr(model, "head", None), nn.Module) and hasattr(model, "backbone")
        return ["head"] if is_scalar_model else []
    if not value:
        return []
    names = [n for n, _ in model.named_modules() if n]
    chosen = []
    for pattern in as_patterns(value, "peft.modules_to_save"):
        hits = [n for n in names if name_matches(n, pattern)]
        if not hits:
            raise ConfigError(
                "peft.modules_to_save",
                f"pattern {pattern!r} matches no module of this model",
                "name a module, e.g. [head]",
            )
        chosen += hits
    return chosen


def apply_peft(model: nn.Module, cfg: Mapping[str, Any] | None) -> PeftReport:
    """Freeze the base, add the method's parameters (in place) and log how much trains. `method: none` (or
    None) changes nothing: every parameter trains."""
    cfg = normalize_cfg(cfg)
    method = cfg["method"]
    if method == "none":
        return _report(model, method)
    applied = peft_state(model)
    if applied is not None:
        raise ValueError(f"the model already has PEFT applied ({applied.method}); apply it once")
    to_save = _modules_to_save(model, cfg)
    base_ids = {id(p) for p in model.parameters()}
    bias_of: list[str] = []
    if method == "lora":
        settings = LoraSettings.from_cfg(cfg)
        targets = apply_lora(model, settings)
        if settings.bias != "none":
            bias_of = [""] if settings.bias == "all" else targets
    elif method == "adapter":
        apply_adapters(model, AdapterSettings.from_cfg(cfg))
    else:
        apply_prefix(model, PrefixSettings.from_cfg(cfg))
    for p in model.parameters():  # frozen only now: a config error above leaves the model as it was
        p.requires_grad_(id(p) not in base_ids)
    for name, p in model.named_parameters():  # LoRA's `bias` option: frozen base biases that train after all
        if name.endswith("bias") and any(name.startswith(f"{t}.") if t else True for t in bias_of):
            p.requires_grad_(True)
    for name in to_save:
        model.get_submodule(name).requires_grad_(True)
    names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    setattr(model, STATE_ATTR, PeftState(method, cfg, names))
    report = _report(model, method)
    log.info("%s", report)
    return report


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters to hand to the optimizer (those with requires_grad)."""
    return (p for p in model.parameters() if p.requires_grad)


def _peft_names(model: nn.Module) -> tuple[str, ...]:
    state = peft_state(model)
    if state is not None:
        return state.names
    return tuple(n for n, p in model.named_parameters() if p.requires_grad)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PEFT parameters by name (detached): what the adapter checkpoint holds. Without PEFT: every
    trainable parameter."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in _peft_names(model)}


def load_trainable_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy the PEFT parameters in; strict: the keys must be exactly the model's PEFT parameters."""
    expected = set(_peft_names(model))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"adapter weights do not fit this model: missing {missing[:5]}{'...' * (len(missing) > 5)}, "
            f"unexpected {unexpected[:5]}{'...' * (len(unexpected) > 5)}. Apply the same peft config "
            "(method, targets, sizes) that trained them"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state_dict.items():
            if params[name].shape != value.shape:
                raise CheckpointError(
                    f"adapter weight {name} has shape {tuple(value.shape)}, "
                    f"the model's parameter {tuple(params[name].shape)}"
                )
            params[name].copy_(value)


def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, config): `path` is the .safetensors file, or a directory holding adapter.safetensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "adapter.safetensors"
    return path, _config_path(path)


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value on CPU; a sharded (FSDP/TP DTensor) one is gathered, a collective every rank joins."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).contiguous().cpu()


def save_adapter(
    model: nn.Module, path: str | os.PathLike, peft_cfg: Mapping[str, Any] | None = None, write: bool = True
) -> Path:
    """Write the PEFT parameters (safetensors) and their config (json, also in the safetensors metadata);
    returns the weights' path. Each file appears whole or not at all (temp file, then os.replace). A sharded
    model's parameters (FSDP/TP DTensors, ZeRO-3 partitions) are gathered first: every rank calls this, and only
    the one with `write` writes."""
    from safetensors.torch import save_file

    state = peft_state(model)
    if state is None:
        raise ValueError("the model has no PEFT applied: save its full checkpoint instead")
    cfg = normalize_cfg(peft_cfg) if peft_cfg is not None else state.config
    weights, config = _files(path)
    params, names = dict(model.named_parameters()), _peft_names(model)
    chosen = [params[n] for n in names]
    with gathered(chosen):  # ZeRO-3 partitions them too (above its persistence threshold): read whole, not placeholders
        tensors = {n: _whole(t.detach()) for n, t in zip(names, chosen, strict=True)}
    if not write:
        return weights
    meta = json.dumps({"format": FORMAT, "peft": cfg}, sort_keys=True)
    _atomic(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"lmforge_peft": meta}))
    _atomic(
        config,
        lambda tmp: tmp.write_text(
            json.dumps({"format": FORMAT, "peft": cfg}, indent=2, sort_keys=True) + "\n"
        ),
    )
    return weights


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load adapter weights saved by `save_adapter`, applying their peft config first if the model has none;
    returns that config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights, config = _files(path)
    if not weights.is_file():
        raise CheckpointError(
            f"no adapter weights at {weights}: pass the .safetensors file written by save_adapter"
        )
    with safe_open(str(weights), framework="pt") as f:
        meta = (f.metadata() or {}).get("lmforge_peft")
    if meta is None and config.is_file():
        meta = config.read_text()
    if meta is None:
        raise CheckpointError(
            f"{weights} carries no peft config (no lmforge_peft metadata, no {config.name})"
        )
    cfg = normalize_cfg(json.loads(meta)["peft"])
    state = peft_state(model)
    if state is None:
        apply_peft(model, cfg)
    elif state.method != cfg["method"]:
        raise CheckpointError(
            f"{weights} holds a {cfg['method']} adapter; the model has {state.method} applied"
        )
    load_trainable_state_dict(model, load_file(str(weights)))
    return cfg


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model for the duration (DPO's frozen reference): LoRA layers, adapters and the prefix are
    switched off, then restored with their requires_grad flags. A model without PEFT is left as it is."""
    state = peft_state(model)
    if state is None:
        yield model
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    encoder = prefix_encoder(model)
    try:
        if state.method == "lora":
            set_lora_enabled(model, False)
        elif state.method == "adapter":
            set_adapters_enabled(model, False)
        elif encoder is not None:
            encoder.enabled = False
        yield model
    finally:
        if state.method == "lora":
            set_lora_enabled(model, True)
        elif state.method == "adapter":
            set_adapters_enabled(model, True)
        elif encoder is not None:
            encoder.enabled = True
        for p, flag in flags:
            p.requires_grad_(flag)


def _reset(model: nn.Module) -> nn.Module:
    delattr(model, STATE_ATTR)
    model.requires_grad_(True)  # a plain model again, as `build` makes it
    return model


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and put the plain Linears back (in place): the result has exactly the
    base model's state-dict keys and computes what base + LoRA did. Adapters and prefixes cannot be folded
    into weights (ValueError); without PEFT the model is returned as is."""
    state = peft_state(model)
    if state is None:
        return model
    if state.method != "lora":
        raise ValueError(
            f"{state.method} cannot be merged into the base weights (a bottleneck adapter has a "
            "nonlinearity between its projections; a prefix adds attention keys, not weight updates). "
            "Keep the adapter file next to the base checkpoint and load both (lmforge.peft.load_adapter), "
            "or use peft=lora to export one merged model"
        )
    if lora_layers(model):
        unload_lora(model, merge=True)
    return _reset(model)


def remove_peft(model: nn.Module) -> nn.Module:
    """Take the PEFT modules out without merging (in place): the base model as it was before `apply_peft`."""
    state = peft_state(model)
    if state is None:
        return model
    if state.method == "lora":
        unload_lora(model, merge=False)
    elif state.method == "adapter":
        remove_adapters(model)
    else:
        remove_prefix(model)
    return _reset(model)
