"""lmforge.kernels.compiled and its users: the inductor-made CPU kernels (tanh-GELU, the chunked loss's softmax
gradient, attention's d(scores)) compute what torch's eager ops compute, run where they should, and fall
back to eager ops, with one warning, where compiling fails."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import clm_step_with_kernels
from torch.utils._python_dispatch import TorchDispatchMode

import lmforge.losses.linear_cross_entropy as lce
from lmforge.kernels import compiled, cpu_kernels, gelu

# inductor's CPU backend needs a C++ compiler (CXX, else g++/c++/clang++ on PATH); without one the kernels run
# eagerly (tested below with a broken compile), and the tests that check the compiled code itself are skipped
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="no C++ compiler for inductor on this machine",
)


@pytest.fixture(autouse=True)
def _restore_kernels():
    before = cpu_kernels.cpu_kernels()
    yield
    cpu_kernels.set_cpu_kernels(before)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (same-sign values; both bf16)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


@needs_cxx
def test_gelu_matches_torch_tanh_gelu_in_float32_forward_and_backward():
    x = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    y = gelu.gelu_tanh(x)
    y.backward(g)
    y_ref = F.gelu(x_ref, approximate="tanh")
    y_ref.backward(g)
    assert gelu._FORWARD.compiled is not None and not gelu._FORWARD.failed  # the compiled kernel ran
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)  # both sum terms ~1 where gelu' crosses 0


@needs_cxx
def test_gelu_in_bf16_rounds_as_torch_does_up_to_ties():
    """Both compute in float32 and round once: results differ only where the float32 values straddle a
    rounding tie (1 bf16 ulp, on a small fraction of elements), or by float32 rounding (1e-5) where the
    gradient crosses zero and a bf16 ulp is tiny."""
    x = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 3).bfloat16().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = gelu.gelu_tanh(x)
    y.backward(g)
    y_ref = F.gelu(x_ref, approximate="tanh")
    y_ref.backward(g)
    assert y.dtype == x.grad.dtype == torch.bfloat16
    for got, ref in ((y, y_ref), (x.grad, x_ref.grad)):
        same_sign = torch.sign(got.float()) == torch.sign(ref.float())
        near = (got.float() - ref.float()).abs() <= 1e-5
        ulps = torch.where(same_sign & ~near, _bf16_ulps(got.detach(), ref.detach()), 0)
        assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 0.01
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_gelu_uses_torch_where_the_compiled_kernel_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(gelu._GeluTanh, "apply", lambda x: calls.append(x) or F.gelu(x, approximate="tanh"))
    big = torch.randn(64, 1024)
    gelu.gelu_tanh(big)
    gelu.gelu_tanh(torch.randn(4, 16))  # a decoding step's few rows: the same kernel, so no batch-size-dependent rounding
    assert len(calls) == 2
    gelu.gelu_tanh(big.double())
    cpu_kernels.set_cpu_kernels("torch")
    gelu.gelu_tanh(big)
    assert len(calls) == 2


def test_gpt_mlp_uses_it_and_its_state_dict_is_unchanged():
    from lmforge.models.layers.mlp import GeluMLP

    mlp = GeluMLP(32, 128, 0.0, True)
    assert isinstance(mlp.act, gelu.GeluTanh)
    assert set(mlp.state_dict()) == {"fc.weight", "fc.bias", "proj.weight", "proj.bias"}


def test_a_failed_compile_warns_once_and_computes_eagerly(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = compiled.CompiledKernel(lambda x: x * 2)
    with pytest.warns(RuntimeWarning, match="could not compile the CPU kernel.*InvalidCxxCompiler.*apt install g.*cpu_kernels=torch"):
        assert torch.equal(kernel(torch.ones(3)), torch.full((3,), 2.0))
    assert kernel.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(kernel(torch.ones(2)), torch.full((2,), 2.0))


@needs_cxx
def test_a_kernel_under_a_dispatch_mode_is_one_custom_op_running_the_compiled_function(monkeypatch):
    """Selective activation checkpointing and FLOP counters run the model under a dispatch mode, where dynamo cannot
    trace: the mode sees one `lmforge::cpu_kernel_*` op (saved or recomputed whole), whose implementation runs
    below the mode and calls the compiled function; tuple results come back as tuples."""
    compiled_calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_calls.append(fn) or real_compile(fn, **kw))
    kernel = compiled.CompiledKernel(lambda x: torch.sigmoid(x) * x)
    pair = compiled.CompiledKernel(lambda x, y: (x + y, x * y))
    x, y = torch.randn(8), torch.randn(8)
    with _OpNames() as mode:
        out, (total, product) = kernel(x), pair(x, y)
    assert not {"sigmoid.default", "mul.Tensor", "add.Tensor"} & mode.names, mode.names
    assert sum(name.startswith("cpu_kernel_") for name in mode.names) == 2, mode.names
    assert len(compiled_calls) == 2
    assert torch.equal(out, kernel(x))  # the same compiled function with no mode active
    torch.testing.assert_close(out, torch.sigmoid(x) * x)  # inductor's sigmoid rounds its own way
    assert torch.equal(total, x + y) and torch.equal(product, x * y)


@needs_cxx
def test_gelu_under_a_dispatch_mode_is_the_compiled_kernel_bit_for_bit():
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_(True)
    g = torch.randn(64, 1024, generator=torch.Generator().manual_seed(4)).bfloat16()
    plain = gelu.gelu_tanh(x)
    plain.backward(g)
    plain_grad, x.grad = x.grad, None
    with _OpNames() as mode:
        under = gelu.gelu_tanh(x)
        under.backward(g)
    assert "gelu.default" not in mode.names and any(n.startswith("cpu_kernel_") for n in mode.names), mode.names
    assert torch.equal(under, plain) and torch.equal(x.grad, plain_grad)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_chunk_kernel_matches_the_eager_chunk(dtype):
    """Summed NLL and (softmax - onehot) on counted rows, 0 on ignored rows, against the eager in-place loop
    that every other device runs."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(96, 500, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, 500, (96,), generator=gen)
    targets[::7] = -100
    valid = (targets != -100).unsqueeze(1)
    nll, grad = lce._CHUNK_KERNEL(logits, torch.where(valid, targets.unsqueeze(1), 0), valid)
    nll_ref, grad_ref = lce._chunk_eager(logits, targets, -100, torch.float32, dtype, True, None, 0)
    assert lce._CHUNK_KERNEL.compiled is not None and not lce._CHUNK_KERNEL.failed
    assert grad.dtype == dtype and bool((grad[::7] == 0).all())
    torch.testing.assert_close(nll, nll_ref, rtol=1e-6, atol=1e-4)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of values below 1
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=0, atol=tol)


