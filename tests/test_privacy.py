"""Differential privacy (DP-FedAvg) against plain-Python references written
here: σ = 0 and S = ∞ are FedAvg; the noise on the released model has the
standard deviation σ·S/M, also when clients add it themselves (σ·S/√n each,
n the clients sampled) and some of them are lost; a client that sends a
huge update moves the model by at most S/M; nothing of any one client's
(model, loss, clip bit, update norm) is stored or logged; adaptive clipping
moves S as Andrew et al.'s formula says, and its count costs what the
accountant assumes (dp-accounting composing the two releases); a run stops
before its budget is passed; bad settings (a σ too small to account for
among them) are a 400 naming the field. The accountant's ε is checked
against dp-accounting's own documented values.

The math runs in this process: ``fedavg.privacy`` on its own (thousands of
draws in milliseconds, and properties Hypothesis tries on many inputs), and
whole runs on in-process federations (conftest's ``seed_federation`` and
``federation``: the server's code path, driven through its API). Two tests
are marked system (make test-all): DP over HTTP on the seed's three apps as
processes, and `make privacy` run as the command."""
from __future__ import annotations

import json
import logging
import math
import random
import re
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_compare import progress_lines
from test_secagg import written

from conftest import ROOT
from fedavg.batch_wire import parse_batch_reply
from fedavg.client import LocalClient
from fedavg.http.host_app import create_host_app
from fedavg.privacy import DPAverage, adapt_clip, client_noise_std, clip, privatize, update_noise_multiplier
from fedavg.scenarios import make_clients
from fedavg.strategies import Result, Step
from fedavg_server.collect import Collected
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.transport import Reply
from launcher import post_json
from reference import SEED_DATA, local_gd, reference_fedavg


def by_hand_clip(dx: float, db: float, bound: float) -> tuple[float, float]:
    """clip_S(Δ) = Δ·min(1, S/‖Δ‖), by hand."""
    norm = math.hypot(dx, db)
    return (dx, db) if norm <= bound else (dx * bound / norm, db * bound / norm)


def by_hand_clip_all(delta: list[float], bound: float) -> list[float]:
    """clip_S(Δ) for Δ of any length, by hand."""
    norm = math.sqrt(sum(x * x for x in delta))
    return delta if norm <= bound else [x * bound / norm for x in delta]


def coordinates(model: dict) -> list[float]:
    """[w_1, …, w_d, b] of a model as the API writes it (w a number when d = 1)."""
    w = model["w"]
    return [*(w if isinstance(w, list) else [w]), model["b"]]


class Wire(InProcessTransport):
    """The server's transport with the test on the wire: the clients' own
    apps in this process, each client's training request and reply kept as
    it went (``sent[round]``: (url, config, reply), a /batch/train row read
    back as the /train reply that client would have sent), and the clients
    in ``lost`` gone for the path it gives them (the server sees a refused
    connection)."""

    def __init__(self, apps: Any) -> None:
        super().__init__(apps)
        self.lost: dict[str, str] = {}  # url → the path it no longer answers
        self.sent: dict[int, list[tuple[str, dict, dict]]] = defaultdict(list)
        self.batches = 0  # /batch/train calls answered

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None, **limit: int) -> Reply:
        if self.lost.get(url) == path:
            return Reply(url, reason="cannot connect: connection refused (the client is gone)")
        reply = super().call(url, method, path, timeout_s, body, **limit)
        if path == "/train" and reply.ok:
            self.sent[body["round"]].append((url, body["config"], reply.body))
        elif url.endswith("/batch/train") and reply.ok:
            self.batches += 1
            self.sent[body["round"]] += batch_rows(url.removesuffix("/batch/train"), body, reply.body)
        return reply


def batch_rows(host: str, body: dict, reply: dict) -> list[tuple[str, dict, dict]]:
    """A /batch/train reply's rows as (url, config, reply) of each client's own /train."""
    arrays = reply["arrays"]
    p = arrays["local_model"]["shape"][1]
    rows, _ = parse_batch_reply(reply, body["clients"], p - 1, reply["strategy"])
    out = []
    for j, k in enumerate(body["clients"]):
        *w, b = rows.local.theta[j].tolist()
        metrics = {"loss_before": float(rows.loss_before[j]), "loss_after": float(rows.loss_after[j])}
        if rows.within_clip is not None:
            metrics["within_clip"] = float(rows.within_clip[j])
        out.append((f"{host}/clients/{k}", body["config"], {"data_size": int(rows.n[j]), "metrics": metrics,
                                                              "local_model": {"w": w[0] if p == 2 else w, "b": b}}))
    return out


@pytest.fixture(params=["batched", "per_client"])
def batched(request) -> bool:
    """Both ways a DP run reaches a client host's clients: one /batch/train per round, or each one's /train."""
    return request.param == "batched"


def wired(servers, clients: list[LocalClient], lost: Sequence[int] = (), at: str = "/train",
          batched: bool = False) -> tuple[Any, Wire]:
    """A server over ``clients`` (one client host app) through a ``Wire``; ``lost``: places in the list,
    gone for the path ``at``; ``batched``: the server calls the host once a round for all of them."""
    wire = Wire.hosted(create_host_app(clients), len(clients))
    wire.lost = {wire.urls[i]: at for i in lost}
    return servers(wire, BATCHED=batched), wire


def released_without_noise(theta_t: list[float], updates: list[list[float]], bound: float,
                           expected: float) -> list[float]:
    """W_t + Σ_k clip_S(Δ_k) / M, by hand."""
    total = [0.0] * len(theta_t)
    for delta in updates:
        total = [t + x for t, x in zip(total, by_hand_clip_all(delta, bound))]
    return [c + t / expected for c, t in zip(theta_t, total)]


FEATURES = 9


def wide_rows(seed: int) -> list[tuple[list[float], float]]:
    """20 rows with 9 features: x ~ U(0, 1), y = Σ_j x_j/j + 1 + noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(20):
        x = [rng.random() for _ in range(FEATURES)]
        rows.append((x, sum(v / j for j, v in enumerate(x, start=1)) + 1.0 + rng.gauss(0, 0.1)))
    return rows


# Two clients with 9 features: a round releases 10 noised coordinates, so 500
# rounds give the 5000 draws that 2500 rounds of the seed's 2 coordinates give.
WIDE_DATA = [wide_rows(1), wide_rows(2)]


def wide_clients(data: list[list[tuple[list[float], float]]] = WIDE_DATA) -> list[LocalClient]:
    return [LocalClient(f"wide_{i + 1}", np.array([x for x, _ in rows]), np.array([y for _, y in rows]))
            for i, rows in enumerate(data)]


def wide_updates(rows_of: list[list[tuple[list[float], float]]], theta_t: list[float]) -> list[list[float]]:
    """Each client's Δ_k = W_k − W_t, W_k its plain-Python local GD from W_t."""
    return [[a - c for a, c in zip(wide_local_gd(rows, theta_t), theta_t)] for rows in rows_of]


def wide_local_gd(rows: list[tuple[list[float], float]], theta: list[float], lr: float = 0.01,
                  epochs: int = 10) -> list[float]:
    """reference.local_gd for d features: full-batch GD on 1/n Σ (w·x + b − y)², one step per epoch."""
    *w, b = theta
    n = len(rows)
    for _ in range(epochs):
        dw, db = [0.0] * len(w), 0.0
        for x, y in rows:
            err = sum(wj * xj for wj, xj in zip(w, x)) + b - y
            dw = [g + 2.0 / n * err * xj for g, xj in zip(dw, x)]
            db += 2.0 / n * err
        w = [wj - lr * g for wj, g in zip(w, dw)]
        b = b - lr * db
    return [*w, b]


# --- fedavg.privacy on its own --------------------------------------------------------------

