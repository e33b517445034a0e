"""The CPU a default FedAvg round costs, in two checkouts side by side: did a
change make the seed's round (or one of K clients, --clients) dearer? Wall time on a shared 2-core machine
moves by ±20% between runs; the CPU the three processes spend per round
moves far less, so this compares that.

    git worktree add /tmp/before REV && (cd /tmp/before && make install)
    .venv/bin/python scripts/round_cost.py /tmp/before .

Each checkout's three apps are started as the README starts them (with
--clients K, a client host of K iid clients and a server); the checkouts
take turns, REPEAT times, each a 1000-round run after a warm-up. Prints the
CPU milliseconds per round of the server and of each client (or the host),
and the median total for each checkout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
ONE_CHECKOUT = r"""
import os, sys, tempfile
sys.path.insert(0, os.path.join(sys.argv[1], "scripts"))
from launcher import DEFAULT_PORTS, free_port, post_json, start_federation, stop
TICK = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK
def python_pid(app):  # poetry run execs Python; if it ever forks, take its child
    kids = open(f"/proc/{app.proc.pid}/task/{app.proc.pid}/children").read().split()
    return int(kids[0]) if kids else app.proc.pid
from launcher import start_app, wait_healthy
k = int(sys.argv[3])
if k == 2:  # the seed's three apps
    apps = start_federation({n: free_port() for n in DEFAULT_PORTS}, server_args=["--db", tempfile.mkdtemp() + "/r.db"])
else:  # K iid clients on one client host, and a server
    host = start_app("client_host", free_port(), ["--scenario", "iid", "--clients", str(k), "--seed", "0"])
    urls = ",".join(f"{host.url}/clients/{i}" for i in range(1, k + 1))
    apps = {"client_host": host, "server": start_app("server", free_port(), ["--clients", urls, "--db",
                                                                             tempfile.mkdtemp() + "/r.db"])}
    wait_healthy(list(apps.values()))
try:
    pids = {n: python_pid(a) for n, a in apps.items()}
    post_json(apps["server"].url + "/start", {"rounds": 20, "seed": 0})
    before = {n: cpu(p) for n, p in pids.items()}
    post_json(apps["server"].url + "/start", {"rounds": int(sys.argv[2]), "seed": 1})
    print(" ".join(f"{n}={(cpu(p) - before[n]) / int(sys.argv[2]) * 1e3:.4f}" for n, p in pids.items()))
finally:
    stop(list(apps.values()))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="repository folders, each with `make install` done")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=2,
                        help="K: 2 is the seed's three apps; more is K iid clients on one client host")
    args = parser.parse_args()
    totals: dict[Path, list[float]] = {c: [] for c in args.checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "one.py"
        script.write_text(ONE_CHECKOUT)
        for rep in range(args.repeat):
            for checkout in args.checkouts:
                done = subprocess.run([sys.executable, str(script), str(checkout.resolve()), str(args.rounds),
                                       str(args.clients)],
                                      capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    print(f"{checkout}: {done.stderr[-500:]}", file=sys.stderr)
                    return 1
                parts = dict(kv.split("=") for kv in done.stdout.split())
                totals[checkout].append(sum(float(v) for v in parts.values()))
                print(f"{checkout}  repetition {rep + 1}: CPU ms per round {parts}", flush=True)
    for checkout, values in totals.items():
        print(f"{checkout}: median total {statistics.median(values):.3f} ms per round ({len(values)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
