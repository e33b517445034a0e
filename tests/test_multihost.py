"""Clients on other hosts: each client in its own network namespace with its
own address (ip netns + veth, made and removed here; needs root, as CI has),
the server reaching them by those addresses. One client's link goes down in
the middle of a run: it is dropped after the timeout and the run completes."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

import launcher
from launcher import get_json
from launcher import wait_for_run as poll_run

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


# CI runs as root, and there this test always runs (a non-root CI fails it
# loudly below); a developer without root is told why it did not run.
needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="makes network namespaces: needs root (CI runs it)")


@pytest.fixture
def hosts():
    """Two test hosts, 10.231.1.2 and 10.231.2.2, each behind its own veth."""
    assert os.geteuid() == 0, "this test makes network namespaces: run it as root (CI does)"
    tag = str(os.getpid() % 10000)
    made: list[tuple[str, str]] = []
    # Whatever happens to the links, traffic for the test subnet never leaves
    # this machine: the veth routes (/24) win while they exist, this catches the rest.
    ip("route", "add", "blackhole", "10.231.0.0/16")
    try:
        for k in (1, 2):
            ns, root_end, ns_end = f"fedavg{tag}c{k}", f"fa{tag}r{k}", f"fa{tag}n{k}"
            ip("netns", "add", ns)
            made.append((ns, root_end))
            ip("link", "add", root_end, "type", "veth", "peer", "name", ns_end)
            ip("link", "set", ns_end, "netns", ns)
            ip("addr", "add", f"10.231.{k}.1/24", "dev", root_end)
            ip("link", "set", root_end, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"10.231.{k}.2/24", "dev", ns_end)
            ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield [(ns, f"10.231.{k}.2", f"fa{tag}n{k}") for k, (ns, _) in enumerate(made, start=1)]
    finally:
        subprocess.run(["ip", "route", "del", "blackhole", "10.231.0.0/16"], capture_output=True)
        for ns, root_end in made:
            subprocess.run(["ip", "link", "del", root_end], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@needs_root
def test_clients_on_their_own_hosts_and_a_link_that_goes_down(hosts, tmp_path):
    apps: list[launcher.App] = []
    try:
        clients = []
        for k, (ns, addr, _) in enumerate(hosts, start=1):
            app = launcher.start_app(f"client_{k}", 5000 + k, host=addr, wrap=["ip", "netns", "exec", ns])
            apps.append(app)
            clients.append(app.url)
        server = launcher.start_app("server", launcher.free_port(),
                                    ["--clients", ",".join(clients), "--db", str(tmp_path / "runs.db")])
        apps.append(server)
        launcher.wait_healthy(apps)

        status, started = launcher.post_json(server.url + "/start", {
            "rounds": 12, "pace_s": 0.05, "client_timeout_s": 1, "wait": False})
        assert status == 202
        run_id = started["run_id"]
        poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 3)
        ns2, _, link2 = hosts[1]
        ip("netns", "exec", ns2, "ip", "link", "set", link2, "down")  # client_2's host drops off the network
        t0 = time.monotonic()
        run = poll_run(server.url, run_id, lambda r: r["status"] != "running", timeout_s=60)
        assert run["status"] == "completed", run["error"]
        assert time.monotonic() - t0 < 40  # every wait bounded by the 1 s timeout
        first, last = run["rounds"][0], run["rounds"][-1]
        assert [p["url"] for p in first["participants"]] == clients and first["N"] == 4
        assert [p["client_id"] for p in last["participants"]] == ["client_1"] and last["N"] == 2
        assert [d["url"] for d in last["dropped"]] == [clients[1]]
        assert "no reply within 1 s" in last["dropped"][0]["reason"] or "cannot connect" in last["dropped"][0]["reason"]
        assert get_json(server.url + "/health")["status"] == "ok"
    finally:
        launcher.stop(apps)
