"""Evaluation tasks beyond val loss: multiple-choice log-likelihood, BLEU and the lm-eval harness.

`eval.py task=...` reaches `run_task` through `run.evaluate`; `task=lm` (loss / ppl / bpb, plus
val/mlm_accuracy for MLM checkpoints) stays a Lightning validate over a data config in run.py. Every task
prints its metrics, logs them and writes them as JSON next to the checkpoint (`eval_<task>.json`) and in
the eval run dir, so results travel with the weights they describe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmforge.errors import ConfigError, DataError
from lmforge.utils.io import atomic_write_text

log = logging.getLogger("lmforge")

TASKS = ("lm", "mc", "bleu", "lm_eval")


def check_task(task: object) -> str:
    if task not in TASKS:
        raise ConfigError("task", f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    return str(task)


def input_file(path: object, key: str, what: str) -> Path:
    """The file a task reads, or a ConfigError naming the key when it is unset or missing."""
    if path in (None, ""):
        raise ConfigError(key, "is required for this task", f"pass {key}=<{what}>")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(key, f"{str(file)!r} is not a file", f"pass {key}=<{what}>")
    return file


def read_jsonl(
    path: Path, required: Mapping[str, type | tuple[type, ...]]
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line; a bad line is a DataError naming file:line and why."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({err.msg}). Fix: one JSON object per line"
                ) from err
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}. "
                    "Fix: one object per line"
                )
            for key, kind in required.items():
                if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool) and kind is int:
                    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                    raise DataError(
                        f"{path}:{lineno}: field {key!r} must be a {names}, got {record.get(key)!r}. "
                        f"Fix: give every line the fields {', '.join(required)}"
                    )
            rows.append((lineno, record))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty). Fix: one JSON object per line")
    return rows


def results_files(model_name: str, output_dir: str | Path, task: str) -> list[Path]:
    """`eval_<task>.json` next to the checkpoint (in an HF dir: inside it) and in the eval run dir."""
    source = Path(model_name)
    beside = (source if source.is_dir() else source.parent) / f"eval_{task}.json"
    return list(dict.fromkeys([beside, Path(output_dir) / f"eval_{task}.json"]))


def write_results(results: Mapping[str, Any], files: list[Path]) -> list[Path]:
    """Atomic writes; a read-only checkpoint dir is a warning, not a lost evaluation."""
    written = []
    for file in files:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(file, json.dumps(results, indent=2))
            written.append(file)
        except OSError as err:
            log.warning("could not write %s: %s", file, err)
    return written


def report(
    task: str,
    model_name: str,
    metrics: Mapping[str, Any],
    output_dir: str | Path,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Print, log and write one task's results (the shared tail of every task)."""
    head = {"task": task, "ckpt_path": model_name, **(extra or {})}
    shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}
    print(json.dumps({**head, **shown}, indent=2))
    log.info("eval %s on %s: %s", task, model_name, " ".join(f"{k}={v}" for k, v in shown.items()))  # stdout: one JSON only
    for file in write_results({**head, **dict(metrics)}, results_files(model_name, output_dir, task)):
        log.info("wrote %s", file)


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """task=mc | bleu | lm_eval on a checkpoint (`ckpt_path`) or an HF directory (`hf_dir`)."""
    from lmforge.generation.loading import load_model

    task = check_task(cfg.get("task", "lm"))
    ckpt_path = None if OmegaConf.is_missing(cfg, "ckpt_path") else cfg.get("ckpt_path")
    loaded = load_model(
        ckpt_path,
        cfg.get("hf_dir"),
        device=cfg.get("device", "auto"),
        dtype=cfg.get("dtype", "fp32"),
        quantize=cfg.get("quantize"),
        log_dir=cfg.paths.log_dir,
        task_name=cfg.get("train_task_name", "train"),
    )
    batch_size = int(cfg.get("batch_size") or 8)
    extra: dict[str, Any] = {}
    if task == "mc":
        from lmforge.evaluation.multiple_choice import evaluate_mc, load_mc_examples

        examples = load_mc_examples(
            input_file(cfg.get("tasks_file"), "tasks_file", "jsonl of {context, choices, label}")
        )
        metrics: dict[str, Any] = evaluate_mc(
            loaded.model,
            loaded.tokenizer,
            examples,
            num_fewshot=int(cfg.get("num_fewshot") or 0),
            seed=int(cfg.get("seed") or 0),
            batch_size=batch_size,
            limit=cfg.get("limit"),
        ).metrics
        extra = {"tasks_file": str(cfg.tasks_file), "num_fewshot": int(cfg.get("num_fewshot") or 0)}
    elif task == "bleu":
        from lmforge.evaluation.bleu import evaluate_bleu, load_pairs

        pairs = load_pairs(
            input_file(
                cfg.get("pairs_file"), "pairs_file", "tsv (source<TAB>target) or jsonl of {source, target}"
            )
        )
        metrics = evaluate_bleu(
            loaded.model,
            loaded.tokenizer,
            pairs,
            max_new_tokens=int(cfg.get("max_new_tokens") or 128),
            batch_size=batch_size,
            limit=cfg.get("limit"),
        )
        extra = {"pairs_file": str(cfg.pairs_file)}
    else:
        from lmforge.evaluation.lm_eval_adapter import run_lm_eval

        opts = OmegaConf.to_container(cfg.get("lm_eval") or {}, resolve=True)
        metrics = run_lm_eval(
            loaded.model, loaded.tokenizer, batch_size=batch_size, seed=cfg.get("seed"), **opts
        )
    report(task, loaded.name, metrics, cfg.paths.output_dir, extra)
    return metrics
