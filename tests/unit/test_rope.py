"""RoPE and its context-extension variants: frequencies and model logits against Hugging Face, the rotation's
relative-position property, and config validation."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.interop.hf import from_hf, to_hf
from lmforge.models import build
from lmforge.models.layers.rope import RotaryEmbedding, apply_rotary, rope_inv_freq

transformers = pytest.importorskip("transformers")
transformers.LlamaForCausalLM  # noqa: B018 - resolve the lazy import at collection
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

VOCAB, HEAD_DIM = 101, 16

# (HF rope_parameters, HF max_position_embeddings) for every scaling kind we implement
SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 2.5}, 48),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 12),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 12}, 48),
    "yarn-mscale": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
         "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
        128,
    ),
    "yarn-attention-factor": (
        {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16, "attention_factor": 1.3}, 48
    ),
    "llama3": (
        {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        48,
    ),
}


def hf_llama(rope_parameters: dict, max_positions: int, theta: float = 500.0) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, initializer_range=0.1,
        rope_parameters={**rope_parameters, "rope_theta": theta}, bos_token_id=None, eos_token_id=None,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_inv_freq_and_attention_factor_match_hf(name: str) -> None:
    params, max_positions = SCALINGS[name]
    hf = hf_llama(params, max_positions)
    ours = from_hf(hf)
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf.config, None)
    inv, factor = rope_inv_freq(HEAD_DIM, 500.0, ours.config.rope_scaling, ours.config.max_seq_len)
    torch.testing.assert_close(inv, ref_inv, atol=0, rtol=1e-6)
    assert factor == pytest.approx(ref_factor, rel=1e-12)
    if name != "dynamic":  # dynamic only rescales beyond the original length
        assert not torch.allclose(inv, rope_inv_freq(HEAD_DIM, 500.0, None, 48)[0])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_scaled_rope_logits_match_hf(name: str, backend: str) -> None:
    params, max_positions = SCALINGS[name]
    hf = hf_llama(params, max_positions)
    ours = from_hf(hf).eval()
    for block in ours.blocks:
        block.attn.backend = backend
    assert ours.config.rope_scaling["type"] == params["rope_type"]
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))  # longer than the original 12/16
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)
        ours.config.rope_scaling, ours.rope.scaling = None, None  # the scaling mattered
        assert not torch.allclose(ours(ids), hf(input_ids=ids).logits, atol=1e-3)


def test_dynamic_ntk_is_plain_rope_within_the_original_length() -> None:
    params, max_positions = SCALINGS["dynamic"]
    hf = hf_llama(params, max_positions)  # fresh: HF's dynamic RoPE caches the longest length it has seen
    ours = from_hf(hf).eval()
    assert ours.config.max_seq_len == 24 and ours.config.rope_scaling["original_max_seq_len"] == 12
    plain = build({**ours.config.__dict__, "rope_scaling": None}, vocab_size=VOCAB).eval()
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids), plain(ids), atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_scaled_rope_round_trips_through_hf_config(name: str) -> None:
    params, max_positions = SCALINGS[name]
    ours = from_hf(hf_llama(params, max_positions))
    back = to_hf(ours)
    assert back.config.max_position_embeddings == max_positions
    for key, value in params.items():
        assert back.config.rope_parameters[key] == value, key
    assert from_hf(back).config == ours.config


def test_rotation_depends_only_on_relative_position() -> None:
    """q_m · k_n after RoPE is a function of m - n: shifting both positions leaves every score unchanged."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(HEAD_DIM, 10000.0, None, 64)
    q, k = torch.randn(1, 2, 8, HEAD_DIM), torch.randn(1, 2, 8, HEAD_DIM)
    pos = torch.arange(8)
    scores = []
    for shift in (0, 5, 37):
        qr, kr = apply_rotary(q, k, *rope(pos + shift, torch.float32))
        scores.append(qr @ kr.transpose(-1, -2))
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-5, rtol=0)
    qr, _ = apply_rotary(q, k, *rope(pos, torch.float32))
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=0)  # a rotation
    torch.testing.assert_close(qr[:, :, 0], q[:, :, 0])  # position 0 is the identity


def test_batched_position_ids() -> None:
    rope = RotaryEmbedding(HEAD_DIM, 10000.0, {"type": "linear", "factor": 2.0}, 64)
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    cos, sin = rope(pos, torch.float32)
    assert cos.shape == (2, 4, HEAD_DIM)
    torch.testing.assert_close(cos[1], rope(torch.arange(5, 9), torch.float32)[0][0])


@pytest.mark.parametrize(
    ("scaling", "key"),
    [
        ({"type": "ntk", "factor": 2.0}, "model.rope_scaling.type"),
        ({"factor": 2.0}, "model.rope_scaling.type"),
        ({"type": "linear"}, "model.rope_scaling.factor"),
        ({"type": "linear", "factor": -1.0}, "model.rope_scaling.factor"),
        ({"type": "linear", "factor": 2.0, "beta_fast": 3}, "model.rope_scaling.beta_fast"),
        ({"type": "llama3", "factor": 8.0, "original_max_seq_len": 16, "low_freq_factor": 1.0}, "model.rope_scaling.high_freq_factor"),
        ("linear", "model.rope_scaling"),
    ],
)
def test_bad_rope_scaling_names_the_key(scaling, key: str) -> None:
    cfg = {"family": "llama", "n_layer": 1, "n_head": 4, "n_embd": 64, "intermediate_size": 64, "rope_scaling": scaling}
    with pytest.raises(ConfigError) as err:
        build(cfg, vocab_size=VOCAB)
    assert err.value.key == key
