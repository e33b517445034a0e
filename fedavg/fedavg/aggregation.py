"""FedAvg's aggregation: the weighted average of models and of losses.

Pure functions of plain data (vectors and sample counts); nothing here knows
about HTTP. Each client k contributes a vector V_k (its local model
θ_k = [w_k, b_k], or a gradient) computed on n_k samples. ``fedavg.trace``
writes these sums out with their numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def weights(ns: Sequence[int]) -> np.ndarray:
    """p_k = n_k / N, N = Σ_k n_k."""
    n = np.asarray(ns, dtype=float)
    return n / n.sum()


def weighted_average(vectors: Sequence[np.ndarray], ns: Sequence[int]) -> np.ndarray:
    """V = Σ_k n_k/N · V_k over the clients that replied, N = Σ_k n_k."""
    if not len(vectors):
        raise ValueError("weighted_average needs at least one vector")
    return weights(ns) @ np.stack([np.asarray(v, dtype=float) for v in vectors])


def weighted_loss_avg(losses: Sequence[tuple[float, int]]) -> float:
    """L = Σ_k n_k/N · L_k over the (L_k, n_k) pairs given, N = Σ_k n_k."""
    if not losses:
        raise ValueError("weighted_loss_avg needs at least one loss")
    total = sum(n for _, n in losses)
    return float(sum(n / total * loss for loss, n in losses))
