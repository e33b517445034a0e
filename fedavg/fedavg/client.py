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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Flask, g

from .data import DataError, load_csv
from .model import mse, split
from .openapi import client_document
from .service import cli, configure_logging, install_json_errors, json_body, require_token, serve, shared_token
from .strategies import STRATEGIES, RunMemory
from .trace import fmt_theta
from .wire import parse_evaluate_request, parse_train_request, train_reply_json

log = logging.getLogger("fedavg.client")


@dataclass(frozen=True)
class LocalClient:
    """One client's private data (X, y) and its answers to the server.
    Nothing it returns contains a data row."""

    client_id: str
    X: np.ndarray
    y: np.ndarray
    # State kept between rounds, per run (SCAFFOLD's c_k); gone when the client restarts.
    memory: RunMemory = field(default_factory=RunMemory, compare=False, repr=False)

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "client_id": self.client_id, "data_size": len(self.y),
                "num_features": self.num_features, "strategies": list(STRATEGIES)}

    def train(self, body: Any) -> tuple[dict[str, Any], int]:
        """POST /train: what the strategy asks of a client, from the global model
        (for FedAvg: local gradient descent, and the local model back)."""
        task = parse_train_request(body, self.num_features)
        strategy = STRATEGIES[task.config.strategy]
        # Overflow is possible with a large lr; it is detected below and
        # reported as divergence, so NumPy need not warn about it.
        with np.errstate(over="ignore", invalid="ignore"):
            loss_before = mse(*split(task.theta), self.X, self.y)
            local = strategy.local(task, self.X, self.y, self.memory)
            theta = task.theta if local.theta is None else local.theta
            loss_after = mse(*split(theta), self.X, self.y)
        vectors = [theta, *(v for v in local.extra.values() if isinstance(v, np.ndarray))]
        if not (math.isfinite(loss_after) and all(bool(np.all(np.isfinite(v))) for v in vectors)):
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
        return train_reply_json(self.client_id, len(self.y), local, metrics, strategy.name), 200

    def evaluate(self, body: Any) -> tuple[dict[str, Any], int]:
        """POST /evaluate: the MSE of a model on this client's data."""
        w, b = parse_evaluate_request(body, self.num_features)
        with np.errstate(over="ignore", invalid="ignore"):
            loss = mse(w, b, self.X, self.y)
        if not math.isfinite(loss):
            return {"error": "loss is not finite for this model", "diverged": True}, 422
        return {"loss": loss, "data_size": len(self.y), "client_id": self.client_id}, 200


def client_blueprint(pick: Callable[[dict[str, Any]], LocalClient], token: str | None,
                     url_prefix: str | None = None) -> Blueprint:
    """The client endpoints. ``pick`` turns the URL's values (``k`` for a
    client host's /clients/<k>) into the client that answers."""
    bp = Blueprint("client", __name__, url_prefix=url_prefix)

    @bp.url_value_preprocessor
    def choose_client(endpoint: str | None, values: dict[str, Any] | None) -> None:
        g.client = pick(values if values is not None else {})

    @bp.get("/health")
    def health():
        return g.client.health()

    @bp.get("/openapi.json")
    def openapi():
        return client_document(g.client.num_features)

    @bp.post("/train")
    def train():
        require_token(token)
        return g.client.train(json_body())

    @bp.post("/evaluate")
    def evaluate():
        require_token(token)
        return g.client.evaluate(json_body())

    return bp


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
    print(f"{args.client_id}: {app.config['DATA_SIZE']} private samples from {args.data}; "
          f"serving on http://{args.host}:{args.port}", flush=True)
    serve(app, args.host, args.port)
