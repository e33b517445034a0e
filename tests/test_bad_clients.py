"""Clients that misbehave: each is dropped from the round with its reason,
and the average is taken over the clients that replied well. What only a
network can do (a client that hangs or trickles, a reply cut off at 1 MiB
while it is read, more hung clients than connections) runs over real HTTP on
loopback ports; a reply that is wrong in what it says, and the federation's
verdicts (divergence, outliers, names in the CSV), run the same client apps
in this process (``InProcessTransport``: the same bytes read by the same
``reply_from``, tests/test_transport.py), without a socket's cost."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import threading
import time

import numpy as np
import pytest
from flask import Flask, Response, request

from conftest import ROOT, Served
from fedavg.client import LocalClient
from fedavg.http.client_app import create_app as create_client_app
from fedavg.http.host_app import create_host_app
from fedavg_server import create_app as create_server_app
from fedavg_server.http_transport import HttpTransport, wave_limit
from fedavg_server.runs import run_to_csv
from reference import SEED_DATA, local_gd, local_mse, reference_fedavg

# Where the in-process clients answer: names only, no socket behind them.
GOOD, OTHER = "http://127.0.0.1:5001", "http://127.0.0.1:5002"
# What needs a network to misbehave: a call that never ends, and a reply
# the server stops reading at 1 MiB.
OVER_HTTP = ("hang", "flood")

release = threading.Event()  # lets the hanging fake go when the test ends


def fake_client(behaviour: str) -> Flask:
    """A client that answers /train (and /health) wrongly in one way."""
    app = Flask(f"fake-{behaviour}")
    bodies = {
        "nan": '{"local_model": {"w": NaN, "b": 0}, "data_size": 2}',
        "huge": '{"local_model": {"w": 1e999, "b": 0}, "data_size": 2}',
        "garbage": "<html>hello</html>",
        "wrong_dim": '{"local_model": {"w": [1, 2], "b": 0}, "data_size": 2}',
        "negative_n": '{"local_model": {"w": 1, "b": 0}, "data_size": -2}',
        "bool_n": '{"local_model": {"w": 1, "b": 0}, "data_size": true}',
        "no_model": '{"data_size": 2}',
        "list_body": "[1, 2]",
        "lying_n": '{"local_model": {"w": 1, "b": 0}, "data_size": 1000, "client_id": "liar"}',
        "huge_n": '{"local_model": {"w": 1, "b": 0}, "data_size": 1' + "0" * 309 + '}',
        # 2 MiB of numbers: the server stops reading at its 1 MiB cap, before parsing
        "flood": '{"local_model": {"w": 1, "b": 0}, "data_size": 2, "pad": [' + ",".join(["1.5"] * 520_000) + ']}',
        "twice": '{"local_model": {"w": 1, "b": 0}, "data_size": 2, "data_size": 1}',
    }

    @app.get("/health")
    def health():
        if behaviour == "lying_n":
            return {"status": "ok", "client_id": "liar", "data_size": 2, "num_features": 1}
        return {"error": "no health here"}, 404

    @app.post("/train")
    def train():
        if behaviour == "hang":
            release.wait(10)  # far past the server's client_timeout_s
            return {"local_model": {"w": 1, "b": 0}, "data_size": 2}
        if behaviour == "http_500":
            return Response("boom", status=500)
        return Response(bodies[behaviour], mimetype="application/json")

    return app


def seed_client(name: str, client_id: str | None = None) -> Flask:
    return create_client_app({"CLIENT_ID": client_id or name, "DATA_PATH": str(ROOT / name / "data.csv"),
                              "TOKEN": None})


@pytest.fixture(scope="module")
def good_client():
    served = Served(seed_client("client_1"))
    yield served
    served.close()


@pytest.fixture
def run_with(good_client, servers):
    served: list[Served] = []

    def run(behaviour: str, **settings):
        if behaviour in OVER_HTTP:
            fake = Served(fake_client(behaviour))
            served.append(fake)
            http, fake_url = servers(HttpTransport([good_client.url, fake.url])).http, fake.url
        else:
            fake_url = OTHER
            http = servers({GOOD: seed_client("client_1"), fake_url: fake_client(behaviour)}).http
        resp = http.post("/start", json={"rounds": 2, "seed": 1, **settings})
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json(), fake_url

    yield run
    release.set()
    for s in served:
        s.close()
    release.clear()


def alone(servers) -> dict:
    """The same run with the good client alone: what the average must equal."""
    return servers({GOOD: seed_client("client_1")}).run(rounds=2, seed=1)


@pytest.mark.parametrize("behaviour, reason", [
    ("nan", "NaN is not allowed"),
    ("huge", "out of range"),
    ("garbage", "bad reply: body is not valid JSON"),
    ("wrong_dim", "reply.local_model.w: has 2 weight(s), the data has 1 feature(s)"),
    ("negative_n", "reply.data_size: must be >= 1, got -2"),
    ("bool_n", "reply.data_size: must be an integer, got a boolean"),
    ("no_model", "reply.local_model: missing"),
    ("list_body", "not a JSON object"),
    ("lying_n", "reply.data_size: 1000 differs from the 2 its /health reported"),
    ("http_500", "HTTP 500"),
    ("hang", "no reply within 0.5 s"),
    ("huge_n", "reply.data_size: must be <= 1000000000000"),
    ("flood", "bad reply: reply larger than 1048576 bytes"),
    ("twice", "data_size: given twice"),
])
def test_a_bad_reply_is_dropped_with_its_reason(run_with, servers, behaviour, reason):
    run, fake_url = run_with(behaviour, client_timeout_s=0.5)
    assert run["status"] == "completed", run["error"]
    expected = alone(servers)
    for record, clean in zip(run["rounds"], expected["rounds"]):
        assert [d["url"] for d in record["dropped"]] == [fake_url]
        assert reason in record["dropped"][0]["reason"]
        assert record["N"] == 2 and [p["client_id"] for p in record["participants"]] == ["client_1"]
        assert record["global_model"] == clean["global_model"]  # the average is unaffected


def test_fewer_than_min_clients_fails_and_keeps_the_last_good_model(run_with):
    run, fake_url = run_with("garbage", min_clients=2)
    assert run["status"] == "failed"
    assert fake_url in run["error"] and "min_clients is 2" in run["error"]
    assert run["rounds"] == []
    assert run["final_model"] == {"w": 0.0, "b": 0.0}  # the last good global model: the initial one


def test_too_large_lr_ends_the_run_as_diverged(servers):
    run = servers({GOOD: seed_client("client_1")}).run(rounds=50, lr=5.0)
    assert run["status"] == "diverged"
    assert "smaller lr" in run["error"]
    # what was kept is the last finite global model
    assert all(abs(v) < float("inf") for v in (run["final_model"]["w"], run["final_model"]["b"]))


def test_a_reply_that_trickles_in_is_cut_off_at_the_timeout(good_client, tmp_path):
    """A client whose /train answers one byte at a time: each read is quick,
    so only a deadline on the whole call stops it."""
    app = Flask("trickle")

    @app.post("/train")
    def train():
        def drip():
            for byte in b'{"local_model": {"w": 1, "b": 0}, "data_size": 2}' + b" " * 200:
                if release.wait(0.05):
                    return
                yield bytes([byte])
        return Response(drip(), mimetype="application/json")

    fake = Served(app)
    try:
        server = create_server_app({"CLIENTS": [good_client.url, fake.url], "DB": str(tmp_path / "runs.db")})
        started = time.monotonic()
        run = server.test_client().post("/start", json={"rounds": 1, "client_timeout_s": 0.5}).get_json()
        elapsed = time.monotonic() - started
        assert run["status"] == "completed"
        [dropped] = run["rounds"][0]["dropped"]
        assert dropped["url"] == fake.url and "no reply within 0.5 s" in dropped["reason"]
        # probe + round + final /evaluate: each bounded by the timeout (plus slack), not by the drip's 12 s
        assert elapsed < 3 * (0.5 + 0.2 + 0.5) + 1
    finally:
        release.set()
        fake.close()
        release.clear()


def test_a_round_with_more_hung_clients_than_connections_gives_each_its_timeout_and_ends(good_client, tmp_path):
    """max_parallel=2 and eight hung clients: each is given up on after its
    own timeout from when its call was sent (none is dropped unsent for
    waiting behind the others), and the round ends within its worst case,
    ⌈9 / 2⌉ lanes of a timeout each (``wave_limit``)."""
    fakes = [Served(fake_client("hang")) for _ in range(8)]
    try:
        urls = [good_client.url] + [f.url for f in fakes]
        server = create_server_app({"CLIENTS": urls, "DB": str(tmp_path / "runs.db"), "MAX_PARALLEL": 2})
        started = time.monotonic()
        run = server.test_client().post("/start", json={"rounds": 1, "client_timeout_s": 0.5}).get_json()
        elapsed = time.monotonic() - started
        assert run["status"] == "completed", run["error"]
        [record] = run["rounds"]
        assert [p["client_id"] for p in record["participants"]] == ["client_1"]
        assert [d["reason"] for d in record["dropped"]] == ["no reply within 0.5 s"] * 8
        # 8 of 9 lost to timeouts: said loudly (tests/test_timeouts.py), the run still completed
        assert run["timeouts"]["worst"] == {"round": 1, "timed_out": 8, "sampled": 9}
        # probe and final evaluation (the fakes answer both at once), and the round's wave
        assert elapsed < 2 * (0.5 + 0.2 + 0.5) + wave_limit(9, 2, 0.5) + 1
    finally:
        release.set()
        for f in fakes:
            f.close()
        release.clear()


def test_two_clients_with_one_name_stay_apart_in_the_csv(servers):
    """A second client that calls itself client_1 too: the CSV names each by
    name and URL."""
    client = servers({GOOD: seed_client("client_1"), OTHER: seed_client("client_2", client_id="client_1")}).http
    run = client.post("/start", json={"rounds": 1, "seed": 1}).get_json()
    csv_text = client.get(f"/runs/{run['run_id']}?format=csv").get_data(as_text=True)
    assert csv_text.splitlines()[1].split(",")[-2] == f"client_1 ({GOOD});client_1 ({OTHER})"


@pytest.mark.parametrize("name", ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-1+1", "@SUM(1)", "\tx"])
def test_a_client_name_that_is_a_formula_is_written_as_text_in_the_csv(name):
    run = {"rounds": [{"round": 1, "N": 2, "global_model": {"w": 1.0, "b": 0.0}, "federated_loss": None,
                       "participants": [{"client_id": name, "url": "http://h"}], "dropped": []}]}
    row = next(csv.reader(io.StringIO(run_to_csv(run).splitlines()[1])))
    assert row[5] == "'" + f"{name} (http://h)"


# A name that writes lines of its own into the server's log: a newline, ESC's
# "erase the line" sequence, a line separator.
FORGED = "client_2\nglobal model out: y = 9.000000·x + 9.000000\x1b[2K\u2028Run 1 completed: w=9.000000 b=9.000000"


def named_client(name: str, size: object = 2) -> Flask:
    """One of the seed's clients (client_2's data) that calls itself ``name``
    in /health, /train and /evaluate, and says n_k = ``size`` in /health."""
    inner = seed_client("client_2")
    app = Flask("named")

    @app.route("/<path:path>", methods=["GET", "POST"])
    def renamed(path):
        reply = inner.test_client().open(f"/{path}", method=request.method, data=request.get_data(),
                                         headers={"Content-Type": "application/json"})
        body = reply.get_json()
        if isinstance(body, dict) and "client_id" in body:
            body["client_id"] = name
            if path == "health":
                body["data_size"] = size
        return Response(json.dumps(body), status=reply.status_code, mimetype="application/json")

    return app


def test_a_name_with_control_characters_is_refused_where_the_server_reads_it(servers, caplog):
    """A client whose name holds a newline, ESC and U+2028: /health's name is
    ignored (it is a hint) and its replies are dropped naming the field and
    the character, so the log, the warnings, the CSV and the page never hold
    the name: no line of the log can be forged by a client."""
    caplog.set_level(logging.INFO, logger="fedavg.server")
    fed = servers({GOOD: seed_client("client_1"), OTHER: named_client(FORGED)})
    run = fed.run(rounds=2, seed=1)
    reason = ("reply.client_id: has the control character U+000A at position 8; a name is written into the log, "
              "the CSV and the page")
    assert run["status"] == "completed"
    assert [d["reason"] for r in run["rounds"] for d in r["dropped"]] == [reason, reason]
    assert [d["client_id"] for r in run["rounds"] for d in r["dropped"]] == [OTHER, OTHER]  # its URL names it
    assert run["warnings"] == [f"{OTHER} dropped in 2/2 rounds (last reason: {reason}); it never took part: the "
                               "model and the federated MSE are the other clients' alone"]
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "fedavg.server")
    assert "client_2" not in logged and "\x1b" not in logged and "\u2028" not in logged
    assert "9.000000" not in logged  # neither forged line
    text = fed.http.get(f"/runs/{run['run_id']}?format=csv").get_data(as_text=True)
    assert len(text.splitlines()) == 3 and "client_2" not in text  # a header and two rounds
    page = fed.http.get("/clients").get_json()["clients"]
    assert [(c["client_id"], c["status"]) for c in page] == [("client_1", "up"), (OTHER, "up")]


def test_an_error_a_client_writes_cannot_forge_a_line_of_the_log(servers, caplog):
    """A client answering 500 {"error": "busy\nRun 1 completed: …"}: its
    reason is written with the newline escaped (\\u000a), in the log, the
    record and the warning, so no line of the log starts as the forged one."""
    caplog.set_level(logging.INFO, logger="fedavg.server")
    forged = "busy\nRun 1 completed: final global model y = 42·x + 42\x1b[2K"
    evil = Flask("evil")

    @evil.route("/<path:path>", methods=["GET", "POST"])
    def busy(path):
        if path == "health":
            return {"status": "ok", "client_id": "evil", "data_size": 2}
        return {"error": forged}, 500

    run = servers({GOOD: seed_client("client_1"), OTHER: evil}).run(rounds=1, seed=1)
    assert run["status"] == "completed", run["error"]
    lines = [line for r in caplog.records if r.name == "fedavg.server" for line in r.getMessage().splitlines()]
    assert not any(line.startswith("Run 1 completed: final global model y = 42") for line in lines)
    escaped = "busy\\u000aRun 1 completed: final global model y = 42·x + 42\\u001b[2K"
    assert run["rounds"][0]["dropped"][0]["reason"] == f"HTTP 500: {escaped}"
    assert any(escaped in line for line in lines) and escaped in run["warnings"][0]


def test_secure_aggregation_does_not_take_a_name_with_control_characters_either(servers, caplog):
    """Under secure aggregation a client's name comes in its /secagg/advertise
    reply: one with a newline is not taken (there is no reply of its own to
    drop: the sum goes on, the client named by its URL)."""
    caplog.set_level(logging.INFO, logger="fedavg.server")
    fed = servers({GOOD: seed_client("client_1"), OTHER: named_client(FORGED)})
    run = fed.run(rounds=1, seed=1, secagg=True)
    assert run["status"] == "completed", run["error"]
    assert [p["client_id"] for p in run["rounds"][0]["participants"]] == ["client_1", OTHER]
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "fedavg.server")
    assert "client_2" not in logged and "9.000000" not in logged


def test_the_clients_list_bounds_what_health_says_as_a_run_does(servers):
    """GET /clients reads each client's /health as a run does: a 900,000-
    character name is not shown (the client keeps the name it is known by),
    nor is an n_k of 310 digits (above 10¹²: the client reads down, saying why)."""
    fed = servers({GOOD: named_client("x" * 900_000), OTHER: named_client("client_2", size=10**309)})
    r = fed.http.get("/clients")
    assert r.status_code == 200 and len(r.data) < 2000
    first, second = r.get_json()["clients"]
    assert (first["client_id"], first["status"], first["n_k"]) == (GOOD, "up", 2)
    assert (second["client_id"], second["status"], second["n_k"]) == (OTHER, "down", None)
    assert second["reason"] == "bad /health reply: data_size is not a whole number from 1 to 1000000000000"


def outlier_client(w: float, n: int = 2, b: float = 0.0) -> Flask:
    """A client that answers /health honestly-looking and always sends the model w, b."""
    app = Flask("outlier")

    @app.get("/health")
    def health():
        return {"status": "ok", "client_id": "outlier", "data_size": n, "num_features": 1}

    @app.post("/train")
    def train():
        return {"local_model": {"w": w, "b": b}, "data_size": n, "client_id": "outlier"}

    return app


def test_a_poisoned_update_is_blamed_on_its_sender_not_on_the_honest_client_or_the_lr(servers):
    """w = 1e300 from one client: the average is 5e299, the honest client's
    next local training overflows. The run names the sender, not client_1's lr."""
    run = servers({GOOD: seed_client("client_1"), OTHER: outlier_client(1e300)}).run(rounds=5, seed=1)
    assert run["status"] == "diverged"
    assert "outlier (update norm 1e+300" in run["error"] and "not the lr" in run["error"], run["error"]
    assert run["rounds"][0]["suspicious"][0]["client_id"] == "outlier"


