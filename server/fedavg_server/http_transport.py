"""The HTTP transport: concurrent calls to the clients over pooled keep-alive
connections, each bounded by a timeout, every failure turned into a reason a
person can read (``fedavg_server.transport`` says what a transport is). With
the server's TLS files, mutual TLS: the server shows its certificate and
checks each client's against the CA and the host name in its URL."""
from __future__ import annotations

import ipaddress
import logging
import math
import queue
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import urllib3
from cryptography import x509
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, SSLError, TimeoutError
from urllib3.util.ssl_ import create_urllib3_context
from urllib3.util.ssl_match_hostname import CertificateError

from fedavg import tls_files
from fedavg.tls_files import TLSFiles

from .hosted import ClientURLs, names_for
from .transport import MAX_REPLY_BYTES, Reply, no_reply_within, reply_from, request_body

log = logging.getLogger("fedavg.server")

RETRY_BACKOFF_S = 0.2
# What call_all allows beyond a call's own deadline before it stops waiting
# for that call (the call is then cut off by its own deadline soon after).
DEADLINE_SLACK_S = 0.5


def wave_limit(calls: int, max_parallel: int, timeout_s: float) -> float:
    """The longest a wave of ``calls`` calls, ``max_parallel`` at a time, each
    given ``timeout_s`` from its send, can take: ⌈calls / max_parallel⌉
    lanes one after another, each call at most its timeout, the one retry's
    pause and the slack. (10,000 hung clients at 32 at once and 10 s: 313
    lanes, 55 minutes; a round whose clients answer ends with its slowest.)"""
    return math.ceil(calls / max(1, max_parallel)) * (timeout_s + RETRY_BACKOFF_S + DEADLINE_SLACK_S)


