"""Fit scaling laws to one's own runs: L(N) = E + A/N^α, and L(N, D) = E + A/N^α + B/D^β when tokens vary.

The forms are Hoffmann et al. 2022 (Chinchilla, eq. 2); N is Kaplan et al. 2020's non-embedding parameter
count. Fits run in (E, ln A, α, ln B, β) — well conditioned for A in the thousands — with scipy's
`curve_fit` when scipy is importable, else a small Levenberg-Marquardt of our own; standard errors come from
the Jacobian (σ² (JᵀJ)⁻¹, σ² = SSE / (points - parameters)), mapped back to A, B by the delta method.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.models.counting import build_on_meta
from lmforge.models.counting import param_counts as count_params
from lmforge.utils.runs import final_metrics, load_config


@dataclass
class Fit:
    form: str  # "L(N)" or "L(N,D)"
    params: dict[str, float]  # E, A, alpha (+ B, beta)
    stderr: dict[str, float]
    rmse: float
    n_points: int
    backend: str = "scipy"

    def predict(self, n: Any, d: Any = None) -> np.ndarray:
        p = self.params
        out = p["E"] + p["A"] / np.asarray(n, dtype=float) ** p["alpha"]
        if self.form == "L(N,D)":
            if d is None:
                raise ValueError("an L(N,D) fit needs tokens to predict")
            out = out + p["B"] / np.asarray(d, dtype=float) ** p["beta"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "params": self.params,
            "stderr": self.stderr,
            "rmse": self.rmse,
            "n_points": self.n_points,
            "backend": self.backend,
        }


def _model(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and Jacobian in θ = (E, a, α[, b, β]) with A = e^a, B = e^b."""
    term_n = np.exp(theta[1] - theta[2] * log_n)
    cols = [np.ones_like(log_n), term_n, -log_n * term_n]
    pred = theta[0] + term_n
    if log_d is not None:
        term_d = np.exp(theta[3] - theta[4] * log_d)
        cols += [term_d, -log_d * term_d]
        pred = pred + term_d
    return pred, np.stack(cols, axis=1)


def _bounds(y: np.ndarray, n_params: int) -> tuple[np.ndarray, np.ndarray]:
    """Physical ranges: 0 <= E <= min loss (the irreducible part cannot exceed any observed loss),
    0 <= exponents <= 3, |ln A|, |ln B| <= 60. Without them a poorly spread ladder fits E < 0."""
    lower = np.array([0.0, -60.0, 0.0, -60.0, 0.0])[:n_params]
    upper = np.array([float(y.min()), 60.0, 3.0, 60.0, 3.0])[:n_params]
    return lower, upper


def _levenberg_marquardt(
    theta: np.ndarray, y: np.ndarray, log_n: np.ndarray, log_d: np.ndarray | None, iters: int = 500
) -> np.ndarray:
    """The fallback least squares: damped Gauss-Newton steps projected into the bounds, damping raised on a
    worse step, lowered on a better one."""
    lower, upper = _bounds(y, len(theta))
    theta = np.clip(theta, lower, upper)
    lam = 1e-3
    with np.errstate(all="ignore"):
        return _lm_loop(theta, y, log_n, log_d, lower, upper, lam, iters)


def _lm_loop(
    theta: np.ndarray,
    y: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray | None,
    lower: np.ndarray,
    upper: np.ndarray,
    lam: float,
    iters: int,
) -> np.ndarray:
    pred, jac = _model(theta, log_n, log_d)
    sse = float(np.sum((y - pred) ** 2))
    for _ in range(iters):
        jtj, jtr = jac.T @ jac, jac.T @ (y - pred)
        try:
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), jtr)
        except np.linalg.LinAlgError:
            break
        new = np.clip(theta + step, lower, upper)
        new_pred, new_jac = _model(new, log_n, log_d)
        new_sse = float(np.sum((y - new_pred) ** 2))
        if np.isfinite(new_sse) and new_sse < sse:
            converged = sse - new_sse < 1e-14 * max(sse, 1e-30)
            theta, pred, jac, sse, lam = new, new_pred, new_jac, new_sse, max(lam / 3, 1e-12)
            if converged:
                break
        else:
            lam *= 4
            if lam > 1e12:
                break
    return theta


