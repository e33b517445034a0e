"""Every strategy against references written here in plain Python: loops of
floats, no NumPy and nothing from ``fedavg``.

The federations run in this process: the server app over the clients' own
Flask apps, driven through the server's API with the bodies HTTP carries
(conftest's ``seed_federation`` and ``federation``). One test runs the apps
as processes, the way the README starts them: kill -9 of the server mid-run
and a resume (make test-all).

What is checked: FedAvg's long-run fixed point against its closed form;
FedSGD against centralised gradient descent; SCAFFOLD reaching the pooled
optimum, also with clients sampled, lost, known late or down at a resume (unequal n_k), round
by round against a plain-Python SCAFFOLD; Exact giving least squares in one round; FedAvgM, FedAdam, FedYogi,
FedAdagrad and FedNova against the papers' updates for 20 rounds; the log
showing each strategy's math; a client that cannot run a strategy; and every
stateful strategy, stopped or cut off mid-round and resumed, ending where an
uninterrupted run ends.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import sqlite3
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flask import Flask

import launcher
from conftest import ROOT, Federated
from fedavg.client import LocalClient
from fedavg.http.client_app import create_app as client_app
from fedavg.http.host_app import create_host_app
from fedavg_server import DEFAULT_CLIENTS
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.transport import Reply
from reference import SEED_DATA, local_gd

Vec = list[float]


def run(fed: Federated, **settings) -> dict:
    body = fed.run(**settings)
    assert body["status"] == "completed", body.get("error")
    return body


def models(body: dict) -> list[Vec]:
    return [[r["global_model"]["w"], r["global_model"]["b"]] for r in body["rounds"]]


def close(a: Vec, b: Vec, tol: float) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# --- plain-Python references ------------------------------------------------------


def pooled_gradient(data: list[tuple[float, float]], w: float, b: float) -> Vec:
    """∇ of 1/N Σ (w·x + b − y)² over all the rows given."""
    n = len(data)
    return [sum(2 / n * (w * x + b - y) * x for x, y in data), sum(2 / n * (w * x + b - y) for x, y in data)]


def fedavg_closed_form(clients, lr: float, epochs: int) -> Vec:
    """The fixed point of FedAvg with full-batch local GD, for one feature:
    one local step is θ ← A_k θ + lr·g_k, A_k = I − lr·H_k; after E steps
    θ ← A_k^E θ + S_k. The average's fixed point solves
    (I − Σ p_k A_k^E) θ = Σ p_k S_k: 2×2, by Cramer's rule."""
    total = sum(len(d) for d in clients)
    M = [[0.0, 0.0], [0.0, 0.0]]
    s = [0.0, 0.0]
    for data in clients:
        n, p = len(data), len(data) / total
        H = [[sum(2 / n * x * x for x, _ in data), sum(2 / n * x for x, _ in data)],
             [sum(2 / n * x for x, _ in data), 2.0]]
        g = [sum(2 / n * x * y for x, y in data), sum(2 / n * y for _, y in data)]
        A = [[1 - lr * H[0][0], -lr * H[0][1]], [-lr * H[1][0], 1 - lr * H[1][1]]]
        P, S = [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]
        for _ in range(epochs):  # S = Σ_{j<E} A^j·lr·g, P = A^E
            S = [S[i] + P[i][0] * lr * g[0] + P[i][1] * lr * g[1] for i in range(2)]
            P = [[sum(A[i][k] * P[k][j] for k in range(2)) for j in range(2)] for i in range(2)]
        for i in range(2):
            s[i] += p * S[i]
            for j in range(2):
                M[i][j] += p * ((1.0 if i == j else 0.0) - P[i][j])
    det = M[0][0] * M[1][1] - M[0][1] * M[1][0]
    return [(s[0] * M[1][1] - M[0][1] * s[1]) / det, (M[0][0] * s[1] - s[0] * M[1][0]) / det]


def local_models(clients, theta: Vec, lr: float, epochs: int) -> list[Vec]:
    return [list(local_gd(data, theta[0], theta[1], lr, epochs)) for data in clients]


def average(vectors: list[Vec], ns: list[int]) -> Vec:
    total = sum(ns)
    return [sum(n / total * v[j] for v, n in zip(vectors, ns)) for j in range(len(vectors[0]))]


def solve(A: list[Vec], c: Vec) -> Vec:
    """Gaussian elimination with partial pivoting."""
    n = len(c)
    M = [row[:] + [c[i]] for i, row in enumerate(A)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(M[r][col]))
        M[col], M[pivot] = M[pivot], M[col]
        for r in range(col + 1, n):
            f = M[r][col] / M[col][col]
            M[r] = [a - f * b for a, b in zip(M[r], M[col])]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (M[r][n] - sum(M[r][k] * out[k] for k in range(r + 1, n))) / M[r][r]
    return out


# --- FedAvg's fixed point and FedSGD ------------------------------------------------


def test_fedavg_run_long_ends_on_its_closed_form_fixed_point(seed_federation):
    expected = fedavg_closed_form(SEED_DATA, 0.01, 10)
    assert close(expected, [0.678506, 2.657290], 1e-6)  # the figures
    final = run(seed_federation, rounds=4000, seed=1)["final_model"]
    assert close([final["w"], final["b"]], expected, 1e-9), (final, expected)


