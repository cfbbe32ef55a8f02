"""Activation checkpointing recomputes blocks in backward: gradients must be identical, keys unchanged."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import build
from lmforge.models.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpoint_policy,
    transformer_blocks,
)

CONFIGS = {
    "gpt": {"family": "gpt", "n_layer": 3, "n_head": 2, "n_embd": 32, "vocab_size": 50, "max_seq_len": 32},
    "llama": {"family": "llama", "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 64,
              "vocab_size": 50, "max_seq_len": 32},
    "t5": {"family": "t5", "n_layer": 2, "n_head": 2, "n_embd": 32, "d_kv": 16, "intermediate_size": 64, "vocab_size": 50,
           "max_seq_len": 32},
}


def grads(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 16))
    out = model(ids, ids) if family == "t5" else model(ids)
    out.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("every_n", [1, 2, "selective"])
def test_checkpointed_gradients_equal_the_plain_ones(family: str, every_n: int | str):
    cfg = dict(CONFIGS[family])
    if family == "t5":
        cfg = {k: v for k, v in cfg.items() if k != "d_kv"}
    torch.manual_seed(0)
    plain = build(cfg).train()
    torch.manual_seed(0)
    ckpt = build(cfg).train()
    n_blocks = len(transformer_blocks(ckpt))
    wrapped = apply_activation_checkpointing(ckpt, every_n)
    assert wrapped == len(range(0, n_blocks, 1 if every_n == "selective" else every_n))
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # names unchanged: checkpoints load either way
    want, got = grads(plain, family), grads(ckpt, family)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_recomputed_blocks_redraw_the_same_dropout_masks(policy: str):
    """bf16 on CPU: attention dropout inside lmforge's GEMM attention kernel (and residual dropout) redrawn in the
    recompute from the restored generator, so checkpointed gradients equal the plain ones bit for bit."""
    cfg = {**CONFIGS["gpt"], "dropout": 0.2}
    torch.manual_seed(0)
    plain = build(cfg).train()
    ckpt = build(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt, policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = grads(plain, "gpt"), grads(ckpt, "gpt")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_off_and_bad_values():
    model = build(CONFIGS["gpt"])
    assert apply_activation_checkpointing(model, 0) == 0
    assert apply_activation_checkpointing(model, "none") == 0
    for bad in (-1, "everything", 1.5, True):
        with pytest.raises(ConfigError, match="stage.activation_checkpointing"):
            apply_activation_checkpointing(model, bad)


def test_policies_by_name_are_their_numbers():
    """The issue's vocabulary (none / full / every n-th / selective) spells the same policies as 0 / 1 / n."""
    assert [checkpoint_policy(v) for v in ("none", "off", None, "full", "FULL", "selective", 3)] == [0, 0, 0, 1, 1, "selective", 3]
    model = build(CONFIGS["gpt"])
    assert apply_activation_checkpointing(model, "full") == len(transformer_blocks(model))


def test_checkpointed_blocks_run_forward_again_in_backward():
    """The memory saving is real: block 0's activations are recomputed (its MLP runs twice), block 1's are not."""
    model = build(CONFIGS["gpt"]).train()
    apply_activation_checkpointing(model, 2)
    calls = {0: 0, 1: 0}
    for i in calls:  # count calls of the MLP's first Linear (module hooks are not re-fired by the recomputation)
        fc = model.blocks[i].mlp.fc
        fc.forward = lambda x, i=i, f=fc.forward: (calls.__setitem__(i, calls[i] + 1), f(x))[1]
    grads(model, "gpt")
    assert calls == {0: 2, 1: 1}


MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.mkldnn._linear_pointwise)  # the last: CPU fp32 Linear


def ops_in_backward(every_n: int | str) -> tuple[int, int]:
    """(matmuls, other ops) executed during backward: recomputation shows up as extra forward ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = build(CONFIGS["llama"]).train()
    apply_activation_checkpointing(model, every_n)
    loss = model(torch.randint(0, 50, (4, 32))).float().pow(2).mean()
    counts = [0, 0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[0 if func.overloadpacket in MATMULS else 1] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        loss.backward()
    return counts[0], counts[1]


def test_selective_recomputes_pointwise_ops_but_not_matmuls():
    none, selective, full = ops_in_backward(0), ops_in_backward("selective"), ops_in_backward(1)
    assert selective[0] == none[0] < full[0]  # matmul outputs were kept: no matmul runs twice
    assert selective[1] > none[1]  # norms / activations / RoPE were not kept: recomputed in backward
