"""The server's HTTP API: thin wiring from requests to the Federation."""
from __future__ import annotations

import json
from itertools import chain
from typing import Any

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import NotFound

from fedavg.http.service import json_body
from fedavg.strict_json import ProtocolError, expect_bool, expect_object, weights_of
from fedavg.trace import fmt_line

from .access import reader_round, reader_view, require_operator
from .federation import Busy, CannotResume, Federation, NoSuchRun
from .openapi import server_document
from .runs import StoreError, client_csv_lines, csv_lines
from .settings import RunSettings, parse_start

bp = Blueprint("api", __name__)


def federation() -> Federation:
    return current_app.extensions["fedavg"]


def no_query_args(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise ProtocolError(f"{unknown[0]}: unknown query parameter")


@bp.post("/start")
def start():
    """Start a run; answer when it ends (wait=true, the default) or at once (202)."""
    require_operator()
    no_query_args()
    fed = federation()
    settings, wait = parse_start(json_body(if_empty={}), len(fed.transport.urls))
    if settings.init is not None:
        # A starting model that cannot fit the clients' data is bad input, not a failed run.
        d, dims = len(settings.init["w"]), fed.feature_counts()
        if dims and dims != {d}:
            raise ProtocolError(f"init.w: has {d} weight(s), the clients' data has "
                                f"{' or '.join(map(str, sorted(dims)))} feature(s)")
    return _launched(fed, fed.start(settings), wait)


@bp.post("/runs/<int:run_id>/resume")
def resume(run_id: int):
    """Continue an interrupted run; same wait semantics as /start."""
    require_operator()
    no_query_args()
    body = expect_object(json_body(if_empty={}), "", ("wait", "clients"))
    wait = expect_bool(body["wait"], "wait") if "wait" in body else True
    if body.get("clients", "current") != "current":
        raise ProtocolError('clients: the only choice is "current" (go on with this server\'s clients)')
    fed = federation()
    try:
        fed.resume(run_id, current_clients="clients" in body)
    except CannotResume as e:
        return {"error": str(e), "run_id": run_id}, 409
    return _launched(fed, run_id, wait)


@bp.post("/runs/<int:run_id>/stop")
def stop(run_id: int):
    """Stop the running run after its current round: it reads ``interrupted``
    and /resume continues it."""
    require_operator()
    no_query_args()
    expect_object(json_body(if_empty={}), "", ())
    fed = federation()
    if fed.stop(run_id):
        return {"run_id": run_id, "status": "stopping", "url": f"/runs/{run_id}"}, 202
    found = fed.store.summary(run_id)
    if found is None:
        raise NoSuchRun(run_id)
    return {"error": f"run {run_id} is {fed.truth(found)['status']}, not running", "run_id": run_id}, 409


@bp.app_errorhandler(NoSuchRun)
def no_such_run(e: NoSuchRun):
    return {"error": str(e)}, 404


@bp.app_errorhandler(StoreError)
def store_unavailable(e: StoreError):
    """The run history cannot be read or written (corrupt, full, deleted):
    503 on what needs it; /health and /status still answer."""
    return {"error": f"the run history is unavailable: {e}"}, 503


@bp.errorhandler(Busy)
def busy(e: Busy):
    """/start or /resume while a run runs: 409 naming the running run."""
    return {"error": str(e), "run_id": e.run_id, "url": f"/runs/{e.run_id}"}, 409


def _launched(fed: Federation, run_id: int, wait: bool):
    """What /start and /resume answer: 202 at once, or the run once it ended,
    its summary first, with the first page of its rounds (see ``ended_run``)."""
    if not wait:
        return {"run_id": run_id, "status": "running", "url": f"/runs/{run_id}"}, 202
    fed.wait(run_id)
    found = fed.store.page(run_id, limit=PAGE_ROUNDS, max_bytes=PAGE_BYTES)
    done = fed.store.summary(run_id)["rounds_completed"]
    return ended_run(fed.truth(found), fed.warnings(run_id), done, fed.timeouts(run_id))


# What a person needs from an ended run, in the order they read it; the whole
# run (settings, every round) follows.
SUMMARY_KEYS = ("message", "status", "final_line", "final_model", "rounds_completed", "timeouts", "warnings", "url")


def ended_run(run: dict[str, Any], warnings: list[str], done: int, timeouts: dict[str, Any] | None = None) \
        -> Response:
    """The ended run as JSON with its summary first: ``message`` (the seed's
    field), the status, the final model (as a line and as numbers), the
    ``done`` rounds, ``timeouts`` (rounds that lost many clients to
    timeouts: ``timeouts.TimeoutTally.summary``, first in the message too),
    ``warnings`` (clients that were dropped) and the run's URL; then the
    run with the first page of its rounds, as GET /runs/<id> gives it
    ("more": true when rounds follow: a 100,000-round run whole was 111 MB,
    built in 1.1 GB).

    curl sends ``Accept: */*``: it gets one key per line and one round per
    line, so ``| head`` shows the summary. A client that asks for
    ``application/json`` by name gets the same keys on one line."""
    name = {"fedavg": "FedAvg"}.get(run["settings"]["strategy"], run["settings"]["strategy"])
    message = {"completed": f"{name} finished {done} round(s)."}.get(
        run["status"], f"Run {run['status']}: {run['error']}")
    if timeouts is not None:
        message += f" WARNING: {timeouts['message']}."
    if warnings:
        message += " Warning: " + "; ".join(warnings) + "."
    model = run["final_model"] or run["current_model"]
    summary = {"message": message, "status": run["status"], "final_line": _line(model),
               "final_model": run["final_model"], "rounds_completed": done, "timeouts": timeouts,
               "warnings": warnings, "url": f"/runs/{run['run_id']}"}
    body = {**summary, **{k: v for k, v in run.items() if k not in summary}}
    if any(kind == "application/json" for kind, _ in request.accept_mimetypes):
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    else:
        text = _one_key_a_line(body)
    return current_app.response_class(text + "\n", mimetype="application/json")


def _line(model: dict[str, Any]) -> str:
    """y = w·x + b as the log writes it (w₁·x1 + … with several features)."""
    return fmt_line(weights_of(model), model["b"])


def _one_key_a_line(body: dict[str, Any]) -> str:
    """JSON for a terminal: one top-level key per line, each value compact,
    lists of objects (the rounds) one item per line."""
    def dump(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)

    lines = []
    for key, value in body.items():
        if isinstance(value, list) and value and isinstance(value[0], (dict, str)):
            items = ",\n".join("    " + dump(v) for v in value)
            lines.append(f"  {dump(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


@bp.get("/status")
def status():
    """Seed-compatible: the current global model and the rounds planned. It
    answers even when the run history cannot be read, from what the server
    knows in memory."""
    no_query_args()
    fed = federation()
    try:
        run = fed.store.latest()
    except StoreError as e:
        running, ended = fed.running_id(), fed.unrecorded()
        return {"status": "running" if running is not None else "unknown", "run_id": running,
                "unrecorded_ends": {str(k): {"status": v[0], "error": v[1]} for k, v in ended.items()},
                "error": f"the run history is unavailable: {e}"}
    if run is None:
        defaults = RunSettings()
        return {"current_global_model": {"w": 0.0, "b": 0.0}, "global_rounds_planned": defaults.rounds,
                "run_id": None, "round": 0, "status": "idle"}
    run = fed.truth(run)
    return {"current_global_model": run["current_model"], "global_rounds_planned": run["settings"]["rounds"],
            "run_id": run["run_id"], "round": run["rounds_completed"], "status": run["status"],
            **({"error": run["error"]} if run["error"] else {})}


@bp.get("/runs")
def runs():
    no_query_args()
    fed = federation()
    return {"runs": [fed.truth(r) for r in fed.store.summaries()]}


# Rounds per GET /runs/<id>: a 100,000-round run is 78 MB of JSON at once,
# and a round of 200 clients 70 kB: a page holds at most ?limit= rounds and,
# past its first round, at most PAGE_BYTES of them (whatever the clients sent).
PAGE_ROUNDS = 1000
MAX_PAGE_ROUNDS = 10_000
PAGE_BYTES = 2 << 20


@bp.get("/runs/<int:run_id>")
def run(run_id: int):
    """The run and its rounds after round ?since=N (default 0): at most
    ?limit= of them (default 1000) and about PAGE_BYTES of JSON ("more" says
    whether rounds follow: ask again with since = the last round). ?format=csv
    streams every round, one row each."""
    no_query_args("format", "since", "limit")
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ProtocolError(f"format: must be json or csv, got {fmt!r}")
    after = _round_number("since", "0")
    limit = _round_number("limit", str(PAGE_ROUNDS))
    if not 1 <= limit <= MAX_PAGE_ROUNDS:
        raise ProtocolError(f"limit: must be 1 to {MAX_PAGE_ROUNDS}, got {limit}")
    fed = federation()
    if fmt == "csv":
        if fed.store.summary(run_id) is None:
            raise NoSuchRun(run_id)
        lines = csv_lines(fed.store.iter_rounds(run_id))
        # The first rows are read here, before the response starts: a history
        # that cannot be read is the 503 of every endpoint, not a broken stream.
        first = next(lines)
        return current_app.response_class(chain([first], lines), mimetype="text/csv", headers={
            "Content-Disposition": f'attachment; filename="fedavg-run-{run_id}.csv"'})
    found = fed.store.page(run_id, since=after, limit=limit, max_bytes=PAGE_BYTES)
    if found is None:
        raise NoSuchRun(run_id)
    # Over the whole run, whatever ?since says: a client dropped from every
    # round is worth a warning on the page even though the run "completed".
    return reader_view(fed.truth(found)) | {"warnings": fed.warnings(run_id), "timeouts": fed.timeouts(run_id)}


@bp.get("/runs/<int:run_id>/rounds/<int:round_no>/clients.csv")
def round_clients(run_id: int, round_no: int):
    """Every client of one round, a row each (``client_csv_lines``): a
    summarised round's whole list, which its record only counts. Each
    client's own numbers by the rules of GET /runs/<id> (``access``)."""
    no_query_args()
    fed = federation()
    found = fed.store.round_with_clients(run_id, round_no)
    if found is None:
        if fed.store.summary(run_id) is None:
            raise NoSuchRun(run_id)
        raise NotFound(f"run {run_id} has no round {round_no} (yet)")
    return current_app.response_class(client_csv_lines(reader_round(found)), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="fedavg-run-{run_id}-round-{round_no}-clients.csv"'})


def _round_number(name: str, default: str) -> int:
    text = request.args.get(name, default)
    if not (text.isascii() and text.isdigit()):
        raise ProtocolError(f"{name}: must be a whole number >= 0, got {text[:40]!r}")
    # More digits than any round number has: nothing comes after it (and
    # int() refuses strings of thousands of digits).
    return int(text) if len(text) <= 18 else 2**63 - 1


HEALTH_URLS = 10_000  # the most client URLs /health lists


@bp.get("/health")
def health() -> dict[str, Any]:
    no_query_args()
    fed = federation()
    urls = fed.transport.urls
    # A population of a million would make every liveness poll 40 MB: the first of them, and the count.
    shown = list(urls) if len(urls) <= HEALTH_URLS else urls[:HEALTH_URLS]
    return {"status": "ok", "clients": shown, "clients_total": len(urls), "running_run_id": fed.running_id()}


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return server_document(len(federation().transport.urls))
