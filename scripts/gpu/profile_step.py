"""Where a training step's GPU time goes: forward / backward / optimizer split, dynamo graph breaks, and the
CUDA kernels by total time, grouped (GEMM, attention, Triton-fused, optimizer, other), for one or more variants.

    python scripts/gpu/profile_step.py gpt2:b=16,t=1024,v=50304 gpt2:b=16,t=1024,v=50304,full=1
    python scripts/gpu/profile_step.py llama-1b:b=4,t=2048,v=32000 --out $OUT/profile.json

A variant is `preset:key=value,...` with keys b (batch), t (block), v (vocab), compile (1/0, default 1),
full (1: loss from full logits), prof (1/0: run the kernel profiler, default 1), mode (torch.compile mode, e.g.
max-autotune-no-cudagraphs or reduce-overhead; default: torch's), attn (SDPA backend forced for the step: cudnn,
flash, efficient or math; default: torch's choice). Same step as
`scripts/benchmark.py` (bf16 autocast, fused AdamW), so its numbers are comparable; this is a diagnostic for a
lent GPU, the benchmark is the record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import load_preset  # noqa: E402

from lmforge.flops import device_peak_flops, model_flops_per_token  # noqa: E402
from lmforge.models import build  # noqa: E402
from lmforge.objectives.clm import CausalLM  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only to check the script itself


class _HostEvent:
    """CUDA-event stand-in on CPU (elapsed_time in ms)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: _HostEvent) -> float:
        return (other.t - self.t) * 1e3


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


CATEGORIES = [  # first match wins
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|wgmma", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
    ("triton", re.compile(r"^triton_", re.I)),
    ("copy/cast", re.compile(r"copy|cast|to_copy|memcpy|memset|fill", re.I)),
]


def attention_backend(name: str | None) -> contextlib.AbstractContextManager:
    """SDPA restricted to one backend (`sdpa_kernel`), or torch's own choice for None."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name])


def parse(spec: str) -> dict:
    name, _, rest = spec.partition(":")
    kv = dict(item.split("=", 1) for item in rest.split(",") if item)
    return {"model": name, "b": int(kv.get("b", 16)), "t": int(kv.get("t", 1024)), "v": int(kv.get("v", 50304)),
            "compile": kv.get("compile", "1") == "1", "full": kv.get("full", "0") == "1", "prof": kv.get("prof", "1") == "1",
            "mode": kv.get("mode"), "attn": kv.get("attn")}


def run(var: dict, steps: int, top: int) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = load_preset(var["model"])
    cfg.update(max_seq_len=max(cfg["max_seq_len"], var["t"]), dropout=0.0)
    torch.manual_seed(0)
    model = build(cfg, vocab_size=var["v"]).to(DEV)
    if var["compile"]:
        model.compile(mode=var["mode"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    objective = CausalLM(fused_loss=not var["full"])
    x = torch.randint(0, var["v"], (var["b"], var["t"] + 1), device=DEV)
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    ev = [torch.cuda.Event(enable_timing=True) if DEV == "cuda" else _HostEvent() for _ in range(4)]

    def step(timed: bool = False) -> tuple[float, float, float]:
        ev[0].record()
        with torch.autocast(DEV, dtype=torch.bfloat16), attention_backend(var["attn"]):
            loss = objective(model, batch).loss
        ev[1].record()
        loss.backward()
        ev[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev[3].record()
        if not timed:
            return 0.0, 0.0, 0.0
        _sync()
        return ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2]), ev[2].elapsed_time(ev[3])

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    _sync()
    warm_s = time.perf_counter() - t0
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls, parts = [], []
    for _ in range(steps):
        _sync()
        t = time.perf_counter()
        parts.append(step(timed=True))
        walls.append(time.perf_counter() - t)
    dt = statistics.median(walls)
    tokens = var["b"] * var["t"]
    flops = model_flops_per_token(model, var["t"]) * tokens / dt
    out = {**var, "warmup_s": round(warm_s, 1), "step_ms": round(dt * 1e3, 2),
           "fwd_ms": round(statistics.median(p[0] for p in parts), 2),
           "bwd_ms": round(statistics.median(p[1] for p in parts), 2),
           "opt_ms": round(statistics.median(p[2] for p in parts), 2),
           "tokens_per_sec": round(tokens / dt), "tflops": round(flops / 1e12, 1),
           "mfu": round(flops / (device_peak_flops(torch.device(DEV)) or 1e12), 4),
           "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else None,
           "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
           "break_reasons": [k[:160] for k in list(torch._dynamo.utils.counters["graph_break"])[:6]]}
    if var["prof"]:
        from torch.profiler import ProfilerActivity, profile

        n = 3
        with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
            _sync()
        kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if DEV != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name][0] += (e.device_time if DEV == "cuda" else e.self_cpu_time_total) / 1e3 / n  # ms per step
                kernels[e.name][1] += 1 / n
        total = sum(v[0] for v in kernels.values())
        cats: dict[str, float] = defaultdict(float)
        for name, (ms, _) in kernels.items():
            cat = next((c for c, rx in CATEGORIES if rx.search(name)), "other")
            cats[cat] += ms
        out["gpu_busy_ms"] = round(total, 2)
        out["categories_ms"] = {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
        out["top_kernels"] = [(name[:110], round(ms, 3), round(cnt, 1))
                              for name, (ms, cnt) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="JSON lines file for the results")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    for spec in args.variants:
        var = parse(spec)
        try:
            res = run(var, args.steps, args.top)
        except Exception as exc:  # one variant's failure (OOM, compile error) must not lose the others
            res = {**var, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        if DEV == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
        short = {k: v for k, v in res.items() if k not in ("top_kernels",)}
        print(json.dumps(short), flush=True)
        for name, ms, cnt in res.get("top_kernels", [])[:12]:
            print(f"   {ms:8.3f} ms  x{cnt:5.1f}  {name}", flush=True)


if __name__ == "__main__":
    main()
