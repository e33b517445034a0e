"""Secure aggregation through the server's API, against plain-Python FedAvg:
the unmasked average is FedAvg's to within the fixed-point scale for 100
rounds (seed, and 10 clients); the record and the log hold no client's model
and no share; a client killed after or before it sent its masked input leaves
the survivors' exact average; below the threshold the run fails and nothing
is unmasked; bad keys, shares and vectors are dropped with their reason.
SecAgg+ (k neighbours each): 30 clients for 20 rounds are FedAvg; a client
lost before or after its masked input, with the neighbour graph; a
neighbourhood below t fails the round with nothing unmasked. A property:
for random K, t, k and clients dying at random steps, a round is the
survivors' FedAvg whenever the protocol can unmask, and refused, with
nothing unmasked, whenever it cannot.

These run in this process (make test): the server app over the clients' own
Flask handlers, through ``Tampering``, a Transport in this file that hands
every call to an ``InProcessTransport`` and lets a test change a reply or
take a client away at a given step (hostile and dying clients are honest
ones behind it). Two run over real processes (make test-all): one secure
run over HTTP against the reference, and the server killed with kill -9
mid-round, which restarts that round with a new session; the latter holds
a client's call with ``Proxy``, a loopback HTTP proxy in this file."""
from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_byzantine import client_data
from test_secagg_core import DEATHS, first_refusal

from conftest import ROOT, Federated
from fedavg import secagg
from fedavg.client import LocalClient
from fedavg.http.client_app import create_app as client_app
from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg.trace import fmt
from fedavg_server import DEFAULT_CLIENTS, create_app
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.transport import Reply, reply_from
from launcher import DEFAULT_PORTS, App, free_port, post_json, start_app, start_federation, stop, wait_healthy
from reference import SEED_DATA, local_gd, reference_fedavg

SCALE = 2.0**-24  # the default scale_bits

Hook = Callable[[str, str, Any], Any]
GONE = "gone"  # a request hook's answer: the client is not there to be called


class Tampering:
    """The server's Transport with a hand on the wire. Each call goes to an
    ``InProcessTransport`` (the clients' own handlers, with the bytes HTTP
    would carry), and ``hooks[c](path, phase, body)`` of client c (its place
    in the server's list, from 1) sees it twice: before (phase "request",
    body None: return GONE and the client is never called, the server sees
    a refused connection) and, for a /secagg/* reply, after (phase "reply":
    return the body to pass on, changed or not; it reaches the server as
    JSON bytes, read as HTTP's are). ``asked[c]`` records each request's
    path and JSON body, ``replies[c]`` each /secagg/* body that went out."""

    def __init__(self, inner: InProcessTransport, hooks: dict[int, Hook] | None = None) -> None:
        self.inner = inner
        self.hooks = hooks or {}
        # The server reads and writes these as its transport's own: share them.
        self.urls, self.names, self.headers, self.stopping = inner.urls, inner.names, inner.headers, inner.stopping
        self.number = {url: c for c, url in enumerate(inner.urls, start=1)}
        self.asked: dict[int, list[tuple[str, Any]]] = {c: [] for c in self.number.values()}
        self.replies: dict[int, list[dict[str, Any]]] = {c: [] for c in self.number.values()}

    def call_all(self, urls: Sequence[str], method: str, path: str, timeout_s: float,
                 body_for: Callable[[str], Any] | None = None) -> list[Reply]:
        return [self.call(url, method, path, timeout_s, None if body_for is None else body_for(url))
                if not self.stopping.is_set() else Reply(url, reason="cancelled: the server is stopping")
                for url in urls]

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None) -> Reply:
        c = self.number[url]
        self.asked[c].append((path, json.loads(json.dumps(body))))  # (a copy, as it went out)
        hook = self.hooks.get(c)
        if hook is not None and hook(path, "request", None) == GONE:
            return Reply(url, reason="cannot connect: connection refused (the client is gone)")
        reply = self.inner.call(url, method, path, timeout_s, body)
        if reply.ok and path.startswith("/secagg/"):
            if hook is not None:
                reply = reply_from(url, reply.status, json.dumps(hook(path, "reply", reply.body)).encode())
            self.replies[c].append(reply.body)
        return reply

    def close(self) -> None:
        self.inner.close()

    def paths(self, c: int, path: str) -> list[Any]:
        """The JSON bodies of the requests for ``path`` that reached client c."""
        return [body for p, body in self.asked[c] if p == path]


@pytest.fixture
def wired(tmp_path) -> Iterator[Callable[..., tuple[Federated, Tampering]]]:
    """wired(clients, hooks by client number) → (the server app over these
    clients through a Tampering transport, in this process; that transport).
    ``clients`` is a list of LocalClients (served by one client host app) or
    an InProcessTransport. The history is a SQLite file in tmp_path
    (``Federated.app.config["DB"]``)."""
    made: list[Federated] = []

    def make(clients: list[LocalClient] | InProcessTransport,
             hooks: dict[int, Hook] | None = None) -> tuple[Federated, Tampering]:
        inner = clients if isinstance(clients, InProcessTransport) else \
            InProcessTransport.hosted(create_host_app(clients), len(clients))
        wire = Tampering(inner, hooks)
        made.append(Federated(create_app({"TRANSPORT": wire, "DB": str(tmp_path / f"runs-{len(made)}.db"),
                                          "TOKEN": None})))
        return made[-1], wire
    yield make
    for f in made:
        f.close()


def seed_apps() -> dict[str, Flask]:
    """The seed's two client apps (client_1/data.csv, client_2/data.csv) at the URLs the server calls by default."""
    return {url: client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"), "TOKEN": None})
            for url, name in zip(DEFAULT_CLIENTS, ("client_1", "client_2"))}


def three_clients() -> InProcessTransport:
    """The seed's two client apps, and sim_1 (client_data(0, seed=7)), the one
    client of an iid client host of seed 7: client 3."""
    host = create_host_app(make_clients("iid", 1, seed=7))
    return InProcessTransport({**seed_apps(), "http://127.0.0.1:5003/clients/1": host})


def gone_at(step: str, after: bool) -> Hook:
    """A client that dies at /secagg/<step>: after it answered (its reply
    still reaches the server) or before it saw the request; from then on
    it answers nothing."""
    gone = False

    def hook(path: str, phase: str, body: Any) -> Any:
        nonlocal gone
        if phase == "request":
            gone = gone or (path == f"/secagg/{step}" and not after)
            return GONE if gone else None
        gone = gone or path == f"/secagg/{step}"  # (after: this reply was its last)
        return body
    return hook


def tamper(step: str, change: Callable[[dict], dict]) -> Hook:
    """A client whose /secagg/<step> replies are changed by ``change`` on their way to the server."""
    return lambda path, phase, body: (change(body) if path == f"/secagg/{step}" else body) \
        if phase == "reply" else None


