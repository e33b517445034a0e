"""The apps as the README starts them (``cd X && poetry run python X_app.py``,
real processes on free loopback ports: make test-all): a client that stops,
a client's data file missing, ``make run-all`` under Ctrl-C, a closed
terminal, ``| head`` and a port already held. What the seed's run answers
and logs runs on the seed's apps in this process (make test): the bodiless
``POST /start`` against the reference, the math log against the API,
/status and /runs; and the line a client with a bad CSV stops with."""
from __future__ import annotations

import logging
import os
import pty
import re
import resource
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import launcher
from conftest import ROOT
from fedavg.data import DataError
from fedavg.http.client_app import create_app as create_client_app
from reference import SEED_DATA, reference_fedavg

NUM = r"(-?\d+\.\d+(?:e[+-]\d+)?)"


def idle_connections(url: str, count: int) -> list[socket.socket]:
    """``count`` TCP connections to the app at ``url`` that never send a byte:
    no request, no token. Each is open once connect() returns (the kernel
    queues it until the app accepts it)."""
    where = urlsplit(url)
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection((where.hostname, where.port), timeout=30))
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(held: list[socket.socket]) -> None:
    for s in held:
        s.close()


@contextmanager
def open_files(count: int) -> Iterator[None]:
    """This process may open ``count`` files for a while (ulimit -n, raised
    toward its hard limit): the test holds thousands of sockets itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        assert hard == resource.RLIM_INFINITY or hard >= count, \
            f"this test holds {count} sockets: raise the hard limit on open files (ulimit -Hn {count})"
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def run_log(server: launcher.App, run_id: int) -> str:
    """The server's log lines of one run, once its last line is out."""
    wait_for(lambda: re.search(rf"Run {run_id} (completed|FAILED|DIVERGED)", server.output()),
             what=f"the end of run {run_id} in the server log")
    return one_run(server.output(), run_id)


def one_run(out: str, run_id: int) -> str:
    """One run's lines of a whole log: from "Run <id>:" to how it ended."""
    start = out.index(f"Run {run_id}:")
    return out[start:out.index("\n", out.index(f"Run {run_id} ", start + 1))]


def server_log(caplog) -> str:
    """What the server process prints: its log's messages, one after another
    (server_app.py logs "%(message)s" to stdout)."""
    return "".join(r.getMessage() + "\n" for r in caplog.records if r.name == "fedavg.server")


def test_plain_curl_start_matches_reference_round_by_round(seed_federation):
    """The seed's exact command: POST /start with no body and no content type."""
    r = seed_federation.http.post("/start", data=b"")
    assert r.status_code == 200
    run = r.get_json()
    assert run["status"] == "completed" and run["error"] is None
    expected = reference_fedavg(SEED_DATA, rounds=5, lr=0.01, epochs=10)
    assert len(run["rounds"]) == 5
    for record, (w, b) in zip(run["rounds"], expected):
        assert abs(record["global_model"]["w"] - w) < 1e-9
        assert abs(record["global_model"]["b"] - b) < 1e-9
        assert record["N"] == 4
        assert [p["client_id"] for p in record["participants"]] == ["client_1", "client_2"]
        assert [t["weight"] for t in record["terms"]] == [0.5, 0.5]
        assert record["federated_loss"] is not None
    assert run["final_model"] == run["rounds"][-1]["global_model"]


