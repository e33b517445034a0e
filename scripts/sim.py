"""make sim K=1000 ROUNDS=20: a client host with K simulated clients and a
server pointed at all of them; run, print one summary line per round, stop
(or, with --keep, leave both up for the page until Ctrl-C).

make sim POPULATION=1000000 FRACTION=0.01 ROUNDS=100: a client host of a
population held as arrays (--population), the server reaching it by index
(--clients-from: one GET /population, no client's own /health), a fraction
of it a round in one batched call; a progress bar (rounds done of all,
clients a round, elapsed, ETA: one line redrawn on a terminal, a line a
round otherwise) and the final model.

The full math of any round is in GET /runs/<id> (and on the page); here one
line a round is enough to watch K clients train together. Standard library
only, like launcher.py: it runs with the system python."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
import time

from launcher import free_port, get_json, post_json, start_app, stop, wait_healthy

DEFAULT_K = 50
SCENARIO_K = {"seed": 2, "diabetes": 4}  # the seed has two clients; diabetes converges at lr 0.1 for K <= 10
DEFAULT_LR = 0.01
SCENARIO_LR = {"diabetes": 0.1}  # fedavg.scenarios.DIABETES_LR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", "-k", type=int,
                        help=f"K (default {DEFAULT_K}; {', '.join(f'{k} for {s}' for s, k in SCENARIO_K.items())})")
    parser.add_argument("--population", type=int, metavar="K",
                        help="K clients held as arrays (the host's --population; scenarios iid, label-shift, "
                             "quantity-skew, byzantine), reached by index, with a progress bar")
    parser.add_argument("--rounds", type=int, default=20)
    # No list of names here: this script cannot import fedavg, and the host's
    # own --scenario refuses a name fedavg.scenarios.SCENARIOS does not register, naming them all.
    parser.add_argument("--scenario", default="iid", help="a client host scenario (default iid)")
    parser.add_argument("--csv", help="for --scenario csv: the CSV to split among the clients "
                                      "(relative to the directory you run this in)")
    parser.add_argument("--target", metavar="COLUMN",
                        help="for --scenario csv: the CSV's column to predict (the host's --target; default y)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=20, help="n_k per client (mean, for quantity-skew)")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--lr", type=float,
                        help=f"default {DEFAULT_LR}; {', '.join(f'{v} for {s}' for s, v in SCENARIO_LR.items())}")
    parser.add_argument("--dropout", type=float, metavar="P",
                        help="each client drops out of each round with probability P (the host's --dropout)")
    parser.add_argument("--keep", action="store_true",
                        help="after the run, keep the host and the server up for the page until Ctrl-C")
    parser.add_argument("--port", type=int, help="the server's port (default: a free one)")
    args = parser.parse_args()
    # kill and a closed terminal stop it as Ctrl-C does: the apps run in
    # sessions of their own, and only this script stops them.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    if args.population is not None and args.clients is not None:
        parser.error("--clients and --population: give one (K clients listed, or K held as arrays)")
    if args.population is not None and args.population < 1:
        parser.error(f"--population: must be at least 1, got {args.population}")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction: must be in (0, 1], got {args.fraction:g}")
    k = args.population or (args.clients if args.clients is not None else SCENARIO_K.get(args.scenario, DEFAULT_K))
    lr = args.lr if args.lr is not None else SCENARIO_LR.get(args.scenario, DEFAULT_LR)
    if args.scenario == "seed" and k != 2:
        parser.error(f"scenario seed is the original two clients: K must be 2 (or left out), got {k}")
    if args.scenario == "csv" and not args.csv:
        parser.error("scenario csv needs --csv FILE")
    if args.csv and args.scenario != "csv":
        parser.error(f"--csv is for --scenario csv, not {args.scenario}")
    if args.target is not None and args.scenario != "csv":
        parser.error(f"--target is for --scenario csv, not {args.scenario}")

    host_port, server_port = free_port(), args.port or free_port()
    # The host runs in client_host/: a relative path is the user's, from here.
    csv = os.path.abspath(args.csv) if args.csv else None
    host_args = ["--scenario", args.scenario, "--population" if args.population else "--clients", str(k),
                 "--seed", str(args.seed), "--samples", str(args.samples), *(["--csv", csv] if csv else []),
                 *(["--dropout", str(args.dropout)] if args.dropout is not None else []),
                 *(["--target", args.target] if args.target is not None else [])]
    apps = []
    history = tempfile.TemporaryDirectory(prefix="fedavg-sim-")
    try:
        print(f"sim: starting a client host with {k} clients ({args.scenario}) …", flush=True)
        host = start_app("client_host", host_port, host_args)
        apps.append(host)
        wait_healthy([host])
        print(f"sim: the clients' data: {get_json(host.url + '/health')['scenario']}", flush=True)
        if args.population:  # reached by index: the server reads the host's /population itself
            clients = ["--clients-from", host.url]
        else:
            clients = ["--clients", ",".join(host.url + path for path in get_json(host.url + "/clients")["clients"])]
        server = start_app("server", server_port, [*clients, "--db", f"{history.name}/runs.db"])
        apps.append(server)
        wait_healthy([server])
        status, started = post_json(server.url + "/start", {
            "rounds": args.rounds, "seed": args.seed, "fraction": args.fraction, "lr": lr, "wait": False})
        if status != 202:
            print(f"sim: the server refused the run: {started.get('error')}", file=sys.stderr)
            return 1
        run_id, t0, shown = started["run_id"], time.monotonic(), 0
        if args.population:
            return population_run(server.url, run_id, args, lr, k, t0, apps)
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


def population_run(server: str, run_id: int, args: argparse.Namespace, lr: float, k: int, t0: float,
                   apps: list) -> int:
    """Follow a run over a population with a progress bar, from /status
    alone (a round's record of 10,000 participants is not read to draw a
    bar); then the final model, and the last round's counts."""
    per_round = min(k, max(1, math.ceil(args.fraction * k - 1e-9)))  # settings.sampled_per_round, min_clients 1
    print(f"sim: run {run_id}: {args.rounds} rounds over a population of {k:,} clients, {per_round:,} a round "
          f"(fraction {args.fraction:g}), lr={lr:g}", flush=True)
    tty = sys.stdout.isatty()
    shown = -1
    while True:
        st = get_json(server + "/status")
        done = st.get("round", 0) if st.get("run_id") == run_id else 0
        if done != shown:
            shown = done
            line = progress_line(done, args.rounds, per_round, time.monotonic() - t0)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        if st.get("status") != "running" and st.get("run_id") == run_id:
            break
        if any(app.proc.poll() is not None for app in apps):
            print(("\n" if tty else "") + "sim: an app exited: "
                  + ", ".join(a.name for a in apps if a.proc.poll() is not None), file=sys.stderr)
            return 1
        time.sleep(0.2)  # polling interval
    if tty:
        print(flush=True)
    model = st["current_global_model"]
    last = get_json(f"{server}/runs/{run_id}?since={max(done - 1, 0)}&limit=1")
    rec = last["rounds"][-1] if last["rounds"] else None
    print(f"sim: run {st['status']} in {time.monotonic() - t0:.2f} s: {done} rounds; final model w = "
          f"{model['w'] if not isinstance(model['w'], list) else model['w']}, b = {model['b']}", flush=True)
    if rec is not None:
        loss = rec.get("federated_loss")
        # (a round of more than 100 clients is recorded as a summary: its counts are there)
        took, dropped = ((rec["summary"]["contributed"], rec["summary"]["dropped"]) if "summary" in rec
                         else (len(rec["participants"]), len(rec["dropped"])))
        print(f"sim: round {rec['round']}: {took:,} clients, {dropped:,} dropped, N = {rec['N']:,}"
              + (f", federated MSE {loss:.6g}" if loss is not None else ""), flush=True)
    if st.get("error"):
        print(f"sim: {st['error']}")
    return 0 if st["status"] == "completed" else 1


def progress_line(done: int, total: int, per_round: int, elapsed: float, width: int = 30) -> str:
    """[#####-----] done/total rounds, clients a round, elapsed, and the ETA at the pace so far."""
    filled = width * done // max(total, 1)
    eta = f"{elapsed / done * (total - done):.0f} s" if done else "?"
    return (f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} rounds, {per_round:,} clients/round, "
            f"{elapsed:.1f} s elapsed, ETA {eta}")


if __name__ == "__main__":
    sys.exit(main())
