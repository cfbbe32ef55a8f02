"""An lmforge checkpoint -> a Hugging Face model directory that transformers, vLLM and TGI load offline.

The directory holds model.safetensors, config.json (`architectures`, `torch_dtype`, special token ids),
generation_config.json (eos / pad / bos ids), tokenizer.json and tokenizer_config.json (special tokens,
context length, the ChatML chat template for decoders). Used by scripts/export.py and scripts/convert_hf.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmforge.checkpoint import load_checkpoint, model_state_dict, resolve_ckpt_path
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError
from lmforge.interop.hf import save_hf
from lmforge.models import build

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_checkpoint(ckpt_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str = "fp32",
                      log_dir: str | os.PathLike[str] = "logs", task_name: str = "train") -> Path:
    """Write `out_dir` from `ckpt_path` (a .ckpt, or `last`: the newest run of `task_name` under `log_dir`)."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError("--dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(EXPORT_DTYPES)}")
    ckpt = load_checkpoint(resolve_ckpt_path(str(ckpt_path), log_dir, task_name))
    meta = ckpt["lmforge"]
    model = build(meta["config"]["model"])
    model.load_state_dict(model_state_dict(ckpt))
    return save_hf(model.eval(), Tokenizer.from_json(meta["tokenizer"]), out_dir, dtype=EXPORT_DTYPES[dtype])
