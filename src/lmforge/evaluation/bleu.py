"""BLEU of greedy translations on a parallel text file: the seq2seq (T5) counterpart of val loss.

Pairs come from a TSV (`source<TAB>target` per line) or a jsonl of {"source", "target"}. Sources are
decoded greedily (the encoder-decoder's output, or a decoder's continuation of the source) and scored
against the single reference with torchmetrics' corpus BLEU (4-gram, whitespace tokens, brevity penalty):
no sacrebleu dependency, and the same number torchmetrics users get.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError
from lmforge.evaluation import read_jsonl


def load_pairs(path: Path) -> list[tuple[str, str]]:
    """(source, target) pairs; `.jsonl` / `.json` files are jsonl, anything else TSV."""
    if path.suffix in (".jsonl", ".json"):
        return [(rec["source"], rec["target"]) for _, rec in read_jsonl(path, {"source": str, "target": str})]
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(
                    f"{path}:{lineno}: expected 'source<TAB>target' (2 tab-separated fields), "
                    f"got {len(parts)}. "
                    'Fix: one pair per line, or a .jsonl of {"source", "target"}'
                )
            pairs.append((parts[0], parts[1]))
    if not pairs:
        raise DataError(f"{path}: no pairs (the file is empty). Fix: one 'source<TAB>target' pair per line")
    return pairs


def bleu_score(
    hypotheses: Sequence[str], references: Sequence[str], n_gram: int = 4, smooth: bool = False
) -> float:
    """Corpus BLEU in [0, 1] of hypotheses against one reference each."""
    from torchmetrics.text import BLEUScore

    metric = BLEUScore(n_gram=n_gram, smooth=smooth)
    return float(metric(list(hypotheses), [[r] for r in references]))


def translate(
    model: nn.Module,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy outputs, cut at EOS, in batches (left-padded for decoders, as generate.py does)."""
    from lmforge.generation.engine import TextGenerator

    engine = TextGenerator(model, tokenizer)
    out: list[str] = []
    for start in range(0, len(sources), batch_size):
        done = engine.complete(
            list(sources[start : start + batch_size]), max_new_tokens=max_new_tokens, temperature=0.0
        )
        out.extend(c.text.strip() for c in done)
    return out


def evaluate_bleu(
    model: nn.Module,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, float]:
    """bleu (0..100, as papers report it) and n over the first `limit` pairs."""
    chosen = list(pairs if limit is None else pairs[: int(limit)])
    hyps = translate(model, tokenizer, [s for s, _ in chosen], max_new_tokens, batch_size)
    return {"bleu": 100.0 * bleu_score(hyps, [t for _, t in chosen]), "n": len(chosen)}
