"""What every Raw FedAvg service shares: strict JSON bodies, JSON errors, the
command line (--host/--port, --tls-*) and serving: waitress over plain HTTP,
cheroot over mutual TLS (``tls.py``)."""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import re
import resource
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import Forbidden, HTTPException, Unauthorized, UnsupportedMediaType

from .. import tls_files
from ..strict_json import ProtocolError, loads
from ..tls_files import TLSFiles

log = logging.getLogger("fedavg")


def json_body(if_empty: Any = None) -> Any:
    """The request body parsed strictly as JSON; ``if_empty`` when there is
    none (the seed's ``curl -X POST .../start`` sends no body and no content
    type). A body of ``null`` is not empty: it is a value, and wrong."""
    data = request.get_data(cache=True)
    if not data.strip():
        return if_empty
    if request.mimetype != "application/json":
        # A web page can send text/plain or a form to any address without the
        # browser asking first; only JSON needs the server's consent (CORS).
        raise UnsupportedMediaType(f"the body must be JSON, sent as Content-Type: application/json "
                                   f"(got {request.mimetype or 'none'})")
    return loads(data)


def shared_token() -> str | None:
    """The optional shared secret, FEDAVG_TOKEN, exactly as written: when set,
    the server sends it to the clients and both refuse work without it.
    Unset or empty: no token. Raises ValueError for one that cannot work
    (``checked_token``)."""
    return checked_token(os.environ.get("FEDAVG_TOKEN"))


def checked_token(token: str | None) -> str | None:
    """A token as given, or None for none ("" is none). It travels as
    written in ``Authorization: Bearer <token>``, so it must be printable
    ASCII: a header cannot carry other characters unchanged, and HTTP strips
    spaces at either end, after which it could never match. The error never
    shows the token (it is a secret)."""
    if not token:
        return None
    for i, ch in enumerate(token):
        if not " " <= ch <= "~":
            raise ValueError(f"FEDAVG_TOKEN: character {i + 1} of {len(token)} is not printable ASCII "
                             f"(U+{ord(ch):04X}); a token travels in an HTTP header, as written")
    if token != token.strip(" "):
        raise ValueError("FEDAVG_TOKEN: starts or ends with a space, which HTTP strips on the way: no request "
                         "could ever carry it; remove the space")
    return token


def has_token(token: str, page: bool = False) -> bool:
    """Does the request carry ``Authorization: Bearer <token>``? Compared in
    constant time, so the answer's timing leaks nothing. With ``page``, a
    browser's Basic login with the token as its password counts too (a
    browser cannot send a bearer token to a page, but asks for a password)."""
    auth = request.authorization
    if page and auth is not None and auth.type == "basic":
        return hmac.compare_digest((auth.password or "").encode(), token.encode())
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def require_token(token: str | None) -> None:
    """401 unless the request carries the token; nothing is required when no
    token is configured."""
    if token is not None and not has_token(token):
        raise Unauthorized("missing or wrong bearer token (set FEDAVG_TOKEN to the shared token)")


def peer_names(environ: Mapping[str, Any]) -> list[str]:
    """The names in the caller's verified certificate, as the TLS server put
    them in the environ: its subject's CN(s), then its DNS SANs. Empty when
    no certificate was verified (plain HTTP, the tests' in-process calls).
    Header values cannot forge these: they arrive as HTTP_* keys."""
    if environ.get("SSL_CLIENT_VERIFY") != "SUCCESS":
        return []
    # One CN is SSL_CLIENT_S_DN_CN; several are also _0, _1 … (and joined
    # with commas in the first, which a name may contain itself).
    names = _numbered(environ, "SSL_CLIENT_S_DN_CN_")
    if not names and environ.get("SSL_CLIENT_S_DN_CN"):
        names = [environ["SSL_CLIENT_S_DN_CN"]]
    return names + _numbered(environ, "SSL_CLIENT_SAN_DNS_")


