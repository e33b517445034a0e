"""Faults: a client or the server killed with SIGKILL in the middle of a run,
the server stopped by Ctrl-C or SIGTERM (each on a real process: make
test-all); a client lost mid-run, stop and resume, resume refused with other
clients, concurrent starts, many concurrent readers and the CSV export (the
server app in this process: make test).

A server "restarted" after its process ended is a new server app on the same
SQLite file (conftest's ``servers``): what server_app.py builds at start
(create_app) and nothing more."""
from __future__ import annotations

import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flask import Flask

import launcher
from conftest import ROOT, Served
from fedavg.http.client_app import create_app as create_client_app
from fedavg_server.http_transport import HttpTransport
from launcher import wait_for_run as poll_run


def client_app(name: str) -> Flask:
    """One of the seed's clients (its folder's data.csv), open (no token)."""
    return create_client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"), "TOKEN": None})


def absent(url: str) -> Flask:
    """A client that is not there: every call fails. In this process that is
    a 503; over HTTP it would be a refused connection, and the round drops
    the client either way (without the refused connection's retry pause)."""
    app = Flask("absent")

    @app.route("/<path:_>", methods=["GET", "POST"])
    def gone(_):
        return {"error": f"no client at {url}"}, 503

    return app


def poll(http, run_id: int, until, timeout_s: float = 60.0) -> dict:
    """GET /runs/<id> through a test client until ``until(run)`` holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = http.get(f"/runs/{run_id}")
        assert r.status_code == 200, r.get_data(as_text=True)
        run = r.get_json()
        if until(run):
            return run
        assert time.monotonic() < deadline, f"run {run_id}: {run['status']}, {len(run['rounds'])} rounds"
        time.sleep(0.01)  # polling interval


def idle(http, timeout_s: float = 10.0) -> None:
    """GET /health until no run is in progress (bounded). A run's thread
    outlives its recorded end by a moment (it logs its warnings after), and
    until it is gone the server still counts the run as running."""
    deadline = time.monotonic() + timeout_s
    while (running := http.get("/health").get_json()["running_run_id"]) is not None:
        assert time.monotonic() < deadline, f"run {running} still in progress after {timeout_s:g} s"
        time.sleep(0.01)  # polling interval


# --- real processes: kill -9, Ctrl-C, SIGTERM --------------------------------------------------


@pytest.fixture
def seed_clients(serve) -> list[str]:
    """The seed's two clients on free loopback ports, in this process: the
    server process under test calls them over HTTP."""
    return [serve(client_app(name)).url for name in ("client_1", "client_2")]


def server_process(db: Path, clients: list[str]) -> launcher.App:
    # env --default-signal: Ctrl-C at its default, as in a terminal, even if
    # these tests run in the background (Python keeps an ignored SIGINT ignored).
    app = launcher.start_app("server", launcher.free_port(), ["--clients", ",".join(clients), "--db", str(db)],
                             wrap=["env", "--default-signal=INT"])
    launcher.wait_healthy([app])
    return app


def kill9(app: launcher.App) -> None:
    os.killpg(app.proc.pid, signal.SIGKILL)
    app.proc.wait(10)


@pytest.mark.system
def test_server_killed_mid_run_keeps_history_and_resumes_to_the_same_model(tmp_path, seed_clients, servers):
    db = tmp_path / "runs.db"
    server = server_process(db, seed_clients)
    settings = {"rounds": 40, "seed": 11, "fraction": 0.5, "pace_s": 0.02}
    try:
        status, started = launcher.post_json(server.url + "/start", {**settings, "wait": False})
        assert status == 202
        run_id = started["run_id"]
        before = poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 5)
        kill9(server)
    finally:
        launcher.stop([server])

    http = servers(HttpTransport(seed_clients), db).http  # the restarted server
    after = http.get(f"/runs/{run_id}").get_json()
    assert after["status"] == "interrupted"
    assert len(after["rounds"]) >= len(before["rounds"])
    # every round that was completed before the kill is there, unchanged
    for old, new in zip(before["rounds"], after["rounds"]):
        assert {k: v for k, v in old.items() if k != "federated_loss"} == \
               {k: v for k, v in new.items() if k != "federated_loss"}

    r = http.post(f"/runs/{run_id}/resume")
    resumed = r.get_json()
    assert r.status_code == 200 and resumed["status"] == "completed", resumed
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 41))

    r = http.post("/start", json={**settings, "pace_s": 0})
    straight = r.get_json()
    assert r.status_code == 200 and straight["status"] == "completed"
    assert resumed["final_model"]["w"] == pytest.approx(straight["final_model"]["w"], abs=1e-12)
    assert resumed["final_model"]["b"] == pytest.approx(straight["final_model"]["b"], abs=1e-12)
    # a completed run cannot be resumed again
    r = http.post(f"/runs/{run_id}/resume")
    assert r.status_code == 409 and "completed" in r.get_json()["error"]


@pytest.mark.system
def test_client_killed_mid_run_is_dropped_and_the_run_completes(serve, servers):
    """client_2, a real process, killed mid-run: dropped ("cannot connect")
    from then on; the next run with min_clients=2 fails naming it; restarted,
    it takes part again."""
    client_1 = serve(client_app("client_1")).url
    port = launcher.free_port()
    client_2 = launcher.start_app("client_2", port)
    try:
        launcher.wait_healthy([client_2])
        http = servers(HttpTransport([client_1, client_2.url])).http
        # Paced so that the kill lands mid-run (9 rounds, 0.9 s, after the third);
        # each round after it pays the refused connection's one retry pause (0.2 s).
        r = http.post("/start", json={"rounds": 12, "pace_s": 0.1, "wait": False, "client_timeout_s": 5})
        assert r.status_code == 202
        run_id = r.get_json()["run_id"]
        poll(http, run_id, lambda r: len(r["rounds"]) >= 3)
        kill9(client_2)
        run = poll(http, run_id, lambda r: r["status"] != "running", timeout_s=120)
        assert run["status"] == "completed", run["error"]
        ns = [r["N"] for r in run["rounds"]]
        assert ns[0] == 4 and ns[-1] == 2 and sorted(ns, reverse=True) == ns
        last = run["rounds"][-1]
        assert [d["client_id"] for d in last["dropped"]] == ["client_2"]
        assert "cannot connect" in last["dropped"][0]["reason"]

        # with min_clients=2 the next run fails cleanly, naming the missing client
        idle(http)
        r = http.post("/start", json={"rounds": 3, "min_clients": 2})
        failed = r.get_json()
        assert r.status_code == 200 and failed["status"] == "failed"
        assert "client_2" in failed["error"] and "min_clients" in failed["error"]
        assert http.get("/health").get_json()["status"] == "ok"

        # the client comes back: the next run uses it again
        client_2 = launcher.start_app("client_2", port)
        launcher.wait_healthy([client_2])
        r = http.post("/start", json={"rounds": 2, "min_clients": 2})
        assert r.status_code == 200 and r.get_json()["status"] == "completed"
        assert [r["N"] for r in r.get_json()["rounds"]] == [4, 4]
    finally:
        launcher.stop([client_2])


@pytest.mark.system
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_server_stopped_mid_run_records_it_interrupted_and_resumable(tmp_path, seed_clients, servers, sig):
    """Ctrl-C (or kill) on the server: the run finishes its round, the
    process exits 0 without a traceback, and the run reads interrupted, to be
    resumed, once the server is back."""
    db = tmp_path / "runs.db"
    server = server_process(db, seed_clients)
    try:
        status, started = launcher.post_json(server.url + "/start", {"rounds": 500, "pace_s": 0.02, "wait": False})
        assert status == 202
        run_id = started["run_id"]
        poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 3)
        os.killpg(server.proc.pid, sig)
        assert server.proc.wait(20) == 0
    finally:
        launcher.stop([server])
    assert "Traceback" not in server.output()
    run = servers(HttpTransport(seed_clients), db).http.get(f"/runs/{run_id}").get_json()  # the restarted server
    assert run["status"] == "interrupted" and "resume" in run["error"]


# --- in this process ---------------------------------------------------------------------------


def test_a_client_lost_mid_run_with_min_clients_2_fails_cleanly(servers):
    """client_1 stops listening mid-run (its connections then refused, as
    after a kill): the round cannot have two clients, the run fails naming
    it, the last good model is kept and the server stays healthy."""
    client_1, client_2 = Served(client_app("client_1")), Served(client_app("client_2"))
    try:
        http = servers(HttpTransport([client_1.url, client_2.url])).http
        r = http.post("/start", json={"rounds": 60, "pace_s": 0.02, "wait": False, "min_clients": 2,
                                      "client_timeout_s": 5})
        assert r.status_code == 202
        run_id = r.get_json()["run_id"]
        before = poll(http, run_id, lambda r: len(r["rounds"]) >= 3)
        client_1.close()
        run = poll(http, run_id, lambda r: r["status"] != "running")
    finally:
        client_1.close()
        client_2.close()
    assert run["status"] == "failed"
    assert "client_1" in run["error"] and "min_clients is 2" in run["error"]
    assert len(run["rounds"]) >= len(before["rounds"]) and all(r["N"] == 4 for r in run["rounds"])
    assert run["final_model"] == run["rounds"][-1]["global_model"]  # the last good model is kept
    assert http.get("/health").get_json()["status"] == "ok"


def test_concurrent_starts_run_once_and_readers_all_succeed(seed_federation):
    """Eight /start at once: one run (202), seven 409s naming it; then 200
    reads of it from 50 threads while it runs, every one answered."""
    app = seed_federation.app

    def start(_):
        r = app.test_client().post("/start", json={"rounds": 30, "pace_s": 0.02, "wait": False})
        return r.status_code, r.get_json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(start, range(8)))
    codes = sorted(code for code, _ in results)
    assert codes == [202] + [409] * 7
    run_id = next(body["run_id"] for code, body in results if code == 202)
    assert all(body["run_id"] == run_id for code, body in results if code == 409)

    def read(_):
        r = app.test_client().get(f"/runs/{run_id}")
        return r.get_json()["run_id"] if r.status_code == 200 else f"{r.status_code}: {r.get_data(as_text=True)}"

    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(read, range(200)))
    assert got == [run_id] * 200
    run = poll(seed_federation.http, run_id, lambda r: r["status"] != "running", timeout_s=120)
    assert run["status"] == "completed"
    idle(seed_federation.http)  # the next test's run starts on this federation


def test_csv_export_has_one_row_per_round(seed_federation):
    run = seed_federation.run(rounds=4)
    resp = seed_federation.http.get(f"/runs/{run['run_id']}?format=csv")
    assert resp.headers["Content-Type"].startswith("text/csv")
    lines = resp.get_data(as_text=True).splitlines()
    assert lines[0] == "round,N,w,b,federated_loss,participants,dropped"
    assert len(lines) == 5
    url_1, url_2 = seed_federation.fed.transport.urls
    for line, record in zip(lines[1:], run["rounds"]):
        cells = line.split(",")
        assert int(cells[0]) == record["round"] and int(cells[1]) == record["N"]
        assert float(cells[2]) == record["global_model"]["w"] and float(cells[3]) == record["global_model"]["b"]
        assert float(cells[4]) == record["federated_loss"]
        assert cells[5] == f"client_1 ({url_1});client_2 ({url_2})" and cells[6] == ""


def test_a_csv_of_a_history_that_cannot_be_read_is_a_json_503(tmp_path, servers):
    """The rounds' pages of the history corrupted while the server runs (its
    runs and their count still read): ?format=csv answers the JSON 503 of
    every endpoint, not a 500 with a traceback from inside the stream."""
    db = tmp_path / "runs.db"
    fed = servers({"http://127.0.0.1:5001": client_app("client_1"), "http://127.0.0.1:5002": client_app("client_2")},
                  db)
    run_id = fed.run(rounds=3)["run_id"]
    with sqlite3.connect(db) as other:  # everything into the main file; the server's cache is dropped
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page, size = (other.execute("SELECT rootpage FROM sqlite_master WHERE name = 'rounds'").fetchone()[0],
                      other.execute("PRAGMA page_size").fetchone()[0])
    with open(db, "r+b") as f:  # garbage over the rounds' table (3 rounds: one page)
        f.seek((page - 1) * size)
        f.write(os.urandom(size))
    assert fed.http.get("/runs").status_code == 200  # the runs still read
    r = fed.http.get(f"/runs/{run_id}?format=csv")
    assert r.status_code == 503 and r.is_json, r.get_data(as_text=True)[:300]
    assert r.get_json()["error"].startswith("the run history is unavailable: ")


def test_a_running_run_can_be_stopped_and_resumed(seed_federation):
    http = seed_federation.http
    r = http.post("/start", json={"rounds": 30, "seed": 4, "pace_s": 0.05, "wait": False})
    run_id = r.get_json()["run_id"]
    poll(http, run_id, lambda r: len(r["rounds"]) >= 2)
    r = http.post(f"/runs/{run_id}/stop")
    assert r.status_code == 202 and r.get_json()["status"] == "stopping"
    stopped = poll(http, run_id, lambda r: r["status"] != "running")
    assert stopped["status"] == "interrupted" and len(stopped["rounds"]) < 30
    idle(http)
    assert http.post(f"/runs/{run_id}/stop").status_code == 409  # no longer running
    assert http.post("/runs/9999/stop").status_code == 404
    r = http.post(f"/runs/{run_id}/resume")
    resumed = r.get_json()
    assert r.status_code == 200 and resumed["status"] == "completed" and len(resumed["rounds"]) == 30
    straight = seed_federation.run(rounds=30, seed=4)
    assert resumed["final_model"] == pytest.approx(straight["final_model"], abs=1e-12)


def test_resume_refuses_to_switch_federations_silently(tmp_path, servers):
    """The server restarted with another client list: resume says what
    changed and refuses, unless asked to go on with the current clients,
    which the run then records."""
    db = tmp_path / "runs.db"
    c1, c2, stranger = "http://127.0.0.1:5001", "http://127.0.0.1:5002", "http://127.0.0.1:5003"
    client_1 = client_app("client_1")
    first = servers({c1: client_1, c2: client_app("client_2")}, db)
    run_id = first.post("/start", {"rounds": 30, "pace_s": 0.05, "wait": False})[1]["run_id"]
    poll(first.http, run_id, lambda r: len(r["rounds"]) >= 2)
    first.post(f"/runs/{run_id}/stop")
    done = len(poll(first.http, run_id, lambda r: r["status"] == "interrupted")["rounds"])
    first.close()  # the server stops

    http = servers({c1: client_1, stranger: absent(stranger)}, db).http  # restarted with other clients
    r = http.post(f"/runs/{run_id}/resume")
    assert r.status_code == 409
    error = r.get_json()["error"]
    assert f"no longer here: {c2}" in error and f"new here: {stranger}" in error
    assert http.get(f"/runs/{run_id}").get_json()["status"] == "interrupted"  # nothing ran
    r = http.post(f"/runs/{run_id}/resume", json={"clients": "current"})
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "completed", body
    assert body["clients"] == [c1, stranger]
    assert all(p["url"] == c1 for r in body["rounds"][done:] for p in r["participants"])
    assert all(d["url"] == stranger for r in body["rounds"][done:] for d in r["dropped"])


C1, C2 = "http://127.0.0.1:5001", "http://127.0.0.1:5002"


def interrupted_seed_run(servers, db) -> tuple[int, int]:
    """A run of the seed's clients at C1 and C2, stopped after round 2 or
    later, its server closed: (run id, rounds done)."""
    first = servers({C1: client_app("client_1"), C2: client_app("client_2")}, db)
    run_id = first.post("/start", {"rounds": 30, "pace_s": 0.05, "wait": False})[1]["run_id"]
    poll(first.http, run_id, lambda r: len(r["rounds"]) >= 2)
    first.post(f"/runs/{run_id}/stop")
    done = len(poll(first.http, run_id, lambda r: r["status"] == "interrupted")["rounds"])
    first.close()
    return run_id, done


def test_resume_refuses_a_url_now_served_by_another_client(tmp_path, servers):
    """The server restarted with the same URLs, but another client (another
    name, other data) now answers one of them: resume says which and
    refuses, unless asked to go on with the current clients; the rounds
    after that record the new client's name and n_k. The same client
    restarted resumes as before."""
    db = tmp_path / "runs.db"
    run_id, done = interrupted_seed_run(servers, db)

    data = tmp_path / "other.csv"
    data.write_text("x,y\n" + "".join(f"{x},{2 * x + 1}\n" for x in range(5)))
    other = create_client_app({"CLIENT_ID": "client_9", "DATA_PATH": str(data), "TOKEN": None})
    http = servers({C1: client_app("client_1"), C2: other}, db).http  # restarted: C2 is someone else now
    r = http.post(f"/runs/{run_id}/resume")
    assert r.status_code == 409
    assert r.get_json()["error"] == (
        f"run {run_id} ran with other clients than this server's: at {C2}: client_2 with n_k=2 was recorded, "
        'client_9 with n_k=5 answers now; resume with {"clients": "current"} to go on with this server\'s '
        "clients (recorded in the run)")
    assert http.get(f"/runs/{run_id}").get_json()["status"] == "interrupted"  # nothing ran
    r = http.post(f"/runs/{run_id}/resume", json={"clients": "current"})
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "completed", body
    assert {(p["client_id"], p["data_size"]) for x in body["rounds"][:done] for p in x["participants"]} == {
        ("client_1", 2), ("client_2", 2)}
    assert {(p["client_id"], p["data_size"]) for x in body["rounds"][done:] for p in x["participants"]} == {
        ("client_1", 2), ("client_9", 5)}


def test_resume_refuses_a_client_whose_data_changed_and_not_one_restarted(tmp_path, servers):
    """Same name, other data (its n_k changed): refused. The same client
    restarted (same name, same n_k): resumed, with no question asked."""
    db = tmp_path / "runs.db"
    run_id, _ = interrupted_seed_run(servers, db)

    data = tmp_path / "more.csv"
    data.write_text((ROOT / "client_2" / "data.csv").read_text() + "5,6\n")
    grown = create_client_app({"CLIENT_ID": "client_2", "DATA_PATH": str(data), "TOKEN": None})
    refused = servers({C1: client_app("client_1"), C2: grown}, db)
    r = refused.http.post(f"/runs/{run_id}/resume")
    assert r.status_code == 409 and f"at {C2}: client_2 with n_k=2 was recorded, client_2 with n_k=3 answers now" \
        in r.get_json()["error"]
    refused.close()  # one server per history
    r = servers({C1: client_app("client_1"), C2: client_app("client_2")}, db).http.post(f"/runs/{run_id}/resume")
    assert r.status_code == 200 and r.get_json()["status"] == "completed", r.get_json()



def test_a_resume_while_a_run_is_under_way_is_refused_before_any_client_is_asked(tmp_path, servers):
    """POST /runs/<id>/resume of an interrupted run while another runs: a
    409 naming the running one, with no /health asked of any client (it
    asked every client first, up to client_timeout_s each, then refused)."""
    from fedavg_server.inprocess import InProcessTransport

    class Counting(InProcessTransport):
        asked: list[str] = []

        def call(self, url, method, path, timeout_s, body=None):
            self.asked.append(path)
            return super().call(url, method, path, timeout_s, body)

    db = tmp_path / "runs.db"
    run_id, _ = interrupted_seed_run(servers, db)
    fed = servers(Counting({C1: client_app("client_1"), C2: client_app("client_2")}), db)
    running = fed.post("/start", {"rounds": 100000, "pace_s": 0.05, "wait": False})[1]["run_id"]
    poll(fed.http, running, lambda r: len(r["rounds"]) >= 1)
    asked = len(Counting.asked)
    r = fed.http.post(f"/runs/{run_id}/resume")
    assert r.status_code == 409 and f"run {running}" in r.get_json()["error"], r.get_json()
    assert "/health" not in Counting.asked[asked:]
    fed.post(f"/runs/{running}/stop")
