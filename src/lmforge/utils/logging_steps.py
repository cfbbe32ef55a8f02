"""Which steps are logging steps: the one place a run that never waits for the GPU may read a tensor back.

Lightning turns the logged metrics into Python numbers every `trainer.log_every_n_steps` steps, which waits for
the GPU anyway; the throughput monitor, the skip checks, the divergence guard and the progress bar read theirs there.
"""

from __future__ import annotations

from typing import Any


def logging_step(trainer: Any, every: int | None = None) -> bool:
    """Whether the step just taken (`trainer.global_step` of them) ends a logging interval of `every` steps
    (default: `trainer.log_every_n_steps`)."""
    return trainer.global_step % max(1, every or trainer.log_every_n_steps) == 0
