"""Secure aggregation over HTTP, against the real apps and plain-Python
FedAvg: the unmasked average is FedAvg's to within the fixed-point scale for
100 rounds (seed, and 10 clients); the record and the log hold no client's
model; a client killed after or before it sent its masked input leaves the
survivors' exact average; below the threshold the run fails and nothing is
unmasked; bad keys, shares and vectors are dropped with their reason.
SecAgg+ (k neighbours each): 30 clients for 20 rounds are FedAvg; a client
lost before or after its masked input, with the neighbour graph; a
neighbourhood below t fails the round with nothing unmasked.

Hostile and dying clients are honest clients behind ``Proxy``, a loopback
HTTP proxy in this file that forwards the server's calls and lets a test
change a reply or kill the client at a given step."""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from test_byzantine import client_data

from launcher import App, free_port, post_json, refusing_url, start_app, stop, wait_healthy
from reference import SEED_DATA, local_gd, reference_fedavg

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system

SCALE = 2.0**-24  # the default scale_bits


class Proxy:
    """Forwards every request to ``target``; ``hook(path, phase, reply)`` is
    called before forwarding (phase "request", reply None: return a status
    to answer with instead) and after (phase "reply": return the reply to
    send, changed or not). ``asked`` records each request's path and JSON
    body, ``replies`` each /secagg/* reply as it went out."""

    def __init__(self, target: str, hook: Callable[[str, str, Any], Any] | None = None) -> None:
        self.target = urlsplit(target)
        self.hook = hook or (lambda path, phase, reply: reply)
        self.asked: list[tuple[str, Any]] = []
        self.replies: list[str] = []
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
                    body = json.dumps(proxy.hook(self.path, "reply", json.loads(body))).encode()
                    proxy.replies.append(body.decode())
                self._answer(status, body)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def iid_client(seed: int) -> App:
    """One client of the iid scenario in its own process (its rows: client_data(0, seed), 20 of them)."""
    return start_app("client_host", free_port(), ["--scenario", "iid", "--clients", "1", "--seed", str(seed)])


def fedavg_round(clients: list[list[tuple[float, float]]], w: float, b: float) -> tuple[float, float]:
    """One FedAvg round in plain Python: each client's local GD, averaged by n_k/N."""
    total = sum(len(d) for d in clients)
    models = [local_gd(d, w, b) for d in clients]
    return (sum(len(d) * m[0] for d, m in zip(clients, models)) / total,
            sum(len(d) * m[1] for d, m in zip(clients, models)) / total)


@pytest.fixture
def three(tmp_path):
    """client_1 and client_2 (the seed's) and one iid client, each in its own
    process behind a proxy, and a server that calls the proxies. Yields
    (start_server(hooks) → server url, apps by name, proxies by name)."""
    apps = {"client_1": start_app("client_1", free_port()), "client_2": start_app("client_2", free_port()),
            "client_3": iid_client(7)}
    proxies: dict[str, Proxy] = {}
    servers: list[App] = []
    try:
        wait_healthy(list(apps.values()))

        def start_server(hooks: dict[str, Callable] | None = None, with_app: bool = False) -> Any:
            for name, app in apps.items():
                # (the iid client is client 1 of its own client host)
                proxies[name] = Proxy(app.url + ("/clients/1" if name == "client_3" else ""), (hooks or {}).get(name))
            server = start_app("server", free_port(), ["--clients", ",".join(p.url for p in proxies.values()),
                                                       "--db", str(tmp_path / "runs.db")])
            servers.append(server)
            wait_healthy([server])
            return (server.url, server) if with_app else server.url
        yield start_server, apps, proxies
    finally:
        stop(servers + list(apps.values()))
        for p in proxies.values():
            p.close()


