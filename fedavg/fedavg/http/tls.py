"""Serving an app over mutual TLS with cheroot (waitress has no TLS): a
caller presents a certificate that chains to the app's CA (a client's or a
host's callers must; the server's own may come without one, to read what
everyone may: operating takes the certificate naming operator), and the
app sees who it is in the WSGI environ (SSL_CLIENT_S_DN_CN,
SSL_CLIENT_SAN_DNS_0 …). ``service.serve`` uses this when --tls-* is given.

What cheroot does not do on its own, added here:
- the TLS handshake runs in a worker thread once the peer has sent its
  first bytes, not in cheroot's one accepting thread, where a peer that
  connects and stays silent would stall every other connection
  (cherrypy/cheroot#748);
- overall deadlines while a worker thread waits on the peer: the handshake
  within ``HANDSHAKE_TIMEOUT_S``, a request head within ``HEAD_TIMEOUT_S``,
  its body within ``BODY_TIMEOUT_S`` of reading, however slowly the peer
  drips its bytes (cheroot's timeout is per read: one byte every 119 s
  would hold a thread for ever). ``Watchdog`` shuts down a connection past
  its deadline; the app's own time (a /train honouring X-Deadline-S, a
  waited /start) is not bounded. Unlike waitress, cheroot gives each
  connection it reads from a thread, so there are at least ``MIN_THREADS``;
  an attacker who keeps more stalled connections than that open delays
  other callers by up to about one deadline per ``MIN_THREADS`` of them
  (docs/DEPLOY.md has the figures);
- a request head over ``MAX_HEAD_BYTES`` (as waitress) and a body over the
  app's MAX_CONTENT_LENGTH are refused (414/413, cheroot's own answers)
  before they are held in memory;
- plain HTTP to the port gets no answer at all (cheroot writes a plain-text
  400 back);
- at most ``limit`` connections are open: one more is closed at once
  (cheroot would accept until the process runs out of files, then spin).
It also tells the app when the caller has hung up, as waitress does
(``HUNG_UP``).

No per-address cap on connections still in their handshake or head: the
server opens up to 16 per core to a client host at once, from one address,
before its certificate can be known; a cap below that would drop clients
from a round, and one above it would not protect the worker threads.
"""
from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from ..tls_files import TLSFiles
from .service import HUNG_UP

log = logging.getLogger("fedavg")

# How long a connection may take, in all, to finish its TLS handshake once
# its peer has begun it. A real one takes a few round trips (milliseconds);
# a peer that stalls half-way, or drips its hello, holds a worker thread
# this long at most, then is dropped.
HANDSHAKE_TIMEOUT_S = 5.0
# How long a request head (request line and headers) may take in all, from
# the first read: every client sends it at once. On a fresh connection the
# wait starts right after the handshake, so a peer that shakes hands and
# stays silent is dropped after this long too (a kept-alive one waits for
# its next request without a thread, up to IDLE_TIMEOUT_S).
HEAD_TIMEOUT_S = 10.0
# How long the reads of one request's body may take in all: the largest
# allowed (4 MiB on a client) at 140 KB/s or more. The app's own time
# between reads is not counted.
BODY_TIMEOUT_S = 30.0
# Idle keep-alive connections, and each single read, time out after this
# long: waitress's channel_timeout, so that the server's pooled connections
# last between rounds as they do over plain HTTP.
IDLE_TIMEOUT_S = 120.0
# Worker threads at least: cheroot holds one per connection it reads a
# handshake, head or body from, so a few stalled peers must not take them
# all; each costs a stack, not CPU, while it waits.
MIN_THREADS = 32
# A request line and headers larger than this are refused (414/413), as
# waitress refuses them (its max_request_header_size).
MAX_HEAD_BYTES = 256 * 1024


