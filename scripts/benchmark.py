"""Training-step throughput of model presets: tokens/s, TFLOP/s and MFU (where the device peak is known).

    python scripts/benchmark.py                         # gpt-nano on this machine, fp32/bf16 by `auto`
    python scripts/benchmark.py --models gpt-nano gpt-micro --batch 32 --block 128 --compile
    python scripts/benchmark.py --precision bf16 --device cuda --models gpt2 --block 1024 --batch 16
    python scripts/benchmark.py data                    # tokenisation + sharding MB/s (num_proc 1, 2), loader ms/batch
    python scripts/benchmark.py generate                # decode tokens/s vs HF generate, speculative speed-up
    python scripts/benchmark.py train-vs-hf             # training step vs HF GPT2LMHeadModel, fp32 + bf16 autocast
    python scripts/benchmark.py lightning               # bare PyTorch loop vs lightning.Trainer, ms/step
    python scripts/benchmark.py head-loss               # chunked head + cross-entropy vs full logits: peak memory, ms
    python scripts/benchmark.py head-loss --tp 2        # tensor parallel: vocab-parallel head + loss vs replicated head
    python scripts/benchmark.py gemm                    # float32 CPU GEMMs: torch's BLAS vs oneDNN (cpu_kernels), GFLOP/s
    python scripts/benchmark.py matrix --strategies auto fsdp:2 --act-ckpt 0 1   # train.py runs over a grid
    python scripts/benchmark.py checkpoint              # what saves stall training: synchronous vs strategy.async_save

Performance targets live here, not in timed tests. Results are printed as a table and appended to
logs/benchmark/results.jsonl with the machine and settings, so numbers in the README can be traced.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.flops import device_peak_flops, model_flops_per_token  # noqa: E402
from lmforge.models import build  # noqa: E402
from lmforge.objectives.clm import CausalLM  # noqa: E402
from lmforge.precision import resolve_precision  # noqa: E402
from lmforge.utils.bench_report import append_results, print_rows  # noqa: E402


def load_preset(name: str) -> dict:
    """Model presets are the same YAML files train.py uses (resolving one level of `defaults`)."""
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    base = {}
    for parent in cfg.pop("defaults", []) or []:
        if parent != "_self_":
            base.update(load_preset(parent))
    return {**base, **cfg}


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = load_preset(name)
    cfg.update(max_seq_len=max(cfg["max_seq_len"], args.block), dropout=0.0)
    model = build(cfg, vocab_size=args.vocab).to(device)
    if args.compile:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    precision = resolve_precision(args.precision, "gpu" if device.type == "cuda" else "cpu")
    amp = str(precision).startswith("bf16")
    x = torch.randint(0, args.vocab, (args.batch, args.block + 1), device=device)
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    objective = CausalLM(fused_loss=not args.full_logits)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = objective(model, batch).loss  # as train.py's clm: chunked head + fp32 loss unless --full-logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = args.batch * args.block
    flops = model_flops_per_token(model, args.block) * tokens / dt
    peak = args.peak_flops or device_peak_flops(device)
    return {
        "model": name, "params_m": round(model.num_params() / 1e6, 2), "batch": args.batch, "block": args.block,
        "vocab": args.vocab, "precision": str(precision), "compile": args.compile, "full_logits": args.full_logits, "device": str(device),
        "step_s": round(dt, 4), "tokens_per_sec": round(tokens / dt), "tflops": round(flops / 1e12, 3),
        "mfu": round(flops / peak, 4) if peak else None,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
    }


def bench_data(argv: list[str]) -> None:
    """`python scripts/benchmark.py data`: tokenisation + sharding MB/s per num_proc, and the train loader's batches/s."""
    import tempfile

    from lmforge.data.corpus import ShakespeareCorpus
    from lmforge.data.packed import PackedBlocks
    from lmforge.data.sampler import ResumableLoader, ResumableSampler
    from lmforge.data.shards import TokenShards, write_shards
    from lmforge.data.tokenizer import BPETokenizerSpec

    p = argparse.ArgumentParser(prog="benchmark.py data", description=bench_data.__doc__)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=2000, help="loader batches to time")
    args = p.parse_args(argv)
    corpus = ShakespeareCorpus()
    texts = [d.text for d in corpus.documents("train")]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = BPETokenizerSpec(args.vocab).load_or_train(texts, corpus.fingerprint(), ROOT / ".cache" / "lmforge")
    machine = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.num_proc:
            t0 = time.perf_counter()
            manifest = write_shards(texts, tok, Path(tmp) / f"p{n}", num_proc=n)
            dt = time.perf_counter() - t0
            rows.append({"bench": "tokenize+shard", "corpus": "shakespeare train", "MB": round(mb, 2), "num_proc": n,
                         "tokens": manifest["n_tokens"], "seconds": round(dt, 2), "MB_per_s": round(mb / dt, 2), **machine})
        blocks = PackedBlocks(TokenShards(Path(tmp) / f"p{args.num_proc[0]}").tokens, args.block, tok.pad_id)
        loader = ResumableLoader(blocks, ResumableSampler(len(blocks), seed=0), args.batch)
        t0, n_batches = time.perf_counter(), 0
        while n_batches < args.batches:
            for _ in loader:
                n_batches += 1
                if n_batches >= args.batches:
                    break
        dt = time.perf_counter() - t0
        rows.append({"bench": "train loader", "block": args.block, "batch": args.batch, "batches": n_batches,
                     "seconds": round(dt, 3), "ms_per_batch": round(1e3 * dt / n_batches, 3), **machine})
    print_rows(rows, "lmforge data", vertical=True)
    append_results(rows, ROOT)


# Modes with a script of their own: mode -> module under scripts/ whose `main(argv)` runs it.
MODE_SCRIPTS = {"generate": "bench_generate", "matrix": "bench_matrix", "head-loss": "bench_head_loss", "gemm": "bench_gemm",
                "checkpoint": "bench_checkpoint"}


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else None
    if mode == "data":
        bench_data(sys.argv[2:])
        return
    if mode in MODE_SCRIPTS:
        importlib.import_module(MODE_SCRIPTS[mode]).main(sys.argv[2:])
        return
    if mode in ("train-vs-hf", "lightning"):  # scripts/bench_train.py
        from bench_train import main as bench_train

        bench_train(mode, sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-nano"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--precision", default="auto", help="auto | 32-true | bf16-mixed")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--full-logits", action="store_true", help="loss from full logits (objective.fused_loss=false)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (CPU has no table entry)")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = [bench(name, args, device) for name in args.models]
    print_rows(rows, "lmforge training-step throughput")
    append_results(rows, ROOT)


if __name__ == "__main__":
    main()
