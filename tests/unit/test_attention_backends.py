"""Every attention backend gives the eager reference's outputs (CPU: sdpa and flex; flash_attn on CUDA only),
for causal, padded, packed-document and ALiBi masks, GQA, and KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import build
from lmforge.models.layers.attention_backends import attend, document_starts
from lmforge.models.layers.masks import build_attention_mask

FAMILIES = {
    "gpt": {},
    "gpt-alibi": {"family": "gpt", "position": "alibi"},
    "llama-gqa": {"family": "llama", "n_kv_head": 2},
}


def model_with(name: str, backend: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = dict(FAMILIES[name])
    cfg = {"family": extra.pop("family", name), "vocab_size": 61, "n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 64,
           "attn_backend": backend, **extra}
    return build(cfg).eval()


def packed_mask(doc_lengths: list[list[int]]) -> torch.Tensor:
    """(B, 1, T, T) block-diagonal causal mask for rows made of documents of the given lengths."""
    rows = []
    for lengths in doc_lengths:
        doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        same = doc[:, None] == doc[None, :]
        rows.append(same & torch.ones_like(same).tril())
    return torch.stack(rows)[:, None]


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backend_matches_eager_on_causal_padded_and_packed_inputs(name: str, backend: str) -> None:
    eager, other = model_with(name, "eager"), model_with(name, backend)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 20, dtype=torch.long)
    padding[0, :5] = 0  # left padding
    masks = {"causal": None, "padded": padding, "packed": packed_mask([[7, 13], [20]])}
    for label, mask in masks.items():
        if name == "gpt-alibi" and label == "packed":
            continue
        with torch.no_grad():
            expected, got = eager(ids, attention_mask=mask), other(ids, attention_mask=mask)
        keep = slice(None) if label != "padded" else (slice(None), slice(5, None))  # padded queries' outputs are ignored
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5, msg=f"{name} {backend} {label}")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backend_decodes_with_a_kv_cache_like_eager(backend: str) -> None:
    from lmforge.generation import generate

    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = generate(model_with("llama-gqa", "eager"), prompt, max_new_tokens=8)
    assert torch.equal(generate(model_with("llama-gqa", backend), prompt, max_new_tokens=8), expected)


def test_flex_training_gradients_match_eager() -> None:
    """On CPU (no flex backward in torch 2.13) a training step falls back to SDPA with the same mask; on CUDA flex runs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager, flex = model_with("llama-gqa", "eager").train().to(device), model_with("llama-gqa", "flex").train().to(device)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3)).to(device)
    mask = packed_mask([[5, 11], [9, 7]]).to(device)
    for model in (eager, flex):
        model(ids, attention_mask=mask).square().mean().backward()
    for (key, p), (_, q) in zip(eager.named_parameters(), flex.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=key)


def test_document_starts_recognises_block_diagonal_causal_masks_only() -> None:
    assert document_starts(packed_mask([[3, 2]])).tolist() == [[0, 0, 0, 3, 3]]
    padded = build_attention_mask(torch.tensor([[0, 1, 1, 1, 1]]), 5, torch.device("cpu"))
    assert document_starts(padded).tolist() == [[0, 1, 1, 1, 1]]  # a left pad attends to itself only: a 1-token document
    window = build_attention_mask(None, 5, torch.device("cpu"), sliding_window=2)
    assert document_starts(window) is None  # not expressible as documents: flash_attn falls back to SDPA


def test_flex_refuses_attention_dropout_and_flash_attn_says_how_to_install() -> None:
    with pytest.raises(ConfigError, match="model.attn_backend: flex has no attention dropout.*Fix: set model.dropout=0.0"):
        build({"family": "llama", "vocab_size": 61, "n_layer": 1, "n_head": 4, "n_embd": 32, "attn_backend": "flex", "dropout": 0.1})
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        q = torch.randn(1, 2, 4, 8)
        with pytest.raises(ConfigError, match="flash_attn needs the flash-attn package.*pip install flash-attn"):
            attend("flash_attn", q, q, q, None)


@pytest.mark.gpu
def test_flash_attn_matches_sdpa_on_cuda_for_causal_and_packed() -> None:
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = (torch.randn(2, 4, 32, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for mask in (None, packed_mask([[10, 22], [32]]).cuda()):
        expected = attend("sdpa", q, k, v, mask)
        torch.testing.assert_close(attend("flash_attn", q, k, v, mask), expected, atol=2e-2, rtol=2e-2)
