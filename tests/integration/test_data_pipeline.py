"""The data pipeline end to end, as a user runs it: exact mid-epoch resume of train.py, and
prepare_data.py (cleaning + WordPiece + shards) feeding a document-masked run through data.tokens_dir."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import train_in_process

pytestmark = pytest.mark.slow


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


def test_resume_mid_epoch_continues_exactly_the_uninterrupted_run(cache_dir: Path, tmp_path: Path) -> None:
    """A 6-step run also checkpoints at step 4 (mid-epoch, as a preempted job's periodic checkpoint);
    resuming from that file must see the same batches for steps 4 and 5, hence the same losses."""
    logs, steps = tmp_path / "logs", tmp_path / "step_ckpts"
    common = ["debug=fast", f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}", "callbacks.progress_bar=null"]
    every4 = ["+callbacks.every4._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.every4.dirpath={steps}",
              "+callbacks.every4.every_n_train_steps=4", "+callbacks.every4.save_top_k=-1", "+callbacks.every4.filename=at4"]
    full, resumed = logs / "debug" / "runs" / "full", logs / "debug" / "runs" / "resumed"
    train_in_process([*common, *every4], full)  # in-process: the CLI path is the same code, minus ~5 s of imports per run
    state = torch.load(steps / "at4.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["global_position"]) == (0, 4 * 16)  # 4 batches of 16 blocks handed out
    train_in_process([*common, f"ckpt_path={steps / 'at4.ckpt'}"], resumed)
    before, after = losses(full), losses(resumed)
    assert sorted(before) == list(range(6)) and sorted(after) == [4, 5]
    assert [after[4], after[5]] == pytest.approx([before[4], before[5]], abs=1e-6)  # same data, same weights


def test_prepare_data_then_train_on_the_prepared_shards(cli, tmp_path: Path, root: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from lmforge.data.corpus import shakespeare_dir

    plays = sorted(shakespeare_dir().glob("*/*.md"))[:6]
    for i, play in enumerate(plays):
        text = play.read_text(encoding="utf-8")[:60_000]
        (corpus / f"{i}.md").write_text(text, encoding="utf-8")
        if i == 0:
            (corpus / "copy.md").write_text(text.upper(), encoding="utf-8")  # an exact duplicate after case folding
            (corpus / "page.html.txt").write_text(f"<html><body><p>{text[:3000]}</p><script>x()</script></body></html>", encoding="utf-8")
    out = tmp_path / "prepared"
    data = ["data=text_files", f"data.corpus.train_glob={corpus}/*", "data.corpus.val_every=3", "data.clean.strip_html=true"]
    proc = cli("scripts/prepare_data.py", *data, "tokenizer=wordpiece", "tokenizer.vocab_size=1024", "data.num_proc=2",
               f"out={out}", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'prep_run'}", timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_proc"] == 2 and manifest["n_docs"] == 5  # 8 files, 2.md and 5.md held out, the upper-case copy dropped
    report = json.loads((out / "clean_report.json").read_text())
    steps = {s["name"]: s for s in report["train"]["steps"]}
    assert steps["exact_dedup"]["docs_dropped"] == 1 and steps["strip_html"]["docs_changed"] == 1
    assert (out / "tokenizer.json").is_file() and "token shards" in proc.stdout
    summary = json.loads((tmp_path / "prep_run" / "prepare_data.json").read_text())
    assert summary["splits"]["train"]["MB_per_s"] > 0 and summary["splits"]["val"]["docs"] == 2

    run = tmp_path / "train_run"
    proc = cli("train.py", "debug=fast", "trainer.max_steps=3", *data, f"data.tokens_dir={out}", "tokenizer=pretrained",
               f"tokenizer.path={out}", "data.document_mask=true", "data.batch_size=4", f"paths.cache_dir={tmp_path / 'cache2'}",
               f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run}", "callbacks.progress_bar=null", timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(run)) == 3
    assert not (tmp_path / "cache2" / "tokens").exists()  # trained from the prepared shards, nothing re-tokenized
    saved = (run / "config.yaml").read_text()
    assert "document_mask: true" in saved and "WordPiece" in json.loads(
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["lmforge"]["tokenizer"])["tokenizer"]["model"]["type"]
