"""Rounds that lose many clients to timeouts say so loudly: a WARNING line in
the log each such round and at the run's end, the run's ``timeouts`` in
GET /runs/<id> and the /start answer (its message too), and each round's
count in its record. The run still completes. In this process: a client
that stops at the server's deadline answers 408, as LocalClient does (the
same reason HTTP's cut-off gives is counted in test_bad_clients.py)."""
from __future__ import annotations

import logging

from flask import Flask

from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg_server.timeouts import LOUD_SHARE

HOST = "http://127.0.0.1:6000"


def client_that_says(status: int, error: str) -> Flask:
    """A client without /health whose /train answers ``status`` with ``error``."""
    app = Flask(f"says-{status}")
    app.add_url_rule("/health", "health", lambda: ({"error": "no health here"}, 404))
    app.add_url_rule("/train", "train", lambda: ({"error": error}, status), methods=["POST"])
    return app


def late_client() -> Flask:
    """A client whose training never ends before the server's deadline: the 408 LocalClient gives then."""
    return client_that_says(408, "the server's deadline passed: training stopped after epoch 3 of 10")


def broken_client() -> Flask:
    return client_that_says(500, "boom")


def federation_of(servers, good: int, **others: Flask):
    """``good`` clients of one in-process host, and the given apps at URLs of their own."""
    host = create_host_app(make_clients("iid", good))
    apps = {f"{HOST}/clients/{k}": host for k in range(1, good + 1)}
    apps |= {f"http://127.0.0.1:{7000 + i}": app for i, app in enumerate(others.values())}
    return servers(apps), [url for url in apps if not url.startswith(HOST)]


def test_a_run_whose_rounds_lose_a_third_to_timeouts_says_so_loudly(servers, caplog):
    fed, [late] = federation_of(servers, 2, late=late_client())
    with caplog.at_level(logging.INFO, logger="fedavg.server"):
        status, run = fed.post("/start", {"rounds": 3, "client_timeout_s": 0.5})
    assert status == 200 and run["status"] == "completed", run
    # each round's record counts its timeouts; 1 of 3 is at least LOUD_SHARE
    assert [r["timeouts"] for r in run["rounds"]] == [{"timed_out": 1, "sampled": 3}] * 3
    assert 1 / 3 >= LOUD_SHARE
    rounds = [{"round": r, "timed_out": 1, "sampled": 3} for r in (1, 2, 3)]
    timeouts = run["timeouts"]
    assert {k: timeouts[k] for k in ("rounds", "timed_out", "worst", "listed")} == {
        "rounds": 3, "timed_out": 3, "worst": rounds[0], "listed": rounds}
    assert "round 1, 1 of 3, 33%" in timeouts["message"]
    assert "raise client_timeout_s (now 0.5 s)" in timeouts["message"] and "--max-parallel" in timeouts["message"]
    # the /start answer: its summary holds it, and its message says it before the per-client warnings
    assert list(run)[:8] == ["message", "status", "final_line", "final_model", "rounds_completed", "timeouts",
                             "warnings", "url"]
    assert run["message"].startswith(f"FedAvg finished 3 round(s). WARNING: {timeouts['message']}.")
    assert run["warnings"][0].startswith(f"{late} dropped in 3/3 rounds")
    status, again = fed.get(f"/runs/{run['run_id']}?since=2")  # the whole run's, whatever the page
    assert status == 200 and again["timeouts"] == timeouts
    loud = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert loud == [f"Round {r} WARNING: 1 of 3 sampled clients (33%) timed out and were dropped: raise "
                    "client_timeout_s (now 0.5 s), or lower the server's --max-parallel if the clients share a "
                    "host that answers fewer calls at once" for r in (1, 2, 3)] + \
        [f"Run {run['run_id']} WARNING: {timeouts['message']}"]


def test_a_round_under_the_share_is_counted_but_not_loud_and_other_drops_are_not_timeouts(servers, caplog):
    """1 timeout and 1 error among 12 clients: 2/12 dropped, but 1/12 < 10% for timeouts."""
    fed, _ = federation_of(servers, 10, late=late_client(), broken=broken_client())
    with caplog.at_level(logging.INFO, logger="fedavg.server"):
        status, run = fed.post("/start", {"rounds": 2, "client_timeout_s": 0.5})
    assert status == 200 and run["status"] == "completed", run
    assert 1 / 12 < LOUD_SHARE
    assert [len(r["dropped"]) for r in run["rounds"]] == [2, 2]
    assert [r["timeouts"] for r in run["rounds"]] == [{"timed_out": 1, "sampled": 12}] * 2
    assert run["timeouts"] is None and "WARNING" not in run["message"]
    assert fed.get(f"/runs/{run['run_id']}")[1]["timeouts"] is None
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]


def test_a_run_without_timeouts_has_none(servers):
    fed, _ = federation_of(servers, 3)
    status, run = fed.post("/start", {"rounds": 1})
    assert status == 200 and run["timeouts"] is None and "timeouts" not in run["rounds"][0]
