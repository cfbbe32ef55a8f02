"""HSDP and gradient accumulation under FSDP2, on four CPU ranks (gloo, one spawn): 2 replica groups x 2 shards.

Against an unsharded model fed every rank's micro-batches: parameters are sharded inside a replica group and
replicated across groups; the gradients of a 2-micro-batch accumulated step are the same whatever
`strategy.accumulation_sync` defers between micro-batches, and each mode really defers what it names (the
first micro-batch's collectives, counted in a profiler trace: reduce-scatter + all-reduce / reduce-scatter only /
none). Meta-device init over the 2-D mesh gives the weights of a plain build.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from lmforge.errors import ConfigError
from lmforge.models import build
from lmforge.parallel import apply_fsdp, apply_tensor_parallel, build_on_meta, materialize_and_init
from lmforge.parallel.fsdp import check_accumulation_sync, hold_gradient_sync, hybrid_shard_mesh

WORLD, REPLICAS, MICRO = 4, 2, 2
CONFIG = {"family": "llama", "vocab_size": 97, "n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 64, "n_kv_head": 2}


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).float().logsumexp(-1).mean()


def _worker(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.profiler import ProfilerActivity, profile

    from lmforge.parallel.strategy import ShardedStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        root = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))  # as Lightning builds it
        mesh = hybrid_shard_mesh(root, REPLICAS)
        results[(rank, "mesh")] = (tuple(mesh.mesh_dim_names), mesh.get_local_rank("dp_replicate"), mesh.get_local_rank("dp_shard"))
        # micro-batch m of data-parallel rank d is batches[m][d]; the reference sees them all
        batches = torch.randint(0, 97, (MICRO, WORLD, 2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        reference = build(CONFIG)
        for micro in batches:
            (sum(_loss(reference, b) for b in micro) / (WORLD * MICRO)).backward()
        for mode in ("every_microbatch", "intra_replica", "last_microbatch", "strategy"):
            torch.manual_seed(0)
            model = build(CONFIG)
            apply_fsdp(model, mesh)
            weight = model.blocks[0].attn.q_proj.weight
            if mode == "strategy":  # the strategy's hook Lightning calls between micro-batches, wired to the same helper
                strategy = ShardedStrategy(data_parallel_replicate_size=REPLICAS, accumulation_sync="last_microbatch")
                strategy._lightning_module = model
                hold = strategy.block_backward_sync()
            else:
                hold = hold_gradient_sync(model, mode)
            with profile(activities=[ProfilerActivity.CPU]) as prof, hold:
                (_loss(model, batches[0][rank]) / MICRO).backward()
            ops = Counter(event.name for event in prof.events())  # the collectives the first micro-batch ran
            after_first = (ops["c10d::_reduce_scatter_base_"], ops["c10d::allreduce_"], weight.grad is None)
            (_loss(model, batches[1][rank]) / MICRO).backward()
            worst = max((p.grad.full_tensor() - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
            results[(rank, mode)] = (after_first, worst)
        results[(rank, "placement")] = (weight.placements == (Replicate(), Shard(0)), weight.to_local().shape[0], weight.shape[0],
                                        isinstance(weight, DTensor))
        # meta-device init over the 2-D mesh: the weights of a plain build
        torch.manual_seed(5)
        plain = build(CONFIG)
        torch.manual_seed(5)
        meta, rng = build_on_meta(CONFIG)
        apply_fsdp(meta, mesh)
        materialize_and_init(meta, "cpu", rng)
        results[(rank, "meta")] = max((q.full_tensor() - p).abs().max().item() for p, q in zip(plain.parameters(), meta.parameters()))
        # TP 2 x HSDP (2 replica groups of 1 shard) on the same 4 ranks: the whole model's logits and gradients
        root = init_device_mesh("cpu", (WORLD // 2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
        torch.manual_seed(0)
        whole, model = build(CONFIG), build(CONFIG)
        model.load_state_dict(whole.state_dict())
        apply_tensor_parallel(model, root["tensor_parallel"])
        apply_fsdp(model, hybrid_shard_mesh(root, 2))
        tokens = batches[0][: WORLD // 2]  # one batch per data-parallel rank; a TP pair shares it
        logits, expected = model(tokens[root["data_parallel"].get_local_rank()]), whole(tokens[root["data_parallel"].get_local_rank()])
        logits.square().mean().backward()
        sum(whole(batch).square().mean() for batch in tokens).div(len(tokens)).backward()  # FSDP averages over data-parallel ranks
        worst = max((p.grad.full_tensor() - q.grad).abs().max().item() for p, q in zip(model.parameters(), whole.parameters()))
        results[(rank, "tp_hsdp")] = ((logits - expected).abs().max().item(), worst, model.blocks[0].attn.q_proj.weight.placements)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_hybrid_sharding_and_deferred_gradient_sync_on_four_cpu_ranks() -> None:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert results[(rank, "mesh")] == (("dp_replicate", "dp_shard"), rank // 2, rank % 2)  # a group = consecutive ranks (a node)
        sharded, local_rows, rows, is_dtensor = results[(rank, "placement")]
        assert sharded and is_dtensor and (local_rows, rows) == (16, 32)  # q_proj: 32 rows, 16 per shard, replicated twice
        # first micro-batch: (reduce-scatters, cross-replica all-reduces, sharded grad still unset), one per FSDP unit (2 blocks + root)
        for mode, after_first in (("every_microbatch", (3, 3, False)), ("intra_replica", (3, 0, True)),
                                  ("last_microbatch", (0, 0, True)), ("strategy", (0, 0, True))):
            seen, worst = results[(rank, mode)]
            assert seen == after_first, (rank, mode, seen)
            assert worst < 1e-6, (rank, mode, worst)  # the accumulated step's gradients do not depend on the mode
        assert results[(rank, "meta")] == 0.0
        logits, grads, placements = results[(rank, "tp_hsdp")]
        assert logits < 1e-5 and grads < 1e-5, (rank, logits, grads)
        assert len(placements) == 3  # replicate x shard x tensor-parallel


def test_accumulation_sync_modes_are_checked_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="strategy.accumulation_sync.*unknown mode 'sometimes'.*every_microbatch"):
        check_accumulation_sync("sometimes", 2)
    with pytest.raises(ConfigError, match="intra_replica.*data_parallel_replicate_size is 1.*trainer.num_nodes"):
        check_accumulation_sync("intra_replica", 1)
    check_accumulation_sync("last_microbatch", 1)
    with hold_gradient_sync(torch.nn.Linear(2, 2), "last_microbatch"):  # no FSDP unit under the module: nothing to defer
        pass


def test_sharded_strategy_refuses_a_bad_replicate_size() -> None:
    from lmforge.parallel.strategy import ShardedStrategy

    for bad in (0, True, "2"):
        with pytest.raises(ConfigError, match="strategy.data_parallel_replicate_size.*integer >= 1"):
            ShardedStrategy(data_parallel_replicate_size=bad)
    strategy = ShardedStrategy(data_parallel_replicate_size=3)
    strategy.num_nodes, strategy.parallel_devices = 1, [torch.device("cpu")] * 4  # checked before any process group starts
    with pytest.raises(ConfigError, match="3 does not divide the 4 data-parallel ranks.*trainer.num_nodes"):
        strategy.setup_environment()