def test_math_log_shows_the_same_numbers_as_the_api(seed_federation, caplog):
    caplog.set_level(logging.INFO, logger="fedavg.server")
    run = seed_federation.run(rounds=3)  # answered once the run, and its log, have ended
    log = one_run(server_log(caplog), run["run_id"])
    blocks = re.split(r"── Round ", log)[1:]
    assert len(blocks) == 3
    for block, record in zip(blocks, run["rounds"]):
        r = record["round"]
        assert block.startswith(f"{r}/3 ── global model in: ")
        # each client's line: n_k, local w and b, loss before → after
        for p in record["participants"]:
            m = re.search(rf"^{p['client_id']}\s+n_k={p['data_size']}\s+local model: w={NUM} b={NUM}"
                          rf"\s+\(loss {NUM}→{NUM}\)$", block, re.M)
            assert m, f"no line for {p['client_id']} in:\n{block}"
            got = [float(g) for g in m.groups()]
            want = [p["local_model"]["w"], p["local_model"]["b"],
                    p["metrics"]["loss_before"], p["metrics"]["loss_after"]]
            assert got == pytest.approx(want, abs=1e-6)
        assert re.search(r"^N = 2 \+ 2 = 4$", block, re.M)
        # the weighted average written out: w = (2/4)·w_1 + (2/4)·w_2 = w
        for name in ("w", "b"):
            m = re.search(rf"^{name} = \(2/4\)·{NUM} \+ \(2/4\)·{NUM} = {NUM}$", block, re.M)
            assert m, block
            w1, w2, out = (float(g) for g in m.groups())
            ps = record["participants"]
            assert [w1, w2] == pytest.approx([ps[0]["local_model"][name], ps[1]["local_model"][name]], abs=1e-6)
            assert out == pytest.approx(record["global_model"][name], abs=1e-6)
            assert out == pytest.approx((w1 + w2) / 2, abs=2e-6)  # the line's own arithmetic holds
        m = re.search(rf"^global model out: y = {NUM}·x \+ {NUM}$", block, re.M)
        assert m and [float(g) for g in m.groups()] == pytest.approx(
            [record["global_model"]["w"], record["global_model"]["b"]], abs=1e-6)
        # the federated MSE of this round's model, from the next round's replies or the final /evaluate
        m = re.search(rf"federated MSE of round {r}'s model .*= {NUM}$", log, re.M)
        assert m and float(m.group(1)) == pytest.approx(record["federated_loss"], abs=1e-6)


def test_status_and_runs_reflect_the_last_run(seed_federation):
    http = seed_federation.http
    run = seed_federation.run(rounds=2, lr=0.02)
    r = http.get("/status")
    assert r.status_code == 200
    st = r.get_json()
    assert st["run_id"] == run["run_id"] and st["status"] == "completed" and st["round"] == 2
    assert st["global_rounds_planned"] == 2
    assert st["current_global_model"] == run["final_model"]
    again = http.get(f"/runs/{run['run_id']}").get_json()
    assert again["rounds"] == run["rounds"]


@pytest.mark.system
def test_a_client_that_stops_is_dropped_and_named(tmp_path):
    """Kill client_2: the next run goes on with client_1 alone (N = 2) and
    says which client was dropped and why."""
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    apps = launcher.start_federation(ports, server_args=["--db", str(tmp_path / "runs.db")])
    try:
        launcher.stop([apps["client_2"]])
        status, run = launcher.post_json(apps["server"].url + "/start",
                                         {"rounds": 2, "client_timeout_s": 5})
        assert status == 200 and run["status"] == "completed", run
        for record in run["rounds"]:
            assert record["N"] == 2
            assert [p["client_id"] for p in record["participants"]] == ["client_1"]
            assert record["dropped"][0]["url"] == apps["client_2"].url
            assert "connect" in record["dropped"][0]["reason"]
        log = run_log(apps["server"], run["run_id"])
        assert "DROPPED" in log and apps["client_2"].url in log
    finally:
        launcher.stop(list(apps.values()))


IDLE = 1100  # past 1023, the highest descriptor select() can watch


@pytest.mark.system
def test_a_thousand_idle_connections_to_each_app_mid_run_change_nothing(tmp_path):
    """1,100 TCP connections that send nothing, no token needed, to the
    server, a client and a client host while a run goes on: each app used to
    die of them (select() cannot watch a descriptor past 1023). Now each
    still answers, and the run completes with every client in every round."""
    with open_files(3 * IDLE + 500):
        client = launcher.start_app("client_1", launcher.free_port())
        host = launcher.start_app("client_host", launcher.free_port(), ["--scenario", "iid", "--clients", "3"])
        urls = ",".join([client.url] + [f"{host.url}/clients/{k}" for k in (1, 2, 3)])
        server = launcher.start_app("server", launcher.free_port(), ["--clients", urls, "--db",
                                                                     str(tmp_path / "runs.db")])
        apps, held = [client, host, server], []
        try:
            launcher.wait_healthy(apps)
            rounds = 6
            status, started = launcher.post_json(server.url + "/start", {"rounds": rounds, "pace_s": 1.5,
                                                                         "wait": False})
            assert status == 202
            run_id = started["run_id"]
            launcher.wait_for_run(server.url, run_id, lambda r: len(r["rounds"]) >= 1)
            for app in apps:
                held += idle_connections(app.url, IDLE)
            launcher.wait_healthy(apps, timeout_s=60)  # each accepted the 1,100 before this one, and answers
            meanwhile = launcher.get_json(f"{server.url}/runs/{run_id}")
            assert meanwhile["status"] == "running" and len(meanwhile["rounds"]) < rounds, "not mid-run"
            run = launcher.wait_for_run(server.url, run_id, lambda r: r["status"] != "running", timeout_s=120)
            assert run["status"] == "completed", run.get("error")
            # client_1's 2 rows and the host's 3 × 20: nobody dropped, before or while the 3,300 were held
            assert [(r["N"], r["dropped"]) for r in run["rounds"]] == [(2 + 3 * 20, [])] * rounds
            assert all(app.proc.poll() is None for app in apps)
        finally:
            close_all(held)
            launcher.stop(apps)
    for app in apps:
        assert "Traceback" not in app.output(), app.output()[-2000:]


