"""Back-of-the-envelope scaling arithmetic: compute-optimal sizes, predicted losses, memory, time, energy.

Pure functions with the paper each formula comes from, so a plan ("70B on 64 H100s, how long, how much
memory per GPU, how many kWh?") can be checked before anything is launched. `scripts/scaling_laws.py` is
the CLI; `lmforge.scaling_fit` fits these laws to one's own runs.

References:
- Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361).
- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla, arXiv:2203.15556).
- Chowdhery et al. 2022, "PaLM" (arXiv:2204.02311), appendix B: FLOPs per token with attention.
- Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
  (arXiv:1910.02054), section 3.1 and figure 1: mixed-precision Adam memory per parameter.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from lmforge.flops import BF16_PEAK_FLOPS, FP8_PEAK_FLOPS, gpt_flops_per_token

# --- Chinchilla (Hoffmann et al. 2022) -------------------------------------------------------------------

CHINCHILLA_TOKENS_PER_PARAM = 20.0
# Approach 3 fit, eq. (2) / section 3.3: L(N, D) = E + A / N^alpha + B / D^beta (N params, D tokens, nats).
CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B = 1.69, 406.4, 410.7
CHINCHILLA_ALPHA, CHINCHILLA_BETA = 0.34, 0.28

# --- Kaplan et al. 2020, table 5 / eqs. (1.1)-(1.5) --------------------------------------------------------
KAPLAN_NC, KAPLAN_ALPHA_N = 8.8e13, 0.076  # non-embedding params
KAPLAN_DC, KAPLAN_ALPHA_D = 5.4e13, 0.095  # tokens


class Budget(NamedTuple):
    """A training plan: parameters, tokens and total training FLOPs (C = 6ND)."""

    params: float
    tokens: float
    flops: float


def training_flops(params: float, tokens: float) -> float:
    """C = 6·N·D: forward (2N) + backward (4N) matmul FLOPs per token (Kaplan et al. 2020, section 2.1)."""
    return 6.0 * params * tokens


def flops_per_token(
    params: float, n_layer: int | None = None, d_model: int | None = None, seq_len: int | None = None
) -> float:
    """6N, plus PaLM's 12·L·d·T attention term (Chowdhery et al. 2022, app. B) when the shape is given."""
    if n_layer is None or d_model is None or seq_len is None:
        return 6.0 * params
    return gpt_flops_per_token(int(params), n_layer, d_model, seq_len)


def chinchilla_optimal(
    compute_flops: float | None = None,
    params: float | None = None,
    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM,
) -> Budget:
    """The "20 tokens per parameter" rule (Hoffmann et al. 2022, table 3 rounded): with D = k·N and C = 6ND,
    a compute budget C gives N = sqrt(C / 6k); a model size N gives D = k·N. Exactly one input is expected."""
    if (compute_flops is None) == (params is None):
        raise ValueError("pass exactly one of compute_flops or params")
    if compute_flops is not None:
        n = math.sqrt(compute_flops / (6.0 * tokens_per_param))
        return Budget(n, tokens_per_param * n, compute_flops)
    assert params is not None
    d = tokens_per_param * params
    return Budget(params, d, training_flops(params, d))


def chinchilla_optimal_fitted(compute_flops: float) -> Budget:
    """Compute-optimal N, D from the approach-3 parametric loss (Hoffmann et al. 2022, eq. 4):
    N_opt = G·(C/6)^(β/(α+β)), G = (αA / βB)^(1/(α+β)), D_opt = (C/6) / N_opt. Smaller N than the 20x rule."""
    a, b = CHINCHILLA_ALPHA, CHINCHILLA_BETA
    g = (a * CHINCHILLA_A / (b * CHINCHILLA_B)) ** (1.0 / (a + b))
    n = g * (compute_flops / 6.0) ** (b / (a + b))
    return Budget(n, compute_flops / 6.0 / n, compute_flops)


def chinchilla_loss(params: float, tokens: float) -> float:
    """Predicted loss (nats/token on MassiveText) of the approach-3 fit: E + A/N^α + B/D^β."""
    return CHINCHILLA_E + CHINCHILLA_A / params**CHINCHILLA_ALPHA + CHINCHILLA_B / tokens**CHINCHILLA_BETA


def kaplan_loss(params: float | None = None, tokens: float | None = None) -> float:
    """Kaplan et al. 2020 (nats/token on WebText2; N = non-embedding params): L(N) = (N_c/N)^α_N when only
    N is given, L(D) = (D_c/D)^α_D when only D, and L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (eq. 1.5)."""
    if params is None and tokens is None:
        raise ValueError("pass params, tokens or both")
    if tokens is None:
        return (KAPLAN_NC / params) ** KAPLAN_ALPHA_N
    if params is None:
        return (KAPLAN_DC / tokens) ** KAPLAN_ALPHA_D
    return ((KAPLAN_NC / params) ** (KAPLAN_ALPHA_N / KAPLAN_ALPHA_D) + KAPLAN_DC / tokens) ** KAPLAN_ALPHA_D


# --- Memory (ZeRO, Rajbhandari et al. 2020) ----------------------------------------------------------------

PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12  # bf16 params, bf16 grads, fp32 master + Adam m + v


