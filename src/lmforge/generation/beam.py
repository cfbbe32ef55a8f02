"""Beam search with HF's length penalty and early stopping, for decoders and encoder-decoders (T5).

Kept step for step equal to HF `generate(num_beams=k, do_sample=False)` (transformers' vectorised
`_beam_search`), so the same weights give the same sequence:

  * every step, each of the k running beams proposes its continuations; the best `keep` = max(2, 1 + n_eos)·k
    by summed log-probability are gathered (enough that k stay alive even if the best ones all end);
  * a candidate ending in EOS (or reaching the length limit, or stopped by `stop_criteria`) and ranked within
    the top k becomes a finished hypothesis, scored sum_logprobs / generated_length ** length_penalty
    (length_penalty > 0 favours longer outputs, < 0 shorter ones); the k best finished are kept;
  * the k best unfinished candidates continue, and the KV cache rows follow their parent beams;
  * the search ends when no running beam can beat the worst kept hypothesis (early_stopping=False: judged
    at the current length; "never": at the maximum length when length_penalty > 0), when all k hypotheses
    are finished (early_stopping=True), or at max_new_tokens.

Returns each input's best hypothesis, prompt included, padded with `pad` to the longest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.generation.sampling import apply_repetition_penalty, token_presence
from lmforge.generation.state import DecodeState

_NEG = -1.0e9  # HF's "impossible" score: large but finite so that sums stay ordered


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, N, ...) indexed along dim 1 by index (B, M) -> (B, M, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos: torch.Tensor | None = None,
    pad: int = 0,
    attention_mask: torch.Tensor | None = None,
    repetition_penalty: float | None = None,
    stop_criteria: Callable[[torch.Tensor], torch.Tensor] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """(B, T) prompts -> (B, T + n) best hypotheses; see the module doc. Called by `generate(num_beams=k)`."""
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    B, K = input_ids.size(0), num_beams
    device = input_ids.device
    expanded_mask = None if attention_mask is None else attention_mask.repeat_interleave(K, dim=0)
    state = DecodeState(
        model, input_ids.repeat_interleave(K, dim=0), expanded_mask, max_new_tokens=max_new_tokens, use_cache=use_cache
    )
    prompt_len = state.length
    if max_new_tokens == 0:
        return state.sequences[::K].clone()
    max_length = prompt_len + max_new_tokens
    keep = max(2, 1 + (0 if eos is None else eos.numel())) * K
    top_k_mask = torch.arange(keep, device=device) < K

    running = torch.full((B, K, max_length), pad, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = state.sequences.view(B, K, prompt_len)
    finished = running.clone()
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = _NEG  # all beams start equal: only the first may propose, or they would repeat
    finished_scores = torch.full((B, K), _NEG, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=device)  # generated tokens per hypothesis
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * K
    early_true = early_stopping is True

    cur = prompt_len
    logits = state.forward(keep=1)[:, -1]
    while True:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        V = log_probs.size(-1)
        if repetition_penalty is not None and repetition_penalty != 1.0:
            mask = None if state.mask is None else state.mask[:, :cur]
            presence = token_presence(running.view(B * K, -1)[:, :cur], V, mask)
            log_probs = apply_repetition_penalty(log_probs, presence, repetition_penalty)
        scores = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_scores, top_index = torch.topk(scores, keep)
        parent, token = top_index // V, top_index % V
        candidates = _gather(running, parent)
        candidates[:, :, cur] = token

        hits = torch.zeros(B, keep, dtype=torch.bool, device=device)
        if eos is not None:
            hits |= torch.isin(token, eos)
        if cur + 1 >= max_length:
            hits[:] = True
        if stop_criteria is not None:
            stopped = stop_criteria(candidates.view(B * keep, max_length)[:, : cur + 1])
            hits |= torch.as_tensor(stopped, dtype=torch.bool, device=device).view(B, keep)

        # The k best candidates that go on.
        alive_scores = top_scores + hits.float() * _NEG
        chosen = torch.topk(alive_scores, K).indices
        running = _gather(candidates, chosen)
        running_scores = _gather(alive_scores, chosen)
        parents = _gather(parent, chosen)

        # Candidates that end here and rank within the top k join the finished hypotheses if good enough.
        just_finished = hits & top_k_mask[None, :]
        end_scores = top_scores / ((cur + 1 - prompt_len) ** length_penalty)
        end_scores = end_scores + (is_finished.all(dim=-1, keepdim=True) & early_true).float() * _NEG
        end_scores = end_scores + (~can_improve).float() * _NEG
        end_scores = end_scores + (~just_finished).float() * _NEG
        merged_scores = torch.cat((finished_scores, end_scores), dim=1)
        best = torch.topk(merged_scores, K).indices
        finished = _gather(torch.cat((finished, candidates), dim=1), best)
        finished_scores = _gather(merged_scores, best)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)
        new_len = torch.full((B, keep), cur + 1 - prompt_len, dtype=torch.long, device=device)
        finished_len = _gather(torch.cat((finished_len, new_len), dim=1), best)

        cur += 1
        hypothetical = max_length - prompt_len if early_stopping == "never" and length_penalty > 0 else cur - prompt_len
        best_running = running_scores[:, :1] / (hypothetical**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        go_on = bool(can_improve.any()) and not (early_true and bool(is_finished.all())) and not bool(hits.all())
        if not go_on:
            break
        state.reorder((parents + batch_offset).view(-1))
        state.append(running[:, :, cur - 1].reshape(-1))
        logits = state.forward(keep=1)[:, -1]

    out_len = prompt_len + int(finished_len[:, 0].max())
    return finished[:, 0, :out_len].clone()
