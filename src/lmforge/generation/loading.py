"""A model ready to generate (decoder or encoder-decoder): weights from an lmforge checkpoint or an HF
directory, on a device and dtype, optionally int8-quantized. Shared by generate.py, scripts/serve.py and
the draft model of speculative decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint import load_checkpoint, model_state_dict, resolve_ckpt_path
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError, DataError
from lmforge.generation.quantize import quantize_model
from lmforge.models import build, config_from
from lmforge.precision import cpu_has_fast_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    name: str  # what the weights are called: a checkpoint path or an HF directory (the server's model id)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError("device", f"{device!r} is not a torch device", "use auto, cpu, cuda or cuda:<n>") from err


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where matmuls in bf16 are fast (CUDA with bf16, AMX or AVX512-BF16 CPUs), else fp32 (~90x faster on AVX2)."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {dtype!r}", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _special_token(value: object) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """`tokenizer.json` of an HF directory, with the eos/bos/pad roles its tokenizer_config.json names.

    An lmforge export names them; a directory without that file falls back to lmforge's default tokens,
    and a missing pad or bos token is the eos token (as for GPT-2).
    """
    path = Path(directory)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise DataError(f"hf_dir={str(path)!r} has no tokenizer.json. Fix: save the model's fast tokenizer there (tokenizer.save_pretrained(dir)).")
    blob = tok_file.read_text(encoding="utf-8")
    if "lmforge_specials" in json.loads(blob):
        return Tokenizer.from_json(blob)
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    named = {role: _special_token(tok_cfg.get(f"{role}_token")) for role in ("eos", "bos", "pad")}
    if named["eos"] is None:
        return Tokenizer.load(tok_file)  # lmforge's default specials, or a clear error naming the missing token
    specials = {role: token or named["eos"] for role, token in named.items()}
    return Tokenizer.from_json(json.dumps({"lmforge_specials": specials, "tokenizer": json.loads(blob)}))


def _refuse_encoder(key: str, family: str, kind: str) -> None:
    if kind == "encoder":
        raise ConfigError(key, f"holds a {family} model (encoder-only), which has no next-token distribution to generate from",
                          "pass a checkpoint of a decoder (gpt, llama, mixtral) or encoder-decoder (t5) family")


def _from_checkpoint(ckpt_path: str, key: str, log_dir: str | Path, task_name: str) -> tuple[nn.Module, Tokenizer, str]:
    path = resolve_ckpt_path(ckpt_path, log_dir, task_name)
    ckpt = load_checkpoint(path)
    meta = ckpt["lmforge"]
    model_cfg = meta["config"]["model"]
    cfg = config_from(model_cfg)
    _refuse_encoder(key, cfg.family, cfg.kind)  # before building: refusing a BERT loads no weights
    model = build(cfg)
    model.load_state_dict(model_state_dict(ckpt))
    return model, Tokenizer.from_json(meta["tokenizer"]), str(path)


def _from_hf_dir(hf_dir: str, key: str) -> tuple[nn.Module, Tokenizer, str]:
    from lmforge.interop.hf import load_hf

    path = Path(hf_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(key, f"{hf_dir!r} is not a directory", "pass a local Hugging Face model directory (config.json + *.safetensors)")
    model = load_hf(path)
    _refuse_encoder(key, model.config.family, model.config.kind)
    return model.float(), load_hf_tokenizer(path), str(path)


def load_model(
    ckpt_path: str | None = None,
    hf_dir: str | None = None,
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
    quantize: str | None = None,
    log_dir: str | Path = "logs",
    task_name: str = "train",
    keys: tuple[str, str] = ("ckpt_path", "hf_dir"),
) -> LoadedModel:
    """Exactly one of `ckpt_path` (a .ckpt or `last`) / `hf_dir`; `keys` name them in errors (CLI or flags)."""
    if (ckpt_path in (None, "")) == (hf_dir in (None, "")):
        raise ConfigError(f"{keys[0]} / {keys[1]}", "exactly one of them must be set",
                          f"pass {keys[0]}=<run dir>/checkpoints/last.ckpt (or last), or {keys[1]}=<HF model directory>")
    if ckpt_path:
        model, tokenizer, name = _from_checkpoint(str(ckpt_path), keys[0], log_dir, task_name)
    else:
        model, tokenizer, name = _from_hf_dir(str(hf_dir), keys[1])
    torch_device = resolve_device(device)
    # dynamic int8 quantizes fp32 models only: `auto` must not pick bf16 for it on an AMX CPU
    torch_dtype = torch.float32 if quantize == "int8_dynamic" and dtype in (None, "auto") else resolve_dtype(dtype, torch_device)
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    quantize_model(model, quantize)
    return LoadedModel(model, tokenizer, name)
