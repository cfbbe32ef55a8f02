"""Finding and reading lmforge checkpoints safely (weights_only=True, memory-mapped)."""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError
from lmforge.parallel.sharded_checkpoint import (
    DCP_METADATA,
    META_FILE,
    is_sharded_checkpoint,
    read_sharded_checkpoint,
)
from lmforge.parallel.zero_checkpoint import is_zero_checkpoint, read_zero_checkpoint

log = logging.getLogger("lmforge")


def find_last_checkpoint(log_dir: str | Path, task_name: str, exclude: str | Path | None = None) -> Path:
    """`ckpt_path=last`: the newest *loadable* checkpoint among this task's runs.

    Candidates are every run's `checkpoints/last.ckpt` and periodic `step-*.ckpt` (callbacks.periodic), newest first,
    last.ckpt first on a tie. A truncated or corrupted file (a kill mid-write by a tool that does not write
    atomically, a full disk, a bad copy) is skipped with a warning naming it, so one bad file does not lose the run."""
    runs = Path(log_dir) / task_name / "runs"
    found = [p for pattern in ("*/checkpoints/last.ckpt", "*/checkpoints/step-*.ckpt") for p in runs.glob(pattern)
             if exclude is None or Path(exclude) not in p.parents]
    if not found:
        raise CheckpointError(f"ckpt_path=last: no {runs}/*/checkpoints/last.ckpt exists. Fix: train first, or pass ckpt_path=<file>.")
    bad: list[str] = []
    for path in sorted(found, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True):
        try:
            load_checkpoint(path, weights=False)
        except CheckpointError as err:
            bad.append(str(path))
            warnings.warn(f"ckpt_path=last: skipping unreadable checkpoint {path}: {err}", stacklevel=2)
            continue
        if bad:
            log.warning("ckpt_path=last: %d newer checkpoint(s) unreadable (%s); resuming from %s", len(bad), ", ".join(bad), path)
        return path
    raise CheckpointError(
        f"ckpt_path=last: none of the {len(found)} checkpoint(s) under {runs}/*/checkpoints is readable "
        f"(newest: {bad[0]}). Fix: pass ckpt_path=<a good .ckpt file>, or start fresh with ckpt_path=null."
    )


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | Path, task_name: str, exclude: str | Path | None = None) -> str | None:
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        return str(find_last_checkpoint(log_dir, task_name, exclude))
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path!r} does not exist. Fix: pass an existing .ckpt file, or ckpt_path=last.")
    if path.is_dir() and (path / META_FILE).exists() and not is_sharded_checkpoint(path):
        raise CheckpointError(f"ckpt_path={ckpt_path!r} is an incomplete sharded checkpoint (no {DCP_METADATA}: its save did not finish). "
                              "Fix: pass an older checkpoint of that run, or ckpt_path=last (it skips incomplete ones).")
    if path.is_dir() and not is_sharded_checkpoint(path) and not is_zero_checkpoint(path):
        raise CheckpointError(f"ckpt_path={ckpt_path!r} is a directory, not a checkpoint file. Fix: point at a .ckpt inside it (e.g. checkpoints/last.ckpt).")
    return str(path)


def load_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """Load with weights_only=True (no arbitrary code) and check it is an lmforge checkpoint.

    A sharded checkpoint (a directory written by strategy=fsdp or by a DeepSpeed ZeRO stage) is consolidated into
    full tensors here, so every consumer (eval, generate, export, init_from, resume metadata) reads all layouts alike;
    `weights=False` reads only its metadata (cheap: for choosing which checkpoint to resume)."""
    try:
        if is_zero_checkpoint(path):
            ckpt = read_zero_checkpoint(path, weights=weights)
        elif Path(path).is_dir():
            if not is_sharded_checkpoint(path):
                raise OSError(f"directory without {DCP_METADATA} and {META_FILE}: an incomplete sharded checkpoint")
            ckpt = read_sharded_checkpoint(path, weights=weights)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"ckpt_path={str(path)!r} is not a readable checkpoint ({first}). Fix: pass a .ckpt written by lmforge.") from None
    if not isinstance(ckpt, dict) or "lmforge" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt_path={str(path)!r} is not an lmforge checkpoint (no 'lmforge' metadata). Fix: pass a .ckpt written by train.py.")
    return ckpt


def model_state_dict(ckpt: dict[str, Any], scalar_head: bool = False) -> dict[str, torch.Tensor]:
    """The bare model's weights from a stage checkpoint (drops the `model.` prefix).

    A LoRA run's checkpoint holds base + low-rank weights; they are merged here (W + α/r·BA), so every consumer
    (generate, eval, export, init_from) gets plain weights with the architecture's own keys."""
    meta = ckpt.get("lmforge", {})
    if (meta.get("stage") == "RewardStage") != scalar_head:
        raise CheckpointError(
            "this checkpoint holds a reward model (a scalar head, no language-model output): it scores text, it does not "
            "generate or get a perplexity. Fix: pass it as stage.reward_model=<path> to stage=ppo/grpo, or use an LM checkpoint"
            if not scalar_head else
            "stage.reward_model must be a checkpoint written by stage=reward. Fix: train one with `python train.py stage=reward ...`"
        )
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    peft = meta.get("peft")
    if not peft:
        return state
    if peft.get("method") != "lora":
        raise CheckpointError(
            f"this checkpoint was trained with peft={peft.get('method')}, whose weights cannot be merged into the base model. "
            "Fix: load it on the base with lmforge.peft.load_adapter(model, <run dir>/checkpoints/adapter.safetensors), "
            "or train with peft=lora for a mergeable checkpoint"
        )
    from lmforge.models import build
    from lmforge.models.heads import ScalarHeadModel
    from lmforge.peft import apply_peft, merge_peft

    model = build(dict(meta["config"]["model"]))
    if meta.get("stage") == "RewardStage":
        model = ScalarHeadModel(model)
    apply_peft(model, peft)
    model.load_state_dict(state, strict=True)
    return merge_peft(model).state_dict()
