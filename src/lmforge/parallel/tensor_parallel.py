"""Tensor parallelism (Megatron-style) for the decoder families: GPT, Llama, Mixtral.

Per block, on the tensor-parallel mesh: the attention's input projections and the MLP's input projections are
column-parallel (each rank holds a slice of the heads / hidden units, so attention runs on local heads with no
communication), the attention output and the MLP's down projection are row-parallel (one all-reduce each in
forward and in backward). GPT's fused q|k|v matrix is split by head (`parallel/head_parallel.py`), not in
contiguous rows. The token embedding is row-parallel over the vocabulary (each rank looks up its V/tp rows, one
all-reduce, or a reduce-scatter straight to sequence shards under sequence parallelism), and the LM head is
column-parallel over the vocabulary (loss parallelism, `strategy.loss_parallel`): each rank computes V/tp of
the logits and the loss runs on those shards (`losses/linear_cross_entropy.py`). A tied head shares the sharded
table. Norms and GPT's position table stay replicated (FSDP still shards every parameter over the data-parallel
mesh). Mixtral's experts are split like the MLP, expert by expert; the router stays replicated. BERT and T5 are
encoders: they are refused with a clear error rather than sharded wrongly. LoRA, bottleneck adapters and prefixes
are split with what they adapt (`parallel/peft_parallel.py`).

Sequence parallelism (opt-in, `strategy.sequence_parallel`) shards the residual stream and norms along the
sequence as well; it needs every forward's length to be a multiple of the TP size (fixed-length training and
validation blocks are; generation is not), checked before any collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels.linear import is_plain_linear
from lmforge.models.activation_checkpointing import transformer_blocks
from lmforge.models.layers.attention import CausalSelfAttention
from lmforge.parallel.peft_parallel import (
    adapter_plan,
    base_linear,
    check_adapters,
    shard_lora_by_head,
    shard_prefix,
    with_lora,
)


@dataclass(frozen=True)
class _BlockNames:
    """Where a family's block keeps the modules the plans name, and how many positional arguments `attn` takes
    (a `PrepareModuleInput` needs one layout per argument)."""

    attn_norm: str
    mlp_norm: str
    attn_out: str
    attn_args: int


_GPT = _BlockNames("ln_1", "ln_2", "attn.proj", 4)  # attn(x, mask, cache, layer)
_LLAMA = _BlockNames("attn_norm", "mlp_norm", "attn.o_proj", 5)  # attn(x, rope, mask, cache, layer): Llama, Mixtral


def _mlp_plan(mlp: nn.Module, prefix: str) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):  # SwiGLU
        return {f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(), f"{prefix}.down_proj": RowwiseParallel()}
    if all(hasattr(mlp, name) for name in ("fc", "proj")):  # GPT's GELU MLP
        return {f"{prefix}.fc": ColwiseParallel(), f"{prefix}.proj": RowwiseParallel()}
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, nn.ModuleList):  # MoE: each expert is a SwiGLU
        plan: dict[str, Any] = {}
        for index, expert in enumerate(experts):
            plan.update(_mlp_plan(expert, f"{prefix}.experts.{index}"))
        return plan
    raise ConfigError("strategy.tensor_parallel_size", f"no tensor-parallel plan for the MLP {type(mlp).__name__}",
                      "use tensor_parallel_size=1 for this model")


def _dense_mlp_out(mlp: nn.Module) -> str | None:
    """The dense MLP's output projection (row-parallel), or None for a mixture of experts."""
    return next((f"mlp.{name}" for name in ("down_proj", "proj") if hasattr(mlp, name)), None)