def memory_breakdown(
    params: float, zero_stage: int = 0, n_gpus: int = 1, offload: bool = False
) -> dict[str, float]:
    """Bytes per GPU of params / grads / optimizer states for mixed-precision Adam (ZeRO section 3.1:
    2 + 2 + 12 = 16 bytes per parameter). Stage 1 shards the optimizer states over the n_gpus data-parallel
    ranks, stage 2 also the grads, stage 3 also the params. `offload` (ZeRO-Offload) keeps optimizer states
    and grads in CPU memory. Activations, buffers and fragmentation are not counted: a model-state floor."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    shard = [1.0, 1.0, 1.0]  # params, grads, optimizer: the fraction each GPU holds
    for i in range(3 - zero_stage, 3):  # stage 1 shards index 2 (optimizer), stage 2 also 1, stage 3 also 0
        shard[i] = 1.0 / n_gpus
    out = {
        "params": PARAM_BYTES * params * shard[0],
        "grads": GRAD_BYTES * params * shard[1],
        "optimizer": OPTIMIZER_BYTES * params * shard[2],
    }
    if offload:
        out["grads"] = out["optimizer"] = 0.0
    return out


def training_memory_bytes(
    params: float, zero_stage: int = 0, n_gpus: int = 1, offload: bool = False
) -> float:
    """Model-state bytes per GPU (see `memory_breakdown`): 16·N at stage 0; 7.5B params on 64 GPUs need
    120 / 31.4 / 16.6 / 1.9 GB at stages 0-3 (ZeRO figure 1)."""
    return sum(memory_breakdown(params, zero_stage, n_gpus, offload).values())


def memory_table(params: float, n_gpus: int) -> list[dict[str, float | int | str]]:
    """One row per ZeRO stage (0-3) with the per-GPU breakdown in GB, for the CLI and README tables."""
    names = {0: "DDP (no sharding)", 1: "ZeRO-1 (optimizer)", 2: "ZeRO-2 (+grads)", 3: "ZeRO-3 (+params)"}
    rows: list[dict[str, float | int | str]] = []
    for stage in range(4):
        parts = memory_breakdown(params, stage, n_gpus)
        rows.append(
            {
                "zero_stage": stage,
                "sharding": names[stage],
                **{f"{k}_gb": v / 1e9 for k, v in parts.items()},
                "total_gb": sum(parts.values()) / 1e9,
            }
        )
    return rows


# --- Time and energy ---------------------------------------------------------------------------------------

# bf16 and fp8 dense peaks come from lmforge.flops (the MFU tables; a GPU absent from the fp8 table has no fp8
# tensor cores); board power (W, max TDP) lives here, as it serves planning only.
BOARD_POWER_W: dict[str, float] = {
    "h100 sxm": 700.0,
    "h100 nvl": 400.0,
    "h100 pcie": 350.0,
    "h100": 700.0,
    "h200 nvl": 600.0,
    "h200": 700.0,
    "b200": 1000.0,
    "a100": 400.0,  # SXM; the PCIe card is 250-300 W
    "l40s": 350.0,
    "l40": 300.0,
    "l4": 72.0,
}


class GPUSpec(NamedTuple):
    name: str
    bf16_flops: float | None
    fp8_flops: float | None
    watts: float | None


def gpu_spec(name: str) -> GPUSpec:
    """Peaks and power of a GPU by name ("h100", "H100-SXM", "h100_pcie"); the most specific key wins."""
    norm = name.lower().replace("-", " ").replace("_", " ").strip()
    keys = set(BF16_PEAK_FLOPS) | set(FP8_PEAK_FLOPS) | set(BOARD_POWER_W)
    for key in sorted(keys, key=len, reverse=True):
        if key in norm:
            return GPUSpec(key, BF16_PEAK_FLOPS.get(key), FP8_PEAK_FLOPS.get(key), BOARD_POWER_W.get(key))
    raise KeyError(f"unknown GPU {name!r}; known: {', '.join(sorted(keys))}")


def training_time_hours(total_flops: float, n_gpus: int, peak_flops_per_gpu: float, mfu: float) -> float:
    """Wall-clock hours at a model FLOPs utilisation `mfu` (PaLM's MFU: useful FLOPs over peak FLOPs)."""
    if n_gpus < 1 or peak_flops_per_gpu <= 0 or not 0 < mfu <= 1:
        raise ValueError("need n_gpus >= 1, peak_flops_per_gpu > 0 and 0 < mfu <= 1")
    return total_flops / (n_gpus * peak_flops_per_gpu * mfu) / 3600.0


def energy_kwh(n_gpus: int, hours: float, watts_per_gpu: float, pue: float = 1.1) -> float:
    """Facility energy: GPUs at board power × datacenter PUE (the overhead of cooling and power delivery).
    An upper-bound-ish estimate: host CPUs and network are left out, GPUs rarely sit at full TDP."""
    return n_gpus * hours * watts_per_gpu * pue / 1000.0


def human(x: float, unit: str = "") -> str:
    """70e9 -> '70B', 1.4e12 -> '1.4T'; FLOPs and anything past 1e15 in e-notation ('5.76e23 FLOPs')."""
    if unit == "FLOPs" or abs(x) >= 1e15:
        return f"{x:.3g}".replace("e+", "e") + (f" {unit}" if unit else "")
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def co2_kg(kwh: float, grid_g_per_kwh: float = 400.0) -> float:
    """Operational emissions from the grid's carbon intensity (g CO2e/kWh; ~400 is a world-ish average)."""
    return kwh * grid_g_per_kwh / 1000.0
