"""The Raw FedAvg server: orchestrates rounds and computes W_{t+1} = Σ_k n_k/N · W_k."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from fedavg.http.service import install_json_errors, install_request_guards

from .api import bp
from .federation import Federation
from .http_transport import HttpTransport
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


def _flag(value: Any) -> bool:
    """A yes/no setting as the environment may give it: true/false, 1/0, yes/no, on/off."""
    if isinstance(value, str):
        if value.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise ValueError(f"FEDAVG_PUBLIC_READ must be true or false, got {value!r}")
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def default_max_parallel() -> int:
    """Client calls in flight at once: enough threads to keep the cores busy
    while most of them wait on the network."""
    return 16 * (os.cpu_count() or 2)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the server. Config, each also read once from the environment as
    FEDAVG_<KEY> (Flask's from_prefixed_env), a test's ``config`` last:

    - CLIENTS: the client URLs, a list or "URL,URL" (default the two local clients);
    - DB: the SQLite file of run history (default instance/fedavg.db);
    - TOKEN: the shared bearer token sent to clients and required on /start
      and the other endpoints that act (None = open);
    - MAX_PARALLEL: client calls in flight at once;
    - TRANSPORT: how the clients are reached (default HTTP to CLIENTS; an
      ``InProcessTransport`` calls client apps in this process).

    Raises StoreError when the run history cannot be used."""
    app = Flask(__name__)
    app.config.from_mapping(
        CLIENTS=list(DEFAULT_CLIENTS),
        # The run history lives in the instance folder (server/instance/), kept out of git.
        DB=os.path.join(app.instance_path, "fedavg.db"),
        # 1 MiB: room for an init of MAX_FEATURES weights, and no more.
        TOKEN=None, MAX_PARALLEL=default_max_parallel(), MAX_CONTENT_LENGTH=1024 * 1024)
    app.config.from_prefixed_env("FEDAVG")
    if config is not None:
        app.config.from_mapping(config)
    if isinstance(app.config["CLIENTS"], str):
        app.config["CLIENTS"] = client_urls(app.config["CLIENTS"])
    # from_prefixed_env reads values as JSON when it can, else as text: a token
    # of digits must stay text, "a.lan,b.lan" is a list, "no" is not true.
    app.config["TOKEN"] = str(app.config["TOKEN"]) if app.config["TOKEN"] else None
    if isinstance(app.config.get("ALLOWED_HOSTS"), str):
        app.config["ALLOWED_HOSTS"] = [h.strip() for h in app.config["ALLOWED_HOSTS"].split(",") if h.strip()]
    app.config["PUBLIC_READ"] = _flag(app.config.get("PUBLIC_READ", False))
    # A test or a lab hands in its own transport (fedavg_server.inprocess); the apps talk HTTP.
    transport = app.config.get("TRANSPORT") or HttpTransport(app.config["CLIENTS"], app.config["MAX_PARALLEL"])
    app.config["CLIENTS"] = transport.urls
    if app.config["TOKEN"]:
        transport.headers["Authorization"] = f"Bearer {app.config['TOKEN']}"
    app.extensions["fedavg"] = Federation(transport, RunStore(app.config["DB"]))
    install_json_errors(app)
    install_request_guards(app)
    app.register_blueprint(bp)
    app.register_blueprint(web_bp)
    return app
