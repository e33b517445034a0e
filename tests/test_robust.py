"""Robust aggregation rules against plain-Python references, and what each
does against clients that lie: a huge model, a flipped sign, a false n_k."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedavg.aggregation import (
    capped_weights,
    clip_updates,
    coordinate_median,
    krum_scores,
    multi_krum,
    outliers,
    trimmed_mean,
    update_norms,
    weighted_average,
)


def vectors(seed: int, k: int, d: int = 3) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.gauss(0, 1) for _ in range(d)] for _ in range(k)]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_coordinate_median_is_each_coordinates_median(k):
    vs = vectors(k, k)
    got = coordinate_median([np.array(v) for v in vs])
    assert got.tolist() == pytest.approx([median([v[j] for v in vs]) for j in range(3)], abs=1e-15)


@pytest.mark.parametrize("k, beta", [(5, 0.0), (5, 0.2), (10, 0.25), (7, 0.49)])
def test_trimmed_mean_drops_the_extremes_of_each_coordinate(k, beta):
    vs = vectors(10 + k, k)
    cut = math.floor(beta * k)
    want = []
    for j in range(3):
        kept = sorted(v[j] for v in vs)[cut: k - cut]
        want.append(sum(kept) / len(kept))
    assert trimmed_mean([np.array(v) for v in vs], beta).tolist() == pytest.approx(want, abs=1e-12)


def test_krum_scores_and_choice_against_brute_force():
    vs = vectors(3, 7)
    f = 2
    scores = []
    for i, v in enumerate(vs):
        d = sorted(sum((a - b) ** 2 for a, b in zip(v, u)) for j, u in enumerate(vs) if j != i)
        scores.append(sum(d[: len(vs) - f - 2]))
    assert krum_scores([np.array(v) for v in vs], f).tolist() == pytest.approx(scores, rel=1e-12)
    best3 = sorted(range(len(vs)), key=lambda i: scores[i])[:3]
    got, chosen = multi_krum([np.array(v) for v in vs], f, m=3)
    assert sorted(chosen.tolist()) == sorted(best3)
    assert got.tolist() == pytest.approx([sum(vs[i][j] for i in best3) / 3 for j in range(3)], abs=1e-12)
    with pytest.raises(ValueError, match="more than 4 clients"):
        krum_scores([np.array(v) for v in vs[:4]], f)


def test_clipping_bounds_each_update_and_keeps_its_direction():
    deltas = [np.array([3.0, 4.0]), np.array([0.3, 0.4]), np.array([-600.0, 800.0])]
    clipped = clip_updates(deltas, 1.0)
    assert [round(float(np.linalg.norm(c)), 12) for c in clipped] == [1.0, 0.5, 1.0]
    assert clipped[0].tolist() == pytest.approx([0.6, 0.8]) and clipped[2].tolist() == pytest.approx([-0.6, 0.8])
    assert clipped[1].tolist() == [0.3, 0.4]  # inside the bound: untouched


@pytest.mark.parametrize("ns, cap", [([2, 2, 10**9], 0.5), ([1, 2, 3, 1000, 5000], 0.3), ([5, 5], 0.9),
                                     ([1, 1, 1, 1], 0.1)])
def test_capped_weights_sum_to_one_none_above_the_cap_the_rest_in_proportion(ns, cap):
    p = capped_weights(ns, cap).tolist()
    assert sum(p) == pytest.approx(1.0, abs=1e-12)
    if cap * len(ns) < 1:
        assert p == pytest.approx([1 / len(ns)] * len(ns))
        return
    assert max(p) <= cap + 1e-12
    free = [i for i in range(len(ns)) if p[i] < cap - 1e-12]
    for i in free:  # the uncapped keep their ratio of n_k
        assert p[i] / p[free[0]] == pytest.approx(ns[i] / ns[free[0]], rel=1e-12)


def test_against_lying_clients_the_average_breaks_and_the_robust_rules_hold():
    """Eight honest clients near (2, 1) and two attackers: one sends w = b =
    10^12, one the honest mean with its sign flipped and scaled by 100."""
    rng = random.Random(5)
    honest = [np.array([2 + rng.gauss(0, 0.05), 1 + rng.gauss(0, 0.05)]) for _ in range(8)]
    attack = [np.array([1e12, 1e12]), -100 * np.mean(honest, axis=0)]
    every = honest + attack
    truth = np.array([2.0, 1.0])
    assert np.linalg.norm(weighted_average(every, [1] * 10) - truth) > 1e10
    assert np.linalg.norm(coordinate_median(every) - truth) < 0.1
    assert np.linalg.norm(trimmed_mean(every, 0.2) - truth) < 0.1
    assert np.linalg.norm(multi_krum(every, f=2, m=4)[0] - truth) < 0.1
    # a client lying about n_k = 10^9 owns the average unless its share is capped
    liar = [np.array([50.0, 50.0])] + honest
    ns = [10**9] + [20] * 8
    assert np.linalg.norm(weighted_average(liar, ns) - liar[0]) < 1e-3
    capped = capped_weights(ns, 0.2) @ np.stack(liar)
    assert np.linalg.norm(capped - truth) < 0.2 * np.linalg.norm(liar[0] - truth) + 0.1


@pytest.mark.parametrize("k", [2, 3, 6, 7, 50])
def test_outliers_compares_each_norm_with_the_median_of_the_others(k):
    rng = random.Random(k)
    norms = [rng.uniform(0.5, 2.0) for _ in range(k)]
    norms[k // 2] = 1000.0
    got = dict(outliers(norms))
    for i, n in enumerate(norms):
        others = [m for j, m in enumerate(norms) if j != i]
        typical = median(others)
        if n > 10 * typical:
            assert got[i] == pytest.approx(n / typical, rel=1e-12)
        else:
            assert i not in got
    assert k // 2 in got


def test_update_norms_do_not_overflow():
    got = update_norms([np.array([1e300, 1e300]), np.array([3.0, 4.0]), np.zeros(2)])
    assert got == pytest.approx([math.sqrt(2) * 1e300, 5.0, 0.0], rel=1e-12)
