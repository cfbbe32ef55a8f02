"""`strategy.async_save`'s writers, on one process. Sharded (fsdp, fsdp_tp): what lands is what was staged (later in-place updates do not leak
into it), the checkpoint is swapped into place only once complete, and a failed write keeps the previous one.
DDP: its host copy shares nothing with the live checkpoint. The two-rank paths (FSDP shards, a gloo group of its own, resume from an async checkpoint) is in
tests/integration/test_fsdp.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from lmforge.errors import CheckpointError, ConfigError
from lmforge.parallel.async_checkpoint import AsyncShardedSaver
from lmforge.parallel.sharded_checkpoint import is_sharded_checkpoint, read_meta, read_model_weights


@pytest.fixture
def held_writes(monkeypatch):
    """Every DCP file write waits until the test sets the event: the training thread runs on meanwhile."""
    release = threading.Event()
    write = FileSystemWriter.write_data

    def held(self, plan, planner):
        assert release.wait(30), "the test never released the write"
        return write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", held)
    return release


def save(saver: AsyncShardedSaver, state: dict, path: Path, meta: dict | None = None) -> float:
    return saver.start(state, path.with_name(path.name + ".partial"), path, rank=0, meta=meta or {"global_step": 1})


def test_the_checkpoint_holds_the_staged_values_not_later_updates(tmp_path: Path, held_writes: threading.Event) -> None:
    weight, moment = torch.arange(12.0).reshape(3, 4), torch.ones(5)
    expected = {"model.w": weight.clone()}
    saver = AsyncShardedSaver(pinned_staging=False)
    path = tmp_path / "last.ckpt"
    save(saver, {"state_dict": {"model.w": weight}, "optimizer_0": {"exp_avg": moment}}, path, {"global_step": 7})
    weight.add_(100.0)  # the next optimizer step, while the write is held
    moment.mul_(3.0)
    assert not path.exists() and saver.pending_path == path  # not in place before it is complete
    held_writes.set()
    saver.finish(rank=0)
    assert is_sharded_checkpoint(path) and not path.with_name("last.ckpt.partial").exists()
    assert torch.equal(read_model_weights(path)["model.w"], expected["model.w"])
    assert read_meta(path) == {"global_step": 7}
    assert saver.pending_path is None


def test_a_new_save_replaces_the_previous_checkpoint_once_written(tmp_path: Path) -> None:
    saver = AsyncShardedSaver(pinned_staging=False)
    path = tmp_path / "last.ckpt"
    save(saver, {"state_dict": {"w": torch.zeros(4)}}, path)
    save(saver, {"state_dict": {"w": torch.full((4,), 2.0)}}, path)  # lands the first, then stages the second
    assert torch.equal(read_model_weights(path)["w"], torch.zeros(4))  # the first, until the second is finished
    saver.close(rank=0)
    assert torch.equal(read_model_weights(path)["w"], torch.full((4,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no .partial, no .old


def test_a_failed_background_write_keeps_the_previous_checkpoint_and_says_so(tmp_path: Path, monkeypatch) -> None:
    saver = AsyncShardedSaver(pinned_staging=False)
    path = tmp_path / "last.ckpt"
    save(saver, {"state_dict": {"w": torch.zeros(4)}}, path)
    saver.finish(rank=0)

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    save(saver, {"state_dict": {"w": torch.ones(4)}}, path)
    with pytest.raises(CheckpointError, match=r"last\.ckpt.*the previous last\.ckpt is intact.*async_save=false"):
        saver.finish(rank=0)
    assert torch.equal(read_model_weights(path)["w"], torch.zeros(4))
    assert not path.with_name("last.ckpt.partial").exists()


def test_after_another_error_a_failed_write_is_logged_not_raised(tmp_path: Path, monkeypatch, caplog) -> None:
    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    saver = AsyncShardedSaver(pinned_staging=False)
    save(saver, {"state_dict": {"w": torch.ones(4)}}, tmp_path / "last.ckpt")
    with caplog.at_level("ERROR", logger="lmforge"):
        saver.close(rank=0, raise_errors=False)
    assert "no last.ckpt was written" in caplog.text


def test_async_save_needs_sharded_checkpoints() -> None:
    from lmforge.parallel.strategy import ShardedStrategy

    with pytest.raises(ConfigError, match="strategy.async_save"):
        ShardedStrategy(async_save=True, save_distributed_checkpoint=False)


def test_a_preemption_save_lands_before_the_callback_reports_it(tmp_path: Path) -> None:
    """SIGTERM under strategy.async_save: the job may be killed right after, so the save is finished, not left in flight."""
    import signal
    from types import SimpleNamespace

    from lmforge.callbacks.preemption import PreemptionCheckpoint

    calls: list[str] = []
    strategy = SimpleNamespace(finish_checkpoint=lambda: calls.append("finish"))
    trainer = SimpleNamespace(strategy=strategy, global_step=5, should_stop=False, default_root_dir=str(tmp_path), is_global_zero=True,
                              checkpoint_callback=None, save_checkpoint=lambda path: calls.append(f"save {Path(path).name}"))
    callback = PreemptionCheckpoint()
    callback.received = signal.SIGTERM
    callback._save_and_stop(trainer)
    assert calls == ["save last.ckpt", "finish"] and trainer.should_stop and callback.saved_step == 5


def test_the_ddp_host_copy_shares_nothing_with_the_live_checkpoint() -> None:
    """Rank 0 writes the copy while training goes on: no later in-place update, appended list or changed dict may reach it."""
    from lmforge.parallel.ddp import stage_to_host

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"step": 4}
    live = {"state_dict": {"w": weight, "w_view": weight[0]}, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}],
            "loops": {"progress": state, "seen": [1, 2]}}
    staged = stage_to_host(live)
    weight.add_(10.0)
    live["optimizer_states"][0]["state"][0]["exp_avg"].zero_()
    state["step"] = 5
    live["loops"]["seen"].append(3)
    assert torch.equal(staged["state_dict"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(staged["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(3))
    assert staged["loops"] == {"progress": {"step": 4}, "seen": [1, 2]}
    assert staged["state_dict"]["w"].untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()


def fitting_ddp_strategy(tmp_path: Path):
    """A DataParallelStrategy with async_save as Lightning holds it mid-fit, on one process (no process group: its
    barrier is a no-op then)."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

    from lmforge.checkpoint_io import AtomicCheckpointIO
    from lmforge.parallel.ddp import DataParallelStrategy

    strategy = DataParallelStrategy(async_save=True, checkpoint_io=AtomicCheckpointIO())
    strategy._lightning_module = SimpleNamespace(_trainer=SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING, status=TrainerStatus.RUNNING)))
    return strategy


