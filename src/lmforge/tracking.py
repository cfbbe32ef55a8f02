"""Make every run findable and reproducible: what ran (code, command, machine, data) and what went wrong.

run_metadata(...)      → git commit / dirty flag / diff, command line, host, versions, parameter counts and
                         tokenizer + data fingerprints; written to `<run dir>/run_meta.json` (+ `git.diff`
                         when the tree is dirty) and logged as `meta/<key>` hyperparameters
log_hyperparams(...)   → the resolved config, nested for W&B (its UI shows `model.n_layer`) and flattened
                         with dotted keys for CSV / TensorBoard, plus the `meta/` keys
guard_logger(lg)       → a logger whose failures mid-run (W&B service gone, disk full) are warned about once and
                         counted instead of ending training
write_crash(...)       → `<run dir>/crash.txt` with the traceback, time and step of a crashed run
get_logger(name)       → a logger whose debug/info/warning are emitted on global rank 0 only (errors on
                         every rank), so N data-parallel processes don't print every line N times
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.models.counting import build_on_meta, param_counts
from lmforge.utils.runs import flatten

log = logging.getLogger("lmforge")

GIT_TIMEOUT_S = 10


# --- rank-aware logging ---------------------------------------------------------------------------------

def global_rank() -> int:
    """Lightning's rank once a strategy set it, else the launcher's env (torchrun / SLURM), else 0."""
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        rank = getattr(rank_zero_only, "rank", None)
        if rank is not None:
            return int(rank)
    except ImportError:  # pragma: no cover - lightning is a dependency
        pass
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class RankZeroLogger(logging.LoggerAdapter):
    """Below ERROR, only rank 0 speaks; errors and criticals come from whichever rank has them."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR or global_rank() == 0:
            super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs


def get_logger(name: str = "lmforge") -> RankZeroLogger:
    """`get_logger(__name__).info(...)`: printed once per job, not once per process."""
    return RankZeroLogger(logging.getLogger(name), {})


# --- pieces of the metadata -----------------------------------------------------------------------------

def _git(repo: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):  # no git binary, repo dir missing, hung command
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_info(repo: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Commit, branch and dirty flag (tracked files only) of `repo`; a dirty tree's `git diff HEAD` goes to
    `<out_dir>/git.diff` so the exact code can be rebuilt with `git checkout <commit> && git apply git.diff`.
    Outside a repo, or without git, every field is None."""
    repo = Path(repo)
    info: dict[str, Any] = {"git_commit": None, "git_branch": None, "git_dirty": None, "git_diff_file": None, "git_diff_sha256": None}
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return info
    info["git_commit"] = commit.strip()
    info["git_branch"] = (_git(repo, "rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = bool(status and status.strip())
    if info["git_dirty"]:
        diff = _git(repo, "diff", "HEAD") or ""
        info["git_diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()[:16]
        if out_dir is not None and global_rank() == 0:
            path = Path(out_dir) / "git.diff"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(diff, encoding="utf-8")
            info["git_diff_file"] = str(path)
    return info


def config_param_counts(cfg: Any) -> dict[str, int | None]:
    """Counts before the model exists (it is built in `configure_model`): the model built on the meta device,
    which allocates nothing. PEFT changes what trains: then `params_trainable` is None here, and the stage logs
    `model/trainable_params` at fit start."""
    counts: dict[str, int | None] = dict(param_counts(build_on_meta(cfg.model)))
    if cfg.get("peft") is not None and cfg.peft.get("method", "none") != "none":
        counts["params_trainable"] = None
    return counts


def data_fingerprint(datamodule: Any) -> str | None:
    """The datamodule's source hash without reading data: its corpus fingerprint (what the token cache is keyed
    by), or the manifest source of a prepared `tokens_dir`. None for datamodules that have neither."""
    tokens_dir = getattr(datamodule, "tokens_dir", None)
    if tokens_dir:
        try:
            from lmforge.data.shards import read_manifest

            manifest = read_manifest(Path(tokens_dir) / "train")
            if manifest is not None and manifest.get("source"):
                return str(manifest["source"])
        except Exception as err:  # a broken tokens_dir is reported by the datamodule itself, with the fix
            log.debug("no data fingerprint from %s: %s", tokens_dir, err)
    corpus = getattr(datamodule, "corpus", None)
    if corpus is not None and hasattr(corpus, "fingerprint"):
        try:
            return str(corpus.fingerprint())
        except Exception as err:
            log.debug("no corpus fingerprint: %s", err)
    return None


def _versions() -> dict[str, Any]:
    import lightning
    import torch

    out: dict[str, Any] = {"python_version": platform.python_version(), "torch_version": str(torch.__version__),
                           "lightning_version": lightning.__version__, "cuda_version": torch.version.cuda}
    try:
        from importlib.metadata import version

        out["lmforge_version"] = version("lmforge")
    except Exception:
        out["lmforge_version"] = None
    return out


def _select(cfg: Any, key: str) -> Any:
    """A config value, or None when missing or not resolvable here (e.g. `${hydra:...}` outside Hydra)."""
    try:
        from omegaconf import OmegaConf

        return OmegaConf.select(cfg, key)
    except Exception:
        return None


def run_metadata(cfg: Any, tokenizer: Any, datamodule: Any, model: Any = None) -> dict[str, Any]:
    """Everything needed to find a run again and rerun it; flat (one level) so every logger shows it as is.
    Written to `<run dir>/run_meta.json` on rank 0. `model`: count its parameters instead of building the
    config's model on the meta device."""
    out_dir = _select(cfg, "paths.output_dir")
    repo = _select(cfg, "paths.root_dir") or os.getcwd()
    meta: dict[str, Any] = {
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "run_dir": str(out_dir) if out_dir else None,
        **git_info(repo, out_dir),
        **_versions(),
    }
    try:
        meta.update(param_counts(model) if model is not None else config_param_counts(cfg))
    except Exception as err:  # a metadata gap must never stop a run
        log.warning("run metadata: parameter counts unavailable (%s)", err)
    meta["tokenizer_fingerprint"] = tokenizer.fingerprint() if tokenizer is not None and hasattr(tokenizer, "fingerprint") else None
    meta["data_fingerprint"] = data_fingerprint(datamodule)
    if out_dir and global_rank() == 0:
        from lmforge.utils.io import atomic_write_text

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out_dir) / "run_meta.json", json.dumps(meta, indent=2, default=str))
    return meta