def test_fedsgd_is_centralised_gradient_descent_round_by_round(seed_federation):
    pooled = SEED_DATA[0] + SEED_DATA[1]
    body = run(seed_federation, strategy="fedsgd", rounds=30, lr=0.1, seed=2)
    theta = [0.0, 0.0]
    for r, got in enumerate(models(body), start=1):
        g = pooled_gradient(pooled, *theta)
        theta = [theta[0] - 0.1 * g[0], theta[1] - 0.1 * g[1]]
        assert close(got, theta, 1e-12), f"round {r}: {got} != {theta}"
    assert all("gradient" in p and "local_model" not in p for p in body["rounds"][0]["participants"])


def test_fedsgd_converges_to_the_pooled_least_squares_line(seed_federation):
    final = run(seed_federation, strategy="fedsgd", rounds=1000, lr=0.1, seed=3)["final_model"]
    assert close([final["w"], final["b"]], [0.5, 3.0], 1e-6), final


def test_scaffold_at_the_seed_settings_reaches_the_pooled_optimum(seed_federation):
    body = run(seed_federation, strategy="scaffold", rounds=600, seed=4)
    final = body["final_model"]
    assert close([final["w"], final["b"]], [0.5, 3.0], 1e-6), final
    # FedAvg at the same settings stalls at its own fixed point, far from it
    assert not close(fedavg_closed_form(SEED_DATA, 0.01, 10), [0.5, 3.0], 0.1)
    assert set(body["rounds"][-1]["server_state"]) == {"c"}


# SCAFFOLD when not every client replies: three clients with n_k = 3, 8, 20
# and different x (different Hessians, so FedAvg drifts), each on a line of
# its own (the third with noise, so no client's optimum is the pooled one).
UNEQUAL = [[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)],
           [(1.0 + 0.5 * i, 3.0 - 0.5 * i) for i in range(8)],
           [(0.5 + 0.25 * i, 0.125 * i + 0.25 + (0.3 if i % 2 else -0.3)) for i in range(20)]]


def pooled_line(clients) -> Vec:
    """The least-squares line through every client's rows: w = cov(x, y)/var(x), b = ȳ − w·x̄."""
    rows = [row for data in clients for row in data]
    mx, my = sum(x for x, _ in rows) / len(rows), sum(y for _, y in rows) / len(rows)
    w = sum((x - mx) * (y - my) for x, y in rows) / sum((x - mx) ** 2 for x, _ in rows)
    return [w, my - w * mx]


def scaffold_reference(clients, took_part: list[list[int]], lr: float, epochs: int,
                       known_from: dict[int, int] | None = None) -> list[Vec]:
    """SCAFFOLD, option II (Karimireddy et al., 2020), with n_k weights: in
    each round the clients of ``took_part`` (indices) take ``epochs`` steps
    y ← y − lr·(∇L_k(y) − c_k + c) from W, then c_k⁺ = c_k − c + (W − y)/(τ·lr);
    W ← W + Σ_{k∈S} n_k/N_S·(y_k − W), and c ← c + Σ_{k∈S} n_k/N·Δc_k with N
    over ALL clients, which keeps c = Σ_k n_k/N·c_k. The others keep their c_k.
    ``known_from`` {k: round}: client k's n_k is unknown before that round's
    reply; c is then Σ_k n_k·c_k / Σ_k n_k over the clients known, from every c_k."""
    ns = [len(d) for d in clients]
    total = sum(ns)
    known_from = known_from or {}
    theta, c = [0.0, 0.0], [0.0, 0.0]
    c_k = [[0.0, 0.0] for _ in clients]
    out = []
    for t, part in enumerate(took_part, start=1):
        moved, dc = [], []
        for k in part:
            y = theta[:]
            for _ in range(epochs):
                g = pooled_gradient(clients[k], *y)
                y = [y[j] - lr * (g[j] - c_k[k][j] + c[j]) for j in range(2)]
            new_c_k = [c_k[k][j] - c[j] + (theta[j] - y[j]) / (epochs * lr) for j in range(2)]
            dc.append([new_c_k[j] - c_k[k][j] for j in range(2)])
            c_k[k] = new_c_k
            moved.append([y[j] - theta[j] for j in range(2)])
        step = average(moved, [ns[k] for k in part])
        theta = [theta[j] + step[j] for j in range(2)]
        if known_from:
            known = [k for k in range(len(clients)) if known_from.get(k, 0) <= t]
            c = [sum(ns[k] * c_k[k][j] for k in known) / sum(ns[k] for k in known) for j in range(2)]
        else:
            c = [c[j] + sum(ns[k] / total * d[j] for k, d in zip(part, dc)) for j in range(2)]
        out.append(theta)
    return out


def who_took_part(body: dict, names: list[str]) -> list[list[int]]:
    return [[names.index(p["client_id"]) for p in r["participants"]] for r in body["rounds"]]


