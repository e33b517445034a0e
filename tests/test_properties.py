"""The math's invariants as properties (Hypothesis): for any data, any number
of clients, any order, each checked against a reference written here in
plain Python (loops of floats; exact fractions for least squares), never
against the code's own output.

- the weighted average does not depend on the clients' order: the function,
  and whole FedAvg runs in this process with the clients in another order;
- FedSGD is centralised gradient descent on the pooled data, and so is
  FedAvg with one local epoch of full-batch gradient descent;
- Exact is the least-squares solution (with its ridge);
- median and trimmed mean stay in the honest clients' coordinate-wise box,
  and Krum picks a vector close to the honest ones, whatever f attackers send.

The runs go through the server's API in this process (``federation_app``),
a few milliseconds each; examples are bounded so the file takes seconds.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import Federated
from fedavg.aggregation import weighted_average
from fedavg.client import LocalClient
from fedavg.strategies import Combine
from fedavg_server.inprocess import federation_app

Vec = list[float]
Row = tuple[Vec, float]  # (x, y), x with one value per feature

# Enough examples to find what breaks, few enough for seconds: a run in this
# process costs ~25 ms, a pure function well under one. No deadline: a loaded
# machine is no failure. (Hypothesis's "ci" profile, derandomized, applies by
# itself when CI is set.)
FEW = settings(max_examples=20, deadline=None)
MANY = settings(max_examples=100, deadline=None)


# --- data -------------------------------------------------------------------------------


@st.composite
def federations(draw: Any, max_clients: int = 5, max_rows: int = 6, max_features: int = 3,
                min_clients: int = 1) -> list[list[Row]]:
    """Clients' rows on one feature count: 1 to max_rows each, x in [-3, 3], y in [-10, 10]."""
    d = draw(st.integers(1, max_features))
    x = st.floats(-3, 3, allow_subnormal=False)
    row = st.tuples(st.lists(x, min_size=d, max_size=d), st.floats(-10, 10, allow_subnormal=False))
    return draw(st.lists(st.lists(row, min_size=1, max_size=max_rows), min_size=min_clients, max_size=max_clients))


def clients_of(data: list[list[Row]]) -> list[LocalClient]:
    return [LocalClient(f"client_{k + 1}", np.array([x for x, _ in rows]), np.array([y for _, y in rows]))
            for k, rows in enumerate(data)]


@contextmanager
def in_process(clients: list[LocalClient]) -> Iterator[Federated]:
    """A federation of these clients in this process, on its own history,
    closed after the example (Hypothesis runs many in one test)."""
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federated(federation_app(clients, Path(tmp) / "runs.db"))
        try:
            yield fed
        finally:
            fed.close()


def run(fed: Federated, **start: Any) -> list[Vec]:
    """POST /start; every round's global model as [w..., b]."""
    body = fed.run(**start)
    assert body["status"] == "completed", body.get("error")
    out = []
    for r in body["rounds"]:
        w = r["global_model"]["w"]
        out.append([*(w if isinstance(w, list) else [w]), r["global_model"]["b"]])
    return out


def near(got: Vec, want: Vec, rel: float) -> bool:
    """Equal up to rel times the larger of 1 and the reference's largest entry."""
    scale = max([1.0, *(abs(v) for v in want)])
    return len(got) == len(want) and all(abs(g - w) <= rel * scale for g, w in zip(got, want))


# --- plain-Python references ------------------------------------------------------------


def gradient(rows: list[Row], theta: Vec) -> Vec:
    """∇ of 1/n Σ (w·x + b − y)² over the rows, at θ = [w..., b]."""
    n, d = len(rows), len(theta) - 1
    g = [0.0] * (d + 1)
    for x, y in rows:
        err = sum(theta[j] * x[j] for j in range(d)) + theta[d] - y
        for j in range(d):
            g[j] += 2 / n * err * x[j]
        g[d] += 2 / n * err
    return g


def gd(rows: list[Row], theta: Vec, lr: float, steps: int) -> list[Vec]:
    """θ after each of ``steps`` full-batch gradient steps."""
    out = []
    for _ in range(steps):
        theta = [t - lr * g for t, g in zip(theta, gradient(rows, theta))]
        out.append(theta)
    return out


