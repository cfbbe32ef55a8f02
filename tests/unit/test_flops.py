"""MFU inputs: FLOPs/token formula vs a FLOP counter, device peak table, and precision=auto."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn

import lmforge.precision as precision_mod
from lmforge.flops import BF16_PEAK_FLOPS, device_peak_flops, gpt_flops_per_token, model_flops_per_token
from lmforge.models import GPT, GPTConfig
from lmforge.precision import resolve_precision

CONFIGS = [
    # n_layer, n_head, n_embd, T, vocab
    (2, 4, 128, 64, 512),
    (4, 6, 192, 128, 1000),
    (1, 2, 256, 256, 4096),
]


def _meta_gpt(n_layer: int, n_head: int, n_embd: int, T: int, vocab: int) -> GPT:
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, max_seq_len=T, vocab_size=vocab, attn_backend="eager")
    with torch.device("meta"):
        return GPT(cfg)


def _measured_per_token(model: GPT, B: int, T: int) -> float:
    with torch.device("meta"):
        x = torch.randint(0, model.config.vocab_size, (B, T))
    flops = measure_flops(model, lambda: model(x), lambda logits: logits.sum())
    return flops / (B * T)


@pytest.mark.parametrize("n_layer,n_head,n_embd,T,vocab", CONFIGS)
def test_formula_matches_flop_counter(n_layer: int, n_head: int, n_embd: int, T: int, vocab: int) -> None:
    model = _meta_gpt(n_layer, n_head, n_embd, T, vocab)
    B = 2
    measured = _measured_per_token(model, B, T)
    n_params = model.num_params(non_embedding=True)
    formula = gpt_flops_per_token(n_params, n_layer, n_embd, T)
    assert measured == pytest.approx(formula, rel=0.02)
    assert model_flops_per_token(model, T) == formula

    # exact decomposition: the counter sees only matmuls, so 6N's bias/LayerNorm share is the whole gap
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    exact = 6.0 * matmul_params + 12.0 * n_layer * n_embd * T
    assert measured == pytest.approx(exact, rel=1e-12)
    non_matmul = n_params - matmul_params  # biases + LayerNorms (tied wte is the lm_head's weight)
    assert formula - measured == pytest.approx(6.0 * non_matmul, rel=1e-9)


def test_formula_closed_form() -> None:
    assert gpt_flops_per_token(1000, 2, 16, 32) == 6 * 1000 + 12 * 2 * 16 * 32
    assert gpt_flops_per_token(0, 3, 8, 0) == 0.0
    # GPT-2 small at T=1024: ~6*85M + 12*12*768*1024
    assert gpt_flops_per_token(85_000_000, 12, 768, 1024) == pytest.approx(6 * 85e6 + 113_246_208)


def test_num_params_excludes_positions_and_counts_tied_head_once() -> None:
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, max_seq_len=5, vocab_size=11)
    with torch.device("meta"):
        m = GPT(cfg)
    d, V, T = 8, 11, 5
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * (2 * d)
    total = V * d + T * d + per_block + 2 * d
    assert m.num_params(non_embedding=False) == total
    assert m.num_params() == total - T * d


# --- device peaks -----------------------------------------------------------------------------------


def test_peak_none_on_cpu() -> None:
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("meta")) is None


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA B200", 2250e12),
        ("Tesla T4", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_by_cuda_name(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None) -> None:
    seen = []

    def fake_name(device: object = None) -> str:
        seen.append(device)
        return name

    monkeypatch.setattr(torch.cuda, "get_device_name", fake_name)
    assert device_peak_flops(torch.device("cuda", 0)) == peak
    assert seen and seen[0] == torch.device("cuda", 0)  # the name of the device asked about


def test_peak_table_values_are_flops() -> None:
    assert BF16_PEAK_FLOPS["h100"] == 989e12
    assert all(1e13 < v < 1e16 for v in BF16_PEAK_FLOPS.values())
    assert all(k == k.lower() for k in BF16_PEAK_FLOPS)  # matched against a lower-cased name


# --- precision=auto ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "16-mixed", 32, 16, "bf16-true", "64-true"])
def test_explicit_precision_passes_through(value: str | int) -> None:
    assert resolve_precision(value) == value
    assert resolve_precision(value, accelerator="cpu") is value


def test_auto_cpu_without_fast_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto") == "32-true"
    assert resolve_precision("auto", accelerator="cpu") == "32-true"


def test_auto_cpu_with_fast_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16-mixed"


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_cuda(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto") == expected
    assert resolve_precision("auto", accelerator="gpu") == expected
    # CUDA present but the run is pinned to CPU: the CPU rule applies
    assert resolve_precision("auto", accelerator="cpu") == "32-true"


def test_cpu_has_fast_bf16_reads_torch_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    class Probe:
        def __init__(self, amx: bool, avx: bool) -> None:
            self._is_amx_tile_supported = lambda: amx
            self._is_avx512_bf16_supported = lambda: avx

    for amx, avx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch, "cpu", Probe(amx, avx))  # where torch 2.13 has them
        assert precision_mod.cpu_has_fast_bf16() is expected
    monkeypatch.setattr(torch, "cpu", object())  # older torch: torch._C._cpu
    for amx, avx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch._C, "_cpu", Probe(amx, avx), raising=False)
        assert precision_mod.cpu_has_fast_bf16() is expected
    monkeypatch.setattr(torch._C, "_cpu", object(), raising=False)
    assert precision_mod.cpu_has_fast_bf16() is False


def test_cpu_bf16_probe_exists_in_this_torch() -> None:
    """The probe must not silently vanish again (torch 2.13 moved it out of torch._C._cpu, and `auto` fell back to
    fp32 on AVX512-BF16 machines without a word): it answers what /proc/cpuinfo says, where that file exists."""
    import pathlib

    assert any(callable(getattr(module, name, None)) for module in (torch.cpu, getattr(torch._C, "_cpu", None))
               for name in precision_mod.BF16_PROBES)
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists() and torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        flags = set(cpuinfo.read_text().split())
        assert precision_mod.cpu_has_fast_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_peak_tables_by_device_name_and_dtype() -> None:
    from lmforge.flops import BF16_PEAK_FLOPS, FP8_PEAK_FLOPS, peak_flops_for_name

    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", "fp8") == 1513e12
    assert peak_flops_for_name("NVIDIA H200", "fp8") == 1979e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", "fp8") is None  # no fp8 tensor cores
    assert peak_flops_for_name("Some CPU") is None
    for name, fp8 in FP8_PEAK_FLOPS.items():  # fp8 doubles the dense bf16 rate on every GPU that has it
        assert fp8 == pytest.approx(2 * BF16_PEAK_FLOPS[name], rel=0.02), name
