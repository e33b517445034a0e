"""The byzantine scenario: attackers that lie as they are named, against the
honest computation done here in plain Python (client host apps in this
process, and one real client host per attack); and make compare's runs
(``compare.main`` in this process) showing FedAvg's average wrecked by them
while the server's robust rules hold.

The data is the scenario's documented draw (iid's), regenerated here with
NumPy's generator; the training and the averages are tests/reference.py's
plain-Python loops, not the code under test."""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from test_compare import run_compare

from conftest import ROOT
from launcher import free_port, get_json, post_json, start_app, stop, wait_healthy
from reference import local_gd, local_mse

K, F, SAMPLES, SEED, ROUNDS = 10, 2, 20, 0, 50
ROBUST = ("median", "trimmed_mean", "krum")


def client_data(i: int, seed: int = SEED, n: int = SAMPLES) -> list[tuple[float, float]]:
    """Client i's rows (0-based), as the scenario's docstring says: iid's draw
    from the generator seeded [seed, i], x ~ U(0, 5), y = 2x + 1 + N(0, 0.1²)."""
    rng = np.random.default_rng([seed, i])
    x = rng.uniform(0.0, 5.0, size=n)
    y = 2.0 * x + 1.0 + rng.normal(0.0, 0.1, size=n)
    return [(float(a), float(b)) for a, b in zip(x, y)]


def honest_optimum() -> tuple[float, float]:
    """Least squares over the honest clients' rows (3..K) only: slope = cov/var."""
    rows = [p for i in range(F, K) for p in client_data(i)]
    mx = sum(x for x, _ in rows) / len(rows)
    my = sum(y for _, y in rows) / len(rows)
    slope = sum((x - mx) * (y - my) for x, y in rows) / sum((x - mx) ** 2 for x, _ in rows)
    return slope, my - slope * mx


def weighted_fedavg(shares: list[float], rounds: int = ROUNDS) -> tuple[float, float]:
    """FedAvg with every client's honest model and the given shares p_k: the
    global (w, b) after ``rounds`` rounds from (0, 0)."""
    data = [client_data(i) for i in range(K)]
    w = b = 0.0
    for _ in range(rounds):
        local = [local_gd(d, w, b) for d in data]
        w = sum(p * lw for p, (lw, _) in zip(shares, local))
        b = sum(p * lb for p, (_, lb) in zip(shares, local))
    return w, b


@pytest.fixture(scope="module")
def hosts():
    """One client host app per attack (K = 4, f = 2), in this process: the
    app the client host serves, over the byzantine scenario's clients, each
    driven through Flask's test client."""
    from fedavg.http.host_app import create_host_app
    from fedavg.scenarios import make_clients
    return {attack: create_host_app(make_clients("byzantine", 4, SEED, attack=attack)).test_client()
            for attack in ("scale", "sign_flip", "huge", "lying_n")}


def post(http, path: str, body: dict) -> tuple[int, dict]:
    reply = http.post(path, json=body)
    return reply.status_code, reply.get_json()


def expected_reply(attack: str):
    """What an attacker sends for one coordinate, from the global t and its honest k (the scenario's docstring)."""
    return {"scale": lambda t, k: t + 100 * (k - t), "sign_flip": lambda t, k: t - 10 * (k - t),
            "huge": lambda t, k: 1e12, "lying_n": lambda t, k: k}[attack]