def _sequence_parallel_plan(block: nn.Module, names: _BlockNames) -> dict[str, Any]:
    """The residual stream between sub-layers lives sharded along the sequence (each TP rank holds T/tp rows): the
    norms run on those rows, the attention/MLP input is all-gathered, their row-parallel output projection
    reduce-scatters back to rows (the all-reduce of plain TP, split in two, with 1/tp of the activations kept)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    rest = (None,) * (names.attn_args - 1)  # only x is sharded
    plan: dict[str, Any] = {
        names.attn_norm: SequenceParallel(), names.mlp_norm: SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest), use_local_output=True),
        names.attn_out: RowwiseParallel(output_layouts=Shard(1)),
    }
    mlp_out = _dense_mlp_out(block.mlp)
    if mlp_out is not None:
        plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
        plan[mlp_out] = RowwiseParallel(output_layouts=Shard(1))
    else:  # MoE: experts see gathered token subsets, not (B, T, C); their (all-reduced) sum is cut back to this rank's rows
        plan["mlp"] = PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                                               output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
    return plan


def _attention_plan(attn: nn.Module | None, family: str, tp: int) -> tuple[dict[str, Any], _BlockNames]:
    """The column/row-parallel plan of one block's attention, after checking that its heads split over `tp` ranks.
    GPT's fused qkv is not in the plan: `shard_by_head` splits it afterwards."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(attn, CausalSelfAttention):
        if not is_plain_linear(base_linear(attn.qkv)):  # plain, or a LoRA layer around a plain one
            raise ConfigError("strategy.tensor_parallel_size", f"the fused qkv projection is a {type(attn.qkv).__name__}, "
                              "not an nn.Linear, and cannot be split by head", "use tensor_parallel_size=1 with this wrapper on qkv")
        heads, kv_heads, plan, names = attn.n_head, attn.n_head, {"attn.proj": RowwiseParallel()}, _GPT
    elif attn is not None and all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        heads, kv_heads, names = attn.n_head, attn.n_kv_head, _LLAMA
        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
                "attn.o_proj": RowwiseParallel()}
    else:
        raise ConfigError(
            "strategy.tensor_parallel_size",
            f"tensor parallelism has plans for the decoder families (gpt, llama, mixtral), not for {family}",
            "use strategy=fsdp (tensor_parallel_size=1) for this family",
        )
    if heads % tp or kv_heads % tp:
        raise ConfigError(
            "strategy.tensor_parallel_size",
            f"{tp} does not divide n_head={heads} and n_kv_head={kv_heads}",
            "choose a tensor_parallel_size that divides the number of key/value heads",
        )
    return plan, names


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, sequence_parallel: bool = False, loss_parallel: bool = True) -> int:
    """Shard every block of `model` over `tp_mesh` in place; returns the number of blocks sharded.

    `sequence_parallel`: also shard the residual stream, norms and dropout along the sequence (Megatron's
    sequence parallelism): activation memory outside attention/MLP drops by the TP size, at no extra traffic.
    The token embedding is always split over the vocabulary (`shard_embedding`); `loss_parallel`: the LM head
    too (`shard_lm_head`; a tied head is, whatever the flag)."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    family = getattr(getattr(model, "config", None), "family", type(model).__name__)
    blocks = transformer_blocks(model)
    plans = [_attention_plan(getattr(block, "attn", None), family, tp) for block in blocks]  # every check before any sharding
    check_adapters(model, blocks)
    # torch's SequenceParallel re-registers a norm's weight as a new Parameter, which trains: PEFT's frozen ones
    # would join the optimizer. What trains is put back as it was once everything is sharded.
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    rank = tp_mesh.get_local_rank()
    for block, (plan, names) in zip(blocks, plans):
        plan.update(_mlp_plan(block.mlp, "mlp"))
        if sequence_parallel:
            plan.update(_sequence_parallel_plan(block, names))
        plan = with_lora(block, plan)  # PEFT weights split with the Linears they adapt (parallel/peft_parallel.py)
        plan.update(adapter_plan(block, sequence_parallel))
        parallelize_module(block, tp_mesh, plan)
        attn = block.attn
        if isinstance(attn, CausalSelfAttention):
            shard_lora_by_head(attn.qkv, tp_mesh)
            attn.head_offset = rank * (attn.n_head // tp)  # ALiBi picks this rank's heads' slopes with it
        else:
            attn.n_kv_head //= tp
        attn.n_head //= tp  # this rank's heads
    shard_prefix(model, tp_mesh)
    decoder = getattr(model, "backbone", model)  # a reward / value model's decoder holds the embedding and norms
    tied = head_is_tied(decoder)
    # GPT adds its position table to the embedding's output: that sum is cut into sequence shards at the first block
    positions_added = getattr(decoder, "wpe", None) is not None
    shard_embedding(decoder, tp_mesh, sequence_parallel and not positions_added)
    if sequence_parallel:
        _shard_sequence_between(decoder, tp_mesh, shard_first_block_input=positions_added)
    if loss_parallel or tied:  # a tied head reads the sharded table: it is vocab-parallel whatever the flag says
        shard_lm_head(decoder, tp_mesh, tied=tied)
    for name, p in model.named_parameters():
        p.requires_grad_(trains[name])
    return len(blocks)


def head_is_tied(model: nn.Module) -> bool:
    """True where the LM head's weight is also another module's parameter (the tied input embedding)."""
    weight = model.lm_head.weight
    return any(p is weight for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith("lm_head."))


def shard_embedding(model: nn.Module, tp_mesh: Any, sequence_parallel: bool) -> None:
    """Row-parallel token embedding: rank r stores vocabulary rows [r·V/tp, (r+1)·V/tp) (ids outside them look up
    zeros), and the partial lookups are summed: all-reduced to every rank, or reduce-scattered to this rank's
    sequence rows when the residual stream is sequence-parallel (half the traffic of all-reduce + slice). The
    module becomes a `VocabParallelEmbedding` in place (same path, hooks and state-dict key), its weight a `Shard(0)`
    DTensor: checkpoints and the tied head see what torch's `RowwiseParallel` made before."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from lmforge.parallel.vocab_parallel_embedding import VocabParallelEmbedding

    wte = model.wte
    if type(wte) is not nn.Embedding:  # a subclass could change what forward does: this forward would drop it
        raise ConfigError("strategy.tensor_parallel_size", f"the token embedding is a {type(wte).__name__}, not an nn.Embedding, "
                          "and has no vocab-parallel plan", "use tensor_parallel_size=1 for this model")
    wte.weight = nn.Parameter(distribute_tensor(wte.weight.data, tp_mesh, [Shard(0)]), requires_grad=wte.weight.requires_grad)
    wte.__class__ = VocabParallelEmbedding  # as head_parallel.shard_by_head does for GPT's qkv
    wte.tp_mesh, wte.sequence_parallel = tp_mesh, sequence_parallel


