"""The web page: the federation, a form to start a run, the run live, its
arithmetic and its charts. The page itself is a template and a little plain
JavaScript (templates/, static/, served by the app's own static route); this
blueprint adds what the page needs beyond the API: each client's health,
the start form's strategies and robust rules with their own settings (from
fedavg.strategies, written once),
and the charts as SVG drawn by matplotlib (plots.py), one run's or several
runs' losses compared."""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request

from fedavg.strategies import REPLY_FIELDS, ROBUST, ROBUST_OWNER, RULES, STRATEGIES, Combine, Param, Strategy
from fedavg.strict_json import MAX_DATA_SIZE, ProtocolError
from fedavg.wire import parse_health_reply

from .access import reads_clients
from .api import federation, no_query_args
from .federation import NoSuchRun
from .hosted import ClientURLs, HostedPopulation, stored_clients
from .openapi import MAX_COMPARE
from .settings import FEDPROX_DEFAULT_MU, MAX_ROUNDS, RunSettings, SettingsError
from .transport import Reply

bp = Blueprint("web", __name__)

# A probe of /health answers at once or the client is as good as down; the
# page asks again on its own.
HEALTH_TIMEOUT_S = 2.0
PLOT_NAMES = ("models", "params", "loss")
# The page lists the clients one by one, open, up to this many; beyond, the
# list starts collapsed (the counts stay in view) so the form is not pushed down.
CLIENTS_OPEN_UP_TO = 8


@bp.app_errorhandler(SettingsError)
def settings_error(e: SettingsError):
    """A /start body with bad fields: the first one's message as every 400
    has it and, when there are several, all of them ("errors"), so the form
    can show each next to its field. One bad field keeps the one-key body."""
    if len(e.errors) == 1:
        return {"error": str(e)}, 400
    return {"error": str(e), "errors": e.errors}, 400


@bp.get("/")
def index() -> str:
    # No check of the query string: a page should open whatever a link appends to it.
    strategies = [(name, kind.summary, strategy_fields(kind)) for name, kind in STRATEGIES.items()]
    rules = [(name, rule.summary, rule_fields(name)) for name, rule in RULES.items()]
    _warm_plots()
    return render_template("index.html", defaults=RunSettings(), max_rounds=MAX_ROUNDS, strategies=strategies,
                           rules=rules, default_rule=Combine.aggregator,
                           reply_fields=[f.describe() for f in REPLY_FIELDS],
                           max_compare=MAX_COMPARE, clients_open_up_to=CLIENTS_OPEN_UP_TO,
                           clients=page_rows(federation().transport.urls),
                           token_required=current_app.config["TOKEN"] is not None)


_warming = threading.Lock()


def _warm_plots() -> None:
    """Import matplotlib (~1 s) in the background when the page opens: the
    page shows a round together with its charts, so the first chart should
    not wait for the import."""
    if _warming.acquire(blocking=False):  # once per process; never released
        threading.Thread(target=lambda: __import__("fedavg_server.plots"), daemon=True, name="warm-plots").start()


def strategy_fields(kind: type[Strategy]) -> list[dict[str, Any]]:
    """The form's inputs for one strategy's own settings, from its ``Param``
    definitions (the bounds the server checks); FedProx's mu as well."""
    params = list(kind.params)
    if kind.uses_mu:
        params.insert(0, Param("mu", FEDPROX_DEFAULT_MU, "μ, the weight of the proximal term", gt=0))
    return [_form_field(p) for p in params]


def rule_fields(rule: str) -> list[dict[str, Any]]:
    """The form's inputs for one robust rule's own settings (trim for
    trimmed_mean, …: ``ROBUST_OWNER``), from their ``Param`` definitions."""
    return [_form_field(p) for p in ROBUST if ROBUST_OWNER.get(p.name) == rule]


