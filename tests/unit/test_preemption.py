"""PreemptionCheckpoint with several ranks: signal handlers that were installed before it run where every rank agrees
to stop (they may hold collectives), Lightning's SIGTERM notifier never; with one rank they run in the handler."""

from __future__ import annotations

import builtins
import signal
import types
from types import SimpleNamespace

from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector

from lmforge.callbacks.preemption import PreemptionCheckpoint


class Strategy:
    """`reduce_boolean_decision` over pretend ranks: this one, and the others' flags given."""

    def __init__(self, others: list[bool]) -> None:
        self.others, self.calls = others, 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        self.calls += 1
        flags = [decision, *self.others]
        return builtins.all(flags) if all else any(flags)  # `all` is Lightning's argument name here


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
    trainer = SimpleNamespace(strategy=Strategy(others=[True]), _signal_connector=SimpleNamespace(received_sigterm=False))
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert called == [f"requeue {int(signal.SIGUSR1)}", f"user {int(signal.SIGTERM)}", "save"]
    assert trainer._signal_connector.received_sigterm  # every rank raises Lightning's SIGTERMException after this batch


def test_a_rank_signalled_alone_saves_with_the_others_but_runs_no_collective_handler() -> None:
    cb, called = callback_with_chain(ranks=2)
    cb._handle(signal.SIGUSR1, None)
    trainer = SimpleNamespace(strategy=Strategy(others=[False]), _signal_connector=SimpleNamespace(received_sigterm=False))
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert called == ["save"]  # the SLURM handler saves a checkpoint itself: only when every rank is in it
    quiet, quiet_called = callback_with_chain(ranks=2)  # another rank, not signalled: agrees to save all the same
    quiet_trainer = SimpleNamespace(strategy=Strategy(others=[True]), _signal_connector=SimpleNamespace(received_sigterm=False))
    quiet.on_train_batch_end(quiet_trainer, None, None, None, 0)
    assert quiet_called == ["save"] and quiet_trainer._signal_connector.received_sigterm
    idle, idle_called = callback_with_chain(ranks=2)  # no rank signalled: one all-reduce, nothing else
    idle_trainer = SimpleNamespace(strategy=Strategy(others=[False]), _signal_connector=SimpleNamespace(received_sigterm=False))
    idle.on_train_batch_end(idle_trainer, None, None, None, 0)
    assert idle_called == [] and idle_trainer.strategy.calls == 1


def test_one_rank_runs_the_chain_inside_the_handler_as_before() -> None:
    cb, called = callback_with_chain(ranks=1)
    cb._previous[signal.SIGTERM] = _HandlersCompose([lambda s, f: called.append("lightning")])
    cb._handle(signal.SIGTERM, None)
    assert called == ["lightning"]
