"""Beam search equals HF `generate(num_beams=k, do_sample=False)` on the same weights — length penalty,
early stopping (True / False / "never"), EOS-ended hypotheses, left padding — for GPT-2, Llama and T5."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

from lmforge.generation import generate
from lmforge.interop.hf import from_hf

transformers = pytest.importorskip("transformers")

VOCAB = 61
PAD = VOCAB - 1  # not 0: HF's beam search treats pad_token_id=0 as unset and fills with EOS instead
NEW = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: with 2 threads on a shared 2-core machine, OpenMP hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None, attn_implementation="eager",
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=None,
            eos_token_id=None, attn_implementation="eager",
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0,
            eos_token_id=None, pad_token_id=0, initializer_factor=2.0, feed_forward_proj="gated-gelu",
            attn_implementation="eager",
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@cache
def models(kind: str) -> tuple[nn.Module, nn.Module]:
    """(HF model, lmforge model with its weights), built once per module."""
    hf = hf_model(kind)
    return hf, from_hf(hf).eval()


@pytest.fixture(params=["gpt2", "llama", "t5"])
def pair(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    return request.param, *models(request.param)


def prompt(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(1))


def frequent_token(model: nn.Module, ids: torch.Tensor) -> int:
    """An EOS id that beams actually produce: the greedy continuation's third token of row 0."""
    out = generate(model, ids, max_new_tokens=4)
    return int(out[0, -2])


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"),
    [(1.0, False), (0.5, True), (-1.0, False), (2.0, "never")],
)
def test_beam_search_equals_hf(pair: tuple[str, nn.Module, nn.Module], length_penalty: float, early_stopping: bool | str) -> None:
    kind, hf, model = pair
    ids = prompt()
    eos = frequent_token(model, ids)
    kw = {"max_new_tokens": NEW, "num_beams": 3, "length_penalty": length_penalty, "early_stopping": early_stopping,
          "eos_token_id": eos, "pad_token_id": PAD}
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)
    out = generate(model, ids, **kw)
    assert torch.equal(out, ref), f"{kind}: {out.tolist()} != {ref.tolist()}"


def test_beam_search_without_eos_equals_hf(pair: tuple[str, nn.Module, nn.Module]) -> None:
    kind, hf, model = pair
    ids = prompt()
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, num_beams=4, pad_token_id=PAD, eos_token_id=None)
    out = generate(model, ids, max_new_tokens=NEW, num_beams=4)
    assert torch.equal(out, ref)
    assert torch.equal(out, generate(model, ids, max_new_tokens=NEW, num_beams=4, use_cache=False))
    greedy = generate(model, ids, max_new_tokens=NEW)
    assert out.shape == greedy.shape
    if kind != "t5":  # a beam's summed log-probability is never below greedy's
        lp_beam, lp_greedy = (seq_logprob(model, s, ids.size(1)) for s in (out, greedy))
        assert (lp_beam >= lp_greedy - 1e-4).all()


def seq_logprob(model: nn.Module, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    with torch.no_grad():
        logp = model(seqs).float().log_softmax(-1)
    picked = logp[:, prompt_len - 1 : -1].gather(-1, seqs[:, prompt_len:, None])[..., 0]
    return picked.sum(-1)


@pytest.mark.parametrize(
    ("kind", "eos", "num_beams", "length_penalty", "early_stopping"),
    [
        ("gpt2", [8], 3, 1.0, True),  # one input's k hypotheses are complete while another's search goes on
        ("llama", [46], 3, 1.0, True),
        ("gpt2", [1, 8], 2, 1.0, "never"),  # "never": whether a beam can still win is judged at max length
        ("gpt2", [5, 10], 3, 3.0, "never"),
        ("gpt2", [1, 8], 2, 1.0, False),  # an input that cannot improve keeps its hypotheses while others go on
        ("gpt2", [10, 24], 3, 1.0, True),  # two EOS ids: 3k candidates are needed to keep k beams alive
    ],
)
def test_stopping_rules_equal_hf(kind: str, eos: list[int], num_beams: int, length_penalty: float, early_stopping: bool | str) -> None:
    """Cases where the finer stopping rules decide the output (each rule, broken, changes these tokens)."""
    hf, model = models(kind)
    ids = prompt(3)
    kw = {"max_new_tokens": 12 if early_stopping is True and len(eos) == 1 else 16, "num_beams": num_beams, "length_penalty": length_penalty,
          "early_stopping": early_stopping, "eos_token_id": eos, "pad_token_id": PAD}
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)
    assert torch.equal(generate(model, ids, **kw), ref)


def test_left_padded_beam_search_equals_hf() -> None:
    hf, model = models("llama")
    ids, mask = prompt(3), torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    eos = frequent_token(model, ids[1:])
    kw = {"max_new_tokens": NEW, "num_beams": 2, "eos_token_id": eos, "pad_token_id": PAD}
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(generate(model, ids, attention_mask=mask, **kw), ref)


def test_one_beam_is_greedy() -> None:
    _, model = models("gpt2")
    ids = prompt()
    assert torch.equal(
        generate(model, ids, max_new_tokens=NEW, num_beams=1), generate(model, ids, max_new_tokens=NEW)
    )
