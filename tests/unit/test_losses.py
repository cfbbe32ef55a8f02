"""Post-training losses, each against an independent computation: hand arithmetic, math/statistics, torch refs."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.losses import (
    bradley_terry_loss,
    dpo_loss,
    dpo_uses_average_logps,
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    token_logprobs,
)

ATOL = 1e-6


def close(a: torch.Tensor | float, b: torch.Tensor | float, atol: float = ATOL, rtol: float = 0.0) -> bool:
    """|a − b| ≤ atol + rtol·|b| elementwise, compared in float64."""
    a64, b64 = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a64, b64, atol=atol, rtol=rtol)


def logsig(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


# ---------------------------------------------------------------- log-probs, entropy, masked reductions


def test_token_logprobs_matches_cross_entropy_and_zeroes_ignored() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :2] = -100
    targets[1, 4] = -100
    lp = token_logprobs(logits, targets)
    ref = -F.cross_entropy(logits.detach().reshape(-1, 7), targets.reshape(-1), reduction="none").view(2, 5)
    assert lp.dtype == torch.float32 and lp.shape == (2, 5)
    assert close(lp, ref)
    ignored = targets == -100
    assert torch.equal(lp[ignored], torch.zeros(int(ignored.sum())))
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 0], torch.zeros(7))  # ignored positions get no gradient


def test_token_logprobs_low_precision_upcasts_per_row() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 11).bfloat16()
    targets = torch.randint(0, 11, (3, 4))
    targets[2, 3] = -100
    lp = token_logprobs(logits, targets)
    ref = torch.where(targets != -100, token_logprobs(logits.float(), targets), 0.0)
    assert lp.dtype == torch.float32 and close(lp, ref)
    assert lp[2, 3].item() == 0.0


def test_sequence_logprobs_sum_and_average() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6)
    targets = torch.tensor([[-100, 1, 2, 3], [-100, -100, 5, -100]])
    per_tok = torch.log_softmax(logits, -1)
    want_sum = [sum(per_tok[0, t, targets[0, t]].item() for t in (1, 2, 3)), per_tok[1, 2, 5].item()]
    assert close(sequence_logprobs(logits, targets), want_sum)
    assert close(sequence_logprobs(logits, targets, average=True), [want_sum[0] / 3, want_sum[1] / 1])


def test_entropy_matches_categorical_and_survives_neg_inf() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 9) * 3
    assert close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())
    masked = logits.clone()
    masked[..., :4] = float("-inf")
    ent = entropy_from_logits(masked)
    assert torch.isfinite(ent).all()
    assert close(ent, torch.distributions.Categorical(logits=logits[..., 4:]).entropy())
    assert close(entropy_from_logits(logits.bfloat16()), entropy_from_logits(logits.bfloat16().float()))


def test_masked_reductions_and_whiten() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, mask).item() == 13.0
    assert masked_mean(x, mask).item() == 13.0 / 4
    assert close(masked_mean(x, mask, dim=1), [1.5, 5.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    vals = np.array([1.0, 2.0, 4.0, 6.0])
    mean, std = vals.mean(), vals.std(ddof=1)  # Bessel-corrected, as TRL's masked_var
    w = masked_whiten(x, mask)
    assert close(w[mask.bool()], (vals - mean) / np.sqrt(std**2 + 1e-8))
    assert torch.equal(w[~mask.bool()], torch.zeros(2))
    assert close(
        masked_whiten(x, mask, shift_mean=False)[mask.bool()], (vals - mean) / np.sqrt(std**2 + 1e-8) + mean
    )


# ---------------------------------------------------------------- preference losses


def test_bradley_terry_against_math() -> None:
    rc = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.5, 2.5])
    out = bradley_terry_loss(rc, rr)
    want = -(logsig(1.0) + logsig(-1.0) + logsig(-0.5)) / 3
    assert close(out.loss, want)
    assert close(out.accuracy, 1 / 3) and close(out.margin_mean, (1.0 - 1.0 - 0.5) / 3)
    margin = torch.tensor([0.5, 0.0, 1.0])
    want_m = -(logsig(1.0 - 0.5) + logsig(-1.0) + logsig(-0.5 - 1.0)) / 3
    assert close(bradley_terry_loss(rc, rr, margin).loss, want_m)
    assert close(bradley_terry_loss(rc, rr, 0.25).loss, -(logsig(0.75) + logsig(-1.25) + logsig(-0.75)) / 3)
    out.loss.backward()
    assert torch.isfinite(rc.grad).all()


def _random_logps(n: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(4)
    return [(-torch.rand(n) * 20).requires_grad_(i < 2) for i in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_against_closed_form(loss_type: str, eps: float) -> None:
    pc, pr, rc, rr = _random_logps()
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    want = []
    for i in range(pc.numel()):
        z = (pc[i].item() - pr[i].item()) - (rc[i].item() - rr[i].item())
        if loss_type == "sigmoid":
            want.append(-logsig(beta * z) * (1 - eps) - logsig(-beta * z) * eps)
        elif loss_type == "ipo":
            want.append((z - 1 / (2 * beta)) ** 2)
        else:
            want.append((-logsig(beta * z) * (1 - eps) + logsig(-beta * z) * eps) / (1 - 2 * eps))
    rtol = 1e-6 if loss_type == "ipo" else 0.0  # ipo squares z ≈ 20: float32 carries ~7 significant digits
    assert close(out.losses, want, rtol=rtol)
    assert close(out.loss, sum(want) / len(want), rtol=rtol)
    cr = [beta * (pc[i].item() - rc[i].item()) for i in range(pc.numel())]
    rj = [beta * (pr[i].item() - rr[i].item()) for i in range(pc.numel())]
    assert close(out.chosen_rewards, cr) and close(out.rejected_rewards, rj)
    assert not out.chosen_rewards.requires_grad
    assert close(out.margin, sum(c - r for c, r in zip(cr, rj)) / len(cr))
    assert close(out.accuracy, sum(c > r for c, r in zip(cr, rj)) / len(cr))
    out.loss.backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_dpo_errors_and_average_flag() -> None:
    pc, pr, rc, rr = (t.detach() for t in _random_logps())
    with pytest.raises(ValueError, match=r"stage\.loss_type.*sigmoid, ipo, robust"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge2")
    with pytest.raises(ValueError, match=r"stage\.label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    assert dpo_uses_average_logps("ipo") and not dpo_uses_average_logps("sigmoid")
    with pytest.raises(ValueError, match=r"stage\.loss_type"):
        dpo_uses_average_logps("nope")


# ---------------------------------------------------------------- RL: GAE, KL, PPO


def test_gae_by_hand_with_right_and_left_padding() -> None:
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[0.5, -1.0, 2.0], [0.5, -1.0, 100.0], [7.0, 0.5, -1.0]])
    values = torch.tensor([[0.2, 0.4, 0.1], [0.2, 0.4, 50.0], [float("nan"), 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]])
    adv, ret = gae(rewards, values, mask, g, lam)
    # full row: the value after the last token is 0
    d2 = 2.0 + g * 0.0 - 0.1
    d1 = -1.0 + g * 0.1 - 0.4
    d0 = 0.5 + g * 0.4 - 0.2
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    # right-padded row: token 1 is the last, its next value is 0; the pad's reward/value never leak back
    p1 = -1.0 + g * 0.0 - 0.4
    p0 = d0 + g * lam * p1
    # left-padded row: same as the first two tokens of a 2-token episode
    l1 = -1.0 + g * 0.0 - 0.4
    l0 = (0.5 + g * 0.4 - 0.2) + g * lam * l1
    want_adv = [[a0, a1, a2], [p0, p1, 0.0], [0.0, l0, l1]]
    assert close(adv, want_adv)
    assert close(ret, [[a0 + 0.2, a1 + 0.4, a2 + 0.1], [p0 + 0.2, p1 + 0.4, 0.0], [0.0, l0 + 0.2, l1 + 0.4]])
    assert abs(a0 - 0.70176) < 1e-9  # the arithmetic above, written out once


def test_gae_matches_discounted_sum_of_deltas() -> None:
    torch.manual_seed(5)
    g, lam = 0.95, 0.7
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    adv, _ = gae(r, v, mask, g, lam)
    for b, n in enumerate(lengths):
        vv = v[b, :n].tolist() + [0.0]
        deltas = [r[b, t].item() + g * vv[t + 1] - vv[t] for t in range(n)]
        for t in range(n):
            want = sum((g * lam) ** k * deltas[t + k] for k in range(n - t))
            assert close(adv[b, t], want, atol=1e-5)
        assert torch.equal(adv[b, n:], torch.zeros(6 - n))


def test_kl_penalty_kinds() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -0.3]), torch.tensor([-1.5, -1.0, -0.3])
    d = [0.5, -1.0, 0.0]
    assert close(kl_penalty(logp, ref), d)
    assert close(kl_penalty(logp, ref, "k2"), [0.5 * x * x for x in d])
    assert close(kl_penalty(logp, ref, "k3"), [math.exp(-x) - (-x) - 1 for x in d])
    assert close(kl_penalty(logp, ref, "abs"), [abs(x) for x in d])
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(logp, ref, "k4")


def test_ppo_policy_loss_clipping_cases() -> None:
    ratios = [0.5, 0.5, 1.5, 1.5, 1.1, 3.0]
    advs = [1.0, -1.0, 1.0, -1.0, 1.0, 1.0]
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.2, -0.7]])
    logp = (old + torch.log(torch.tensor([ratios]))).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the 6th token (which would clip) is padding
    loss, clipfrac, approx_kl = ppo_policy_loss(logp, old, torch.tensor([advs]), mask, clip_eps=0.2)
    # per token: max(-A·r, -A·clip(r, 0.8, 1.2)); clipped active on tokens 1 (A<0, r<0.8) and 2 (A>0, r>1.2)
    per_tok = [max(-a * r, -a * min(max(r, 0.8), 1.2)) for r, a in zip(ratios[:5], advs[:5])]
    assert close(per_tok, [-0.5, 0.8, -1.2, 1.5, -1.1])
    assert close(loss, sum(per_tok) / 5)
    assert clipfrac.item() == pytest.approx(2 / 5, abs=1e-7)
    assert close(approx_kl, sum(0.5 * math.log(r) ** 2 for r in ratios[:5]) / 5)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    # unclipped tokens: d(−A·r)/dlogp = −A·r, over 5 counted tokens; clipped tokens and padding: 0
    assert close(logp.grad, [[-0.5 / 5, 0.0, 0.0, 1.5 / 5, -1.1 / 5, 0.0]])


def test_ppo_value_loss_clipping_cases() -> None:
    values = torch.tensor([[0.5, 0.1, -0.5, 9.0]], requires_grad=True)
    old, returns = torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, clip_value=0.2)
    # token 0: max((0.5-1)², (0.2-1)²) = 0.64 (clipped); token 1: 0.01 both; token 2: max(0.25, 0.04) = 0.25
    assert close(loss, 0.5 * (0.64 + 0.01 + 0.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3, abs=1e-7)
    loss.backward()
    assert torch.isfinite(values.grad).all() and values.grad[0, 0].item() == 0.0  # clipped branch: no grad


# ---------------------------------------------------------------- GRPO


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_against_statistics(scale: str) -> None:
    torch.manual_seed(6)
    rewards = torch.randn(12)
    G = 4
    adv = group_advantages(rewards, G, scale_rewards=scale)
    flat = rewards.tolist()
    batch_std = statistics.stdev(flat)
    want = []
    for i in range(0, 12, G):
        grp = flat[i : i + G]
        mean, std = statistics.mean(grp), statistics.stdev(grp)
        denom = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
        want += [(r - mean) / denom for r in grp]
    assert close(adv, want)


def test_group_advantages_errors_and_equal_rewards() -> None:
    assert torch.equal(group_advantages(torch.ones(4), 2), torch.zeros(4))  # no signal, no NaN
    with pytest.raises(ValueError, match=r"stage\.num_generations"):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError, match=r"stage\.num_generations"):
        group_advantages(torch.ones(6), 1)
    with pytest.raises(ValueError, match=r"stage\.scale_rewards"):
        group_advantages(torch.ones(4), 2, scale_rewards="global")


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_grpo_loss_against_explicit_formula(normalization: str) -> None:
    torch.manual_seed(7)
    N, T, eps, eps_high, beta = 3, 5, 0.2, 0.28, 0.04
    old = -torch.rand(N, T) * 3
    logp = (old + torch.randn(N, T) * 0.3).requires_grad_(True)
    ref = -torch.rand(N, T) * 3
    adv = torch.tensor([1.0, -0.5, 0.7])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    out = grpo_loss(logp, old, adv, mask, eps, eps_high, beta, ref, normalization)
    per_seq, all_tok, kls, clipped = [], [], [], 0
    for i in range(N):
        toks = []
        for t in range(int(mask[i].sum())):
            lp, o, rf, a = logp[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i].item()
            r = math.exp(lp - o)
            k3 = math.exp(rf - lp) - (rf - lp) - 1
            toks.append(-min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a) + beta * k3)
            kls.append(k3)
            clipped += (r < 1 - eps and a < 0) or (r > 1 + eps_high and a > 0)
        per_seq.append(sum(toks) / len(toks))
        all_tok += toks
    want = sum(all_tok) / len(all_tok) if normalization == "token" else sum(per_seq) / N
    assert close(out.loss, want)
    assert close(out.kl, sum(kls) / len(kls))
    assert close(out.clipfrac, clipped / len(all_tok))
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[1, 2:], torch.zeros(3))


def test_grpo_on_policy_gradient_is_advantage_weighted_and_errors() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.ones(2, 2)
    out = grpo_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask)
    assert close(out.loss, -(2.0 * 2 - 1.0 * 2) / 4) and out.clipfrac.item() == 0.0 and out.kl.item() == 0.0
    out.loss.backward()
    assert close(logp.grad, [[-0.5, -0.5], [0.25, 0.25]])  # −A / total tokens (ratio = 1)
    with pytest.raises(ValueError, match=r"ref_logp"):
        grpo_loss(logp, logp.detach(), torch.ones(2), mask, beta=0.1)
    with pytest.raises(ValueError, match=r"token, sequence"):
        grpo_loss(logp, logp.detach(), torch.ones(2), mask, normalization="batch")
