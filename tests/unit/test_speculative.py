"""Speculative decoding: greedy speculative equals greedy decoding of the target, and sampled speculative
decoding draws from the target's distribution (chi-square tests, fixed seeds), whatever the draft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.generation import accept_drafts, generate
from lmforge.models import build

VOCAB = 8
GPT = {"n_layer": 2, "n_head": 2, "n_embd": 16, "max_seq_len": 64, "attn_backend": "eager"}
LLAMA = {"family": "llama", "n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 16, "intermediate_size": 32,
         "max_seq_len": 64, "attn_backend": "eager"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: with 2 threads on a shared 2-core machine, OpenMP hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(cfg: dict, seed: int, std: float = 0.5, vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(seed)
    return build({**cfg, "init_std": std}, vocab_size=vocab).eval()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against expected probabilities (cells with p > 0)."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the target gives probability 0 was emitted"
    expected = probs[keep] * n
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(keep.sum() - 1))
    return float(torch.special.gammaincc(dof / 2, stat / 2))


# --- the acceptance rule on its own ---------------------------------------------------------------------
def random_dists(n: int, k: int, seed: int, sharp: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, VOCAB, generator=g) * sharp).softmax(-1)


def test_rule_emits_the_target_distribution() -> None:
    """Many independent rounds (fixed p, q, drafts sampled from q): the first emitted token follows p_1, the
    second (given the first was accepted) follows p_2, and P(accept d_1) = Σ min(p_1, q_1)."""
    N, k = 200_000, 3
    p = random_dists(1, k + 1, seed=0).expand(N, -1, -1)
    q = random_dists(1, k, seed=1).expand(N, -1, -1)
    g = torch.Generator().manual_seed(2)
    drafts = torch.multinomial(q.reshape(-1, VOCAB), 1, generator=g).view(N, k)
    accepted, nxt = accept_drafts(p, q, drafts, g)
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    assert chi_square_pvalue(torch.bincount(first, minlength=VOCAB).float(), p[0, 0]) > 1e-3
    on = accepted > 0
    second = torch.where(accepted[on] > 1, drafts[on, 1], nxt[on])
    assert chi_square_pvalue(torch.bincount(second, minlength=VOCAB).float(), p[0, 1]) > 1e-3
    expected_rate = torch.minimum(p[0, 0], q[0, 0]).sum()
    assert abs(on.float().mean() - expected_rate) < 0.005
    assert 0.2 < expected_rate < 0.9  # the draft differs from the target: rejections happen
    # had we emitted the drafts as they are, the law would be q's, far from p's: the test has power
    assert chi_square_pvalue(torch.bincount(drafts[:, 0], minlength=VOCAB).float(), p[0, 0]) < 1e-6


def test_rule_all_accepted_gives_bonus_from_last_target_position() -> None:
    p = random_dists(1, 3, seed=3).expand(50_000, -1, -1)
    drafts = torch.zeros(50_000, 2, dtype=torch.long)
    q = torch.zeros(50_000, 2, VOCAB)
    q[:, :, 0] = 1.0  # the draft is certain of token 0: accepted with probability p(0)
    accepted, nxt = accept_drafts(p, q, drafts, torch.Generator().manual_seed(4))
    both = accepted == 2
    assert abs(both.float().mean() - p[0, 0, 0] * p[0, 1, 0]) < 0.01
    assert chi_square_pvalue(torch.bincount(nxt[both], minlength=VOCAB).float(), p[0, 2]) > 1e-3
    corrected = nxt[accepted == 0]  # rejected at once: drawn from norm(max(0, p - q)), never token 0
    assert (corrected != 0).all()


# --- end to end on models -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("draft_cfg", [GPT, LLAMA], ids=["gpt-draft", "llama-draft"])
def test_greedy_speculative_equals_greedy_target(k: int, draft_cfg: dict) -> None:
    target = model(GPT, seed=0, vocab=97)
    draft = model({**draft_cfg, "n_layer": 1}, seed=1, vocab=97)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    stats: dict[str, float] = {}
    out = generate(target, ids, max_new_tokens=30, draft_model=draft, num_draft_tokens=k, stats=stats)
    assert torch.equal(out, generate(target, ids, max_new_tokens=30))
    assert stats["new_tokens"] == 30 and 0 <= stats["accepted"] <= stats["drafted"]
    assert stats["rounds"] < 30 or stats["accepted"] == 0


def test_draft_equal_to_target_accepts_everything() -> None:
    target = model(LLAMA, seed=0, vocab=97)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    stats: dict[str, float] = {}
    out = generate(target, ids, max_new_tokens=20, draft_model=target, num_draft_tokens=4, stats=stats)
    assert torch.equal(out, generate(target, ids, max_new_tokens=20))
    assert stats["acceptance_rate"] == 1.0 and stats["rounds"] == 4  # 4 rounds of 4 drafts + 1 bonus


def test_greedy_speculative_with_repetition_penalty() -> None:
    """The penalty at each drafted position counts the drafts before it, as plain decoding would."""
    target = model(GPT, seed=0, vocab=97)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 25, "repetition_penalty": 3.0}
    plain = generate(target, ids, **kw)
    assert not torch.equal(plain, generate(target, ids, max_new_tokens=25))
    for draft in (target, model({**GPT, "n_layer": 1}, seed=1, vocab=97)):
        assert torch.equal(generate(target, ids, draft_model=draft, num_draft_tokens=4, **kw), plain)


def test_greedy_speculative_without_cache_and_past_the_context() -> None:
    target = model({**GPT, "max_seq_len": 12}, seed=0, vocab=97)
    draft = model({**GPT, "n_layer": 1, "max_seq_len": 12}, seed=1, vocab=97)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    greedy = generate(target, ids, max_new_tokens=15)  # 20 tokens > max_seq_len 12: the window takes over
    assert torch.equal(generate(target, ids, max_new_tokens=15, draft_model=draft, num_draft_tokens=3), greedy)
    assert torch.equal(generate(target, ids, max_new_tokens=15, draft_model=draft, use_cache=False), greedy)


@torch.no_grad()
def test_sampled_speculative_follows_the_target() -> None:
    """The first two sampled tokens of many speculative runs vs the target's exact distribution of them."""
    target, draft = model(GPT, seed=0), model({**LLAMA, "n_layer": 1}, seed=5)
    ids = torch.tensor([[1, 2, 3]])
    p1 = target(ids)[0, -1].softmax(-1)
    p2 = torch.stack([target(torch.tensor([[1, 2, 3, t]]))[0, -1].softmax(-1) for t in range(VOCAB)])
    q1 = draft(ids)[0, -1].softmax(-1)
    assert torch.minimum(p1, q1).sum() < 0.9  # a draft that really differs
    g = torch.Generator().manual_seed(0)
    n = 800
    pairs = torch.stack([
        generate(target, ids, max_new_tokens=3, temperature=1.0, draft_model=draft, num_draft_tokens=2, generator=g)[0, 3:5]
        for _ in range(n)
    ])
    joint = p1[:, None] * p2  # P(t1, t2)
    assert chi_square_pvalue(torch.bincount(pairs[:, 0], minlength=VOCAB).float(), p1) > 1e-3
    assert chi_square_pvalue(torch.bincount(pairs[:, 1], minlength=VOCAB).float(), joint.sum(0)) > 1e-3


def test_eos_stops_inside_an_accepted_run() -> None:
    target = model(LLAMA, seed=0, vocab=97)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    free = generate(target, ids, max_new_tokens=12)
    eos = int(free[0, 7])  # the third new token
    first = free[0, 5:].tolist().index(eos)
    out = generate(target, ids, max_new_tokens=12, draft_model=target, num_draft_tokens=5, eos_token_id=eos)
    assert torch.equal(out, free[:, : 5 + first + 1])  # cut right after EOS although all 5 drafts were accepted


def test_refusals() -> None:
    target = model(GPT, seed=0)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="batch size 1"):
        generate(target, ids.repeat(2, 1), max_new_tokens=3, draft_model=target)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, ids, max_new_tokens=3, draft_model=model(GPT, seed=0, vocab=VOCAB + 1))
    t5 = build({"family": "t5", "n_layer": 1, "n_head": 2, "n_embd": 16, "head_dim": 8, "intermediate_size": 32}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="decoder-only"):
        generate(target, ids, max_new_tokens=3, draft_model=t5)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        generate(target, ids, max_new_tokens=3, draft_model=target, num_draft_tokens=0)
