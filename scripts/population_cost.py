"""What a population held as arrays costs: build time, peak memory, and one
vectorised batch against the per-client loop (fedavg.population).

    .venv/bin/python scripts/population_cost.py --scenario iid --population 1000000 --mean-rows 20
    .venv/bin/python scripts/population_cost.py --scenario quantity-skew --population 1000000 --mean-rows 20

Each repeat (--repeat, default 3) is a fresh process, so that its peak RSS
(VmHWM from /proc/self/status) is its own; the figures printed are the
medians, with every repeat's figures beside them. In each: the build of K
clients (``Population.build``); one ``Population.train`` of --batch sampled
clients (FedAvg, E = 10, the seed's lr: local GD on the statistics, losses
from the rows); and the per-client path on --each of the same sample, timed
twice: the strategy's ``local`` on each client's rows (the math only) and
each ``LocalClient.train`` on the /train body (what a hosted client does
today, without HTTP). quantity-skew's n_k is log-normal around its median
``samples``, with mean e^{1/2}·samples: --mean-rows 20 asks for the median
20/e^{1/2} ≈ 12. Linux only (/proc). Figures, not pass/fail.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np

from fedavg.population import POPULATION_SCENARIOS, Population
from fedavg.strategies import STRATEGIES
from fedavg.strict_json import model_json
from fedavg.training import TrainConfig
from fedavg.wire import parse_train_request, train_config_json


def peak_rss_mb() -> float:
    """VmHWM, this process's peak resident set, in MB (10⁶ bytes)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def once(scenario: str, population: int, mean_rows: float, batch: int, each: int, seed: int) -> dict:
    """One measurement, in this process."""
    samples = round(mean_rows / math.exp(0.5)) if scenario == "quantity-skew" else round(mean_rows)
    start = time.perf_counter()
    pop = Population.build(scenario, population, seed=seed, samples=samples)
    build_s = time.perf_counter() - start
    rss_built = peak_rss_mb()
    ids = np.random.default_rng(seed + 1).choice(population, size=batch, replace=False)
    body = {"global_model": model_json(np.zeros(pop.num_features), 0.0), "round": 1,
            "config": train_config_json(TrainConfig())}  # FedAvg, E = 10, lr = 0.01: the seed's
    task = parse_train_request(body, pop.num_features)
    memory = pop.memory()
    start = time.perf_counter()
    pop.train(task, ids, memory)
    batch_s = time.perf_counter() - start
    sample = ids[:each]
    start = time.perf_counter()
    STRATEGIES["fedavg"].local_each(task, pop, sample, memory)
    local_s = time.perf_counter() - start
    clients = [pop.client(int(k)) for k in sample]
    start = time.perf_counter()
    for client in clients:
        client.train(body)
    train_s = time.perf_counter() - start
    return {"scenario": scenario, "K": population, "samples": samples, "rows": int(pop.offsets[-1]),
            "mean_n_k": float(pop.sizes.mean()), "build_s": build_s, "rss_mb": peak_rss_mb(),
            "rss_built_mb": rss_built, "batch": batch, "batch_s": batch_s, "batch_us_per_client": batch_s / batch * 1e6,
            "each": each, "local_us_per_client": local_s / each * 1e6, "train_us_per_client": train_s / each * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=POPULATION_SCENARIOS, default="iid")
    parser.add_argument("--population", type=int, default=1_000_000, help="K (default 1,000,000)")
    parser.add_argument("--mean-rows", type=float, default=20.0, help="the mean n_k asked for (default 20)")
    parser.add_argument("--batch", type=int, default=10_000, help="clients in the vectorised batch")
    parser.add_argument("--each", type=int, default=1_000, help="clients through the per-client path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes; the medians are printed")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)  # a repeat's own process
    args = parser.parse_args()
    if args.once:
        print(json.dumps(once(args.scenario, args.population, args.mean_rows, args.batch, args.each, args.seed)))
        return 0
    runs = []
    for _ in range(args.repeat):  # a process each: VmHWM is a process's peak
        out = subprocess.run([sys.executable, __file__, "--once", *sys.argv[1:]], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out))
    first = runs[0]
    print(f"{first['scenario']}: K = {first['K']:,}, {first['rows']:,} rows (mean n_k {first['mean_n_k']:.2f}, "
          f"samples {first['samples']}); medians of {len(runs)} processes, each run's in brackets")
    for key, label, unit in (("build_s", "build", "s"), ("rss_mb", "peak RSS (VmHWM), whole run", "MB"),
                             ("rss_built_mb", "peak RSS after the build", "MB"),
                             ("batch_s", f"one batch of {first['batch']:,} (FedAvg, E = 10)", "s"),
                             ("batch_us_per_client", "  per client", "µs"),
                             ("local_us_per_client", f"per-client local GD on rows ({first['each']:,})", "µs"),
                             ("train_us_per_client", f"per-client LocalClient.train ({first['each']:,})", "µs")):
        values = [r[key] for r in runs]
        print(f"  {label:48s} {statistics.median(values):10.3f} {unit}   "
              f"[{', '.join(f'{v:.3f}' for v in values)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
