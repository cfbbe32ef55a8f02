"""GPT model behaviour beyond HF parity (tests/unit/test_hf_gpt2.py): causality, backends, init, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import GPTConfig, build

SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "max_seq_len": 32}


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = build(SMALL, vocab_size=97).eval()
    x = torch.randint(0, 97, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 97)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 97  # change the future
    torch.testing.assert_close(model(y)[:, :10], logits[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(model(y)[:, 10:], logits[:, 10:])


def test_sdpa_and_eager_backends_agree():
    torch.manual_seed(0)
    model = build(SMALL, vocab_size=50).eval()
    x = torch.randint(0, 50, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0
    ref = model(x, attention_mask=mask)
    for block in model.blocks:
        block.attn.backend = "eager"
    out = model(x, attention_mask=mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = {"n_layer": 8, "n_head": 4, "n_embd": 256, "max_seq_len": 64}
    model = build(cfg, vocab_size=1000)
    assert model.lm_head.weight is model.wte.weight  # tied
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(0)
    model = build({**SMALL, "dropout": 0.5}, vocab_size=50)
    x = torch.randint(0, 50, (2, 8))
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize(
    "bad,key",
    [({"n_embd": 65}, "model.n_embd"), ({"n_layer": 0}, "model.n_layer"), ({"dropout": 1.5}, "model.dropout"), ({"attn_backend": "x"}, "model.attn_backend"), ({"n_lyer": 2}, "model.n_lyer")],
)
def test_bad_config_names_the_key(bad: dict, key: str):
    with pytest.raises(ConfigError) as err:
        build({**SMALL, **bad}, vocab_size=10)
    assert err.value.key == key and "Fix:" in str(err.value)


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = build(SMALL, vocab_size=10)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_seed_zero_seeds():
    from lmforge.run import seed_everything

    weights = []
    for _ in range(2):
        seed_everything(0)
        weights.append(build(SMALL, vocab_size=10).wte.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], atol=0, rtol=0)
    assert isinstance(GPTConfig(**SMALL), GPTConfig)
