"""Training-step speed against Hugging Face, and what Lightning costs over a bare loop (CPU by default).

    python scripts/benchmark.py train-vs-hf                 # GPT 6 × 384, 6 heads, seq 256, batch 8, vocab 4096
    python scripts/benchmark.py train-vs-hf --compile       # + a torch.compile row for lmforge (its own row)
    python scripts/benchmark.py train-vs-hf --full-logits   # + lmforge with objective.fused_loss=false (its own row)
    python scripts/benchmark.py train-vs-hf --torch-kernels # + lmforge with cpu_kernels=torch (its own row)
    python scripts/benchmark.py lightning                   # bare loop vs lightning.Trainer, ms/step

`train-vs-hf`: one training step = forward, loss, backward, AdamW step, zero_grad, on the same random batch,
for lmforge's GPT (its CLM objective as configured by default: fp32 cross-entropy over the 256 pre-shifted
targets, computed by the chunked head + loss inside forward, `objective.fused_loss=true`) and for
`transformers.GPT2LMHeadModel` with the same weights (`to_hf`, attn_implementation="sdpa", its default loss:
`labels=input_ids`, shifted inside, 255 targets), in fp32 and under bf16 autocast (model weights fp32, as
`precision=bf16-mixed` trains). Each side gets the optimizer its framework builds by default: lmforge's
`conf/optimizer/adamw.yaml` (`lmforge.optim.adamw.AdamW`: torch's AdamW, fused on CPU and CUDA) and HF
Trainer's default `adamw_torch_fused` (torch.optim.AdamW(fused=True) for torch >= 2.8); same lr,
betas, eps, weight decay (2-D weights only, both). Contenders alternate: --rounds rounds of --steps timed
steps each after --warmup steps; tokens/s from the median step; ratio = lmforge / HF. Each contender runs in
a fresh process per round (`--same-process` puts them all in one): in one process, glibc's heap state left by
one side (it hands freed blocks > its dynamic mmap threshold back to the OS) changes what the other side's
allocations cost, which swung HF's bf16 step between 400 and 750 ms here from run to run. The rows record
GLIBC_TUNABLES, which sets that behaviour for both sides (see the README), and each side's mean minor page faults
per timed step (`*_faults_per_step`: fresh pages touched, ~1 µs each on this VM), so a slow run shows why. On a CPU without
native bf16 matmuls (AVX2 only) a bf16 step takes ~15× an fp32 one on both sides: `--precisions 32-true`.

`lightning`: the same model and batch trained by a bare PyTorch loop and by `lightning.Trainer`, ms/step
(median of step-to-step wall intervals, data loading included on both sides):
  * minimal: a LightningModule whose training_step is the bare loop's body, logger / checkpointing /
    progress bar / model summary off, against the bare loop;
  * default: lmforge's PretrainStage with the default trainer settings (gradient clipping 1.0, its
    train/loss, train/lr, train/grad_norm logging every 10 steps to a CSV logger, progress bar; no LR
    scheduler on either side), against a bare loop that does the same work (grad norm + clipping);
overhead = Lightning / bare - 1.

Both write a JSON list of rows and a markdown table to --out (default logs/benchmark/<mode>.{json,md}) and
append the rows to logs/benchmark/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.utils.bench_report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = time.perf_counter  # set from --clock


def gpt_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return {"family": "gpt", "n_layer": args.layers, "n_head": args.heads, "n_embd": args.width, "max_seq_len": args.seq,
            "vocab_size": args.vocab, "dropout": 0.0, "bias": True, "tie_embeddings": True, "attn_backend": "sdpa",
            "position": "learned", "mlp_ratio": 4, "norm_eps": 1e-5, "init_std": 0.02}


def machine_info() -> dict[str, Any]:
    from lmforge.kernels.cpu_kernels import cpu_kernels

    clock = next(k for k, v in CLOCKS.items() if v is now)
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "clock": clock,
            "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2), "cpu_kernels": cpu_kernels()}


def lmforge_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """What `conf/optimizer/adamw.yaml` + the stage's `decay_param_groups` build."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lmforge.optim.param_groups import decay_param_groups

    cfg = OmegaConf.load(ROOT / "conf" / "optimizer" / "adamw.yaml")
    factory = instantiate(cfg)
    return factory(decay_param_groups(model, cfg.weight_decay))


