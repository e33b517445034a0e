"""The small things a newcomer trips over. With real processes (make
test-all): make sim with the seed, its relative --csv and --keep; the
server's page URL at start; a client on a taken port; --clients-from a real
client host, and the pooled line it draws. In this process (make test): sim
and the host know the same scenarios; sim refusing the seed with another K;
--clients-from's errors; a completed run that hid a dead client (message,
log, API) and the /start answer's summary first."""
from __future__ import annotations

import importlib.util
import json
import logging
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import launcher
from conftest import ROOT, Served
from fedavg.http.client_app import create_app as create_client_app
from fedavg.scenarios import SCENARIOS, about
from fedavg_server.http_transport import HttpTransport
from reference import SEED_DATA, reference_fedavg

SIM = ROOT / "scripts" / "sim.py"


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_scenario_describes_its_data_in_one_line():
    # The host shows it at start and in /health; sim prints it.
    assert all(about(name) and "\n" not in about(name) for name in SCENARIOS)
    assert about("iid") == "x ~ U(0, 5), y = 2x + 1 + N(0, 0.1²) noise, the same for every client"


@pytest.mark.system
def test_make_sim_seed_runs_the_original_two_clients():
    done = subprocess.run(["make", "sim", "ROUNDS=3", "SIM_ARGS=--scenario seed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(1,3),(2,5) on y = 2x + 1 and (3,4),(4,5) on y = x + 1" in done.stdout
    rows = re.findall(r"^\s+(\d+)\s+4\s+2\s+0\s+(\S+)\s+(\S+)", done.stdout, re.M)
    expected = reference_fedavg(SEED_DATA, rounds=3, lr=0.01, epochs=10)
    assert [int(r) for r, _, _ in rows] == [1, 2, 3]
    for (_, w, b), (w_ref, b_ref) in zip(rows, expected):
        assert (w, b) == (f"{w_ref:.6f}", f"{b_ref:.6f}")


def test_sim_seed_refuses_another_k_with_a_clear_message(monkeypatch, capsys):
    """Refused while reading its command line, before anything starts."""
    sim = load(SIM, "sim")
    monkeypatch.setattr(sys, "argv", ["sim.py", "--scenario", "seed", "--clients", "5"])
    # sim.main makes SIGTERM and SIGHUP stop it as Ctrl-C does: not this process's, after the test.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as exited:
            sim.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert exited.value.code == 2
    assert "scenario seed is the original two clients: K must be 2" in capsys.readouterr().err


@pytest.mark.system
def test_sim_reads_a_relative_csv_from_where_it_is_run_with_its_target(tmp_path):
    rows = [(1, 3), (2, 5), (3, 4), (4, 5), (5, 6), (6, 8)]
    (tmp_path / "mine.csv").write_text("hours,score\n" + "".join(f"{x},{y}\n" for x, y in rows))
    done = subprocess.run([sys.executable, str(SIM), "--scenario", "csv", "--csv", "mine.csv", "--target", "score",
                           "-k", "3", "--rounds", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"your CSV, shuffled and split into K parts ({tmp_path / 'mine.csv'}, predicting its column score)"
            in done.stdout)
    assert re.search(r"^\s+2\s+6\s+3\s+0\s", done.stdout, re.M), done.stdout


class Lines:
    """A process's output lines, read in a thread; ``wait_for`` is bounded."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.seen, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no {pattern!r} in:\n{''.join(self.seen)}")


@pytest.mark.system
def test_sim_keep_leaves_the_page_up_until_ctrl_c():
    # env --default-signal: Ctrl-C at its default, as a terminal's shell starts
    # sim, even if these tests run in the background with SIGINT ignored.
    proc = subprocess.Popen(["env", "--default-signal=INT", sys.executable, str(SIM), "--scenario", "iid", "-k", "5",
                             "--rounds", "2", "--keep"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = Lines(proc)
        url = out.wait_for(r"--keep: the page is (http://127\.0\.0\.1:\d+)/ ")[1]
        with urllib.request.urlopen(url + "/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        assert launcher.get_json(url + "/runs/1")["status"] == "completed"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.system
def test_the_server_prints_the_page_url_when_it_starts(tmp_path):
    port = launcher.free_port()
    server = launcher.start_app("server", port, ["--db", str(tmp_path / "runs.db")])
    try:
        launcher.wait_healthy([server])
        deadline = time.monotonic() + 10
        while "the page:" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval: the reader thread may trail /health
        assert f"server: the page: http://127.0.0.1:{port}/\n" in server.output()
    finally:
        launcher.stop([server])


@pytest.mark.system
@pytest.mark.parametrize("app", ["client_1", "client_2", "client_host", "server"])
def test_an_app_run_by_a_bare_python_says_how_to_run_it(app):
    """`python3 client_1/client_1_app.py` without its environment: one line saying
    how to run it, not a ModuleNotFoundError traceback. (-S: no site-packages, so
    that no fedavg is found whichever python runs the tests.)"""
    done = subprocess.run([sys.executable, "-S", str(ROOT / app / f"{app}_app.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: no module fedavg; run: cd {app} && poetry install && poetry run python " \
                          f"{app}_app.py{' --scenario iid --clients 50' if app == 'client_host' else ''}\n"


@pytest.mark.system
def test_a_client_on_a_taken_port_says_so_and_never_claims_to_serve():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        client = launcher.start_app("client_1", port)
        try:
            assert client.proc.wait(60) == 1
        finally:
            launcher.stop([client])
    out = client.output()
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in out
    assert "serving on" not in out


@pytest.mark.system
def test_clients_from_a_real_client_host_and_its_pooled_line_drawn_as_outside_knowledge(tmp_path):
    """--clients-from reads the host's client list; the server then draws the
    host's pooled least-squares line on the model chart, labelled as outside
    knowledge: here against the line through the scenario's documented rows
    (tests/test_byzantine.py's client_data), computed in closed form."""
    from test_byzantine import client_data
    host = launcher.start_app("client_host", launcher.free_port(), ["--scenario", "iid", "--clients", "7",
                                                                    "--seed", "3"])
    server = launcher.start_app("server", launcher.free_port(),
                                ["--clients-from", host.url, "--db", str(tmp_path / "runs.db")])
    apps = [host, server]
    try:
        launcher.wait_healthy(apps)  # the server waits for the host itself
        expected = [f"{host.url}/clients/{k}" for k in range(1, 8)]
        assert launcher.get_json(server.url + "/health")["clients"] == expected
        rows = [pt for i in range(7) for pt in client_data(i, seed=3)]
        mx, my = sum(x for x, _ in rows) / len(rows), sum(y for _, y in rows) / len(rows)
        w = sum((x - mx) * (y - my) for x, y in rows) / sum((x - mx) ** 2 for x, _ in rows)
        b = my - w * mx
        said = launcher.get_json(host.url + "/scenario")
        assert said["simulated"] is True and said["clients"] == 7
        assert abs(said["pooled_line"]["w"] - w) < 1e-9 and abs(said["pooled_line"]["b"] - b) < 1e-9
        status, run = launcher.post_json(server.url + "/start", {"rounds": 2})
        assert status == 200 and run["status"] == "completed", run
        assert [r["N"] for r in run["rounds"]] == [7 * 20] * 2
        assert "server: 7 client(s) from the client host at" in server.output()
        _, _, svg = launcher.fetch(f"{server.url}/runs/{run['run_id']}/plots/models.svg")
        text = svg.decode()
        assert 'id="outside-line"' in text
        found = re.search(r"<!-- pooled least squares y = (\S+)·x \+ (\S+): outside knowledge \(the (.+?)'s own "
                          r"data\) -->", text)
        assert found, "no outside-knowledge legend"
        assert abs(float(found.group(1)) - w) < 1e-6 and abs(float(found.group(2)) - b) < 1e-6
    finally:
        launcher.stop([server, host])


def test_clients_from_no_host_or_not_a_host_is_a_clear_error(serve):
    """What --clients-from stops the server with (server_app.py prints
    ``error: <this>`` and exits 2, as for a corrupt history)."""
    server_app = load(ROOT / "server" / "server_app.py", "server_app")
    with launcher.refusing_url() as nobody:
        with pytest.raises(ValueError) as refused:
            server_app.clients_from(nobody, 1)
    assert str(refused.value).startswith(f"no client host answers at {nobody} within 1 s")

    client = serve(create_client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" / "data.csv"),
                                      "TOKEN": None}))
    with pytest.raises(ValueError) as refused:
        server_app.clients_from(client.url)
    assert str(refused.value).startswith(f"{client.url}/clients answered HTTP 404: is {client.url} a client host")


def test_a_completed_run_names_the_client_dropped_from_every_round(servers, caplog):
    """client_2 stops listening after the first run (its connections then
    refused, as for a stopped process): the next run completes, and its
    message, its warnings, GET /runs/<id> and the log all say so."""
    caplog.set_level(logging.INFO, logger="fedavg.server")
    client_1, client_2 = (Served(create_client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"),
                                                    "TOKEN": None})) for name in ("client_1", "client_2"))
    try:
        http = servers(HttpTransport([client_1.url, client_2.url])).http
        assert http.post("/start", json={"rounds": 1}).status_code == 200  # the server learns the names
        client_2.close()
        # as curl sends it: a JSON body, Accept: */*
        answer = http.post("/start", data='{"rounds": 2}', headers={"Content-Type": "application/json",
                                                                     "Accept": "*/*"})
        text = answer.get_data(as_text=True)
        run = json.loads(text)
        warning = "client_2 dropped in 2/2 rounds (last reason: cannot connect: Connection refused)"
        assert run["status"] == "completed"
        assert run["message"].startswith(f"FedAvg finished 2 round(s). Warning: {warning}"), run["message"]
        assert run["warnings"][0].startswith(warning) and len(run["warnings"]) == 1
        assert http.get(f"/runs/{run['run_id']}?since=1").get_json()["warnings"] == run["warnings"]
        # The model is client_1's alone: plain-Python FedAvg over client_1 only.
        w, b = reference_fedavg(SEED_DATA[:1], rounds=2, lr=0.01, epochs=10)[-1]
        assert abs(run["final_model"]["w"] - w) < 1e-9 and abs(run["final_model"]["b"] - b) < 1e-9
        logged = [r.getMessage() for r in caplog.records if r.name == "fedavg.server"]
        assert f"Run {run['run_id']} WARNING: {warning}" in "\n".join(logged)

        # curl's answer: the summary first, one key a line; Accept: application/json: one line.
        keys = ["message", "status", "final_line", "final_model", "rounds_completed", "timeouts", "warnings", "url"]
        assert list(run)[:8] == keys and run["url"] == f"/runs/{run['run_id']}"
        assert text.splitlines()[1].startswith('  "message": ')
        one_line = http.post("/start", data=b'{"rounds": 1}', headers={"Accept": "application/json",
                                                                       "Content-Type": "application/json"})
        text = one_line.get_data(as_text=True)
        assert text.count("\n") == 1 and list(json.loads(text))[:8] == keys
    finally:
        client_1.close()
        client_2.close()
