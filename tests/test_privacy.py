"""Differential privacy (DP-FedAvg) against plain-Python references written
here: σ = 0 and S = ∞ are FedAvg; the noise on the released model has the
standard deviation σ·S/M; a client that sends a huge update moves the model
by at most S/M; clients that add the noise themselves add σ·S/√M each;
adaptive clipping moves S as Andrew et al.'s formula says; a run stops
before its budget is passed; bad settings are a 400 naming the field. The
accountant's ε is checked against dp-accounting's own documented values.

The math runs in this process: ``fedavg.privacy`` on its own (thousands of
draws in milliseconds, and properties Hypothesis tries on many inputs), and
whole runs on in-process federations (conftest's ``seed_federation`` and
``federation``: the server's code path, driven through its API). Two tests
are marked system (make test-all): DP over HTTP on the seed's three apps as
processes, and `make privacy` run as the command."""
from __future__ import annotations

import json
import math
import random
import statistics
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from fedavg.client import LocalClient
from fedavg.privacy import DPAverage, adapt_clip, client_noise_std, clip, privatize, update_noise_multiplier
from fedavg.scenarios import make_clients
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


def released_without_noise(record: dict, bound: float, expected: float) -> list[float]:
    """W_t + Σ_k clip_S(W_k − W_t) / M from the round's own participants (their local models are public
    on a server without a token)."""
    theta_t = coordinates(record["global_model_in"])
    total = [0.0] * len(theta_t)
    for p in record["participants"]:
        clipped = by_hand_clip_all([a - c for a, c in zip(coordinates(p["local_model"]), theta_t)], bound)
        total = [t + x for t, x in zip(total, clipped)]
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


def wide_clients() -> list[LocalClient]:
    return [LocalClient(f"wide_{i + 1}", np.array([x for x, _ in rows]), np.array([y for _, y in rows]))
            for i, rows in enumerate(WIDE_DATA)]


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


def test_a_client_adds_its_share_sigma_s_over_root_m():
    """privatize with client_noise_std(σ, S, M): 5000 replies of a client whose
    update is twice S; each minus W_t + clip_S(Δ) (by hand) has standard
    deviation σ·S/√M within 5%, so M clients' shares sum to the server's σ·S."""
    sigma, bound, m = 1.0, 0.2, 2.0
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


@pytest.mark.parametrize("unclipped, m", [(0, 2.0), (1, 2.0), (2, 2.0), (7, 10.0)])
def test_adaptive_clip_without_count_noise_is_the_formula(unclipped, m):
    """S_{t+1} = S_t·exp(−η(b − γ)), b = unclipped/M, exactly, when σ_b = 0."""
    bound, gamma, eta = 0.05, 0.5, 0.2
    new, share = adapt_clip(bound, unclipped, m, gamma, eta, 0.0)
    assert share == unclipped / m
    assert new == pytest.approx(bound * math.exp(-eta * (unclipped / m - gamma)), rel=1e-15)


def test_adaptive_clip_counts_with_noise_of_std_sigma_b_over_m():
    """b̄ = (unclipped + N(0, σ_b²))/M: over 5000 draws its standard deviation is σ_b/M within 5%, and
    each S_{t+1} is the formula applied to that b̄."""
    bound, gamma, eta, count_noise, m = 1.0, 0.5, 0.2, 3.0, 10.0
    shares = []
    for _ in range(5000):
        new, share = adapt_clip(bound, 4, m, gamma, eta, count_noise)
        assert new == pytest.approx(bound * math.exp(-eta * (share - gamma)), rel=1e-12)
        shares.append(share)
    assert abs(statistics.mean(shares) - 0.4) < 5 * (count_noise / m) / math.sqrt(len(shares))
    assert statistics.pstdev(shares) == pytest.approx(count_noise / m, rel=0.05)