def test_scaffold_with_two_of_three_clients_a_round_and_unequal_n_k_reaches_the_pooled_optimum(federation):
    """|S| = 2 of K = 3 each round (fraction 0.6). With c ← c + |S|/K·Σ n_k/N_S·Δc_k
    this run settled 0.895 from the pooled optimum and stayed there (20,000 rounds)."""
    fed = federation([local_client(name, [list(row) for row in data])
                      for name, data in zip(("small", "middle", "large"), UNEQUAL)])
    body = run(fed, strategy="scaffold", rounds=300, fraction=0.6, lr=0.05, local_epochs=5, seed=3)
    took_part = who_took_part(body, ["small", "middle", "large"])
    assert {len(part) for part in took_part} == {2} and len({tuple(part) for part in took_part}) == 3
    expected = scaffold_reference(UNEQUAL, took_part, 0.05, 5)
    for r, (got, want) in enumerate(zip(models(body), expected), start=1):
        assert close(got, want, 1e-9), f"round {r}: {got} != {want}"
    assert close(models(body)[-1], pooled_line(UNEQUAL), 1e-9), (models(body)[-1], pooled_line(UNEQUAL))


class Down(InProcessTransport):
    """The clients in this process, some of them down at times, as a client
    that is down is (a refused connection): ``rounds`` holds (url, round) for
    each /train not answered (that client never trains then, so its c_k
    stays as it was); ``health`` the urls whose /health is not answered."""

    rounds: set[tuple[str, int]] = set()
    health: set[str] = set()

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None):
        if (path == "/health" and url in self.health) or (path == "/train" and (url, body["round"]) in self.rounds):
            return Reply(url, reason="cannot connect: connection refused (the client is down)")
        return super().call(url, method, path, timeout_s, body)


def unequal_federation(servers, db: Any = None) -> tuple[Federated, Down]:
    host = create_host_app([local_client(name, [list(row) for row in data])
                            for name, data in zip(("small", "middle", "large"), UNEQUAL)], None)
    transport = Down.hosted(host, 3)
    return servers(transport, db, BATCHED=False), transport  # (its faults are clients' own /train calls)


def test_scaffold_with_a_client_lost_for_one_round_still_reaches_the_pooled_optimum(servers):
    """Every client each round, but the n_k = 8 client is down in round 5. With
    the old update this one dropout left a bias that no later round removed."""
    fed, transport = unequal_federation(servers)
    transport.rounds = {(transport.urls[1], 5)}
    body = run(fed, strategy="scaffold", rounds=300, lr=0.05, local_epochs=5, seed=3)
    took_part = who_took_part(body, ["small", "middle", "large"])
    assert took_part[4] == [0, 2] and all(part == [0, 1, 2] for r, part in enumerate(took_part) if r != 4)
    assert body["rounds"][4]["dropped"][0]["client_id"] == "middle"
    expected = scaffold_reference(UNEQUAL, took_part, 0.05, 5)
    for r, (got, want) in enumerate(zip(models(body), expected), start=1):
        assert close(got, want, 1e-9), f"round {r}: {got} != {want}"
    assert close(models(body)[-1], pooled_line(UNEQUAL), 1e-9), (models(body)[-1], pooled_line(UNEQUAL))


def test_scaffold_counts_a_client_whose_health_gave_no_n_k_from_its_first_reply(servers):
    """The n_k = 8 client is down when the run starts (no /health, so no n_k)
    and for rounds 1-3. Until it replies N = 3 + 20; then N = 31, and c is
    rescaled so that it stays Σ_k n_k/N·c_k over the clients known (its c_k
    was 0). The reference computes c that way from every c_k, each round."""
    fed, transport = unequal_federation(servers)
    middle = transport.urls[1]
    transport.health, transport.rounds = {middle}, {(middle, r) for r in (1, 2, 3)}
    body = run(fed, strategy="scaffold", rounds=300, lr=0.05, local_epochs=5, seed=3)
    took_part = who_took_part(body, ["small", "middle", "large"])
    assert took_part[:3] == [[0, 2]] * 3 and all(part == [0, 1, 2] for part in took_part[3:])
    expected = scaffold_reference(UNEQUAL, took_part, 0.05, 5, known_from={1: 4})
    for r, (got, want) in enumerate(zip(models(body), expected), start=1):
        assert close(got, want, 1e-9), f"round {r}: {got} != {want}"
    assert "c ← c·23/31 (its c_k was 0)" in "\n".join(body["rounds"][3]["math"])
    assert close(models(body)[-1], pooled_line(UNEQUAL), 1e-9), (models(body)[-1], pooled_line(UNEQUAL))


def failed_then_resumed(fed: Federated, transport: Down, cut: int, meanwhile: Callable[[], None],
                        **settings: Any) -> dict:
    """A run whose round ``cut`` no client answers (it fails there; nothing of
    that round trained), then ``meanwhile()`` (a client's /health goes down or
    up), then /resume: the resumed run, every round."""
    planned = transport.rounds
    transport.rounds = planned | {(url, cut) for url in transport.urls}
    first = fed.run(**settings)
    assert first["status"] == "failed" and len(first["rounds"]) == cut - 1, first.get("error")
    transport.rounds = planned
    meanwhile()
    return resume_and_wait(fed, first["run_id"])


