"""PEFT (lmforge.peft) on tiny GPT / Llama models, fp32: only the PEFT parameters train (exact counts, base
tensors bit-identical after a step), LoRA starts as the base and equals a hand computation, the merged model
gives base+LoRA's logits with the base's keys, `adapters_disabled` is the base, adapters start as the
identity, prefix tuning respects padding and the KV cache (generation), adapter files round-trip, and bad
configs fail with the key and the fix."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.generation import generate
from lmforge.generation.state import positions_from_mask
from lmforge.models import build
from lmforge.models.heads import ScalarHeadModel
from lmforge.peft import (
    adapters_disabled,
    apply_peft,
    load_adapter,
    load_trainable_state_dict,
    merge_peft,
    remove_peft,
    save_adapter,
    trainable_parameters,
    trainable_state_dict,
)

pytest.importorskip("peft")

VOCAB = 53
GPT = {"family": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 32, "init_std": 0.2}
LLAMA = GPT | {"family": "llama", "n_kv_head": 2, "intermediate_size": 48}
MODELS = {"gpt": GPT | {"vocab_size": VOCAB}, "llama": LLAMA | {"vocab_size": VOCAB}}
LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["attention"], "bias": "none"}
ADAPTER = {"method": "adapter", "bottleneck": 8, "targets": ["mlp", "attention"], "activation": "gelu"}
PREFIX = {"method": "prefix", "num_virtual_tokens": 3, "reparameterize": True, "hidden": 16}
CFGS = {"lora": LORA, "adapter": ADAPTER, "prefix": PREFIX}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: on a shared 2-core machine OpenMP hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build(MODELS[family] | overrides).eval()


def ids(B: int = 2, T: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on a random loss (weight decay 0: a zero gradient leaves a parameter alone)."""
    opt = torch.optim.AdamW(list(trainable_parameters(model)), lr=lr, weight_decay=0.0)
    x = ids(seed=7)
    for _ in range(steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), ids(seed=8).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def base_key(name: str) -> str:
    """The base model's name of a (possibly LoRA-wrapped) parameter."""
    return name.replace(".base_layer.", ".")


# --- LoRA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_lora_trains_only_its_parameters(family: str, caplog: pytest.LogCaptureFixture) -> None:
    model = make(family)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_total = sum(t.numel() for t in base.values())
    x = ids()
    with torch.no_grad():
        base_logits = model(x)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attn." in n]
    expected = sum(4 * (m.in_features + m.out_features) for _, m in targets)
    with caplog.at_level(logging.INFO, logger="lmforge"):
        report = apply_peft(model, LORA)
    assert report.method == "lora"
    assert report.trainable_params == expected
    assert report.total_params == base_total + expected
    assert report.trainable_pct == pytest.approx(100.0 * expected / (base_total + expected), abs=0)
    assert f"{expected:,} of {base_total + expected:,} parameters train" in caplog.text
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sorted(trainable_state_dict(model)) == sorted(trainable)
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)  # B = 0: LoRA starts as the base model exactly

    train_steps(model)
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, torch.zeros_like(p)), name
        else:
            assert torch.equal(p, base[base_key(name)]), f"base tensor {name} changed"
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_lora_layer_equals_hand_computation() -> None:
    model = make("gpt")
    apply_peft(model, LORA | {"target_modules": ["blocks.0.attn.qkv"]})
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 32)
    expected = x @ W.T + b + (8 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "blocks.0.attn.qkv.lora_A.default.weight",
        "blocks.0.attn.qkv.lora_B.default.weight",
    ]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_lora_merge_equals_base_plus_adapter(family: str) -> None:
    model = make(family)
    base_keys = list(model.state_dict())
    apply_peft(model, LORA | {"target_modules": ["all-linear"], "dropout": 0.1})
    model.train()
    train_steps(model)
    model.eval()  # dropout off: the merged model has no dropout on the LoRA path
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        with adapters_disabled(model):
            base_logits = model(x)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merged = merge_peft(model)
    assert list(merged.state_dict()) == base_keys
    assert all(p.requires_grad for p in merged.parameters())
    assert not any("lora" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)
    fresh = build(MODELS[family]).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_adapters_disabled_is_the_base(method: str) -> None:
    model = make("llama")
    x = ids()
    with torch.no_grad():
        base_logits = model(x)
    apply_peft(model, CFGS[method])
    for p in trainable_parameters(model):  # move every PEFT parameter away from its start
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(x)
        with adapters_disabled(model):
            torch.testing.assert_close(model(x), base_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not torch.allclose(adapted, base_logits, atol=1e-3)


# --- bottleneck adapters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_adapter_starts_as_identity_and_trains(family: str) -> None:
    model = make(family)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    with torch.no_grad():
        base_logits = model(x)
    report = apply_peft(model, ADAPTER)
    d, b, L = 32, 8, 2  # width, bottleneck, layers; two adapters (attn, mlp) per layer, with biases
    assert report.trainable_params == 2 * L * (d * b + b + b * d + d)
    names = sorted(trainable_state_dict(model))
    assert names[0] == "blocks.0.attn.adapter.down.bias" and all(".adapter." in n for n in names)
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)
    train_steps(model)
    for k, v in model.state_dict().items():
        if ".adapter." not in k:
            assert torch.equal(v, base_sd[k]), k
    with torch.no_grad():
        assert not torch.allclose(model(x), base_logits, atol=1e-4)
    reference = copy.deepcopy(model)  # a deep copy hooks its own adapters
    with torch.no_grad():
        before = reference(x)
        model.blocks[0].mlp.adapter.up.weight.add_(1.0)
        torch.testing.assert_close(reference(x), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_peft(model)
    remove_peft(model)
    assert list(model.state_dict()) == list(base_sd)
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)


