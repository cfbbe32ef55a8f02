"""Plan a training run on paper: compute-optimal size, tokens, FLOPs, memory per GPU, time, energy, CO2.

    python scripts/scaling_laws.py --params 70e9                   # Chinchilla: 1.4T tokens, 5.9e23 FLOPs
    python scripts/scaling_laws.py --compute 5.76e23 --gpus 64     # compute-optimal N, D for Gopher's budget
    python scripts/scaling_laws.py --params 70e9 --tokens 2e12 --gpus 2048 --gpu a100 --mfu 0.4 --zero-stage 3
    python scripts/scaling_laws.py --params 1e9 --gpus 8 --gpu h100 --dtype fp8 --json

Any two of --params / --tokens / --compute fix the third (C = 6ND); one alone is completed by the
20-tokens-per-parameter rule. Formulas and their papers: lmforge.scaling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge import scaling  # noqa: E402
from lmforge.scaling import human  # noqa: E402


def resolve_budget(
    params: float | None, tokens: float | None, compute: float | None, ratio: float
) -> scaling.Budget:
    given = sum(v is not None for v in (params, tokens, compute))
    if given == 0:
        raise SystemExit("pass at least one of --params, --tokens, --compute")
    if given == 3:
        raise SystemExit("pass at most two of --params, --tokens, --compute (C = 6ND fixes the third)")
    if params is not None and tokens is not None:
        return scaling.Budget(params, tokens, scaling.training_flops(params, tokens))
    if compute is not None and params is not None:
        return scaling.Budget(params, compute / (6 * params), compute)
    if compute is not None and tokens is not None:
        return scaling.Budget(compute / (6 * tokens), tokens, compute)
    if tokens is not None:
        return scaling.chinchilla_optimal(params=tokens / ratio, tokens_per_param=ratio)
    return scaling.chinchilla_optimal(compute_flops=compute, params=params, tokens_per_param=ratio)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    budget = resolve_budget(args.params, args.tokens, args.compute, args.tokens_per_param)
    n, d, c = budget
    try:
        spec = scaling.gpu_spec(args.gpu)
    except KeyError as err:
        raise SystemExit(err.args[0]) from None
    peak = args.peak_flops or (spec.fp8_flops if args.dtype == "fp8" else spec.bf16_flops)
    if peak is None:
        raise SystemExit(f"{spec.name} has no {args.dtype} peak in the table: pass --peak-flops")
    watts = args.watts or spec.watts
    hours = scaling.training_time_hours(c, args.gpus, peak, args.mfu)
    kwh = scaling.energy_kwh(args.gpus, hours, watts, args.pue) if watts else None
    optimal = scaling.chinchilla_optimal(compute_flops=c, tokens_per_param=args.tokens_per_param)
    fitted = scaling.chinchilla_optimal_fitted(c)
    return {
        "params": n,
        "tokens": d,
        "flops": c,
        "tokens_per_param": d / n,
        "gpu": spec.name,
        "dtype": args.dtype,
        "n_gpus": args.gpus,
        "peak_flops_per_gpu": peak,
        "mfu": args.mfu,
        "hours": hours,
        "days": hours / 24,
        "gpu_hours": hours * args.gpus,
        "watts_per_gpu": watts,
        "pue": args.pue,
        "kwh": kwh,
        "grid_g_per_kwh": args.grid,
        "co2_kg": scaling.co2_kg(kwh, args.grid) if kwh is not None else None,
        "zero_stage": args.zero_stage,
        "offload": args.offload,
        "memory_gb_per_gpu": scaling.training_memory_bytes(n, args.zero_stage, args.gpus, args.offload) / 1e9,
        "memory_table": scaling.memory_table(n, args.gpus),
        "chinchilla_20x": {"params": optimal.params, "tokens": optimal.tokens},
        "chinchilla_fitted": {"params": fitted.params, "tokens": fitted.tokens},
        "loss_chinchilla": scaling.chinchilla_loss(n, d),
        "loss_kaplan": scaling.kaplan_loss(n, d),
    }


def print_plan(p: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Training plan", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    rows = [
        ("parameters (N)", human(p["params"])),
        ("tokens (D)", f"{human(p['tokens'])}  ({p['tokens_per_param']:.1f} tokens/param)"),
        ("compute (6ND)", human(p["flops"], "FLOPs")),
        (
            "hardware",
            f"{p['n_gpus']} × {p['gpu']} at {human(p['peak_flops_per_gpu'])}FLOP/s {p['dtype']}, "
            f"MFU {p['mfu']:.0%}",
        ),
        ("wall clock", f"{p['hours']:,.1f} h = {p['days']:,.1f} days ({human(p['gpu_hours'])} GPU-hours)"),
        (
            "model states / GPU",
            f"{p['memory_gb_per_gpu']:,.1f} GB (ZeRO stage {p['zero_stage']}"
            + (", offload" if p["offload"] else "")
            + "; activations not included)",
        ),
    ]
    if p["kwh"] is not None:
        rows += [
            ("energy", f"{p['kwh']:,.0f} kWh ({p['watts_per_gpu']:.0f} W/GPU, PUE {p['pue']})"),
            ("CO2e", f"{p['co2_kg'] / 1000:,.1f} t at {p['grid_g_per_kwh']:.0f} g/kWh"),
        ]
    rows += [
        (
            "Chinchilla 20x optimum",
            f"N = {human(p['chinchilla_20x']['params'])}, D = {human(p['chinchilla_20x']['tokens'])}",
        ),
        (
            "Chinchilla fitted optimum",
            f"N = {human(p['chinchilla_fitted']['params'])}, "
            f"D = {human(p['chinchilla_fitted']['tokens'])}  (approach 3)",
        ),
        (
            "predicted loss",
            f"{p['loss_chinchilla']:.3f} (Chinchilla fit, MassiveText), "
            f"{p['loss_kaplan']:.3f} (Kaplan, WebText2) nats/token",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    mem = Table(title=f"Model-state memory per GPU on {p['n_gpus']} GPUs (bf16 + fp32 Adam, GB)")
    for col in ("stage", "sharding", "params", "grads", "optimizer", "total"):
        mem.add_column(col, justify="left" if col == "sharding" else "right")
    for r in p["memory_table"]:
        mem.add_row(
            str(r["zero_stage"]),
            str(r["sharding"]),
            *(f"{r[k]:,.2f}" for k in ("params_gb", "grads_gb", "optimizer_gb", "total_gb")),
        )
    console.print(mem)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, help="parameters N, e.g. 70e9")
    ap.add_argument("--tokens", type=float, help="training tokens D, e.g. 1.4e12")
    ap.add_argument("--compute", type=float, help="training FLOPs C, e.g. 5.76e23")
    ap.add_argument("--tokens-per-param", type=float, default=scaling.CHINCHILLA_TOKENS_PER_PARAM)
    ap.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    ap.add_argument("--gpu", default="h100", help="GPU name for peak FLOP/s and power (default h100 = SXM)")
    ap.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="which dense peak to use")
    ap.add_argument("--peak-flops", type=float, help="override the GPU's peak FLOP/s")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    ap.add_argument("--watts", type=float, help="override the board power per GPU")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0)
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer states and grads on CPU")
    ap.add_argument(
        "--pue", type=float, default=1.1, help="datacenter power usage effectiveness (default 1.1)"
    )
    ap.add_argument(
        "--grid", type=float, default=400.0, help="grid carbon intensity, g CO2e/kWh (default 400)"
    )
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = plan(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_plan(result)
    return result


if __name__ == "__main__":
    main()
