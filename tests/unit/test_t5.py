"""Parity of lmforge's T5 with Hugging Face T5ForConditionalGeneration: same weights, same logits and loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmforge.errors import ConfigError
from lmforge.interop.hf import config_from_hf, from_hf, load_hf, save_hf, to_hf
from lmforge.models import build, config_from
from lmforge.models.layers.relative_position import relative_position_bucket
from lmforge.models.t5 import T5, T5Config
from lmforge.objectives.base import IGNORE_INDEX, token_nll

transformers = pytest.importorskip("transformers")
transformers.T5ForConditionalGeneration  # noqa: B018 - resolve the lazy import at collection, not in a test

CONF = Path(__file__).resolve().parents[2] / "conf"
VOCAB = 97
# (HF overrides) per architecture variant; small bucket counts so that short sequences reach the log-spaced
# buckets and the max_distance clamp of both the bidirectional and the causal position bias
VARIANTS = {
    "relu-tied": {},
    "gated-untied-deeper-decoder": {
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "num_decoder_layers": 3,
    },
    "relu-untied-shallower-decoder": {"tie_word_embeddings": False, "num_layers": 3, "num_decoder_layers": 1},
    "gated-tied-buckets": {
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 12,
    },
}


def hf_t5(**overrides) -> transformers.T5ForConditionalGeneration:
    """A random HF T5, untied like a loaded v1.1 checkpoint when asked (transformers v5 builds it tied)."""
    torch.manual_seed(0)
    kwargs = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4}
    kwargs |= {"dropout_rate": 0.0, "attn_implementation": "eager", "decoder_start_token_id": 0}
    model = (
        transformers.T5ForConditionalGeneration(transformers.T5Config(**(kwargs | overrides))).float().eval()
    )
    if overrides.get("tie_word_embeddings") is False:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
        model.all_tied_weights_keys.pop("lm_head.weight")
    with torch.no_grad():  # HF unit-inits the norms: randomise them so that a mis-mapped one shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def set_backend(model: T5, backend: str) -> T5:
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model


def hf_logits(hf, x, y, mask=None, dec_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return hf(
            input_ids=x, decoder_input_ids=y, attention_mask=mask, decoder_attention_mask=dec_mask
        ).logits


def our_logits(model: T5, x, y, mask=None, dec_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(x, y, attention_mask=mask, decoder_attention_mask=dec_mask)


# sdpa sums in another order: ~1e-7 relative, i.e. up to ~1e-5 on the untied heads' logits of size ~20; so do
# MKL's AVX-512 GEMM kernels against HF's op order (eager, deeper decoder: one logit of 3201 off by 1.13e-5 there)
TOLERANCE = {"eager": {"atol": 1e-5, "rtol": 1e-5}, "sdpa": {"atol": 1e-5, "rtol": 1e-5}}


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(variant: str, backend: str) -> None:
    hf = hf_t5(**VARIANTS[variant])
    ours = set_backend(from_hf(hf).eval(), backend)
    assert ours.config.tie_embeddings == (VARIANTS[variant].get("tie_word_embeddings") is not False)
    x, y = ids(3, 23, seed=1), ids(3, 11, seed=2)  # odd lengths, encoder longer than decoder
    torch.testing.assert_close(our_logits(ours, x, y), hf_logits(hf, x, y), **TOLERANCE[backend])
    x, y = ids(2, 5, seed=3), ids(2, 19, seed=4)  # decoder longer than encoder
    torch.testing.assert_close(our_logits(ours, x, y), hf_logits(hf, x, y), **TOLERANCE[backend])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_padding_masks_match_hf_on_real_positions(backend: str) -> None:
    hf = hf_t5(**VARIANTS["gated-untied-deeper-decoder"])
    ours = set_backend(from_hf(hf).eval(), backend)
    x, y = ids(3, 17, seed=5), ids(3, 9, seed=6)
    mask = torch.ones_like(x)
    mask[1, 12:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    dec_mask = torch.ones_like(y)
    dec_mask[0, 6:] = 0
    dec_mask[2, :3] = 0
    real = dec_mask.bool()
    ref = hf_logits(hf, x, y, mask, dec_mask)
    got = our_logits(ours, x, y, mask, dec_mask)
    torch.testing.assert_close(got[real], ref[real], **TOLERANCE[backend])
    # both masks mattered: without them the real positions see padding
    assert not torch.allclose(our_logits(ours, x, y, None, dec_mask)[real], ref[real], atol=1e-3)
    assert not torch.allclose(our_logits(ours, x, y, mask, None)[real], ref[real], atol=1e-3)


def test_loss_and_shift_right_match_hf_labels() -> None:
    hf = hf_t5(**VARIANTS["relu-tied"])
    ours = from_hf(hf).eval()
    x, labels = ids(3, 15, seed=7), ids(3, 8, seed=8)
    labels[1, 5:] = IGNORE_INDEX
    labels[2, 0] = IGNORE_INDEX
    torch.testing.assert_close(ours.shift_right(labels), hf._shift_right(labels), atol=0, rtol=0)
    with torch.no_grad():
        ref = hf(input_ids=x, labels=labels).loss
        got = token_nll(ours(x, ours.shift_right(labels)), labels).loss
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    start = T5(
        T5Config(
            n_layer=1,
            n_head=2,
            n_embd=16,
            head_dim=8,
            intermediate_size=16,
            vocab_size=VOCAB,
            pad_token_id=3,
            decoder_start_token_id=5,
        )
    )
    assert start.shift_right(labels)[:, 0].eq(5).all() and start.shift_right(labels)[1, 6:].eq(3).all()


def test_relative_position_buckets_match_hf() -> None:
    rel = torch.arange(-300, 300)[:, None] - torch.arange(0, 3)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12), (6, 20)):
            ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional, buckets, distance
            )
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), ref)


@pytest.mark.parametrize("variant", ["relu-tied", "gated-untied-deeper-decoder"])
def test_from_hf_to_hf_round_trip_is_bit_identical(variant: str) -> None:
    hf = hf_t5(**VARIANTS[variant])
    ours = from_hf(hf)
    back = to_hf(ours)
    tied = ours.config.tie_embeddings
    assert (ours.lm_head.weight is ours.shared.weight) == tied
    assert (back.lm_head.weight is back.shared.weight) == tied
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert back.config.scale_decoder_outputs == tied


@pytest.mark.parametrize("variant", ["relu-tied", "gated-untied-deeper-decoder"])
def test_save_hf_opens_in_transformers(variant: str, tmp_path: Path) -> None:
    ours = from_hf(hf_t5(**VARIANTS[variant])).eval()
    out = save_hf(ours, None, tmp_path / "hf")
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        out, local_files_only=True, attn_implementation="eager"
    ).eval()
    x, y = ids(2, 13, seed=9), ids(2, 7, seed=10)
    torch.testing.assert_close(
        hf_logits(reloaded, x, y), our_logits(set_backend(ours, "eager"), x, y), atol=1e-5, rtol=0
    )
    loaded = load_hf(out)
    assert isinstance(loaded, T5)
    assert loaded.config == ours.config
    a, b = ours.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"feed_forward_proj": "gated-silu"}, "hf_config.feed_forward_proj"),
        ({"feed_forward_proj": "gelu"}, "hf_config.feed_forward_proj"),
    ],
)
def test_config_from_hf_names_unsupported_keys(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_hf(transformers.T5Config(**overrides))
    assert err.value.key == key


def test_tied_scaling_with_a_different_head_is_refused() -> None:
    hf = hf_t5()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))  # scaled as tied, but not tied
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        from_hf(hf)


@pytest.mark.parametrize(
    "values,key",
    [
        ({"n_embd": 0}, "model.n_embd"),
        ({"feed_forward": "swiglu"}, "model.feed_forward"),
        ({"n_decoder_layer": 0}, "model.n_decoder_layer"),
        ({"relative_attention_max_distance": 8}, "model.relative_attention_max_distance"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"n_ctx": 5}, "model.n_ctx"),
    ],
)
def test_config_errors_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from({"family": "t5", **values}, vocab_size=VOCAB)
    assert err.value.key == key


def test_build_from_registry_and_structure() -> None:
    model = build(
        {"family": "t5", "n_layer": 2, "n_decoder_layer": 3, "n_head": 2, "n_embd": 32, "head_dim": 8},
        vocab_size=VOCAB,
    )
    assert isinstance(model, T5) and model.config.kind == "encoder_decoder"
    assert len(model.encoder.blocks) == 2 and len(model.decoder.blocks) == 3
    assert model.lm_head.weight is model.shared.weight
    tables = 2 * 32 * 2  # one (buckets, heads) table per stack
    assert model.num_params(non_embedding=False) - model.num_params() == tables


def test_init_follows_t5_statistics() -> None:
    """Our reset_parameters draws each tensor with HF's (= Mesh TensorFlow's) std (norms: constant 1)."""
    from lmforge.interop.hf_t5 import _key_map

    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=512,
            d_model=64,
            d_kv=16,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            tie_word_embeddings=False,
        )
    )
    ours = from_hf(hf)
    ours.reset_parameters()
    mine, theirs = ours.state_dict(), hf.state_dict()
    for name, ref in [*_key_map(ours.config), ("lm_head.weight", "lm_head.weight")]:
        got, want = mine[name].std().item(), theirs[ref].std().item()
        assert abs(got - want) <= 0.1 * want + 1e-6, (name, got, want)


def test_sdpa_backward_reaches_the_position_bias() -> None:
    model = from_hf(hf_t5()).train()
    x, y = ids(2, 9, seed=11), ids(2, 6, seed=12)
    token_nll(model(x, model.shift_right(y)), y).loss.backward()
    for stack in (model.encoder, model.decoder):
        grad = stack.position_bias.relative_attention_bias.weight.grad
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["t5-tiny", "t5-small", "t5-v1_1-base"])
def test_presets_build_from_yaml(preset: str) -> None:
    cfg = config_from(OmegaConf.load(CONF / "model" / f"{preset}.yaml"), vocab_size=32128)
    assert isinstance(cfg, T5Config)
    with torch.device("meta"):
        model = build(cfg)
    n = model.num_params(non_embedding=False)
    if preset == "t5-small":
        assert n == 60_506_624  # HF's t5-small
    if preset == "t5-v1_1-base":
        assert cfg.feed_forward == "gated-gelu" and not cfg.tie_embeddings
        assert 247e6 < n < 249e6
    if preset == "t5-tiny":
        assert cfg.n_layer == 2 and 64 <= cfg.n_embd <= 128