def test_an_update_whose_norm_overflows_is_the_most_suspicious_not_a_reason_to_blame_the_lr(servers):
    """w = b = 1.797e308, the largest doubles: valid JSON, but ‖Δ‖ = √2·1.797e308
    is beyond any float. It was skipped as inf, and the honest client's lr
    took the blame ("lr=0.01 is too large", suspicious empty)."""
    big = 1.797e308
    run = servers({GOOD: seed_client("client_1"), OTHER: outlier_client(big, b=big)}).run(rounds=5, seed=1)
    assert run["status"] == "diverged"
    assert "outlier (update norm over 1.8e+308, beyond the largest float)" in run["error"], run["error"]
    assert "not the lr" in run["error"] and "lr=0.01 is too large" not in run["error"], run["error"]
    flagged = run["rounds"][0]["suspicious"]
    # JSON has no inf: the record holds the largest float, and says the norm is beyond it
    assert flagged == [{"client_id": "outlier", "url": OTHER, "update_norm": sys.float_info.max,
                        "ratio": sys.float_info.max, "overflow": True}]


def test_a_scaled_update_is_flagged_even_when_fedavg_goes_on(servers):
    run = servers({GOOD: seed_client("client_1"), OTHER: outlier_client(500.0)}).run(rounds=2, seed=1)
    first = run["rounds"][0]  # from W_0 = 0, each update is the local model itself
    honest = next(p for p in first["participants"] if p["client_id"] == "client_1")["local_model"]
    flagged = first["suspicious"]
    assert [x["client_id"] for x in flagged] == ["outlier"]
    assert flagged[0]["update_norm"] == pytest.approx(500.0, rel=1e-12)
    assert flagged[0]["ratio"] == pytest.approx(500.0 / math.hypot(honest["w"], honest["b"]), rel=1e-9)
    assert run["status"] == "completed"  # a flag, not a verdict


