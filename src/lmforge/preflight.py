"""Checks a composed config before any work starts: no data is read and Lightning is not imported.

A misconfigured run must fail in seconds with the key, the bad value and the fix, not after minutes of
tokenization or deep inside Lightning. Each check here is cross-group (no single group can make it) or
about the machine (CUDA-only strategies). `run.train` calls the same checks again after `init_from` has
replaced the model, so they hold for the architecture that actually trains.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from lmforge.config_schema import check_schema
from lmforge.errors import ConfigError
from lmforge.models import config_from
from lmforge.objectives import Objective
from lmforge.objectives.registry import objectives_for

log = logging.getLogger("lmforge")

# Which datamodules each stage can train on (by class name: the classes import Lightning, this module doesn't).
STAGE_DATA: dict[str, tuple[tuple[str, ...], str]] = {
    "PretrainStage": (("PackedTextDataModule",), "data=shakespeare (or text_files, hf_dataset, mixture)"),
    "SFTStage": (("SFTDataModule",), "data=sft_shakespeare, data=sft_jsonl or data=sft_hf"),
    "RewardStage": (("PreferenceDataModule",), "data=pref_shakespeare, data=pref_jsonl or data=pref_hf"),
    "DPOStage": (("PreferenceDataModule",), "data=pref_shakespeare, data=pref_jsonl or data=pref_hf"),
    "PPOStage": (("PromptDataModule",), "data=prompts_shakespeare, data=prompts_jsonl or data=prompts_hf"),
    "GRPOStage": (("PromptDataModule",), "data=prompts_shakespeare, data=prompts_jsonl or data=prompts_hf"),
}
CUDA_ONLY_STRATEGIES = ("DeepSpeedStrategy", "ZeroStrategy")  # lmforge.parallel.zero.ZeroStrategy subclasses the first
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")


def _class_name(node: Any) -> str:
    target = node.get("_target_", "") if isinstance(node, (dict, DictConfig)) else ""
    return str(target).rsplit(".", 1)[-1]


def build_objective(cfg: DictConfig) -> Objective:
    """Instantiate the objective and check it can train this model family (bert + clm is refused here)."""
    objective = instantiate(cfg.objective, _convert_="all")
    kind = config_from(cfg.model, vocab_size=cfg.model.get("vocab_size") or 1).kind
    if kind not in objective.supported_kinds:
        fits = objectives_for(kind)
        raise ConfigError(
            "objective",
            f"{objective.name} cannot train model.family={cfg.model.family} (model kind: {kind}; "
            f"{objective.name} trains: {' or '.join(objective.supported_kinds)})",
            f"use objective={' or objective='.join(fits)}" if fits else "choose another model family",
        )
    return objective


def check_config(cfg: DictConfig) -> Objective:
    """Model, objective and sequence-length checks; returns the objective (run.py binds it to the tokenizer)."""
    model_cfg = config_from(cfg.model, vocab_size=cfg.model.get("vocab_size") or 1)  # model errors before any data work
    objective = build_objective(cfg)
    block = cfg.data.get("block_size", cfg.data.get("max_length"))
    max_len = cfg.model.max_seq_len
    if block is not None:
        needed = objective.model_seq_len(block, model_cfg.kind)
        key = "data.block_size" if "block_size" in cfg.data else "data.max_length"
        if needed > max_len:
            what = f"{block}" if needed == block else f"{block} ({objective.name} feeds the model {needed} tokens)"
            raise ConfigError(key, f"{what} exceeds model.max_seq_len={max_len}", f"lower {key} or raise model.max_seq_len to >= {needed}")
    return objective


CLUSTER_VARIABLES = ("MASTER_ADDR", "NODE_RANK", "GROUP_RANK")  # what Lightning's own launcher reads on each node


def check_cluster(cfg: DictConfig) -> None:
    """`trainer.num_nodes` > 1 where nothing set up the other nodes: no SLURM / torchrun / LSF / MPI job that Lightning
    detects, and no MASTER_ADDR or NODE_RANK. Each such process thinks it is node 0 and waits at its first collective
    for ranks that never start, until the timeout (30 minutes) ends the run."""
    import os

    nodes = (cfg.get("trainer") or {}).get("num_nodes", 1)
    if not isinstance(nodes, int) or nodes <= 1 or any(os.environ.get(v) for v in CLUSTER_VARIABLES):
        return
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)):
        return
    raise ConfigError("trainer.num_nodes", f"{nodes} nodes, but no cluster job started this process (no SLURM srun, torchrun, LSF or "
                      "MPI environment, no MASTER_ADDR / NODE_RANK): it would wait for the other nodes until the collective timeout",
                      "submit through SLURM (sbatch scripts/slurm/train_multinode.sbatch: srun starts every rank), or start train.py on "
                      "every node with MASTER_ADDR, MASTER_PORT and NODE_RANK set; trainer.num_nodes=1 on one machine")


def check_stage_data(cfg: DictConfig) -> None:
    """`stage=dpo` on raw text (or pretraining on preference pairs) would fail late or train on garbage."""
    stage, data = _class_name(cfg.get("stage")), _class_name(cfg.get("data"))
    allowed = STAGE_DATA.get(stage)
    if allowed is not None and data and data not in allowed[0]:
        raise ConfigError("data", f"{data} cannot feed stage {stage}", f"use {allowed[1]}")


def check_machine(cfg: DictConfig) -> None:
    """Strategies and accelerators that need CUDA, and precision spelling, checked before anything loads."""
    import torch

    trainer = cfg.get("trainer") or {}
    precision = str(trainer.get("precision", "auto"))
    if precision not in PRECISIONS:
        raise ConfigError("trainer.precision", f"{precision!r} is not a Lightning precision", f"use one of {list(PRECISIONS)}")
    if torch.cuda.is_available():
        return
    strategy = _class_name(cfg.get("strategy") or {})
    if strategy in CUDA_ONLY_STRATEGIES:
        raise ConfigError("strategy", "Lightning's DeepSpeedStrategy needs CUDA GPUs and none is visible (it refuses CPU)",
                          "use strategy=ddp or strategy=fsdp on CPU, or run on a GPU machine")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        raise ConfigError("trainer.accelerator", f"{accelerator} but no CUDA GPU is visible", "use trainer.accelerator=auto (or cpu)")
    if precision in ("16-mixed", "16-true"):
        raise ConfigError("trainer.precision", f"{precision} needs a CUDA GPU (fp16 on CPU is emulated and unstable)",
                          "use trainer.precision=32-true or bf16-mixed on CPU")


ASYNC_SAVE_STRATEGIES = ("ShardedStrategy", "DataParallelStrategy")  # lmforge's, with a background writer
SHARDED_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-true", "auto")


def check_sharding(cfg: DictConfig) -> None:
    """strategy=fsdp / fsdp_tp: what Lightning's ModelParallelStrategy and the TP plan would refuse mid-setup."""
    strategy = cfg.get("strategy") or {}
    if _class_name(strategy) not in ("ShardedStrategy", "ModelParallelStrategy"):
        return
    trainer = cfg.get("trainer") or {}
    precision = str(trainer.get("precision", "auto"))
    if precision not in SHARDED_PRECISIONS:
        raise ConfigError("trainer.precision", f"{precision} is not supported by strategy=fsdp (Lightning's ModelParallelStrategy)",
                          "use trainer.precision=bf16-mixed (FSDP2 mixed precision: strategy.param_dtype) or 32-true")
    tp = strategy.get("tensor_parallel_size", 1)
    if isinstance(tp, int) and tp > 1:
        family = str((cfg.get("model") or {}).get("family", ""))
        if family not in ("gpt", "llama", "mixtral"):
            raise ConfigError("strategy.tensor_parallel_size", f"tensor parallelism has plans for the decoder families (gpt, llama, "
                              f"mixtral), not for model.family={family}", "use strategy=fsdp (tensor_parallel_size=1) for this family")
        peft = cfg.get("peft") or {}
        if peft.get("method") == "adapter":  # after a Linear an adapter would see a column shard of its output
            targets = peft.get("targets") or []
            outside = [t for t in ([targets] if isinstance(targets, str) else targets) if str(t).split(".")[-1] not in ("attention", "mlp", "attn")]
            if outside:
                raise ConfigError("peft.targets", f"{outside} under tensor parallelism: an adapter there would see a tensor-parallel "
                                  "shard of its module's output", "put adapters after the blocks' sublayers: peft.targets=[attention, mlp]")
        n_kv = (cfg.get("model") or {}).get("n_kv_head") or (cfg.get("model") or {}).get("n_head")
        if isinstance(n_kv, int) and n_kv % tp:
            raise ConfigError("strategy.tensor_parallel_size", f"{tp} does not divide the {n_kv} key/value heads",
                              "choose a tensor_parallel_size that divides model.n_kv_head")
        if strategy.get("sequence_parallel"):
            check_sequence_parallel(cfg, tp)
        devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
        if isinstance(devices, int) and isinstance(nodes, int) and (devices * nodes) % tp:
            raise ConfigError("strategy.tensor_parallel_size", f"{tp} does not divide trainer.devices x num_nodes = {devices * nodes}",
                              "set trainer.devices to a multiple of the tensor-parallel size")
    dp, devices, nodes = strategy.get("data_parallel_size", "auto"), trainer.get("devices"), trainer.get("num_nodes", 1)
    tp_size = tp if isinstance(tp, int) and tp > 0 else 1
    if isinstance(dp, int) and isinstance(devices, int) and isinstance(nodes, int) and dp * tp_size != devices * nodes:
        raise ConfigError("strategy.data_parallel_size", f"{dp} x tensor_parallel_size {tp_size} is not the world size, trainer.devices "
                          f"x num_nodes = {devices * nodes}", "leave strategy.data_parallel_size=auto (world size / tensor_parallel_size)")


