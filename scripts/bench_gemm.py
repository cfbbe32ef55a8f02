"""float32 CPU GEMM throughput: torch's default BLAS call (aten) vs oneDNN, on a linear layer's three GEMMs.

    python scripts/benchmark.py gemm                         # GPT 384-wide MLP/attention shapes, 2048 tokens
    python scripts/benchmark.py gemm --tokens 4096 --shapes 768x3072 3072x768

What `cpu_kernels=lmforge` does for float32 Linears (kernels/linear.py) rests on: per (in x out) shape, GFLOP/s of the forward
x·Wᵀ, the input gradient g·W and the weight gradient gᵀ·x, each through `F.linear`/`mm` (aten: MKL's sgemm
in torch's x86 wheels) and through `lmforge.kernels.linear` with oneDNN on; plus the largest relative
difference between the two against a float64 reference, so the speed is not bought with precision.
Writes logs/benchmark/gemm.{json,md} and appends to logs/benchmark/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.kernels import cpu_kernels
from lmforge.kernels import linear as lin
from lmforge.utils.bench_report import append_results, markdown_table, print_rows

ROOT = Path(__file__).resolve().parents[1]


def seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median wall time of `fn` after two warm-up calls (the first builds oneDNN's primitive)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def bench_shape(tokens: int, d_in: int, d_out: int, repeats: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    x64, w64, g64 = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((tokens, d_in), (d_out, d_in), (tokens, d_out)))
    x, w, g = x64.float(), w64.float(), g64.float()
    gemms = {  # name: (aten, oneDNN, float64 reference)
        "forward x·Wᵀ": (lambda: torch.nn.functional.linear(x, w), lambda: lin.gemm_nt(x, w), x64 @ w64.t()),
        "grad_x g·W": (lambda: g @ w, lambda: lin.gemm_nt(g, w.t()), g64 @ w64),
        "grad_w gᵀ·x": (lambda: g.t() @ x, lambda: lin.gemm_tn(g, x), g64.t() @ x64),
    }
    flop = 2 * tokens * d_in * d_out
    rows = []
    for name, (aten, onednn, ref) in gemms.items():
        cpu_kernels.set_cpu_kernels("lmforge")
        t_one, err_one = seconds(onednn, repeats), rel_err(onednn(), ref)
        cpu_kernels.set_cpu_kernels("torch")
        t_aten, err_aten = seconds(aten, repeats), rel_err(aten(), ref)
        rows.append({"bench": "gemm", "gemm": name, "tokens": tokens, "in": d_in, "out": d_out,
                     "aten_gflops": round(flop / t_aten / 1e9, 1), "onednn_gflops": round(flop / t_one / 1e9, 1),
                     "speedup": round(t_aten / t_one, 2), "aten_rel_err": f"{err_aten:.1e}", "onednn_rel_err": f"{err_one:.1e}",
                     "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)})
    cpu_kernels.set_cpu_kernels("lmforge")
    return rows


def main(argv: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="benchmark.py gemm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="rows of the activation (batch x sequence)")
    p.add_argument("--shapes", nargs="+", default=["384x1152", "384x384", "384x1536", "1536x384", "384x4096"],
                   help="IN x OUT of each Linear (default: a 384-wide GPT's qkv, proj, fc, fc-proj and a 4096-vocab head)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmark" / "gemm")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not lin.ONEDNN_AVAILABLE:
        raise SystemExit("this torch build has no oneDNN linear op (torch.ops.mkldnn._linear_pointwise): nothing to compare")
    rows = []
    for shape in args.shapes:
        d_in, _, d_out = shape.partition("x")
        rows += bench_shape(args.tokens, int(d_in), int(d_out), args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = ["gemm", "in", "out", "aten_gflops", "onednn_gflops", "speedup", "aten_rel_err", "onednn_rel_err"]
    args.out.with_suffix(".md").write_text(markdown_table(rows, keys))
    print_rows([{k: r[k] for k in keys} for r in rows], "lmforge gemm: float32 CPU GEMMs, aten vs oneDNN")
    append_results(rows, ROOT)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return rows
