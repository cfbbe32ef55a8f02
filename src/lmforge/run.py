"""Build everything from a composed config and run it: the only place data, model and stage meet.

train(cfg)    → fit, then validate on the whole val split; returns the metrics (sweeps optimise one)
evaluate(cfg) → loss / ppl / bpb of a checkpoint on its val split
generate(cfg) → text sampled from a checkpoint with the tokenizer saved inside it
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lmforge.checkpoint import load_checkpoint, model_state_dict, resolve_ckpt_path
from lmforge.checkpoint_io import AtomicCheckpointIO
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError
from lmforge.init_from import load_init_source
from lmforge.kernels.cpu_kernels import set_cpu_kernels
from lmforge.objectives import Objective
from lmforge.parallel.plan import is_sharded_strategy
from lmforge.precision import resolve_precision
from lmforge.preflight import build_objective, check_config
from lmforge.sweeps import restore_sweep_record, share_sweep_dir
from lmforge.utils.config_tree import print_config_tree
from lmforge.utils.dependency_warnings import quiet_dependency_warnings
from lmforge.utils.io import atomic_write_text

log = logging.getLogger("lmforge")


# --- building blocks ------------------------------------------------------------------------------------

def seed_everything(seed: int | None) -> None:
    """Seed when `seed` is set, including seed=0 (a falsy check would silently skip it)."""
    if seed is not None:
        L.seed_everything(int(seed), workers=True, verbose=False)


def build_tokenizer(cfg: DictConfig, corpus: Any) -> Tokenizer:
    spec = instantiate(cfg.tokenizer, _convert_="all")
    texts = (d.text for d in corpus.iter_documents("train"))  # lazy: a cached tokenizer reads no text
    return spec.load_or_train(texts, corpus.fingerprint(), cfg.paths.cache_dir)


def build_data(
    cfg: DictConfig, tokenizer: Tokenizer | None = None, objective: Objective | None = None
) -> tuple[Any, Tokenizer, L.LightningDataModule]:
    """Datamodule (corpus / mixture + cleaning) → tokenizer (trained on its corpus, cached, or the one a checkpoint
    carried) + the objective's specials → handed back to the datamodule."""
    datamodule = instantiate(cfg.data, _convert_="all")
    corpus = datamodule.corpus
    tokenizer = tokenizer or build_tokenizer(cfg, corpus)
    specials = datamodule.special_tokens() if hasattr(datamodule, "special_tokens") else {}
    if specials and tokenizer.add_special_tokens(specials):  # e.g. ChatML markers for SFT, before the vocab is sized
        log.info("data %s added special tokens %s", type(datamodule).__name__, sorted(specials.values()))
    if objective is not None:
        if cfg.data.get("document_mask") and objective.name != "clm":
            raise ConfigError("data.document_mask", f"is supported with objective=clm only, not {objective.name}", "set data.document_mask=false")
        bind_objective(objective, tokenizer)
    datamodule.set_tokenizer(tokenizer)
    return corpus, tokenizer, datamodule


def bind_objective(objective: Objective, tokenizer: Tokenizer) -> None:
    """Add the special tokens the objective needs (mask, sentinels) before the model's vocab is sized."""
    new = tokenizer.add_special_tokens(objective.special_tokens())
    if new:
        log.info("objective %s added %d special tokens to the tokenizer", objective.name, len(new))
    objective.bind(tokenizer)


def build_stage(
    cfg: DictConfig, tokenizer: Tokenizer, metadata: dict[str, Any], for_training: bool = True, objective: Objective | None = None
) -> L.LightningModule:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if objective is None:
        objective = build_objective(cfg)
        bind_objective(objective, tokenizer)
    peft = OmegaConf.to_container(cfg.peft, resolve=True) if cfg.get("peft") is not None else None
    stage = instantiate(
        cfg.stage,
        model_cfg=model_cfg,
        peft=peft,
        objective=objective,
        optimizer=instantiate(cfg.optimizer, _convert_="all") if for_training else None,
        scheduler=instantiate(cfg.scheduler, _convert_="all") if for_training and cfg.get("scheduler") else None,
        token_bytes=torch.from_numpy(tokenizer.token_byte_lengths()),
        metadata=metadata,
        _convert_="all",
        _recursive_=False,  # metadata holds the resolved config, whose `_target_`s are data, not objects
    )
    stage.tokenizer = tokenizer
    return stage