def _starts(y: np.ndarray, log_n: np.ndarray, log_d: np.ndarray | None) -> list[np.ndarray]:
    """Initial points: for a grid of E (and of α, β with D) the rest is linear in ln(y - E) or in (A, B)."""
    starts = []
    for e in np.linspace(0.0, 0.98 * float(y.min()), 25):
        if log_d is None:
            slope, intercept = np.polyfit(log_n, np.log(y - e), 1)
            starts.append(np.array([e, intercept, -slope]))
            continue
        for alpha in (0.1, 0.3, 0.6):
            for beta in (0.1, 0.3, 0.6):
                basis = np.stack([np.exp(-alpha * log_n), np.exp(-beta * log_d)], axis=1)
                coef = np.linalg.lstsq(basis, y - e, rcond=None)[0]
                coef = np.maximum(coef, 1e-6)
                starts.append(np.array([e, math.log(coef[0]), alpha, math.log(coef[1]), beta]))
    return starts


def _sse(theta: np.ndarray, y: np.ndarray, log_n: np.ndarray, log_d: np.ndarray | None) -> float:
    with np.errstate(all="ignore"):
        pred, _ = _model(theta, log_n, log_d)
        value = float(np.sum((y - pred) ** 2))
    return value if np.isfinite(value) else math.inf


def fit_scaling_law(
    n: Sequence[float], loss: Sequence[float], d: Sequence[float] | None = None, use_scipy: bool | None = None
) -> Fit:
    """Fit L(N) = E + A/N^α, or L(N, D) = E + A/N^α + B/D^β when `d` is given. Needs more points than
    parameters (4+ for L(N), 6+ for L(N,D)) for standard errors; with exactly as many they are inf."""
    y = np.asarray(loss, dtype=float)
    log_n = np.log(np.asarray(n, dtype=float))
    log_d = None if d is None else np.log(np.asarray(d, dtype=float))
    n_params = 3 if log_d is None else 5
    if len(y) < n_params:
        raise ValueError(f"{len(y)} points cannot determine {n_params} parameters")
    if use_scipy is None:
        try:
            import scipy.optimize  # noqa: F401

            use_scipy = True
        except ImportError:
            use_scipy = False
    lower, upper = _bounds(y, n_params)
    starts = [np.clip(t, lower, upper) for t in _starts(y, log_n, log_d)]
    starts = sorted(starts, key=lambda t: _sse(t, y, log_n, log_d))[:5]
    best, best_sse = starts[0], math.inf
    for start in starts:
        theta = (
            _refine_scipy(start, y, log_n, log_d)
            if use_scipy
            else _levenberg_marquardt(start, y, log_n, log_d)
        )
        sse = _sse(theta, y, log_n, log_d)
        if sse < best_sse:
            best, best_sse = theta, sse
    _, jac = _model(best, log_n, log_d)
    dof = len(y) - n_params
    try:
        cov = (
            (best_sse / dof) * np.linalg.inv(jac.T @ jac)
            if dof > 0
            else np.full((n_params, n_params), np.inf)
        )
    except np.linalg.LinAlgError:
        cov = np.full((n_params, n_params), np.inf)
    se = np.sqrt(np.abs(np.diag(cov)))
    params = {"E": float(best[0]), "A": math.exp(best[1]), "alpha": float(best[2])}
    stderr = {"E": float(se[0]), "A": params["A"] * float(se[1]), "alpha": float(se[2])}
    if log_d is not None:
        params.update(B=math.exp(best[3]), beta=float(best[4]))
        stderr.update(B=params["B"] * float(se[3]), beta=float(se[4]))
    rmse = math.sqrt(best_sse / len(y))
    return Fit(
        "L(N)" if log_d is None else "L(N,D)", params, stderr, rmse, len(y), "scipy" if use_scipy else "numpy"
    )


