"""A client: private data in, local models out.

``LocalClient`` is what a client *does* (train, evaluate, describe itself);
``client_blueprint`` is its HTTP face. ``create_app`` serves one client (what
client_1/ and client_2/ run); ``fedavg.client_host`` serves many from one
process through the very same blueprint.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Flask, g, render_template, request

from .data import DataError, load_csv
from .model import mse, split
from .openapi import client_document
from .privacy import privatize
from .secure_client import Sessions, add_secure_routes
from .service import (
    cli,
    configure_logging,
    has_token,
    install_json_errors,
    install_request_guards,
    json_body,
    require_token,
    serve,
    shared_token,
)
from .strategies import STRATEGIES, ClientTask, Local, RunMemory
from .strategies.fields import LOCAL_MODEL
from .strict_json import ProtocolError
from .trace import fmt, fmt_theta
from .training import TrainingStopped
from .wire import parse_evaluate_request, parse_train_request, train_reply_json

log = logging.getLogger("fedavg.client")
MAX_TRAININGS = 2  # per client: the server's round and one more (a retry)


def _deadline_s() -> float | None:
    """The server's X-Deadline-S: how long it will wait for this call, in
    seconds (more than 0, at most 3600); None when not sent."""
    raw = request.headers.get("X-Deadline-S")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 3600:
        raise ProtocolError(f"X-Deadline-S: must be a number of seconds, more than 0 and at most 3600, "
                            f"got {raw[:40]!r}")
    return value


class LastModel:
    """The last global model this client received, for its own page: the
    request it came with (/train or /evaluate) and the round, if said.
    Request threads write it, the page reads it: hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, Any] | None = None

    def keep(self, theta: np.ndarray, via: str, round_no: int | None) -> None:
        w, b = split(np.asarray(theta, dtype=float))
        seen = {"w": w.tolist(), "b": float(b), "via": via, "round": round_no}
        with self._lock:
            self._seen = seen

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            return self._seen


@dataclass(frozen=True)
class Learned:
    """One round's local work: the strategy's reply fields, the model it ends
    at (θ_t when the strategy sends no model), the losses, the strategy."""

    local: Local
    theta: np.ndarray
    metrics: dict[str, Any]
    strategy: str


