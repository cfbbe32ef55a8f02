"""Hyperparameter sweeps (`python train.py -m hparams_search=lr_wd`): the pieces that keep one bad trial from
costing the whole Optuna study.

- `DivergenceGuard` (a Lightning callback, in every run's callbacks): inside a Hydra multirun a NaN/Inf training
  loss stops the trial at once, and so does a loss spike (above `max_loss`, or `max_ratio` x the first logged
  loss, for `patience` checks in a row). A single run only warns: there the stage skips non-finite steps and
  ends the run past `stage.max_skipped_steps` with a clear error, which in a sweep would exit the whole sweep.
  A stopped run is marked with the metric `train/diverged` = 1.
- `trial_score`: what train.py returns to the sweeper: the optimised metric, or a large finite bad score for a
  diverged run or a missing/NaN metric. Optuna records NaN as a FAILed trial (TPE learns nothing from it) and
  inf does not fit every RDB storage under optuna<3, so the bad score is finite and the trial COMPLETEs.
- `EnsureSqliteDir` (a Hydra callback): creates the directory of a `sqlite:///...` study before the sweeper
  opens it (SQLite does not create parent directories).
- `resumable_tpe`: a seeded TPE sampler that does not replay its first random trials when a study resumes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from lmforge.utils.io import atomic_write_bytes
from lmforge.utils.logging_steps import logging_step

log = logging.getLogger(__name__)

DIVERGED_KEY = "train/diverged"
DEFAULT_BAD_SCORE = 1.0e4  # far above any bpb/loss, still finite: every Optuna storage accepts it


SWEEP_DIR_VARIABLE = "LMFORGE_SWEEP_DIR"  # read by conf/hydra/default.yaml's sweep.dir


_SWEEP_RECORD: list[tuple[Path, bytes]] = []  # the sweep's multirun.yaml as this process's Hydra wrote it


def share_sweep_dir() -> None:
    """Inside a sweep job, export its sweep dir to the processes this one starts. Under DDP/FSDP Lightning starts the
    other ranks by re-running the command line, `-m` and all: each re-runs the sweep in step with rank 0, but Hydra
    named a sweep dir of its own timestamp for each, so their logs (`train_ddp_process_<n>.log`) landed in a second
    multiruns/<ts>/ dir. Single runs need nothing: Lightning passes them `hydra.run.dir`. The other ranks' Hydra also
    rewrites the sweep's multirun.yaml (with Lightning's overrides for them): `restore_sweep_record` puts this one back."""
    import os

    if in_multirun() and SWEEP_DIR_VARIABLE not in os.environ:
        from hydra.core.hydra_config import HydraConfig

        sweep_dir = Path(str(HydraConfig.get().sweep.dir))
        os.environ[SWEEP_DIR_VARIABLE] = str(sweep_dir)
        record = sweep_dir / "multirun.yaml"
        if record.is_file():
            _SWEEP_RECORD[:] = [(record, record.read_bytes())]


def restore_sweep_record() -> None:
    """After a job of the process that exported the sweep dir: its multirun.yaml, if another rank's replaced it."""
    for record, content in _SWEEP_RECORD:
        if not record.is_file() or record.read_bytes() != content:
            atomic_write_bytes(record, content)


