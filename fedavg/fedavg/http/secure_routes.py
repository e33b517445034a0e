"""A client's secure aggregation endpoints: the five steps of
``fedavg.secure_client`` at /secagg/*, each behind the token (and over
TLS, for the server's certificate only) and each given up (408) once the
server no longer waits for it."""
from __future__ import annotations

from collections.abc import Callable

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

    @bp.post("/secagg/advertise")
    def advertise():
        require_peer(server_name)
        require_token(token)
        return secure_client.advertise(g.client, json_body(), deadline())

    @bp.post("/secagg/share")
    def share():
        require_peer(server_name)
        require_token(token)
        return secure_client.share(g.client, json_body(), deadline())

    @bp.post("/secagg/receive")
    def receive():
        require_peer(server_name)
        require_token(token)
        return secure_client.receive(g.client, json_body(), deadline())

    @bp.post("/secagg/masked")
    def masked():
        require_peer(server_name)
        require_token(token)
        return secure_client.masked(g.client, json_body(), deadline())

    @bp.post("/secagg/unmask")
    def unmask():
        require_peer(server_name)
        require_token(token)
        return secure_client.unmask(g.client, json_body(), deadline())
