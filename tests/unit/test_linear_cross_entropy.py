"""The chunked LM head + cross-entropy equals `F.cross_entropy(head(h))`: value and gradients, every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.losses.linear_cross_entropy import chunk_rows, fusable, linear_cross_entropy
from lmforge.models import build
from lmforge.objectives.clm import CausalLM
from lmforge.objectives.prefix_lm import PrefixLM
from lmforge.peft.lora import LoraSettings, apply_lora


def reference(h: torch.Tensor, head: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).reshape(-1, head.out_features), t.reshape(-1), ignore_index=-100, reduction="sum")


def grads(loss: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, xs)


def case(dtype: torch.dtype, n: int = 37, d: int = 16, v: int = 50) -> tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    head = nn.Linear(d, v, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g, dtype=dtype))
    t = torch.randint(0, v, (n,), generator=g)
    t[[3, 7, 20]] = -100  # ignored rows get no loss and no gradient
    return h, head, t


@pytest.mark.parametrize("rows", [1, 5, 8, 64])  # chunk edges: one row, ragged last chunk, one chunk
def test_equals_reference_fp64_exactly(rows: int) -> None:
    h, head, t = case(torch.float64)
    ref = reference(h, head, t)
    out = linear_cross_entropy(h, head, t, rows=rows)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(grads(3.5 * out, h, head.weight), grads(3.5 * ref, h, head.weight), strict=True):  # scaled upstream grad
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("buffer_rows", [5, 10, 15, 64])  # one chunk per GEMM, 2 and 3 chunks (ragged end), all
@pytest.mark.parametrize("per_token", [False, True])
def test_weight_grad_gathered_over_chunks_equals_reference_fp64(buffer_rows: int, per_token: bool, monkeypatch) -> None:
    """d(weight) from chunks gathered into one GEMM per buffer: every buffer size, both chunked paths."""
    import lmforge.losses.linear_cross_entropy as lce

    monkeypatch.setattr(lce, "G_BUFFER_BYTES", buffer_rows * 50 * 8)  # rows of a (rows, V=50) float64 buffer
    h, head, t = case(torch.float64)
    if per_token:
        out = linear_cross_entropy(h, head, t, rows=5, reduction="none").sum()
    else:
        out = linear_cross_entropy(h, head, t, rows=5)
    ref = reference(h, head, t)
    for a, b in zip(grads(2.5 * out, h, head.weight), grads(2.5 * ref, h, head.weight), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_equals_reference_fp32_batched_targets() -> None:
    h, head, t = case(torch.float32, n=48)
    h3, t3 = h.view(4, 12, 16), t.view(4, 12)
    out, ref = linear_cross_entropy(h3, head, t3, rows=16), reference(h3, head, t3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-6)
    for a, b in zip(grads(out, h, head.weight), grads(ref, h, head.weight), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_grad_gives_the_loss_only() -> None:
    h, head, t = case(torch.float32)
    with torch.no_grad():
        out = linear_cross_entropy(h, head, t, rows=8)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference(h, head, t).detach(), atol=1e-4, rtol=1e-6)


def test_bf16_autocast_tracks_fp32() -> None:
    h, head, t = case(torch.float32, n=64, d=32, v=96)
    ref = reference(h, head, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, head, t, rows=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=0)
    gh, gw = grads(out, h, head.weight)
    assert gh.dtype == gw.dtype == torch.float32
    rh, rw = grads(ref, h, head.weight)
    assert torch.nn.functional.cosine_similarity(gw.flatten(), rw.flatten(), dim=0) > 0.999


def test_all_ignored_is_zero_with_zero_grads() -> None:
    h, head, t = case(torch.float32)
    out = linear_cross_entropy(h, head, torch.full_like(t, -100), rows=8)
    assert out.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads(out, h, head.weight))


def test_unfusable_heads_fall_back_to_the_module_call() -> None:
    h, head, t = case(torch.float32)
    with_bias = nn.Linear(16, 50)
    assert fusable(head) and not fusable(with_bias)
    torch.testing.assert_close(linear_cross_entropy(h, with_bias, t), reference(h, with_bias, t))


def test_chunk_rows_keeps_chunk_logits_near_hidden_size() -> None:
    assert chunk_rows(8192, 4096, 384) == 1024  # 11 pieces -> 745 rows -> next power of two
    assert chunk_rows(2048, 100, 384) == 2048  # head narrower than the width: one chunk
    assert chunk_rows(4096, 32000, 256) == 256  # 64 by the size rule, floored for GEMM efficiency
    assert chunk_rows(1, 128_256, 2048) == 256
    # GPUs: as many rows as 512 MB of float32 logits (a power of two), never more than the rows there are
    assert chunk_rows(16384, 50304, 768, "cuda") == 2048
    assert chunk_rows(8192, 128_256, 2048, "cuda") == 1024
    assert chunk_rows(8192, 32000, 2048, "cuda") == 4096
    assert chunk_rows(1000, 32000, 2048, "cuda") == 1024
    assert chunk_rows(8, 32000, 2048, "cuda") == 256
    assert chunk_rows(1 << 16, 4_000_000, 4096, "cuda") == 256  # a huge vocabulary: the GEMM-efficiency floor


def tiny_decoder(family: str) -> nn.Module:
    """A seeded 2-layer model of a decoder family, vocab 97 (GQA for Llama, 4 experts top-2 for Mixtral)."""
    torch.manual_seed(0)
    cfg = {"family": family, "vocab_size": 97, "n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 32}
    if family != "gpt":
        cfg |= {"n_kv_head": 2, "intermediate_size": 48}
    if family == "mixtral":
        cfg |= {"n_expert": 4, "n_expert_per_token": 2}
    return build(cfg)


@pytest.mark.parametrize("family", ["gpt", "llama", "mixtral"])
def test_objective_fused_equals_full_logits(family: str) -> None:
    """CLM through forward(targets=) gives the logits path's loss and every parameter's gradient (tied head too)."""
    model = tiny_decoder(family)
    ids = torch.randint(0, 97, (3, 17))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:].clone()}
    batch["targets"][2, 10:] = -100
    outs = []
    for fused in (True, False):
        out = CausalLM(fused_loss=fused)(model, batch)
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.nll_sum, b.nll_sum, atol=1e-4, rtol=0)
    assert a.n_tokens == b.n_tokens == 3 * 16 - 6
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-4, msg=name)


def test_prefix_lm_fused_equals_full_logits() -> None:
    torch.manual_seed(0)
    model = build({"family": "llama", "vocab_size": 61, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 16, "max_seq_len": 16})
    ids = torch.randint(0, 61, (2, 13))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    torch.manual_seed(1)
    fused = PrefixLM(fused_loss=True)(model, batch)
    torch.manual_seed(1)  # same random prefix lengths
    plain = PrefixLM(fused_loss=False)(model, batch)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=0)
    assert fused.n_tokens == plain.n_tokens


def test_lora_on_the_head_takes_the_module_path() -> None:
    """A LoRA-wrapped head is not a plain Linear: the loss must include its low-rank delta."""
    torch.manual_seed(0)
    model = build({"family": "gpt", "vocab_size": 53, "n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 16, "tie_embeddings": False})
    apply_lora(model, LoraSettings(r=4, alpha=8.0, target_modules=("lm_head",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_()  # a non-zero delta, so skipping it would show
    assert not fusable(model.lm_head)
    ids = torch.randint(0, 53, (2, 9))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    torch.testing.assert_close(CausalLM(fused_loss=True)(model, batch).loss, CausalLM(fused_loss=False)(model, batch).loss)


# --- reduction="none": per-token NLL (DPO's sequence log-probs) -------------------------------------------------
def token_reference(h: torch.Tensor, head: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).reshape(-1, head.out_features), t.reshape(-1), ignore_index=-100, reduction="none").view(t.shape)


@pytest.mark.parametrize("rows", [1, 5, 8, 64])
def test_per_token_equals_reference_fp64_exactly(rows: int) -> None:
    """Per-row upstream gradients (what a sequence sum times DPO's weights sends back): backward recomputes the
    chunks, so this checks the recomputation and the per-row scaling, not just a scalar rescale."""
    h, head, t = case(torch.float64)
    upstream = torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = token_reference(h, head, t)
    out = linear_cross_entropy(h, head, t, rows=rows, reduction="none")
    assert out.shape == t.shape and (out[t == -100] == 0).all()
    assert out._base is None  # not a view: FSDP2 warns when its root module returns one (in-place edits skip its hook)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(grads((upstream * out).sum(), h, head.weight), grads((upstream * ref).sum(), h, head.weight), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_per_token_bf16_autocast_and_no_grad() -> None:
    h, head, t = case(torch.float32, n=64, d=32, v=96)
    ref = token_reference(h, head, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, head, t, rows=16, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
    gh, gw = grads(out.sum(), h, head.weight)
    assert gh.dtype == gw.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(gw.flatten(), grads(ref.sum(), head.weight)[0].flatten(), dim=0) > 0.999
    with torch.no_grad():
        assert not linear_cross_entropy(h, head, t, rows=8, reduction="none").requires_grad
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'none'"):
        linear_cross_entropy(h, head, t, reduction="mean")
    with pytest.raises(ValueError, match="with_entropy needs reduction='none'"):
        linear_cross_entropy(h, head, t, with_entropy=True)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_per_token_entropy_equals_entropy_from_logits_fp64(rows: int) -> None:
    from lmforge.losses import entropy_from_logits

    h, head, t = case(torch.float64)
    nll, entropy = linear_cross_entropy(h, head, t, rows=rows, reduction="none", with_entropy=True)
    torch.testing.assert_close(nll, token_reference(h, head, t), atol=1e-12, rtol=0)
    logp = head(h).log_softmax(-1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), atol=1e-12, rtol=0)  # fp64 throughout
    torch.testing.assert_close(entropy.float(), entropy_from_logits(head(h)), atol=1e-6, rtol=0)  # what RL logged (fp32)
    assert not entropy.requires_grad and nll.requires_grad
    assert nll._base is None and entropy._base is None


@pytest.mark.parametrize("family", ["gpt", "llama", "mixtral"])
@pytest.mark.parametrize("average", [False, True])
def test_decoder_sequence_logprobs_equal_full_logits(family: str, average: bool) -> None:
    """DPO's log p(completion) through the chunked head equals `sequence_logprobs` over the logits, with a
    padding mask and prompt tokens ignored, and so do the gradients of every parameter."""
    from lmforge.losses import sequence_logprobs
    from lmforge.objectives.base import decoder_sequence_logprobs

    model = tiny_decoder(family)
    ids = torch.randint(0, 97, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    targets = ids.roll(-1, dims=1)
    targets[:, :4] = -100  # prompt
    targets[1, 8:] = -100
    targets[:, -1] = -100
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a different upstream gradient per sequence
    results = []
    for fused in (True, False):
        logps = (decoder_sequence_logprobs(model, ids, targets, average, attention_mask=mask) if fused
                 else sequence_logprobs(model(ids, attention_mask=mask), targets, average=average))
        (weights * logps).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kernels", ["lmforge", "torch"])
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_whole_model_torch_compile_traces_the_fused_loss_on_cpu(precision: str, kernels: str, monkeypatch) -> None:
    """`stage.compile=true` on CPU: dynamo traces the chunked loss's autograd Function, whose weight-gradient
    buffer must not be lmforge's reused scratch buffer there: allocated inside the traced region (the process's
    first step) it was a side effect dynamo refuses. Same loss and gradients as eager."""
    import threading

    from lmforge.kernels import workspace
    from lmforge.kernels.cpu_kernels import cpu_kernels, set_cpu_kernels

    monkeypatch.setattr(workspace, "_LOCAL", threading.local())  # no scratch buffers yet, as in a fresh process
    before = cpu_kernels()
    set_cpu_kernels(kernels)
    try:
        _compare_compiled(precision)
    finally:
        set_cpu_kernels(before)


def _compare_compiled(precision: str) -> None:
    torch.manual_seed(0)
    # 512 rows over a 512-word vocabulary at width 16: several chunks, gathered into one d(weight) GEMM
    cfg = {"family": "gpt", "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 128, "dropout": 0.0}
    eager, compiled = build(cfg), build(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="aot_eager", fullgraph=False)
    x = torch.randint(0, 512, (4, 129), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    losses = []
    for model in (compiled, eager):  # compiled first: its trace is the first to ask for the scratch buffers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = CausalLM()(model, batch).loss
        loss.backward()
        losses.append(loss.detach())
    tol = 1e-5 if precision == "32" else 2e-2
    torch.testing.assert_close(losses[0], losses[1], atol=tol, rtol=0)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=tol, rtol=0)
