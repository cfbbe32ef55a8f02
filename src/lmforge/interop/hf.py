"""Hugging Face GPT-2 <-> lmforge GPT: configs, weights, and an HF-loadable directory on disk.

Our GPT is GPT-2's architecture with different module names, so conversion is a key map. The one catch:
HF GPT-2 uses `Conv1D`, whose weight is stored (in, out) - the transpose of `nn.Linear`'s (out, in).
The fused `qkv` / `c_attn` share the q|k|v order, so they copy as-is (after the transpose).

transformers is an optional dependency: it is imported inside the functions, never at module import.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.config import GPTConfig
from lmforge.models.gpt import GPT

if TYPE_CHECKING:
    import transformers

__all__ = ["config_from_hf", "config_to_hf", "from_hf", "load_hf", "save_hf", "to_hf"]

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh-approximated GELU as our GeluMLP
_UNSUPPORTED = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention")


def _transformers() -> Any:
    """Import transformers on first use, so lmforge itself does not depend on it."""
    try:
        import transformers
    except ImportError as e:
        raise LmforgeError(
            "Hugging Face interop needs the `transformers` package, which is not installed. "
            "Fix: pip install transformers (or pip install 'lmforge[dev]')"
        ) from e
    return transformers


def config_to_hf(cfg: GPTConfig) -> transformers.GPT2Config:
    """GPTConfig -> GPT2Config. HF GPT-2 always has biases, so `bias=False` has no HF equivalent."""
    if not cfg.bias:
        raise ConfigError(
            "model.bias",
            "HF GPT-2 always has biases; a bias-free model cannot be exported",
            "train with model.bias=true",
        )
    if cfg.vocab_size is None:
        raise ConfigError(
            "model.vocab_size",
            "is null; an HF config needs a concrete vocabulary size",
            "set model.vocab_size",
        )
    return _transformers().GPT2Config(
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        n_positions=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        n_inner=None if cfg.mlp_ratio == 4 else cfg.mlp_ratio * cfg.n_embd,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        # GPT-2's 50256 defaults are meaningless for another vocabulary; special tokens live in the tokenizer.
        bos_token_id=None,
        eos_token_id=None,
    )


def config_from_hf(hf_cfg: Any) -> GPTConfig:
    """GPT2Config -> GPTConfig, refusing (with the offending key) anything our GPT would compute differently."""
    for key in _UNSUPPORTED:
        if getattr(hf_cfg, key, False):
            raise ConfigError(
                f"hf_config.{key}",
                "is true, which lmforge's GPT does not implement",
                f"use a checkpoint with {key}=False",
            )
    if not getattr(hf_cfg, "scale_attn_weights", True):
        raise ConfigError(
            "hf_config.scale_attn_weights",
            "is false; lmforge always scales by 1/sqrt(head_dim)",
            "use a checkpoint with scale_attn_weights=True",
        )
    act = hf_cfg.activation_function
    if act not in _GELU_TANH:
        raise ConfigError(
            "hf_config.activation_function",
            f"is {act!r}; lmforge's GPT uses tanh-GELU",
            f"use one of {_GELU_TANH}",
        )
    dropouts = {k: float(getattr(hf_cfg, k)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(dropouts.values())) != 1:
        raise ConfigError(
            "hf_config.resid_pdrop",
            f"dropouts differ {dropouts}; lmforge has one model.dropout",
            "set all three to the same value",
        )
    n_inner = hf_cfg.n_inner
    if n_inner is None:
        mlp_ratio = 4
    elif n_inner % hf_cfg.n_embd == 0:
        mlp_ratio = n_inner // hf_cfg.n_embd
    else:
        raise ConfigError(
            "hf_config.n_inner",
            f"{n_inner} is not a multiple of n_embd={hf_cfg.n_embd}",
            "lmforge needs n_inner = k * n_embd",
        )
    return GPTConfig(
        n_layer=hf_cfg.n_layer,
        n_head=hf_cfg.n_head,
        n_embd=hf_cfg.n_embd,
        max_seq_len=hf_cfg.n_positions,
        vocab_size=hf_cfg.vocab_size,
        mlp_ratio=mlp_ratio,
        dropout=dropouts["resid_pdrop"],
        bias=True,
        norm_eps=hf_cfg.layer_norm_epsilon,
        init_std=hf_cfg.initializer_range,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )


def _key_map(n_layer: int, tied: bool) -> Iterator[tuple[str, str, bool]]:
    """(our key, HF GPT2LMHeadModel key, transpose?) for every parameter. A tied head reads the embedding."""
    yield "wte.weight", "transformer.wte.weight", False
    yield "wpe.weight", "transformer.wpe.weight", False
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b, conv in (
            ("ln_1", "ln_1", False),
            ("attn.qkv", "attn.c_attn", True),
            ("attn.proj", "attn.c_proj", True),
            ("ln_2", "ln_2", False),
            ("mlp.fc", "mlp.c_fc", True),
            ("mlp.proj", "mlp.c_proj", True),
        ):
            yield f"{ours}{a}.weight", f"{theirs}{b}.weight", conv
            yield f"{ours}{a}.bias", f"{theirs}{b}.bias", False
    yield "ln_f.weight", "transformer.ln_f.weight", False
    yield "ln_f.bias", "transformer.ln_f.bias", False
    yield "lm_head.weight", "transformer.wte.weight" if tied else "lm_head.weight", False


def from_hf(hf_model: Any) -> GPT:
    """GPT2LMHeadModel (or a bare GPT2Model, whose head is the tied embedding) -> GPT with equal weights."""
    transformers = _transformers()
    if isinstance(hf_model, transformers.GPT2Model):
        sd = {f"transformer.{k}": v for k, v in hf_model.state_dict().items()}
        tied = True
    elif isinstance(hf_model, transformers.GPT2LMHeadModel):
        sd = hf_model.state_dict()
        tied = hf_model.lm_head.weight is hf_model.transformer.wte.weight
    else:
        raise LmforgeError(f"from_hf expects a GPT2LMHeadModel or GPT2Model, got {type(hf_model).__name__}")
    cfg = config_from_hf(hf_model.config)
    cfg.tie_embeddings = tied
    model = GPT(cfg)
    ours = {k: sd[theirs].t() if conv else sd[theirs] for k, theirs, conv in _key_map(cfg.n_layer, tied)}
    model.load_state_dict(ours, strict=True)
    return model.to(next(hf_model.parameters()).dtype)


def to_hf(model: GPT) -> transformers.GPT2LMHeadModel:
    """GPT -> GPT2LMHeadModel with equal weights (same dtype; on CPU)."""
    transformers = _transformers()
    hf = transformers.GPT2LMHeadModel(config_to_hf(model.config))
    sd = model.state_dict()
    theirs = {
        t: (sd[k].t() if conv else sd[k]).contiguous() for k, t, conv in _key_map(model.config.n_layer, False)
    }
    if model.config.tie_embeddings:
        del theirs["lm_head.weight"]  # HF ties it to transformer.wte.weight itself
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise LmforgeError(
            f"to_hf key mismatch (missing={missing}, unexpected={unexpected}); the key map is out of date"
        )
    return hf.to(next(model.parameters()).dtype).eval()


def save_hf(model: GPT, tokenizer_json: str | None, out_dir: str | os.PathLike[str]) -> Path:
    """Write a directory `GPT2LMHeadModel.from_pretrained` / `AutoTokenizer.from_pretrained` can open.

    `tokenizer_json` is a path to a tokenizers `tokenizer.json` or its JSON text (`Tokenizer.to_str()`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_hf(model).save_pretrained(out, safe_serialization=True)
    if tokenizer_json is not None:
        if tokenizer_json.lstrip().startswith("{"):
            (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        elif Path(tokenizer_json).is_file():
            shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        else:
            raise LmforgeError(f"tokenizer_json {tokenizer_json!r} is neither a file nor JSON text")
        # Our tokenizer is not necessarily GPT-2's BPE: tell AutoTokenizer to load tokenizer.json as-is.
        (out / "tokenizer_config.json").write_text(
            '{"tokenizer_class": "PreTrainedTokenizerFast"}\n', encoding="utf-8"
        )
    return out


def load_hf(directory: str | os.PathLike[str]) -> GPT:
    """Load a local HF GPT-2 directory (never the Hub) as an lmforge GPT."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path} is not an HF model directory (no config.json)")
    hf = _transformers().GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    return from_hf(hf)