@pytest.mark.parametrize("attack", ["scale", "sign_flip", "huge", "lying_n"])
def test_an_attacker_sends_what_its_attack_says_and_the_honest_clients_do_not(hosts, attack):
    http, expected = hosts[attack], expected_reply(attack)
    w_t, b_t = 0.7, -0.4
    body = {"global_model": {"w": w_t, "b": b_t}, "round": 3}
    for k in (1, 2):  # the attackers: honest training on honest rows, then the lie
        status, reply = post(http, f"/clients/{k}/train", body)
        assert status == 200, reply
        w_k, b_k = local_gd(client_data(k - 1), w_t, b_t)
        assert reply["client_id"] == f"attacker_{k}"
        assert reply["local_model"]["w"] == pytest.approx(expected(w_t, w_k), rel=1e-12, abs=1e-12)
        assert reply["local_model"]["b"] == pytest.approx(expected(b_t, b_k), rel=1e-12, abs=1e-12)
        n_k = 10**9 if attack == "lying_n" else SAMPLES
        assert reply["data_size"] == n_k
        health = http.get(f"/clients/{k}/health").get_json()
        assert (health["client_id"], health["data_size"]) == (f"attacker_{k}", n_k)
        # its losses are honest: the MSE of the model asked about on its own rows
        status, evaluated = post(http, f"/clients/{k}/evaluate", body)
        assert status == 200 and evaluated["data_size"] == n_k
        assert evaluated["loss"] == pytest.approx(local_mse(client_data(k - 1), w_t, b_t), rel=1e-12)
    for k in (3, 4):  # the others are the iid clients they would be without the attack
        status, reply = post(http, f"/clients/{k}/train", body)
        w_k, b_k = local_gd(client_data(k - 1), w_t, b_t)
        assert status == 200 and reply["client_id"] == f"sim_{k}" and reply["data_size"] == SAMPLES
        assert (reply["local_model"]["w"], reply["local_model"]["b"]) == pytest.approx((w_k, b_k), abs=1e-12)


@pytest.mark.system
def test_the_client_host_serves_each_attack_over_http_and_names_it_in_health():
    """`client_host_app.py --scenario byzantine --attack KIND`, started as the
    README starts apps: its /health names the attack, and an attacker's
    /train over HTTP is the lie against plain-Python local GD."""
    apps = {}
    try:
        for attack in ("scale", "sign_flip", "huge", "lying_n"):
            apps[attack] = start_app("client_host", free_port(), ["--scenario", "byzantine", "--clients", "4",
                                                                  "--attack", attack, "--seed", str(SEED)])
        wait_healthy(list(apps.values()))
        w_t, b_t = 0.7, -0.4
        w_k, b_k = local_gd(client_data(0), w_t, b_t)
        for attack, app in apps.items():
            scenario = get_json(app.url + "/health")["scenario"]
            assert scenario.startswith("byzantine:") and f"2 attacker(s), attack {attack}" in scenario
            status, reply = post_json(f"{app.url}/clients/1/train", {"global_model": {"w": w_t, "b": b_t},
                                                                     "round": 3}, timeout_s=30)
            expected = expected_reply(attack)
            assert status == 200 and reply["client_id"] == "attacker_1", reply
            assert reply["local_model"]["w"] == pytest.approx(expected(w_t, w_k), rel=1e-12, abs=1e-12)
            assert reply["local_model"]["b"] == pytest.approx(expected(b_t, b_k), rel=1e-12, abs=1e-12)
    finally:
        stop(list(apps.values()))


def test_the_scenario_is_iid_with_its_first_f_clients_renamed_and_reproducible():
    from fedavg.scenarios import Attacker, honest, make_clients
    a, b = make_clients("byzantine", 6, seed=4, attackers=3, attack="scale"), make_clients("byzantine", 6, seed=4,
                                                                                          attackers=3)
    iid = make_clients("iid", 6, seed=4)
    assert [c.client_id for c in a] == ["attacker_1", "attacker_2", "attacker_3", "sim_4", "sim_5", "sim_6"]
    assert [c.attack for c in a[:3]] == ["scale"] * 3 and [c.attack for c in b[:3]] == ["huge"] * 3
    for i, (x, y, z) in enumerate(zip(a, b, iid)):
        np.testing.assert_array_equal(x.X, z.X)
        np.testing.assert_array_equal(y.y, z.y)
        assert [(float(u), float(v)) for u, v in zip(x.X[:, 0], x.y)] == client_data(i, seed=4)
    assert [c.client_id for c in honest(a)] == ["sim_4", "sim_5", "sim_6"]
    assert all(isinstance(c, Attacker) for c in a[:3])
    with pytest.raises(ValueError, match="unknown attack"):
        make_clients("byzantine", 4, attack="nope")
    with pytest.raises(ValueError, match="attackers must be 0..K=4"):
        make_clients("byzantine", 4, attackers=5)