def fedavg_round(clients: list[list[tuple[float, float]]], w: float, b: float) -> tuple[float, float]:
    """One FedAvg round in plain Python: each client's local GD, averaged by n_k/N."""
    total = sum(len(d) for d in clients)
    models = [local_gd(d, w, b) for d in clients]
    return (sum(len(d) * m[0] for d, m in zip(clients, models)) / total,
            sum(len(d) * m[1] for d, m in zip(clients, models)) / total)


def assert_fedavg(run: dict, data: list[list[tuple[float, float]]], tol: float) -> None:
    """Every round's global model within ``tol`` of plain-Python FedAvg on ``data`` from (0, 0)."""
    w = b = 0.0
    for record in run["rounds"]:
        w, b = fedavg_round(data, w, b)
        assert abs(record["global_model"]["w"] - w) <= tol
        assert abs(record["global_model"]["b"] - b) <= tol


def written(number: str, text: str) -> bool:
    """``number`` in ``text`` as a number of its own: not the start or the end of a
    longer one (a masked vector's decoded noise, -1.361092e+11, once held 1.361092).
    (str.find, not a regex: a run's history is megabytes, searched for a thousand numbers.)"""
    at = text.find(number)
    while at >= 0:
        end = at + len(number)
        if (at == 0 or text[at - 1] not in "0123456789.") and (end == len(text) or text[end] not in "0123456789e"):
            return True
        at = text.find(number, at + 1)
    return False


def local_models_written(run: dict, text: str) -> list[str]:
    """Each seed client's local model W_k of each round (computed here from the
    round's model in), as the code could write it, that ``text`` holds."""
    found = []
    for record in run["rounds"]:
        w_in, b_in = record["global_model_in"]["w"], record["global_model_in"]["b"]
        for data in SEED_DATA:
            for value in local_gd(data, w_in, b_in):
                found += [s for s in (repr(value), f"{value:.6f}", f"{value:.6e}") if written(s, text)]
    return found


def secrets_seen(replies: Iterable[dict[str, Any]]) -> set[str]:
    """Every sealed and every revealed share in these /secagg/* replies, as the base64 text that went over the wire."""
    found = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, str) and len(value) >= 24:
            found.add(value)
    for reply in replies:
        walk({k: v for k, v in reply.items() if k in ("shares", "b", "s_sk")})
    return found


def stored_text(db: str) -> str:
    """The run history's bytes as text: the SQLite file and its write-ahead log (the store is still open)."""
    return "".join(p.read_bytes().decode("latin-1") for p in sorted(Path(db).parent.glob(Path(db).name + "*")))


def test_secure_fedavg_is_fedavg_for_100_rounds_and_no_model_or_share_is_written(wired, caplog):
    """The seed: every round's global model within 100 rounds × the scale of
    plain-Python FedAvg; no client's local model W_k (computed here from each
    round's model in), no sealed share and no revealed share appears in the
    stored record or the server's log. The clients' own log does write their
    W_k: the search finds what it looks for."""
    caplog.set_level(logging.INFO)
    fed, wire = wired(InProcessTransport(seed_apps()))
    run = fed.run(rounds=100, secagg=True)
    assert run["status"] == "completed", run.get("error")
    log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("fedavg.client"))
    own = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fedavg.client"))
    expected = reference_fedavg(SEED_DATA, rounds=100)
    assert len(run["rounds"]) == 100
    for record, (w, b) in zip(run["rounds"], expected):
        assert abs(record["global_model"]["w"] - w) <= 100 * SCALE
        assert abs(record["global_model"]["b"] - b) <= 100 * SCALE
        assert all(p["data_size"] is None and "local_model" not in p for p in record["participants"])
        assert record["N"] == 4 and record["terms"] == []
    stored = stored_text(fed.app.config["DB"])
    assert local_models_written(run, log) == [], "in the log"
    assert local_models_written(run, stored) == [], "in the stored run"
    assert len(local_models_written(run, own)) >= 2 * 2 * 100  # every W_k, in the client's own log
    shares = secrets_seen(r for c in wire.replies for r in wire.replies[c])
    assert len(shares) > 100 * 2 * 2
    assert not [s for s in shares if s in stored or s in log]
    assert "y_1 = [" in log and "noise mod 2^64" in log  # what the server did see is there


def test_ten_clients_for_100_rounds(wired):
    """Ten iid clients on a client host: FedAvg in plain Python on the same rows, within the scale."""
    fed, _ = wired(make_clients("iid", 10))
    run = fed.run(rounds=100, secagg={"threshold": 6})
    assert run["status"] == "completed", run.get("error")
    assert len(run["rounds"]) == 100
    assert_fedavg(run, [client_data(i) for i in range(10)], 100 * SCALE)
    assert len(run["rounds"][-1]["participants"]) == 10


@pytest.mark.parametrize("after", [True, False], ids=["killed after its masked input", "killed before"])
def test_a_client_killed_mid_round_leaves_the_survivors_exact_average(wired, after):
    """client_2 dies at /secagg/masked. After answering: its input is in
    round 1's sum (it arrived), and its self-mask is removed with the others'
    shares. Before: it shared its keys but sent no input, and the masks the
    others share with it are removed with its rebuilt key. From round 2 on
    it is down, and the other two go on."""
    fed, _ = wired(three_clients(), {2: gone_at("masked", after)})
    run = fed.run(rounds=3, secagg={"threshold": 2})
    assert run["status"] == "completed", run.get("error")
    one, two, three = SEED_DATA[0], SEED_DATA[1], client_data(0, seed=7)
    w, b = 0.0, 0.0
    assert len(run["rounds"]) == 3
    for r, record in enumerate(run["rounds"], start=1):
        took_part = [one, two, three] if (r == 1 and after) else [one, three]
        w, b = fedavg_round(took_part, w, b)
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)
        assert [p["client_id"] for p in record["participants"]] == (
            ["client_1", "client_2", "sim_1"] if (r == 1 and after) else ["client_1", "sim_1"])
    first = run["rounds"][0]
    assert [d["client_id"] for d in first["dropped"]] == ["client_2"]
    if after:  # it is missing only from the unmasking, where the other two's shares suffice
        assert first["dropped"][0]["reason"].startswith("secagg unmask: ")
    else:  # it shared its keys, sent no input: its pair masks come off with its rebuilt key
        assert first["dropped"][0]["reason"].startswith("secagg masked: ")
        assert "the masks of dropped client 2" in "\n".join(first["math"])


def test_below_the_threshold_the_run_fails_and_nothing_is_unmasked(wired):
    """t = 3 of 3: with client_2 dead before its masked input, two are left:
    the run fails before any client is asked for a share."""
    fed, wire = wired(three_clients(), {2: gone_at("masked", after=False)})
    run = fed.run(rounds=2, secagg={"threshold": 3})
    assert run["status"] == "failed"
    assert "fewer than the threshold t=3" in run["error"] and "nothing was revealed" in run["error"]
    assert run["rounds"] == []
    assert all(wire.paths(c, "/secagg/masked") for c in (1, 2, 3))  # (it got that far)
    for c in (1, 2, 3):
        assert wire.paths(c, "/secagg/unmask") == []


