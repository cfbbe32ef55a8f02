"""`python scripts/benchmark.py checkpoint`: what checkpoint saves cost a training run, synchronous against
`strategy.async_save=true`, per strategy.

Each cell is a short `train.py` run that saves every `--every` steps (`callbacks.checkpoint.save_last=link`: one
write per save). What training waited for is read back from the run's train.log, where every save logs it: the
whole write when synchronous; the staging copy, plus any wait for the previous write at the next save or at the end
of fit, in the background. Writes checkpoint.json and checkpoint.md under --out and appends to
logs/benchmark/results.jsonl.

    python scripts/benchmark.py checkpoint                          # fsdp and ddp, 1 rank, a 103M Llama on CPU
    OMP_NUM_THREADS=1 python scripts/benchmark.py checkpoint        # leaves a core to the writer, as a GPU host has
    python scripts/benchmark.py checkpoint --strategies fsdp:2 --size small
    python scripts/benchmark.py checkpoint --model llama-160m --size preset --precision bf16-mixed -- trainer=gpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.utils.bench_report import append_results, markdown_table  # noqa: E402

SIZES = {  # Llama shapes on the byte tokenizer: weights + AdamW state = 12 bytes per parameter in fp32
    "large": ["model.n_layer=8", "model.n_embd=1024", "model.n_head=16", "model.n_kv_head=16", "model.intermediate_size=2816"],  # 103M, 1.2 GB
    "small": ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2"],  # a smoke test of the grid
    "preset": [],  # --model's own shape
}
SYNC = re.compile(r"checkpoint (\S+): written in ([\d.]+) s, training blocked throughout")
STAGED = re.compile(r"checkpoint (\S+): training blocked ([\d.]+) s to stage it")
WAITED = re.compile(r"training waited ([\d.]+) s for it")
LANDED = re.compile(r"checkpoint (\S+) written in the background in ([\d.]+) s")


def cell_overrides(strategy: str, async_save: bool, args: argparse.Namespace, run_dir: Path) -> list[str]:
    name, _, devices = strategy.partition(":")
    return [
        f"strategy={name}", f"trainer.devices={devices or 1}", f"strategy.async_save={str(async_save).lower()}",
        "tokenizer=byte", f"model={args.model}", *SIZES[args.size], f"trainer.precision={args.precision}",
        f"trainer.max_steps={args.steps}", f"data.block_size={args.block}", f"data.batch_size={args.batch}",
        f"callbacks.checkpoint.every_n_train_steps={args.every}", "callbacks.checkpoint.monitor=null",
        "callbacks.checkpoint.save_last=link", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
        "validate_full_at_end=false", "callbacks.samples=null", "callbacks.progress_bar=null",
        f"paths.log_dir={run_dir.parent}", f"hydra.run.dir={run_dir}", *args.extra,
    ]


def read_saves(log: str) -> dict[str, float | int | None]:
    """Saves, seconds training waited for them (total and per save) and background write times, from train.log."""
    sync = [float(m.group(2)) for m in SYNC.finditer(log)]
    staged = [float(m.group(2)) for m in STAGED.finditer(log)]
    waited = [float(m.group(1)) for m in WAITED.finditer(log)]
    landed = [float(m.group(2)) for m in LANDED.finditer(log)]
    blocked = sync + staged
    return {
        "saves": len(blocked),
        "blocked_total_s": round(sum(blocked) + sum(waited), 2),
        "blocked_per_save_s": round(statistics.median(blocked), 3) if blocked else None,
        "waited_for_writes_s": round(sum(waited), 2),
        "write_s": round(statistics.median(sync or landed), 2) if (sync or landed) else None,
    }


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, ["strategy", "async_save", "wall_s", "saves", "blocked_total_s", "blocked_per_save_s",
                                 "waited_for_writes_s", "write_s", "status"])


def main(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="benchmark.py checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=["fsdp:1", "ddp:1"], help="name[:devices]: fsdp, fsdp_tp, ddp")
    p.add_argument("--model", default="llama-tiny", help="a model preset; --size reshapes it unless `preset`")
    p.add_argument("--size", choices=sorted(SIZES), default="large")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3, help="a save every this many steps")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="alternating synchronous / background runs per strategy")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmark" / time.strftime("checkpoint-%Y%m%d-%H%M%S"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("extra", nargs="*", help="more train.py overrides for every run")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    rows = []
    for strategy in args.strategies:
        for r in range(args.rounds):
            for async_save in ((False, True) if r % 2 == 0 else (True, False)):  # neither always runs first
                run_dir = args.out / "runs" / f"{strategy.replace(':', '-')}-{'async' if async_save else 'sync'}-{r}"
                cmd = [sys.executable, str(ROOT / "train.py"), *cell_overrides(strategy, async_save, args, run_dir)]
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, env=env)
                    status = "ok" if proc.returncode == 0 else f"failed: {(proc.stderr.strip().splitlines() or [''])[-1][:120]}"
                except subprocess.TimeoutExpired:
                    status = f"timeout after {args.timeout} s"
                log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
                row = {"bench": "checkpoint", "strategy": strategy, "async_save": async_save, "model": args.model, "size": args.size,
                       "wall_s": round(time.perf_counter() - t0, 1), **read_saves(log), "status": status,
                       "omp_threads": os.environ.get("OMP_NUM_THREADS"), "command": " ".join(cmd[1:])}
                rows.append(row)
                print(f"{strategy} async_save={async_save}: {row['wall_s']} s, {row['saves']} saves, blocked {row['blocked_total_s']} s "
                      f"({row['blocked_per_save_s']} s per save) ({status})", flush=True)
    (args.out / "checkpoint.json").write_text(json.dumps(rows, indent=2))
    (args.out / "checkpoint.md").write_text(markdown(rows))
    append_results(rows, ROOT)
    print(markdown(rows))
    print(f"wrote {args.out / 'checkpoint.json'} and {args.out / 'checkpoint.md'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