def _form_field(p: Param) -> dict[str, Any]:
    """One setting as the form's input: its default ("" when it has none, so
    an untouched field is not sent), help, bounds, and whole-number steps."""
    return {"name": p.name, "default": "" if p.default is None else f"{p.default:g}",
            "help": p.help.replace("`", ""), "bounds": _bounds_text(p), "step": "1" if p.type == "integer" else "any",
            "min": "" if p.ge is None else f"{p.ge:g}", "max": "" if p.le is None else f"{p.le:g}"}


def _bounds_text(p: Param) -> str:
    """'0 ≤ beta1 < 1', '0 < server_lr ≤ 10', … as the server checks them."""
    low = f"{p.gt:g} < " if p.gt is not None else f"{p.ge:g} ≤ " if p.ge is not None else ""
    high = f" < {p.lt:g}" if p.lt is not None else f" ≤ {p.le:g}" if p.le is not None else ""
    return f"{low}{p.name}{high}"


@bp.get("/clients")
def clients() -> dict[str, Any]:
    """Each configured client's /health, probed concurrently: up or down,
    its name and n_k (its number of samples)."""
    no_query_args()
    return {"clients": _probe_clients()}


def page_rows(urls: Sequence[str]) -> list[str]:
    """The clients table's rows: each client of its own, and each hosted
    population as one row, ``<host>/clients/1..K`` (a million rows, and a
    million /health probes, would show nobody anything)."""
    return stored_clients(urls)


def _probe_clients() -> list[dict[str, Any]]:
    """Every configured client's state, now (a hosted population's from its
    host's own /health: one call, not one a client); the x ranges they report
    are kept for the model chart (``_x_ranges``)."""
    transport = federation().transport
    urls = transport.urls
    own, hosts = ([p for p in urls.parts if isinstance(p, str)], urls.hosts) if isinstance(urls, ClientURLs) \
        else (list(urls), [])
    replies = transport.call_all([*own, *(h.base for h in hosts)], "GET", "/health", HEALTH_TIMEOUT_S)
    states = [_client_state(reply, transport.names[reply.url]) for reply in replies[:len(own)]]
    states += [_population_state(reply, host) for reply, host in zip(replies[len(own):], hosts)]
    known = current_app.extensions.setdefault("fedavg_x_ranges", {})
    known.update({c["url"]: c["x_range"] for c in states if c.get("x_range")})
    return states


def _x_ranges(urls: list[str]) -> list[tuple[float, float]]:
    """The x ranges these clients reported in /health, as last probed; probed
    now if none of them is known yet (a chart opened before the page's /clients)."""
    known = current_app.extensions.setdefault("fedavg_x_ranges", {})
    if not any(url in known for url in urls):
        _probe_clients()
    return [known[url] for url in urls if url in known]


def _client_state(reply: Reply, known_name: str) -> dict[str, Any]:
    """One client as the page shows it; 'down' with the reason when its
    /health did not answer as a client's does. Its name and counts are read
    as a run reads them (``parse_health_reply``: a name of at most 200
    characters and no control character, n_k up to 10¹²), so the page shows
    nothing a run would refuse."""
    state: dict[str, Any] = {"url": reply.url, "client_id": known_name, "status": "down", "n_k": None,
                             "num_features": None, "reason": reply.reason}
    if not reply.ok:
        return state
    facts = parse_health_reply(reply.body)
    if facts["data_size"] is None:
        return state | {"reason": f"bad /health reply: data_size is not a whole number from 1 to {MAX_DATA_SIZE}"}
    return state | {
        "status": "up", "reason": None, "n_k": facts["data_size"], "client_id": facts["client_id"] or known_name,
        "num_features": facts["num_features"], "x_range": _range_of((reply.body or {}).get("x_range")),
    }


