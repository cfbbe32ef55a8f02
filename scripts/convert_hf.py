"""Export an lmforge checkpoint as a Hugging Face model directory (GPT-2 family).

    python scripts/convert_hf.py --ckpt logs/train/runs/<ts>/checkpoints/last.ckpt --out exported/
    # then, anywhere:  AutoModelForCausalLM.from_pretrained("exported/"), AutoTokenizer.from_pretrained("exported/")

The directory holds model.safetensors, config.json and the run's tokenizer.json. Importing the other way
is `lmforge.interop.hf.load_hf(dir)` / `from_hf(model)`.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.checkpoint import load_checkpoint, model_state_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import save_hf
from lmforge.models import build


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an lmforge .ckpt")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        meta = ckpt["lmforge"]
        model = build(meta["config"]["model"])
        model.load_state_dict(model_state_dict(ckpt))
        out = save_hf(model.eval(), Tokenizer.from_json(meta["tokenizer"]).hf.to_str(), args.out)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
