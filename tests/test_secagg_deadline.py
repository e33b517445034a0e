"""Secure aggregation's steps stop when the server no longer waits, as /train
does: each /secagg/* call reads X-Deadline-S, stops its work when it passes
and answers 408, keeping nothing of the step (the same request can be made
again). And a call the server gave up on is not worked on: waitress tells a
client host that the server hung up, even while the call still waits in its
queue, and the server's own calls never outlive its wait.

In this process: each step through a client host app's own handlers
(Flask's test client) with a deadline already passed, a large share stopped
part way, and HttpTransport's deadline for a call that starts late in a wave
(a loopback client in a thread). Over real processes (make test-all): a
client host given more secure work than it can do, by a caller that hangs
up, stops all of it.
"""
from __future__ import annotations

import functools
import http.client
import json
import re
import socket
import threading
import urllib.error
import urllib.request
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import numpy as np
import pytest
from flask import Flask, request
from test_byzantine import client_data
from test_secagg import fedavg_round

from fedavg import secagg, secagg_crypto
from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg_server.http_transport import HttpTransport
from launcher import free_port, post_json, start_app, stop, wait_healthy

STEPS = ("advertise", "share", "receive", "masked", "unmask")
PASSED = "0.000001"  # X-Deadline-S of a server that stops waiting at once (the header must be > 0)


def secure_round(app: Flask, late: str) -> tuple[list[tuple[int, dict]], np.ndarray]:
    """Clients 1-3 of ``app`` through one round, as the server runs it (U1 = U2 = U3,
    t = 2); client 1 is first asked for step ``late`` with an X-Deadline-S already
    passed, then again without. Returns what those first calls answered and the
    unmasked sum Σ x_k (this test's own unmasking, with fedavg.secagg)."""
    call, clients, session = app.test_client(), [1, 2, 3], "s"
    first: list[tuple[int, dict]] = []

    def post(c: int, step: str, body: dict[str, Any]) -> dict[str, Any]:
        path, body = f"/clients/{c}/secagg/{step}", {"session": session, **body}
        if c == 1 and step == late:
            r = call.post(path, json=body, headers={"X-Deadline-S": PASSED})
            first.append((r.status_code, r.get_json()))
        r = call.post(path, json=body)
        assert r.status_code == 200, r.get_json()
        return r.get_json()
    keys = {c: post(c, "advertise", {"global_model": {"w": 0.0, "b": 0.0}, "index": c, "threshold": 2})["keys"]
            for c in clients}
    shares = {c: post(c, "share", {"peers": {str(j): keys[j] for j in clients}})["shares"] for c in clients}
    for c in clients:
        assert post(c, "receive", {"survivors": clients, "received": {
            str(j): shares[j][str(c)] for j in clients if j != c}}) == {"opened": 2}
    masked = {c: post(c, "masked", {"survivors": clients, "parties": 3})["masked"] for c in clients}
    revealed = {c: post(c, "unmask", {"survivors": clients, "dropped": []}) for c in clients}
    b, s_sk = secagg.collect_shares({c: secagg.reveal_from_wire(revealed[c], "reply") for c in clients})
    total, _ = secagg.unmask_sum({c: secagg.vector_from_wire(masked[c], "masked", 6) for c in clients}, b, s_sk,
                                 {c: secagg.keys_from_wire(keys[c], "keys") for c in clients},
                                 survivors_u2=clients, session=session.encode(), threshold=2, length=6)
    return first, total


@pytest.mark.parametrize("step", STEPS)
def test_every_step_answers_408_once_the_servers_deadline_has_passed_and_keeps_nothing(step):
    """Three iid clients on one host; client 1 is asked for ``step`` with an
    X-Deadline-S that has passed before the work could begin: a 408 naming the
    step, as /train's. Asked again without it, it answers, and the round
    unmasks to plain-Python FedAvg of the three (N exact): nothing of the
    stopped step was kept. (Before, /secagg/share, /masked and /unmask read
    no deadline and did all their work.)"""
    first, total = secure_round(create_host_app(make_clients("iid", 3)), step)
    [(status, reply)] = first
    assert status == 408, reply
    assert re.match(rf"the server's deadline passed: (/secagg/{step} stopped|training stopped)", reply["error"])
    data = [client_data(c) for c in range(3)]
    assert total[2] == total[4] == sum(len(d) for d in data)  # Σ w_k and N: the n_k, exactly
    w, b = fedavg_round(data, 0.0, 0.0)
    assert total[0] / total[2] == pytest.approx(w, abs=1e-6) and total[1] / total[2] == pytest.approx(b, abs=1e-6)


def many_peers(own: dict[str, str], count: int) -> dict[str, dict[str, str]]:
    """A client's own advertised keys as peer 1 and ``count`` others: a neighbourhood
    as large as a complete graph of count + 1 clients."""
    return {"1": own, **{str(j): keys for j, keys in enumerate(other_keys(count), start=2)}}


@functools.cache
def other_keys(count: int) -> list[dict[str, str]]:
    """``count`` peers' public keys (made once: X25519 key pairs are not free)."""
    return [{name: secagg.to_wire(secagg.new_keypair()[1]) for name in ("c_pk", "s_pk")} for _ in range(count)]


