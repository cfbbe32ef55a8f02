"""T5 span corruption: the noise mask's statistics, T5's input/target layout, and the objective end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from lmforge.data.packed import PackedBlocks
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError
from lmforge.models import build
from lmforge.objectives.base import IGNORE_INDEX
from lmforge.objectives.span import (
    SpanCorruption,
    decoder_only_layout,
    random_spans_noise_mask,
    span_corrupt,
    span_counts,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
SENTENCE = "Thank you for inviting me to your party last week ."
WORDS = SENTENCE.split() + [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A word-level tokenizer (one id per word) with lmforge's specials and the objective's 100 sentinels."""
    vocab = {w: i for i, w in enumerate(["<|eos|>", "<|bos|>", "<|pad|>", "<unk>", *WORDS])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(hf)
    tokenizer.add_special_tokens(SpanCorruption().special_tokens())
    return tokenizer


@pytest.fixture(scope="module")
def objective(tok: Tokenizer) -> SpanCorruption:
    obj = SpanCorruption()
    obj.bind(tok)
    return obj


def word_batch(batch: int, block: int, seed: int) -> dict[str, torch.Tensor]:
    """A packed CLM batch over the filler words (ids 4 .. vocab of words)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(4, 4 + len(WORDS), (batch, block + 1), generator=g)
    return {"input_ids": blocks[:, :-1], "targets": blocks[:, 1:]}


def spans_of(mask: torch.Tensor) -> list[tuple[bool, int]]:
    """[(is_noise, length), ...] runs of one mask row."""
    runs: list[tuple[bool, int]] = []
    for value in mask.tolist():
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


# --- the noise mask ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [2, 7, 20, 65, 257, 513])
def test_mask_has_exact_counts_and_t5_shape(length: int) -> None:
    num_noise, num_spans = span_counts(length, 0.15, 3.0)
    assert num_noise == min(max(round(length * 0.15), 1), length - 1)
    assert num_spans == max(1, round(num_noise / 3.0))
    mask = random_spans_noise_mask(32, length, generator=torch.Generator().manual_seed(length))
    assert mask.shape == (32, length)
    for row in mask:
        runs = spans_of(row)
        assert int(row.sum()) == num_noise
        assert sum(1 for noise, _ in runs if noise) == num_spans
        assert (
            not runs[0][0] and runs[-1][0]
        )  # starts with text, ends with noise: alternating, 2 · spans runs
        assert len(runs) == 2 * num_spans


def test_span_lengths_are_a_uniform_random_composition() -> None:
    """Mean span length ≈ 3, and single span lengths follow the uniform-composition law P(len = j)."""
    length, draws = 513, 4000
    num_noise, num_spans = span_counts(length, 0.15, 3.0)
    mask = random_spans_noise_mask(draws, length, generator=torch.Generator().manual_seed(0))
    lengths = [n for row in mask[:200] for noise, n in spans_of(row) if noise]
    assert abs(sum(lengths) / len(lengths) - 3.0) < 0.1 and len(set(lengths)) > 3  # random, not all 3
    # the first noise span's length j: C(n - j - 1, k - 2) / C(n - 1, k - 1) for a uniform composition
    span_id = (mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0))).long().cumsum(dim=1)
    first = (mask & (span_id == 1)).sum(dim=1)
    for j in (1, 2, 3, 5):
        expected = math.comb(num_noise - j - 1, num_spans - 2) / math.comb(num_noise - 1, num_spans - 1)
        assert abs(first.eq(j).float().mean().item() - expected) < 0.03, j


def test_mask_draws_depend_on_the_generator() -> None:
    a = random_spans_noise_mask(4, 100, generator=torch.Generator().manual_seed(1))
    b = random_spans_noise_mask(4, 100, generator=torch.Generator().manual_seed(1))
    c = random_spans_noise_mask(4, 100, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- T5's layout -------------------------------------------------------------------------------------------
def test_layout_of_the_t5_paper_example(tok: Tokenizer, objective: SpanCorruption) -> None:
    ids = torch.tensor([tok.encode(SENTENCE)])
    #                     Thank you for inviting me to your party last week .
    noise = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    inputs, targets = span_corrupt(ids, noise, objective.sentinel_ids, tok.eos_id)
    w = {word: tok.encode(word)[0] for word in SENTENCE.split()}
    s0, s1, s2 = (tok.special_id(f"sentinel_{i}") for i in range(3))
    eos = tok.eos_id
    assert inputs[0].tolist() == [
        w["Thank"],
        w["you"],
        s0,
        w["me"],
        w["to"],
        w["your"],
        w["party"],
        s1,
        w["week"],
        w["."],
        eos,
    ]
    assert targets[0].tolist() == [s0, w["for"], w["inviting"], s1, w["last"], s2, eos]
    assert tok.decode(inputs[0].tolist(), skip_special_tokens=False) == (
        "Thank you <extra_id_0> me to your party <extra_id_1> week . <|eos|>"
    )
    assert (
        tok.decode(targets[0].tolist(), skip_special_tokens=False)
        == "<extra_id_0> for inviting <extra_id_1> last <extra_id_2> <|eos|>"
    )


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """Undo span corruption: each sentinel in the inputs becomes the tokens after it in the targets."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets:
        if t in sentinels:
            current = spans.setdefault(t, [])
        elif t != eos:
            current.append(t)
    out: list[int] = []
    for t in inputs:
        if t == eos:
            break
        out.extend(spans[t] if t in sentinels else [t])
    return out


def test_inputs_and_targets_reconstruct_the_original(objective: SpanCorruption, tok: Tokenizer) -> None:
    blocks = word_batch(8, 96, seed=3)["input_ids"]
    noise = random_spans_noise_mask(8, 96, generator=torch.Generator().manual_seed(3))
    inputs, targets = span_corrupt(blocks, noise, objective.sentinel_ids, tok.eos_id)
    n_in, n_tgt = objective.lengths(96)
    assert inputs.shape == (8, n_in) and targets.shape == (8, n_tgt)
    sentinels = objective.sentinel_ids.tolist()
    num_noise, num_spans = span_counts(96, 0.15, 3.0)
    for row in range(8):
        assert (
            reconstruct(inputs[row].tolist(), targets[row].tolist(), sentinels, tok.eos_id)
            == blocks[row].tolist()
        )
        in_sentinels = [t for t in inputs[row].tolist() if t in sentinels]
        assert in_sentinels == sentinels[:num_spans]  # one per span, in order
        assert (
            targets[row, 0] == sentinels[0]
            and targets[row, -1] == tok.eos_id
            and inputs[row, -1] == tok.eos_id
        )
        assert (
            targets[row] < sentinels[0]
        ).sum() - 1 == num_noise  # noise tokens + EOS, all below the sentinels


def test_decoder_only_layout_puts_loss_on_the_targets_only() -> None:
    inputs = torch.tensor([[10, 11, 90, 12, 1], [13, 90, 1, 2, 2]])
    input_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[90, 20, 21, 1], [90, 22, 1, IGNORE_INDEX]])
    input_ids, targets = decoder_only_layout(inputs, input_mask, labels, pad_id=2)
    assert input_ids.tolist() == [[10, 11, 90, 12, 1, 90, 20, 21], [13, 90, 1, 90, 22, 1, 2, 2]]
    assert targets.tolist() == [
        [-100, -100, -100, -100, 90, 20, 21, 1],
        [-100, -100, 90, 22, 1, -100, -100, -100],  # padding moved behind the row's real tokens
    ]