def fedavg(data: list[list[Row]], theta: Vec, lr: float, epochs: int, rounds: int) -> list[Vec]:
    """FedAvg: each client's local GD from θ, then Σ_k n_k/N · θ_k, every round."""
    total = sum(len(rows) for rows in data)
    out = []
    for _ in range(rounds):
        locals_ = [gd(rows, theta, lr, epochs)[-1] for rows in data]
        theta = [sum(len(rows) / total * v[j] for rows, v in zip(data, locals_)) for j in range(len(theta))]
        out.append(theta)
    return out


def exact_solve(A: list[list[Fraction]], c: list[Fraction]) -> tuple[list[Fraction], list[list[Fraction]]] | None:
    """A⁻¹c and A⁻¹ by Gauss-Jordan in exact rational arithmetic; None if A is singular."""
    n = len(c)
    M = [[*row, c[i], *(Fraction(int(i == j)) for j in range(n))] for i, row in enumerate(A)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if M[r][col] != 0), None)
        if pivot is None:
            return None
        M[col], M[pivot] = M[pivot], M[col]
        M[col] = [v / M[col][col] for v in M[col]]
        for r in range(n):
            if r != col and M[r][col] != 0:
                M[r] = [a - M[r][col] * b for a, b in zip(M[r], M[col])]
    return [row[n] for row in M], [row[n + 1:] for row in M]


# --- the order of the clients ---------------------------------------------------------------


@MANY
@given(st.data())
def test_the_weighted_average_does_not_depend_on_the_clients_order(pick):
    k, d = pick.draw(st.integers(1, 8)), pick.draw(st.integers(1, 4))
    vectors = pick.draw(st.lists(st.lists(st.floats(-1e6, 1e6), min_size=d, max_size=d), min_size=k, max_size=k))
    ns = pick.draw(st.lists(st.integers(1, 10**6), min_size=k, max_size=k))
    order = pick.draw(st.permutations(range(k)))
    total = sum(ns)
    want = [math.fsum(n * v[j] for v, n in zip(vectors, ns)) / total for j in range(d)]
    straight = [float(v) for v in weighted_average([np.array(v) for v in vectors], ns)]
    shuffled = [float(v) for v in weighted_average([np.array(vectors[i]) for i in order], [ns[i] for i in order])]
    # entries up to 1e6 averaged with weights summing to 1: a few ulps of 1e6
    scale = max([1.0, *(abs(x) for v in vectors for x in v)])
    assert all(abs(s - w) <= 1e-12 * scale for s, w in zip(straight, want)), (straight, want)
    assert all(abs(s - w) <= 1e-12 * scale for s, w in zip(shuffled, want)), (shuffled, want)


@FEW
@given(federations(min_clients=2), st.data())
def test_a_fedavg_run_does_not_depend_on_the_clients_order(data, pick):
    """The same clients listed in another order (other URLs, other places in
    every sum): every round's global model is the same, and FedAvg's."""
    order = pick.draw(st.permutations(range(len(data))))
    rounds = pick.draw(st.integers(1, 3))
    clients = clients_of(data)
    with in_process(clients) as fed:
        straight = run(fed, rounds=rounds, seed=1)
    with in_process([clients[i] for i in order]) as fed:
        shuffled = run(fed, rounds=rounds, seed=1)
    want = fedavg(data, [0.0] * (len(data[0][0][0]) + 1), 0.01, 10, rounds)
    for r, (a, b, w) in enumerate(zip(straight, shuffled, want, strict=True), start=1):
        assert near(a, b, 1e-12), f"round {r}: {a} in one order, {b} in another"
        assert near(a, w, 1e-9), f"round {r}: {a} != FedAvg's {w}"


# --- federated is centralised ---------------------------------------------------------------


def init_and_lr(pick: Any, d: int) -> tuple[Vec, float]:
    theta = pick.draw(st.lists(st.floats(-5, 5), min_size=d + 1, max_size=d + 1))
    return theta, pick.draw(st.floats(0.001, 0.02))