# --- hyperparameters ------------------------------------------------------------------------------------

def meta_hyperparams(meta: Mapping[str, Any]) -> dict[str, Any]:
    """`meta/<key>` entries; the argv list is left out (`meta/command` holds it as one string)."""
    return {f"meta/{k}": v for k, v in meta.items() if k != "argv"}


def hyperparams_for(logger: Any, config: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """W&B nests the config itself (and filters on `model.n_layer`); file loggers get dotted keys, which read
    well in hparams.yaml and in TensorBoard's HPARAMS tab."""
    tree = dict(config) if type(logger).__name__ == "WandbLogger" else flatten(config)
    return {**tree, **meta_hyperparams(meta)}


def log_hyperparams(loggers: list[Any], config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    for lg in loggers:
        lg.log_hyperparams(hyperparams_for(lg, config, meta))


# --- W&B --------------------------------------------------------------------------------------------------

def sweep_group(cfg: Any) -> str | None:
    """`<task_name>-<sweep dir name>` inside a Hydra multirun job (all jobs of a sweep share it), else None.
    Read from HydraConfig because `${hydra:sweep.dir}` does not resolve in a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        name = Path(str(hc.sweep.dir)).name
    except Exception:  # not under Hydra (tests, notebooks) or an unresolvable sweep dir
        return None
    task = _select(cfg, "task_name")
    return f"{task}-{name}" if task else name


def wandb_overrides(cfg: Any, node: Mapping[str, Any], offline: bool) -> dict[str, Any]:
    """Arguments build_loggers adds to the WandbLogger node: offline mode, the sweep group when none is set,
    and no artifact upload offline (Lightning refuses log_model with offline=True)."""
    out: dict[str, Any] = {"offline": offline}
    if node.get("group") is None:
        group = sweep_group(cfg)
        if group is not None:
            out["group"] = group
    if offline and node.get("log_model"):
        get_logger().warning("W&B is offline: logger.wandb.log_model=%s ignored (checkpoints stay on disk)", node.get("log_model"))
        out["log_model"] = False
    return out


# --- loggers that fail mid-run -------------------------------------------------------------------------

# What Lightning and lmforge call on a logger during a run. Any of them may raise when W&B's service process
# died, a disk filled up, an NFS mount hung: the call is dropped, training and the other loggers go on.
GUARDED_METHODS = ("log_metrics", "log_hyperparams", "log_table", "log_text", "log_image", "log_audio", "log_video",
                   "log_graph", "after_save_checkpoint", "save", "finalize")
_GUARDED_CLASSES: dict[type, type] = {}


def guard_logger(logger: Any) -> Any:
    """Make `logger` survive its own failures, in place: an exception from one of GUARDED_METHODS is caught,
    warned about once (with the exception), counted in `logger.lmforge_failures`, and the call returns None.
    The object stays the same one, of a subclass that keeps the class name: `isinstance(lg, WandbLogger)`,
    `lg.experiment`, `.save_dir`, `.version`, `.log_dir` and every other attribute work as before."""
    cls = type(logger)
    if getattr(cls, "_lmforge_guarded", False):
        return logger
    if cls not in _GUARDED_CLASSES:
        namespace: dict[str, Any] = {"_lmforge_guarded": True, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                     "__doc__": cls.__doc__, "__reduce_ex__": _reduce_guarded}
        for name in GUARDED_METHODS:
            if callable(getattr(cls, name, None)):
                namespace[name] = _guarded_method(cls, name)
        _GUARDED_CLASSES[cls] = type(cls)(cls.__name__, (cls,), namespace)
    logger.__class__ = _GUARDED_CLASSES[cls]
    return logger


def _guarded_method(cls: type, name: str) -> Any:
    import functools

    @functools.wraps(getattr(cls, name))
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = getattr(cls, name)(self, *args, **kwargs)  # looked up per call: patches of the class apply
        except Exception as err:  # not BaseException: Ctrl-C and SystemExit still stop the run
            _logger_failed(self, name, err)
            return None
        if name == "finalize" and getattr(self, "lmforge_failures", 0):
            log.warning("logger %s: %d call(s) failed during this run (first: %s); the run and the other loggers "
                        "were not affected", type(self).__name__, self.lmforge_failures, self.lmforge_first_failure)
        return result

    return method


def _logger_failed(logger: Any, method: str, err: Exception) -> None:
    first = not getattr(logger, "lmforge_failures", 0)
    logger.lmforge_failures = getattr(logger, "lmforge_failures", 0) + 1
    if first:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        logger.lmforge_first_failure = f"{method}: {type(err).__name__}: {reason}"
        log.warning("logger %s: %s raised %s: %s. Training goes on and the other loggers (CSV) keep every metric; "
                    "further failures of this logger are only counted", type(logger).__name__, method,
                    type(err).__name__, reason)


def _reduce_guarded(self: Any, protocol: int) -> tuple[Any, ...]:
    """Pickle / deepcopy as the plain logger class (importable by name), guarded again on load."""
    base = type(self).__mro__[1]
    return (_rebuild_guarded, (base, self.__getstate__()))


def _rebuild_guarded(base: type, state: Any) -> Any:
    obj = base.__new__(base)
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    elif isinstance(state, tuple):
        obj.__dict__.update(state[0] or {})
        for key, value in (state[1] or {}).items():
            setattr(obj, key, value)
    elif state:
        obj.__dict__.update(state)
    return guard_logger(obj)


# --- crashes --------------------------------------------------------------------------------------------

def step_from_traceback(tb: Any) -> int | None:
    """Best effort: the `global_step` of a `trainer` local in one of the crashed frames (run.train has one)."""
    for frame, _ in traceback.walk_tb(tb):
        trainer = frame.f_locals.get("trainer")
        step = getattr(trainer, "global_step", None)
        if isinstance(step, int):
            return step
    return None


def write_crash(output_dir: str | Path, err: BaseException, step: int | None = None) -> Path:
    """`crash.txt` (`crash_rank<r>.txt` off rank 0) with time, step and the full traceback."""
    rank = global_rank()
    path = Path(output_dir) / ("crash.txt" if rank == 0 else f"crash_rank{rank}.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    if step is None:
        step = step_from_traceback(err.__traceback__)
    head = [f"time_utc: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
            f"step: {step if step is not None else 'unknown'}", f"rank: {rank}", f"host: {socket.gethostname()}",
            f"command: {shlex.join(sys.argv)}", ""]
    body = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path.write_text("\n".join(head) + body, encoding="utf-8")
    return path


def record_crash(cfg: Any, err: BaseException) -> Path | None:
    """write_crash into the config's run dir if it can be resolved; never raises (the real error must win)."""
    try:
        out_dir = _select(cfg, "paths.output_dir")
        if not out_dir:
            return None
        path = write_crash(out_dir, err)
        logging.getLogger("lmforge").error("crash report: %s", path)
        return path
    except Exception as inner:
        logging.getLogger("lmforge").warning("could not write the crash report: %s", inner)
        return None
