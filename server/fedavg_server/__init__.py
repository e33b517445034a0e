"""The Raw FedAvg server: orchestrates rounds and computes W_{t+1} = Σ_k n_k/N · W_k."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from fedavg.service import install_json_errors, shared_token

from .api import bp
from .clients import ClientPool
from .federation import Federation
from .runs import RunStore
from .web import bp as web_bp

DEFAULT_CLIENTS = ("http://127.0.0.1:5001", "http://127.0.0.1:5002")


def client_urls(value: str | None) -> list[str]:
    """'URL,URL' (from --clients or FEDAVG_CLIENTS) → URLs; empty → the seed's two."""
    urls = [u.strip() for u in (value or "").split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"client URL must start with http:// or https://: {url!r}")
    return urls or list(DEFAULT_CLIENTS)


def default_max_parallel() -> int:
    """Client calls in flight at once: enough threads to keep the cores busy
    while most of them wait on the network."""
    return 16 * (os.cpu_count() or 2)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the server. Config: CLIENTS (list of URLs; default from
    FEDAVG_CLIENTS, else the two local clients), DATABASE (the SQLite file of
    run history; default from FEDAVG_DB, else instance/fedavg.db), TOKEN (shared
    bearer token sent to clients and required on /start and /resume; default
    from FEDAVG_TOKEN, None = open), MAX_PARALLEL."""
    app = Flask(__name__)
    app.config.from_mapping(
        CLIENTS=client_urls(os.environ.get("FEDAVG_CLIENTS")),
        # The run history lives in the instance folder (server/instance/), kept out of git.
        DATABASE=os.environ.get("FEDAVG_DB") or os.path.join(app.instance_path, "fedavg.db"),
        # 1 MiB: room for an init of MAX_FEATURES weights, and no more.
        TOKEN=shared_token(), MAX_PARALLEL=default_max_parallel(), MAX_CONTENT_LENGTH=1024 * 1024)
    if config is not None:
        app.config.from_mapping(config)
    pool = ClientPool(app.config["CLIENTS"], app.config["MAX_PARALLEL"])
    if app.config["TOKEN"]:
        pool.headers["Authorization"] = f"Bearer {app.config['TOKEN']}"
    app.extensions["fedavg"] = Federation(pool, RunStore(app.config["DATABASE"]))
    install_json_errors(app)
    app.register_blueprint(bp)
    app.register_blueprint(web_bp)
    return app
