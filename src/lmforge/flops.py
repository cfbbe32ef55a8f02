"""FLOPs per token and device peaks: the one place MFU's numerator and denominator come from."""

from __future__ import annotations

import torch

# Dense (non-sparse) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets.
BF16_PEAK_FLOPS: dict[str, float] = {
    "h100 sxm": 989e12,
    "h100 nvl": 835e12,
    "h100 pcie": 756e12,
    "h100": 989e12,  # plain "NVIDIA H100 80GB HBM3" reads as SXM
    "h200 nvl": 836e12,
    "h200": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l40": 181e12,
    "l4": 121e12,
    "a10g": 70e12,
}

# Dense fp8 (E4M3/E5M2) tensor-core peaks; GPUs without fp8 tensor cores (A100, A10G) are absent.
FP8_PEAK_FLOPS: dict[str, float] = {
    "h100 sxm": 1979e12,
    "h100 nvl": 1671e12,
    "h100 pcie": 1513e12,
    "h100": 1979e12,
    "h200 nvl": 1671e12,
    "h200": 1979e12,
    "gh200": 1979e12,
    "b200": 4500e12,
    "l40s": 733e12,
    "l40": 362e12,
    "l4": 242.5e12,
}
PEAK_TABLES = {"bf16": BF16_PEAK_FLOPS, "fp8": FP8_PEAK_FLOPS}


def gpt_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N (forward + backward matmuls) + 12·L·d·T attention (PaLM, appendix B).

    `n_params` excludes position embeddings; a tied token embedding counts, because it is also the LM head.
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6N + attention for any family: N = params a token touches (MoE: `active_params()`, the routed top-k
    experts only); attention width = n_head·head_dim; an encoder-decoder counts both stacks' layers."""
    cfg = model.config
    n_params = model.active_params() if hasattr(model, "active_params") else model.num_params(non_embedding=True)
    n_layer = cfg.n_layer
    if getattr(cfg, "kind", "decoder") == "encoder_decoder":
        n_layer += getattr(cfg, "n_decoder_layer", None) or cfg.n_layer
    head_dim = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
    return gpt_flops_per_token(n_params, n_layer, cfg.n_head * head_dim, seq_len)


def peak_flops_for_name(name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s for a device name (as torch.cuda.get_device_name gives it) and dtype (bf16 | fp8)."""
    table = PEAK_TABLES[dtype]
    name = name.lower()
    for key in sorted(table, key=len, reverse=True):  # most specific name first
        if key in name:
            return table[key]
    return None


def device_peak_flops(device: torch.device, dtype: str = "bf16") -> float | None:
    """Peak of a CUDA device by name; None when unknown (CPU: pass callbacks.throughput.peak_flops)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)
