"""make compare: run each strategy on the same federation and measure how
close it gets to the pooled least-squares optimum θ*.

With --aggregators, each strategy runs once per combining rule of the server
(mean, median, trimmed_mean, krum), rows "fedavg+median" and so on; on the
byzantine scenario θ* is the honest clients' pooled optimum (the attackers'
data is honest, their replies are not).

A federation here is the server app over the scenario's clients, served by
one client host app, in one Python process (``fedavg_server.inprocess``:
the code the apps run, minus sockets; its history in a temporary file).
Each strategy is one ``POST /start`` through the server's own API, with the
same rounds, seed, lr and local epochs. --jobs N federations (default one
per core), each in a worker process, take the strategies in turn; --jobs 1
runs one federation in this process. This tool is a simulation that knows
the clients' data: it builds the scenario to compute θ* and where FedAvg is
predicted to stop (fedavg/theory.py). FedAvg never sees it.

Writes compare.json (every round's distance and loss, the settings, θ*, the
prediction) and compare.png / compare.svg (‖θ_t − θ*‖ per round, log scale)
to --out, prints a table and the paths. Exit 1 if no strategy ran, 2 for a
usage error.

Runs in the root environment (the fedavg and server packages, NumPy,
matplotlib, scikit-learn for the diabetes scenario), from any directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flask.testing import FlaskClient

from fedavg import theory
from fedavg.data import TARGET, add_target
from fedavg.scenarios import ATTACKERS, ATTACKS, DIABETES_LR, SCENARIOS, honest, make_clients
from fedavg.strategies import STRATEGIES
from fedavg.trace import fmt_line
from labs import Progress, close, default_jobs, federation, processes, spread

DEFAULT_CLIENTS = {"seed": 2, "diabetes": 4}  # any other scenario: 10
DEFAULT_LR = {"diabetes": DIABETES_LR}  # any other scenario: the server's 0.01
# log scale: a distance of exactly 0 (or below double precision around θ*'s
# size) is drawn at this floor instead of falling off the chart
FLOOR = 1e-16
# A strategy that ends closer to θ* than this has reached it to machine precision (exact's
# 1e-15 is rounding): it is drawn along the axis' bottom, labelled "0 to machine precision",
# and the axis spans the other strategies' decades, not sixteen of them.
PRECISION = 1e-10
MARKERS = "osD^vxP*<>"
# mean is the server's default (FedAvg's weighted average): a mean row sends no
# "aggregator" field, the others send theirs.
MEAN = "mean"
# The reply to /start as one line of JSON (curl's default is one key a line, for reading).
ACCEPT = {"Accept": "application/json"}
# How long a run past --timeout is given to stop after its current round.
STOP_WAIT_S = 60.0


def parse_param(text: str) -> tuple[str | None, str, Any]:
    """'name=value' (every strategy) or 'strategy.name=value' (that one only)
    → (strategy or None, name, value); the value as JSON if it parses (a
    number, true, null), else as the string given."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants NAME=VALUE or STRATEGY.NAME=VALUE, got {text!r}")
    strategy, _, name = key.rpartition(".")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return strategy or None, name, value


def theta_of(model: dict[str, Any]) -> np.ndarray:
    """A wire model {"w": number or list, "b"} → θ = [w_1 … w_d, b]."""
    return np.append(np.atleast_1d(np.asarray(model["w"], dtype=float)), float(model["b"]))


def distance(model: dict[str, Any], optimum: np.ndarray) -> float | None:
    """‖θ − θ*‖; None when it is not a finite number (a model that grew past
    what a double holds), which JSON could not carry."""
    with np.errstate(over="ignore", invalid="ignore"):
        d = float(np.linalg.norm(theta_of(model) - optimum))
    return d if math.isfinite(d) else None


def settled_at(distances: list[float | None], tol: float) -> int | None:
    """The first round from which ‖θ_t − θ*‖ ≤ tol holds to the end of the
    run (a strategy that passes through θ* and leaves it has not got there);
    None if the last round is still farther."""
    found = None
    for t, d in enumerate(distances, start=1):
        if d is not None and d <= tol:
            found = found or t
        else:
            found = None
    return found


