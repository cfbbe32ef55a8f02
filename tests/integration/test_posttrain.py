"""The post-training chain end to end on CPU: pretrain → SFT (full and LoRA) → reward model / DPO → GRPO / PPO.

Each step starts from the previous one's checkpoint with `init_from`, as a user chains them. Runs are tiny
(a few steps, byte tokenizer, capped examples) and in-process: this checks the wiring, metric names and
checkpoints; the quality claims (reward accuracy, DPO margins, RL reward gains) are README runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import train_in_process

from lmforge.checkpoint import load_checkpoint, model_state_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import build

pytestmark = pytest.mark.slow

FAST = ["debug=fast", "tokenizer=byte", "callbacks.progress_bar=null", "callbacks.samples=null", "logger=csv"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """Pretrain and SFT once for the module; later steps start from these checkpoints."""
    root = tmp_path_factory.mktemp("chain")
    common = [*FAST, f"paths.cache_dir={cache_dir}"]
    train_in_process([*common, "trainer.max_steps=4"], root / "pre")
    pre = root / "pre" / "checkpoints" / "last.ckpt"
    sft_metrics = train_in_process(
        [*common, "stage=sft", "data=sft_shakespeare", "data.max_examples=64", "data.batch_size=8", f"init_from={pre}"], root / "sft"
    )
    assert "val/loss" in sft_metrics
    return {"root": root, "pre": pre, "sft": root / "sft" / "checkpoints" / "last.ckpt", "common": common}  # type: ignore[dict-item]


def test_sft_adds_chatml_tokens_and_grows_the_vocab(chain):
    pre, sft = load_checkpoint(chain["pre"]), load_checkpoint(chain["sft"])
    tok = Tokenizer.from_json(sft["lmforge"]["tokenizer"])
    assert tok.hf.token_to_id("<|im_start|>") is not None and tok.hf.token_to_id("<|im_end|>") is not None
    old, new = pre["lmforge"]["config"]["model"]["vocab_size"], sft["lmforge"]["config"]["model"]["vocab_size"]
    assert new == tok.vocab_size > old
    weights = model_state_dict(sft)
    assert weights["wte.weight"].shape[0] == new


def test_reward_model_logs_accuracy_and_scores_with_its_head(chain, tmp_path):
    metrics = train_in_process(
        [*chain["common"], "stage=reward", "data=pref_shakespeare", "data.max_examples=64", "data.batch_size=8", f"init_from={chain['sft']}"], tmp_path
    )
    assert {"val/loss", "val/reward/accuracy", "val/reward/margin"} <= set(metrics)
    assert 0.0 <= metrics["val/reward/accuracy"] <= 1.0
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "reward/accuracy" in rows and "model/trainable_pct" in rows
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["lmforge"]["stage"] == "RewardStage" and "model.head.weight" in ckpt["state_dict"]


def test_dpo_starts_at_log2_with_the_reference_equal_to_the_policy(chain, tmp_path):
    metrics = train_in_process(
        [*chain["common"], "stage=dpo", "data=pref_shakespeare", "data.max_examples=64", "data.batch_size=8",
         f"init_from={chain['sft']}", "trainer.max_steps=1", "trainer.val_check_interval=1", "scheduler=constant", "optimizer.lr=1e-12", "validate_full_at_end=false"],
        tmp_path,
    )
    # at lr ~0 the policy is its reference: every implicit reward is 0 and the sigmoid loss is log 2
    assert metrics["val/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    assert metrics["val/dpo/margin"] == pytest.approx(0.0, abs=1e-4)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert any(k.startswith("reference.") for k in ckpt["state_dict"])  # the reference survives a resume


def test_lora_sft_trains_only_adapters_and_its_checkpoint_merges(chain, tmp_path):
    train_in_process(
        [*chain["common"], "stage=sft", "data=sft_shakespeare", "data.max_examples=64", "data.batch_size=8",
         f"init_from={chain['sft']}", "peft=lora", "peft.r=4"], tmp_path
    )
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["lmforge"]["peft"]["method"] == "lora"
    base = model_state_dict(load_checkpoint(chain["sft"]))
    merged = model_state_dict(ckpt)  # LoRA folded into the base weights, original keys
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(".attn." in k for k in changed)  # peft.target_modules=[attention]: nothing else moved
    model = build(dict(ckpt["lmforge"]["config"]["model"]))
    model.load_state_dict(merged, strict=True)
    assert (tmp_path / "checkpoints" / "adapter.safetensors").is_file()
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "model/trainable_pct" in rows


def test_grpo_samples_groups_and_logs_rl_metrics(chain, tmp_path):
    metrics = train_in_process(
        [*chain["common"], "stage=grpo", "data=prompts_shakespeare", "data.max_examples=16", "data.batch_size=2",
         "data.val_batch_size=8", "stage.num_generations=4", "stage.max_new_tokens=8", "stage.reward=length",
         "stage.beta=0.04", f"init_from={chain['sft']}", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"],
        tmp_path,
    )
    assert {"val/reward_mean", "val/completion_len"} <= set(metrics)
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in ("rl/reward_mean", "rl/kl", "rl/clipfrac", "rl/entropy", "train/loss"):
        assert name in header


def test_ppo_with_a_reward_model_checkpoint(chain, tmp_path):
    rm_dir = tmp_path / "rm"
    train_in_process(
        [*chain["common"], "stage=reward", "data=pref_shakespeare", "data.max_examples=32", "data.batch_size=8",
         f"init_from={chain['sft']}", "trainer.max_steps=2", "validate_full_at_end=false"], rm_dir
    )
    metrics = train_in_process(
        [*chain["common"], "stage=ppo", "data=prompts_shakespeare", "data.max_examples=16", "data.batch_size=4",
         "data.val_batch_size=8", "stage.max_new_tokens=8", f"stage.reward_model={rm_dir / 'checkpoints' / 'last.ckpt'}",
         f"init_from={chain['sft']}", "trainer.max_steps=4", "trainer.val_check_interval=1", "trainer.limit_val_batches=1"],
        tmp_path / "ppo",
    )
    assert "val/reward_mean" in metrics
    header = (tmp_path / "ppo" / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in ("rl/reward_mean", "rl/kl", "rl/clipfrac", "rl/value_loss", "rl/entropy"):
        assert name in header
    ckpt = load_checkpoint(tmp_path / "ppo" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("critic.") for k in ckpt["state_dict"]) and ckpt["lmforge"]["stage"] == "PPOStage"


def test_dpo_with_precomputed_reference_keeps_logps_not_weights(chain, tmp_path):
    metrics = train_in_process(
        [*chain["common"], "stage=dpo", "data=pref_shakespeare", "data.max_examples=32", "data.batch_size=8",
         f"init_from={chain['sft']}", "stage.precompute_reference=true", "trainer.max_steps=1", "trainer.val_check_interval=1",
         "scheduler=constant", "optimizer.lr=1e-12", "validate_full_at_end=false"],
        tmp_path,
    )
    assert metrics["val/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # looked-up logps = policy's
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert state["reference_train"].shape == (32, 2) and not torch.isnan(state["reference_train"]).any()
    assert not any(k.startswith("reference.") for k in state)  # no reference weights kept
