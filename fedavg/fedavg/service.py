"""What every Raw FedAvg service shares: strict JSON bodies, JSON errors, the
command line (--host/--port) and serving."""
from __future__ import annotations

import argparse
import hmac
import logging
import os
import signal
import sys
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import HTTPException, Unauthorized

from .wire import ProtocolError, loads

log = logging.getLogger("fedavg")


def json_body(if_empty: Any = None) -> Any:
    """The request body parsed strictly as JSON; ``if_empty`` when there is
    none (the seed's ``curl -X POST .../start`` sends no body and no content
    type). A body of ``null`` is not empty: it is a value, and wrong."""
    data = request.get_data(cache=True)
    if not data.strip():
        return if_empty
    return loads(data)


def shared_token() -> str | None:
    """The optional shared secret, FEDAVG_TOKEN: when set, the server sends it
    to the clients and both refuse work without it."""
    return os.environ.get("FEDAVG_TOKEN") or None


def require_token(token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>``
    (compared in constant time, so the answer's timing leaks nothing).
    Nothing is required when no token is configured."""
    if token is None:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token (set FEDAVG_TOKEN to the shared token)")


def install_json_errors(app: Flask) -> None:
    """Every error leaves as {"error": "..."} with its status; never a traceback."""

    @app.errorhandler(ProtocolError)
    def bad_input(e: ProtocolError):
        return {"error": str(e)}, 400

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        # Keep what the exception adds (a 405's Allow), in a JSON body of ours.
        headers = [(k, v) for k, v in e.get_headers() if k.lower() != "content-type"]
        if e.code == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        return {"error": f"{e.name}: {e.description}"}, e.code or 500, headers

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        # The traceback goes to this app's log, where the operator looks; the
        # caller only learns that it was our fault, not how the code looks.
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return {"error": "internal server error (details in the server log)"}, 500


def configure_logging() -> None:
    """Plain lines on stdout: the log *is* the product (the FedAvg math)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    # Werkzeug's one line per request would drown the math; errors still show.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def cli(description: str, default_port: int) -> argparse.ArgumentParser:
    """The arguments every app takes; each app adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    return parser


WSGI_SERVERS = ("waitress", "werkzeug")


def serve(app: Flask, host: str, port: int, threads: int = 8, announce: str | None = None) -> None:
    """Listen, then print ``announce`` (the app's "serving on …" line), then
    serve until interrupted, with the WSGI server FEDAVG_WSGI names. A port
    that is taken stops the app with one error line and no announcement.

    waitress (the default) keeps HTTP/1.1 connections alive, so the server's
    pooled connections are reused round after round; Werkzeug's development
    server closes every connection after one request. bench/results.json has
    the figures that decided it. ``threads`` bounds concurrent requests; a
    waited /start holds one for its whole run.
    """
    # SIGTERM (kill, a process manager) stops the app as Ctrl-C does, so
    # that it can end cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    kind = os.environ.get("FEDAVG_WSGI", "waitress")
    if kind not in WSGI_SERVERS:
        print(f"error: FEDAVG_WSGI must be one of {', '.join(WSGI_SERVERS)}, got {kind!r}", file=sys.stderr)
        sys.exit(2)
    try:
        if kind == "werkzeug":
            from werkzeug.serving import make_server
            server = make_server(host, port, app, threaded=True)  # binds here
            _announce(announce)
            server.serve_forever()
        else:
            import waitress
            # connection_limit: a server fanning out to a thousand clients, or
            # a host serving them, holds that many keep-alive connections.
            server = waitress.create_server(app, host=host, port=port, threads=threads, connection_limit=4096,
                                            ident="raw-fedavg")  # binds here
            _announce(announce)
            server.run()
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)


def _announce(text: str | None) -> None:
    if text:
        print(text, flush=True)
