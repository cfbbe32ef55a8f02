"""int8 quantization (lmforge.generation.quantize): logits stay close to fp32, perplexity barely moves, and
only nn.Linear layers are replaced.

Tolerances. Per-output-channel absmax int8 rounds each weight by at most scale/2 = max|w_row|/254 (0.4% of
the row's largest weight); the rounding errors are independent, so they partly cancel in each dot product:
weight-only logits move by ~1% of the logits' standard deviation (measured 1.3-1.7% at the worst position,
0.3% on average), asserted at 5% / 1%. Dynamic quantization also rounds the activations to 1/255 of each
batch's range, so one outlier coarsens a whole batch: measured 1-4% on average, asserted at 10%, and the
argmax (greedy decoding's choice) kept at >= 90% of positions (measured >= 97.8%). Perplexity of a trained
model is what users see: measured within 0.2%, asserted within 1%.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.generation.quantize import Int8WeightOnlyLinear, quantizable_linears, quantize_model
from lmforge.kernels.linear import is_plain_linear
from lmforge.models import build

V = 64
FAMILIES = {
    "gpt": {"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "max_seq_len": 32, "vocab_size": V},
    "llama": {"family": "llama", "n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 64, "intermediate_size": 128,
              "max_seq_len": 32, "vocab_size": V},
    "mixtral": {"family": "mixtral", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "intermediate_size": 64,
                "max_seq_len": 32, "vocab_size": V, "n_expert": 4, "n_expert_per_token": 2},
}


def markov_data(n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences from a fixed peaked Markov chain: learnable in a few dozen steps, unlike random tokens."""
    trans = torch.softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 3, -1)
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(1, length):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def loss_of(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def trained_gpt() -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~10x faster than two on a shared 2-core machine
    try:
        torch.manual_seed(0)
        model = build(FAMILIES["gpt"])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = markov_data(60 * 16, 25, seed=1)
        for batch in data.split(16):
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < math.log(V) - 1.0  # it learned the chain
    return model.eval()


def relative_errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    d = (out - ref).abs() / ref.std()
    return d.max().item(), d.mean().item()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_int8_logits_close_to_fp32(family: str, trained_gpt: nn.Module):
    torch.manual_seed(0)
    model = trained_gpt if family == "gpt" else build(FAMILIES[family]).eval()
    x = markov_data(32, 25, seed=2)[:, :-1]
    with torch.no_grad():
        ref = model(x)
        weight_only = quantize_model(copy.deepcopy(model), "int8_weight")(x)
        dynamic = quantize_model(copy.deepcopy(model), "int8_dynamic")(x)
    worst, mean = relative_errors(ref, weight_only)
    assert worst < 0.05 and mean < 0.01, (worst, mean)
    worst, mean = relative_errors(ref, dynamic)
    assert mean < 0.10, (worst, mean)
    assert (dynamic.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_perplexity_change_is_small_on_a_trained_model(trained_gpt: nn.Module):
    val = markov_data(64, 25, seed=3)
    base = loss_of(trained_gpt, val)
    for mode in ("int8_weight", "int8_dynamic"):
        ratio = math.exp(loss_of(quantize_model(copy.deepcopy(trained_gpt), mode), val) - base)
        assert abs(ratio - 1) < 0.01, (mode, ratio)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["int8_weight", "int8_dynamic"])
def test_only_linear_layers_are_replaced(family: str, mode: str):
    model = build(FAMILIES[family]).eval()
    before = dict(model.named_modules())
    linears = quantizable_linears(model)
    assert linears and all(is_plain_linear(before[n]) for n in linears)
    assert not any(n.endswith("router") for n in linears)  # MoE routing stays exact
    params = {k: v.clone() for k, v in model.named_parameters() if k.rsplit(".", 1)[0] not in linears}
    quantize_model(model, mode)
    after = dict(model.named_modules())
    changed = {n for n, m in after.items() if n in before and type(m) is not type(before[n])}
    assert changed == set(linears)
    expected = Int8WeightOnlyLinear if mode == "int8_weight" else torch.ao.nn.quantized.dynamic.Linear
    assert all(isinstance(after[n], expected) for n in linears)
    now = dict(model.named_parameters())
    for k, v in params.items():  # embeddings (the tied one too), norms, routers: untouched
        assert torch.equal(now[k], v), k
    if mode == "int8_weight":
        assert all(after[n].qweight.dtype == torch.int8 for n in linears)


def test_int8_weight_keeps_bf16_activations():
    model = build(FAMILIES["llama"]).to(torch.bfloat16).eval()
    x = markov_data(2, 9, seed=4)[:, :-1]
    with torch.no_grad():
        ref = model(x).float()
        out = quantize_model(model, "int8_weight")(x)
    assert out.dtype == torch.bfloat16
    assert relative_errors(ref, out.float())[1] < 0.05


def test_bad_modes_are_one_clear_error():
    with pytest.raises(ConfigError, match="quantize: unknown mode 'int4'"):
        quantize_model(build(FAMILIES["gpt"]), "int4")
    with pytest.raises(ConfigError, match="quantize: int8_dynamic runs fp32 models on CPU only"):
        quantize_model(build(FAMILIES["gpt"]).to(torch.bfloat16), "int8_dynamic")
    model = build(FAMILIES["gpt"])
    assert quantize_model(model, None) is model and is_plain_linear(model.lm_head)
