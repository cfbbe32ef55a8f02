"""ZeRO-3 without a whole model anywhere: each module partitioned as it is built, the model's own init kept exact.

Under `deepspeed.zero.Init` a submodule's parameters are partitioned over the data-parallel ranks the moment its
constructor returns, so no process holds the whole model (Lightning's default for ZeRO-3). But a model's own
initialisation runs after its submodules exist (`reset_parameters()`: scaled normal draws, zeroed biases, ones
for norms), and there it would write into the empty placeholders partitioned parameters leave: training would
start from PyTorch's default init (a step-0 loss of 57.7 instead of 5.5 was measured). Here every in-place init
op on a partitioned parameter runs on the gathered parameter (`GatheredParameters`, one parameter at a time,
rank 0's values kept, though every rank computes the same), in float32 as a whole build does, and is rounded into
the parameter's dtype (bf16 under `bf16-mixed`, as the engine would cast a whole build). Random inits of
low-precision tensors not yet partitioned (inside a constructor) draw in float32 too, so the generator advances
as in a float32 build. The weights are bit for bit those of `lmforge.models.build` with the same seed, and the
generator ends where it would (tests/integration/test_deepspeed.py, every family, fp32 and bf16).

`init_from` weights go in afterwards with `load_partitioned`: rank 0 reads the file, each parameter is gathered,
filled from rank 0 and re-partitioned in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lmforge.parallel.load_weights import mismatch, read_on_rank0
from lmforge.parallel.meta_init import INIT_INPLACE, NN_INIT, RANDOM_INPLACE, _call_on, _target

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _partitioned(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose data is a placeholder (its values live in partitions on the ranks)."""
    if not hasattr(tensor, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return tensor.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _in_float32(func: Callable, tensor: torch.Tensor, args: tuple, kwargs: dict) -> None:
    """Run the in-place init op `func` on a float32 copy of `tensor` and round the result into it."""
    if tensor.dtype == torch.float32:
        _call_on(func, tensor, args, kwargs)
        return
    full = tensor.float()
    _call_on(func, full, args, kwargs)
    tensor.copy_(full)


class _GatheredInit(TorchFunctionMode):
    """Init ops on partitioned parameters run on the gathered parameter; low-precision random inits draw in float32."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = _target(args, kwargs)
        is_init = func in INIT_INPLACE or func in NN_INIT
        if is_init and isinstance(target, torch.Tensor) and _partitioned(target):
            import deepspeed

            with torch.no_grad(), deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                _in_float32(func, target.data, args, kwargs)
            return target
        if (func in RANDOM_INPLACE or func in NN_INIT) and isinstance(target, torch.Tensor) and target.dtype in LOW_PRECISION:
            with torch.no_grad():
                _in_float32(func, target.data, args, kwargs)
            return target
        return func(*args, **kwargs)


@contextmanager
def partitioned_build(config: dict[str, Any], remote_device: str | None = None) -> Iterator[None]:
    """Modules built inside are ZeRO-3 partitioned as they are constructed, with exact init (see the module doc)."""
    import deepspeed

    with deepspeed.zero.Init(remote_device=remote_device, config_dict_or_path=config), _GatheredInit():
        yield


def load_partitioned(model: nn.Module, read: Callable[[], dict[str, torch.Tensor]], what: str = "init_from") -> int:
    """Load the whole state dict `read()` returns on rank 0 into a model built by `partitioned_build`: one parameter
    gathered at a time, rank 0's copy kept (`GatheredParameters(modifier_rank=0)` re-partitions it to every rank),
    persistent buffers broadcast. Only rank 0 holds the state dict; it checks keys and whole shapes first and
    shares its verdict (`read_on_rank0`). Collective; returns the tensor count."""
    import deepspeed
    import torch.distributed as dist

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    keys = list(model.state_dict().keys())  # the parameters' placeholders still name every key (tied ones too)
    expected = {k: tuple(params[k].ds_shape) if k in params else tuple(buffers[k].shape) for k in keys}
    state, count = read_on_rank0(read, lambda s: mismatch(expected, s), what)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    done: set[int] = set()
    with torch.no_grad():
        for key, param in params.items():
            if id(param) in done:  # a tied table: filled under its first name
                continue
            done.add(id(param))
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank0:
                    param.data.copy_(state[key])
        for key in keys:
            if key in buffers:
                if rank0:
                    buffers[key].copy_(state[key])
                if dist.is_initialized():
                    dist.broadcast(buffers[key], src=0)
    return count


@contextmanager
def gathered(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Inside, every ZeRO-3 partitioned tensor among `tensors` holds its whole value (read-only: changes are not
    re-partitioned); others are left as they are. Collective where any is partitioned: every rank must enter."""
    parted = [t for t in tensors if _partitioned(t)]
    if not parted:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parted):
        yield


GeneratorStates = tuple[torch.Tensor, torch.Tensor | None]


def generator_states() -> GeneratorStates:
    """The CPU generator's state and the current CUDA device's (zero.Init draws an init there on a GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None


def _set_generator_states(states: GeneratorStates) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])


def replayed(before: GeneratorStates, build_fn: Callable[[], nn.Module]) -> nn.Module:
    """`build_fn()` run from the generator states `before` (those an earlier partitioned build started from), the
    generators left where they are: a second partitioned build of the same model, in place of a deep copy, which
    a partitioned model cannot have and which draws nothing."""
    after = generator_states()
    _set_generator_states(before)
    try:
        return build_fn()
    finally:
        _set_generator_states(after)
