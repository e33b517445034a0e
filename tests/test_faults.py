"""Faults on real processes: a client or the server killed with SIGKILL in
the middle of a run, concurrent starts, many concurrent readers."""
from __future__ import annotations

import os
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import launcher
from launcher import get_json
from launcher import wait_for_run as poll_run

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system


@pytest.fixture
def fed(tmp_path):
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    db = tmp_path / "runs.db"
    apps = launcher.start_federation(ports, server_args=["--db", str(db)])
    apps_list = apps  # the tests may replace processes; stop whatever is there at the end
    yield apps_list, ports, db
    launcher.stop(list(apps_list.values()))


def kill9(app: launcher.App) -> None:
    os.killpg(app.proc.pid, signal.SIGKILL)
    app.proc.wait(10)


def test_server_killed_mid_run_keeps_history_and_resumes_to_the_same_model(fed):
    apps, ports, db = fed
    server = apps["server"]
    settings = {"rounds": 40, "seed": 11, "fraction": 0.5, "pace_s": 0.02}
    status, started = launcher.post_json(server.url + "/start", {**settings, "wait": False})
    assert status == 202
    run_id = started["run_id"]
    before = poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 5)
    kill9(server)

    apps["server"] = server = launcher.start_app(
        "server", ports["server"], ["--clients", f"{apps['client_1'].url},{apps['client_2'].url}", "--db", str(db)])
    launcher.wait_healthy([server])
    after = get_json(f"{server.url}/runs/{run_id}")
    assert after["status"] == "interrupted"
    assert len(after["rounds"]) >= len(before["rounds"])
    # every round that was completed before the kill is there, unchanged
    for old, new in zip(before["rounds"], after["rounds"]):
        assert {k: v for k, v in old.items() if k != "federated_loss"} == \
               {k: v for k, v in new.items() if k != "federated_loss"}

    status, resumed = launcher.post_json(f"{server.url}/runs/{run_id}/resume")
    assert status == 200 and resumed["status"] == "completed", resumed
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 41))

    status, straight = launcher.post_json(server.url + "/start", {**settings, "pace_s": 0})
    assert status == 200 and straight["status"] == "completed"
    assert resumed["final_model"]["w"] == pytest.approx(straight["final_model"]["w"], abs=1e-12)
    assert resumed["final_model"]["b"] == pytest.approx(straight["final_model"]["b"], abs=1e-12)
    # a completed run cannot be resumed again
    status, again = launcher.post_json(f"{server.url}/runs/{run_id}/resume")
    assert status == 409 and "completed" in again["error"]


def test_client_killed_mid_run_is_dropped_and_the_run_completes(fed):
    apps, ports, _ = fed
    server = apps["server"]
    status, started = launcher.post_json(server.url + "/start",
                                         {"rounds": 60, "pace_s": 0.02, "wait": False, "client_timeout_s": 5})
    assert status == 202
    run_id = started["run_id"]
    poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 3)
    kill9(apps["client_2"])
    run = poll_run(server.url, run_id, lambda r: r["status"] != "running", timeout_s=120)
    assert run["status"] == "completed", run["error"]
    ns = [r["N"] for r in run["rounds"]]
    assert ns[0] == 4 and ns[-1] == 2 and sorted(ns, reverse=True) == ns
    last = run["rounds"][-1]
    assert [d["client_id"] for d in last["dropped"]] == ["client_2"]
    assert "cannot connect" in last["dropped"][0]["reason"]

    # with min_clients=2 the next run fails cleanly, naming the missing client
    status, failed = launcher.post_json(server.url + "/start", {"rounds": 3, "min_clients": 2})
    assert status == 200 and failed["status"] == "failed"
    assert "client_2" in failed["error"] and "min_clients" in failed["error"]
    assert get_json(server.url + "/health")["status"] == "ok"

    # the client comes back: the next run uses it again
    apps["client_2"] = launcher.start_app("client_2", ports["client_2"])
    launcher.wait_healthy([apps["client_2"]])
    status, ok = launcher.post_json(server.url + "/start", {"rounds": 2, "min_clients": 2})
    assert status == 200 and ok["status"] == "completed"
    assert [r["N"] for r in ok["rounds"]] == [4, 4]


def test_concurrent_starts_run_once_and_readers_all_succeed(fed):
    apps, _, _ = fed
    server = apps["server"]

    def start(_):
        return launcher.post_json(server.url + "/start", {"rounds": 30, "pace_s": 0.02, "wait": False})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(start, range(8)))
    codes = sorted(code for code, _ in results)
    assert codes == [202] + [409] * 7
    run_id = next(body["run_id"] for code, body in results if code == 202)
    assert all(body["run_id"] == run_id for code, body in results if code == 409)

    def read(_):
        try:
            return get_json(f"{server.url}/runs/{run_id}")["run_id"]
        except OSError as e:
            return repr(e)

    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(read, range(200)))
    assert got == [run_id] * 200
    run = poll_run(server.url, run_id, lambda r: r["status"] != "running", timeout_s=120)
    assert run["status"] == "completed"


