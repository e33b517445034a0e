"""A client host: one process serving many independent clients, client k at
``/clients/<k>`` with the same /train, /evaluate, /health beneath — the very
blueprint a single client serves, each with its own private data."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import NotFound

from ..client import LocalClient
from ..openapi import host_document
from ..theory import pooled_optimum
from .client_app import client_blueprint
from .service import (
    has_token,
    install_json_errors,
    install_request_guards,
    peer_allowed,
    peer_names,
    require_peer,
    require_token,
)


def create_host_app(clients: Sequence[LocalClient], token: str | None = None,
                    description: str = "", server_name: str | None = None, owner_name: str | None = None) -> Flask:
    """Serve ``clients`` as /clients/1 … /clients/K. With a ``token``, what
    the clients' data gives away (the pooled line of every row, a CSV's
    path in ``description``) is only for requests that carry it. With
    ``server_name`` (served over TLS), each client's /train, /evaluate and
    /secagg/* answer only the caller whose certificate names it; with
    ``owner_name``, each client's page only the certificate naming that
    (the host's own: its owner's)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 4 * 1024 * 1024
    install_json_errors(app)
    install_request_guards(app)

    def pick(values: dict[str, Any]) -> LocalClient:
        k = values.pop("k")
        if not 1 <= k <= len(clients):
            raise NotFound(f"no client {k} on this host (it has 1..{len(clients)})")
        return clients[k - 1]

    app.register_blueprint(client_blueprint(pick, token, url_prefix="/clients/<int:k>", server_name=server_name,
                                            owner_name=owner_name))
    # θ* of every client's rows at once: what only a simulation knows (the chart draws one feature).
    pooled = None
    if clients[0].num_features == 1:
        w, b = pooled_optimum([(c.X, c.y) for c in clients])
        pooled = {"w": float(w), "b": float(b)}

    @app.get("/health")
    def health():
        """Liveness for anyone; the scenario (with --scenario csv, the file's
        absolute path) and the rows in all, without a token or with it, and
        over TLS to the server only (as /scenario)."""
        alive = {"status": "ok", "clients": len(clients)}
        if token is not None and not has_token(token):
            return alive
        if server_name is not None and not peer_allowed(peer_names(request.environ), server_name):
            return alive
        return {**alive, "scenario": description, "data_size": sum(len(c.y) for c in clients)}

    @app.get("/openapi.json")
    def openapi():
        return host_document(len(clients))

    @app.get("/scenario")
    def scenario():
        """What only a simulation can say: the least-squares line of all its
        clients' rows pooled (one feature only). The server's page may draw
        it, labelled as outside knowledge; no run ever reads it. With a
        token, only for who has it: the line of a user's CSV is a fact of
        its rows; over TLS, only for the server, as the clients' /evaluate."""
        require_peer(server_name)
        require_token(token)
        return {"scenario": description, "simulated": True, "clients": len(clients), "pooled_line": pooled}

    @app.get("/clients")
    def urls():
        """The path of every client here, for the server's client list."""
        return {"clients": [f"/clients/{k}" for k in range(1, len(clients) + 1)]}

    return app
