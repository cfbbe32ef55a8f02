"""Decode throughput: lmforge `generate` vs HF `generate` on the same weights, and speculative decoding.

    python scripts/benchmark.py generate                                  # gpt-micro + llama-tiny, batch 1 and 8
    python scripts/benchmark.py generate --models llama-tiny --batch 1 --new 256 --threads 1

Per (model, batch): new tokens per second of greedy decoding (prompt of --prompt random tokens, exactly
--new new tokens, prefill included) for lmforge with its KV cache and for `transformers` (`to_hf` of the
same random weights, fp32, its default attention and cache), runs interleaved and the best of --repeats kept
("speedup"; "speedup_median" from the medians); "same" says whether both produced the same tokens.
lmforge's one-token steps run through `generation/fastpath.py` on CPU; --no-fastpath measures the forward.
Then, at batch 1, speculative decoding against plain greedy decoding of the same target, with a draft made
of the target's first --draft-layers blocks (shared embeddings, final norm and head: random weights have no
smaller sibling, and a truncated copy agrees with its model often enough to show the mechanism); greedy, so
its output must equal plain decoding.

Rows are printed and appended to logs/benchmark/results.jsonl (bench = "generate" / "speculative").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(
    fns: dict[str, Callable[[], Any]], repeats: int, clock: str = "wall", medians: dict[str, float] | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Best time of each function over `repeats` interleaved runs (after one warm-up run each); `medians`, if
    given, receives each function's median time too.

    `clock="cpu"` (process CPU time) ignores the time the process waits for a core: on a machine shared with
    other jobs it is the steadier measure of single-threaded work; wall time is what a user sees."""
    now = CLOCKS[clock]
    outs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            outs[name] = fn()
            times[name].append(now() - t0)
    if medians is not None:
        medians.update({name: statistics.median(t) for name, t in times.items()})
    return {name: min(t) for name, t in times.items()}, outs


def truncated_draft(model: nn.Module, n_layer: int) -> nn.Module:
    """The target's first `n_layer` blocks with its embeddings, final norm and head (weights shared)."""
    from lmforge.models import build

    draft = build({**vars(model.config), "n_layer": n_layer})
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if k in draft.state_dict()})
    return draft.eval()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark.py generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-micro", "llama-tiny"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (steadier on a shared machine)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no-fastpath", action="store_true", help="decode through the model's forward (generation/fastpath.py off)")
    p.add_argument("--cpu-kernels", choices=["lmforge", "torch"], default="lmforge",
                   help="lmforge's CPU kernels or torch's defaults, as the `cpu_kernels` config key (lmforge/kernels)")
    return p.parse_args(argv)


def bench_model(name: str, args: argparse.Namespace, machine: dict[str, Any]) -> list[dict]:
    """Rows for one preset: one per batch size (lmforge vs HF), then one for speculative decoding."""
    from benchmark import load_preset  # scripts/ is on sys.path when run through benchmark.py

    from lmforge.generation import fastpath, generate
    from lmforge.interop.hf import to_hf
    from lmforge.models import build

    torch.manual_seed(0)
    cfg = load_preset(name)
    cfg.update(dropout=0.0, max_seq_len=max(cfg["max_seq_len"], args.prompt + args.new))
    model = build(cfg, vocab_size=args.vocab).eval()
    hf = None if args.no_hf else to_hf(model).eval()
    ours = partial(generate, model, max_new_tokens=args.new)
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        fns: dict[str, Callable[[], Any]] = {"lmforge": partial(ours, ids)}
        if hf is not None:
            fns["hf"] = partial(
                hf.generate, ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )
        med: dict[str, float] = {}
        with torch.inference_mode(), fastpath.disabled() if args.no_fastpath else nullcontext():
            secs, outs = best_time(fns, args.repeats, args.clock, med)
        row = {"bench": "generate", "model": name, "params_m": round(model.num_params() / 1e6, 2), "batch": batch,
               "prompt": args.prompt, "new": args.new, "fastpath": not args.no_fastpath,
               "lmforge_tok_s": round(batch * args.new / secs["lmforge"], 1)}
        if hf is not None:
            row |= {"hf_tok_s": round(batch * args.new / secs["hf"], 1), "speedup": round(secs["hf"] / secs["lmforge"], 2),
                    "speedup_median": round(med["hf"] / med["lmforge"], 2), "same": bool(torch.equal(outs["lmforge"], outs["hf"]))}
        rows.append(row | machine)
        print(json.dumps(rows[-1]), flush=True)
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    stats: dict[str, float] = {}
    draft = truncated_draft(model, args.draft_layers)
    fns = {
        "plain": partial(ours, ids),
        "speculative": partial(ours, ids, draft_model=draft, num_draft_tokens=args.num_draft_tokens, stats=stats),
    }
    with fastpath.disabled() if args.no_fastpath else nullcontext():
        secs, outs = best_time(fns, args.repeats, args.clock)
    rows.append({
        "bench": "speculative", "model": name, "draft_layers": args.draft_layers, "num_draft_tokens": args.num_draft_tokens,
        "batch": 1, "new": args.new, "plain_tok_s": round(args.new / secs["plain"], 1),
        "speculative_tok_s": round(args.new / secs["speculative"], 1), "speedup": round(secs["plain"] / secs["speculative"], 2),
        "acceptance_rate": round(stats["acceptance_rate"], 3), "tokens_per_round": round(stats["tokens_per_round"], 2),
        "same": bool(torch.equal(outs["plain"], outs["speculative"])), **machine,
    })
    print(json.dumps(rows[-1]), flush=True)
    return rows


def run(argv: list[str]) -> list[dict]:
    from lmforge.kernels.cpu_kernels import set_cpu_kernels

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_cpu_kernels(args.cpu_kernels)
    machine = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "clock": args.clock,
               "load_avg_1m": round(os.getloadavg()[0], 2), "cpu_kernels": args.cpu_kernels}
    return [row for name in args.models for row in bench_model(name, args, machine)]


def main(argv: list[str]) -> None:
    from lmforge.utils.bench_report import append_results, print_rows

    rows = run(argv)
    for bench in ("generate", "speculative"):
        print_rows([r for r in rows if r["bench"] == bench], f"lmforge {bench} (CPU, greedy)")
    append_results(rows, ROOT)