@dataclass(frozen=True)
class LocalClient:
    """One client's private data (X, y) and its answers to the server.
    Nothing it returns contains a data row."""

    client_id: str
    X: np.ndarray
    y: np.ndarray
    # State kept between rounds, per run (SCAFFOLD's c_k); gone when the client restarts.
    memory: RunMemory = field(default_factory=RunMemory, compare=False, repr=False)
    # The last global model received, shown on this client's own page only.
    last_global: LastModel = field(default_factory=LastModel, compare=False, repr=False)
    # Trainings in progress at once; a server that keeps calling after its own
    # timeouts must not pile up abandoned jobs.
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_TRAININGS),
                                              compare=False, repr=False)
    # Secure aggregation's sessions in progress (fedavg.secure_client), a few rounds at most.
    sessions: Sessions = field(default_factory=Sessions, compare=False, repr=False)

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    def health(self) -> dict[str, Any]:
        # x_range (min and max of the first feature) lets the server's chart
        # frame the model lines; it is a small, deliberate leak about the data.
        x = self.X[:, 0]
        return {"status": "ok", "client_id": self.client_id, "data_size": len(self.y),
                "num_features": self.num_features, "strategies": list(STRATEGIES), "secagg": True,
                "x_range": [float(x.min()), float(x.max())]}

    def least_squares(self) -> np.ndarray:
        """θ = [w..., b] minimising Σ_i (w·x_i + b − y_i)² on this client's
        data alone: lstsq over X̃ = [X, 1] (the minimum-norm one if it is not unique)."""
        X1 = np.column_stack([self.X, np.ones(len(self.y))])
        return np.linalg.lstsq(X1, self.y, rcond=None)[0]

    def train(self, body: Any, deadline_s: float | None = None) -> tuple[dict[str, Any], int]:
        """POST /train: what the strategy asks of a client, from the global model
        (for FedAvg: local gradient descent, and the local model back).
        ``deadline_s``: the server stops waiting after that long, so training
        stops then too (an abandoned job would only hold the next round up).
        At most MAX_TRAININGS at once: one more is a 429."""
        task = self.task(body, deadline_s)
        return self.guarded(task, lambda: self._train(task))

    def task(self, body: Any, deadline_s: float | None = None) -> ClientTask:
        """A /train body (or secure aggregation's first request) → the task, with the server's deadline."""
        task = parse_train_request(body, self.num_features)
        return task if deadline_s is None else replace(task, deadline=time.monotonic() + deadline_s)

    def guarded(self, task: ClientTask, work: Callable[[], tuple[dict[str, Any], int]]) -> tuple[dict[str, Any], int]:
        """``work()`` (which trains on ``task``) in one of the MAX_TRAININGS
        slots: 429 when none is free, 408 when the server's deadline passed."""
        if not self.slots.acquire(blocking=False):
            return {"error": f"busy: {MAX_TRAININGS} trainings already in progress; try again later"}, 429
        try:
            return work()
        except TrainingStopped as e:
            log.warning("%s round %s: the server's deadline passed: %s of %d", self.client_id, task.round, e,
                        task.config.local_epochs)
            return {"error": f"the server's deadline passed: training {e} of {task.config.local_epochs}"}, 408
        finally:
            self.slots.release()

    def _train(self, task: ClientTask) -> tuple[dict[str, Any], int]:
        learned = self.learn(task, "/train")
        if isinstance(learned, tuple):
            return learned
        return train_reply_json(self.client_id, len(self.y), learned.local, learned.metrics,
                                learned.strategy), 200

    def learn(self, task: ClientTask, via: str) -> Learned | tuple[dict[str, Any], int]:
        """What the strategy computes from θ_t on this client's data (privatized
        for a DP run), with the losses before and after; or the 422 reply when
        local training diverged."""
        self.last_global.keep(task.theta, via, task.round)
        strategy = STRATEGIES[task.config.strategy]
        # Overflow is possible with a large lr; it is detected below and
        # reported as divergence, so NumPy need not warn about it.
        with np.errstate(over="ignore", invalid="ignore"):
            loss_before = mse(*split(task.theta), self.X, self.y)
            local = strategy.local(task, self.X, self.y, self.memory)
            within_clip = None
            if task.config.private and local.theta is not None:
                # DP-FedAvg: only the clipped (and, if asked, noised) model leaves this client, and
                # the bit adaptive clipping counts: was the update no longer than the bound?
                bound = math.inf if task.config.dp_clip is None else task.config.dp_clip
                within_clip = float(np.linalg.norm(local.theta - task.theta) <= bound)
                local = replace(local, theta=privatize(local.theta, task.theta, bound, task.config.dp_noise_std))
            theta = task.theta if local.theta is None else local.theta
            loss_after = mse(*split(theta), self.X, self.y)
        sent = [(f.kind, local.value(f)) for f in strategy.replies if f is not LOCAL_MODEL]
        if not (math.isfinite(loss_after) and np.all(np.isfinite(theta)) and all(k.finite(v) for k, v in sent)):
            # JSON cannot carry inf/NaN; say plainly what happened instead.
            log.warning("%s round %s: local training diverged with lr=%g", self.client_id, task.round,
                        task.config.lr)
            return {"error": f"local training diverged (non-finite model) with lr={task.config.lr:g}; "
                             "use a smaller lr", "diverged": True}, 422
        if log.isEnabledFor(logging.INFO):
            log.info("%s round %s: %s%s → %s  (loss %s → %s)", self.client_id,
                     "-" if task.round is None else task.round,
                     "" if strategy.name == "fedavg" else f"[{strategy.name}] ", fmt_theta(task.theta),
                     fmt_theta(theta), f"{loss_before:.6g}", f"{loss_after:.6g}")
        metrics = {"loss_before": loss_before if math.isfinite(loss_before) else None, "loss_after": loss_after}
        if within_clip is not None:
            metrics["within_clip"] = within_clip
        return Learned(local, theta, metrics, strategy.name)

    def loss(self, theta: np.ndarray, via: str, round_no: int | None) -> float:
        """The MSE of θ on this client's data (inf or NaN when θ is absurd)."""
        self.last_global.keep(theta, via, round_no)
        with np.errstate(over="ignore", invalid="ignore"):
            return mse(*split(theta), self.X, self.y)

    def evaluate(self, body: Any) -> tuple[dict[str, Any], int]:
        """POST /evaluate: the MSE of a model on this client's data."""
        w, b = parse_evaluate_request(body, self.num_features)
        loss = self.loss(np.append(w, b), "/evaluate", body.get("round"))
        if not math.isfinite(loss):
            return {"error": "loss is not finite for this model", "diverged": True}, 422
        return {"loss": loss, "data_size": len(self.y), "client_id": self.client_id}, 200


