"""Serving an app over mutual TLS with cheroot (waitress has no TLS): a
caller presents a certificate that chains to the app's CA (a client's or a
host's callers must; the server's own may come without one: its operator
with a browser or curl, whom the token or the operator certificate lets
in), and the app sees who it is in the WSGI environ (SSL_CLIENT_S_DN_CN,
SSL_CLIENT_SAN_DNS_0 …). ``service.serve`` uses this when --tls-* is given.

Three things cheroot does not do on its own, added here:
- the TLS handshake runs in a worker thread once the peer has sent its
  first bytes, bounded by ``HANDSHAKE_TIMEOUT_S``, not in cheroot's one
  accepting thread, where a peer that connects and stays silent would stall
  every other connection (cherrypy/cheroot#748);
- plain HTTP to the port gets no answer at all (cheroot writes a plain-text
  400 back);
- at most ``limit`` connections are open: one more is closed at once
  (cheroot would accept until the process runs out of files, then spin).
It also tells the app when the caller has hung up, as waitress does
(``HUNG_UP``).
"""
from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from ..tls_files import TLSFiles
from .service import HUNG_UP

log = logging.getLogger("fedavg")

# How long a connection may take to finish its TLS handshake once its peer
# has begun it. A real one takes a few round trips (milliseconds); a peer
# that stalls half-way holds a worker thread this long, then is dropped.
HANDSHAKE_TIMEOUT_S = 5.0
# Idle keep-alive connections, and a request's every read, time out after
# this long: waitress's channel_timeout, so that the server's pooled
# connections last between rounds as they do over plain HTTP.
IDLE_TIMEOUT_S = 120.0


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


class TLSConnection(cheroot_server.HTTPConnection):
    """A connection whose TLS handshake runs in the worker thread that
    first serves it, within ``HANDSHAKE_TIMEOUT_S``; one that fails (no
    certificate, another CA's, an expired one, plain HTTP, silence) is
    closed without a byte written. After it, the peer's verified
    certificate is in every request's environ (``ssl_env``)."""

    _handshaken = False
    _counted = False
    spoke = False  # has the peer sent anything yet (TLSServer.process_conn)

    def __init__(self, server, sock, makefile=cheroot_server.MakeFile):
        super().__init__(server, sock, makefile)
        server.ssl_adapter.opened()
        self._counted = True

    def communicate(self) -> bool:
        if not self._handshaken:
            sock = self.socket
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                sock.do_handshake()  # verifies the peer's chain
                sock.settimeout(self.server.timeout)
            except (ssl.SSLError, OSError) as e:
                log.info("TLS: connection from %s refused during the handshake: %s", self.remote_addr,
                         _reason(e))
                return False  # cheroot closes it; nothing is written
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
    """WSGI 1.0, plus environ[HUNG_UP] (secure_routes stops a step the
    server no longer waits for)."""

    def get_environ(self):
        environ = super().get_environ()
        environ[HUNG_UP] = _hang_up_check(self.req.conn.socket)
        return environ


class TLSServer(wsgi.Server):
    """cheroot's WSGI server with ``MutualTLSAdapter``, ``TLSConnection``
    and ``Gateway``; its messages go to the app's log."""

    ConnectionClass = TLSConnection

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
        log.log(level, "TLS server: %s", msg, exc_info=traceback)


def make_server(app, host: str, port: int, files: TLSFiles, threads: int, limit: int,
                callers_need_certificate: bool = True) -> TLSServer:
    """A server for ``app`` on host:port over mutual TLS with ``files``,
    ``threads`` requests at once, at most ``limit`` connections, callers'
    certificates required or optional (``MutualTLSAdapter``); not bound yet
    (``prepare()`` binds). Raises ssl.SSLError or OSError when the files
    cannot be used (``tls_files.check`` names them first)."""
    server = TLSServer((host, port), app, numthreads=threads, max=threads, timeout=IDLE_TIMEOUT_S,
                       request_queue_size=1024, server_name="raw-fedavg")
    server.gateway = Gateway
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