def wandb_offline_needed() -> bool:
    """No key and no explicit WANDB_MODE: run offline into the run dir instead of prompting for a login."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def build_loggers(cfg: DictConfig, wandb_id: str | None) -> tuple[list[Any], str | None]:
    # offline without a key, sweep group, no upload offline; every logger guarded against mid-run failures
    from lmforge.tracking import guard_logger, wandb_overrides

    loggers: list[Any] = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if node._target_.endswith("WandbLogger"):
            wandb_id = wandb_id or secrets.token_hex(4)  # chosen here so checkpoints can carry it for resume
            offline = bool(node.get("offline")) or wandb_offline_needed()

            def make(offline: bool, node: DictConfig = node, run_id: str = wandb_id) -> Any:
                return instantiate(node, id=run_id, **wandb_overrides(cfg, node, offline), _convert_="all")

            loggers.append(make(True) if offline else connect_wandb(make))
        else:
            loggers.append(instantiate(node, _convert_="all"))
        log.debug("logger %s: %s", name, node._target_)
    return [guard_logger(lg) for lg in loggers], wandb_id  # a logger failing mid-run warns, training goes on


def connect_wandb(make: Any) -> Any:
    """An online W&B logger, or — when the server can't be reached (network, outage, firewall) — the same run
    offline, so a run never dies for its dashboard. `wandb.init` runs here (rank 0) instead of at the first log
    call inside `fit`, where its CommError would end training; `WANDB_INIT_TIMEOUT` bounds the wait. Once a run
    is up, wandb's own process buffers and retries uploads: losing the network mid-run does not stop training."""
    logger = make(False)
    try:
        logger.experiment  # noqa: B018 - the property calls wandb.init on rank 0
        return logger
    except Exception as err:  # wandb raises CommError / UsageError / timeouts, depending on what failed
        import wandb

        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        log.warning("W&B unreachable (%s): logging offline into the run dir instead; upload later with "
                    "`wandb sync <run dir>/wandb/offline-run-*`", reason)
        if wandb.run is not None:  # a half-initialised run must not swallow the offline one's logs
            wandb.finish()
        wandb.teardown()  # the wandb service still holds the failed run's id: restart it for the offline run
        return make(True)


def adapt_to_stage(cfg: DictConfig, stage: L.LightningModule) -> None:
    """Stage-specific trainer settings: RL stages optimise manually (several PPO epochs per batch of rollouts),
    so Lightning's clipping moves into the stage; stages that are judged by reward checkpoint on it."""
    with open_dict(cfg):
        if not stage.automatic_optimization:
            stage.max_grad_norm = cfg.trainer.get("gradient_clip_val")
            cfg.trainer.gradient_clip_val = None
            cfg.trainer.accumulate_grad_batches = 1
        monitor = getattr(stage, "checkpoint_monitor", None)
        checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
        if monitor is not None and checkpoint is not None and checkpoint.get("monitor") == "val/loss":
            checkpoint.monitor, checkpoint.mode = monitor


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(node, _convert_="all") for node in (cfg.get("callbacks") or {}).values() if node is not None and "_target_" in node]


def build_strategy(cfg: DictConfig) -> Any:
    node = cfg.get("strategy")
    if node is None:
        return "auto"
    return instantiate(node, _convert_="all") if "_target_" in node else node.get("name", "auto")


def resolve_trainer_precision(cfg: DictConfig) -> None:
    """Replace `trainer.precision=auto` by the concrete setting (idempotent)."""
    with open_dict(cfg):
        cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision", "auto"), str(cfg.trainer.get("accelerator", "auto")))


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Any]) -> L.Trainer:
    resolve_trainer_precision(cfg)
    strategy = build_strategy(cfg)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=strategy, _convert_="all",
                       **trainer_extras(cfg.trainer, strategy))


def trainer_extras(trainer_cfg: DictConfig, strategy: Any) -> dict[str, Any]:
    """Trainer arguments that depend on the strategy, unless the config sets them."""
    extra: dict[str, Any] = {}
    if trainer_cfg.get("plugins") is None and not is_deepspeed_strategy(strategy):
        # checkpoints written atomically (temp + fsync + rename): `auto`, DDP, and FSDP's consolidated single-file saves
        # (its sharded directories and DeepSpeed's are swapped in by lmforge.parallel.atomic_save instead)
        extra["plugins"] = [AtomicCheckpointIO()]
    if is_sharded_strategy(strategy) and trainer_cfg.get("inference_mode") is None:
        # FSDP2 keeps the all-gather buffers of its first forward: made under inference mode (a validation sanity
        # check on NCCL), they break every training step after it. no_grad, as Lightning does for its FSDPStrategy
        extra["inference_mode"] = False
    return extra


