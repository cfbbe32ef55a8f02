"""Shared wrapper for the Hydra entry points: user errors become one clear line and exit code 2; any other
exception leaves `<run dir>/crash.txt` (traceback, time, step) before it propagates."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from lmforge.errors import LmforgeError


def user_error(err: BaseException) -> LmforgeError | None:
    """The LmforgeError behind `err`, if any: Hydra's instantiate wraps constructor errors in its own."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LmforgeError):
            return err
        seen.add(id(err))
        err = err.__cause__  # `raise ... from e`, as Hydra's instantiate does
    return None


def run_entry(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    try:
        return fn(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            from lmforge.tracking import record_crash

            record_crash(cfg, err)
            raise
        print(f"error: {cause}", file=sys.stderr, flush=True)
        sys.exit(2)
