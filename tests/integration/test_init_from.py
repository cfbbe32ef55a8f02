"""`init_from=`: a new run starts from the weights (and architecture, tokenizer) of a checkpoint or HF dir.

Runs train.py's code path in-process (`train_in_process`) and scripts/convert_hf.py's `main`: the CLI's own
error formatting is covered by test_bad_input, and each subprocess would add ~5 s of imports. Seven 2-process
`strategy=fsdp` runs (~15 s each) check the sharded path, weights read on rank 0 and broadcast into the shards: DPO three
ways, then stage=reward and PPO each built on meta and whole.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import load_script, train_in_process

from lmforge.checkpoint import load_checkpoint, model_state_dict
from lmforge.errors import CheckpointError

pytestmark = pytest.mark.slow


def common(cache_dir: Path, logs: Path) -> list[str]:
    return [f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}", "callbacks.progress_bar=null", "callbacks.samples=null"]


@pytest.fixture(scope="module")
def source(cache_dir, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("init_logs")
    run_dir = logs / "debug" / "runs" / "src"
    train_in_process(["debug=fast", "trainer.max_steps=3", *common(cache_dir, logs)], run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def frozen_run(cache_dir: Path, tmp_path: Path, init_from: Path) -> dict[str, torch.Tensor]:
    """Train with lr=0 (AdamW then changes nothing, decay included): the end weights are the start weights."""
    run_dir = tmp_path / "run"
    train_in_process(["debug=fast", "trainer.max_steps=2", "model=gpt-micro",  # model group is replaced by the source's
                      "optimizer.lr=0", "scheduler=constant", f"init_from={init_from}", *common(cache_dir, tmp_path)], run_dir)
    return model_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"))


def convert_hf(*args: str) -> int:
    return load_script("convert_hf").main(list(args))


def test_init_from_lmforge_checkpoint_starts_from_its_weights(cache_dir, tmp_path, source):
    start = model_state_dict(load_checkpoint(source))
    end = frozen_run(cache_dir, tmp_path, source)
    assert start.keys() == end.keys()
    for k in start:
        assert torch.equal(start[k], end[k]), k


def test_hf_export_import_round_trip_and_init_from_hf_dir(cli, cache_dir, tmp_path, source):
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported.ckpt"
    assert convert_hf("--ckpt", str(source), "--out", str(hf_dir)) == 0
    assert convert_hf("--hf", str(hf_dir), "--out", str(imported)) == 0
    start = model_state_dict(load_checkpoint(source))
    back = model_state_dict(load_checkpoint(imported))
    for k in start:
        assert torch.equal(start[k], back[k]), k
    end = frozen_run(cache_dir, tmp_path / "from_hf", hf_dir)
    for k in start:
        assert torch.equal(start[k], end[k]), k
    proc = cli("generate.py", f"ckpt_path={imported}", "max_new_tokens=5", "temperature=0", f"hydra.run.dir={tmp_path / 'gen'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ROMEO" in proc.stdout or "--- sample 0 ---" in proc.stdout


def test_init_from_missing_path_names_the_key(cache_dir, tmp_path):
    with pytest.raises(CheckpointError, match="init_from='/nonexistent/model' does not exist"):
        train_in_process(["debug=fast", "init_from=/nonexistent/model", *common(cache_dir, tmp_path)], tmp_path / "run")


@pytest.mark.parametrize("peft", [[], ["stage.precompute_reference=true"], ["peft=lora", "peft.dropout=0"]],
                         ids=["reference_copy", "precomputed_reference", "lora"])
def test_init_from_under_fsdp_reads_on_rank_zero_and_follows_the_single_process_run(cli, cache_dir, tmp_path, source, peft):
    """A sharded run builds on the meta device and rank 0 alone reads the init_from weights, broadcast into every rank's
    shards (policy and DPO reference alike; the data's ChatML tokens grow the vocabulary on the way; under LoRA the
    adapters are those a whole build draws; with precomputed reference log-probs, the sharded policy computes them
    before its first step, no copy made): DPO then starts at log 2 (reference = policy) and follows the one-process
    run with the same global batch."""
    dpo = ["debug=fast", "stage=dpo", "data=pref_shakespeare", "data.max_examples=32", "trainer.max_steps=2",
           "trainer.precision=32-true", "trainer.deterministic=true", "seed=3", "logger=csv", f"init_from={source}",
           *peft, *common(cache_dir, tmp_path)]
    train_in_process([*dpo, "data.batch_size=8"], tmp_path / "single")
    proc = cli("train.py", *dpo, "data.batch_size=4", "strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
               f"hydra.run.dir={tmp_path / 'fsdp'}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'weights_broadcast'" in (tmp_path / "fsdp" / "train.log").read_text()

    def losses(run: Path) -> list[float]:
        with (run / "csv" / "metrics.csv").open() as fh:
            return [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]

    single, sharded = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(single) == len(sharded) == 2 and sharded == pytest.approx(single, abs=1e-5)
    assert sharded[0] == pytest.approx(math.log(2), abs=1e-6)


def test_reward_model_and_ppo_build_on_meta_like_a_whole_build_under_fsdp(cli, cache_dir, tmp_path, source):
    """The scalar heads drawn around init_from weights (stage=reward's model; with it, PPO's critic) and a reward model
    read from its own file (PPO's `stage.reward_model`, read once for it and the critic it starts) take the meta-device
    path: the same losses, reward and KL, bit for bit, as ranks that each build everything whole
    (`strategy.meta_init=false`)."""
    sharded = ["debug=fast", "trainer.precision=32-true", "trainer.deterministic=true", "seed=3", "logger=csv", f"init_from={source}",
               "strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=2", "validate_full_at_end=false",
               *common(cache_dir, tmp_path)]
    reward = [*sharded, "stage=reward", "data=pref_shakespeare", "data.max_examples=32", "data.batch_size=4"]
    rm = tmp_path / "reward_meta"
    ppo = [*sharded, "stage=ppo", "data=prompts_shakespeare", "data.max_examples=16", "data.batch_size=2", "data.val_batch_size=8",
           "stage.max_new_tokens=8", "trainer.limit_val_batches=1", f"stage.reward_model={rm / 'checkpoints' / 'last.ckpt'}"]
    rows = {}
    for name, args in (("reward", reward), ("ppo", ppo)):
        for meta in ("true", "false"):
            run = tmp_path / f"{name}_{'meta' if meta == 'true' else 'whole'}"
            proc = cli("train.py", *args, f"strategy.meta_init={meta}", f"hydra.run.dir={run}", timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            log = (run / "train.log").read_text()
            assert ("'weights_broadcast'" in log) == (meta == "true"), log[-2000:]
            with (run / "csv" / "metrics.csv").open() as fh:
                keys = ("train/loss", "rl/reward_mean", "rl/kl")
                rows[run.name] = [tuple(r.get(k) for k in keys) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert rows["reward_meta"] == rows["reward_whole"] and len(rows["reward_meta"]) == 2
    assert rows["ppo_meta"] == rows["ppo_whole"] and rows["ppo_meta"]
    assert "'built_on_meta': ['model', 'reference', 'reward_model', 'critic']" in (tmp_path / "ppo_meta" / "train.log").read_text()
    # tensors read on rank 0: the reward run reads init_from (N); PPO reads init_from (N) and the reward model's file once
    # (N + the head's weight and bias) for both the reward model and the critic
    read = {r: int(re.findall(r"'weights_broadcast': (\d+)", (tmp_path / r / "train.log").read_text())[-1]) for r in ("reward_meta", "ppo_meta")}
    assert read["ppo_meta"] == 2 * read["reward_meta"] + 2, read