def client_blueprint(pick: Callable[[dict[str, Any]], LocalClient], token: str | None,
                     url_prefix: str | None = None) -> Blueprint:
    """The client endpoints. ``pick`` turns the URL's values (``k`` for a
    client host's /clients/<k>) into the client that answers."""
    bp = Blueprint("client", __name__, url_prefix=url_prefix, template_folder="templates")

    @bp.url_value_preprocessor
    def choose_client(endpoint: str | None, values: dict[str, Any] | None) -> None:
        g.client = pick(values if values is not None else {})

    @bp.get("/health")
    def health():
        return g.client.health()

    @bp.get("/openapi.json")
    def openapi():
        return client_document(g.client.num_features)

    @bp.get("/")
    def page():
        """This client's own page: its private points, its local least-squares
        line and the last global model it received. Served only here; the
        server never sees it (it is not part of the wire protocol). With a
        token set, only for who knows it: the browser asks for it as a
        password (any user name)."""
        if token is not None and not has_token(token, page=True):
            return ({"error": "this page shows the client's private data: log in with the token as password"},
                    401, {"WWW-Authenticate": f'Basic realm="{g.client.client_id}\'s own page", charset="UTF-8"'})
        return render_template("client_page.html", **page_context(g.client))

    @bp.route("/start", methods=["GET", "POST"])
    @bp.route("/runs", methods=["GET", "POST"])
    def not_the_server():
        # A run is started on the server, not here: say so instead of a bare 404.
        return {"error": f"this is a client ({g.client.client_id}), not the server: /start and /runs are on "
                         "the server (default http://127.0.0.1:5000)"}, 404

    @bp.post("/train")
    def train():
        require_token(token)
        response = g.client.train(json_body(), _deadline_s())
        return (*response, {"Retry-After": "1"}) if response[1] == 429 else response

    @bp.post("/evaluate")
    def evaluate():
        require_token(token)
        return g.client.evaluate(json_body())

    add_secure_routes(bp, token, _deadline_s)
    return bp


PAGE_ROWS = 500  # the table lists at most this many points (the scatter draws them all)
SVG_W, SVG_H, SVG_PAD = 560, 360, 40


