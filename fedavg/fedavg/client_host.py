"""A client host: one process serving many independent clients, client k at
``/clients/<k>`` with the same /train, /evaluate, /health beneath — the very
blueprint a single client serves, each with its own private data."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Flask
from werkzeug.exceptions import NotFound

from .client import LocalClient, client_blueprint
from .openapi import host_document
from .service import install_json_errors, install_request_guards


def create_host_app(clients: Sequence[LocalClient], token: str | None = None,
                    description: str = "") -> Flask:
    """Serve ``clients`` as /clients/1 … /clients/K."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 4 * 1024 * 1024
    install_json_errors(app)
    install_request_guards(app)

    def pick(values: dict[str, Any]) -> LocalClient:
        k = values.pop("k")
        if not 1 <= k <= len(clients):
            raise NotFound(f"no client {k} on this host (it has 1..{len(clients)})")
        return clients[k - 1]

    app.register_blueprint(client_blueprint(pick, token, url_prefix="/clients/<int:k>"))

    @app.get("/health")
    def health():
        return {"status": "ok", "clients": len(clients), "scenario": description,
                "data_size": sum(len(c.y) for c in clients)}

    @app.get("/openapi.json")
    def openapi():
        return host_document(len(clients))

    @app.get("/clients")
    def urls():
        """The path of every client here, for the server's client list."""
        return {"clients": [f"/clients/{k}" for k in range(1, len(clients) + 1)]}

    return app