def test_the_release_adds_noise_of_std_sigma_s_over_m():
    """DPAverage, 5000 releases of one round of two clients (one update
    inside S, one five times longer): the release minus W_t + Σ clip_S(Δ_k)/M
    (by hand) is the noise, 10000 draws; its mean is 0 and its standard
    deviation σ·S/M within 5% (the estimate's own error is under 1%)."""
    sigma, bound, m = 1.0, 0.1, 2.0
    center = np.array([0.3, -0.2])
    vectors = [center + np.array([0.05, 0.02]), center + np.array([0.3, -0.4])]  # ‖Δ_2‖ = 0.5 = 5·S
    sw, sb = 0.0, 0.0
    for v in vectors:
        dx, db = by_hand_clip(float(v[0] - center[0]), float(v[1] - center[1]), bound)
        sw, sb = sw + dx, sb + db
    clean = (0.3 + sw / m, -0.2 + sb / m)
    release = DPAverage(bound, sigma, m)
    noise = []
    for _ in range(5000):
        out, _ = release(vectors, [2, 2], center)
        noise += [float(out[0]) - clean[0], float(out[1]) - clean[1]]
    expected = sigma * bound / m
    assert abs(statistics.mean(noise)) < 5 * expected / math.sqrt(len(noise))
    assert statistics.pstdev(noise) == pytest.approx(expected, rel=0.05)


def test_the_release_draws_fresh_noise_from_the_system_not_a_seed():
    """Two releases of the same round differ: noise that a seed could replay could be subtracted."""
    center, vectors = np.zeros(2), [np.array([0.1, 0.1]), np.array([-0.1, 0.2])]
    first, _ = DPAverage(1.0, 1.0, 2.0)(vectors, [1, 1], center)
    second, _ = DPAverage(1.0, 1.0, 2.0)(vectors, [1, 1], center)
    assert first.tolist() != second.tolist()


def test_a_client_adds_its_share_sigma_s_over_root_n():
    """privatize with client_noise_std(σ, S, n): 5000 replies of a client whose
    update is twice S; each minus W_t + clip_S(Δ) (by hand) has standard
    deviation σ·S/√n within 5%, so n clients' shares sum to the server's σ·S."""
    sigma, bound, m = 1.0, 0.2, 2
    center, theta = np.array([1.0, 2.0]), np.array([1.24, 2.32])  # ‖Δ‖ = 0.4 = 2·S
    dx, db = by_hand_clip(0.24, 0.32, bound)
    std = client_noise_std(sigma, bound, m)
    noise = []
    for _ in range(5000):
        sent = privatize(theta, center, bound, std)
        noise += [float(sent[0]) - (1.0 + dx), float(sent[1]) - (2.0 + db)]
    expected = sigma * bound / math.sqrt(m)
    assert abs(statistics.mean(noise)) < 5 * expected / math.sqrt(len(noise))
    assert statistics.pstdev(noise) == pytest.approx(expected, rel=0.05)


def test_with_the_clients_noise_the_release_only_sums():
    """DPAverage(local=True): W_t + Σ_k (W_k − W_t)/M exactly, nothing clipped
    again (it would change the clients' noise) and nothing added."""
    center = np.array([0.5, 1.0])
    vectors = [np.array([0.9, 1.3]), np.array([0.2, 0.1]), np.array([5.0, -3.0])]
    out, _ = DPAverage(0.1, 1.0, 3.0, local=True)(vectors, [1, 1, 1], center)
    want = [c + sum(float(v[j]) - c for v in vectors) / 3.0 for j, c in enumerate((0.5, 1.0))]
    assert out.tolist() == pytest.approx(want, abs=1e-15)


def by_hand_share(bits: list[int], m: float, noise: float = 0.0) -> float:
    """b̄ = clamp_[0,1]((Σ_k (bit_k − ½) + noise) / M + ½) (Andrew et al.; tensorflow_privacy's
    QuantileEstimatorQuery)."""
    return min(1.0, max(0.0, (sum(b - 0.5 for b in bits) + noise) / m + 0.5))


@pytest.mark.parametrize("bits, m", [([0, 0], 2.0), ([1, 0], 2.0), ([1, 1], 2.0), ([1] * 7 + [0] * 3, 10.0),
                                     ([1, 1, 1], 10.0), ([0, 0, 0, 0], 2.0)])
def test_adaptive_clip_without_count_noise_is_the_formula(bits, m):
    """σ_b = 0: b̄ and S_{t+1} = S_t·exp(−η(b̄ − γ)) are the formula's, by hand (M = n: b̄ = Σ bit/n)."""
    bound, gamma, eta = 0.05, 0.5, 0.2
    new, share = adapt_clip(bound, bits, m, gamma, eta, 0.0)
    assert share == pytest.approx(by_hand_share(bits, m), abs=1e-15)
    if len(bits) == m:
        assert share == pytest.approx(sum(bits) / m, abs=1e-15)
    assert new == pytest.approx(bound * math.exp(-eta * (share - gamma)), rel=1e-15)


def test_adaptive_clip_counts_with_noise_of_std_sigma_b_over_m():
    """b̄ = (Σ (bit − ½) + N(0, σ_b²))/M + ½: over 5000 draws its standard deviation is σ_b/M within 5%, its
    mean Σ bit/M (here M = n), and each S_{t+1} is the formula applied to that b̄ (σ_b/M = 0.1 around 0.4: the
    clamp to [0, 1] is 4 standard deviations away)."""
    bound, gamma, eta, count_noise, m = 1.0, 0.5, 0.2, 1.0, 10.0
    shares = []
    for _ in range(5000):
        new, share = adapt_clip(bound, [1] * 4 + [0] * 6, m, gamma, eta, count_noise)
        assert new == pytest.approx(bound * math.exp(-eta * (share - gamma)), rel=1e-12)
        shares.append(share)
    assert abs(statistics.mean(shares) - 0.4) < 5 * (count_noise / m) / math.sqrt(len(shares))
    assert statistics.pstdev(shares) == pytest.approx(count_noise / m, rel=0.05)


def stage_release(bits: list[float], m: float, count_noise: float, gamma: float = 0.5,
                  eta: float = 0.2) -> tuple[float, float]:
    """(b̄, S_{t+1}) as the server's privacy stage releases them after a round (S_t = 1, σ = 0) whose
    clients said these bits."""
    from fedavg_server.dp import Privacy
    from fedavg_server.privacy_settings import AdaptiveClipping, DPSettings

    stage = Privacy(DPSettings(0.0, 1.0, adaptive=AdaptiveClipping(gamma, eta, count_noise), expected=m), 1.0, 1)
    theta = np.zeros(2)
    results = [Result(f"c{k}", f"http://c{k}", 1, np.zeros(2), {}, {"within_clip": float(b)})
               for k, b in enumerate(bits)]
    _, parts = stage.after(1, theta, Collected(results, [], [], len(results), [], len(results)),
                           Step(theta, {}, []))
    return parts["privacy"]["unclipped_share"], parts["privacy"]["next_clip"]


@pytest.mark.parametrize("sigma, m", [(1.0, 2), (2.0, 2), (1.0, 100), (0.5, 10)])
def test_adaptive_clipping_with_its_count_costs_what_one_release_at_sigma_would(sigma, m):
    """Each round releases the noised update (multiplier z_Δ, the server's)
    and the noised count, N(0, σ_b²) on a sum whose sensitivity is what the
    server's own b̄ shows: M·|b̄(with a client) − b̄(without)|, measured here
    with σ_b = 0 over clients with every bit. dp-accounting composing those
    two Gaussian releases for 50 rounds gives the ε of one release at σ (what
    the run reports): Andrew et al.'s z_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) holds
    only because each bit counts as bit − ½ (sensitivity ½). Counted as bit
    (sensitivity 1), σ = 1, M = 2 would spend ε = 86.7 where 57.3 is reported."""
    from dp_accounting import ComposedDpEvent, GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    rng = random.Random(m)
    moves = []
    for _ in range(200):
        bits = [rng.randint(0, 1) for _ in range(rng.randint(0, min(m, 10) - 1))]
        without, _ = stage_release(bits, float(m), 0.0)
        for extra in (0, 1):
            with_it, _ = stage_release([*bits, extra], float(m), 0.0)
            if 0 < with_it < 1 and 0 < without < 1:  # (the clamp hides a move: left out)
                moves.append(m * abs(with_it - without))
    sensitivity = max(moves)
    assert len(moves) > 100 and sensitivity == pytest.approx(0.5, rel=1e-9)

    count_noise = max(m / 20, sigma)  # the default σ_b
    z_update = update_noise_multiplier(sigma, count_noise)

    def eps(events: list) -> float:
        accountant = RdpAccountant()
        accountant.compose(SelfComposedDpEvent(ComposedDpEvent(events), 50))
        return accountant.get_epsilon(1e-5)

    both = eps([GaussianDpEvent(z_update), GaussianDpEvent(count_noise / sensitivity)])
    assert both == pytest.approx(eps([GaussianDpEvent(sigma)]), rel=1e-9)
    assert z_update > sigma  # the update's own noise grows to pay for the count