def flip(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def in_clear(reply: dict) -> dict:
    """The masked vector replaced by a plain fixed-point input (what a client that skips masking sends)."""
    words = np.round(np.array([1.0, 2.0, 1.0, 3.0, 2.0, 1.0]) * 2**24).astype(np.int64).view(np.uint64)
    return {**reply, "masked": base64.b64encode(words.astype("<u8").tobytes()).decode()}


@pytest.mark.parametrize("step, change, reason", [
    ("advertise", lambda r: {**r, "keys": {**r["keys"], "s_pk": base64.b64encode(b"\0" * 32).decode()}},
     "reply.keys.s_pk: a low-order point"),
    ("advertise", lambda r: {**r, "keys": {**r["keys"], "c_pk": "bm90IGEga2V5"}}, "reply.keys.c_pk"),
    ("masked", lambda r: {**r, "masked": base64.b64encode(base64.b64decode(r["masked"])[:-8]).decode()},
     "reply.masked"),
    ("masked", in_clear, "sent unmasked"),
    ("receive", lambda r: {"bad_shares": {"7": "made up"}}, "reply.bad_shares: names clients [7]"),
], ids=["low-order key", "malformed key", "short masked vector", "unmasked input", "blames a stranger"])
def test_a_bad_message_drops_its_client_with_the_reason_and_the_round_goes_on(wired, step, change, reason):
    """sim_1 (client 3) lies at one step: it is dropped with its reason, and
    the round is the exact average of the others (masks with client 3
    removed when it had shared its keys)."""
    fed, _ = wired(three_clients(), {3: tamper(step, change)})
    run = fed.run(rounds=1, secagg={"threshold": 2})
    assert run["status"] == "completed", run.get("error")
    record = run["rounds"][0]
    assert [d["client_id"] for d in record["dropped"]] == ["sim_1"]
    assert reason in record["dropped"][0]["reason"]
    w, b = fedavg_round(SEED_DATA, 0.0, 0.0)
    assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
    assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)


def garbage(to: Callable[[str], bool] = lambda j: True) -> Callable[[dict], dict]:
    """/secagg/share's reply with random bytes, of the right length, sealed for the holders ``to`` picks."""
    return lambda reply: {**reply, "shares": {
        j: base64.b64encode(os.urandom(len(base64.b64decode(blob)))).decode() if to(j) else blob
        for j, blob in reply["shares"].items()}}


def four_honest_rounds(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds of a run of five iid clients in which sim_5 misbehaved:
    each plain-Python FedAvg of the other four, who took part, sim_5 alone
    dropped. The rounds, for the caller's own checks."""
    honest = [client_data(c) for c in range(4)]
    w = b = 0.0
    for record in run["rounds"]:
        w, b = fedavg_round(honest, w, b)
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)
        assert sorted(p["client_id"] for p in record["participants"]) == ["sim_1", "sim_2", "sim_3", "sim_4"]
        assert [d["client_id"] for d in record["dropped"]] == ["sim_5"]
    return run["rounds"]


@pytest.mark.parametrize("to", ["every holder", "one holder"])
def test_a_client_whose_sealed_shares_do_not_open_is_dropped_and_the_round_goes_on(wired, to):
    """Five iid clients; sim_5 sends random bytes in place of its sealed
    shares, to every holder or to one, every round. A holder that cannot open
    them names it at /secagg/masked (only the pair holds the key), the round
    starts again without it in a new session (each honest client asked to
    advertise twice), and every round is plain-Python FedAvg of the other
    four, who are not dropped. (Before, the four honest clients failed at
    the unmasking, were dropped, and the run failed; sim_5 was not named.)"""
    fed, wire = wired(make_clients("iid", 5), {5: tamper("share", garbage() if to == "every holder"
                                                          else garbage(lambda j: j == "1"))})
    run = fed.run(rounds=2, secagg=True)
    assert run["status"] == "completed", run.get("error")
    for record in four_honest_rounds(run):
        assert record["dropped"][0]["reason"].startswith("secagg share: its sealed shares did not open at sim_")
        assert "failed authentication" in record["dropped"][0]["reason"]
        assert "started again, in a new session with fresh keys, without sim_5" in "\n".join(record["math"])
    # Two attempts at each of the 3 secure sums (2 rounds and the final evaluation), each its own session;
    # sim_5 is asked in the first only.
    sessions = [body["session"] for body in wire.paths(1, "/secagg/advertise")]
    assert len(sessions) == 3 * 2 and len(set(sessions)) == len(sessions)
    assert len(wire.paths(5, "/secagg/advertise")) == 3


def test_shares_that_do_not_open_again_after_the_restart_fail_the_round_naming_the_sender(wired):
    """sim_5 sends garbage in the first attempt at round 1 and sim_4 only in
    the second: the round is restarted once, without sim_5, and then fails
    naming sim_4; nothing was unmasked (no client asked for a share)."""
    shared = {4: 0}

    def second_time(path: str, phase: str, body: Any) -> Any:
        if phase == "reply" and path == "/secagg/share":
            shared[4] += 1
            return garbage()(body) if shared[4] == 2 else body
        return body if phase == "reply" else None
    fed, wire = wired(make_clients("iid", 5), {5: tamper("share", garbage()), 4: second_time})
    run = fed.run(rounds=1, secagg=True)
    assert run["status"] == "failed" and run["rounds"] == []
    assert "the sealed shares of sim_4 did not open at their holders; nothing was revealed" in run["error"]
    assert "in the round's second attempt too (the first dropped sim_5)" in run["error"]
    assert not any(wire.paths(c, "/secagg/unmask") for c in wire.asked)


def accuser(clients: list[LocalClient], c: int, wire: list[Tampering], pick: Callable[[list[str]], list[str]],
            own_key: bool = True) -> Hook:
    """Client c (clients[c − 1]) as a hostile holder: when the shares sealed to it arrive
    (/secagg/receive), it answers that those of ``pick(senders)`` did not open, though they
    did, with its own c_sk of the session as the proof (``own_key``; else a key of no one's).
    (On a server that took the accusation at /secagg/masked, it is made there.)"""
    def hook(path: str, phase: str, body: Any) -> Any:
        if phase == "request":
            return None
        request = wire[0].paths(c, path)[-1]
        if "received" not in request:
            return body
        party, _ = clients[c - 1].sessions.get(request["session"])
        key = party._c_sk if own_key else secagg.new_keypair()[0]  # (the client knows its own key)
        return {"bad_shares": {j: "MAC check failed" for j in pick(sorted(request["received"], key=int))},
                "c_sk": base64.b64encode(key).decode()}
    return hook


