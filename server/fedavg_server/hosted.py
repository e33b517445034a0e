"""Clients reached by index: a client host's population, described in one
reply (its GET /population), held as arrays rather than as a million URLs.

A server's clients are a list of URLs everywhere (the samplers index it, the
strategies and the record name clients by URL). ``ClientURLs`` keeps that
contract — len, indexing, iteration, ``in``, ``index`` — over parts that are
either one client's own URL (``--clients``, a host without /population) or
a ``HostedPopulation``: K clients at base/clients/1 … base/clients/K, each URL
made when asked for. ``ClientNames``, ``ClientSizes`` and ``ClientBatch`` are
the mappings a run keeps by URL (name, n_k, the host's batched /train), read
from the same arrays, with a dict for the clients of their own: nothing of
size K is held in Python objects, and nothing costs O(K) in Python unless a
caller iterates every client.
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedavg.batch_wire import decode_array
from fedavg.population import client_name
from fedavg.strategies import STRATEGIES
from fedavg.strict_json import MAX_DATA_SIZE, ProtocolError, expect_int

CLIENTS_PREFIX = "/clients/"


@dataclass(eq=False)  # (one host is one part: compared by identity, not by its arrays)
class HostedPopulation:
    """What a client host's GET /population says of its K clients: client k
    (0-based here; /clients/<k+1> on the host) is named
    ``client_name(first + k, k < attackers)`` and states n_k = ``sizes[k]``."""

    base: str  # the host's URL, without a trailing /
    first: int  # the global index (0-based) of its client 1: a shard's place in the whole
    attackers: int
    num_features: int
    strategies: tuple[str, ...]
    secagg: bool
    batch: str | None  # its batched /train's path, None: call each client's own /train
    sizes: np.ndarray  # (K,) int64

    @property
    def size(self) -> int:
        return len(self.sizes)

    def url(self, k: int) -> str:
        return f"{self.base}{CLIENTS_PREFIX}{k + 1}"

    def name(self, k: int) -> str:
        return client_name(self.first + k, k < self.attackers)

    @property
    def entry(self) -> str:
        """All its clients as one entry, ``<host>/clients/1..K``: how a run stores them and the page lists them."""
        return f"{self.base}{CLIENTS_PREFIX}1..{self.size}"

    def locate(self, url: str) -> int | None:
        """k of one of its clients' URLs, None when it is not one."""
        prefix = self.base + CLIENTS_PREFIX
        if not url.startswith(prefix):
            return None
        tail = url[len(prefix):]
        if not tail.isdigit() or tail[0] == "0":
            return None
        k = int(tail)
        return k - 1 if k <= len(self.sizes) else None


def population_reply_limit(clients: int) -> int:
    """The most bytes a /population reply of ``clients`` clients can need:
    1 MiB (what any reply may be) and base64 of 8 bytes per client."""
    return 1024 * 1024 + 12 * clients


def parse_population(base: str, value: Any) -> HostedPopulation:
    """A host's GET /population reply → HostedPopulation; ProtocolError
    naming the field (the host is then not one the server can use)."""
    if not isinstance(value, Mapping):
        raise ProtocolError("reply: must be a JSON object")
    k = expect_int(value.get("clients"), "clients", ge=1)
    first = expect_int(value.get("first_id"), "first_id", ge=1) - 1
    attackers = expect_int(value.get("attackers", 0), "attackers", ge=0)
    d = expect_int(value.get("num_features"), "num_features", ge=1)
    strategies = value.get("strategies")
    if not isinstance(strategies, list):
        raise ProtocolError("strategies: must be a list of strategy names")
    batch = value.get("batch")
    if batch is not None and not (isinstance(batch, str) and batch.startswith("/")):
        raise ProtocolError("batch: must be a path (/…) or null")
    sizes = decode_array(value.get("sizes"), "sizes", "<i8", (k,))
    if np.any((sizes < 1) | (sizes > MAX_DATA_SIZE)):
        raise ProtocolError(f"sizes: every n_k must be 1 to {MAX_DATA_SIZE}")
    return HostedPopulation(base.rstrip("/"), first, attackers, d,
                            tuple(s for s in strategies if isinstance(s, str) and s in STRATEGIES),
                            value.get("secagg") is True, batch, sizes.astype(np.int64))