def kill_at(app: App, step: str, after: bool) -> Callable[[str, str, Any], Any]:
    """A hook that kills ``app`` at /secagg/<step>: after it answered (its
    reply still reaches the server) or before it sees the request; from
    then on the client is gone (502)."""
    gone = threading.Event()

    def hook(path: str, phase: str, reply: Any) -> Any:
        if gone.is_set():
            return 502 if phase == "request" else reply
        if path == f"/secagg/{step}" and phase == ("reply" if after else "request"):
            stop([app])
            gone.set()
            return reply if after else 502
        return reply if phase == "reply" else None
    return hook


def written(number: str, text: str) -> bool:
    """``number`` in ``text`` as a number of its own: not the start or the end of a
    longer one (a masked vector's decoded noise, -1.361092e+11, once held 1.361092)."""
    return re.search(rf"(?<![0-9.]){re.escape(number)}(?![0-9e])", text) is not None


def test_secure_fedavg_is_fedavg_for_100_rounds_and_no_model_is_written(tmp_path):
    """The seed: every round's global model within 100 rounds × the scale of
    plain-Python FedAvg; no client's local model W_k (computed here from each
    round's model in) appears in the stored record or the server's log."""
    from launcher import DEFAULT_PORTS, start_federation
    apps = start_federation({name: free_port() for name in DEFAULT_PORTS}, server_args=["--db", str(tmp_path / "r.db")])
    try:
        status, run = post_json(apps["server"].url + "/start", {"rounds": 100, "secagg": True})
        assert status == 200 and run["status"] == "completed", run.get("error")
        log = "\n".join(apps["server"].lines)
    finally:
        stop(list(apps.values()))
    expected = reference_fedavg(SEED_DATA, rounds=100)
    for record, (w, b) in zip(run["rounds"], expected):
        assert abs(record["global_model"]["w"] - w) <= 100 * SCALE
        assert abs(record["global_model"]["b"] - b) <= 100 * SCALE
        assert all(p["data_size"] is None and "local_model" not in p for p in record["participants"])
        assert record["N"] == 4 and record["terms"] == []
    stored = (tmp_path / "r.db").read_bytes().decode("latin-1")
    for record in run["rounds"]:
        w_in, b_in = record["global_model_in"]["w"], record["global_model_in"]["b"]
        for data in SEED_DATA:
            for value in local_gd(data, w_in, b_in):
                for text in (repr(value), f"{value:.6f}", f"{value:.6e}"):
                    assert not written(text, log), (text, "in the log")
                    assert not written(text, stored), (text, "in the stored run")
    assert "y_1 = [" in log and "noise mod 2^64" in log  # what the server did see is there


def assert_fedavg(run: dict, data: list[list[tuple[float, float]]], tol: float) -> None:
    """Every round's global model within ``tol`` of plain-Python FedAvg on ``data`` from (0, 0)."""
    w = b = 0.0
    for record in run["rounds"]:
        w, b = fedavg_round(data, w, b)
        assert abs(record["global_model"]["w"] - w) <= tol
        assert abs(record["global_model"]["b"] - b) <= tol


def hosted_run(tmp_path, k: int, body: dict) -> dict:
    """One completed run of ``body`` on k iid clients of a client host, with a
    server on them (--clients-from); both stopped after."""
    host = start_app("client_host", free_port(), ["--scenario", "iid", "--clients", str(k)])
    server = None
    try:
        wait_healthy([host])
        server = start_app("server", free_port(), ["--clients-from", host.url, "--db", str(tmp_path / "runs.db")])
        wait_healthy([server])
        status, run = post_json(server.url + "/start", body, timeout_s=600)
        assert status == 200 and run["status"] == "completed", run.get("error")
        return run
    finally:
        stop([a for a in (server, host) if a is not None])


def test_ten_clients_for_100_rounds(tmp_path):
    """Ten iid clients on a client host: FedAvg in plain Python on the same rows, within the scale."""
    run = hosted_run(tmp_path, 10, {"rounds": 100, "secagg": {"threshold": 6}})
    assert_fedavg(run, [client_data(i) for i in range(10)], 100 * SCALE)
    assert len(run["rounds"][-1]["participants"]) == 10


