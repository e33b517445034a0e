"""Clients on other hosts: each client in its own network namespace with its
own address (ip netns + veth, made and removed here; needs root, as CI has),
the server reaching them by those addresses. One client's link goes down in
the middle of a run: it is dropped after the timeout and the run completes.
The same hosts over mutual TLS: each client's certificate names its own
address (an IP subjectAltName), the server calls https://10.231.k.2 and
checks it; a certificate for another host's address is dropped, named."""
from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import urllib3
from test_tls_federation import new_ca, party, seeds_run
from test_tls_serving import call, flags, pool, wait_tls

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


@contextmanager
def only_one_at_a_time(path: Path, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (flock; released when the file
    closes, whatever happens to this process) for the duration."""
    with open(path, "w") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{path} still locked after {timeout_s:g} s: another test's hosts") from None
                time.sleep(0.1)  # polling interval
        yield


@pytest.fixture
def hosts():
    """Two test hosts, 10.231.1.2 and 10.231.2.2, each behind its own veth."""
    assert os.geteuid() == 0, "this test makes network namespaces: run it as root (CI does)"
    # The addresses and the blackhole route are the whole machine's: a second
    # set at once (another xdist worker, another checkout's tests) would fail
    # to add them, or take the first one's traffic. One set at a time.
    with only_one_at_a_time(Path("/tmp/fedavg-test-hosts.lock")):
        yield from _make_hosts()


def _make_hosts() -> Iterator[list[tuple[str, str, str]]]:
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


@needs_root
def test_clients_on_their_own_hosts_over_mutual_tls_and_a_certificate_for_another_host(hosts, tmp_path):
    """client_k at 10.231.k.2 in its own namespace, with a certificate for
    that address only; the server calls https://10.231.k.2:500k and checks
    each chain and address: the seed's 5 rounds reach the plain-Python
    reference. Then client_2 restarted with a certificate of the same CA for
    client_1's host, 10.231.1.2: the server drops it, the reason naming the
    address it was for and the one it was called at, and goes on with client_1."""
    ca = new_ca(tmp_path)
    addrs = [addr for _, addr, _ in hosts]
    certs = {"server": party(tmp_path, ca, "server", ["localhost", "127.0.0.1"]),
             "operator": party(tmp_path, ca, "operator", ["localhost"]),
             **{f"client_{k}": party(tmp_path, ca, f"client_{k}", [addr]) for k, addr in enumerate(addrs, start=1)}}
    elsewhere = party(tmp_path, ca, "client_2", [addrs[0]], file="client_2-at-client_1s-address")
    urls = [f"https://{addr}:{5000 + k}" for k, addr in enumerate(addrs, start=1)]
    as_server = pool(certs["server"], certs["server"].ca)
    apps: list[launcher.App] = []
    try:
        for k, (ns, addr, _) in enumerate(hosts, start=1):
            apps.append(launcher.start_app(f"client_{k}", 5000 + k, flags(certs[f"client_{k}"]), host=addr,
                                           wrap=["ip", "netns", "exec", ns]))
        port = launcher.free_port()
        apps.append(launcher.start_app("server", port, ["--clients", ",".join(urls), "--db", str(tmp_path / "runs.db"),
                                                        *flags(certs["server"])]))
        for app, url in zip(apps, urls):
            wait_tls(app, url + "/health", as_server)  # up, over TLS, from this (the root) namespace
        server = f"https://localhost:{port}"
        operator = pool(certs["operator"], certs["operator"].ca)
        wait_tls(apps[-1], server + "/health", operator)

        run = seeds_run(operator, server)
        assert all([p["url"] for p in r["participants"]] == urls and not r["dropped"] for r in run["rounds"])

        launcher.stop([apps[1]])
        ns2, addr2, _ = hosts[1]
        apps[1] = launcher.start_app("client_2", 5002, flags(elsewhere), host=addr2, wrap=["ip", "netns", "exec", ns2])
        # up at 10.231.2.2 with a certificate the CA signed for 10.231.1.2: checked against that name, it answers
        wait_tls(apps[1], urls[1] + "/health", urllib3.PoolManager(
            ca_certs=str(tmp_path / "ca.crt"), cert_file=str(certs["server"].cert), key_file=str(certs["server"].key),
            cert_reqs="CERT_REQUIRED", assert_hostname=addrs[0], retries=False, timeout=30))
        status, run = call(operator, "POST", server + "/start", {"rounds": 2, "min_clients": 1})
        assert status == 200 and run["status"] == "completed", run
        assert [p["client_id"] for r in run["rounds"] for p in r["participants"]] == ["client_1", "client_1"]
        dropped = [d for r in run["rounds"] for d in r["dropped"]]
        assert [d["url"] for d in dropped] == [urls[1], urls[1]], dropped
        for d in dropped:
            reason = d["reason"]
            assert "wrong name" in reason and addrs[0] in reason and reason.endswith(f"not {addrs[1]}"), d
    finally:
        launcher.stop(apps)


@needs_root
def test_two_shard_hosts_on_their_own_hosts_and_one_killed_mid_run(hosts, tmp_path):
    """A population of 40 in two shards, each client host in its own namespace (10.231.k.2), the server
    reaching both by index (--clients-from both); shard 2's host killed with SIGKILL after round 3: each
    round after that drops exactly its 20 clients, each naming the host, and the run completes on shard 1's."""
    import signal
    apps: list[launcher.App] = []
    try:
        urls = []
        for k, (ns, addr, _) in enumerate(hosts, start=1):
            app = launcher.start_app("client_host", 6000 + k, ["--population", "40", "--shard", f"{k}/2"],
                                     host=addr, wrap=["ip", "netns", "exec", ns])
            apps.append(app)
            urls.append(app.url)
        launcher.wait_healthy(apps)
        server = launcher.start_app("server", launcher.free_port(),
                                    ["--clients-from", ",".join(urls), "--db", str(tmp_path / "runs.db")])
        apps.append(server)
        launcher.wait_healthy(apps)
        assert get_json(server.url + "/health")["clients"] == [f"{u}/clients/{k}" for u in urls for k in range(1, 21)]

        status, started = launcher.post_json(server.url + "/start", {
            "rounds": 10, "pace_s": 0.05, "client_timeout_s": 2, "min_clients": 1, "wait": False})
        assert status == 202, started
        run_id = started["run_id"]
        poll_run(server.url, run_id, lambda r: len(r["rounds"]) >= 3)
        os.killpg(apps[1].proc.pid, signal.SIGKILL)  # shard 2's host dies (its whole process group)
        run = poll_run(server.url, run_id, lambda r: r["status"] != "running", timeout_s=120)
        assert run["status"] == "completed", run["error"]
        first, last = run["rounds"][0], run["rounds"][-1]
        assert [p["client_id"] for p in first["participants"]] == [f"sim_{k}" for k in range(1, 41)]
        assert [p["client_id"] for p in last["participants"]] == [f"sim_{k}" for k in range(1, 21)]
        assert [d["client_id"] for d in last["dropped"]] == [f"sim_{k}" for k in range(21, 41)]
        reasons = {d["reason"] for d in last["dropped"]}
        assert len(reasons) == 1 and reasons.pop().startswith(f"its host's {urls[1]}/batch/train: "), last["dropped"]
    finally:
        launcher.stop(apps)
