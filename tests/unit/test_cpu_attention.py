"""lmforge.kernels.cpu_attention: bf16 causal attention as GEMMs is as accurate as torch's SDPA (both
against a float64 reference from the same bf16 inputs), runs where `attend` should route it, and nowhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import clm_step_with_kernels

from lmforge.kernels import cpu_attention, cpu_kernels, dropout_mask, workspace
from lmforge.models.layers import attention_backends


@pytest.fixture(autouse=True)
def _restore_kernels():
    before = cpu_kernels.cpu_kernels()
    yield
    cpu_kernels.set_cpu_kernels(before)


def _inputs(B: int, H: int, H_kv: int, T: int, D: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=gen).mul(1.5).bfloat16() for h in (H, H_kv, H_kv))
    g = torch.randn(B, H, T, D, generator=gen).bfloat16()
    return q, k, v, g


def _run(fn, q, k, v, g, dtype):
    leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(g.to(dtype))
    return out.detach().double(), [t.grad.double() for t in leaves]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


@pytest.mark.parametrize(("B", "H", "H_kv", "T", "D"), [(2, 4, 4, 64, 32), (3, 4, 2, 33, 16), (1, 2, 1, 130, 64), (1, 2, 2, 300, 16)])
def test_output_and_gradients_are_as_accurate_as_sdpa(B, H, H_kv, T, D):
    """MHA, GQA and odd lengths: relative errors against float64 within 1.5x of SDPA's bf16 kernel's (~2e-3 to
    5e-3: bf16 rounding; the output's is ~1.3x, as P is rounded to bf16 before P·V, which FlashAttention-2 does
    and torch's CPU kernel does not), and all outputs bf16 like SDPA's."""
    q, k, v, g = _inputs(B, H, H_kv, T, D)
    ref_out, ref_grads = _run(_sdpa, q, k, v, g, torch.float64)
    sdpa_out, sdpa_grads = _run(_sdpa, q, k, v, g, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = cpu_attention.gemm_attention(*leaves)
    out.backward(g)
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in leaves)
    ours = [out.detach().double()] + [t.grad.double() for t in leaves]
    theirs = [sdpa_out] + sdpa_grads
    for name, got, sdpa, ref in zip(("out", "dq", "dk", "dv"), ours, theirs, [ref_out] + ref_grads, strict=True):
        assert got.shape == ref.shape, name
        assert _rel(got, ref) <= 1.5 * _rel(sdpa, ref) + 1e-4, (name, _rel(got, ref), _rel(sdpa, ref))
        assert _rel(got, ref) < 1e-2, name


def _reference_with_mask(q, k, v, g, keep, p):
    """float64 causal attention whose probabilities are dropped by `keep` and scaled by 1 / (1 - p_effective)."""
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    qd, kd, vd = leaves
    group = qd.size(1) // kd.size(1)
    kd, vd = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    T = qd.size(-2)
    scores = (qd @ kd.transpose(-1, -2) * qd.size(-1) ** -0.5).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) * keep / (1 - dropout_mask.drop_probability(p)) @ vd
    out.backward(g.double())
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize(("B", "H", "H_kv", "T", "D", "p"), [(2, 4, 4, 64, 32, 0.1), (3, 4, 2, 33, 16, 0.5), (1, 2, 1, 260, 16, 0.1)])
def test_attention_dropout_equals_a_float64_reference_with_the_same_mask(B, H, H_kv, T, D, p):
    """Output and gradients within bf16 rounding of float64 attention dropped by the very mask the kernel drew (the
    first draw after seeding); a wrong mask, scale or d(scores) term would be off by O(1)."""
    q, k, v, g = _inputs(B, H, H_kv, T, D)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(11)
    out = cpu_attention.gemm_attention(*leaves, dropout_p=p)
    out.backward(g)
    torch.manual_seed(11)
    keep = dropout_mask.keep_mask((B * H, T, T), p).view(B, H, T, T)
    ref = _reference_with_mask(q, k, v, g, keep, p)
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves], ref, strict=True):
        assert _rel(got.double(), want) < 1e-2, (name, _rel(got.double(), want))


def test_query_blocks_cover_every_row_once_and_stop_the_keys_at_their_last_row():
    assert cpu_attention.query_blocks(1) == [(0, 1)] and cpu_attention.query_blocks(128) == [(0, 128)]
    assert cpu_attention.query_blocks(256) == [(0, 128), (128, 256)]
    for T in (129, 300, 1000, 1024):
        blocks = cpu_attention.query_blocks(T)
        assert blocks[0][0] == 0 and blocks[-1][1] == T and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert max(r1 - r0 for r0, r1 in blocks) - min(r1 - r0 for r0, r1 in blocks) <= 1  # even
        assert all(r1 - r0 <= cpu_attention.BLOCK_ROWS for r0, r1 in blocks) and len(blocks) == -(-T // cpu_attention.BLOCK_ROWS)


@pytest.mark.parametrize("T", [40, 300])
def test_blocks_give_the_one_block_result(T, monkeypatch):
    """Query blocks (T = 300: three) against one block over all keys (the masked scores computed, then zeroed by
    softmax): within bf16 rounding of each other (the GEMMs sum over other key counts, so in another order, and the
    earlier blocks' parts of d(k) and d(v) are added to the last block's: ~2e-3 relative in norm); one block is
    the same computation bit for bit."""
    q, k, v, g = _inputs(2, 3, 3, T, 16, seed=7)
    one_block = len(cpu_attention.query_blocks(T)) == 1
    blocked = _run(cpu_attention.gemm_attention, q, k, v, g, torch.bfloat16)
    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", 1 << 20)
    whole = _run(cpu_attention.gemm_attention, q, k, v, g, torch.bfloat16)
    for name, got, want in zip(("out", "dq", "dk", "dv"), [blocked[0], *blocked[1]], [whole[0], *whole[1]], strict=True):
        assert _rel(got, want) < 2**-8, (name, _rel(got, want))
        assert torch.equal(got, want) or not one_block, name


def test_packed_attention_dropout_equals_the_split_entry_point():
    B, H, T, D = 2, 3, 32, 8
    qkv = torch.randn(B, T, 3 * H * D, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_(True)
    torch.manual_seed(2)
    packed = cpu_attention.packed_gemm_attention(qkv, H, 0.2)
    q, k, v = (t.contiguous() for t in qkv.detach().view(B, T, 3, H, D).permute(2, 0, 3, 1, 4))
    torch.manual_seed(2)
    split = cpu_attention.gemm_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(packed, split.transpose(1, 2).reshape(B, T, H * D))


def test_backward_remakes_forward_dropped_probabilities_exactly():
    """Forward's dropped P (P·V's operand) is rounded from the bf16 P backward keeps, so backward's Pᵀ·dO operand is the
    same tensor, compiled or eager (inductor would otherwise skip the bf16 round trip: ~20% of entries one unit off)."""
    probs32 = torch.softmax(torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(4)) * 3, -1)
    keep = dropout_mask.keep_mask(probs32.shape, 0.2).view(torch.uint8)
    keep_scale = dropout_mask.keep_scale(0.2)
    probs, dropped = cpu_attention._DROPOUT_PROBS(probs32, keep, keep_scale)
    assert torch.equal(cpu_attention._DROPPED_PROBS(probs, keep, keep_scale), dropped)
    eager_probs, eager_dropped = cpu_attention._dropout_probs(probs32, keep, keep_scale)
    assert torch.equal(probs, eager_probs) and torch.equal(dropped, eager_dropped)


def test_dropout_masks_drop_p_are_seeded_and_new_each_call():
    assert dropout_mask.drop_probability(0.1) == 6554 / 65536 and dropout_mask.drop_probability(0.0) == 0.0
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_mask.drop_threshold(1.0)
    torch.manual_seed(0)
    first, second = dropout_mask.keep_mask((64, 128, 128), 0.1), dropout_mask.keep_mask((64, 128, 128), 0.1)
    n = first.numel()
    dropped = 1 - first.float().mean().item()
    assert abs(dropped - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5  # 4 sigma
    assert (first != second).any()
    torch.manual_seed(0)
    assert torch.equal(dropout_mask.keep_mask((64, 128, 128), 0.1), first)
    bits = dropout_mask.random_bits((1 << 20,))  # all 16 bits uniform: the sign bit too
    assert abs((bits < 0).float().mean().item() - 0.5) < 0.005 and abs((bits & 1).float().mean().item() - 0.5) < 0.005


def test_scores_use_float32_accumulation_not_bf16_outputs():
    """With scores rounded to bf16 (a plain bf16 bmm) the error is ~10x SDPA's; here it must not be."""
    q, k, v, g = _inputs(2, 2, 2, 128, 64, seed=3)
    q = q * 4  # large logits: bf16-rounded scores would visibly perturb the softmax
    ref_out, _ = _run(_sdpa, q, k, v, g, torch.float64)
    scores_bf16 = (q @ k.transpose(-1, -2)) * 64**-0.5  # bf16 output
    mask = torch.ones(128, 128, dtype=torch.bool).tril()
    naive = torch.softmax(scores_bf16.float().masked_fill(~mask, float("-inf")), -1).bfloat16() @ v
    ours = cpu_attention.gemm_attention(q, k, v)
    assert _rel(ours.double(), ref_out) < 0.25 * _rel(naive.double(), ref_out)


