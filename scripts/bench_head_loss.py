"""LM head + cross-entropy: chunked inside forward (`objective.fused_loss=true`) vs full logits.

    python scripts/benchmark.py head-loss                              # Llama 2 × 256, vocab 32000 and 128256
    python scripts/benchmark.py head-loss --vocabs 32000 --batch 8 --seq 512

For each vocabulary, each variant runs in its own child process (so peak memory is that variant's alone):
a 2-layer Llama (width 256, GQA 4/2) takes a CLM forward + backward on one random batch; reported are the
median wall time of 3 steps after one warm-up, the peak memory the first step added (CPU: peak RSS growth;
CUDA: peak allocated), and the loss (equal across variants). Writes logs/benchmark/head-loss.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(fused: bool, vocab: int, batch: int, seq: int, device: str) -> dict[str, Any]:
    """One variant, in this process: peak memory of the first step, then the median of 3 timed steps."""
    from lmforge.models import build
    from lmforge.objectives.clm import CausalLM

    torch.manual_seed(0)
    model = build({"family": "llama", "vocab_size": vocab, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 256,
                   "intermediate_size": 688, "max_seq_len": seq}).to(device)
    x = torch.randint(0, vocab, (batch, seq + 1), device=device)
    batch_ = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    objective = CausalLM(fused_loss=fused)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = objective(model, batch_).loss
    loss.backward()
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        objective(model, batch_).loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"bench": "head-loss", "variant": "chunked (fused_loss)" if fused else "full logits", "vocab": vocab,
            "tokens": batch * seq, "logits_fp32_mib": round(batch * seq * vocab * 4 / 2**20), "peak_mib": round(peak / 2**20),
            "fwd_bwd_ms": round(1e3 * statistics.median(times)), "loss": round(loss.item(), 6), "device": device}


def main(argv: list[str]) -> list[dict[str, Any]]:
    from lmforge.utils.bench_report import append_results, markdown_table, print_rows

    p = argparse.ArgumentParser(prog="benchmark.py head-loss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmark" / "head-loss")
    p.add_argument("--child", nargs=2, metavar=("FUSED", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one measurement, printed as JSON for the parent
        print(json.dumps(measure(args.child[0] == "1", int(args.child[1]), args.batch, args.seq, args.device)))
        return []
    rows = []
    for vocab in args.vocabs:
        for fused in (True, False):
            cmd = [sys.executable, str(Path(__file__).with_name("benchmark.py")), "head-loss", "--child", str(int(fused)), str(vocab),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown_table(rows, list(rows[0])))
    print_rows(rows, "lmforge head-loss", vertical=True)
    append_results(rows, ROOT)
    return rows
