"""Fit a scaling law to finished runs and plot loss against compute.

    python scripts/fit_scaling.py logs/scaling_ladder/multiruns/<ts>            # a multirun dir
    python scripts/fit_scaling.py "logs/scaling_ladder/multiruns/*/*" --out ladder.png
    python scripts/fit_scaling.py logs/scaling_ladder --metric val/loss --form "L(N,D)" --json

For each run: N = non-embedding parameters (Kaplan et al. 2020; the model rebuilt from its config.yaml on
the meta device), D = max_steps × batch × block (× accumulation × devices), the final `--metric` from
metrics.json. Fits L(N) = E + A/N^α, or L(N, D) = E + A/N^α + B/D^β when the token budgets differ
(lmforge.scaling_fit). The plot (matplotlib) shows loss against C = 6·N_flops·D with the fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.scaling import human  # noqa: E402
from lmforge.scaling_fit import Fit, RunPoint, fit_runs, read_run  # noqa: E402
from lmforge.utils.runs import find_run_dirs  # noqa: E402


def _flops_params(points: list[RunPoint]) -> Any:
    """Non-embedding N -> the N of 6ND (+ the embedding) by a smooth log-log fit through the runs: the fit is in
    the one, the compute axis in the other, and the embedding's share shrinks as models grow."""
    import numpy as np

    log_n = np.log([p.n_params for p in points])
    degree = min(2, len({p.n_params for p in points}) - 1)
    coef = np.polyfit(log_n, np.log([p.n_params_flops for p in points]), degree)
    return lambda n: np.exp(np.polyval(coef, np.log(n)))