def _numbered(environ: Mapping[str, Any], prefix: str) -> list[str]:
    values, i = [], 0
    while f"{prefix}{i}" in environ:
        values.append(str(environ[f"{prefix}{i}"]))
        i += 1
    return values


def peer_allowed(names: Iterable[str], expected: str) -> bool:
    """Is the caller the party named ``expected``: does one of its verified
    certificate's names (``peer_names``) equal it exactly?"""
    return any(name == expected for name in names)


def require_peer(expected: str | None, whom: str = "the server", how: str = "--server-name") -> None:
    """403 unless the caller's verified certificate names ``expected`` (a
    client's --server-name): over mutual TLS only the server may make a
    client train, evaluate or take part in a secure sum; any other holder of
    a certificate from the same CA (another client) is refused. ``whom``
    and ``how`` say who that is and where the name comes from (a client's
    page: its owner, the CN of its own certificate). ``None``: no TLS,
    nothing to check."""
    if expected is None:
        return
    names = peer_names(request.environ)
    if peer_allowed(names, expected):
        return
    names = list(dict.fromkeys(names))  # a CN is usually a DNS name as well: once
    shown = ", ".join(repr(n[:100]) for n in names[:5]) + (" …" if len(names) > 5 else "")
    who = f"your certificate names {shown}" if names else "no verified certificate came with this request"
    raise Forbidden(f"{request.path} answers only {whom}: {who}; {whom}'s certificate must name "
                    f"{expected!r} (CN or DNS name; {how})")


def install_request_guards(app: Flask) -> None:
    """Refuse what a hostile web page could make a user's browser send:

    - a Host that is neither an IP address, localhost, nor a name given with
      --allowed-host (DNS rebinding points an attacker's name at 127.0.0.1;
      the browser then sends that name as Host);
    - an Origin other than this app's own (a page elsewhere posting here; the
      browser sends Origin with every cross-site POST, curl never does).
    Together with JSON-only bodies (``json_body``) this stops cross-site
    requests: the page's own fetch passes, curl and the server's calls pass."""

    @app.before_request
    def guard() -> None:
        name = _host_name(request.host)
        if not _known_host(name, app.config.get("ALLOWED_HOSTS", ())):
            raise Forbidden(f"unknown Host {name[:100]!r}: this app answers to its IP addresses, localhost "
                            "and the names given with --allowed-host")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise Forbidden(f"cross-site request from {origin[:100]!r} refused: only this app's own page "
                            f"({request.scheme}://{request.host}) may send requests from a browser")


def _host_name(host: str) -> str:
    """The name in a Host header: 'a:5000' → 'a', '[::1]:5000' → '::1'."""
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _known_host(name: str, allowed: Sequence[str]) -> bool:
    if name.lower() in ("localhost", *(h.lower() for h in allowed)):
        return True
    try:
        ipaddress.ip_address(name)  # an address is not a name an attacker's DNS can re-point
        return True
    except ValueError:
        return False


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
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a host name this app answers to besides its IP addresses and localhost "
                             "(repeatable); any other Host header is refused (DNS rebinding)")
    tls = parser.add_argument_group(
        "mutual TLS", "all three or none; with them the app serves HTTPS only, to callers whose certificate "
                      "chains to the CA")
    tls.add_argument("--tls-cert", metavar="FILE",
                     help="this app's PEM certificate, presented when it serves and when it calls "
                          "(default: env FEDAVG_TLS_CERT)")
    tls.add_argument("--tls-key", metavar="FILE",
                     help="that certificate's PEM private key, unencrypted (default: env FEDAVG_TLS_KEY)")
    tls.add_argument("--tls-ca", metavar="FILE",
                     help="the PEM CA certificate every peer's certificate must chain to (default: env "
                          "FEDAVG_TLS_CA)")
    return parser


