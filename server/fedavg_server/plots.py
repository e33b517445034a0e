"""The charts of a run, drawn by matplotlib: run dict (as ``GET /runs/<id>``
returns it) in, SVG or PNG bytes out.

Pure functions of plain data, like the math: the web page asks for SVG
(``GET /runs/<id>/plots/<name>.svg``), ``scripts/plot_run.py`` for PNG.
Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, never
pyplot, so no global figure state is shared between requests.
"""
from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from fedavg.strategies import STRATEGIES
from fedavg.strategies.fields import LOCAL_MODEL
from fedavg.strict_json import weights_of
from fedavg.trace import TRACE_TERMS, fmt, fmt_line

Run = dict[str, Any]

# The x range of the model lines when the clients reported none (plot_run.py
# on a downloaded run); it frames the seed's x = 1..4. The server never sees
# a client's x; clients report the range of theirs in /health (x_range), and
# the chart then spans all of those.
X_RANGE = (0.0, 5.0)
PRIVATE_NOTE = "Private data points are not shown: the server never sees them."
# Markers help to read a short run; on a long one they would bury the line.
MARKERS_UP_TO = 30
GLOBAL_STYLE = {"color": "black", "linewidth": 2.2}
SIZE_IN = (7.0, 4.2)
PNG_DPI = 150
AVERAGE_TEX = r"$W_{t+1} = \sum_k \, (n_k/N) \, W_k$"

# matplotlib does not promise thread safety (its font and text caches are
# shared); a chart takes ~0.1 s, so the server's request threads take turns,
# and none waits longer than LOCK_WAIT_S for its turn (then: 503, try again).
_render_lock = threading.Lock()
LOCK_WAIT_S = 10.0
# Lines a chart draws for clients: past this many, a legend line counts the rest.
CLIENT_LINES = 50


class ChartsBusy(Exception):
    """Other charts held the lock for LOCK_WAIT_S."""


@contextmanager
def _turn() -> Iterator[None]:
    if not _render_lock.acquire(timeout=LOCK_WAIT_S):
        raise ChartsBusy(f"the server is drawing other charts; none was free within {LOCK_WAIT_S:g} s, try again")
    try:
        yield
    finally:
        _render_lock.release()


def _escape(text: str) -> str:
    """A client's name as matplotlib text: a '$' would start mathtext."""
    return text.replace("$", r"\$")


def _slope(model: dict[str, Any]) -> float:
    """The model's first weight: with several features the charts follow x₁
    (the others held at 0) and say so."""
    return float(weights_of(model)[0])


def _num_features(run: Run) -> int:
    """d, from the first round (the server's chart reads say it: they carry only w₁)."""
    if not run["rounds"]:
        return 1
    first = run["rounds"][0]
    return first.get("num_features") or len(weights_of(first["global_model"]))


def _colors(run: Run) -> Callable[[str], Any]:
    """One colour per client URL, the same in every chart of the run."""
    order = {url: i for i, url in enumerate(run.get("clients") or [])}
    palette = [f"C{i}" for i in range(1, 10)]  # C0 (blue) looks too much like the global line's black

    def color(url: str) -> str:
        return palette[order.setdefault(url, len(order)) % len(palette)]
    return color