def test_adaptive_clipping_moves_s_by_at_most_its_clamped_step():
    """b̄ is a share: the server keeps it in [0, 1] (tensorflow_privacy does;
    post-processing, free), so one round moves S by a factor between
    exp(−η(1 − γ)) and exp(η·γ), however large the count's noise: 2000
    rounds with σ_b = 100 over two clients reach both ends and never pass them."""
    gamma, eta = 0.5, 0.2
    released = [stage_release([1, 0], 2.0, 100.0, gamma, eta) for _ in range(2000)]
    assert all(0.0 <= share <= 1.0 for share, _ in released)
    factors = [next_clip for _, next_clip in released]  # S_t = 1
    assert max(factors) <= math.exp(eta * gamma) * (1 + 1e-12)
    assert min(factors) >= math.exp(-eta * (1 - gamma)) * (1 - 1e-12)
    assert max(factors) == pytest.approx(math.exp(eta * gamma), rel=1e-12)
    assert min(factors) == pytest.approx(math.exp(-eta * (1 - gamma)), rel=1e-12)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
vector = st.integers(min_value=1, max_value=5).flatmap(lambda d: st.lists(finite, min_size=d, max_size=d))
bounds = st.floats(min_value=1e-3, max_value=1e3)


@settings(deadline=None)  # (the machine is shared: no timing in a pass/fail test)
@given(delta=vector, bound=bounds)
def test_clip_never_lengthens_an_update_and_keeps_its_direction(delta, bound):
    """‖clip_S(Δ)‖ ≤ min(‖Δ‖, S); Δ itself when ‖Δ‖ ≤ S; else c·Δ with
    c = S/‖Δ‖ < 1 (the same direction), of length S."""
    norm = math.sqrt(sum(x * x for x in delta))
    out = clip(np.array(delta), bound).tolist()
    length = math.sqrt(sum(x * x for x in out))
    assert length <= min(norm, bound) * (1 + 1e-12)
    # (‖Δ‖ within a rounding error of S may go either way: the norm is summed in another order here)
    if norm <= bound * (1 - 1e-12):
        assert out == delta
    elif norm > bound * (1 + 1e-12):
        assert length == pytest.approx(bound, rel=1e-12)
        assert out == pytest.approx([bound / norm * x for x in delta], rel=1e-12, abs=0)


@settings(deadline=None)
@given(d=st.integers(min_value=1, max_value=4), data=st.data(), bound=bounds,
       m=st.floats(min_value=1.0, max_value=100.0))
def test_one_client_moves_the_noiseless_release_by_at_most_s_over_m(d, data, bound, m):
    """σ = 0: whatever one client sends (up to 10¹² a coordinate), the release
    with it and the release without it differ by at most S/M."""
    coords = st.lists(finite, min_size=d, max_size=d)
    center = np.array(data.draw(coords))
    others = [np.array(v) for v in data.draw(st.lists(coords, max_size=6))]
    sent = np.array(data.draw(st.lists(st.floats(min_value=-1e12, max_value=1e12), min_size=d, max_size=d)))
    release = DPAverage(bound, 0.0, m)
    with_it, _ = release([*others, sent], [1] * (len(others) + 1), center)
    without, _ = release(others, [1] * len(others), center)
    moved = math.sqrt(sum((a - b) ** 2 for a, b in zip(with_it.tolist(), without.tolist())))
    assert moved <= bound / m * (1 + 1e-9) + 1e-9


@settings(deadline=None)
@given(d=st.integers(min_value=1, max_value=4), data=st.data())
def test_without_noise_or_clip_the_release_is_the_mean(d, data):
    """σ = 0, S = ∞, M = K: W_t + Σ_k (W_k − W_t)/K, the plain mean of the models (plain Python)."""
    coords = st.lists(finite, min_size=d, max_size=d)
    center = data.draw(coords)
    vectors = data.draw(st.lists(coords, min_size=1, max_size=8))
    k = len(vectors)
    out, _ = DPAverage(math.inf, 0.0, float(k))([np.array(v) for v in vectors], [1] * k, np.array(center))
    want = [center[j] + sum(v[j] - center[j] for v in vectors) / k for j in range(d)]
    assert out.tolist() == pytest.approx(want, rel=1e-9, abs=1e-8)


# --- whole runs on in-process federations ----------------------------------------------------

def test_no_noise_and_no_clip_is_fedavg(seed_federation):
    """σ = 0, S = ∞: W_t + Σ_k (W_k − W_t)/K, which on the seed (n_k equal) is FedAvg's average."""
    run = seed_federation.run(rounds=5, seed=1, dp={"noise_multiplier": 0, "clip": None})
    assert run["status"] == "completed"
    for got, (w, b) in zip(run["rounds"], reference_fedavg(SEED_DATA, rounds=5)):
        assert got["global_model"]["w"] == pytest.approx(w, abs=1e-12)
        assert got["global_model"]["b"] == pytest.approx(b, abs=1e-12)
    assert run["final_model"]["w"] == pytest.approx(1.396271, abs=5e-7)
    assert run["rounds"][-1]["privacy"]["epsilon"] is None  # no noise: ε = ∞, which JSON writes as null


def test_the_noise_on_the_released_model_has_std_sigma_s_over_m(federation):
    """Two clients with 9 features, 500 rounds, 5000 draws: the released
    model minus what the clipped updates alone give (their plain-Python local
    GD, clipped here) is the noise; its standard deviation is σ·S/M within 5%
    (the estimate's own error is about 1%), on every coordinate alike."""
    sigma, bound, rounds = 1.0, 0.1, 500
    run = federation(wide_clients()).run(rounds=rounds, dp={"noise_multiplier": sigma, "clip": bound})
    assert run["status"] == "completed", run["error"]
    rounds_ = run["rounds"]  # (the /start reply holds every round; GET /runs/<id> pages them)
    assert len(rounds_) == rounds
    noise = []
    for record in rounds_:
        assert [p["client_id"] for p in record["participants"]] == ["wide_1", "wide_2"]
        theta_t = coordinates(record["global_model_in"])
        clean = released_without_noise(theta_t, wide_updates(WIDE_DATA, theta_t), bound, 2.0)
        noise += [got - want for got, want in zip(coordinates(record["global_model"]), clean)]
    assert len(noise) == 5000
    # The clip is at work: in round 1 both plain-Python updates are longer than S.
    theta_0 = coordinates(rounds_[0]["global_model_in"])
    assert all(math.hypot(*delta) > bound for delta in wide_updates(WIDE_DATA, theta_0))
    expected = sigma * bound / 2.0
    assert abs(statistics.mean(noise)) < 5 * expected / math.sqrt(len(noise))
    assert statistics.pstdev(noise) == pytest.approx(expected, rel=0.05)
    for j in range(FEATURES + 1):  # each coordinate on its own (500 draws: its estimate's error is about 3%)
        assert statistics.pstdev(noise[j::FEATURES + 1]) == pytest.approx(expected, rel=0.2)
    assert rounds_[-1]["privacy"]["noise_std"] == pytest.approx(expected, rel=1e-12)


def test_two_runs_with_the_same_seed_draw_different_noise(seed_federation):
    """The run's seed is stored with it: DP noise it could replay could be subtracted, so it never comes
    from the seed."""
    dp = {"noise_multiplier": 1.0, "clip": 0.1}
    first, second = (seed_federation.run(rounds=1, seed=7, dp=dp) for _ in range(2))
    assert first["final_model"] != second["final_model"]


def test_clients_that_add_the_noise_add_sigma_s_over_root_n_each(servers, batched):
    """local_noise, two clients with 9 features, 250 rounds, 5000 draws: each
    client sends W_t + clip_S(W_k − W_t) + N(0, σ²S²/n), n = 2 the clients
    sampled, W_k its plain local GD (computed here), as the wire shows; the
    server only sums."""
    sigma, bound, rounds = 1.0, 0.2, 250
    fed, wire = wired(servers, wide_clients(), batched=batched)
    run = fed.run(rounds=rounds, dp={"noise_multiplier": sigma, "clip": bound, "local_noise": True})
    assert run["status"] == "completed", run["error"]
    noise = []
    assert len(run["rounds"]) == rounds
    for record in run["rounds"]:
        theta_t = coordinates(record["global_model_in"])
        sent = {url: coordinates(reply["local_model"]) for url, _, reply in wire.sent[record["round"]]}
        for url, delta in zip(wire.urls, wide_updates(WIDE_DATA, theta_t)):
            noise += [got - (c + x) for got, c, x in zip(sent[url], theta_t, by_hand_clip_all(delta, bound))]
        # the server adds nothing: W_t + Σ (sent − W_t) / M
        assert coordinates(record["global_model"]) == pytest.approx(
            [c + sum(m[j] - c for m in sent.values()) / 2 for j, c in enumerate(theta_t)], abs=1e-12)
    assert len(noise) == 5000
    assert statistics.pstdev(noise) == pytest.approx(sigma * bound / math.sqrt(2.0), rel=0.05)
    assert wire.batches == (rounds if batched else 0)  # the path taken: one /batch/train a round


