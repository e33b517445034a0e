"""Flower's simulation engine on the same federation, for `make bench`'s side-by-side figure.

Run it with a Python that has Flower installed, never the project's own
environments (Flower and Ray are not dependencies of Raw FedAvg):

    python3 -m venv /tmp/flower && /tmp/flower/bin/pip install 'flwr[simulation]==1.42.*'
    /tmp/flower/bin/python scripts/flower_side.py --clients 1000 --rounds 5

K clients with the iid scenario's kind of data (x ~ U(0, 5), y = 2x + 1 +
N(0, 0.1²) noise, n_k rows each), each training a line by E epochs of full-batch
gradient descent at lr (the seed's local step), FedAvg over all K every
round, on Flower's faster path (``@app.main`` with ``DefaultWorkflow``,
what Flower's own examples use) with Ray as the backend. Prints one JSON
line: the seconds of each round (the time between two aggregations; the
first includes starting Ray's workers), the median of the rounds after the
first, and the peak resident memory of this process and
all its children (Ray's workers) summed, sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def tree_rss_bytes(root: int) -> int:
    """Σ VmRSS over ``root`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(entry.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=20, help="n_k, rows per client")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    # Flower is imported here, not at the top: --help works without it.
    from flwr.app import Context
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow
    from flwr.simulation import run_simulation

    k, n, epochs, lr = args.clients, args.samples, args.epochs, args.lr

    def data(cid: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([0, cid])
        x = rng.uniform(0, 5, n)
        return x, 2 * x + 1 + rng.normal(0, 0.1, n)

    class LineClient(NumPyClient):
        """The seed's local step: E epochs of full-batch GD on the MSE."""

        def __init__(self, cid: int) -> None:
            self.x, self.y = data(cid)

        def fit(self, parameters, config):
            w, b = float(parameters[0][0]), float(parameters[0][1])
            for _ in range(epochs):
                r = w * self.x + b - self.y
                w, b = w - lr * 2 * float(np.mean(r * self.x)), b - lr * 2 * float(np.mean(r))
            return [np.array([w, b])], n, {}

    def client_fn(context: Context):
        return LineClient(int(context.node_config["partition-id"])).to_client()

    ends: list[float] = []

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            ends.append(time.perf_counter())
            return out

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=k, min_available_clients=k,
                           initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    server_app = ServerApp()

    @server_app.main()
    def run(grid, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=args.rounds), strategy=strategy)
        DefaultWorkflow()(grid, legacy)

    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_rss_bytes(os.getpid()))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=ClientApp(client_fn=client_fn), num_supernodes=k,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    done.set()
    rounds = [b - a for a, b in zip([started, *ends], ends)]
    print(json.dumps({"flower": "1.42", "clients": k, "rounds": len(rounds), "round_s": rounds,
                      "median_round_s_after_first": statistics.median(rounds[1:]) if len(rounds) > 1 else None,
                      "peak_tree_rss_bytes": peak[0]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