@needs_cxx
@pytest.mark.parametrize("bf16", [False, True])
def test_a_gpt_training_step_with_the_compiled_kernels_matches_torch_kernels(bf16):
    """The whole step (GELU, loss chunks, attention's d(scores) under bf16) against cpu_kernels=torch."""
    cfg = {"family": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64, "max_seq_len": 64, "vocab_size": 1000,
           "dropout": 0.0, "bias": True, "tie_embeddings": True, "attn_backend": "sdpa", "mlp_ratio": 4}
    loss, grads = clm_step_with_kernels(cfg, "lmforge", bf16=bf16)
    ref_loss, ref_grads = clm_step_with_kernels(cfg, "torch", bf16=bf16)
    assert gelu._FORWARD.compiled is not None and lce._CHUNK_KERNEL.compiled is not None
    if not bf16:
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        return
    assert loss == pytest.approx(ref_loss, rel=2e-3)
    for name, g in grads.items():  # bf16 rounding: relative error of each gradient tensor
        rel = float((g - ref_grads[name]).norm() / ref_grads[name].norm())
        assert rel < 3e-2, (name, rel)


@needs_cxx
def test_new_shapes_and_ranks_reuse_one_compiled_variant_per_dtype():
    """Dynamo's recompile limit (8 per function) must never be reached by a training process: activations of
    any rank and size go in flat, chunk row counts are dynamic, so each kernel compiles once per dtype."""
    entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    if entries is None:
        pytest.skip("this torch has no dynamo cache-entry listing")
    for kernel in (gelu._FORWARD, gelu._BACKWARD, lce._CHUNK_KERNEL):  # variants other tests' global states made
        torch._dynamo.reset_code(kernel.fn.__code__)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((64, 1024), (3, 77, 512), (2, 128, 2048)):
            x = torch.randn(*shape).to(dtype).requires_grad_(True)
            gelu.gelu_tanh(x).sum().backward()
        for rows in (96, 300, 1000):
            logits = torch.randn(rows, 700).to(dtype)
            valid = torch.ones(rows, 1, dtype=torch.bool)
            lce._CHUNK_KERNEL(logits, torch.zeros(rows, 1, dtype=torch.long), valid)
    for kernel in (gelu._FORWARD, gelu._BACKWARD, lce._CHUNK_KERNEL):
        assert not kernel.failed and len(entries(kernel.fn.__code__)) <= 2, kernel.fn.__name__


@needs_cxx
def test_outgrowing_dynamos_recompile_limit_recompiles_instead_of_going_eager(monkeypatch):
    """A long process meets more global states (thread counts, TF32, inference mode) than dynamo keeps
    variants for: the kernel drops its old variants and compiles again, and only gives up after MAX_RESETS."""
    kernel = compiled.CompiledKernel(lambda x: torch.sigmoid(x) * x)
    with torch._dynamo.config.patch(recompile_limit=2):  # (monkeypatch would delete the config key on undo)
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32):
            x = torch.randn(16).to(dtype)
            torch.testing.assert_close(kernel(x), torch.sigmoid(x) * x)
        assert not kernel.failed and kernel.resets >= 1
        monkeypatch.setattr(compiled, "MAX_RESETS", kernel.resets)
        with pytest.warns(RuntimeWarning, match="FailOnRecompileLimitHit"):
            for dtype in (torch.float64, torch.float16, torch.bfloat16):
                kernel(torch.randn(16).to(dtype))
    assert kernel.failed