class MutualTLSAdapter(BuiltinSSLAdapter):
    """cheroot's builtin adapter verifying the caller's certificate against
    ``files.ca`` (TLS 1.2 or later): one is required, or with
    ``callers_need_certificate=False`` optional (one that is presented must
    still verify, or the handshake fails). ``wrap`` only wraps the socket:
    ``TLSConnection`` does the handshake in a worker thread. At most
    ``limit`` connections are open at once (``opened``/``closed`` count
    them)."""

    def __init__(self, files: TLSFiles, limit: int, callers_need_certificate: bool = True):
        super().__init__(str(files.cert), str(files.key))
        self.context.verify_mode = ssl.CERT_REQUIRED if callers_need_certificate else ssl.CERT_OPTIONAL
        self.context.load_verify_locations(cafile=str(files.ca))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.limit = limit
        self.open = 0
        self._refusing = False
        self._lock = threading.Lock()

    def wrap(self, sock: socket.socket):
        with self._lock:
            full = self.open >= self.limit
            first = full and not self._refusing
            self._refusing = full
        if full:
            if first:  # once while it lasts: a flood of connections is not a flood of lines
                log.warning("TLS: %d connections open, this app's limit: new ones are closed until some end",
                            self.limit)
            sock.close()  # nothing written, no file held
            # An error cheroot drops without a word (it logs every other one).
            raise ConnectionAbortedError(errno.ECONNABORTED, "over the connection limit")
        # No I/O here: this runs in cheroot's only accepting thread.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), {}

    def opened(self) -> None:
        with self._lock:
            self.open += 1

    def closed(self) -> None:
        with self._lock:
            self.open -= 1


class Watchdog:
    """Overall deadlines for connections while a worker thread waits on
    their peer. ``arm(conn, seconds, what)`` before such a wait,
    ``disarm(conn)`` after it (True: the deadline passed, the connection
    was cut). Past its deadline a connection is shut down (both ways, on
    its descriptor), which ends the worker's blocked read at once; the
    connection's ``cut`` then says what took too long. Only connections
    inside a wait are armed: never more than the worker threads."""

    def __init__(self) -> None:
        self._due: dict[TLSConnection, tuple[float, str]] = {}
        self._wake = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._run, daemon=True, name="tls-watchdog").start()

    def arm(self, conn: TLSConnection, seconds: float, what: str) -> None:
        with self._wake:
            self._due[conn] = (time.monotonic() + seconds, what)
            self._wake.notify()

    def disarm(self, conn: TLSConnection) -> bool:
        # Under the lock: once this returns the watchdog no longer touches
        # the connection, so it cannot shut down a descriptor closed and
        # reused meanwhile.
        with self._wake:
            self._due.pop(conn, None)
            return conn.cut is not None

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while not self._stopped:
                now = time.monotonic()
                for conn, (due, what) in list(self._due.items()):
                    if due <= now:
                        del self._due[conn]
                        conn.cut = what
                        # socket.socket's shutdown, not SSLSocket's (which would
                        # use the TLS state the worker's read is using): the
                        # read sees the end of the stream and returns.
                        with suppress(OSError):
                            socket.socket.shutdown(conn.socket, socket.SHUT_RDWR)
                self._wake.wait(min(due for due, _ in self._due.values()) - now if self._due else None)


class TimedRequest(cheroot_server.HTTPRequest):
    """cheroot's request, its head read within ``HEAD_TIMEOUT_S`` in all;
    nothing is written to a peer cut off."""

    def parse_request(self) -> None:
        watchdog = self.server.watchdog
        watchdog.arm(self.conn, HEAD_TIMEOUT_S, f"no request head within {HEAD_TIMEOUT_S:g} s")
        try:
            super().parse_request()
        finally:
            if watchdog.disarm(self.conn):
                self.ready = False  # whatever was read, it is not a request
                log.info("TLS: connection from %s closed: %s", self.conn.remote_addr, self.conn.cut)

    def simple_response(self, status, msg=""):
        if self.conn.cut is None:  # cheroot's 400/408 to a peer we cut off would only fail
            super().simple_response(status, msg)


