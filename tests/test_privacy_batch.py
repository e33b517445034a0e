"""DP-FedAvg through the batched host protocol, in this process: the server
calls a client host once a round (POST /batch/train) for all its sampled
clients, and the host clips each client's update and, under local_noise,
draws each client's share of the noise.

Where the run is deterministic (σ = 0, the Poisson sample drawn from a
seeded stand-in for the system's entropy, the same on both paths), every DP
setting gives the same rounds through /batch/train as client by client:
each clipped update and clip bit to 1e-12, every global model, S and its
adaptation, ε. With noise, each client's share drawn on the host has the
distribution the config asks for, N(0, s²) on every coordinate, checked
against a plain-Python normal CDF with bounds that a wrong s fails and the
right one passes with negligible probability. The privacy tests of
``test_privacy.py`` that read the wire run on both paths too (its
``batched`` fixture)."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from test_batch import HOST, assert_same_run, calls

from fedavg.http.host_app import create_host_app
from fedavg.population import Population
from fedavg.scenarios import make_clients
from fedavg_server import sampling
from fedavg_server.collect import BatchedCollector, Bodies, PlainCollector
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.roster import Roster
from fedavg_server.run import pipeline
from fedavg_server.settings import parse_start

K = 12


def same_sample(monkeypatch, seed: int = 11) -> None:
    """DP's Poisson sample from a seeded generator instead of the system's entropy (u_k < q per client,
    as ``poisson_mask`` draws it), restarted by each call: two runs then sample the same clients."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(sampling, "poisson_mask", lambda k, q: rng.random(k) < q)


def both_paths(servers, monkeypatch, **settings) -> tuple[dict, dict, object, object]:
    """The same DP run on two copies of one host's clients, batched and per client, with the same
    Poisson samples: (batched run, per-client run, batched host, per-client host)."""
    runs, hosts = [], []
    for batched in (True, False):
        same_sample(monkeypatch)
        host = create_host_app(make_clients("quantity-skew", K, 3))
        runs.append(servers(InProcessTransport.hosted(host, K, HOST), BATCHED=batched).run(
            **{"rounds": 4, "seed": 5, **settings}))
        hosts.append(host)
    return (*runs, *hosts)


def assert_same_privacy(a: dict, b: dict) -> None:
    """Each round's privacy record (ε, S, the noise, adaptive clipping's share and next S) alike to 1e-12."""
    for ra, rb in zip(a["rounds"], b["rounds"]):
        pa, pb = ra["privacy"], rb["privacy"]
        assert pa.keys() == pb.keys()
        for key, value in pa.items():
            assert value == (pytest.approx(pb[key], rel=1e-12, abs=1e-15) if isinstance(value, float) else pb[key]), key


DP_SETTINGS = {
    "clip": {"noise_multiplier": 0, "clip": 0.5},
    "no-clip": {"noise_multiplier": 0, "clip": None},
    "local-noise": {"noise_multiplier": 0, "clip": 0.5, "local_noise": True},
    "adaptive": {"noise_multiplier": 0, "clip": 0.05, "adaptive": {"count_noise": 0, "lr": 0.2}},
}


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("dp", list(DP_SETTINGS.values()), ids=list(DP_SETTINGS))
def test_every_dp_setting_batched_equals_per_client(servers, monkeypatch, dp, fraction):
    """σ = 0: every round's global model, who took part, S and its adaptation alike to 1e-12, the
    host called once a round for all its sampled clients (none when the sample is empty)."""
    batched, per_client, host_b, host_p = both_paths(servers, monkeypatch, dp=dp, fraction=fraction)
    assert batched["status"] == "completed", batched["error"]
    assert_same_run(batched, per_client)
    assert_same_privacy(batched, per_client)
    took_part = [len(r["participants"]) for r in batched["rounds"]]
    assert calls(host_b) == {"batch_train": sum(n > 0 for n in took_part), "train": 0}
    assert calls(host_p) == {"batch_train": 0, "train": sum(took_part)}
    if fraction < 1:
        assert min(took_part) < K  # the sample was a sample