class ClientURLs(Sequence[str]):
    """Every configured client's URL, in configuration order, over parts
    that are single URLs or hosted populations (``HostedPopulation``): a
    list's behaviour, with a population's URLs made only when asked for.
    len and indexing are O(log parts); ``index`` and ``in`` parse the URL."""

    def __init__(self, parts: Sequence[str | HostedPopulation]) -> None:
        self.parts = list(parts)
        self.starts: list[int] = []  # the index of each part's first client
        total = 0
        for part in self.parts:
            self.starts.append(total)
            total += 1 if isinstance(part, str) else part.size
        self.total = total
        self.own = {part: i for i, part in zip(self.starts, self.parts) if isinstance(part, str)}
        self.hosts = [part for part in self.parts if isinstance(part, HostedPopulation)]

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i):  # an int, or a slice (a list)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.total))]
        if i < 0:
            i += self.total
        if not 0 <= i < self.total:
            raise IndexError(f"client index {i} out of range (0..{self.total - 1})")
        at = bisect.bisect_right(self.starts, i) - 1
        part = self.parts[at]
        return part if isinstance(part, str) else part.url(i - self.starts[at])

    def __iter__(self) -> Iterator[str]:
        for part in self.parts:
            if isinstance(part, str):
                yield part
            else:
                yield from (part.url(k) for k in range(part.size))

    def locate(self, url: str) -> tuple[HostedPopulation, int] | None:
        """The hosted population serving ``url`` and its k there; None for a client of its own or none."""
        for host in self.hosts:
            k = host.locate(url)
            if k is not None:
                return host, k
        return None

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and (url in self.own or self.locate(url) is not None)

    def index(self, url: str, *args: Any) -> int:
        if url in self.own:
            return self.own[url]
        found = self.locate(url)
        if found is None:
            raise ValueError(f"{url!r} is not a configured client")
        host, k = found
        return self.starts[next(i for i, part in enumerate(self.parts) if part is host)] + k

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClientURLs):
            return self.parts == other.parts or (len(self) == len(other) and all(a == b for a, b in zip(self, other)))
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable, as a list)

    def stand_ins(self) -> list[str]:
        """Its own URLs and one per host: what a check of schemes and hosts needs to see."""
        return [part if isinstance(part, str) else part.url(0) for part in self.parts]

    def __repr__(self) -> str:
        return f"ClientURLs({len(self)} clients: {len(self.own)} own, {len(self.hosts)} hosted population(s))"


def stored_clients(urls: Sequence[str]) -> list[str]:
    """What a run stores as its clients: every URL, but each hosted
    population as one entry, ``<host>/clients/1..K`` (a million URLs are
    40 MB of JSON, which every /status would read back)."""
    if not isinstance(urls, ClientURLs):
        return list(urls)
    return [part if isinstance(part, str) else part.entry for part in urls.parts]


def stored_urls(stored: Sequence[str]) -> Sequence[str]:
    """The URLs a stored list stands for (``stored_clients``' inverse: a
    ClientURLs, whose hosts' facts are unknown, when it holds a population)."""
    parts: list[str | HostedPopulation] = []
    for entry in stored:
        found = STORED_RANGE.match(entry)
        parts.append(entry if found is None else HostedPopulation(
            found["base"], 0, 0, 1, (), False, None, np.ones(int(found["k"]), dtype=np.int64)))
    return stored if all(isinstance(p, str) for p in parts) else ClientURLs(parts)


STORED_RANGE = re.compile(r"^(?P<base>.+)/clients/1\.\.(?P<k>[1-9][0-9]*)$")


