"""Robust rules as run settings, in this process: five honest clients on a
client host and one that always sends w = b = 10^6, the server driven
through its API. Every round's global model is checked against the rule
computed here in plain Python from the round's own local models."""
from __future__ import annotations

import math

import pytest
from flask import Flask, request

from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from form_html import form_choice

HUGE = 1e6
# Never dialled: the in-process transport hands these URLs to the apps.
HOST = "http://127.0.0.1:6000"  # the client host's default address
LIAR = "http://127.0.0.1:6001"


@pytest.fixture(scope="module")
def host() -> dict[str, Flask]:
    """A client host's five clients (scenario iid, the host's defaults:
    seed 0, 20 samples each), url → the host app that answers it."""
    app = create_host_app(make_clients("iid", 5), None)
    return {f"{HOST}/clients/{k}": app for k in range(1, 6)}


def liar(n: int = 20) -> Flask:
    app = Flask("liar")

    @app.get("/health")
    def health():
        return {"status": "ok", "client_id": "liar", "data_size": n, "num_features": 1,
                "strategies": ["fedavg", "fedsgd", "fedprox", "scaffold", "fedavgm", "fedadam", "fednova"]}

    @app.post("/train")
    def train():
        asked = (request.get_json().get("config") or {}).get("strategy", "fedavg")
        return {"local_model": {"w": HUGE, "b": HUGE}, "data_size": n, "client_id": "liar", "strategy": asked}

    @app.post("/evaluate")
    def evaluate():
        return {"loss": 1.0, "data_size": n, "client_id": "liar"}

    return app


@pytest.fixture
def server(host, servers):
    """The five honest clients and the liar."""
    return servers({**host, LIAR: liar()})


def run(server, **settings) -> dict:
    body = server.run(**{"rounds": 4, "seed": 2, **settings})
    assert body["status"] == "completed", body["error"]
    return body


def locals_of(record: dict) -> list[list[float]]:
    return [[p["local_model"]["w"], p["local_model"]["b"]] for p in record["participants"]]


def median(xs: list[float]) -> float:
    s, m = sorted(xs), len(xs) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def close(a, b, tol=1e-9) -> bool:
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def global_of(record: dict) -> list[float]:
    return [record["global_model"]["w"], record["global_model"]["b"]]


def test_plain_fedavg_is_pulled_away_by_one_liar(server):
    rounds = run(server)["rounds"]
    assert global_of(rounds[-1])[0] > HUGE / 10  # one of six clients owns the average
    assert [x["client_id"] for x in rounds[0]["suspicious"]] == ["liar"]


def test_median_is_each_coordinates_median_and_holds(server):
    body = run(server, aggregator="median")
    for record in body["rounds"]:
        vs = locals_of(record)
        assert close(global_of(record), [median([v[j] for v in vs]) for j in (0, 1)])
        assert "median of the 6 clients' values" in record["math"][0]
    assert abs(global_of(body["rounds"][-1])[0]) < 10


def test_trimmed_mean_drops_the_extremes(server):
    body = run(server, aggregator="trimmed_mean", trim=0.2)
    for record in body["rounds"]:
        vs = locals_of(record)
        want = []
        for j in (0, 1):
            kept = sorted(v[j] for v in vs)[1:-1]  # ⌊0.2·6⌋ = 1 from each end
            want.append(sum(kept) / len(kept))
        assert close(global_of(record), want)
    assert abs(global_of(body["rounds"][-1])[0]) < 10


def test_krum_picks_the_vector_nearest_its_neighbours(server):
    body = run(server, aggregator="krum", byzantine=1, krum_m=2)
    for record in body["rounds"]:
        vs = locals_of(record)
        scores = []
        for i, v in enumerate(vs):
            d = sorted(sum((a - b) ** 2 for a, b in zip(v, u)) for j, u in enumerate(vs) if j != i)
            scores.append(sum(d[: len(vs) - 1 - 2]))
        best = sorted(range(len(vs)), key=lambda i: scores[i])[:2]
        assert close(global_of(record), [sum(vs[i][j] for i in best) / 2 for j in (0, 1)])
        assert "liar" not in [record["participants"][i]["client_id"] for i in best]


def test_clipping_bounds_the_liars_pull(server):
    body = run(server, clip_norm=1.0)
    theta = [0.0, 0.0]
    for record in body["rounds"]:
        ns = [p["data_size"] for p in record["participants"]]
        total = sum(ns)
        want = [0.0, 0.0]
        for v, n in zip(locals_of(record), ns):
            d = [v[0] - theta[0], v[1] - theta[1]]
            norm = math.hypot(*d)
            scale = min(1.0, 1.0 / norm) if norm else 1.0
            want = [want[j] + n / total * (theta[j] + scale * d[j]) for j in (0, 1)]
        assert close(global_of(record), want)
        theta = global_of(record)


