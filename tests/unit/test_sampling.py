"""Sampling: warpers and processors match HF transformers, generate matches a hand-written loop, draws have
the right law."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import lmforge.models
from lmforge.generation import (
    apply_repetition_penalty,
    apply_temperature,
    generate,
    min_p_filter,
    next_token_probs,
    sample_next,
    token_presence,
    top_k_filter,
    top_p_filter,
    warp,
)

VOCAB = 50
INF = float("inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: with 2 threads on a shared 2-core machine, OpenMP hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def logits() -> torch.Tensor:
    # Random floats: ties have probability zero, so "the k largest" is unambiguous.
    return torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def assert_same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Identical -inf pattern, finite values equal within 1e-6."""
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    finite = torch.isfinite(theirs)
    assert torch.isfinite(ours[finite]).all()
    torch.testing.assert_close(ours[finite], theirs[finite], atol=1e-6, rtol=0)


# --- warpers vs HF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 17, 49, 50])
def test_top_k_matches_hf(logits: torch.Tensor, k: int) -> None:
    ours = top_k_filter(logits, k)
    assert_same_filter(ours, TopKLogitsWarper(k)(None, logits.clone()))
    assert (torch.isfinite(ours).sum(-1) == k).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_p_matches_hf(logits: torch.Tensor, p: float, min_keep: int) -> None:
    ours = top_p_filter(logits, p, min_tokens_to_keep=min_keep)
    theirs = TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(None, logits.clone())
    assert_same_filter(ours, theirs)
    assert (torch.isfinite(ours).sum(-1) >= min_keep).all()


@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 1.5, 10.0])
def test_temperature_matches_hf(logits: torch.Tensor, t: float) -> None:
    torch.testing.assert_close(
        apply_temperature(logits, t), TemperatureLogitsWarper(t)(None, logits.clone()), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_min_p_matches_hf(logits: torch.Tensor, min_p: float, min_keep: int) -> None:
    ours = min_p_filter(logits, min_p, min_tokens_to_keep=min_keep)
    assert_same_filter(ours, MinPLogitsWarper(min_p, min_tokens_to_keep=min_keep)(None, logits.clone()))
    assert (torch.isfinite(ours).sum(-1) >= min_keep).all()
    if min_p <= 0.05:
        assert (torch.isfinite(ours).sum(-1) > min_keep).any()  # the cut is not trivially "keep the top"


def test_min_p_closed_form() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])  # threshold 0.2 · 0.5 = 0.1: the last token goes
    assert torch.isfinite(min_p_filter(probs.log(), 0.2)).tolist() == [[True, True, True, False]]
    assert torch.equal(min_p_filter(probs.log(), None), probs.log())
    assert torch.equal(min_p_filter(probs.log(), 0.0), probs.log())


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_hf(logits: torch.Tensor, penalty: float) -> None:
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2))
    ours = apply_repetition_penalty(logits, token_presence(ids, VOCAB), penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    if penalty != 1.0:
        assert not torch.equal(ours, logits)


def test_repetition_penalty_closed_form_and_padding() -> None:
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    presence = token_presence(torch.tensor([[0, 1, 1]]), 4)
    assert presence.tolist() == [[True, True, False, False]]
    assert apply_repetition_penalty(x, presence, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]  # both made less likely
    # left padding is not "already generated": the pad id (3) stays unpenalised, unlike HF's processor
    padded = token_presence(torch.tensor([[3, 3, 0]]), 4, attention_mask=torch.tensor([[0, 0, 1]]))
    assert padded.tolist() == [[True, False, False, False]]


def test_warp_is_hf_order(logits: torch.Tensor) -> None:
    """temperature → top-k → top-p → min-p, as HF's generate applies its warpers."""
    theirs = logits.clone()
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        theirs = proc(None, theirs)
    assert_same_filter(warp(logits, 0.7, 20, 0.9, 0.05), theirs)


def test_next_token_probs(logits: torch.Tensor) -> None:
    greedy = next_token_probs(logits, temperature=0)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(4))
    assert greedy.max(-1).values.eq(1).all()
    p = next_token_probs(logits, temperature=0.5, top_k=5)
    torch.testing.assert_close(p, warp(logits, 0.5, 5).softmax(-1))
    assert ((p > 0).sum(-1) == 5).all()


