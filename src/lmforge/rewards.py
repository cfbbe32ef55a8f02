"""Programmatic rewards for on-policy stages (PPO, GRPO): no reward model needed to see RL move a policy.

A reward is any callable `(prompts, completions, metadata) -> torch.Tensor (N,) float32`, higher = better.
`build_reward` makes one from config: a name (`keyword`, `length`, `format`, `sum`), a mapping
`{name: keyword, keywords: [...]}`, or `{_target_: my.module.MyReward, ...}` for your own.
Use `score` to call one: it checks the shape and that every value is finite.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lmforge.errors import ConfigError

RewardFn = Callable[[list[str], list[str], list[dict]], torch.Tensor]


class Reward(ABC):
    """Base: subclasses score one completion in `one`; `__call__` batches it."""

    @abstractmethod
    def one(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float:
        """The reward of one completion (higher = better)."""

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        meta = metadata if metadata is not None else [{}] * len(completions)
        return torch.tensor(
            [self.one(p, c, m) for p, c, m in zip(prompts, completions, meta)], dtype=torch.float32
        )


class KeywordReward(Reward):
    """`per_hit` for each keyword occurrence, counted up to `max_hits` (None: no cap). Whole words by default
    ("king" does not hit "kingdom"); the defaults are words the plays use so often that a small model already
    says them now and then, so RL has a signal to amplify from the first batch. Case-sensitive by default: the
    completions start with an upper-case speaker name ("KING LEAR: ..."), which would otherwise score for free
    (a Shakespeare SFT model's greedy answers scored 1.0 case-insensitive, 0.05 case-sensitive: no room to learn)."""

    def __init__(
        self,
        keywords: Sequence[str] = ("love", "lord", "king"),
        case_sensitive: bool = True,
        per_hit: float = 1.0,
        max_hits: int | None = 1,
        whole_word: bool = True,
    ) -> None:
        if isinstance(keywords, str) or not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ConfigError(
                "stage.reward.keywords",
                f"must be a non-empty list of words, got {keywords!r}",
                "set stage.reward.keywords=[love, lord, king]",
            )
        if max_hits is not None and (not isinstance(max_hits, int) or max_hits < 1):
            raise ConfigError(
                "stage.reward.max_hits",
                f"must be a positive integer or null, got {max_hits!r}",
                "set stage.reward.max_hits=1",
            )
        alternatives = "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True))
        body = rf"\b(?:{alternatives})\b" if whole_word else f"(?:{alternatives})"
        self.pattern = re.compile(body, 0 if case_sensitive else re.IGNORECASE)
        self.keywords, self.per_hit, self.max_hits = list(keywords), float(per_hit), max_hits

    def hits(self, text: str) -> int:
        return len(self.pattern.findall(text))

    def one(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float:
        n = self.hits(completion)
        return self.per_hit * (n if self.max_hits is None else min(n, self.max_hits))


class LengthReward(Reward):
    """1 for `min_words` ≤ words ≤ `max_words`, falling linearly to 0 at a distance of one range width
    outside it (width = max_words - min_words, at least 1): bounded and dense, so every step towards the
    range pays."""

    def __init__(self, min_words: int = 5, max_words: int = 25) -> None:
        if (
            not isinstance(min_words, int)
            or not isinstance(max_words, int)
            or not 0 <= min_words <= max_words
        ):
            raise ConfigError(
                "stage.reward.min_words",
                f"need integers 0 <= min_words <= max_words, got {min_words!r}, {max_words!r}",
                "set e.g. stage.reward.min_words=5 stage.reward.max_words=25",
            )
        self.min_words, self.max_words = min_words, max_words
        self.width = max(max_words - min_words, 1)

    def one(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float:
        n = len(completion.split())
        outside = max(self.min_words - n, n - self.max_words, 0)
        return max(0.0, 1.0 - outside / self.width)


class FormatReward(Reward):
    """1 when the completion (stripped) matches `pattern` from its start, else 0. The default is the
    Shakespeare
    tasks' answer form, `SPEAKER: text`."""

    def __init__(self, pattern: str = r"[A-Z][A-Za-z' .,-]{0,40}: \S") -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                "stage.reward.pattern", f"is not a valid regular expression ({err})", "fix the pattern"
            ) from None

    def one(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float:
        return 1.0 if self.pattern.match(completion.strip()) else 0.0


class SumReward:
    """Weighted sum of rewards (each a callable or a spec for `build_reward`); weights default to 1."""

    def __init__(self, rewards: Sequence[Any], weights: Sequence[float] | None = None) -> None:
        if isinstance(rewards, (str, Mapping)) or not rewards:
            raise ConfigError(
                "stage.reward.rewards",
                f"must be a non-empty list of rewards, got {rewards!r}",
                "set stage.reward.rewards=[keyword, length]",
            )
        self.rewards = [
            r if callable(r) else build_reward(r, f"stage.reward.rewards[{i}]") for i, r in enumerate(rewards)
        ]
        self.weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.rewards):
            raise ConfigError(
                "stage.reward.weights",
                f"has {len(self.weights)} weights for {len(self.rewards)} rewards",
                "give one weight per reward, or none",
            )

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        meta = list(metadata) if metadata is not None else [{}] * len(completions)
        total = torch.zeros(len(completions), dtype=torch.float32)
        for w, r in zip(self.weights, self.rewards):
            total += w * score(r, prompts, completions, meta)
        return total


REWARDS: dict[str, type] = {
    "keyword": KeywordReward,
    "length": LengthReward,
    "format": FormatReward,
    "sum": SumReward,
}


def build_reward(spec: str | Mapping[str, Any], key: str = "stage.reward") -> RewardFn:
    """A reward from config: `"keyword"`, `{name: length, max_words: 40}` or `{_target_: pkg.Reward, ...}`."""
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping) and "_target_" in spec:
        from hydra.utils import instantiate

        try:
            fn = instantiate(dict(spec), _convert_="all")
        except Exception as err:  # hydra wraps import and constructor errors in InstantiationException
            raise ConfigError(
                f"{key}._target_",
                f"cannot build {spec['_target_']!r} ({err})",
                "point _target_ at an importable class or function and pass only its arguments",
            ) from None
        if not callable(fn):
            raise ConfigError(
                f"{key}._target_",
                f"{spec['_target_']!r} built a {type(fn).__name__}, which is not callable",
                "use a class with __call__(prompts, completions, metadata) or such a function",
            )
        return fn
    elif isinstance(spec, Mapping) and "name" in spec:
        name, kwargs = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ConfigError(
            key,
            f"must be a reward name or a mapping with `name` or `_target_`, got {spec!r}",
            f"set {key}=keyword, {key}={{name: length, max_words: 40}} "
            f"or {key}={{_target_: my.module.MyReward}}",
        )
    if name not in REWARDS:
        raise ConfigError(
            key, f"unknown reward {name!r}", f"use one of {sorted(REWARDS)}, or a mapping with _target_"
        )
    cls = REWARDS[name]
    params = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}", f"is not a setting of the {name} reward", f"use only {params}"
        )
    return cls(**kwargs)


def score(
    reward: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> torch.Tensor:
    """Call `reward` and check its answer: (N,) finite float32 (a user reward may return a list, doubles)."""
    meta = list(metadata) if metadata is not None else [{} for _ in completions]
    values = torch.as_tensor(reward(list(prompts), list(completions), meta), dtype=torch.float32).cpu()
    if values.shape != (len(completions),):
        raise ValueError(
            f"reward {reward!r} returned shape {tuple(values.shape)} for {len(completions)} completions; "
            "it must "
            "return one value per completion, shape (N,)"
        )
    if not torch.isfinite(values).all():
        raise ValueError(
            f"reward {reward!r} returned non-finite values {values.tolist()}: rewards must be finite numbers"
        )
    return values