def check_async_save(cfg: DictConfig) -> None:
    """`strategy.async_save` (ddp, fsdp, fsdp_tp): what would upload or write a checkpoint still being written."""
    strategy = cfg.get("strategy") or {}
    if not strategy.get("async_save"):
        return
    if _class_name(strategy) not in ASYNC_SAVE_STRATEGIES:
        what = _class_name(strategy) or f"strategy={strategy.get('name', 'auto')}"
        raise ConfigError("strategy.async_save", f"{what} writes its checkpoints synchronously",
                          "use strategy=ddp (on one device too), strategy=fsdp or strategy=fsdp_tp, or drop strategy.async_save")
    if not strategy.get("save_distributed_checkpoint", True):
        raise ConfigError("strategy.async_save", "needs sharded checkpoints (strategy.save_distributed_checkpoint=true)",
                          "set strategy.save_distributed_checkpoint=true, or strategy.async_save=false for one consolidated file")
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    if checkpoint.get("save_last") is True:
        log.warning("strategy.async_save with callbacks.checkpoint.save_last=true writes the same state twice when best.ckpt is "
                    "saved (the second save waits for the first): callbacks.checkpoint.save_last=link makes last.ckpt a link instead")
    wandb = (cfg.get("logger") or {}).get("wandb") or {}
    if str(wandb.get("log_model", False)).lower() == "all":
        raise ConfigError("logger.wandb.log_model", "'all' uploads each checkpoint as it is saved, and strategy.async_save=true "
                          "is still writing it then", "use logger.wandb.log_model=true (uploads at the end) or strategy.async_save=false")


