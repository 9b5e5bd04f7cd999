"""Differential-privacy noise: the Laplace or Gaussian mechanism, and how one cell's
statistics are clamped, noised and rounded under the ε (and δ) it may spend."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..privacy.aggregate import FieldStatistics
from ..privacy.filter import ADDITIVE_FIELDS
from .config import DPConfig

__all__ = ["NoiseMechanism", "NoisyField", "add_noise"]


class NoiseMechanism:
    """Laplace or Gaussian noise from a cryptographic random source.

    ``rng`` defaults to :class:`random.SystemRandom`; tests pass a seeded
    :class:`random.Random`. Noise is drawn with floating-point arithmetic (no snapping), which
    leaks in the last bits of a value; published values are rounded to 6 significant digits.
    """

    def __init__(self, dp: DPConfig, *, rng: random.Random | None = None) -> None:
        if not dp.enabled:
            raise ConfigError("NoiseMechanism needs dp.mechanism laplace or gaussian")
        self.dp = dp
        self._rng = rng if rng is not None else random.SystemRandom()

    def scale(self, *, sensitivity: float, epsilon: float, delta: float) -> float:
        """Laplace scale b, or the Gaussian standard deviation, for one release."""
        if self.dp.mechanism == "laplace":
            return sensitivity / epsilon
        return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon

    def sample(self, *, sensitivity: float, epsilon: float, delta: float) -> float:
        """One draw of noise for a release with this sensitivity and budget."""
        b = self.scale(sensitivity=sensitivity, epsilon=epsilon, delta=delta)
        if self.dp.mechanism == "gaussian":
            return self._rng.gauss(0.0, b)
        while True:
            u = self._rng.random() - 0.5
            if u != -0.5:
                return -b * math.copysign(1.0, u) * math.log(1 - 2 * abs(u))


@dataclass(frozen=True, slots=True, kw_only=True)
class NoisyField:
    """One statistic of a cell to release under noise: field ``name``, clamped to
    ``bounds``, over each company's values in ``per_company``."""

    name: str
    bounds: tuple[float, float]
    stats: FieldStatistics
    per_company: Iterable[Sequence[float]]


def _combined(name: str, values: Sequence[float]) -> float:
    return math.fsum(values) if name in ADDITIVE_FIELDS else math.fsum(values) / len(values)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def add_noise(fields: Sequence[NoisyField], *, dp: DPConfig,
              noise: NoiseMechanism) -> list[FieldStatistics]:
    """The noised statistics of one cell's ``fields``, in order.

    The cell's ``dp.epsilon_per_cell`` and ``dp.delta`` are split evenly over its releases (a
    mean per field, and a sum per additive field); the standard deviation is never released.
    """
    releases = sum(1 + (f.name in ADDITIVE_FIELDS) for f in fields)
    eps = dp.epsilon_per_cell / releases
    delta = dp.delta / releases
    out: list[FieldStatistics] = []
    for f in fields:
        lo, hi = f.bounds
        values = [min(max(_combined(f.name, vs), lo), hi) for vs in f.per_company]
        n = len(values)
        # Replace-one neighbours: changing one company moves the mean by at most
        # (hi - lo) / n and the sum by at most hi - lo. n itself is published.
        mean = math.fsum(values) / n + noise.sample(sensitivity=(hi - lo) / n, epsilon=eps,
                                                    delta=delta)
        total: float | None = None
        if f.name in ADDITIVE_FIELDS:
            total = math.fsum(values) + noise.sample(sensitivity=hi - lo, epsilon=eps,
                                                     delta=delta)
            total = _round(min(max(total, n * lo), n * hi))
        out.append(FieldStatistics(count=f.stats.count, companies=f.stats.companies,
                                   mean=_round(min(max(mean, lo), hi)), stddev=None,
                                   sum=total))
    return out
