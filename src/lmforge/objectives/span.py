"""T5's span corruption (Raffel et al., 2020, section 3.1.4): replace random spans by sentinels, predict them.

  original: Thank you for inviting me to your party last week .
  inputs:   Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
  targets:  <extra_id_0> for inviting <extra_id_1> last <extra_id_2> </s>

(That example ends with a non-noise span, hence the trailing sentinel; the random masks below always end
with a noise span, so their targets are exactly "sentinel_i, noise span i" for each span, then EOS.)

Per row of L tokens, the number of noise tokens (round(L · density), at least 1) and of noise spans
(round(noise / mean span length), at least 1) are fixed, and the lengths of the spans and of the gaps
between them are uniformly random compositions (`random_spans_noise_mask`, as in T5 and HF's
run_t5_mlm_flax.py). Fixed counts give fixed input and target lengths, so a batch stacks without padding.

Encoder-decoder models read the inputs and are teacher-forced on the targets (`model.shift_right`).
Decoder-only models read `inputs ++ targets` as one causal sequence with loss on the targets part only.

Metrics: val/loss is the mean NLL per target token (noise tokens, sentinels and EOS) and val/ppl its
exponential; val/bpb is the targets' total NLL in bits over the UTF-8 bytes of the noise tokens (sentinels
and EOS stand for 0 bytes). They measure filling in ~15% of the text from both-sided context and are not
comparable to CLM's numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.objectives.base import (
    IGNORE_INDEX,
    LossOutput,
    Objective,
    batch_generator,
    full_blocks,
    token_nll,
)

if TYPE_CHECKING:
    from lmforge.data.tokenizer import Tokenizer

_EVAL_SALT = 0x5BA4  # decorrelates the eval masks from other objectives' draws on the same batch


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` tokens; each span needs a text token before it."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_noise_span_length))
    return num_noise, min(num_spans, length - num_noise)


def random_segmentation(
    rows: int, n_items: int, n_segments: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(rows, n_segments) lengths >= 1 summing to n_items, each composition equally likely.

    As T5's `_random_segmentation`: n_segments - 1 of the n_items - 1 gaps between items, drawn without
    replacement (a random permutation's first entries), start a new segment.
    """
    if n_segments == 1:
        return torch.full((rows, 1), n_items, dtype=torch.long, device=device)
    order = torch.rand(rows, n_items - 1, generator=generator, device=device).argsort(dim=1)
    first_in_segment = torch.zeros(rows, n_items, dtype=torch.long, device=device)
    first_in_segment.scatter_(1, order[:, : n_segments - 1] + 1, 1)
    segment = first_in_segment.cumsum(dim=1)
    lengths = torch.zeros(rows, n_segments, dtype=torch.long, device=device)
    return lengths.scatter_add_(1, segment, torch.ones_like(segment))