@pytest.mark.parametrize("z, count_noise", [(1.0, 5.0), (0.5, 0.3), (2.0, 100.0)])
def test_adaptive_clipping_spends_what_one_release_would(z, count_noise):
    """The update's multiplier z_Δ and the count's 2σ_b together cost what
    one Gaussian release with multiplier z would: dp-accounting composing the
    two gives the ε of the one (the Gaussian's Rényi divergence is α/(2z²),
    so 1/z_Δ² + 1/(2σ_b)² = 1/z²)."""
    from dp_accounting import ComposedDpEvent, GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    z_update = update_noise_multiplier(z, count_noise)
    both, one = RdpAccountant(), RdpAccountant()
    both.compose(ComposedDpEvent([GaussianDpEvent(z_update), GaussianDpEvent(2 * count_noise)]))
    one.compose(GaussianDpEvent(z))
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    assert z_update > z  # the update's own noise grows to pay for the count


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
    model minus what the clipped updates alone give is the noise; its
    standard deviation is σ·S/M within 5% (the estimate's own error is about
    1%), on every coordinate alike."""
    sigma, bound, rounds = 1.0, 0.1, 500
    run = federation(wide_clients()).run(rounds=rounds, dp={"noise_multiplier": sigma, "clip": bound})
    assert run["status"] == "completed", run["error"]
    rounds_ = run["rounds"]  # (the /start reply holds every round; GET /runs/<id> pages them)
    assert len(rounds_) == rounds
    noise = []
    for record in rounds_:
        clean = released_without_noise(record, bound, 2.0)
        noise += [got - want for got, want in zip(coordinates(record["global_model"]), clean)]
    assert len(noise) == 5000
    # The clip is at work: in round 1 both plain-Python updates are longer than S, and each client sent
    # its update cut to S.
    theta_0 = coordinates(rounds_[0]["global_model_in"])
    sent = {p["client_id"]: coordinates(p["local_model"]) for p in rounds_[0]["participants"]}
    for name, rows in zip(("wide_1", "wide_2"), WIDE_DATA):
        assert math.dist(wide_local_gd(rows, theta_0), theta_0) > bound
        assert math.dist(sent[name], theta_0) == pytest.approx(bound, rel=1e-9)
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


def test_clients_that_add_the_noise_add_sigma_s_over_root_m_each(federation):
    """local_noise, two clients with 9 features, 250 rounds, 5000 draws: each
    client sends W_t + clip_S(W_k − W_t) + N(0, σ²S²/M), W_k its plain local
    GD (computed here); the server only sums."""
    sigma, bound, rounds = 1.0, 0.2, 250
    run = federation(wide_clients()).run(rounds=rounds, dp={"noise_multiplier": sigma, "clip": bound,
                                                            "local_noise": True})
    assert run["status"] == "completed", run["error"]
    noise = []
    assert len(run["rounds"]) == rounds
    for record in run["rounds"]:
        theta_t = coordinates(record["global_model_in"])
        sent = {p["client_id"]: coordinates(p["local_model"]) for p in record["participants"]}
        for name, rows in zip(("wide_1", "wide_2"), WIDE_DATA):
            clipped = by_hand_clip_all([a - c for a, c in zip(wide_local_gd(rows, theta_t), theta_t)], bound)
            noise += [got - (c + x) for got, c, x in zip(sent[name], theta_t, clipped)]
        # the server adds nothing: W_t + Σ (sent − W_t) / M
        assert coordinates(record["global_model"]) == pytest.approx(
            [c + sum(m[j] - c for m in sent.values()) / 2 for j, c in enumerate(theta_t)], abs=1e-12)
    assert len(noise) == 5000
    assert statistics.pstdev(noise) == pytest.approx(sigma * bound / math.sqrt(2.0), rel=0.05)


def test_a_client_that_sends_a_huge_update_moves_the_model_by_at_most_s_over_m(federation):
    """Ten clients, one of which ignores the clip and sends w = b = 1e12 (the
    byzantine scenario's attacker, a client app that lies): with σ = 0 the
    release minus the honest clients' clipped updates is the attacker's part,
    of norm S/M at most (without DP it is 1e11)."""
    fed = federation(make_clients("byzantine", 10, attackers=1, attack="huge"))
    bound, m = 0.5, 10.0
    run = fed.run(rounds=5, dp={"noise_multiplier": 0, "clip": bound})
    assert run["status"] == "completed", run["error"]
    for record in run["rounds"]:
        w_t, b_t = record["global_model_in"]["w"], record["global_model_in"]["b"]
        honest = [p for p in record["participants"] if p["local_model"]["w"] < 1e6]
        assert len(honest) == 9
        sw = sum(by_hand_clip(p["local_model"]["w"] - w_t, p["local_model"]["b"] - b_t, bound)[0] for p in honest)
        sb = sum(by_hand_clip(p["local_model"]["w"] - w_t, p["local_model"]["b"] - b_t, bound)[1] for p in honest)
        attacker = math.hypot(record["global_model"]["w"] - w_t - sw / m,
                              record["global_model"]["b"] - b_t - sb / m)
        assert attacker <= bound / m * (1 + 1e-9)
        assert attacker == pytest.approx(bound / m, rel=1e-6)  # it used all it may
    plain = fed.run(rounds=1)
    assert plain["rounds"][0]["global_model"]["w"] > 1e10  # the same attack without DP


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
        bits = {name: math.hypot(w - w_t, b - b_t) <= bound
                for name, (w, b) in zip(("client_1", "client_2"), (local_gd(d, w_t, b_t) for d in SEED_DATA))}
        assert {p["client_id"]: p["metrics"]["within_clip"] for p in record["participants"]} == bits
        fits = sum(bits.values())
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


def test_the_documented_one_one_in_a_million_gaussian():
    """dp-accounting's test_compute_epsilon_delta_gaussian: σ = 4.530877117,
    every client (q = 1), one round, is exactly (1, 1e-6)-DP over orders 1 to 100 by 0.001."""
    from fedavg_server.accountant import epsilon
    orders = tuple(0.001 * i for i in range(1000, 100000))
    assert epsilon(1.0, 4.530877117, 1, 1e-6, orders) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q, sigma, rounds", [(1.0, 1.1, 7), (0.5, 1.0, 40), (0.1, 0.8, 300)])
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
    """What `make privacy --repeats 2 --sigmas 0,2` gives: one row per σ on each scenario, ε as
    dp-accounting gives it for q = 1 over the rounds run, and the no-DP row first."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    assert [(s["scenario"], s["clients"]) for s in report] == [("seed", 2), ("iid", 50)]
    for scenario in report:
        labels = [row["label"] for row in scenario["rows"]]
        assert labels == ["no DP", "σ = 0", "σ = 2"]
        accountant = RdpAccountant()
        accountant.compose(SelfComposedDpEvent(GaussianDpEvent(2.0), scenario["rounds"]))
        assert scenario["rows"][2]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert scenario["rows"][1]["epsilon"] is None  # σ = 0: ε = ∞
        assert len(scenario["rows"][2]["losses"]) == 2  # noisy settings are repeated
        assert f"{scenario['rows'][2]['epsilon']:.3g}" in printed


def test_make_privacy_tabulates_epsilon_against_accuracy(tmp_path, capsys):
    """scripts/privacy.py's main (what `make privacy` runs), called here: its federations are in-process."""
    import privacy
    assert privacy.main(["--repeats", "2", "--sigmas", "0,2", "--jobs", "1", "--out", str(tmp_path)]) == 0
    check_privacy_report(json.loads((tmp_path / "privacy.json").read_text()), capsys.readouterr().out)


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
    done = subprocess.run(["make", "--no-print-directory", "privacy", f"OUT={tmp_path}",
                           "PRIVACY_ARGS=--repeats 2 --sigmas 0,2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    check_privacy_report(json.loads((tmp_path / "privacy.json").read_text()), done.stdout)
