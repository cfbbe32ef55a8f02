"""Parity of lmforge's GPT with Hugging Face GPT-2: same weights must give the same logits."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.interop.hf import config_from_hf, from_hf, load_hf, save_hf, to_hf
from lmforge.models import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
transformers.GPT2LMHeadModel  # noqa: B018 - resolve the lazy import at collection, not inside the first test

VOCAB, T = 211, 16


def hf_gpt2(**overrides) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    kwargs = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "vocab_size": VOCAB}
    kwargs |= {"bos_token_id": None, "eos_token_id": None, "attn_implementation": "eager"}
    cfg = transformers.GPT2Config(**(kwargs | overrides))
    model = transformers.GPT2LMHeadModel(cfg).float().eval()
    # HF zero-inits biases and unit-inits LayerNorms: randomise them so that a mis-mapped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(
    model: transformers.GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def our_logits(model: GPT, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_from_hf_matches_hf_logits(backend: str) -> None:
    hf = hf_gpt2()
    ours = from_hf(hf).eval()
    for block in ours.blocks:
        block.attn.backend = backend
    ids = tokens()
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_from_hf_left_padding_matches_on_real_tokens(backend: str) -> None:
    hf = hf_gpt2()
    ours = from_hf(hf).eval()
    for block in ours.blocks:
        block.attn.backend = backend
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding of different lengths
    mask[2, :11] = 0
    real = mask.bool()
    ref, got = hf_logits(hf, ids, mask), our_logits(ours, ids, mask)
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    # and the mask really mattered: without it the padded rows' real tokens see the padding
    assert not torch.allclose(our_logits(ours, ids)[real], ref[real], atol=1e-3)


def test_to_hf_matches_our_logits() -> None:
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, max_seq_len=64, vocab_size=VOCAB)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf = to_hf(ours)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    ids = tokens()
    torch.testing.assert_close(hf_logits(hf, ids), our_logits(ours, ids), atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path) -> None:
    ours = from_hf(hf_gpt2())
    tok = '{"version": "1.0", "model": {"type": "BPE"}}'
    out = save_hf(ours, tok, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").read_text() == tok
    loaded = load_hf(out)
    assert loaded.config == ours.config
    a, b = ours.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.lm_head.weight is loaded.wte.weight


def test_untied_embeddings() -> None:
    hf = hf_gpt2(tie_word_embeddings=False)
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    ours = from_hf(hf).eval()
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.wte.weight
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    assert torch.equal(ours.wte.weight, hf.transformer.wte.weight)
    ids = tokens()
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)
    back = to_hf(ours)
    assert back.lm_head.weight is not back.transformer.wte.weight
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_mlp_ratio_from_n_inner() -> None:
    hf = hf_gpt2(n_inner=128)
    ours = from_hf(hf).eval()
    assert ours.config.mlp_ratio == 2
    ids = tokens()
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_inner": 100}, "n_inner"),
        ({"resid_pdrop": 0.1, "embd_pdrop": 0.0, "attn_pdrop": 0.1}, "pdrop"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"add_cross_attention": True}, "add_cross_attention"),
    ],
)
def test_bad_hf_config_names_the_key(overrides: dict, key: str) -> None:
    cfg = transformers.GPT2Config(n_layer=1, n_head=4, n_embd=64, vocab_size=VOCAB, **overrides)
    with pytest.raises(ConfigError, match=key) as err:
        config_from_hf(cfg)
    assert key in err.value.key