def in_multirun() -> bool:
    """True inside a Hydra sweep job (`-m`): there a stopped trial is cheaper than a wasted one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra context (tests, notebooks)
        return False


class DivergenceGuard(L.Callback):
    """Stops a run whose training loss diverged, so a sweep trial ends with a bad score instead of burning its
    budget or raising (`stage.max_skipped_steps`) and taking the whole sweep down.

    Checked on logging steps by default (`every_n_steps: null` = trainer.log_every_n_steps): reading the loss makes
    the host wait for the GPU, and there Lightning reads it anyway; between them non-finite steps are skipped by the
    stage (`stage.max_skipped_steps`). Non-finite loss: stop now if `stop_on_nan`. Finite spike: the loss above `max_loss` or `max_ratio` x the
    first checked loss for `patience` consecutive checks: stop if `stop_on_spike`. Both null (default): stop
    inside a Hydra multirun, only warn in a single run (a long run may recover; the stage bounds NaN steps).
    """

    def __init__(
        self,
        monitor: str = "train/loss",
        max_loss: float | None = None,
        max_ratio: float | None = 3.0,
        patience: int = 3,
        stop_on_spike: bool | None = None,
        stop_on_nan: bool | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        if patience < 1 or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError("DivergenceGuard: patience and every_n_steps must be >= 1")
        self.monitor, self.max_loss, self.max_ratio, self.patience = monitor, max_loss, max_ratio, patience
        self.stop_on_spike, self.stop_on_nan, self.every_n_steps = stop_on_spike, stop_on_nan, every_n_steps
        self.first_loss: float | None = None
        self.bad_checks = 0
        self.diverged = False
        self.reason = ""
        self._warned: set[str] = set()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sweep = in_multirun()
        self.stop_on_spike = sweep if self.stop_on_spike is None else self.stop_on_spike
        self.stop_on_nan = sweep if self.stop_on_nan is None else self.stop_on_nan

    def threshold(self) -> float:
        """The loss above which a check counts as a spike (inf: no spike rule configured yet)."""
        limits = [self.max_loss] if self.max_loss is not None else []
        if self.max_ratio is not None and self.first_loss is not None and self.first_loss > 0:
            limits.append(self.max_ratio * self.first_loss)
        return min(limits, default=math.inf)

    def check(self, loss: float) -> str:
        """Feed one loss; returns why the run must stop, or '' to go on."""
        if not math.isfinite(loss):
            return self._stop_or_warn(f"{self.monitor} is {loss}", bool(self.stop_on_nan), "stop_on_nan")
        if self.first_loss is None:
            self.first_loss = loss
        limit = self.threshold()
        self.bad_checks = self.bad_checks + 1 if loss > limit else 0
        if self.bad_checks < self.patience:
            return ""
        why = f"{self.monitor}={loss:.4g} above {limit:.4g} for {self.bad_checks} checks"
        return self._stop_or_warn(why, bool(self.stop_on_spike), "stop_on_spike")

    def _stop_or_warn(self, why: str, stop: bool, key: str) -> str:
        if stop:
            return why
        if key not in self._warned:
            log.warning("DivergenceGuard: %s (not stopping outside a sweep: set %s=true to stop)", why, key)
            self._warned.add(key)
        return ""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.diverged or not logging_step(trainer, self.every_n_steps):  # None: logging steps, where the loss is read anyway
            return
        value = trainer.callback_metrics.get(self.monitor)
        reason = self.check(float(value)) if value is not None else ""
        # every rank calls the collective; one diverged rank stops them all (no rank left waiting)
        if trainer.strategy.reduce_boolean_decision(bool(reason), all=False):
            self.stop(trainer, reason or "another rank diverged")

    def stop(self, trainer: L.Trainer, reason: str) -> None:
        self.diverged, self.reason = True, reason
        trainer.should_stop = True
        trainer.callback_metrics[DIVERGED_KEY] = torch.tensor(1.0)  # run.train returns callback_metrics
        for logger in trainer.loggers:
            logger.log_metrics({DIVERGED_KEY: 1.0}, step=trainer.global_step)
        from lmforge.callbacks.samples import SampleGeneration

        # sampling from NaN logits raises (torch.multinomial); the stop's validation must not crash the trial
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, SampleGeneration)]
        log.warning("DivergenceGuard: stopping at step %d: %s", trainer.global_step, reason)

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run keeps the baseline of its first step, not the (lower) loss it resumes at."""
        self.first_loss = state_dict.get("first_loss", self.first_loss)


def bad_score(cfg: Mapping[str, Any] | DictConfig) -> float:
    """`sweep_bad_score` (default 1e4), negated when the sweeper maximises."""
    score = abs(float(cfg.get("sweep_bad_score") or DEFAULT_BAD_SCORE))
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = HydraConfig.get().sweeper.get("direction", "minimize") if HydraConfig.initialized() else "minimize"
    except Exception:
        direction = "minimize"
    return -score if str(direction).lower().endswith("maximize") else score


def trial_score(metrics: Mapping[str, float] | None, cfg: Mapping[str, Any] | DictConfig) -> float:
    """The value a sweeper optimises: `metrics[cfg.optimized_metric]`, or `bad_score(cfg)` when the run
    diverged or the metric is missing or not finite (so the trial COMPLETEs and TPE learns it was bad)."""
    if not metrics or float(metrics.get(DIVERGED_KEY, 0.0)) > 0:
        return bad_score(cfg)
    value = metrics.get(cfg.get("optimized_metric") or "")
    if value is None or not math.isfinite(float(value)):
        return bad_score(cfg)
    return float(value)


class EnsureSqliteDir(HydraCallback):
    """Creates the parent directory of `hydra.sweeper.storage: sqlite:///<path>` before the study is opened."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = config.hydra.sweeper.get("storage") if "sweeper" in config.hydra else None
        path = sqlite_path(storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)


def sqlite_path(storage: Any) -> Path | None:
    """`sqlite:////abs/x.db` -> /abs/x.db, `sqlite:///rel.db` -> rel.db; None for other URLs."""
    prefix = "sqlite:///"
    if not isinstance(storage, str) or not storage.startswith(prefix) or storage == prefix + ":memory:":
        return None
    return Path(storage[len(prefix):])


@cache
def _resumable_tpe_class() -> type:
    from optuna.samplers import TPESampler

    class ResumableTPESampler(TPESampler):
        """TPE seeded with `seed + n` where n = trials already in the study when this process first samples:
        a fresh study is exactly TPESampler(seed), a resumed one does not replay the first run's random
        start-up trials (a fixed seed would suggest the same points again)."""

        def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
            super().__init__(seed=seed, **kwargs)
            self._lmforge_init = (seed, kwargs)
            self._lmforge_seeded = False

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            if not self._lmforge_seeded:
                seed, kwargs = self._lmforge_init
                if seed is not None and trial.number > 0:  # re-init: the RNG layout differs across optuna versions
                    TPESampler.__init__(self, seed=seed + trial.number, **kwargs)
                self._lmforge_seeded = True
            return super().infer_relative_search_space(study, trial)

    return ResumableTPESampler


def resumable_tpe(seed: int | None = None, **kwargs: Any) -> Any:
    """Hydra target for `hydra.sweeper.sampler` (optuna is imported only when a sweep builds its sampler)."""
    return _resumable_tpe_class()(seed=seed, **kwargs)
