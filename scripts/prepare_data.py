"""Clean and tokenize a corpus into token shards ahead of training, in parallel, with progress and MB/s.

    python scripts/prepare_data.py                                    # Shakespeare into the shared cache
    python scripts/prepare_data.py data=hf_dataset data.corpus.path=json data.corpus.data_files='big/*.jsonl' \
        data.corpus.streaming=true data.num_proc=2 tokenizer.train_max_bytes=200000000
    python scripts/prepare_data.py data=text_files data.corpus.train_glob='corpus/**/*.md' out=prepared/

Same config groups as train.py (conf/prepare_data.yaml). Without `out`, shards land in the cache under the key
train.py computes (corpus + cleaning + tokenizer), so the same overrides then train with no tokenisation step.
With `out`: <out>/{train,val}/ shards + <out>/tokenizer.json; train with
`data.tokens_dir=<out> tokenizer=pretrained tokenizer.path=<out>` (a mismatching tokenizer is refused).
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


def prepare(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )
    from rich.table import Table

    from lmforge.data.shards import TokenShards, cache_folder, load_or_build, write_shards
    from lmforge.run import bind_objective, build_tokenizer
    from lmforge.utils.io import atomic_write_text

    console = Console(stderr=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    corpus = datamodule.corpus
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(cfg, corpus)
    if cfg.get("objective") is not None:
        bind_objective(instantiate(cfg.objective, _convert_="all"), tokenizer)
    console.print(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} ids, {time.perf_counter() - t0:.1f}s (trained or cached)")
    out = Path(cfg.out) if cfg.get("out") else None
    if out is not None:
        tokenizer.save_pretrained(out)
    source = corpus.fingerprint()
    rows = {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    for split in ("train", "val"):
        texts = (d.text for d in corpus.iter_documents(split))
        t0 = time.perf_counter()
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(f"tokenize {split}", total=None)

            def advance(n_bytes: int, task=task, bar=bar) -> None:
                bar.advance(task, n_bytes)

            kwargs = dict(source=source, shard_tokens=datamodule.shard_tokens, num_proc=datamodule.num_proc, progress=advance)
            if out is not None:
                folder = out / split
                write_shards(texts, tokenizer, folder, **kwargs)
            else:
                folder = cache_folder(cfg.paths.cache_dir, source, tokenizer.fingerprint(), split)
                load_or_build(texts, tokenizer, folder, **kwargs)
        seconds = time.perf_counter() - t0
        shards = TokenShards(folder, tokenizer.fingerprint(), verify_hashes=bool(cfg.get("verify", True)))
        m = shards.manifest
        built = m["seconds"] if seconds >= m["seconds"] else None  # None: it was already in the cache
        rows[split] = {"folder": str(folder), "docs": m["n_docs"], "tokens": m["n_tokens"], "shards": len(m["shards"]),
                       "MB": round(m["n_bytes"] / 1e6, 2), "seconds": m["seconds"], "cached": built is None,
                       "MB_per_s": round(m["n_bytes"] / 1e6 / max(m["seconds"], 1e-9), 2), "num_proc": m["num_proc"],
                       "dtype": m["dtype"], "tokenizer": m["tokenizer"]}
    shown = ("docs", "tokens", "shards", "MB", "seconds", "MB_per_s", "num_proc", "cached")
    table = Table(title="token shards")
    for key in ("split", *shown):
        table.add_column(key)
    for split, row in rows.items():
        table.add_row(split, *(str(row[k]) for k in shown))
    Console().print(table)
    report_path = getattr(corpus, "report_path", None)
    summary = {"splits": rows, "clean_report": str(report_path) if report_path else None}
    if report_path is not None and Path(report_path).is_file():
        console.print(f"cleaning report: {report_path}")
        if out is not None:
            atomic_write_text(out / "clean_report.json", Path(report_path).read_text())
    atomic_write_text(Path(cfg.paths.output_dir) / "prepare_data.json", json.dumps(summary, indent=1))
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    from lmforge.cli import run_entry

    run_entry(prepare, cfg)


if __name__ == "__main__":
    main()