@FEW
@given(federations(), st.integers(1, 5), st.data())
def test_fedsgd_is_gradient_descent_on_the_pooled_data(data, rounds, pick):
    """Σ_k n_k/N · ∇L_k = ∇L of the pooled rows, so FedSGD's rounds are
    pooled GD's steps: any rows, any number of clients, any start."""
    theta, lr = init_and_lr(pick, len(data[0][0][0]))
    with in_process(clients_of(data)) as fed:
        got = run(fed, strategy="fedsgd", rounds=rounds, lr=lr, seed=1, init={"w": theta[:-1], "b": theta[-1]})
    pooled = [row for rows in data for row in rows]
    for r, (g, w) in enumerate(zip(got, gd(pooled, theta, lr, rounds), strict=True), start=1):
        assert near(g, w, 1e-9), f"round {r}: {g} != pooled GD's {w}"


@FEW
@given(federations(), st.integers(1, 5), st.data())
def test_fedavg_with_one_full_batch_epoch_is_gradient_descent_on_the_pooled_data(data, rounds, pick):
    """One local step each: Σ_k n_k/N · (θ − lr·∇L_k) = θ − lr·∇L, pooled GD."""
    theta, lr = init_and_lr(pick, len(data[0][0][0]))
    with in_process(clients_of(data)) as fed:
        got = run(fed, strategy="fedavg", rounds=rounds, lr=lr, local_epochs=1, seed=1,
                  init={"w": theta[:-1], "b": theta[-1]})
    pooled = [row for rows in data for row in rows]
    for r, (g, w) in enumerate(zip(got, gd(pooled, theta, lr, rounds), strict=True), start=1):
        assert near(g, w, 1e-9), f"round {r}: {g} != pooled GD's {w}"


# --- Exact is least squares -------------------------------------------------------------------


@FEW
@given(st.data())
def test_exact_is_the_least_squares_solution(pick):
    """(Σ X̃ᵀX̃ + λ·D) W = Σ X̃ᵀy solved exactly in fractions from the pooled
    rows (x on a grid of integers, so the system's conditioning is known):
    Exact's one round gives W up to the error its condition number allows."""
    d = pick.draw(st.integers(1, 3))
    x = st.integers(-4, 4).map(float)
    row = st.tuples(st.lists(x, min_size=d, max_size=d), st.floats(-50, 50, allow_subnormal=False))
    data = pick.draw(st.lists(st.lists(row, min_size=1, max_size=6), min_size=1, max_size=4))
    ridge = pick.draw(st.one_of(st.just(0.0), st.floats(0.01, 10)))
    rows = [([Fraction(v) for v in xs], Fraction(y)) for rows in data for xs, y in rows]
    n = d + 1
    A = [[sum((xt[i] * xt[j] for xt in ([*xs, Fraction(1)] for xs, _ in rows)), Fraction(0))
          + (Fraction(ridge) if i == j < d else 0) for j in range(n)] for i in range(n)]
    c = [sum(([*xs, Fraction(1)][i] * y for xs, y in rows), Fraction(0)) for i in range(n)]
    solved = exact_solve(A, c)
    assume(solved is not None)  # a unique solution: rank-deficient data has many
    want, inverse = solved
    # the ∞-norm condition number, exactly: how far a backward-stable solve may land
    cond = max(sum(abs(v) for v in row) for row in A) * max(sum(abs(v) for v in row) for row in inverse)
    assume(cond < 1e8)
    with in_process(clients_of(data)) as fed:
        got = run(fed, strategy="exact", ridge=ridge, seed=1)
    assert len(got) == 1
    assert near(got[0], [float(v) for v in want], 1e-13 * float(cond) + 1e-12), (got[0], want, float(cond))


# --- robust rules against f attackers -----------------------------------------------------------

HONEST = st.floats(-1e6, 1e6, allow_subnormal=False)
ANYTHING = st.floats(allow_nan=False, allow_infinity=False)  # what an attacker may send: any finite number


def honest_and_attackers(pick: Any, f: int, k: int) -> tuple[list[Vec], list[bool]]:
    """K vectors, f of them from attackers, the attackers anywhere in the order."""
    d = pick.draw(st.integers(1, 4))
    honest = pick.draw(st.lists(st.lists(HONEST, min_size=d, max_size=d), min_size=k - f, max_size=k - f))
    attackers = pick.draw(st.lists(st.lists(ANYTHING, min_size=d, max_size=d), min_size=f, max_size=f))
    order = pick.draw(st.permutations(range(k)))
    tagged = [(v, True) for v in honest] + [(v, False) for v in attackers]
    return [tagged[i][0] for i in order], [tagged[i][1] for i in order]


