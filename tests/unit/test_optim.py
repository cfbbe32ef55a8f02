"""LR schedule closed forms and weight-decay parameter groups."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import GPT, GPTConfig
from lmforge.optim.param_groups import decay_param_groups
from lmforge.optim.schedulers import constant, cosine_warmup, cosine_warmup_factor

LR, MIN_LR = 3e-3, 3e-4


def _lrs(make, n_steps: int, lr: float = LR) -> list[float]:
    """LR seen by the optimizer at steps 0..n_steps-1, stepping the scheduler like Lightning does."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make(opt)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


def reference(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """nanoGPT's get_lr, written independently (shifted by one so step 0 is not lr=0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step > total:
        return min_lr
    ratio = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("total,warmup", [(100, 10), (60, 20), (41, 1)])
def test_cosine_warmup_closed_forms(total: int, warmup: int) -> None:
    lrs = _lrs(lambda o: cosine_warmup(o, total_steps=total, warmup_steps=warmup, min_lr=MIN_LR), total + 30)
    assert lrs[0] == pytest.approx(LR / warmup, rel=1e-12)
    assert lrs[warmup - 1] == pytest.approx(LR, rel=1e-12)
    assert lrs[warmup] == pytest.approx(LR, rel=1e-12)  # decay starts at the peak
    assert lrs[total] == pytest.approx(MIN_LR, rel=1e-12)
    if (total - warmup) % 2 == 0:
        assert lrs[warmup + (total - warmup) // 2] == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert all(v == pytest.approx(MIN_LR, rel=1e-12) for v in lrs[total:])  # flat after the end
    for step, value in enumerate(lrs):
        assert value == pytest.approx(reference(step, total, warmup, LR, MIN_LR), rel=1e-12, abs=1e-15)
    # warmup is linear and increasing; decay is monotone non-increasing
    assert all(b > a for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(b <= a + 1e-18 for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))


def test_cosine_warmup_halfway_exact() -> None:
    lrs = _lrs(lambda o: cosine_warmup(o, total_steps=110, warmup_steps=10, min_lr=MIN_LR), 111)
    assert lrs[60] == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    # a quarter of the way: min + (lr-min)(1+cos(pi/4))/2
    assert lrs[35] == pytest.approx(MIN_LR + (LR - MIN_LR) * (1 + math.sqrt(0.5)) / 2, rel=1e-12)


def test_cosine_no_warmup_starts_at_peak() -> None:
    lrs = _lrs(lambda o: cosine_warmup(o, total_steps=20, warmup_steps=0, min_lr=0.0), 25)
    assert lrs[0] == pytest.approx(LR)
    assert lrs[10] == pytest.approx(LR / 2)
    assert lrs[20] == pytest.approx(0.0, abs=1e-18)
    assert lrs[24] == pytest.approx(0.0, abs=1e-18)


def test_cosine_min_lr_equal_to_lr_is_constant() -> None:
    lrs = _lrs(lambda o: cosine_warmup(o, total_steps=30, warmup_steps=5, min_lr=LR), 40)
    assert lrs[5:] == pytest.approx([LR] * 35, rel=1e-12)


def test_min_lr_above_lr_raises() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ConfigError, match=r"scheduler\.min_lr") as info:
        cosine_warmup(opt, total_steps=10, min_lr=1e-2)
    assert info.value.key == "scheduler.min_lr"


def test_negative_warmup_raises() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ConfigError) as info:
        cosine_warmup(opt, total_steps=10, warmup_steps=-1)
    assert info.value.key == "scheduler.warmup_steps"


def test_factor_function_directly() -> None:
    assert cosine_warmup_factor(0, 100, 4, 0.1) == pytest.approx(0.25)
    assert cosine_warmup_factor(3, 100, 4, 0.1) == pytest.approx(1.0)
    assert cosine_warmup_factor(52, 100, 4, 0.1) == pytest.approx(0.55)
    assert cosine_warmup_factor(100, 100, 4, 0.1) == pytest.approx(0.1)
    assert cosine_warmup_factor(10_000, 100, 4, 0.1) == pytest.approx(0.1)


def test_constant_schedule() -> None:
    assert _lrs(lambda o: constant(o, total_steps=10, warmup_steps=4), 8) == pytest.approx(
        [LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR, LR, LR]
    )
    assert _lrs(lambda o: constant(o, total_steps=10), 3) == pytest.approx([LR] * 3)


# --- param groups -----------------------------------------------------------------------------------


@pytest.fixture
def gpt() -> GPT:
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, max_seq_len=8, vocab_size=37))


def test_decay_groups_on_gpt(gpt: GPT) -> None:
    groups = decay_param_groups(gpt, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay_ids = [id(p) for p in groups[0]["params"]]
    no_decay_ids = [id(p) for p in groups[1]["params"]]
    all_ids = decay_ids + no_decay_ids
    assert len(all_ids) == len(set(all_ids))  # nothing appears twice (nor in both groups)

    named = dict(gpt.named_parameters(remove_duplicate=False))
    unique = {id(p) for p in named.values()}
    assert set(all_ids) == unique
    assert len(all_ids) == len(list(gpt.parameters()))

    # tied: the head and the embedding are one tensor, listed exactly once (decayed)
    assert gpt.lm_head.weight is gpt.wte.weight
    assert decay_ids.count(id(gpt.wte.weight)) == 1

    for name, p in named.items():
        if p.ndim >= 2:
            assert id(p) in decay_ids, name
        else:
            assert id(p) in no_decay_ids, name
    # spot checks by role
    assert id(gpt.wpe.weight) in decay_ids
    for block in gpt.blocks:
        for m in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            assert id(m.weight) in decay_ids and id(m.bias) in no_decay_ids
        for ln in (block.ln_1, block.ln_2):
            assert id(ln.weight) in no_decay_ids and id(ln.bias) in no_decay_ids
    assert id(gpt.ln_f.weight) in no_decay_ids

    # closed-form counts: per block 4 weights decayed; 4 biases + 2 LN x (w, b) not
    L = gpt.config.n_layer
    assert len(decay_ids) == 2 + 4 * L  # wte(=lm_head), wpe, 4 per block
    assert len(no_decay_ids) == L * (4 + 4) + 2  # + ln_f weight/bias
    n_decay = sum(p.numel() for p in groups[0]["params"])
    n_all = sum(p.numel() for p in gpt.parameters())
    assert n_decay + sum(p.numel() for p in groups[1]["params"]) == n_all


def test_decay_groups_skip_frozen_and_feed_adamw(gpt: GPT) -> None:
    gpt.wpe.weight.requires_grad_(False)
    groups = decay_param_groups(gpt, weight_decay=0.1)
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(gpt.wpe.weight) not in ids
    assert len(ids) == len(list(gpt.parameters())) - 1
    opt = torch.optim.AdamW(groups, lr=1e-3)  # AdamW rejects duplicates across groups
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_untied_model_has_separate_head() -> None:
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, max_seq_len=4, vocab_size=11, tie_embeddings=False))
    groups = decay_param_groups(m, 0.05)
    decay_ids = {id(p) for p in groups[0]["params"]}
    assert {id(m.wte.weight), id(m.lm_head.weight)} <= decay_ids
    assert len(groups[0]["params"]) == 3 + 4  # wte, wpe, lm_head + 4 block matmuls


def test_linear_warmup_decays_linearly_to_floor():
    from lmforge.optim.schedulers import linear_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup(opt, total_steps=110, warmup_steps=10, min_lr=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_decay_groups_read_the_real_shape_of_zero3_partitioned_parameters() -> None:
    """DeepSpeed ZeRO-3 leaves each parameter an empty 1-D placeholder with the true shape in `ds_shape`: a matrix
    must still be decayed (and the decay group never left empty, which DeepSpeed would drop under the scheduler)."""
    from lmforge.optim.param_groups import decay_param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    decay, no_decay = decay_param_groups(model, 0.1)
    assert decay["params"] == [model[0].weight] and len(no_decay["params"]) == 3
