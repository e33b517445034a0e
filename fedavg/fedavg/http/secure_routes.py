"""A client's secure aggregation endpoints: the five steps of
``fedavg.secure_client`` at /secagg/*, each behind the token (and over
TLS, for the server's certificate only) and each given up (408) once the
server no longer waits for it."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, g, request

from .. import secure_client
from .service import hung_up, json_body, require_peer, require_token


def add_secure_routes(bp: Blueprint, token: str | None, deadline_s: Callable[[], float | None],
                      server_name: str | None = None) -> None:
    """The five /secagg/* endpoints on the client blueprint (``g.client`` is
    the LocalClient); with ``server_name`` (TLS), only for the peer whose
    certificate names it (``require_peer``)."""

    def deadline() -> secure_client.Deadline:
        """X-Deadline-S from now, and whether the server has hung up: waitress
        tells (``serve`` has it read ahead on each connection), and so does
        the TLS server (``tls.Gateway``), so a call the server gave up on
        while it waited in a busy host's queue is not worked on at all. Other
        servers (Werkzeug's, the tests' in-process calls) leave only the
        deadline."""
        return secure_client.Deadline(deadline_s(), hung_up(request.environ))

    def route(step: Callable[[Any, Any, secure_client.Deadline], tuple[dict[str, Any], int]]) -> Callable[[], Any]:
        def answer() -> tuple[dict[str, Any], int]:
            require_peer(server_name)
            require_token(token)
            return step(g.client, json_body(), deadline())
        return answer

    for step in STEPS:
        bp.add_url_rule(f"/secagg/{step.__name__}", f"secagg_{step.__name__}", route(step), methods=["POST"])


# The protocol's steps, in order; each is served at /secagg/<its name>.
STEPS = (secure_client.advertise, secure_client.share, secure_client.receive, secure_client.masked,
         secure_client.unmask)
