"""`lmforge.optim.adamw.AdamW`: fused by default where torch has the kernel, same updates as torch's loop."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmforge.optim.adamw import AdamW, can_fuse
from lmforge.optim.param_groups import decay_param_groups


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def test_fused_by_default_on_cpu_and_explicit_choices_pass_through() -> None:
    m = model()
    assert AdamW(m.parameters()).defaults["fused"] is True
    assert AdamW(decay_param_groups(m, 0.1)).defaults["fused"] is True
    assert not AdamW(m.parameters(), fused=False).defaults["fused"]
    opt = AdamW(m.parameters(), foreach=True)
    assert not opt.defaults["fused"] and opt.defaults["foreach"]
    assert isinstance(opt, torch.optim.AdamW)
    assert not can_fuse([torch.zeros(2, dtype=torch.long)]) and not can_fuse([])


def test_same_updates_as_torch_loop_adamw() -> None:
    a, b = model(), model()
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
    opt_a, opt_b = AdamW(decay_param_groups(a, 0.1), **kw), torch.optim.AdamW(decay_param_groups(b, 0.1), **kw)
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_default_config_builds_it() -> None:
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "optimizer" / "adamw.yaml")
    opt = instantiate(cfg)(decay_param_groups(model(), cfg.weight_decay))
    assert type(opt) is AdamW and opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.99)


def test_fsdp2_dtensor_parameters_get_the_fused_kernel_and_the_same_updates() -> None:
    """FSDP2 parameters are DTensors on one mesh: fused (one pass per shard), updates equal to torch's loop on the
    unsharded model; parameters spread over two meshes keep torch's choice."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded, plain = model(), model()
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(sharded, mesh=mesh)
        kw = {"lr": 1e-2, "weight_decay": 0.1}
        opt_a, opt_b = AdamW(sharded.parameters(), **kw), torch.optim.AdamW(plain.parameters(), foreach=False, **kw)
        assert opt_a.defaults["fused"] is True
        x = torch.randn(32, 8)
        for _ in range(4):
            for m, opt in ((sharded, opt_a), (plain, opt_b)):
                m(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
        for p, q in zip(sharded.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-6)
        other = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        mixed = [torch.nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Replicate()])),
                 torch.nn.Parameter(distribute_tensor(torch.zeros(4), other, [Replicate()]))]
        assert not can_fuse(mixed) and can_fuse(mixed[:1])
    finally:
        dist.destroy_process_group()
