"""Faults that used to leave the server stuck: a client that never answers
while the server process is asked to stop, and a run history that is
corrupt, read-only or on a full disk (real server processes: make test-all);
pages of the history corrupt or deleted under a running server, and an end
the store cannot take (the server app in this process: make test)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

import launcher
from conftest import ROOT
from fedavg.http.client_app import create_app as create_client_app
from fedavg_server.federation import Federation
from fedavg_server.http_transport import HttpTransport
from fedavg_server.runs import RunStore, StoreError

# Mounting a small filesystem and dropping privileges need root; CI runs as
# root and runs these (a non-root CI fails them loudly); a developer without
# root is told why they did not run.
needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="mounts a small tmpfs / runs the server as nobody: needs root (CI runs it)")


def get(url: str) -> tuple[int, dict]:
    status, _, body = launcher.fetch(url, timeout_s=10)
    return status, json.loads(body or b"{}")


def poll(what: str, check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.05)  # polling interval
    return found


def server(db: Path, clients: str, **kw) -> launcher.App:
    app = launcher.start_app("server", launcher.free_port(), ["--clients", clients, "--db", str(db)], **kw)
    launcher.wait_healthy([app])
    return app


def seed_client_apps() -> list[Flask]:
    return [create_client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"), "TOKEN": None})
            for name in ("client_1", "client_2")]


@pytest.fixture
def seed_clients(serve) -> str:
    """The seed's two clients on free loopback ports in this process, as
    --clients gives them: what a server process under test calls."""
    return ",".join(serve(app).url for app in seed_client_apps())


@pytest.fixture
def seed_server(servers, tmp_path) -> tuple[FlaskClient, Path]:
    """A server app over the seed's two client apps, in this process, its
    history in runs.db: (its test client, that file)."""
    db = tmp_path / "runs.db"
    urls = ("http://127.0.0.1:5001", "http://127.0.0.1:5002")
    return servers(dict(zip(urls, seed_client_apps())), db).http, db


# --- a client that never answers ---------------------------------------------------------


@pytest.mark.system
def test_sigterm_with_a_hung_client_exits_at_once_and_the_run_is_resumable(tmp_path, serve, servers):
    called, release = threading.Event(), threading.Event()
    hung = Flask("hung")

    @hung.post("/train")
    def train():
        called.set()
        release.wait(120)  # far past the test; released at its end
        return {"local_model": {"w": 1, "b": 0}, "data_size": 2}

    url = serve(hung).url
    db = tmp_path / "runs.db"
    app = server(db, url)
    try:
        status, started = launcher.post_json(app.url + "/start", {"rounds": 3, "client_timeout_s": 60,
                                                                  "wait": False})
        assert status == 202
        assert called.wait(20), "the server never called the client"
        t0 = time.monotonic()
        os.killpg(app.proc.pid, signal.SIGTERM)
        app.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        launcher.stop([app])
    assert took < 8, f"SIGTERM took {took:.1f} s with a hung client (client_timeout_s = 60)"
    assert "Traceback" not in app.output()
    # The server restarted: a new app on the same history (what server_app.py builds at start).
    try:
        r = servers(HttpTransport([url]), db).http.get(f"/runs/{started['run_id']}")
        run = r.get_json()
        assert r.status_code == 200 and run["status"] == "interrupted", run
        assert "the server stopped during round 1" in run["error"]
    finally:
        release.set()


# --- connections --------------------------------------------------------------------------


def closing(app: Flask) -> Flask:
    """A client app that closes every connection after its reply, so that
    each call the server makes to it needs a new descriptor."""
    @app.after_request
    def close_after(response):
        response.headers["Connection"] = "close"
        return response
    return app


@pytest.mark.system
def test_a_server_at_its_limit_of_open_files_keeps_its_run_going(tmp_path, serve):
    """A server allowed 200 open files (ulimit -n 200) gets 300 idle
    connections mid-run: it stops accepting at its connection limit, below
    the file limit, so its calls to the clients (a new connection each)
    still get descriptors and the run completes with both clients in every
    round; once the connections close it answers again. It used to accept
    until no descriptor was left: every call then failed with "Too many open
    files", and the run failed."""
    from test_integration import close_all, idle_connections
    clients = ",".join(serve(closing(app)).url for app in seed_client_apps())
    app = server(tmp_path / "runs.db", clients, wrap=["sh", "-c", 'ulimit -n 200 && exec "$@"', "sh"])
    held = []
    try:
        rounds = 30
        status, started = launcher.post_json(app.url + "/start", {"rounds": rounds, "pace_s": 0.2, "wait": False})
        assert status == 202
        run_id = started["run_id"]
        poll("round 2", lambda: len(get(f"{app.url}/runs/{run_id}")[1]["rounds"]) >= 2)
        held = idle_connections(app.url, 300)
        # the server has taken what it will take of them (its limit, or every descriptor it may have)
        poll("the connections are accepted", lambda: len(os.listdir(f"/proc/{app.proc.pid}/fd")) >= 100)
        rounds_then = len(re.findall(rf"── Round \d+/{rounds} ──", app.output()))
        end = poll("the run's end in the log",
                   lambda: re.search(rf"Run {run_id} (completed|[A-Z]+):.*", app.output()), timeout_s=60)
        assert rounds_then < rounds, "the run ended before the connections were held"
        assert end.group(1) == "completed", end.group(0)
        close_all(held)
        launcher.wait_healthy([app], timeout_s=30)
        run = get(f"{app.url}/runs/{run_id}")[1]
        assert run["status"] == "completed" and [(r["N"], r["dropped"]) for r in run["rounds"]] == [(4, [])] * rounds
    finally:
        close_all(held)
        launcher.stop([app])
    assert "Traceback" not in app.output() and "Too many open files" not in app.output()


