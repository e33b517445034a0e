"""make privacy: what differential privacy costs in accuracy.

For each scenario (the seed's 2 clients, and a larger federation) and each
noise multiplier σ, runs DP-FedAvg (``"dp": {"noise_multiplier": σ,
"clip": S}``) several times (the noise is fresh each run), and prints a
table: ε spent (δ = 1e-5), the final federated MSE and the distance to
the pooled optimum θ*, mean ± standard deviation over the repeats, beside
the same run without DP. The noise on
the model is σ·S/M a round, M the clients: the same ε costs far less
accuracy with many clients than with two.

The federations run in this process (``fedavg_server.inprocess``): the
server app over the scenario's clients in one client host app, each run
started through the server's own API with the /start body a real server
takes. The math is the code a real federation runs; only the sockets and
processes are gone, and with them most of the time 22 runs of 50 clients
took over HTTP.

Writes privacy.json to --out. Runs in the root environment, from any directory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from compare import distance
from fedavg import theory
from fedavg.scenarios import make_clients
from fedavg_server.inprocess import federation_app

# (scenario, K, rounds, clip S): the seed, and a federation of 50 iid clients.
SCENARIOS = (("seed", 2, 50, 0.5), ("iid", 50, 50, 0.5))
SIGMAS = (0.0, 0.5, 1.0, 2.0, 4.0)
DELTA = 1e-5


def run_row(server: FlaskClient, rounds: int, dp: dict[str, Any] | None, optimum: Any,
            repeats: int) -> dict[str, Any]:
    """``repeats`` runs of one setting → ε, and the final MSE and ‖θ_T − θ*‖ of each."""
    losses, distances, eps = [], [], None
    for _ in range(repeats if dp and dp["noise_multiplier"] > 0 else 1):  # without noise every run is the same
        reply = server.post("/start", json={"rounds": rounds, **({"dp": dp} if dp else {})})
        status, run = reply.status_code, reply.get_json()
        if status != 200 or run.get("status") != "completed":
            raise RuntimeError(f"run refused or failed: {run.get('error', run)}")
        losses.append(run["rounds"][-1]["federated_loss"])
        distances.append(distance(run["final_model"], optimum))
        eps = (run["rounds"][-1].get("privacy") or {}).get("epsilon")
    return {"dp": dp, "epsilon": eps, "losses": losses, "distances": distances}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per noisy setting (default 5)")
    parser.add_argument("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS), help="noise multipliers σ")
    parser.add_argument("--out", default="privacy-out", help="output directory (default ./privacy-out)")
    args = parser.parse_args(argv)
    try:
        sigmas = [float(s) for s in args.sigmas.replace(",", " ").split()]
    except ValueError:
        parser.error(f"--sigmas: numbers separated by commas, got {args.sigmas!r}")
    if args.repeats < 1 or not sigmas or min(sigmas) < 0:
        parser.error("--repeats must be >= 1 and --sigmas non-negative numbers")
    report = []
    for scenario, k, rounds, bound in SCENARIOS:
        clients = make_clients(scenario, k, 0, 20)  # a client host's defaults: seed 0, 20 rows
        optimum = theory.pooled_optimum([(c.X, c.y) for c in clients])
        history = tempfile.TemporaryDirectory(prefix="fedavg-privacy-")
        app = federation_app(clients, f"{history.name}/runs.db")
        try:
            server = app.test_client()
            print(f"privacy: {scenario}, K={k}, {rounds} rounds, clip S={bound:g}, M={k}: noise σ·S/M = "
                  f"σ × {bound / k:g} on each coordinate a round", flush=True)
            rows = [{"label": "no DP", **run_row(server, rounds, None, optimum, 1)}]
            for sigma in sigmas:
                dp = {"noise_multiplier": sigma, "clip": bound, "delta": DELTA}
                rows.append({"label": f"σ = {sigma:g}", **run_row(server, rounds, dp, optimum, args.repeats)})
                print(f"privacy:   σ = {sigma:g} done", flush=True)
        except RuntimeError as e:
            print(f"privacy: {e}", file=sys.stderr)
            return 1
        finally:
            fed = app.extensions["fedavg"]
            fed.shutdown()
            fed.transport.close()
            fed.store.close()
            history.cleanup()
        report.append({"scenario": scenario, "clients": k, "rounds": rounds, "clip": bound, "delta": DELTA,
                       "pooled_optimum": optimum.tolist(), "rows": rows})
        print(f"\n{scenario}, K={k}, {rounds} rounds, S={bound:g}, δ={DELTA:g} "
              f"(mean ± sd over {args.repeats} runs where there is noise)")
        print(f"{'setting':<10} {'ε':>10} {'final MSE':>20} {'‖θ_T − θ*‖':>20}")
        for row in rows:
            eps = "-" if row["dp"] is None else ("∞" if row["epsilon"] is None else f"{row['epsilon']:.3g}")
            print(f"{row['label']:<10} {eps:>10} {spread(row['losses']):>20} {spread(row['distances']):>20}")
        print()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    print(f"privacy: wrote {out / 'privacy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
