"""Programmatic rewards: exact values on crafted strings, composition, and the config registry."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.rewards import FormatReward, KeywordReward, LengthReward, SumReward, build_reward, score


def values(reward, completions: list[str], metadata=None) -> list[float]:
    out = score(reward, ["p"] * len(completions), completions, metadata)
    assert out.dtype == torch.float32 and out.shape == (len(completions),)
    return out.tolist()


def test_keyword_reward() -> None:
    texts = ["My LORD, the king!", "kingdom and lovely", "love love love", "nothing here"]
    assert values(KeywordReward(case_sensitive=False), texts) == [1.0, 0.0, 1.0, 0.0]  # whole words, capped at one hit
    assert values(KeywordReward(), texts) == [1.0, 0.0, 1.0, 0.0]  # case-sensitive: "king" still hits, "LORD" doesn't
    assert values(KeywordReward(max_hits=None, per_hit=0.5, case_sensitive=False), texts) == [1.0, 0.0, 1.5, 0.0]
    assert values(KeywordReward(max_hits=2, case_sensitive=False), texts) == [2.0, 0.0, 2.0, 0.0]
    assert values(KeywordReward(max_hits=2), texts) == [1.0, 0.0, 2.0, 0.0]
    assert values(KeywordReward(["lord"], case_sensitive=True), texts) == [0.0, 0.0, 0.0, 0.0]
    assert values(KeywordReward(["king", "love"], whole_word=False, max_hits=None), texts) == [
        1.0,
        2.0,
        3.0,
        0.0,
    ]
    with pytest.raises(ConfigError, match="keywords"):
        KeywordReward([])


def test_length_reward_is_one_inside_and_decays_linearly_outside() -> None:
    r = LengthReward(min_words=4, max_words=8)  # width 4
    texts = [" ".join(["w"] * n) for n in (0, 2, 4, 6, 8, 10, 12, 20)]
    assert values(r, texts) == [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert values(LengthReward(3, 3), ["a b", "a b c", "a b c d e"]) == [
        0.0,
        1.0,
        0.0,
    ]  # zero width counts as 1
    with pytest.raises(ConfigError, match="min_words"):
        LengthReward(9, 3)


def test_format_and_sum() -> None:
    assert values(FormatReward(), ["HAMLET: To be", "  Boatswain: Here", "to be", "HAMLET:"]) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    s = SumReward(["keyword", {"name": "length", "min_words": 1, "max_words": 2}], weights=[2.0, 0.5])
    assert values(s, ["love", "a b c d", "x"]) == [2.5, 0.0, 0.5]
    with pytest.raises(ConfigError, match="weights"):
        SumReward(["keyword"], weights=[1, 2])


def my_reward(prompts, completions, metadata):
    return [float(m.get("bonus", 0)) + len(c) for c, m in zip(completions, metadata)]


def test_build_reward() -> None:
    assert isinstance(build_reward("keyword"), KeywordReward) and isinstance(
        build_reward("length"), LengthReward
    )
    r = build_reward({"name": "keyword", "keywords": ["ho"]})
    assert values(r, ["ho ho", "hey"]) == [1.0, 0.0]
    fn = build_reward({"_target_": "lmforge.rewards.LengthReward", "min_words": 1, "max_words": 1})
    assert values(fn, ["a", "a b"]) == [1.0, 0.0]
    user = build_reward({"_target_": f"{__name__}.my_reward", "_partial_": True})
    assert values(user, ["ab", "c"], [{"bonus": 1}, {}]) == [3.0, 1.0]
    with pytest.raises(
        ConfigError, match=r"stage\.reward: unknown reward 'bogus'.*\['format', 'keyword', 'length', 'sum'\]"
    ):
        build_reward("bogus")
    with pytest.raises(ConfigError, match=r"stage\.reward\.keyword\b.*not a setting"):
        build_reward({"name": "keyword", "keyword": ["x"]})
    with pytest.raises(ConfigError, match=r"stage\.reward\._target_"):
        build_reward({"_target_": "no.such.Reward"})
    with pytest.raises(ConfigError, match=r"stage\.reward: must be"):
        build_reward(3)  # type: ignore[arg-type]


def test_score_checks_the_shape() -> None:
    with pytest.raises(ValueError, match="one value per completion"):
        score(lambda p, c, m: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="non-finite"):
        score(lambda p, c, m: [float("nan")], ["a"], ["x"])