@pytest.mark.parametrize("pick, own_key, reason", [
    (lambda senders: senders[:1], True, "a false accusation: the sealed shares of sim_1 open under the c_sk it "
                                        "revealed"),
    (lambda senders: senders, True, "a false accusation: the sealed shares of sim_1, sim_2, sim_3, sim_4 open"),
    (lambda senders: senders[:1], False, "reply.c_sk: not the private key of the c_pk client 5 advertised: its "
                                         "accusation is unproven"),
], ids=["its lowest neighbour", "everyone", "with a key not its own"])
def test_a_false_accusation_drops_the_accuser_and_the_round_goes_on(wired, pick, own_key, reason):
    """Five iid clients; sim_5 says, every round, that the shares sealed to
    it by its lowest neighbour (or by everyone) did not open, though they
    did, and shows its c_sk of the session (or a key not behind its c_pk).
    The server opens the pairs itself with that key: sim_5 is the one
    dropped, in the round's one session (no restart), and every round is
    plain-Python FedAvg of the four honest clients. (Before, the server
    believed it: the accused were dropped and the round restarted, and
    accusing again in the second attempt failed every round naming honest
    clients.)"""
    clients, wire = make_clients("iid", 5), []
    fed, tampering = wired(clients, {5: accuser(clients, 5, wire, pick, own_key)})
    wire.append(tampering)
    run = fed.run(rounds=2, secagg=True)
    assert run["status"] == "completed", run.get("error")
    for record in four_honest_rounds(run):
        assert reason in record["dropped"][0]["reason"], record["dropped"][0]["reason"]
    # One session for each of the 3 secure sums (2 rounds and the final evaluation): none restarted.
    assert all(len(tampering.paths(c, "/secagg/advertise")) == 3 for c in range(1, 6))


def test_a_true_accusation_with_a_false_one_drops_both_and_the_restart_is_without_both(wired):
    """sim_4 sends garbage sealed shares to every holder; sim_5 accuses
    sim_1 falsely in the same wave. The server's checks find both out: the
    round starts again without sim_4 (whose shares did not open at the
    server either) and without sim_5 (whose did), and is plain-Python FedAvg
    of sim_1-3 in that new session."""
    clients, wire = make_clients("iid", 5), []
    fed, tampering = wired(clients, {4: tamper("share", garbage()),
                                     5: accuser(clients, 5, wire, lambda senders: senders[:1])})
    wire.append(tampering)
    run = fed.run(rounds=1, secagg={"threshold": 2})
    assert run["status"] == "completed", run.get("error")
    record = run["rounds"][0]
    w, b = fedavg_round([client_data(c) for c in range(3)], 0.0, 0.0)
    assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
    assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)
    assert sorted(p["client_id"] for p in record["participants"]) == ["sim_1", "sim_2", "sim_3"]
    why = {d["client_id"]: d["reason"] for d in record["dropped"]}
    assert sorted(why) == ["sim_4", "sim_5"]
    # (sim_5's own reply named only sim_1)
    assert why["sim_4"].startswith("secagg share: its sealed shares did not open at sim_1, sim_2, sim_3 (")
    assert "a false accusation: the sealed shares of sim_1 open" in why["sim_5"]
    assert len(tampering.paths(4, "/secagg/advertise")) == len(tampering.paths(5, "/secagg/advertise")) == 2


def test_an_accusations_reason_reaches_the_record_with_its_control_characters_escaped(wired):
    """sim_5 sends garbage sealed shares; sim_1, accusing it truly, says why
    with a newline and an ESC sequence (a forged log line). The reason in
    sim_5's drop has them written as escapes (\\u000a, \\u001b), never raw.
    (Before, only cut to 200 characters.)"""
    forged = "bad\nRun 1 completed\x1b[2J"

    def says(body: dict) -> dict:
        return {**body, "bad_shares": {j: forged for j in body["bad_shares"]}} if "bad_shares" in body else body
    fed, _ = wired(make_clients("iid", 5), {5: tamper("share", garbage()),
                                            1: lambda path, phase, body: says(body) if phase == "reply" else None})
    run = fed.run(rounds=1, secagg=True)
    assert run["status"] == "completed", run.get("error")
    [dropped] = run["rounds"][0]["dropped"]
    assert dropped["client_id"] == "sim_5"
    assert "(bad\\u000aRun 1 completed\\u001b[2J)" in dropped["reason"], dropped["reason"]
    assert not any(ch in dropped["reason"] for ch in "\n\x1b")


def test_a_second_attempt_that_fails_names_the_clients_the_first_dropped(wired):
    """sim_5 sends garbage sealed shares; sim_3 and sim_4 are gone by the
    round's second attempt, which then has 2 clients, fewer than t = 3: the
    failure names all three it is missing, sim_5 with why. (Before, it said
    "0 dropped" of the first attempt's, or only the second's.)"""
    asked = {3: 0, 4: 0}

    def second_time_gone(c: int) -> Hook:
        def hook(path: str, phase: str, body: Any) -> Any:
            if phase == "reply":
                return body
            asked[c] += path == "/secagg/advertise"
            return GONE if asked[c] > 1 else None
        return hook
    fed, _ = wired(make_clients("iid", 5), {5: tamper("share", garbage()), 3: second_time_gone(3),
                                            4: second_time_gone(4)})
    run = fed.run(rounds=1, secagg={"threshold": 3})
    assert run["status"] == "failed" and run["rounds"] == []
    assert "after /secagg/advertise only 2 client(s) are left, fewer than the threshold t=3" in run["error"]
    assert "(3 dropped: sim_5: secagg share: its sealed shares did not open at sim_1" in run["error"], run["error"]
    assert "sim_3: secagg advertise: " in run["error"] and "sim_4: secagg advertise: " in run["error"]


def test_a_wrong_share_is_found_out_and_named(wired):
    """client 1 sends a corrupted share of client 3's self-mask seed: the
    server rebuilds b_3 from the first t = 2 shares (1's and 2's), finds it
    disagrees with client 3's commitment, finds the share that explains it
    among the 3 it has, names client 1, and unmasks with the other two.
    (A wrong share beyond the t the server uses is never read, and cannot
    change the sum.)"""
    fed, _ = wired(three_clients(), {1: tamper("unmask", lambda r: {**r, "b": {**r["b"], "3": flip(r["b"]["3"])}})})
    run = fed.run(rounds=1, secagg={"threshold": 2})
    assert run["status"] == "completed", run.get("error")
    math = "\n".join(run["rounds"][0]["math"])
    assert "b_3: the share(s) from client(s) [1] are wrong" in math
    w, b = fedavg_round([*SEED_DATA, client_data(0, seed=7)], 0.0, 0.0)
    assert run["rounds"][0]["global_model"]["w"] == pytest.approx(w, abs=1e-6)