@pytest.mark.parametrize("settings, cause", [
    ({"strategy": "fedprox", "mu": 1e308}, "mu=1e+308 is too large"),
    ({"init": {"w": 1e308, "b": 0}}, "the starting model has a weight of 1e+308"),
    ({"lr": 0.5, "rounds": 50}, "lr=0.5 is too large"),
])
def test_divergence_names_its_cause(servers, settings, cause):
    run = servers({GOOD: seed_client("client_1")}).run(**{"rounds": 3, "seed": 1, **settings})
    assert run["status"] == "diverged" and cause in run["error"], run["error"]


@pytest.mark.parametrize("settings", [{"lr": 0.3, "rounds": 300}, {"lr": 100, "rounds": 20}])
def test_a_large_lr_with_two_honest_clients_is_blamed_on_the_lr_not_on_a_client(servers, settings):
    """Both honest clients blow up together: one's update may be >10× the
    other's, but neither is an outlier pushing a calm federation."""
    run = servers({GOOD: seed_client("client_1"), OTHER: seed_client("client_2")}).run(seed=1, **settings)
    assert run["status"] == "diverged", run
    assert f"lr={settings['lr']:g} is too large" in run["error"] and "outlier" not in run["error"], run["error"]


# --- a run that is diverging ends `diverged` long before anything overflows ----------
#
# Full-batch gradient descent on a client's MSE cannot raise that loss unless
# lr·λ_max(H_k) > 2 (its Hessian H_k = (2/n_k)·X̃ᵀX̃). On the seed client_2
# (x = 3, 4) has λ_max = 26.96, so its own steps diverge from lr = 2/26.96 =
# 0.0742; client_1's (λ_max = 6.85) from 0.292. The references below are
# plain Python (tests/reference.py), not the server's numbers.


