"""A client's HTTP face: its endpoints (``client_blueprint``), the app that
serves one client (``create_app``, what client_1/ and client_2/ run) and
its command line (``main``). A client host serves many clients through the
same blueprint (``host_app``); what a client does is ``fedavg.client``'s.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, g, render_template, request
from werkzeug.exceptions import Forbidden

from .. import tls_files
from ..client import LocalClient
from ..data import TARGET, add_target, load_csv
from ..openapi import client_document
from ..strict_json import ProtocolError
from .client_page import page_context
from .secure_routes import add_secure_routes
from .service import (
    add_server_name,
    base_url,
    checked_token,
    cli,
    configure_logging,
    has_token,
    install_json_errors,
    install_request_guards,
    json_body,
    require_peer,
    require_token,
    serve,
    shared_token,
    tls_from_args,
)


def requested_deadline_s() -> float | None:
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


def client_blueprint(pick: Callable[[dict[str, Any]], LocalClient], token: str | None,
                     url_prefix: str | None = None, server_name: str | None = None,
                     owner_name: str | None = None,
                     health_extra: Callable[[], dict[str, Any]] | None = None) -> Blueprint:
    """The client endpoints. ``pick`` turns the URL's values (``k`` for a
    client host's /clients/<k>) into the client that answers. With
    ``server_name`` (served over TLS), /train, /evaluate and /secagg/*
    answer only the caller whose verified certificate names it (403 for
    anyone else, before the token is looked at), and the page only the
    caller whose certificate names ``owner_name`` (the CN of the app's own
    certificate: its owner; not the server, not another client); the rest
    any verified caller may read. ``health_extra``: what /health adds to
    the client's own facts (a client host's: where it batches)."""
    bp = Blueprint("client", __name__, url_prefix=url_prefix, template_folder="templates")

    @bp.url_value_preprocessor
    def choose_client(endpoint: str | None, values: dict[str, Any] | None) -> None:
        g.client = pick(values if values is not None else {})

    @bp.get("/health")
    def health():
        return g.client.health() if health_extra is None else {**g.client.health(), **health_extra()}

    @bp.get("/openapi.json")
    def openapi():
        return client_document(g.client.num_features)

    @bp.get("/")
    def page():
        """This client's own page: its private points, its local least-squares
        line and the last global model it received. Served only here; the
        server never sees it (it is not part of the wire protocol). With a
        token set, only for who knows it: the browser asks for it as a
        password (any user name). Over TLS, only for its owner's certificate
        first: every client holds the token."""
        if server_name is not None and owner_name is None:  # over TLS, and its own certificate names no one
            raise Forbidden("this page shows the client's private data, and over TLS opens only to its own "
                            "certificate's name: this app's --tls-cert has no CN and no DNS name")
        require_peer(owner_name, "this client's owner", "the CN of this app's own --tls-cert, else its first "
                     "DNS name")
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
        require_peer(server_name)
        require_token(token)
        response = g.client.train(json_body(), requested_deadline_s())
        return (*response, {"Retry-After": "1"}) if response[1] == 429 else response

    @bp.post("/evaluate")
    def evaluate():
        require_peer(server_name)
        require_token(token)
        return g.client.evaluate(json_body())

    add_secure_routes(bp, token, requested_deadline_s, server_name)
    return bp


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build a client app. Config: CLIENT_ID, DATA_PATH (the private CSV),
    TARGET (the name of its column to predict; default ``data.TARGET``, y),
    TOKEN (shared bearer token required on /train and /evaluate; default
    FEDAVG_TOKEN as written, None or "" = open), SERVER_PEER (served over
    TLS: the name the server's certificate carries, the only caller of
    /train, /evaluate and /secagg/*; default None, no TLS), OWNER_PEER
    (served over TLS: the name the page opens to, the CN of its own
    certificate; default None).

    Raises DataError when the data file cannot be used, before anything
    serves, and ValueError for a token that cannot work (``checked_token``).
    """
    app = Flask(__name__)
    app.config.from_mapping(CLIENT_ID="client", DATA_PATH="data.csv", TARGET=TARGET,
                            MAX_CONTENT_LENGTH=4 * 1024 * 1024, SERVER_PEER=None, OWNER_PEER=None)
    if config is not None:
        app.config.from_mapping(config)
    # The environment only when no token is given (a test gives its own, or None).
    app.config["TOKEN"] = checked_token(app.config["TOKEN"]) if "TOKEN" in app.config else shared_token()
    # Loaded once at start: a bad file stops the client now, not mid-run.
    X, y = load_csv(app.config["DATA_PATH"], app.config["TARGET"])
    client = LocalClient(app.config["CLIENT_ID"], X, y)
    app.config.update(DATA_SIZE=len(y), NUM_FEATURES=client.num_features)
    install_json_errors(app)
    install_request_guards(app)
    app.register_blueprint(client_blueprint(lambda values: client, app.config["TOKEN"],
                                            server_name=app.config["SERVER_PEER"],
                                            owner_name=app.config["OWNER_PEER"]))
    return app


def main(client_id: str, port: int, data_path: Path) -> None:
    """The entry every client_K_app.py calls: parse the command line, load the
    data (exit 2 with one line if it is bad), serve."""
    parser = cli(f"Raw FedAvg client {client_id}", port)
    parser.add_argument("--data", type=Path, default=data_path, help=f"private CSV (default {data_path})")
    add_target(parser)
    parser.add_argument("--client-id", default=client_id, help=f"name sent to the server (default {client_id})")
    add_server_name(parser)
    args = parser.parse_args()
    tls = tls_from_args(args)
    configure_logging()
    try:
        app = create_app({"CLIENT_ID": args.client_id, "DATA_PATH": str(args.data), "TARGET": args.target,
                          "SERVER_PEER": args.server_name if tls else None,
                          "OWNER_PEER": tls_files.own_name(tls.cert) if tls else None})
    except ValueError as e:  # a bad data file (DataError), a token that cannot work
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Over TLS only the server's certificate gets an answer from /train and /evaluate.
    risk = "" if app.config["TOKEN"] or tls else (
        f"\n{args.client_id}: no FEDAVG_TOKEN: anyone who can reach this port can call /train and /evaluate, "
        "and the losses of a few chosen models give small data back exactly; set the same FEDAVG_TOKEN "
        "here and on the server to answer only it")
    served = f"; answering only a caller whose certificate names {args.server_name!r}" if tls else ""
    serve(app, args.host, args.port, allowed_hosts=args.allowed_host, tls=tls,
          announce=f"{args.client_id}: {app.config['DATA_SIZE']} private samples from {args.data}; "
                   f"serving on {base_url(args.host, args.port, tls)}{served}{risk}")
