"""What DP-FedAvg costs over HTTP at population scale: a client host started
with ``--population K`` and a server ``--clients-from`` it, as processes on
this machine; one run of R rounds with Poisson sampling at q (each client
on its own with probability q, M = q·K a round on average), σ and S given,
one /batch/train a round. Prints the clients each round took, the rounds'
own ``duration_s`` (median, and the slowest), the run's time from /start to
its answer, its probe and final evaluation apart, and the ε the run
reports after its last round.

    .venv/bin/python scripts/dp_cost.py [--population 20000] [--fraction 0.5] [--rounds 10]
                                        [--in-process] [--no-dp]

--in-process runs the same server and host code in this process without
sockets (``InProcessTransport``): the floor of what the code costs a
round. --no-dp runs FedAvg with the same sampling fraction (the seeded
sample of ⌈q·K⌉), to see what DP adds. Every client whose /health the
server's probe did not hear before round 1 is called with its own /train
instead of in its host's /batch/train: the host's counters are printed,
and a warning when that happened.

The issue's target: population 1,000,000, q = 0.01 (about 10,000 clients a
round), 100 rounds of DP-FedAvg over HTTP in ≤ 90 s, ε reported. Prints
figures; asserts nothing about time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import launcher  # noqa: E402


def body(args: argparse.Namespace) -> dict:
    dp = {"noise_multiplier": args.sigma, "clip": args.clip, "local_noise": args.local_noise}
    return {"rounds": args.rounds, "fraction": args.fraction, "client_timeout_s": 600,
            **({} if args.no_dp else {"dp": dp})}


def summary(args: argparse.Namespace, rounds: list[dict], took: float, calls: dict, how: str) -> None:
    ms = [r["duration_s"] * 1e3 for r in rounds]
    # (a round of more than 100 clients is recorded as a summary, which counts them)
    clients = [r["summary"]["contributed"] if r.get("summary") else len(r["participants"]) for r in rounds]
    print(f"K={args.population:,}, q={args.fraction:g} (M={args.population * args.fraction:,.0f}), "
          + ("no DP (FedAvg)" if args.no_dp else f"σ={args.sigma:g}, S={args.clip:g}"
             f"{', local noise' if args.local_noise else ''}") + f", {args.rounds} rounds {how}")
    print(f"clients a round: median {statistics.median(clients):,.0f} (from {min(clients):,} to {max(clients):,})")
    print(f"one round: median {statistics.median(ms):.1f} ms, slowest {max(ms):.1f} ms; the rounds together "
          f"{sum(ms) / 1e3:.2f} s")
    print(f"the run, /start to its answer: {took:.1f} s (probe and final evaluation: {took - sum(ms) / 1e3:.1f} s)")
    if not args.no_dp:
        print(f"ε after {len(rounds)} rounds (δ = {rounds[-1]['privacy']['delta']:g}): "
              f"{rounds[-1]['privacy']['epsilon']}")
    print(f"the host's counters: {calls}")
    if calls.get("train"):
        print(f"WARNING: {calls['train']:,} clients were called with their own /train, not in the host's "
              "/batch/train: the server's /health probe did not hear them before round 1", flush=True)


def in_process(args: argparse.Namespace) -> None:
    """The same run with the server and host apps in this process, no sockets."""
    import logging

    from fedavg.http.host_app import create_host_app
    from fedavg.population import Population
    from fedavg_server import create_app
    from fedavg_server.inprocess import InProcessTransport

    logging.disable(logging.INFO)  # (the server logs each round's record: not what is measured)
    host = create_host_app(None, population=Population.build("iid", args.population))
    with tempfile.TemporaryDirectory() as tmp:
        server = create_app({"TRANSPORT": InProcessTransport.populations({"http://127.0.0.1:6000": host}),
                             "DB": f"{tmp}/runs.db", "TOKEN": None}).test_client()
        started = time.perf_counter()
        run = server.post("/start", json=body(args)).get_json()
        took = time.perf_counter() - started
        if run.get("status") != "completed":
            raise SystemExit(f"dp_cost: the run did not complete: {run.get('error', run)}")
        rounds = run["rounds"]
        while run.get("more"):
            run = server.get(f"/runs/{run['run_id']}?since={rounds[-1]['round']}&limit=10000").get_json()
            rounds += run["rounds"]
        summary(args, rounds, took, host.test_client().get("/health").get_json()["calls"], "in this process")
        server.application.extensions["fedavg"].shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=20_000, help="K, the host's clients (default 20,000)")
    parser.add_argument("--fraction", type=float, default=0.5, help="q, each client's chance a round (default 0.5)")
    parser.add_argument("--rounds", type=int, default=10, help="R (default 10)")
    parser.add_argument("--sigma", type=float, default=1.0, help="σ, the noise multiplier (default 1)")
    parser.add_argument("--clip", type=float, default=0.5, help="S, the clip bound (default 0.5)")
    parser.add_argument("--local-noise", action="store_true", help="each client adds its share of the noise")
    parser.add_argument("--in-process", action="store_true", help="no sockets: the apps in this process")
    parser.add_argument("--no-dp", action="store_true", help="FedAvg at the same fraction, for comparison")
    args = parser.parse_args(argv)
    if args.population < 1 or args.rounds < 1 or not 0 < args.fraction <= 1:
        parser.error("--population and --rounds must be >= 1, --fraction in (0, 1]")
    if args.in_process:
        in_process(args)
        return 0
    apps = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            host = launcher.start_app("client_host", launcher.free_port(),
                                      ["--population", str(args.population)], via_poetry=False)
            apps.append(host)
            launcher.wait_healthy([host], timeout_s=600)
            print(f"host of {args.population:,} clients up in {time.perf_counter() - started:.1f} s", flush=True)
            server = launcher.start_app("server", launcher.free_port(),
                                        ["--clients-from", host.url, "--db", f"{tmp}/runs.db"], via_poetry=False)
            apps.append(server)
            launcher.wait_healthy([server], timeout_s=600)
            started = time.perf_counter()
            status, run = launcher.post_json(f"{server.url}/start", body(args), timeout_s=3600)
            took = time.perf_counter() - started
            if status != 200 or run.get("status") != "completed":
                print(f"dp_cost: the run did not complete: {run.get('error', run)}", file=sys.stderr)
                return 1
            rounds = run["rounds"]
            while run.get("more"):  # the answer's first page: the rest read with ?since=
                run = launcher.get_json(f"{server.url}/runs/{run['run_id']}?since={rounds[-1]['round']}&limit=10000")
                rounds += run["rounds"]
            summary(args, rounds, took, launcher.get_json(f"{host.url}/health").get("calls"), "over HTTP")
    finally:
        launcher.stop(apps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
