"""Masked language modelling (BERT): corrupt some tokens, predict the originals, for encoder families.

Input: the packed batch's `input_ids` (B, T) only, unshifted. Block i's inputs are tokens [i·T, i·T + T)
of the stream, so every token is a masking candidate in exactly one block, and the model sees T ≤
max_seq_len tokens (the shifted `targets` are not used). Logits and `LossOutput.targets` are (B, T),
position t predicting the original token t.

Per block, exactly k = ⌊p·n + u⌋ (u ~ U[0, 1), so E[k] = p·n; at least 1) of its n candidate tokens are
selected, as original BERT (a fixed share per sequence; HF's collator instead flips one coin per token).
Candidates are real tokens that are not special (pad / eos / bos / mask / any added special token never
are). Of the selected: `mask_replace_prob` become the mask token, `random_replace_prob` a random
non-special token, the rest stay unchanged; the loss is the cross-entropy on the selected positions only.

Randomness: in training, the global torch RNG (seeded by Lightning); in eval mode a generator seeded from
the batch content, so that val/loss is the same at every evaluation and across runs of one setup.

Metrics: val/loss and val/ppl are over the selected tokens; val/bpb = their NLL in bits / the UTF-8 bytes
of the *original* tokens at those positions (LossOutput.targets holds exactly those ids). MLM numbers are
therefore not comparable to a causal LM's: each prediction sees both-side context, minus the corruption.
val/mlm_accuracy = selected positions whose argmax is the original token / selected positions (eval mode only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.objectives.base import IGNORE_INDEX, LossOutput, Objective, batch_generator, token_nll

if TYPE_CHECKING:
    from lmforge.data.tokenizer import Tokenizer

_SALT = 0x4D4C4D  # "MLM": the eval-mode generator of this objective differs from other objectives'


class MaskedLM(Objective):
    """BERT's masked LM: select `mask_prob` of each block's tokens, corrupt them 80/10/10, predict them."""

    name = "mlm"
    supported_kinds = ("encoder",)

    def __init__(
        self,
        mask_prob: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        mask_token: str = "<|mask|>",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(
                "objective.mask_prob",
                f"must be in (0, 1), got {mask_prob}",
                "set objective.mask_prob=0.15 (BERT's)",
            )
        for key, value in (
            ("mask_replace_prob", mask_replace_prob),
            ("random_replace_prob", random_replace_prob),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"objective.{key}",
                    f"must be in [0, 1], got {value}",
                    "BERT uses 0.8 (mask) and 0.1 (random)",
                )
        if mask_replace_prob + random_replace_prob > 1.0:
            raise ConfigError(
                "objective.random_replace_prob",
                f"mask_replace_prob + random_replace_prob = {mask_replace_prob + random_replace_prob} > 1",
                "make them sum to at most 1 (the rest is kept unchanged)",
            )
        self.mask_prob, self.mask_replace_prob, self.random_replace_prob = (
            mask_prob,
            mask_replace_prob,
            random_replace_prob,
        )
        self.mask_token, self.ignore_index = mask_token, ignore_index
        self.mask_id: int | None = None
        self.pad_id: int | None = None
        self.special_ids = torch.zeros(0, dtype=torch.long)  # never selected
        self.random_ids = torch.zeros(0, dtype=torch.long)  # what a "random token" is drawn from

    def special_tokens(self) -> dict[str, str]:
        return {"mask": self.mask_token}

    def bind(self, tokenizer: Tokenizer) -> None:
        """Read the mask / pad ids and split the vocabulary into special ids and random-replacement ids."""
        self.mask_id = tokenizer.special_id("mask")
        self.pad_id = tokenizer.pad_id if "pad" in tokenizer.specials else None
        special = {tokenizer.hf.token_to_id(t) for t in tokenizer.specials.values()}
        special |= {i for i, tok in tokenizer.hf.get_added_tokens_decoder().items() if tok.special}
        special.discard(None)
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        keep = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
        keep[self.special_ids] = False
        self.random_ids = keep.nonzero().squeeze(1)

    # --- masking -------------------------------------------------------------------------------------
    def real_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) bool: positions holding text (not the pad of the val tail, not masked out by the batch)."""
        ids = batch["input_ids"]
        real = torch.ones_like(ids, dtype=torch.bool) if self.pad_id is None else ids != self.pad_id
        if batch.get("attention_mask") is not None:
            real &= batch["attention_mask"].bool()
        return real

    def corrupt(
        self, input_ids: torch.Tensor, real: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupted inputs, targets): targets = original id where selected, ignore_index elsewhere."""
        if self.mask_id is None:
            raise RuntimeError("MaskedLM.bind(tokenizer) was not called: the mask token id is unknown")
        B, T = input_ids.shape
        dev = input_ids.device
        candidate = real & ~torch.isin(input_ids, self.special_ids.to(dev))
        n = candidate.sum(dim=1)
        # k per block: p·n stochastically rounded (unbiased), at least one when the block has a candidate
        u = torch.rand(B, device=dev, generator=generator)
        k = torch.minimum(torch.floor(n * self.mask_prob + u).long().clamp(min=1), n)
        # a uniformly random k-subset of the candidates: the k lowest random scores (non-candidates rank last)
        scores = torch.rand(B, T, device=dev, generator=generator).masked_fill(~candidate, 2.0)
        rank = scores.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        selected = rank < k[:, None]
        # 80 / 10 / 10: one uniform per position decides mask / random / keep
        action = torch.rand(B, T, device=dev, generator=generator)
        to_mask = selected & (action < self.mask_replace_prob)
        to_random = selected & ~to_mask & (action < self.mask_replace_prob + self.random_replace_prob)
        pool = self.random_ids.to(dev)
        random_tokens = pool[torch.randint(pool.numel(), (B, T), device=dev, generator=generator)]
        inputs = torch.where(to_random, random_tokens, input_ids).masked_fill(to_mask, self.mask_id)
        return inputs, input_ids.masked_fill(~selected, self.ignore_index)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        input_ids = batch["input_ids"]
        real = self.real_tokens(batch)
        generator = None if model.training else batch_generator(input_ids, salt=_SALT)
        inputs, targets = self.corrupt(input_ids, real, generator)
        # only padded batches (the val tail) pay for a mask; full blocks keep the fused unmasked attention
        attention_mask = None if bool(real.all()) else real.long()
        logits = model(inputs, attention_mask=attention_mask)
        out = token_nll(logits, targets, self.ignore_index)
        if not model.training:  # val/mlm_accuracy: an argmax over (B, T, V) that training steps need not pay for
            with torch.no_grad():
                out.correct = ((logits.argmax(-1) == targets) & (targets != self.ignore_index)).sum()
        return out
