"""PreemptionCheckpoint with several ranks: signal handlers that were installed before it run where every rank agrees
to stop (they may hold collectives), Lightning's SIGTERM notifier never; with one rank they run in the handler."""

from __future__ import annotations

import builtins
import signal
import types
from types import SimpleNamespace

import torch
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector

from lmforge.callbacks.preemption import PreemptionCheckpoint


class Strategy:
    """`reduce_boolean_decision` over pretend ranks: this one, and the others' flags given."""

    def __init__(self, others: list[bool], device: str = "cpu") -> None:
        self.others, self.calls, self.root_device = others, 0, torch.device(device)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        self.calls += 1
        flags = [decision, *self.others]
        return builtins.all(flags) if all else any(flags)  # `all` is Lightning's argument name here


def fake_trainer(others: list[bool], device: str = "cpu") -> SimpleNamespace:
    """At step 3 of a run logging every 10 steps."""
    return SimpleNamespace(strategy=Strategy(others, device), _signal_connector=SimpleNamespace(received_sigterm=False),
                           global_step=3, log_every_n_steps=10, fit_loop=SimpleNamespace(_should_accumulate=lambda: False))


def callback_with_chain(ranks: int) -> tuple[PreemptionCheckpoint, list[str]]:
    called: list[str] = []
    notifier = types.MethodType(_SignalConnector._sigterm_notifier_fn, SimpleNamespace())  # would broadcast: must not run
    cb = PreemptionCheckpoint()
    cb._ranks = ranks
    cb._previous = {signal.SIGTERM: _HandlersCompose([notifier, lambda s, f: called.append(f"user {s}")]),
                    signal.SIGUSR1: _HandlersCompose([lambda s, f: called.append(f"requeue {s}")])}
    cb._save_and_stop = lambda trainer: called.append("save")  # type: ignore[method-assign]
    return cb, called


def test_several_ranks_run_earlier_handlers_where_all_agree_and_never_lightnings_notifier() -> None:
    cb, called = callback_with_chain(ranks=2)
    cb._handle(signal.SIGUSR1, None)
    cb._handle(signal.SIGTERM, None)
    assert called == []  # nothing inside the signal handler
    trainer = fake_trainer(others=[True])
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert called == [f"requeue {int(signal.SIGUSR1)}", f"user {int(signal.SIGTERM)}", "save"]
    assert trainer._signal_connector.received_sigterm  # every rank raises Lightning's SIGTERMException after this batch


def test_a_rank_signalled_alone_saves_with_the_others_but_runs_no_collective_handler() -> None:
    cb, called = callback_with_chain(ranks=2)
    cb._handle(signal.SIGUSR1, None)
    trainer = fake_trainer(others=[False])
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert called == ["save"]  # the SLURM handler saves a checkpoint itself: only when every rank is in it
    quiet, quiet_called = callback_with_chain(ranks=2)  # another rank, not signalled: agrees to save all the same
    quiet_trainer = fake_trainer(others=[True])
    quiet.on_train_batch_end(quiet_trainer, None, None, None, 0)
    assert quiet_called == ["save"] and quiet_trainer._signal_connector.received_sigterm
    idle, idle_called = callback_with_chain(ranks=2)  # no rank signalled: one all-reduce, nothing else
    idle_trainer = fake_trainer(others=[False])
    idle.on_train_batch_end(idle_trainer, None, None, None, 0)
    assert idle_called == [] and idle_trainer.strategy.calls == 1


def test_one_rank_runs_the_chain_inside_the_handler_as_before() -> None:
    cb, called = callback_with_chain(ranks=1)
    cb._previous[signal.SIGTERM] = _HandlersCompose([lambda s, f: called.append("lightning")])
    cb._handle(signal.SIGTERM, None)
    assert called == ["lightning"]


def test_on_gpus_the_ranks_agree_on_logging_steps_only() -> None:
    """The agreement reads a device flag back, a wait for the GPU: on CUDA only where logging waits for it anyway."""
    cb, called = callback_with_chain(ranks=2)
    cb._handle(signal.SIGTERM, None)
    trainer = fake_trainer(others=[True], device="cuda")
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert called == [] and trainer.strategy.calls == 0  # step 3: not a logging step
    trainer.global_step = 10
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert called == [f"user {int(signal.SIGTERM)}", "save"]


def test_lightnings_per_step_sigterm_broadcast_is_off_with_several_ranks_only() -> None:
    """Lightning broadcasts rank 0's SIGTERM flag and reads it back before every batch; the agreement replaces it."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor")  # when an upgrade renames it, revisit on_train_start
    for ranks, replaced in ((1, False), (2, True)):
        loop = _TrainingEpochLoop.__new__(_TrainingEpochLoop)
        trainer = SimpleNamespace(world_size=ranks, fit_loop=SimpleNamespace(epoch_loop=loop))
        cb = PreemptionCheckpoint(signals=[])
        cb.on_train_start(trainer, None)
        assert ("_broadcast_sigterm_tensor" in vars(loop)) is replaced


def test_several_ranks_save_after_the_last_micro_batch_of_an_accumulated_step() -> None:
    """Saved mid-accumulation, a checkpoint would hold none of the step's summed gradients and the resume would skip
    their micro-batches: with several ranks the agreement waits for the step's last micro-batch."""
    cb, called = callback_with_chain(ranks=2)
    cb._handle(signal.SIGTERM, None)
    trainer = fake_trainer(others=[True])
    trainer.fit_loop._should_accumulate = lambda: True
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert called == [] and trainer.strategy.calls == 0
    trainer.fit_loop._should_accumulate = lambda: False
    cb.on_train_batch_end(trainer, None, None, None, 1)
    assert called == [f"user {int(signal.SIGTERM)}", "save"]