# --- the objective -----------------------------------------------------------------------------------------
def test_special_tokens_and_bind(tok: Tokenizer, objective: SpanCorruption) -> None:
    specials = SpanCorruption(n_sentinels=3).special_tokens()
    assert specials == {
        "sentinel_0": "<extra_id_0>",
        "sentinel_1": "<extra_id_1>",
        "sentinel_2": "<extra_id_2>",
    }
    assert objective.sentinel_ids.numel() == 100 and len(set(objective.sentinel_ids.tolist())) == 100
    assert tok.token_byte_lengths()[objective.sentinel_ids].sum() == 0  # sentinels count 0 bytes in val/bpb
    assert (objective.eos_id, objective.pad_id) == (tok.eos_id, tok.pad_id)


def test_yaml_instantiates() -> None:
    obj = instantiate(OmegaConf.load(CONF / "objective" / "span.yaml"))
    assert isinstance(obj, SpanCorruption) and obj.noise_density == 0.15 and obj.n_sentinels == 100
    assert set(obj.supported_kinds) == {"encoder_decoder", "decoder"}


def test_bad_settings_name_the_key(objective: SpanCorruption) -> None:
    for kwargs, key in (
        ({"noise_density": 0.0}, "objective.noise_density"),
        ({"mean_noise_span_length": 0.5}, "objective.mean_noise_span_length"),
    ):
        with pytest.raises(ConfigError) as err:
            SpanCorruption(**kwargs)
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        objective.lengths(5000)  # 250 spans > 100 sentinels
    assert err.value.key == "objective.n_sentinels"


def test_model_seq_len(objective: SpanCorruption) -> None:
    n_in, n_tgt = objective.lengths(513)
    assert (n_in, n_tgt) == (513 - 77 + 26 + 1, 77 + 26 + 1)
    assert objective.model_seq_len(512) == n_in
    assert objective.model_seq_len(512, kind="decoder") == n_in + n_tgt - 1


