"""A client's secure aggregation endpoints: the five steps of
``fedavg.secure_client`` at /secagg/*, each behind the token and each
given up (408) once the server no longer waits for it."""
from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, g, request

from .. import secure_client
from .service import json_body, require_token


def add_secure_routes(bp: Blueprint, token: str | None, deadline_s: Callable[[], float | None]) -> None:
    """The five /secagg/* endpoints on the client blueprint (``g.client`` is the LocalClient)."""

    def deadline() -> secure_client.Deadline:
        """X-Deadline-S from now, and whether the server has hung up: waitress
        tells (``serve`` has it read ahead on each connection), so a call the
        server gave up on while it waited in a busy host's queue is not worked
        on at all. Other servers (Werkzeug's, the tests' in-process calls) leave
        only the deadline."""
        return secure_client.Deadline(deadline_s(), request.environ.get("waitress.client_disconnected"))

    @bp.post("/secagg/advertise")
    def advertise():
        require_token(token)
        return secure_client.advertise(g.client, json_body(), deadline())

    @bp.post("/secagg/share")
    def share():
        require_token(token)
        return secure_client.share(g.client, json_body(), deadline())

    @bp.post("/secagg/receive")
    def receive():
        require_token(token)
        return secure_client.receive(g.client, json_body(), deadline())

    @bp.post("/secagg/masked")
    def masked():
        require_token(token)
        return secure_client.masked(g.client, json_body(), deadline())

    @bp.post("/secagg/unmask")
    def unmask():
        require_token(token)
        return secure_client.unmask(g.client, json_body(), deadline())
