"""LossSpikeDetector on crafted loss sequences: one spike in flat noise is found once, a falling or slowly
drifting loss never is, non-finite losses are ignored, and the state survives a save/load."""

from __future__ import annotations

import math
import random

import pytest

from lmforge.loss_spikes import LossSpikeDetector


def noisy(n: int, level: float = 3.0, sigma: float = 0.05, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, sigma) for _ in range(n)]


def spikes_in(losses: list[float], **kwargs) -> list[int]:
    detector = LossSpikeDetector(**kwargs)
    return [i for i, loss in enumerate(losses) if detector.update(loss) is not None]


def test_one_spike_in_flat_noise_is_found_exactly_once() -> None:
    losses = noisy(300)
    losses[200] = 4.5  # 30 sigma above the level
    assert spikes_in(losses) == [200]


def test_a_spike_right_after_another_is_still_found() -> None:
    """The update is winsorised: the first spike must not inflate the variance enough to hide the second."""
    losses = noisy(300)
    losses[200], losses[203] = 9.0, 4.0
    assert spikes_in(losses) == [200, 203]


def test_falling_and_slowly_drifting_losses_have_no_spikes() -> None:
    falling = [8.0 * math.exp(-i / 150) + 1.5 + n for i, n in enumerate(noisy(1000, level=0.0, sigma=0.03))]
    assert spikes_in(falling) == []
    drifting_up = [3.0 + 0.001 * i + n for i, n in enumerate(noisy(1000, level=0.0, sigma=0.05))]
    assert spikes_in(drifting_up) == []
    flat = [2.0] * 200  # no noise at all: the relative std floor keeps float wobble from counting
    flat[150] = 2.0 + 1e-6
    assert spikes_in(flat) == []


def test_warmup_losses_are_never_spikes_and_nonfinite_ones_are_ignored() -> None:
    detector = LossSpikeDetector(warmup=5)
    assert all(detector.update(x) is None for x in (10.0, 3.0, 50.0, 2.0, 2.5))
    assert detector.update(float("nan")) is None and detector.update(float("inf")) is None
    assert detector.count == 5  # non-finite losses leave the statistics alone (the stage skips those steps)


def test_a_level_shift_is_absorbed() -> None:
    """A lasting jump (new data mixture) is flagged for a few steps, not for the rest of the run."""
    losses = noisy(200) + noisy(300, level=3.5, seed=1)
    found = spikes_in(losses)
    assert found and found[0] == 200 and found[-1] < 260


def test_state_round_trip_continues_identically() -> None:
    losses = noisy(120)
    losses[100] = 5.0
    a = LossSpikeDetector()
    for x in losses[:60]:
        a.update(x)
    b = LossSpikeDetector()
    b.load_state_dict(a.state_dict())
    assert [a.update(x) is not None for x in losses[60:]] == [b.update(x) is not None for x in losses[60:]]
    assert a.spikes == b.spikes == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        LossSpikeDetector(threshold=0)
    with pytest.raises(ValueError, match="warmup"):
        LossSpikeDetector(warmup=1)
