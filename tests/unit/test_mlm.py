"""Masked-LM objective: selection statistics, corruption split, RNG behaviour, loss, tokenizer binding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lmforge.data.tokenizer import BPETokenizerSpec, Tokenizer
from lmforge.errors import ConfigError
from lmforge.models import build
from lmforge.objectives.base import IGNORE_INDEX
from lmforge.objectives.mlm import MaskedLM
from lmforge.objectives.registry import objectives_for

CONF = Path(__file__).resolve().parents[2] / "conf"
TEXT = "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name. " * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tok = BPETokenizerSpec(vocab_size=300).train([TEXT])
    assert tok.add_special_tokens(MaskedLM().special_tokens()) == ["<|mask|>"]
    return tok


@pytest.fixture(scope="module")
def objective(tok: Tokenizer) -> MaskedLM:
    obj = MaskedLM()
    obj.bind(tok)
    return obj


class Recorder(nn.Module):
    """Wraps a model and keeps what the objective fed it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs, self.attention_mask = input_ids, attention_mask
        return self.model(input_ids, attention_mask=attention_mask)


def tiny_bert(tok: Tokenizer) -> Recorder:
    torch.manual_seed(0)
    cfg = {
        "family": "bert",
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "intermediate_size": 64,
        "max_seq_len": 64,
        "dropout": 0.0,
    }
    return Recorder(build(cfg, vocab_size=tok.vocab_size))


