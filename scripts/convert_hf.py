"""Convert between lmforge checkpoints and Hugging Face model directories (gpt2, llama/mistral, mixtral, bert, t5).

    # lmforge -> HF: a directory `AutoModel*.from_pretrained(dir)` and `AutoTokenizer` load offline
    python scripts/convert_hf.py --ckpt logs/train/runs/<ts>/checkpoints/last.ckpt --out exported/   (= scripts/export.py)
    # HF -> lmforge: a .ckpt that eval.py / generate.py / `train.py init_from=` accept
    python scripts/convert_hf.py --hf path/to/hf_dir --out imported.ckpt

The HF directory holds model.safetensors, config.json and the run's tokenizer.json. An imported checkpoint
holds the weights, the model config and the directory's tokenizer.json (required: lmforge checkpoints
always carry their tokenizer). `train.py init_from=<hf dir>` also reads an HF directory directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.init_from import load_init_source
from lmforge.interop.export import export_checkpoint
from lmforge.stages.base import SCHEMA_VERSION
from lmforge.utils.io import atomic_torch_save


def export(ckpt_path: str, out: str) -> Path:
    return export_checkpoint(ckpt_path, out)


def import_hf(hf_dir: str, out: str) -> Path:
    source = load_init_source(hf_dir)
    if source.tokenizer is None:
        raise LmforgeError(f"{hf_dir} has no tokenizer.json. Fix: save the model's fast tokenizer there (tokenizer.save_pretrained(dir)).")
    ckpt = {
        "state_dict": {f"model.{k}": v.contiguous() for k, v in source.load_weights().items()},
        "lmforge": {
            "schema_version": SCHEMA_VERSION,
            "config": {"model": source.model_cfg},
            "tokenizer": source.tokenizer.to_json(),
            "imported_from": str(Path(hf_dir).resolve()),
        },
    }
    path = Path(out)
    atomic_torch_save(ckpt, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="an lmforge .ckpt to export")
    src.add_argument("--hf", help="a local Hugging Face model directory to import")
    p.add_argument("--out", required=True, help="output directory (export) or .ckpt file (import)")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out) if args.ckpt else import_hf(args.hf, args.out)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