def shard_lm_head(model: nn.Module, tp_mesh: Any, tied: bool = False) -> None:
    """Column-parallel LM head: rank r holds vocabulary rows [r·V/tp, (r+1)·V/tp) and returns its slice of the
    logits as a DTensor sharded on the last dim. The decoder's loss then runs on the shards and plain forward
    gathers them (`models/decoder_lm.py`). A `tied` head is re-pointed at the (already sharded) embedding table;
    a head that is not a plain `nn.Linear` (LoRA-wrapped) stays replicated."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    head = getattr(model, "lm_head", None)
    if not is_plain_linear(head):
        if tied:
            raise ConfigError("strategy.tensor_parallel_size", f"the tied LM head is a {type(head).__name__}, not an nn.Linear, "
                              "and cannot share the vocab-parallel embedding", "use tensor_parallel_size=1 or an untied head")
        return
    if tied:
        head.weight = model.wte.weight
    parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    if tied:  # parallelize_module wraps the DTensor in a new Parameter: point the head back at the table's
        head.weight = model.wte.weight


def _shard_sequence_between(model: nn.Module, tp_mesh: Any, shard_first_block_input: bool = False) -> None:
    """The embedding already outputs this rank's sequence rows (`shard_embedding`), or, where position embeddings
    are added to its (replicated) output first (GPT), the first block's input is cut into them, a local slice; the
    final norm's input is all-gathered, so the norm, LM head and anything reading `hidden_states` (reward/value
    heads) see whole rows."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

    final_norm = "norm" if hasattr(model, "norm") else "ln_f"
    plan = {final_norm: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)}
    if shard_first_block_input:  # GPT's block(x, mask, cache, layer): only x is cut
        plan["blocks.0"] = PrepareModuleInput(input_layouts=(Replicate(), None, None, None),
                                              desired_input_layouts=(Shard(1), None, None, None), use_local_output=True)
    parallelize_module(model, tp_mesh, plan)
    tp = tp_mesh.size()

    def check_length(module: nn.Module, args: tuple) -> None:
        # on the embedding, which every path runs (forward, and hidden_states for reward/value heads): DTensor's
        # sequence sharding assumes equal shards, and an uneven length would mismatch the collectives and hang
        if args[0].shape[1] % tp:
            raise ValueError(f"sequence parallelism needs the sequence length to be a multiple of tensor_parallel_size={tp}, "
                             f"got {args[0].shape[1]}: pad batches to a multiple of it, or set strategy.sequence_parallel=false")

    model.wte.register_forward_pre_hook(check_length)
