"""`python scripts/benchmark.py matrix`: tokens/s, MFU and memory of real `train.py` runs over a grid of
model x strategy x precision x attention backend x compile x activation checkpointing.

Each cell is a short `train.py` run (the code users run: Lightning, the strategy, the stage, the data loader),
with validation, checkpoints and samples off. Its `perf/*` windows (callbacks.throughput) are read back from
the run's metrics.csv; the first window (compilation, warm-up) is dropped and the median of the rest is kept.
A cell that fails is recorded with its last error line instead of stopping the grid. Writes matrix.json and
matrix.md (the README's performance table is pasted from it) under --out.

    python scripts/benchmark.py matrix --models gpt-nano llama-tiny --strategies auto fsdp:2 \\
        --precisions 32-true bf16-mixed --act-ckpt none full selective --steps 40
    python scripts/benchmark.py matrix --models llama-1b --strategies fsdp:1 --precisions bf16-mixed \\
        --compile true --block 2048 --batch 4                                    # one H100: the MFU target
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.utils.bench_report import markdown_table  # noqa: E402

METRICS = ("perf/tokens_per_sec", "perf/tflops", "perf/mfu", "perf/max_memory_gb", "perf/data_wait_frac")


def cell_overrides(model: str, strategy: str, precision: str, backend: str, compile_: str, act_ckpt: str,
                   args: argparse.Namespace, run_dir: Path) -> list[str]:
    name, _, devices = strategy.partition(":")
    return [
        f"model={model}", f"strategy={name}", f"trainer.devices={devices or 1}", f"trainer.precision={precision}",
        f"model.attn_backend={backend}", f"stage.compile={compile_}", f"stage.activation_checkpointing={act_ckpt}",
        f"trainer.max_steps={args.steps}", f"data.batch_size={args.batch}", f"data.block_size={args.block}",
        f"model.max_seq_len={max(args.block, 64)}", "trainer.limit_val_batches=0", "validate_full_at_end=false",
        f"trainer.log_every_n_steps={args.window}", f"callbacks.throughput.window_size={args.window}",
        f"callbacks.throughput.peak_flops={args.peak_flops}" if args.peak_flops else "callbacks.throughput.peak_flops=null",
        "callbacks.checkpoint=null", "callbacks.periodic=null", "callbacks.samples=null", "callbacks.progress_bar=null",
        f"paths.log_dir={run_dir.parent}", f"hydra.run.dir={run_dir}", *args.extra,
    ]


def read_perf(run_dir: Path) -> dict[str, float | None]:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open())) if (run_dir / "csv" / "metrics.csv").exists() else []
    out: dict[str, float | None] = {}
    for key in METRICS:
        values = [float(r[key]) for r in rows if r.get(key)]
        values = values[1:] if len(values) > 1 else values  # first window: compilation and warm-up
        out[key.removeprefix("perf/")] = round(statistics.median(values), 4) if values else None
    return out


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, ["model", "strategy", "precision", "backend", "compile", "act_ckpt", "tokens_per_sec", "mfu",
                                 "max_memory_gb", "status"])


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="benchmark.py matrix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-nano"])
    p.add_argument("--strategies", nargs="+", default=["auto"], help="name[:devices], e.g. auto ddp:2 fsdp:2 fsdp_tp:2")
    p.add_argument("--precisions", nargs="+", default=["bf16-mixed"])
    p.add_argument("--backends", nargs="+", default=["sdpa"], help="sdpa eager flex flash_attn")
    p.add_argument("--compile", nargs="+", default=["false"], help="false true per_block")
    p.add_argument("--act-ckpt", nargs="+", default=["0"],
                   help="stage.activation_checkpointing policies: none/0, full/1, n (every n-th block), selective")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--window", type=int, default=10, help="steps per throughput window")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (CPUs have no table entry)")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmark" / time.strftime("matrix-%Y%m%d-%H%M%S"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("extra", nargs="*", help="more train.py overrides for every cell (e.g. data=shakespeare)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    grid = itertools.product(args.models, args.strategies, args.precisions, args.backends, args.compile, args.act_ckpt)
    for index, (model, strategy, precision, backend, compile_, act_ckpt) in enumerate(grid):
        run_dir = args.out / "runs" / f"{index:03d}"
        cmd = [sys.executable, str(ROOT / "train.py"), *cell_overrides(model, strategy, precision, backend, compile_, act_ckpt, args, run_dir)]
        t0 = time.perf_counter()
        env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, env=env)
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            status = "ok" if proc.returncode == 0 else f"failed: {tail[:120]}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {args.timeout} s"
        row = {"model": model, "strategy": strategy, "precision": precision, "backend": backend, "compile": compile_,
               "act_ckpt": act_ckpt, "batch": args.batch, "block": args.block, "steps": args.steps,
               **read_perf(run_dir), "wall_s": round(time.perf_counter() - t0, 1), "status": status, "command": " ".join(cmd[1:])}
        rows.append(row)
        print(f"[{index + 1}] {model} {strategy} {precision} {backend} compile={compile_} ac={act_ckpt}: "
              f"{row['tokens_per_sec']} tok/s, mfu {row['mfu']}, {row['max_memory_gb']} GB ({status})", flush=True)
    (args.out / "matrix.json").write_text(json.dumps(rows, indent=2))
    (args.out / "matrix.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"wrote {args.out / 'matrix.json'} and {args.out / 'matrix.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