@pytest.mark.parametrize("content, message", [
    ("x,y\n1,3\n2,abc\n", "line 3, column y: not a number"),
    ("x,y\n1,3\n2\n", "line 3: 1 values, the header has 2"),
    ("x,y\n1,nan\n", "line 2, column y: not a finite number"),
    ("x,y\n", "no data rows"),
])
def test_client_with_bad_data_stops_with_one_line_naming_the_file(tmp_path, content, message):
    """A client app refuses a bad CSV before anything serves; its entry point
    prints ``error: <this>`` and exits 2 (the missing file's test below runs
    that on a real process)."""
    bad = tmp_path / "data.csv"
    bad.write_text(content)
    with pytest.raises(DataError) as refused:
        create_client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(bad), "TOKEN": None})
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith(f"{bad}") and message in line


@pytest.mark.system
def test_client_with_missing_data_file_exits_2(tmp_path):
    missing = tmp_path / "nope.csv"
    app = launcher.start_app("client_2", launcher.free_port(), ["--data", str(missing)])
    assert app.proc.wait(60) == 2
    launcher.stop([app])
    assert app.output().strip() == f"error: {missing}: file not found"


def _listening(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.system
def test_run_all_starts_three_and_ctrl_c_leaves_nothing_behind(tmp_path):
    """Up, it names the page and the curl line; Ctrl-C stops all three."""
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    args = [f"--{n.replace('_', '-')}-port={p}" for n, p in ports.items()] + [f"--db={tmp_path / 'runs.db'}"]
    # env --default-signal: a terminal's shell starts run-all with Ctrl-C at its
    # default, even if these tests run in the background (run-all keeps an ignored SIGINT ignored).
    proc = subprocess.Popen(["env", "--default-signal=INT", sys.executable, str(ROOT / "scripts" / "run_all.py"),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # bounded: run_all exits if an app fails to start
            seen.append(line)
            if "Ctrl-C stops all three" in line or time.monotonic() > deadline:
                break
        assert any("Ctrl-C stops all three" in s for s in seen), "".join(seen)
        urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
        assert all(_listening(u) for u in urls.values())
        text = "".join(seen)
        assert "[client_1] " in text and "[client_2] " in text and "[server] " in text
        assert re.search(rf"^run-all: all three apps answer /health\. The page: {re.escape(urls['server'])}/$",
                         text, re.M), text
        assert f"curl -X POST {urls['server']}/start" in text
        children = _descendants(proc.pid)
        assert len(children) >= 3
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        assert proc.wait(30) == 0
        assert not any(_listening(u) for u in urls.values())
        assert not [pid for pid in children if _alive(pid)]
        # …and says so, once they are gone: "stopping…" alone left the user wondering
        last = proc.stdout.read().splitlines()
        assert last[-1] == "run-all: stopped client_1, client_2, server: nothing of them is left running.", last
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


RUN_ALL = ROOT / "scripts" / "run_all.py"


def _run_all_args(ports: dict[str, int], db: Path) -> list[str]:
    return [f"--{n.replace('_', '-')}-port={p}" for n, p in ports.items()] + [f"--db={db}"]


@pytest.mark.system
def test_run_all_stops_the_apps_when_its_terminal_closes(tmp_path):
    """Closing the terminal hangs it up: the kernel sends SIGHUP to run-all,
    its session's leader here (`setsid -c`), and its writes fail from then on.
    The apps, in sessions of their own, get nothing: run-all must stop them."""
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    master, terminal = pty.openpty()
    # env --default-signal: a terminal's shell starts run-all with SIGHUP at its
    # default, even if these tests run under nohup (run-all keeps an ignored SIGHUP ignored).
    proc = subprocess.Popen(["setsid", "-c", "env", "--default-signal=HUP", sys.executable, str(RUN_ALL),
                             *_run_all_args(ports, tmp_path / "runs.db")],
                            stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    try:
        seen = _read_until(master, "Ctrl-C stops all three", timeout_s=120)
        assert "Ctrl-C stops all three" in seen, seen
        children = _descendants(proc.pid)
        assert len(children) >= 3
        os.close(master)  # the terminal window goes away
        master = None
        assert proc.wait(30) == 0
        _assert_nothing_left(ports, children)
    finally:
        if master is not None:
            os.close(master)
        _kill_tree(proc, ports)


@pytest.mark.system
def test_run_all_piped_to_head_stops_the_apps_once_head_exits(tmp_path):
    """`make run-all | head -n 3`: once head has its lines and exits, run-all
    must notice (a failed write, or its idle check of the pipe) and stop the
    apps, quietly: no traceback about the broken pipe."""
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    run_all = shlex.join([sys.executable, str(RUN_ALL), *_run_all_args(ports, tmp_path / "runs.db")])
    with open(tmp_path / "stderr", "w+") as err:
        # bash ends when both sides of the pipeline have: head, then run-all
        proc = subprocess.Popen(["bash", "-c", f"{run_all} | head -n 3"], stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run-all still running 120 s after starting; ports {ports}") from None
        finally:
            _kill_tree(proc, ports)
        err.seek(0)
        assert err.read() == ""
    assert len(out.splitlines()) == 3, out
    _assert_nothing_left(ports)


@pytest.mark.system
def test_run_all_refuses_a_port_already_held_and_names_the_holder(tmp_path):
    """An old server still on the port would answer /health for the new one:
    run-all must start nothing, say which process holds the port and how to
    stop it, and exit 2."""

    class OldServer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *_):
            pass

    old = ThreadingHTTPServer(("127.0.0.1", 0), OldServer)
    threading.Thread(target=old.serve_forever, daemon=True).start()
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    ports["server"] = old.server_address[1]
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(RUN_ALL), *_run_all_args(ports, tmp_path / "runs.db")],
                              capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
    finally:
        old.shutdown()
        old.server_close()
    assert done.returncode == 2, done
    assert done.stdout == ""  # nothing started, nothing reported as answering
    assert took < 10, f"took {took:.1f} s"
    me = os.getpid()  # this test process holds the port
    [line] = done.stderr.splitlines()
    assert line.startswith(f"run-all: port {ports['server']} (server) is already in use by pid {me} (")
    assert f"stop it with `kill {me}`" in line and 'make run-all ARGS="--server-port PORT"' in line
    assert not _processes_with_port(ports)


def _read_until(fd: int, text: str, timeout_s: float) -> str:
    """What a terminal shows until ``text`` appears, run-all exits, or the time is up."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while text.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every end of the terminal's other side is closed
            break
        if not chunk:
            break
        seen += chunk
    return seen.decode(errors="replace")


def _assert_nothing_left(ports: dict[str, int], children: list[int] = ()) -> None:
    """Every port can be bound again, and no process of the apps remains."""
    deadline = time.monotonic() + 10
    while True:
        bound = [p for p in ports.values() if _bound(p)]
        left = [pid for pid in children if _alive(pid)] + _processes_with_port(ports)
        if not bound and not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still bound: {bound}; still running: {left}")
        time.sleep(0.05)  # polling interval


def _bound(port: int) -> bool:
    """Whether an app could not listen on the port (binding as the apps do, with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _processes_with_port(ports: dict[str, int]) -> list[int]:
    """Live processes started with ``--port P`` for one of these ports: the
    apps (and their `poetry run`), found whoever their parent is now."""
    wanted = {f"--port\0{p}\0".encode() for p in ports.values()}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(w in cmdline for w in wanted) and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _kill_tree(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    """After a failed test: SIGKILL what is left of a run-all and its apps,
    also apps it left behind (no longer its children)."""
    for pid in _descendants(proc.pid) + _processes_with_port(ports):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _descendants(pid: int) -> list[int]:
    """Every process whose parent chain leads to pid (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
