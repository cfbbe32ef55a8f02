"""Bad configs fail before any work starts, in-process, with the key, the bad value and the fix.

Each case composes the real `conf/` tree with Hydra's compose API and runs `lmforge.preflight` (what
train.py runs before importing Lightning or reading data), so the whole table runs in about a second.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir

from lmforge.errors import LmforgeError
from lmforge.preflight import preflight

CASES = {
    "n_kv_head not dividing n_head": (["model.n_kv_head=3"], "model.n_kv_head: n_kv_head=3 does not divide n_head=4"),
    "n_embd not divisible by n_head": (["model.n_embd=130"], "model.n_embd: n_embd=130 is not divisible by n_head=4"),
    "odd RoPE head dim": (["model.n_embd=100"], "model.n_embd: head_dim=25 is odd"),
    "block_size above max_seq_len": (["data.block_size=512"], "data.block_size: 512 exceeds model.max_seq_len=256"),
    "objective that cannot train the family": (["model=bert-tiny"], "objective: clm cannot train model.family=bert"),
    "mlm on a decoder": (["objective=mlm"], "objective: mlm cannot train model.family=llama"),
    "unknown model key": (["+model.n_layers=3"], "model.n_layers: unknown key"),
    "wrong type for a model key": (["model.n_layer=two"], "model.n_layer"),
    "negative layer count": (["model.n_layer=-1"], "model.n_layer"),
    "deepspeed on a CPU machine": (["strategy=deepspeed_zero2"], "strategy: Lightning's DeepSpeedStrategy needs CUDA GPUs"),
    "deepspeed offload on a CPU machine": (["strategy=deepspeed_zero3_offload"], "strategy: Lightning's DeepSpeedStrategy needs CUDA GPUs"),
    "fp16 on CPU": (["trainer.precision=16-mixed"], "trainer.precision: 16-mixed needs a CUDA GPU"),
    "misspelled precision": (["trainer.precision=bf16-mixd"], "trainer.precision: 'bf16-mixd' is not a Lightning precision"),
    "gpu accelerator without a GPU": (["trainer.accelerator=gpu"], "trainer.accelerator: gpu but no CUDA GPU is visible"),
    "dpo on raw text": (["stage=dpo"], "data: PackedTextDataModule cannot feed stage DPOStage. Fix: use data=pref_shakespeare"),
    "reward model on raw text": (["stage=reward"], "data: PackedTextDataModule cannot feed stage RewardStage"),
    "grpo without prompts": (["stage=grpo", "data=sft_shakespeare"], "data: SFTDataModule cannot feed stage GRPOStage"),
    "pretraining on preference pairs": (["data=pref_shakespeare"], "data: PreferenceDataModule cannot feed stage PretrainStage"),
    "sliding window not positive": (["model.sliding_window=0"], "model.sliding_window"),
    "unknown rope scaling": (["+model.rope_scaling={type: cubic, factor: 2.0}"], "model.rope_scaling"),
    # typed schema (lmforge.config_schema): keys and value types read from each `_target_`'s signature.
    # `+key=...` stands for a typo in a YAML file (experiment, local config): Hydra refuses a plain `key=...`.
    "misspelled trainer key": (["+trainer.max_stpes=10"],
                               "trainer.max_stpes: unknown key (value 10): lightning.pytorch.Trainer has no parameter "
                               "'max_stpes'. Fix: did you mean `trainer.max_steps`?"),
    "misspelled data key": (["+data.bloc_size=32"], "data.bloc_size: unknown key (value 32): "
                            "lmforge.data.datamodule.PackedTextDataModule has no parameter 'bloc_size'. Fix: did you mean `data.block_size`?"),
    "misspelled optimizer key": (["+optimizer.weight_decy=0.1"], "optimizer.weight_decy: unknown key (value 0.1): "
                                 "lmforge.optim.adamw.AdamW has no parameter 'weight_decy'. Fix: did you mean `optimizer.weight_decay`?"),
    "string for an int": (["trainer.max_steps=abc"],
                          "trainer.max_steps: 'abc' is not an int (Trainer declares max_steps: int). Fix: set trainer.max_steps to an int"),
    "float for an int": (["data.batch_size=1.5"], "data.batch_size: 1.5 is not an int"),
    "int for a bool": (["trainer.enable_model_summary=1"], "trainer.enable_model_summary: 1 is not true or false or null"),
    "one beta for two": (["optimizer.betas=[0.9]"], "optimizer.betas: [0.9] is not a list of 2 items"),
    "misspelled callback key": (["+callbacks.checkpoint.save_top=2"], "callbacks.checkpoint.save_top: unknown key (value 2): "
                                "lightning.pytorch.callbacks.ModelCheckpoint has no parameter 'save_top'. "
                                "Fix: did you mean `callbacks.checkpoint.save_top_k`?"),
    "misspelled logger key": (["+logger.csv.nme=x"], "logger.csv.nme: unknown key (value 'x')"),
    "misspelled stage key": (["+stage.max_skiped_steps=3"], "stage.max_skiped_steps: unknown key (value 3): "
                             "lmforge.stages.pretrain.PretrainStage has no parameter 'max_skiped_steps'. "
                             "Fix: did you mean `stage.max_skipped_steps`?"),
    "misspelled key of a subclass stage": (["stage=dpo", "data=pref_shakespeare", "+stage.bta=0.2"], "stage.bta: unknown key "
                                           "(value 0.2): lmforge.stages.dpo.DPOStage has no parameter 'bta'. Fix: did you mean `stage.beta`?"),
    "misspelled objective target": (["objective._target_=lmforge.objectives.clm.CausalLMM"],
                                    "objective._target_: 'lmforge.objectives.clm.CausalLMM' does not exist: lmforge.objectives.clm "
                                    "has no 'CausalLMM'. Fix: did you mean `lmforge.objectives.clm.CausalLM`?"),
    "misspelled cleaning step": (["data=text_files", "data.corpus.train_glob=x", "+data.clean.min_char=3"],
                                 "data.clean.min_char: unknown key (value 3): lmforge.data.clean.CleanConfig has no parameter "
                                 "'min_char'. Fix: did you mean `data.clean.min_chars`?"),
    "misspelled lora key": (["peft=lora", "+peft.rr=4"], "peft.rr: unknown key (value 4) for peft.method=lora. Fix: did you mean `peft.r`?"),
    "tensor parallel on an encoder": (["strategy=fsdp_tp", "model=bert-tiny", "objective=mlm"],
                                      "strategy.tensor_parallel_size: tensor parallelism has plans for the decoder families"),
    "tensor parallel with an adapter after a projection": (["strategy=fsdp_tp", "peft=adapter", "peft.targets=[q_proj]"],
                                                           "peft.targets: ['q_proj'] under tensor parallelism"),
    "tensor parallel not dividing the kv heads": (["strategy=fsdp_tp", "strategy.tensor_parallel_size=3"], "strategy.tensor_parallel_size: 3 does not divide"),
    "several nodes without a cluster job": (["trainer.num_nodes=2"], "trainer.num_nodes: 2 nodes, but no cluster job started this "
                                            "process"),
    "data parallel size not the world size": (["strategy=fsdp", "trainer.devices=2", "strategy.data_parallel_size=4"],
                                              "strategy.data_parallel_size: 4 x tensor_parallel_size 1 is not the world size, "
                                              "trainer.devices x num_nodes = 2. Fix: leave strategy.data_parallel_size=auto"),
    "fp16 loss scaling under fsdp": (["strategy=fsdp", "trainer.precision=16-mixed"], "trainer.precision: 16-mixed is not supported by strategy=fsdp"),
    "misspelled deepspeed key": (["strategy=deepspeed_zero2", "+strategy.offload_optimzer=true"],
                                 "lmforge.parallel.zero.ZeroStrategy has no parameter 'offload_optimzer'. "
                                 "Fix: did you mean `strategy.offload_optimizer`?"),
    "sequence parallel with an uneven block": (["strategy=fsdp_tp", "strategy.sequence_parallel=true", "callbacks.samples=null",
                                                "data.block_size=63"],
                                               "strategy.sequence_parallel: needs data.block_size (63) to be a multiple of tensor_parallel_size=2"),
    "sequence parallel with sample generation": (["strategy=fsdp_tp", "strategy.sequence_parallel=true"],
                                                 "strategy.sequence_parallel: callbacks.samples generates text"),
    "async checkpoints with per-save W&B uploads": (["strategy=fsdp", "strategy.async_save=true", "logger=wandb", "logger.wandb.log_model=all"],
                                                    "logger.wandb.log_model: 'all' uploads each checkpoint as it is saved"),
    "async DDP checkpoints with per-save W&B uploads": (["strategy=ddp", "strategy.async_save=true", "logger=wandb", "logger.wandb.log_model=all"],
                                                        "logger.wandb.log_model: 'all' uploads each checkpoint as it is saved"),
    "async checkpoints under strategy=auto": (["+strategy.async_save=true"], "strategy.async_save: strategy=auto writes its checkpoints synchronously"),
    "async checkpoints into one consolidated file": (["strategy=fsdp", "strategy.async_save=true", "strategy.save_distributed_checkpoint=false"],
                                                     "strategy.async_save: needs sharded checkpoints"),
    "misspelled ddp key": (["strategy=ddp", "+strategy.find_unused_parametrs=true"],  # a DistributedDataParallel argument
                           "did you mean `strategy.find_unused_parameters`?"),
    "misspelled fsdp key": (["strategy=fsdp", "+strategy.reshard_after_fwd=false"], "did you mean `strategy.reshard_after_forward`?"),
    "unknown activation checkpointing policy": (["stage.activation_checkpointing=everything"],
                                                "stage.activation_checkpointing: must be none, full, selective or an integer >= 0"),
    "flash_attn without its package": (["model.attn_backend=flash_attn"], "model.attn_backend: flash_attn needs the flash-attn package"),
    "misspelled top-level key": (["+sed=1"], "sed: unknown key (value 1): the top level of the config has no parameter 'sed'. "
                                 "Fix: did you mean `seed`?"),
}


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_config_fails_in_preflight_with_key_and_fix(name: str, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # CI has no GPU; a dev box with one gets the same answer
    if name == "flash_attn without its package" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    overrides, expected = CASES[name]
    cfg = composed(overrides)
    with pytest.raises(LmforgeError) as info:
        preflight(cfg)
    assert expected in str(info.value)
    assert "Fix:" in str(info.value)


def test_misspelled_override_key_is_refused_by_hydra_before_any_import():
    """A typo'd key on the command line never reaches lmforge: Hydra's struct mode refuses it."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_stpes"):
        composed(["trainer.max_stpes=10"])


def test_async_checkpoints_with_a_copied_last_checkpoint_get_a_hint(caplog):
    """best.ckpt then last.ckpt at the same step: the second background save waits for the first."""
    with caplog.at_level("WARNING", logger="lmforge"):
        preflight(composed(["strategy=fsdp", "strategy.async_save=true"]))
    assert "callbacks.checkpoint.save_last=link" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmforge"):
        preflight(composed(["strategy=fsdp", "strategy.async_save=true", "callbacks.checkpoint.save_last=link"]))
    assert "save_last" not in caplog.text


def test_default_config_passes_preflight():
    preflight(composed([]))


@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [("model.n_kv_head=3", "error: model.n_kv_head"),
                                               ("+trainer.max_stpes=10", "error: trainer.max_stpes: unknown key")])
def test_cli_config_error_does_not_import_lightning(tmp_path, override, expected):
    """The CLI path: a bad config exits 2 with one line, and Lightning (7 s of imports here) is never loaded:
    the schema reads Trainer's signature from its source (~3 s in all on 2 busy cores, torch's import most of it)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train.py"), override, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert expected in proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not any(name == "lightning" or name.startswith("lightning.") for name in imported)