def add_server_name(parser: argparse.ArgumentParser) -> None:
    """--server-name, for the apps that answer the server (clients, client hosts)."""
    parser.add_argument("--server-name", default=os.environ.get("FEDAVG_SERVER_NAME") or "server", metavar="NAME",
                        help="with TLS: answer /train, /evaluate and /secagg/* only to a caller whose certificate "
                             "names NAME as CN or DNS name (default: env FEDAVG_SERVER_NAME, else server)")


def tls_from_args(args: argparse.Namespace) -> TLSFiles | None:
    """The app's TLS files from --tls-* or FEDAVG_TLS_*, checked (all three
    readable, the key the certificate's); None for none. Anything wrong
    stops the app: one line naming the flag or file, exit 2."""
    try:
        files = tls_files.from_env_or_args(args.tls_cert, args.tls_key, args.tls_ca)
        if files is not None:
            tls_files.check(files)
        return files
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def base_url(host: str, port: int, tls: TLSFiles | None) -> str:
    """The app's own address, as announced: https:// when it serves TLS."""
    return f"{'https' if tls else 'http'}://{host}:{port}"


# The environ key of the TLS server's hang-up check (``tls.Gateway``).
HUNG_UP = "fedavg.client_disconnected"


def hung_up(environ: Mapping[str, Any]) -> Callable[[], bool] | None:
    """The WSGI server's callable telling whether the caller has hung up
    (waitress's, or over TLS ``tls.Gateway``'s), or None (Werkzeug's
    server, the tests' in-process calls)."""
    return environ.get("waitress.client_disconnected") or environ.get(HUNG_UP)


WSGI_SERVERS = ("waitress", "werkzeug")
# Connections waitress keeps open at most: a server fanning out to a thousand
# clients, or a host serving them, holds that many keep-alive connections.
MAX_CONNECTIONS = 4096
# Descriptors an app needs besides its connections (about 20 measured: SQLite's
# three files, matplotlib's fonts, pipes, a module being imported), with room.
OWN_FILES = 64
# Fewer connections than this and an app cannot serve a page and a run at once.
MIN_CONNECTIONS = 16