def test_max_weight_caps_a_lying_sample_count(host, servers):
    boaster = Flask("boaster")  # an honest-looking model, but n_k = 10^9

    @boaster.get("/health")
    def health():
        return {"status": "ok", "client_id": "boaster", "data_size": 10**9, "num_features": 1}

    @boaster.post("/train")
    def train():
        return {"local_model": {"w": 50.0, "b": 50.0}, "data_size": 10**9, "client_id": "boaster"}

    server = servers({**host, LIAR: boaster})
    plain = server.run(rounds=1, seed=2)["rounds"][0]
    assert global_of(plain)[0] == pytest.approx(50.0, abs=1e-3)  # 10^9 samples own the average
    capped = server.run(rounds=1, seed=2, max_weight=0.2)["rounds"][0]
    ns = [p["data_size"] for p in capped["participants"]]
    # water-filling by hand: the boaster's share is the cap, the rest split by n_k
    others = sum(n for n in ns if n != 10**9)
    p = [0.2 if n == 10**9 else 0.8 * n / others for n in ns]
    assert close(global_of(capped), [sum(pk * v[j] for pk, v in zip(p, locals_of(capped))) for j in (0, 1)])


@pytest.mark.parametrize("body, words", [
    ({"aggregator": "mode"}, ["aggregator", "known: mean, median, trimmed_mean, krum"]),
    ({"aggregator": "median", "trim": 0.1}, ["trim", "aggregator trimmed_mean"]),
    ({"aggregator": "trimmed_mean", "trim": 0.5}, ["trim", "< 0.5"]),
    ({"aggregator": "krum", "byzantine": 9}, ["byzantine", "K ≥ 2f + 3", "at most 1, got 9"]),
    ({"clip_norm": 0}, ["clip_norm", "> 0"]),
    ({"max_weight": 1.5}, ["max_weight", "<= 1"]),
    ({"aggregator": "median", "max_weight": 0.5}, ["max_weight", "aggregator mean"]),
    ({"strategy": "exact", "aggregator": "median"}, ["aggregator", "exact"]),
])
def test_robust_settings_out_of_place_are_a_400_naming_the_field(server, body, words):
    status, answer = server.post("/start", body)
    assert status == 400
    assert all(w in answer["error"] for w in words), answer


def test_krum_takes_no_more_attackers_than_blanchards_bound(federation):
    """Krum is proved to hold f attackers among K ≥ 2f + 3 clients (Blanchard
    et al., 2017): f ≤ ⌊(K − 3)/2⌋ = 3 of K = 10. The 10¹² of two attackers
    that agree: f = 3 holds them, f = 4 to 7 was accepted and f = 7 ended at
    10¹², so f = 4 is now a 400 naming byzantine, and its default f = 1 with
    K = 4 too."""
    ten = federation(make_clients("byzantine", 10, attackers=2))
    held = ten.run(rounds=3, seed=2, aggregator="krum", byzantine=3)
    assert held["status"] == "completed" and max(map(abs, global_of(held["rounds"][-1]))) < 10
    for f in (4, 7):
        status, answer = ten.post("/start", {"rounds": 3, "seed": 2, "aggregator": "krum", "byzantine": f})
        assert status == 400 and answer["error"].startswith("byzantine: "), answer
        assert f"this server has 10, so byzantine is at most 3, got {f}" in answer["error"], answer
    status, answer = federation(make_clients("iid", 4)).post("/start", {"aggregator": "krum"})
    assert status == 400 and answer["error"].startswith("byzantine: ") and "at most 0, got 1 (its default)" in \
        answer["error"], answer


def test_robust_rules_work_under_other_strategies_too(server):
    body = run(server, strategy="fedadam", aggregator="median", rounds=3)
    assert all("avg_w = median of the 6 clients' values" in r["math"][0] for r in body["rounds"])
    assert abs(global_of(body["rounds"][-1])[0]) < 10


def test_the_pages_form_offers_every_rule_with_its_summary_and_its_own_settings(server):
    """Issue 19: /start took "aggregator" and the page's form had no field for it. Every
    registered rule is an option with its whole summary (the line under the select and
    each option's tooltip), the weighted mean chosen; a rule's own settings are inputs in
    its fieldset alone, with Combine's defaults, enabled only for the chosen rule."""
    from fedavg.strategies import RULES, Combine

    form = form_choice(server.http.get("/").get_data(as_text=True), "aggregator")
    assert [(o["value"], o["summary"], o["title"]) for o in form.options] == \
        [(name, rule.summary, rule.summary) for name, rule in RULES.items()]
    assert [o["value"] for o in form.options if o["selected"]] == ["mean"]
    assert form.summary == RULES["mean"].summary
    # A rule's own settings (the others, clip_norm, apply to any rule and are not its own):
    # an unset max_weight is empty, so an untouched form sends none.
    assert form.settings == {"mean": {"max_weight": ""}, "trimmed_mean": {"trim": f"{Combine.trim:g}"},
                             "krum": {"byzantine": str(Combine.byzantine), "krum_m": str(Combine.krum_m)}}
    assert form.disabled == {"trimmed_mean", "krum"}
