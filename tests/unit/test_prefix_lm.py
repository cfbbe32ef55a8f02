"""Prefix LM: the mask is bidirectional inside the prefix and causal after it; loss is on the suffix only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.models import build
from lmforge.models.layers.masks import build_attention_mask, prefix_lm_mask
from lmforge.objectives.base import IGNORE_INDEX
from lmforge.objectives.prefix_lm import PrefixLM

V, T = 97, 12


def tiny_gpt(backend: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return build({"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 64, "attn_backend": backend}, vocab_size=V)


def batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, V, (b, T + 1), generator=g)
    return {"input_ids": blocks[:, :-1], "targets": blocks[:, 1:]}


def test_prefix_mask_shape_and_pattern():
    mask = prefix_lm_mask(torch.tensor([3, 1]), 5)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected0 = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask[0, 0], expected0)
    assert torch.equal(mask[1, 0], torch.ones(5, 5).tril().bool())  # prefix of 1 = plain causal


def test_four_d_masks_pass_through_and_padding_keeps_diagonal():
    m4 = prefix_lm_mask(torch.tensor([2]), 4)
    assert build_attention_mask(m4, 4, torch.device("cpu")) is not None
    assert torch.equal(build_attention_mask(m4, 4, torch.device("cpu")), m4)
    pad = build_attention_mask(torch.tensor([[0, 1, 1]]), 3, torch.device("cpu"))
    assert torch.equal(pad[0, 0], torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool))
    window = build_attention_mask(None, 4, torch.device("cpu"), sliding_window=2)
    assert torch.equal(window[0, 0], torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool))


def test_prefix_tokens_see_each_other_but_not_the_suffix():
    model = tiny_gpt().eval()
    ids = batch(1)["input_ids"]
    mask = prefix_lm_mask(torch.tensor([5]), T)
    changed = ids.clone()
    changed[0, 4] = (changed[0, 4] + 1) % V  # a prefix token
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask), model(changed, attention_mask=mask)
    assert not torch.allclose(a[0, 0], b[0, 0])  # position 0 sees position 4 (bidirectional prefix)
    later = ids.clone()
    later[0, 8] = (later[0, 8] + 1) % V  # a suffix token
    with torch.no_grad():
        c = model(later, attention_mask=mask)
    torch.testing.assert_close(a[0, :8], c[0, :8], atol=1e-6, rtol=0)  # nothing before 8 sees it


def test_loss_is_on_suffix_only_and_equals_hand_computed():
    model = tiny_gpt().eval()
    obj = PrefixLM()
    b = batch()
    p = obj.prefix_lengths(b["input_ids"], b["targets"], training=False)
    out = obj(model, b)
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=prefix_lm_mask(p, T))
    nll, n = 0.0, 0
    for row in range(b["input_ids"].size(0)):
        for t in range(p[row] - 1, T):
            nll += F.cross_entropy(logits[row, t], b["targets"][row, t], reduction="sum").item()
            n += 1
    assert int(out.n_tokens) == n == int((out.targets != IGNORE_INDEX).sum())
    assert abs(out.nll_sum.item() - nll) < 1e-3
    assert torch.all(out.targets[torch.arange(T)[None] < (p - 1)[:, None]] == IGNORE_INDEX)


def test_prefix_lengths_range_and_eval_determinism():
    obj = PrefixLM(min_prefix=2, max_prefix_fraction=0.5)
    b = batch(256, seed=3)
    p1 = obj.prefix_lengths(b["input_ids"], b["targets"], training=False)
    p2 = obj.prefix_lengths(b["input_ids"], b["targets"], training=False)
    assert torch.equal(p1, p2)
    assert p1.min() >= 2 and p1.max() <= (T + 1) // 2
    assert len(p1.unique()) > 3  # actually random across rows
    torch.manual_seed(0)
    t1 = obj.prefix_lengths(b["input_ids"], b["targets"], training=True)
    torch.manual_seed(0)
    assert torch.equal(t1, obj.prefix_lengths(b["input_ids"], b["targets"], training=True))


def test_padded_tail_never_inside_prefix():
    obj = PrefixLM(max_prefix_fraction=0.9)
    b = batch(64, seed=5)
    b["targets"][:, 4:] = IGNORE_INDEX  # only 5 real tokens per row
    p = obj.prefix_lengths(b["input_ids"], b["targets"], training=False)
    assert p.max() <= 4