def connection_limit(outgoing: int = 0) -> int:
    """How many connections an app may hold open, C = min(4096, F − 64 −
    ``outgoing``): F is this process's limit on open files (RLIMIT_NOFILE),
    first raised toward its hard limit as far as C = 4096 needs; 64 are left
    for the app's own files, and ``outgoing`` for its calls out (the
    server's connections to its clients). At C waitress stops accepting (new
    connections wait in the kernel's queue) rather than take the last
    descriptor: accept() would fail in a loop, and the app could then open
    neither a file nor a connection to a client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + OWN_FILES + outgoing
    if soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):  # not allowed here: make do with the soft limit
            pass
    return min(MAX_CONNECTIONS, soft - OWN_FILES - outgoing)


def serve(app: Flask, host: str, port: int, threads: int = 8, announce: str | None = None,
          allowed_hosts: Sequence[str] = (), outgoing: int = 0, tls: TLSFiles | None = None,
          callers_need_certificate: bool = True) -> None:
    """Listen, then print ``announce`` (the app's "serving on …" line), then
    serve until interrupted, with the WSGI server FEDAVG_WSGI names; with
    ``tls``, HTTPS only, over mutual TLS, with cheroot (``tls.py``): every
    caller presents a certificate of the CA, or with
    ``callers_need_certificate=False`` may come without one. A port
    that is taken stops the app with one error line and no announcement.

    waitress (the default) keeps HTTP/1.1 connections alive, so the server's
    pooled connections are reused round after round; Werkzeug's development
    server closes every connection after one request. bench/results.json has
    the figures that decided it. ``threads`` bounds concurrent requests; a
    waited /start holds one for its whole run. ``outgoing``: how many
    connections the app itself may open (``connection_limit``).
    """
    if tls is not None:
        # The names in its own certificate are names it answers to: callers
        # verify them, and a rebinding attacker's name is not among them.
        allowed_hosts = [*allowed_hosts, *tls_files.dns_names(tls.cert)]
    app.config["ALLOWED_HOSTS"] = [*app.config.get("ALLOWED_HOSTS", ()), *allowed_hosts]
    # SIGTERM (kill, a process manager) stops the app as Ctrl-C does, so
    # that it can end cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    kind = os.environ.get("FEDAVG_WSGI", "waitress")
    if kind not in WSGI_SERVERS:
        print(f"error: FEDAVG_WSGI must be one of {', '.join(WSGI_SERVERS)}, got {kind!r}", file=sys.stderr)
        sys.exit(2)
    if tls is not None and kind != "waitress":
        print(f"error: FEDAVG_WSGI={kind} cannot serve TLS; unset it to serve --tls-* with cheroot", file=sys.stderr)
        sys.exit(2)
    try:
        if tls is not None:
            _serve_tls(app, host, port, threads, tls, _checked_limit(outgoing), announce, callers_need_certificate)
        elif kind == "werkzeug":
            from werkzeug.serving import make_server
            server = make_server(host, port, app, threaded=True)  # binds here
            _announce(announce)
            server.serve_forever()
        else:
            import waitress
            limit = _checked_limit(outgoing)
            # poll(), not select(): select() cannot watch a descriptor numbered
            # 1024 or more, and a thousand idle connections reach that.
            # channel_request_lookahead: waitress reads on while a request waits or
            # runs, so it sees the caller hang up (environ["waitress.client_disconnected"]):
            # a secure step the server gave up on is then not worked on (secure_routes).
            server = waitress.create_server(app, host=host, port=port, threads=threads, connection_limit=limit,
                                            asyncore_use_poll=True, channel_request_lookahead=1,
                                            ident="raw-fedavg")  # binds here
            _announce(announce)
            server.run()
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)


def _checked_limit(outgoing: int) -> int:
    """``connection_limit``; too few files for MIN_CONNECTIONS stops the app
    in one line (exit 2)."""
    limit = connection_limit(outgoing)
    if limit < MIN_CONNECTIONS:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        print(f"error: this process may open {soft} files (ulimit -n), too few for {outgoing} connection(s) "
              f"out, {OWN_FILES} files of its own and {MIN_CONNECTIONS} connections in; raise the limit "
              f"(ulimit -n {MAX_CONNECTIONS + OWN_FILES + outgoing})", file=sys.stderr)
        sys.exit(2)
    return limit


def _serve_tls(app: Flask, host: str, port: int, threads: int, files: TLSFiles, limit: int,
               announce: str | None, callers_need_certificate: bool) -> None:
    """cheroot over mutual TLS (``tls.py``), imported only here: plain HTTP
    apps never load it. Its errors as ``serve``'s: one line."""
    import ssl

    from . import tls
    try:
        server = tls.make_server(app, host, port, files, threads, limit, callers_need_certificate,
                                 max_body_bytes=app.config.get("MAX_CONTENT_LENGTH") or 0)
    except (ssl.SSLError, OSError) as e:  # what tls_files.check could not foresee
        print(f"error: --tls-cert {files.cert} / --tls-key {files.key} / --tls-ca {files.ca}: cannot be used for "
              f"TLS: {getattr(e, 'reason', None) or e}", file=sys.stderr)
        sys.exit(2)
    try:
        tls.run(server, lambda: _announce(announce))
    except OSError as e:
        # cheroot's bind error reads "No socket could be created -- ((host, port): [Errno 98] Address
        # already in use)": the error within is the one to show, as waitress's is.
        within = re.search(r"\[Errno (\d+)\] ([^)]*)\)", str(e)) if e.errno is None else None
        if within is None:
            raise
        raise OSError(int(within[1]), within[2]) from e


def _announce(text: str | None) -> None:
    if text:
        print(text, flush=True)
