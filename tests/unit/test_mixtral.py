"""Mixtral: logits, loss and router losses against Hugging Face; MoE dispatch against a per-token reference;
expert-load bookkeeping; conversion round trips; config validation and presets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmforge.errors import ConfigError
from lmforge.interop.hf import config_from_hf, from_hf, load_hf, save_hf, to_hf
from lmforge.models import build, config_from
from lmforge.models.layers.moe import MoEMLP, route, routing_stats
from lmforge.models.mixtral import Mixtral, MixtralConfig

transformers = pytest.importorskip("transformers")
transformers.MixtralForCausalLM  # noqa: B018 - resolve the lazy import at collection
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

VOCAB = 151
SMALL = {
    "family": "mixtral", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "intermediate_size": 48,
    "max_seq_len": 64, "n_expert": 4, "n_expert_per_token": 2,
}


def hf_mixtral(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "num_local_experts": 4,
        "num_experts_per_tok": 2, "initializer_range": 0.1, "router_aux_loss_coef": 0.02,
        "bos_token_id": None, "eos_token_id": None, "attn_implementation": "eager",
    }
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**(kwargs | overrides))).float().eval()
    with torch.no_grad():  # HF unit-inits RMSNorm weights: randomise them so that a mis-mapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(batch: int = 3, T: int = 15, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@contextmanager
def router_logits_of(model: Mixtral) -> Iterator[list[torch.Tensor]]:
    """Collect each layer's router logits (N, E) during the forwards inside the block."""
    captured: list[torch.Tensor] = []
    hooks = [b.mlp.router.register_forward_hook(lambda m, i, o: captured.append(o)) for b in model.blocks]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def left_padding(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return mask


# --- parity with HF --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_experts_per_tok": 1, "num_key_value_heads": 1, "tie_word_embeddings": True},
        {"num_local_experts": 3, "num_experts_per_tok": 3, "num_key_value_heads": 4},
        {"sliding_window": 5},
    ],
    ids=["top2-gqa", "top1-mqa-tied", "all-experts-mha", "sliding-window"],
)
def test_logits_match_hf(overrides: dict, backend: str) -> None:
    hf = hf_mixtral(**overrides)
    ours = from_hf(hf).eval()
    for block in ours.blocks:
        block.attn.backend = backend
    for T, mask in ((15, False), (1, False), (13, True)):
        ids = tokens(T=T)
        m = left_padding(ids) if mask else None
        real = m.bool() if mask else torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            got, ref = ours(ids, attention_mask=m), hf(input_ids=ids, attention_mask=m).logits
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_router_losses_and_lm_loss_match_hf() -> None:
    hf = hf_mixtral()
    ours = from_hf(hf).eval()
    assert ours.config.router_aux_loss_coef == 0.02 and ours.config.router_z_loss_coef == 0.0
    ids = tokens(T=16)
    for mask in (None, left_padding(ids)):
        labels = ids.clone()
        if mask is not None:  # no loss on padding, nor on the first real token (predicted from a padded position)
            labels = labels.masked_fill((mask == 0) | (F.pad(mask[:, :-1], (1, 0), value=1) == 0), -100)
        with torch.no_grad(), router_logits_of(ours) as captured:
            out = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
            logits = ours(ids, attention_mask=mask)
        real = slice(None) if mask is None else mask.reshape(-1).bool()
        for mine, theirs in zip(captured, out.router_logits, strict=True):  # our router logits are HF's
            torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=0)
        ref_aux = load_balancing_loss_func(out.router_logits, 4, 2, mask)
        torch.testing.assert_close(out.aux_loss, ref_aux)
        torch.testing.assert_close(ours.moe_metrics["aux_loss"], ref_aux, atol=1e-6, rtol=0)
        # the same function on the same logits, bit for bit up to summation order
        aux, z, load = routing_stats(list(out.router_logits), 4, 2, mask)
        torch.testing.assert_close(aux, ref_aux, atol=1e-6, rtol=0)
        lse = torch.stack([torch.logsumexp(r, dim=-1) for r in out.router_logits])  # (layers, tokens)
        weights = torch.ones(ids.numel()) if mask is None else mask.reshape(-1).float()
        torch.testing.assert_close(z, (lse.pow(2) * weights).sum() / (2 * weights.sum()), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.moe_metrics["z_loss"], z, atol=1e-5, rtol=0)
        assert torch.equal(ours.moe_metrics["expert_load"], load)
        # HF's loss = CE + coef · aux; ours: CE over shifted logits + model.aux_loss
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        torch.testing.assert_close(ce + ours.aux_loss, out.loss, atol=1e-5, rtol=0)