def test_attend_routes_plain_causal_bf16_cpu_calls_and_nothing_else(monkeypatch):
    calls = []
    real = cpu_attention.gemm_attention
    monkeypatch.setattr(cpu_attention, "gemm_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, _ = _inputs(2, 4, 2, 16, 8)

    def routed(*args, **kwargs) -> bool:
        before = len(calls)
        out = attention_backends.attend(*args, enable_gqa=True, **kwargs)
        assert out.shape == args[1].shape
        return len(calls) > before

    assert routed("sdpa", q, k, v, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 q/k (Llama's RoPE) that autocast casts for SDPA
        assert routed("sdpa", q.float(), k.float(), v, None)
    assert not routed("sdpa", q, k, v, torch.ones(1, 1, 16, 16, dtype=torch.bool).tril())  # an explicit mask tensor
    assert routed("sdpa", q, k, v, None, dropout_p=0.1)  # attention dropout inside the kernel
    assert not routed("sdpa", q.float(), k.float(), v.float(), None)  # float32, no autocast
    assert not routed("sdpa", q[:, :, -1:], k, v, None)  # one decode step over a cache
    monkeypatch.setattr(cpu_attention, "MAX_SAVED_BYTES", 2 * 4 * 16 * 16 * 2 - 1)  # P over the memory cap
    assert not routed("sdpa", q, k, v, None)
    monkeypatch.setattr(cpu_attention, "MAX_SAVED_BYTES", 256 << 20)
    cpu_kernels.set_cpu_kernels("torch")
    assert not routed("sdpa", q, k, v, None)


def test_the_mkldnn_precision_flag_is_restored_even_after_an_error():
    flags = torch.backends.mkldnn.matmul
    before = flags.fp32_precision
    q, k, v, _ = _inputs(1, 2, 2, 8, 4)
    cpu_attention.gemm_attention(q, k, v)
    assert flags.fp32_precision == before
    with pytest.raises(RuntimeError), cpu_attention._bf16_products():
        assert flags.fp32_precision == "bf16"
        raise RuntimeError("boom")
    assert flags.fp32_precision == before


def test_reused_workspaces_give_the_same_result_across_shapes():
    """Calls of different shapes in a row share the scratch buffers: each result equals a fresh computation."""
    first = _inputs(2, 2, 2, 32, 8, seed=1)[:3]
    second = _inputs(1, 3, 3, 20, 8, seed=2)[:3]
    a1 = cpu_attention.gemm_attention(*first)
    b1 = cpu_attention.gemm_attention(*second)
    a2 = cpu_attention.gemm_attention(*first)
    assert torch.equal(a1, a2)
    torch.testing.assert_close(b1.float(), _sdpa(*second).float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_bf16_training_step_matches_torch_sdpa_to_bf16_accuracy(family, monkeypatch):
    """The same training step under bf16 autocast with lmforge's CPU kernels and with torch's (GPT; Llama with
    GQA and float32 RoPE outputs): every layer took the GEMM path, and loss and gradients agree to what bf16
    rounding allows."""
    calls = []
    for name in ("gemm_attention", "packed_gemm_attention"):  # GPT's fused qkv takes the packed entry point
        real = getattr(cpu_attention, name)
        monkeypatch.setattr(cpu_attention, name, lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    cfg = {"family": family, "n_layer": 2, "n_head": 4, "n_embd": 64, "max_seq_len": 32, "vocab_size": 96, "dropout": 0.0}
    if family == "llama":
        cfg["n_kv_head"] = 2
    loss_ours, grads_ours = clm_step_with_kernels(cfg, "lmforge", bf16=True)
    loss_torch, grads_torch = clm_step_with_kernels(cfg, "torch", bf16=True)
    assert len(calls) == 2  # both layers, lmforge run only
    assert abs(loss_ours - loss_torch) < 1e-2
    flat = [torch.cat([g.flatten() for g in grads.values()]).double() for grads in (grads_ours, grads_torch)]
    assert _rel(*flat) < 2e-2


def test_concurrent_calls_leave_the_process_wide_precision_flag_as_it_was():
    """Threads attending at once (a threaded server) must not leave oneDNN's bf32 flag set for later float32 matmuls."""
    from concurrent.futures import ThreadPoolExecutor

    flags = torch.backends.mkldnn.matmul
    before = flags.fp32_precision
    inputs = [_inputs(2, 2, 2, 48, 16, seed=s)[:3] for s in range(4)]
    expected = [cpu_attention.gemm_attention(*qkv) for qkv in inputs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            results = list(pool.map(lambda qkv: cpu_attention.gemm_attention(*qkv), inputs))
            assert all(torch.equal(r, e) for r, e in zip(results, expected, strict=True))
    assert flags.fp32_precision == before


def test_scratch_buffers_over_the_cap_are_not_kept(monkeypatch):
    """A long-sequence call must not leave score-sized buffers held for the rest of the process."""
    monkeypatch.setattr(workspace, "_LOCAL", __import__("threading").local())
    q, k, v, _ = _inputs(1, 2, 2, 64, 8)
    cpu_attention.gemm_attention(q, k, v)
    kept = workspace._LOCAL.buffers
    assert {"scores0", "probs0"} <= kept.keys()
    monkeypatch.setattr(workspace, "MAX_KEPT_BYTES", 2 * 64 * 64 * 4)  # a (2, 96, 96) fp32 buffer is over it
    longer = _inputs(1, 2, 2, 96, 8, seed=1)[:3]
    out = cpu_attention.gemm_attention(*longer)
    assert not ({"scores0", "probs0"} & kept.keys())
    torch.testing.assert_close(out.float(), _sdpa(*longer).float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("autocast", [True, False])
def test_the_packed_entry_point_equals_splitting_q_k_v_first(autocast, monkeypatch):
    """GPT's attention hands its fused (B, T, 3C) projection to `packed_gemm_attention`: the same numbers, output and
    every gradient bit for bit, as splitting q, k, v into per-head views for `gemm_attention` (bf16 weights, or float32
    under bf16 autocast); a mask, a KV cache, captured weights or dropout take the split path."""
    from lmforge.models.layers.attention import CausalSelfAttention

    torch.manual_seed(0)
    layer = CausalSelfAttention(48, 4, 0.0, True).train()
    if not autocast:
        layer = layer.bfloat16()
    x = torch.randn(2, 140, 48, dtype=torch.float32 if autocast else torch.bfloat16)  # two query blocks
    g = torch.randn(2, 140, 48).bfloat16()
    packed, split = [], []
    for name, record in (("packed_gemm_attention", packed), ("gemm_attention", split)):
        real = getattr(cpu_attention, name)
        monkeypatch.setattr(cpu_attention, name, lambda *a, real=real, record=record, **kw: record.append(1) or real(*a, **kw))

    def step(use_packed: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(cpu_attention, "packed_usable", real_usable if use_packed else lambda *a: False)
        layer.zero_grad()
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(leaf)
        out.backward(g.to(out.dtype))
        return [out.detach(), leaf.grad, *(p.grad for p in layer.parameters())]

    real_usable = cpu_attention.packed_usable
    ours, reference = step(True), step(False)
    assert (len(packed), len(split)) == (1, 1)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    monkeypatch.setattr(cpu_attention, "packed_usable", real_usable)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x, mask=torch.ones(1, 1, 140, 140, dtype=torch.bool).tril())
        layer.capture_weights = True
        layer(x)
        layer.capture_weights = False
        assert len(packed) == 1  # neither an explicit mask nor captured weights take the packed kernel
        layer.dropout = 0.1
        layer(x)
    assert len(packed) == 2  # attention dropout does: it runs inside the kernel


def test_bf16_as_the_default_dtype_leaves_the_float32_causal_bias_alone():
    """`trainer.precision=bf16-true` makes bf16 torch's default dtype during the step: the causal bias must still be
    float32 (the scores' dtype), or the fused scores GEMM refuses mixed dtypes. Same result as under float32."""
    q, k, v, g = _inputs(1, 2, 2, 48, 16, seed=3)  # a length no earlier test cached a bias for
    cpu_attention._CAUSAL_BIAS.pop(48, None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        out = cpu_attention.gemm_attention(q, k, v)
    finally:
        torch.set_default_dtype(default)
    torch.testing.assert_close(out, cpu_attention.gemm_attention(q, k, v), rtol=0, atol=0)
