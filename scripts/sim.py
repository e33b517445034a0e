"""make sim K=1000 ROUNDS=20: a client host with K simulated clients and a
server pointed at all of them; run, print one summary line per round, stop
(or, with --keep, leave both up for the page until Ctrl-C).

The full math of any round is in GET /runs/<id> (and on the page); here one
line a round is enough to watch K clients train together. Standard library
only, like launcher.py: it runs with the system python."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time

from launcher import free_port, get_json, post_json, start_app, stop, wait_healthy

# The client host's scenarios (fedavg.scenarios.SCENARIOS; a test keeps the
# two equal: this script cannot import fedavg).
SCENARIOS = ("seed", "iid", "feature-shift", "label-shift", "quantity-skew", "csv", "diabetes", "byzantine")
DEFAULT_K = 50
SCENARIO_K = {"seed": 2, "diabetes": 4}  # the seed has two clients; diabetes converges at lr 0.1 for K <= 10
DEFAULT_LR = 0.01
SCENARIO_LR = {"diabetes": 0.1}  # fedavg.scenarios.DIABETES_LR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", "-k", type=int,
                        help=f"K (default {DEFAULT_K}; {', '.join(f'{k} for {s}' for s, k in SCENARIO_K.items())})")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scenario", choices=SCENARIOS, default="iid")
    parser.add_argument("--csv", help="for --scenario csv: the CSV to split among the clients "
                                      "(relative to the directory you run this in)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=20, help="n_k per client (mean, for quantity-skew)")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--lr", type=float,
                        help=f"default {DEFAULT_LR}; {', '.join(f'{v} for {s}' for s, v in SCENARIO_LR.items())}")
    parser.add_argument("--keep", action="store_true",
                        help="after the run, keep the host and the server up for the page until Ctrl-C")
    parser.add_argument("--port", type=int, help="the server's port (default: a free one)")
    args = parser.parse_args()
    # kill and a closed terminal stop it as Ctrl-C does: the apps run in
    # sessions of their own, and only this script stops them.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    k = args.clients if args.clients is not None else SCENARIO_K.get(args.scenario, DEFAULT_K)
    lr = args.lr if args.lr is not None else SCENARIO_LR.get(args.scenario, DEFAULT_LR)
    if args.scenario == "seed" and k != 2:
        parser.error(f"scenario seed is the original two clients: K must be 2 (or left out), got {k}")
    if args.scenario == "csv" and not args.csv:
        parser.error("scenario csv needs --csv FILE")
    if args.csv and args.scenario != "csv":
        parser.error(f"--csv is for --scenario csv, not {args.scenario}")

    host_port, server_port = free_port(), args.port or free_port()
    # The host runs in client_host/: a relative path is the user's, from here.
    csv = os.path.abspath(args.csv) if args.csv else None
    host_args = ["--scenario", args.scenario, "--clients", str(k), "--seed", str(args.seed),
                 "--samples", str(args.samples), *(["--csv", csv] if csv else [])]
    apps = []
    history = tempfile.TemporaryDirectory(prefix="fedavg-sim-")
    try:
        print(f"sim: starting a client host with {k} clients ({args.scenario}) …", flush=True)
        host = start_app("client_host", host_port, host_args)
        apps.append(host)
        wait_healthy([host])
        print(f"sim: the clients' data: {get_json(host.url + '/health')['scenario']}", flush=True)
        urls = [host.url + path for path in get_json(host.url + "/clients")["clients"]]
        server = start_app("server", server_port, ["--clients", ",".join(urls),
                                                   "--db", f"{history.name}/runs.db"])
        apps.append(server)
        wait_healthy([server])
        status, started = post_json(server.url + "/start", {
            "rounds": args.rounds, "seed": args.seed, "fraction": args.fraction, "lr": lr, "wait": False})
        if status != 202:
            print(f"sim: the server refused the run: {started.get('error')}", file=sys.stderr)
            return 1
        run_id, t0, shown = started["run_id"], time.monotonic(), 0
        keep = "" if args.keep else " (add --keep, under make SIM_ARGS=--keep, to keep it up after the run)"
        print(f"sim: the page, while this runs: {server.url}/{keep}\n"
              f"sim: run {run_id}: {args.rounds} rounds over {k} clients, lr={lr:g}\n"
              f"{'round':>5}  {'N':>7}  {'clients':>7}  {'dropped':>7}  {'w':>12}  {'b':>12}  {'elapsed s':>9}",
              flush=True)
        while True:
            st = get_json(server.url + "/status")
            while shown < st["round"]:
                shown += 1
                r = get_json(f"{server.url}/runs/{run_id}?since={shown - 1}")["rounds"]
                rec = next(x for x in r if x["round"] == shown)
                m = rec["global_model"]
                w = m["w"] if not isinstance(m["w"], list) else m["w"][0]
                print(f"{shown:>5}  {rec['N']:>7}  {len(rec['participants']):>7}  {len(rec['dropped']):>7}  "
                      f"{w:>12.6f}  {m['b']:>12.6f}  {time.monotonic() - t0:>9.2f}", flush=True)
            if st["status"] != "running" and shown >= st["round"]:
                break
            time.sleep(0.1)  # polling interval
        run = get_json(f"{server.url}/runs/{run_id}")
        losses = [r["federated_loss"] for r in run["rounds"]]
        print(f"sim: run {run['status']} in {time.monotonic() - t0:.2f} s; federated MSE "
              f"{losses[0]:.6g} (round 1) → {losses[-1]:.6g} (round {len(losses)})"
              if losses and losses[0] is not None and losses[-1] is not None else f"sim: run {run['status']}")
        if run["error"]:
            print(f"sim: {run['error']}")
        for warning in run.get("warnings", []):
            print(f"sim: warning: {warning}")
        if args.keep:
            print(f"sim: --keep: the page is {server.url}/ ; Ctrl-C stops the host and the server.", flush=True)
            while all(app.proc.poll() is None for app in apps):
                threading.Event().wait(0.5)  # until Ctrl-C, or an app exits
            print("sim: an app exited: " + ", ".join(a.name for a in apps if a.proc.poll() is not None))
        return 0 if run["status"] == "completed" else 1
    except KeyboardInterrupt:
        print("sim: stopping…", flush=True)
        return 0 if args.keep else 130
    except RuntimeError as e:
        print(f"sim: {e}", file=sys.stderr)
        return 1
    finally:
        stop(apps)
        history.cleanup()


if __name__ == "__main__":
    sys.exit(main())
