"""`generation/fastpath.py`: the lean one-token decode step gives the tokens (and, to float tolerance, the
logits) of the models' own forward, follows in-place weight updates, and stays out where it does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.generation import generate
from lmforge.generation.fastpath import DecodePlan, clear, disabled
from lmforge.generation.state import DecodeState
from lmforge.models import build

VOCAB = 61
GPT = {"n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 40}
LLAMA = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48, "max_seq_len": 40}
SUPPORTED = {
    "gpt": GPT,
    "gpt-bias-free": {**GPT, "bias": False},
    "llama": LLAMA,
    "llama-mha-bias": {**LLAMA, "n_kv_head": 4, "bias": True},
    "mistral": {**LLAMA, "sliding_window": 4},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ours(cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    model = build({**cfg, "init_std": 0.2}, vocab_size=VOCAB).eval()
    with torch.no_grad():  # non-unit norms, so that a mis-applied norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def prompt(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(model: nn.Module, ids: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    fast = generate(model, ids, **kw)
    with disabled():
        ref = generate(model, ids, **kw)
    return fast, ref


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_plan_applies_and_step_logits_match_the_forward(name: str) -> None:
    model = ours(SUPPORTED[name])
    assert DecodePlan.get(model) is not None
    ids = prompt(3, 9)
    with torch.inference_mode():
        ref = model(ids)[:, -1]
        state = DecodeState(model, ids[:, :-1], max_new_tokens=1)
        assert state.plan is not None
        state.forward(keep=1)
        state.append(ids[:, -1])
        fast = state.forward(keep=1)[:, -1]
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_greedy_and_sampled_tokens_equal_the_forward(name: str) -> None:
    model = ours(SUPPORTED[name])
    ids = prompt()
    fast, ref = both(model, ids, max_new_tokens=20)
    assert torch.equal(fast, ref)
    kw = {"max_new_tokens": 12, "temperature": 1.2, "top_p": 0.9, "repetition_penalty": 1.3}
    fast = generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    with disabled():
        ref = generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("name", ["gpt", "llama", "mistral"])
def test_left_padded_batch_equals_the_forward(name: str) -> None:
    model = ours(SUPPORTED[name])
    ids, mask = prompt(3), torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    fast, ref = both(model, ids.masked_fill(mask == 0, 0), attention_mask=mask, max_new_tokens=12)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_beam_search_and_speculative_equal_the_forward(name: str) -> None:
    model = ours(SUPPORTED[name])
    ids = prompt()
    fast, ref = both(model, ids, max_new_tokens=10, num_beams=3)
    assert torch.equal(fast, ref)
    draft = build({**vars(model.config), "n_layer": 1})
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if k in draft.state_dict()})
    fast, ref = both(model, ids[:1], max_new_tokens=15, draft_model=draft.eval(), num_draft_tokens=3)
    assert torch.equal(fast, ref)


def test_plan_is_cached_and_rebuilt_after_an_in_place_update() -> None:
    clear()
    model = ours(GPT)
    plan = DecodePlan.get(model)
    assert DecodePlan.get(model) is plan
    ids = prompt()
    before = generate(model, ids, max_new_tokens=15)
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.mul_(-3.0)  # an optimizer step would do the same
    assert DecodePlan.get(model) is not plan
    fast, ref = both(model, ids, max_new_tokens=15)
    assert torch.equal(fast, ref) and not torch.equal(fast, before)


@pytest.mark.parametrize("lmforge_adamw", [False, True])
def test_plan_is_rebuilt_after_a_fused_optimizer_step(lmforge_adamw: bool) -> None:
    """torch's fused AdamW updates weights in place without bumping version counters: the plan must still follow
    (it decoded RL rollouts and samples with the first weights it saw), through torch's optimizer or lmforge's."""
    from lmforge.optim.adamw import AdamW

    clear()
    model = ours(GPT)
    ids = prompt()
    before = generate(model, ids, max_new_tokens=15)
    plan = DecodePlan.get(model)
    opt = AdamW(model.parameters(), lr=0.5) if lmforge_adamw else torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    assert opt.defaults["fused"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in model.parameters()]
    opt.step()
    if lmforge_adamw:  # lmforge's bumps the versions as the unfused implementations do
        assert all(p._version > v for p, v in zip(model.parameters(), versions, strict=True))
    assert DecodePlan.get(model) is not plan
    fast, ref = both(model, ids, max_new_tokens=15)
    assert torch.equal(fast, ref) and not torch.equal(fast, before)


def test_plan_stays_out_where_it_does_not_apply() -> None:
    assert DecodePlan.get(ours({**GPT, "position": "alibi"})) is None
    assert DecodePlan.get(ours({**LLAMA, "position": "alibi"})) is None
    assert DecodePlan.get(ours({**LLAMA, "family": "mixtral", "n_expert": 4, "n_expert_per_token": 2})) is None
    assert DecodePlan.get(ours(GPT).to(torch.bfloat16)) is None
    hooked = ours(GPT)
    hooked.blocks[1].mlp.register_forward_hook(lambda m, i, o: o * 2)
    assert DecodePlan.get(hooked) is None
    model = ours(GPT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert DecodePlan.get(model) is None
    with disabled():
        assert DecodePlan.get(model) is None
    assert DecodePlan.get(model.train()) is None