def hf_optimizer(model: nn.Module, like: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """HF Trainer's default (`adamw_torch_fused`), with the same hyper-parameters and decay split as `like`."""
    from lmforge.optim.param_groups import decay_param_groups

    d = like.defaults
    wd = like.param_groups[0]["weight_decay"]
    return torch.optim.AdamW(decay_param_groups(model, wd), lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=True)


def optimizer_kind(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


def minor_faults() -> int:
    """Page faults served without I/O so far in this process: each is a fresh page of a new allocation being touched,
    the cost that swings this benchmark (see the module doc)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_rounds(fns: dict[str, Callable[[], Any]], rounds: int, steps: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Per-step seconds and minor page faults of each function: `warmup` untimed calls each, then `rounds`
    alternating blocks of `steps` timed calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # neither side always runs first
        for name in order:
            for _ in range(steps):
                f0, t0 = minor_faults(), now()
                fns[name]()
                times[name].append(now() - t0)
                faults[name].append(minor_faults() - f0)
    return times, faults


def contenders(args: argparse.Namespace, names: list[str]) -> tuple[dict[str, Callable[[bool], Callable[[], torch.Tensor]]], dict[str, str]]:
    """Step factories (amp -> one training step) for the named contenders, all starting from the same weights,
    and what each side's optimizer / attention is."""
    from lmforge.interop.hf import to_hf
    from lmforge.models import build
    from lmforge.objectives.clm import CausalLM

    torch.manual_seed(0)
    ours = build(gpt_cfg(args)).train()
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    opt_ours = lmforge_optimizer(ours)
    info = {"optimizer_lmforge": optimizer_kind(opt_ours)}

    def train_step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[bool], Callable[[], torch.Tensor]]:
        def make(amp: bool) -> Callable[[], torch.Tensor]:
            def step() -> torch.Tensor:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()
            return step
        return make

    steps: dict[str, Callable[[bool], Callable[[], torch.Tensor]]] = {}
    if "hf" in names:
        hf = to_hf(ours)
        hf.config._attn_implementation = "sdpa"  # also transformers' default where SDPA is available
        hf.train()
        opt_hf = hf_optimizer(hf, opt_ours)
        info.update(optimizer_hf=optimizer_kind(opt_hf), hf_attn=hf.config._attn_implementation)
        steps["hf"] = train_step(lambda: hf(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss, opt_hf)
    if "lmforge" in names:
        steps["lmforge"] = train_step(lambda: CausalLM()(ours, batch).loss, opt_ours)
    if "lmforge-full-logits" in names:
        steps["lmforge-full-logits"] = train_step(lambda: CausalLM(fused_loss=False)(ours, batch).loss, opt_ours)
    if "lmforge-torch-kernels" in names:  # the same model with cpu_kernels=torch (a child process runs only it)
        from lmforge.kernels.cpu_kernels import set_cpu_kernels

        set_cpu_kernels("torch")
        steps["lmforge-torch-kernels"] = train_step(lambda: CausalLM()(ours, batch).loss, opt_ours)
    if "lmforge-compiled" in names:
        compiled = build(gpt_cfg(args)).train()
        compiled.load_state_dict(ours.state_dict())
        compiled.compile()
        steps["lmforge-compiled"] = train_step(lambda: CausalLM()(compiled, batch).loss, lmforge_optimizer(compiled))
    return steps, info


def child_times(args: argparse.Namespace, name: str, precision: str) -> tuple[list[float], list[int], dict[str, str]]:
    """One contender's `--warmup` + `--steps` steps in a fresh process (its allocator state is its own): the
    step times, their page faults and what the child built (optimizer kinds, HF attention)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).with_name("benchmark.py")), "train-vs-hf", "--child", name, precision,
           "--layers", str(args.layers), "--width", str(args.width), "--heads", str(args.heads), "--seq", str(args.seq),
           "--batch", str(args.batch), "--vocab", str(args.vocab), "--clock", args.clock, "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return out.pop("times"), out.pop("faults"), out


def bench_vs_hf(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = ["lmforge", "hf"] + (["lmforge-compiled"] if args.compile else []) + (["lmforge-full-logits"] if args.full_logits else []) \
        + (["lmforge-torch-kernels"] if args.torch_kernels else [])
    if args.torch_kernels and args.same_process:
        raise SystemExit("--torch-kernels needs a process per contender (cpu_kernels is process-wide): drop --same-process")
    if args.child:  # one contender, one precision, in this process; the parent reads the JSON line
        name, precision = args.child
        make, info = contenders(args, [name])
        times, faults = timed_rounds({name: make[name](precision == "bf16-mixed")}, 1, args.steps, args.warmup)
        print(json.dumps({"times": times[name], "faults": faults[name], **info}))
        return []
    info: dict[str, str] = {}
    if args.same_process:
        make, info = contenders(args, names)
    rows = []
    tokens = args.batch * args.seq
    for precision in args.precisions:
        amp = precision == "bf16-mixed"
        if args.same_process:
            times, faults = timed_rounds({name: make[name](amp) for name in names}, args.rounds, args.steps, args.warmup)
        else:
            times, faults = {name: [] for name in names}, {name: [] for name in names}
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else list(reversed(names)):  # neither side always runs first
                    child, child_faults, built = child_times(args, name, precision)
                    times[name] += child
                    faults[name] += child_faults
                    info.update(built)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in [k for k in names if k != "hf"]:
            rows.append({
                "bench": "train-vs-hf", "shape": f"{args.layers}x{args.width} h{args.heads} seq{args.seq} b{args.batch} v{args.vocab}",
                "precision": precision, "lmforge": name, "lmforge_tok_s": round(tokens / med[name]), "hf_tok_s": round(tokens / med["hf"]),
                "ratio": round(med["hf"] / med[name], 3), "lmforge_ms": round(1e3 * med[name], 1), "hf_ms": round(1e3 * med["hf"], 1),
                "lmforge_faults_per_step": round(statistics.mean(faults[name])), "hf_faults_per_step": round(statistics.mean(faults["hf"])),
                "steps_each": len(times[name]), "processes": "one" if args.same_process else "one per contender and round",
                **info, "malloc": os.environ.get("GLIBC_TUNABLES", "default"), **machine_info(),
            })
            if name == "lmforge-torch-kernels":
                rows[-1]["cpu_kernels"] = "torch"
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- Lightning overhead ------------------------------------------------------------------------------------
def bench_lightning(args: argparse.Namespace) -> list[dict[str, Any]]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    from lmforge.models import build
    from lmforge.objectives.clm import CausalLM
    from lmforge.stages.pretrain import PretrainStage

    cfg = gpt_cfg(args)
    objective = CausalLM()
    gen = torch.Generator().manual_seed(0)
    n_batches = args.steps + args.warmup
    data = torch.randint(0, args.vocab, (n_batches * args.batch, args.seq + 1), generator=gen)

    def loader() -> torch.utils.data.DataLoader:
        ds = [{"input_ids": row[:-1], "targets": row[1:]} for row in data]
        return torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=False, num_workers=0)

    class StepClock(Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, *a: Any, **k: Any) -> None:
            self.stamps.append(now())

    def intervals(stamps: list[float]) -> list[float]:
        return [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :], strict=False)]

    def bare(clip: bool) -> list[float]:
        torch.manual_seed(0)
        model = build(cfg).train()
        opt = lmforge_optimizer(model)
        stamps = []
        for batch in loader():
            loss = objective(model, batch).loss
            loss.backward()
            if clip:  # what the default trainer settings add: the logged grad norm, then clipping to 1.0
                params = [p for p in model.parameters() if p.grad is not None]
                torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params], 2.0)), 2.0)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stamps.append(now())
        return intervals(stamps)

    class Minimal(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = build(cfg)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return objective(self.model, batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return lmforge_optimizer(self.model)

    def lightning_minimal() -> list[float]:
        clock = StepClock()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=n_batches, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[clock],
        )
        trainer.fit(Minimal(), train_dataloaders=loader())
        return intervals(clock.stamps)

    def lightning_default(log_dir: str) -> list[float]:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        opt_cfg = OmegaConf.load(ROOT / "conf" / "optimizer" / "adamw.yaml")
        stage = PretrainStage(model_cfg=cfg, objective=objective, optimizer=instantiate(opt_cfg), compile="auto")
        torch.manual_seed(0)
        clock = StepClock()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=n_batches, logger=CSVLogger(log_dir), enable_checkpointing=False,
            log_every_n_steps=10, gradient_clip_val=1.0, gradient_clip_algorithm="norm", num_sanity_val_steps=0,
            limit_val_batches=0, callbacks=[clock], enable_model_summary=False,
        )
        trainer.fit(stage, train_dataloaders=loader())
        return intervals(clock.stamps)

    runs: dict[str, list[float]] = {"bare": [], "lightning-minimal": [], "bare+clip": [], "lightning-default": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            pairs = [("bare", lambda: bare(False)), ("lightning-minimal", lightning_minimal),
                     ("bare+clip", lambda: bare(True)), ("lightning-default", lambda: lightning_default(tmp))]
            for name, fn in pairs if r % 2 == 0 else reversed(pairs):
                runs[name] += fn()
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = []
    for base, lit, what in (("bare", "lightning-minimal", "minimal LightningModule, logging off"),
                            ("bare+clip", "lightning-default", "PretrainStage, default trainer settings (clip 1.0, CSV logging)")):
        rows.append({
            "bench": "lightning-overhead", "setting": what, "shape": f"{args.layers}x{args.width} seq{args.seq} b{args.batch}",
            "bare_ms": round(1e3 * med[base], 1), "lightning_ms": round(1e3 * med[lit], 1),
            "overhead_pct": round(100 * (med[lit] / med[base] - 1), 2), "steps_each": len(runs[lit]), **machine_info(),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(rows, [k for k in rows[0] if k not in ("machine", "cpus", "torch")])


def parse(mode: str, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"benchmark.py {mode}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="cpu: process CPU time, steadier on a shared machine with --threads 1 (counts spinning threads otherwise)")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmark" / mode, help="writes OUT.json and OUT.md")
    if mode == "train-vs-hf":
        p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"])
        p.add_argument("--compile", action="store_true", help="add a torch.compile'd lmforge row")
        p.add_argument("--full-logits", action="store_true", help="add an lmforge row with objective.fused_loss=false")
        p.add_argument("--torch-kernels", action="store_true", help="add an lmforge row with cpu_kernels=torch (A/B of lmforge/kernels)")
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--steps", type=int, default=4, help="timed steps per contender per round")
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--same-process", action="store_true",
                       help="all contenders in this process (the default runs each in a fresh one per round: one side's "
                            "freed memory then cannot change what the other's allocations cost)")
        p.add_argument("--child", nargs=2, metavar=("NAME", "PRECISION"), help=argparse.SUPPRESS)
    else:
        p.add_argument("--rounds", type=int, default=3, help="fits of each contender, alternating")
        p.add_argument("--steps", type=int, default=12, help="timed steps per fit")
        p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def main(mode: str, argv: list[str]) -> list[dict[str, Any]]:
    from lmforge.utils.bench_report import append_results, print_rows

    global now
    args = parse(mode, argv)
    now = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_vs_hf(args) if mode == "train-vs-hf" else bench_lightning(args)
    if not rows:  # a --child run: its JSON line is the output
        return rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    print_rows(rows, f"lmforge {mode}", vertical=True)
    append_results(rows, ROOT)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return rows
