"""BERT: parity with Hugging Face BertForMaskedLM (logits, loss, weights, files), model behaviour, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmforge.errors import ConfigError, LmforgeError
from lmforge.interop.hf import config_from_hf, from_hf, load_hf, save_hf, to_hf
from lmforge.models import build, config_from
from lmforge.models.bert import Bert, BertConfig

transformers = pytest.importorskip("transformers")
transformers.BertForMaskedLM  # noqa: B018 - resolve the lazy import at collection, not inside the first test

CONF = Path(__file__).resolve().parents[2] / "conf"
VOCAB = 97
SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "intermediate_size": 96, "max_seq_len": 32, "dropout": 0.0}
HF_SMALL = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_size": 64,
    "intermediate_size": 96,
    "max_position_embeddings": 32,
}
# (HF config overrides, sequence length): sizes, head counts, odd lengths, T == max positions, 3 segment types
HF_CONFIGS = [
    (HF_SMALL, 23),
    (
        {
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "hidden_size": 48,
            "intermediate_size": 200,
            "type_vocab_size": 3,
        },
        17,
    ),
    (
        {
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "max_position_embeddings": 9,
        },
        9,
    ),
]


def hf_bert(**overrides) -> transformers.BertForMaskedLM:
    torch.manual_seed(0)
    # init std 0.1, not BERT's 0.02: activations then reach where erf- and tanh-GELU differ, attention is far
    # from uniform, and a wrong activation or mask shows in the logits by 10-1000x the tolerance
    kwargs = {
        "vocab_size": VOCAB,
        "initializer_range": 0.1,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    kwargs["attn_implementation"] = "eager"
    model = transformers.BertForMaskedLM(transformers.BertConfig(**(kwargs | overrides))).float().eval()
    # HF zero-inits biases (the MLM bias too) and unit-inits LayerNorms: randomise them so a mis-map shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def batch(T: int, n_types: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, token_type_ids, padding mask): 3 rows - full, right-padded, left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, T), generator=g)
    types = torch.randint(0, n_types, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, T - T // 3 :] = 0
    mask[2, : T // 2] = 0
    return ids, types, mask


def set_backend(model: Bert, backend: str) -> Bert:
    for block in model.blocks:
        block.attn.backend = backend
    return model


@torch.no_grad()
def hf_logits(model, ids, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


# --- parity with Hugging Face --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(("overrides", "T"), HF_CONFIGS)
def test_from_hf_logits_match_with_padding_and_token_types(overrides: dict, T: int, backend: str) -> None:
    hf = hf_bert(**overrides)
    ours = set_backend(from_hf(hf).eval(), backend)
    ids, types, mask = batch(T, n_types=hf.config.type_vocab_size)
    real = mask.bool()
    ref = hf_logits(hf, ids, token_type_ids=types, attention_mask=mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types)
        unmasked = ours(ids, token_type_ids=types)
    assert got.shape == (3, T, VOCAB)
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    # and padding / token types really mattered (by far more than the tolerance)
    assert (unmasked - ref)[real].abs().max() > 1e-4
    assert (got - hf_logits(hf, ids, attention_mask=mask))[real].abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_no_mask_and_explicit_position_ids_match(backend: str) -> None:
    hf = hf_bert(**HF_SMALL)
    ours = set_backend(from_hf(hf).eval(), backend)
    ids, _, _ = batch(20)
    pos = torch.arange(5, 25).expand(3, -1)  # shifted positions: a wrong position table would show
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours(ids, position_ids=pos), hf_logits(hf, ids, position_ids=pos), atol=1e-5, rtol=0
        )


def test_loss_matches_hf_loss() -> None:
    hf = hf_bert(**HF_SMALL)
    ours = from_hf(hf).eval()
    ids, types, mask = batch(23)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    labels[picked & mask.bool()] = ids[picked & mask.bool()]
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels).loss
        logits = ours(ids, attention_mask=mask, token_type_ids=types)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


def test_untied_embeddings() -> None:
    hf = hf_bert(**HF_SMALL, tie_word_embeddings=False)
    head = hf.cls.predictions
    assert head.decoder.weight is not hf.bert.embeddings.word_embeddings.weight
    ours = from_hf(hf).eval()
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.wte.weight
    assert torch.equal(ours.lm_head.weight, head.decoder.weight)
    assert torch.equal(
        ours.lm_head.bias, head.decoder.bias
    )  # the live bias (cls.predictions.bias is unused here)
    ids, types, mask = batch(23)
    real = mask.bool()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(
        got[real], hf_logits(hf, ids, token_type_ids=types, attention_mask=mask)[real], atol=1e-5, rtol=0
    )
    back = to_hf(ours)
    assert back.cls.predictions.decoder.weight is not back.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bit_identical(tied: bool) -> None:
    hf = hf_bert(**HF_SMALL, tie_word_embeddings=tied)
    before, after = hf.state_dict(), to_hf(from_hf(hf)).state_dict()
    assert before.keys() == after.keys()
    # untied, cls.predictions.bias is dead (forward uses decoder.bias): we carry one bias and write it to both
    dead = set() if tied else {"cls.predictions.bias"}
    for k in before.keys() - dead:
        assert torch.equal(before[k], after[k]), k
    for k in dead:
        assert torch.equal(after[k], before["cls.predictions.decoder.bias"])


def test_to_hf_matches_our_logits() -> None:
    torch.manual_seed(0)
    ours = Bert(BertConfig(**SMALL, vocab_size=VOCAB, init_std=0.1)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    hf = to_hf(ours)
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    ids, types, mask = batch(23)
    real = mask.bool()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(
        hf_logits(hf, ids, token_type_ids=types, attention_mask=mask)[real], got[real], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("tied", [True, False])
def test_save_hf_opens_with_auto_model_and_load_hf(tmp_path: Path, tied: bool) -> None:
    ours = from_hf(hf_bert(**HF_SMALL, tie_word_embeddings=tied)).eval()
    out = save_hf(ours, None, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    auto = transformers.AutoModelForMaskedLM.from_pretrained(
        out, local_files_only=True, attn_implementation="eager"
    ).eval()
    assert type(auto).__name__ == "BertForMaskedLM"
    ids, types, mask = batch(23)
    real = mask.bool()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(
        hf_logits(auto, ids, token_type_ids=types, attention_mask=mask)[real], got[real], atol=1e-5, rtol=0
    )
    loaded = load_hf(out)
    assert isinstance(loaded, Bert) and loaded.config == ours.config
    a, b = ours.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied


def test_pretraining_checkpoint_drops_pooler_and_nsp_head() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, **HF_SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    pre = transformers.BertForPreTraining(cfg).eval()
    ours = from_hf(pre).eval()
    ids, _, _ = batch(16)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), pre(input_ids=ids).prediction_logits, atol=1e-5, rtol=0)
    bare = transformers.BertModel(cfg)
    with pytest.raises(LmforgeError, match="no MLM head"):
        from_hf(bare)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"is_decoder": True}, "is_decoder"),
        ({"is_decoder": True, "add_cross_attention": True}, "is_decoder"),
        ({"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.0}, "hidden_dropout_prob"),
    ],
)
def test_bad_hf_config_names_the_key(overrides: dict, key: str) -> None:
    cfg = transformers.BertConfig(vocab_size=VOCAB, **HF_SMALL, **overrides)
    with pytest.raises(ConfigError) as err:
        config_from_hf(cfg)
    assert err.value.key == f"hf_config.{key}" and "Fix:" in str(err.value)


# --- model behaviour -----------------------------------------------------------------------------------


def test_build_from_registry_is_an_encoder() -> None:
    model = build({"family": "bert", **SMALL}, vocab_size=VOCAB)
    assert isinstance(model, Bert) and model.config.kind == "encoder" and model.config.vocab_size == VOCAB
    assert model.lm_head.weight is model.wte.weight and model.lm_head.bias is not None


def test_attention_is_bidirectional_and_padding_is_hidden() -> None:
    torch.manual_seed(0)
    model = build({"family": "bert", **SMALL}, vocab_size=VOCAB).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % VOCAB  # change the last token: every position sees it
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(y)[:, 0], atol=1e-4)
        mask = torch.ones_like(x)
        mask[:, -1] = 0  # ...unless it is padding
        torch.testing.assert_close(
            model(x, attention_mask=mask)[:, :-1], model(y, attention_mask=mask)[:, :-1], atol=1e-6, rtol=0
        )


def test_sdpa_and_eager_agree_with_a_4d_mask() -> None:
    torch.manual_seed(0)
    model = build({"family": "bert", **SMALL}, vocab_size=VOCAB).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    mask4 = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)) < 0.7
    mask4 |= torch.eye(12, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, attention_mask=mask4)
        torch.testing.assert_close(
            set_backend(model, "eager")(x, attention_mask=mask4), ref, atol=1e-5, rtol=0
        )
        assert not torch.allclose(model(x), ref, atol=1e-3)


def test_bert_init() -> None:
    torch.manual_seed(0)
    model = build(
        {"family": "bert", "n_layer": 2, "n_head": 4, "n_embd": 256, "intermediate_size": 1024},
        vocab_size=1000,
    )
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[1].mlp.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)  # no depth scaling
    assert torch.all(model.lm_head.bias == 0) and torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.head.norm.weight == 1) and torch.all(model.ln_emb.bias == 0)


def test_dropout_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = build({"family": "bert", **SMALL, "dropout": 0.5}, vocab_size=VOCAB)
    x = torch.randint(0, VOCAB, (2, 8))
    assert not torch.allclose(model.train()(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_sequence_longer_than_max_seq_len_is_rejected() -> None:
    model = build({"family": "bert", **SMALL}, vocab_size=10)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        ({"n_embd": 65}, "model.n_embd"),
        ({"intermediate_size": 0}, "model.intermediate_size"),
        ({"type_vocab_size": 0}, "model.type_vocab_size"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"norm_eps": 0.0}, "model.norm_eps"),
        ({"attn_backend": "flash"}, "model.attn_backend"),
        ({"mlp_ratio": 4}, "model.mlp_ratio"),
    ],
)
def test_bad_config_names_the_key(bad: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build({"family": "bert", **SMALL, **bad}, vocab_size=10)
    assert err.value.key == key and "Fix:" in str(err.value)


# --- presets -------------------------------------------------------------------------------------------


def test_bert_tiny_preset_builds_and_runs() -> None:
    cfg = config_from(OmegaConf.load(CONF / "model" / "bert-tiny.yaml"), vocab_size=512)
    assert (
        isinstance(cfg, BertConfig)
        and cfg.vocab_size == 512
        and 2 <= cfg.n_layer <= 4
        and 64 <= cfg.n_embd <= 128
    )
    model = build(cfg).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 512, (2, 64))).shape == (2, 64, 512)


def test_bert_base_preset_has_bert_base_size() -> None:
    cfg = config_from(OmegaConf.load(CONF / "model" / "bert-base.yaml"), vocab_size=30522)
    with torch.device("meta"):
        model = build(cfg)
    # BertForMaskedLM on bert-base-uncased: 109,514,298 parameters (the "110M" of the BERT paper)
    assert model.num_params(non_embedding=False) == 109_514_298
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.intermediate_size, cfg.max_seq_len) == (
        12,
        12,
        768,
        3072,
        512,
    )
