"""The in-process transport: clients that are Flask apps in this process.

Each call goes through the client app's own handlers (Werkzeug's test
client) with the bytes and headers HTTP would carry, and its answer is read
as HTTP's is (``transport.reply_from``): the same parsing, checks and
replies on both sides, minus sockets, threads and JSON over the wire. A
federation driven this way runs its rounds in a fraction of a millisecond
per client; the math's tests and the labs use it. What only a network can
do (a client that hangs, trickles or dies mid-call) needs ``HttpTransport``.
"""
from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask

from fedavg.batch_wire import POPULATION_PATH
from fedavg.client import LocalClient
from fedavg.http.host_app import create_host_app

from .hosted import ClientURLs, HostedPopulation, names_for, parse_population, population_reply_limit
from .transport import MAX_REPLY_BYTES, Reply, reply_from, request_body


def _origin(url: str) -> str:
    where = urlsplit(url)
    return f"{where.scheme}://{where.netloc}"


class InProcessTransport:
    """url → the client app that answers it; a client host's app answers
    every URL under its /clients/<k> (``hosted``)."""

    def __init__(self, apps: Mapping[str, Flask], urls: ClientURLs | None = None) -> None:
        self.urls = urls if urls is not None else [url.rstrip("/") for url in apps]
        self.names = names_for(self.urls)
        self.headers: dict[str, str] = {}
        self.stopping = threading.Event()
        self._routes = {url.rstrip("/"): (app, urlsplit(url)) for url, app in apps.items()}
        # An origin all of whose URLs one app answers (a client host): any path of it goes to that app.
        by_origin: dict[str, set[int]] = {}
        for url, app in apps.items():
            by_origin.setdefault(_origin(url), set()).add(id(app))
        self._origins = {_origin(url): app for url, app in apps.items() if len(by_origin[_origin(url)]) == 1}

    @classmethod
    def hosted(cls, app: Flask, count: int, base: str = "http://localhost") -> InProcessTransport:
        """The ``count`` clients of one client host app, as base/clients/1 … base/clients/K."""
        return cls({f"{base}/clients/{k}": app for k in range(1, count + 1)})

    @classmethod
    def populations(cls, hosts: Mapping[str, Flask], clients: Sequence[str] = (),
                    apps: Mapping[str, Flask] | None = None) -> InProcessTransport:
        """Hosts of populations reached by index (``hosted``): each host app at
        its base URL, described by its own GET /population as the server's
        --clients-from reads it; ``clients`` (with their ``apps``) before them."""
        parts: list[str | HostedPopulation] = list(clients)
        for base, app in hosts.items():
            # (its size is not known before it answers: as much as the host's request limit allows of n_k)
            reply = cls({base: app}).call(base, "GET", POPULATION_PATH, 5.0, max_bytes=population_reply_limit(10 ** 7))
            parts.append(parse_population(base, reply.body))
        return cls({**(apps or {}), **hosts}, ClientURLs(parts))

    def call_all(self, urls: Sequence[str], method: str, path: str, timeout_s: float,
                 body_for: Callable[[str], Any] | None = None, max_bytes: int = MAX_REPLY_BYTES) -> list[Reply]:
        """One call after another: each is a function call, and threads would
        only add their cost. As over HTTP, each call's deadline counts from
        when it is sent: each is told the whole ``timeout_s`` (X-Deadline-S),
        however long the calls before it took. A stopping server asks nobody
        more."""
        # (max_bytes only when asked: a test's transport may wrap ``call`` with its first five arguments)
        limit = {} if max_bytes == MAX_REPLY_BYTES else {"max_bytes": max_bytes}
        return [self.call(url, method, path, timeout_s, None if body_for is None else body_for(url), **limit)
                if not self.stopping.is_set() else Reply(url, reason="cancelled: the server is stopping")
                for url in urls]

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None,
             max_bytes: int = MAX_REPLY_BYTES) -> Reply:
        route = self._routes.get(url)
        if route is None and _origin(url) in self._origins:  # a host's own path (its batched /train)
            route = (self._origins[_origin(url)], urlsplit(url))
        if route is None:
            return Reply(url, reason=f"cannot connect: no client app at {url} in this process")
        app, where = route
        headers, data = request_body(self.headers, timeout_s, body)
        data = data or b""
        environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": where.path.rstrip("/") + path,
                   "QUERY_STRING": "", "SERVER_NAME": where.hostname or "localhost",
                   "SERVER_PORT": str(where.port or 80), "SERVER_PROTOCOL": "HTTP/1.1",
                   "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": where.netloc, "wsgi.version": (1, 0),
                   "wsgi.url_scheme": where.scheme, "wsgi.input": io.BytesIO(data), "wsgi.errors": sys.stderr,
                   "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
                   "CONTENT_LENGTH": str(len(data))}
        for name, value in headers.items():
            key = name.upper().replace("-", "_")
            environ[key if key == "CONTENT_TYPE" else f"HTTP_{key}"] = value
        status = []
        chunks = app(environ, lambda code, _headers, _exc=None: status.append(int(code.split()[0])))
        try:
            content = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        return reply_from(url, status[0], content, max_bytes)

    def close(self) -> None:
        self.stopping.set()


def federation_app(clients: Sequence[LocalClient], db: str | Path, token: str | None = None,
                   **config: Any) -> Flask:
    """The server app over ``clients``, served by one client host app in this
    process (``fedavg.client_host``): a whole federation without a socket.
    ``config`` is the server's (``fedavg_server.create_app``)."""
    from . import create_app  # (the package imports this module's neighbours first)
    host = create_host_app(clients, token)
    return create_app({"TRANSPORT": InProcessTransport.hosted(host, len(clients)), "DB": str(db), "TOKEN": token,
                       **config})
