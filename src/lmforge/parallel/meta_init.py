"""Meta-device initialisation that gives bit-for-bit the weights of an ordinary build.

A model larger than one device is never materialised whole: it is built on the meta device (no memory),
sharded, then each rank allocates only its shards and runs the model's own `reset_parameters()`. Two
details make the result equal to `build(cfg)` with the same seed, whatever the world size:

* while building on meta, every random in-place op (`nn.Linear`'s default init, the model's own init) draws
  the same numbers from the CPU generator into a throw-away tensor, so the generator ends where an ordinary
  build leaves it (data order, dropout and later seeds do not shift);
* `reset_parameters()` is replayed from the generator state it started from, and each in-place init op on a
  sharded (DTensor) parameter draws the *full* tensor and keeps this rank's slice. One parameter is full at
  a time, never the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# In-place ops that model/PyTorch init functions use (nn.init.* and reset_parameters()).
RANDOM_INPLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_,
                  torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_}
OVERWRITING = RANDOM_INPLACE | {torch.Tensor.zero_, torch.Tensor.fill_}
INIT_INPLACE = OVERWRITING | {torch.Tensor.copy_, torch.Tensor.mul_, torch.Tensor.add_, torch.Tensor.clamp_, torch.Tensor.erfinv_}
# nn.init.normal_ & co. reach a TorchFunctionMode as themselves (not as the Tensor methods they call); each
# overwrites its whole tensor.
NN_INIT = {getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")}


def _target(args: tuple, kwargs: dict) -> Any:
    """The tensor an init op writes: first positional, or `tensor=` (nn.init passes it by keyword)."""
    return args[0] if args else kwargs.get("tensor")


def _call_on(func: Callable, replacement: torch.Tensor, args: tuple, kwargs: dict) -> None:
    if args:
        func(replacement, *args[1:], **kwargs)
    else:
        func(**{**kwargs, "tensor": replacement})


class _DrawOnMeta(TorchFunctionMode):
    """Random in-place ops on meta tensors draw the same numbers on CPU (thrown away)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = _target(args, kwargs)
        if (func in RANDOM_INPLACE or func in NN_INIT) and isinstance(target, torch.Tensor) and target.is_meta:
            _call_on(func, torch.empty(target.shape, dtype=target.dtype, device="cpu"), args, kwargs)
            return target
        return func(*args, **kwargs)


class _FullTensorInit(TorchFunctionMode):
    """In-place init ops on DTensors: compute the full tensor on CPU as an unsharded build would, keep the shard.
    Ops on the `skip`ped tensors (ids) do nothing and draw nothing: weights added after the model was built (PEFT's,
    filled from their own source), which its init did not draw for."""

    def __init__(self, skip: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.skip = skip

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        target = _target(args, kwargs)
        if (func in INIT_INPLACE or func in NN_INIT) and id(target) in self.skip:
            return target
        if (func in INIT_INPLACE or func in NN_INIT) and isinstance(target, DTensor):
            overwrites = func in OVERWRITING or func in NN_INIT
            full = torch.empty(target.shape, dtype=target.dtype, device="cpu") if overwrites else target.full_tensor().cpu()
            rest = tuple(a.full_tensor().cpu() if isinstance(a, DTensor) else a for a in args)
            _call_on(func, full, rest, kwargs)
            copy_full_into(target, full)
            return target
        return func(*args, **kwargs)


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor `full` into `target`; for a (sharded) DTensor, this rank's slice of it as
    `distribute_tensor` lays it out, with no communication (every rank holds the same `full`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            shard = distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(full)


def draw_on_meta() -> TorchFunctionMode:
    """A mode under which random init ops on meta tensors still draw their numbers from the CPU generator (thrown
    away): a model built on meta under it leaves the generator where a whole build leaves it."""
    return _DrawOnMeta()


def build_on_meta(model_cfg: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    """Build the family model with no memory; returns it and the CPU generator state its
    `reset_parameters()` started from (what `materialize_and_init` replays)."""
    from lmforge.models import build
    from lmforge.models.registry import family_classes

    _, model_cls = family_classes(str(model_cfg["family"]))
    owner = next((c for c in model_cls.__mro__ if "reset_parameters" in vars(c)), None)
    if owner is None or owner is nn.Module:
        raise RuntimeError(f"{model_cls.__name__} has no reset_parameters(): meta-device init cannot re-create its weights")
    original = vars(owner)["reset_parameters"]
    record: dict[str, torch.Tensor] = {}

    def reset(self: nn.Module) -> None:
        record.setdefault("state", torch.get_rng_state())
        original(self)

    owner.reset_parameters = reset
    try:
        with torch.device("meta"), _DrawOnMeta():
            model = build(dict(model_cfg))
    finally:
        owner.reset_parameters = original
    return model, record["state"]


def _tied_parameters(model: nn.Module) -> dict[tuple[nn.Module, str], tuple[nn.Module, str]]:
    """(module, name) of every repeated parameter -> where it first appears."""
    first: dict[int, tuple[nn.Module, str]] = {}
    tied: dict[tuple[nn.Module, str], tuple[nn.Module, str]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in first:
                tied[(module, name)] = first[id(param)]
            else:
                first[id(param)] = (module, name)
    return tied


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Allocate (sharded) storage on `device`, uninitialised: for weights that are loaded next (init_from)."""
    tied = _tied_parameters(model)
    model.to_empty(device=device)
    for (owner, name), (source, source_name) in tied.items():  # to_empty unties shared tables (wte = lm_head)
        if getattr(owner, name) is not getattr(source, source_name):
            setattr(owner, name, getattr(source, source_name))


def materialize_and_init(model: nn.Module, device: torch.device | str, rng_state: torch.Tensor,
                         skip: frozenset[str] = frozenset()) -> None:
    """Allocate (sharded) storage on `device` and re-run the family model's init from `rng_state` (for a wrapper such as
    a scalar-head model, its backbone's), leaving the `skip`ped parameters (by name: PEFT weights, a head) untouched;
    restores the generator."""
    materialize(model, device)
    family = next((m for m in model.modules() if callable(getattr(m, "reset_parameters", None))), None)
    if family is None:
        raise RuntimeError(f"{type(model).__name__} holds no module with reset_parameters(): set strategy.meta_init=false")
    skip_ids = frozenset(id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in skip)
    after = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    try:
        with torch.no_grad(), _FullTensorInit(skip_ids):
            family.reset_parameters()
    finally:
        torch.set_rng_state(after)