FOUR_WIDE = [wide_rows(i) for i in range(1, 5)]


def test_clients_lost_from_a_round_leave_the_release_its_full_noise(servers):
    """local_noise, M = 4 clients with 9 features of which two never reply
    (a refused connection): the two that do add their shares σ²S²/4 each,
    half the noise, and the server adds the other half, so the release's
    noise is still σ·S/M (5000 draws, within 5%; the clean part from the two
    clients' plain-Python local GD, clipped). Without it the noise was
    σ·S/M·√(2/4), while ε counted σ."""
    sigma, bound, rounds, m = 1.0, 0.2, 500, 4.0
    fed, wire = wired(servers, wide_clients(FOUR_WIDE), lost=(2, 3))
    run = fed.run(rounds=rounds, dp={"noise_multiplier": sigma, "clip": bound, "local_noise": True})
    assert run["status"] == "completed", run["error"]
    noise = []
    for record in run["rounds"]:
        assert [d["url"] for d in record["dropped"]] == wire.urls[2:]
        theta_t = coordinates(record["global_model_in"])
        clean = released_without_noise(theta_t, wide_updates(FOUR_WIDE[:2], theta_t), bound, m)
        noise += [got - want for got, want in zip(coordinates(record["global_model"]), clean)]
    assert len(noise) == 5000
    assert statistics.pstdev(noise) == pytest.approx(sigma * bound / m, rel=0.05)
    assert run["rounds"][-1]["privacy"]["noise_std"] == pytest.approx(sigma * bound / m, rel=1e-12)
    assert {k: run["rounds"][-1]["privacy"][k] for k in ("sampled", "noise_shares_in_sum", "server_noise_share")} \
        == {"sampled": 4, "noise_shares_in_sum": 2, "server_noise_share": 0.5}


def test_a_host_lost_from_a_round_leaves_the_release_its_full_noise(servers):
    """The batched path of the test above: the four clients on two client hosts, the second host's
    /batch/train refused every round (its two clients dropped, each named with their host's reason):
    the first host's two rows bring their shares σ²S²/4, the server adds the other half, and the
    release's noise is σ·S/M (5000 draws, within 5%; the clean part from the two clients'
    plain-Python local GD, clipped)."""
    sigma, bound, rounds, m = 1.0, 0.2, 500, 4.0
    kept, gone = "http://127.0.0.1:6000", "http://127.0.0.1:6100"
    clients = wide_clients(FOUR_WIDE)
    one, two = create_host_app(clients[:2]), create_host_app(clients[2:])
    wire = Wire({**{f"{kept}/clients/{k}": one for k in (1, 2)}, **{f"{gone}/clients/{k}": two for k in (1, 2)}})
    wire.lost = {f"{gone}/batch/train": ""}
    run = servers(wire).run(rounds=rounds, dp={"noise_multiplier": sigma, "clip": bound, "local_noise": True})
    assert run["status"] == "completed", run["error"]
    noise = []
    for record in run["rounds"]:
        assert [(d["url"], d["reason"]) for d in record["dropped"]] == [
            (f"{gone}/clients/{k}", f"its host's {gone}/batch/train: cannot connect: connection refused (the "
                                    "client is gone)") for k in (1, 2)]
        theta_t = coordinates(record["global_model_in"])
        clean = released_without_noise(theta_t, wide_updates(FOUR_WIDE[:2], theta_t), bound, m)
        noise += [got - want for got, want in zip(coordinates(record["global_model"]), clean)]
    assert len(noise) == 5000
    assert statistics.pstdev(noise) == pytest.approx(sigma * bound / m, rel=0.05)
    assert {k: run["rounds"][-1]["privacy"][k] for k in ("sampled", "noise_shares_in_sum", "server_noise_share")} \
        == {"sampled": 4, "noise_shares_in_sum": 2, "server_noise_share": 0.5}
    assert wire.batches == rounds  # the kept host's, one a round


def test_under_secure_aggregation_a_client_lost_before_its_masked_input_is_topped_up(servers):
    """secagg with local_noise, three clients with 9 features (t = 2), the
    third gone at /secagg/masked every round: the sum the server unmasks
    holds two of the three shares σ²S²/3, and is not written (the round's
    math says so instead of its words and its decoded sum); the server adds
    σ²S²/3, and the release's noise is σ·S/M (3000 draws, within 5%; the clean
    part from the two survivors' plain-Python local GD, clipped)."""
    sigma, bound, rounds, m = 1.0, 0.2, 300, 3.0
    data = FOUR_WIDE[:3]
    fed, wire = wired(servers, wide_clients(data), lost=(2,), at="/secagg/masked")
    run = fed.run(rounds=rounds, secagg=True, dp={"noise_multiplier": sigma, "clip": bound, "local_noise": True})
    assert run["status"] == "completed", run["error"]
    noise = []
    for record in run["rounds"]:
        theta_t = coordinates(record["global_model_in"])
        clean = released_without_noise(theta_t, wide_updates(data[:2], theta_t), bound, m)
        noise += [got - want for got, want in zip(coordinates(record["global_model"]), clean)]
    assert len(noise) == 3000
    assert statistics.pstdev(noise) == pytest.approx(sigma * bound / m, rel=0.05)
    for record in run["rounds"]:
        assert not any("Σ x_i" in line or "y_1 = [" in line for line in record["math"])
        assert record["math"][0].startswith("secure aggregation: the sum of 2 of the 3 sampled clients' inputs (not "
                                            "written")
        assert record["privacy"]["noise_shares_in_sum"] == 2 and record["privacy"]["sampled"] == 3
        assert record["privacy"]["server_noise_share"] == pytest.approx(1 / 3, rel=1e-12)


def test_with_poisson_sampling_the_clients_noise_is_sized_on_each_round_s_sample(servers, batched):
    """local_noise with fraction 0.5 over 4 clients (M = 2): each round
    samples n ~ Binomial(4, ½), 0 to 4 clients; each sampled client is told
    to add σ·S/√n (the wire shows it), and the release's noise is σ·S/M
    whatever n was, the server adding all of it when nobody was sampled.
    Sized on M the noise would be σ·S/M·√(n/M): half the variance when one
    client is sampled, none when none is."""
    sigma, bound, rounds, m = 1.0, 0.2, 600, 2.0
    fed, wire = wired(servers, wide_clients(FOUR_WIDE), batched=batched)
    run = fed.run(rounds=rounds, fraction=0.5, dp={"noise_multiplier": sigma, "clip": bound, "local_noise": True})
    assert run["status"] == "completed", run["error"]
    by_size = defaultdict(list)
    place = {f"wide_{i + 1}": i for i in range(4)}
    for record in run["rounds"]:
        theta_t = coordinates(record["global_model_in"])
        took_part = [place[p["client_id"]] for p in record["participants"]]
        n = len(took_part)
        told = [config["dp"]["noise_std"] for _, config, _ in wire.sent[record["round"]]]
        assert len(told) == n and all(std == pytest.approx(sigma * bound / math.sqrt(n), rel=1e-12) for std in told)
        clean = released_without_noise(theta_t, wide_updates([FOUR_WIDE[i] for i in took_part], theta_t), bound, m)
        by_size[n] += [got - want for got, want in zip(coordinates(record["global_model"]), clean)]
    assert set(by_size) == {0, 1, 2, 3, 4}
    for n, noise in by_size.items():
        # 37 to 225 rounds of each n on average, at least 10 (P(fewer) < 10⁻⁶); the std's estimate
        # from N draws has a relative error of about 1/√(2N): 5 of those. (Sized on M, n = 1 and 3
        # were 29% and 22% off.)
        assert len(noise) >= 100, n
        assert statistics.pstdev(noise) == pytest.approx(sigma * bound / m, rel=5 / math.sqrt(2 * len(noise))), n
    everything = [x for noise in by_size.values() for x in noise]
    assert statistics.pstdev(everything) == pytest.approx(sigma * bound / m, rel=0.05)
    assert [record["privacy"]["sampled"] for record in run["rounds"]] == \
        [len(record["participants"]) for record in run["rounds"]]
    assert wire.batches == (sum(bool(record["participants"]) for record in run["rounds"]) if batched else 0)