def _population_state(reply: Reply, host: HostedPopulation) -> dict[str, Any]:
    """A hosted population as one row: its K clients up or down with their
    host (its /health), N = Σ n_k as its /population said, and ``clients``, K."""
    first, k = host.first + 1, host.size
    return {"url": host.entry, "client_id": f"{k:,} clients (a population: {host.name(0)} … {host.name(k - 1)})",
            "status": "up" if reply.ok else "down", "n_k": int(host.sizes.sum()), "num_features": host.num_features,
            "reason": reply.reason, "clients": k, "first": first}


def _range_of(value: Any) -> tuple[float, float] | None:
    """A client's [min, max] of x₁ if it is two finite numbers in order; else None."""
    if not (isinstance(value, list) and len(value) == 2):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    lo, hi = float(value[0]), float(value[1])
    return (lo, hi) if lo <= hi else None


# A chart costs what it draws, whatever the rounds hold: at most CHART_ROUNDS
# points a line, and CHART_NUMBERS numbers read for the whole chart (ten runs
# of 400 rounds of 200 clients, read whole, took the server to 1 GB).
CHART_ROUNDS = 2000
CHART_NUMBERS = 40_000


@bp.get("/runs/<int:run_id>/plots/<name>.svg")
def plot(run_id: int, name: str):
    """One chart of a run as SVG: models (?round=N, default the last),
    params, loss; ?round=N also marks round N on params and loss."""
    no_query_args("round")
    round_no = _round_arg()
    if name not in PLOT_NAMES:
        return {"error": f"no plot {name!r} (known: {', '.join(PLOT_NAMES)})"}, 404
    run = _chart_run(run_id, name, round_no)
    if run is None:
        raise NoSuchRun(run_id)
    # Imported here, not at the top: matplotlib takes ~0.6 s to import, which
    # every server start would pay even when no one opens the page.
    from .plots import ChartsBusy, NoSuchRound, render
    x_ranges = _x_ranges(run.get("clients") or []) if name == "models" else []
    # A simulation's pooled line, for a run over exactly the host's clients.
    outside = current_app.config.get("OUTSIDE_LINE")
    if name != "models" or not outside or set(run.get("clients") or []) != set(outside["clients"]):
        outside = None
    try:
        svg = render(run, name, "svg", round_no, x_ranges=x_ranges, outside=outside)
    except ChartsBusy as e:
        return {"error": str(e)}, 503, {"Retry-After": "1"}
    except NoSuchRound:
        raise ProtocolError(f"round: run {run_id} has no round {round_no} "
                            f"({run['rounds_completed']} completed)") from None
    # A running run's chart changes with every round: never cache it.
    return Response(svg, mimetype="image/svg+xml", headers={"Cache-Control": "no-store"})


def _round_arg() -> int | None:
    raw = request.args.get("round")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and int(raw) >= 1):
        raise ProtocolError(f"round: must be a round number >= 1, got {raw!r}")
    return int(raw)


@bp.get("/compare.svg")
def compare():
    """Several runs' federated loss per round on one log-scale chart, one line
    per run: ?runs=1,2,3 (at most MAX_COMPARE); below it each run's distance
    to the pooled optimum that a chosen exact run solved for."""
    no_query_args("runs")
    store = federation().store
    runs = []
    for digits in _runs_arg():
        # More digits than any run id has: no such run (and int() refuses thousands of digits).
        run = store.summary(int(digits)) if len(digits) <= 18 else None
        if run is None:
            return {"error": f"no run {digits[:40]}"}, 404
        runs.append(run)
    from .plots import ChartsBusy, known_optimum, render_compare, solved_optimum, solves  # (see plot)
    # θ*: from a chosen exact run's last round, for the runs over its very clients (URL and n_k).
    solvers = [(run, *found) for run in runs if solves(run) and run["rounds_completed"] and (found := solved_optimum(
        run, store.page(run["run_id"], since=run["rounds_completed"] - 1, limit=1)["rounds"][0]))]
    solving = {run["run_id"] for run, _, _ in solvers}
    known = {run["run_id"]: found for run in runs if solvers and run["rounds_completed"]
             and run["run_id"] not in solving and (found := known_optimum(frozenset(
                 (url, c["data_size"]) for url, c in store.clients_seen(run["run_id"]).items()), solvers))}
    for run in runs:
        # The loss and the round: 2 numbers a round; the whole model too (d + 1) where a distance is drawn.
        per_round = 2 + (_features(store, run) + 1 if run["run_id"] in known else 0)
        run["rounds"] = reader_view_rounds(run, store.chart_rounds(
            run["run_id"], every=_every(run["rounds_completed"], per_round * len(runs)),
            keep=(1, run["rounds_completed"]), vectors=run["run_id"] in known))
    try:
        svg = render_compare(runs, "svg", known)
    except ChartsBusy as e:
        return {"error": str(e)}, 503, {"Retry-After": "1"}
    return Response(svg, mimetype="image/svg+xml", headers={"Cache-Control": "no-store"})


