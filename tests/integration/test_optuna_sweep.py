"""`python train.py -m hparams_search=lr_wd`: an Optuna study in SQLite that a second invocation resumes, and a
diverged trial that completes with the bad score instead of stopping the sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _group_override(group: str, option: str) -> str:
    """`group=option` once train.yaml lists the group in its defaults (`- group: null`), else `+group=option`."""
    defaults = (ROOT / "conf" / "train.yaml").read_text()
    return f"{group}={option}" if f"- {group}:" in defaults else f"+{group}={option}"


def _tiny_corpus(path: Path) -> Path:
    """A few KB of Shakespeare as 8 files: the byte-level token cache builds in well under a second."""
    from lmforge.data.corpus import shakespeare_dir

    text = "".join(p.read_text(encoding="utf-8")[:6000] for p in sorted(Path(shakespeare_dir()).rglob("*.md"))[:4])
    path.mkdir()
    for i in range(8):
        (path / f"{i}.txt").write_text(text[i * 3000:(i + 1) * 3000], encoding="utf-8")
    return path


def test_optuna_sweep_persists_study_and_resumes(cli, tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus")
    db = tmp_path / "optuna" / "s.db"  # the directory does not exist: lmforge.sweeps.EnsureSqliteDir makes it
    common = [
        "-m", _group_override("hparams_search", "lr_wd"), "debug=fast", "tokenizer=byte", "data=text_files",
        f"data.corpus.train_glob={corpus}/*.txt", "data.corpus.val_every=4", "data.clean=null",
        "data.batch_size=4", "data.val_batch_size=4", "data.block_size=32",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1", "model.intermediate_size=64",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_model_summary=false", "callbacks.progress_bar=null", "~callbacks.samples",
        "~callbacks.model_summary", f"hydra.sweeper.storage=sqlite:///{db}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    proc = cli("train.py", *common, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sweep1'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep1").iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert (tmp_path / "sweep1" / "optimization_results.yaml").is_file()
    study = optuna.load_study(study_name="lr_wd", storage=f"sqlite:///{db}")
    first = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(first) == 3 and len(study.trials) == 3
    for t in first:
        assert 3e-4 <= t.params["optimizer.lr"] <= 1e-2 and 0.0 <= t.params["optimizer.weight_decay"] <= 0.2
        assert 0 < t.value < 20  # val/bpb of a 2-step byte model

    # Same study, n_trials more; this trial diverges (every loss is a "spike" above 0.1): it must end with the bad
    # score as a COMPLETE trial, and the sweep must exit 0.
    proc = cli("train.py", *common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'sweep2'}",
               "callbacks.divergence_guard.max_loss=0.1", "callbacks.divergence_guard.patience=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="lr_wd", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.trials[3].value == 1.0e4  # sweep_bad_score
    assert study.trials[3].params != study.trials[0].params  # the resumed sampler did not replay trial 0
    metrics = json.loads((tmp_path / "sweep2" / "0" / "metrics.json").read_text())
    assert metrics["train/diverged"] == 1.0