# --- prefix tuning -----------------------------------------------------------------------------------------
PREFIX_MODELS = {
    "gpt": ("gpt", {}),
    "gpt-alibi-eager": ("gpt", {"position": "alibi", "attn_backend": "eager"}),
    "llama": ("llama", {}),
    "mistral-window": ("llama", {"sliding_window": 4}),
}


@pytest.mark.parametrize("variant", list(PREFIX_MODELS))
def test_prefix_padding_cache_and_generate(variant: str) -> None:
    family, overrides = PREFIX_MODELS[variant]
    model = make(family, **overrides)
    x = ids(3, 8)
    with torch.no_grad():
        base_logits = model(x)
    report = apply_peft(model, PREFIX | {"reparameterize": variant != "llama"})
    assert all(n.startswith("prefix_encoder.") for n in trainable_state_dict(model))
    assert report.trainable_params == sum(p.numel() for p in model.prefix_encoder.parameters())
    with torch.no_grad():
        full = model(x)
        assert not torch.allclose(full, base_logits, atol=1e-3)

        # left padding: each row of the padded batch equals that row alone
        lengths = [8, 5, 2]
        mask = torch.zeros(3, 8, dtype=torch.long)
        for r, n in enumerate(lengths):
            mask[r, 8 - n :] = 1
        padded = model(x, attention_mask=mask, position_ids=positions_from_mask(mask))
        for r, n in enumerate(lengths):
            alone = model(x[r : r + 1, 8 - n :])
            torch.testing.assert_close(padded[r, 8 - n :], alone[0], atol=1e-5, rtol=0)

        # KV cache: chunk by chunk (prompt, single steps, a multi-token step) equals one forward
        cache = model.make_cache(3, 16)
        parts, start = [], 0
        for size in (4, 1, 2, 1):
            parts.append(model(x[:, start : start + size], cache=cache))
            start += size
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)

        # causal: changing the last token changes no earlier logit (the prefix does not leak the future)
        changed = x.clone()
        changed[:, -1] = (changed[:, -1] + 1) % VOCAB
        torch.testing.assert_close(model(changed)[:, :-1], full[:, :-1], atol=1e-6, rtol=0)

    # generation: cached = uncached, and a left-padded batch = each row alone
    prompt_mask = mask[:, -5:]
    out = generate(model, x[:, :5], max_new_tokens=6, attention_mask=prompt_mask)
    assert torch.equal(
        out, generate(model, x[:, :5], max_new_tokens=6, attention_mask=prompt_mask, use_cache=False)
    )
    for r, n in enumerate(min(n, 5) for n in lengths):
        alone = generate(model, x[r : r + 1, 5 - n : 5], max_new_tokens=6)
        assert torch.equal(out[r : r + 1, 5 - n :], alone)
    with adapters_disabled(model):
        base_out = generate(model, x[:, :5], max_new_tokens=6)
    base = make(family, **overrides)
    assert torch.equal(base_out, generate(base, x[:, :5], max_new_tokens=6))