def test_a_client_that_adds_its_own_noise_sends_no_clip_bit():
    """The bit adaptive clipping counts (‖Δ_k‖ ≤ S) would reach the server
    un-noised, and the server is the party local noise does not trust: a
    client told to add noise leaves it out of /train's reply and puts 0 in
    its secure-aggregation input; told only to clip, it says it."""
    from fedavg.secure_client import Deadline, advertise

    client = LocalClient("c", np.array([[1.0], [2.0]]), np.array([3.0, 5.0]))
    body = {"global_model": {"w": 0.0, "b": 0.0}, "round": 1,
            "config": {"lr": 0.01, "local_epochs": 1, "dp": {"clip": 100.0, "noise_std": 0.0}}}
    reply, status = client.train(body)
    assert status == 200 and reply["metrics"]["within_clip"] == 1.0  # the update is far inside S
    noised = {**body, "config": {**body["config"], "dp": {"clip": 100.0, "noise_std": 0.1}}}
    reply, status = client.train(noised)
    assert status == 200 and "within_clip" not in reply["metrics"]
    reply, status = advertise(client, {**noised, "session": "run|round 1|00", "index": 1, "threshold": 2},
                              Deadline(None))
    assert status == 200, reply
    _, x = client.sessions.get("run|round 1|00")
    assert x[-1] == 0.0  # x_k = [θ_k, 1, n_k·L_k, n_k, bit_k]: no bit


def test_adaptive_clipping_is_refused_with_the_clients_noise(seed_federation):
    status, body = seed_federation.post("/start", {"dp": {"noise_multiplier": 1, "clip": 1, "local_noise": True,
                                                          "adaptive": {}}})
    assert status == 400 and "dp.adaptive" in named(body), body


def test_a_client_that_sends_a_huge_update_moves_the_model_by_at_most_s_over_m(servers, batched):
    """Ten clients, one of which ignores the clip and sends w = b = 1e12 (the
    byzantine scenario's attacker, a client app that lies): with σ = 0 the
    release minus the honest clients' clipped updates (as the wire shows
    them) is the attacker's part, of norm S/M at most (without DP it is 1e11)."""
    fed, wire = wired(servers, make_clients("byzantine", 10, attackers=1, attack="huge"), batched=batched)
    bound, m = 0.5, 10.0
    run = fed.run(rounds=5, dp={"noise_multiplier": 0, "clip": bound})
    assert run["status"] == "completed", run["error"]
    for record in run["rounds"]:
        w_t, b_t = record["global_model_in"]["w"], record["global_model_in"]["b"]
        sent = [reply["local_model"] for _, _, reply in wire.sent[record["round"]]]
        honest = [x for x in sent if x["w"] < 1e6]
        assert len(sent) == 10 and len(honest) == 9
        sw = sum(by_hand_clip(x["w"] - w_t, x["b"] - b_t, bound)[0] for x in honest)
        sb = sum(by_hand_clip(x["w"] - w_t, x["b"] - b_t, bound)[1] for x in honest)
        attacker = math.hypot(record["global_model"]["w"] - w_t - sw / m,
                              record["global_model"]["b"] - b_t - sb / m)
        assert attacker <= bound / m * (1 + 1e-9)
        assert attacker == pytest.approx(bound / m, rel=1e-6)  # it used all it may
        assert record["suspicious"] == []  # (flagged in memory, by its update's norm: not written)
    assert wire.batches == (5 if batched else 0)
    plain = fed.run(rounds=1)
    assert plain["rounds"][0]["global_model"]["w"] > 1e10  # the same attack without DP
    assert plain["rounds"][0]["suspicious"]  # which, without DP, names it


def test_adaptive_clipping_moves_s_by_andrew_et_al_s_formula(seed_federation):
    """σ = 0 and σ_b = 0: no noise, so S_{t+1} = S_t·exp(−η(b_t − γ)) with
    b_t the share of the clients whose update, before they clipped it, was
    no longer than S_t (their local GD, computed here), exactly."""
    gamma, eta, start_bound = 0.5, 0.2, 0.05
    run = seed_federation.run(rounds=30, dp={"noise_multiplier": 0, "clip": start_bound, "adaptive": {
        "target_quantile": gamma, "lr": eta, "count_noise": 0}})
    assert run["status"] == "completed", run["error"]
    bound = start_bound
    for record in run["rounds"]:
        privacy = record["privacy"]
        assert privacy["clip"] == pytest.approx(bound, rel=1e-12)
        w_t, b_t = record["global_model_in"]["w"], record["global_model_in"]["b"]
        bits = [math.hypot(w - w_t, b - b_t) <= bound for w, b in (local_gd(d, w_t, b_t) for d in SEED_DATA)]
        assert all("metrics" not in p for p in record["participants"])  # each client's bit: never written
        fits = sum(bits)
        bound = bound * math.exp(-eta * (fits / 2 - gamma))
        assert privacy["next_clip"] == pytest.approx(bound, rel=1e-12)
    assert bound > start_bound  # every update was longer than 0.05: S grew


def test_adaptive_clipping_with_noise_records_the_update_s_multiplier(seed_federation):
    """σ = 1, σ_b = 5: every round records z_Δ with 1/z_Δ² + 1/(2σ_b)² = 1/σ² (by hand) and the noise
    std z_Δ·S_t/M for that round's S_t, and the next round clips at the S it announced."""
    sigma, count_noise = 1.0, 5.0
    run = seed_federation.run(rounds=10, dp={"noise_multiplier": sigma, "clip": 0.1, "adaptive": {
        "count_noise": count_noise}})
    assert run["status"] == "completed", run["error"]
    z_update = 1 / math.sqrt(1 / sigma ** 2 - 1 / (2 * count_noise) ** 2)
    for record, after in zip(run["rounds"], run["rounds"][1:] + [None]):
        privacy = record["privacy"]
        assert privacy["update_noise_multiplier"] == pytest.approx(z_update, rel=1e-12)
        assert privacy["noise_std"] == pytest.approx(z_update * privacy["clip"] / 2.0, rel=1e-12)
        if after is not None:
            assert after["privacy"]["clip"] == pytest.approx(privacy["next_clip"], rel=1e-12)


def stored_text(db: str) -> str:
    """The run history's bytes as text: the SQLite file and its write-ahead log (the store is still open)."""
    return "".join(p.read_bytes().decode("latin-1") for p in sorted(Path(db).parent.glob(Path(db).name + "*")))


