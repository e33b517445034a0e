"""make bench: how fast and how big Raw FedAvg is on this machine, measured on
real processes started the way the README starts them. Prints a table and
writes bench/results.json (the README's "Performance" section shows it).

Every figure is the median of several repetitions, with their min–max. A
figure that misses its target says MISS; the exit code stays 0: the bench
reports, the tests judge correctness. Only an app that fails to start or a
run that does not complete ends the bench with an error.

    .venv/bin/python scripts/bench.py                      # the full bench (a few minutes)
    .venv/bin/python scripts/bench.py --quick --out x.json # 2 repetitions, K <= 50 (for the tests)

The noop app the round floor is measured against is this file too:
``cd server && poetry run python ../scripts/bench.py --serve-noop --port P``
serves ``POST /noop`` → ``{}`` through ``fedavg.http.service.serve``, the stack
every app uses.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import ROOT, App, free_port, poetry, post_json, start_app, stop, wait_healthy

DEFAULT_OUT = ROOT / "bench" / "results.json"


# --- the noop app: the floor a round is compared with --------------------------------

def serve_noop(host: str, port: int) -> None:
    """A Flask app that does nothing, served exactly as the apps are served
    (waitress, or Werkzeug's server with FEDAVG_WSGI=werkzeug)."""
    from flask import Flask

    from fedavg.http.service import configure_logging, serve

    app = Flask("noop")

    @app.post("/noop")
    def noop():
        return {}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    configure_logging()
    serve(app, host, port)


def start_noop(port: int, env: dict[str, str]) -> App:
    """``cd server && poetry run python ../scripts/bench.py --serve-noop``: the
    server's own environment, in its own process, like the apps."""
    proc = subprocess.Popen(
        [poetry(), "run", "python", "../scripts/bench.py", "--serve-noop", "--port", str(port)],
        cwd=ROOT / "server", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    app = App("noop", f"http://127.0.0.1:{port}", proc)

    def read() -> None:
        for line in proc.stdout:
            app.lines.append(line)

    app._reader = threading.Thread(target=read, daemon=True, name="read-noop")
    app._reader.start()
    return app


# --- figures ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    op: str  # "<=" or ">="
    value: float
    judged_on: str = "median"  # a high-water mark is judged on its max

    def met(self, figure: dict[str, Any]) -> bool:
        x = figure[self.judged_on]
        return x <= self.value if self.op == "<=" else x >= self.value


class Results:
    """The figures in the order they are measured, each with its repetitions."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, Any]] = {}

    def add(self, fid: str, item: int, label: str, unit: str, samples: Sequence[float],
            target: Target | None = None, **extra: Any) -> dict[str, Any]:
        samples = [float(s) for s in samples]
        fig = {"item": item, "label": label, "unit": unit, "median": statistics.median(samples),
               "min": min(samples), "max": max(samples), "n": len(samples), "samples": samples,
               "target": None, "result": None, **extra}
        if target is not None:
            fig["target"] = {"op": target.op, "value": target.value, "judged_on": target.judged_on}
            fig["result"] = "PASS" if target.met(fig) else "MISS"
        self.figures[fid] = fig
        note(f"{label}: {_num(fig['median'])} {unit} ({_num(fig['min'])}–{_num(fig['max'])})"
             + (f"  {fig['result']}" if fig["result"] else ""))
        return fig


def note(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def table(results: Results) -> str:
    """The figures as a Markdown table (readable in a terminal, pasted in the README)."""
    rows = ["| # | Figure | Median | Min–max | Target | Result |", "| --: | :-- | --: | --: | :-- | :-- |"]
    for fig in results.figures.values():
        unit = "" if fig["unit"] == "×" else f" {fig['unit']}"
        target = ""
        if fig["target"]:
            t = fig["target"]
            target = f"{'≤' if t['op'] == '<=' else '≥'} {_num(t['value'])}{unit}"
            if t["judged_on"] != "median":
                target += f" ({t['judged_on']})"
        rows.append(f"| {fig['item']} | {fig['label']} | {_num(fig['median'])}{unit} | "
                    f"{_num(fig['min'])}–{_num(fig['max'])}{unit} | {target} | {fig['result'] or ''} |")
    return "\n".join(rows)


# --- talking to the apps ------------------------------------------------------------------

class BenchError(Exception):
    """An app did not start or a run did not complete: no figure can be trusted."""


def run_rounds(server: App, rounds: int, seed: int, **settings: Any) -> list[float]:
    """One run of ``rounds`` rounds; each round's server-side ``duration_s``."""
    status, run = post_json(server.url + "/start", {"rounds": rounds, "seed": seed, **settings}, timeout_s=3600)
    if status != 200 or run.get("status") != "completed":
        raise BenchError(f"run on {server.url} did not complete: HTTP {status}: {run.get('error') or run}")
    return [r["duration_s"] for r in run["rounds"]]


def post_start_no_body(url: str) -> float:
    """The seed's ``curl -X POST .../start``: no body, no content type, a new
    connection; seconds until the whole answer is read."""
    req = urllib.request.Request(url + "/start", data=b"", method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    elapsed = time.perf_counter() - t0
    run = json.loads(body)
    if run.get("status") != "completed":
        raise BenchError(f"the default run did not complete: {run}")
    return elapsed


def train_body() -> dict[str, Any]:
    """What the server sends a client each round (the seed's defaults)."""
    from fedavg.training import TrainConfig
    from fedavg.wire import train_config_json
    return {"global_model": {"w": 0.0, "b": 0.0}, "round": 1, "config": train_config_json(TrainConfig(seed=1))}


def per_call_urllib3(http, url: str, data: bytes, calls: int) -> float:
    """Median seconds of sequential POSTs over one pooled keep-alive
    connection, the way the server's HttpTransport calls (urllib3 PoolManager)."""
    import urllib3
    timeout = urllib3.Timeout(connect=10, read=10)
    headers = {"Content-Type": "application/json"}
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        resp = http.request("POST", url, body=data, headers=headers, timeout=timeout)
        json.loads(resp.data)
        times.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise BenchError(f"POST {url}: HTTP {resp.status}")
    return statistics.median(times)


def per_call_requests(session, url: str, data: bytes, calls: int) -> float:
    """The same with a requests.Session."""
    headers = {"Content-Type": "application/json"}
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        resp = session.post(url, data=data, headers=headers, timeout=10)
        resp.json()
        times.append(time.perf_counter() - t0)
        if resp.status_code != 200:
            raise BenchError(f"POST {url}: HTTP {resp.status_code}")
    return statistics.median(times)


def connections_opened(http, url: str) -> int:
    """How many TCP connections the pool for ``url`` has opened so far
    (1 = every call reused the first one: keep-alive works)."""
    return http.connection_from_url(url).num_connections


# --- memory ------------------------------------------------------------------------------

def python_pid(app: App) -> int:
    """The pid of the app's Python process. ``poetry run`` execs Python, so it
    is the launched pid; if a Poetry ever forked instead, take its child."""
    pid = app.proc.pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if not any(Path(a.decode(errors="replace")).name == "poetry" for a in argv[:2]):
        return pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise BenchError(f"cannot tell which process of {app.name} is Python: {children}")
    return int(children[0])


def peak_rss_mb(app: App) -> float:
    """VmHWM (peak resident set size) of the app's Python process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{python_pid(app)}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise BenchError(f"no VmHWM for {app.name}")


def pss_mb(app: App) -> float:
    """Proportional set size now, in MB: resident pages, each page shared with
    other processes (the Python, NumPy and OpenSSL libraries the three seed
    apps all map) counted as its share. Sums of RSS count those pages once per
    process; sums of PSS count them once."""
    for line in Path(f"/proc/{python_pid(app)}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise BenchError(f"no Pss for {app.name}")


# --- the machine -------------------------------------------------------------------------

def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages: other work on the machine makes every figure noisier."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> dict[str, Any]:
    import numpy as np

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))

    def git(*args: str) -> str:
        # --no-optional-locks: reading the tree must not rewrite the index.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()

    def version(dist: str) -> str | None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v
        try:
            return v(dist)
        except PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
        "libraries": {d: version(d) for d in ("flask", "werkzeug", "waitress", "urllib3", "requests")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


# --- the plan ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    reps: int
    seed_rounds: int  # rounds per run, item 1
    ks: tuple[int, ...]
    k_rounds: dict[int, int]  # rounds per run at each K, item 2
    train_samples: int
    train_reps: int
    calls: int  # sequential calls per repetition (floor, transport)
    demo_reps: int


FULL = Plan(reps=5, seed_rounds=50, ks=(2, 10, 50, 200, 1000),
            k_rounds={2: 50, 10: 50, 50: 30, 200: 15, 1000: 6},
            train_samples=10**6, train_reps=15, calls=200, demo_reps=9)
QUICK = Plan(reps=2, seed_rounds=10, ks=(2, 10, 50), k_rounds={2: 10, 10: 10, 50: 5},
             train_samples=10**4, train_reps=2, calls=30, demo_reps=2)
WARMUP_ROUNDS = 3  # a first run per stack opens the connections; it is not counted
ROUND_OVERHEAD_TARGET = Target("<=", 2.0)
K_TARGETS = {50: Target("<=", 40.0), 1000: Target("<=", 1000.0)}
TRAIN_TARGET = Target(">=", 0.8)
SEED_RSS_TARGET = Target("<=", 150.0, judged_on="max")
DEMO_TARGET = Target("<=", 50.0)
COMPARE_TARGET = Target("<=", 3.0)  # in-process federations, two worker processes (issue 15)
SECAGG_RATIO_TARGET = Target("<=", 10.0)
SECAGG_K100_TARGET = Target("<=", 2000.0)


# --- item 3: local training ---------------------------------------------------------------

def bench_training(res: Results, plan: Plan) -> None:
    """LocalClient.train against the bare NumPy of the same gradient steps,
    in this process, on the same arrays."""
    import numpy as np

    from fedavg.client import LocalClient
    from fedavg.model import mse
    from fedavg.training import TrainConfig, local_train

    n, epochs, lr = plan.train_samples, 10, 0.01
    rng = np.random.default_rng(0)
    X = rng.uniform(0.0, 5.0, size=(n, 1))
    y = 2.0 * X[:, 0] + 1.0 + rng.normal(0.0, 0.1, size=n)
    client = LocalClient("bench", X, y)
    body = {"global_model": {"w": 0.0, "b": 0.0}, "round": 1, "config": {"lr": lr, "local_epochs": epochs}}

    def bare() -> tuple[np.ndarray, float]:
        # w ← w − lr·2/n·Xᵀ(Xw + b − y),  b ← b − lr·2/n·Σ(Xw + b − y), 10 times
        w, b = np.zeros(1), 0.0
        for _ in range(epochs):
            err = X @ w + b - y
            w = w - lr * (2.0 / n) * (err @ X)
            b = b - lr * (2.0 / n) * float(err.sum())
        return w, b

    reply, status = client.train(body)
    w_bare, b_bare = bare()
    if status != 200 or not np.allclose(reply["local_model"]["w"], w_bare[0], rtol=1e-12) \
            or not np.isclose(reply["local_model"]["b"], b_bare, rtol=1e-12):
        raise BenchError(f"LocalClient.train and the bare steps disagree: {reply} vs {w_bare}, {b_bare}")

    faults: dict[str, list[int]] = {"ours": [], "bare": [], "local_train": [], "mse": []}

    def timed(kind: str, fn: Callable[[], Any]) -> float:
        # Minor page faults too: a temporary of n floats that gets fresh pages
        # from the kernel instead of reused ones costs n/512 faults.
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        faults[kind].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return elapsed

    ours, bares, loops, passes = [], [], [], []
    config = TrainConfig(lr=lr, local_epochs=epochs)
    for _ in range(plan.train_reps):
        ours.append(timed("ours", lambda: client.train(body)))
        bares.append(timed("bare", bare))
        loops.append(timed("local_train", lambda: local_train(np.zeros(1), 0.0, X, y, config)))
        passes.append(timed("mse", lambda: mse(np.zeros(1), 0.0, X, y)))
    label = f"{n:,} samples × {epochs} epochs".replace(",", " ")
    res.add("train_ms", 3, f"LocalClient.train, {label}", "ms", [t * 1e3 for t in ours],
            page_faults=faults["ours"])
    res.add("train_bare_ms", 3, f"bare NumPy, the same {epochs} gradient steps", "ms", [t * 1e3 for t in bares],
            page_faults=faults["bare"])
    res.add("train_ratio", 3, "training throughput ratio bare/ours", "×",
            [b / o for b, o in zip(bares, ours)], TRAIN_TARGET)
    # Where the difference goes: the loop alone, and one MSE pass (train makes two).
    res.add("train_local_train_ms", 3, "  of which local_train (the loop alone)", "ms", [t * 1e3 for t in loops],
            page_faults=faults["local_train"])
    res.add("train_mse_pass_ms", 3, "  one MSE pass (train adds two: loss_before, loss_after)", "ms",
            [t * 1e3 for t in passes], page_faults=faults["mse"])
    res.add("train_ratio_loop", 3, "  ratio bare/local_train", "×", [bare / loop for bare, loop in zip(bares, loops)])


# --- stacks of real apps --------------------------------------------------------------------

class Stack:
    """Apps started for one part of the bench; all stopped on exit."""

    def __init__(self, wsgi: str, db_dir: Path) -> None:
        # No token (an empty FEDAVG_TOKEN means none): the bench calls clients directly.
        self.env = {"FEDAVG_WSGI": wsgi, "FEDAVG_TOKEN": ""}
        self.wsgi = wsgi
        self.db_dir = db_dir
        self.apps: list[App] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: Any) -> None:
        stop(self.apps)

    def start(self, name: str, args: Sequence[str] = ()) -> App:
        app = start_app(name, free_port(), args, env=self.env)
        self.apps.append(app)
        return app

    def server(self, client_urls: Sequence[str], tag: str) -> App:
        return self.start("server", ["--clients", ",".join(client_urls),
                                     "--db", str(self.db_dir / f"{tag}-{self.wsgi}.db")])

    def noop(self) -> App:
        app = start_noop(free_port(), self.env)
        self.apps.append(app)
        return app

    def healthy(self) -> None:
        try:
            wait_healthy(self.apps, timeout_s=180)
        except RuntimeError as e:
            raise BenchError(str(e)) from None


def bench_seed(res: Results, plan: Plan, wsgi: str, db_dir: Path, full_set: bool) -> None:
    """Items 1, 4 (seed processes), 5 and the transport half of 6, on the two
    seed clients, the server and the noop app, all served by ``wsgi``."""
    import urllib3

    tag = "" if wsgi == "waitress" else f" [{wsgi}]"
    fid = "" if wsgi == "waitress" else f"_{wsgi}"
    item = 1 if wsgi == "waitress" else 6
    with Stack(wsgi, db_dir) as stack:
        note(f"starting client_1, client_2, server and the noop app ({wsgi}) …")
        c1, c2 = stack.start("client_1"), stack.start("client_2")
        server = stack.server([c1.url, c2.url], "seed")
        noop = stack.noop()
        stack.healthy()

        http = urllib3.PoolManager(retries=False)
        data = json.dumps(train_body()).encode()
        noop_url = noop.url + "/noop"
        per_call_urllib3(http, noop_url, data, 20)  # warm the connection
        run_rounds(server, WARMUP_ROUNDS, seed=0)

        rounds, floors, rss, pss = [], [], [], []
        for rep in range(plan.reps):
            floors.append(per_call_urllib3(http, noop_url, data, plan.calls))
            rounds.append(statistics.median(run_rounds(server, plan.seed_rounds, seed=rep)))
            rss.append([peak_rss_mb(a) for a in (server, c1, c2)])
            pss.append(sum(pss_mb(a) for a in (server, c1, c2)))
        waves = 1  # a round is one wave of concurrent /train calls
        res.add(f"seed_round_ms{fid}", item,
                f"round, 2 seed clients (median of {plan.seed_rounds}-round runs){tag}", "ms",
                [r * 1e3 for r in rounds])
        res.add(f"noop_floor_ms{fid}", item, f"floor: POST /noop round trip × {waves} wave{tag}", "ms",
                [f * waves * 1e3 for f in floors],
                connections_opened=connections_opened(http, noop_url), calls_per_repetition=plan.calls)
        res.add(f"round_overhead_ratio{fid}", item, f"ratio round / floor{tag}", "×",
                [r / (f * waves) for r, f in zip(rounds, floors)],
                ROUND_OVERHEAD_TARGET if wsgi == "waitress" else None)
        if not full_set:
            return

        demo = []
        for _ in range(plan.demo_reps):
            demo.append(post_start_no_body(server.url))
            rss.append([peak_rss_mb(a) for a in (server, c1, c2)])
            pss.append(sum(pss_mb(a) for a in (server, c1, c2)))
        res.add("demo_start_ms", 5, "default 5-round demo: POST /start (no body) → answer", "ms",
                [d * 1e3 for d in demo], DEMO_TARGET)

        # Peak RSS is a high-water mark: read after every run above, judged on the last (max).
        for i, name in enumerate(("server", "client_1", "client_2")):
            res.add(f"rss_{name}_mb", 4, f"peak RSS, {name} (after each run)", "MB", [r[i] for r in rss])
        res.add("rss_seed_total_mb", 4, "peak RSS, server + client_1 + client_2", "MB",
                [sum(r) for r in rss], SEED_RSS_TARGET)
        res.add("pss_seed_total_mb", 4, "  the same three, PSS (shared library pages counted once)", "MB", pss)

        # Transport: sequential POST /train to a seed client from here, both libraries.
        import requests
        session = requests.Session()
        train_url = c1.url + "/train"
        per_call_requests(session, train_url, data, 20)
        per_call_urllib3(http, train_url, data, 20)
        with_requests, with_urllib3 = [], []
        for rep in range(plan.reps):
            pair = [(with_requests, lambda: per_call_requests(session, train_url, data, plan.calls)),
                    (with_urllib3, lambda: per_call_urllib3(http, train_url, data, plan.calls))]
            for samples, measure in pair if rep % 2 == 0 else pair[::-1]:  # alternate who goes first
                samples.append(measure())
        res.add("train_call_requests_ms", 6, "POST /train to client_1, requests.Session, per call", "ms",
                [t * 1e3 for t in with_requests])
        res.add("train_call_urllib3_ms", 6, "POST /train to client_1, urllib3.PoolManager, per call", "ms",
                [t * 1e3 for t in with_urllib3], connections_opened=connections_opened(http, train_url))
        res.add("train_call_ratio", 6, "per call, requests / urllib3", "×",
                [a / b for a, b in zip(with_requests, with_urllib3)])
        session.close()


def bench_clients(res: Results, plan: Plan, wsgi: str, ks: Sequence[int], db_dir: Path) -> None:
    """Item 2 (and its Werkzeug half in item 6): round time with K clients on
    one client host, and the host's peak RSS at the largest K."""
    tag = "" if wsgi == "waitress" else f" [{wsgi}]"
    fid = "" if wsgi == "waitress" else f"_{wsgi}"
    for k in ks:
        with Stack(wsgi, db_dir) as stack:
            note(f"starting a client host with K={k} (iid) and a server ({wsgi}) …")
            host = stack.start("client_host", ["--scenario", "iid", "--clients", str(k), "--seed", "0"])
            server = stack.server([f"{host.url}/clients/{i}" for i in range(1, k + 1)], f"k{k}")
            stack.healthy()
            run_rounds(server, WARMUP_ROUNDS, seed=0)
            rounds, rss = [], []
            for rep in range(plan.reps):
                rounds.append(statistics.median(run_rounds(server, plan.k_rounds[k], seed=rep)))
                rss.append(peak_rss_mb(host))
            res.add(f"round_ms_k{k}{fid}", 2 if wsgi == "waitress" else 6,
                    f"round, K={k} clients on one client host{tag}", "ms", [r * 1e3 for r in rounds],
                    K_TARGETS.get(k) if wsgi == "waitress" else None, rounds_per_run=plan.k_rounds[k])
            if wsgi == "waitress" and k == max(plan.ks):
                res.add(f"rss_client_host_k{k}_mb", 4, f"peak RSS, client host at K={k} (after each run)",
                        "MB", rss, largest_k=k)


def bench_compare(res: Results, plan: Plan, db_dir: Path) -> None:
    """Item 7: `make compare` with every strategy on the seed scenario, timed as
    a user waits for it: the whole command (its federations in-process, one worker per core)."""
    rounds = 200 if plan is FULL else 20
    times = []
    for rep in range(plan.reps):
        out = db_dir / f"compare-{rep}"
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), "--rounds", str(rounds),
                               "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise BenchError(f"make compare failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        failed = [r["strategy"] for r in json.loads((out / "compare.json").read_text())["results"]
                  if r["status"] != "completed"]
        if failed:
            raise BenchError(f"make compare: {', '.join(failed)} did not complete")
    res.add("compare_all_s", 7, f"make compare: all strategies × {rounds} rounds, seed (whole command)", "s",
            times, COMPARE_TARGET if plan is FULL else None, rounds=rounds)


def bench_secagg(res: Results, plan: Plan, db_dir: Path) -> None:
    """Item 8: a secure-aggregation round against a plain one with 10 clients
    on a client host (the complete graph), one with 100 (SecAgg+'s default
    graph, 14 neighbours each), and where the time goes (in-process)."""
    ks = (10, 100) if plan is FULL else (10,)
    for k in ks:
        rounds = (10 if plan is FULL else 3) if k == 10 else 5
        with Stack("waitress", db_dir) as stack:
            note(f"starting a client host with K={k} (iid) and a server for secure aggregation …")
            host = stack.start("client_host", ["--scenario", "iid", "--clients", str(k), "--seed", "0"])
            server = stack.server([f"{host.url}/clients/{i}" for i in range(1, k + 1)], f"secagg{k}")
            stack.healthy()
            # A client host does every client's share of the protocol in one process: a step may take
            # longer than the default 10 s a client call may (it did at K=100 on the complete graph).
            slow = {"client_timeout_s": 600}
            run_rounds(server, 1, seed=0, secagg=True, **slow)
            plain, secure = [], []
            for rep in range(plan.reps):
                if k == 10:
                    plain.append(statistics.median(run_rounds(server, rounds, seed=rep)))
                secure.append(statistics.median(run_rounds(server, rounds, seed=rep, secagg=True, **slow)))
            res.add(f"secagg_round_ms_k{k}", 8, f"secure-aggregation round, K={k} on one client host", "ms",
                    [s * 1e3 for s in secure], SECAGG_K100_TARGET if k == 100 else None, rounds_per_run=rounds)
            if k == 10:
                res.add("secagg_plain_round_ms_k10", 8, "  the same federation, plain FedAvg round", "ms",
                        [p * 1e3 for p in plain])
                res.add("secagg_ratio_k10", 8, "  ratio secure / plain, K=10", "×",
                        [s / p for s, p in zip(secure, plain)], SECAGG_RATIO_TARGET)
    for k in ks:
        parts = [secagg_parts(k) for _ in range(plan.reps)]
        for part, (label, _) in parts[0].items():
            res.add(f"secagg_{part}_ms_k{k}", 8, f"  K={k}, one round in-process: {label}", "ms",
                    [p[part][1] * 1e3 for p in parts])


def secagg_parts(k: int) -> dict[str, tuple[str, float]]:
    """One protocol run among k clients in this process, over the graph a run's
    defaults give (the complete graph up to 20 clients, else SecAgg+'s
    2⌈log2 k⌉ neighbours each, t a majority of a neighbourhood), with the time
    spent in each kind of work summed: key agreement (X25519 + HKDF), the PRG
    (ChaCha20), Shamir (split and combine), sealing (AES-GCM), and the rest."""
    import random

    import numpy as np

    from fedavg import secagg
    from fedavg.secagg_graph import closed, default_neighbors, default_threshold, harary_graph
    kinds = {"agree": "agreement", "expand": "prg", "split_secret": "shamir_split", "combine_secret": "shamir_combine",
             "seal": "sealing", "open_sealed": "sealing"}
    labels = {"agreement": "key agreement (X25519 + HKDF)", "prg": "PRG (ChaCha20)", "shamir_split": "Shamir split",
              "shamir_combine": "Shamir combine", "sealing": "sealing shares (AES-GCM)"}
    spent = dict.fromkeys(labels, 0.0)
    originals = {name: getattr(secagg, name) for name in kinds}

    def timed(name: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[kinds[name]] += time.perf_counter() - t0
        return wrapper

    neighbors = default_neighbors(k)
    session, t, length = b"bench", default_threshold(neighbors), 6
    try:
        for name in kinds:
            setattr(secagg, name, timed(name))
        t0 = time.perf_counter()
        clients = {i: secagg.SecAggClient(i, session, t) for i in range(1, k + 1)}
        public = {i: c.advertise() for i, c in clients.items()}
        graph = harary_graph(random.SystemRandom().sample(sorted(clients), k), neighbors)
        peers = {i: {"c_pk": p["c_pk"], "s_pk": p["s_pk"]} for i, p in public.items()}
        sealed = {i: c.share_keys({j: peers[j] for j in closed(graph, i)}) for i, c in clients.items()}
        u2 = sorted(clients)
        ys = {i: c.masked_input(np.full(length, 0.5), {j: sealed[j][i] for j in graph[i]},
                                sorted(closed(graph, i)), k) for i, c in clients.items()}
        reveals = {i: c.unmask(sorted(closed(graph, i)), []) for i, c in clients.items()}
        b_shares, s_shares = secagg.collect_shares(reveals)
        secagg.unmask_sum(ys, b_shares, s_shares, public, survivors_u2=u2, session=session, threshold=t,
                          length=length, neighbors=graph)
        total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(secagg, name, fn)
    return {**{part: (labels[part], s) for part, s in spent.items()},
            "whole": (f"whole round (k={neighbors} neighbours, t={t})", total),
            "rest": ("the rest (validation, NumPy, Python)", total - sum(spent.values()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 repetitions, K up to 50, 10^4 training samples: seconds, not minutes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument("--serve-noop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop("127.0.0.1", args.port)
        return 0

    plan = QUICK if args.quick else FULL
    res = Results()
    started = time.monotonic()
    info = machine()
    info["load_average_at_start"] = load_average()
    if info["load_average_at_start"][0] > 0.5:
        note(f"the machine is busy (load {info['load_average_at_start'][0]:g}): the figures will be noisy")
    note(f"{'quick' if args.quick else 'full'} bench on {info['cpu_model']}, {info['cores']} cores, "
         f"{info['memory_gib']} GiB; {plan.reps} repetitions per figure")
    try:
        with tempfile.TemporaryDirectory(prefix="fedavg-bench-") as tmp:
            db_dir = Path(tmp)
            bench_training(res, plan)
            bench_seed(res, plan, "waitress", db_dir, full_set=True)
            bench_seed(res, plan, "werkzeug", db_dir, full_set=False)
            bench_clients(res, plan, "waitress", plan.ks, db_dir)
            bench_clients(res, plan, "werkzeug", [50], db_dir)
            bench_compare(res, plan, db_dir)
            bench_secagg(res, plan, db_dir)
    except BenchError as e:
        note(f"stopped: {e}")
        return 1

    info["load_average_at_end"] = load_average()
    out = {
        "command": "make bench" + (" ARGS=--quick" if args.quick else ""),
        "quick": args.quick,
        "machine": info,
        "plan": {"repetitions": plan.reps, "seed_rounds_per_run": plan.seed_rounds,
                 "k_rounds_per_run": {str(k): r for k, r in plan.k_rounds.items()},
                 "warmup_rounds": WARMUP_ROUNDS, "train_samples": plan.train_samples, "train_epochs": 10,
                 "calls_per_repetition": plan.calls, "demo_repetitions": plan.demo_reps},
        "elapsed_s": round(time.monotonic() - started, 1),
        "figures": res.figures,
        "misses": [fid for fid, f in res.figures.items() if f["result"] == "MISS"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(res))
    print(f"\n{info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB; Python {info['python']}, "
          f"NumPy {info['numpy']}; commit {info['git_commit'][:12]}{' (+ local changes)' if info['git_dirty'] else ''}"
          f"; load {info['load_average_at_start'][0]:g} → {info['load_average_at_end'][0]:g}; {out['elapsed_s']} s")
    print(f"targets missed: {', '.join(out['misses'])}" if out["misses"] else "all targets met")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