def page_context(client: LocalClient) -> dict[str, Any]:
    """What the client's page shows, computed here from the private data:
    the points, the scatter of y against the first feature as SVG
    coordinates, the local least-squares model and the last global model."""
    x, y = client.X[:, 0], client.y
    theta = client.least_squares()
    last = client.last_global.get()
    lo_x, hi_x = _padded(float(x.min()), float(x.max()))
    # One feature: the y axis must hold the lines too, across the x range.
    ys = [float(y.min()), float(y.max())]
    lines = []
    if client.num_features == 1:
        lines.append(("lstsq", float(theta[0]), float(theta[1])))
        if last is not None:
            lines.append(("global", float(last["w"][0]), float(last["b"])))
        ys += [w * xv + b for _, w, b in lines for xv in (lo_x, hi_x)]
    lo_y, hi_y = _padded(min(ys), max(ys))

    def sx(v: float) -> float:
        return SVG_PAD + (v - lo_x) / (hi_x - lo_x) * (SVG_W - 2 * SVG_PAD)

    def sy(v: float) -> float:
        return SVG_H - SVG_PAD - (v - lo_y) / (hi_y - lo_y) * (SVG_H - 2 * SVG_PAD)

    return {
        "client_id": client.client_id, "n": len(y), "d": client.num_features,
        "rows": [(list(map(float, xr)), float(yr)) for xr, yr in zip(client.X[:PAGE_ROWS], y[:PAGE_ROWS])],
        "points": [(sx(float(a)), sy(float(b))) for a, b in zip(x, y)],
        "lines": [{"name": name, "w": w, "b": b, "x1": sx(lo_x), "y1": sy(w * lo_x + b), "x2": sx(hi_x),
                   "y2": sy(w * hi_x + b)} for name, w, b in lines],
        "lstsq": {"w": theta[:-1].tolist(), "b": float(theta[-1])}, "last": last,
        "axes": {"x": (lo_x, hi_x), "y": (lo_y, hi_y), "w": SVG_W, "h": SVG_H, "pad": SVG_PAD},
        "x_range": (float(x.min()), float(x.max())), "page_rows": PAGE_ROWS, "fmt": fmt,
    }


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened by 5% each side (by 1 when lo == hi), so points are not on the frame."""
    margin = 0.05 * (hi - lo) or 1.0
    return lo - margin, hi + margin


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build a client app. Config: CLIENT_ID, DATA_PATH (the private CSV),
    TOKEN (shared bearer token required on /train and /evaluate; default from
    FEDAVG_TOKEN, None = open).

    Raises DataError when the data file cannot be used, before anything serves.
    """
    app = Flask(__name__)
    app.config.from_mapping(CLIENT_ID="client", DATA_PATH="data.csv", TOKEN=shared_token(),
                            MAX_CONTENT_LENGTH=4 * 1024 * 1024)
    if config is not None:
        app.config.from_mapping(config)
    # Loaded once at start: a bad file stops the client now, not mid-run.
    X, y = load_csv(app.config["DATA_PATH"])
    client = LocalClient(app.config["CLIENT_ID"], X, y)
    app.config.update(DATA_SIZE=len(y), NUM_FEATURES=client.num_features)
    install_json_errors(app)
    install_request_guards(app)
    app.register_blueprint(client_blueprint(lambda values: client, app.config["TOKEN"]))
    return app


def main(client_id: str, port: int, data_path: Path) -> None:
    """The entry every client_K_app.py calls: parse the command line, load the
    data (exit 2 with one line if it is bad), serve."""
    parser = cli(f"Raw FedAvg client {client_id}", port)
    parser.add_argument("--data", type=Path, default=data_path, help=f"private CSV (default {data_path})")
    parser.add_argument("--client-id", default=client_id, help=f"name sent to the server (default {client_id})")
    args = parser.parse_args()
    configure_logging()
    try:
        app = create_app({"CLIENT_ID": args.client_id, "DATA_PATH": str(args.data)})
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    risk = "" if app.config["TOKEN"] else (
        f"\n{args.client_id}: no FEDAVG_TOKEN: anyone who can reach this port can call /train and /evaluate, "
        "and the losses of a few chosen models give small data back exactly; set the same FEDAVG_TOKEN "
        "here and on the server to answer only it")
    serve(app, args.host, args.port, allowed_hosts=args.allowed_host,
          announce=f"{args.client_id}: {app.config['DATA_SIZE']} private samples from {args.data}; "
                   f"serving on http://{args.host}:{args.port}{risk}")
