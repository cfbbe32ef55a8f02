"""LM head + cross-entropy: chunked inside forward (`objective.fused_loss=true`) vs full logits.

    python scripts/benchmark.py head-loss                              # Llama 2 × 256, vocab 32000 and 128256
    python scripts/benchmark.py head-loss --vocabs 32000 --batch 8 --seq 512
    python scripts/benchmark.py head-loss --tp 2                       # tensor parallel: loss_parallel on vs off
    python scripts/benchmark.py head-loss --logprobs                   # DPO's per-sequence log-probs instead of CLM

For each vocabulary, each variant runs in its own child process (so peak memory is that variant's alone):
a 2-layer Llama (width 256, GQA 4/2) takes a CLM forward + backward on one random batch; reported are the
median wall time of 3 steps after one warm-up, the peak memory the first step added (CPU: peak RSS growth;
CUDA: peak allocated), and the loss (equal across variants). Writes logs/benchmark/head-loss.{json,md}.

With `--tp N` the variants are instead `strategy.loss_parallel` on (vocab-parallel head, loss on the logit
shards) and off (replicated head, chunked loss on every rank): each child spawns N ranks (gloo on CPU, one
thread each; NCCL on N GPUs) that tensor-parallelise the same model; peak memory is the largest rank's.
With `--logprobs` the loss is DPO's instead: the mean over sequences of log p(completion) (second half of each
row; the first half is prompt), through `decoder_sequence_logprobs` (per-token chunks, recomputed in backward)
vs `sequence_logprobs` over full logits.
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


def measure(fused: bool, vocab: int, batch: int, seq: int, device: str, tp_mesh: Any = None, logprobs: bool = False) -> dict[str, Any]:
    """One variant, in this process: peak memory of the first step, then the median of 3 timed steps.
    With `tp_mesh`, the model is tensor-parallel over it and `fused` means loss parallelism on."""
    from lmforge.losses import sequence_logprobs
    from lmforge.models import build
    from lmforge.objectives.base import decoder_sequence_logprobs
    from lmforge.objectives.clm import CausalLM

    torch.manual_seed(0)
    model = build({"family": "llama", "vocab_size": vocab, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 256,
                   "intermediate_size": 688, "max_seq_len": seq}).to(device)
    variant = "chunked (fused_loss)" if fused else "full logits"
    if tp_mesh is not None:
        from lmforge.parallel import apply_tensor_parallel

        apply_tensor_parallel(model, tp_mesh, loss_parallel=fused)
        variant = f"tp{tp_mesh.size()} " + ("loss_parallel (vocab-sharded head)" if fused else "replicated head (chunked loss)")
        fused = True
    x = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=torch.Generator(device).manual_seed(1))
    batch_ = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    clm = CausalLM(fused_loss=fused)
    completion = batch_["targets"].clone()
    completion[:, : seq // 2] = -100  # prompt half

    def step_loss() -> torch.Tensor:
        if not logprobs:
            return clm(model, batch_).loss
        ids = batch_["input_ids"]
        logps = decoder_sequence_logprobs(model, ids, completion) if fused else sequence_logprobs(model(ids), completion)
        return -logps.mean()

    if logprobs:
        variant = "chunked per-token log-probs" if fused else "full logits (sequence_logprobs)"
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step_loss()
    loss.backward()
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step_loss().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"bench": "head-loss", "variant": variant, "vocab": vocab,
            "tokens": batch * seq, "logits_fp32_mib": round(batch * seq * vocab * 4 / 2**20), "peak_mib": round(peak / 2**20),
            "fwd_bwd_ms": round(1e3 * statistics.median(times)), "loss": round(loss.item(), 6), "device": device}


def _tp_rank(rank: int, world: int, port: int, args: tuple, queue: Any) -> None:
    """One tensor-parallel rank of `measure` (a `torch.multiprocessing.spawn` target)."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fused, vocab, batch, seq, device = args
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        row = measure(fused, vocab, batch, seq, device, init_device_mesh(device.split(":")[0], (world,)))
        queue.put((rank, row))
    finally:
        dist.destroy_process_group()


def measure_tp(fused: bool, vocab: int, batch: int, seq: int, device: str, world: int) -> dict[str, Any]:
    """`measure` on `world` tensor-parallel ranks; rank 0's row with the largest rank's peak memory."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_tp_rank, args=(world, port, (fused, vocab, batch, seq, device), queue), nprocs=world, join=True)
    rows = dict(queue.get() for _ in range(world))
    return {**rows[0], "peak_mib": max(r["peak_mib"] for r in rows.values()), "ranks": world}


def main(argv: list[str]) -> list[dict[str, Any]]:
    from lmforge.utils.bench_report import append_results, markdown_table, print_rows

    p = argparse.ArgumentParser(prog="benchmark.py head-loss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: compare loss_parallel on/off (needs TP GPUs on CUDA)")
    p.add_argument("--logprobs", action="store_true", help="DPO's sequence log-probs instead of the CLM loss")
    p.add_argument("--out", type=Path, default=None, help="default logs/benchmark/head-loss (head-loss-tpN with --tp N)")
    p.add_argument("--child", nargs=2, metavar=("FUSED", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one measurement, printed as JSON for the parent
        fused, vocab = args.child[0] == "1", int(args.child[1])
        row = (measure_tp(fused, vocab, args.batch, args.seq, args.device, args.tp) if args.tp > 1
               else measure(fused, vocab, args.batch, args.seq, args.device, logprobs=args.logprobs))
        print(json.dumps(row))
        return []
    if args.logprobs and args.tp > 1:
        p.error("--logprobs runs on one process: drop --tp")
    name = "head-loss" + (f"-tp{args.tp}" if args.tp > 1 else "") + ("-logprobs" if args.logprobs else "")
    args.out = args.out or ROOT / "logs" / "benchmark" / name
    rows = []
    for vocab in args.vocabs:
        for fused in (True, False):
            cmd = [sys.executable, str(Path(__file__).with_name("benchmark.py")), "head-loss", "--child", str(int(fused)), str(vocab),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device, "--tp", str(args.tp)]
            cmd += ["--logprobs"] if args.logprobs else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown_table(rows, list(rows[0])))
    print_rows(rows, "lmforge head-loss", vertical=True)
    append_results(rows, ROOT)
    return rows