class TimedBody:
    """A request body (cheroot's wsgi.input) whose reads take
    ``BODY_TIMEOUT_S`` in all; the app's time between them is not counted.
    cheroot also reads through it what the app left unread."""

    def __init__(self, rfile, conn: TLSConnection):
        self._rfile = rfile
        self._conn = conn
        self._left = BODY_TIMEOUT_S
        self._said = False

    @property
    def remaining(self) -> int:  # what cheroot reads after the app, to keep the connection
        return getattr(self._rfile, "remaining", 0)

    def _timed(self, read, *args):
        watchdog = self._conn.server.watchdog
        start = time.monotonic()
        watchdog.arm(self._conn, self._left, f"no request body within {BODY_TIMEOUT_S:g} s")
        try:
            return read(*args)
        finally:
            self._left = max(0.0, self._left - (time.monotonic() - start))
            if watchdog.disarm(self._conn) and not self._said:
                self._said = True
                log.info("TLS: connection from %s closed: %s", self._conn.remote_addr, self._conn.cut)

    def read(self, size=None):
        return self._timed(self._rfile.read, size)

    def readline(self, size=None):
        return self._timed(self._rfile.readline, size)

    def readlines(self, sizehint=0):
        return self._timed(self._rfile.readlines, sizehint)

    def __iter__(self):
        return self

    def __next__(self):
        return self._timed(self._rfile.__next__)

    def close(self) -> None:
        self._rfile.close()


class TLSConnection(cheroot_server.HTTPConnection):
    """A connection whose TLS handshake runs in the worker thread that
    first serves it, within ``HANDSHAKE_TIMEOUT_S``; one that fails (no
    certificate, another CA's, an expired one, plain HTTP, silence) is
    closed without a byte written. After it, the peer's verified
    certificate is in every request's environ (``ssl_env``)."""

    RequestHandlerClass = TimedRequest
    _handshaken = False
    _counted = False
    spoke = False  # has the peer sent anything yet (TLSServer.process_conn)
    cut: str | None = None  # what took too long, once the watchdog cut it off

    def __init__(self, server, sock, makefile=cheroot_server.MakeFile):
        super().__init__(server, sock, makefile)
        server.ssl_adapter.opened()
        self._counted = True

    def communicate(self) -> bool:
        if not self._handshaken:
            sock = self.socket
            watchdog = self.server.watchdog
            watchdog.arm(self, HANDSHAKE_TIMEOUT_S, f"no handshake within {HANDSHAKE_TIMEOUT_S:g} s")
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                sock.do_handshake()  # verifies the peer's chain
                sock.settimeout(self.server.timeout)
            except (ssl.SSLError, OSError) as e:
                watchdog.disarm(self)
                log.info("TLS: connection from %s refused during the handshake: %s", self.remote_addr,
                         self.cut or _reason(e))
                return False  # cheroot closes it; nothing is written
            if watchdog.disarm(self):  # finished just as it was cut: cut all the same
                log.info("TLS: connection from %s refused during the handshake: %s", self.remote_addr, self.cut)
                return False
            self.ssl_env = self.server.ssl_adapter.get_environ(sock)
            self._handshaken = True
        return super().communicate()

    def close(self) -> None:
        if self._counted:
            self._counted = False
            self.server.ssl_adapter.closed()
        super().close()


def _reason(e: BaseException) -> str:
    """Why a handshake failed, in OpenSSL's words: what the operator looks up."""
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"its certificate: {e.verify_message}"  # e.g. certificate has expired
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason  # e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE, HTTP_REQUEST, TLSV1_ALERT_UNKNOWN_CA
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"no handshake within {HANDSHAKE_TIMEOUT_S:g} s"
    return str(e) or type(e).__name__