def robust_defaults(aggregator: str | None, attackers: int, k: int) -> dict[str, Any]:
    """What a robust rule is told about the byzantine scenario's f attackers,
    as its paper assumes it knows f: trimmed_mean trims β = f/K each side,
    krum tolerates byzantine = f. Only where the server would accept it."""
    if aggregator == "trimmed_mean" and attackers / k < 0.5:
        return {"trim": attackers / k}
    if aggregator == "krum" and attackers <= k - 3:
        return {"byzantine": attackers}
    return {}


def post_start(http: FlaskClient, body: dict[str, Any], timeout_s: float) -> tuple[int, Any]:
    """POST /start and its reply, (status, parsed JSON). Past ``timeout_s``
    the run is stopped (POST /runs/<id>/stop: it ends after its current
    round), so that this federation can take the next one, and TimeoutError
    says so."""
    reply: list[Any] = []

    def send() -> None:
        try:
            reply.append(http.post("/start", json=body, headers=ACCEPT))
        except BaseException as e:  # raised again below, in the caller's thread
            reply.append(e)

    # The server runs the rounds on a thread of its own; this one only waits
    # for the reply, so that the wait can have a deadline.
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(timeout_s)
    if sender.is_alive():
        control = http.application.test_client()  # a client of its own: the sender's is in use
        deadline = time.monotonic() + STOP_WAIT_S
        while sender.is_alive() and time.monotonic() < deadline:
            now = control.get("/status").get_json()
            if now.get("status") == "running":
                control.post(f"/runs/{now['run_id']}/stop", json={})
            sender.join(0.05)  # polling interval: the run ends at its next round
        raise TimeoutError(f"no reply within {timeout_s:g} s (the run was told to stop)")
    if isinstance(reply[0], BaseException):
        raise reply[0]
    run = reply[0].get_json(silent=True)
    if not isinstance(run, dict):
        raise ValueError(f"HTTP {reply[0].status_code} with a body that is not a JSON object")
    return reply[0].status_code, run


