"""Run metadata (git, params, fingerprints), hyperparameter flattening, crash reports, rank-0 logging."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from lmforge import tracking
from lmforge.cli import run_entry
from lmforge.errors import ConfigError

GPT = {"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 16, "vocab_size": 50}
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("one\n")
    git(repo, "init", "-q")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "init")
    return repo


@needs_git
def test_git_info_clean_then_dirty_writes_diff(repo: Path, tmp_path: Path):
    clean = tracking.git_info(repo, tmp_path / "run")
    assert len(clean["git_commit"]) == 40 and clean["git_dirty"] is False and clean["git_diff_file"] is None
    (repo / "a.txt").write_text("two\n")
    dirty = tracking.git_info(repo, tmp_path / "run")
    assert dirty["git_dirty"] is True and dirty["git_commit"] == clean["git_commit"]
    assert "+two" in Path(dirty["git_diff_file"]).read_text()


def test_git_info_outside_a_repo_is_all_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert set(tracking.git_info(tmp_path).values()) == {None}
    monkeypatch.setenv("PATH", "")  # no git binary at all
    assert tracking.git_info(tmp_path)["git_commit"] is None


@needs_git
def test_run_metadata_fields_file_and_param_counts(repo: Path, tmp_path: Path):
    from lmforge.models import build

    out = tmp_path / "run"
    cfg = OmegaConf.create({"paths": {"output_dir": str(out), "root_dir": str(repo)}, "model": GPT, "peft": None})
    tokenizer = SimpleNamespace(fingerprint=lambda: "tok123")
    datamodule = SimpleNamespace(corpus=SimpleNamespace(fingerprint=lambda: "corpus456"), tokens_dir=None)
    meta = tracking.run_metadata(cfg, tokenizer, datamodule)
    assert json.loads((out / "run_meta.json").read_text()) == meta
    for key in ("git_commit", "git_dirty", "command", "argv", "hostname", "python_version", "torch_version", "lightning_version"):
        assert key in meta, key
    assert meta["tokenizer_fingerprint"] == "tok123" and meta["data_fingerprint"] == "corpus456"
    model = build(GPT)
    assert {k: meta[k] for k in ("params_total", "params_trainable", "params_non_embedding")} == tracking.param_counts(model)
    embeddings = model.wte.weight.numel() + model.wpe.weight.numel()  # head tied to wte
    assert meta["params_non_embedding"] == meta["params_total"] - embeddings
    # a datamodule without a corpus, PEFT (trainable unknown before the model is wrapped), no run dir
    cfg = OmegaConf.create({"paths": {"root_dir": str(repo)}, "model": GPT, "peft": {"method": "lora"}})
    meta = tracking.run_metadata(cfg, None, object())
    assert meta["data_fingerprint"] is None and meta["params_trainable"] is None and meta["run_dir"] is None


def test_hyperparams_nested_for_wandb_dotted_elsewhere():
    config = {"model": {"n_layer": 2, "family": "gpt"}, "tags": ["a"], "seed": 1}
    meta = {"git_commit": "abc", "argv": ["train.py"]}
    flat = tracking.hyperparams_for(object(), config, meta)
    assert flat == {"model.n_layer": 2, "model.family": "gpt", "tags": ["a"], "seed": 1, "meta/git_commit": "abc"}
    WandbLogger = type("WandbLogger", (), {})
    nested = tracking.hyperparams_for(WandbLogger(), config, meta)
    assert nested["model"] == {"n_layer": 2, "family": "gpt"} and nested["meta/git_commit"] == "abc"


def test_wandb_overrides_offline_drops_log_model_and_no_group_outside_sweep():
    node = {"group": None, "log_model": True}
    assert tracking.wandb_overrides(OmegaConf.create({"task_name": "t"}), node, offline=True) == {"offline": True, "log_model": False}
    assert tracking.wandb_overrides(OmegaConf.create({}), {"log_model": True}, offline=False) == {"offline": False}


def test_crash_report_has_traceback_and_step(tmp_path: Path):
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})

    def crashing(cfg):
        trainer = SimpleNamespace(global_step=7)  # noqa: F841 - found in the traceback's frames
        raise RuntimeError("boom at step 7")

    with pytest.raises(RuntimeError, match="boom"):
        run_entry(crashing, cfg)
    text = (tmp_path / "crash.txt").read_text()
    assert "step: 7" in text and "time_utc:" in text
    assert "Traceback" in text and "RuntimeError: boom at step 7" in text


def test_user_error_and_unresolvable_run_dir_write_no_crash_report(tmp_path: Path):
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})

    def bad_config(cfg):
        raise ConfigError("model.n_head", "must divide n_embd", "set model.n_head=4")

    with pytest.raises(SystemExit) as exc:
        run_entry(bad_config, cfg)
    assert exc.value.code == 2 and not (tmp_path / "crash.txt").exists()
    hydra_dir = OmegaConf.create({"paths": {"output_dir": "${hydra:runtime.output_dir}"}})  # not under Hydra
    with pytest.raises(ValueError, match="original"):
        run_entry(lambda cfg: (_ for _ in ()).throw(ValueError("original")), hydra_dir)


def test_get_logger_speaks_on_rank_zero_only(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    logger = tracking.get_logger("lmforge.test_tracking")
    with caplog.at_level(logging.INFO, logger="lmforge.test_tracking"):
        monkeypatch.setattr(tracking, "global_rank", lambda: 1)
        logger.info("hidden info")
        logger.warning("hidden warning")
        logger.error("rank 1 error")
        monkeypatch.setattr(tracking, "global_rank", lambda: 0)
        logger.info("rank 0 info")
    assert [r.getMessage() for r in caplog.records] == ["rank 1 error", "rank 0 info"]


def test_sweep_group_only_in_multirun_jobs(monkeypatch: pytest.MonkeyPatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("LMFORGE_ROOT", str(Path(__file__).resolve().parents[2]))
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=wandb"], return_hydra_config=True)
    try:
        for mode, expected in (("RUN", None), ("MULTIRUN", "train-2025-01-01_00-00-00")):
            OmegaConf.set_readonly(cfg.hydra, False)  # set_config locks it again
            cfg.hydra.mode, cfg.hydra.sweep.dir = mode, "/logs/train/multiruns/2025-01-01_00-00-00"
            HydraConfig.instance().set_config(cfg)
            assert tracking.sweep_group(cfg) == expected
        assert tracking.wandb_overrides(cfg, cfg.logger.wandb, offline=False)["group"] == expected
    finally:
        HydraConfig.instance().cfg = None
