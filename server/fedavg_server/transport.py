"""How the server reaches its clients: what a transport is, and what a call gives.

A ``Transport`` calls one path on many clients at once and turns every
answer, or the lack of one, into a ``Reply``. The federation sees nothing
else of the network. Two transports implement it:

- ``HttpTransport`` (``http_transport``): real HTTP, what the apps run on;
- ``InProcessTransport`` (``inprocess``): the clients' own Flask apps in this
  process, called with the same bodies and headers, minus the sockets: for
  the math's tests and the labs (``make compare``, ``make privacy``).

Both build requests with ``request_body`` and read answers with ``reply_from``,
so a client's answer means the same whichever carried it.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedavg.strict_json import ProtocolError, loads, printable

# No reply of the protocol needs more: a model of MAX_FEATURES weights is about
# 250 KB of JSON. Counted while reading, so a flood is cut off before it is
# parsed (64 MiB of floats took the server to 800 MB). Exact's Σ x̃x̃ᵀ grows as
# d²: it fits up to about 180 features.
MAX_REPLY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Reply:
    """What one client call gave: a parsed JSON body, or the reason it failed."""

    url: str
    body: dict[str, Any] | None = None
    status: int | None = None
    reason: str | None = None
    diverged: bool = False  # the client said its local training blew up

    @property
    def ok(self) -> bool:
        return self.reason is None


class Transport(Protocol):
    """The configured clients, and the calls that reach them."""

    urls: list[str]  # every configured client, in configuration order
    names: dict[str, str]  # url → the name it last gave (its URL until it said one), kept across runs
    headers: dict[str, str]  # sent with every call (the shared token's Authorization)
    stopping: threading.Event  # set when the server stops: waits end at once

    def call_all(self, urls: Sequence[str], method: str, path: str, timeout_s: float,
                 body_for: Callable[[str], Any] | None = None, max_bytes: int = MAX_REPLY_BYTES) -> list[Reply]:
        """``path`` on every URL; replies in ``urls``' order, none later than
        the timeout, none over ``max_bytes`` (a batched call's reply may be
        longer than one client's). A URL need not be a configured client's:
        a host's batched /train is called at its own."""

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None) -> Reply:
        """``path`` on one URL."""

    def close(self) -> None:
        """Stop: calls still out are given up on."""


def request_body(headers: dict[str, str], timeout_s: float, body: Any) -> tuple[dict[str, str], bytes | None]:
    """The headers and bytes of a call: the transport's headers, X-Deadline-S
    (the client may stop working on a call the server has stopped waiting
    for) and the body as JSON."""
    headers = {**headers, "X-Deadline-S": f"{timeout_s:g}"}
    if body is None:
        return headers, None
    return headers | {"Content-Type": "application/json"}, json.dumps(body).encode()


def no_reply_within(timeout_s: float) -> str:
    """Why a call that did not answer within its deadline was given up on."""
    return f"no reply within {timeout_s:g} s"


# What a drop's reason says when the client timed out: the server gave up
# waiting (``no_reply_within``), never reached it within the wave
# (``HttpTransport._not_called``), or the client stopped at its deadline and
# said so (408). Matched anywhere: a batched host's or a secure step's drops
# quote the call's reason after their own prefix.
TIMEOUT_MARKS = ("no reply within ", "not called within ", "HTTP 408")


def is_timeout(reason: str) -> bool:
    """Whether a drop's reason is a timeout (``TIMEOUT_MARKS``)."""
    return any(mark in reason for mark in TIMEOUT_MARKS)


def reply_from(url: str, status: int, content: bytes, max_bytes: int = MAX_REPLY_BYTES) -> Reply:
    """A client's answer as a Reply: its JSON object, or why it cannot be used
    (an error status with what the client said, a body that is not JSON)."""
    if len(content) > max_bytes:
        return Reply(url, reason=f"bad reply: reply larger than {max_bytes} bytes")
    ok = 200 <= status < 300
    try:
        body = loads(content)
    except ProtocolError as e:
        body = None
        if ok:
            return Reply(url, status=status, reason=f"bad reply: {e}")
    if not ok:
        said = body.get("error") if isinstance(body, dict) else None
        said = printable(said) if isinstance(said, str) else said  # a client's text: one line of the log
        return Reply(url, status=status, reason=f"HTTP {status}" + (f": {said}" if said else ""),
                     diverged=isinstance(body, dict) and body.get("diverged") is True)
    if not isinstance(body, dict):
        return Reply(url, status=status, reason="bad reply: not a JSON object")
    return Reply(url, body=body, status=status)
