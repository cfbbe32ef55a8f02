"""Few-shot multiple choice by log-likelihood, as lm-eval scores HellaSwag / ARC / PIQA.

Each example is {"context": str, "choices": [str, ...], "label": int}. A choice's score is
log p(" " + choice | fewshot prefix + context), summed over the choice's tokens; `acc` takes the argmax of
that sum, `acc_norm` of the sum divided by the choice's UTF-8 bytes (long answers are not penalised for
having more tokens). Few-shot examples come from the same file (never the example itself), drawn
deterministically from `seed` and the example's index, prepended as "context answer\\n\\n".

Tokenisation follows lm-eval: encode(context + continuation) and encode(context), the continuation being
the tokens after the context's (trailing spaces of the context move to the continuation, so " answer"
is one BPE word). Sequences are left-truncated to the model's context; decoders only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError, DataError
from lmforge.evaluation import read_jsonl
from lmforge.generation.state import context_limit, model_kind
from lmforge.losses.logprobs import token_logprobs
from lmforge.objectives.base import IGNORE_INDEX


@dataclass
class MCExample:
    context: str
    choices: list[str]
    label: int


@dataclass
class MCResult:
    metrics: dict[str, float]
    scores: list[list[float]] = field(default_factory=list)  # per example, per choice: summed log-likelihood
    predictions: list[int] = field(default_factory=list)


def load_mc_examples(path: Path) -> list[MCExample]:
    examples = []
    for lineno, rec in read_jsonl(path, {"context": str, "choices": list, "label": int}):
        choices = rec["choices"]
        if not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(
                f"{path}:{lineno}: 'choices' must be a non-empty list of strings. "
                """Fix: e.g. "choices": ["yes", "no"]"""
            )
        if not 0 <= rec["label"] < len(choices):
            raise DataError(
                f"{path}:{lineno}: 'label' {rec['label']} is not an index into its {len(choices)} choices. "
                "Fix: label is the 0-based index of the right choice"
            )
        examples.append(MCExample(rec["context"], list(choices), rec["label"]))
    return examples


def fewshot_prefix(examples: Sequence[MCExample], index: int, k: int, seed: int, delimiter: str = " ") -> str:
    """k solved examples other than `index`, the same for every run with this seed."""
    if k <= 0:
        return ""
    pool = [j for j in range(len(examples)) if j != index]
    picks = random.Random(f"{seed}:{index}").sample(pool, min(k, len(pool)))
    return "".join(
        f"{examples[j].context}{delimiter}{examples[j].choices[examples[j].label]}\n\n" for j in picks
    )


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them; an empty context is the EOS document break."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    ctx = tokenizer.encode(stripped) if stripped else []
    whole = tokenizer.encode(stripped + continuation)
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else tokenizer.encode(continuation)
    return (ctx or [tokenizer.eos_id]), cont


def check_decoder(model: nn.Module, what: str) -> None:
    if model_kind(model) != "decoder":
        raise ConfigError(
            "ckpt_path",
            f"{what} scores a decoder's log-likelihood; this is a {model_kind(model)} model",
            "pass a checkpoint of a decoder family (gpt, llama, mixtral)",
        )


@torch.inference_mode()
def score_rows(
    model: nn.Module, rows: Sequence[tuple[Sequence[int], int]], pad_id: int, batch_size: int = 8
) -> list[tuple[float, bool]]:
    """(Σ log p of the last n tokens of seq given the rest, whether greedy picks all of them) per (seq, n).

    Right-padded batches need no attention mask for a causal model: pads only follow the scored tokens.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(max(len(rows[i][0]) for i in idx) - 1, 1)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            targets = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
            for r, i in enumerate(idx):
                seq, n = list(rows[i][0]), rows[i][1]
                ids[r, : len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
                if n:
                    targets[r, len(seq) - 1 - n : len(seq) - 1] = torch.tensor(seq[-n:], dtype=torch.long)
            ids, targets = ids.to(device), targets.to(device)
            logits = model(ids)
            logp = token_logprobs(logits, targets).sum(-1)
            greedy = ((logits.argmax(-1) == targets) | (targets == IGNORE_INDEX)).all(-1)
            for r, i in enumerate(idx):
                out[i] = (float(logp[r]), bool(greedy[r]))
    finally:
        model.train(was_training)
    return out


def score_continuations(
    model: nn.Module, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding produces it) per (context, continuation)."""
    check_decoder(model, "log-likelihood scoring")
    limit = context_limit(model)
    rows = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        seq = (
            (ctx + cont)[-(limit + 1) :] if limit else ctx + cont
        )  # the last `limit` inputs predict every target
        rows.append((seq, min(len(cont), len(seq) - 1)))
    return score_rows(model, rows, tokenizer.pad_id, batch_size)


def evaluate_mc(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[MCExample],
    *,
    num_fewshot: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    delimiter: str = " ",
) -> MCResult:
    """mc/acc, mc/acc_norm and mc/n over the first `limit` examples (all when None)."""
    check_decoder(model, "task=mc")
    if num_fewshot < 0:
        raise ConfigError(
            "num_fewshot",
            f"must be >= 0, got {num_fewshot}",
            "pass num_fewshot=0 (zero-shot) or a few, e.g. 5",
        )
    chosen = list(range(len(examples) if limit is None else min(int(limit), len(examples))))
    pairs, owner = [], []
    for i in chosen:
        ex = examples[i]
        prefix = fewshot_prefix(examples, i, num_fewshot, seed, delimiter)
        for c, choice in enumerate(ex.choices):
            pairs.append((prefix + ex.context, delimiter + choice))
            owner.append((i, c))
    scored = score_continuations(model, tokenizer, pairs, batch_size)
    scores: dict[int, list[float]] = {i: [] for i in chosen}
    for (i, _), (logp, _) in zip(owner, scored):
        scores[i].append(logp)
    result = MCResult(metrics={})
    hits = hits_norm = 0
    for i in chosen:
        ex, s = examples[i], scores[i]
        normed = [v / max(len(c.encode("utf-8")), 1) for v, c in zip(s, ex.choices)]
        pred = max(range(len(s)), key=s.__getitem__)
        hits += pred == ex.label
        hits_norm += max(range(len(s)), key=normed.__getitem__) == ex.label
        result.scores.append(s)
        result.predictions.append(pred)
    n = len(chosen)
    result.metrics = {"mc/acc": hits / max(n, 1), "mc/acc_norm": hits_norm / max(n, 1), "mc/n": n}
    return result