@pytest.mark.system
def test_the_client_host_refuses_an_attack_without_the_byzantine_scenario():
    host = subprocess.run([str(ROOT / "client_host" / ".venv" / "bin" / "python"), "client_host_app.py",
                           "--scenario", "iid", "--attack", "huge"], cwd=ROOT / "client_host",
                          capture_output=True, text=True, timeout=60)
    assert host.returncode == 2 and "--attack are for --scenario byzantine, not iid" in host.stderr


# --- make compare against the attackers (needs the server's robust settings) --------

def test_compare_refuses_an_attack_without_the_byzantine_scenario(tmp_path, capsys):
    code, _, stderr = run_compare(capsys, "--scenario", "iid", "--attackers", "1", "--out", str(tmp_path / "out"))
    assert code == 2 and "for --scenario byzantine, not iid" in stderr
    assert not (tmp_path / "out").exists()


def results_of(out) -> tuple[dict, dict]:
    report = json.loads((out / "compare.json").read_text())
    return report, {r["label"]: r for r in report["results"]}


def test_compare_huge_wrecks_the_average_and_each_robust_rule_holds(tmp_path, capsys):
    """`make compare SCENARIO=byzantine STRATEGIES=fedavg ROUNDS=50 COMPARE_ARGS="--aggregators
    mean,median,trimmed_mean,krum --attack huge"`."""
    out = tmp_path / "out"
    code, stdout, stderr = run_compare(capsys, "--scenario", "byzantine", "--strategies", "fedavg",
                                       "--rounds", str(ROUNDS), "--out", str(out),
                                       "--aggregators", "mean,median,trimmed_mean,krum", "--attack", "huge")
    assert code == 0, stdout + stderr
    report, rows = results_of(out)
    optimum = honest_optimum()
    assert report["pooled_optimum"] == pytest.approx(list(optimum), abs=1e-10)
    assert report["optimum_over"] == [f"sim_{k}" for k in range(3, K + 1)]
    assert report["settings"]["attackers"] == ["attacker_1", "attacker_2"]
    assert report["settings"]["told"] == {"trimmed_mean": {"trim": 0.2}, "krum": {"byzantine": 2}}
    assert list(rows) == ["fedavg+mean", "fedavg+median", "fedavg+trimmed_mean", "fedavg+krum"]
    assert all(r["status"] == "completed" and r["rounds_done"] == ROUNDS for r in rows.values())
    assert rows["fedavg+mean"]["final_distance"] > 1e3
    for rule in ROBUST:
        row = rows[f"fedavg+{rule}"]
        final = (row["final_model"]["w"], row["final_model"]["b"])
        assert math.dist(final, optimum) == pytest.approx(row["final_distance"], abs=1e-12)
        assert row["final_distance"] < 0.5, rule
        # the server names the two in every round's record: their update is ~10^12 long
        assert all({"attacker_1", "attacker_2"} <= set(flagged) for flagged in row["suspicious"]), rule
    lines = stdout.splitlines()
    assert any(line.startswith("fedavg+trimmed_mean ") for line in lines)
    assert "θ* is the least squares over the 8 honest clients' rows only" in stdout
    ids = (out / "compare.svg").read_text()
    for label in rows:
        assert f'id="strategy-{label}"' in ids