def is_deepspeed_strategy(strategy: Any) -> bool:
    """DeepSpeed writes its own checkpoint directories and never calls a CheckpointIO."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def save_final_last(trainer: L.Trainer) -> None:
    """ModelCheckpoint writes last.ckpt only at validations; a run ending between two must still leave its
    final state in last.ckpt, or `ckpt_path=last` would silently resume from an older step."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "save_last", False) and cb.dirpath and trainer.state.status.value == "finished":
        if getattr(cb, "_last_global_step_saved", -1) != trainer.global_step or not (Path(cb.dirpath) / "last.ckpt").exists():
            trainer.save_checkpoint(Path(cb.dirpath) / "last.ckpt")


def close_loggers(loggers: list[Any]) -> None:
    """Always close W&B, even after a crash, so the run is synced and not left 'running'."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            try:
                wandb.finish()
            except Exception as err:  # the run's files are on disk: `wandb sync` uploads them later
                log.warning("W&B: finishing the run failed (%s); upload later with `wandb sync <run dir>/wandb/run-*`", err)
            break


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


# --- entry points ---------------------------------------------------------------------------------------

def train(cfg: DictConfig) -> dict[str, float]:
    quiet_dependency_warnings()
    share_sweep_dir()
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    set_cpu_kernels(cfg.get("cpu_kernels", "lmforge"))
    seed_everything(cfg.get("seed"))
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name, exclude=output_dir)
    resume_meta = load_checkpoint(ckpt_path, weights=False)["lmforge"] if ckpt_path else {}

    init = load_init_source(cfg.init_from) if cfg.get("init_from") and not ckpt_path else None
    tokenizer = Tokenizer.from_json(resume_meta["tokenizer"]) if resume_meta else (init.tokenizer if init else None)
    if init is not None:
        with open_dict(cfg):  # the weights decide the architecture; the run's model group is replaced
            cfg.model = OmegaConf.create(init.model_cfg)
        log.info("init_from=%s: %s model", cfg.init_from, cfg.model.family)
    objective = check_config(cfg)
    _, tokenizer, datamodule = build_data(cfg, tokenizer, objective)
    with open_dict(cfg):  # derived values are resolved once and saved with the run
        if cfg.model.get("vocab_size") is None:
            cfg.model.vocab_size = tokenizer.vocab_size
        if ckpt_path:
            cfg.ckpt_path = ckpt_path
    if init is not None and tokenizer.vocab_size > cfg.model.vocab_size:  # the data added tokens (ChatML): grow the tables
        init.vocab_size = tokenizer.vocab_size  # applied as the weights are read (grow_vocab)
        log.info("init_from: vocab %d -> %d (new rows = mean embedding)", cfg.model.vocab_size, tokenizer.vocab_size)
        with open_dict(cfg):
            cfg.model.vocab_size = tokenizer.vocab_size
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}", "leave model.vocab_size=null")

    resolve_trainer_precision(cfg)  # before the config is saved, so it records what actually runs
    loggers, wandb_id = build_loggers(cfg, resume_meta.get("wandb_id"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    from lmforge.tracking import log_hyperparams, run_metadata

    run_meta = run_metadata(cfg, tokenizer, datamodule)  # + <run dir>/run_meta.json (and git.diff when dirty)
    metadata = {"config": resolved, "tokenizer": tokenizer.to_json(), "wandb_id": wandb_id, "run": run_meta}
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        print_config_tree(cfg, save_to=output_dir / "config.yaml")
    stage = build_stage(cfg, tokenizer, metadata, objective=objective)
    if init is not None:
        stage.init_weights = init.load_weights  # read in configure_model: on rank 0 only under a meta-device build
    stage.resuming = bool(ckpt_path)  # a meta-device build then only allocates: the checkpoint fills every tensor
    adapt_to_stage(cfg, stage)
    trainer = build_trainer(cfg, build_callbacks(cfg), loggers)
    try:
        log_hyperparams(loggers, resolved, run_meta)  # config (nested for W&B, dotted keys elsewhere) + meta/*
        trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        save_final_last(trainer)
        if stage.peft_cfg is not None:  # the small file to share: trainable weights only (gathered if sharded)
            from lmforge.peft import save_adapter

            save_adapter(stage.model, output_dir / "checkpoints" / "adapter.safetensors", stage.peft_cfg,
                         write=trainer.is_global_zero)
        metrics = _floats(trainer.callback_metrics)
        if cfg.get("validate_full_at_end", True) and trainer.state.status.value == "finished":
            trainer.limit_val_batches = 1.0  # the reported figure covers the whole val split
            metrics.update(_floats(trainer.validate(stage, datamodule=datamodule, verbose=False, weights_only=True)[0]))
        if trainer.is_global_zero:
            atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
            log.info("final metrics: %s", json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("val/")}))
        return metrics
    finally:
        close_loggers(loggers)
        restore_sweep_record()


def load_for_inference(cfg: DictConfig) -> tuple[str, dict[str, Any], DictConfig, Tokenizer]:
    ckpt_path = None if OmegaConf.is_missing(cfg, "ckpt_path") else cfg.ckpt_path
    path = resolve_ckpt_path(ckpt_path, cfg.paths.log_dir, cfg.get("train_task_name", "train"))
    if path is None:
        raise ConfigError("ckpt_path", "is required", "pass ckpt_path=<run dir>/checkpoints/last.ckpt (or ckpt_path=last)")
    ckpt = load_checkpoint(path)
    saved = OmegaConf.create(ckpt["lmforge"]["config"])
    return path, ckpt, saved, Tokenizer.from_json(ckpt["lmforge"]["tokenizer"])


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """task=lm: loss, perplexity and bits per byte (+ val/mlm_accuracy for MLM) of a checkpoint over a whole
    split (`split`, default val) of its data config; task=mc | bleu | lm_eval: see lmforge.evaluation."""
    from lmforge.evaluation import check_task, results_files, run_task, write_results
    from lmforge.evaluation.lm import results_task, split_dataloader, split_metrics

    seed_everything(cfg.get("seed"))
    set_cpu_kernels(cfg.get("cpu_kernels", "lmforge"))
    if check_task(cfg.get("task", "lm")) != "lm":
        return run_task(cfg)
    ckpt_file, ckpt, saved, tokenizer = load_for_inference(cfg)
    with open_dict(saved):
        saved.paths.cache_dir = cfg.paths.cache_dir
        if cfg.get("data") is None and not str(saved.data.get("_target_", "")).endswith(("PackedTextDataModule", "SFTDataModule")):
            raise ConfigError("data", f"the checkpoint was trained on {saved.data._target_.rsplit('.', 1)[-1]} (pairs or prompts), "
                              "which has no text to measure loss on", "pass a text data config, e.g. data=shakespeare or data=sft_shakespeare")
        if not str(saved.stage._target_).endswith(("PretrainStage", "SFTStage")):  # eval.py measures LM loss / ppl / bpb
            saved.stage = OmegaConf.create({"_target_": "lmforge.stages.pretrain.PretrainStage"})
        saved.stage.compile = False
        if cfg.get("data") is not None:  # evaluate on another dataset with the checkpoint's tokenizer
            saved.data = cfg.data
        if cfg.get("batch_size"):
            saved.data.val_batch_size = cfg.batch_size
    objective = build_objective(saved)
    _, _, datamodule = build_data(saved, tokenizer, objective)
    split = str(cfg.get("split") or "val")
    loader = split_dataloader(datamodule, split)  # an unknown split fails here, before the model is built
    stage = build_stage(saved, tokenizer, metadata={}, for_training=False, objective=objective)
    stage.configure_model()
    stage.model.load_state_dict(model_state_dict(ckpt))
    if cfg.get("quantize"):  # int8 post-training quantization: how much loss does it cost on this val split?
        from lmforge.generation.quantize import quantize_model

        quantize_model(stage.model, cfg.quantize)
        if cfg.quantize == "int8_dynamic":  # fp32 CPU kernels only: no GPU, no bf16 autocast
            with open_dict(cfg):
                cfg.trainer.accelerator, cfg.trainer.precision = "cpu", "32-true"
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    metrics = split_metrics(_floats(trainer.validate(stage, dataloaders=loader, verbose=False, weights_only=True)[0]), split)
    head = {"ckpt_path": str(cfg.ckpt_path), "split": split, **({"quantize": cfg.quantize} if cfg.get("quantize") else {})}
    print(json.dumps({**head, **{k: round(v, 5) for k, v in metrics.items()}}, indent=2))
    atomic_write_text(Path(cfg.paths.output_dir) / "metrics.json", json.dumps(metrics, indent=2))
    log.info("eval lm on %s: %s", cfg.ckpt_path, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))  # key=value: stdout holds one JSON only
    write_results({"task": "lm", **head, **metrics}, results_files(str(ckpt_file), cfg.paths.output_dir, results_task(split)))
    return metrics


def generate(cfg: DictConfig) -> list[str]:
    """Sample from a checkpoint or HF dir: one prompt, a prompts file, or chat (see lmforge.generation.cli)."""
    from lmforge.generation.cli import generate as run_generate

    return run_generate(cfg)