def random_spans_noise_mask(
    rows: int,
    length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(rows, length) bool, True = noise: alternating non-noise / noise spans, starting with non-noise and
    ending with noise, with exactly `span_counts(...)` noise tokens and spans in every row."""
    num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
    noise = random_segmentation(rows, num_noise, num_spans, generator, torch.device(device))
    keep = random_segmentation(rows, length - num_noise, num_spans, generator, torch.device(device))
    span_lengths = torch.stack([keep, noise], dim=2).view(rows, 2 * num_spans)
    span_starts = span_lengths.cumsum(dim=1)[:, :-1]  # where spans 1 .. 2k-1 begin
    starts = torch.zeros(rows, length, dtype=torch.long, device=noise.device).scatter_(1, span_starts, 1)
    return starts.cumsum(dim=1) % 2 == 1  # odd-numbered spans are noise


def _spans_to_sentinels(
    tokens: torch.Tensor, drop: torch.Tensor, sentinel_ids: torch.Tensor, eos_id: int
) -> torch.Tensor:
    """Each run of `drop` positions becomes one sentinel (sentinel_0, sentinel_1, ... in order), then EOS.

    T5's `noise_span_to_unique_sentinel`. Every row must keep the same number of tokens (they stack).
    """
    B = tokens.size(0)
    first = drop & ~F.pad(drop[:, :-1], (1, 0), value=False)
    span = first.long().cumsum(dim=1) - 1
    if int(span.max()) >= sentinel_ids.numel():
        raise ConfigError(
            "objective.n_sentinels",
            f"a row has {int(span.max()) + 1} spans but there are {sentinel_ids.numel()} sentinels",
            "raise objective.n_sentinels or lower data.block_size",
        )
    kept = torch.where(first, sentinel_ids[span.clamp(min=0)], tokens)[~drop | first]
    kept = kept.view(B, -1)
    return torch.cat([kept, kept.new_full((B, 1), eos_id)], dim=1)


def span_corrupt(
    tokens: torch.Tensor, noise: torch.Tensor, sentinel_ids: torch.Tensor, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of T5: inputs = tokens with each noise span replaced by a sentinel, + EOS; targets =
    tokens with each non-noise span replaced by a sentinel, + EOS. A mask must start with a non-noise token,
    so that target sentinel i precedes noise span i (random_spans_noise_mask's always do)."""
    inputs = _spans_to_sentinels(tokens, noise, sentinel_ids, eos_id)
    targets = _spans_to_sentinels(tokens, ~noise, sentinel_ids, eos_id)
    return inputs, targets


def decoder_only_layout(
    inputs: torch.Tensor,
    input_mask: torch.Tensor,
    labels: torch.Tensor,
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`inputs ++ targets` as one causal sequence -> (input_ids, next-token targets), loss on targets only.

    Rows whose inputs are padded (the val tail) are compacted: their real tokens first, padding at the end.
    """
    label_mask = labels != ignore_index
    valid = torch.cat([input_mask, label_mask], dim=1)
    is_target = torch.cat([torch.zeros_like(input_mask), label_mask], dim=1)
    seq = torch.cat([inputs, labels.masked_fill(~label_mask, pad_id)], dim=1)
    order = (~valid).to(torch.uint8).argsort(dim=1, stable=True)  # real tokens first, each group in order
    seq, valid, is_target = seq.gather(1, order), valid.gather(1, order), is_target.gather(1, order)
    seq = seq.masked_fill(~valid, pad_id)
    return seq[:, :-1], seq[:, 1:].masked_fill(~is_target[:, 1:], ignore_index)


class SpanCorruption(Objective):
    """T5 span corruption over the full (B, T+1) blocks of the packed data (see the module docstring)."""

    name = "span"
    supported_kinds = ("encoder_decoder", "decoder")

    def __init__(
        self,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        n_sentinels: int = 100,
        sentinel_template: str = "<extra_id_{}>",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not 0.0 < noise_density < 1.0:
            raise ConfigError(
                "objective.noise_density", f"must be in (0, 1), got {noise_density}", "use e.g. 0.15 (T5)"
            )
        if mean_noise_span_length < 1.0:
            raise ConfigError(
                "objective.mean_noise_span_length",
                f"must be >= 1, got {mean_noise_span_length}",
                "use e.g. 3 (T5)",
            )
        if not isinstance(n_sentinels, int) or n_sentinels < 1:
            raise ConfigError(
                "objective.n_sentinels",
                f"must be a positive integer, got {n_sentinels!r}",
                "use e.g. 100 (T5)",
            )
        if "{}" not in sentinel_template:
            raise ConfigError(
                "objective.sentinel_template",
                f"{sentinel_template!r} has no {{}} for the index",
                "use '<extra_id_{}>'",
            )
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.n_sentinels = n_sentinels
        self.sentinel_template = sentinel_template
        self.ignore_index = ignore_index
        self.sentinel_ids: torch.Tensor | None = None
        self.eos_id = self.pad_id = -1

    def special_tokens(self) -> dict[str, str]:
        return {f"sentinel_{i}": self.sentinel_template.format(i) for i in range(self.n_sentinels)}

    def bind(self, tokenizer: Tokenizer) -> None:
        self.sentinel_ids = torch.tensor(
            [tokenizer.special_id(f"sentinel_{i}") for i in range(self.n_sentinels)]
        )
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id

    def lengths(self, length: int) -> tuple[int, int]:
        """(input length, target length) for a row of `length` tokens, both EOS-terminated."""
        num_noise, num_spans = span_counts(length, self.noise_density, self.mean_noise_span_length)
        if num_spans > self.n_sentinels:
            raise ConfigError(
                "objective.n_sentinels",
                f"rows of {length} tokens get {num_spans} noise spans, "
                f"but there are only {self.n_sentinels} sentinels",
                f"set objective.n_sentinels>={num_spans} or lower data.block_size",
            )
        return length - num_noise + num_spans + 1, num_noise + num_spans + 1

    def model_seq_len(self, block_size: int, kind: str = "encoder_decoder") -> int:
        """Longest sequence the model reads for blocks of `block_size` (+1 unshifted token): the longer of
        encoder and decoder inputs, or for a decoder-only model their concatenation minus the last token."""
        n_in, n_tgt = self.lengths(block_size + 1)
        return n_in + n_tgt - 1 if kind == "decoder" else max(n_in, n_tgt)

    def corrupt(
        self, blocks: torch.Tensor, n_real: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, input_mask, labels): rows of L tokens corrupted together; a row with only n_real < L text
        tokens (the val tail) is corrupted as a row of n_real tokens, then padded (pad id / IGNORE_INDEX)."""
        if self.sentinel_ids is None:
            raise RuntimeError("SpanCorruption.bind(tokenizer) must be called before use")
        B, L = blocks.shape
        sentinels = self.sentinel_ids.to(blocks.device)
        self.lengths(L)  # a clear error for too few sentinels
        noise = random_spans_noise_mask(
            B, L, self.noise_density, self.mean_noise_span_length, generator, blocks.device
        )
        inputs, labels = span_corrupt(blocks, noise, sentinels, self.eos_id)
        input_mask = torch.ones_like(inputs, dtype=torch.bool)
        for row in (n_real < L).nonzero().flatten().tolist():  # padded rows only: rare, one loop step each
            n = max(int(n_real[row]), 2)  # PackedBlocks rows always hold >= 2 tokens
            mask = random_spans_noise_mask(
                1, n, self.noise_density, self.mean_noise_span_length, generator, blocks.device
            )
            inp, tgt = span_corrupt(blocks[row : row + 1, :n], mask, sentinels, self.eos_id)
            n_in, n_tgt = inp.size(1), tgt.size(1)
            inputs[row], input_mask[row], labels[row] = self.pad_id, False, self.ignore_index
            inputs[row, :n_in], input_mask[row, :n_in], labels[row, :n_tgt] = inp[0], True, tgt[0]
        return inputs, input_mask, labels

    def text_blocks(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks (B, T+1), n_real (B,)): `full_blocks` (each row's text first, the val tail's padding after)
        and the number of text tokens per row (real targets + the first input)."""
        n_targets = (batch["targets"] != self.ignore_index).sum(dim=1)
        return full_blocks(batch), n_targets + 1

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        blocks, n_real = self.text_blocks(batch)
        generator = None if model.training else batch_generator(blocks, salt=_EVAL_SALT)
        inputs, input_mask, labels = self.corrupt(blocks, n_real, generator)
        if getattr(model.config, "kind", "decoder") == "encoder_decoder":
            mask = None if bool(input_mask.all()) else input_mask
            logits = model(inputs, model.shift_right(labels), attention_mask=mask)
            return token_nll(logits, labels, self.ignore_index)
        input_ids, targets = decoder_only_layout(inputs, input_mask, labels, self.pad_id, self.ignore_index)
        max_len = getattr(model.config, "max_seq_len", None)
        if max_len is not None and input_ids.size(1) > max_len:
            raise ConfigError(
                "data.block_size",
                f"span corruption feeds this decoder-only model {input_ids.size(1)} tokens "
                f"(inputs + targets), more than model.max_seq_len={max_len}",
                f"lower data.block_size or raise model.max_seq_len to >= {input_ids.size(1)}",
            )
        return token_nll(model(input_ids), targets, self.ignore_index)