@pytest.mark.parametrize("after", [True, False], ids=["killed after its masked input", "killed before"])
def test_a_client_killed_mid_round_leaves_the_survivors_exact_average(three, after):
    """client_2 is killed at /secagg/masked. After answering: its input is in
    round 1's sum (it arrived), and its self-mask is removed with the others'
    shares. Before: it shared its keys but sent no input, and the masks the
    others share with it are removed with its rebuilt key. From round 2 on
    it is down, and the other two go on."""
    start_server, apps, _ = three
    url = start_server({"client_2": kill_at(apps["client_2"], "masked", after)})
    status, run = post_json(url + "/start", {"rounds": 3, "secagg": {"threshold": 2}})
    assert status == 200 and run["status"] == "completed", run.get("error")
    one, two, three_ = SEED_DATA[0], SEED_DATA[1], client_data(0, seed=7)
    w, b = 0.0, 0.0
    for r, record in enumerate(run["rounds"], start=1):
        took_part = [one, two, three_] if (r == 1 and after) else [one, three_]
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


def test_below_the_threshold_the_run_fails_and_nothing_is_unmasked(three):
    """t = 3 of 3: with client_2 killed before its masked input, two are left:
    the run fails before any client is asked for a share."""
    start_server, apps, proxies = three
    url = start_server({"client_2": kill_at(apps["client_2"], "masked", after=False)})
    status, run = post_json(url + "/start", {"rounds": 2, "secagg": {"threshold": 3}})
    assert status == 200 and run["status"] == "failed"
    assert "fewer than the threshold t=3" in run["error"] and "nothing was revealed" in run["error"]
    assert run["rounds"] == []
    for proxy in proxies.values():
        assert "/secagg/unmask" not in [path for path, _ in proxy.asked]


def tamper(step: str, change: Callable[[dict], dict]) -> Callable[[str, str, Any], Any]:
    return lambda path, phase, reply: (change(reply) if path == f"/secagg/{step}" else reply) \
        if phase == "reply" else None


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
], ids=["low-order key", "malformed key", "short masked vector", "unmasked input"])
def test_a_bad_message_drops_its_client_with_the_reason_and_the_round_goes_on(three, step, change, reason):
    """client_3 lies at one step: it is dropped with its reason, and the
    round is the exact average of the others (masks with client_3 removed
    when it had shared its keys)."""
    start_server, _, _ = three
    url = start_server({"client_3": tamper(step, change)})
    status, run = post_json(url + "/start", {"rounds": 1, "secagg": {"threshold": 2}})
    assert status == 200 and run["status"] == "completed", run.get("error")
    record = run["rounds"][0]
    assert [d["client_id"] for d in record["dropped"]] == ["sim_1"]
    assert reason in record["dropped"][0]["reason"]
    w, b = fedavg_round(SEED_DATA, 0.0, 0.0)
    assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
    assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)


def test_a_wrong_share_is_found_out_and_named(three):
    """client 1 sends a corrupted share of client 3's self-mask seed: the
    server rebuilds b_3 from the first t = 2 shares (1's and 2's), finds it
    disagrees with client 3's commitment, finds the share that explains it
    among the 3 it has, names client 1, and unmasks with the other two.
    (A wrong share beyond the t the server uses is never read, and cannot
    change the sum.)"""
    start_server, _, _ = three
    url = start_server({"client_1": tamper("unmask", lambda r: {**r, "b": {**r["b"], "3": flip(r["b"]["3"])}})})
    status, run = post_json(url + "/start", {"rounds": 1, "secagg": {"threshold": 2}})
    assert status == 200 and run["status"] == "completed", run.get("error")
    math = "\n".join(run["rounds"][0]["math"])
    assert "b_3: the share(s) from client(s) [1] are wrong" in math
    w, b = fedavg_round([*SEED_DATA, client_data(0, seed=7)], 0.0, 0.0)
    assert run["rounds"][0]["global_model"]["w"] == pytest.approx(w, abs=1e-6)


