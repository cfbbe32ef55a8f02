"""Export an lmforge checkpoint to a Hugging Face model directory (for transformers, vLLM, TGI, the Hub).

    python scripts/export.py --ckpt logs/train/runs/<ts>/checkpoints/last.ckpt --out exported/
    python scripts/export.py --ckpt last --out exported-bf16/ --dtype bf16

Writes model.safetensors, config.json (standard `architectures`, `torch_dtype`), generation_config.json
(eos / pad ids), tokenizer.json and tokenizer_config.json. Load it with the family's Auto class:
AutoModelForCausalLM (gpt, llama, mixtral), AutoModelForMaskedLM (bert), AutoModelForSeq2SeqLM (t5).
"""

from __future__ import annotations

import argparse
import sys

import torch

from lmforge.errors import LmforgeError
from lmforge.interop.export import EXPORT_DTYPES, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an lmforge .ckpt, or `last` (newest run under --log-dir/train)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=sorted(EXPORT_DTYPES), help="weight dtype written (default fp32)")
    p.add_argument("--log-dir", default="logs", help="where --ckpt last looks")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.dtype, log_dir=args.log_dir)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
