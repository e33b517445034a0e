"""A client's secure aggregation endpoints: the four steps of
``fedavg.secure_client`` at /secagg/*, each behind the token."""
from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, g

from .. import secure_client
from .service import json_body, require_token


def add_secure_routes(bp: Blueprint, token: str | None, deadline_s: Callable[[], float | None]) -> None:
    """The four /secagg/* endpoints on the client blueprint (``g.client`` is the LocalClient)."""

    @bp.post("/secagg/advertise")
    def advertise():
        require_token(token)
        return secure_client.advertise(g.client, json_body(), deadline_s)

    @bp.post("/secagg/share")
    def share():
        require_token(token)
        return secure_client.share(g.client, json_body())

    @bp.post("/secagg/masked")
    def masked():
        require_token(token)
        return secure_client.masked(g.client, json_body())

    @bp.post("/secagg/unmask")
    def unmask():
        require_token(token)
        return secure_client.unmask(g.client, json_body())
