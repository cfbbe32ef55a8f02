"""Shared fixtures: repo paths, a session-wide data cache, and a helper to run the CLI entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer/memmap cache for the whole session: the Shakespeare tokenizer trains once."""
    return tmp_path_factory.mktemp("lmforge_cache")


def run_cli(script: str, *overrides: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> overrides...` from the repo root, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update({"PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"})
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def cli():
    return run_cli
