"""What one round costs at K clients with full participation, server and one
client host over HTTP on this machine: the batched path (one /batch/train per
host per round) against the per-client path (the server's --per-client: one
/train per client), each the median of the rounds' own ``duration_s`` over
several runs; and what the batched reply costs to encode and decode against
the per-client JSON replies, at B clients, in this process.

    .venv/bin/python scripts/batch_cost.py [--clients 1000] [--rounds 5] [--runs 3]
    .venv/bin/python scripts/batch_cost.py --population 1000000 --fraction 0.01 [--rounds 5] [--runs 3]

The issue's target for the batched path at K = 1000: ≤ 100 ms a round.
With ``--population K``: a host of a K-client population, reached by index
(GET /population), and one batched server sampling ``--fraction`` of it a
round: one round of 10,000 of 1,000,000 clients (no per-client server: it
would be 10,000 calls a round).
Prints figures; asserts nothing about time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import launcher  # noqa: E402


def rounds_ms(server: str, rounds: int, seed: int, fraction: float = 1.0) -> list[float]:
    status, body = launcher.post_json(f"{server}/start", {"rounds": rounds, "seed": seed, "client_timeout_s": 60,
                                                          "fraction": fraction}, timeout_s=600)
    assert status == 200 and body["status"] == "completed", body.get("error")
    return [r["duration_s"] * 1e3 for r in body["rounds"]]


def codec(b: int) -> dict[str, float]:
    """Bytes and encode/decode time of one batched reply of ``b`` clients
    against their ``b`` per-client /train JSON replies (FedAvg, one feature)."""
    from fedavg.batch_wire import batch_reply_json, parse_batch_reply
    from fedavg.population import Population
    from fedavg.strategies import Local, Result
    from fedavg.wire import parse_train_reply, parse_train_request, train_reply_json

    population = Population.build("iid", b, seed=0)
    task = parse_train_request({"global_model": {"w": 0.0, "b": 0.0}}, 1)
    reply = population.train(task, list(range(b)), population.memory())
    ks = list(range(1, b + 1))

    def best(fn, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, min(times) * 1e3

    text, enc = best(lambda: json.dumps(batch_reply_json(reply, "fedavg", "")).encode())
    _, dec = best(lambda: parse_batch_reply(json.loads(text), ks, 1, "fedavg"))
    rows = [train_reply_json(f"sim_{j + 1}", int(reply.n[j]), Local(reply.local.theta[j]),
                             {"loss_before": float(reply.loss_before[j]), "loss_after": float(reply.loss_after[j])},
                             "fedavg") for j in range(b)]
    texts, enc1 = best(lambda: [json.dumps(r).encode() for r in rows])
    _, dec1 = best(lambda: [Result("x", "u", 1, **{k: v for k, v in parse_train_reply(json.loads(t), 1).items()
                                                   if k in ("theta", "extra", "metrics")}) for t in texts])
    return {"batched_bytes": len(text), "per_client_bytes": sum(len(t) for t in texts),
            "batched_encode_ms": enc, "batched_decode_ms": dec, "per_client_encode_ms": enc1,
            "per_client_decode_ms": dec1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--population", type=int, metavar="K", help="a host of K clients reached by index")
    parser.add_argument("--fraction", type=float, default=1.0, help="with --population: C, sampled a round")
    args = parser.parse_args()
    if args.population is not None:
        population_rounds(args.population, args.fraction, args.rounds, args.runs)
        return
    for name, value in codec(args.clients).items():
        print(f"B={args.clients}: {name} = {value:,.1f}")
    apps = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            host = launcher.start_app("client_host", launcher.free_port(), ["--scenario", "iid", "--clients",
                                                                             str(args.clients)], via_poetry=False)
            apps.append(host)
            launcher.wait_healthy([host])
            servers = {}
            for how, extra in (("batched", []), ("per-client", ["--per-client"])):
                server = launcher.start_app("server", launcher.free_port(), [
                    "--clients-from", host.url, "--db", f"{tmp}/{how}.db", *extra], via_poetry=False)
                apps.append(server)
                servers[how] = server
            launcher.wait_healthy(apps)
            for how, server in servers.items():
                rounds_ms(server.url, 1, 0)  # warm: connections, imports
                medians = [statistics.median(rounds_ms(server.url, args.rounds, seed)) for seed in range(args.runs)]
                print(f"K={args.clients}, one round, {how}: median of {args.runs} runs' medians "
                      f"({args.rounds} rounds each) = {statistics.median(medians):.1f} ms "
                      f"(runs: {', '.join(f'{m:.1f}' for m in medians)})")
            calls = launcher.get_json(f"{host.url}/health").get("calls")
            print(f"the host's counters after both: {calls}")
    finally:
        launcher.stop(apps)


def population_rounds(k: int, fraction: float, rounds: int, runs: int) -> None:
    """One round of ``fraction`` of a K-client population over HTTP: median of runs' medians."""
    apps = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            host = launcher.start_app("client_host", launcher.free_port(), ["--population", str(k)], via_poetry=False)
            apps.append(host)
            launcher.wait_healthy([host])
            server = launcher.start_app("server", launcher.free_port(), [
                "--clients-from", host.url, "--db", f"{tmp}/population.db"], via_poetry=False)
            apps.append(server)
            launcher.wait_healthy(apps)
            rounds_ms(server.url, 1, 0, fraction)  # warm: connections, imports
            medians = [statistics.median(rounds_ms(server.url, rounds, seed, fraction)) for seed in range(runs)]
            print(f"population {k:,}, fraction {fraction:g} ({round(k * fraction):,} clients a round), one round: "
                  f"median of {runs} runs' medians ({rounds} rounds each) = {statistics.median(medians):.1f} ms "
                  f"(runs: {', '.join(f'{m:.1f}' for m in medians)})")
    finally:
        launcher.stop(apps)


if __name__ == "__main__":
    main()