@pytest.mark.parametrize("attack", ["scale", "sign_flip"])
def test_compare_an_update_scaled_or_reversed_runs_the_mean_away_and_it_is_named(tmp_path, capsys, attack):
    """`--attack scale` (W_t + 100·(W_k − W_t)) and `sign_flip` (W_t −
    10·(W_k − W_t)) under the mean grow the model by a steady factor a round:
    the run ends diverged within a few rounds, naming the attackers' updates
    (not the lr, as a client's overflowing training once made it), while each
    robust rule completes near θ*. (Before, `sign_flip` completed 8.6e62 from
    θ*, and `scale` ran 125 rounds to 1e154 and blamed lr=0.01.)"""
    out = tmp_path / "out"
    code, stdout, stderr = run_compare(capsys, "--scenario", "byzantine", "--strategies", "fedavg",
                                       "--rounds", str(ROUNDS), "--out", str(out),
                                       "--aggregators", "mean,median,trimmed_mean,krum", "--attack", attack)
    assert code == 0, stdout + stderr
    _, rows = results_of(out)
    mean = rows["fedavg+mean"]
    assert mean["status"] == "diverged" and mean["rounds_done"] < 10, mean
    assert "the global model is running away" in mean["error"] and "attacker_1 (update norm" in mean["error"]
    assert "an outlier, not the lr" in mean["error"] and "lr=0.01 is too large" not in mean["error"]
    for rule in ROBUST:
        row = rows[f"fedavg+{rule}"]
        assert row["status"] == "completed" and row["final_distance"] < 0.5, (rule, row)


def test_compare_lying_n_owns_the_average_and_max_weight_caps_it(tmp_path, capsys):
    """An honest model with n_k = 10^9: on iid data the liars' own models are
    not far from θ*, so the harm is that two clients' 40 rows decide the
    model (the honest eight keep a share of 8·10⁻⁸). Both runs are checked
    against FedAvg with those shares computed here; max_weight = 0.2 gives
    the liars 0.2 each and the eight 0.6 in proportion to n_k."""
    lie = tmp_path / "lie"
    code, stdout, stderr = run_compare(capsys, "--scenario", "byzantine", "--strategies", "fedavg",
                                       "--rounds", str(ROUNDS), "--aggregators", "mean,median,trimmed_mean,krum",
                                       "--attack", "lying_n", "--out", str(lie))
    assert code == 0, stdout + stderr
    capped_out = tmp_path / "capped"
    code, stdout, stderr = run_compare(capsys, "--scenario", "byzantine", "--strategies", "fedavg",
                                       "--rounds", str(ROUNDS), "--aggregators", "mean", "--attack", "lying_n",
                                       "--param", "mean.max_weight=0.2", "--out", str(capped_out))
    assert code == 0, stdout + stderr
    report, rows = results_of(lie)
    _, capped_rows = results_of(capped_out)
    optimum = honest_optimum()
    assert report["pooled_optimum"] == pytest.approx(list(optimum), abs=1e-10)

    total = 2 * 10**9 + (K - F) * SAMPLES
    owned = weighted_fedavg([10**9 / total] * F + [SAMPLES / total] * (K - F))
    liars_alone = weighted_fedavg([0.5] * F + [0.0] * (K - F))
    held = weighted_fedavg([0.2] * F + [0.6 / (K - F)] * (K - F))
    mean = rows["fedavg+mean"]["final_model"]
    assert (mean["w"], mean["b"]) == pytest.approx(owned, abs=1e-9)
    assert math.dist(owned, liars_alone) < 1e-6  # the liars' model, to six digits
    cap = capped_rows["fedavg+mean"]
    assert cap["status"] == "completed"
    assert (cap["final_model"]["w"], cap["final_model"]["b"]) == pytest.approx(held, abs=1e-9)
    for rule in ROBUST:  # n_k buys no vote in a rule that ignores it
        assert rows[f"fedavg+{rule}"]["status"] == "completed"
        assert rows[f"fedavg+{rule}"]["final_distance"] < 0.5, rule
