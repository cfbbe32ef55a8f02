"""`init_from=<path>`: start training from existing weights (an lmforge .ckpt or a Hugging Face directory).

Unlike `ckpt_path` (resume: optimizer, scheduler, step and data position all restored), `init_from` takes
only the model - its architecture, weights and tokenizer - and starts a fresh run on top: fine-tuning,
continued pre-training on new data, or training from an imported HF checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import load_checkpoint, model_state_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import CheckpointError


@dataclass
class InitSource:
    model_cfg: dict[str, Any]  # the architecture the weights belong to (overrides the model group)
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None  # None when an HF directory ships no tokenizer.json


def _model_cfg_dict(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def load_init_source(path: str | Path) -> InitSource:
    """Read weights + architecture + tokenizer from an lmforge checkpoint file or an HF model directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"init_from={str(path)!r} does not exist. Fix: pass an lmforge .ckpt or a Hugging Face model directory.")
    if path.is_dir():
        from lmforge.generation.loading import load_hf_tokenizer
        from lmforge.interop.hf import load_hf

        model = load_hf(path)
        # eos/bos/pad roles from tokenizer_config.json, so a foreign tokenizer (Llama's </s>) keeps its specials
        tokenizer = load_hf_tokenizer(path) if (path / "tokenizer.json").is_file() else None
        return InitSource(_model_cfg_dict(model.config), {k: v.float() for k, v in model.state_dict().items()}, tokenizer)
    ckpt = load_checkpoint(path)
    meta = ckpt["lmforge"]
    return InitSource(dict(meta["config"]["model"]), model_state_dict(ckpt), Tokenizer.from_json(meta["tokenizer"]))


def grow_vocab(state_dict: dict[str, torch.Tensor], old_vocab: int, new_vocab: int) -> dict[str, torch.Tensor]:
    """Add rows for tokens the run added (ChatML markers for SFT) to every (vocab, d) table: the embedding
    and an untied LM head. New rows are the mean of the old ones (as HF's `resize_token_embeddings`), so the
    new tokens start at an average embedding instead of noise that would dominate the first logits."""
    if new_vocab <= old_vocab:
        return state_dict
    grown = dict(state_dict)
    for key, tensor in state_dict.items():
        if tensor.dim() == 2 and tensor.size(0) == old_vocab and key.endswith(("wte.weight", "lm_head.weight", "embed_tokens.weight", "shared.weight")):
            extra = tensor.float().mean(dim=0, keepdim=True).expand(new_vocab - old_vocab, -1).to(tensor.dtype)
            grown[key] = torch.cat([tensor, extra], dim=0)
    return grown
