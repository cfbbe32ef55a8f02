"""Shared pieces of the post-training datamodules: one prompt template, token examples with loss masks,
collates, and the datamodule base.

A rendered example is `ids = prompt + completion + end`; the model reads `ids[:-1]` and is trained on the next
token only where that token belongs to the completion or the end (targets are -100 on the prompt, the
template's user turn and header, and padding).

The end of a completion, always trained:
* chatml: `<|im_end|>` then EOS. Chat and serving stop at `<|im_end|>`; the generation engine's default stop
  is the tokenizer's EOS (e.g. PPO/GRPO rollouts). Training both makes either stop work, for one extra token.
* plain:  EOS.

Truncation (`max_length` = input positions, the batch width; ≤ model.max_seq_len): the prompt is cut from
the left first (its end, with the assistant header, stays next to the completion), then the completion
from the right; the end tokens are always kept, so the model always learns to stop.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lmforge.data.chat import CHATML_SPECIALS, IM_END, IM_START, render_chatml
from lmforge.data.corpus import Corpus, Document
from lmforge.data.packed import IGNORE_INDEX, collate_document_blocks
from lmforge.data.records import load_source, prompt_text, record_text
from lmforge.data.sampler import ResumableLoader, ResumableSampler, pin_for
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError, DataError

log = logging.getLogger("lmforge")

TEMPLATES = ("chatml", "plain")
Prompt = str | list[dict[str, str]]
Segment = str | int  # text to encode, or one special token id


class Template:
    """Renders prompts and completions to token ids, identically for SFT, preference and prompt data, so a
    model tuned on one stage is in-distribution in the next."""

    def __init__(self, name: str, tokenizer: Tokenizer, system_prompt: str | None = None) -> None:
        if name not in TEMPLATES:
            raise ConfigError("data.template", f"unknown template {name!r}", f"use one of {TEMPLATES}")
        self.name, self.tok, self.system_prompt = name, tokenizer, system_prompt
        start, end = (tokenizer.hf.token_to_id(t) for t in (IM_START, IM_END))
        self.markers = (start, end) if start is not None and end is not None else None
        if name == "chatml" and self.markers is None:
            log.warning(
                "data.template=chatml but the tokenizer has no %s/%s tokens: they are spelled out as text "
                "(add them with Tokenizer.add_special_tokens(CHATML_SPECIALS) before set_tokenizer)",
                IM_START,
                IM_END,
            )
        im_end = ([self.markers[1]] if self.markers else tokenizer.encode(IM_END)) if name == "chatml" else []
        self.end_ids = [*im_end, tokenizer.eos_id]  # appended to every completion, and trained

    def _messages(self, prompt: Prompt) -> list[dict[str, str]]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def prompt_segments(self, prompt: Prompt) -> list[Segment]:
        """The prompt up to where the completion starts (chatml: through `<|im_start|>assistant\\n`)."""
        if self.name == "plain":
            text = prompt_text(prompt)
            return [f"{self.system_prompt}\n{text}\n" if self.system_prompt else f"{text}\n"]
        messages = self._messages(prompt)
        if self.markers is None:  # as `encode_chatml` does: the whole text in one piece
            return [render_chatml(messages, add_generation_prompt=True)]
        start, end = self.markers
        out: list[Segment] = []
        for m in messages:
            out += [start, f"{m['role']}\n{m['content']}", end, "\n"]
        return [*out, start, "assistant\n"]

    def encode(self, rows: Sequence[Sequence[Segment]]) -> list[list[int]]:
        """Token ids of many segment lists, all their texts encoded in one batch call."""
        texts = [s for row in rows for s in row if isinstance(s, str) and s]
        encoded = iter(self.tok.encode_batch(texts) if texts else [])
        out = []
        for row in rows:
            ids: list[int] = []
            for s in row:
                if isinstance(s, int):
                    ids.append(s)
                elif s:
                    ids.extend(next(encoded))
            out.append(ids)
        return out

    def encode_prompts(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        return self.encode([self.prompt_segments(p) for p in prompts])

    def encode_completions(self, completions: Sequence[str]) -> list[list[int]]:
        """Completion text ids, without the end tokens (`end_ids`)."""
        return self.encode([[c] for c in completions])


@dataclass(frozen=True)
class Example:
    """`ids` = prompt + completion + end; the first `n_prompt` ids are not trained."""

    ids: tuple[int, ...]
    n_prompt: int

    def inputs(self) -> list[int]:
        return list(self.ids[:-1])

    def targets(self) -> list[int]:
        return [tok if t + 1 >= self.n_prompt else IGNORE_INDEX for t, tok in enumerate(self.ids[1:])]

    def __len__(self) -> int:
        """Input positions (one less than ids)."""
        return len(self.ids) - 1


def _budget(prompt: int, completion: int, end: int, max_length: int) -> tuple[int, int]:
    """(prompt tokens kept from the right, completion tokens kept from the left): ids fit max_length + 1."""
    limit = max_length + 1
    if prompt + completion + end <= limit:
        return prompt, completion
    # keep ≥ 1 prompt token, so that the first completion token stays a target
    keep_prompt = min(prompt, max(1, limit - completion - end))
    return keep_prompt, max(0, limit - keep_prompt - end)


def build_example(
    prompt: Sequence[int], completion: Sequence[int], end: Sequence[int], max_length: int
) -> Example:
    keep_p, keep_c = _budget(len(prompt), len(completion), len(end), max_length)
    ids = [*prompt[len(prompt) - keep_p :], *completion[:keep_c], *end]
    return Example(tuple(ids), keep_p)


def build_pair(
    prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], end: Sequence[int], max_length: int
) -> tuple[Example, Example]:
    """Chosen and rejected examples that keep the same prompt tokens (DPO compares them on equal context)."""
    keep_p, _ = _budget(len(prompt), max(len(chosen), len(rejected)), len(end), max_length)
    kept = prompt[len(prompt) - keep_p :]
    return build_example(kept, chosen, end, max_length), build_example(kept, rejected, end, max_length)


def check_max_length(max_length: Any, end: Sequence[int], key: str = "data.max_length") -> None:
    if not isinstance(max_length, int) or max_length < len(end) + 2:
        raise ConfigError(
            key,
            f"must be an integer ≥ {len(end) + 2} (the end tokens + a prompt and a completion token), "
            f"got {max_length!r}",
            f"set {key}=128",
        )


# --- collates --------------------------------------------------------------------------------------
def padded_width(longest: int, multiple: int | None, cap: int) -> int:
    """A batch's length: its longest item, rounded up to a multiple of `multiple` (`data.pad_to_multiple_of`) but
    never past `cap`, the longest any batch may be (`max_length`). Why: padding to the batch's longest item makes
    nearly every batch a new shape, which torch.compile pays for with a recompile where it compiles for static
    shapes (tensor parallelism) and GPU GEMMs with unaligned tiles; a multiple bounds the shapes to cap / multiple."""
    if not multiple:
        return longest
    return min(-(-longest // multiple) * multiple, max(cap, longest))


def pad_examples(
    examples: Sequence[Example], pad_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) `input_ids`, `targets` (-100 where not trained) and `attention_mask` (1 = real)."""
    width = width or max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.inputs(), dtype=torch.long)
        targets[i, :n] = torch.tensor(e.targets(), dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "targets": targets, "attention_mask": mask}