def seed_pair(servers):
    return servers({GOOD: seed_client("client_1"), OTHER: seed_client("client_2")})


def federated_mse(w: float, b: float, clients=SEED_DATA) -> float:
    total = sum(len(d) for d in clients)
    return sum(len(d) / total * local_mse(d, w, b) for d in clients)


@pytest.mark.parametrize("lr", [0.1, 0.3])
def test_an_lr_too_large_for_a_clients_data_ends_the_run_diverged_at_round_3(servers, lr):
    """The default 5 rounds at lr 0.1 on the seed used to complete at
    y = −11051464590·x − 3085026931, and at lr 0.3 at 10⁴¹, with no warning;
    longer runs ran on until a number overflowed. Round 2 raises client_2's
    own loss, lands on a model whose federated loss is above the start's,
    after a step longer than round 1's: round 3 ends the run, naming client_2
    and its loss, and keeps round 2's model (the reference's, in plain Python)."""
    run = seed_pair(servers).run(rounds=200, lr=lr, seed=1)
    assert run["status"] == "diverged" and len(run["rounds"]) == 2, run["error"]
    (w1, b1), (w, b) = reference_fedavg(SEED_DATA, rounds=2, lr=lr, epochs=10)[:2]
    assert run["final_model"]["w"] == pytest.approx(w, rel=1e-12) and run["final_model"]["b"] == pytest.approx(
        b, rel=1e-12)
    before = local_mse(SEED_DATA[1], w, b)
    after = local_mse(SEED_DATA[1], *local_gd(SEED_DATA[1], w, b, lr, 10))
    start = federated_mse(0.0, 0.0)
    assert start == 18.75
    steps = math.hypot(w - w1, b - b1), math.hypot(w1, b1)
    assert steps[0] > steps[1]
    assert run["error"].startswith(f"round 3: the federated loss of round 2's model is {federated_mse(w, b):.4g}, "
                                   f"above the {start:.4g} of the model the run started from (on the same 2 "
                                   f"client(s)) and the model's steps grow (its last step {steps[0]:.4g} long, "
                                   f"after {steps[1]:.4g})"), run["error"]
    assert f"client_2's own loss grew from {before:.4g} to {after:.4g}" in run["error"], run["error"]
    # client_1's own steps diverge only above lr 0.292
    assert ("client_1's own loss grew" in run["error"]) == (lr > 0.292), run["error"]
    assert f" over 10 local epoch(s) at lr={lr:g}, which gradient descent does only when lr·λ_max > 2" in run["error"]
    assert run["error"].endswith(f"lr={lr:g} is too large for this data; try a smaller lr"), run["error"]


