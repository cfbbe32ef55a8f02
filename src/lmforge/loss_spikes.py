"""Loss-spike detection: a training loss far above its recent level, flagged as it happens.

`LossSpikeDetector.update(loss)` keeps an exponential moving mean and variance of the loss. The first
`warmup` losses only build the statistics (exact mean and variance over them); after that a loss above
`mean + threshold * std` is a spike (std floored at 1% of the mean: with the default threshold a spike is at
least 6% above the moving mean, so a very smooth loss's small wobbles are not flagged). The update is winsorised at that bound, so one huge spike does not
inflate the variance and hide the next ones, while a lasting level shift is still absorbed within a few
dozen steps. Only upward moves count: a falling loss is never a spike. Non-finite losses are ignored (the
stage skips and counts those steps itself). Plain Python floats: cheap per step, and `state_dict()` goes
into checkpoints (`weights_only=True` loading) so a resumed run keeps its statistics and its count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Spike:
    loss: float
    mean: float
    std: float

    @property
    def sigmas(self) -> float:
        return (self.loss - self.mean) / self.std if self.std > 0 else math.inf


@dataclass
class LossSpikeDetector:
    threshold: float = 6.0  # spike: loss > mean + threshold * std
    warmup: int = 20  # losses that only build the statistics
    decay: float = 0.98  # EMA decay per observed step (~50-step memory)
    rel_std_floor: float = 0.01  # std >= 1% of |mean|: a spike is at least `threshold` % above the mean
    count: int = 0  # losses observed
    mean: float = 0.0
    var: float = 0.0
    spikes: int = 0  # spikes detected so far

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.warmup < 2:
            raise ValueError(f"warmup must be >= 2 (a variance needs two losses), got {self.warmup}")

    @property
    def std(self) -> float:
        return max(math.sqrt(max(self.var, 0.0)), self.rel_std_floor * abs(self.mean), 1e-12)

    def update(self, loss: float) -> Spike | None:
        """Observe one training loss; returns the Spike when it is one, else None."""
        loss = float(loss)
        if not math.isfinite(loss):
            return None
        self.count += 1
        if self.count <= self.warmup:  # Welford: exact mean / (population) variance of the first losses
            delta = loss - self.mean
            self.mean += delta / self.count
            self.var += (delta * (loss - self.mean) - self.var) / self.count
            return None
        bound = self.mean + self.threshold * self.std
        spike = Spike(loss, self.mean, self.std) if loss > bound else None
        x = min(loss, bound)  # winsorised: a spike moves the statistics no more than a loss at the bound
        delta = x - self.mean
        self.mean += (1.0 - self.decay) * delta
        self.var = self.decay * (self.var + (1.0 - self.decay) * delta * delta)
        if spike is not None:
            self.spikes += 1
        return spike

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("count", "mean", "var", "spikes"):  # the settings stay as configured for this run
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))