def resume_and_wait(fed: Federated, run_id: int, request: Any = None) -> dict:
    """POST /runs/<id>/resume and wait: the completed run, every round."""
    status, body = fed.post(f"/runs/{run_id}/resume", request)
    assert status == 200 and body["status"] == "completed", body.get("error")
    return fed.whole(body)


def test_a_resumed_scaffold_run_keeps_what_c_is_divided_by_when_a_clients_health_is_down_then(servers):
    """Round 100 fails (no client answers) and the run is resumed while the
    n_k = 8 client's /health is down, and it drops round 100. c is stored as
    Σ_k n_k·c_k / 31; before, the resumed server divided by the N it could see
    (3 + 20 = 23), then rescaled c by 23/31 when the client replied: the run
    ended 9.45e-6 from the pooled optimum. Now the run goes on exactly as an
    uninterrupted one with the same dropout, and as the reference."""
    settings = {"strategy": "scaffold", "rounds": 300, "lr": 0.05, "local_epochs": 5, "seed": 3}
    fed, transport = unequal_federation(servers)
    middle = transport.urls[1]
    transport.rounds = {(middle, 100)}

    def middle_health_down() -> None:
        transport.health = {middle}

    resumed = failed_then_resumed(fed, transport, 100, middle_health_down, **settings)
    transport.health = set()
    straight = run(fed, **settings)
    took_part = who_took_part(resumed, ["small", "middle", "large"])
    assert took_part[99] == [0, 2] and all(part == [0, 1, 2] for r, part in enumerate(took_part) if r != 99)
    assert took_part == who_took_part(straight, ["small", "middle", "large"])
    expected = scaffold_reference(UNEQUAL, took_part, 0.05, 5)
    for r, (got, want) in enumerate(zip(models(resumed), expected), start=1):
        assert close(got, want, 1e-12), f"round {r}: {got} != {want}"
    assert models(resumed) == models(straight)  # bit for bit, every round
    assert resumed["rounds"][-1]["server_state"] == straight["rounds"][-1]["server_state"]
    assert close(models(resumed)[-1], pooled_line(UNEQUAL), 1e-12), (models(resumed)[-1], pooled_line(UNEQUAL))


def test_a_resumed_scaffold_run_counts_a_late_client_from_its_first_reply_as_an_uninterrupted_one(servers):
    """The n_k = 8 client is down at the start (no n_k) and for rounds 1-5; the
    run fails in round 3 and is resumed with that client's /health back up.
    c is still Σ n_k·c_k / 23 then (the client has not replied: its c_k is 0),
    so it joins at its first reply, round 6, as in the uninterrupted run."""
    settings = {"strategy": "scaffold", "rounds": 300, "lr": 0.05, "local_epochs": 5, "seed": 3}
    fed, transport = unequal_federation(servers)
    middle = transport.urls[1]
    transport.health, transport.rounds = {middle}, {(middle, r) for r in range(1, 6)}

    def middle_health_up() -> None:
        transport.health = set()

    resumed = failed_then_resumed(fed, transport, 3, middle_health_up, **settings)
    transport.health = {middle}
    straight = run(fed, **settings)
    took_part = who_took_part(resumed, ["small", "middle", "large"])
    assert took_part[:5] == [[0, 2]] * 5 and all(part == [0, 1, 2] for part in took_part[5:])
    assert took_part == who_took_part(straight, ["small", "middle", "large"])
    expected = scaffold_reference(UNEQUAL, took_part, 0.05, 5, known_from={1: 6})
    for r, (got, want) in enumerate(zip(models(resumed), expected), start=1):
        assert close(got, want, 1e-12), f"round {r}: {got} != {want}"
    assert models(resumed) == models(straight)  # bit for bit, every round
    assert "c ← c·23/31 (its c_k was 0)" in "\n".join(resumed["rounds"][5]["math"])


class LostReply(InProcessTransport):
    """The n_k = 8 client trains in round 5 but its reply never arrives (as
    after the server's timeout): ``lost`` keeps the Δc_k it sent."""

    lost: Any = None

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None):
        reply = super().call(url, method, path, timeout_s, body)
        if path == "/train" and url == self.urls[1] and body["round"] == 5:
            self.lost = [reply.body["control_delta"]["w"], reply.body["control_delta"]["b"]]
            return Reply(url, reason="no reply within 10 s")
        return reply


