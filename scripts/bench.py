"""make bench: how fast and how big Raw FedAvg is on this machine, measured on
real processes started the way the README starts them. Prints a table and
writes bench/results.json (the README's "Performance" section shows it).

Every figure is the median of several repetitions, with their min–max. A
figure that misses its target says MISS; the exit code stays 0: the bench
reports, the tests judge correctness. Only an app that fails to start or a
run that does not complete ends the bench with an error.

    .venv/bin/python scripts/bench.py                      # the full bench (a few minutes)
    .venv/bin/python scripts/bench.py --quick --out x.json # 2 repetitions, K <= 50 (for the tests)
    .venv/bin/python scripts/bench.py --before ../base      # item 9's "before": a checkout from before TLS, paired
    .venv/bin/python scripts/bench.py --only tls --out x.json  # one part only (never the committed file)
    .venv/bin/python scripts/bench.py --only batch --out x.json  # item 10: K = 1000, batched and --per-client
    .venv/bin/python scripts/bench.py --only population --out x.json  # item 12: 1,000,000 clients, 100 rounds
    .venv/bin/python scripts/bench.py --only batch flower --flower /tmp/flower/bin/python --out x.json
        # item 11: Flower's simulation engine on the same K, beside item 10 (Flower in a scratch venv)

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
import socket
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

from launcher import ROOT, App, free_port, get_json, poetry, post_json, start_app, stop, wait_healthy

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
    return spawn("noop", [poetry(), "run", "python", "../scripts/bench.py", "--serve-noop", "--port", str(port)],
                 ROOT / "server", f"http://127.0.0.1:{port}", env)


def spawn(name: str, cmd: Sequence[str], cwd: Path, url: str, env: dict[str, str]) -> App:
    """``cmd`` in ``cwd``, in a process group of its own (``stop`` ends it
    and all it started), its output kept in ``App.lines``."""
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    app = App(name, url, proc)

    def read() -> None:
        for line in proc.stdout:
            app.lines.append(line)

    app._reader = threading.Thread(target=read, daemon=True, name=f"read-{name}")
    app._reader.start()
    return app


# --- figures ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    op: str  # "<=", ">=", or "±": a ratio within 1 ± value
    value: float
    judged_on: str = "median"  # a high-water mark is judged on its max

    def met(self, figure: dict[str, Any]) -> bool:
        x = figure[self.judged_on]
        if self.op == "±":
            return abs(x - 1.0) <= self.value
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
        note(f"{label}: {_num(fig['median'])}{' ' + unit if unit else ''} ({_num(fig['min'])}–{_num(fig['max'])})"
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
        unit = "" if fig["unit"] in ("×", "") else f" {fig['unit']}"
        target = ""
        if fig["target"]:
            t = fig["target"]
            if t["op"] == "±":
                target = f"1 ± {_num(t['value'])}{unit}"
            else:
                target = f"{'≤' if t['op'] == '<=' else '≥'} {_num(t['value'])}{unit}"
            if t["judged_on"] != "median":
                target += f" ({t['judged_on']})"
        rows.append(f"| {fig['item']} | {fig['label']} | {_num(fig['median'])}{unit} | "
                    f"{_num(fig['min'])}–{_num(fig['max'])}{unit} | {target} | {fig['result'] or ''} |")
    return "\n".join(rows)


# --- talking to the apps ------------------------------------------------------------------

class BenchError(Exception):
    """An app did not start or a run did not complete: no figure can be trusted."""


def run_rounds(server: App, rounds: int, seed: int, caller: Any = None, **settings: Any) -> list[float]:
    """One run of ``rounds`` rounds; each round's server-side ``duration_s``.
    ``caller``: a urllib3.PoolManager with a certificate, for a server over TLS."""
    body = {"rounds": rounds, "seed": seed, **settings}
    if caller is None:
        status, run = post_json(server.url + "/start", body, timeout_s=3600)
    else:
        resp = caller.request("POST", server.url + "/start", body=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"}, timeout=3600)
        status, run = resp.status, json.loads(resp.data)
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


def per_wave(urls: Sequence[str], body: dict[str, Any], waves: int) -> float:
    """Median seconds of one concurrent wave of POST /noop to every URL
    through the server's own transport (``HttpTransport.call_all``: its
    threads, pool and deadlines), as a round's /train calls go: the honest
    floor of a round, which no sequential call measures."""
    from fedavg_server.http_transport import HttpTransport

    transport = HttpTransport(urls)
    try:
        times = []
        for _ in range(waves):
            t0 = time.perf_counter()
            replies = transport.call_all(urls, "POST", "/noop", 10.0, lambda url: body)
            times.append(time.perf_counter() - t0)
            if not all(r.ok for r in replies):
                raise BenchError(f"POST /noop wave: {next(r.reason for r in replies if not r.ok)}")
        return statistics.median(times)
    finally:
        transport.close()


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
PARTS = ("training", "seed", "clients", "compare", "secagg", "tls", "batch", "flower", "population")
WARMUP_ROUNDS = 3  # a first run per stack opens the connections; it is not counted
ROUND_OVERHEAD_TARGET = Target("<=", 2.0)
K_TARGETS = {50: Target("<=", 40.0), 1000: Target("<=", 1000.0)}
TRAIN_TARGET = Target(">=", 0.8)
SEED_RSS_TARGET = Target("<=", 150.0, judged_on="max")
DEMO_TARGET = Target("<=", 50.0)
COMPARE_TARGET = Target("<=", 3.0)  # in-process federations, two worker processes (issue 15)
SECAGG_RATIO_TARGET = Target("<=", 10.0)
SECAGG_K100_TARGET = Target("<=", 2000.0)
BATCH_K = {True: 50, False: 1000}  # item 10's K, quick or not
BATCH_TARGETS = {1000: Target("<=", 100.0)}  # issue 18: a K = 1000 round, server + one host over HTTP
# Item 12, issue 18's population: (K, fraction, rounds), quick or not, and its targets (the full one's).
POPULATION = {True: (20_000, 0.01, 10), False: (1_000_000, 0.01, 100)}
POPULATION_TARGETS = {"fedavg": Target("<=", 60.0), "dp": Target("<=", 90.0), "rss": Target("<=", 1500.0, "max")}
POPULATION_DP = {"noise_multiplier": 1.0, "clip": 1.0}  # DP-FedAvg's Poisson sample at q = fraction


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

    def server(self, client_urls: Sequence[str], tag: str, args: Sequence[str] = ()) -> App:
        return self.start("server", ["--clients", ",".join(client_urls),
                                     "--db", str(self.db_dir / f"{tag}-{self.wsgi}.db"), *args])

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
        # Two noop apps, as the round has two clients in two processes: the wave calls both at once.
        noops = [stack.noop(), stack.noop()]
        stack.healthy()

        http = urllib3.PoolManager(retries=False)
        data = json.dumps(train_body()).encode()
        noop_url = noops[0].url + "/noop"
        per_call_urllib3(http, noop_url, data, 20)  # warm the connection
        per_wave([n.url for n in noops], train_body(), 20)
        run_rounds(server, WARMUP_ROUNDS, seed=0)

        rounds, floors, walls, rss, pss = [], [], [], [], []
        for rep in range(plan.reps):
            floors.append(per_call_urllib3(http, noop_url, data, plan.calls))
            walls.append(per_wave([n.url for n in noops], train_body(), plan.calls))
            rounds.append(statistics.median(run_rounds(server, plan.seed_rounds, seed=rep)))
            rss.append([peak_rss_mb(a) for a in (server, c1, c2)])
            pss.append(sum(pss_mb(a) for a in (server, c1, c2)))
        res.add(f"seed_round_ms{fid}", item,
                f"round, 2 seed clients (median of {plan.seed_rounds}-round runs){tag}", "ms",
                [r * 1e3 for r in rounds])
        # The floor a round is judged against: one concurrent wave to K = 2 trivial clients through
        # the server's own HttpTransport, as a round's calls go (threads, futures, the pool).
        res.add(f"wave_floor_ms{fid}", item, f"floor: one wave, POST /noop to 2 noop apps via call_all{tag}",
                "ms", [w * 1e3 for w in walls], waves_per_repetition=plan.calls)
        res.add(f"round_wave_ratio{fid}", item, f"ratio round / wave floor{tag}", "×",
                [r / w for r, w in zip(rounds, walls)], ROUND_OVERHEAD_TARGET if wsgi == "waitress" else None)
        # The old floor, kept for comparison with earlier results: one sequential call from here,
        # without the transport's threads: it flatters nothing a round can do.
        res.add(f"noop_floor_ms{fid}", item, f"old floor: one sequential POST /noop round trip{tag}", "ms",
                [f * 1e3 for f in floors],
                connections_opened=connections_opened(http, noop_url), calls_per_repetition=plan.calls)
        res.add(f"round_overhead_ratio{fid}", item, f"old ratio round / sequential floor{tag}", "×",
                [r / f for r, f in zip(rounds, floors)])
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


def bench_batch(res: Results, plan: Plan, db_dir: Path) -> None:
    """Item 10: a round at K clients on one client host, full participation,
    the server calling the host once a round for all of them (/batch/train,
    the default) against a server with --per-client (each client's /train),
    the two servers' runs taking turns; and the ratio, repetition by repetition."""
    k = BATCH_K[plan is QUICK]
    rounds = plan.k_rounds.get(k, 6)
    with Stack("waitress", db_dir) as stack:
        note(f"starting a client host with K={k} (iid) and two servers, batched and --per-client …")
        host = stack.start("client_host", ["--scenario", "iid", "--clients", str(k), "--seed", "0"])
        urls = [f"{host.url}/clients/{i}" for i in range(1, k + 1)]
        servers = {"batched": stack.server(urls, f"batch{k}"),
                   "per_client": stack.server(urls, f"per-client{k}", ["--per-client"])}
        stack.healthy()
        times: dict[str, list[float]] = {how: [] for how in servers}
        for server in servers.values():
            run_rounds(server, WARMUP_ROUNDS, seed=0)
        for rep in range(plan.reps):
            for how, server in servers.items():
                times[how].append(statistics.median(run_rounds(server, rounds, seed=rep)) * 1e3)
    res.add(f"batch_round_ms_k{k}", 10, f"round, K={k} on one client host, one /batch/train", "ms",
            times["batched"], BATCH_TARGETS.get(k), rounds_per_run=rounds)
    res.add(f"per_client_round_ms_k{k}", 10, f"round, K={k} on one client host, --per-client", "ms",
            times["per_client"], rounds_per_run=rounds)
    res.add(f"batch_speedup_k{k}", 10, f"ratio per-client / batched round, K={k}", "×",
            [a / b for a, b in zip(times["per_client"], times["batched"])])


def bench_flower(res: Results, plan: Plan, python: str | None) -> None:
    """Item 11: Flower's simulation engine (Ray) on item 10's K, full participation, FedAvg
    of the same local step (scripts/flower_side.py), run by a Python that has Flower:
    never one of the project's environments. Printed beside item 10's round when both ran."""
    if not python:
        note("item 11 (Flower side by side): not measured: give --flower PYTHON (or FLOWER_PYTHON), a Python "
             "with Flower: python3 -m venv /tmp/flower && /tmp/flower/bin/pip install 'flwr[simulation]==1.42.*'")
        return
    k = BATCH_K[plan is QUICK]
    rounds = 3 if plan is QUICK else 6
    samples, memory = [], []
    for rep in range(min(plan.reps, 3)):  # each run starts Ray anew: about 15 s before its first round
        note(f"Flower's simulation engine, K={k}, {rounds} rounds (run {rep + 1}) …")
        done = subprocess.run([python, str(ROOT / "scripts" / "flower_side.py"), "--clients", str(k),
                               "--rounds", str(rounds)], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise BenchError(f"scripts/flower_side.py failed: {done.stderr.strip().splitlines()[-1:]}")
        got = json.loads(done.stdout.strip().splitlines()[-1])
        samples.append(got["median_round_s_after_first"] * 1e3)
        memory.append(got["peak_tree_rss_bytes"] / 2**20)
    res.add(f"flower_round_ms_k{k}", 11, f"round, K={k}, Flower {got['flower']} simulation engine (Ray)", "ms",
            samples, rounds_per_run=rounds - 1)
    res.add(f"flower_rss_mb_k{k}", 11, f"peak RSS, Flower's process tree (Ray's workers), K={k}", "MB", memory)
    ours = res.figures.get(f"batch_round_ms_k{k}")
    if ours is not None:
        note(f"side by side at K={k}: Flower {_num(statistics.median(samples))} ms a round, Raw FedAvg batched "
             f"{_num(ours['median'])} ms ({_num(statistics.median(samples) / ours['median'])}× faster)")


def bench_population(res: Results, plan: Plan, db_dir: Path) -> None:
    """Item 12: a population held as arrays on one client host (--population K), the server
    reaching it by index (--clients-from), a fraction of it a round in one /batch/train:
    the whole run of FedAvg, then of DP-FedAvg (Poisson sampling at q = fraction, its ε from
    the accountant), timed as a user waits for POST /start; and the host's peak RSS."""
    k, fraction, rounds = POPULATION[plan is QUICK]
    targets = POPULATION_TARGETS if plan is FULL else {}
    reps = 1 if plan is QUICK else 2  # a full repetition is minutes: two of each, alternating
    with Stack("waitress", db_dir) as stack:
        note(f"starting a client host with a population of {k:,} (iid) and a server reaching it by index …")
        host = stack.start("client_host", ["--scenario", "iid", "--population", str(k), "--seed", "0"])
        stack.healthy()  # (the host first: the server reads its /population when it starts)
        server = stack.start("server", ["--clients-from", host.url, "--db", str(db_dir / "population.db")])
        stack.healthy()
        times: dict[str, list[float]] = {"fedavg": [], "dp": []}
        epsilons = []
        for rep in range(reps):
            for how in times:
                body = {"rounds": rounds, "seed": rep, "fraction": fraction, "wait": True,
                        **({"dp": POPULATION_DP} if how == "dp" else {})}
                note(f"{how}: {rounds} rounds of {fraction:g} of {k:,} clients (run {rep + 1}) …")
                started = time.monotonic()
                status, run = post_json(server.url + "/start", body, timeout_s=3600)
                times[how].append(time.monotonic() - started)
                if status != 200 or run.get("status") != "completed":
                    raise BenchError(f"population run did not complete: HTTP {status}: {run.get('error') or run}")
                if how == "dp":
                    last = get_json(f"{server.url}/runs/{run['run_id']}?since={rounds - 1}")["rounds"][-1]
                    epsilons.append(last["privacy"]["epsilon"])
        rss = peak_rss_mb(host)
    label = f"{rounds} rounds, {fraction:g} of a population of {k:,} a round"
    res.add("population_fedavg_s", 12, f"{label}: FedAvg, POST /start to its answer", "s", times["fedavg"],
            targets.get("fedavg"), population=k, fraction=fraction, rounds=rounds)
    res.add("population_dp_s", 12, f"{label}: DP-FedAvg (Poisson q = {fraction:g}, σ = "
            f"{POPULATION_DP['noise_multiplier']:g})", "s", times["dp"], targets.get("dp"),
            epsilon=epsilons[-1])
    res.add("population_host_rss_mb", 12, f"client host's peak RSS, a population of {k:,}", "MB", [rss],
            targets.get("rss"))
    note(f"DP-FedAvg's ε after {rounds} rounds at q = {fraction:g}: {epsilons[-1]:.3g}")


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
            # --per-client: the plain round it is compared with calls each client, as secure aggregation
            # does (a batched plain round, item 10, is another comparison).
            server = stack.server([f"{host.url}/clients/{i}" for i in range(1, k + 1)], f"secagg{k}",
                                  ["--per-client"])
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
                res.add("secagg_plain_round_ms_k10", 8, "  the same federation, plain FedAvg round, per client", "ms",
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


# --- item 9: the plain round before the TLS switch, and a TLS round --------------------------

BEFORE_FILE = ROOT / "bench" / "plain_round_before.json"
PLAIN_UNCHANGED = Target("±", 0.10)  # issue 17: the plain round, now / before TLS, unchanged ±10%
TLS_PARTIES = ("server", "client_1", "client_2", "operator")  # operator: the bench, calling the server's API


def is_client_hello(head: bytes) -> bool:
    """A connection's first bytes are a TLS handshake record (type 22,
    version 3.x) holding a ClientHello (handshake type 1): a handshake starts."""
    return len(head) >= 6 and head[0] == 0x16 and head[1] == 0x03 and head[5] == 0x01


class HandshakeCounter:
    """A TCP relay on 127.0.0.1 in front of one TLS app, counting the TLS
    handshakes made to it. The server is given the relay's port instead of
    the app's; bytes pass unchanged both ways, so TLS stays end to end (the
    app's certificate names 127.0.0.1, whatever the port). Each connection
    accepted is counted, and as a handshake when it opens with a ClientHello:
    the full handshake a connection starts with (TLS 1.3 has no
    renegotiation, and the apps' OpenSSL allows none in 1.2). Counted outside
    both processes: what the server's pool does, not what it says it does."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.handshakes = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"relay-{target_port}").start()

    def counts(self) -> tuple[int, int]:
        """(connections accepted, handshakes begun) so far."""
        with self._lock:
            return self.connections, self.handshakes

    def _accept(self) -> None:
        while True:
            try:
                caller, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                app = socket.create_connection(self.target, timeout=10)
            except OSError:
                caller.close()  # the app is down: the caller sees a refusal, as it would without the relay
                continue
            app.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [caller, app]
            threading.Thread(target=self._pump, args=(caller, app, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(app, caller, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_caller: bool) -> None:
        head = b"" if from_caller else None  # the caller's first bytes, until there are enough to tell
        try:
            while data := src.recv(65536):
                if head is not None:
                    head += data
                    if len(head) >= 6:
                        if is_client_hello(head):
                            with self._lock:
                                self.handshakes += 1
                        head = None
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)  # the other side hung up: pass it on
            except OSError:
                pass

    def close(self) -> None:
        # shutdown, not only close: it wakes the threads blocked in accept() and recv().
        with self._lock:
            sockets = [self.listener, *self._sockets]
        for s in sockets:
            for end in (lambda: s.shutdown(socket.SHUT_RDWR), s.close):
                try:
                    end()
                except OSError:
                    pass


def trial_certs(folder: Path) -> dict[str, Any]:
    """A CA and a certificate for each of TLS_PARTIES, made with `make certs`'
    functions (valid for 127.0.0.1 and localhost); name → TLSFiles."""
    from cryptography.hazmat.primitives import serialization
    from make_certs import new_ca, new_leaf, write_party

    from fedavg.tls_files import TLSFiles

    ca = new_ca()
    (folder / "ca.crt").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return {name: TLSFiles(*write_party(folder, name, new_leaf(ca, name)), folder / "ca.crt") for name in TLS_PARTIES}


def tls_flags(files: Any) -> list[str]:
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]


def wait_tls(apps: Sequence[App], caller: Any, timeout_s: float = 180.0) -> None:
    """``wait_healthy`` over TLS: poll each app's /health with ``caller``'s certificate."""
    import urllib3
    deadline = time.monotonic() + timeout_s
    for app in apps:
        while True:
            if app.proc.poll() is not None:
                raise BenchError(f"{app.name} exited with code {app.proc.returncode}:\n{app.output()}")
            try:
                if caller.request("GET", app.url + "/health", timeout=2).status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"no answer from {app.url}/health over TLS within {timeout_s:g} s")
            time.sleep(0.05)  # polling interval, not a wait for anything in particular


def cpu_s(apps: Sequence[App]) -> float:
    """User + system CPU seconds the apps' processes have spent so far
    (/proc/PID/stat, in clock ticks). On a shared machine a round's CPU moves
    far less than its wall time (scripts/round_cost.py)."""
    total = 0
    for app in apps:
        fields = Path(f"/proc/{app.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def git_commit(checkout: Path) -> str:
    done = subprocess.run(["git", "--no-optional-locks", "rev-parse", "HEAD"], cwd=checkout, capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


class SeedFederation:
    """client_1, client_2 and the server of one checkout, started as the
    README starts them but with each app's own .venv Python (what ``poetry
    run`` execs: the same process, without Poetry's start-up), so that a
    checkout from before TLS and this one start alike. With ``certs``, all
    three over mutual TLS, the server calling https:// client URLs (through
    ``relays``, if given, port by port)."""

    def __init__(self, stack: Stack, checkout: Path, tag: str, certs: dict[str, Any] | None = None) -> None:
        self.stack, self.checkout, self.tag, self.certs = stack, checkout, tag, certs
        self.scheme = "http" if certs is None else "https"
        self.clients = [self._start(name, [] if certs is None else tls_flags(certs[name]))
                        for name in ("client_1", "client_2")]
        self.server: App | None = None

    @property
    def apps(self) -> list[App]:
        return [*self.clients, *([self.server] if self.server else [])]

    def _start(self, name: str, args: Sequence[str]) -> App:
        port = free_port()
        python = self.checkout / name / ".venv" / "bin" / "python"
        if not python.exists():
            raise BenchError(f"{python} is missing: run `make install` in {self.checkout}")
        app = spawn(name, [str(python), f"{name}_app.py", "--host", "127.0.0.1", "--port", str(port), *args],
                    self.checkout / name, f"{self.scheme}://127.0.0.1:{port}", self.stack.env)
        self.stack.apps.append(app)
        return app

    def start_server(self, client_ports: Sequence[int] | None = None) -> App:
        """The server, calling the clients (or, given ``client_ports``, those ports instead)."""
        ports = client_ports or [int(c.url.rsplit(":", 1)[1]) for c in self.clients]
        urls = ",".join(f"{self.scheme}://127.0.0.1:{p}" for p in ports)
        db = self.stack.db_dir / f"{self.tag}-{len(self.stack.apps)}.db"
        self.server = self._start("server", ["--clients", urls, "--db", str(db),
                                             *([] if self.certs is None else tls_flags(self.certs["server"]))])
        return self.server

    def healthy(self, caller: Any = None) -> None:
        apps = self.apps
        if caller is None:
            try:
                wait_healthy(apps, timeout_s=180)
            except RuntimeError as e:
                raise BenchError(str(e)) from None
        else:
            wait_tls(apps, caller)


def bench_tls(res: Results, plan: Plan, db_dir: Path, before: Path | None, quick: bool,
              record: bool = False) -> None:
    """Item 9. The seed's plain round now, the same round over mutual TLS, and
    (with ``before``, a checkout from before the TLS switch) the plain round
    there: the federations up side by side, their runs taking turns (A B C,
    C B A, …), each figure the median round of a ``seed_rounds``-round run,
    as item 1. Without ``before`` the plain round is compared with the figure
    BEFORE_FILE recorded. Then the TLS handshakes per round: a fresh TLS
    server calls the clients through a HandshakeCounter each, for two runs."""
    import urllib3
    with tempfile.TemporaryDirectory(prefix="fedavg-bench-certs-") as tmp, Stack("waitress", db_dir) as stack:
        certs = trial_certs(Path(tmp))
        operator = urllib3.PoolManager(cert_file=str(certs["operator"].cert), key_file=str(certs["operator"].key),
                                       ca_certs=str(certs["operator"].ca), cert_reqs="CERT_REQUIRED", retries=False)
        note("starting the seed federation plain, over mutual TLS" + (f", and from {before}" if before else "")
             + " …")
        feds = {"plain": SeedFederation(stack, ROOT, "plain"), "tls": SeedFederation(stack, ROOT, "tls", certs)}
        if before is not None:
            feds["before"] = SeedFederation(stack, before, "before")
        callers = {key: operator if fed.certs else None for key, fed in feds.items()}
        for key, fed in feds.items():
            fed.start_server()
        for key, fed in feds.items():
            fed.healthy(callers[key])
            run_rounds(fed.server, WARMUP_ROUNDS, seed=0, caller=callers[key])
        order = list(feds)
        rounds: dict[str, list[float]] = {key: [] for key in order}
        cpu: dict[str, list[float]] = {key: [] for key in order}  # CPU seconds per round, all three processes
        for rep in range(plan.reps):
            for key in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
                fed, c0 = feds[key], cpu_s(feds[key].apps)
                rounds[key].append(statistics.median(
                    run_rounds(fed.server, plan.seed_rounds, seed=rep, caller=callers[key])))
                cpu[key].append((cpu_s(fed.apps) - c0) / plan.seed_rounds)
        plain, tls = rounds["plain"], rounds["tls"]
        res.add("plain_round_ms", 9, f"plain round, 2 seed clients (median of {plan.seed_rounds}-round runs, "
                "paired with the TLS round)", "ms", [r * 1e3 for r in plain], rounds_per_run=plan.seed_rounds)
        res.add("tls_round_ms", 9, "TLS round, the same over mutual TLS (cheroot, urllib3 keep-alive)", "ms",
                [r * 1e3 for r in tls], rounds_per_run=plan.seed_rounds)
        res.add("tls_round_ratio", 9, "ratio TLS round / plain round", "×", [t / p for t, p in zip(tls, plain)])
        res.add("plain_round_cpu_ms", 9, "  CPU per plain round, server + 2 clients", "ms",
                [c * 1e3 for c in cpu["plain"]])
        res.add("tls_round_cpu_ms", 9, "  CPU per TLS round, server + 2 clients", "ms", [c * 1e3 for c in cpu["tls"]])
        compare_before(res, (plain, cpu["plain"]),
                       (rounds["before"], cpu["before"]) if before is not None else None, before, record)

        # Handshakes: a fresh server each repetition, its clients behind relays that count.
        tls_fed = feds["tls"]
        relays = [HandshakeCounter(int(c.url.rsplit(":", 1)[1])) for c in tls_fed.clients]
        first, second, accepted = [], [], []
        try:
            for rep in range(plan.reps):
                stop([tls_fed.server])
                stack.apps.remove(tls_fed.server)
                at_start = [r.counts() for r in relays]
                server = tls_fed.start_server([r.port for r in relays])
                tls_fed.healthy(operator)
                run_rounds(server, plan.seed_rounds, seed=rep, caller=operator)
                after_first = [r.counts() for r in relays]
                run_rounds(server, plan.seed_rounds, seed=rep, caller=operator)
                after_second = [r.counts() for r in relays]
                first.append(sum(a[1] - s[1] for a, s in zip(after_first, at_start)))
                second.append(sum(b[1] - a[1] for b, a in zip(after_second, after_first)))
                accepted.append(sum(b[0] - s[0] for b, s in zip(after_second, at_start)))
        finally:
            for relay in relays:
                relay.close()
        clients = len(relays)
        res.add("tls_handshakes_per_round", 9,
                f"TLS handshakes per round: a fresh server's first {plan.seed_rounds}-round run, {clients} clients",
                "", [h / plan.seed_rounds for h in first],
                Target("<=", clients / plan.seed_rounds, judged_on="max"),
                handshakes_first_run=first, handshakes_second_run=second, connections_both_runs=accepted,
                clients=clients, rounds_per_run=plan.seed_rounds)


def compare_before(res: Results, now: tuple[list[float], list[float]],
                   then: tuple[list[float], list[float]] | None, before: Path | None, record: bool) -> None:
    """The plain round now against before the TLS switch, wall time and CPU
    per round (seconds, one per repetition), each as a ratio now / before
    judged on ±10%. Paired when ``then`` was measured in this run from the
    checkout ``before`` (``record``: the full bench that writes the committed
    results records it in BEFORE_FILE beside them; a run of some parts into
    another file never touches it), else against BEFORE_FILE's figures."""
    if then is not None:
        commit = git_commit(before)
        wall, cpu = [b * 1e3 for b in then[0]], [b * 1e3 for b in then[1]]
        wall_ratio = [p / b for p, b in zip(now[0], then[0])]
        cpu_ratio = [p / b for p, b in zip(now[1], then[1])]
        how = "measured in this run, paired"
        if record:
            BEFORE_FILE.write_text(json.dumps({
                "what": "the seed's plain round before the TLS switch (make bench ARGS='--before CHECKOUT'), "
                        "item 9's method: per repetition, the median round of a run and its CPU per round "
                        "(server + 2 clients)",
                "git_commit": commit,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "rounds_per_run": FULL.seed_rounds, "unit": "ms", "round_ms": wall, "cpu_ms": cpu,
                "paired_with": {"git_commit": git_commit(ROOT), "round_ms": [p * 1e3 for p in now[0]],
                                "cpu_ms": [p * 1e3 for p in now[1]]}}, indent=2) + "\n")
    elif BEFORE_FILE.exists():
        recorded = json.loads(BEFORE_FILE.read_text())
        commit, wall, cpu = recorded["git_commit"], recorded["round_ms"], recorded["cpu_ms"]
        wall_ratio = [p * 1e3 / statistics.median(wall) for p in now[0]]
        cpu_ratio = [p * 1e3 / statistics.median(cpu) for p in now[1]]
        how = f"recorded {recorded['date'][:10]}, not paired: noisier"
    else:
        note(f"no plain round from before TLS: give --before CHECKOUT (or commit {BEFORE_FILE.relative_to(ROOT)})")
        return
    res.add("plain_round_before_ms", 9, f"plain round before TLS ({commit[:7]}, {how})", "ms", wall,
            git_commit=commit, paired=then is not None)
    res.add("plain_round_ratio", 9, "ratio plain round now / before TLS", "×", wall_ratio, PLAIN_UNCHANGED)
    res.add("plain_round_before_cpu_ms", 9, "  CPU per plain round before TLS, server + 2 clients", "ms", cpu)
    res.add("plain_round_cpu_ratio", 9, "  ratio CPU per plain round now / before TLS", "×", cpu_ratio,
            PLAIN_UNCHANGED)


def verdict(res: Results) -> list[str]:
    """The lines item 9's ±10% comes down to: wall time, and CPU (the steadier)."""
    lines = []
    for fid, what in (("plain_round_ratio", "round"), ("plain_round_cpu_ratio", "CPU per round")):
        fig = res.figures.get(fid)
        if fig is None:
            continue
        r = fig["median"]
        said = "within ±10%: unchanged" if fig["result"] == "PASS" else (
            "slower by more than 10%" if r > 1 else "faster by more than 10%")
        lines.append(f"plain {what}, now / before TLS: {r:.3f}× (repetitions {fig['min']:.3f}–{fig['max']:.3f}×): "
                     f"{said}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 repetitions, K up to 50, 10^4 training samples: seconds, not minutes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument("--before", type=Path, metavar="CHECKOUT",
                        help="a checkout from before the TLS switch, `make install` done: its plain round is "
                             f"measured paired with this one's (a full run records it in {BEFORE_FILE.name})")
    parser.add_argument("--only", choices=PARTS, nargs="+", metavar="PART",
                        help=f"measure only these parts ({', '.join(PARTS)}); needs --out")
    parser.add_argument("--flower", metavar="PYTHON", default=os.environ.get("FLOWER_PYTHON"),
                        help="a Python with Flower installed (not the project's): item 11 runs Flower's simulation "
                             "engine beside item 10 (default $FLOWER_PYTHON; without it item 11 is left out)")
    parser.add_argument("--serve-noop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop("127.0.0.1", args.port)
        return 0
    if args.only and args.out == DEFAULT_OUT:
        parser.error(f"--only: give --out too ({DEFAULT_OUT.relative_to(ROOT)} holds the whole bench)")
    if args.before is not None and not (args.before / "server" / "server_app.py").exists():
        parser.error(f"--before {args.before}: not a Raw FedAvg checkout (no server/server_app.py)")
    parts = set(args.only or PARTS)

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
            if "training" in parts:
                bench_training(res, plan)
            if "seed" in parts:
                bench_seed(res, plan, "waitress", db_dir, full_set=True)
                bench_seed(res, plan, "werkzeug", db_dir, full_set=False)
            if "clients" in parts:
                bench_clients(res, plan, "waitress", plan.ks, db_dir)
                bench_clients(res, plan, "werkzeug", [50], db_dir)
            if "compare" in parts:
                bench_compare(res, plan, db_dir)
            if "secagg" in parts:
                bench_secagg(res, plan, db_dir)
            if "tls" in parts:
                bench_tls(res, plan, db_dir, args.before, args.quick,
                          record=not args.quick and not args.only and args.out == DEFAULT_OUT)
            if "batch" in parts:
                bench_batch(res, plan, db_dir)
            if "flower" in parts:
                bench_flower(res, plan, args.flower)
            if "population" in parts:
                bench_population(res, plan, db_dir)
    except BenchError as e:
        note(f"stopped: {e}")
        return 1

    info["load_average_at_end"] = load_average()
    out = {
        "command": "make bench" + (f" ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else ""),
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
    if lines := verdict(res):
        print("\n" + "\n".join(lines))
    print(f"\n{info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB; Python {info['python']}, "
          f"NumPy {info['numpy']}; commit {info['git_commit'][:12]}{' (+ local changes)' if info['git_dirty'] else ''}"
          f"; load {info['load_average_at_start'][0]:g} → {info['load_average_at_end'][0]:g}; {out['elapsed_s']} s")
    print(f"targets missed: {', '.join(out['misses'])}" if out["misses"] else "all targets met")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