@pytest.mark.system
def test_a_server_allowed_too_few_files_stops_in_one_line(tmp_path, seed_clients):
    """ulimit -n 90: 64 for its own files and its calls out (a connection per
    client, plus --max-parallel: 32 on 2 cores) leave too few connections in;
    it says so and what to raise, instead of failing mid-run."""
    app = launcher.start_app("server", launcher.free_port(), ["--clients", seed_clients, "--db",
                                                              str(tmp_path / "runs.db")],
                             wrap=["sh", "-c", 'ulimit -n 90 && exec "$@"', "sh"])
    [(code, out, errors)] = launcher.ended([app])
    assert code == 2 and len(errors) == 1 and "may open 90 files (ulimit -n)" in errors[0], out
    assert "serving on" not in out and "Traceback" not in out


# --- the run history --------------------------------------------------------------------


@pytest.mark.system
def test_a_corrupt_history_file_stops_the_server_in_one_line(tmp_path):
    db = tmp_path / "runs.db"
    db.write_bytes(b"not a database " * 1000)
    app = launcher.start_app("server", launcher.free_port(), ["--db", str(db)])
    assert app.proc.wait(60) == 2
    launcher.stop([app])
    out = app.output()
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(db) in errors[0] and "corrupt" in errors[0]


@pytest.mark.system
@needs_root
def test_a_read_only_history_folder_stops_the_server_in_one_line(tmp_path):
    """The history's folder on a filesystem mounted read-only: no one, root
    included, can create the file (a chmod would not stop root, and dropping
    to another user would need the repository readable by it)."""
    assert os.geteuid() == 0, "mounts a read-only tmpfs: run as root (CI does)"
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], check=True)
    try:
        app = launcher.start_app("server", launcher.free_port(), ["--db", str(folder / "runs.db")])
        assert app.proc.wait(60) == 2, app.output()
        launcher.stop([app])
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    out = app.output()
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(folder / "runs.db") in errors[0], out


@pytest.mark.system
def test_a_second_server_on_the_same_history_stops_in_one_line_naming_the_first(tmp_path, seed_clients):
    """Two server processes on one --db: the second used to open it and mark
    the first's live run interrupted (so while it went on it read
    interrupted, with no final model, and the second would resume it a
    second time). Now the second stops (exit 2) naming the first's pid, and
    the first's run reads running and goes on."""
    db = tmp_path / "runs.db"
    first = server(db, seed_clients)
    second = None
    try:
        # A run longer than any start of the second server, stopped at the end by the test.
        status, started = launcher.post_json(first.url + "/start", {"rounds": 100000, "pace_s": 0.1, "wait": False})
        assert status == 202
        run_id = started["run_id"]
        poll("round 1", lambda: get(f"{first.url}/runs/{run_id}")[1]["rounds"])
        second = launcher.start_app("server", launcher.free_port(), ["--clients", seed_clients, "--db", str(db)])
        poll("the second server stops or serves",
             lambda: second.proc.poll() is not None or "serving on" in second.output(), timeout_s=60)
        out = second.output()
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert second.proc.wait(10) == 2 and len(errors) == 1, out
        assert f"pid {first.proc.pid}" in errors[0] and str(db) in errors[0] and "Traceback" not in out
        then = get(f"{first.url}/runs/{run_id}?limit=1")[1]
        assert then["status"] == "running" and then["final_model"] is None
        rounds_then = get(f"{first.url}/status")[1]["round"]
        poll("two more rounds", lambda: (s := get(f"{first.url}/status")[1])["round"] >= rounds_then + 2
             and s["status"] == "running")
        assert launcher.post_json(f"{first.url}/runs/{run_id}/stop")[0] == 202
    finally:
        launcher.stop([app for app in (first, second) if app is not None])


def test_a_history_another_store_holds_is_refused_naming_its_pid(tmp_path):
    """RunStore's lock in this process: a second store on the file is
    refused (it would have marked the first's running run interrupted), and
    the lock goes when the first store closes."""
    first = RunStore(tmp_path / "runs.db")
    run_id = first.create({"rounds": 3}, [], {"w": 0.0, "b": 0.0})
    with pytest.raises(StoreError, match=rf"is in use by another server \(pid {os.getpid()}\)"):
        RunStore(tmp_path / "runs.db")
    assert first.summary(run_id)["status"] == "running"
    first.close()
    again = RunStore(tmp_path / "runs.db")
    assert again.summary(run_id)["status"] == "interrupted"  # what a restarted server reads
    again.close()


