"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a small draft model proposes k tokens,
the target model checks all of them in one forward, and a rejection rule keeps the output distribution
exactly the target's.

One round, with q the draft's and p the target's next-token distributions (after the same warpers):
  1. the draft samples d_1..d_k autoregressively from q_1..q_k;
  2. the target runs once over [last token, d_1..d_k], giving p_1..p_{k+1};
  3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), left to right; at the first rejection the
     token is drawn from norm(max(0, p_i − q_i)) and the round ends; if all k are accepted, a bonus token is
     drawn from p_{k+1}.
Each round thus emits between 1 and k + 1 tokens, each distributed as the target alone would have produced
it. At temperature 0 both distributions are one-hot, so a draft is accepted iff it is the target's argmax
and a rejection yields the target's argmax: greedy speculative decoding equals greedy decoding of the target.

Both models keep KV caches; rejected drafts are taken back with `DecodeState.truncate`. Batch size 1 only
(rows of a batch would accept different numbers of tokens and fall out of step). Decoder-only models; the
draft must share the target's vocabulary. `stats` (a dict) receives rounds, drafted / accepted counts and the
acceptance rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmforge.generation.sampling import apply_repetition_penalty, next_token_probs, token_presence
from lmforge.generation.state import DecodeState, check_can_generate, model_kind


def accept_drafts(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule for N independent rounds at once.

    p: (N, k + 1, V) target probabilities at each draft position plus the bonus position; q: (N, k, V) draft
    probabilities; drafts: (N, k) the drafted tokens. Returns (accepted (N,) in 0..k, next_token (N,)): the
    round emits drafts[:accepted] followed by next_token (the correction at the first rejection, or the bonus).
    """
    N, k = drafts.shape
    rows = torch.arange(N, device=drafts.device)
    if k == 0:
        return torch.zeros(N, dtype=torch.long, device=p.device), torch.multinomial(p[:, 0], 1, generator=generator)[:, 0]
    p_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_draft = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(N, k, generator=generator, device=p.device)
    accept = u * q_draft < p_draft  # u < p/q without dividing by a zero q (q(d) > 0 for a sampled d anyway)
    accepted = torch.cumprod(accept.long(), dim=1).sum(dim=1)  # leading run of acceptances
    at = accepted.clamp(max=k - 1)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    # A rejection implies p(d) < q(d), hence mass elsewhere; the guard only matters for rows that are not used.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, at])
    correction = torch.multinomial(residual, 1, generator=generator)[:, 0]
    bonus = torch.multinomial(p[:, k], 1, generator=generator)[:, 0]
    return accepted, torch.where(accepted == k, bonus, correction)


def speculative_generate(
    model: nn.Module,
    draft_model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    stop_criteria: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    streamer: Callable[[torch.Tensor], Any] | None = None,
    stats: dict[str, float] | None = None,
) -> torch.Tensor:
    """(1, T) prompt -> (1, T + n) with n <= max_new_tokens; see the module doc. Called by `generate(draft_model=)`."""
    check_can_generate(draft_model, "draft_model")
    for role, m in (("model", model), ("draft_model", draft_model)):
        if model_kind(m) != "decoder":
            raise ValueError(f"speculative decoding needs decoder-only models; {role} is {model_kind(m)}")
    if input_ids.size(0) != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time (batch size 1), got batch {input_ids.size(0)}")
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
    v_target = getattr(model.config, "vocab_size", None)
    v_draft = getattr(draft_model.config, "vocab_size", None)
    if v_target != v_draft:
        raise ValueError(f"draft_model's vocabulary ({v_draft}) must be the target's ({v_target})")
    pads = input_ids[:, :0]
    if attention_mask is not None:  # one row: drop its left padding, put it back on the output
        n_pad = int((attention_mask[0] == 0).sum())
        pads, input_ids = input_ids[:, :n_pad], input_ids[:, n_pad:]

    k = num_draft_tokens
    target = DecodeState(model, input_ids, max_new_tokens=max_new_tokens, use_cache=use_cache, extra=k + 1)
    draft = DecodeState(draft_model, input_ids, max_new_tokens=max_new_tokens, use_cache=use_cache, extra=k + 1)
    warp = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    penalise = repetition_penalty is not None and repetition_penalty != 1.0
    presence = token_presence(input_ids, v_target) if penalise else None
    prompt_len = target.length
    rounds = drafted = accepted_total = 0
    done = False
    while not done and target.length - prompt_len < max_new_tokens:
        base = target.length
        k_round = min(k, max_new_tokens - (base - prompt_len) - 1)  # never draft past max_new_tokens
        # Presence of earlier tokens at each of the k_round + 1 positions (drafts count once drafted).
        seen = presence.expand(k_round + 1, -1).clone() if presence is not None else None
        qs, drafts = [], []
        for i in range(k_round):
            logits = draft.forward(keep=1)[:, -1].float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen[i : i + 1], repetition_penalty)
            q = next_token_probs(logits, **warp)
            d = q.argmax(-1) if temperature == 0 else torch.multinomial(q, 1, generator=generator)[:, 0]
            draft.append(d)
            qs.append(q[0])
            drafts.append(d)
            if seen is not None:
                seen[i + 1 :, d] = True
        if drafts:
            target.append(torch.stack(drafts, dim=1))
        logits = target.forward(keep=k_round + 1)[0].float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        p = next_token_probs(logits, **warp)
        draft_ids = torch.cat(drafts).view(1, -1) if drafts else torch.zeros(1, 0, dtype=torch.long, device=p.device)
        if temperature == 0:  # same outcome as the rule on one-hot distributions, without drawing randoms
            agree = draft_ids[0] == p[:k_round].argmax(-1)
            n_acc = int(torch.cumprod(agree.long(), 0).sum()) if k_round else 0
            nxt = p[n_acc].argmax()
        else:
            q_all = torch.stack(qs)[None] if qs else p.new_zeros(1, 0, p.size(-1))
            acc, nxt_t = accept_drafts(p[None], q_all, draft_ids, generator)
            n_acc, nxt = int(acc[0]), nxt_t[0]
        rounds += 1
        drafted += k_round
        accepted_total += n_acc
        target.truncate(base + n_acc)
        draft.truncate(base + n_acc)
        new = torch.cat([draft_ids[0, :n_acc], nxt.view(1)])
        target.append(nxt.view(1, 1))
        draft.append(nxt.view(1, 1))
        # Finish on EOS / stop_criteria token by token, as plain decoding would.
        for j in range(new.numel()):
            tok = new[j : j + 1]
            if presence is not None:
                presence[0, tok] = True
            if streamer is not None:
                streamer(tok)
            hit = eos is not None and bool(torch.isin(tok, eos).any())
            if not hit and stop_criteria is not None:
                hit = bool(torch.as_tensor(stop_criteria(target.sequences[:, : base + j + 1])).any())
            if hit:
                target.truncate(base + j + 1)
                done = True
                break
    if stats is not None:
        stats.update(
            rounds=rounds,
            drafted=drafted,
            accepted=accepted_total,
            acceptance_rate=accepted_total / drafted if drafted else 0.0,
            new_tokens=target.length - prompt_len,
            tokens_per_round=(target.length - prompt_len) / rounds if rounds else 0.0,
        )
    return torch.cat([pads, target.sequences], dim=1)
