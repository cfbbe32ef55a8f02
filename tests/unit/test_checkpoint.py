"""Checkpoint paths (`ckpt_path=...`) and safe loading of lmforge checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import find_last_checkpoint, load_checkpoint, model_state_dict, resolve_ckpt_path
from lmforge.errors import CheckpointError
from lmforge.models import GPT, GPTConfig

TASK = "shakespeare"


def _touch_ckpt(log_dir: Path, run: str, mtime: float, name: str = "last.ckpt") -> Path:
    path = log_dir / TASK / "runs" / run / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "lmforge": {}}, path)  # loadable: `last` resolves to the newest readable one
    os.utime(path, (mtime, mtime))
    return path


# --- resolve_ckpt_path ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_resolve_none(tmp_path: Path, value: str | None) -> None:
    assert resolve_ckpt_path(value, tmp_path, TASK) is None


def test_resolve_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    assert resolve_ckpt_path(str(f), tmp_path, TASK) == str(f)


def test_resolve_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("~/a.ckpt", tmp_path / "logs", TASK) == str(tmp_path / "a.ckpt")


def test_resolve_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "epoch=3.ckpt")
    with pytest.raises(CheckpointError) as info:
        resolve_ckpt_path(missing, tmp_path, TASK)
    msg = str(info.value)
    assert missing in msg and "does not exist" in msg


def test_resolve_directory(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    d.mkdir()
    with pytest.raises(CheckpointError, match="is a directory") as info:
        resolve_ckpt_path(str(d), tmp_path, TASK)
    assert str(d) in str(info.value)


def test_resolve_last_picks_newest_by_mtime(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    # names sort opposite to mtimes, so a name-based pick would be wrong
    _touch_ckpt(logs, "2024-01-03_00-00-00", mtime=1_000)
    newest = _touch_ckpt(logs, "2024-01-01_00-00-00", mtime=3_000)
    _touch_ckpt(logs, "2024-01-02_00-00-00", mtime=2_000)
    _touch_ckpt(logs, "2024-01-04_00-00-00", mtime=9_000, name="epoch=1-step=10.ckpt")  # not a last.ckpt
    _touch_ckpt(tmp_path / "other_logs", "x", mtime=10_000)  # another log dir
    other_task = logs / "other_task" / "runs" / "r" / "checkpoints" / "last.ckpt"
    other_task.parent.mkdir(parents=True)
    other_task.write_bytes(b"x")
    os.utime(other_task, (20_000, 20_000))

    assert resolve_ckpt_path("last", logs, TASK) == str(newest)
    assert find_last_checkpoint(logs, TASK) == newest


def test_resolve_last_excludes_current_run(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    older = _touch_ckpt(logs, "old", mtime=1_000)
    current = _touch_ckpt(logs, "current", mtime=5_000)
    assert resolve_ckpt_path("last", logs, TASK) == str(current)
    assert resolve_ckpt_path("last", logs, TASK, exclude=current.parent.parent) == str(older)


def test_resolve_last_none_found(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    with pytest.raises(CheckpointError, match="ckpt_path=last") as info:
        resolve_ckpt_path("last", logs, TASK)
    assert str(logs / TASK / "runs") in str(info.value)
    # a run dir without last.ckpt still counts as none
    _touch_ckpt(logs, "r1", mtime=1_000, name="epoch=0.ckpt")
    with pytest.raises(CheckpointError):
        find_last_checkpoint(logs, TASK)
    # the only last.ckpt is excluded
    only = _touch_ckpt(logs, "r2", mtime=2_000)
    with pytest.raises(CheckpointError):
        find_last_checkpoint(logs, TASK, exclude=only.parent.parent)


# --- load_checkpoint --------------------------------------------------------------------------------


def test_load_text_file(tmp_path: Path) -> None:
    f = tmp_path / "notes.ckpt"
    f.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
        load_checkpoint(f)
    assert str(f) in str(info.value)


def test_load_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.ckpt"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(f)


class Evil:
    def __reduce__(self):  # would run code under a full unpickler
        return (os.system, ("echo pwned",))


def test_load_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    f = tmp_path / "evil.ckpt"
    torch.save({"lmforge": {}, "state_dict": {}, "payload": Evil()}, f)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(f)


@pytest.mark.parametrize(
    "obj",
    [
        {"state_dict": {"model.w": torch.zeros(2)}},  # plain Lightning checkpoint
        {"lmforge": {"schema_version": 1}},  # no weights
        [1, 2, 3],
        torch.zeros(3),
    ],
)
def test_load_non_lmforge(tmp_path: Path, obj: object) -> None:
    f = tmp_path / "foreign.ckpt"
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match="not an lmforge checkpoint") as info:
        load_checkpoint(f)
    assert str(f) in str(info.value)


def test_load_valid_and_strip_prefix(tmp_path: Path) -> None:
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, max_seq_len=4, vocab_size=13)
    torch.manual_seed(0)
    model = GPT(cfg)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd["val_nll.sum_value"] = torch.tensor(1.0)  # stage-level state that is not model weights
    meta = {"schema_version": 1, "config": {"model": {"n_layer": 1}}, "tokenizer": "{}"}
    f = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "lmforge": meta, "global_step": 7}, f)

    ckpt = load_checkpoint(f)
    assert ckpt["lmforge"] == meta and ckpt["global_step"] == 7
    weights = model_state_dict(ckpt)
    assert set(weights) == set(model.state_dict())  # prefix gone, non-model keys dropped
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)

    fresh = GPT(cfg)
    fresh.load_state_dict(weights, strict=True)
    x = torch.randint(0, 13, (2, 4))
    assert torch.equal(fresh(x), model(x))


def test_model_state_dict_prefix_rules() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    out = model_state_dict({"state_dict": {"model.wte.weight": a, "model.model.x": b, "modelx.y": c, "other.z": c}})
    assert set(out) == {"wte.weight", "model.x"}  # only the first `model.` is stripped
    assert out["wte.weight"] is a and out["model.x"] is b


def test_reward_checkpoints_are_refused_where_a_language_model_is_expected():
    from lmforge.checkpoint import model_state_dict
    from lmforge.errors import CheckpointError

    ckpt = {"state_dict": {"model.head.weight": torch.zeros(1, 4)}, "lmforge": {"stage": "RewardStage"}}
    with pytest.raises(CheckpointError, match="holds a reward model.*stage.reward_model"):
        model_state_dict(ckpt)
    assert set(model_state_dict(ckpt, scalar_head=True)) == {"head.weight"}
    with pytest.raises(CheckpointError, match="must be a checkpoint written by stage=reward"):
        model_state_dict({"state_dict": {}, "lmforge": {"stage": "SFTStage"}}, scalar_head=True)


@pytest.mark.parametrize("kind", ["empty_dir", "text_file"])
def test_init_from_a_path_that_is_no_model_names_init_from_and_both_fixes(tmp_path: Path, kind: str) -> None:
    """init_from reads only the architecture up front (weights later, on rank 0 under FSDP): a path that is neither a
    checkpoint nor an HF directory is refused there, under the key the run was given."""
    from lmforge.init_from import load_init_source

    path = tmp_path / "model"
    path.mkdir() if kind == "empty_dir" else path.write_text("not a model")
    with pytest.raises(CheckpointError, match=r"init_from=.*is not a readable checkpoint.*Fix: pass a Hugging Face model directory \(with config.json\) or"):
        load_init_source(path)


def test_name_keyed_optimizer_state_renumbers_into_torchs_own_layout() -> None:
    """A sharded checkpoint keeps AdamW's state keyed by parameter name (DCP's layout); a non-sharded resume needs
    torch's (numbered by position in the param groups). Reference: the optimizer's own state_dict()."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from lmforge.parallel.sharded_checkpoint import indexed_optimizer_state

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, max_seq_len=8))
    params = dict(model.named_parameters())
    decay = [n for n, p in params.items() if p.ndim >= 2]
    groups = [{"params": [params[n] for n in reversed(decay)], "weight_decay": 0.1},  # an order unlike named_parameters'
              {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    opt.step()
    by_name = get_optimizer_state_dict(model, opt)
    assert set(by_name["state"]) == set(params)  # names, not numbers
    renumbered, own = indexed_optimizer_state(by_name), opt.state_dict()
    assert [g["params"] for g in renumbered["param_groups"]] == [g["params"] for g in own["param_groups"]]
    assert renumbered["state"].keys() == own["state"].keys()
    for i, state in own["state"].items():
        for key, value in state.items():
            assert torch.equal(renumbered["state"][i][key], value), (i, key)
    with pytest.raises(KeyError, match="no param group lists"):
        indexed_optimizer_state({"state": {"stray.weight": {}}, "param_groups": []})


def test_a_deepspeed_zero_directory_is_refused_for_resume_under_another_strategy_with_the_fix(tmp_path: Path) -> None:
    from lmforge.checkpoint_io import AtomicCheckpointIO

    ckpt = tmp_path / "last.ckpt"
    (ckpt / "global_step6").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step6")  # how a ZeRO checkpoint directory names its newest tag
    with pytest.raises(CheckpointError, match="DeepSpeed ZeRO checkpoint: it resumes under a deepspeed_\\* strategy only. Fix:.*init_from="):
        AtomicCheckpointIO().load_checkpoint(ckpt)


def test_position_keyed_optimizer_state_is_named_by_the_live_optimizers_order(tmp_path: Path) -> None:
    """The reverse, for a single-file checkpoint resumed under FSDP. Reference: torch's name-keyed
    get_optimizer_state_dict of the same optimizer. Lightning's rekeying (model.parameters() order) gets it wrong."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    from lmforge.parallel.full_checkpoint import named_optimizer_state

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, max_seq_len=8))
    params = dict(model.named_parameters())
    decay = [n for n, p in params.items() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": 0.1},
                             {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}], lr=1e-2)
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    opt.step()
    named, reference = named_optimizer_state(opt.state_dict(), opt, model, tmp_path), get_optimizer_state_dict(model, opt)
    assert [g["params"] for g in named["param_groups"]] == [g["params"] for g in reference["param_groups"]]
    assert named["state"].keys() == reference["state"].keys()
    for name, state in reference["state"].items():
        for key, value in state.items():
            assert torch.equal(named["state"][name][key], value), (name, key)
    lightnings = FSDP.rekey_optim_state_dict(opt.state_dict(), OptimStateKeyType.PARAM_NAME, model)  # what it used
    assert any(lightnings["state"][n]["exp_avg"].shape != params[n].shape for n in lightnings["state"])
    other = torch.optim.AdamW(model.parameters(), lr=1e-2)  # one group: another optimizer setup
    with pytest.raises(CheckpointError, match=r"param groups of \[\d+, \d+\] parameters, this run's \[\d+\].*Fix:.*init_from="):
        named_optimizer_state(opt.state_dict(), other, model, tmp_path)
