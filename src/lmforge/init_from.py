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
    """What every rank needs up front (architecture, tokenizer), and the weights on demand: under a sharded
    strategy only rank 0 reads them (`parallel.load_weights`), so N ranks on a node do not each hold a whole copy."""

    path: Path
    model_cfg: dict[str, Any]  # the architecture the weights belong to (overrides the model group)
    tokenizer: Tokenizer | None  # None when an HF directory ships no tokenizer.json
    vocab_size: int | None = None  # rows the run needs: more than the source's when the data added tokens (grow_vocab)

    def load_weights(self) -> dict[str, torch.Tensor]:
        """The source's weights (full tensors, CPU), grown to `vocab_size` rows where the run added tokens."""
        if is_hf_dir(self.path):
            from lmforge.interop.hf import load_hf_weights

            state = load_hf_weights(self.path)  # straight from the safetensors files where it can
        else:
            state = model_state_dict(load_checkpoint(self.path))
        source_vocab = int(self.model_cfg["vocab_size"])
        return grow_vocab(state, source_vocab, self.vocab_size) if self.vocab_size else state


def is_hf_dir(path: Path) -> bool:
    """An HF model directory (config.json); other directories are sharded lmforge checkpoints."""
    return path.is_dir() and (path / "config.json").is_file()


def _model_cfg_dict(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def load_init_source(path: str | Path) -> InitSource:
    """Read the architecture + tokenizer of an lmforge checkpoint or an HF model directory (not its weights:
    `InitSource.load_weights`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"init_from={str(path)!r} does not exist. Fix: pass an lmforge .ckpt or a Hugging Face model directory.")
    if is_hf_dir(path):
        from lmforge.generation.loading import load_hf_tokenizer
        from lmforge.interop.hf import read_hf_config

        conv, hf_cfg = read_hf_config(path)
        # eos/bos/pad roles from tokenizer_config.json, so a foreign tokenizer (Llama's </s>) keeps its specials
        tokenizer = load_hf_tokenizer(path) if (path / "tokenizer.json").is_file() else None
        return InitSource(path, _model_cfg_dict(conv.config_from_hf(hf_cfg)), tokenizer)
    try:
        meta = load_checkpoint(path, weights=False)["lmforge"]
    except CheckpointError as err:  # the same diagnosis, under the key this run was given
        raise CheckpointError(str(err).replace("ckpt_path=", "init_from=", 1).replace(
            "Fix: pass", "Fix: pass a Hugging Face model directory (with config.json) or", 1)) from None
    return InitSource(path, dict(meta["config"]["model"]), Tokenizer.from_json(meta["tokenizer"]))


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
