"""Shared wrapper for the Hydra entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


def run_entry(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    try:
        return fn(cfg)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
