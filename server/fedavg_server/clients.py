"""Talking to clients: concurrent calls over pooled keep-alive connections,
each bounded by a timeout, every failure turned into a reason a person can read."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from fedavg.wire import ProtocolError, loads

RETRY_BACKOFF_S = 0.2


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


class ClientPool:
    """The configured clients and one shared HTTP session to reach them."""

    def __init__(self, urls: Sequence[str], max_parallel: int = 32) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        # Each client's name as it last gave it (/health or /train); its URL
        # until it has said. Kept across runs, so a client that is down is
        # still called by its name.
        self.names: dict[str, str] = {url: url for url in self.urls}
        self.max_parallel = max(1, min(max_parallel, len(self.urls)))
        self.session = requests.Session()
        # One pooled connection per concurrent call, kept alive across rounds.
        adapter = HTTPAdapter(pool_connections=self.max_parallel, pool_maxsize=self.max_parallel)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.executor = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="client-call")
        self.headers: dict[str, str] = {}

    def call_all(self, urls: Sequence[str], method: str, path: str, timeout_s: float,
                 body_for: Callable[[str], Any] | None = None) -> list[Reply]:
        """Call ``path`` on every URL at once; replies come back in ``urls``' order.
        A round lasts as long as its slowest client, not the sum of all."""
        def one(url: str) -> Reply:
            return self.call(url, method, path, timeout_s, None if body_for is None else body_for(url))
        return list(self.executor.map(one, urls))

    def call(self, url: str, method: str, path: str, timeout_s: float, body: Any = None) -> Reply:
        """One call, retried once after a short pause if the connection fails
        (a client restarting); a timeout is not retried: it already cost the
        full wait."""
        for attempt in (1, 2):
            try:
                resp = self.session.request(method, url + path, json=body, timeout=timeout_s,
                                            headers=self.headers)
                break
            except requests.Timeout:
                return Reply(url, reason=f"no reply within {timeout_s:g} s")
            except requests.ConnectionError as e:
                if attempt == 2:
                    return Reply(url, reason=f"cannot connect: {_root_cause(e)}")
                time.sleep(RETRY_BACKOFF_S)
            except requests.RequestException as e:
                return Reply(url, reason=f"request failed: {_root_cause(e)}")
        try:
            body = loads(resp.content)
        except ProtocolError as e:
            body = None
            if resp.ok:
                return Reply(url, status=resp.status_code, reason=f"bad reply: {e}")
        if not resp.ok:
            said = body.get("error") if isinstance(body, dict) else None
            return Reply(url, status=resp.status_code,
                         reason=f"HTTP {resp.status_code}" + (f": {said}" if said else ""),
                         diverged=isinstance(body, dict) and body.get("diverged") is True)
        if not isinstance(body, dict):
            return Reply(url, status=resp.status_code, reason="bad reply: not a JSON object")
        return Reply(url, body=body, status=resp.status_code)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close()


def _root_cause(e: BaseException) -> str:
    """The innermost error, e.g. 'Connection refused' rather than urllib3's
    three nested wrappers."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    if e.args and isinstance(e.args[-1], Exception):
        e = e.args[-1]
    text = str(e)
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text
