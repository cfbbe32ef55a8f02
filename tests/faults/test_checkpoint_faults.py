"""Bad checkpoints lose nothing: a failed write keeps the previous file, and `ckpt_path=last` steps over a
truncated or corrupted newest file to the previous good one (or says clearly that none is good). No training."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import lmforge.checkpoint_io as checkpoint_io
from lmforge.checkpoint import find_last_checkpoint, load_checkpoint, resolve_ckpt_path
from lmforge.checkpoint_io import AtomicCheckpointIO
from lmforge.errors import CheckpointError


def ckpt(step: int) -> dict:
    return {"state_dict": {"model.w": torch.full((4,), float(step))}, "global_step": step, "lmforge": {"schema_version": 1}}


def test_failed_write_keeps_the_previous_checkpoint_and_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(ckpt(4), path)

    def disk_full(checkpoint, fh) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "_write", disk_full)
    with pytest.raises(CheckpointError) as err:
        AtomicCheckpointIO().save_checkpoint(ckpt(8), path)
    assert str(err.value).startswith(f"could not write checkpoint '{path}' (No space left on device); the previous last.ckpt is intact.")
    assert "Fix: free space on that disk" in str(err.value)
    assert load_checkpoint(path)["global_step"] == 4  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind


def make_runs(tmp_path: Path, *names: str) -> list[Path]:
    """One run dir per name, each with a good last.ckpt, oldest first (mtimes one second apart)."""
    paths = []
    for i, name in enumerate(names):
        path = tmp_path / "logs" / "train" / "runs" / name / "checkpoints" / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(ckpt(10 * (i + 1)), path)
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
        paths.append(path)
    return paths


def test_last_falls_back_over_a_truncated_newest_checkpoint_with_a_warning(tmp_path: Path) -> None:
    old, new = make_runs(tmp_path, "a", "b")
    periodic = new.with_name("step-000015.ckpt")  # an older periodic checkpoint of the newest run
    AtomicCheckpointIO().save_checkpoint(ckpt(15), periodic)
    os.utime(periodic, (new.stat().st_mtime - 0.5,) * 2)
    new.write_bytes(new.read_bytes()[:200])  # killed mid-copy: truncated
    with pytest.warns(UserWarning, match=f"skipping unreadable checkpoint {new}: ckpt_path='{new}' is not a readable checkpoint"):
        found = resolve_ckpt_path("last", tmp_path / "logs", "train")
    assert found == str(periodic) and load_checkpoint(found)["global_step"] == 15
    periodic.write_bytes(b"garbage")  # corrupted as well: the older run's last.ckpt is next
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        assert find_last_checkpoint(tmp_path / "logs", "train") == old


def test_last_with_no_good_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    paths = make_runs(tmp_path, "a", "b")
    for p in paths:
        p.write_bytes(p.read_bytes()[:100])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as err:
        find_last_checkpoint(tmp_path / "logs", "train")
    assert str(err.value) == (
        f"ckpt_path=last: none of the 2 checkpoint(s) under {tmp_path / 'logs' / 'train' / 'runs'}/*/checkpoints is readable "
        f"(newest: {paths[1]}). Fix: pass ckpt_path=<a good .ckpt file>, or start fresh with ckpt_path=null."
    )


def write_sharded(path: Path, step: int) -> None:
    """A sharded checkpoint as strategy=fsdp lays it out: DCP shards of `state_dict.*` + meta.pt."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"model.w": torch.full((4,), float(step))}}, checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": step, "lmforge": {"schema_version": 1}}, path / "meta.pt")


def test_sharded_checkpoints_are_read_whole_and_half_written_ones_are_skipped(tmp_path: Path) -> None:
    (old,) = make_runs(tmp_path, "a")
    new = tmp_path / "logs" / "train" / "runs" / "b" / "checkpoints" / "last.ckpt"
    write_sharded(new, 30)
    ckpt_ = load_checkpoint(new)  # consolidated on one process, no process group
    assert ckpt_["global_step"] == 30 and torch.equal(ckpt_["state_dict"]["model.w"], torch.full((4,), 30.0))
    assert find_last_checkpoint(tmp_path / "logs", "train") == new
    partial = new.with_name("last.ckpt.partial")  # a save killed before its swap: never a candidate
    write_sharded(partial, 40)
    assert find_last_checkpoint(tmp_path / "logs", "train") == new
    (new / ".metadata").unlink()  # an incomplete directory: skipped with the reason, the older run resumes
    with pytest.warns(UserWarning, match=f"skipping unreadable checkpoint {new}: .*incomplete sharded checkpoint"):
        assert find_last_checkpoint(tmp_path / "logs", "train") == old
    with pytest.raises(CheckpointError, match="is an incomplete sharded checkpoint .*Fix: pass an older checkpoint"):
        resolve_ckpt_path(str(new), tmp_path / "logs", "train")


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    """mkstemp makes its temp file 0600: renamed into place as is, a checkpoint would be unreadable to the rest of a team."""
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint(ckpt(1), tmp_path / "last.ckpt")
        (tmp_path / "plain").write_bytes(b"")
        os.umask(0o077)
        AtomicCheckpointIO().save_checkpoint(ckpt(2), tmp_path / "private.ckpt")
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("last.ckpt") == mode("plain") == 0o644
    assert mode("private.ckpt") == 0o600