def secrets_seen(proxies: dict[str, Proxy]) -> set[str]:
    """Every sealed share and every revealed share the clients sent, as the base64 text that went over the wire."""
    found = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, str) and len(value) >= 24:
            found.add(value)
    for proxy in proxies.values():
        for reply in proxy.replies:
            walk({k: v for k, v in json.loads(reply).items() if k in ("shares", "b", "s_sk")})
    return found


def test_a_server_killed_mid_round_restarts_that_round_from_scratch(three, tmp_path):
    """kill -9 of the server while round 3's masked inputs are being sent,
    a restart on the same database, resume: round 3 is run again with a
    new session (fresh keys), and the run equals plain FedAvg. No share or
    sealed share the clients sent is in the database or the log."""
    start_server, apps, proxies = three
    reached, release = threading.Event(), threading.Event()
    calls = []

    def hold_third_round(path: str, phase: str, reply: Any) -> Any:
        if path == "/secagg/masked" and phase == "request":
            calls.append(path)
            if len(calls) == 3:
                reached.set()
                release.wait(20)
        return reply if phase == "reply" else None

    url, server = start_server({"client_1": hold_third_round}, with_app=True)
    status, started = post_json(url + "/start", {"rounds": 5, "secagg": {"threshold": 2}, "wait": False})
    assert status == 202
    assert reached.wait(30)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    release.set()
    restarted = start_app("server", urlsplit(url).port, ["--clients", ",".join(p.url for p in proxies.values()),
                                                         "--db", str(tmp_path / "runs.db")])
    try:
        wait_healthy([restarted])
        status, run = post_json(f"{url}/runs/{started['run_id']}/resume", {})
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
    stored = (tmp_path / "runs.db").read_bytes().decode("latin-1")
    shares = secrets_seen(proxies)
    assert len(shares) > 20
    assert not [s for s in shares if s in stored or s in log]


def test_dp_with_secure_aggregation_is_dp_fedavg_on_the_masked_sum(seed_server):
    """dp.local_noise with secagg: each client clips (and would add its noise)
    before masking; with σ = 0 the release is θ_t + Σ_k clip_S(Δ_k) / M, computed here."""
    bound = 0.5
    status, run = post_json(seed_server + "/start", {"rounds": 4, "secagg": True, "dp": {
        "noise_multiplier": 0, "clip": bound, "local_noise": True}})
    assert status == 200 and run["status"] == "completed", run.get("error")
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
    noisy = post_json(seed_server + "/start", {"rounds": 2, "secagg": True, "dp": {
        "noise_multiplier": 1.0, "clip": bound, "local_noise": True}})[1]
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
def test_secagg_settings_that_cannot_work_are_a_400_naming_the_field(seed_server, body, field):
    status, reply = post_json(seed_server + "/start", body)
    assert status == 400, reply
    named = {e["field"] for e in reply.get("errors", [])} | {reply["error"].split(": ")[0]}
    assert field in named, reply


# --- SecAgg+: each client masks with and shares among k neighbours only -----------------

def vanish_at(step: str, after: bool) -> Callable[[str, str, Any], Any]:
    """``kill_at`` for a client on a client host, which cannot be killed alone:
    from /secagg/<step> on its proxy answers 502 as if it were gone; with
    ``after`` that step's reply still goes through first."""
    gone = threading.Event()

    def hook(path: str, phase: str, reply: Any) -> Any:
        if gone.is_set():
            return 502 if phase == "request" else reply
        if path == f"/secagg/{step}" and phase == ("reply" if after else "request"):
            gone.set()
            return reply if after else 502
        return reply if phase == "reply" else None
    return hook


def asked(proxy: Proxy, path: str) -> list[Any]:
    """The JSON bodies of the requests for ``path`` that reached ``proxy``."""
    return [body for p, body in proxy.asked if p == path]