def check_sequence_parallel(cfg: DictConfig, tp: int) -> None:
    """Sequence parallelism splits every forward's sequence evenly over the TP ranks: fixed-length blocks only."""
    block = (cfg.get("data") or {}).get("block_size")
    if isinstance(block, int) and block % tp:
        raise ConfigError("strategy.sequence_parallel", f"needs data.block_size ({block}) to be a multiple of tensor_parallel_size={tp}",
                          f"set data.block_size to a multiple of {tp}, or strategy.sequence_parallel=false")
    stage = _class_name(cfg.get("stage") or {})
    if stage in ("PPOStage", "GRPOStage"):
        raise ConfigError("strategy.sequence_parallel", f"stage {stage} generates rollouts (one token at a time, not a multiple "
                          "of the TP size)", "use strategy.sequence_parallel=false for RL stages")
    if (cfg.get("callbacks") or {}).get("samples"):
        raise ConfigError("strategy.sequence_parallel", "callbacks.samples generates text (one token at a time, not a multiple "
                          "of the TP size)", "set callbacks.samples=null, or strategy.sequence_parallel=false")


def check_efficiency(cfg: DictConfig) -> None:
    """The activation-checkpointing policy and an optional attention package: refused here, not once the model builds."""
    from lmforge.models.activation_checkpointing import checkpoint_policy

    checkpoint_policy((cfg.get("stage") or {}).get("activation_checkpointing"))
    if str((cfg.get("model") or {}).get("attn_backend")) == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_backend", "flash_attn needs the flash-attn package, which is not installed",
                          "pip install flash-attn --no-build-isolation on a CUDA machine, or use model.attn_backend=sdpa")


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no data: called by train.py before Lightning is even imported. First the typed
    schema of every group (`lmforge.config_schema`: misspelled keys, wrong types; read from the targets'
    source, so it imports nothing heavy), then the cross-group and machine checks."""
    check_schema(cfg)
    check_sharding(cfg)  # before the machine check: its answer holds on a GPU machine too
    check_async_save(cfg)
    check_machine(cfg)
    check_cluster(cfg)
    check_stage_data(cfg)
    check_efficiency(cfg)
    if not cfg.get("init_from"):  # with init_from the checkpoint decides the model: run.train checks it after loading
        check_config(cfg)