def lies(delta: dict[int, float]) -> Callable[[dict], dict]:
    """/secagg/masked's reply with δ added under the mask: y + round(δ·2^24) mod 2^64 (Python
    integers) unmasks to x + δ, what a client lying about its input x would send, as well hidden
    as the truth. Slots of x for one feature: 0, 1 = w_k·θ_k, 2 = w_k, 3 = n_k·L_k, 4 = n_k, 5 = bit_k."""
    def change(reply: dict) -> dict:
        raw = base64.b64decode(reply["masked"])
        words = [int.from_bytes(raw[8 * e:8 * e + 8], "little") for e in range(len(raw) // 8)]
        words = [(w + round(delta.get(e, 0.0) * 2**24)) % 2**64 for e, w in enumerate(words)]
        return {**reply, "masked": base64.b64encode(b"".join(w.to_bytes(8, "little") for w in words)).decode()}
    return change


def random_words(reply: dict) -> dict:
    """Uniform words in place of the masked input: they look masked, and unmask to noise."""
    return {**reply, "masked": base64.b64encode(os.urandom(len(base64.b64decode(reply["masked"])))).decode()}


THREE_N = len(SEED_DATA[0]) + len(SEED_DATA[1]) + len(client_data(0, seed=7))  # N of three_clients()


@pytest.mark.parametrize("change, named", [
    (lies({2: 1e6, 0: 1e7, 1: 1e7}), f"Σ w_k = {fmt(1e6 + THREE_N)} where the 3 survivors' is {THREE_N}, the n_k"),
    (lies({2: -THREE_N}), f"Σ w_k = 0.000000 where the 3 survivors' is {THREE_N}, the n_k"),
    (lies({2: -0.5}), f"Σ w_k = {fmt(THREE_N - 0.5)} where"),
    (lies({4: 1000}), f"N = Σ n_k = {fmt(THREE_N + 1000)} where the 3 survivors' is {THREE_N}, the n_k"),
    (lies({3: -1e6}), "Σ n_k·L_k = -"),
    (random_words, "Σ w_k = "),
], ids=["weight ×10⁶ and a model to match", "total weight 0", "half a sample less", "N", "negative losses",
        "random words"])
def test_a_sum_no_honest_clients_send_fails_the_round_naming_secure_aggregation(wired, change, named):
    """sim_1 (client 3 of three_clients) lies in its input under the mask:
    the server checks each slot of the sum against what honest inputs give
    (Σ w_k and N: the survivors' n_k from /health, exactly; Σ n_k·L_k ≥ 0),
    and a sum that fails fails the round, naming secure aggregation, not the
    lr, and averaging nothing. (Before: a weight of 10⁶ with a model of
    (10, 10) gave y ≈ 9.99999·x + 9.99999 and a completed run; a total
    weight of 0, "diverged … lr too large"; random words, a wrong model.)"""
    fed, _ = wired(three_clients(), {3: tamper("masked", change)})
    run = fed.run(rounds=1, secagg={"threshold": 2})
    assert run["status"] == "failed" and run["rounds"] == [], run
    assert run["error"].startswith("round 1: secure aggregation: the sum of the survivors' inputs is not one "
                                   "honest clients send: "), run["error"]
    assert named in run["error"] and "lr" not in run["error"], run["error"]
    assert "secure aggregation hides whose; nothing of this round was averaged" in run["error"]


def test_a_weight_that_is_not_n_k_fails_the_round_even_where_n_k_is_unknown(wired):
    """sim_1 (client 3 of three_clients) is down at /health, so the server
    does not know its n_k (anything from 1 to 10¹² passes for it), then adds
    10⁶ to its weight w_k alone under the mask. Σ w_k and N each stay in
    their range; but honest clients weigh by n_k, so Σ w_k = N exactly, and
    the round fails naming secure aggregation. (Before, it completed at
    y = 4.2792e-05·x + 1.3074e-05: the honest model (1.7830, 0.5447) times
    N / (N + 10⁶), N = 24.)"""
    inflate = tamper("masked", lies({2: 1e6}))

    def hook(path: str, phase: str, body: Any) -> Any:
        return GONE if (phase, path) == ("request", "/health") else inflate(path, phase, body)
    fed, _ = wired(three_clients(), {3: hook})
    run = fed.run(rounds=1, secagg={"threshold": 2})
    assert run["status"] == "failed" and run["rounds"] == [], run
    assert run["error"].startswith("round 1: secure aggregation: the sum of the survivors' inputs is not one "
                                   "honest clients send: "), run["error"]
    assert f"Σ w_k = {fmt(THREE_N + 1e6)} differs from N = Σ n_k = {fmt(THREE_N)}" in run["error"], run["error"]
    assert "never said their n_k" not in run["error"].split("differs")[0], run["error"]  # (in range, as N is)


@pytest.mark.parametrize("dp", [None, {"noise_multiplier": 0.5, "clip": 1.0, "local_noise": True}],
                         ids=["plain", "dp local noise"])
@pytest.mark.parametrize("bits", [1e6, -1e6, -3.5], ids=["10⁶ more", "10⁶ fewer", "just below 0"])
def test_a_count_of_unclipped_updates_outside_0_to_u3_is_refused(wired, bits, dp):
    """The last slot of the sum is Σ bit_k, the count of updates that fit
    under the clip bound (what adaptive clipping moves S by: before, 10⁶ more
    drove S to 0 and 10⁶ fewer overflowed exp()). Each bit_k is 0 or 1, so an
    honest count is in [0, |U3|]: one outside fails the round naming it,
    whatever the run does with the count, and an honest run of the same
    settings completes. (Before, the count was read unchecked: a plain run
    completed with any count.)"""
    body = {"secagg": {"threshold": 2}, **({"dp": dp} if dp else {})}
    honest, _ = wired(three_clients())
    run = honest.run(rounds=2, **body)
    assert run["status"] == "completed", run.get("error")
    fed, _ = wired(three_clients(), {3: tamper("masked", lies({5: bits}))})
    run = fed.run(rounds=1, **body)
    assert run["status"] == "failed" and run["rounds"] == [], run
    assert run["error"].startswith("round 1: secure aggregation: the sum of the survivors' inputs is not one "
                                   "honest clients send: "), run["error"]
    assert re.search(r"the count of updates within the clip bound Σ bit_k = -?[0-9.]+(e[+-][0-9]+)? is outside "
                     r"\[0, \|U3\| = 3\]", run["error"]), run["error"]


def test_a_lie_in_the_model_itself_is_not_seen_and_moves_the_average_by_its_share(wired):
    """What secure aggregation cannot check: sim_1 adds 1000·N to its w_k·θ_k
    (w only). The sum is consistent in every slot the server checks, the round
    completes, and w is plain-Python FedAvg's + 1000: one client sets the model
    as far as it likes (PRIVACY.md says so; only a robust rule, which needs each
    update, would resist, and it cannot run on a sum)."""
    fed, _ = wired(three_clients(), {3: tamper("masked", lies({0: 1000 * THREE_N}))})
    run = fed.run(rounds=1, secagg={"threshold": 2})
    assert run["status"] == "completed", run.get("error")
    w, b = fedavg_round([*SEED_DATA, client_data(0, seed=7)], 0.0, 0.0)
    assert run["rounds"][0]["global_model"]["w"] == pytest.approx(w + 1000, abs=1e-6)
    assert run["rounds"][0]["global_model"]["b"] == pytest.approx(b, abs=1e-6)


def test_dp_with_an_unbounded_clip_weighs_every_client_equally_under_secure_aggregation(seed_federation):
    """dp with S = ∞ and σ = 0 (a config that tells the clients neither to clip
    nor to noise): DP-FedAvg's release is θ_t + Σ_k Δ_k / M, every client's
    update counted once, computed here. The server tells the clients to weigh
    equally (``equal_weights``), as DPAverage.from_sum needs; before, they
    weighted by n_k and the model was twice too far (w = 2.0997 for 1.0499)."""
    run = seed_federation.run(rounds=3, secagg=True, dp={"noise_multiplier": 0, "clip": None, "local_noise": True})
    assert run["status"] == "completed", run.get("error")
    w = b = 0.0
    for record in run["rounds"]:
        updates = [local_gd(data, w, b) for data in SEED_DATA]
        w, b = w + sum(lw - w for lw, _ in updates) / 2, b + sum(lb - b for _, lb in updates) / 2
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)


def test_dp_with_secure_aggregation_is_dp_fedavg_on_the_masked_sum(seed_federation):
    """dp.local_noise with secagg: each client clips (and would add its noise)
    before masking; with σ = 0 the release is θ_t + Σ_k clip_S(Δ_k) / M, computed here."""
    bound = 0.5
    run = seed_federation.run(rounds=4, secagg=True, dp={"noise_multiplier": 0, "clip": bound, "local_noise": True})
    assert run["status"] == "completed", run.get("error")
    assert len(run["rounds"]) == 4
    w = b = 0.0
    for record in run["rounds"]:
        dw = db = 0.0
        for data in SEED_DATA:
            lw, lb = local_gd(data, w, b)
            norm = ((lw - w) ** 2 + (lb - b) ** 2) ** 0.5
            scale = min(1.0, bound / norm)
            dw, db = dw + (lw - w) * scale, db + (lb - b) * scale
        w, b = w + dw / 2, b + db / 2
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)
    noisy = seed_federation.run(rounds=2, secagg=True, dp={"noise_multiplier": 1.0, "clip": bound,
                                                           "local_noise": True})
    assert noisy["status"] == "completed" and noisy["rounds"][-1]["privacy"]["epsilon"] > 0


