"""LMStage wiring: compile policy, optimizer param groups, checkpoint metadata."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch

from lmforge.objectives.clm import CausalLM
from lmforge.optim.muon import MuonAdamW
from lmforge.optim.schedulers import cosine_warmup
from lmforge.stages.base import SCHEMA_VERSION, LMStage

MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 8, "vocab_size": 32}


def stage(**kw) -> LMStage:
    s = LMStage(MODEL, CausalLM(), **kw)
    s.configure_model()
    return s


def test_compile_auto_is_off_without_cuda_and_explicit_values_win():
    assert stage(compile="auto").should_compile() is False
    assert stage(compile=False).should_compile() is False
    s = LMStage(MODEL, CausalLM(), compile=True)
    assert s.should_compile() is True


def test_compile_per_block_compiles_each_block_not_the_model():
    s = stage(compile="per_block")  # lazy: compiling happens at the first call, not here
    assert all(block._compiled_call_impl is not None for block in s.model.blocks)
    assert s.model._compiled_call_impl is None
    s._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")))
    assert s.should_compile() is False  # on CUDA too: not the model on top of its blocks


def test_adamw_runs_unfused_when_fp16_clips_gradients():
    from lmforge.optim.adamw import AdamW

    s = stage(optimizer=partial(AdamW, lr=1e-3, weight_decay=0.1))
    s._trainer = SimpleNamespace(estimated_stepping_batches=10, gradient_clip_val=1.0, precision_plugin=SimpleNamespace(scaler=object()))
    assert s.configure_optimizers().defaults["fused"] is False  # Lightning refuses to clip for fused under a GradScaler
    s._trainer.precision_plugin = SimpleNamespace(scaler=None)  # bf16 / fp32: the default (fused where possible)
    assert s.configure_optimizers().defaults["fused"] is not False


def attach_fake_trainer(s: LMStage, steps: int) -> None:
    s._trainer = SimpleNamespace(estimated_stepping_batches=steps)


def test_adamw_groups_decay_matrices_only_and_scheduler_is_stepwise():
    s = stage(optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), scheduler=partial(cosine_warmup, warmup_steps=2, min_lr=1e-5))
    attach_fake_trainer(s, 10)
    out = s.configure_optimizers()
    groups = out["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert out["lr_scheduler"]["interval"] == "step"
    assert out["optimizer"].param_groups[0]["lr"] == 1e-3 / 2  # warmup step 0 of 2


def test_muon_optimizer_gets_muon_groups():
    s = stage(optimizer=partial(MuonAdamW, lr=1e-3, weight_decay=0.1))
    attach_fake_trainer(s, 10)
    opt = s.configure_optimizers()
    assert isinstance(opt, MuonAdamW)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False, False]


def test_checkpoint_carries_metadata():
    s = stage(metadata={"config": {"a": 1}, "tokenizer": "{}", "wandb_id": "abc"})
    ckpt: dict = {}
    s.on_save_checkpoint(ckpt)
    assert ckpt["lmforge"] == {"schema_version": SCHEMA_VERSION, "config": {"a": 1}, "tokenizer": "{}", "wandb_id": "abc",
                               "peft": None, "stage": "LMStage"}  # PEFT config and stage class: loaders merge / refuse by them


def test_manual_optimisation_logs_the_pre_clip_norm_then_clips_to_max_grad_norm():
    """RL stages optimise manually: Lightning never calls configure_gradient_clipping, so the stage clips in
    on_before_optimizer_step (which optimizer.step() runs first), after logging the norm it clipped from."""
    s = stage()
    s.automatic_optimization, s.max_grad_norm = False, 0.5
    s._trainer = SimpleNamespace(strategy=None, precision_plugin=SimpleNamespace(scaler=None))
    logged = {}
    s.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    params = list(s.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1.0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    s.on_before_optimizer_step(None)
    assert logged["train/grad_norm"] == torch.tensor(norm).item()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    assert abs(after - 0.5) < 1e-4  # clip_grad_norm_'s 1e-6 guard in the denominator


def test_empty_param_groups_are_dropped_so_the_scheduler_matches_what_deepspeed_keeps():
    s = stage(optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), scheduler=partial(cosine_warmup, warmup_steps=2, min_lr=1e-5))
    for p in s.parameters():
        p.requires_grad_(p.ndim >= 2)  # like LoRA: only matrices train, the no-decay group is empty
    attach_fake_trainer(s, 10)
    out = s.configure_optimizers()
    assert [g["weight_decay"] for g in out["optimizer"].param_groups] == [0.1]
    assert len(out["lr_scheduler"]["scheduler"].base_lrs) == 1


def test_dpo_precomputed_reference_is_never_taken_from_resumed_weights():
    """precompute_reference computes the reference log-probs with the policy before its first step (no copy of the
    weights); a resumed run whose checkpoint lacks them would take them from trained weights: refused, with the fix."""
    import pytest

    from lmforge.errors import CheckpointError
    from lmforge.stages.dpo import DPOStage

    s = DPOStage(MODEL, CausalLM(), precompute_reference=True)
    s.register_buffer("reference_train", torch.full((4, 2), float("nan")))
    s.register_buffer("reference_val", torch.zeros(2, 2))
    s.model = torch.nn.Linear(1, 1)
    s._trainer = SimpleNamespace(ckpt_path="runs/x/checkpoints/last.ckpt", loggers=[])
    with pytest.raises(CheckpointError, match="last.ckpt has no complete reference log-probs.*init_from"):
        s.on_fit_start()


def lightning_eval_mode_warnings(s: LMStage) -> list[str]:
    """What Lightning's fit loop warns about modules in eval mode as training starts (its own check, run on `s`)."""
    import warnings

    from lightning.pytorch.loops.fit_loop import _FitLoop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.expect_frozen_modules_in_eval_mode()  # on_fit_start's call, after `always`, as in a run
        _FitLoop._warn_if_modules_in_eval_mode(SimpleNamespace(trainer=SimpleNamespace(lightning_module=s)))
    return [str(w.message) for w in caught if "eval mode" in str(w.message)]


def test_a_frozen_reference_in_eval_mode_is_expected_but_a_trained_module_in_eval_mode_still_warns():
    import copy

    s = stage()
    s.reference = copy.deepcopy(s.model).requires_grad_(False).eval()  # what DPO's / RL's frozen_copy adds
    assert lightning_eval_mode_warnings(s) == []
    s.model.blocks[0].eval()  # a trained block left in eval mode (dropout off): the user should hear of it
    assert len(lightning_eval_mode_warnings(s)) == 1
    s.model.blocks[0].train()
    s.reference.requires_grad_(True)  # trainable parameters: not a frozen companion
    assert len(lightning_eval_mode_warnings(s)) == 1
