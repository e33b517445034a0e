"""What a reader of a long or wide run costs a real server process: its peak
memory (VmHWM from /proc/<pid>/status) and the time and size of one answer.

    .venv/bin/python scripts/bounds_cost.py build              # the histories, once (~430 MB, ~20 s)
    .venv/bin/python scripts/bounds_cost.py compare page warnings resume params models loss csv

The histories are written straight into a RunStore as a server writes them
(FedAvg rounds with each client's model, losses and the math): 10 runs of
400 rounds of 200 clients, and one run of 100,000 rounds of two clients, the
second dropped from every 10th. Each case starts a fresh server process
(server/.venv's python, as the apps run), waits for /health, reads VmHWM,
sends one request, and reads it again. ``resume`` also starts the seed's two
clients and writes an interrupted run of 99,999 of its 100,000 rounds over
them. Linux only (/proc). Figures, not pass/fail: tests/test_bounds.py
holds the bounds.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import launcher
from fedavg.strategies import LOCAL_MODEL, FedAvg, Result
from fedavg_server.records import Dropped, RoundRecord, participant_json, round_json, terms_json
from fedavg_server.runs import RunStore
from fedavg_server.settings import RunSettings

WIDE = "wide.db"  # 10 runs × 400 rounds × 200 clients
LONG = "long.db"  # 100,000 rounds × 2 clients
CASES = {
    "compare": (WIDE, "/compare.svg?runs=" + ",".join(map(str, range(1, 11)))),
    "page": (WIDE, "/runs/1"),
    "warnings": (LONG, "/runs/1?limit=1"),
    "params": (WIDE, "/runs/1/plots/params.svg"),
    "models": (WIDE, "/runs/1/plots/models.svg"),
    "loss": (LONG, "/runs/1/plots/loss.svg"),
    "csv": (LONG, "/runs/1?format=csv"),
}


def rounds_of(count: int, clients: dict[str, tuple[str, int]], seed: int,
              drop_every: int = 0) -> Iterator[dict]:
    """Round records of a FedAvg run over ``clients`` (URL → name, n_k), as
    the store keeps them; the last client dropped from every ``drop_every``-th."""
    strategy = FedAvg(lr=0.01, num_clients=len(clients))
    people = list(clients.items())
    rng = np.random.default_rng(seed)
    theta = np.zeros(2)
    for r in range(1, count + 1):
        out = people[-1:] if drop_every and r % drop_every == 0 else []
        results = [Result(name, url, n, theta + rng.normal(0, 0.1, 2),
                          metrics={"loss_before": float(rng.random()), "loss_after": float(rng.random())})
                   for url, (name, n) in people if (url, (name, n)) not in out]
        step = strategy.aggregate(theta, results, {})
        dropped = [Dropped(name, url, "cannot connect: Connection refused") for url, (name, _) in out]
        yield round_json(RoundRecord(r, "fedavg", theta, step, [participant_json(p, (LOCAL_MODEL,)) for p in results],
                                     dropped, sum(p.n for p in results), terms_json(results), 0.001))
        theta = step.theta


def write_run(store: RunStore, count: int, clients: dict[str, tuple[str, int]], planned: int, status: str,
              drop_every: int = 0) -> int:
    """One run written in one transaction (RunStore.add_round commits each round: minutes for 100,000)."""
    run_id = store.create(RunSettings(rounds=planned, seed=1).to_json(), list(clients), {"w": 0.0, "b": 0.0})
    db, batch, last = store._db, [], None
    db.execute("BEGIN")
    for body in rounds_of(count, clients, run_id, drop_every):
        batch.append((run_id, body["round"], json.dumps({k: v for k, v in body.items() if k != "federated_loss"}),
                      0.01 + 1.0 / body["round"]))
        last = body["global_model"]
        if len(batch) == 5000:
            db.executemany("INSERT INTO rounds (run_id, round, record, federated_loss) VALUES (?, ?, ?, ?)", batch)
            batch = []
    db.executemany("INSERT INTO rounds (run_id, round, record, federated_loss) VALUES (?, ?, ?, ?)", batch)
    db.execute("UPDATE runs SET current_model = ?, status = ? WHERE run_id = ?", (json.dumps(last), status, run_id))
    if status == "completed":
        db.execute("UPDATE runs SET final_model = current_model, finished_at = created_at WHERE run_id = ?",
                   (run_id,))
    db.execute("COMMIT")
    return run_id


def build(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for name, runs, count, k, drop in ((WIDE, 10, 400, 200, 0), (LONG, 1, 100_000, 2, 10)):
        t0 = time.perf_counter()
        (where / name).unlink(missing_ok=True)
        store = RunStore(where / name)
        clients = {f"http://127.0.0.1:{6000 + i}": (f"client_{i + 1}", 20 + i) for i in range(k)}
        for _ in range(runs):
            write_run(store, count, clients, count, "completed", drop)
        store.close()
        print(f"{where / name}: {(where / name).stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def measure(db: Path, path: str, method: str = "GET", body: dict | None = None, clients: tuple[str, ...] = ()) -> None:
    """A fresh server on ``db``: VmHWM before and after one request, its time and size."""
    args = ["--db", str(db), *(["--clients", ",".join(clients)] if clients else [])]
    app = launcher.start_app("server", launcher.free_port(), args, via_poetry=False)
    try:
        launcher.wait_healthy([app])
        before = peak_kib(app.proc.pid)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(app.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                status, size = resp.status, len(resp.read())
        except urllib.error.HTTPError as e:
            status, size = e.code, len(e.read())
        seconds = time.perf_counter() - t0
        after = peak_kib(app.proc.pid)
    finally:
        launcher.stop([app])
    print(f"{method} {path}: HTTP {status}, {size / 1e6:.2f} MB in {seconds:.2f} s; "
          f"VmHWM {before / 1024:.0f} → {after / 1024:.0f} MiB", flush=True)


def resume(where: Path) -> None:
    """POST /runs/1/resume (wait) of 100,000 planned rounds, 99,999 stored, over the seed's two clients."""
    ports = [launcher.free_port(), launcher.free_port()]
    apps = [launcher.start_app(f"client_{i + 1}", port, via_poetry=False) for i, port in enumerate(ports)]
    try:
        launcher.wait_healthy(apps)
        db = where / "resume.db"
        db.unlink(missing_ok=True)
        store = RunStore(db)
        write_run(store, 99_999, {app.url: (app.name, 2) for app in apps}, 100_000, "interrupted")
        store.close()
        measure(db, "/runs/1/resume", "POST", {}, clients=tuple(app.url for app in apps))
    finally:
        launcher.stop(apps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=["build", "resume", *CASES])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fedavg-bounds",
                        help="where the histories are (default: %(default)s)")
    args = parser.parse_args(argv)
    for case in args.cases:
        if case == "build":
            build(args.dir)
        elif case == "resume":
            resume(args.dir)
        else:
            db, path = CASES[case]
            if not (args.dir / db).exists():
                print(f"bounds_cost: no {args.dir / db}: run `build` first", file=sys.stderr)
                return 2
            measure(args.dir / db, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
