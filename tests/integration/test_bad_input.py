"""Bad input gets one clear line naming the key and the fix, a non-zero exit, and no traceback wall.

Through the real CLI (a subprocess each, ~5-10 s): one case per place an error can surface — Hydra's composition,
the data module after Lightning is imported, checkpoint resolution in train(), and eval.py. Config errors caught
by preflight are tested in-process, with the CLI path once, in tests/faults/test_config_faults.py; the checkpoint
messages in tests/unit/test_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CASES = {
    "unknown group option": (["model=nope"], "Could not find 'model/nope'"),
    "empty data glob": (["data=text_files", "data.corpus.train_glob=/nonexistent/**/*.txt"], "data.corpus.train_glob='/nonexistent/**/*.txt' matches no file"),
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
