"""Reading the checkpoints `strategy=deepspeed_zero*` writes, on one process, with no GPU and no process group.

Lightning's DeepSpeedStrategy saves a directory: `latest` (the tag, "checkpoint"), and under the tag one
`*model_states.pt` per model-parallel rank (the loops, callbacks and `lmforge` metadata Lightning passes as
DeepSpeed's client state; under ZeRO-1/2 also the low-precision module weights) and one `*optim_states.pt` per
data-parallel rank holding that rank's partition of the fp32 master weights and Adam moments. The fp32 weights
are merged from those partitions by DeepSpeed's own `zero_to_fp32` (the deepspeed package is needed for weights,
not for metadata). Every file is read with `weights_only` semantics: DeepSpeed's loader asks for full unpickling,
so it runs under `weights_only_loads()`, which forces safe loading and allow-lists the three DeepSpeed classes
its optimizer files hold.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError

LATEST_FILE = "latest"
# what DeepSpeed adds to the client state in the model-states file (Lightning's converter drops the same keys)
DEEPSPEED_KEYS = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
                  "global_samples", "dp_world_size", "mp_world_size", "buffer_names", "param_shapes", "frozen_param_shapes",
                  "shared_params", "frozen_param_fragments", "data_sampler", "random_ltd", "checkpoint_parallel_dimensions",
                  "ds_config", "ds_version")
WRAPPER_PREFIX = "_forward_module."  # Lightning's _LightningModuleWrapperBase around the LightningModule


def is_zero_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / LATEST_FILE).is_file()


def tag_dir(path: str | Path) -> Path:
    tag = (Path(path) / LATEST_FILE).read_text().strip()
    directory = Path(path) / tag
    if not tag or not directory.is_dir():
        raise OSError(f"{LATEST_FILE} names tag {tag!r} but {directory} does not exist")
    return directory


def model_states_file(path: str | Path) -> Path:
    """Rank 0's model-states file: `mp_rank_00_model_states.pt` (ZeRO-1/2) or `zero_pp_rank_0_mp_rank_00_…` (ZeRO-3)."""
    directory = tag_dir(path)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (directory / name).is_file():
            return directory / name
    raise OSError(f"no rank-0 *model_states.pt in {directory}")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's included, which pass weights_only=False) runs with weights_only=True;
    the DeepSpeed classes pickled in its optimizer files are allowed, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def name_deepspeed_accelerator() -> None:
    """DeepSpeed picks its accelerator at first import and, finding no GPU, prints a warning to stdout (through
    its own logger, whose level no setting reaches) into the output of eval.py, export.py, ... Where no GPU is
    visible and nobody chose, name the CPU, as DeepSpeed's `DS_ACCELERATOR` allows: the same choice, silently."""
    if "deepspeed" not in sys.modules and "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def read_fp32_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights, merged from every data-parallel rank's partition, keyed as a Lightning state dict."""
    name_deepspeed_accelerator()
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise CheckpointError(
            f"{path} is a DeepSpeed ZeRO checkpoint: merging its partitioned weights needs the deepspeed package. "
            "Fix: pip install deepspeed (no GPU needed), or convert it where deepspeed is installed with "
            "scripts/consolidate_checkpoint.py"
        ) from None
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):  # its progress prints would garble a CLI's output
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir(path).name)
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}


def read_zero_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """A regular checkpoint dict (as `torch.load` of a .ckpt file gives) from a ZeRO directory."""
    client = torch.load(model_states_file(path), map_location="cpu", weights_only=True, mmap=True)
    ckpt = {k: v for k, v in client.items() if k not in DEEPSPEED_KEYS}
    ckpt["state_dict"] = read_fp32_weights(path) if weights else {}
    return ckpt