@pytest.mark.parametrize("body, field", [
    ({"secagg": {"threshold": 1}}, "secagg.threshold"),
    ({"secagg": {"threshold": 3}}, "secagg.threshold"),  # more than the 2 clients a round asks
    ({"secagg": {"scale_bits": 60}}, "secagg.scale_bits"),
    ({"secagg": {"t": 2}}, "secagg.t"),
    ({"secagg": "yes"}, "secagg"),
    ({"secagg": True, "strategy": "scaffold"}, "secagg"),
    ({"secagg": True, "aggregator": "median"}, "secagg"),
    ({"secagg": True, "dp": {"noise_multiplier": 1, "clip": 1}}, "secagg"),  # needs dp.local_noise
    ({"secagg": True, "fraction": 0.5}, "secagg"),  # one client a round: its input would be the sum
])
def test_secagg_settings_that_cannot_work_are_a_400_naming_the_field(seed_federation, body, field):
    status, reply = seed_federation.post("/start", body)
    assert status == 400, reply
    named = {e["field"] for e in reply.get("errors", [])} | {reply["error"].split(": ")[0]}
    assert field in named, reply


# --- SecAgg+: each client masks with and shares among k neighbours only -----------------

def test_secagg_plus_30_clients_with_4_neighbours_each_for_20_rounds_is_fedavg(wired):
    """30 iid clients on a client host, k = 4 (t = 3 by default, a majority of 5):
    every round's model within 20 × the scale of plain-Python FedAvg, and each
    client masked with 4 others (the neighbourhoods the round's math shows)."""
    fed, _ = wired(make_clients("iid", 30))
    run = fed.run(rounds=20, secagg={"neighbors": 4})
    assert run["status"] == "completed", run.get("error")
    assert run["settings"]["secagg"] == {"neighbors": 4, "threshold": 3, "scale_bits": 24}
    assert len(run["rounds"]) == 20
    assert_fedavg(run, [client_data(i) for i in range(30)], 20 * SCALE)
    for record in run["rounds"]:
        assert len(record["participants"]) == 30
        math = "\n".join(record["math"])
        assert "SecAgg+: k=4 neighbours each" in math
        hoods = re.findall(r"N\((\d+)\) = \[([0-9, ]+)\]", math.split("neighbours only: ")[1].split("\n")[0])
        assert len(hoods) == 3 and all(len(members.split(", ")) == 4 for _, members in hoods)


@pytest.mark.parametrize("after", [True, False], ids=["lost after its masked input", "lost before"])
def test_secagg_plus_a_client_lost_mid_round_leaves_the_survivors_exact_average(wired, after):
    """12 clients, k = 4, t = 3; sim_1 dies at /secagg/masked. It was sent its
    4 neighbours' keys only, and only their shares. After answering: its input is
    in round 1's sum (b_1 rebuilt from its neighbours' shares). Before: its pair
    masks come off for its 4 neighbours, all in U3, and no one else. From round 2
    on it is gone, and the other 11 go on."""
    fed, wire = wired(make_clients("iid", 12), {1: gone_at("masked", after)})
    run = fed.run(rounds=3, secagg={"neighbors": 4})
    assert run["status"] == "completed", run.get("error")
    data = {f"sim_{c}": client_data(c - 1) for c in range(1, 13)}
    w = b = 0.0
    assert len(run["rounds"]) == 3
    for r, record in enumerate(run["rounds"], start=1):
        took_part = sorted(data) if (r == 1 and after) else sorted(set(data) - {"sim_1"})
        assert sorted(p["client_id"] for p in record["participants"]) == took_part
        w, b = fedavg_round([data[c] for c in took_part], w, b)
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)
    first = run["rounds"][0]
    assert [d["client_id"] for d in first["dropped"]] == ["sim_1"]
    index = wire.paths(1, "/secagg/advertise")[0]["index"]
    peers = sorted(int(j) for j in wire.paths(1, "/secagg/share")[0]["peers"])
    neighbours = [j for j in peers if j != index]
    assert index in peers and len(neighbours) == 4  # its neighbourhood's keys, not all 12 clients'
    receive = wire.paths(1, "/secagg/receive")[0]
    assert sorted(int(j) for j in receive["received"]) == neighbours and receive["survivors"] == peers
    assert wire.paths(1, "/secagg/masked")[0]["survivors"] == peers
    if after:  # missing only from the unmasking: 4 neighbours' shares of b_1 ≥ t
        assert first["dropped"][0]["reason"].startswith("secagg unmask: ")
    else:
        assert first["dropped"][0]["reason"].startswith("secagg masked: ")
        math = "\n".join(first["math"])
        assert f"the masks of dropped client {index} = " in math
        assert f"its pairs with U3 ∩ N({index}) = {neighbours})" in math


