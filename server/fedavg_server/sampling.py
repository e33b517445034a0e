"""Who takes part in a round: S_t, a sample of the configured clients."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .settings import sampled_per_round


class Sampler(Protocol):
    def draw(self, r: int, urls: list[str]) -> list[str]:
        """Round r's clients, in configuration order."""

    def needed(self, sampled: int) -> int:
        """How many of ``sampled`` clients must reply for the round to count."""


@dataclass(frozen=True)
class SeededSample:
    """All clients, or max(min_clients, ⌈fraction·K⌉) of them drawn from
    (seed, round): the same sample on every replay of the run."""

    fraction: float
    min_clients: int
    seed: int

    def draw(self, r: int, urls: list[str]) -> list[str]:
        m = sampled_per_round(self.fraction, self.min_clients, len(urls))
        if m == len(urls):
            return list(urls)
        picked = np.random.default_rng([self.seed, r]).choice(len(urls), size=m, replace=False)
        return [urls[i] for i in sorted(picked)]

    def needed(self, sampled: int) -> int:
        return self.min_clients


@dataclass(frozen=True)
class PoissonSample:
    """Each client on its own with probability q = fraction (Poisson
    sampling, what DP's accountant assumes), from the system's entropy: a
    sample that the run's seed could replay would be no secret."""

    fraction: float
    min_clients: int

    def draw(self, r: int, urls: list[str]) -> list[str]:
        return [urls[i] for i in np.flatnonzero(poisson_mask(len(urls), self.fraction))]

    def needed(self, sampled: int) -> int:
        # A round may sample fewer than min_clients, or none: its release is then mostly noise.
        return min(self.min_clients, sampled)


def poisson_mask(k: int, q: float) -> np.ndarray:
    """K independent Bernoulli(q) draws from the operating system's entropy
    (os.urandom, as random.SystemRandom uses): client k is in when
    u_k < q, u_k = (53 random bits)/2⁵³ uniform on [0, 1), exactly
    SystemRandom().random()'s draw. One read of 8·K bytes, not K Python
    calls: a population of a million is sampled in milliseconds."""
    words = np.frombuffer(os.urandom(8 * k), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < q