def _hang_up_check(sock: socket.socket) -> Callable[[], bool]:
    """A callable: has the peer closed its side of ``sock``? poll() for
    POLLRDHUP (Linux), POLLHUP or POLLERR with no wait: it reads nothing,
    so it neither consumes a request nor disturbs TLS."""
    fd = sock.fileno()
    mask = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR

    def hung_up() -> bool:
        try:
            poller = select.poll()
            poller.register(fd, mask)
            return any(events & mask for _, events in poller.poll(0))
        except (OSError, ValueError):  # closed meanwhile
            return True

    return hung_up


class Gateway(wsgi.Gateway_10):
    """WSGI 1.0, its wsgi.input a ``TimedBody``, plus environ[HUNG_UP]
    (secure_routes stops a step the server no longer waits for)."""

    def __init__(self, req):
        req.rfile = TimedBody(req.rfile, req.conn)  # before the environ is made from it
        super().__init__(req)

    def get_environ(self):
        environ = super().get_environ()
        environ[HUNG_UP] = _hang_up_check(self.req.conn.socket)
        return environ


class TLSServer(wsgi.Server):
    """cheroot's WSGI server with ``MutualTLSAdapter``, ``TLSConnection``
    and ``Gateway``, and a ``Watchdog`` for their deadlines; its messages
    go to the app's log."""

    ConnectionClass = TLSConnection

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.watchdog = Watchdog()

    def stop(self) -> None:
        super().stop()
        self.watchdog.stop()

    def process_conn(self, conn):
        # A new connection first waits in cheroot's selector, as an idle
        # keep-alive one does, until its peer sends something (its TLS
        # hello): one that connects and says nothing holds no worker thread
        # (it is closed after IDLE_TIMEOUT_S, within the connection limit).
        if isinstance(conn, TLSConnection) and not conn.spoke:
            conn.spoke = True  # the next time it comes here, it is readable
            self._connections.put(conn)
            return
        super().process_conn(conn)

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        # cheroot writes to stderr by default; the app's log is where the operator looks.
        error = sys.exc_info()[1] if traceback else None
        if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError, ConnectionResetError)):
            # A peer that hung up (or was cut off) before its answer: cheroot
            # logs a traceback when the answer cannot be written; one line is news enough.
            log.info("TLS server: a caller hung up before its answer could be sent (%s)", _reason(error))
            return
        log.log(level, "TLS server: %s", msg, exc_info=traceback)


def make_server(app, host: str, port: int, files: TLSFiles, threads: int, limit: int,
                callers_need_certificate: bool = True, max_body_bytes: int = 0) -> TLSServer:
    """A server for ``app`` on host:port over mutual TLS with ``files``,
    ``threads`` requests at once (``MIN_THREADS`` at least), at most
    ``limit`` connections, callers' certificates required or optional
    (``MutualTLSAdapter``), request heads up to ``MAX_HEAD_BYTES`` and
    bodies up to ``max_body_bytes`` (the app's MAX_CONTENT_LENGTH; 0: no
    limit); not bound yet (``prepare()`` binds). Raises ssl.SSLError or
    OSError when the files cannot be used (``tls_files.check`` names them
    first)."""
    threads = max(threads, MIN_THREADS)
    server = TLSServer((host, port), app, numthreads=threads, max=threads, timeout=IDLE_TIMEOUT_S,
                       request_queue_size=1024, server_name="raw-fedavg")
    server.gateway = Gateway
    server.max_request_header_size = MAX_HEAD_BYTES
    server.max_request_body_size = max_body_bytes
    server.keep_alive_conn_limit = None  # cheroot's default keeps only 10 connections alive
    server.ssl_adapter = MutualTLSAdapter(files, limit, callers_need_certificate)
    return server


def run(server: TLSServer, announce: Callable[[], None]) -> None:
    """Bind, ``announce``, serve until interrupted (KeyboardInterrupt passes
    through). Stopping does not wait here for requests still running: a
    waited /start ends only when the app stops its run, after this
    returns; cheroot's stop runs beside it and the process exits once its
    worker threads are done."""
    server.prepare()
    announce()
    try:
        server.serve()
    finally:
        threading.Thread(target=server.stop, daemon=True, name="tls-stop").start()
