"""Shared fixtures: repo paths, a session-wide data cache, and a helper to run the CLI entry points."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Under pytest-xdist (`make test` runs a worker per core), each worker gets its share of the cores: torch's default of one thread
# per core in every worker oversubscribes them, and OpenMP threads spin-waiting for a core the other worker holds cost
# more than they compute. Set before torch is imported; subprocesses (train.py runs) inherit it.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // WORKERS))


def free_port() -> int:
    """A localhost TCP port nobody listens on, for a spawned process group's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The modules that take longest, run first: `make test` runs pytest-xdist workers that each take a whole file
# (`--dist loadfile`), and the longest jobs started first let the workers end together (longest-processing-time
# scheduling) instead of one worker starting test_fsdp's ten 2-process runs when the rest is done. Seconds per module
# on a 2-core Zen 4 with 2 workers: 448, 176, 92, 95; the other 85 modules ~400 together.
LONGEST_FIRST = (
    "tests/integration/test_fsdp.py",
    "tests/integration/test_init_from.py",
    "tests/integration/test_train_e2e.py",
    "tests/unit/test_parallel.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the longest modules to the front (a stable sort: the other modules, and the tests within each, keep their
    order). Every xdist worker collects the same order, as xdist requires."""
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]  # relative to the rootdir, as LONGEST_FIRST
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


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


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module, to call its functions in-process (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cli():
    return run_cli


def train_in_process(overrides: list[str], output_dir: Path) -> dict[str, float]:
    """`python train.py overrides...` without a subprocess (saves ~5 s of imports per run): compose the same
    config, point the run dir at `output_dir`, and run preflight + train as train.py does."""
    from hydra import compose, initialize_config_dir

    from lmforge.preflight import preflight
    from lmforge.run import train

    os.environ.setdefault("LMFORGE_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
    preflight(cfg)
    return train(cfg)


def clm_step_with_kernels(cfg: dict, kernels: str, bf16: bool = False, context=None) -> tuple[float, dict]:
    """Loss and gradients of one causal-LM training step of a fresh model (seed 0) built from `cfg` with
    `cpu_kernels=kernels`, on a fixed random batch, under bf16 autocast if asked and inside `context` (a
    dispatch-mode counter, say). Restores the previous `cpu_kernels`."""
    import contextlib

    import torch

    from lmforge.kernels import cpu_kernels
    from lmforge.models import build
    from lmforge.objectives.clm import CausalLM

    x = torch.randint(0, cfg["vocab_size"], (4, cfg["max_seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    before = cpu_kernels.cpu_kernels()
    cpu_kernels.set_cpu_kernels(kernels)
    try:
        torch.manual_seed(0)
        model = build(cfg)
        with context or contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = CausalLM()(model, batch).loss
            loss.backward()
    finally:
        cpu_kernels.set_cpu_kernels(before)
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


class CountedLoss:
    """A loss value that counts how often the host reads it (`float()`): checks that a callback reads train/loss
    on logging steps only, where a GPU run's read is a wait for the device."""

    reads = 0

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        type(self).reads += 1
        return self.value