def test_secagg_plus_a_neighbourhood_below_t_fails_the_round_and_nothing_is_unmasked(wired):
    """10 clients, k = 4, t = 3: three of client 1's four neighbours die before
    their masked input. 7 of 10 are left, more than t, but b_1 could get only 2
    shares: the run fails before any client is asked to unmask."""
    fed, wire = wired(make_clients("iid", 10))

    def index(c: int) -> int:
        return wire.paths(c, "/secagg/advertise")[-1]["index"]

    def victims() -> list[int]:  # (the share wave has ended when the masked one begins)
        one = next(c for c in wire.asked if index(c) == 1)
        return sorted(int(j) for j in wire.paths(one, "/secagg/share")[-1]["peers"] if j != "1")[:3]

    def hook_for(c: int) -> Hook:
        def hook(path: str, phase: str, body: Any) -> Any:
            if phase == "request" and path == "/secagg/masked" and index(c) in victims():
                return GONE
            return body if phase == "reply" else None
        return hook

    wire.hooks.update({c: hook_for(c) for c in range(1, 11)})
    run = fed.run(rounds=2, secagg={"neighbors": 4})
    assert run["status"] == "failed"
    assert "fewer than the threshold t=3" in run["error"] and "nothing was revealed" in run["error"]
    assert "b_1: only 2 of the 5 clients of N[1] are left" in run["error"], run["error"]
    assert run["rounds"] == []
    assert sum(1 for c in wire.asked if wire.paths(c, "/secagg/masked")) == 10
    for c in wire.asked:
        assert wire.paths(c, "/secagg/unmask") == []


@pytest.mark.parametrize("secagg, field", [
    ({"neighbors": 0}, "secagg.neighbors"),
    ({"neighbors": 30}, "secagg.neighbors"),  # 29 others at most
    ({"neighbors": 1}, "secagg.neighbors"),  # pairs: the server would learn each pair's sum
    ({"neighbors": 3.5}, "secagg.neighbors"),
    ({"neighbors": 4, "threshold": 6}, "secagg.threshold"),  # more than the 5 of a neighbourhood
    ({"threshold": 12}, "secagg.threshold"),  # the default k = 2⌈log2 30⌉ = 10: 11 in a neighbourhood
])
def test_secagg_plus_settings_out_of_range_are_a_400_naming_the_field(wired, secagg, field):
    """A server with 30 clients: /start checks its body before it calls any (none is asked anything)."""
    fed, wire = wired(make_clients("iid", 30))
    status, reply = fed.post("/start", {"secagg": secagg})
    assert status == 400, reply
    assert field in {e["field"] for e in reply.get("errors", [])} | {reply["error"].split(": ")[0]}, reply
    assert not any(wire.asked.values())


# --- a property: any K, t, k and dropouts ------------------------------------------------

STEPS = ("advertise", "share", "receive", "masked", "unmask")  # the server's five waves of calls, in order


