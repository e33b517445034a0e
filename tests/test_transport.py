"""The two transports answer alike: a client app called in-process
(``InProcessTransport``) gives the very Reply that HTTP to the same app on a
loopback port (``HttpTransport``) gives, for good calls and bad ones; and a
federation driven in-process computes the seed's rounds as the reference does."""
from __future__ import annotations

import threading

import pytest
from flask import Flask, request

from conftest import ROOT
from fedavg.http.client_app import create_app as client_app
from fedavg_server.http_transport import HttpTransport
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.transport import MAX_REPLY_BYTES
from reference import SEED_DATA, reference_fedavg

TRAIN = {"global_model": {"w": 0.5, "b": -1.0}, "round": 3, "config": {"lr": 0.02, "local_epochs": 4}}
CALLS = [
    ("GET", "/health", None),
    ("POST", "/train", TRAIN),
    ("POST", "/evaluate", {"global_model": {"w": 2.0, "b": 1.0}}),
    ("POST", "/train", {"global_model": {"w": "x", "b": 0}}),  # a 400 naming the field
    ("POST", "/train", {"global_model": {"w": 1e300, "b": 1e300}, "config": {"lr": 10.0}}),  # a 422: diverged
    ("POST", "/evaluate", [1, 2]),
    ("GET", "/no/such/path", None),
    ("DELETE", "/train", None),  # a 405
]


def client(token: str | None = None) -> Flask:
    return client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" / "data.csv"), "TOKEN": token})


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_in_process_replies_are_the_replies_http_gives(serve, token):
    served = serve(client(token))
    http = HttpTransport([served.url])
    local = InProcessTransport({served.url: client(token)})
    for transport in (http, local):
        transport.headers["Authorization"] = "Bearer s3cret"
    try:
        for method, path, body in CALLS:
            over_http = http.call(served.url, method, path, 5.0, body)
            in_process = local.call(served.url, method, path, 5.0, body)
            assert in_process == over_http, (method, path)
        both = local.call_all([served.url] * 2, "POST", "/train", 5.0, lambda url: TRAIN)
        assert [r.status for r in both] == [200, 200]
    finally:
        http.close()


def test_a_wrong_token_is_refused_in_process_as_over_http():
    local = InProcessTransport({"http://127.0.0.1:5001": client("s3cret")})
    local.headers["Authorization"] = "Bearer wrong"
    reply = local.call("http://127.0.0.1:5001", "POST", "/train", 5.0, TRAIN)
    assert reply.status == 401 and not reply.ok and "token" in reply.reason


def test_what_no_app_answers_and_a_stopping_server_are_reasons_not_errors():
    local = InProcessTransport({"http://127.0.0.1:5001": client()})
    assert "no client app" in local.call("http://127.0.0.1:9", "GET", "/health", 1.0).reason
    local.close()
    assert local.call_all(local.urls, "GET", "/health", 1.0)[0].reason == "cancelled: the server is stopping"


def test_a_reply_over_the_limit_is_cut_off_in_process_too():
    flood = Flask("flood")
    flood.get("/health")(lambda: {"status": "ok", "pad": "x" * MAX_REPLY_BYTES})
    reply = InProcessTransport({"http://127.0.0.1:7": flood}).call("http://127.0.0.1:7", "GET", "/health", 1.0)
    assert reply.reason == f"bad reply: reply larger than {MAX_REPLY_BYTES} bytes"


def test_the_seed_in_process_is_the_reference_fedavg(seed_federation):
    run = seed_federation.run()
    assert run["status"] == "completed"
    for got, (w, b) in zip(run["rounds"], reference_fedavg(SEED_DATA, rounds=5), strict=True):
        assert (got["global_model"]["w"], got["global_model"]["b"]) == pytest.approx((w, b), abs=1e-12)
    assert [p["url"] for p in run["rounds"][0]["participants"]] == ["http://127.0.0.1:5001", "http://127.0.0.1:5002"]


def slow_client(told: list[float]) -> Flask:
    """A client whose /train takes 70% of the deadline it is told, as a
    client with that much work does; ``told`` gathers each X-Deadline-S."""
    app = Flask("slow")

    @app.post("/train")
    def train():
        deadline_s = float(request.headers["X-Deadline-S"])
        told.append(deadline_s)
        threading.Event().wait(0.7 * deadline_s)  # the work: most of the time it was given
        return {"local_model": {"w": 1.0, "b": 0.0}, "data_size": 2}

    return app


def test_each_call_has_its_whole_timeout_from_when_it_is_sent(serve):
    """Six clients, two calls at a time, each taking 0.7 s of its 1 s: the
    third pair is sent 1.4 s into the wave and still gets its whole second.
    (A deadline counted from the wave's start cut it off.)"""
    told: list[float] = []
    served = serve(slow_client(told))
    http = HttpTransport([served.url], max_parallel=2)
    try:
        replies = http.call_all([served.url] * 6, "POST", "/train", 1.0, lambda url: TRAIN)
    finally:
        http.close()
    assert [r.reason for r in replies] == [None] * 6
    assert told == pytest.approx([1.0] * 6, abs=0.01)  # (less the microseconds before the send)


def test_in_process_calls_each_have_their_whole_timeout_too():
    """One after another in this process: the second call is sent 0.7 s in and told the whole second too."""
    told: list[float] = []
    local = InProcessTransport({"http://127.0.0.1:5001": slow_client(told)})
    replies = local.call_all(["http://127.0.0.1:5001"] * 2, "POST", "/train", 1.0, lambda url: TRAIN)
    assert [r.reason for r in replies] == [None] * 2
    assert told == pytest.approx([1.0] * 2, abs=0.01)

