"""Llama / Mistral: parity with Hugging Face (same weights, same logits and loss), conversion round trips,
masks and positions, config validation and the conf/model presets. RoPE scaling kinds: tests/unit/test_rope.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmforge.errors import ConfigError
from lmforge.interop.hf import config_from_hf, from_hf, load_hf, save_hf, to_hf
from lmforge.models import build, config_from
from lmforge.models.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
transformers.LlamaForCausalLM  # noqa: B018 - resolve the lazy imports at collection, not inside the first test
transformers.MistralForCausalLM  # noqa: B018

VOCAB = 211
SMALL = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "intermediate_size": 96, "max_seq_len": 64}


def hf_model(cls: str = "LlamaForCausalLM", **overrides) -> torch.nn.Module:
    """A small random HF model. initializer_range=0.1 makes attention far from uniform, so that a wrong
    position encoding or mask moves the logits by much more than the tolerance."""
    torch.manual_seed(0)
    kwargs = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "initializer_range": 0.1, "bos_token_id": None, "eos_token_id": None, "attn_implementation": "eager",
    }
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls)(config_cls(**(kwargs | overrides))).float().eval()
    with torch.no_grad():  # HF unit-inits RMSNorm weights: randomise them so that a mis-mapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(batch: int = 3, T: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def set_backend(model: torch.nn.Module, backend: str) -> None:
    for block in model.blocks:
        block.attn.backend = backend


@torch.no_grad()
def assert_same_logits(ours: torch.nn.Module, hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    got, ref = ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


# --- parity with HF --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "overrides",
    [
        {"num_key_value_heads": 4},  # MHA
        {"num_key_value_heads": 2},  # GQA 2:1
        {"num_key_value_heads": 1, "tie_word_embeddings": True},  # MQA, tied head
        {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "rms_norm_eps": 1e-6},
    ],
    ids=["mha", "gqa", "mqa-tied", "theta500"],
)
def test_logits_match_hf(overrides: dict, backend: str) -> None:
    hf = hf_model(**overrides)
    ours = from_hf(hf).eval()
    set_backend(ours, backend)
    assert ours.config.n_kv_head == hf.config.num_key_value_heads
    assert ours.config.tie_embeddings == (ours.lm_head.weight is ours.wte.weight)
    for T in (1, 17, 64):  # odd lengths, a single token, the full context
        assert_same_logits(ours, hf, tokens(T=T))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_left_padding_matches_hf_on_real_tokens(backend: str) -> None:
    hf = hf_model()
    ours = from_hf(hf).eval()
    set_backend(ours, backend)
    ids = tokens(T=15)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    assert_same_logits(ours, hf, ids, mask)
    with torch.no_grad():  # and the mask mattered: without it the real tokens of padded rows see the padding
        assert not torch.allclose(ours(ids)[mask.bool()], hf(input_ids=ids, attention_mask=mask).logits[mask.bool()], atol=1e-3)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_mistral_sliding_window_matches_hf(backend: str) -> None:
    hf = hf_model("MistralForCausalLM", sliding_window=5)
    ours = from_hf(hf).eval()
    set_backend(ours, backend)
    assert ours.config.sliding_window == 5 and ours.config.family == "llama"
    ids = tokens(T=19)
    assert_same_logits(ours, hf, ids)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    assert_same_logits(ours, hf, ids, mask)
    with torch.no_grad():  # the window mattered: full attention gives other logits past position 5
        ours.config.sliding_window = None
        assert not torch.allclose(ours(ids), hf(input_ids=ids).logits, atol=1e-3)


def test_loss_matches_hf_labels() -> None:
    hf = hf_model()
    ours = from_hf(hf).eval()
    ids = tokens(T=16)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels).loss
        logits = ours(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)


# --- conversion --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "overrides"),
    [
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
        ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
        ("MistralForCausalLM", {"sliding_window": 7}),
    ],
    ids=["llama", "llama-tied-mqa", "llama-bias", "mistral"],
)
def test_from_hf_to_hf_round_trip_is_bit_identical(cls: str, overrides: dict) -> None:
    hf = hf_model(cls, **overrides)
    if overrides.get("attention_bias"):
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    ours = from_hf(hf)
    back = to_hf(ours)
    assert type(back).__name__ == cls
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert_same_logits(ours.eval(), hf, tokens())


def test_to_hf_matches_our_logits() -> None:
    torch.manual_seed(0)
    ours = build({**SMALL, "init_std": 0.1}, vocab_size=VOCAB).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf = to_hf(ours)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert_same_logits(ours, hf, tokens())


def test_save_hf_opens_with_auto_model_and_loads_back(tmp_path) -> None:
    for cls, overrides in (("LlamaForCausalLM", {}), ("MistralForCausalLM", {"sliding_window": 6})):
        ours = from_hf(hf_model(cls, **overrides)).eval()
        out = save_hf(ours, None, tmp_path / cls)
        auto = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        assert type(auto).__name__ == cls
        assert_same_logits(ours, auto, tokens(T=13))
        loaded = load_hf(out)
        assert loaded.config == ours.config
        a, b = ours.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True, "mlp_bias": False}, "mlp_bias"),
        ({"head_dim": 32}, "head_dim"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "original_max_position_embeddings": 32}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ],
)
def test_bad_hf_config_names_the_key(overrides: dict, key: str) -> None:
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=VOCAB, **overrides)
    with pytest.raises(ConfigError) as err:
        config_from_hf(cfg)
    assert key in err.value.key and err.value.key.startswith("hf_config.")


def test_unexportable_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.position"):
        to_hf(build({**SMALL, "position": "alibi"}, vocab_size=VOCAB))
    with pytest.raises(ConfigError, match="model.bias"):
        to_hf(build({**SMALL, "sliding_window": 4, "bias": True}, vocab_size=VOCAB))


# --- behaviour -----------------------------------------------------------------------------------------
def test_causal_and_packed_documents_with_position_ids() -> None:
    """A 4-D block-diagonal mask + restarting position_ids give each packed document its stand-alone logits."""
    torch.manual_seed(0)
    for overrides in ({}, {"sliding_window": 3}, {"position": "alibi"}):
        model = build({**SMALL, **overrides, "init_std": 0.1}, vocab_size=VOCAB).eval()
        a, b = tokens(1, 7, seed=2), tokens(1, 9, seed=3)
        packed = torch.cat([a, b], dim=1)
        doc = torch.tensor([0] * 7 + [1] * 9)
        mask = ((doc[:, None] == doc[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril())[None, None]
        pos = torch.cat([torch.arange(7), torch.arange(9)])
        with torch.no_grad():
            got = model(packed, attention_mask=mask, position_ids=pos)
            torch.testing.assert_close(got[:, :7], model(a), atol=1e-5, rtol=0)
            torch.testing.assert_close(got[:, 7:], model(b), atol=1e-5, rtol=0)
            changed = packed.clone()
            changed[:, 10:] = (changed[:, 10:] + 1) % VOCAB  # change the future: the past must not move
            torch.testing.assert_close(model(changed)[:, :10], model(packed)[:, :10], atol=1e-6, rtol=0)


def test_init_and_param_count() -> None:
    torch.manual_seed(0)
    model = build({**SMALL, "n_embd": 256, "intermediate_size": 512}, vocab_size=1000)
    assert model.lm_head.weight is not model.wte.weight  # untied by default
    assert model.blocks[0].mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.blocks[1].attn_norm.weight == 1) and torch.all(model.norm.weight == 1)
    assert model.num_params(non_embedding=False) - model.num_params() == 1000 * 256
    tied = build({**SMALL, "tie_embeddings": True}, vocab_size=1000)
    assert tied.num_params() == tied.num_params(non_embedding=False)  # the tied table is the head


def test_sequence_longer_than_max_seq_len_is_rejected() -> None:
    model = build(SMALL, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        ({"n_kv_head": 3}, "model.n_kv_head"),
        ({"n_kv_head": 0}, "model.n_kv_head"),
        ({"n_embd": 66}, "model.n_embd"),
        ({"rope_scaling": {"type": "ntk", "factor": 2.0}}, "model.rope_scaling.type"),
        ({"position": "alibi", "rope_scaling": {"type": "linear", "factor": 2.0}}, "model.rope_scaling"),
        ({"position": "learned"}, "model.position"),
        ({"sliding_window": 0}, "model.sliding_window"),
        ({"attn_backend": "flash"}, "model.attn_backend"),
        ({"n_kv_heads": 2}, "model.n_kv_heads"),
    ],
)
def test_bad_config_names_the_key(bad: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build({**SMALL, **bad}, vocab_size=VOCAB)
    assert err.value.key == key and "Fix:" in str(err.value)
    if key == "model.n_kv_head" and bad["n_kv_head"] == 3:
        assert "[1, 2, 4]" in err.value.fix


def test_n_kv_head_defaults_to_n_head() -> None:
    assert LlamaConfig(n_head=8, n_embd=64).n_kv_head == 8


# --- presets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "vocab", "expected"),
    [
        ("llama-tiny", 512, None),
        ("llama-160m", 32000, 162_417_408),
        ("llama-1b", 32000, 1_100_048_384),  # TinyLlama-1.1B
        ("llama3-8b", 128256, 8_030_261_248),  # Meta-Llama-3-8B
    ],
)
def test_presets_build(root, preset: str, vocab: int, expected: int | None) -> None:
    cfg = config_from(OmegaConf.load(root / "conf" / "model" / f"{preset}.yaml"), vocab_size=vocab)
    assert isinstance(cfg, LlamaConfig)
    if expected is None:  # small enough to run
        model = build(cfg)
        assert model(torch.randint(0, vocab, (2, 16))).shape == (2, 16, vocab)
        return
    with torch.device("meta"):
        model = build(cfg)
    assert isinstance(model, Llama) and model.num_params(non_embedding=False) == expected
