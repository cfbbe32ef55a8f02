"""lmforge.kernels.linear: float32 CPU linears on oneDNN give F.linear's values and gradients, run where
they should (counted through the dispatcher) and step aside where another owner has the matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import clm_step_with_kernels
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.errors import ConfigError
from lmforge.kernels import cpu_kernels
from lmforge.kernels import linear as lin

pytestmark = pytest.mark.skipif(not lin.ONEDNN_AVAILABLE, reason="this torch build has no oneDNN linear op")


class CountGemms(TorchDispatchMode):
    """Counts oneDNN linears and aten matmuls run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.onednn = self.aten = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.mkldnn._linear_pointwise:
            self.onednn += 1
        elif func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.aten += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _restore_gemm(monkeypatch):
    """Every GEMM here is small: route them all (the size floor has its own test)."""
    monkeypatch.setattr(lin, "MIN_MACS", 0)
    before = cpu_kernels.cpu_kernels()
    yield
    cpu_kernels.set_cpu_kernels(before)


def _operands(shape: tuple[int, ...], d_in: int, d_out: int, bias: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, d_in, generator=gen, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, generator=gen, dtype=torch.float64) if bias else None
    g = torch.randn(*shape, d_out, generator=gen, dtype=torch.float64)
    return x, w, b, g


def _grads(fn, x, w, b, g):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out.detach(), [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize(("shape", "d_in", "d_out", "bias"), [((4, 33), 48, 80, True), ((70,), 96, 40, False), ((2, 3, 5), 17, 9, True)])
def test_values_and_gradients_match_float64_as_closely_as_f_linear(shape, d_in, d_out, bias):
    """Both wide (out > in: grad_w takes the transposed route) and narrow (out < in) layers, 2-D and 3-D inputs."""
    x, w, b, g = _operands(shape, d_in, d_out, bias)
    ref_out, ref_grads = _grads(F.linear, x, w, b, g)  # float64: the reference
    f32 = [t.float() if t is not None else None for t in (x, w, b)]
    with CountGemms() as count:
        out, grads = _grads(lin.linear, *f32, g.float())
    assert count.onednn == 3 and count.aten == 0  # forward, grad of x, grad of w: all three on oneDNN
    _, aten_grads = _grads(F.linear, *f32, g.float())
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    for got, aten, ref in zip(grads, aten_grads, ref_grads, strict=True):
        assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))
        torch.testing.assert_close(got, aten, rtol=0, atol=1e-5 * max(1.0, float(aten.abs().max())))


def test_only_the_inputs_that_need_gradients_get_them():
    x, w, b, g = (t.float() for t in _operands((8,), 16, 24, True))
    weight = w.clone().requires_grad_(True)
    with CountGemms() as count:
        lin.linear(x, weight, b).backward(g)  # frozen input and bias (a first layer, a frozen bias)
    assert count.onednn == 2  # forward + grad of w; no grad-of-x GEMM
    torch.testing.assert_close(weight.grad, g.t() @ x, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("a_shape", "b_shape"), [((64, 300), (64, 20)), ((64, 20), (64, 300)), ((0, 5), (0, 7))])
def test_gemm_tn_both_routes_and_empty(a_shape, b_shape):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(*a_shape, generator=gen), torch.randn(*b_shape, generator=gen)
    out = lin.gemm_tn(a, b)
    assert out.is_contiguous() and out.shape == (a_shape[1], b_shape[1])
    torch.testing.assert_close(out.double(), a.double().t() @ b.double(), rtol=1e-6, atol=1e-5)  # float32 of sums of 64
    torch.testing.assert_close(lin.gemm_nt(b.t().contiguous(), a.t()), (a.t() @ b).t(), rtol=0, atol=1e-5)


def test_steps_aside_under_autocast_for_other_dtypes_and_when_switched_off():
    x, w, b, _ = (t.float() if t is not None else None for t in _operands((16,), 32, 8, True))
    layer = lin.Linear(32, 8)
    with CountGemms() as count, torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's bf16 matmul, as nn.Linear
    assert count.onednn == 0
    with CountGemms() as count:
        lin.linear(x.double(), w.double(), b.double())
        lin.linear(x.bfloat16(), w.bfloat16())
        lin.linear(x[:0], w)  # no rows
    assert count.onednn == 0
    cpu_kernels.set_cpu_kernels("torch")
    assert cpu_kernels.cpu_kernels() == "torch" and not cpu_kernels.enabled()
    with CountGemms() as count:
        out = lin.linear(x, w, b)
    assert count.onednn == 0 and count.aten == 1
    torch.testing.assert_close(out, F.linear(x, w, b))


def test_gemms_below_the_size_floor_stay_on_aten(monkeypatch):
    """A decode step's few rows on a narrow model: oneDNN's per-call cost would lose, so MKL keeps them."""
    monkeypatch.setattr(lin, "MIN_MACS", 1 << 20)
    w = torch.randn(384, 384)
    with CountGemms() as count:
        lin.linear(torch.randn(1, 384), w)  # 147K multiply-adds
        lin.linear(torch.randn(2, 3, 384), w)
        lin.gemm_nt(torch.randn(4, 384), w)
        lin.gemm_tn(torch.randn(4, 384), torch.randn(4, 384))
    assert count.onednn == 0 and count.aten == 4
    with CountGemms() as count:
        lin.linear(torch.randn(8, 64, 384), w)  # 75M multiply-adds
        lin.gemm_tn(torch.randn(512, 384), torch.randn(512, 384))
    assert count.onednn == 2 and count.aten == 0


def test_unknown_setting_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="cpu_kernels.*lmforge, torch"):
        cpu_kernels.set_cpu_kernels("mkl")


def test_linear_is_a_drop_in_nn_linear():
    torch.manual_seed(0)
    ours, theirs = lin.Linear(12, 5), nn.Linear(12, 5)
    assert isinstance(ours, nn.Linear) and lin.is_plain_linear(ours) and lin.is_plain_linear(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_a_model_training_step_runs_its_linears_on_onednn_and_matches_aten():
    """GPT fp32 forward + backward: every Linear (and the chunked head + loss) on oneDNN, same loss and
    gradients as with torch's BLAS to float32 accuracy."""
    cfg = {"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 16, "vocab_size": 64, "dropout": 0.0}
    ours, theirs = CountGemms(), CountGemms()
    loss_ours, grads_ours = clm_step_with_kernels(cfg, "lmforge", context=ours)
    loss_torch, grads_torch = clm_step_with_kernels(cfg, "torch", context=theirs)
    assert theirs.onednn == 0 and ours.onednn >= 2 * 4 * 3 + 3  # 4 Linears per block x 3 GEMMs, plus the head's chunk GEMMs
    assert abs(loss_ours - loss_torch) < 1e-6
    for name, g in grads_torch.items():
        torch.testing.assert_close(grads_ours[name], g, rtol=0, atol=1e-6, msg=name)
