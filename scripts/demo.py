"""make demo: start the three apps, run the default 5 rounds, print the FedAvg
math and the final model, compare with the pooled least-squares model, stop.

Runs in the server's environment (NumPy, the fedavg core) from the repo root.
"""
from __future__ import annotations

import sys
import tempfile
import time

import numpy as np

from fedavg.data import load_csv
from fedavg.theory import fedavg_fixed_point, pooled_optimum
from fedavg.trace import fmt_line
from launcher import DEFAULT_PORTS, ROOT, free_port, port_in_use, post_json, start_federation, stop, who_holds


def seed_data() -> list[tuple[np.ndarray, np.ndarray]]:
    """Both clients' private files: readable here only because this demo is a
    simulation on one machine; the server never reads them."""
    return [load_csv(ROOT / f"client_{k}" / "data.csv") for k in (1, 2)]


def line(theta: np.ndarray) -> str:
    return fmt_line(theta[:-1], theta[-1])


def ports() -> dict[str, int]:
    """The README's ports, except any that something else holds: a one-shot
    demo takes a free one instead, and says whose and which (`make run-all`,
    which a user keeps running and points a browser at, refuses instead)."""
    chosen = {}
    for name, port in DEFAULT_PORTS.items():
        chosen[name] = port
        if port_in_use(port):
            chosen[name] = free_port()
            print(f"demo: port {port} ({name}) is in use by {who_holds(port)}: using {chosen[name]} instead",
                  flush=True)
    return chosen


def main() -> int:
    use = ports()
    print(f"demo: starting client_1 (:{use['client_1']}), client_2 (:{use['client_2']}) and the server "
          f"(:{use['server']})…", flush=True)
    # A one-shot demo keeps its run history in a throwaway file: it shows run 1
    # every time and leaves the server's own history (instance/fedavg.db) alone.
    history = tempfile.TemporaryDirectory(prefix="fedavg-demo-")
    try:
        apps = start_federation(use, server_args=["--db", f"{history.name}/runs.db"])
    except RuntimeError as e:
        print(f"demo: could not start the apps: {e}", file=sys.stderr)
        return 1
    try:
        server = apps["server"]
        print("demo: all three answer /health; POST /start (5 rounds, the seed's defaults)\n", flush=True)
        status, run = post_json(server.url + "/start")
        if status != 200 or run.get("status") != "completed":
            print(f"demo: the run did not complete: HTTP {status} {run}", file=sys.stderr)
            return 1
        # The server prints its log as it goes; wait (bounded) for its last line.
        deadline = time.monotonic() + 10
        while f"Run {run['run_id']} completed" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.02)
        log = server.output()
        print(log[log.index(f"Run {run['run_id']}:"):].rstrip(), "\n", flush=True)

        print(f"demo: final global model (FedAvg, {len(run['rounds'])} rounds): {run['final_line']}")
        settings = run["settings"]
        data = seed_data()
        drifted = fedavg_fixed_point(data, settings["lr"], settings["local_epochs"])
        print("demo: for comparison only — possible here because this demo can read both clients'\n"
              "      private files, which FedAvg itself never does:\n"
              f"      the pooled least-squares model:        {line(pooled_optimum(data))}\n"
              f"      where FedAvg settles after many rounds: {line(drifted)}\n"
              "      (client drift: docs/STRATEGIES.md says why, and which strategies close the gap)")
        return 0
    finally:
        stop(list(apps.values()))
        history.cleanup()
        print("demo: stopped all three apps.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
