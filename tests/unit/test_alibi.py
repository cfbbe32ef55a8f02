"""ALiBi: slopes and biases against HF Bloom's `build_alibi_tensor`, and GPT / Llama with position=alibi:
causal, padding-aware, no position table, runs past max_seq_len."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.interop.hf import to_hf
from lmforge.models import build
from lmforge.models.layers.alibi import alibi_attention_mask, alibi_bias, alibi_slopes

transformers = pytest.importorskip("transformers")
from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # noqa: E402

VOCAB = 97
GPT_ALIBI = {"family": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64, "max_seq_len": 32, "position": "alibi"}


@pytest.mark.parametrize("n_head", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40])
def test_slopes_equal_bloom(n_head: int) -> None:
    ones = torch.ones(1, 6, dtype=torch.long)
    bloom = build_alibi_tensor(ones, n_head, torch.float32).view(n_head, 6)  # slope_h · key position
    slopes = alibi_slopes(n_head)
    assert torch.equal(slopes, bloom[:, 1])
    if n_head == 8:  # the paper's example: 1/2, 1/4, ..., 1/256
        assert torch.equal(slopes, torch.tensor([2.0**-i for i in range(1, 9)]))


def test_bias_is_bloom_up_to_a_per_row_constant_so_softmax_agrees() -> None:
    """Bloom adds slope·j (key position only); ALiBi proper adds slope·(j - i). Per query row they differ by a
    constant, which softmax ignores: the attention weights must be equal, with and without left padding."""
    n_head, T = 6, 11
    torch.manual_seed(0)
    scores = torch.randn(2, n_head, T, T)
    padding = torch.ones(2, T, dtype=torch.long)
    padding[1, :4] = 0
    bloom = build_alibi_tensor(padding, n_head, torch.float32).view(2, n_head, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & padding.bool()[:, None, None, :]
    position_ids = (padding.cumsum(-1) - 1).clamp(min=0)  # Bloom's positions for left-padded rows
    ours = alibi_attention_mask(alibi_slopes(n_head), position_ids, allowed, torch.float32)
    ref = (scores + bloom).masked_fill(~allowed, float("-inf"))
    real = padding.bool()  # query rows of real tokens
    got_w, ref_w = (scores + ours).softmax(-1), ref.softmax(-1)
    torch.testing.assert_close(got_w[0], ref_w[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got_w[1][:, real[1]], ref_w[1][:, real[1]], atol=1e-6, rtol=0)
    bias = alibi_bias(alibi_slopes(n_head), torch.arange(T))
    assert torch.all(bias.diagonal(dim1=-2, dim2=-1) == 0) and torch.all(bias.tril() <= 0)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_alibi_model_is_causal_and_extrapolates(family: str) -> None:
    torch.manual_seed(0)
    cfg = GPT_ALIBI if family == "gpt" else {**GPT_ALIBI, "family": "llama", "n_kv_head": 2, "intermediate_size": 96}
    model = build(cfg, vocab_size=VOCAB).eval()
    assert getattr(model, "wpe", None) is None and not any("wpe" in k for k in model.state_dict())
    T = 96  # three times max_seq_len: no position table bounds the length
    x = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, T, VOCAB) and torch.isfinite(logits).all()
        y = x.clone()
        y[:, 60:] = (y[:, 60:] + 1) % VOCAB  # change the future
        changed = model(y)
    torch.testing.assert_close(changed[:, :60], logits[:, :60], atol=1e-5, rtol=0)
    assert not torch.allclose(changed[:, 60:], logits[:, 60:])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_left_padding_gives_the_unpadded_logits(backend: str) -> None:
    """ALiBi is relative: a left-padded row's real tokens get exactly the logits of the row without padding."""
    torch.manual_seed(0)
    model = build({**GPT_ALIBI, "attn_backend": backend}, vocab_size=VOCAB).eval()
    seq = torch.randint(0, VOCAB, (1, 40))
    padded = torch.cat([torch.zeros(1, 9, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(seq)
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 9:], ref, atol=1e-5, rtol=0)
        assert not torch.allclose(model(padded)[:, 9:], ref, atol=1e-3)  # the mask mattered


def test_sdpa_and_eager_agree_and_bias_matters() -> None:
    torch.manual_seed(0)
    model = build(GPT_ALIBI, vocab_size=VOCAB).eval()
    learned = build({**GPT_ALIBI, "position": "learned"}, vocab_size=VOCAB).eval()
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        ref = model(x)
        for block in model.blocks:
            block.attn.backend = "eager"
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
        # same weights without any position signal: the ALiBi bias changes the output
        state = {k: v for k, v in model.state_dict().items()}
        state["wpe.weight"] = torch.zeros_like(learned.wpe.weight)
        learned.load_state_dict(state)
        assert not torch.allclose(learned(x), ref, atol=1e-3)


def test_learned_positions_still_bound_the_length_and_alibi_has_no_hf_export() -> None:
    learned = build({**GPT_ALIBI, "position": "learned"}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="max_seq_len"):
        learned(torch.zeros(1, 33, dtype=torch.long))
    assert learned.num_params() == learned.num_params(non_embedding=False) - 32 * 64
    alibi = build(GPT_ALIBI, vocab_size=VOCAB)
    assert alibi.num_params() == alibi.num_params(non_embedding=False)
    with pytest.raises(ConfigError, match="model.position"):
        to_hf(alibi)
    with pytest.raises(ConfigError) as err:
        build({**GPT_ALIBI, "position": "rope"}, vocab_size=VOCAB)
    assert err.value.key == "model.position"


def test_gpt_nano_with_alibi_composes(root) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=gpt-nano", "model.position=alibi"])
    model = build(cfg.model, vocab_size=VOCAB)
    assert model.config.position == "alibi" and model.wpe is None