def test_ddp_background_save_writes_the_staged_checkpoint_and_reports_a_failed_one(tmp_path: Path, monkeypatch) -> None:
    import lmforge.checkpoint_io as checkpoint_io
    from lmforge.checkpoint import load_checkpoint

    release, write = threading.Event(), checkpoint_io._write

    def held(checkpoint, fh):
        assert release.wait(30)
        write(checkpoint, fh)

    monkeypatch.setattr(checkpoint_io, "_write", held)
    strategy = fitting_ddp_strategy(tmp_path)
    path, weight = tmp_path / "last.ckpt", torch.zeros(3)
    strategy.save_checkpoint({"state_dict": {"w": weight}, "global_step": 3, "lmforge": {"schema_version": 1}}, path)  # returns first
    weight.add_(1.0)
    assert not path.exists()
    release.set()
    strategy.finish_checkpoint()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.zeros(3))

    def full_disk(checkpoint, fh):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "_write", full_disk)
    strategy.save_checkpoint({"state_dict": {"w": weight}, "global_step": 6, "lmforge": {"schema_version": 1}}, path)
    with pytest.raises(CheckpointError, match=r"the previous last\.ckpt is intact"):
        strategy.save_checkpoint({"state_dict": {"w": weight}, "global_step": 9}, path)  # the next save lands the failed one
    assert load_checkpoint(path)["global_step"] == 3
