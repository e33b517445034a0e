"""The client app: private data in, local models out. Every client runs this
factory; ``client_1/`` and ``client_2/`` differ only in their data."""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask

from .data import DataError, load_csv
from .model import mse
from .openapi import client_document
from .service import cli, configure_logging, install_json_errors, json_body, require_token, serve, shared_token
from .training import local_train
from .aggregation import fmt_model
from .wire import model_json, parse_evaluate_request, parse_train_request


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
    client_id: str = app.config["CLIENT_ID"]
    # Loaded once at start: a bad file stops the client now, not mid-run.
    X, y = load_csv(app.config["DATA_PATH"])
    n, d = X.shape
    app.config.update(DATA_SIZE=n, NUM_FEATURES=d)
    install_json_errors(app)

    @app.get("/health")
    def health():
        return {"status": "ok", "client_id": client_id, "data_size": n, "num_features": d}

    @app.get("/openapi.json")
    def openapi():
        return client_document(d)

    @app.post("/train")
    def train():
        require_token(app.config["TOKEN"])
        w_g, b_g, rnd, config = parse_train_request(json_body(), d)
        # Overflow is possible with a large lr; it is detected below and
        # reported as divergence, so NumPy need not warn about it.
        with np.errstate(over="ignore", invalid="ignore"):
            loss_before = mse(w_g, b_g, X, y)
            w, b = local_train(w_g, b_g, X, y, config)
            loss_after = mse(w, b, X, y)
        if not (math.isfinite(loss_after) and all(map(math.isfinite, w)) and math.isfinite(b)):
            # JSON cannot carry inf/NaN; say plainly what happened instead.
            app.logger.warning("round %s: local training diverged with lr=%g", rnd, config.lr)
            return {"error": f"local training diverged (non-finite model) with lr={config.lr:g}; "
                             "use a smaller lr", "diverged": True}, 422
        app.logger.info("round %s: %s → %s  (loss %s → %s)", "-" if rnd is None else rnd,
                        fmt_model(w_g, b_g), fmt_model(w, b), f"{loss_before:.6g}", f"{loss_after:.6g}")
        return {"local_model": model_json(w, b), "data_size": n, "client_id": client_id,
                "metrics": {"loss_before": _finite_or_none(loss_before), "loss_after": loss_after}}

    @app.post("/evaluate")
    def evaluate():
        require_token(app.config["TOKEN"])
        w, b = parse_evaluate_request(json_body(), d)
        with np.errstate(over="ignore", invalid="ignore"):
            loss = mse(w, b, X, y)
        if not math.isfinite(loss):
            return {"error": "loss is not finite for this model", "diverged": True}, 422
        return {"loss": loss, "data_size": n, "client_id": client_id}

    return app


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


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
    print(f"{args.client_id}: {app.config['DATA_SIZE']} private samples from {args.data}; serving on http://{args.host}:{args.port}",
          flush=True)
    serve(app, args.host, args.port)
