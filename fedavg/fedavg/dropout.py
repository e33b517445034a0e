"""Simulated dropouts and stragglers, for a client host's scenario.

Cross-device clients leave mid-round (a phone goes offline) and some are
slow. A client host given a rate P makes each of its clients drop out of a
round with probability P, independently, drawn from (the scenario's seed,
the round, the client's k) alone: the same clients drop out of the same
round whichever way the server calls them (each client's /train, or the
host's /batch/train), in any order, on any run of the scenario. A dropped
client answers what a real one that left would (an error reply on /train,
no row on /batch/train), its reason naming the simulation.

A straggler (rate P_s) takes S seconds more. Its /train really waits, up to
the server's X-Deadline-S, and past it answers 408 as a client whose deadline
passed does. /batch/train does not sleep: a straggler's row is left out as
timed out when S exceeds the request's X-Deadline-S (a simulation of the
wait, docs/PROTOCOL.md), and is trained as usual otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
# Which draw a uniform is for: a client's dropout and its straggling are independent.
DROP, STRAGGLE = 1, 2


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014; Java's
    SplittableRandom), on uint64 arrays: z ← (z ⊕ z≫30)·0xBF58476D1CE4E5B9,
    z ← (z ⊕ z≫27)·0x94D049BB133111EB, z ⊕ z≫31, all mod 2⁶⁴."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, round_no: int, ks: np.ndarray, what: int) -> np.ndarray:
    """u_k ∈ [0, 1) for each client k of ``ks``, a function of (seed, round,
    k, what) alone: the top 53 bits of splitmix64 applied in turn to the
    seed, the round, what the draw is for, and k (each mixed in with ⊕), / 2⁵³."""
    z = splitmix64(np.array([seed & MASK64], dtype=np.uint64))
    for part in (round_no, what):
        z = splitmix64(z ^ np.uint64(part & MASK64))
    z = splitmix64(z ^ np.asarray(ks, dtype=np.int64).astype(np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class Dropout:
    """A host's simulated dropouts (``rate``) and stragglers (``straggle_rate``,
    each ``straggle_s`` seconds slower), drawn from ``seed``."""

    rate: float = 0.0
    seed: int = 0
    straggle_rate: float = 0.0
    straggle_s: float = 0.0

    def __post_init__(self) -> None:
        for name, value in (("--dropout", self.rate), ("--stragglers", self.straggle_rate)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: must be a probability in [0, 1), got {value:g}")
        if self.straggle_s < 0:
            raise ValueError(f"--straggle-s: must be >= 0 seconds, got {self.straggle_s:g}")
        if self.straggle_rate > 0 and self.straggle_s == 0:
            raise ValueError("--stragglers: needs --straggle-s, how many seconds more a straggler takes")

    def dropped(self, round_no: int, ks: np.ndarray) -> np.ndarray:
        """(B,) whether each client k drops out of round ``round_no``: u_k < rate."""
        return uniforms(self.seed, round_no, ks, DROP) < self.rate

    def straggles(self, round_no: int, ks: np.ndarray) -> np.ndarray:
        """(B,) whether each client k is a straggler in round ``round_no``."""
        return uniforms(self.seed, round_no, ks, STRAGGLE) < self.straggle_rate

    def why_dropped(self, round_no: int, k: int) -> str:
        return f"simulated dropout: client {k} left round {round_no} (the host's --dropout {self.rate:g})"

    def why_late(self, deadline_s: float) -> str:
        return (f"no reply within {deadline_s:g} s: simulated straggler, {self.straggle_s:g} s more than the "
                "others (the host's --straggle-s)")

    def describe(self) -> str:
        """Its words in the host's scenario description (and so in /health)."""
        parts = [f"dropout {self.rate:g}"] if self.rate else []
        if self.straggle_rate:
            parts.append(f"stragglers {self.straggle_rate:g} ({self.straggle_s:g} s more)")
        return ", ".join(parts)