def test_a_dp_run_writes_nothing_of_any_one_client(servers, caplog, batched):
    """The seed's two clients, σ = 0.25, S = 10 (no update clipped: each
    update's norm is a number of its own; at σ = 1 the model's noise, of
    std σS/M = 5, now and then pushed an update past S), 5 rounds. Every number a client
    sent (its local model, loss_before, loss_after, as the wire shows them)
    and each update's norm ‖W_k − W_t‖, in any of three formats, is in
    neither the SQLite file, nor the run as the API gives it to anyone (no
    token is set: the default), nor the server's log; each record lists who
    took part and nothing of theirs (no model, metrics, clip bit, term or
    suspicious norm); on both paths (each client's /train, and one
    /batch/train a round, its rows read back). The clients' own log writes
    their models: the search finds what it looks for. The federated loss is kept, the aggregate
    Σ n_k·L_k / N of the losses on the wire, and the log writes it alone."""
    caplog.set_level(logging.INFO)
    fed, wire = wired(servers, make_clients("seed", 2), batched=batched)
    run = fed.run(rounds=5, dp={"noise_multiplier": 0.25, "clip": 10.0})
    assert run["status"] == "completed", run["error"]
    status, api = fed.get(f"/runs/{run['run_id']}")
    assert status == 200
    log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("fedavg.client"))
    own = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fedavg.client"))
    stored, served = stored_text(fed.app.config["DB"]), json.dumps(api)
    theirs = []
    for record in api["rounds"]:
        theta_t = coordinates(record["global_model_in"])
        assert [set(p) for p in record["participants"]] == [{"client_id", "url", "data_size"}] * 2
        assert record["terms"] == [] and record["suspicious"] == []
        for _, _, reply in wire.sent[record["round"]]:
            model = coordinates(reply["local_model"])
            norm = math.dist(model, theta_t)
            assert norm < 10.0, norm  # not clipped
            theirs += [*model, reply["metrics"]["loss_before"], reply["metrics"]["loss_after"], norm]
    assert len(theirs) == 5 * 2 * 5
    formats = [[repr(x), f"{x:.6f}", f"{x:.6e}"] for x in theirs]
    for where, text in (("stored", stored), ("served", served), ("logged", log)):
        assert [f for fs in formats for f in fs if written(f, text)] == [], where
    for where, text in (("stored", stored), ("served", served)):
        for key in ("local_model", "metrics", "within_clip", "loss_before", "loss_after", "update_norm"):
            assert f'"{key}"' not in text, (where, key)
    if not batched:  # (a host's /batch/train logs no client's model: per client, the search is shown to find them)
        assert sum(any(written(f, own) for f in fs) for fs in formats) >= 5 * 2 * 2  # each W_k's w and b
    assert "‖Δ_k‖" not in log and "SUSPICIOUS" not in log and "scaled down" not in log
    for record, after in zip(api["rounds"], api["rounds"][1:]):
        losses = [(reply["metrics"]["loss_before"], reply["data_size"]) for _, _, reply in wire.sent[after["round"]]]
        assert record["federated_loss"] == pytest.approx(sum(x * n for x, n in losses) / sum(n for _, n in losses),
                                                         rel=1e-12)
    assert "no client's L_k is written" in log
    assert wire.batches == (5 if batched else 0)


def test_a_summarised_dp_round_writes_nothing_of_any_one_client(servers, caplog, batched):
    """150 clients, all sampled (past the 100 a record lists one by one: the round is written as a
    summary), σ = 0.25, S = 10, 2 rounds, on both paths: no client's local model, loss_before or
    loss_after as the wire shows them is in the SQLite file, the API or the server's log, in any of
    three formats (two for a loss: see below); the summary sums no model field and groups none, and
    its top contributors carry their names, URLs, n_k and weights n_k/N only (n_k their /health
    publishes)."""
    caplog.set_level(logging.INFO)
    fed, wire = wired(servers, make_clients("iid", 150, 4), batched=batched)
    run = fed.run(rounds=2, dp={"noise_multiplier": 0.25, "clip": 10.0})
    assert run["status"] == "completed", run["error"]
    status, api = fed.get(f"/runs/{run['run_id']}")
    assert status == 200
    log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("fedavg.client"))
    stored, served = stored_text(fed.app.config["DB"]), json.dumps(api)
    models, losses = [], []
    for record in api["rounds"]:
        assert record["participants"] == [] and record["terms"] == []
        summary = record["summary"]
        assert summary["contributed"] == 150 and summary["sums"] == {} and summary["groups"] is None
        assert all(set(p) == {"client_id", "url", "data_size", "weight"} for p in summary["top"])
        sent = wire.sent[record["round"]]
        assert len(sent) == 150
        for _, _, reply in sent:
            models += coordinates(reply["local_model"])
            losses += [reply["metrics"]["loss_before"], reply["metrics"]["loss_after"]]
    # A loss near 0.01 written to 6 decimals has 4 digits: one of 600 of them would now and then be
    # the federated loss (their aggregate, which is written) to 6 decimals. 7 digits at least.
    formats = [[repr(x), f"{x:.6f}", f"{x:.6e}"] for x in models] + [[repr(x), f"{x:.6e}"] for x in losses]
    for where, text in (("stored", stored), ("served", served), ("logged", log)):
        found = [f for fs in formats for f in fs if written(f, text)]
        # A local model's coordinate to 6 decimals now and then equals a number the record writes (the
        # noisy global model's, near all 150 clients' own): 1 run in 30 here found one such string. A
        # leak writes hundreds; a few fixed-point coincidences are chance, any other format found is not.
        assert len(found) <= 3 and all(re.fullmatch(r"-?\d+\.\d{6}", f) for f in found), (where, found)
    if not batched:  # the clients' own log writes their models: the search finds what it looks for
        own = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fedavg.client"))
        assert sum(any(written(f, own) for f in fs) for fs in formats) >= 2 * 150 * 2  # each W_k's w and b
    assert wire.batches == (2 if batched else 0)


def test_a_dp_round_recorded_with_each_client_s_numbers_is_read_back_without_them(servers, tmp_path):
    """A history written before DP runs kept each client's numbers out (the
    round as 8ca91f9 stored it: local models, losses, clip bits, terms, each
    ‖Δ_k‖ in the math): GET /runs/<id> shows its rounds as a DP run records
    them now, to the token's holder too; the released model and ε stay."""
    from fedavg_server.records import RoundRecord
    from fedavg_server.runs import RunStore

    db = tmp_path / "old.db"
    store = RunStore(db)
    run_id = store.create({"rounds": 1}, ["http://a", "http://b"], {"w": 0.0, "b": 0.0})
    participants = [{"client_id": c, "url": f"http://{c}", "data_size": 2,
                     "local_model": {"w": 0.123456789, "b": 0.987654321},
                     "metrics": {"loss_before": 17.0, "loss_after": 4.111, "within_clip": 1.0}} for c in "ab"]
    store.add_round(run_id, RoundRecord(
        1, "fedavg", np.zeros(2), Step(np.array([0.05, 0.04]), {}, ["DP-FedAvg: Δ_k = W_k − W_t clipped to S = 0.1: "
                                                                     "‖Δ_k‖ = 0.765432, 0.654321; 2 of 2 scaled down"]),
        participants, [], 4, [{"client_id": "a", "n_k": 2, "weight": 0.5, "w": 0.0617, "b": 0.4938}], 0.01,
        [{"client_id": "a", "url": "http://a", "update_norm": 0.765432, "ratio": 11.0}],
        {"privacy": {"epsilon": 4.7, "clip": 0.1}}))
    store.finish(run_id, "completed")
    store.close()
    for token, headers in ((None, {}), ("t0ken", {"Authorization": "Bearer t0ken"})):
        fed = servers(InProcessTransport({}), db=db, TOKEN=token)
        status, body = fed.get(f"/runs/{run_id}", headers)
        assert status == 200, body
        [record] = body["rounds"]
        assert record["participants"] == [{"client_id": c, "url": f"http://{c}", "data_size": 2} for c in "ab"]
        assert record["terms"] == [] and record["suspicious"] == []
        assert "0.765432" not in json.dumps(body) and "0.123456789" not in json.dumps(body)
        assert record["global_model"] == {"w": 0.05, "b": 0.04} and record["privacy"]["epsilon"] == 4.7
        fed.close()