class CallThreads:
    """Up to ``size`` threads that run client calls. Daemon threads, unlike
    ThreadPoolExecutor's (which the interpreter joins at exit): a client that
    never answers must not keep a stopping server alive until its timeout."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        with self._lock:
            if len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=f"client-call-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue  # given up on before it started
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)


class HttpTransport:
    """The configured clients and one shared HTTP session to reach them.
    With ``tls`` every URL must be https:// and every call is mutual TLS;
    without it, http:// only. Raises ValueError naming the URL or the file
    that cannot be used."""

    def __init__(self, urls: Sequence[str], max_parallel: int = 32, tls: TLSFiles | None = None) -> None:
        # (a hosted population's URLs stay its host's arrays: ``hosted``)
        self.urls = urls if isinstance(urls, ClientURLs) else [u.rstrip("/") for u in urls]
        check_urls(self.urls.stand_ins() if isinstance(self.urls, ClientURLs) else self.urls, tls)
        self.tls = tls
        # Each client's name as it last gave it (/health or /train); its URL
        # until it has said (a hosted client: the name its host gives it). Kept
        # across runs, so a client that is down is still called by its name.
        self.names = names_for(self.urls)
        # Not capped at the number of clients: a /health probe from the page
        # must not queue behind a round's /train calls.
        self.max_parallel = max(1, max_parallel)
        # urllib3 (what Requests is built on) directly: a call costs 0.76 ms
        # where a requests.Session takes 1.09 ms (make bench), and a round of
        # a thousand clients is a thousand calls. One pool per host, at most one
        # connection per concurrent call, kept alive across rounds.
        # Under TLS the kept-alive connections matter more: a new one costs a
        # handshake (a /health call 4.4 ms instead of 1.2 ms against the test's
        # TLS server); reused, a client costs one handshake per run
        # (tests/test_tls_transport.py counts them).
        tls_settings = {} if tls is None else {"ssl_context": pool_context(tls), "cert_reqs": "CERT_REQUIRED"}
        origins = len(self.urls.stand_ins()) if isinstance(self.urls, ClientURLs) else len(self.urls)
        self.http = urllib3.PoolManager(num_pools=max(10, origins), maxsize=self.max_parallel,
                                        retries=False, **tls_settings)
        self.threads = CallThreads(self.max_parallel)
        self.headers: dict[str, str] = {}
        # Set when the server stops: waits end at once, calls still out are cancelled.
        self.stopping = threading.Event()

    def call_all(self, urls: Sequence[str], method: str, path: str, timeout_s: float,
                 body_for: Callable[[str], Any] | None = None, max_bytes: int = MAX_REPLY_BYTES) -> list[Reply]:
        """Call ``path`` on every URL, up to ``max_parallel`` at once; replies
        come back in ``urls``' order. Each call's deadline counts from when
        it is sent, not from the wave's start: a client queued behind slower
        ones still gets the whole ``timeout_s`` (its X-Deadline-S), so a
        client is only dropped for its own slowness. The wave lasts as long
        as its slowest lane of calls: at worst, every client hanging and no
        other wave sharing the threads, ⌈len(urls) / max_parallel⌉ ×
        (timeout_s + the one retry's pause + slack) (``wave_limit``); a call
        not started by then (the threads held by another wave) is given up
        on unsent. A stopping server ends the wait at once."""
        sent: dict[int, float] = {}  # index → when its call was sent (monotonic)
        wave_s = wave_limit(len(urls), self.max_parallel, timeout_s)
        limit = time.monotonic() + wave_s

        def one(i: int, url: str) -> Reply:
            sent[i] = time.monotonic()
            if sent[i] >= limit:
                return self._not_called(url, wave_s)
            return self._call(url, method, path, timeout_s, None if body_for is None else body_for(url),
                              sent[i] + timeout_s, max_bytes)
        futures = [self.threads.submit(one, i, url) for i, url in enumerate(urls)]
        pending = set(range(len(futures)))
        while pending and not self.stopping.is_set():
            now = time.monotonic()
            # A call past its own deadline (and the slack) is given up on; it ends by that deadline itself.
            pending = {i for i in pending if not futures[i].done() and
                       (i not in sent or now < sent[i] + timeout_s + RETRY_BACKOFF_S + DEADLINE_SLACK_S)}
            if not pending or now >= limit:
                break
            # short waits, so that a stopping server is not held by a slow client
            wait([futures[i] for i in pending], timeout=min(limit - now, 0.1))
        return [f.result() if f.done() else self._given_up(f, url, timeout_s, wave_s)
                for f, url in zip(futures, urls)]

    def _given_up(self, future: Future, url: str, timeout_s: float, wave_s: float) -> Reply:
        if self.stopping.is_set():
            future.cancel()
            return Reply(url, reason="cancelled: the server is stopping")
        if future.cancel():  # still queued when the wave's limit passed: never called
            return self._not_called(url, wave_s)
        return Reply(url, reason=no_reply_within(timeout_s))

    def _not_called(self, url: str, wave_s: float) -> Reply:
        return Reply(url, reason=f"not called within the wave's {wave_s:g} s: other calls held all "
                                 f"{self.max_parallel} connections (raise --max-parallel)")

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None,
             max_bytes: int = MAX_REPLY_BYTES) -> Reply:
        """One call, retried once after a short pause if the connection fails
        (a client restarting); a timeout is not retried: it already cost the
        full wait. ``timeout_s`` bounds the whole call, not each read: a reply
        that trickles in byte by byte is cut off at the deadline."""
        return self._call(url, method, path, timeout_s, body, time.monotonic() + timeout_s, max_bytes)

    def _call(self, url: str, method: str, path: str, timeout_s: float, body: Any, end: float,
              max_bytes: int = MAX_REPLY_BYTES) -> Reply:
        """``call``, ending at ``end`` (monotonic): ``timeout_s`` from now, or less late in a wave."""
        headers, data = request_body(self.headers, max(end - time.monotonic(), 0.001), body)
        deadline = end
        for attempt in (1, 2):
            try:
                left = max(deadline - time.monotonic(), 0.001)
                resp = self.http.request(method, url + path, body=data, headers=headers,
                                         timeout=urllib3.Timeout(connect=left, read=left), preload_content=False)
                content = _read_by(resp, deadline, max_bytes)
                break
            except NewConnectionError as e:  # (urllib3 files it under timeouts too: check it first)
                if attempt == 2:
                    return Reply(url, reason=f"cannot connect: {_root_cause(e)}")
                time.sleep(RETRY_BACKOFF_S)
                deadline += RETRY_BACKOFF_S
            except TimeoutError:
                return Reply(url, reason=no_reply_within(timeout_s))
            except SSLError as e:  # (an HTTPError too: before it)
                problem, certain = tls_problem(e, url)
                # A certificate refused, on either side, is refused again: not retried. A
                # connection closed during setup may also be a connection lost: once more.
                if certain or attempt == 2:
                    return Reply(url, reason=f"TLS: {problem}")
                time.sleep(RETRY_BACKOFF_S)
                deadline += RETRY_BACKOFF_S
            except HTTPError as e:  # connection reset, protocol garbage, …
                if attempt == 2:
                    hint = ""
                    if self.tls is not None and isinstance(e, ProtocolError) and \
                            isinstance(_innermost(e), ConnectionResetError):
                        hint = " (under TLS: the client may not accept our certificate)"
                    return Reply(url, reason=f"connection failed: {_root_cause(e)}{hint}")
                time.sleep(RETRY_BACKOFF_S)
                deadline += RETRY_BACKOFF_S
            except ReplyTooLarge as e:
                return Reply(url, reason=f"bad reply: {e}")
            except ValueError as e:  # a URL urllib3 cannot use
                return Reply(url, reason=f"request failed: {e}")
        return reply_from(url, resp.status, content, max_bytes)

    def close(self) -> None:
        self.stopping.set()
        self.http.clear()


class ReplyTooLarge(Exception):
    """A client sent more than any reply of the protocol can need."""


def _read_by(resp: urllib3.BaseHTTPResponse, deadline: float, max_bytes: int = MAX_REPLY_BYTES) -> bytes:
    """The whole body, or TimeoutError once the deadline passes (a slow drip
    would otherwise keep each read within the per-read timeout forever)."""
    chunks, size = [], 0
    try:
        while chunk := resp.read1(65536):
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError("deadline passed while reading the reply")
            if size > max_bytes:
                raise ReplyTooLarge(f"reply larger than {max_bytes} bytes")
    except BaseException:
        resp.close()  # a half-read connection cannot be reused
        raise
    finally:
        resp.release_conn()
    return b"".join(chunks)


def _innermost(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    if e.args and isinstance(e.args[-1], Exception):
        e = e.args[-1]
    return e


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and every error it wraps (urllib3 nests them as causes and as arguments)."""
    seen: list[BaseException] = []
    while e is not None and not any(e is s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__ or next((a for a in e.args if isinstance(a, BaseException)), None)
    return seen


def _root_cause(e: BaseException) -> str:
    """The innermost error, e.g. 'Connection refused' rather than urllib3's
    three nested wrappers."""
    e = _innermost(e)
    text = str(e)
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text


# --- mutual TLS -------------------------------------------------------------------------------------

# OpenSSL's reasons a certificate chain does not verify
# (https://docs.openssl.org/3.0/man3/X509_STORE_CTX_get_error/), by what they mean to a person.
EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
NOT_YET_VALID = 9  # X509_V_ERR_CERT_NOT_YET_VALID
UNKNOWN_ISSUER = {2, 18, 19, 20, 21}  # issuer not found; self-signed leaf or chain; no local issuer; one cert
WRONG_NAME = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def caller_context(tls: TLSFiles) -> ssl.SSLContext:
    """The server's side of mutual TLS, for any HTTPS client (urllib3,
    urllib.request): its certificate shown to every client, each client's
    checked against ``tls.ca`` and the host name it is called at, in the
    handshake (urllib3's defaults: TLS 1.2 or later, CERT_REQUIRED,
    check_hostname). Raises ValueError naming the file that cannot be used
    (``tls_files.check``), or an expired certificate of ours."""
    tls_files.check(tls)  # a bad file named in one line, before OpenSSL's terser words
    ctx = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        ctx.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as e:  # what the check could not foresee (e.g. a key type OpenSSL refuses)
        raise ValueError(f"--tls-cert {tls.cert} / --tls-key {tls.key} / --tls-ca {tls.ca}: cannot be used "
                         f"({getattr(e, 'reason', None) or e})") from None
    # OpenSSL loads an expired certificate without a word; every client would then refuse it.
    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    now = datetime.now(timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(f"--tls-cert {tls.cert}: valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                         f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now: every client would refuse it")
    return ctx


def pool_context(tls: TLSFiles) -> ssl.SSLContext:
    """``caller_context`` for HttpTransport's urllib3 pool, where the URL's
    host name is checked by urllib3 once the chain has verified rather than
    by OpenSSL inside the handshake: the same rule (the host must be one of
    the certificate's DNS or IP subjectAltNames), but a failure then carries
    the certificate, so the reason can say whom it is for. Only for urllib3:
    another client given it would check no host name at all."""
    ctx = caller_context(tls)
    ctx.check_hostname = False  # urllib3 then matches the name itself (connection.py, _match_hostname)
    ctx.hostname_checks_common_name = False
    logging.getLogger("urllib3.connection").addFilter(_quiet_name_mismatch)
    return ctx


def _quiet_name_mismatch(record: logging.LogRecord) -> bool:
    """urllib3 logs the whole certificate of every wrong-name client at every
    call; the round's reason already says it in one line."""
    return not record.getMessage().startswith("Certificate did not match expected hostname")


def tls_problem(e: SSLError, url: str) -> tuple[str, bool]:
    """What went wrong in a TLS call to ``url``, in plain words, and whether it
    is certain to happen again (a certificate refused) rather than a
    connection lost while it was being set up."""
    host = urllib3.util.parse_url(url).host or url
    for err in _chain(e):
        if isinstance(err, CertificateError):  # urllib3's host name check, with the certificate it read
            names = [value for kind, value in getattr(err, "_peer_cert", {}).get("subjectAltName", ())
                     if kind in ("DNS", "IP Address")]
            return (f"wrong name: the certificate is for {', '.join(names) or 'no host name (no subjectAltName)'}, "
                    f"not {host}"), True
        if isinstance(err, ssl.SSLCertVerificationError):  # we could not verify the client's certificate
            if err.verify_code == EXPIRED:
                return "certificate has expired", True
            if err.verify_code == NOT_YET_VALID:
                return "certificate is not valid yet (is the clock of one machine wrong?)", True
            if err.verify_code in UNKNOWN_ISSUER:
                return f"unknown CA (not signed by --tls-ca): {err.verify_message}", True
            if err.verify_code in WRONG_NAME:
                return f"wrong name: the certificate is not for {host}", True
            return f"certificate refused: {err.verify_message}", True
        if isinstance(err, ssl.SSLEOFError):
            # Under TLS 1.3 a client checks our certificate after our side of the handshake has
            # ended: its refusal arrives as an alert, or only as the connection closing.
            return "closed during TLS setup (it may not accept our certificate)", False
        if isinstance(err, ssl.SSLError):
            reason = (err.reason or "").upper()
            if "ALERT" in reason:  # the client sent an alert: it refused our certificate
                alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
                said = {"unknown ca": "unknown CA: it trusts another CA than ours",
                        "certificate expired": "it says ours has expired"}.get(alert, alert)
                return f"the client refused the server's certificate ({said})", True
            if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "HTTP_REQUEST" in reason:
                return "the client does not speak TLS on this port (plain HTTP? start it with --tls-*)", True
            return f"TLS failed: {err.reason or err}", True
    return f"TLS failed: {_root_cause(e)}", False


def on_loopback(url: str) -> bool:
    """Whether the URL names this machine (localhost, 127.0.0.0/8, ::1); a
    name is not resolved: only ``localhost`` counts."""
    host = (urllib3.util.parse_url(url).host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_urls(urls: Sequence[str], tls: TLSFiles | None) -> None:
    """With TLS every client is called over https://, without it over
    http://: a mix would send models in the clear, or call a client with no
    certificate to show. ValueError names the first URL that does not fit."""
    for url in urls:
        secure = url.lower().startswith("https://")
        if secure and tls is None:
            raise ValueError(f"client URL {url}: https:// needs the server's own certificate: start the server "
                             "with --tls-cert, --tls-key and --tls-ca (or FEDAVG_TLS_CERT, FEDAVG_TLS_KEY, "
                             "FEDAVG_TLS_CA)")
        if not secure and tls is not None:
            raise ValueError(f"client URL {url}: with --tls-* the server calls its clients over https:// only "
                             "(start each client with --tls-* too)")
    remote = [url for url in urls if not on_loopback(url)]
    if remote and tls is None:
        shown = ", ".join(remote[:3]) + (f" and {len(remote) - 3} more" if len(remote) > 3 else "")
        log.warning(f"server: warning: {shown} not on this machine, and TLS is off: every model crosses the "
                    "network in the clear, and anyone with the token can call the clients as the server does; "
                    "start every app with --tls-cert, --tls-key and --tls-ca (docs/DEPLOY.md)")