@settings(max_examples=30, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_round_is_the_survivors_fedavg_whenever_it_can_be_unmasked_and_refused_otherwise(wired, data):
    """K clients (3..9), t, k (the complete graph or 2..K − 1) and a fate for
    each client (stays, or dies before advertising, after it, after sharing
    keys, after its masked input), drawn by Hypothesis; the graph is the one
    the server drew (/secagg/share tells each client its neighbourhood).
    When ``first_refusal`` says the protocol can unmask, round 1 is
    plain-Python FedAvg over U3 (those whose masked input arrived), and U3
    are its participants; when it cannot, the run fails saying nothing was
    revealed, naming the step, and no client is asked anything after it
    (before the unmasking: no share is asked for). Same examples every run
    (derandomize), so a failure here fails again."""
    n = data.draw(st.integers(3, 9), label="K")
    k = data.draw(st.one_of(st.none(), st.integers(2, n - 1)), label="neighbors")
    t = data.draw(st.integers(2, n if k is None else k + 1), label="threshold")
    # (a few deaths among many who stay: most rounds get past the first step)
    deaths = data.draw(st.dictionaries(st.integers(1, n), st.sampled_from(DEATHS), max_size=n // 2), label="deaths")
    fed, wire = wired(make_clients("iid", n), {c: gone_at(fate.split()[-1], fate.startswith("dies after"))
                                               for c, fate in deaths.items()})
    run = fed.run(rounds=1, secagg={"threshold": t} | ({} if k is None else {"neighbors": k}))

    def reached(step: str) -> set[int]:
        return {c for c in wire.asked if wire.paths(c, f"/secagg/{step}")}

    def dying(fate: str) -> set[int]:
        return {c for c, f in deaths.items() if f == fate}
    u1 = set(wire.asked) - dying(DEATHS[0])
    u2 = u1 - dying(DEATHS[1])
    u3 = u2 - dying(DEATHS[2])
    answered = u3 - dying(DEATHS[3])
    # The protocol numbers the round's clients itself (advertise's index); N[i] is what /secagg/share told i.
    client = {wire.paths(c, "/secagg/advertise")[0]["index"]: c for c in reached("advertise")}
    graph = {c: {client[int(j)] for j in wire.paths(c, "/secagg/share")[0]["peers"]} - {c} for c in reached("share")}
    refused = first_refusal(graph, u1, u2, u3, answered, t)
    if refused is None:
        assert run["status"] == "completed", run.get("error")
        record = run["rounds"][0]
        assert sorted(p["client_id"] for p in record["participants"]) == sorted(f"sim_{c}" for c in u3)
        w, b = fedavg_round([client_data(c - 1) for c in sorted(u3)], 0.0, 0.0)
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)
        return
    assert run["status"] == "failed" and run["rounds"] == [], run
    assert "nothing was revealed" in run["error"] or "no secret was rebuilt" in run["error"], run["error"]
    assert f"/secagg/{refused}" in run["error"] or refused == "unmask", (refused, run["error"])
    for later in STEPS[STEPS.index(refused) + 1:]:
        assert reached(later) == set(), (refused, later)


# --- over real processes (make test-all) -------------------------------------------------

@pytest.mark.system
def test_secure_aggregation_over_http_is_fedavg_and_the_log_holds_no_model(tmp_path):
    """The seed's three apps as the README starts them, 20 secure rounds over
    HTTP: every round's global model within 20 × the scale of plain-Python
    FedAvg, and no client's local model W_k in the server's printed log or
    its database file."""
    apps = start_federation({name: free_port() for name in DEFAULT_PORTS}, server_args=["--db", str(tmp_path / "r.db")])
    try:
        status, run = post_json(apps["server"].url + "/start", {"rounds": 20, "secagg": True})
        assert status == 200 and run["status"] == "completed", run.get("error")
        log = "\n".join(apps["server"].lines)
    finally:
        stop(list(apps.values()))
    assert len(run["rounds"]) == 20
    for record, (w, b) in zip(run["rounds"], reference_fedavg(SEED_DATA, rounds=20)):
        assert abs(record["global_model"]["w"] - w) <= 20 * SCALE
        assert abs(record["global_model"]["b"] - b) <= 20 * SCALE
        assert all(p["data_size"] is None and "local_model" not in p for p in record["participants"])
    assert local_models_written(run, log) == [], "in the log"
    assert local_models_written(run, stored_text(str(tmp_path / "r.db"))) == [], "in the stored run"
    assert "y_1 = [" in log and "noise mod 2^64" in log  # what the server did see is there


class Proxy:
    """Forwards every request to ``target``; ``hook(path, phase, reply)`` is
    called before forwarding (phase "request", reply None: return a status
    to answer with instead) and after (phase "reply": return the reply to
    send, changed or not). ``asked`` records each request's path and JSON
    body, ``replies`` each /secagg/* reply as it went out."""

    def __init__(self, target: str, hook: Hook | None = None) -> None:
        self.target = urlsplit(target)
        self.hook = hook or (lambda path, phase, reply: reply)
        self.asked: list[tuple[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.asked.append((self.path, json.loads(data) if data else None))
                refused = proxy.hook(self.path, "request", None)
                if refused is not None:
                    self._answer(refused, b'{"error": "the proxy refused (the client is gone)"}')
                    return
                try:
                    conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
                    headers = {k: v for k, v in self.headers.items() if k.lower() in
                               ("content-type", "authorization", "x-deadline-s")}
                    conn.request(self.command, proxy.target.path.rstrip("/") + self.path, body=data or None,
                                 headers=headers)
                    resp = conn.getresponse()
                    status, body = resp.status, resp.read()
                    conn.close()
                except OSError:
                    self._answer(502, b'{"error": "the client is gone"}')
                    return
                if status == 200 and self.path.startswith("/secagg/"):
                    reply = proxy.hook(self.path, "reply", json.loads(body))
                    proxy.replies.append(reply)
                    body = json.dumps(reply).encode()
                self._answer(status, body)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def three_processes(tmp_path):
    """client_1 and client_2 (the seed's) and one iid client of seed 7 (client
    1 of its own client host), each in its own process behind a Proxy.
    Yields (start_server(hooks by name) → the server App, proxies by name)."""
    apps = {"client_1": start_app("client_1", free_port()), "client_2": start_app("client_2", free_port()),
            "client_3": start_app("client_host", free_port(), ["--scenario", "iid", "--clients", "1", "--seed", "7"])}
    proxies: dict[str, Proxy] = {}
    servers: list[App] = []
    try:
        wait_healthy(list(apps.values()))

        def start_server(hooks: dict[str, Hook]) -> App:
            for name, app in apps.items():
                proxies[name] = Proxy(app.url + ("/clients/1" if name == "client_3" else ""), hooks.get(name))
            server = start_app("server", free_port(), ["--clients", ",".join(p.url for p in proxies.values()),
                                                       "--db", str(tmp_path / "runs.db")])
            servers.append(server)
            wait_healthy([server])
            return server
        yield start_server, proxies
    finally:
        stop(servers + list(apps.values()))
        for p in proxies.values():
            p.close()


@pytest.mark.system
def test_a_server_killed_mid_round_restarts_that_round_from_scratch(three_processes, tmp_path):
    """kill -9 of the server while round 3's masked inputs are being sent,
    a restart on the same database, resume: round 3 is run again with a
    new session (fresh keys), and the run equals plain FedAvg. No share or
    sealed share the clients sent is in the database or the log."""
    start_server, proxies = three_processes
    reached, release = threading.Event(), threading.Event()
    calls = []

    def hold_third_round(path: str, phase: str, reply: Any) -> Any:
        if path == "/secagg/masked" and phase == "request":
            calls.append(path)
            if len(calls) == 3:
                reached.set()
                release.wait(20)
        return reply if phase == "reply" else None

    server = start_server({"client_1": hold_third_round})
    status, started = post_json(server.url + "/start", {"rounds": 5, "secagg": {"threshold": 2}, "wait": False})
    assert status == 202
    assert reached.wait(30)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    release.set()
    restarted = start_app("server", urlsplit(server.url).port, ["--clients", ",".join(p.url for p in proxies.values()),
                                                                "--db", str(tmp_path / "runs.db")])
    try:
        wait_healthy([restarted])
        status, run = post_json(f"{server.url}/runs/{started['run_id']}/resume", {})
        assert status == 200 and run["status"] == "completed", run.get("error")
        log = "\n".join(server.lines + restarted.lines)
    finally:
        stop([restarted])
    data = [*SEED_DATA, client_data(0, seed=7)]
    w = b = 0.0
    for record in run["rounds"]:
        w, b = fedavg_round(data, w, b)
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3, 4, 5]
    sessions = [body["session"] for path, body in proxies["client_2"].asked if path == "/secagg/advertise"]
    round_3 = [s for s in sessions if "|round 3|" in s]
    assert len(round_3) == 2 and round_3[0] != round_3[1]  # asked twice, each time a new session
    stored = stored_text(str(tmp_path / "runs.db"))
    shares = secrets_seen(r for p in proxies.values() for r in p.replies)
    assert len(shares) > 20
    assert not [s for s in shares if s in stored or s in log]


@pytest.mark.parametrize("scale_bits", [7, 41, 0, 62])
def test_a_client_refuses_a_scale_its_openapi_document_does_not_allow(scale_bits):
    """/secagg/advertise takes scale_bits in 8..40, as /start does and the
    OpenAPI document says: 7 was answered with keys (schemathesis found it),
    so a client took part at a scale the server may not even offer."""
    from fedavg.http.client_app import create_app as make_client_app
    app = make_client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" / "data.csv"),
                           "TOKEN": None})
    body = {"global_model": {"w": 0.0, "b": 0.0}, "round": 1, "config": {"lr": 0.01, "local_epochs": 1},
            "session": "run|round 1|00", "index": 1, "threshold": 2, "scale_bits": scale_bits}
    r = app.test_client().post("/secagg/advertise", json=body)
    assert r.status_code == 400 and r.get_json()["error"].startswith("scale_bits: "), r.get_json()
    ok = app.test_client().post("/secagg/advertise", json={**body, "scale_bits": 8, "session": "run|round 1|01"})
    assert ok.status_code == 200, ok.get_json()


def test_a_secure_run_whose_model_blows_up_ends_diverged_naming_the_fixed_point(seed_federation):
    """lr 0.1 on the seed under secure aggregation: by round 4 each client's
    loss term n_k·L_k is past what the fixed point can sum (2^63 / 2^24 / 2
    parties), and both clients were dropped with "encode: … use fewer
    scale_bits", the run `failed`. Each client now says which of its
    numbers is too large and that a model this far off is diverging (a 422
    "diverged", as /train says it), and the run ends diverged."""
    run = seed_federation.run(lr=0.1, rounds=50, secagg=True)
    assert run["status"] == "diverged", run
    limit = 2.0 ** 63 / 2.0 ** 24 / 2
    assert f"{limit:.4g} at scale_bits 24 over 2 parties" in run["error"]
    assert "its loss term n_k·L_k = " in run["error"] and "try a smaller lr" in run["error"]
    # the clients' loss on the last model the run kept: past the limit, from plain-Python least squares
    w, b = run["final_model"]["w"], run["final_model"]["b"]
    terms = [sum((w * x + b - y) ** 2 for x, y in rows) for rows in SEED_DATA]
    assert all(t >= limit for t in terms) and len(run["rounds"]) < 50