def run_strategy(http: FlaskClient, name: str, body: dict[str, Any], optimum: np.ndarray, tol: float,
                 timeout_s: float, aggregator: str | None = None) -> dict[str, Any]:
    """One POST /start (waiting for the run to end) → its row of the result,
    labelled "strategy" or, with an aggregator, "strategy+aggregator"."""
    label = name if aggregator is None else f"{name}+{aggregator}"
    rule = {"aggregator": aggregator} if aggregator not in (None, MEAN) else {}
    row = {"strategy": name, "aggregator": aggregator, "label": label}
    t0 = time.perf_counter()
    try:
        status, run = post_start(http, {**body, **rule, "strategy": name}, timeout_s)
    except (TimeoutError, ValueError) as e:  # no answer in time, a reply that is not JSON
        return {**row, "ok": False, "error": f"no usable reply: {e}", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if status != 200:
        return {**row, "ok": False, "http_status": status, "wall_s": wall,
                "error": f"refused (HTTP {status}): {run.get('error', run)}"}
    rounds = run.get("rounds") or []
    distances = [distance(r["global_model"], optimum) for r in rounds]
    losses = [r.get("federated_loss") for r in rounds]
    final = run.get("final_model") or (rounds[-1]["global_model"] if rounds else None)
    return {
        **row, "ok": run.get("status") == "completed", "status": run.get("status"),
        "error": run.get("error"), "run_id": run.get("run_id"), "wall_s": wall,
        "rounds_done": len(rounds), "final_model": final,
        "final_distance": distance(final, optimum) if final else None,
        "final_loss": losses[-1] if losses else None,
        "rounds_to_tol": settled_at(distances, tol),
        "distances": distances, "losses": losses,
        "round_durations_s": [r.get("duration_s") for r in rounds],
        # the clients the server flagged each round (update norm > 10× the others' median)
        "suspicious": [[s.get("client_id") or s.get("url") for s in r.get("suspicious") or []] for r in rounds],
    }


Plan = list[tuple[str, str | None, dict[str, Any]]]


def run_plan(plan: Plan, scenario: tuple[Any, ...], jobs: int, db_dir: str, optimum: np.ndarray, tol: float,
             timeout_s: float, meanwhile: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Every (strategy, aggregator, /start body) of ``plan``, on federations
    of ``make_clients(*scenario)`` (``labs.spread``: with ``jobs`` 1 one in
    this process, else one in each worker process). Rows in ``plan``'s
    order, a line printed as each run ends: how many of all have ended,
    how it ended, and an estimate of the time left (``labs.Progress``)."""
    progress = Progress([1.0] * len(plan))  # (the runs' rounds are alike: --param may change one's)

    def report(i: int, result: dict[str, Any]) -> None:
        state = (f"{result['status']}, ‖θ_T − θ*‖ = {fmt_num(result['final_distance'])}"
                 if "final_model" in result else result["error"])
        print("compare: " + progress.line(i, f"{result['label']}: {state} in {result['wall_s']:.2f} s"),
              flush=True)

    def run(http: FlaskClient, step: tuple[str, str | None, dict[str, Any]]) -> dict[str, Any]:
        name, aggregator, body = step
        return run_strategy(http, name, body, optimum, tol, timeout_s, aggregator)

    federations: list[FlaskClient] = []

    def start() -> FlaskClient:
        federations.append(federation(make_clients(*scenario), f"{db_dir}/runs-{os.getpid()}.db"))
        return federations[-1]

    try:
        return spread(plan, start, run, jobs, report, meanwhile)
    finally:
        for http in federations:  # (this process's; a worker's end with it)
            close(http)


def predict_fedavg(data: list[tuple[np.ndarray, np.ndarray]], lr: float, epochs: int,
                   optimum: np.ndarray) -> dict[str, Any]:
    """Where FedAvg (full participation, full-batch local GD) stops, its
    distance to θ*, and the round map's contraction ρ; or why it has no
    fixed point at this lr."""
    M, _ = theory.fedavg_round_map(data, lr, epochs)
    out: dict[str, Any] = {"spectral_radius": theory.spectral_radius(M), "lr": lr, "local_epochs": epochs}
    try:
        point = theory.fedavg_fixed_point(data, lr, epochs)
    except ValueError as e:
        return {**out, "theta": None, "distance": None, "error": str(e)}
    return {**out, "theta": point.tolist(), "distance": float(np.linalg.norm(point - optimum)), "error": None}


def fmt_model(model: dict[str, Any] | None) -> str:
    if model is None:
        return "-"
    w = np.atleast_1d(np.asarray(model["w"], dtype=float))
    if len(w) == 1:
        return fmt_line(w, model["b"])
    shown = ", ".join(f"{v:.4f}" for v in w[:3]) + (f", … ({len(w)})" if len(w) > 3 else "")
    return f"w = [{shown}], b = {model['b']:.4f}"


def fmt_num(value: float | None, spec: str = ".3e") -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]], tol: float) -> str:
    width = max([len("final model")] + [len(fmt_model(r["final_model"])) for r in results if "final_model" in r])
    name = max([11] + [len(r["label"]) for r in results])
    head = (f"{'strategy':<{name}} {'final model':<{width}} {'‖θ_T − θ*‖':>11} {'final loss':>11} "
            f"{f'rounds ≤ {tol:g}':>13} {'wall s':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "final_model" not in r:  # refused, or no reply: the reason is the whole row
            lines.append(f"{r['label']:<{name}} {r['error']}")
            continue
        reached = r["rounds_to_tol"]
        lines.append(f"{r['label']:<{name}} {fmt_model(r['final_model']):<{width}} "
                     f"{fmt_num(r['final_distance']):>11} {fmt_num(r['final_loss'], '.6g'):>11} "
                     f"{reached if reached else 'never':>13} {r['wall_s']:>8.2f}")
        if not r["ok"]:
            lines.append(f"{'':<{name}} run {r['status']}: {r['error']}")
    return "\n".join(lines)


def load_matplotlib() -> None:
    """Import what ``chart`` draws with: half a second or more, spent while
    the workers run rather than after them."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import matplotlib.ticker  # noqa: F401


def chart(results: list[dict[str, Any]], prediction: dict[str, Any], title: str, without: str = "") -> Any:
    """‖θ_t − θ*‖ per round on a log scale, one line per strategy that ran,
    FedAvg's predicted stopping distance ‖θ_FedAvg − θ*‖ as a dashed level.
    In the SVG each line is the group ``strategy-<label>`` and its legend
    entry ``legend-strategy-<label>`` (the label: "fedavg", or "fedavg+median"
    with an aggregator). ``without`` names who the prediction leaves out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, MaxNLocator

    fig = Figure(figsize=(8.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no GUI backend, no pyplot (as server/fedavg_server/plots.py)
    ax = fig.subplots()
    ran = [r for r in results if r.get("distances")]
    floor, exact = axis_floor(ran, prediction["distance"])
    for k, r in enumerate(ran):
        ys = np.maximum(np.array(r["distances"], dtype=float), floor)  # None (not finite) → NaN: a gap
        xs = np.arange(1, len(ys) + 1)
        # Strategies that agree draw on top of each other: a marker of its
        # own every few rounds, staggered, keeps each one visible.
        every = max(1, len(ys) // 10)
        ax.plot(xs, ys, color=f"C{k % 10}", linewidth=1.5, marker=MARKERS[k % len(MARKERS)], markersize=5,
                markevery=(k * every // max(len(ran), 1), every), gid=f"strategy-{r['label']}",
                label=r["label"] + ("" if r["ok"] else f" ({r['status']})")
                + (" (0 to machine precision)" if r["label"] in exact else ""))
    if prediction["distance"] is not None:
        ax.axhline(max(prediction["distance"], floor), color="black", linestyle="--", linewidth=1,
                   gid="fedavg-fixed-point",
                   label=f"FedAvg's predicted stop{without} (lr={prediction['lr']:g}, "
                         f"E={prediction['local_epochs']})")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    # Plain numbers (2, 0.5, 1e-05) rather than 2×10⁰ when the range spans less than a decade.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("round")
    ax.set_ylabel(r"$\|\theta_t - \theta^*\|$, $\theta^*$ = pooled least squares" + (" (honest)" if without else ""))
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        # Past a few entries the legend would hide lines: put it beside the axes.
        legend = (ax.legend(loc="best", fontsize=8) if len(handles) <= 4 else
                  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8))
        for handle, entry in zip(handles, legend.get_lines()):
            entry.set_gid(f"legend-{handle.get_gid()}")
    return fig


def axis_floor(ran: list[dict[str, Any]], predicted: float | None) -> tuple[float, set[str]]:
    """The log axis' bottom, and the labels of the strategies that end within PRECISION of θ*
    (drawn along it). The bottom: a tenth of the smallest distance anything else reaches (the
    other strategies' rounds, FedAvg's predicted stop), or FLOOR when nothing else is drawn."""
    def final(r: dict[str, Any]) -> float:
        finite = [d for d in r["distances"] if d is not None and math.isfinite(d)]
        return finite[-1] if finite else math.inf
    exact = {r["label"] for r in ran if final(r) < PRECISION}
    rest = [d for r in ran if r["label"] not in exact for d in r["distances"] if d is not None and d > 0]
    rest += [predicted] if predicted else []
    return (min(rest) / 10 if rest else FLOOR), exact


def save_chart(fig: Any, png: Path, svg: Path, side_by_side: bool = False) -> None:
    """The chart as PNG (150 dpi) and SVG; ``side_by_side``: the PNG in a
    process of its own meanwhile (each is a whole drawing of the figure).
    The SVG has no date and takes its ids from a fixed salt rather than a
    random one: the same results give the same bytes."""
    import matplotlib

    drawer = None
    if side_by_side:
        drawer = processes().Process(target=fig.savefig, args=(png,), kwargs={"dpi": 150})
        drawer.start()
    else:
        fig.savefig(png, dpi=150)
    with matplotlib.rc_context({"svg.hashsalt": "compare"}):
        fig.savefig(svg, metadata={"Date": None})
    if drawer is not None:
        drawer.join()
        if drawer.exitcode != 0:
            raise RuntimeError(f"{png} not written: drawing it failed (its traceback is above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="seed")
    # The registry, read when main runs: a strategy registered since this module was imported is run too.
    parser.add_argument("--strategies", default=" ".join(STRATEGIES),
                        help="space- or comma-separated (default: every registered strategy, in the registry's order)")
    parser.add_argument("--aggregators", help="run each strategy with each of these combining rules, e.g. "
                                              "mean,median,trimmed_mean,krum (default: the server's, unnamed)")
    parser.add_argument("--attackers", type=int, metavar="F",
                        help=f"for --scenario byzantine: the first F clients attack (default {ATTACKERS})")
    parser.add_argument("--attack", choices=ATTACKS, help="for --scenario byzantine: what they send (default huge)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", "-k", type=int, help="K (default 2 for seed, 4 for diabetes, else 10)")
    parser.add_argument("--seed", type=int, default=0, help="the scenario's seed and every run's seed")
    parser.add_argument("--samples", type=int, default=20, help="n_k per client (generated scenarios)")
    parser.add_argument("--csv", help="for --scenario csv: the CSV to split among the clients")
    add_target(parser)
    parser.add_argument("--lr", type=float, help=f"default {DIABETES_LR} for diabetes, else 0.01")
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--param", action="append", default=[], type=parse_param, metavar="[STRATEGY.]NAME=VALUE",
                        help="another /start field, for every run or only for one strategy's, one aggregator's "
                             "or one row's (fedprox.mu=0.5, krum.krum_m=3, fedavg+mean.max_weight=0.2; repeatable)")
    parser.add_argument("--tol", type=float, default=1e-3, help="'rounds ≤ tol' column (default 1e-3)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take (default 3600)")
    cores = default_jobs()
    parser.add_argument("--jobs", "-j", type=int, default=cores,
                        help="federations running strategies side by side, each in a worker process of its own "
                             f"(default: one per core, {cores} here; 1: one federation in this process, which "
                             "times each run alone)")
    parser.add_argument("--out", default="compare-out", help="output directory (default ./compare-out)")
    args = parser.parse_args(argv)
    strategies = [s for s in args.strategies.replace(",", " ").split() if s]
    k = args.clients or DEFAULT_CLIENTS.get(args.scenario, 10)
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.scenario, 0.01)
    aggregators = [a for a in (args.aggregators or "").replace(",", " ").split() if a] or [None]
    if not strategies:
        parser.error("--strategies: name at least one")
    if args.aggregators is not None and aggregators == [None]:
        parser.error("--aggregators: name at least one")
    if args.scenario != "byzantine" and (args.attackers is not None or args.attack is not None):
        parser.error(f"--attackers and --attack are for --scenario byzantine, not {args.scenario}")
    if args.target != TARGET and args.scenario != "csv":
        parser.error(f"--target is for --scenario csv (the CSV's column to predict), not {args.scenario}")
    attackers = ATTACKERS if args.attackers is None else args.attackers
    attack = args.attack or "huge"
    if args.rounds < 1 or args.local_epochs < 1 or args.jobs < 1 or lr <= 0 or args.tol <= 0:
        parser.error("--rounds, --local-epochs and --jobs must be >= 1, --lr and --tol > 0")
    # Each federation builds its own clients from these (a client keeps state per run: SCAFFOLD's c_k).
    scenario = (args.scenario, k, args.seed, args.samples, args.csv, attackers, attack, args.target)
    try:
        clients = make_clients(*scenario)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    # The attackers' rows are honest but their replies lie: θ* (and FedAvg's
    # stop) are those of the honest clients alone, what a defence should reach.
    good = honest(clients)
    liars = [c.client_id for c in clients if all(c is not h for h in good)]
    data = [(c.X, c.y) for c in good]
    optimum = theory.pooled_optimum(data)
    prediction = predict_fedavg(data, lr, args.local_epochs, optimum)

    base = {"rounds": args.rounds, "seed": args.seed, "lr": lr, "local_epochs": args.local_epochs}
    shared = {name: value for who, name, value in args.param if who is None}
    told = ({a: robust_defaults(a, attackers, k) for a in aggregators} if args.scenario == "byzantine" else {})
    out = Path(args.out)
    jobs = min(args.jobs, len(strategies) * len(aggregators))
    print(f"compare: {args.scenario}, K={k}, {args.rounds} rounds, lr={lr:g}, E={args.local_epochs}; "
          + ("one federation in this process …" if jobs == 1 else f"{jobs} federations, one per worker process …"),
          flush=True)
    if args.scenario == "byzantine":
        print(f"compare: {len(liars)} attacker(s) ({', '.join(liars) or 'none'}): each {ATTACKS[attack]}",
              flush=True)
        for a, given in told.items():
            if given:
                print(f"compare: {a} is told f = {attackers}: " + ", ".join(f"{n} = {v:g}" for n, v in given.items())
                      + " (--param overrides)", flush=True)
    plan = []
    for name in strategies:
        for aggregator in aggregators:
            label = name if aggregator is None else f"{name}+{aggregator}"
            own = {n: v for who, n, v in args.param if who in (name, aggregator, label)}
            plan.append((name, aggregator, {**base, **told.get(aggregator, {}), **shared, **own}))
    with tempfile.TemporaryDirectory(prefix="fedavg-compare-") as history:
        results = run_plan(plan, scenario, jobs, history, optimum, args.tol, args.timeout, meanwhile=load_matplotlib)

    print()
    print(table(results, args.tol))
    print(f"\npooled optimum θ* = {np.array2string(optimum, precision=6)}")
    without = ""
    if args.scenario == "byzantine":
        without = " without the attackers"
        print(f"θ* is the least squares over the {len(good)} honest clients' rows only; the {len(liars)} attacker(s) "
              f"({', '.join(liars) or 'none'}) hold honest data but each {ATTACKS[attack]}, so θ* leaves them out")
        flagged = {r["label"]: r["suspicious"][-1] for r in results if r.get("suspicious") and r["suspicious"][-1]}
        if flagged:
            print("flagged suspicious in the last round (update norm > 10× the median of the others'): "
                  + "; ".join(f"{label}: {', '.join(map(str, ids))}" for label, ids in flagged.items()))
    if prediction["theta"] is not None:
        print(f"FedAvg's predicted stop{without} (full participation, lr={lr:g}, E={args.local_epochs}): "
              f"{np.array2string(np.array(prediction['theta']), precision=6)}, "
              f"‖θ_FedAvg − θ*‖ = {prediction['distance']:.3e}, ρ = {prediction['spectral_radius']:.6f} a round")
    else:
        print(f"FedAvg's predicted stop: none — {prediction['error']}")

    out.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {"scenario": args.scenario, "clients": k, "seed": args.seed, "samples": args.samples,
                     "csv": args.csv, "target": args.target if args.csv else None, "rounds": args.rounds,
                     "lr": lr, "local_epochs": args.local_epochs,
                     "params": [{"strategy": who, "name": n, "value": v} for who, n, v in args.param],
                     "strategies": strategies, "aggregators": None if aggregators == [None] else aggregators,
                     "attackers": liars if args.scenario == "byzantine" else None,
                     "attack": attack if args.scenario == "byzantine" else None,
                     "told": {a: v for a, v in told.items() if v}, "tol": args.tol},
        "optimum_over": [c.client_id for c in good],
        "pooled_optimum": optimum.tolist(),
        "fedavg_fixed_point": prediction,
        "results": results,
    }
    paths = [out / "compare.json", out / "compare.png", out / "compare.svg"]
    paths[0].write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    title = f"{args.scenario}, K={k}" + (f", {len(liars)} × {attack}" if args.scenario == "byzantine" else "")
    fig = chart(results, prediction, f"{title}: distance to the pooled optimum", without)
    save_chart(fig, paths[1], paths[2], side_by_side=jobs > 1)
    print("\ncompare: wrote " + ", ".join(str(p) for p in paths))
    return 0 if any(r["ok"] for r in results) else 1


if __name__ == "__main__":
    # The apps' logs went to their own output, which compare never showed;
    # here they would interleave with the table, which says how each run ended.
    logging.getLogger("fedavg").addHandler(logging.NullHandler())
    sys.exit(main())
