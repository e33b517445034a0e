"""make privacy: what differential privacy costs in accuracy.

For each scenario (the seed's 2 clients, and a larger federation) and each
noise multiplier σ, runs DP-FedAvg (``"dp": {"noise_multiplier": σ,
"clip": S}``) several times (the noise is fresh each run), and prints a
table: ε spent (δ = 1e-5), the final federated MSE and the distance to
the pooled optimum θ*, mean ± standard deviation over the repeats, beside
the same run without DP. The noise on
the model is σ·S/M a round, M the clients: the same ε costs far less
accuracy with many clients than with two.

The population regime (--population K, 0 to leave it out) is where
DP-FedAvg reaches a small ε: K clients of an iid ``Population`` (20 rows
each) on one client host, each round Poisson-sampling every client with
probability q = 0.01 (M = q·K), --population-rounds rounds; the noise on
the model is σ·S/M, σ × 5·10⁻⁵ at K = 1,000,000, and ε(q = 0.01, σ, T)
does not depend on K. Each run is printed as it ends, with its time and
what is left. The server reaches the population by index (the host's GET
/population once, the final evaluation one /batch/evaluate), so a run's
cost is its rounds: about 10,000 clients each at K = 1,000,000.

The federations run in-process (``labs``): the server app over the
scenario's clients in one client host app (the population's own host app
for the population), each run started through the server's own API with
the /start body a real server takes. The math is the code a real
federation runs; only the sockets are gone, and with them most of the time
22 runs of 50 clients took over HTTP. The runs are spread over one worker
process per core (--jobs).

Writes privacy.json to --out. Runs in the root environment, from any directory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flask.testing import FlaskClient

from compare import distance
from fedavg import theory
from fedavg.http.host_app import create_host_app
from fedavg.population import Population
from fedavg.scenarios import make_clients
from fedavg_server import create_app
from fedavg_server.inprocess import InProcessTransport
from labs import Progress, close, default_jobs, federation, spread

# (scenario, K, rounds, clip S): the seed, and a federation of 50 iid clients.
SCENARIOS = (("seed", 2, 50, 0.5), ("iid", 50, 50, 0.5))
SIGMAS = (0.0, 0.5, 1.0, 2.0, 4.0)
DELTA = 1e-5
# The population regime: Poisson sampling at q = 0.01, clip S, the population's draw (a client host's defaults).
POPULATION, POPULATION_ROUNDS, POPULATION_Q, POPULATION_CLIP, POPULATION_SEED, POPULATION_ROWS = \
    1_000_000, 100, 0.01, 0.5, 0, 20
POPULATION_REPEATS = 1
POPULATION_HOST = "http://127.0.0.1:6000"  # (in this process: no socket is opened)
# What a round costs besides its clients' training, in clients: a seed run
# (2 clients) took 0.34 s and an iid one (50) 2.3 s on a 2-core AMD EPYC
# (`make privacy`'s progress lines), 0.041 s a client and 0.26 s besides.
ROUND_OVERHEAD = 6


def population_federation(k: int, db: str) -> FlaskClient:
    """The server app over the K clients of the population regime's iid ``Population``, on its own
    client host app (batched: one /batch/train a round), both in this process."""
    host = create_host_app(None, population=Population.build("iid", k, POPULATION_SEED, POPULATION_ROWS))
    # Reached by index (its GET /population): no per-client /health, and the final evaluation one /batch/evaluate.
    return create_app({"TRANSPORT": InProcessTransport.populations({POPULATION_HOST: host}), "DB": db,
                       "TOKEN": None}).test_client()


def run_once(server: FlaskClient, rounds: int, dp: dict[str, Any] | None, optimum: Any,
             fraction: float = 1.0) -> tuple[float, float, Any]:
    """One run of a setting → its final federated MSE, ‖θ_T − θ*‖ and ε."""
    reply = server.post("/start", json={"rounds": rounds, "fraction": fraction, **({"dp": dp} if dp else {})})
    status, run = reply.status_code, reply.get_json()
    if status != 200 or run.get("status") != "completed":
        raise RuntimeError(f"run refused or failed: {run.get('error', run)}")
    if run.get("more"):  # the answer holds the first page of rounds: the last one is read on its own
        run["rounds"] = server.get(f"/runs/{run['run_id']}?since={rounds - 1}").get_json()["rounds"]
    return (run["rounds"][-1]["federated_loss"], distance(run["final_model"], optimum),
            (run["rounds"][-1].get("privacy") or {}).get("epsilon"))


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per noisy setting (default 5)")
    parser.add_argument("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS), help="noise multipliers σ")
    parser.add_argument("--out", default="privacy-out", help="output directory (default ./privacy-out)")
    parser.add_argument("--jobs", "-j", type=int, default=default_jobs(),
                        help=f"worker processes the runs are spread over (default: one per core, {default_jobs()} "
                             "here; 1: all in this process)")
    parser.add_argument("--population", type=int, default=POPULATION,
                        help=f"clients of the population regime, Poisson-sampled at q = {POPULATION_Q:g} (default "
                             f"{POPULATION:,}; 0 leaves the regime out)")
    parser.add_argument("--population-rounds", type=int, default=POPULATION_ROUNDS,
                        help=f"rounds of each population run (default {POPULATION_ROUNDS})")
    parser.add_argument("--population-repeats", type=int, default=POPULATION_REPEATS,
                        help=f"runs per noisy setting of the population (default {POPULATION_REPEATS}: each is "
                             "100 rounds of 10,000 clients, and their spread is below the table's digits)")
    args = parser.parse_args(argv)
    try:
        sigmas = [float(s) for s in args.sigmas.replace(",", " ").split()]
    except ValueError:
        parser.error(f"--sigmas: numbers separated by commas, got {args.sigmas!r}")
    if args.repeats < 1 or args.jobs < 1 or not sigmas or min(sigmas) < 0:
        parser.error("--repeats and --jobs must be >= 1 and --sigmas non-negative numbers")
    if args.population < 0 or args.population_rounds < 1:
        parser.error("--population must be >= 0 and --population-rounds >= 1")
    if args.population_repeats < 1:
        parser.error("--population-repeats must be >= 1")
    if 0 < args.population < 1 / POPULATION_Q:
        parser.error(f"--population: at least {1 / POPULATION_Q:g} clients, so that q = {POPULATION_Q:g} samples "
                     f"M = q·K >= 1 a round on average (got {args.population})")
    scenarios = []
    for scenario, k, rounds, bound in SCENARIOS:
        clients = make_clients(scenario, k, 0, 20)  # a client host's defaults: seed 0, 20 rows
        scenarios.append({"scenario": scenario, "clients": k, "rounds": rounds, "clip": bound, "delta": DELTA,
                          "fraction": 1.0, "repeats": args.repeats,
                          "pooled_optimum": theory.pooled_optimum([(c.X, c.y) for c in clients]).tolist()})
    if args.population:
        k, population = args.population, Population.build("iid", args.population, POPULATION_SEED, POPULATION_ROWS)
        scenarios.append({"scenario": "population (iid)", "clients": k, "rounds": args.population_rounds,
                          "clip": POPULATION_CLIP, "delta": DELTA, "fraction": POPULATION_Q,
                          "repeats": args.population_repeats,
                          "pooled_optimum": theory.pooled_optimum([(population.X, population.y)]).tolist()})
        del population  # (each worker builds its own, the same draw)
    for s in scenarios:
        s["settings"] = [("no DP", None)] + [(f"σ = {sigma:g}", {"noise_multiplier": sigma, "clip": s["clip"],
                                                                  "delta": DELTA}) for sigma in sigmas]
        m = s["fraction"] * s["clients"]
        print(f"privacy: {s['scenario']}, K={s['clients']:,}, {s['rounds']} rounds, clip S={s['clip']:g}, "
              + ("" if s["fraction"] == 1 else f"Poisson sampling q={s['fraction']:g}, ")
              + f"M={m:g}: noise σ·S/M = σ × {s['clip'] / m:g} on each coordinate a round", flush=True)
    # Every run on its own (the noise is fresh each time; without noise every run is the same, so once).
    runs = [(i, j) for i, s in enumerate(scenarios) for j, (_, dp) in enumerate(s["settings"])
            for _ in range(s["repeats"] if dp and dp["noise_multiplier"] > 0 else 1)]
    left = {key: runs.count(key) for key in runs}
    started = time.perf_counter()
    history = tempfile.TemporaryDirectory(prefix="fedavg-privacy-")
    federations: list[FlaskClient] = []

    def start() -> dict[int, FlaskClient]:
        return {}  # a worker's federations, one per scenario, built when first needed

    def work(mine: dict[int, FlaskClient], run: tuple[int, int]) -> tuple[float, float, Any]:
        i, j = run
        s = scenarios[i]
        if i not in mine:
            db = f"{history.name}/runs-{os.getpid()}-{i}.db"
            mine[i] = (federation(make_clients(s["scenario"], s["clients"], 0, 20), db) if s["fraction"] == 1
                       else population_federation(s["clients"], db))
            federations.append(mine[i])
        return run_once(mine[i], s["rounds"], s["settings"][j][1], np.array(s["pooled_optimum"]), s["fraction"])

    # A run's work for the estimate of the time left: its rounds × (the clients a round samples + ROUND_OVERHEAD).
    progress = Progress([scenarios[i]["rounds"] * (scenarios[i]["clients"] * scenarios[i]["fraction"] + ROUND_OVERHEAD)
                         for i, _ in runs])

    def report(n: int, result: Any) -> None:
        i, j = runs[n]
        left[runs[n]] -= 1
        of = runs.count(runs[n])
        print("privacy: " + progress.line(n, f"{scenarios[i]['scenario']}, {scenarios[i]['settings'][j][0]}: "
                                             f"{of - left[runs[n]]} of {of} run(s) done"), flush=True)

    try:
        results = spread(runs, start, work, args.jobs, report)
    except RuntimeError as e:
        print(f"privacy: {e}", file=sys.stderr)
        return 1
    finally:
        for http in federations:  # (this process's; a worker's end with it)
            close(http)
        history.cleanup()
    report_json = []
    for i, s in enumerate(scenarios):
        rows = []
        for j, (label, dp) in enumerate(s["settings"]):
            mine = [r for (n, r) in zip(runs, results) if n == (i, j)]
            rows.append({"label": label, "dp": dp, "epsilon": mine[-1][2], "losses": [r[0] for r in mine],
                         "distances": [r[1] for r in mine]})
        report_json.append({k: v for k, v in s.items() if k != "settings"} | {"rows": rows})
        print(f"\n{s['scenario']}, K={s['clients']:,}, {s['rounds']} rounds, "
              + ("" if s["fraction"] == 1 else f"q={s['fraction']:g}, ")
              + f"S={s['clip']:g}, δ={DELTA:g} (mean ± sd over {s['repeats']} runs where there is noise)")
        print(f"{'setting':<10} {'ε':>10} {'final MSE':>20} {'‖θ_T − θ*‖':>20}")
        for row in rows:
            eps = "-" if row["dp"] is None else ("∞" if row["epsilon"] is None else f"{row['epsilon']:.3g}")
            print(f"{row['label']:<10} {eps:>10} {mean_sd(row['losses']):>20} {mean_sd(row['distances']):>20}")
        print()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy.json").write_text(json.dumps(report_json, indent=1, allow_nan=False) + "\n")
    print(f"privacy: wrote {out / 'privacy.json'} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
