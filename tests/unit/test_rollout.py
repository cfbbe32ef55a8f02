"""RL rollouts: the completion mask stops at the first stop token, and the teacher-forced log-probs of a
rollout are the ones generation sampled from (same positions under left padding), so PPO/GRPO ratios start at 1."""

from __future__ import annotations

import torch

from lmforge.models import build
from lmforge.models.heads import ScalarHeadModel, last_token_index
from lmforge.stages.rollout import completion_mask, rollout_logprobs, sample_rollout


class ByteTok:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def tiny(family: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"family": family, "n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 40, "max_seq_len": 64}
    if family == "llama":
        cfg.update(n_kv_head=2, intermediate_size=64)
    return build(cfg).eval()


def test_completion_mask_keeps_tokens_up_to_the_first_stop():
    completion = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(completion_mask(completion, [2]), expected)
    assert completion_mask(completion, []).all()


def test_greedy_rollout_logprobs_are_the_argmax_of_the_teacher_forced_logits():
    model = tiny()
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])  # row 0 left-padded by two
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "prompts": ["a", "b"]}
    rollout = sample_rollout(model, batch, tokenizer=ByteTok(), num_generations=2, max_new_tokens=6, stop_ids=[3],
                             pad_id=0, temperature=0.0)
    assert rollout.ids.shape == (4, 11) and rollout.prompt_len == 5
    assert torch.equal(rollout.ids[0], rollout.ids[1])  # greedy: the two generations of a prompt agree
    with torch.no_grad():
        logp, entropy = rollout_logprobs(model, rollout, with_entropy=True)
        logits = model(rollout.ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids)
    best = logits[:, 4:-1].log_softmax(-1).max(-1).values
    m = rollout.completion_mask
    torch.testing.assert_close(logp[m], best[m], atol=1e-5, rtol=0)  # every greedy token was the argmax
    assert (logp[~m] == 0).all() and (entropy >= 0).all()
    # the left-padded prompt continues exactly as it does alone: positions follow the real tokens
    alone = sample_rollout(model, {"input_ids": ids[:1, 2:], "attention_mask": mask[:1, 2:], "prompts": ["a"]},
                           tokenizer=ByteTok(), num_generations=1, max_new_tokens=6, stop_ids=[3], pad_id=0, temperature=0.0)
    assert torch.equal(alone.ids[0, 3:], rollout.ids[0, 5:])


def test_scalar_head_reads_the_last_real_token_for_either_padding_side():
    mask_right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mask_left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    ids = torch.ones(2, 4, dtype=torch.long)
    assert last_token_index(mask_right, ids).tolist() == [2, 3]
    assert last_token_index(mask_left, ids).tolist() == [3, 3]
    rm = ScalarHeadModel(tiny("gpt"))
    assert torch.equal(rm.score(ids, mask_right), torch.zeros(2))  # zero-initialised head: every sequence scores 0
    torch.nn.init.normal_(rm.head.weight)
    per_token = rm(ids, mask_right)
    torch.testing.assert_close(rm.score(ids, mask_right), per_token[[0, 1], [2, 3]])


def test_rollout_logprobs_take_the_chunked_head_with_the_same_values_entropies_and_grads():
    """Old-policy, reference and policy passes skip the logits: same log-probs (0 where masked), entropies and
    gradients as the logits path."""
    for family in ("gpt", "llama"):
        model = tiny(family)
        ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        rollout = sample_rollout(model, {"input_ids": ids, "attention_mask": mask, "prompts": ["a", "b"]}, tokenizer=ByteTok(),
                                 num_generations=2, max_new_tokens=6, stop_ids=[3], pad_id=0, temperature=1.0)
        rollout.completion_mask[1, 3:] = False  # a stop partway
        weights = torch.randn(rollout.completion_mask.shape, generator=torch.Generator().manual_seed(0))
        for with_entropy in (False, True):
            results = []
            for chunked in (True, False):
                model.loss_in_forward = chunked  # instance attribute: False sends rollout_logprobs down the logits path
                logp, entropy = rollout_logprobs(model, rollout, with_entropy=with_entropy)
                (weights * logp).sum().backward()
                results.append((logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}))
                model.zero_grad(set_to_none=True)
            (a, ea, ga), (b, eb, gb) = results
            assert (a[~rollout.completion_mask] == 0).all()
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            if with_entropy:
                assert ea.shape == a.shape and not ea.requires_grad
                torch.testing.assert_close(ea, eb, atol=1e-5, rtol=0)
            else:
                assert ea is None and eb is None
            for name in ga:
                torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-4, msg=f"{family} {name}")


def test_completions_padded_to_the_limit_give_the_same_logprobs_losses_and_advantages():
    """Under static shapes (tensor parallelism) rollouts are padded to max_new_tokens so the training forward has one
    length per prompt length: the padding is masked, so log-probs, the GRPO loss and PPO's GAE are unchanged."""
    from lmforge.losses.policy import gae, grpo_loss
    from lmforge.stages.rollout import pad_completions

    model = tiny()
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "prompts": ["a", "b"]}
    # half the vocabulary stops a row: every row stops early, so the completions are shorter than the limit
    rollout = sample_rollout(model, batch, tokenizer=ByteTok(), num_generations=2, max_new_tokens=12, stop_ids=list(range(1, 40, 2)),
                             pad_id=0, temperature=1.0, generator=torch.Generator().manual_seed(0))
    L = rollout.completion_mask.size(1)
    assert L < 12, "the test needs completions shorter than the limit"
    padded = pad_completions(rollout, 12, pad_id=0)
    assert padded.ids.shape == (4, 17) and padded.completion_mask.shape == (4, 12) and not padded.completion_mask[:, L:].any()
    assert torch.equal(padded.ids[:, :5 + L], rollout.ids) and torch.equal(padded.lengths(), rollout.lengths())
    assert pad_completions(padded, 12, pad_id=0) is padded  # already at the limit
    with torch.no_grad():
        logp, entropy = rollout_logprobs(model, rollout, with_entropy=True)
        logp_p, entropy_p = rollout_logprobs(model, padded, with_entropy=True)
    torch.testing.assert_close(logp_p[:, :L], logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy_p[:, :L], entropy, atol=1e-5, rtol=0)
    assert (logp_p[:, L:] == 0).all()
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0])
    for norm in ("token", "sequence"):
        a = grpo_loss(logp, logp - 0.1, adv, rollout.completion_mask, beta=0.04, ref_logp=logp - 0.2, normalization=norm)
        b = grpo_loss(logp_p, logp_p - 0.1, adv, padded.completion_mask, beta=0.04, ref_logp=logp_p - 0.2, normalization=norm)
        torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=0)
    values = torch.randn(4, 12)
    rewards = torch.randn(4, 12)
    adv_a, ret_a = gae(rewards[:, :L], values[:, :L], rollout.completion_mask, 0.99, 0.95)
    adv_b, ret_b = gae(rewards, values, padded.completion_mask, 0.99, 0.95)
    assert torch.equal(adv_b[:, :L], adv_a) and torch.equal(ret_b[:, :L], ret_a) and not adv_b[:, L:].any()