def test_expert_load_counts_assignments() -> None:
    torch.manual_seed(0)
    model = build(SMALL, vocab_size=VOCAB).eval()
    ids = tokens(T=11)
    with torch.no_grad():
        model(ids)
        load = model.moe_metrics["expert_load"]
        assert load.shape == (4,) and load.dtype == torch.float32
        assert load.sum().item() == ids.numel() * 2 * 2  # tokens · k · layers
        mask = left_padding(ids)
        model(ids, attention_mask=mask)
        assert model.moe_metrics["expert_load"].sum().item() == mask.sum().item() * 2 * 2  # padding left out
    # and it is the histogram of the routed experts, recomputed from the router inputs
    with torch.no_grad(), router_logits_of(model) as captured:
        model(ids)
    experts = torch.cat([route(logits, 2)[1].reshape(-1) for logits in captured])
    assert torch.equal(model.moe_metrics["expert_load"], torch.bincount(experts, minlength=4).float())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dispatch_equals_per_token_reference(k: int) -> None:
    torch.manual_seed(0)
    moe = MoEMLP(n_embd=32, hidden=24, n_expert=5, n_expert_per_token=k)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 32)
    y = moe(x)
    flat = x.reshape(-1, 32)
    probs = (flat @ moe.router.weight.T).softmax(-1)
    ref = torch.zeros_like(flat)
    for t in range(flat.size(0)):  # the slow, obvious way: one token at a time
        top = probs[t].topk(k)
        for w, e in zip(top.values / top.values.sum(), top.indices):
            ref[t] += w * moe.experts[int(e)](flat[t])
    torch.testing.assert_close(y.reshape(-1, 32), ref, atol=1e-5, rtol=0)
    assert moe.router_logits.shape == (21, 5)
    # gradients reach the router (through the routing weights) and every used expert
    y.sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = set(probs.topk(k).indices.flatten().tolist())
    for e in used:
        assert moe.experts[e].gate_proj.weight.grad.abs().sum() > 0


def test_aux_loss_weights_and_gradient() -> None:
    torch.manual_seed(0)
    ids = tokens(T=9)
    off = build({**SMALL, "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0}, vocab_size=VOCAB)
    off(ids)
    assert off.aux_loss.item() == 0.0 and off.moe_metrics["aux_loss"] > 0
    model = build({**SMALL, "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001}, vocab_size=VOCAB)
    model(ids)
    m = model.moe_metrics
    torch.testing.assert_close(model.aux_loss.detach(), 0.01 * m["aux_loss"] + 0.001 * m["z_loss"])
    (grad,) = torch.autograd.grad(model.aux_loss, model.blocks[0].mlp.router.weight)
    assert grad.abs().sum() > 0
    assert all(b.mlp.router_logits is None for b in model.blocks)  # no graph kept past the forward


def test_param_counts() -> None:
    model = build(SMALL, vocab_size=VOCAB)
    per_expert = 3 * 64 * 48
    assert model.expert_params() == per_expert
    assert model.active_params() == model.num_params() - 2 * (4 - 2) * per_expert
    assert model.num_params(non_embedding=False) - model.num_params() == VOCAB * 64


# --- conversion --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "sliding_window": 6}])
def test_from_hf_to_hf_round_trip_is_bit_identical(overrides: dict) -> None:
    hf = hf_mixtral(**overrides)
    back = to_hf(from_hf(hf))
    assert type(back).__name__ == "MixtralForCausalLM"
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_hf_opens_with_auto_model_and_loads_back(tmp_path) -> None:
    ours = from_hf(hf_mixtral()).eval()
    out = save_hf(ours, None, tmp_path / "mixtral")
    auto = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(auto).__name__ == "MixtralForCausalLM"
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), auto(input_ids=ids).logits, atol=1e-5, rtol=0)
    loaded = load_hf(out)
    assert isinstance(loaded, Mixtral) and loaded.config == ours.config
    a, b = ours.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_configs_name_the_key() -> None:
    cfg = transformers.MixtralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, router_jitter_noise=0.1)
    with pytest.raises(ConfigError) as err:
        config_from_hf(cfg)
    assert err.value.key == "hf_config.router_jitter_noise"
    for bad, key in (
        ({"n_expert_per_token": 5}, "model.n_expert_per_token"),
        ({"n_expert": 0}, "model.n_expert"),
        ({"router_aux_loss_coef": -0.1}, "model.router_aux_loss_coef"),
        ({"n_kv_head": 3}, "model.n_kv_head"),
    ):
        with pytest.raises(ConfigError) as err:
            build({**SMALL, **bad}, vocab_size=VOCAB)
        assert err.value.key == key
    with pytest.raises(ConfigError, match="model.bias"):
        to_hf(build({**SMALL, "bias": True}, vocab_size=VOCAB))


# --- presets -----------------------------------------------------------------------------------------------
def test_presets_build(root) -> None:
    tiny = config_from(OmegaConf.load(root / "conf/model/mixtral-tiny.yaml"), vocab_size=512)
    assert isinstance(tiny, MixtralConfig)
    model = build(tiny)
    model(torch.randint(0, 512, (2, 16)))
    assert model.aux_loss is not None and model.moe_metrics["expert_load"].sum() == 2 * 16 * 2 * tiny.n_layer
    big = config_from(OmegaConf.load(root / "conf/model/mixtral-8x7b.yaml"), vocab_size=32000)
    with torch.device("meta"):
        model = build(big)
    assert model.num_params(non_embedding=False) == 46_702_792_704  # Mixtral-8x7B
    assert model.active_params(non_embedding=False) == 12_879_925_248  # the "12.9B active" figure