def test_a_run_stops_before_the_round_that_would_pass_its_budget(seed_federation):
    """ε after T rounds from dp-accounting itself (its RDP accountant, composed here): the run does the
    largest T with ε(T) ≤ target, records ε(t) each round, and ends budget_exhausted."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    def eps(t: int) -> float:
        accountant = RdpAccountant()
        accountant.compose(SelfComposedDpEvent(PoissonSampledDpEvent(1.0, GaussianDpEvent(2.0)), t))
        return accountant.get_epsilon(1e-5)

    target = 6.0
    allowed = max(t for t in range(1, 60) if eps(t) <= target)
    run = seed_federation.run(rounds=100, dp={"noise_multiplier": 2.0, "clip": 1.0, "target_epsilon": target})
    assert run["status"] == "budget_exhausted"
    assert len(run["rounds"]) == allowed
    assert f"round {allowed + 1} would bring ε to {eps(allowed + 1):.4g}" in run["error"]
    for t, record in enumerate(run["rounds"], start=1):
        assert record["privacy"]["epsilon"] == pytest.approx(eps(t), rel=1e-9)
    status, body = seed_federation.post(f"/runs/{run['run_id']}/resume", {})
    assert status == 409, body  # more rounds would spend more than the budget


def named(body: dict) -> set[str]:
    """The fields a 400 names: every one in "errors", or the one "error" begins with."""
    return {e["field"] for e in body.get("errors", [])} | {body["error"].split(": ")[0]}


@pytest.mark.parametrize("dp, field", [
    ({"noise_multiplier": -1, "clip": 1}, "dp.noise_multiplier"),
    ({"noise_multiplier": 1, "clip": 0}, "dp.clip"),
    ({"noise_multiplier": 1, "clip": None}, "dp.clip"),
    ({"noise_multiplier": 1, "clip": 1, "delta": 1}, "dp.delta"),
    ({"noise_multiplier": 0, "clip": 1, "target_epsilon": 5}, "dp.target_epsilon"),
    ({"noise_multiplier": 1, "clip": 1, "adaptive": {"count_noise": 0.4}}, "dp.adaptive.count_noise"),
    ({"noise_multiplier": 1, "clip": 1, "adaptive": {"target_quantile": 1}}, "dp.adaptive.target_quantile"),
    ({"noise_multiplier": 1}, "dp.clip"),
    ({"noise_multiplier": 1, "clip": 1, "epsilon": 3}, "dp.epsilon"),
    ("yes", "dp"),
])
def test_dp_settings_out_of_range_are_a_400_naming_the_field(seed_federation, dp, field):
    status, body = seed_federation.post("/start", {"dp": dp})
    assert status == 400 and field in named(body), body


@pytest.mark.parametrize("extra", [{"strategy": "scaffold"}, {"aggregator": "median"}, {"clip_norm": 1.0}])
def test_dp_with_what_it_cannot_bound_is_a_400(seed_federation, extra):
    status, body = seed_federation.post("/start", {**extra, "dp": {"noise_multiplier": 1, "clip": 1}})
    assert status == 400 and "dp" in named(body), body


# --- the accountant against dp-accounting's documented values -----------------------------

def test_epsilon_from_documented_renyi_divergences():
    """dp-accounting's test_compute_rdp_poisson_sampled_gaussian documents the
    Rényi divergences of q = 0.01, σ = 2.5 over 50 rounds at five orders.
    From those numbers, the conversion ε = min_α r_α + log(1 − 1/α) −
    log(δ·α)/(α − 1) (Balle et al., 2020; Proposition 12 of arXiv:2004.00010)
    written here gives ε; the server's accountant must agree."""
    from fedavg_server.accountant import epsilon
    orders = (1.5, 2.5, 5.0, 50.0, 100.0)
    documented = (6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02)
    delta = 1e-5
    expected = min(r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a, r in zip(orders, documented))
    assert epsilon(0.01, 2.5, 50, delta, orders) == pytest.approx(expected, rel=1e-4)


def test_the_documented_one_in_a_million_gaussian_is_just_over_epsilon_one():
    """dp-accounting's test_compute_epsilon_delta_gaussian: σ = 4.530877117,
    every client (q = 1), one round, δ = 10⁻⁶. The Gaussian's Rényi
    divergence is α/(2σ²); the conversion written here (Balle et al., 2020)
    gives ε = 1 + 2.7·10⁻¹⁰ over that test's orders (1 to 100 by 0.001), and
    ε = 1.00000029 over the accountant's default orders, which a run uses:
    just over (1, 10⁻⁶)-DP, not exactly. The server's accountant must give
    both numbers."""
    from dp_accounting.rdp import RdpAccountant

    from fedavg_server.accountant import epsilon
    sigma, delta = 4.530877117, 1e-6

    def by_hand(orders: Sequence[float]) -> float:
        return min(a / (2 * sigma ** 2) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                   for a in orders if a > 1.01)
    fine = tuple(0.001 * i for i in range(1000, 100000))
    assert 1 < by_hand(fine) < 1 + 1e-9
    assert epsilon(1.0, sigma, 1, delta, fine) == pytest.approx(by_hand(fine), rel=1e-12)
    default = by_hand(RdpAccountant().orders)  # (the orders only: the divergences are the closed form's)
    assert 1.0000002 < default < 1.0000003
    assert epsilon(1.0, sigma, 1, delta) == pytest.approx(default, rel=1e-12)


@pytest.mark.parametrize("sigma", [1e-158, 1e-200, 1e-300])
@pytest.mark.parametrize("q", [1.0, 0.5])
def test_epsilon_is_infinite_never_zero_when_the_accountant_cannot_bound_it(sigma, q):
    """A σ so small that dp-accounting's arithmetic overflows: its divergences
    come out NaN (its conversion then reads ε = 0) or it divides by zero.
    Nothing is bounded, so ε is ∞, for one round and for fifty."""
    from fedavg_server.accountant import epsilon
    assert epsilon(q, sigma, 1, 1e-5) == math.inf
    assert epsilon(q, sigma, 50, 1e-5) == math.inf


@pytest.mark.parametrize("sigma, fraction", [(1e-158, 0.5), (1e-158, 1.0), (1e-200, 0.5), (1e-300, 1.0)])
def test_a_noise_multiplier_too_small_to_account_for_is_a_400(seed_federation, sigma, fraction):
    """σ = 1e-158 with fraction 0.5 ran and reported ε = 0 each round; σ ≤ 1e-200 ended in a ZeroDivisionError."""
    status, body = seed_federation.post("/start", {"rounds": 3, "fraction": fraction, "dp": {
        "noise_multiplier": sigma, "clip": 1.0, "target_epsilon": 1}})
    assert status == 400 and "dp.noise_multiplier" in named(body), body


def test_a_tiny_noise_multiplier_that_can_be_accounted_for_reports_its_huge_epsilon(seed_federation):
    """σ = 1e-100, q = 0.5: ε is about 5·10¹⁹⁹ (the divergence α/(2σ²) at the smallest order, 1.1); the run
    reports that, not 0, and its budget stops it before the first round."""
    run = seed_federation.run(rounds=2, fraction=0.5, dp={"noise_multiplier": 1e-100, "clip": 1.0})
    assert run["status"] == "completed", run["error"]
    assert all(1e199 < record["privacy"]["epsilon"] < math.inf for record in run["rounds"])
    run = seed_federation.run(rounds=2, fraction=0.5, dp={"noise_multiplier": 1e-100, "clip": 1.0,
                                                           "target_epsilon": 1e6})
    assert run["status"] == "budget_exhausted" and run["rounds"] == []


@pytest.mark.parametrize("q, sigma, rounds", [(1.0, 1.1, 7), (0.5, 1.0, 40), (0.1, 0.8, 300), (0.01, 1.0, 100)])
def test_t_rounds_cost_t_times_one_round(q, sigma, rounds):
    """The server scales one round's divergences by T; the accountant composing T rounds itself agrees."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    from fedavg_server.accountant import epsilon
    composed = RdpAccountant()
    composed.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), rounds))
    assert epsilon(q, sigma, rounds, 1e-5) == pytest.approx(composed.get_epsilon(1e-5), rel=1e-12)


# --- make privacy ------------------------------------------------------------------------------

def check_privacy_report(report: list[dict], printed: str) -> None:
    """What `make privacy --repeats 2 --sigmas 0,2 --population 300 --population-rounds 5` gives: one
    row per σ on each scenario, ε as dp-accounting gives it for q = 1 over the rounds run (q = 0.01,
    Poisson-sampled, for the population), and the no-DP row first."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    assert [(s["scenario"], s["clients"], s["fraction"]) for s in report] == \
        [("seed", 2, 1.0), ("iid", 50, 1.0), ("population (iid)", 300, 0.01)]
    assert report[2]["rounds"] == 5
    for scenario in report:
        labels = [row["label"] for row in scenario["rows"]]
        assert labels == ["no DP", "σ = 0", "σ = 2"]
        accountant = RdpAccountant()
        round_event = GaussianDpEvent(2.0)
        if scenario["fraction"] < 1:
            round_event = PoissonSampledDpEvent(scenario["fraction"], round_event)
        accountant.compose(SelfComposedDpEvent(round_event, scenario["rounds"]))
        assert scenario["rows"][2]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert scenario["rows"][1]["epsilon"] is None  # σ = 0: ε = ∞
        assert len(scenario["rows"][2]["losses"]) == 2  # noisy settings are repeated
        assert f"{scenario['rows'][2]['epsilon']:.3g}" in printed