@pytest.fixture
def hosted(tmp_path):
    """A client host with n iid clients (sim_c has client_data(c − 1)), each
    behind its own Proxy, and a server that calls the proxies. Yields
    start(n, hooks by client number) → (server url, proxies by client number)."""
    apps: list[App] = []
    proxies: list[Proxy] = []

    def start(n: int, hooks: dict[int, Callable] | None = None) -> tuple[str, dict[int, Proxy]]:
        host = start_app("client_host", free_port(), ["--scenario", "iid", "--clients", str(n)])
        apps.append(host)
        wait_healthy([host])
        mine = {c: Proxy(f"{host.url}/clients/{c}", (hooks or {}).get(c)) for c in range(1, n + 1)}
        proxies.extend(mine.values())
        server = start_app("server", free_port(), ["--clients", ",".join(p.url for p in mine.values()),
                                                   "--db", str(tmp_path / "runs.db")])
        apps.append(server)
        wait_healthy([server])
        return server.url, mine
    try:
        yield start
    finally:
        stop(apps)
        for p in proxies:
            p.close()


def test_secagg_plus_30_clients_with_4_neighbours_each_for_20_rounds_is_fedavg(tmp_path):
    """30 iid clients on a client host, k = 4 (t = 3 by default, a majority of 5):
    every round's model within 20 × the scale of plain-Python FedAvg, and each
    client masked with 4 others (the neighbourhoods the round's math shows)."""
    run = hosted_run(tmp_path, 30, {"rounds": 20, "secagg": {"neighbors": 4}})
    assert run["settings"]["secagg"] == {"neighbors": 4, "threshold": 3, "scale_bits": 24}
    assert_fedavg(run, [client_data(i) for i in range(30)], 20 * SCALE)
    for record in run["rounds"]:
        assert len(record["participants"]) == 30
        math = "\n".join(record["math"])
        assert "SecAgg+: k=4 neighbours each" in math
        hoods = re.findall(r"N\((\d+)\) = \[([0-9, ]+)\]", math.split("neighbours only: ")[1].split("\n")[0])
        assert len(hoods) == 3 and all(len(members.split(", ")) == 4 for _, members in hoods)


@pytest.mark.parametrize("after", [True, False], ids=["lost after its masked input", "lost before"])
def test_secagg_plus_a_client_lost_mid_round_leaves_the_survivors_exact_average(hosted, after):
    """12 clients, k = 4, t = 3; sim_1 vanishes at /secagg/masked. It was sent its
    4 neighbours' keys only, and only their shares. After answering: its input is
    in round 1's sum (b_1 rebuilt from its neighbours' shares). Before: its pair
    masks come off for its 4 neighbours, all in U3, and no one else. From round 2
    on it is gone, and the other 11 go on."""
    url, proxies = hosted(12, {1: vanish_at("masked", after)})
    status, run = post_json(url + "/start", {"rounds": 3, "secagg": {"neighbors": 4}})
    assert status == 200 and run["status"] == "completed", run.get("error")
    data = {f"sim_{c}": client_data(c - 1) for c in range(1, 13)}
    w = b = 0.0
    for r, record in enumerate(run["rounds"], start=1):
        took_part = sorted(data) if (r == 1 and after) else sorted(set(data) - {"sim_1"})
        assert sorted(p["client_id"] for p in record["participants"]) == took_part
        w, b = fedavg_round([data[c] for c in took_part], w, b)
        assert record["global_model"]["w"] == pytest.approx(w, abs=1e-6)
        assert record["global_model"]["b"] == pytest.approx(b, abs=1e-6)
    first = run["rounds"][0]
    assert [d["client_id"] for d in first["dropped"]] == ["sim_1"]
    index = asked(proxies[1], "/secagg/advertise")[0]["index"]
    peers = sorted(int(j) for j in asked(proxies[1], "/secagg/share")[0]["peers"])
    neighbours = [j for j in peers if j != index]
    assert index in peers and len(neighbours) == 4  # its neighbourhood's keys, not all 12 clients'
    masked = asked(proxies[1], "/secagg/masked")[0]
    assert sorted(int(j) for j in masked["received"]) == neighbours and masked["survivors"] == peers
    if after:  # missing only from the unmasking: 4 neighbours' shares of b_1 ≥ t
        assert first["dropped"][0]["reason"].startswith("secagg unmask: ")
    else:
        assert first["dropped"][0]["reason"].startswith("secagg masked: ")
        math = "\n".join(first["math"])
        assert f"the masks of dropped client {index} = " in math
        assert f"its pairs with U3 ∩ N({index}) = {neighbours})" in math


