"""Differential privacy (DP-FedAvg) against the real apps and plain-Python
references written here: σ = 0 and S = ∞ are FedAvg; the noise on the
released model has the standard deviation σ·S/M; a client that sends a huge
update moves the model by at most S/M; clients that add the noise
themselves add σ·S/√M each; adaptive clipping moves S as Andrew et al.'s
formula says; a run stops before its budget is passed; bad settings are a
400 naming the field. The accountant's ε is checked against dp-accounting's
own documented values."""
from __future__ import annotations

import math
import statistics

import pytest

from conftest import ROOT
from launcher import free_port, post_json, start_app, stop, wait_healthy
from reference import SEED_DATA, local_gd, reference_fedavg

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system


def start(url: str, body: dict) -> dict:
    status, run = post_json(url + "/start", body, timeout_s=600)
    assert status == 200, run
    return run


def clip(dx: float, db: float, bound: float) -> tuple[float, float]:
    """clip_S(Δ) = Δ·min(1, S/‖Δ‖), by hand."""
    norm = math.hypot(dx, db)
    return (dx, db) if norm <= bound else (dx * bound / norm, db * bound / norm)


def released_without_noise(record: dict, bound: float, expected: float) -> tuple[float, float]:
    """W_t + Σ_k clip_S(W_k − W_t) / M from the round's own participants (their local models are public
    on a server without a token)."""
    w_t, b_t = record["global_model_in"]["w"], record["global_model_in"]["b"]
    sw = sb = 0.0
    for p in record["participants"]:
        dx, db = clip(p["local_model"]["w"] - w_t, p["local_model"]["b"] - b_t, bound)
        sw, sb = sw + dx, sb + db
    return w_t + sw / expected, b_t + sb / expected


def test_no_noise_and_no_clip_is_fedavg(seed_server):
    """σ = 0, S = ∞: W_t + Σ_k (W_k − W_t)/K, which on the seed (n_k equal) is FedAvg's average."""
    run = start(seed_server, {"rounds": 5, "seed": 1, "dp": {"noise_multiplier": 0, "clip": None}})
    assert run["status"] == "completed"
    for got, (w, b) in zip(run["rounds"], reference_fedavg(SEED_DATA, rounds=5)):
        assert got["global_model"]["w"] == pytest.approx(w, abs=1e-12)
        assert got["global_model"]["b"] == pytest.approx(b, abs=1e-12)
    assert run["final_model"]["w"] == pytest.approx(1.396271, abs=5e-7)
    assert run["rounds"][-1]["privacy"]["epsilon"] is None  # no noise: ε = ∞, which JSON writes as null


def test_the_noise_on_the_released_model_has_std_sigma_s_over_m(seed_server):
    """2500 rounds, 5000 draws: the released model minus what the clipped
    updates alone give is the noise; its standard deviation is σ·S/M
    within 5% (the estimate's own error is about 1%)."""
    sigma, bound, rounds = 1.0, 0.1, 2500
    run = start(seed_server, {"rounds": rounds, "dp": {"noise_multiplier": sigma, "clip": bound}})
    assert run["status"] == "completed", run["error"]
    rounds_ = run["rounds"]  # (the /start reply holds every round; GET /runs/<id> pages them)
    assert len(rounds_) == rounds
    noise = []
    for record in rounds_:
        w, b = released_without_noise(record, bound, 2.0)
        noise += [record["global_model"]["w"] - w, record["global_model"]["b"] - b]
    expected = sigma * bound / 2.0
    assert abs(statistics.mean(noise)) < 5 * expected / math.sqrt(len(noise))
    assert statistics.pstdev(noise) == pytest.approx(expected, rel=0.05)
    assert rounds_[-1]["privacy"]["noise_std"] == pytest.approx(expected, rel=1e-12)


def test_clients_that_add_the_noise_add_sigma_s_over_root_m_each(seed_server):
    """local_noise: each client sends W_t + clip_S(W_k − W_t) + N(0, σ²S²/M),
    W_k its plain local GD (computed here); the server only sums."""
    sigma, bound, rounds = 1.0, 0.2, 1250
    run = start(seed_server, {"rounds": rounds, "dp": {"noise_multiplier": sigma, "clip": bound, "local_noise": True}})
    assert run["status"] == "completed", run["error"]
    noise = []
    assert len(run["rounds"]) == rounds
    for record in run["rounds"]:
        w_t, b_t = record["global_model_in"]["w"], record["global_model_in"]["b"]
        sent = {p["client_id"]: p["local_model"] for p in record["participants"]}
        for name, data in zip(("client_1", "client_2"), SEED_DATA):
            w_k, b_k = local_gd(data, w_t, b_t)
            dx, db = clip(w_k - w_t, b_k - b_t, bound)
            noise += [sent[name]["w"] - (w_t + dx), sent[name]["b"] - (b_t + db)]
        # the server adds nothing: W_t + Σ (sent − W_t) / M
        assert record["global_model"]["w"] == pytest.approx(w_t + sum(m["w"] - w_t for m in sent.values()) / 2,
                                                            abs=1e-12)
    assert statistics.pstdev(noise) == pytest.approx(sigma * bound / math.sqrt(2.0), rel=0.05)