def _new_figure(nrows: int = 1, height: float = SIZE_IN[1]) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(SIZE_IN[0], height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no GUI backend, no pyplot
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


class NoSuchRound(LookupError):
    """The run has no round of that number (a bad ?round=, not a bug)."""


def _find_round(run: Run, round_no: int | None) -> dict[str, Any] | None:
    """Round ``round_no`` (None = the last one); NoSuchRound if the run has none such."""
    if not run["rounds"]:
        if round_no is None:
            return None
        raise NoSuchRound(round_no)
    if round_no is None:
        return run["rounds"][-1]
    for record in run["rounds"]:
        if record["round"] == round_no:
            return record
    raise NoSuchRound(round_no)


def x_span(x_ranges: list[tuple[float, float]] | None) -> tuple[float, float] | None:
    """The x axis of the model lines: every reported [min, max] together,
    widened by 5% each side (by 0.5 when all x are equal); None if none is known."""
    if not x_ranges:
        return None
    lo, hi = min(r[0] for r in x_ranges), max(r[1] for r in x_ranges)
    margin = 0.05 * (hi - lo) or 0.5
    return lo - margin, hi + margin


def models_figure(run: Run, round_no: int | None = None, x_ranges: list[tuple[float, float]] | None = None,
                  outside: dict[str, Any] | None = None) -> Figure:
    """Chart 1: y = w·x + b of each client's local model in round ``round_no``
    (default: the last), of the global model that went in, and of the global
    model that came out: W_{t+1} = Σ_k n_k/N · W_k for FedAvg. A client that
    sent no local model (FedSGD's gradient, the exact strategy's sums) has no line.
    The x axis spans the clients' reported ``x_ranges`` ([min, max] of x₁), else X_RANGE.
    ``outside``: a simulation's pooled least-squares line {"w", "b",
    "scenario"}, drawn and labelled as knowledge no client gave (SVG id outside-line)."""
    record = _find_round(run, round_no)
    fig, (ax,) = _new_figure()
    fig.supxlabel(PRIVATE_NOTE, fontsize=9, style="italic")
    if record is None:
        ax.set_title(f"Run {run['run_id']}: model lines")
        _empty(ax, "No round has completed yet.")
        return fig
    color = _colors(run)
    span = x_span(x_ranges)
    x = np.array(span or X_RANGE)
    model_in = record.get("global_model_in")
    if model_in is not None:
        ax.plot(x, _slope(model_in) * x + model_in["b"], color="grey", linestyle=":", linewidth=1.5,
                label=f"global in: {fmt_line([_slope(model_in)], model_in['b'])}")
    with_model = [p for p in record["participants"] if p.get(LOCAL_MODEL.name) is not None]
    for k, p in enumerate(with_model[:CLIENT_LINES]):
        m = p[LOCAL_MODEL.name]
        label = (f"{_escape(p['client_id'])} (n_k={p['data_size']}): {fmt_line([_slope(m)], m['b'])}"
                 if k < TRACE_TERMS else None)
        ax.plot(x, _slope(m) * x + m["b"], color=color(p["url"]), linestyle="--", linewidth=1.3, label=label)
    if len(with_model) > TRACE_TERMS:
        drawn = min(len(with_model), CLIENT_LINES)
        ax.plot([], [], " ", label=f"… and {len(with_model) - TRACE_TERMS} more clients"
                + (f" ({len(with_model) - drawn} not drawn)" if drawn < len(with_model) else ""))
    without = len(record["participants"]) - len(with_model)
    if without:
        ax.plot([], [], " ", label=f"{without} client(s) sent no local model, so no line")
    if outside is not None and _num_features(run) == 1:
        (line,) = ax.plot(x, outside["w"] * x + outside["b"], color="tab:green", linestyle="-.", linewidth=1.5,
                          label=f"pooled least squares {fmt_line([outside['w']], outside['b'])}: outside "
                                f"knowledge (the {_escape(outside['scenario'] or 'simulation')}'s own data)")
        line.set_gid("outside-line")
    out = record["global_model"]
    ax.plot(x, _slope(out) * x + out["b"], **GLOBAL_STYLE,
            label=f"global out: {fmt_line([_slope(out)], out['b'])}")
    features = _num_features(run)
    strategy = record.get("strategy", "fedavg")  # rounds stored before strategies were FedAvg's
    ax.set_title(f"Run {run['run_id']}, round {record['round']}: "
                 + (AVERAGE_TEX if strategy in ("fedavg", "fedprox") else f"strategy {strategy}"))
    x_name = "x" if features == 1 else f"x₁ (the other {features - 1} feature(s) at 0)"
    if span is not None:
        lo, hi = min(r[0] for r in x_ranges), max(r[1] for r in x_ranges)
        x_name += f"; the clients report x₁ from {lo:g} to {hi:g}"
    ax.set_xlabel(x_name)
    ax.set_ylabel("y = w·x + b")
    ax.set_xlim(*x)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _series(run: Run, pick: Callable[[dict[str, Any]], float]) -> dict[str, tuple[str, np.ndarray]]:
    """url → (client_id, value per round, NaN where the client did not take
    part or sent no local model)."""
    rounds = run["rounds"]
    out: dict[str, tuple[str, np.ndarray]] = {}
    for i, record in enumerate(rounds):
        for p in record["participants"]:
            if p.get(LOCAL_MODEL.name) is None:
                continue
            if p["url"] not in out:
                if len(out) == CLIENT_LINES:
                    continue  # enough lines to see the spread; the rest would bury them
                out[p["url"]] = (p["client_id"], np.full(len(rounds), np.nan))
            out[p["url"]][1][i] = pick(p[LOCAL_MODEL.name])
    return out


def _mark_round(run: Run, axes: list[Any], round_no: int | None) -> None:
    """A thin vertical line at the round the page has selected."""
    if round_no is not None:
        for ax in axes:
            ax.axvline(round_no, color="grey", linewidth=0.8, alpha=0.7)


def params_figure(run: Run, round_no: int | None = None) -> Figure:
    """Chart 2: w and b per round, the global model's and each client's local
    one; a vertical line at ``round_no`` if given."""
    fig, (ax_w, ax_b) = _new_figure(2, height=5.2)
    rounds = run["rounds"]
    fig.suptitle(f"Run {run['run_id']}: w and b per round")
    if not rounds:
        _empty(ax_w, "No round has completed yet.")
        _empty(ax_b, "")
        return fig
    color = _colors(run)
    marker = "o" if len(rounds) <= MARKERS_UP_TO else None
    xs = np.array([r["round"] for r in rounds], dtype=float)
    first_in = rounds[0].get("global_model_in")
    for ax, name, pick in ((ax_w, "w", _slope), (ax_b, "b", lambda m: float(m["b"]))):
        for k, (url, (client_id, values)) in enumerate(_series(run, pick).items()):
            ax.plot(xs, values, color=color(url), linewidth=1, marker=marker, markersize=3,
                    label=f"{_escape(client_id)} local" if k < TRACE_TERMS else None)
        glob = np.array([pick(r["global_model"]) for r in rounds])
        gx = xs
        if first_in is not None:  # the model the run started from, as round 0 (or where it resumed)
            gx = np.concatenate([[xs[0] - 1], xs])
            glob = np.concatenate([[pick(first_in)], glob])
        ax.plot(gx, glob, **GLOBAL_STYLE, marker=marker, markersize=4, label="global")
        ax.set_ylabel(name if name == "b" or _num_features(run) == 1 else "w₁")
        ax.grid(True, alpha=0.3)
    ax_w.legend(loc="best", fontsize=8)
    _mark_round(run, [ax_w, ax_b], round_no)
    ax_b.set_xlabel("round")
    ax_b.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _loss_points(run: Run) -> list[tuple[int, float]]:
    """(round, federated loss) where it was measured and can go on a log scale."""
    return [(r["round"], r["federated_loss"]) for r in run["rounds"]
            if r.get("federated_loss") is not None and r["federated_loss"] > 0 and math.isfinite(r["federated_loss"])]


def _log_axis(ax: Any) -> None:
    ax.set_yscale("log")
    # Plain numbers (2, 0.5, 1e-05) rather than 2×10⁰ when the loss spans less than a decade.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)


def loss_figure(run: Run, round_no: int | None = None) -> Figure:
    """Chart 3: the federated loss L = Σ_k n_k/N · L_k of each round's global
    model, on a log scale (it falls by orders of magnitude); a vertical line
    at ``round_no`` if given."""
    fig, (ax,) = _new_figure()
    ax.set_title(f"Run {run['run_id']}: federated loss " + r"$L = \sum_k \, (n_k/N) \, L_k$")
    points = _loss_points(run)
    if not points:
        _empty(ax, "No federated loss yet: a round's loss is measured\n"
                   "when the next round starts (or after the last one).")
        return fig
    xs, ys = zip(*points)
    marker = "o" if len(points) <= MARKERS_UP_TO else None
    ax.plot(xs, ys, **GLOBAL_STYLE, marker=marker, markersize=4)
    _log_axis(ax)
    ax.set_ylabel("MSE of the global model (log scale)")
    if len(points) == 1:  # a single point: give the axis some room around it
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    _mark_round(run, [ax], round_no)
    return fig


def clients_of(rounds: list[dict[str, Any]]) -> frozenset[tuple[str, Any]]:
    """(URL, n_k) of every client that took part in ``rounds`` (n_k is None
    under secure aggregation)."""
    return frozenset((p["url"], p.get("data_size")) for r in rounds for p in r["participants"])


def solves(run: Run) -> bool:
    """Whether ``run``'s last global model is its clients' pooled optimum θ*
    (an ``exact`` run without ridge)."""
    settings = run.get("settings") or {}
    kind = STRATEGIES.get(settings.get("strategy"))
    return kind is not None and kind.gives_optimum(settings.get("params") or {})


def solved_optimum(run: Run, last: dict[str, Any] | None) -> tuple[np.ndarray, frozenset[tuple[str, Any]]] | None:
    """θ* = [w, b], the pooled least-squares model of the clients an
    ``exact`` run without ridge took, and those clients (URL, n_k), from its
    ``last`` round: it solves (Σ_k X̃_kᵀX̃_k) θ* = Σ_k X̃_kᵀy_k, so its last
    global model is θ* of them when no client was dropped. None for any
    other run."""
    if not solves(run) or last is None or last.get("dropped"):
        return None
    model = last["global_model"]
    return np.append(weights_of(model), float(model["b"])), clients_of([last])


def known_optimum(mine: frozenset[tuple[str, Any]],
                  solvers: list[tuple[Run, np.ndarray, frozenset[tuple[str, Any]]]]) -> tuple[np.ndarray, Run] | None:
    """θ* of the clients ``mine`` (URL, n_k) where a chosen exact run solved
    for exactly them (``solvers``: each run with its ``solved_optimum``; the
    server never reads the data to find out otherwise), and that run; else None."""
    for other, optimum, theirs in solvers:
        if theirs == mine:
            return optimum, other
    return None


def known_optima(runs: list[Run]) -> dict[int, tuple[np.ndarray, Run]]:
    """run id → (θ*, the exact run that gives it) for each of ``runs``, read
    whole, whose clients a chosen exact run solved for; a run that solved
    for θ* itself is on it, and is left out."""
    solvers = [(run, *found) for run in runs if run["rounds"] and (found := solved_optimum(run, run["rounds"][-1]))]
    solving = {run["run_id"] for run, _, _ in solvers}
    return {run["run_id"]: found for run in runs if run["rounds"] and run["run_id"] not in solving
            and (found := known_optimum(clients_of(run["rounds"]), solvers))}


def _distances(run: Run, optimum: np.ndarray) -> tuple[list[int], list[float]]:
    """(rounds, ‖θ_t − θ*‖ of each round's global model θ_t = [w, b])."""
    with np.errstate(over="ignore", invalid="ignore"):  # a model that blew up is inf away: a gap in the line
        return ([r["round"] for r in run["rounds"]],
                [float(np.linalg.norm(np.append(weights_of(r["global_model"]), r["global_model"]["b"]) - optimum))
                 for r in run["rounds"]])


def compare_figure(runs: list[Run], known: dict[int, tuple[np.ndarray, Run]] | None = None) -> Figure:
    """Several runs on shared rounds, one line per run labelled "run N:
    strategy": the federated loss per round on a log scale (SVG id run-N)
    and, below it, ‖θ_t − θ*‖ for each run whose optimum θ* a chosen exact
    run knows (``known``, from ``known_optima`` of the runs when not given;
    SVG id distance-run-N). The exact run that gives θ* is on it by
    definition and is not drawn there; with no such run a note says how to
    get the lower chart."""
    if known is None:
        known = known_optima(runs)
    fig, axes = _new_figure(2 if known else 1, SIZE_IN[1] * (1.7 if known else 1))
    ax = axes[0]
    ax.set_title("Federated loss per round " + r"$L = \sum_k \, (n_k/N) \, L_k$")
    drawn = 0
    for k, run in enumerate(runs):
        label = f"run {run['run_id']}: {(run.get('settings') or {}).get('strategy', 'fedavg')}"
        marker = "o" if len(run["rounds"]) <= MARKERS_UP_TO else None
        if run["run_id"] in known:
            optimum, source = known[run["run_id"]]
            xs, ds = _distances(run, optimum)
            (line,) = axes[1].plot(xs, ds, color=f"C{k % 10}", linewidth=1.6, marker=marker, markersize=3,
                                   label=f"{label}, last {fmt(ds[-1])} (θ* from run {source['run_id']})")
            line.set_gid(f"distance-run-{run['run_id']}")
        points = _loss_points(run)
        if not points:
            ax.plot([], [], " ", label=f"{label} (no loss measured yet)")
            continue
        xs, ys = zip(*points)
        (line,) = ax.plot(xs, ys, color=f"C{k % 10}", linewidth=1.6, marker=marker, markersize=3, label=label)
        line.set_gid(f"run-{run['run_id']}")
        drawn += 1
    if not drawn:
        _empty(ax, "None of these runs has a federated loss yet.")
    else:
        _log_axis(ax)
        ax.set_ylabel("MSE of the global model (log scale)")
    if runs:
        ax.legend(loc="best", fontsize=8)
    if not known:
        # supxlabel, not fig.text: the constrained layout makes room for it
        fig.supxlabel("The distance to the pooled optimum θ* needs θ*: compare with an exact run "
                              "(no ridge) on the same clients.", fontsize=8, color="0.35")
        return fig
    _log_axis(axes[1])
    axes[1].set_title(r"Distance to the pooled optimum $\|\theta_t - \theta^*\|$")
    axes[1].set_ylabel(r"$\|\theta_t - \theta^*\|$ (log scale)")
    axes[1].legend(loc="best", fontsize=8)
    return fig


PLOTS: dict[str, Callable[[Run, int | None], Figure]] = {
    "models": models_figure,
    "params": params_figure,
    "loss": loss_figure,
}


def render(run: Run, name: str, image_format: str = "svg", round_no: int | None = None,
           x_ranges: list[tuple[float, float]] | None = None, outside: dict[str, Any] | None = None) -> bytes:
    """The chart ``name`` (one of PLOTS) of ``run`` as SVG or PNG bytes;
    ``x_ranges`` frame the model lines (see models_figure). NoSuchRound for
    a round the run does not have."""
    build = PLOTS[name]
    if round_no is not None:
        _find_round(run, round_no)
    with _turn():
        fig = models_figure(run, round_no, x_ranges, outside) if name == "models" else build(run, round_no)
        return _save(fig, image_format)


def render_compare(runs: list[Run], image_format: str = "svg",
                   known: dict[int, tuple[np.ndarray, Run]] | None = None) -> bytes:
    """``compare_figure`` of ``runs`` as SVG or PNG bytes."""
    with _turn():
        return _save(compare_figure(runs, known), image_format)


def _save(fig: Figure, image_format: str) -> bytes:
    buf = io.BytesIO()
    # No date in the metadata: the same run gives the same bytes.
    metadata = {"Date": None} if image_format == "svg" else {}
    fig.savefig(buf, format=image_format, dpi=PNG_DPI, metadata=metadata)
    return buf.getvalue()