def test_a_two_round_run_is_judged_by_its_final_evaluation(servers):
    """Round 2's model has no round 3 to measure it: the final evaluation does.
    (A one-round run has one step, nothing to compare it with: it completes.)"""
    run = seed_pair(servers).run(rounds=2, lr=0.1, seed=1)
    (w1, b1), (w, b) = reference_fedavg(SEED_DATA, rounds=2, lr=0.1, epochs=10)[:2]
    assert run["status"] == "diverged", run
    assert run["error"].startswith(f"the federated loss of the final model (round 2) is {federated_mse(w, b):.4g}, "
                                   "above the 18.75"), run["error"]
    assert f"client_2's own loss grew from {local_mse(SEED_DATA[1], w1, b1):.4g} to" in run["error"], run["error"]
    assert seed_pair(servers).run(rounds=1, lr=0.1, seed=1)["status"] == "completed"


def test_a_newcomers_own_data_too_steep_for_the_lr_is_named(servers):
    """A user's own client (x = 5 … 15, so λ_max(H_k) = 221.8: its steps
    diverge above lr = 2/221.8 = 0.0090) next to the seed's client_1, at lr 0.02:
    its loss grew from 1111 to 5.9·10¹³ in round 1, and the run went on for
    28 rounds, to w = −3.8·10¹⁴⁸, until its training overflowed."""
    rows = [(5.0 + i, 3.0 * (5.0 + i) + 2.0 + (0.5 if i % 2 else -0.5)) for i in range(11)]
    host = create_host_app([LocalClient("newcomer", np.array([[x] for x, _ in rows]),
                                        np.array([y for _, y in rows]))], None)
    run = servers({GOOD: seed_client("client_1"), f"{OTHER}/clients/1": host}).run(rounds=200, lr=0.02, seed=1)
    assert run["status"] == "diverged" and len(run["rounds"]) == 2, run
    assert "newcomer's own loss grew" in run["error"] and "client_1's own loss" not in run["error"], run["error"]
    assert "lr=0.02 is too large for this data" in run["error"]
    # stopped at round 3, keeping round 2's model (plain-Python FedAvg's), not at an overflow
    w, b = reference_fedavg([SEED_DATA[0], rows], rounds=2, lr=0.02, epochs=10)[1]
    assert run["final_model"]["w"] == pytest.approx(w, rel=1e-9) and run["final_model"]["b"] == pytest.approx(
        b, rel=1e-9)