def _every(done: int, per_round: int) -> int:
    """Every how many rounds a chart reads, so that it reads at most
    CHART_ROUNDS rounds and CHART_NUMBERS numbers."""
    shown = max(1, min(CHART_ROUNDS, CHART_NUMBERS // per_round))
    return max(1, -(-done // shown))


def _features(store: Any, run: dict[str, Any]) -> int:
    last = store.chart_rounds(run["run_id"], since=run["rounds_completed"] - 1, limit=1)
    return last[0]["num_features"] if last else 1


def _chart_run(run_id: int, name: str, round_no: int | None = None) -> dict[str, Any] | None:
    """The run as chart ``name`` reads it, from the store's chart reads
    (``RunStore.chart_rounds``: the numbers a chart draws, never whole
    records): the model lines one round, the others at most CHART_ROUNDS
    rounds, evenly spaced, with the first, the last and ``round_no``, and no
    more than CHART_NUMBERS numbers (the params chart's client lines are the
    first CLIENT_LINES of the run's clients); each client's numbers only for
    who may read them."""
    from .plots import CLIENT_LINES
    store = federation().store
    run = store.summary(run_id)
    if run is None:
        return None
    done = run["rounds_completed"]
    if name == "models":
        shown = round_no or done
        rounds = store.chart_rounds(run_id, since=shown - 1, limit=1, clients=None) if shown else []
    else:
        lines = tuple(run["clients"][:CLIENT_LINES]) if name == "params" and reads_clients() else ()
        # the round and its loss, the global model out and in (w₁ and b each), each line's w₁ and b
        rounds = store.chart_rounds(run_id, every=_every(done, 6 + 2 * len(lines)),
                                    keep=tuple(r for r in (1, done, round_no) if r), clients=lines)
    return run | {"rounds": reader_view_rounds(run, rounds)}


def reader_view_rounds(run: dict[str, Any], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chart's rounds of ``run`` as this request may read them: no client's
    local model without the token on a private server, nor in a DP run, for
    anyone (it records none; an older server's DP records still hold them:
    access.py shows those rounds without them too)."""
    if reads_clients() and not run["settings"].get("dp"):
        return rounds
    return [r | {"participants": [p | {"local_model": None} for p in r["participants"]]} for r in rounds]


def _runs_arg() -> list[str]:
    """?runs=1,2,3 → ["1", "2", "3"]: run ids as digits, each once, at most MAX_COMPARE."""
    raw = request.args.get("runs")
    if raw is None:
        raise ProtocolError("runs: required, the run ids to compare, e.g. runs=1,2")
    parts = raw.split(",")
    if len(parts) > MAX_COMPARE:
        raise ProtocolError(f"runs: at most {MAX_COMPARE} runs on one chart, got {len(parts)}")
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ProtocolError(f"runs: must be run ids separated by commas, got {raw[:40]!r}")
    return list(dict.fromkeys(part.lstrip("0") or "0" for part in parts))