@pytest.fixture(scope="module")
def t5(tok: Tokenizer):
    torch.manual_seed(0)
    return build(
        {"family": "t5", "n_layer": 2, "n_head": 2, "n_embd": 32, "head_dim": 16, "intermediate_size": 64},
        vocab_size=tok.vocab_size,
    )


@pytest.fixture(scope="module")
def gpt(tok: Tokenizer):
    torch.manual_seed(0)
    return build(
        {"family": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "max_seq_len": 256},
        vocab_size=tok.vocab_size,
    )


def test_objective_on_t5_and_gpt(objective: SpanCorruption, tok: Tokenizer, t5, gpt) -> None:
    batch = word_batch(4, 48, seed=5)
    _, n_tgt = objective.lengths(49)
    t5.eval(), gpt.eval()
    with torch.no_grad():
        out_t5, out_gpt = objective(t5, batch), objective(gpt, batch)
    for out in (out_t5, out_gpt):
        assert torch.isfinite(out.loss) and out.loss > 0
        assert int(out.n_tokens) == 4 * n_tgt
    assert out_t5.targets.shape == (4, n_tgt)
    # same eval masks for both models: the same counted targets, so val/bpb's byte counts agree too
    counted = lambda t: sorted(t[t != IGNORE_INDEX].tolist())  # noqa: E731
    assert counted(out_t5.targets) == counted(out_gpt.targets)
    # val/bpb's denominator: the counted targets' bytes are the noise tokens' bytes (sentinels, EOS: 0 bytes)
    bytes_ = torch.from_numpy(tok.token_byte_lengths())
    targets = out_t5.targets[out_t5.targets != IGNORE_INDEX]
    noise = targets[(targets < objective.sentinel_ids.min()) & (targets != tok.eos_id)]
    assert noise.numel() == 4 * span_counts(49, 0.15, 3.0)[0]
    assert bytes_[targets].sum() == bytes_[noise].sum() > 0


def test_eval_is_deterministic_and_training_draws(objective: SpanCorruption, t5) -> None:
    batch, other = word_batch(2, 40, seed=6), word_batch(2, 40, seed=7)
    t5.eval()
    with torch.no_grad():
        a, b, c = objective(t5, batch), objective(t5, batch), objective(t5, other)
    assert torch.equal(a.targets, b.targets) and a.loss == b.loss
    assert not torch.equal(a.targets, c.targets)
    t5.train()
    torch.manual_seed(0)
    d = objective(t5, batch)
    e = objective(t5, batch)
    t5.eval()
    assert not torch.equal(d.targets, e.targets)  # global RNG: a new mask every training step


def test_val_tail_padding_corrupts_only_the_real_prefix(
    objective: SpanCorruption, tok: Tokenizer, t5, gpt
) -> None:
    tokens = word_batch(1, 200, seed=8)["input_ids"][0].numpy()
    tail = PackedBlocks(tokens[:90], block_size=32, pad_id=tok.pad_id, include_tail=True)
    batch = {k: torch.stack([tail[i][k] for i in range(len(tail))]) for k in ("input_ids", "targets")}
    blocks, n_real = objective.text_blocks(batch)
    assert n_real.tolist() == [33, 33, 26]
    assert blocks[:, :-1].tolist() == [
        tokens[0:32].tolist(),
        tokens[32:64].tolist(),
        tokens[64:90].tolist() + [tok.pad_id] * 6,
    ]
    inputs, input_mask, labels = objective.corrupt(blocks, n_real, torch.Generator().manual_seed(0))
    n_in, n_tgt = objective.lengths(26)
    assert input_mask[2].sum() == n_in and (labels[2] != IGNORE_INDEX).sum() == n_tgt
    assert inputs[2, n_in:].eq(tok.pad_id).all() and labels[2, n_tgt:].eq(IGNORE_INDEX).all()
    real = inputs[2, :n_in].tolist(), labels[2, :n_tgt].tolist()
    assert reconstruct(*real, objective.sentinel_ids.tolist(), tok.eos_id) == tokens[64:90].tolist()
    t5.eval(), gpt.eval()
    with torch.no_grad():
        out_t5, out_gpt = objective(t5, batch), objective(gpt, batch)
    assert (
        torch.isfinite(out_t5.loss) and torch.isfinite(out_gpt.loss) and out_t5.n_tokens == out_gpt.n_tokens
    )


def test_t5_tiny_learns_span_corruption(objective: SpanCorruption, tok: Tokenizer) -> None:
    """A few optimizer steps on one batch lower the loss: gradients reach every part of the model."""
    cfg = OmegaConf.load(CONF / "model" / "t5-tiny.yaml")
    torch.manual_seed(0)
    model = build(cfg, vocab_size=tok.vocab_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = word_batch(8, 32, seed=9)
    losses = []
    for _ in range(25):
        torch.manual_seed(1)  # the same mask every step: memorise it
        loss = objective(model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