def test_a_client_that_reports_its_loss_growing_cannot_end_a_run_the_server_sees_converge(servers):
    """Three clients under the median, one of which reports loss_before 1e6
    and loss_after 2e6 from round 2 on: facts 1 and 2 are what the clients
    say, and this run ended at round 2 "diverged: lr=0.01 is too large". The
    model's steps, which the server measures, shrink: the run completes, and
    the median's model is the two honest clients' plain-Python FedAvg."""
    from fedavg_server.inprocess import InProcessTransport
    from fedavg_server.transport import Reply
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 4, size=30)
    y = 0.5 * x + 3 + rng.normal(0, 0.1, 30)
    clients = [LocalClient(f"c{k}", x[k::3, None], y[k::3]) for k in range(3)]

    class Liar(InProcessTransport):
        def call(self, url, method, path, timeout_s, body=None):
            reply = super().call(url, method, path, timeout_s, body)
            if url == self.urls[-1] and path == "/train" and reply.ok and body["round"] >= 2:
                return Reply(url, {**reply.body, "metrics": {"loss_before": 1e6, "loss_after": 2e6}}, reply.status)
            return reply

    # (its lie is in one client's own /train reply: called client by client)
    fed = servers(Liar.hosted(create_host_app(clients, None), 3), BATCHED=False)
    run = fed.run(rounds=20, seed=1, aggregator="median")
    assert run["status"] == "completed", run["error"]
    models = [(r["global_model"]["w"], r["global_model"]["b"]) for r in run["rounds"]]
    steps = [math.dist(a, b) for a, b in zip(models, models[1:])]
    assert steps[-1] < steps[0]