def test_secagg_plus_a_neighbourhood_below_t_fails_the_round_and_nothing_is_unmasked(hosted):
    """10 clients, k = 4, t = 3: three of client 1's four neighbours vanish before
    their masked input. 7 of 10 are left, more than t, but b_1 could get only 2
    shares: the run fails before any client is asked to unmask."""
    proxies: dict[int, Proxy] = {}

    def index(c: int) -> int:
        return asked(proxies[c], "/secagg/advertise")[-1]["index"]

    def victims() -> list[int]:  # (the share wave has ended when the masked one begins)
        one = next(c for c in proxies if index(c) == 1)
        return sorted(int(j) for j in asked(proxies[one], "/secagg/share")[-1]["peers"] if j != "1")[:3]

    def hook_for(c: int) -> Callable[[str, str, Any], Any]:
        def hook(path: str, phase: str, reply: Any) -> Any:
            if phase == "request" and path == "/secagg/masked" and index(c) in victims():
                return 502
            return reply if phase == "reply" else None
        return hook

    url, started = hosted(10, {c: hook_for(c) for c in range(1, 11)})
    proxies.update(started)
    status, run = post_json(url + "/start", {"rounds": 2, "secagg": {"neighbors": 4}})
    assert status == 200 and run["status"] == "failed"
    assert "fewer than the threshold t=3" in run["error"] and "nothing was revealed" in run["error"]
    assert "b_1: only 2 of the 5 clients of N[1] are left" in run["error"], run["error"]
    assert run["rounds"] == []
    assert sum(1 for p in proxies.values() if asked(p, "/secagg/masked")) == 10
    for proxy in proxies.values():
        assert asked(proxy, "/secagg/unmask") == []


@pytest.fixture(scope="module")
def thirty_unreachable(tmp_path_factory):
    """A server configured with 30 clients that all refuse connections: /start
    checks its body before it calls any."""
    with contextlib.ExitStack() as holes:
        urls = [holes.enter_context(refusing_url()) for _ in range(30)]
        app = start_app("server", free_port(), ["--clients", ",".join(urls),
                                                "--db", str(tmp_path_factory.mktemp("secagg") / "runs.db")])
        try:
            wait_healthy([app])
            yield app.url
        finally:
            stop([app])


@pytest.mark.parametrize("secagg, field", [
    ({"neighbors": 0}, "secagg.neighbors"),
    ({"neighbors": 30}, "secagg.neighbors"),  # 29 others at most
    ({"neighbors": 1}, "secagg.neighbors"),  # pairs: the server would learn each pair's sum
    ({"neighbors": 3.5}, "secagg.neighbors"),
    ({"neighbors": 4, "threshold": 6}, "secagg.threshold"),  # more than the 5 of a neighbourhood
    ({"threshold": 12}, "secagg.threshold"),  # the default k = 2⌈log2 30⌉ = 10: 11 in a neighbourhood
])
def test_secagg_plus_settings_out_of_range_are_a_400_naming_the_field(thirty_unreachable, secagg, field):
    status, reply = post_json(thirty_unreachable + "/start", {"secagg": secagg})
    assert status == 400, reply
    assert field in {e["field"] for e in reply.get("errors", [])} | {reply["error"].split(": ")[0]}, reply