def test_the_budget_and_epsilon_are_the_same_on_both_paths(servers, monkeypatch):
    """With noise (σ = 2) the models differ, but what the accountant counts does not: ε after each
    round, and the round the budget stops the run before."""
    from fedavg_server.accountant import epsilon

    dp = {"noise_multiplier": 2.0, "clip": 1.0, "target_epsilon": 6.0}
    batched, per_client, host_b, _ = both_paths(servers, monkeypatch, rounds=100, dp=dp, fraction=0.5)
    assert batched["status"] == per_client["status"] == "budget_exhausted"
    assert batched["error"] == per_client["error"]
    assert [r["privacy"]["epsilon"] for r in batched["rounds"]] == \
           [r["privacy"]["epsilon"] for r in per_client["rounds"]] == \
           [pytest.approx(epsilon(0.5, 2.0, t, 1e-5), rel=1e-12) for t in range(1, len(batched["rounds"]) + 1)]
    assert calls(host_b)["train"] == 0


def collectors(host, k: int) -> tuple[BatchedCollector, PlainCollector]:
    """A DP run's collector over a host's k clients (its roster probed), batched and per client."""
    transport = InProcessTransport.hosted(host, k, HOST)
    settings, _ = parse_start({"dp": {"noise_multiplier": 1.0, "clip": 1.0}}, k)
    made = []
    for batched in (True, False):
        roster = Roster(transport)
        strategy, _, collector, _ = pipeline(settings, roster, 1, "run", batched)
        roster.probe(type(strategy), False, 5.0)
        made.append(collector)
    assert isinstance(made[0], BatchedCollector) and type(made[1]) is PlainCollector
    return made[0], made[1]


def dp_body(clip: float, noise_std: float) -> Bodies:
    """Round 1's /train bodies from W_t = (0.3, −0.2) with DP's clip and noise share (every seed 0)."""
    return Bodies({"global_model": {"w": 0.3, "b": -0.2}, "round": 1},
                  lambda seed: {"lr": 0.05, "local_epochs": 10, "seed": seed,
                                "dp": {"clip": clip, "noise_std": noise_std}}, defaultdict(int))


@pytest.mark.parametrize("noise_std", [0.0, 0.1], ids=["clip-only", "own-noise"])
def test_each_clients_clipped_update_and_bit_batched_equal_its_own_train(noise_std):
    """Row by row against the client's own /train: W_t + clip_S(W_k − W_t) to 1e-12, n_k, the loss
    before, and the clip bit (‖W_k − W_t‖ ≤ S) exactly, sent only when the client adds no noise.
    S = 1.98 clips about half of the 40 clients' updates (1.94 to 2.03 long). With noise the rows differ by it: only the
    bit's absence is compared."""
    host = create_host_app(make_clients("quantity-skew", 40, 3))
    batched, plain = collectors(host, 40)
    sample = plain.roster.urls
    theta = np.array([0.3, -0.2])
    a = batched.collect(1, theta, sample, dp_body(1.98, noise_std))
    b = plain.collect(1, theta, sample, dp_body(1.98, noise_std))
    assert calls(host) == {"batch_train": 1, "train": 40}
    assert [(x.url, x.n) for x in a.results] == [(x.url, x.n) for x in b.results] and len(a.results) == 40
    for x, y in zip(a.results, b.results):
        assert x.metrics["loss_before"] == pytest.approx(y.metrics["loss_before"], rel=1e-12)
        assert ("within_clip" in x.metrics) == ("within_clip" in y.metrics) == (noise_std == 0)
        if noise_std == 0:
            np.testing.assert_allclose(x.theta, y.theta, rtol=1e-12, atol=1e-12)
            assert x.metrics["within_clip"] == y.metrics["within_clip"]
    if noise_std == 0:
        bits = [x.metrics["within_clip"] for x in a.results]
        assert 0 < sum(bits) < 40  # the clip was at work on some updates, not all
        assert all(np.linalg.norm(x.theta - theta) <= 1.98 * (1 + 1e-12) for x in a.results)


def normal_cdf(x: float, std: float) -> float:
    return 0.5 * (1.0 + math.erf(x / (std * math.sqrt(2.0))))