def test_a_run_started_at_the_optimum_that_drifts_to_its_fixed_point_is_no_divergence(servers):
    """From the pooled optimum 0.5·x + 3 at lr 0.075, E = 2: client_2's own
    loss grows every round (0.075 > its 2/λ_max = 0.0742) and the federated
    loss rises above the start's as the run drifts to FedAvg's fixed point,
    facts 1 and 2 together, yet the run converges: it ended at round 2. Its
    steps shrink, so it completes, at the fixed point of plain-Python FedAvg."""
    run = seed_pair(servers).run(rounds=300, lr=0.075, local_epochs=2, seed=1, init={"w": 0.5, "b": 3.0})
    assert run["status"] == "completed", run["error"]
    w, b = 0.5, 3.0
    for _ in range(300):  # the reference's rounds, from the same start
        models = [local_gd(rows, w, b, 0.075, 2) for rows in SEED_DATA]
        w, b = (sum(m[0] for m in models) / 2, sum(m[1] for m in models) / 2)  # n_k = 2 each
    assert run["final_model"]["w"] == pytest.approx(w, rel=1e-9) and run["final_model"]["b"] == pytest.approx(
        b, rel=1e-9)
    assert federated_mse(w, b) > federated_mse(0.5, 3.0)  # fact 2 holds at the end


@pytest.mark.parametrize("settings", [
    {"lr": 0.05, "rounds": 300},
    {"lr": 0.07, "rounds": 300},  # client_2's limit is 0.0742
    # E = 1 is gradient descent on the pooled data, stable up to lr 0.12: client_2's own
    # step raises its loss in every round, and yet the average reaches 0.5·x + 3.
    {"lr": 0.1, "local_epochs": 1, "rounds": 3000},
])
def test_a_stable_run_still_completes(servers, settings):
    run = seed_pair(servers).run(seed=1, **settings)
    assert run["status"] == "completed", run["error"]
    grew = {r["round"] for r in run["rounds"] for p in r["participants"]
            if p["metrics"]["loss_after"] > p["metrics"]["loss_before"]}
    if settings.get("local_epochs") == 1:
        assert len(grew) == 3000  # fact 1 alone is no divergence
        assert abs(run["final_model"]["w"] - 0.5) < 1e-9 and abs(run["final_model"]["b"] - 3.0) < 1e-9
    else:
        assert not grew


def test_a_server_step_that_overshoots_is_blamed_not_the_clients_lr(servers):
    """FedAvgM with server_lr 10 and momentum 0.9 on the seed at lr 0.01: the
    clients' own training is stable (no loss grows), the server's momentum
    step is not. It ran until client_1's training overflowed (round 218), and
    the error said "lr=0.01 is too large for its data": it names server_lr now,
    and the runaway ends it within a few rounds."""
    run = seed_pair(servers).run(strategy="fedavgm", server_lr=10, momentum=0.9, rounds=5000, seed=1)
    assert run["status"] == "diverged" and len(run["rounds"]) < 20, run
    # (a loss that overflowed is not sent: those rounds say nothing either way)
    assert not any(p["metrics"]["loss_after"] > p["metrics"].get("loss_before", math.inf)
                   for r in run["rounds"] for p in r["participants"])
    assert "no client's own loss grew over its local epochs at lr=0.01" in run["error"], run["error"]
    assert run["error"].endswith("try a smaller server_lr (now 10)") and "lr=0.01 is too large" not in run["error"]


