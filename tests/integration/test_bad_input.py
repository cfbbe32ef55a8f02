"""Bad input gets one clear line naming the key and the fix, a non-zero exit, and no traceback wall."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CASES = {
    "unknown group option": (["model=nope"], "Could not find 'model/nope'"),
    "block_size above max_seq_len": (["data.block_size=512"], "data.block_size: 512 exceeds model.max_seq_len=256"),
    "n_embd not divisible by n_head": (["model.n_embd=100", "model.n_head=3"], "model.n_embd: n_embd=100 is not divisible by n_head=3"),
    "empty data glob": (["data=text_files", "data.corpus.train_glob=/nonexistent/**/*.txt"], "data.corpus.train_glob='/nonexistent/**/*.txt' matches no file"),
    "objective that cannot train the family": (["model=bert-tiny", "objective=clm"], "objective: clm cannot train model.family=bert"),
    "missing checkpoint": (["ckpt_path=/nonexistent/last.ckpt"], "does not exist"),
    "not a checkpoint": (["ckpt_path=README.md"], "is not a readable checkpoint"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name: str, cli, cache_dir, tmp_path: Path):
    overrides, expected = CASES[name]
    proc = cli("train.py", "debug=fast", *overrides, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if name != "unknown group option":  # ours: exactly one line with the fix
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Fix" in lines[0]


def test_eval_without_ckpt_path_names_the_key(cli, tmp_path: Path):
    proc = cli("eval.py", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode != 0 and "ckpt_path" in proc.stderr and "Traceback" not in proc.stderr