def test_each_clients_noise_share_is_drawn_on_the_host_as_asked():
    """local_noise through /batch/train, 10,000 clients of a population, s = 0.05: each row minus
    the same row without noise (which the test above shows is the client's own clipped update) is
    that client's share, 20,000 draws. Against N(0, s²) in plain Python: the mean within 6 standard
    errors of 0, the standard deviation within 3% of s (its estimate's error is 0.5%: 6 of those;
    s·√2 or s/√2, a share sized on the wrong n, is 41% off), the largest gap between the draws'
    CDF and Φ(x/s) below 0.025 (Kolmogorov–Smirnov: P(D > 0.025) ≤ 2·exp(−2·N·0.025²) ≈ 3·10⁻¹¹
    when the noise is right; uniform or Laplace noise of the same std is about 0.04 away), the two
    coordinates uncorrelated, and a second call with the same body (the same run seed) drawing
    other noise: the host's entropy, never the run's seed."""
    k, s = 10_000, 0.05
    host = create_host_app(None, population=Population.build("iid", k, seed=1))
    batched, _ = collectors(host, k)
    sample, theta = batched.plain.roster.urls, np.array([0.3, -0.2])
    clean = np.array([x.theta for x in batched.collect(1, theta, sample, dp_body(0.5, 0.0)).results])
    noisy = np.array([x.theta for x in batched.collect(1, theta, sample, dp_body(0.5, s)).results])
    again = np.array([x.theta for x in batched.collect(1, theta, sample, dp_body(0.5, s)).results])
    assert calls(host) == {"batch_train": 3, "train": 0}
    noise = (noisy - clean).ravel().tolist()
    n = len(noise)
    assert n == 2 * k
    mean = sum(noise) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in noise) / n)
    assert abs(mean) < 6 * s / math.sqrt(n)
    assert std == pytest.approx(s, rel=0.03)
    ordered = sorted(noise)
    gap = max(max(abs((i + 1) / n - normal_cdf(x, s)), abs(i / n - normal_cdf(x, s))) for i, x in enumerate(ordered))
    assert gap < 0.025
    w, b = (noisy - clean)[:, 0].tolist(), (noisy - clean)[:, 1].tolist()
    corr = sum(x * y for x, y in zip(w, b)) / (k * s * s)
    assert abs(corr) < 6 / math.sqrt(k)
    assert not np.allclose(again, noisy)


def composed_epsilon(q: float, sigma: float, rounds: int, delta: float = 1e-5) -> float:
    """ε after T rounds from dp-accounting itself: its RDP accountant composing the sampled Gaussian T times."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("local_noise", [False, True], ids=["server-noise", "clients-noise"])
def test_a_population_sampled_at_q_one_percent_is_one_batched_call_a_round_and_reports_epsilon(servers,
                                                                                            local_noise):
    """2,000 clients of a population on one host, Poisson q = 0.01 (M = 20), σ = 1, 12 rounds: each
    round's sample goes to the host in one /batch/train; the round's clients number
    Binomial(2000, 0.01) (all 12 rounds' within 6 standard deviations of 240); each round reports ε
    after t rounds as dp-accounting composes it (1.2 after 100 rounds at q = 0.01, where q = 1 gives 19
    after 10), the noise σ·S/M and M; under local_noise each sampled client's share is sized on that
    round's sample."""
    k, q, sigma, bound, rounds = 2000, 0.01, 1.0, 0.5, 12
    host = create_host_app(None, population=Population.build("iid", k, seed=3))
    run = servers(InProcessTransport.hosted(host, k, HOST)).run(
        rounds=rounds, fraction=q, dp={"noise_multiplier": sigma, "clip": bound, "local_noise": local_noise})
    assert run["status"] == "completed", run["error"]
    took_part = [len(r["participants"]) for r in run["rounds"]]
    assert len(took_part) == rounds
    assert abs(sum(took_part) - rounds * k * q) < 6 * math.sqrt(rounds * k * q * (1 - q))
    assert calls(host) == {"batch_train": sum(n > 0 for n in took_part), "train": 0}
    for t, record in enumerate(run["rounds"], start=1):
        privacy = record["privacy"]
        assert privacy["epsilon"] == pytest.approx(composed_epsilon(q, sigma, t), rel=1e-9)
        assert privacy["expected_clients"] == pytest.approx(k * q, rel=1e-12)
        assert privacy["noise_std"] == pytest.approx(sigma * bound / (k * q), rel=1e-12)
        if local_noise:
            assert (privacy["sampled"], privacy["noise_shares_in_sum"]) == (took_part[t - 1], took_part[t - 1])
            assert privacy["server_noise_share"] == (1.0 if took_part[t - 1] == 0 else 0.0)
