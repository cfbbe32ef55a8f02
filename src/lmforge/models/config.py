"""One dataclass per model family. Validation happens here, so a bad size fails before any tensor exists."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from lmforge.errors import ConfigError

ATTN_BACKENDS = ("sdpa", "eager")  # encoders (BERT, T5)
DECODER_ATTN_BACKENDS = ("sdpa", "eager", "flex", "flash_attn")  # GPT, Llama, Mixtral: layers/attention_backends.py


def check_attn_backend(cfg: Any) -> None:
    """Decoder backends, and flex's one limit: no attention dropout."""
    require_choice("attn_backend", cfg.attn_backend, DECODER_ATTN_BACKENDS)
    if cfg.attn_backend == "flex" and cfg.dropout > 0:
        raise ConfigError("model.attn_backend", f"flex has no attention dropout and model.dropout={cfg.dropout}",
                          "set model.dropout=0.0, or use model.attn_backend=sdpa")
GPT_POSITIONS = ("learned", "alibi")
KINDS = ("decoder", "encoder", "encoder_decoder")  # what objectives check a family against

C = TypeVar("C", bound="FamilyConfig")


def require_positive_ints(cfg: Any, *names: str) -> None:
    """Raise a ConfigError naming `model.<name>` for the first size that is not a positive int."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.{name}", f"must be a positive integer, got {value!r}", f"set model.{name}=<int > 0>")


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model.{key}", f"unknown value {value!r}", f"use one of {choices}")


class FamilyConfig:
    """Mixin of every family's config dataclass: `kind` for objective checks, strict `from_dict`."""

    kind: ClassVar[str] = "decoder"  # decoder | encoder | encoder_decoder

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build from a plain dict, naming any key the family doesn't know (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known - {"_target_"})
        if unknown:
            raise ConfigError(f"model.{unknown[0]}", f"unknown key for family {cls.__name__}", f"use one of {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k != "_target_"})


@dataclass
class GPTConfig(FamilyConfig):
    """GPT-2 style decoder: learned positions, pre-LN, GELU(tanh) MLP, tied embeddings."""

    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 256
    max_seq_len: int = 256
    vocab_size: int | None = None  # filled from the tokenizer when None
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    attn_backend: str = "sdpa"  # sdpa | eager | flex | flash_attn (GPU, flash-attn package)
    position: str = "learned"  # learned (wpe table, bounded by max_seq_len) | alibi (no table, extrapolates)
    family: str = "gpt"

    def __post_init__(self) -> None:
        require_positive_ints(self, "n_layer", "n_head", "n_embd", "max_seq_len", "mlp_ratio")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                "model.n_embd",
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                f"choose model.n_embd as a multiple of model.n_head (e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))})",
            )
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError("model.vocab_size", f"must be positive, got {self.vocab_size}", "leave it null to take the tokenizer's size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}", "set model.dropout=0.0 .. 0.9")
        check_attn_backend(self)
        require_choice("position", self.position, GPT_POSITIONS)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
