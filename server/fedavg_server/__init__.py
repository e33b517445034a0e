"""The Raw FedAvg server: orchestrates rounds and computes W_{t+1} = Σ_k n_k/N · W_k."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from fedavg.http.service import checked_token, install_json_errors, install_request_guards

from .api import bp
from .federation import Federation
from .http_transport import HttpTransport
from .runs import RunStore
from .web import bp as web_bp

DEFAULT_CLIENTS = ("http://127.0.0.1:5001", "http://127.0.0.1:5002")
# The same two, when the server has TLS (its clients then serve HTTPS only).
DEFAULT_TLS_CLIENTS = ("https://127.0.0.1:5001", "https://127.0.0.1:5002")


def client_urls(value: str | None) -> list[str]:
    """'URL,URL' (from --clients or FEDAVG_CLIENTS) → URLs; empty → the seed's two."""
    urls = [u.strip() for u in (value or "").split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"client URL must start with http:// or https://: {url!r}")
    return urls or list(DEFAULT_CLIENTS)


YES = ("1", "true", "yes", "on")
NO = ("0", "false", "no", "off")


def _flag(value: Any) -> bool:
    """A yes/no setting: True or False, or as the environment gives it, one
    of yes/no, true/false, on/off, 1/0 in any case. Anything else (2, -1,
    [1], an empty value) is refused: it is a typo, not a yes."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in YES + NO:
        return value.strip().lower() in YES
    raise ValueError(f"FEDAVG_PUBLIC_READ: must be one of yes/no, true/false, on/off, 1/0, got {repr(value)[:100]}")


def _hosts(value: str) -> list[str]:
    """FEDAVG_ALLOWED_HOSTS: names separated by commas, or a JSON list of them."""
    if value.lstrip().startswith("["):
        try:
            names = json.loads(value)
        except ValueError:
            names = None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"FEDAVG_ALLOWED_HOSTS: not a JSON list of names: {value[:100]!r}")
        return [n.strip() for n in names if n.strip()]
    return [h.strip() for h in value.split(",") if h.strip()]


def _count(value: str) -> int:
    """FEDAVG_MAX_PARALLEL: a whole number, at least 1."""
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"FEDAVG_MAX_PARALLEL: must be a whole number of at least 1, got {value[:100]!r}")
    return int(value)


# Every FEDAVG_* variable the server reads (FEDAVG_WSGI: fedavg.http.service)
# and how its text is read. Each as written, never as JSON (Flask's
# from_prefixed_env would make FEDAVG_TOKEN=false no token at all while the
# clients require "false", and FEDAVG_PUBLIC_READ=2 a yes).
ENVIRONMENT = {"CLIENTS": client_urls, "DB": str, "MAX_PARALLEL": _count, "PUBLIC_READ": _flag,
               "ALLOWED_HOSTS": _hosts, "TOKEN": checked_token}


def environment() -> dict[str, Any]:
    """The server's settings from FEDAVG_*; a value that is not one is a
    ValueError naming its variable."""
    settings = {}
    for key, read in ENVIRONMENT.items():
        name = f"FEDAVG_{key}"
        if name in os.environ:
            try:
                settings[key] = read(os.environ[name])
            except ValueError as e:
                raise ValueError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
    return settings


def default_max_parallel() -> int:
    """Client calls in flight at once: enough threads to keep the cores busy
    while most of them wait on the network."""
    return 16 * (os.cpu_count() or 2)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the server. Config, each also read once from the environment as
    FEDAVG_<KEY> (``environment``), a test's ``config`` last:

    - CLIENTS: the client URLs, a list or "URL,URL" (default the two local clients);
    - DB: the SQLite file of run history (default instance/fedavg.db);
    - TOKEN: the shared bearer token sent to clients and required on /start
      and the other endpoints that act (None or "" = open);
    - PUBLIC_READ: with a token, still show each client's own numbers to all;
    - ALLOWED_HOSTS: names to answer to besides addresses and localhost;
    - MAX_PARALLEL: client calls in flight at once;
    - TLS: a ``fedavg.tls_files.TLSFiles`` (--tls-cert, --tls-key, --tls-ca)
      or None: with it the clients are called over mutual TLS, their URLs
      https:// (default the two local clients over https://); without it a
      client URL that is not on this machine is warned about, once;
    - TRANSPORT: how the clients are reached (default HTTP to CLIENTS; an
      ``InProcessTransport`` calls client apps in this process);
    - BATCHED: call each client host once a round for all its sampled
      clients, when their /health says it can (default True; --per-client
      turns it off: each client's own /train).

    Raises ValueError for a setting that is not one, StoreError when the run
    history cannot be used (or another server holds it)."""
    app = Flask(__name__)
    app.config.from_mapping(
        # (CLIENTS: the defaults depend on TLS, set below when none are given)
        # The run history lives in the instance folder (server/instance/), kept out of git.
        DB=os.path.join(app.instance_path, "fedavg.db"),
        # 1 MiB: room for an init of MAX_FEATURES weights, and no more.
        TOKEN=None, PUBLIC_READ=False, MAX_PARALLEL=default_max_parallel(), MAX_CONTENT_LENGTH=1024 * 1024,
        TLS=None, BATCHED=True)
    app.config.from_mapping(environment())
    if config is not None:
        app.config.from_mapping(config)
    app.config.setdefault("CLIENTS", list(DEFAULT_TLS_CLIENTS if app.config["TLS"] else DEFAULT_CLIENTS))
    if isinstance(app.config["CLIENTS"], str):
        app.config["CLIENTS"] = client_urls(app.config["CLIENTS"])
    if isinstance(app.config.get("ALLOWED_HOSTS"), str):
        app.config["ALLOWED_HOSTS"] = _hosts(app.config["ALLOWED_HOSTS"])
    app.config["TOKEN"] = checked_token(app.config["TOKEN"])
    app.config["PUBLIC_READ"] = _flag(app.config["PUBLIC_READ"])
    # A test or a lab hands in its own transport (fedavg_server.inprocess); the apps talk HTTP.
    transport = app.config.get("TRANSPORT") or HttpTransport(app.config["CLIENTS"], app.config["MAX_PARALLEL"],
                                                             tls=app.config["TLS"])
    app.config["CLIENTS"] = transport.urls
    if app.config["TOKEN"]:
        transport.headers["Authorization"] = f"Bearer {app.config['TOKEN']}"
    app.extensions["fedavg"] = Federation(transport, RunStore(app.config["DB"]), _flag(app.config["BATCHED"]))
    install_json_errors(app)
    install_request_guards(app)
    app.register_blueprint(bp)
    app.register_blueprint(web_bp)
    return app
