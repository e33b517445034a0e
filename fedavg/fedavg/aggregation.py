"""FedAvg's aggregation: the weighted average of models and of losses.

Pure functions of plain data (vectors and sample counts); nothing here knows
about HTTP. Each client k contributes a vector V_k (its local model
θ_k = [w_k, b_k], or a gradient) computed on n_k samples. ``fedavg.trace``
writes these sums out with their numbers.
"""
from __future__ import annotations

import math
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


# --- robust aggregation: when some clients may lie ---------------------------------
#
# FedAvg's average lets one client move the model anywhere (w = 10^12 pulls the
# mean to ~10^12/K) and weighs n_k, which no one can check. Each rule below is
# a drop-in for ``weighted_average`` that bounds what f bad clients can do.


def capped_weights(ns: Sequence[int], max_weight: float) -> np.ndarray:
    """p_k = n_k/N, then no p_k above ``max_weight``: capped shares are fixed at
    the cap and the rest is shared among the others in proportion to n_k,
    repeated until none is above it. With max_weight·K < 1 no such weights
    exist, and every client gets 1/K."""
    n = np.asarray(ns, dtype=float)
    if max_weight * len(n) < 1:
        return np.full(len(n), 1 / len(n))
    p = n / n.sum()
    capped = np.zeros(len(n), dtype=bool)
    while np.any(p > max_weight * (1 + 1e-12)):
        capped |= p > max_weight
        free = ~capped
        p = np.where(capped, max_weight, 0.0)
        rest = 1.0 - max_weight * capped.sum()
        p[free] = rest * n[free] / n[free].sum()
    return p


def coordinate_median(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """V_j = median_k V_k,j for every coordinate j (Yin et al., 2018); n_k is
    not used: a count no one can check cannot buy a vote."""
    return np.median(np.stack(vectors), axis=0)


def trimmed_mean(vectors: Sequence[np.ndarray], beta: float) -> np.ndarray:
    """For every coordinate: drop the ⌊β·K⌋ largest and the ⌊β·K⌋ smallest of
    the K values and average the rest (Yin et al., 2018), 0 ≤ β < 1/2."""
    values = np.sort(np.stack(vectors), axis=0)
    cut = int(np.floor(beta * len(values)))
    return values[cut: len(values) - cut].mean(axis=0)


def krum_scores(vectors: Sequence[np.ndarray], f: int) -> np.ndarray:
    """score_k = Σ of ‖V_k − V_j‖² over the K − f − 2 vectors V_j nearest to V_k
    (Blanchard et al., 2017); needs K > f + 2."""
    V = np.stack(vectors)
    nearest = len(V) - f - 2
    if nearest < 1:
        raise ValueError(f"Krum with f={f} needs more than {f + 2} clients, got {len(V)}")
    d2 = ((V[:, None, :] - V[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(d2, np.inf)
    return np.sort(d2, axis=1)[:, :nearest].sum(axis=1)


def multi_krum(vectors: Sequence[np.ndarray], f: int, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The m vectors of lowest Krum score, averaged (m = 1: Krum itself, the
    one vector nearest its neighbours). Returns (the result, the indices chosen)."""
    chosen = np.argsort(krum_scores(vectors, f), kind="stable")[:m]
    return np.stack(vectors)[chosen].mean(axis=0), chosen


def clip_updates(deltas: Sequence[np.ndarray], bound: float) -> list[np.ndarray]:
    """Δ_k · min(1, S/‖Δ_k‖): every update Δ_k = W_k − W_t scaled down to L2
    norm at most S (norm bounding, Sun et al., 2019)."""
    out = []
    for d in deltas:
        norm = float(np.linalg.norm(d))
        out.append(d * (bound / norm) if norm > bound else d)
    return out


def outliers(norms: Sequence[float], factor: float = 10.0) -> list[tuple[int, float]]:
    """(k, ratio) for each client whose update norm ‖Δ_k‖ is more than
    ``factor`` times the median of the other clients' norms (leave-one-out,
    so that with two clients each is compared with the other). A flag worth
    a look, not a verdict: an honest client far from the rest is flagged too.
    A norm that is not finite (an update beyond the largest float, ~1.8e308)
    is the most suspicious of all: always flagged, with the ratio inf,
    whatever the others' median (even 0, or inf).
    One sort gives every leave-one-out median: O(K log K), in plain Python
    because K is often 2 and NumPy's per-call cost would dominate."""
    k = len(norms)
    order = sorted(range(k), key=norms.__getitem__)
    s = [float(norms[i]) for i in order]
    n = k - 1
    out = []
    for place, i in enumerate(order):
        def nth(j: int) -> float:  # the j-th smallest of the others
            return s[j] if j < place else s[j + 1]
        if n < 1:
            break
        typical = nth(n // 2) if n % 2 else (nth(n // 2 - 1) + nth(n // 2)) / 2
        if not math.isfinite(norms[i]):
            out.append((i, math.inf))
        elif typical > 0 and norms[i] > factor * typical:
            out.append((i, float(norms[i]) / typical))
    return sorted(out)


def update_norms(updates: Sequence[np.ndarray]) -> list[float]:
    """‖Δ_k‖ for every update, without overflow on the way (math.hypot
    scales; Σ Δ² would overflow for entries near 1e300). A norm itself
    beyond the largest float (w = b = 1.797e308: √2·1.797e308) is inf."""
    return [math.hypot(*u) for u in updates]
