"""Save `last.ckpt` and stop when the job is told to go (SIGTERM from a scheduler / `kill`, SIGUSR1 from SLURM's
`--signal=USR1@90`), so a preempted run resumes with `ckpt_path=last` losing at most the step in flight.

Why not Lightning alone: outside SLURM it only raises SIGTERMException after the batch, saving nothing, and
SIGUSR1's default action kills the process. The handler itself only records the signal (saving from inside a
signal handler could interrupt a write in progress); the save happens at the next `on_train_batch_end`, the point
where ModelCheckpoint saves too, so the file resumes mid-epoch exactly.

Several ranks (ddp, fsdp): the save is a collective, so every rank must decide to save at the same step. At the
end of each batch (on GPUs: of each logging step, `trainer.log_every_n_steps`, where the host waits for the GPU
anyway; the check reads a device flag back) the ranks agree whether any of them was signalled (one all-reduce),
then all save and all stop there. The handlers installed before this one run there too, not inside the signal handler: Lightning
2.6's SIGTERM handler runs a broadcast, and its SLURM SIGUSR1 handler saves a checkpoint (also collectives), each
meeting whatever collective the other ranks are in at that moment; a 2-rank FSDP run signalled on rank 0 hung in
that broadcast, rank 1 waiting in an all-gather. They run once every rank was signalled (SLURM signals all tasks),
SIGTERM's notifier never (the agreement replaces it). The agreement also replaces Lightning's broadcast of rank 0's
SIGTERM flag at the start of every training batch (`_broadcast_sigterm_tensor`), which reads the flag back to the
host: a collective and a wait for the GPU in every step of every multi-rank run. It is switched off while this
callback runs (not measured on GPUs).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmforge.utils.logging_steps import logging_step

log = logging.getLogger("lmforge")

SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM / SIGUSR1: save `<dirpath>/last.ckpt` (atomically, through the trainer's CheckpointIO) at the end
    of the current batch and stop. Exit status: Lightning then raises SIGTERMException (a SystemExit with code 0)."""

    def __init__(self, dirpath: str | None = None, signals: tuple[str, ...] | list[str] = SIGNALS) -> None:
        self.dirpath = dirpath
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]  # no SIGUSR1 on Windows
        self.received: int | None = None
        self.saved_path: Path | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, Any] = {}
        self._ranks = 1
        self._deferred: list[tuple[Any, int]] = []  # several ranks: earlier handlers, run where the ranks agree

    # --- signal handling -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Installed here, after Lightning registered its own handlers, so they are chained rather than replaced."""
        self.received = None
        self._ranks = trainer.world_size
        self._deferred.clear()
        loop = trainer.fit_loop.epoch_loop
        if self._ranks > 1 and hasattr(type(loop), "_broadcast_sigterm_tensor"):  # see the module doc
            loop._broadcast_sigterm_tensor = lambda: None
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        previous = self._previous.get(signum)  # Lightning's SIGTERM notifier; SLURM's requeue handler for SIGUSR1
        if not callable(previous) and signum != signal.SIGTERM:  # a bare SIGUSR1: stop the same way as for SIGTERM
            previous, signum = self._previous.get(signal.SIGTERM), signal.SIGTERM
        if not callable(previous):
            return
        if self._ranks > 1:
            self._deferred.append((previous, signum))  # they may hold collectives: run where every rank is
        else:
            previous(signum, frame)

    def _chain(self, handler: Any, signum: int, frame: FrameType | None) -> None:
        """Call a handler that was installed before (several ranks only: one rank calls it in `_handle`), without
        Lightning's SIGTERM notifier (its broadcast would meet no other rank's: the agreement replaces it)."""
        if isinstance(handler, _HandlersCompose):
            for each in handler.signal_handlers:
                each = signal.getsignal(each) if isinstance(each, int) else each  # as _HandlersCompose reads them
                if getattr(each, "__func__", None) is not _SignalConnector._sigterm_notifier_fn:
                    self._chain(each, signum, frame)
        elif callable(handler):
            handler(signum, frame)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A signal during validation: Lightning stops there, before the next `on_train_batch_end`; save now."""
        self._restore()
        if isinstance(exception, SIGTERMException) and (self.received is not None or trainer.received_sigterm):
            self._save_and_stop(trainer)

    # --- saving --------------------------------------------------------------------------------------------
    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """`dirpath`, else the ModelCheckpoint's directory (so `ckpt_path=last` finds it), else the root dir."""
        cb = trainer.checkpoint_callback
        dirpath = self.dirpath or (cb.dirpath if cb is not None and cb.dirpath else None)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._ranks == 1:
            if self.received is not None or trainer.received_sigterm:
                self._save_and_stop(trainer)  # Lightning raises SIGTERMException after this batch: its handler set the flag
            return
        if trainer.fit_loop._should_accumulate():  # mid-accumulation: the step's summed gradients are in no checkpoint, and
            return  # the resume would skip their micro-batches (one rank: Lightning's own flag stops it after any batch)
        if trainer.strategy.root_device.type == "cuda" and not logging_step(trainer):
            return  # the agreement reads a device flag back: on GPUs only where the host waits for the GPU anyway
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):  # any rank signalled: all agree here
            if trainer.strategy.reduce_boolean_decision(self.received is not None, all=True):  # every rank: run what was deferred
                for handler, signum in self._deferred:
                    self._chain(handler, signum, None)
            self._deferred.clear()
            self._save_and_stop(trainer)
            trainer._signal_connector.received_sigterm = True  # on every rank at once: Lightning raises SIGTERMException after this batch

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step:  # saved at this batch's end; Lightning's exit follows
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # collective: every rank calls it, rank 0 writes
        finish = getattr(trainer.strategy, "finish_checkpoint", None)
        if finish is not None:  # strategy.async_save: the job may be killed soon, so the save lands before we go on
            finish()
        self.saved_path, self.saved_step = path, trainer.global_step
        name = signal.Signals(self.received).name if self.received is not None else "SIGTERM"
        if trainer.is_global_zero:  # every rank saved; one line says so
            log.warning("%s received: saved %s at step %d; stopping. Resume with ckpt_path=last", name, path, trainer.global_step)
        trainer.should_stop = True