def collate_examples(
    batch: Sequence[Example], pad_id: int, multiple: int | None = None, cap: int = 0
) -> dict[str, torch.Tensor]:
    return pad_examples(batch, pad_id, padded_width(max(len(e) for e in batch), multiple, cap))


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Next-fit packing in order: rows of at most `max_length` input positions; an example is never split."""
    rows: list[list[Example]] = []
    used = max_length + 1
    for e in examples:
        if used + len(e) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    return rows


def collate_packed(
    batch: Sequence[Sequence[Example]], pad_id: int, multiple: int | None = None, cap: int = 0
) -> dict[str, torch.Tensor]:
    """Packed rows: `position_ids` restart per example and a (B, 1, T, T) causal same-example boolean
    `attention_mask` (as `collate_document_blocks`); padding forms a segment of its own."""
    width = padded_width(max(sum(len(e) for e in row) for row in batch), multiple, cap)
    items = []
    for row in batch:
        ids, targets, positions, segments = [], [], [], []
        for s, e in enumerate(row):
            ids += e.inputs()
            targets += e.targets()
            positions += range(len(e))
            segments += [s] * len(e)
        short = width - len(ids)
        items.append(
            {
                "input_ids": torch.tensor(ids + [pad_id] * short, dtype=torch.long),
                "targets": torch.tensor(targets + [IGNORE_INDEX] * short, dtype=torch.long),
                "position_ids": torch.tensor(positions + list(range(short)), dtype=torch.long),
                "segment_ids": torch.tensor(segments + [len(row)] * short, dtype=torch.long),
            }
        )
    return collate_document_blocks(items)


def subsample(records: list[Any], n: int | None) -> list[Any]:
    """At most `n` records, evenly spaced (a capped Shakespeare set spans every play); seed-independent."""
    if n is None or len(records) <= n:
        return records
    return [records[i] for i in np.linspace(0, len(records) - 1, n).round().astype(int)]


# --- the datamodule base ---------------------------------------------------------------------------
class RecordsDataModule(L.LightningDataModule, ABC):
    """Records from `source` (`records.load_source`) → token examples in `setup` → seeded, resumable batches.

    Subclasses set `record_kind` and implement `_tokenize(split, records)` and `_collate_fn()`. `.corpus` holds
    the records' texts (a tokenizer can be trained on it); `special_tokens()` are the roles the template
    needs, to add to the tokenizer before `set_tokenizer`.
    """

    record_kind = "sft"

    def __init__(
        self,
        source: Mapping[str, Any] | None = None,
        template: str = "chatml",
        system_prompt: str | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        seed: int | None = 0,
        num_workers: int = 0,
        max_examples: int | None = None,
        pad_to_multiple_of: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        if template not in TEMPLATES:
            raise ConfigError("data.template", f"unknown template {template!r}", f"use one of {TEMPLATES}")
        for key, value in (
            ("batch_size", batch_size),
            ("val_batch_size", val_batch_size or 1),
            ("max_examples", max_examples or 1),
            ("pad_to_multiple_of", 1 if pad_to_multiple_of is None else pad_to_multiple_of),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"data.{key}", f"must be a positive integer, got {value!r}", f"set data.{key}=<int > 0>"
                )
        self.template_name, self.system_prompt = template, system_prompt
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.seed, self.num_workers, self.max_examples = int(seed or 0), num_workers, max_examples
        self.pad_to_multiple_of = pad_to_multiple_of  # None: each batch as long as its longest item (`padded_width`)
        loaded = load_source(
            source if source is not None else {"kind": "shakespeare"}, self.record_kind, self.seed
        )
        self.records = {split: subsample(recs, max_examples) for split, recs in loaded.items()}
        self.corpus = Corpus(
            {
                split: [
                    Document(f"{self.record_kind}:{split}#{i}", record_text(r)) for i, r in enumerate(recs)
                ]
                for split, recs in self.records.items()
            }
        )
        self.tokenizer = tokenizer
        self.datasets: dict[str, list[Any]] = {}

    def longest_batch(self) -> int:
        """The most positions a batch may have (`max_length`; prompt data: `max_prompt_length`)."""
        return int(self.max_length)  # type: ignore[attr-defined]  # every subclass sets it

    def batch_lengths(self) -> int | None:
        """How many lengths batches can have: longest_batch / pad_to_multiple_of, rounded up; None when each
        batch is as long as its longest item (nearly every batch a new length)."""
        if self.pad_to_multiple_of is None:
            return None
        return -(-self.longest_batch() // self.pad_to_multiple_of)

    def special_tokens(self) -> dict[str, str]:
        """Roles → tokens the template needs as single ids: add them to the tokenizer before set_tokenizer."""
        return dict(CHATML_SPECIALS) if self.template_name == "chatml" else {}

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.datasets = {}

    def template(self) -> Template:
        if self.tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a tokenizer: pass it or call set_tokenizer() first"
            )
        return Template(self.template_name, self.tokenizer, self.system_prompt)

    @abstractmethod
    def _tokenize(self, split: str, records: list[dict[str, Any]]) -> list[Any]:
        """The split's records as token examples (what the loaders batch)."""

    @abstractmethod
    def _collate_fn(self) -> Callable[..., dict[str, Any]]:
        """This kind's collate: `(batch, pad_id, multiple, cap)` -> the batch dict, padded as `padded_width`."""

    def _collate(self) -> Callable[[Sequence[Any]], dict[str, Any]]:
        """The loaders' collate: `_collate_fn` with the tokenizer's pad id and `data.pad_to_multiple_of`."""
        assert self.tokenizer is not None
        return partial(self._collate_fn(), pad_id=self.tokenizer.pad_id, multiple=self.pad_to_multiple_of,
                       cap=self.longest_batch())

    def setup(self, stage: str | None = None) -> None:
        """Tokenize both splits once (kept in memory: post-training sets are small)."""
        for split in ("train", "val"):
            if split not in self.datasets:
                self.datasets[split] = self._tokenize(split, self.records[split])

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        data = self.datasets["train"]
        trainer = getattr(self, "trainer", None)
        dist = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        world, rank = int(dist.get("num_replicas", 1)), int(dist.get("rank", 0))
        if len(data) // world < self.batch_size:
            raise DataError(
                f"the train split has {len(data)} items ({len(data) // world} per rank, {world} rank(s)), "
                f"fewer than one batch of data.batch_size={self.batch_size}. Fix: add data, raise "
                "data.max_examples or lower data.batch_size"
            )
        sampler = ResumableSampler(len(data), seed=self.seed, rank=rank, world_size=world)
        return ResumableLoader(
            data,
            sampler,
            self.batch_size,
            fingerprint=self.data_fingerprint(),
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=pin_for(trainer),
        )

    def val_dataloader(self) -> DataLoader:
        return self.ordered_dataloader("val")

    def ordered_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Every item of `split` once, in order, unsharded: for passes over a whole split (validation, or
        DPO's one-off reference log-probs, which every rank needs for whatever its sampler later picks)."""
        self.setup("validate" if split == "val" else "fit")
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size or self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate(),
        )

    def data_fingerprint(self) -> str:
        """What the train order depends on besides the seed: records, template and tokenizer."""
        tok = self.tokenizer.fingerprint() if self.tokenizer is not None else "-"
        n_train = len(self.datasets.get("train", []))
        spec = f"{self.corpus.fingerprint()}|{self.template_name}|{self.system_prompt}|{tok}|{n_train}"
        return hashlib.sha256(spec.encode()).hexdigest()[:16]