def test_csv_export_has_one_row_per_round(fed):
    apps, _, _ = fed
    server = apps["server"]
    status, run = launcher.post_json(server.url + "/start", {"rounds": 4})
    assert status == 200
    with urllib.request.urlopen(f"{server.url}/runs/{run['run_id']}?format=csv", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/csv")
        lines = resp.read().decode().splitlines()
    assert lines[0] == "round,N,w,b,federated_loss,participants,dropped"
    assert len(lines) == 5
    for line, record in zip(lines[1:], run["rounds"]):
        cells = line.split(",")
        assert int(cells[0]) == record["round"] and int(cells[1]) == record["N"]
        assert float(cells[2]) == record["global_model"]["w"] and float(cells[3]) == record["global_model"]["b"]
        assert float(cells[4]) == record["federated_loss"]
        assert cells[5] == f"client_1 ({apps['client_1'].url});client_2 ({apps['client_2'].url})" and cells[6] == ""


def test_client_killed_mid_run_with_min_clients_2_fails_cleanly(fed):
    apps, ports, _ = fed
    server = apps["server"]
    status, started = launcher.post_json(server.url + "/start", {
        "rounds": 60, "pace_s": 0.02, "wait": False, "min_clients": 2, "client_timeout_s": 5})
    assert status == 202
    run_id = started["run_id"]
    before = poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 3)
    kill9(apps["client_1"])
    run = poll_run(server.url, run_id, lambda r: r["status"] != "running", timeout_s=60)
    assert run["status"] == "failed"
    assert "client_1" in run["error"] and "min_clients is 2" in run["error"]
    assert len(run["rounds"]) >= len(before["rounds"]) and all(r["N"] == 4 for r in run["rounds"])
    assert run["final_model"] == run["rounds"][-1]["global_model"]  # the last good model is kept
    assert get_json(server.url + "/health")["status"] == "ok"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_server_stopped_mid_run_records_it_interrupted_and_resumable(fed, sig):
    """Ctrl-C (or kill) on the server: the run finishes its round, reads
    interrupted, and resume completes it after a restart."""
    apps, ports, db = fed
    server = apps["server"]
    status, started = launcher.post_json(server.url + "/start", {"rounds": 500, "pace_s": 0.02, "wait": False})
    assert status == 202
    run_id = started["run_id"]
    poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 3)
    os.killpg(server.proc.pid, sig)
    assert server.proc.wait(20) == 0
    apps["server"] = server = launcher.start_app(
        "server", ports["server"], ["--clients", f"{apps['client_1'].url},{apps['client_2'].url}", "--db", str(db)])
    launcher.wait_healthy([server])
    run = get_json(f"{server.url}/runs/{run_id}")
    assert run["status"] == "interrupted" and "resume" in run["error"]
    assert "Traceback" not in server.output()


def test_a_running_run_can_be_stopped_and_resumed(fed):
    apps, _, _ = fed
    server = apps["server"]
    status, started = launcher.post_json(server.url + "/start", {"rounds": 30, "seed": 4, "pace_s": 0.05,
                                                                 "wait": False})
    run_id = started["run_id"]
    poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 2)
    status, body = launcher.post_json(f"{server.url}/runs/{run_id}/stop")
    assert status == 202 and body["status"] == "stopping"
    stopped = poll_run(server.url, run_id, lambda r: r["status"] != "running")
    assert stopped["status"] == "interrupted" and len(stopped["rounds"]) < 30
    assert launcher.post_json(f"{server.url}/runs/{run_id}/stop")[0] == 409  # no longer running
    assert launcher.post_json(f"{server.url}/runs/9999/stop")[0] == 404
    status, resumed = launcher.post_json(f"{server.url}/runs/{run_id}/resume")
    assert status == 200 and resumed["status"] == "completed" and len(resumed["rounds"]) == 30
    status, straight = launcher.post_json(server.url + "/start", {"rounds": 30, "seed": 4})
    assert resumed["final_model"] == pytest.approx(straight["final_model"], abs=1e-12)


def test_resume_refuses_to_switch_federations_silently(fed, tmp_path):
    """The server restarted with another client list: resume says what
    changed and refuses, unless asked to go on with the current clients,
    which the run then records."""
    apps, ports, db = fed
    server = apps["server"]
    status, started = launcher.post_json(server.url + "/start", {"rounds": 30, "pace_s": 0.05, "wait": False})
    run_id = started["run_id"]
    poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 2)
    launcher.post_json(f"{server.url}/runs/{run_id}/stop")
    done = len(poll_run(server.url, run_id, lambda r: r["status"] == "interrupted")["rounds"])
    launcher.stop([server])
    with launcher.refusing_url() as stranger:
        apps["server"] = server = launcher.start_app(
            "server", ports["server"], ["--clients", f"{apps['client_1'].url},{stranger}", "--db", str(db)])
        launcher.wait_healthy([server])
        status, body = launcher.post_json(f"{server.url}/runs/{run_id}/resume")
        assert status == 409
        assert f"no longer here: {apps['client_2'].url}" in body["error"] and f"new here: {stranger}" in body["error"]
        assert get_json(f"{server.url}/runs/{run_id}")["status"] == "interrupted"  # nothing ran
        status, body = launcher.post_json(f"{server.url}/runs/{run_id}/resume", {"clients": "current"})
        assert status == 200 and body["status"] == "completed", body
        assert body["clients"] == [apps["client_1"].url, stranger]
        assert all(p["url"] == apps["client_1"].url for r in body["rounds"][done:] for p in r["participants"])
        assert all(d["url"] == stranger for r in body["rounds"][done:] for d in r["dropped"])