def test_a_client_that_sends_a_huge_update_moves_the_model_by_at_most_s_over_m(tmp_path):
    """Ten clients, one of which ignores the clip and sends w = b = 1e12: with
    σ = 0 the release minus the honest clients' clipped updates is the
    attacker's part, of norm S/M at most (without DP it is 1e11)."""
    host = start_app("client_host", free_port(), ["--scenario", "byzantine", "--clients", "10", "--attackers", "1",
                                                  "--attack", "huge"])
    server = None
    try:
        wait_healthy([host])
        server = start_app("server", free_port(), ["--clients-from", host.url, "--db", str(tmp_path / "runs.db")])
        wait_healthy([server])
        bound, m = 0.5, 10.0
        run = start(server.url, {"rounds": 5, "dp": {"noise_multiplier": 0, "clip": bound}})
        assert run["status"] == "completed", run["error"]
        for record in run["rounds"]:
            w_t, b_t = record["global_model_in"]["w"], record["global_model_in"]["b"]
            honest = [p for p in record["participants"] if p["local_model"]["w"] < 1e6]
            assert len(honest) == 9
            sw = sum(clip(p["local_model"]["w"] - w_t, p["local_model"]["b"] - b_t, bound)[0] for p in honest)
            sb = sum(clip(p["local_model"]["w"] - w_t, p["local_model"]["b"] - b_t, bound)[1] for p in honest)
            attacker = math.hypot(record["global_model"]["w"] - w_t - sw / m,
                                  record["global_model"]["b"] - b_t - sb / m)
            assert attacker <= bound / m * (1 + 1e-9)
            assert attacker == pytest.approx(bound / m, rel=1e-6)  # it used all it may
        plain = start(server.url, {"rounds": 1})
        assert plain["rounds"][0]["global_model"]["w"] > 1e10  # the same attack without DP
    finally:
        stop([a for a in (server, host) if a is not None])


def test_adaptive_clipping_moves_s_by_andrew_et_al_s_formula(seed_server):
    """σ = 0 and σ_b = 0: no noise, so S_{t+1} = S_t·exp(−η(b_t − γ)) with
    b_t the share of the clients whose update, before they clipped it, was
    no longer than S_t (their local GD, computed here), exactly."""
    gamma, eta, start_bound = 0.5, 0.2, 0.05
    run = start(seed_server, {"rounds": 30, "dp": {"noise_multiplier": 0, "clip": start_bound, "adaptive": {
        "target_quantile": gamma, "lr": eta, "count_noise": 0}}})
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


def test_a_run_stops_before_the_round_that_would_pass_its_budget(seed_server):
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
    run = start(seed_server, {"rounds": 100, "dp": {"noise_multiplier": 2.0, "clip": 1.0, "target_epsilon": target}})
    assert run["status"] == "budget_exhausted"
    assert len(run["rounds"]) == allowed
    assert f"round {allowed + 1} would bring ε to {eps(allowed + 1):.4g}" in run["error"]
    for t, record in enumerate(run["rounds"], start=1):
        assert record["privacy"]["epsilon"] == pytest.approx(eps(t), rel=1e-9)
    status, body = post_json(f"{seed_server}/runs/{run['run_id']}/resume", {})
    assert status == 409  # more rounds would spend more than the budget


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
def test_dp_settings_out_of_range_are_a_400_naming_the_field(seed_server, dp, field):
    status, body = post_json(seed_server + "/start", {"dp": dp})
    assert status == 400 and field in named(body), body


@pytest.mark.parametrize("extra", [{"strategy": "scaffold"}, {"aggregator": "median"}, {"clip_norm": 1.0}])
def test_dp_with_what_it_cannot_bound_is_a_400(seed_server, extra):
    status, body = post_json(seed_server + "/start", {**extra, "dp": {"noise_multiplier": 1, "clip": 1}})
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


def test_make_privacy_tabulates_epsilon_against_accuracy(tmp_path):
    """scripts/privacy.py (what `make privacy` runs): one row per σ on each
    scenario, ε as dp-accounting gives it for q = 1 over the rounds run, and
    the no-DP row first."""
    import json
    import subprocess
    import sys

    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "privacy.py"), "--repeats", "2", "--sigmas", "0,2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert [(s["scenario"], s["clients"]) for s in report] == [("seed", 2), ("iid", 50)]
    for scenario in report:
        labels = [row["label"] for row in scenario["rows"]]
        assert labels == ["no DP", "σ = 0", "σ = 2"]
        accountant = RdpAccountant()
        accountant.compose(SelfComposedDpEvent(GaussianDpEvent(2.0), scenario["rounds"]))
        assert scenario["rows"][2]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert scenario["rows"][1]["epsilon"] is None  # σ = 0: ε = ∞
        assert len(scenario["rows"][2]["losses"]) == 2  # noisy settings are repeated
        assert f"{scenario['rows'][2]['epsilon']:.3g}" in done.stdout
