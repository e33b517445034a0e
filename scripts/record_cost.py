"""What writing down one round of K clients costs the server: the record's
size, and the time from the clients' Results to the round committed in
SQLite (the collector's participants and terms, round_json, json.dumps, the
INSERTs), the round summarised (K > records.SUMMARY_ABOVE) against the same
round listed whole, as every round was before summaries (SUMMARY_ABOVE set
past K).

    .venv/bin/python scripts/record_cost.py --clients 10000

Prints, for each way, the stored record's bytes, the per-client table's
bytes (round_clients), and the median CPU milliseconds per round of
--repeat (CPU, not wall: the machine is shared, see round_cost.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from fedavg.strategies import STRATEGIES, Result  # noqa: E402
from fedavg_server import collect, records  # noqa: E402
from fedavg_server.records import RoundRecord  # noqa: E402
from fedavg_server.runs import RunStore  # noqa: E402
from fedavg_server.settings import RunSettings  # noqa: E402


def one_way(k: int, repeat: int, listed: bool) -> tuple[int, int, float]:
    """(record bytes, per-client table bytes, median CPU ms per round)."""
    above = records.SUMMARY_ABOVE
    if listed:  # how every round was written before summaries
        records.SUMMARY_ABOVE = collect.SUMMARY_ABOVE = k
    try:
        rng = np.random.default_rng(0)
        strategy = STRATEGIES["fedavg"](lr=0.01, num_clients=k)
        theta = np.zeros(2)
        results = [Result(f"client_{i}", f"http://127.0.0.1:6000/clients/{i}", int(n), rng.normal(size=2),
                          metrics={"loss_before": float(rng.random()), "loss_after": float(rng.random())})
                   for i, n in enumerate(rng.integers(5, 60, size=k), start=1)]
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            store = RunStore(Path(tmp) / "runs.db")
            run_id = store.create(RunSettings(rounds=repeat).to_json(), [], {"w": 0.0, "b": 0.0})
            step = strategy.aggregate(theta, results, {})
            for r in range(1, repeat + 1):
                started = time.process_time()
                got = collect.collected(results, strategy)
                store.add_round(run_id, RoundRecord(r, "fedavg", theta, step, got.participants, got.dropped, got.N,
                                                    got.terms, 0.0))
                times.append(time.process_time() - started)
            row = store._read("SELECT length(r.record) AS rec, length(c.clients) AS side FROM rounds r LEFT JOIN "
                              "round_clients c USING (run_id, round) WHERE r.round = 1", ())[0]
            store.close()
        return row["rec"], row["side"] or 0, statistics.median(times) * 1e3
    finally:
        records.SUMMARY_ABOVE = collect.SUMMARY_ABOVE = above


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.clients <= records.SUMMARY_ABOVE:
        parser.error(f"--clients: must be more than {records.SUMMARY_ABOVE} (records.SUMMARY_ABOVE) to compare")
    for name, listed in (("listed whole (before)", True), ("summarised (now)", False)):
        rec, side, ms = one_way(args.clients, args.repeat, listed)
        print(json.dumps({"clients": args.clients, "record": name, "record_bytes": rec, "clients_table_bytes": side,
                          "cpu_ms_per_round": round(ms, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