def test_a_scaffold_reply_lost_after_training_leaves_the_run_where_the_lost_share_of_c_puts_it(servers):
    """What STRATEGIES.md says SCAFFOLD cannot repair: c stays off by
    n_k/N·Δc_k, so the run settles where the pooled gradient ∇L(W) equals it,
    W = θ* + H⁻¹·n_k/N·Δc_k (H = 2/N·Σ x̃x̃ᵀ), not at θ*."""
    host = create_host_app([local_client(name, [list(row) for row in data])
                            for name, data in zip(("small", "middle", "large"), UNEQUAL)], None)
    transport = LostReply.hosted(host, 3)
    body = run(servers(transport, BATCHED=False), strategy="scaffold", rounds=300, lr=0.05, local_epochs=5, seed=3)
    assert body["rounds"][4]["dropped"][0]["client_id"] == "middle"
    rows = [row for data in UNEQUAL for row in data]
    n = len(rows)
    sxx, sx = sum(x * x for x, _ in rows), sum(x for x, _ in rows)
    h = [[2 * sxx / n, 2 * sx / n], [2 * sx / n, 2.0]]
    g = [8 / n * d for d in transport.lost]
    det = h[0][0] * h[1][1] - h[0][1] * h[1][0]
    offset = [(h[1][1] * g[0] - h[0][1] * g[1]) / det, (h[0][0] * g[1] - h[1][0] * g[0]) / det]
    expected = [p + o for p, o in zip(pooled_line(UNEQUAL), offset)]
    assert close(models(body)[-1], expected, 1e-12), (models(body)[-1], expected)


def test_a_scaffold_run_stored_before_n_was_kept_resumes_as_before(servers, tmp_path):
    """Records written before SCAFFOLD kept its N (no ``server_memo``) still
    resume: N is learned again from /health, as in a new run."""
    settings = {"strategy": "scaffold", "rounds": 300, "lr": 0.05, "local_epochs": 5, "seed": 3}
    db = tmp_path / "old.db"
    fed, transport = unequal_federation(servers, db)
    transport.rounds = {(url, 100) for url in transport.urls}
    first = fed.run(**settings)
    assert first["status"] == "failed" and first["rounds"][-1]["server_memo"] == {"N": 31, "uncounted": []}
    with sqlite3.connect(db) as old:
        old.execute("UPDATE rounds SET record = json_remove(record, '$.server_memo')")
    transport.rounds = set()
    body = resume_and_wait(fed, first["run_id"])
    assert all("server_memo" not in r for r in body["rounds"][:99])
    straight = run(fed, **settings)
    assert models(body) == models(straight)
    expected = scaffold_reference(UNEQUAL, [[0, 1, 2]] * 300, 0.05, 5)
    for r, (got, want) in enumerate(zip(models(body), expected), start=1):
        assert close(got, want, 1e-12), f"round {r}: {got} != {want}"


def test_scaffold_resumed_with_the_current_clients_counts_a_new_one_from_its_first_reply(servers, tmp_path):
    """A run of the n_k = 3 and 20 clients fails in round 50; a server with a
    third client (n_k = 8) resumes it with {"clients": "current"}. c is
    Σ n_k·c_k / 23 over the two (the new one's c_k is 0): the new client is
    counted from its first reply (c ← c·23/31), not from its /health, which
    answers (before: N = 31 from then on, c never rescaled)."""
    settings = {"strategy": "scaffold", "rounds": 300, "lr": 0.05, "local_epochs": 5, "seed": 3}
    db = tmp_path / "current.db"
    small, middle, large = (local_client(name, [list(row) for row in data])
                            for name, data in zip(("small", "middle", "large"), UNEQUAL))
    two = Down.hosted(create_host_app([small, large], None), 2)
    two.rounds = {(url, 50) for url in two.urls}
    fed = servers(two, db, BATCHED=False)  # (Down fails clients' own /train calls)
    first = fed.run(**settings)
    assert first["status"] == "failed" and len(first["rounds"]) == 49, first.get("error")
    fed.close()
    # the same two clients (their c_k kept), at the same URLs, and a third, on a host that batches
    host = create_host_app([small, large, middle], None)
    then = servers(InProcessTransport.hosted(host, 3), db)
    body = resume_and_wait(then, first["run_id"], {"clients": "current"})
    took_part = who_took_part(body, ["small", "middle", "large"])
    assert took_part[:49] == [[0, 2]] * 49 and all(sorted(part) == [0, 1, 2] for part in took_part[49:])
    expected = scaffold_reference(UNEQUAL, took_part, 0.05, 5, known_from={1: 50})
    for r, (got, want) in enumerate(zip(models(body), expected), start=1):
        assert close(got, want, 1e-12), f"round {r}: {got} != {want}"
    assert "c ← c·23/31 (its c_k was 0)" in "\n".join(body["rounds"][49]["math"])
    assert close(models(body)[-1], pooled_line(UNEQUAL), 1e-9), (models(body)[-1], pooled_line(UNEQUAL))
    assert host.test_client().get("/health").get_json()["calls"] == {"batch_train": 251, "train": 0}


# --- Exact: least squares in one round ------------------------------------------------


def test_exact_gives_the_seed_data_least_squares_line_in_one_round(seed_federation):
    body = run(seed_federation, strategy="exact", seed=5)
    assert len(body["rounds"]) == 1  # its default: one round is the answer
    xs = [x for d in SEED_DATA for x, _ in d]
    ys = [y for d in SEED_DATA for _, y in d]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    final = body["final_model"]
    assert close([final["w"], final["b"]], [slope, my - slope * mx], 1e-9)


