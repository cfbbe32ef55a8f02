"""A run survives being killed: SIGKILL right after a periodic checkpoint, or SIGTERM (preemption), then a resume
from the file left behind continues the uninterrupted run's loss curve exactly.

Cost: one `train.py` subprocess (the SIGKILL victim) and four short in-process runs of a 2-layer, 64-wide GPT
on bytes, 8 steps each. The in-process runs compose the same config as train.py (conftest.train_in_process).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, train_in_process

from lmforge.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
STEPS = 8


def overrides(cache_dir: Path, logs: Path) -> list[str]:
    return ["debug=fast", "tokenizer=byte", "model=gpt-nano", "model.n_layer=2", "model.n_embd=64", "data.batch_size=4",
            "trainer.precision=32-true",  # fp32 on every machine: the 2-rank run below matches the 1-process curve to 1e-5
            f"trainer.max_steps={STEPS}", "trainer.val_check_interval=1000", "trainer.deterministic=true", "seed=7",
            "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.monitor=null", "callbacks.progress_bar=null", "callbacks.samples=null",
            "callbacks.model_summary=null", f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}"]


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def full(cache_dir: Path, logs: Path) -> dict[int, float]:
    """The uninterrupted run: the loss curve every resumed run must reproduce."""
    run_dir = logs / "debug" / "runs" / "full"
    train_in_process(overrides(cache_dir, logs), run_dir)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(STEPS))
    return curve


def test_sigkill_after_a_periodic_checkpoint_then_resume_is_exact(full, cache_dir: Path, logs: Path) -> None:
    killed = logs / "debug" / "runs" / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides(cache_dir, logs), f"hydra.run.dir={killed}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    finally:
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr[-2000:]}"
    step = load_checkpoint(last)["global_step"]  # written atomically: whole, whatever the kill interrupted
    assert step in range(2, STEPS, 2), step

    resumed = logs / "debug" / "runs" / "after_kill"
    train_in_process([*overrides(cache_dir, logs), f"ckpt_path={last}"], resumed)
    after = losses(resumed)
    assert sorted(after) == list(range(step, STEPS))
    assert [after[s] for s in after] == pytest.approx([full[s] for s in after], abs=1e-6)


class SigtermAt(L.Callback):
    """Sends the process a real SIGTERM after `step` optimizer steps, as a scheduler preempting the job would; with
    `rank`, only that rank's process is signalled."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_checkpoint_exits_cleanly_and_resume_is_exact(full, cache_dir: Path, logs: Path) -> None:
    run_dir = logs / "debug" / "runs" / "preempted"
    before = signal.getsignal(signal.SIGTERM)
    killer = ["+callbacks.sigterm._target_=test_kill_resume.SigtermAt", "+callbacks.sigterm.step=5"]
    with pytest.raises(SystemExit) as exit_:
        train_in_process([*overrides(cache_dir, logs), *killer], run_dir)
    assert exit_.value.code in (None, 0)  # Lightning's SIGTERMException: a clean exit, status 0
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    step = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert step in (5, 6)  # the signal came at the end of step 5: saved there, or after the step in flight (hook order)
    assert sorted(losses(run_dir)) == list(range(step))  # the CSV was flushed up to the saved step

    resumed = logs / "debug" / "runs" / "after_sigterm"
    train_in_process([*overrides(cache_dir, logs), f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], resumed)
    after = losses(resumed)
    assert sorted(after) == list(range(step, STEPS))
    assert [after[s] for s in after] == pytest.approx([full[s] for s in after], abs=1e-6)
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS


def test_sigterm_to_one_of_two_fsdp_ranks_saves_on_both_and_exits(full, cache_dir: Path, logs: Path) -> None:
    """Only rank 0 is signalled, mid-run. Lightning's handler ran a broadcast inside the signal handler, which met rank 1's
    FSDP all-gather: both hung until the 30-minute timeout. The ranks now agree at the step's end, save together, exit 0."""
    run_dir = logs / "debug" / "runs" / "preempted_fsdp"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(ROOT / "tests"), env.get("PYTHONPATH", "")])  # SigtermAt
    sharded = ["strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=2"]  # global batch 4, as `full`
    killer = ["+callbacks.sigterm._target_=test_kill_resume.SigtermAt", "+callbacks.sigterm.step=5", "+callbacks.sigterm.rank=0"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides(cache_dir, logs), *sharded, *killer, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGTERM received: saved" in (run_dir / "train.log").read_text()
    last = run_dir / "checkpoints" / "last.ckpt"
    step = load_checkpoint(last)["global_step"]  # a sharded directory, consolidated here
    assert step in (5, 6)

    resumed = logs / "debug" / "runs" / "after_fsdp_sigterm"  # on one process, from the 2-rank checkpoint
    train_in_process([*overrides(cache_dir, logs), f"ckpt_path={last}"], resumed)
    after = losses(resumed)
    assert sorted(after) == list(range(step, STEPS))
    assert [after[s] for s in after] == pytest.approx([full[s] for s in after], abs=1e-5)
