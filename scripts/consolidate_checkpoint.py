"""Merge a sharded checkpoint (strategy=fsdp / fsdp_tp: DCP shards; strategy=deepspeed_zero*: ZeRO partitions) into one file.

    python scripts/consolidate_checkpoint.py --ckpt logs/train/runs/<ts>/checkpoints/last.ckpt --out model.safetensors
    python scripts/consolidate_checkpoint.py --ckpt last --out model.safetensors --hf exported/   # + an HF directory

Runs on one process with no GPU and no process group, whatever world size and tensor-parallel layout wrote the
shards (a ZeRO checkpoint's fp32 weights are merged by DeepSpeed's zero_to_fp32: the deepspeed package is needed). Reads the model weights only (not the optimizer state). Writes the bare model's state dict (keys as
`lmforge.models.build(config)` expects; LoRA merged) as safetensors, the run's resolved config and tokenizer in
its metadata (`lmforge_config`, `lmforge_tokenizer`), atomically (temp file + rename). `--hf` also writes a
Hugging Face directory through lmforge.interop (what scripts/export.py writes). eval.py, generate.py and
export.py read sharded checkpoints directly too; this is for shipping one file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from lmforge.checkpoint import load_checkpoint, model_state_dict, resolve_ckpt_path
from lmforge.errors import LmforgeError


def consolidate(ckpt_path: str, out: str | Path, log_dir: str = "logs", task_name: str = "train") -> Path:
    from safetensors.torch import save_file

    path = resolve_ckpt_path(ckpt_path, log_dir, task_name)
    ckpt = load_checkpoint(path)
    meta = ckpt["lmforge"]
    state = model_state_dict(ckpt, scalar_head=meta.get("stage") == "RewardStage")
    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():  # safetensors refuses shared storage: a tied table gets its own copy
        tensor = tensor.detach().contiguous()
        unique[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(unique, str(tmp), metadata={"format": "pt", "lmforge_config": json.dumps(meta["config"]["model"]),
                                          "lmforge_tokenizer": meta["tokenizer"], "source": str(path)})
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a sharded (FSDP or DeepSpeed ZeRO) checkpoint directory, a .ckpt file, or `last`")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--hf", default=None, help="also write a Hugging Face model directory here")
    p.add_argument("--log-dir", default="logs", help="where --ckpt last looks")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        out = consolidate(args.ckpt, args.out, log_dir=args.log_dir)
        print(f"wrote {out}")
        if args.hf:
            from lmforge.interop.export import export_checkpoint

            print(f"wrote {export_checkpoint(args.ckpt, args.hf, log_dir=args.log_dir)}")
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