def test_make_privacy_tabulates_epsilon_against_accuracy(tmp_path, capsys):
    """scripts/privacy.py's main (what `make privacy` runs), called here: its federations are in-process."""
    import privacy
    assert privacy.main(["--repeats", "2", "--sigmas", "0,2", "--jobs", "1", "--out", str(tmp_path),
                         "--population", "300", "--population-rounds", "5", "--population-repeats", "2"]) == 0
    printed = capsys.readouterr().out
    check_privacy_report(json.loads((tmp_path / "privacy.json").read_text()), printed)
    # A line as each run ends (σ = 0 is noiseless: run once), in the order run here, before the tables.
    runs = [f"{scenario}, {setting}: {i} of {of} run(s) done" for scenario in ("seed", "iid", "population (iid)")
            for setting, of in (("no DP", 1), ("σ = 0", 1), ("σ = 2", 2)) for i in range(1, of + 1)]
    assert progress_lines(printed, "privacy") == runs
    assert printed.index("privacy: [12/12]") < printed.index("\nseed, K=2")


@pytest.mark.parametrize("args, error", [
    (["--population", "50"], "--population: at least 100 clients, so that q = 0.01 samples M = q·K >= 1"),
    (["--population", "-1"], "--population must be >= 0"),
    (["--population-rounds", "0"], "--population-rounds >= 1"),
])
def test_make_privacy_refuses_a_population_it_cannot_sample(args, error, capsys):
    import privacy
    with pytest.raises(SystemExit) as stop:
        privacy.main(args)
    assert stop.value.code == 2 and error in capsys.readouterr().err


# --- real processes (make test-all) ------------------------------------------------------------

@pytest.mark.system
def test_dp_over_http_on_the_seed_apps_is_the_reference(seed_server):
    """The seed's three apps as processes: σ = 0, S = ∞ is FedAvg (plain
    Python, 1e-12); with S = 0.1 every round is W_t + Σ_k clip_S(W_k − W_t)/2,
    W_k plain-Python local GD from W_t (1e-12); σ = 1 records the noise
    σ·S/M it added."""
    status, run = post_json(seed_server + "/start", {"rounds": 5, "seed": 1,
                                                     "dp": {"noise_multiplier": 0, "clip": None}}, timeout_s=600)
    assert status == 200 and run["status"] == "completed", run
    for got, (w, b) in zip(run["rounds"], reference_fedavg(SEED_DATA, rounds=5)):
        assert got["global_model"]["w"] == pytest.approx(w, abs=1e-12)
        assert got["global_model"]["b"] == pytest.approx(b, abs=1e-12)
    assert run["final_model"]["w"] == pytest.approx(1.396271, abs=5e-7)

    bound = 0.1
    status, run = post_json(seed_server + "/start", {"rounds": 5, "dp": {"noise_multiplier": 0, "clip": bound}},
                            timeout_s=600)
    assert status == 200 and run["status"] == "completed", run
    w, b = 0.0, 0.0
    for record in run["rounds"]:
        sw = sb = 0.0
        for data in SEED_DATA:
            w_k, b_k = local_gd(data, w, b)
            dx, db = by_hand_clip(w_k - w, b_k - b, bound)
            sw, sb = sw + dx, sb + db
        w, b = w + sw / 2, b + sb / 2
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-12)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-12)

    status, run = post_json(seed_server + "/start", {"rounds": 3, "dp": {"noise_multiplier": 1, "clip": bound}},
                            timeout_s=600)
    assert status == 200 and run["status"] == "completed", run
    assert [r["privacy"]["noise_std"] for r in run["rounds"]] == pytest.approx([bound / 2] * 3, rel=1e-12)


@pytest.mark.system
def test_make_privacy_runs_as_the_command(tmp_path):
    """`make privacy` as a user types it (PRIVACY_ARGS to keep it short), from the root environment only."""
    done = subprocess.run(["make", "--no-print-directory", "privacy", f"OUT={tmp_path}", "POPULATION=300",
                           "PRIVACY_ARGS=--repeats 2 --sigmas 0,2 --population-rounds 5 --population-repeats 2"],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    check_privacy_report(json.loads((tmp_path / "privacy.json").read_text()), done.stdout)


def test_a_dp_round_measured_by_one_client_records_no_federated_loss(seed_federation, caplog):
    """Under Poisson sampling (q = 0.5 of the seed's two clients) a round is
    often measured by one client: the "federated" loss of its model is then
    that client's own loss, which a DP run does not record. It was stored,
    served and logged; now a model's loss is written only when two or more
    clients measured it (the next round's participants, or the final
    evaluation's every client), and the log says why it is not."""
    caplog.set_level(logging.INFO, logger="fedavg.server")
    run = seed_federation.run(rounds=40, fraction=0.5, dp={"noise_multiplier": 1.0, "clip": 1.0})
    assert run["status"] == "completed", run["error"]
    took_part = {r["round"]: len(r["participants"]) for r in run["rounds"]}
    measured_by = {r: took_part.get(r + 1, 0) for r in took_part}
    measured_by[run["rounds"][-1]["round"]] = 2  # the final evaluation asks every client
    alone = [r["round"] for r in run["rounds"] if measured_by[r["round"]] == 1]
    assert alone, measured_by  # P(no round with one participant in 40) = 2^-40
    for record in run["rounds"]:
        kept = record["federated_loss"] is not None
        assert kept == (measured_by[record["round"]] >= 2), (record["round"], measured_by[record["round"]])
    log = "\n".join(r.getMessage() for r in caplog.records)
    for r in alone:
        assert (f"federated MSE of round {r}'s model: not recorded: under DP a loss of one client alone is its own "
                "number") in log


def test_the_charts_of_a_dp_run_an_older_server_recorded_draw_no_client_s_model(servers, tmp_path):
    """The same older DP history: GET /runs/<id> showed its rounds without
    the clients' models, but the models chart still drew each client's line
    from them, to the token's holder. Now the chart says the clients sent no
    local model, for every reader."""
    from fedavg_server.records import RoundRecord
    from fedavg_server.runs import RunStore

    db = tmp_path / "old.db"
    store = RunStore(db)
    run_id = store.create({"rounds": 1, "dp": {"noise_multiplier": 1.0, "clip": 0.1}}, ["http://a", "http://b"],
                          {"w": 0.0, "b": 0.0})
    participants = [{"client_id": c, "url": f"http://{c}", "data_size": 2,
                     "local_model": {"w": 0.123456789, "b": 0.987654321}} for c in "ab"]
    store.add_round(run_id, RoundRecord(1, "fedavg", np.zeros(2), Step(np.array([0.05, 0.04]), {}, []),
                                        participants, [], 4, [], 0.01, [], {"privacy": {"epsilon": 4.7, "clip": 0.1}}))
    store.finish(run_id, "completed")
    store.close()
    fed = servers(InProcessTransport({}), db=db, TOKEN="t0ken")
    r = fed.http.get(f"/runs/{run_id}/plots/models.svg?round=1", headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 200, r.get_data(as_text=True)
    svg = r.get_data(as_text=True)
    assert "2 client(s) sent no local model, so no line" in svg and "0.123457" not in svg


def test_poisson_sampling_takes_each_client_with_probability_q_from_the_systems_entropy(monkeypatch):
    """DP's sample: client k is in when u_k < q, u_k the top 53 bits of 8
    bytes of os.urandom over 2⁵³ (SystemRandom().random()'s draw), all K at
    once. The bytes given, the draw is exact; from the OS, its count is
    Binomial(K, q) and no two rounds repeat."""
    from fedavg_server import sampling

    q = 0.01
    edge = int(q * 2**53)  # the 53-bit values around q·2⁵³, where u_k < q turns false
    words = [0, 2**64 - 1, edge << 11, (edge + 1) << 11, (edge - 1) << 11 | 2047]
    monkeypatch.setattr(sampling.os, "urandom", lambda n: b"".join(w.to_bytes(8, "little") for w in words)[:n])
    expected = [(w >> 11) / 2**53 < q for w in words]  # plain Python, as random.SystemRandom computes it
    assert sampling.poisson_mask(len(words), q).tolist() == expected
    urls = [f"http://h/clients/{k}" for k in range(len(words))]
    assert sampling.PoissonSample(q, 1).draw(1, urls) == [u for u, e in zip(urls, expected) if e]
    monkeypatch.undo()

    k = 200_000
    first, second = sampling.poisson_mask(k, q), sampling.poisson_mask(k, q)
    sd = (k * q * (1 - q)) ** 0.5
    assert abs(int(first.sum()) - k * q) < 6 * sd and abs(int(second.sum()) - k * q) < 6 * sd
    assert not np.array_equal(first, second)