def text_batch(tok: Tokenizer, B: int, T: int, seed: int = 0, pad_tail: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with an eos every ~20 tokens (packed documents), the last row's tail padded as in val."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tok.vocab_size, (B, T), generator=g)
    special = torch.isin(ids, torch.tensor([tok.eos_id, tok.bos_id, tok.pad_id, tok.special_id("mask")]))
    ids[special] = ids[special] % 200 + 50  # plain text has no specials but document breaks...
    ids[torch.rand(B, T, generator=g) < 0.05] = tok.eos_id
    if pad_tail:
        ids[-1, -pad_tail:] = tok.pad_id
    # packed batches carry next-token targets too; MLM reads only input_ids
    return {"input_ids": ids, "targets": torch.roll(ids, -1, dims=1)}


# --- tokenizer binding ---------------------------------------------------------------------------------


def test_special_tokens_and_bind_with_a_real_tokenizer(tok: Tokenizer, objective: MaskedLM) -> None:
    mask_id = tok.special_id("mask")
    assert (
        mask_id == tok.vocab_size - 1 and tok.hf.id_to_token(mask_id) == "<|mask|>"
    )  # appended, ids unmoved
    assert objective.mask_id == mask_id and objective.pad_id == tok.pad_id
    specials = {tok.eos_id, tok.bos_id, tok.pad_id, mask_id}
    assert set(objective.special_ids.tolist()) == specials
    assert set(objective.random_ids.tolist()) == set(range(tok.vocab_size)) - specials
    assert mask_id not in tok.encode("x <|mask|> y")  # raw text that spells the token is text, not a mask


def test_mask_token_is_configurable() -> None:
    tok = BPETokenizerSpec(vocab_size=300).train([TEXT])
    obj = MaskedLM(mask_token="[MASK]")
    assert obj.special_tokens() == {"mask": "[MASK]"}
    tok.add_special_tokens(obj.special_tokens())
    obj.bind(tok)
    assert tok.hf.id_to_token(obj.mask_id) == "[MASK]" and obj.mask_id not in obj.random_ids


def test_yaml_and_registry() -> None:
    obj = instantiate(OmegaConf.load(CONF / "objective" / "mlm.yaml"))
    assert (
        isinstance(obj, MaskedLM) and obj.mask_prob == 0.15 and obj.special_tokens() == {"mask": "<|mask|>"}
    )
    assert MaskedLM.supported_kinds == ("encoder",) and "mlm" in objectives_for("encoder")
    assert "mlm" not in objectives_for("decoder")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mask_prob": 0.0}, "objective.mask_prob"),
        ({"mask_prob": 1.5}, "objective.mask_prob"),
        ({"mask_replace_prob": -0.1}, "objective.mask_replace_prob"),
        ({"mask_replace_prob": 0.8, "random_replace_prob": 0.3}, "objective.random_replace_prob"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        MaskedLM(**kwargs)
    assert err.value.key == key


def test_unbound_objective_says_so() -> None:
    with pytest.raises(RuntimeError, match="bind"):
        MaskedLM().corrupt(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))


# --- masking statistics --------------------------------------------------------------------------------


def test_selection_and_corruption_statistics(tok: Tokenizer, objective: MaskedLM) -> None:
    B, T = 256, 256
    batch = text_batch(tok, B, T, pad_tail=100)
    ids = batch["input_ids"]
    real = objective.real_tokens(batch)
    torch.manual_seed(0)
    inputs, targets = objective.corrupt(ids, real, None)
    selected = targets != IGNORE_INDEX
    candidate = real & ~torch.isin(ids, objective.special_ids)

    # specials and padding are never selected; targets are the originals exactly there
    assert not (selected & ~candidate).any()
    assert not selected[-1, -100:].any() and not selected[ids == tok.eos_id].any()
    assert torch.equal(targets[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])

    # per block, k = p·n rounded down or up (never 0); overall, 15% of the candidates within a whisker
    n, k = candidate.sum(1).float(), selected.sum(1).float()
    assert torch.all((k == torch.floor(0.15 * n)) | (k == torch.ceil(0.15 * n)))
    assert torch.all(k >= 1)
    assert abs(k.sum().item() / n.sum().item() - 0.15) < 0.002  # rounding noise sd ≤ 0.5·√B / Σn ≈ 1e-4

    # 80 / 10 / 10, each within 5 binomial standard deviations
    N = int(selected.sum())
    masked = selected & (inputs == objective.mask_id)
    changed = selected & (inputs != ids) & ~masked
    kept = selected & (inputs == ids)
    p_same = 1 / objective.random_ids.numel()  # a random draw can hit the original token
    for count, p in ((masked, 0.8), (changed, 0.1 * (1 - p_same)), (kept, 0.1 + 0.1 * p_same)):
        assert abs(int(count.sum()) / N - p) < 5 * math.sqrt(p * (1 - p) / N), (int(count.sum()), N, p)
    # random replacements are never special; the mask id appears only where masking put it
    assert not torch.isin(inputs[changed], objective.special_ids).any()
    assert torch.equal(inputs == objective.mask_id, masked)


def test_replacement_split_is_configurable(tok: Tokenizer) -> None:
    obj = MaskedLM(mask_prob=0.5, mask_replace_prob=1.0, random_replace_prob=0.0)
    obj.bind(tok)
    batch = text_batch(tok, 16, 64)
    inputs, targets = obj.corrupt(batch["input_ids"], obj.real_tokens(batch))
    selected = targets != IGNORE_INDEX
    assert torch.all(inputs[selected] == obj.mask_id)
    assert (
        abs(
            selected.sum().item()
            / obj.real_tokens(batch).logical_and(batch["input_ids"] != tok.eos_id).sum().item()
            - 0.5
        )
        < 0.02
    )


def test_at_least_one_token_is_selected(tok: Tokenizer, objective: MaskedLM) -> None:
    ids = torch.full((3, 8), tok.eos_id)
    ids[0, 3] = 100  # one candidate: always selected, though 15% of 1 rounds to 0
    ids[1, 2:4] = torch.tensor([101, 102])
    inputs, targets = objective.corrupt(ids, torch.ones_like(ids, dtype=torch.bool))
    assert (targets != IGNORE_INDEX).sum(1).tolist() == [1, 1, 0]
    assert targets[0, 3] == 100


def test_a_batch_without_candidates_gives_a_zero_loss_not_nan(tok: Tokenizer, objective: MaskedLM) -> None:
    model = tiny_bert(tok).train()
    ids = torch.full((2, 8), tok.eos_id)
    out = objective(model, {"input_ids": ids, "targets": ids})
    assert out.n_tokens == 0 and out.loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()  # still differentiable: a DDP step with this batch must not fail


# --- randomness ----------------------------------------------------------------------------------------


def test_eval_masks_depend_on_the_batch_only(tok: Tokenizer, objective: MaskedLM) -> None:
    model = tiny_bert(tok).eval()
    a, b = text_batch(tok, 4, 64, seed=1), text_batch(tok, 4, 64, seed=2)
    torch.manual_seed(0)
    out1 = objective(model, a)
    inputs1 = model.inputs
    torch.manual_seed(123)  # the global RNG does not matter in eval mode
    torch.rand(10)
    out2 = objective(model, a)
    assert torch.equal(out1.targets, out2.targets) and torch.equal(inputs1, model.inputs)
    assert out1.loss.item() == out2.loss.item()
    out3 = objective(model, b)
    assert not torch.equal(out3.targets != IGNORE_INDEX, out1.targets != IGNORE_INDEX)


def test_training_masks_follow_the_global_rng(tok: Tokenizer, objective: MaskedLM) -> None:
    model = tiny_bert(tok).train()
    batch = text_batch(tok, 4, 64)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append((objective(model, batch).targets, model.inputs))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    torch.manual_seed(7)
    again = objective(model, batch).targets
    assert not torch.equal(again, objective(model, batch).targets)  # consecutive steps draw new masks


# --- loss ----------------------------------------------------------------------------------------------


def test_loss_is_cross_entropy_on_selected_positions(tok: Tokenizer, objective: MaskedLM) -> None:
    model = tiny_bert(tok).eval()
    batch = text_batch(tok, 3, 40, pad_tail=9)
    out = objective(model, batch)
    ids, selected = batch["input_ids"], out.targets != IGNORE_INDEX
    assert out.targets.shape == ids.shape and torch.equal(out.targets[selected], ids[selected])
    # padding is hidden from attention, and never selected
    assert (
        torch.equal(model.attention_mask.bool(), ids != tok.pad_id) and not selected[ids == tok.pad_id].any()
    )
    with torch.no_grad():
        logits = model.model(model.inputs, attention_mask=model.attention_mask)
    logp = F.log_softmax(logits.double(), dim=-1)
    nll = -logp[selected].gather(1, ids[selected][:, None]).squeeze(1)
    assert out.n_tokens.item() == selected.sum().item()
    assert out.nll_sum.item() == pytest.approx(nll.sum().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(nll.mean().item(), rel=1e-5)
    # what val/bpb divides by: bytes of the original tokens at the selected positions
    token_bytes = torch.from_numpy(tok.token_byte_lengths())
    assert token_bytes[out.targets.clamp(min=0)][selected].sum() == token_bytes[ids[selected]].sum() > 0


def test_unpadded_batch_keeps_the_fused_unmasked_path(tok: Tokenizer, objective: MaskedLM) -> None:
    model = tiny_bert(tok).eval()
    objective(model, text_batch(tok, 2, 32))
    assert model.attention_mask is None


def test_a_few_steps_lower_the_masked_lm_loss(tok: Tokenizer, objective: MaskedLM) -> None:
    model = tiny_bert(tok).train()
    ids = torch.tensor([tok.encode(TEXT)[:64]] * 8)
    batch = {"input_ids": ids, "targets": ids}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.eval()
    before = objective(model, batch).loss.item()
    model.train()
    for _ in range(40):
        opt.zero_grad()
        objective(model, batch).loss.backward()
        opt.step()
    model.eval()
    assert objective(model, batch).loss.item() < 0.7 * before
