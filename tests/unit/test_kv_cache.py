"""KV cache: feeding a sequence chunk by chunk through the cache gives the logits of one uncached forward
(fp32, atol 1e-5) for every family and position scheme, with and without left padding; the buffers are
allocated once, hold n_kv_head heads, and T5's cross-attention K/V are computed once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.generation.state import positions_from_mask
from lmforge.models import build
from lmforge.models.layers.kv_cache import KVCache

VOCAB = 53
CHUNKS = (5, 1, 1, 3, 1, 1)  # a prompt, single decode steps, and a multi-token step after a past (speculative)
T = sum(CHUNKS)

DECODERS = {
    "gpt": {"n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 32, "init_std": 0.2},
    "gpt-alibi": {"n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 32, "init_std": 0.2, "position": "alibi"},
    "llama-gqa": {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48,
                  "max_seq_len": 32, "init_std": 0.2},
    "llama-mqa": {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 1, "n_embd": 32, "intermediate_size": 48,
                  "max_seq_len": 32, "init_std": 0.2},
    "mistral-window": {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48,
                       "max_seq_len": 32, "init_std": 0.2, "sliding_window": 4},  # 12 tokens > window 4
    "llama-alibi": {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48,
                    "max_seq_len": 32, "init_std": 0.2, "position": "alibi"},
    "llama-yarn": {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48,
                   "max_seq_len": 32, "init_std": 0.2, "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_seq_len": 8}},
    "mixtral": {"family": "mixtral", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48,
                "max_seq_len": 32, "init_std": 0.2, "n_expert": 4, "n_expert_per_token": 2},
}
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: with 2 threads on a shared 2-core machine, OpenMP hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


T5_CFG = {"family": "t5", "n_layer": 2, "n_head": 4, "n_embd": 32, "head_dim": 8, "intermediate_size": 48,
          "relative_attention_num_buckets": 8, "relative_attention_max_distance": 12, "initializer_factor": 1.0}


def model_for(name: str, backend: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    return build({**DECODERS[name], "attn_backend": backend}, vocab_size=VOCAB).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad_mask() -> torch.Tensor:
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :3] = 0  # row 0: three pads, row 1: none
    return mask


@torch.inference_mode()
def chunked(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of `ids` fed CHUNKS at a time through a cache sized exactly T."""
    cache = model.make_cache(ids.size(0), T)
    positions = None if mask is None else positions_from_mask(mask)
    out, start = [], 0
    for n in CHUNKS:
        kwargs = {} if mask is None else {"attention_mask": mask[:, : start + n], "position_ids": positions[:, start : start + n]}
        out.append(model(ids[:, start : start + n], cache=cache, **kwargs))
        start += n
    assert cache.length == T
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_cached_logits_equal_uncached(name: str, backend: str) -> None:
    model = model_for(name, backend)
    ids = tokens()
    with torch.inference_mode():
        full = model(ids)
    torch.testing.assert_close(chunked(model, ids), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt", "gpt-alibi", "llama-gqa", "mistral-window", "llama-alibi", "mixtral"])
def test_cached_logits_equal_uncached_left_padded(name: str) -> None:
    model = model_for(name)
    ids, mask = tokens(), left_pad_mask()
    with torch.inference_mode():
        full = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    real = mask.bool()
    torch.testing.assert_close(chunked(model, ids, mask)[real], full[real], atol=1e-5, rtol=0)


def test_padded_row_equals_the_unpadded_row() -> None:
    """Left padding must be invisible: the padded row's logits are those of the row alone."""
    model = model_for("mistral-window")
    ids, mask = tokens(), left_pad_mask()
    with torch.inference_mode():
        solo = model(ids[:1, 3:])
    torch.testing.assert_close(chunked(model, ids, mask)[0, 3:], solo[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("encoder_padding", [False, True])
def test_t5_cached_decoder_equals_uncached(backend: str, encoder_padding: bool) -> None:
    torch.manual_seed(0)
    model = build({**T5_CFG, "attn_backend": backend}, vocab_size=VOCAB).eval()
    src, dec = tokens(length=9, seed=2), tokens(seed=3)
    src_mask = None
    if encoder_padding:
        src_mask = torch.ones_like(src)
        src_mask[1, 6:] = 0
    with torch.inference_mode():
        memory = model.encode(src, src_mask)
        full = model.decode(dec, memory, src_mask)
        cache = model.make_cache(2, T)
        out, start = [], 0
        for n in CHUNKS:
            out.append(model.decode(dec[:, start : start + n], memory if start == 0 else None, src_mask, cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=0)


def test_t5_cross_attention_kv_computed_once() -> None:
    torch.manual_seed(0)
    model = build(T5_CFG, vocab_size=VOCAB).eval()
    calls: list[int] = []
    hooks = [b.cross_attn.k.register_forward_hook(lambda *_: calls.append(1)) for b in model.decoder.blocks]
    from lmforge.generation import generate

    generate(model, tokens(length=9), max_new_tokens=6)
    for h in hooks:
        h.remove()
    assert len(calls) == len(model.decoder.blocks)  # once per layer, not once per step


def test_buffers_allocated_once_with_kv_heads() -> None:
    model = model_for("llama-mqa")
    cache = model.make_cache(2, T)
    ids = tokens()
    with torch.inference_mode():
        model(ids[:, :4], cache=cache)
        pointers = [k.data_ptr() for k in cache.keys]
        for t in range(4, 8):
            model(ids[:, t : t + 1], cache=cache)
    assert [k.data_ptr() for k in cache.keys] == pointers  # written in place, never re-allocated or concatenated
    assert all(k.shape == (2, 1, T, 8) for k in cache.keys)  # MQA: one K/V head of head_dim 8 stored, not 4
    assert cache.length == 8
    assert cache.nbytes() == 2 * 2 * (2 * 1 * T * 8) * 4  # layers x (K, V) x elements x fp32


def test_overflow_crop_and_reorder() -> None:
    cache = KVCache(n_layer=1, batch_size=2, n_kv_head=1, head_dim=2, max_len=3)
    k = torch.arange(8.0).view(2, 1, 2, 2)
    keys, _ = cache.update(0, k, k)
    cache.advance(2)
    assert torch.equal(keys, k)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    cache.crop(1)  # speculative decoding: forget the second token
    keys, _ = cache.update(0, torch.full((2, 1, 1, 2), -1.0), torch.full((2, 1, 1, 2), -1.0))
    assert keys.shape == (2, 1, 2, 2) and torch.equal(keys[:, :, 1], torch.full((2, 1, 2), -1.0))
    cache.advance(1)
    cache.reorder(torch.tensor([1, 1]))  # beam search: both rows follow row 1
    assert torch.equal(cache.keys[0][0, :, :2], cache.keys[0][1, :, :2])
    assert torch.equal(cache.keys[0][0, 0, 0], k[1, 0, 0])
    with pytest.raises(ValueError, match="crop"):
        cache.crop(5)


def test_cache_past_max_seq_len_is_refused() -> None:
    model = model_for("gpt")
    cache = model.make_cache(1, 40)
    with torch.inference_mode(), pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 33), cache=cache)


def test_mixtral_skips_routing_stats_while_decoding() -> None:
    model = model_for("mixtral")
    with torch.inference_mode():
        model(tokens(length=4))
        assert model.aux_loss is not None
        model(tokens(length=4), cache=model.make_cache(2, 4))
    assert model.aux_loss is None and model.moe_metrics == {}
