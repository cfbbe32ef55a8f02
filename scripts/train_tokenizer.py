"""Train a tokenizer (bpe | wordpiece | unigram | byte) on a corpus and save it as an HF-style dir.

    python scripts/train_tokenizer.py                                   # byte-level BPE 4096 on Shakespeare
    python scripts/train_tokenizer.py tokenizer=unigram tokenizer.vocab_size=8000 out=tok/unigram8k
    python scripts/train_tokenizer.py tokenizer=wordpiece data=text_files data.corpus.train_glob='corpus/**/*.txt'
    python scripts/train_tokenizer.py "+tokenizer.special_tokens.im_start='<|im_start|>'" "+tokenizer.special_tokens.im_end='<|im_end|>'"

Same config groups as train.py (conf/train_tokenizer.yaml): the tokenizer is trained on the cleaned train split and
lands in the same cache train.py uses. Reports vocab size, fertility (tokens per word) and bytes per token on the
val text, and checks that the val text round-trips.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("LMFORGE_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


def train_tokenizer(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate
    from rich.console import Console
    from rich.table import Table

    from lmforge.data.tokenizer import fertility
    from lmforge.run import build_tokenizer
    from lmforge.utils.io import atomic_write_text

    datamodule = instantiate(cfg.data, _convert_="all")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(cfg, datamodule.corpus)
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    tokenizer.save_pretrained(out)
    val = [d.text for d in datamodule.corpus.iter_documents("val")]
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(val))
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    lossless = all(tokenizer.decode(tokenizer.encode(t)) == t for t in val[:100])
    report = {
        "kind": tokenizer.kind, "spec": cfg.tokenizer._target_.rsplit(".", 1)[-1], "vocab_size": tokenizer.vocab_size,
        "special_tokens": tokenizer.specials if len(tokenizer.specials) <= 12 else {**dict(list(tokenizer.specials.items())[:12]), "...": "..."},
        "val_fertility_tokens_per_word": round(fertility(tokenizer, val), 4),
        "val_bytes_per_token": round(n_bytes / max(n_tokens, 1), 4), "val_tokens": n_tokens, "val_bytes": n_bytes,
        "val_round_trip_exact": lossless, "train_or_load_seconds": round(seconds, 2), "fingerprint": tokenizer.fingerprint(),
        "tokenizer_json": str(out / "tokenizer.json"),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    table = Table(title="tokenizer")
    table.add_column("key")
    table.add_column("value")
    for key, value in report.items():
        if key != "special_tokens":
            table.add_row(key, str(value))
    Console().print(table)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_tokenizer")
def main(cfg: DictConfig) -> None:
    from lmforge.cli import run_entry

    run_entry(train_tokenizer, cfg)


if __name__ == "__main__":
    main()
