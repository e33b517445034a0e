"""What a combining rule is: how the clients' vectors become one, in place
of FedAvg's weighted average (a run's ``aggregator``). ``combine.RULES``
lists them; docs/EXTENDING.md adds one.

A rule is a small object with a ``name``, a one-line ``summary`` and one
method, ``combine``, on plain NumPy data; it returns the combined vector and
the lines that write it out with its numbers (the log's math, the page's).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:  # (combine imports the rules: only the type here)
    from .combine import Combine


class CannotCombine(ValueError):
    """Too few replies for the rule (Krum with f attackers needs more than f + 2)."""


class Rule(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what it computes, for /start's documentation

    @abstractmethod
    def combine(self, vectors: Sequence[np.ndarray], ns: Sequence[int], center: np.ndarray,
                settings: Combine, coords: list[str]) -> tuple[np.ndarray, list[str]]:
        """The combined vector of ``vectors`` (one per client, n_k samples
        each, updates from ``center``: θ_t for models, 0 for gradients) and
        one line or more per coordinate (``coords``: w, b …) writing it out.
        ``settings``: the run's (trim, byzantine, …). Raises CannotCombine
        when there are too few vectors for it."""