def box(vectors: list[Vec], is_honest: list[bool]) -> list[tuple[float, float]]:
    """Each coordinate's range over the honest vectors."""
    honest = [v for v, h in zip(vectors, is_honest) if h]
    return [(min(v[j] for v in honest), max(v[j] for v in honest)) for j in range(len(honest[0]))]


def combine(rule: Combine, vectors: list[Vec]) -> Vec:
    """The rule as a run applies it (n_k = 1 each: the robust rules do not weigh n_k)."""
    result, _ = rule([np.array(v) for v in vectors], [1] * len(vectors), np.zeros(len(vectors[0])))
    return [float(v) for v in result]


@MANY
@given(st.data())
def test_the_median_stays_in_the_honest_clients_box(pick):
    f = pick.draw(st.integers(0, 3))
    k = pick.draw(st.integers(2 * f + 1, 2 * f + 4))  # an honest majority
    vectors, is_honest = honest_and_attackers(pick, f, k)
    got = combine(Combine(aggregator="median"), vectors)
    for j, (lo, hi) in enumerate(box(vectors, is_honest)):
        assert lo <= got[j] <= hi, f"coordinate {j}: {got[j]} outside the honest [{lo}, {hi}]"


@MANY
@given(st.data())
def test_the_trimmed_mean_cutting_at_least_f_stays_in_the_honest_clients_box(pick):
    """trim ≥ f/K cuts ⌊trim·K⌋ ≥ f values from each end. (f/K rounded to a
    float may fall just below f/K, as 1/49 does: then ⌊trim·K⌋ = f − 1 and
    one attacker stays; so the least trim drawn is the first float ≥ f/K.)"""
    f = pick.draw(st.integers(0, 3))
    k = pick.draw(st.integers(2 * f + 1, 2 * f + 6))
    least = f / k
    while Fraction(least) * k < f:
        least = math.nextafter(least, 1.0)
    trim = pick.draw(st.floats(least, 0.5, exclude_max=True))
    vectors, is_honest = honest_and_attackers(pick, f, k)
    got = combine(Combine(aggregator="trimmed_mean", trim=trim), vectors)
    for j, (lo, hi) in enumerate(box(vectors, is_honest)):
        slack = 1e-12 * max(abs(lo), abs(hi))  # a mean of values in [lo, hi] rounds to within ulps of it
        assert lo - slack <= got[j] <= hi + slack, f"coordinate {j}: {got[j]} outside the honest [{lo}, {hi}]"


@MANY
@given(st.data())
def test_krum_picks_a_sent_vector_within_reach_of_the_honest_ones(pick):
    """Krum with byzantine = f and K ≥ 2f + 3 picks one of the vectors sent,
    and it lies within √(K − f − 2)·D of an honest vector, D the honest
    vectors' diameter, however far the attackers go: its score is at most an
    honest one's, at most (K − f − 2)·D², and at least one of its K − f − 2
    nearest is honest. So an attacker can be picked only from that close
    (one sitting at the honest centroid may be: it is nearer its neighbours
    than they are to each other); every attacker farther than that leaves an
    honest vector picked."""
    f = pick.draw(st.integers(0, 2))
    k = pick.draw(st.integers(2 * f + 3, 2 * f + 5))
    vectors, is_honest = honest_and_attackers(pick, f, k)
    # an attacker near the largest float: its distances overflow to inf, which only worsens its score
    with np.errstate(over="ignore", invalid="ignore"):
        got = combine(Combine(aggregator="krum", byzantine=f), vectors)
    assert got in vectors
    honest = [v for v, h in zip(vectors, is_honest) if h]
    attackers = [v for v, h in zip(vectors, is_honest) if not h]
    reach = math.sqrt(k - f - 2) * max(math.dist(a, b) for a in honest for b in honest)
    # the scores' rounding (relative) and the squares' (a few ulps of the coordinates)
    slack = 1e-9 * (reach + max([1.0, *(abs(x) for v in honest for x in v)]))
    assert min(math.dist(got, h) for h in honest) <= reach + slack
    if all(math.dist(a, h) > reach + 2 * slack for a in attackers for h in honest):
        assert got in honest, "every attacker is out of reach, yet one was picked"