def test_corrupt_pages_are_a_503_on_the_history_while_health_and_status_answer(seed_server, caplog):
    http, db = seed_server
    r = http.post("/start", json={"rounds": 3})
    run = r.get_json()
    assert r.status_code == 200 and run["status"] == "completed"
    # Everything into the main file, then garbage over every page after the first.
    with sqlite3.connect(db) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    for path in ("/runs", f"/runs/{run['run_id']}"):
        r = http.get(path)
        assert r.status_code == 503 and "run history is unavailable" in r.get_json()["error"], (path, r.get_json())
    assert http.get("/health").status_code == 200
    r = http.get("/status")
    assert r.status_code == 200 and "run history is unavailable" in r.get_json()["error"]
    assert "Traceback" not in caplog.text  # what the server would have printed


def test_a_history_deleted_while_running_is_noticed(seed_server, tmp_path):
    http, _ = seed_server
    assert http.post("/start", json={"rounds": 2}).status_code == 200
    for p in tmp_path.glob("runs.db*"):
        p.unlink()
    r = http.post("/start", json={"rounds": 2})
    assert r.status_code == 503 and "deleted or replaced" in r.get_json()["error"], r.get_json()
    assert http.get("/status").status_code == 200


@pytest.mark.system
@needs_root
def test_a_full_disk_fails_the_run_the_truth_is_told_and_it_is_recorded_once_there_is_room(tmp_path, seed_clients):
    """A server process's history on a 1 MiB tmpfs, nearly filled: the run fails "disk full"
    instead of hanging as "running"; /status says so while the store cannot
    record it; freed space lets the server record it, and a new run start."""
    assert os.geteuid() == 0, "mounts a tmpfs: run as root (CI does)"
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    app = None
    try:
        db = disk / "runs.db"
        app = server(db, seed_clients)
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave a little room: a few dozen rounds' worth
            f.write(b"\0" * (1024 * 1024 - 160 * 1024))
        status, started = launcher.post_json(app.url + "/start", {"rounds": 100000, "wait": False})
        assert status == 202
        run_id = started["run_id"]
        body = poll("the run ends", lambda: (s := get(app.url + "/status")[1])["status"] != "running" and s)
        assert body["run_id"] == run_id and body["status"] == "failed" and "disk full" in body["error"], body
        # not stuck: the run's thread ends a moment after its end is told (it logs its warnings after)
        poll("no run in progress", lambda: get(app.url + "/health")[1]["running_run_id"] is None, timeout_s=10)
        filler.unlink()
        run = poll("the end is recorded", lambda: (r := get(f"{app.url}/runs/{run_id}?limit=1"))[0] == 200 and
                   r[1]["status"] == "failed" and r[1])
        assert "disk full" in run["error"]
        status, again = launcher.post_json(app.url + "/start", {"rounds": 2})
        assert status == 200 and again["status"] == "completed"
    finally:
        if app is not None:
            launcher.stop([app])
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_end_the_store_cannot_take_is_the_truth_until_a_retry_records_it(tmp_path):
    """The store refuses every write (SQLite's query_only: its connection
    cannot write, as with a full disk or a read-only file): the run's end is
    kept in memory, what the API reads says it, and once the store takes
    writes again the end is recorded."""
    store = RunStore(tmp_path / "runs.db")
    fed = Federation(HttpTransport([]), store)
    run_id = store.create({"rounds": 3}, [], {"w": 0.0, "b": 0.0})
    store._db.execute("PRAGMA query_only = ON")
    fed._record_end(run_id, "failed", "disk full: test")
    assert store.summary(run_id)["status"] == "running"  # the store could not take it
    assert fed.truth(store.summary(run_id))["status"] == "failed"
    assert fed.unrecorded() == {run_id: ("failed", "disk full: test")}
    store._db.execute("PRAGMA query_only = OFF")
    poll("the retry records it", lambda: store.summary(run_id)["status"] == "failed", timeout_s=10)
    poll("and forgets it", lambda: not fed.unrecorded(), timeout_s=10)
    fed.transport.close()


def test_a_run_whose_history_closes_as_it_ends_logs_one_line_not_a_traceback(servers, caplog):
    """The run's last act, after its end is recorded, is to log its warnings
    from the history: a history closed by then (the server stopping; a test's
    teardown once caught it) raised StoreError in the run's thread, a
    traceback on stderr. It is one line of the log now."""
    caplog.set_level(logging.INFO, logger="fedavg.server")
    fed = servers({"http://127.0.0.1:9": Flask("nothing"), **{
        "http://127.0.0.1:5001": create_client_app({"CLIENT_ID": "client_1", "TOKEN": None,
                                                    "DATA_PATH": str(ROOT / "client_1" / "data.csv")})}})
    run = fed.run(rounds=1, min_clients=1)
    assert run["warnings"], run
    fed.fed.store.close()
    fed.fed._log_warnings(run["run_id"])  # what the run's thread does last
    assert f"Run {run['run_id']}: its warnings cannot be read: the run history" in caplog.text