def local_client(name: str, rows: list[Vec]) -> LocalClient:
    """A client holding these rows (x..., y), as its CSV would give them."""
    return LocalClient(name, np.array([row[:-1] for row in rows]), np.array([row[-1] for row in rows]))


def wide_data() -> list[list[Vec]]:
    """Two clients with 3 features and unequal n_k (4 and 9 rows)."""
    rng = random.Random(8)
    true = [1.5, -2.0, 0.5]
    data = []
    for n in (4, 9):
        rows = []
        for _ in range(n):
            x = [rng.uniform(-2, 2) for _ in true]
            rows.append([*x, sum(t * v for t, v in zip(true, x)) + 0.7 + rng.gauss(0, 0.3)])
        data.append(rows)
    return data


@pytest.mark.parametrize("ridge", [0.0, 2.5])
def test_exact_gives_pooled_least_squares_with_three_features_and_unequal_n_k(federation, ridge):
    data = wide_data()
    rows = data[0] + data[1]
    dim = len(rows[0])  # 3 weights and b
    xt = [[*r[:-1], 1.0] for r in rows]
    A = [[sum(x[i] * x[j] for x in xt) + (ridge if i == j < dim - 1 else 0.0) for j in range(dim)]
         for i in range(dim)]
    c = [sum(x[i] * r[-1] for x, r in zip(xt, rows)) for i in range(dim)]
    expected = solve(A, c)
    body = run(federation([local_client(name, d) for name, d in zip("ab", data)]), strategy="exact", ridge=ridge,
               seed=6)
    final = body["final_model"]
    assert [p["data_size"] for p in body["rounds"][0]["participants"]] == [4, 9]
    assert close([*final["w"], final["b"]], expected, 1e-9), (final, expected)


# --- server optimizers and FedNova against the papers' updates -------------------------


def fedopt_reference(name: str, rounds: int, lr: float, epochs: int, p: dict) -> list[Vec]:
    """Reddi et al. (2021), Algorithm 2 and Hsu et al. (2019): the clients run
    FedAvg's local GD; Δ = avg − θ; the server's optimizer steps on Δ."""
    theta, m, v = [0.0, 0.0], [0.0, 0.0], [p.get("tau", 0.0) ** 2] * 2
    out = []
    for _ in range(rounds):
        avg = average(local_models(SEED_DATA, theta, lr, epochs), [2, 2])
        delta = [a - t for a, t in zip(avg, theta)]
        if name == "fedavgm":
            v = [p["momentum"] * vj + dj for vj, dj in zip(v, delta)]
            theta = [t + p["server_lr"] * vj for t, vj in zip(theta, v)]
        else:
            m = [p["beta1"] * mj + (1 - p["beta1"]) * dj for mj, dj in zip(m, delta)]
            if name == "fedadagrad":
                v = [vj + dj * dj for vj, dj in zip(v, delta)]
            elif name == "fedadam":
                v = [p["beta2"] * vj + (1 - p["beta2"]) * dj * dj for vj, dj in zip(v, delta)]
            else:  # fedyogi
                v = [vj - (1 - p["beta2"]) * dj * dj * (1 if vj > dj * dj else -1 if vj < dj * dj else 0)
                     for vj, dj in zip(v, delta)]
            theta = [t + p["server_lr"] * mj / (math.sqrt(vj) + p["tau"]) for t, mj, vj in zip(theta, m, v)]
        out.append(theta)
    return out


@pytest.mark.parametrize("name, params", [
    ("fedavgm", {"server_lr": 0.7, "momentum": 0.6}),
    ("fedadam", {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 0.01}),
    ("fedyogi", {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 0.01}),
    ("fedadagrad", {"server_lr": 0.05, "beta1": 0.8, "tau": 0.01}),
])
def test_server_optimizers_match_the_papers_update_for_20_rounds(seed_federation, name, params):
    body = run(seed_federation, strategy=name, rounds=20, seed=7, **params)
    expected = fedopt_reference(name, 20, 0.01, 10, params)
    for r, (got, want) in enumerate(zip(models(body), expected), start=1):
        assert close(got, want, 1e-9), f"round {r}: {got} != {want}"
    assert body["settings"]["params"] == params


