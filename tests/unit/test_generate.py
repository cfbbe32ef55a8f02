"""`generate`: greedy decoding equals HF `generate` on the same weights for every family, the cache changes no
token, left-padded batches equal one-by-one decoding, and EOS / pad / stop criteria / streamer behave."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.generation import generate
from lmforge.interop.hf import from_hf
from lmforge.models import build

transformers = pytest.importorskip("transformers")

VOCAB = 61
PROMPT, NEW = 7, 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: with 2 threads on a shared 2-core machine, OpenMP hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_norms(model: nn.Module) -> nn.Module:
    """HF unit-inits norms: perturb them so that a mis-mapped or mis-applied norm changes the tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def hf_model(kind: str) -> nn.Module:
    """A small random HF model, eager attention; initializer_range 0.2 keeps attention far from uniform."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None, attn_implementation="eager",
        )
        return _randomise_norms(transformers.GPT2LMHeadModel(cfg).eval())
    if kind == "t5":
        cfg = transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0,
            eos_token_id=None, pad_token_id=0, initializer_factor=2.0, feed_forward_proj="gated-gelu", attn_implementation="eager",
        )
        return _randomise_norms(transformers.T5ForConditionalGeneration(cfg).eval())
    prefix = {"llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral"}[kind]
    kwargs = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "initializer_range": 0.2, "bos_token_id": None, "eos_token_id": None, "attn_implementation": "eager",
    }
    if kind == "mistral":
        kwargs["sliding_window"] = 5  # prompt + new tokens = 19 > 5: the window is in play
    if kind == "mixtral":
        kwargs |= {"num_local_experts": 4, "num_experts_per_tok": 2}
    cfg = getattr(transformers, f"{prefix}Config")(**kwargs)
    return _randomise_norms(getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval())


def prompt(batch: int = 2, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def ours(cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    return build({**cfg, "init_std": 0.2}, vocab_size=VOCAB).eval()


GPT = {"n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 32}
LLAMA = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48, "max_seq_len": 32}
FAMILIES = {
    "gpt": GPT,
    "gpt-alibi": {**GPT, "position": "alibi"},
    "llama": LLAMA,
    "mistral": {**LLAMA, "sliding_window": 4},
    "llama-alibi": {**LLAMA, "position": "alibi"},
    "mixtral": {**LLAMA, "family": "mixtral", "n_expert": 4, "n_expert_per_token": 2},
}


# --- parity with HF generate ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "mixtral", "t5"])
def test_greedy_equals_hf_generate(kind: str) -> None:
    hf = hf_model(kind)
    model = from_hf(hf).eval()
    ids = prompt()
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = generate(model, ids, max_new_tokens=NEW)
    assert out.shape == ref.shape == ((2, 1 + NEW) if kind == "t5" else (2, PROMPT + NEW))
    assert torch.equal(out, ref)
    assert len(set(out[:, -NEW:].flatten().tolist())) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_left_padded_batch_equals_hf(kind: str) -> None:
    hf = hf_model(kind)
    model = from_hf(hf).eval()
    ids, mask = prompt(3), torch.ones(3, PROMPT, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=NEW), ref)


def test_repetition_penalty_equals_hf() -> None:
    hf = hf_model("gpt2")
    model = from_hf(hf).eval()
    ids = prompt()
    kw = {"max_new_tokens": NEW, "repetition_penalty": 1.8}
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    out = generate(model, ids, **kw)
    assert torch.equal(out, ref)
    assert not torch.equal(out, generate(model, ids, max_new_tokens=NEW))  # the penalty did change something


# --- the cache changes no token ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_same_with_and_without_cache(name: str) -> None:
    model = ours(FAMILIES[name])
    ids = prompt()
    assert torch.equal(generate(model, ids, max_new_tokens=NEW), generate(model, ids, max_new_tokens=NEW, use_cache=False))


def test_t5_same_with_and_without_cache_and_starts_with_decoder_start() -> None:
    model = from_hf(hf_model("t5")).eval()
    ids = prompt()
    out = generate(model, ids, max_new_tokens=NEW)
    assert out.shape == (2, 1 + NEW) and (out[:, 0] == 0).all()  # the decoder start token (T5: pad id 0)
    assert torch.equal(out, generate(model, ids, max_new_tokens=NEW, use_cache=False))


def test_past_the_context_the_cache_falls_back_to_the_window() -> None:
    """max_seq_len 16, 7 + 20 tokens: after the cache is full, decoding re-runs the last 16 tokens, exactly
    as uncached decoding does."""
    model = ours({**GPT, "max_seq_len": 16})
    ids = prompt()
    out = generate(model, ids, max_new_tokens=20)
    assert out.shape == (2, PROMPT + 20)
    assert torch.equal(out, generate(model, ids, max_new_tokens=20, use_cache=False))


def test_sampling_same_with_and_without_cache() -> None:
    model = ours(FAMILIES["llama"])
    ids = prompt()
    kw = {"max_new_tokens": NEW, "temperature": 1.3, "top_k": 20, "top_p": 0.95, "min_p": 0.02, "repetition_penalty": 1.2}
    a = generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    c = generate(model, ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- left padding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt", "gpt-alibi", "mistral", "llama-alibi", "mixtral"])
def test_left_padded_batch_equals_one_by_one(name: str) -> None:
    model = ours(FAMILIES[name])
    rows = [prompt(1, n, seed=n)[0] for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], max_new_tokens=NEW)
        assert torch.equal(out[i, width:], alone[0, len(r) :]), f"row {i}"


def test_t5_padded_encoder_batch_equals_one_by_one() -> None:
    model = from_hf(hf_model("t5")).eval()
    ids, mask = prompt(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0  # T5 inputs are padded on the right (either side works: the mask only hides keys)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(out[0], generate(model, ids[:1], max_new_tokens=NEW)[0])
    assert torch.equal(out[1], generate(model, ids[1:, :5], max_new_tokens=NEW)[0])


# --- finishing rows -------------------------------------------------------------------------------------
def test_eos_finishes_a_row_and_pads_it() -> None:
    model = ours(FAMILIES["llama"])
    ids = prompt()
    free = generate(model, ids, max_new_tokens=NEW)
    eos = int(free[0, PROMPT + 2])  # row 0 emits it at step 3
    assert eos not in free[1, PROMPT:].tolist() or free[1, PROMPT:].tolist().index(eos) > 2
    out = generate(model, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=VOCAB - 1)
    first = free[0, PROMPT:].tolist().index(eos)
    assert torch.equal(out[0, : PROMPT + first + 1], free[0, : PROMPT + first + 1])
    assert (out[0, PROMPT + first + 1 :] == VOCAB - 1).all()
    row1 = free[1, PROMPT:].tolist()
    if eos in row1:
        assert out.size(1) == PROMPT + max(first, row1.index(eos)) + 1  # stops once every row is done
    else:
        assert torch.equal(out[1], free[1])
    # default pad = the (first) EOS id, and a list of EOS ids works the same
    listed = generate(model, ids, max_new_tokens=NEW, eos_token_id=[eos, VOCAB + 5])
    assert (listed[0, PROMPT + first :] == eos).all()


def test_stop_criteria_and_streamer() -> None:
    model = ours(FAMILIES["gpt"])
    ids = prompt()
    free = generate(model, ids, max_new_tokens=NEW)
    seen: list[torch.Tensor] = []

    def stop_row_1_after_4(seqs: torch.Tensor) -> torch.Tensor:
        assert seqs.shape[0] == 2 and seqs.shape[1] > PROMPT
        return torch.tensor([False, seqs.size(1) >= PROMPT + 4])

    out = generate(model, ids, max_new_tokens=NEW, stop_criteria=stop_row_1_after_4, pad_token_id=0, streamer=seen.append)
    assert torch.equal(out[0], free[0])
    assert torch.equal(out[1, : PROMPT + 4], free[1, : PROMPT + 4]) and (out[1, PROMPT + 4 :] == 0).all()
    assert torch.equal(torch.stack(seen, dim=1), out[:, PROMPT:])  # one (B,) tensor per step

    out = generate(model, ids, max_new_tokens=NEW, stop_criteria=lambda s: torch.ones(2, dtype=torch.bool))
    assert out.shape == (2, PROMPT + 1)  # every row stopped after one token


def test_zero_new_tokens_returns_the_prompt() -> None:
    ids = prompt()
    assert torch.equal(generate(ours(GPT), ids, max_new_tokens=0), ids)


# --- refusals -------------------------------------------------------------------------------------------
def test_encoder_only_model_is_refused() -> None:
    bert = build({"family": "bert", "n_layer": 1, "n_head": 2, "n_embd": 16, "intermediate_size": 32}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="encoder-only"):
        generate(bert, prompt(), max_new_tokens=3)


def test_bad_arguments_are_refused() -> None:
    model = ours(GPT)
    ids = prompt()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, max_new_tokens=2, attention_mask=torch.tensor([[1] * 6 + [0], [1] * 7]))
    with pytest.raises(ValueError, match="min_p"):
        generate(model, ids, max_new_tokens=2, min_p=1.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, ids, max_new_tokens=2, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, ids, max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match="beam search"):
        generate(model, ids, max_new_tokens=2, num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="streamer"):
        generate(model, ids, max_new_tokens=2, num_beams=2, streamer=print)