@pytest.mark.parametrize("dp", [{"noise_multiplier": 0, "clip": None}, {"noise_multiplier": 0.001, "clip": 1000}])
def test_under_dp_the_diverged_error_quotes_no_clients_own_number(servers, dp):
    """A DP run records only what the mechanism releases (PRIVACY.md), and
    its error is recorded too: at lr 0.1 on the seed it still ends diverged
    at round 3, saying the federated loss rose above the start's and how
    many clients' own loss grew, without naming client_2 or writing a loss
    (a federated loss may be one client's own under sampling)."""
    run = seed_pair(servers).run(rounds=200, lr=0.1, seed=1, dp=dp)
    assert run["status"] == "diverged" and len(run["rounds"]) == 2, run
    (w1, b1), (w, b) = reference_fedavg(SEED_DATA, rounds=2, lr=0.1, epochs=10)[:2]
    before = local_mse(SEED_DATA[1], w, b)
    after = local_mse(SEED_DATA[1], *local_gd(SEED_DATA[1], w, b, 0.1, 10))
    assert "the own loss of 1 of the 2 clients grew over 10 local epoch(s) at lr=0.1" in run["error"], run["error"]
    assert "round 2's model is above that of the model the run started from" in run["error"], run["error"]
    assert "client_2" not in run["error"] and "18.75" not in run["error"], run["error"]
    for loss in (before, after, federated_mse(w, b), federated_mse(w1, b1)):
        assert f"{loss:.4g}" not in run["error"], run["error"]
    assert run["error"].endswith("lr=0.1 is too large for this data; try a smaller lr"), run["error"]


def test_under_dp_an_outlier_is_blamed_without_its_name_or_norm(servers):
    """Without DP the error names the sender and its norm ("outlier (update
    norm 1e+300, …)"); under DP, S = ∞ and σ = 0, it says an outlier did it
    and no more: no update's norm is recorded (PRIVACY.md)."""
    run = servers({GOOD: seed_client("client_1"), OTHER: outlier_client(1e300)}).run(
        rounds=5, seed=1, dp={"noise_multiplier": 0, "clip": None})
    assert run["status"] == "diverged", run
    assert "took from 1 client(s)' update(s), far larger than the others': an outlier, not the lr" in run["error"]
    assert "outlier (" not in run["error"] and "1e+300" not in run["error"], run["error"]


@pytest.mark.parametrize("settings", [
    {"strategy": "fedsgd", "lr": 0.3},  # each round's step is lr·∇L: beyond 2/λ_max it overshoots
    {"strategy": "scaffold", "lr": 0.1},  # its corrected steps: a client's own loss proves nothing
    {"strategy": "fedavg", "lr": 0.1, "batch_size": 1},  # mini-batches: neither does it here
])
def test_a_run_that_runs_away_ends_diverged_where_no_client_s_loss_can_prove_it(servers, settings):
    """FedSGD at lr 0.3, SCAFFOLD at lr 0.1 and FedAvg on mini-batches of 1
    at lr 0.1 on the seed: fact 1 (a client's own loss grew over full-batch
    descent) cannot be read from these runs, and they completed at 1e60,
    1e100 and 1e152 (100, 50, 44 rounds). The model's norm doubling round
    after round while the federated loss grows ends them long before:
    checked here against the records' own norms and losses, by plain Python."""
    run = seed_pair(servers).run(rounds=100, seed=1, **settings)
    assert run["status"] == "diverged", run
    rounds = run["rounds"]
    assert len(rounds) < 20 and "the global model is running away" in run["error"], run["error"]
    assert f"lr={settings['lr']:g} is too large for this data; try a smaller lr" in run["error"]
    norms = [math.hypot(r["global_model"]["w"], r["global_model"]["b"]) for r in rounds]
    losses = [r["federated_loss"] for r in rounds]
    # the last four rounds' trail, as the error tells it: each norm ≥ 2× the one before, each loss larger
    assert all(b >= 2 * a for a, b in zip(norms[-5:], norms[-4:])), norms
    assert all(b > a for a, b in zip(losses[-5:], losses[-4:])), losses
    assert f"{norms[-1] / norms[-5]:.3g}×" in run["error"] and max(norms) < 1e20


@pytest.mark.parametrize("settings", [
    {"strategy": "fedsgd", "lr": 0.1, "rounds": 300},
    {"strategy": "scaffold", "lr": 0.05, "rounds": 300},
    {"strategy": "fedavg", "lr": 0.01, "batch_size": 1, "rounds": 300},
    {"strategy": "fedavgm", "server_lr": 1, "momentum": 0.9, "rounds": 300},
    {"strategy": "fedadam", "server_lr": 0.1, "rounds": 300},
])
def test_a_converging_run_is_no_runaway(servers, settings):
    """The same strategies at settings they converge at: the runaway rule does
    not end them (FedAvgM's momentum from the zero model grows ‖θ‖ fast at first)."""
    run = seed_pair(servers).run(seed=1, **settings)
    assert run["status"] == "completed", run["error"]