def test_fednova_matches_normalized_averaging_with_unequal_steps(federation):
    """Unequal n_k (3 and 5 rows) and mini-batches of 2: τ_1 = 3·2 = 6 and
    τ_2 = 3·3 = 9 local steps, so FedNova differs from FedAvg here."""
    data = [[(0.5, 2.1), (1.5, 3.9), (2.5, 6.2)], [(1.0, 2.0), (2.0, 3.1), (3.0, 3.9), (4.0, 5.2), (5.0, 5.9)]]
    lr, epochs, batch, seed = 0.02, 3, 2, 9
    fed = federation([local_client(f"client_{k + 1}", [list(row) for row in rows]) for k, rows in enumerate(data)])
    nova = run(fed, strategy="fednova", rounds=20, lr=lr, local_epochs=epochs, batch_size=batch, seed=seed)
    plain = run(fed, strategy="fedavg", rounds=20, lr=lr, local_epochs=epochs, batch_size=batch, seed=seed)

    theta = [0.0, 0.0]
    ns = [len(d) for d in data]
    for r, got in enumerate(models(nova), start=1):
        # the shuffles the server asked for: one seed per client per round (docs/PROTOCOL.md)
        seeds = np.random.SeedSequence([seed, r]).generate_state(2)
        per_step, taus = [], []
        for rows, client_seed in zip(data, seeds):
            rng = np.random.default_rng(int(client_seed))
            w, b, tau = theta[0], theta[1], 0
            for _ in range(epochs):
                order = [int(i) for i in rng.permutation(len(rows))]
                for start in range(0, len(rows), batch):
                    g = pooled_gradient([rows[i] for i in order[start:start + batch]], w, b)
                    w, b, tau = w - lr * g[0], b - lr * g[1], tau + 1
            taus.append(tau)
            per_step.append([(theta[0] - w) / tau, (theta[1] - b) / tau])
        tau_eff = average([[t] for t in taus], ns)[0]
        d = average(per_step, ns)
        theta = [theta[0] - tau_eff * d[0], theta[1] - tau_eff * d[1]]
        assert close(got, theta, 1e-9), f"round {r}: {got} != {theta}"
    assert taus == [6, 9]
    assert [p["steps"] for p in nova["rounds"][0]["participants"]] == [6, 9]
    assert not close(models(nova)[-1], models(plain)[-1], 1e-4)  # normalisation changes the answer


# --- the math in the log, and clients that cannot run a strategy -----------------------


@pytest.mark.parametrize("name", ["fedavg", "fedsgd", "scaffold", "fedadam", "fednova", "exact"])
def test_the_log_writes_each_strategys_math_as_the_api_stores_it(seed_federation, caplog, name):
    caplog.set_level(logging.INFO, logger="fedavg.server")
    body = run(seed_federation, strategy=name, rounds=2, seed=10)
    log = "\n".join(r.getMessage() for r in caplog.records if r.name == "fedavg.server")
    for record in body["rounds"]:
        math_lines = record["math"]
        assert len(math_lines) >= 2
        block = "\n".join(math_lines)
        assert block in log, f"round {record['round']} of {name}: its math is not in the log"
        # the last lines end on the model the round produced, as the API has it
        w = record["global_model"]["w"]
        assert math_lines[-2].endswith(f"{w:.6f}") and math_lines[-1].endswith(f"{record['global_model']['b']:.6f}")


def seed_client(name: str) -> Flask:
    """The seed's client app ``name`` on its own data.csv, in this process."""
    return client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"), "TOKEN": None})


def seed_style_client(lists_strategies: bool) -> Flask:
    """A client that trains FedAvg whatever it is asked: like the seed's, it
    ignores the config. With ``lists_strategies`` its /health claims them all
    anyway (a liar); without, it has no /health (the seed's own)."""
    app = Flask("seed-style")

    @app.get("/health")
    def health():
        if not lists_strategies:
            return {"error": "not found"}, 404
        return {"status": "ok", "client_id": "claims_all", "data_size": 2, "num_features": 1,
                "strategies": ["fedavg", "scaffold", "fedadam"]}

    @app.post("/train")
    def train():
        return {"local_model": {"w": 1.0, "b": 1.0}, "data_size": 2}

    return app


@pytest.fixture
def with_seed_style(servers, tmp_path):
    """A server over client_1 and a seed-style client, all in this process."""
    def start(lists_strategies: bool) -> tuple[Federated, str]:
        url = "http://127.0.0.1:5003"  # never dialled: the in-process transport hands it to the app
        transport = InProcessTransport({DEFAULT_CLIENTS[0]: seed_client("client_1"),
                                        url: seed_style_client(lists_strategies)})
        return servers(transport, tmp_path / "runs.db"), url

    return start


def test_a_seed_style_client_still_runs_fedavg(with_seed_style):
    server, url = with_seed_style(lists_strategies=False)
    status, body = server.post("/start", {"rounds": 2, "seed": 1})
    assert status == 200 and body["status"] == "completed"
    assert [p["url"] for p in body["rounds"][0]["participants"]][1] == url


@pytest.mark.parametrize("strategy", ["scaffold", "fedsgd"])
def test_a_client_without_health_fails_the_run_before_round_1(with_seed_style, strategy):
    server, url = with_seed_style(lists_strategies=False)
    status, body = server.post("/start", {"strategy": strategy, "rounds": 3, "seed": 1})
    assert status == 200 and body["status"] == "failed"
    assert "before round 1" in body["error"] and url in body["error"] and strategy in body["error"]
    assert body["rounds"] == [] and body["final_model"] == {"w": 0.0, "b": 0.0}  # nothing averaged


def test_a_client_that_claims_a_strategy_but_ignores_it_fails_the_run_unaveraged(with_seed_style):
    server, _ = with_seed_style(lists_strategies=True)
    status, body = server.post("/start", {"strategy": "scaffold", "rounds": 3, "seed": 1})
    assert status == 200 and body["status"] == "failed"
    assert "round 1" in body["error"] and "claims_all cannot run strategy scaffold" in body["error"]
    assert "did not say which strategy it ran" in body["error"]
    assert body["rounds"] == [] and body["final_model"] == {"w": 0.0, "b": 0.0}