def test_a_large_share_stops_part_way_when_the_deadline_passes():
    """A share among 300 peers with t = 150 (three Shamir splits of 300 points
    of degree 149 and 299 key agreements and seals: over a second of work)
    with 0.05 s to do it: a 408 saying how far it got, with fewer than the
    three splits done. (Each step's units, and that a stopped one keeps
    nothing, are checked on their own in test_secagg_core.py.)"""
    app = create_host_app(make_clients("iid", 1))
    r = app.test_client().post("/clients/1/secagg/advertise", json={
        "session": "big", "global_model": {"w": 0.0, "b": 0.0}, "index": 1, "threshold": 150})
    assert r.status_code == 200, r.get_json()
    body = {"session": "big", "peers": many_peers(r.get_json()["keys"], 299)}
    with mock.patch.object(secagg_crypto.Shamir, "split", wraps=secagg_crypto.Shamir.split) as split:
        r = app.test_client().post("/clients/1/secagg/share", json=body, headers={"X-Deadline-S": "0.05"})
    assert r.status_code == 408, r.get_json()
    assert r.get_json()["error"].startswith("the server's deadline passed: /secagg/share stopped ")
    assert split.call_count < 3


def test_a_call_that_starts_late_in_a_wave_is_told_and_given_its_whole_timeout(serve):
    """HttpTransport with one connection and two clients that never answer,
    timeout 1 s: the second call can start only when the first gives up, 1 s
    in. Its deadline counts from its send: X-Deadline-S says the whole
    second, and the server waits that second for it (the wave about 2 s,
    ``wave_limit``'s two lanes), so what the client is told is what the
    server waits. (Before: a wave deadline cut it to what was left, 0.7 s.)"""
    seen: list[float] = []
    release = threading.Event()
    app = Flask(__name__)

    @app.post("/<name>/secagg/share")
    def hang(name: str):
        seen.append(float(request.headers["X-Deadline-S"]))
        release.wait(10)
        return {}

    fake = serve(app)
    transport = HttpTransport([f"{fake.url}/a", f"{fake.url}/b"], max_parallel=1)
    try:
        replies = transport.call_all(transport.urls, "POST", "/secagg/share", 1.0, lambda url: {})
    finally:
        release.set()
        transport.close()
    assert [r.reason for r in replies] == ["no reply within 1 s", "no reply within 1 s"]
    assert seen == pytest.approx([1.0, 1.0], abs=0.01)  # (less what passed before each was sent)


# --- over real processes (make test-all) -------------------------------------------------

def hang_up_on(url: str, path: str, body: dict[str, Any], after_s: float) -> None:
    """POST ``body`` and give up after ``after_s``, closing the connection, as the
    server's transport does at its deadline. X-Deadline-S says an hour: only the
    hang-up can tell the client the call was abandoned."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=after_s)
    try:
        conn.request("POST", parts.path + path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-Deadline-S": "3600"})
        conn.getresponse().read()
        raise AssertionError(f"{path} answered within {after_s} s: the test needs more work than that")
    except (socket.timeout, TimeoutError):
        pass
    finally:
        conn.close()


@pytest.mark.system
def test_a_client_host_stops_the_secure_work_a_server_hung_up_on():
    """A client host of 12 clients (8 request threads, waitress's), each given a
    /secagg/share among 400 peers with t = 200 (seconds of Shamir splitting
    each, 12 at once) by a caller that hangs up after 0.5 s with an hour left on
    X-Deadline-S. None of the twelve is done: a call running when its caller
    hung up stops at its next split, seal or key agreement and says so ("the
    server hung up: /secagg/share stopped …"), and one still queued is never
    begun (waitress drops it). Each client, asked the same share again with a
    deadline already passed, answers 408 "stopped before it began", as one whose
    share was never made does (a done share is answered from memory, 200), and
    the host's /health answers within a 10 s poll once the callers are gone.
    (Before, the host worked on through all twelve, half a minute of a core,
    for no one, every request thread busy.)"""
    host = start_app("client_host", free_port(), ["--scenario", "iid", "--clients", "12"])
    try:
        wait_healthy([host])
        bodies = {}
        for c in range(1, 13):
            status, advertised = post_json(f"{host.url}/clients/{c}/secagg/advertise", {
                "session": "abandoned", "global_model": {"w": 0.0, "b": 0.0}, "index": 1, "threshold": 200})
            assert status == 200, advertised
            bodies[c] = {"session": "abandoned", "peers": many_peers(advertised["keys"], 399)}
        callers = [threading.Thread(target=hang_up_on, args=(f"{host.url}/clients/{c}", "/secagg/share", bodies[c],
                                                              0.5)) for c in bodies]
        for t in callers:
            t.start()
        for t in callers:
            t.join(30)
        # The host is free again: its /health answers within a bounded poll. The twelve shares
        # abandoned are over 30 s of one core (2.8 s CPU each, measured), all of it Python under one
        # GIL: a host that worked on them would hold every request thread far past this wait.
        wait_healthy([host], timeout_s=10)
        probes = {}
        for c, body in bodies.items():  # (each waits its turn behind whatever the host still runs)
            req = urllib.request.Request(f"{host.url}/clients/{c}/secagg/share", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "X-Deadline-S": PASSED})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    probes[c] = (resp.status, json.loads(resp.read()))
            except urllib.error.HTTPError as e:
                probes[c] = (e.code, json.loads(e.read()))
        lines = list(host.lines)
    finally:
        stop([host])
    assert all(status == 408 and reply["error"] == "the server's deadline passed: /secagg/share stopped before it "
               "began" for status, reply in probes.values()), probes
    assert any(re.match(r"sim_\d+: /secagg/share: the server hung up: stopped", line) for line in lines), lines