def test_filters_do_not_modify_input(logits: torch.Tensor) -> None:
    before = logits.clone()
    top_k_filter(logits, 3)
    top_p_filter(logits, 0.5)
    min_p_filter(logits, 0.1)
    apply_repetition_penalty(logits, torch.ones_like(logits, dtype=torch.bool), 1.5)
    apply_temperature(logits, 0.5)
    assert torch.equal(logits, before)


# --- closed-form cases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "kept"),
    [(0.3, 1), (0.5, 1), (0.51, 2), (0.79, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)],
)
def test_top_p_known_distribution(p: float, kept: int) -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # shuffled so the filter must undo its sort
    out = top_p_filter(probs.log()[perm].unsqueeze(0), p)[0]
    expected = torch.arange(4)[perm] < kept  # the `kept` most probable tokens
    assert torch.equal(torch.isfinite(out), expected)


def test_top_p_min_tokens_to_keep() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.03, 0.02]])
    assert torch.isfinite(top_p_filter(probs.log(), 0.5)).sum() == 1
    assert torch.isfinite(top_p_filter(probs.log(), 0.5, min_tokens_to_keep=3)).tolist() == [
        [True, True, True, False]
    ]


def test_top_k_edge_cases(logits: torch.Tensor) -> None:
    for k in (None, 0, -3, VOCAB, VOCAB + 100):
        assert torch.equal(top_k_filter(logits, k), logits)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert torch.isfinite(top_k_filter(ties, 1)).tolist() == [[False, True, True, False]]


def test_top_p_noop_and_bad_p(logits: torch.Tensor) -> None:
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.equal(top_p_filter(logits, None), logits)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        top_p_filter(logits, 0.5, min_tokens_to_keep=0)


def test_temperature_closed_form() -> None:
    x = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(apply_temperature(x, 0.5), torch.tensor([[4.0, -2.0, 1.0]]))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(x, 0.0)


# --- sample_next: the law of the draws -------------------------------------------------------------

FIVE = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])  # top 2: tokens 3 and 0
N_DRAWS = 20000


def draw(**kw) -> torch.Tensor:
    """N_DRAWS samples from the fixed 5-token distribution, returned as frequencies."""
    ids = sample_next(FIVE.expand(N_DRAWS, 5), generator=torch.Generator().manual_seed(1234), **kw)
    assert ids.shape == (N_DRAWS,) and ids.dtype == torch.long
    return torch.bincount(ids, minlength=5).float() / N_DRAWS


def test_sample_frequencies_match_softmax() -> None:
    assert (draw(temperature=1.0) - FIVE.softmax(-1)).abs().max() < 0.02


def test_sample_frequencies_with_temperature() -> None:
    assert (draw(temperature=0.5) - (FIVE / 0.5).softmax(-1)).abs().max() < 0.02


def test_sample_top_k_stays_in_top_k() -> None:
    freq = draw(temperature=1.0, top_k=2)
    assert freq[[1, 2, 4]].sum() == 0
    expected = FIVE[[0, 3]].softmax(-1)  # renormalised over the survivors
    assert (freq[[0, 3]] - expected).abs().max() < 0.02


def test_sample_top_p_stays_in_nucleus() -> None:
    probs = FIVE.softmax(-1)  # ≈ [0.21, 0.09, 0.05, 0.57, 0.08]; top two hold ≈ 0.78
    freq = draw(temperature=1.0, top_p=0.7)
    assert freq[[1, 2, 4]].sum() == 0
    assert (freq[[0, 3]] - probs[[0, 3]] / probs[[0, 3]].sum()).abs().max() < 0.02


def test_sample_min_p_stays_above_threshold() -> None:
    probs = FIVE.softmax(-1)  # ≈ [0.21, 0.09, 0.05, 0.57, 0.08]; 0.3 · 0.57 ≈ 0.17 keeps tokens 3 and 0
    freq = draw(temperature=1.0, min_p=0.3)
    assert freq[[1, 2, 4]].sum() == 0
    assert (freq[[0, 3]] - probs[[0, 3]] / probs[[0, 3]].sum()).abs().max() < 0.02


def test_sample_greedy_and_reproducible(logits: torch.Tensor) -> None:
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    a = sample_next(logits, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# --- generate on a real model ----------------------------------------------------------------------

MAX_LEN = 16


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    # dropout > 0: generate must switch to eval, or greedy outputs would be noisy. The eager backend
    # because CPU SDPA costs ~50 ms a call here; generate does not depend on the attention backend.
    cfg = {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "max_seq_len": MAX_LEN,
        "dropout": 0.2,
        "attn_backend": "eager",
    }
    return lmforge.models.build(cfg, vocab_size=VOCAB)


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))


