"""The HTTP transport: concurrent calls to the clients over pooled keep-alive
connections, each bounded by a timeout, every failure turned into a reason a
person can read (``fedavg_server.transport`` says what a transport is)."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, TimeoutError

from .transport import MAX_REPLY_BYTES, Reply, reply_from, request_body

RETRY_BACKOFF_S = 0.2
# What call_all allows beyond a call's own deadline before it stops waiting
# for that call (the call is then cut off by its own deadline soon after).
DEADLINE_SLACK_S = 0.5


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
    """The configured clients and one shared HTTP session to reach them."""

    def __init__(self, urls: Sequence[str], max_parallel: int = 32) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        # Each client's name as it last gave it (/health or /train); its URL
        # until it has said. Kept across runs, so a client that is down is
        # still called by its name.
        self.names: dict[str, str] = {url: url for url in self.urls}
        # Not capped at the number of clients: a /health probe from the page
        # must not queue behind a round's /train calls.
        self.max_parallel = max(1, max_parallel)
        # urllib3 (what Requests is built on) directly: a call costs 0.76 ms
        # where a requests.Session takes 1.09 ms (make bench), and a round of
        # a thousand clients is a thousand calls. One pool per host, at most one
        # connection per concurrent call, kept alive across rounds.
        self.http = urllib3.PoolManager(num_pools=max(10, len(self.urls)), maxsize=self.max_parallel,
                                        retries=False)
        self.threads = CallThreads(self.max_parallel)
        self.headers: dict[str, str] = {}
        # Set when the server stops: waits end at once, calls still out are cancelled.
        self.stopping = threading.Event()

    def call_all(self, urls: Sequence[str], method: str, path: str, timeout_s: float,
                 body_for: Callable[[str], Any] | None = None) -> list[Reply]:
        """Call ``path`` on every URL at once; replies come back in ``urls``' order.
        A round lasts as long as its slowest client, not the sum of all, and
        never longer than the timeout (plus the one retry's pause): a client
        still busy by then is given up on."""
        deadline = time.monotonic() + timeout_s + RETRY_BACKOFF_S + DEADLINE_SLACK_S

        def one(url: str) -> Reply:
            # No call outlives the wait: one that starts late, queued behind slower ones, ends
            # when the wait does, and its X-Deadline-S says so: the client stops working when
            # the server stops waiting, not a whole timeout later.
            if time.monotonic() >= deadline:
                return self._not_called(url, timeout_s)
            return self._call(url, method, path, timeout_s, None if body_for is None else body_for(url),
                              min(time.monotonic() + timeout_s, deadline))
        futures = [self.threads.submit(one, url) for url in urls]
        pending = set(futures)
        while pending and not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            # short waits, so that a stopping server is not held by a slow client
            _, pending = wait(pending, timeout=min(left, 0.1))
        return [f.result() if f.done() else self._given_up(f, url, timeout_s) for f, url in zip(futures, urls)]

    def _given_up(self, future: Future, url: str, timeout_s: float) -> Reply:
        if self.stopping.is_set():
            future.cancel()
            return Reply(url, reason="cancelled: the server is stopping")
        if future.cancel():  # still queued behind slow clients: never called
            return self._not_called(url, timeout_s)
        return Reply(url, reason=f"no reply within {timeout_s:g} s")

    def _not_called(self, url: str, timeout_s: float) -> Reply:
        return Reply(url, reason=f"not called within {timeout_s:g} s: {self.max_parallel} slower calls "
                                 "held every connection (raise --max-parallel)")

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None) -> Reply:
        """One call, retried once after a short pause if the connection fails
        (a client restarting); a timeout is not retried: it already cost the
        full wait. ``timeout_s`` bounds the whole call, not each read: a reply
        that trickles in byte by byte is cut off at the deadline."""
        return self._call(url, method, path, timeout_s, body, time.monotonic() + timeout_s)

    def _call(self, url: str, method: str, path: str, timeout_s: float, body: Any, end: float) -> Reply:
        """``call``, ending at ``end`` (monotonic): ``timeout_s`` from now, or less late in a wave."""
        headers, data = request_body(self.headers, max(end - time.monotonic(), 0.001), body)
        deadline = end
        for attempt in (1, 2):
            try:
                left = max(deadline - time.monotonic(), 0.001)
                resp = self.http.request(method, url + path, body=data, headers=headers,
                                         timeout=urllib3.Timeout(connect=left, read=left), preload_content=False)
                content = _read_by(resp, deadline)
                break
            except NewConnectionError as e:  # (urllib3 files it under timeouts too: check it first)
                if attempt == 2:
                    return Reply(url, reason=f"cannot connect: {_root_cause(e)}")
                time.sleep(RETRY_BACKOFF_S)
                deadline += RETRY_BACKOFF_S
            except TimeoutError:
                return Reply(url, reason=f"no reply within {timeout_s:g} s")
            except HTTPError as e:  # connection reset, protocol garbage, …
                if attempt == 2:
                    return Reply(url, reason=f"connection failed: {_root_cause(e)}")
                time.sleep(RETRY_BACKOFF_S)
                deadline += RETRY_BACKOFF_S
            except ReplyTooLarge as e:
                return Reply(url, reason=f"bad reply: {e}")
            except ValueError as e:  # a URL urllib3 cannot use
                return Reply(url, reason=f"request failed: {e}")
        return reply_from(url, resp.status, content)

    def close(self) -> None:
        self.stopping.set()
        self.http.clear()


class ReplyTooLarge(Exception):
    """A client sent more than any reply of the protocol can need."""


def _read_by(resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
    """The whole body, or TimeoutError once the deadline passes (a slow drip
    would otherwise keep each read within the per-read timeout forever)."""
    chunks, size = [], 0
    try:
        while chunk := resp.read1(65536):
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError("deadline passed while reading the reply")
            if size > MAX_REPLY_BYTES:
                raise ReplyTooLarge(f"reply larger than {MAX_REPLY_BYTES} bytes")
    except BaseException:
        resp.close()  # a half-read connection cannot be reused
        raise
    finally:
        resp.release_conn()
    return b"".join(chunks)


def _root_cause(e: BaseException) -> str:
    """The innermost error, e.g. 'Connection refused' rather than urllib3's
    three nested wrappers."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    if e.args and isinstance(e.args[-1], Exception):
        e = e.args[-1]
    text = str(e)
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text
