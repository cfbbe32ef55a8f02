"""Sharding building blocks, checked against the unsharded model on two CPU ranks (gloo, one spawn for all):
the tensor-parallel plan (with and without sequence parallelism) gives the same logits and gradients, the
vocab-parallel LM head's sharded loss (loss parallelism) the same CLM loss and gradients, meta-device
init under FSDP gives the weights of a plain build, the mixed-precision policy computes in bf16 over fp32 shards,
`reshard_after_forward` keeps or frees the gathered weights, `cpu_offload` trains the same, and the DTensor-aware
gradient norm equals the plain one."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, free_port

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import build
from lmforge.objectives.clm import CausalLM
from lmforge.optim.grad_norm import clip_grads_, total_grad_norm
from lmforge.parallel import apply_tensor_parallel, build_on_meta, materialize_and_init
from lmforge.parallel.load_weights import Target, broadcast_weights
from lmforge.parallel.meta_init import materialize
from lmforge.parallel.meta_shadow import apply_peft_on_meta, build_with_shadow, fill_values

FAMILIES = {
    "gpt": {},
    "llama": {"n_kv_head": 2},
    "mixtral": {"n_kv_head": 2, "n_expert": 4, "n_expert_per_token": 2},
    "bert": {},
    "t5": {},
}


def tiny(family: str) -> dict:
    return {"family": family, "vocab_size": 97, "n_layer": 2, "n_head": 4, "n_embd": 32, "max_seq_len": 64, **FAMILIES[family]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_meta_init_gives_the_weights_and_generator_state_of_a_plain_build(family: str) -> None:
    torch.manual_seed(0)
    plain = build(tiny(family))
    after_plain = torch.rand(4)
    torch.manual_seed(0)
    model, rng = build_on_meta(tiny(family))
    assert all(p.is_meta for p in model.parameters())
    materialize_and_init(model, "cpu", rng)
    assert torch.equal(torch.rand(4), after_plain)  # data order and dropout downstream do not shift
    expected, got = plain.state_dict(), model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_tensor_parallel_refuses_encoders_with_the_fix(family: str) -> None:
    with pytest.raises(ConfigError, match=f"strategy.tensor_parallel_size.*not for {family}.*strategy=fsdp"):
        apply_tensor_parallel(build(tiny(family)), SimpleNamespace(size=lambda: 2, get_local_rank=lambda: 0))


def test_tensor_parallel_refuses_a_wrapped_fused_qkv_with_the_fix() -> None:
    model = build(tiny("gpt"))
    model.blocks[1].attn.qkv = type("Adapted", (torch.nn.Linear,), {})(32, 96)  # as an adapter or quantiser wraps it
    with pytest.raises(ConfigError, match="strategy.tensor_parallel_size.*Adapted.*cannot be split by head.*tensor_parallel_size=1"):
        apply_tensor_parallel(model, SimpleNamespace(size=lambda: 2, get_local_rank=lambda: 0))
    assert type(model.blocks[0].attn.qkv).__name__ == "Linear"  # refused before any block was sharded


def test_sharded_strategies_evaluate_under_no_grad_unless_the_config_says_otherwise() -> None:
    """FSDP2's first forward allocates the all-gather buffers it reuses: under inference mode (Lightning's default
    for evaluation on NCCL) they would break every later training step."""
    from omegaconf import OmegaConf

    from lmforge.parallel.strategy import ShardedStrategy
    from lmforge.run import trainer_extras

    assert trainer_extras(OmegaConf.create({}), ShardedStrategy())["inference_mode"] is False
    assert "inference_mode" not in trainer_extras(OmegaConf.create({"inference_mode": True}), ShardedStrategy())
    assert "inference_mode" not in trainer_extras(OmegaConf.create({}), "auto")


def test_every_strategy_but_deepspeed_writes_checkpoint_files_atomically() -> None:
    """`strategy=ddp` is a DDPStrategy instance: it once fell back to Lightning's TorchCheckpointIO, which streams into
    last.ckpt in place (a kill mid-save truncated it)."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from omegaconf import OmegaConf

    from lmforge.checkpoint_io import AtomicCheckpointIO
    from lmforge.parallel.strategy import ShardedStrategy
    from lmforge.run import trainer_extras

    ddp = instantiate(OmegaConf.load(ROOT / "conf" / "strategy" / "ddp.yaml"))
    for strategy in ("auto", ddp, ShardedStrategy(save_distributed_checkpoint=False)):
        plugins = trainer_extras(OmegaConf.create({}), strategy)["plugins"]
        assert [type(p) for p in plugins] == [AtomicCheckpointIO], strategy
    trainer = L.Trainer(strategy=ddp, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        **trainer_extras(OmegaConf.create({}), ddp))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert "plugins" not in trainer_extras(OmegaConf.create({}), DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    assert "plugins" not in trainer_extras(OmegaConf.create({"plugins": []}), "auto")  # the config's own choice


def test_total_grad_norm_and_clipping_match_torch_on_plain_tensors() -> None:
    grads = [torch.randn(5, 3), torch.randn(7)]
    expected = torch.nn.utils.get_total_norm(grads)
    assert torch.allclose(total_grad_norm(grads), expected)
    clipped = [g.clone() for g in grads]
    clip_grads_(clipped, 0.5, total_grad_norm(clipped))
    assert torch.allclose(total_grad_norm(clipped), torch.tensor(0.5), atol=1e-5)


def _gloo_rank(rank: int, port: int, results: dict, body: Callable[[int, dict], None]) -> None:
    """One of two CPU ranks (gloo, one thread each) running `body(rank, results)`."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        body(rank, results)
    finally:
        dist.destroy_process_group()


def _on_two_ranks(body: Callable[[int, dict], None]) -> dict:
    """`body(rank, results)` on two spawned processes; what they put in `results`."""
    results = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(free_port(), results, body), nprocs=2, join=True)
    return dict(results)


def _worker(rank: int, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lmforge.parallel import apply_fsdp

    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    # TP over 2 ranks, plain and with sequence parallelism: same logits and gradients as the whole model
    for family, sp in (("llama", False), ("mixtral", False), ("llama", True), ("mixtral", True), ("gpt", False), ("gpt", True),
                       ("gpt_alibi", False), ("gpt_alibi", True)):
        torch.manual_seed(0)
        config = {**tiny("gpt"), "position": "alibi", "bias": True} if family == "gpt_alibi" else tiny(family)
        reference, sharded = build(config), build(config)
        sharded.load_state_dict(reference.state_dict())
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
        apply_tensor_parallel(sharded, mesh["tensor_parallel"], sequence_parallel=sp)
        apply_fsdp(sharded, mesh["data_parallel"])  # 2-D as strategy=fsdp_tp builds it
        attn = sharded.blocks[0].attn
        projection = attn.qkv if family.startswith("gpt") else attn.q_proj
        assert isinstance(projection.weight, DTensor)
        if family.startswith("gpt"):  # stored as contiguous row shards (the checkpoint layout), computed by head
            results[(rank, family, sp, "qkv")] = (projection.weight.to_local().shape[0], attn.n_head)
        ref_logits, logits = reference(tokens), sharded(tokens)
        ref_logits.square().mean().backward()
        logits.square().mean().backward()
        worst_grad = 0.0
        for p, q in zip(reference.parameters(), sharded.parameters()):
            full = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
            worst_grad = max(worst_grad, (full - p.grad).abs().max().item())
        norm = total_grad_norm([q.grad for q in sharded.parameters()])
        results[(rank, family, sp)] = ((logits - ref_logits).abs().max().item(), worst_grad,
                                       abs(norm.item() - torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()))
        if sp:  # an odd length is refused on every rank before any collective (uneven shards would hang them)
            try:
                sharded(tokens[:, :7])
                results[(rank, family, "odd")] = "ran"
            except ValueError as err:
                results[(rank, family, "odd")] = str(err)
    # a whole-model torch.compile of the 2-D model (GPT: tied vocab-parallel head; Llama: untied), with and without
    # sequence parallelism: the CLM loss and every gradient of the eager whole model. torch's RowwiseParallel embedding
    # failed here ("Mixing fake modes NYI"); aot_eager traces what inductor would, in a fraction of the time
    batch = {"input_ids": tokens, "targets": tokens.roll(-1, dims=1)}
    for family, sp in (("gpt", False), ("gpt", True), ("llama", True)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        reference, sharded = build(tiny(family)), build(tiny(family))
        sharded.load_state_dict(reference.state_dict())
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
        apply_tensor_parallel(sharded, mesh["tensor_parallel"], sequence_parallel=sp)
        apply_fsdp(sharded, mesh["data_parallel"])
        sharded.compile(backend="aot_eager")
        ref_loss, loss = CausalLM()(reference, batch).loss, CausalLM()(sharded, batch).loss
        ref_loss.backward()
        loss.backward()
        worst_grad = max(((q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad) - p.grad).abs().max().item()
                         for p, q in zip(reference.parameters(), sharded.parameters()))
        results[(rank, "compiled", family, sp)] = (abs(loss.item() - ref_loss.item()), worst_grad)
    # the vocab-parallel embedding alone: uneven rows (97 -> 49 + 48), a padding row in rank 1's block: the plain
    # embedding's rows (this rank's sequence half under sequence parallelism) and, replicated, its gradient (none
    # reaching the padding row)
    from lmforge.parallel.tensor_parallel import shard_embedding

    for sp in (False, True):
        torch.manual_seed(0)
        plain = torch.nn.Embedding(97, 8, padding_idx=60)
        holder = torch.nn.Module()
        holder.wte = torch.nn.Embedding(97, 8, padding_idx=60)
        holder.wte.load_state_dict(plain.state_dict())
        shard_embedding(holder, init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",)), sequence_parallel=sp)
        ids = tokens.clone()
        ids[:, 0] = 60
        out, ref = holder.wte(ids), plain(ids)
        ref = ref[:, rank * 6 : (rank + 1) * 6] if sp else ref
        grad_gap = 0.0
        if not sp:
            weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
            (out * weights).sum().backward()
            (ref * weights).sum().backward()
            grad = holder.wte.weight.grad.full_tensor()
            grad_gap = max((grad - plain.weight.grad).abs().max().item(), grad[60].abs().max().item())
        results[(rank, "embedding", sp)] = ((out - ref).abs().max().item(), grad_gap, holder.wte.weight.to_local().shape[0])
    # a reward model (scalar head on the decoder's hidden states) under TP: the same per-token values and gradients
    from lmforge.models.heads import ScalarHeadModel

    for family, sp in (("gpt", False), ("llama", True)):
        torch.manual_seed(0)
        reference, sharded = ScalarHeadModel(build(tiny(family))), ScalarHeadModel(build(tiny(family)))
        torch.nn.init.normal_(reference.head.weight, std=0.02)  # zero-initialised: make its output depend on the hidden states
        sharded.load_state_dict(reference.state_dict())
        apply_tensor_parallel(sharded, init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",)), sequence_parallel=sp)
        ref_values, values = reference(tokens), sharded(tokens)
        ref_values.square().mean().backward()
        values.square().mean().backward()
        worst_grad = max(((q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad) - p.grad).abs().max().item()
                         for p, q in zip(reference.parameters(), sharded.parameters()) if p.grad is not None)
        results[(rank, "scalar_head", family)] = ((values - ref_values).abs().max().item(), worst_grad)
    # KV-cache decoding on a tensor-parallel GPT: a cache of this rank's heads, ALiBi slopes of this rank's heads
    from lmforge.generation import generate

    for position in ("learned", "alibi"):
        torch.manual_seed(0)
        config = {**tiny("gpt"), "position": position}
        reference, sharded = build(config), build(config)
        sharded.load_state_dict(reference.state_dict())
        apply_tensor_parallel(sharded, init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",)))
        ids = generate(reference, tokens[:, :5], max_new_tokens=6)
        results[(rank, "generate", position)] = (torch.equal(generate(sharded, tokens[:, :5], max_new_tokens=6), ids),
                                                 sharded.make_cache(2, 8).n_kv_head)
    # generation from an FSDP2 model before any training forward (an RL stage's first rollout), then training:
    # generate runs it under no_grad, so FSDP's reused all-gather buffers are not inference tensors
    torch.manual_seed(0)
    reference, model = build(tiny("llama")), build(tiny("llama"))
    model.load_state_dict(reference.state_dict())
    apply_fsdp(model, init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))["data_parallel"])
    same = torch.equal(generate(model, tokens[:, :5], max_new_tokens=4), generate(reference, tokens[:, :5], max_new_tokens=4))
    model(tokens).square().mean().backward()  # raised "Inplace update to inference tensor outside InferenceMode"
    results[(rank, "fsdp_generate")] = same
    # loss parallelism: the head holds half the vocabulary rows per rank (97 -> 49 + 48) and the CLM loss runs
    # chunked on those rows (all-reduced softmax statistics); same loss and gradients as the whole model, with
    # several chunks, through the gathered logits (fused_loss=false) and through torch's loss_parallel on the
    # head's sharded logits; a tied head shares the vocab-parallel embedding table, stays tied, and is vocab-parallel
    # even with loss_parallel=false (clm_flag_off). Per-token NLL on the shards too: DPO's sequence log-probs
    # (dpo) and RL's log-probs with entropies (rl, entropies compared as well), against the same on the whole model
    import lmforge.losses.linear_cross_entropy as lce
    from lmforge.losses.vocab_parallel_cross_entropy import vocab_parallel_cross_entropy
    from lmforge.objectives.base import decoder_sequence_logprobs

    targets = tokens.roll(-1, dims=1)
    targets[0, :3] = -100  # ignored targets on both sides
    batch = {"input_ids": tokens, "targets": targets}
    sharded_calls: list[int] = []
    real = lce._shard_logsumexp
    lce._shard_logsumexp = lambda *a: sharded_calls.append(1) or real(*a)
    seq_weights = torch.tensor([1.5, -0.5])
    entropies: dict[str, torch.Tensor] = {}

    def dpo(model: torch.nn.Module) -> torch.Tensor:
        return (seq_weights * decoder_sequence_logprobs(model, tokens, targets)).sum() / 21  # per token, as the others

    def rl(model: torch.nn.Module) -> torch.Tensor:
        nll, entropy = model(tokens, targets=targets, reduction="none", with_entropy=True)
        entropies[model.__class__.__name__ + str(id(model))] = entropy
        return (seq_weights[:, None] * nll).sum() / 21

    def fused_rows_5(model: torch.nn.Module) -> torch.Tensor:
        return lce.linear_cross_entropy(model.hidden_states(tokens), model.lm_head, targets, rows=5) / 21

    def torch_loss_parallel(model: torch.nn.Module) -> torch.Tensor:
        logits = model.lm_head(model.hidden_states(tokens))
        if hasattr(logits, "placements"):
            return vocab_parallel_cross_entropy(logits.reshape(-1, 97), targets.reshape(-1)) / 21
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), reduction="sum") / 21

    losses = {"clm": lambda m: CausalLM()(m, batch).loss, "rows5": fused_rows_5, "clm_flag_off": lambda m: CausalLM()(m, batch).loss,
              "full_logits": lambda m: CausalLM(fused_loss=False)(m, batch).loss, "loss_parallel": torch_loss_parallel,
              "dpo": dpo, "rl": rl}
    for name, overrides, sp, how in (("untied", {}, False, "clm"), ("untied", {}, True, "clm"), ("untied", {}, False, "rows5"),
                                     ("untied", {}, False, "full_logits"), ("untied", {}, False, "loss_parallel"),
                                     ("tied", {"tie_embeddings": True}, False, "clm"), ("tied", {"tie_embeddings": True}, True, "clm"),
                                     ("tied", {"tie_embeddings": True}, False, "clm_flag_off"), ("untied", {}, False, "dpo"),
                                     ("untied", {}, True, "rl")):
        torch.manual_seed(0)
        reference, sharded = build({**tiny("llama"), **overrides}), build({**tiny("llama"), **overrides})
        sharded.load_state_dict(reference.state_dict())
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
        apply_tensor_parallel(sharded, mesh["tensor_parallel"], sequence_parallel=sp, loss_parallel=how != "clm_flag_off")
        if how in ("clm", "full_logits", "clm_flag_off", "dpo", "rl"):  # the others call hidden_states, past FSDP's root hook
            apply_fsdp(sharded, mesh["data_parallel"])
        # this rank's vocabulary rows of the head and of the embedding (FSDP over 1 rank keeps all)
        rows = (sharded.lm_head.weight.to_local().shape[0], sharded.wte.weight.to_local().shape[0])
        sharded_calls.clear()
        entropies.clear()
        ref_loss = (losses[how] if how in ("dpo", "rl") else losses["clm"])(reference)
        loss = losses[how](sharded)
        entropy_gap = (entropies.popitem()[1] - entropies.popitem()[1]).abs().max().item() if how == "rl" else 0.0
        ref_loss.backward()
        loss.backward()
        worst_grad = 0.0
        for p, q in zip(reference.parameters(), sharded.parameters()):
            full = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
            worst_grad = max(worst_grad, (full - p.grad).abs().max().item())
        tied = sharded.lm_head.weight is sharded.wte.weight
        results[(rank, "loss_parallel", name, sp, how)] = (max(abs(loss.item() - ref_loss.item()), entropy_gap), worst_grad, rows,
                                                           tied, type(loss).__name__, len(sharded_calls))
    lce._shard_logsumexp = real
    # meta-device init under FSDP over 2 ranks: each rank allocates half, the full weights equal a plain build
    torch.manual_seed(5)
    plain = build(tiny("gpt"))
    torch.manual_seed(5)
    model, rng = build_on_meta(tiny("gpt"))
    apply_fsdp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
    materialize_and_init(model, "cpu", rng)
    local = model.blocks[0].attn.qkv.weight.to_local().shape[0]
    worst = max((q.full_tensor() - p).abs().max().item() for p, q in zip(plain.parameters(), model.parameters()))
    results[(rank, "meta_fsdp")] = (worst, local)
    # meta-device init of a 2-D (TP 2 x DP 1) GPT: its qkv, split by head at compute time, is stored and
    # initialised as plain row shards of the whole matrix
    torch.manual_seed(5)
    model, rng = build_on_meta(tiny("gpt"))
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    apply_tensor_parallel(model, mesh["tensor_parallel"])
    apply_fsdp(model, mesh["data_parallel"])
    materialize_and_init(model, "cpu", rng)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    results[(rank, "meta_tp")] = max((full[k] - v).abs().max().item() for k, v in plain.state_dict().items())
    # init_from under a meta-device build: rank 0 alone reads the weights; every rank's shards get them (2-D GPT with its
    # tied head and head-split qkv, FSDP-only Llama, plus a frozen copy of the Llama); a bad state dict is one clear
    # error on both ranks, not a hang
    for family, shape in (("gpt", (1, 2)), ("llama", (2, 1))):
        torch.manual_seed(7)
        source = build(tiny(family)).state_dict()
        model, _ = build_on_meta(tiny(family))
        copies = [model, copy.deepcopy(model)] if family == "llama" else [model]
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "tensor_parallel"))
        for module in copies:
            if shape[1] > 1:
                apply_tensor_parallel(module, mesh["tensor_parallel"])
            apply_fsdp(module, mesh["data_parallel"])
            materialize(module, "cpu")
        reads = []
        count = broadcast_weights([Target(m) for m in copies], lambda reads=reads, source=source: reads.append(rank) or source)
        worst = max((v.full_tensor() - source[k]).abs().max().item() for m in copies for k, v in m.state_dict().items())
        results[(rank, "broadcast", family)] = (worst, reads, count, len(copies))
        for broken in ({k: v for k, v in source.items() if not k.startswith("blocks.1.")}, {**source, "extra.weight": torch.zeros(1)}):
            try:
                broadcast_weights([Target(m) for m in copies], lambda broken=broken: broken)
                results[(rank, "broadcast_error", family, len(broken))] = "no error"
            except CheckpointError as err:
                results[(rank, "broadcast_error", family, len(broken))] = str(err)
    # a scalar-head model (stage=reward, PPO's critic) on a fresh meta build: the backbone's init replayed, the head drawn
    # on a zero-stride shadow; the weights and the generator afterwards are those of a whole build
    from lmforge.models.heads import ScalarHeadModel

    torch.manual_seed(9)
    whole = ScalarHeadModel(build(tiny("llama")))
    after_whole = torch.rand(3)
    torch.manual_seed(9)
    base, rng = build_on_meta(tiny("llama"))
    model, head = build_with_shadow(ScalarHeadModel, base)
    after_meta = torch.rand(3)
    apply_fsdp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
    materialize_and_init(model, "cpu", rng, skip=frozenset(head))
    fill_values(model, head)
    worst = max((v.full_tensor() - whole.state_dict()[k]).abs().max().item() for k, v in model.state_dict().items())
    results[(rank, "meta_head")] = (worst, sorted(head), torch.equal(after_meta, after_whole))
    # mixed precision policy: bf16 compute and all-gathers, fp32 sharded master weights and gradients
    mixed = build(tiny("llama"))
    apply_fsdp(mixed, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)), param_dtype=torch.bfloat16,
               reduce_dtype=torch.float32)
    out = mixed(tokens)
    out.float().square().mean().backward()
    weight = mixed.blocks[0].attn.q_proj.weight
    results[(rank, "mixed")] = (out.dtype, weight.dtype, weight.grad.dtype)
    # reshard_after_forward=false keeps every block's gathered weights from forward to backward (ZeRO-2-like), true
    # frees them (ZeRO-3) except the last block's (backward needs it at once); cpu_offload: the same gradients
    for reshard, offload in ((True, False), (False, False), (True, True)):
        torch.manual_seed(0)
        reference, model = build(tiny("llama")), build(tiny("llama"))
        model.load_state_dict(reference.state_dict())
        apply_fsdp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)), reshard_after_forward=reshard,
                   cpu_offload=offload)
        out = model(tokens)
        gathered = [not isinstance(block.attn.q_proj.weight, DTensor) for block in model.blocks]  # a plain tensor: unsharded
        out.square().mean().backward()
        reference(tokens).square().mean().backward()  # both ranks see the same tokens: FSDP's mean is this gradient
        worst = max((q.grad.full_tensor() - p.grad).abs().max().item() for p, q in zip(reference.parameters(), model.parameters()))
        results[(rank, "reshard", reshard, offload)] = (gathered, worst)


@pytest.mark.slow
def test_tensor_parallel_and_meta_init_on_two_cpu_ranks() -> None:
    results = _on_two_ranks(_worker)
    for rank in (0, 1):
        for family in ("llama", "mixtral", "gpt", "gpt_alibi"):
            for sp in (False, True):
                logits, grads, norm = results[(rank, family, sp)]
                assert logits < 1e-5 and grads < 1e-5 and norm < 1e-5, (family, sp, rank, logits, grads, norm)
                if family.startswith("gpt"):
                    assert results[(rank, family, sp, "qkv")] == (48, 2)  # 96 fused rows, 48 per rank; 2 of 4 heads
            assert "multiple of tensor_parallel_size=2, got 7" in results[(rank, family, "odd")]
        for sp in (False, True):
            assert results[(rank, "embedding", sp)] == (0.0, 0.0, (49, 48)[rank]), (rank, sp, results[(rank, "embedding", sp)])
        for family, sp in (("gpt", False), ("gpt", True), ("llama", True)):
            loss, grads = results[(rank, "compiled", family, sp)]
            assert loss < 1e-5 and grads < 1e-5, (rank, family, sp, loss, grads)
        for name, sp, how, chunks in (("untied", False, "clm", 1), ("untied", True, "clm", 1), ("untied", False, "rows5", 5),
                                      ("untied", False, "full_logits", 0), ("untied", False, "loss_parallel", 0), ("tied", False, "clm", 1), ("tied", True, "clm", 1),
                                      ("tied", False, "clm_flag_off", 1), ("untied", False, "dpo", 1), ("untied", True, "rl", 1)):
            loss, grads, rows, tied, kind, on_shards = results[(rank, "loss_parallel", name, sp, how)]
            assert loss < 1e-5 and grads < 1e-5 and kind == "Tensor", (name, sp, how, rank, loss, grads, kind)
            half = (49, 48)[rank]
            assert (rows, tied, on_shards) == ((half, half), name == "tied", chunks), (name, how, rows, tied, on_shards)
        worst, local_rows = results[(rank, "meta_fsdp")]
        assert worst == 0.0 and local_rows == 48  # qkv: 96 rows, 48 per rank
        assert results[(rank, "meta_tp")] == 0.0
        assert results[(rank, "meta_head")] == (0.0, ["head.bias", "head.weight"], True)
        for family, copies in (("gpt", 1), ("llama", 2)):
            worst, reads, count, n = results[(rank, "broadcast", family)]
            assert worst == 0.0 and reads == ([0] if rank == 0 else []) and n == copies, (family, rank, worst, reads)
            assert count == len(build(tiny(family)).state_dict())
            errors = [v for k, v in results.items() if k[:3] == (rank, "broadcast_error", family)]
            assert len(errors) == 2 and all("init_from weights do not fit the model" in e for e in errors), errors
            assert any("missing ['blocks.1." in e for e in errors) and any("unexpected ['extra.weight']" in e for e in errors), errors
        for position in ("learned", "alibi"):
            assert results[(rank, "generate", position)] == (True, 2), position  # same tokens; 2 of the 4 heads cached
        assert results[(rank, "fsdp_generate")] is True
        for family in ("gpt", "llama"):
            values, grads = results[(rank, "scalar_head", family)]
            assert values < 1e-5 and grads < 1e-5, (family, values, grads)
        assert results[(rank, "mixed")] == (torch.bfloat16, torch.float32, torch.float32)
        for reshard, offload, gathered in ((True, False, [False, True]), (False, False, [True, True]), (True, True, [False, True])):
            seen, worst = results[(rank, "reshard", reshard, offload)]
            assert seen == gathered and worst < 1e-6, (reshard, offload, seen, worst)


PEFT_CASES = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["all-linear"], "bias": "lora_only"},
    "lora_all_biases": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["attention"], "bias": "all"},  # norms' too
    "adapter": {"method": "adapter", "bottleneck": 8, "targets": ["attention", "mlp"]},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3, "hidden": 16},
    # LoRA on an untied head: the head stays replicated (not vocab-parallel); GPT's tied head refuses LoRA anyway
    "lora_head": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["lm_head", "attention"]},
}


def _peft_cases(family: str) -> list[str]:
    return [m for m in PEFT_CASES if not (m == "lora_head" and family == "gpt")]


def _peft_worker(rank: int, results: dict) -> None:
    """PEFT under TP (2 ranks x DP 1, FSDP on top): every family x method x sequence parallelism gives the logits and
    the trainable parameters' gradients of the same PEFT model on one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lmforge.parallel import apply_fsdp
    from lmforge.peft import apply_peft, trainable_state_dict

    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    for family in ("gpt", "llama", "mixtral"):
        for method in _peft_cases(family):
            cfg = PEFT_CASES[method]
            for sp in (False, True):
                torch.manual_seed(0)
                reference, sharded = build(tiny(family)), build(tiny(family))
                apply_peft(reference, cfg)
                with torch.no_grad():  # LoRA's B and an adapter's up start at zero: make every PEFT weight matter
                    for name, p in reference.named_parameters():
                        if "lora_B" in name or ".adapter.up." in name:
                            p.normal_(0, 0.1)
                apply_peft(sharded, cfg)
                sharded.load_state_dict(reference.state_dict())
                mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
                apply_tensor_parallel(sharded, mesh["tensor_parallel"], sequence_parallel=sp)
                apply_fsdp(sharded, mesh["data_parallel"])
                ref_logits, logits = reference(tokens), sharded(tokens)
                ref_logits.square().mean().backward()
                logits.square().mean().backward()
                trained = [(n, p, q) for (n, p), q in zip(reference.named_parameters(), sharded.parameters()) if p.requires_grad]
                worst = max(((q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad) - p.grad).abs().max().item()
                            for _, p, q in trained)
                saved = trainable_state_dict(sharded)
                whole = all(not isinstance(v, DTensor) or v.full_tensor().shape == dict(reference.named_parameters())[k].shape
                            for k, v in saved.items())
                # the frozen base stays frozen (torch's SequenceParallel re-registers norm weights as trainable)
                same_trained = [n for n, q in sharded.named_parameters() if q.requires_grad] == [n for n, _, _ in trained]
                results[(rank, family, method, sp)] = ((logits - ref_logits).abs().max().item(), worst, len(trained), whole and same_trained)
    # init_from + PEFT on a meta-device build (TP 2 x FSDP): base weights broadcast from rank 0 under their plain
    # checkpoint keys (LoRA's base_layer dropped), PEFT weights drawn as a whole build draws them; every tensor and
    # the generator's state afterwards equal the whole build's
    # a fresh run (no init_from): the base's init replayed with the PEFT weights in place, drawing nothing for them
    for family in ("gpt", "llama"):
        for method in ("lora", "adapter", "prefix"):
            for fresh in (False, True):
                torch.manual_seed(0)
                whole = build(tiny(family))
                source = {k: v.clone() for k, v in whole.state_dict().items()}
                apply_peft(whole, PEFT_CASES[method])
                after_whole = torch.rand(3)
                torch.manual_seed(0)
                model, rng = build_on_meta(tiny(family))
                _, values = apply_peft_on_meta(model, PEFT_CASES[method])
                after_meta = torch.rand(3)
                mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
                apply_tensor_parallel(model, mesh["tensor_parallel"])
                apply_fsdp(model, mesh["data_parallel"])
                if fresh:
                    materialize_and_init(model, "cpu", rng, skip=frozenset(values))
                else:
                    materialize(model, "cpu")
                    broadcast_weights([Target(model, skip=frozenset(values))], lambda source=source: source)
                fill_values(model, values)
                expected, got = whole.state_dict(), model.state_dict()
                worst = max((got[k].full_tensor() if isinstance(got[k], DTensor) else got[k]).sub(v).abs().max().item() for k, v in expected.items())
                results[(rank, "meta_peft", family, method, fresh)] = (got.keys() == expected.keys(), worst, torch.equal(after_meta, after_whole),
                                                                       len(values))


@pytest.mark.slow
def test_peft_under_tensor_parallel_matches_one_process_on_two_cpu_ranks() -> None:
    results = _on_two_ranks(_peft_worker)
    for rank in (0, 1):
        for family in ("gpt", "llama", "mixtral"):
            for method in _peft_cases(family):
                for sp in (False, True):
                    logits, grads, trained, whole = results[(rank, family, method, sp)]
                    assert logits < 1e-5 and grads < 1e-5 and trained > 0 and whole, (rank, family, method, sp, logits, grads, trained)
        for family in ("gpt", "llama"):
            for method in ("lora", "adapter", "prefix"):
                for fresh in (False, True):
                    same_keys, worst, same_generator, drawn = results[(rank, "meta_peft", family, method, fresh)]
                    assert same_keys and worst == 0.0 and same_generator and drawn > 0, (rank, family, method, fresh, worst, same_generator)


def test_several_nodes_need_a_cluster_job_or_lightnings_launcher_variables(monkeypatch) -> None:
    """What passes `check_cluster`: a launcher that Lightning detects (SLURM's srun here) or MASTER_ADDR / NODE_RANK set
    by hand on each node; one node needs nothing. The refusal itself is in tests/faults/test_config_faults.py."""
    from omegaconf import OmegaConf

    from lmforge.preflight import CLUSTER_VARIABLES, check_cluster

    for name in (*CLUSTER_VARIABLES, "SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    two = OmegaConf.create({"trainer": {"num_nodes": 2}})
    check_cluster(OmegaConf.create({"trainer": {"num_nodes": 1}}))
    with pytest.raises(ConfigError, match="trainer.num_nodes: 2 nodes"):
        check_cluster(two)
    monkeypatch.setenv("NODE_RANK", "1")
    check_cluster(two)
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("SLURM_NTASKS", "16")  # inside `srun`: Lightning's SLURMEnvironment takes over
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    check_cluster(two)