def test_prefix_trains_only_the_prefix_and_refuses_encoders() -> None:
    model = make("gpt")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, PREFIX | {"reparameterize": False})
    train_steps(model)
    for k, v in model.state_dict().items():
        if not k.startswith("prefix_encoder."):
            assert torch.equal(v, base_sd[k]), k
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_peft(model)
    bert = build(
        {"family": "bert", "n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": VOCAB, "max_seq_len": 16}
    )
    with pytest.raises(ConfigError, match="peft.method: prefix tuning supports decoder families"):
        apply_peft(bert, PREFIX)


def test_scalar_head_trains_with_any_method() -> None:
    """A reward model's zero-initialised head must train next to the adapter (default modules_to_save)."""
    model = ScalarHeadModel(make("llama"))
    apply_peft(model, LORA)
    saved = [n for n in trainable_state_dict(model) if ".lora_" not in n]
    assert saved == ["head.weight", "head.bias"]
    keys = list(ScalarHeadModel(make("llama")).state_dict())
    assert list(merge_peft(model).state_dict()) == keys
    frozen_head = ScalarHeadModel(make("llama"))
    apply_peft(frozen_head, PREFIX | {"modules_to_save": []})
    assert all(n.startswith("prefix_encoder.") for n in trainable_state_dict(frozen_head))


# --- adapter files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_save_load_adapter_round_trip(method: str, tmp_path) -> None:
    model = make("llama")
    apply_peft(model, CFGS[method])
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.3 * torch.randn_like(p))
        expected = model(ids())
    path = save_adapter(model, tmp_path / "checkpoints" / "adapter.safetensors", CFGS[method])
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    from safetensors.torch import load_file

    assert sorted(load_file(str(path))) == sorted(trainable_state_dict(model))

    fresh = make("llama")  # the same base weights, no PEFT yet: load_adapter applies the saved config
    assert load_adapter(fresh, path)["method"] == method
    with torch.no_grad():
        assert torch.equal(fresh(ids()), expected)
    sd = trainable_state_dict(fresh)
    extra = dict(sd) | {"blocks.0.nope": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected"):
        load_trainable_state_dict(fresh, extra)
    with pytest.raises(CheckpointError, match="missing"):
        load_trainable_state_dict(fresh, dict(list(sd.items())[1:]))


# --- configs -----------------------------------------------------------------------------------------------
def test_config_errors_and_none() -> None:
    model = make("gpt")
    with pytest.raises(
        ConfigError, match=r"peft\.target_modules: pattern 'q_proj' matches no Linear.*blocks\.<i>\.attn\.qkv"
    ):
        apply_peft(model, LORA | {"target_modules": ["q_proj"]})
    assert all(p.requires_grad for p in model.parameters())  # a config error leaves the model untouched
    with pytest.raises(ConfigError, match=r"peft\.lr"):
        apply_peft(make("gpt"), LORA | {"lr": 1})
    with pytest.raises(ConfigError, match=r"peft\.method"):
        apply_peft(make("gpt"), {"method": "ia3"})
    with pytest.raises(ConfigError, match="tied"):
        apply_peft(make("gpt"), LORA | {"target_modules": ["lm_head"]})
    with pytest.raises(ConfigError, match=r"peft\.r"):
        apply_peft(make("gpt"), LORA | {"r": 0})
    fresh = make("gpt")
    for cfg in (None, {"method": "none"}):
        report = apply_peft(fresh, cfg)
        assert report.trainable_params == report.total_params and report.trainable_pct == 100.0
    # suffixes and regexes select by name
    llama = make("llama")
    apply_peft(llama, LORA | {"target_modules": ["q_proj", r"blocks\.1\.mlp\..*"]})
    wrapped = sorted({n.split(".lora_")[0] for n in trainable_state_dict(llama)})
    assert wrapped == [
        "blocks.0.attn.q_proj",
        "blocks.1.attn.q_proj",
        "blocks.1.mlp.down_proj",
        "blocks.1.mlp.gate_proj",
        "blocks.1.mlp.up_proj",
    ]


def test_missing_peft_library_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    model = make("gpt")
    with pytest.raises(ImportError, match=r"pip install peft \(or pip install 'lmforge\[peft\]'\)"):
        apply_peft(model, LORA)
    assert all(p.requires_grad for p in model.parameters())
