"""Apply the strategy's parallelism to a stage's modules, in `LMStage.configure_model`.

Order (torchtitan's): tensor parallel on the trained model, then FSDP2 on every child module that has
transformer blocks (the model, and the DPO/RL reference, reward model and PPO critic, so no rank holds a full
copy of those either), then — for a meta-device build — allocation of the shards of every module built on meta,
filled by its source (`meta_shadow.MetaSource`): the model's own init replayed, or whole weights read on rank 0 and
broadcast (`load_weights`), plus the weights drawn beside them; on a resume nothing: the checkpoint fills them.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.models.activation_checkpointing import transformer_blocks
from lmforge.parallel.fsdp import apply_fsdp, parse_dtype
from lmforge.parallel.load_weights import Target, broadcast_weights
from lmforge.parallel.meta_init import materialize, materialize_and_init
from lmforge.parallel.meta_shadow import MetaSource, fill_values
from lmforge.parallel.tensor_parallel import apply_tensor_parallel
from lmforge.utils.memory import peak_rss_gb


def is_sharded_strategy(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def model_is_sharded(trainer: Any) -> bool:
    """Every rank must run each forward of a sharded model (callbacks that generate on rank 0 only would hang)."""
    return is_sharded_strategy(getattr(trainer, "strategy", None))


def shard_stage(stage: Any, strategy: Any, meta_rng: torch.Tensor | None = None,
                meta_sources: dict[str, MetaSource] | None = None, fill: bool = True) -> dict[str, Any]:
    """TP + FSDP2 on `stage`'s modules; for a meta-device build (`meta_rng` given) then storage for the shards of
    every module built on meta, filled from its `meta_sources` entry (`stage.model`'s under "model"; a child without
    one is a copy of the model's base): init replayed from `meta_rng`, or whole weights read on rank 0 and broadcast,
    plus the weights drawn beside them; `fill=False` (a resume) only allocates: the checkpoint restores every tensor.
    Returns counts for the log line."""
    mesh = stage.device_mesh
    dp_mesh, tp_mesh = mesh["data_parallel"], mesh["tensor_parallel"]
    fsdp_mesh = getattr(strategy, "fsdp_mesh", None)  # 2-D (replicate, shard) under HSDP
    fsdp_mesh = dp_mesh if fsdp_mesh is None else fsdp_mesh
    report: dict[str, Any] = {"tensor_parallel": tp_mesh.size(), "data_parallel": dp_mesh.size(),
              "replica_groups": fsdp_mesh.size(0) if fsdp_mesh.ndim == 2 else 1, "fsdp_units": 0}
    # every transformer the stage holds, not only the trained one: a DPO/RL reference, PPO's critic and a reward
    # model left whole would each cost a whole model per TP rank (and per data-parallel rank without FSDP)
    transformers = [(name, child) for name, child in stage.named_children() if transformer_blocks(child)]
    if tp_mesh.size() > 1:
        for _, child in transformers:
            apply_tensor_parallel(child, tp_mesh, sequence_parallel=bool(getattr(strategy, "sequence_parallel", False)),
                                  loss_parallel=bool(getattr(strategy, "loss_parallel", True)))
        report["tensor_parallel_modules"] = [name for name, _ in transformers]
        group = dp_mesh.get_group()  # TP ranks see the same batch: validation sums count each once
        for metric in stage.modules():
            if hasattr(metric, "process_group") and type(metric).__module__.startswith("torchmetrics"):
                metric.process_group = group
    options = {
        "param_dtype": parse_dtype("strategy.param_dtype", getattr(strategy, "compute_param_dtype", lambda: None)()),
        "reduce_dtype": parse_dtype("strategy.reduce_dtype", getattr(strategy, "reduce_dtype", "float32")),
        "reshard_after_forward": bool(getattr(strategy, "reshard_after_forward", True)),
        "cpu_offload": bool(getattr(strategy, "cpu_offload", False)),
    }
    for _, child in transformers:
        report["fsdp_units"] += apply_fsdp(child, fsdp_mesh, **options) + 1
    if meta_rng is not None:
        report.update(fill_meta_modules(stage, strategy.root_device, meta_rng, meta_sources or {}, fill))
    rss = peak_rss_gb()  # what building and loading cost this rank's host memory so far
    report["host_peak_rss_gb"] = None if rss is None else round(rss, 2)
    return report


def fill_meta_modules(stage: Any, device: torch.device, meta_rng: torch.Tensor, sources: dict[str, MetaSource],
                      fill: bool = True) -> dict[str, Any]:
    """Allocate every child of `stage` still on meta (sharded by now) and, unless `fill` is off (a resume: the
    checkpoint restores every tensor), fill it from its source. The weights of one file are read once for all the
    modules that hold them (the model and its reference; a reward model and the PPO critic started from it)."""
    copy_of_model = MetaSource(sources["model"].read if "model" in sources else None)
    reads: dict[int, tuple[MetaSource, list[Target]]] = {}
    filled: dict[str, Any] = {"built_on_meta": []}
    for name, child in stage.named_children():
        if not any(p.is_meta for p in child.parameters()):
            continue
        filled["built_on_meta"].append(name)
        source = sources.get(name, copy_of_model)
        if fill and source.read is None:  # a fresh family model or a copy of it: its own init, replayed (equal for copies)
            materialize_and_init(child, device, meta_rng, skip=frozenset(source.extras))
            continue
        materialize(child, device)
        if fill:
            reads.setdefault(id(source.read), (source, []))[1].append(Target(child, source.prefix, frozenset(source.extras)))
    left = [name for name, p in stage.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"meta-device build left {left[:3]} unallocated: set strategy.meta_init=false")
    if not fill:
        return {**filled, "weights_from_checkpoint": True}
    for source, targets in reads.values():
        filled["weights_broadcast"] = filled.get("weights_broadcast", 0) + broadcast_weights(targets, source.read, source.what)
    for name, source in sources.items():
        if source.extras:
            fill_values(getattr(stage, name), source.extras)
    return filled