def _refine_scipy(
    theta: np.ndarray, y: np.ndarray, log_n: np.ndarray, log_d: np.ndarray | None
) -> np.ndarray:
    from scipy.optimize import curve_fit

    def f(_x: np.ndarray, *t: float) -> np.ndarray:
        return _model(np.asarray(t), log_n, log_d)[0]

    def jac(_x: np.ndarray, *t: float) -> np.ndarray:
        return _model(np.asarray(t), log_n, log_d)[1]

    lower, upper = _bounds(y, len(theta))
    p0 = np.clip(theta, lower + 1e-9, upper - 1e-9)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # covariance warnings: the errors are computed by the caller
            theta, _ = curve_fit(
                f, np.arange(len(y)), y, p0=p0, jac=jac, bounds=(lower, upper), max_nfev=2000
            )
    except (RuntimeError, ValueError):  # no convergence from this start: the caller tries the others
        theta = p0
    return np.asarray(theta, dtype=float)


# --- runs -> points ----------------------------------------------------------------------------------------


@dataclass
class RunPoint:
    """One finished run as a point of a scaling plot."""

    run_dir: str
    n_params: int  # non-embedding (Kaplan): no token/position embeddings, no LM head
    n_params_flops: int  # the N of 6N FLOPs per token (lmforge.flops: a tied embedding counts as the head)
    tokens: int
    loss: float
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params_flops * self.tokens


def param_counts(model_cfg: dict[str, Any]) -> tuple[int, int]:
    """(non-embedding params, FLOPs params) of a model config, built on the meta device (no memory)."""
    return _param_counts(json.dumps(model_cfg, sort_keys=True))


@functools.cache
def _param_counts(model_json: str) -> tuple[int, int]:
    model = build_on_meta(json.loads(model_json))
    n_flops = model.active_params() if hasattr(model, "active_params") else model.num_params(non_embedding=True)
    return int(count_params(model)["params_non_embedding"]), int(n_flops)


def tokens_seen(cfg: dict[str, Any], last_step: float | None = None) -> int:
    """Training tokens: steps × batch_size × block_size × grad accumulation × devices × nodes. `last_step`
    (the CSV log's last step) replaces max_steps for a run that stopped early."""
    trainer, data = cfg.get("trainer", {}), cfg.get("data", {})
    steps = int(trainer.get("max_steps") or 0)
    if last_step is not None and (steps <= 0 or last_step + 1 < steps):
        steps = int(last_step) + 1
    devices = trainer.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    per_step = data["batch_size"] * data["block_size"] * int(trainer.get("accumulate_grad_batches") or 1)
    return int(steps * per_step * devices * int(trainer.get("num_nodes") or 1))


def read_run(run_dir: Path, metric: str = "val/loss") -> RunPoint | None:
    """A RunPoint from a run dir's config.yaml + final metrics; None when the run logged no `metric`."""
    metrics = final_metrics(run_dir)
    if metric not in metrics:
        return None
    cfg = load_config(run_dir)
    n_params, n_flops = param_counts(cfg["model"])
    model = cfg["model"]
    label = f"{model.get('family', '?')} {model.get('n_layer', '?')}x{model.get('n_embd', '?')}"
    return RunPoint(
        str(run_dir), n_params, n_flops, tokens_seen(cfg, metrics.get("step")), metrics[metric], label
    )


def fit_runs(points: Sequence[RunPoint], form: str = "auto") -> Fit:
    """L(N) over the runs, or L(N,D) when `form` says so or ("auto") tokens vary and there are 6+ runs."""
    n = [p.n_params for p in points]
    loss = [p.loss for p in points]
    d = [p.tokens for p in points]
    if form == "auto":
        form = "L(N,D)" if len(set(d)) > 1 and len(points) >= 6 else "L(N)"
    return fit_scaling_law(n, loss, d if form == "L(N,D)" else None)