def plot(points: list[RunPoint], fit: Fit | None, out: Path, metric: str) -> None:
    """Loss vs compute on log-x axes: the runs, and the fitted law — a curve over N for a fixed token budget,
    one curve per budget (and the compute-optimal frontier) for L(N, D)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install matplotlib (or pass --no-plot)") from None
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({p.tokens for p in points})
    by_budget = fit is not None and fit.form == "L(N,D)"
    for k, d in enumerate(budgets if by_budget else [None]):
        group = [p for p in points if d is None or p.tokens == d]
        ax.scatter(
            [p.flops for p in group],
            [p.loss for p in group],
            color=f"C{k}",
            zorder=3,
            label=f"runs, D = {human(d)} tokens" if d else "runs",
        )
    for p in points:
        ax.annotate(p.label, (p.flops, p.loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fit is not None:
        tokens = np.array([p.tokens for p in points], dtype=float)
        sizes = {p.n_params for p in points}
        log_n = np.log(sorted(sizes))
        n = np.exp(np.linspace(log_n[0] - 0.5, log_n[-1] + 0.5, 100))
        n_flops = _flops_params(points)(n) if len(sizes) > 1 else None
        if by_budget and n_flops is not None:
            for k, d in enumerate(budgets):
                ax.plot(6 * n_flops * d, fit.predict(n, np.full_like(n, d)), color=f"C{k}", lw=1.2)
            # the frontier: at each compute C, the best split of C = 6·N·D over the sizes on the grid
            c = np.logspace(
                *np.log10([6 * n_flops[0] * budgets[0] / 3, 6 * n_flops[-1] * budgets[-1] * 3]), 80
            )
            d_grid = c[:, None] / (6 * n_flops[None, :])
            frontier = fit.predict(np.broadcast_to(n, d_grid.shape), d_grid).min(axis=1)
            ax.plot(c, frontier, "k--", lw=1, label=f"compute-optimal: {_label(fit)}")
        elif (
            fit.form == "L(N)" and len(set(tokens)) == 1 and n_flops is not None
        ):  # a fixed budget: one curve
            ax.plot(6 * n_flops * tokens[0], fit.predict(n), color="C1", label=_label(fit))
        else:
            order = np.argsort([p.flops for p in points])
            pred = fit.predict(
                [points[i].n_params for i in order], tokens[order] if fit.form == "L(N,D)" else None
            )
            ax.plot(
                [points[i].flops for i in order], pred, "o--", color="C1", markersize=3, label=_label(fit)
            )
        ax.axhline(fit.params["E"], color="grey", lw=0.8, ls=":", label=f"E = {fit.params['E']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6·N·D (FLOPs)")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _label(fit: Fit) -> str:
    p = fit.params
    text = f"{p['E']:.2f} + {p['A']:.3g}/N^{p['alpha']:.3f}"
    return text + (f" + {p['B']:.3g}/D^{p['beta']:.3f}" if fit.form == "L(N,D)" else "")


def print_report(points: list[RunPoint], fit: Fit | None, metric: str, note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the run paths into 80 columns
        console = Console(width=max(console.width, 140))
    runs = Table(title=f"Runs ({metric})")
    for col in ("run", "model", "N non-emb", "N FLOPs", "D", "C = 6ND", metric, "fit"):
        runs.add_column(col, justify="left" if col in ("run", "model") else "right")
    preds = (
        fit.predict([p.n_params for p in points], [p.tokens for p in points]) if fit else [None] * len(points)
    )
    for p, pred in zip(points, preds):
        runs.add_row(
            _short(p.run_dir),
            p.label,
            human(p.n_params),
            human(p.n_params_flops),
            human(p.tokens),
            f"{p.flops:.3g}",
            f"{p.loss:.4f}",
            "" if pred is None else f"{pred:.4f}",
        )
    console.print(runs)
    if fit is not None:
        table = Table(
            title=f"{fit.form} fit", caption=f"{fit.n_points} runs, rmse {fit.rmse:.4f}, {fit.backend}"
        )
        table.add_column("parameter")
        table.add_column("value", justify="right")
        table.add_column("± std err", justify="right")
        for key, value in fit.params.items():
            table.add_row(key, f"{value:.4g}", f"{fit.stderr[key]:.2g}")
        console.print(table)
    if note:
        console.print(note)


def _short(run_dir: str) -> str:
    parts = Path(run_dir).parts
    return "/".join(parts[-3:]) if "logs" not in parts else "/".join(parts[parts.index("logs") + 1 :])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run dirs, globs, or parents to search for config.yaml")
    ap.add_argument("--metric", default="val/loss", help="final metric to fit (default val/loss, nats/token)")
    ap.add_argument(
        "--form",
        choices=("auto", "L(N)", "L(N,D)"),
        default="auto",
        help="auto: L(N,D) when token budgets differ and there are 6+ runs, else L(N)",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="plot path (default <first run's parent>/scaling_fit.png)"
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run_dirs = find_run_dirs(args.runs)
    points = []
    for run_dir in run_dirs:
        try:
            point = read_run(run_dir, args.metric)
        except Exception as err:  # a config this version cannot build: report it, go on
            print(f"skipping {run_dir}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        if point is not None:
            points.append(point)
    skipped = len(run_dirs) - len(points)
    if not points:
        raise SystemExit(f"no finished runs with {args.metric} under {' '.join(args.runs)}")
    points.sort(key=lambda p: p.flops)
    sizes, budgets = len({p.n_params for p in points}), len({p.tokens for p in points})
    fit, note = None, ""
    if args.form == "L(N,D)" and (len(points) < 5 or sizes < 2 or budgets < 2):
        note = f"{len(points)} runs, {sizes} sizes, {budgets} token budgets: too few for L(N,D); runs only"
    elif sizes < 3:
        note = f"{sizes} distinct model size(s): too few to fit L(N) = E + A/N^α; plotting the runs only"
    else:
        fit = fit_runs(points, args.form)
        if fit.form == "L(N)" and len({p.tokens for p in points}) > 1:
            note = "token budgets differ: an L(N) fit mixes them (use 6+ runs for L(N,D), or --form)"
    if skipped:
        note = (
            note + "\n" if note else ""
        ) + f"skipped {skipped} run dir(s): no final {args.metric} or no model"
    out = args.out or Path(points[0].run_dir).parent / "scaling_fit.png"
    if not args.no_plot:
        plot(points, fit, out, args.metric)
    result = {
        "metric": args.metric,
        "runs": [
            {
                "run_dir": p.run_dir,
                "label": p.label,
                "n_params": p.n_params,
                "n_params_flops": p.n_params_flops,
                "tokens": p.tokens,
                "flops": p.flops,
                "loss": p.loss,
            }
            for p in points
        ],
        "fit": fit.to_dict() if fit else None,
        "plot": None if args.no_plot else str(out),
        "note": note,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(points, fit, args.metric, note)
        if not args.no_plot:
            print(f"plot: {out}")
    return result


if __name__ == "__main__":
    main()
