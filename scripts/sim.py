"""make sim K=1000 ROUNDS=20: a client host with K simulated clients and a
server pointed at all of them; run, print one summary line per round, stop.

The full math of any round is in GET /runs/<id> (and on the page); here one
line a round is enough to watch K clients train together."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

from launcher import free_port, get_json, post_json, start_app, stop, wait_healthy

SCENARIOS = ("iid", "feature-shift", "label-shift", "quantity-skew", "csv")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", "-k", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scenario", choices=SCENARIOS, default="iid")
    parser.add_argument("--csv", help="for --scenario csv: the CSV to split among the clients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=20, help="n_k per client (mean, for quantity-skew)")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    host_port, server_port = free_port(), free_port()
    host_args = ["--scenario", args.scenario, "--clients", str(args.clients), "--seed", str(args.seed),
                 "--samples", str(args.samples), *(["--csv", args.csv] if args.csv else [])]
    apps = []
    history = tempfile.TemporaryDirectory(prefix="fedavg-sim-")
    try:
        print(f"sim: starting a client host with {args.clients} clients ({args.scenario}) …", flush=True)
        host = start_app("client_host", host_port, host_args)
        apps.append(host)
        wait_healthy([host])
        urls = [host.url + path for path in get_json(host.url + "/clients")["clients"]]
        server = start_app("server", server_port, ["--clients", ",".join(urls),
                                                   "--db", f"{history.name}/runs.db"])
        apps.append(server)
        wait_healthy([server])
        status, started = post_json(server.url + "/start", {
            "rounds": args.rounds, "seed": args.seed, "fraction": args.fraction, "lr": args.lr, "wait": False})
        if status != 202:
            print(f"sim: the server refused the run: {started.get('error')}", file=sys.stderr)
            return 1
        run_id, t0, shown = started["run_id"], time.monotonic(), 0
        print(f"sim: run {run_id}: {args.rounds} rounds over {args.clients} clients\n"
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
        return 0 if run["status"] == "completed" else 1
    except RuntimeError as e:
        print(f"sim: {e}", file=sys.stderr)
        return 1
    finally:
        stop(apps)
        history.cleanup()


if __name__ == "__main__":
    sys.exit(main())