def as_client_urls(urls: Sequence[str]) -> ClientURLs:
    """``urls`` as a ClientURLs (a plain list: one part per URL)."""
    return urls if isinstance(urls, ClientURLs) else ClientURLs([u for u in urls])


class Said(MutableMapping[str, Any]):
    """A mapping by URL over ``urls``: what was said of a client (set as a
    dict's items, kept in ``said``) before what its host's arrays say."""

    def __init__(self, urls: ClientURLs) -> None:
        self.urls = urls
        self.said: dict[str, Any] = {}

    def __setitem__(self, url: str, value: Any) -> None:
        self.said[url] = value

    def __delitem__(self, url: str) -> None:
        del self.said[url]

    def clear(self) -> None:
        self.said.clear()


class ClientNames(Said):
    """url → the name a client last gave: what was said (``self[url] = …``),
    else for a hosted client the name its own /health gives (the host's
    rule), else its URL. Kept across runs, as a transport's ``names``."""

    def __getitem__(self, url: str) -> str:
        if url in self.said:
            return self.said[url]
        if url in self.urls.own:
            return url
        found = self.urls.locate(url)
        if found is None:
            raise KeyError(url)
        return found[0].name(found[1])

    def __iter__(self) -> Iterator[str]:
        return iter(self.urls)

    def __len__(self) -> int:
        return len(self.urls)

    def __contains__(self, url: object) -> bool:
        return url in self.said or url in self.urls


def names_for(urls: Sequence[str]) -> MutableMapping[str, str]:
    """A transport's ``names`` for its ``urls``: each its URL until it says
    a name (``ClientNames`` for a ClientURLs)."""
    return ClientNames(urls) if isinstance(urls, ClientURLs) else {url: url for url in urls}


class ClientSizes(Said):
    """url → n_k as the client stated it: its /health for a client of its
    own (set by the probe), the host's array for a hosted one (re-read at
    each probe). ``counted`` is Σ n_k without a walk over the clients."""

    def __getitem__(self, url: str) -> int:
        if url in self.said:
            return self.said[url]
        found = self.urls.locate(url) if url not in self.urls.own else None
        if found is None:
            raise KeyError(url)
        return int(found[0].sizes[found[1]])

    def __iter__(self) -> Iterator[str]:
        yield from self.said
        for host in self.urls.hosts:
            yield from (host.url(k) for k in range(host.size))

    def __len__(self) -> int:
        return len(self.said) + sum(host.size for host in self.urls.hosts)

    def counted(self, clients: Sequence[str]) -> tuple[int, set[str]]:
        """(N = Σ n_k over ``clients`` whose n_k is known, the clients
        without one): the hosts' arrays summed by NumPy. ``clients`` is the
        run's (these URLs: every hosted client has its n_k)."""
        own = [url for url in self.urls.own if url in clients]
        return (sum(self.said[u] for u in own if u in self.said) + sum(int(h.sizes.sum()) for h in self.urls.hosts),
                {u for u in own if u not in self.said})


class ClientBatch(Mapping[str, tuple[str, int]]):
    """url → (its host's batched /train URL, its k there) for every client
    whose host batches: a hosted population's whose /population names the
    path, and each client of its own whose /health said so (``said``)."""

    def __init__(self, urls: ClientURLs) -> None:
        self.urls = urls
        self.said: dict[str, tuple[str, int]] = {}

    def __getitem__(self, url: str) -> tuple[str, int]:
        if url in self.said:
            return self.said[url]
        found = self.urls.locate(url) if url not in self.urls.own else None
        if found is None or found[0].batch is None:
            raise KeyError(url)
        host, k = found
        return host.base + host.batch, k + 1

    def __contains__(self, url: object) -> bool:
        try:
            self[url]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        yield from self.said
        for host in self.urls.hosts:
            if host.batch is not None:
                yield from (host.url(k) for k in range(host.size))

    def __len__(self) -> int:
        return len(self.said) + sum(host.size for host in self.urls.hosts if host.batch is not None)