def greedy_reference(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Argmax over full forwards of the last MAX_LEN tokens, written out by hand."""
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids[:, -MAX_LEN:])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("n", [0, 1, 11, 30])  # 5 + 30 > MAX_LEN: the context must be cropped
def test_greedy_generate_matches_reference(model: nn.Module, prompt: torch.Tensor, n: int) -> None:
    model.train()
    out = generate(model, prompt, max_new_tokens=n, temperature=0)
    assert model.training and all(m.training for m in model.modules())
    assert out.shape == (3, 5 + n)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, greedy_reference(model, prompt, n))


def test_generate_restores_eval_mode_and_submodule_flags(model: nn.Module, prompt: torch.Tensor) -> None:
    model.eval()
    generate(model, prompt, max_new_tokens=2)
    assert not model.training
    model.train()
    model.blocks[0].eval()  # e.g. a frozen block: its own flag must survive
    generate(model, prompt, max_new_tokens=2)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    model.train()


def test_top_k_1_is_greedy(model: nn.Module, prompt: torch.Tensor) -> None:
    out = generate(model, prompt, max_new_tokens=20, temperature=0.8, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, generate(model, prompt, max_new_tokens=20, temperature=0))


def test_seeded_sampling_is_reproducible(model: nn.Module, prompt: torch.Tensor) -> None:
    def run(seed: int) -> torch.Tensor:
        return generate(
            model, prompt, max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.95,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 25)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- generate: eos and context cropping, on a scripted model --------------------------------------


class CountingModel(nn.Module):
    """Always predicts (last token + 1) mod vocab, and records the context lengths it was fed."""

    def __init__(self, vocab: int = 10, max_seq_len: int = 4) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.seen_lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        assert input_ids.size(1) <= self.config.max_seq_len
        self.seen_lengths.append(input_ids.size(1))
        nxt = (input_ids + 1) % self.vocab
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 10


def test_eos_stops_when_every_row_is_done() -> None:
    m = CountingModel()
    prompt = torch.tensor([[1], [7]])  # row 0 reaches 4 after 3 steps, row 1 after 7
    out = generate(m, prompt, max_new_tokens=20, temperature=0, eos_token_id=4)
    assert out.tolist() == [
        [1, 2, 3, 4, 4, 4, 4, 4],  # finished row keeps emitting eos (would otherwise go 5, 6, ...)
        [7, 8, 9, 0, 1, 2, 3, 4],
    ]
    assert len(m.seen_lengths) == 7


def test_eos_in_prompt_does_not_stop() -> None:
    out = generate(CountingModel(), torch.tensor([[4, 0]]), max_new_tokens=3, temperature=0, eos_token_id=4)
    assert out.tolist() == [[4, 0, 1, 2, 3]]


def test_eos_with_sampling_keeps_emitting_eos() -> None:
    out = generate(
        CountingModel(),
        torch.tensor([[1], [7]]),
        max_new_tokens=20,
        temperature=1.0,
        eos_token_id=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape[1] < 21
    row0 = out[0].tolist()
    assert row0[row0.index(4) :] == [4] * (len(row0) - row0.index(4))


def test_context_cropped_to_max_seq_len() -> None:
    m = CountingModel(max_seq_len=4)
    out = generate(m, torch.tensor([[0, 1]]), max_new_tokens=6, temperature=0)
    assert out.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert m.seen_lengths == [2, 3, 4, 4, 4, 4]


# --- argument validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, name: str) -> None:
    args = {"max_new_tokens": 3} | kwargs
    m = CountingModel()
    with pytest.raises(ValueError, match=name):
        generate(m, torch.tensor([[1]]), **args)
    assert m.seen_lengths == []  # rejected before any forward
    if name != "max_new_tokens":
        with pytest.raises(ValueError, match=name):
            sample_next(torch.zeros(1, 5), **kwargs)


def test_bad_input_shape_raises() -> None:
    with pytest.raises(ValueError, match="input_ids"):
        generate(CountingModel(), torch.tensor([1, 2]), max_new_tokens=3)
    with pytest.raises(ValueError, match="input_ids"):
        generate(CountingModel(), torch.zeros(2, 0, dtype=torch.long), max_new_tokens=3)