# --- stateful strategies resume exactly ---------------------------------------------------

STATEFUL = [
    ("scaffold", {}),
    ("fedavgm", {"momentum": 0.8}),
    ("fedadam", {}),
    ("fedyogi", {}),
    ("fedadagrad", {}),
]
CUT = 7  # the round the interruption falls in


class CutInRound(InProcessTransport):
    """The clients in this process, and ``cut()`` called once, as soon as the
    first client has answered round CUT's /train and before the others are
    asked: the moment a server dies (or is told to stop) mid-round."""

    def __init__(self, apps: dict[str, Flask], cut: Callable[[], None]) -> None:
        super().__init__(apps)
        self.cut: Callable[[], None] | None = cut

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None):
        reply = super().call(url, method, path, timeout_s, body)
        if path == "/train" and body["round"] == CUT and self.cut is not None:
            cut, self.cut = self.cut, None
            cut()
        return reply


@pytest.mark.parametrize("how", ["stopped", "killed"])
@pytest.mark.parametrize("name, params", STATEFUL)
def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(servers, tmp_path, name, params, how):
    """``stopped``: POST /runs/<id>/stop during round CUT; the run ends that
    round, reads ``interrupted``, and /resume on the same server goes on.
    ``killed``: the server dies mid-round CUT, after client_1 has trained and
    before client_2 is asked; a new server on the history as it was then (a
    copy taken at that moment: what kill -9 leaves on disk, the run still
    ``running``) resumes it. Either way the server's state (c; m and v) comes
    back from SQLite, and SCAFFOLD's clients, which kept running, replay the
    interrupted round from the c_k they had before it."""
    apps = {url: seed_client(client) for url, client in zip(DEFAULT_CLIENTS, ("client_1", "client_2"))}
    settings = {"strategy": name, "rounds": 30, "seed": 12, **params}
    db, on_disk = tmp_path / "runs.db", tmp_path / "as-killed.db"

    def cut() -> None:
        if how == "stopped":
            status, _ = first.post(f"/runs/{first.fed.running_id()}/stop")
            assert status == 202
        else:
            live, copy = sqlite3.connect(db), sqlite3.connect(on_disk)
            live.backup(copy)  # every round committed so far, and the run still "running"
            live.close()
            copy.close()
            first.fed.transport.stopping.set()  # and it answers nobody more, as a dead process would

    first = servers(CutInRound(apps, cut), db, BATCHED=False)
    ended = first.run(**settings)
    assert ended["status"] == "interrupted", ended.get("error")
    run_id = ended["run_id"]
    if how == "stopped":
        then, rounds_kept = first, CUT
    else:
        first.close()
        then, rounds_kept = servers(InProcessTransport(apps), on_disk), CUT - 1
    status, before = then.get(f"/runs/{run_id}")
    assert status == 200 and before["status"] == "interrupted" and len(before["rounds"]) == rounds_kept
    status, resumed = then.post(f"/runs/{run_id}/resume")
    assert status == 200 and resumed["status"] == "completed", resumed.get("error")
    straight = run(then, **settings)
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 31))
    assert models(resumed) == models(straight)  # bit for bit, every round
    assert resumed["rounds"][-1]["server_state"] == straight["rounds"][-1]["server_state"]


@pytest.mark.system
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """kill -9 of the server process mid-run, a restart on the same database,
    resume: SCAFFOLD's server state c comes back from SQLite, and its
    clients, real processes that kept running, replay the interrupted round
    from the c_k they had before it. (Every stateful strategy is resumed in
    this process above; this is the real kill.)"""
    ports = {app: launcher.free_port() for app in launcher.DEFAULT_PORTS}
    db = tmp_path / "runs.db"
    apps = launcher.start_federation(ports, server_args=["--db", str(db)])
    try:
        settings = {"strategy": "scaffold", "rounds": 30, "seed": 12}
        status, started = launcher.post_json(apps["server"].url + "/start", {**settings, "pace_s": 0.05,
                                                                            "wait": False})
        assert status == 202
        run_id = started["run_id"]
        launcher.wait_for_run(apps["server"].url, run_id, lambda r: len(r["rounds"]) >= 6)
        os.killpg(apps["server"].proc.pid, signal.SIGKILL)
        apps["server"].proc.wait(10)
        apps["server"] = launcher.start_app("server", ports["server"], [
            "--clients", f"{apps['client_1'].url},{apps['client_2'].url}", "--db", str(db)])
        launcher.wait_healthy([apps["server"]])
        status, resumed = launcher.post_json(f"{apps['server'].url}/runs/{run_id}/resume")
        assert status == 200 and resumed["status"] == "completed", resumed.get("error")
        status, straight = launcher.post_json(apps["server"].url + "/start", settings)
        assert status == 200 and straight["status"] == "completed", straight.get("error")
    finally:
        launcher.stop(list(apps.values()))
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 31))
    assert models(resumed) == models(straight)  # bit for bit, every round
    assert resumed["rounds"][-1]["server_state"] == straight["rounds"][-1]["server_state"]
