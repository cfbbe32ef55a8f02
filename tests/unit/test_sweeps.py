"""lmforge.sweeps: the divergence guard, the trial score, the SQLite dir callback, the resumable TPE sampler, and
the sweep/launcher configs composing."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CountedLoss
from omegaconf import OmegaConf

from lmforge.callbacks.samples import SampleGeneration
from lmforge.sweeps import (
    DEFAULT_BAD_SCORE,
    DIVERGED_KEY,
    DivergenceGuard,
    EnsureSqliteDir,
    sqlite_path,
    trial_score,
)

CONF = Path(__file__).resolve().parents[2] / "conf"


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((metrics, step))


def _trainer(log_every_n_steps: int = 1, **callbacks: object) -> SimpleNamespace:
    return SimpleNamespace(
        callback_metrics={}, global_step=0, should_stop=False, loggers=[_Logger()], callbacks=list(callbacks.values()),
        log_every_n_steps=log_every_n_steps,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
    )


def _feed(guard: DivergenceGuard, trainer: SimpleNamespace, losses: list[float]) -> int | None:
    """Run the guard over a loss curve; the step at which it stopped the run, or None."""
    for loss in losses:
        trainer.global_step += 1
        trainer.callback_metrics["train/loss"] = torch.tensor(loss)
        guard.on_train_batch_end(trainer, None, None, None, trainer.global_step - 1)
        if trainer.should_stop:
            return trainer.global_step
    return None


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_guard_stops_at_once_on_non_finite_loss(bad):
    samples, other = SampleGeneration(), object()
    guard, trainer = DivergenceGuard(stop_on_nan=True, stop_on_spike=False), _trainer(samples=samples, other=other)
    assert _feed(guard, trainer, [5.0, 4.0, bad, 3.0]) == 3
    assert guard.diverged and trainer.callback_metrics[DIVERGED_KEY].item() == 1.0
    assert trainer.loggers[0].logged == [({DIVERGED_KEY: 1.0}, 3)]
    assert trainer.callbacks == [other]  # sampling from NaN logits would raise in the stop's validation


def test_guard_reads_the_loss_on_logging_steps_only_unless_told() -> None:
    """Reading train/loss waits for the GPU: by default the guard checks where Lightning logs (and reads) it anyway."""
    class Loss(CountedLoss):  # its own count
        reads = 0

    trainer = _trainer(log_every_n_steps=5)
    guard = DivergenceGuard(stop_on_nan=True)
    for step in range(1, 11):
        trainer.global_step = step
        trainer.callback_metrics["train/loss"] = Loss(float("nan") if step == 3 else 2.0)
        guard.on_train_batch_end(trainer, None, None, None, step - 1)
    assert Loss.reads == 2 and not trainer.should_stop  # steps 5 and 10; the NaN of step 3 was never logged
    every_step, trainer = DivergenceGuard(stop_on_nan=True, every_n_steps=1), _trainer(log_every_n_steps=5)
    assert _feed(every_step, trainer, [2.0, 2.0, float("nan")]) == 3


def test_guard_stops_on_a_sustained_spike_only():
    guard, trainer = DivergenceGuard(max_ratio=2.0, patience=3, stop_on_spike=True), _trainer()
    assert _feed(guard, trainer, [5.0, 11.0, 11.0, 4.0, 11.0, 12.0]) is None  # two-step spikes: recovered
    assert _feed(guard, trainer, [13.0]) == 7  # the third in a row above 2 x 5.0
    assert "above 10" in guard.reason


def test_guard_max_loss_and_warn_only_outside_sweeps(caplog):
    guard, trainer = DivergenceGuard(max_loss=6.0, max_ratio=None, patience=2), _trainer()
    guard.on_fit_start(trainer, None)  # not a Hydra multirun: spikes and NaN only warn (the stage bounds NaN steps)
    assert guard.stop_on_spike is False and guard.stop_on_nan is False
    assert _feed(guard, trainer, [5.0, 7.0, 7.0, 7.0, math.nan]) is None and not guard.diverged
    assert "set stop_on_spike=true" in caplog.text and "set stop_on_nan=true" in caplog.text
    guard = DivergenceGuard(max_loss=6.0, max_ratio=None, patience=2, stop_on_spike=True)
    assert _feed(guard, _trainer(), [5.0, 7.0, 7.0]) == 3


def test_guard_without_the_metric_does_nothing_and_keeps_its_baseline():
    guard, trainer = DivergenceGuard(max_ratio=2.0, patience=1, stop_on_spike=True), _trainer()
    guard.on_train_batch_end(trainer, None, None, None, 0)
    assert not trainer.should_stop and guard.first_loss is None
    resumed = DivergenceGuard(max_ratio=2.0, patience=1, stop_on_spike=True)
    resumed.load_state_dict({"first_loss": 8.0})
    assert _feed(resumed, _trainer(), [2.0, 15.0]) is None  # 15 < 2 x 8 (the first run's baseline, not 2.0)


def test_trial_score():
    cfg = OmegaConf.create({"optimized_metric": "val/bpb"})
    assert trial_score({"val/bpb": 1.5}, cfg) == 1.5
    assert trial_score({"val/bpb": 1.5, DIVERGED_KEY: 1.0}, cfg) == DEFAULT_BAD_SCORE
    assert trial_score({"val/loss": 1.5}, cfg) == DEFAULT_BAD_SCORE  # metric missing
    assert trial_score({"val/bpb": math.nan}, cfg) == DEFAULT_BAD_SCORE
    assert trial_score(None, cfg) == DEFAULT_BAD_SCORE
    assert trial_score({"val/bpb": math.inf}, OmegaConf.create({"optimized_metric": "val/bpb", "sweep_bad_score": 99})) == 99


def test_sqlite_dir_callback(tmp_path):
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("sqlite:///rel/x.db") == Path("rel/x.db")
    assert sqlite_path("postgresql://host/db") is None and sqlite_path(None) is None
    db = tmp_path / "a" / "b" / "s.db"
    EnsureSqliteDir().on_multirun_start(OmegaConf.create({"hydra": {"sweeper": {"storage": f"sqlite:///{db}"}}}))
    assert db.parent.is_dir()


def test_resumable_tpe_does_not_replay_startup_trials():
    optuna = pytest.importorskip("optuna")
    from lmforge.sweeps import resumable_tpe

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        return trial.suggest_float("x", 0.0, 1.0)

    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=7))
    plain.optimize(objective, n_trials=3)
    study = optuna.create_study(sampler=resumable_tpe(seed=7))
    study.optimize(objective, n_trials=3)
    assert [t.params for t in study.trials] == [t.params for t in plain.trials]  # a fresh study: plain TPE(seed)
    resumed = optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=resumable_tpe(seed=7))
    resumed.optimize(objective, n_trials=1)
    assert resumed.trials[3].params != resumed.trials[0].params


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def _plus(group: str) -> str:
    return "" if f"- {group}:" in (CONF / "train.yaml").read_text() else "+"


def test_lr_wd_search_composes(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    monkeypatch.setenv("LMFORGE_ROOT", str(CONF.parent))  # as train.py sets it
    cfg = _compose(f"{_plus('hparams_search')}hparams_search=lr_wd")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.study_name == "lr_wd"
    assert sweeper.direction == "minimize" and sweeper.n_trials == 20 and sweeper.sampler.seed == cfg.seed
    assert sweeper.storage.startswith("sqlite:///") and Path(sweeper.storage[len("sqlite:///"):]).is_absolute()
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay"}
    assert cfg.optimized_metric == "val/bpb" and cfg.callbacks.divergence_guard._target_ == "lmforge.sweeps.DivergenceGuard"


def test_launchers_compose():
    from hydra.errors import MissingConfigException

    plus = _plus("launcher")
    assert _compose(f"{plus}launcher=local").hydra.launcher._target_.endswith("BasicLauncher")
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        with pytest.raises(MissingConfigException, match="submitit_slurm"):
            _compose(f"{plus}launcher=slurm")
    else:
        launcher = _compose(f"{plus}launcher=slurm").hydra.launcher
        assert "SlurmLauncher" in launcher._target_ and launcher.gpus_per_node == 1
