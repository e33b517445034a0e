"""Who a run's clients are: their names, the n_k each /health reported (or
their host's /population, for a population reached by index), the number of
features they agree on, and whether each can do what the run asks."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fedavg.batch_wire import POPULATION_PATH
from fedavg.strategies import Strategy
from fedavg.strict_json import ProtocolError
from fedavg.wire import SEED_STRATEGY, parse_health_reply

from .hosted import (
    ClientBatch,
    ClientSizes,
    ClientURLs,
    as_client_urls,
    parse_population,
    population_reply_limit,
)
from .transport import Transport

log = logging.getLogger("fedavg.server")
HEALTH_TIMEOUT_S = 5.0  # at most, for the probe before round 1


class Unfit(Exception):
    """Some client cannot take part as the run asks: nothing was sent yet."""


@dataclass
class Roster:
    """The run's view of its clients. ``names`` is the transport's (a name
    stays known across runs); ``sizes`` and ``num_features`` are what the
    clients said, checked again against every reply. A hosted population's
    clients are in ``sizes`` and ``batch`` by their host's arrays
    (``hosted``): its /population vouches for them all, no client is asked
    its own /health."""

    transport: Transport
    clients: ClientURLs = field(init=False)  # the transport's URLs, as parts (own URLs, hosted populations)
    sizes: ClientSizes = field(init=False)  # url → n_k as its /health (its host's /population) reported it
    num_features: int | None = None
    # url → (its host's batched /train URL, its id there): the clients whose /health (host) said their host batches
    batch: ClientBatch = field(init=False)

    def __post_init__(self) -> None:
        self.clients = as_client_urls(self.transport.urls)
        self.sizes, self.batch = ClientSizes(self.clients), ClientBatch(self.clients)

    @property
    def urls(self) -> list[str]:
        return self.transport.urls

    @property
    def names(self) -> dict[str, str]:
        return self.transport.names

    def probe(self, strategy: type[Strategy], secure: bool, timeout_s: float) -> None:
        """Learn each client's name, n_k and feature count from /health, and
        make sure every client that answers can run the strategy (and speak
        secure aggregation when asked). Seed clients have no /health: they
        keep their URL as their name and can run FedAvg only. Unfit names
        every client that cannot."""
        wait = min(timeout_s, HEALTH_TIMEOUT_S)
        replies = self.transport.call_all(list(self.clients.own), "GET", "/health", wait)
        dims, unable, unmasked = set(), [], []
        self.batch.said.clear()  # (a host restarted without batching is called client by client)
        hosts = self.clients.hosts
        # (no call at all without hosted populations: a transport is asked only what it was asked before)
        described = self.transport.call_all([host.base for host in hosts], "GET", POPULATION_PATH, wait,
                                            max_bytes=population_reply_limit(max(h.size for h in hosts))) \
            if hosts else []
        for host, reply in zip(hosts, described):
            if not reply.ok:  # down: its clients may come back, as a client of its own may; its facts stand
                log.info("the client host %s: %s (its %d clients keep what it said before)", host.base,
                         reply.reason, host.size)
                continue
            try:
                now = parse_population(host.base, reply.body)
            except ProtocolError as e:
                raise Unfit(f"before round 1: the client host {host.base}{POPULATION_PATH}: {e}") from None
            if now.size != host.size or now.first != host.first:
                raise Unfit(f"before round 1: the client host {host.base} now holds {now.size} clients from "
                            f"#{now.first + 1}, not the {host.size} from #{host.first + 1} this server was "
                            "started with: restart the server to take them")
            host.sizes, host.batch, host.attackers = now.sizes, now.batch, now.attackers
            host.strategies, host.secagg, host.num_features = now.strategies, now.secagg, now.num_features
            dims.add(now.num_features)
            if strategy.name != SEED_STRATEGY and strategy.name not in now.strategies:
                unable.append(f"the {now.size} clients of {host.base} (its /population does not list it)")
            if secure and not now.secagg:
                unmasked.append(f"the {now.size} clients of {host.base}")
        for reply in replies:
            facts = parse_health_reply(reply.body) if reply.ok else None
            if facts is not None:
                if facts["batch"]:
                    path, k = facts["batch"]
                    where = urlsplit(reply.url)
                    self.batch.said[reply.url] = (f"{where.scheme}://{where.netloc}{path}", k)
                if facts["client_id"]:
                    self.names[reply.url] = facts["client_id"]
                if facts["data_size"]:
                    self.sizes[reply.url] = facts["data_size"]
                if facts["num_features"]:
                    dims.add(facts["num_features"])
            # A client that is down may come back; one that answers must say it can.
            answered = reply.ok or reply.status is not None
            can = (facts or {}).get("strategies") or ()
            if strategy.name != SEED_STRATEGY and answered and strategy.name not in can:
                why = "its /health does not list it" if reply.ok else "no /health"
                unable.append(f"{self.names[reply.url]} ({why})")
            if secure and answered and not (facts or {}).get("secagg"):
                unmasked.append(self.names[reply.url])
        if unable:
            raise Unfit(f"before round 1: strategy {strategy.name} is not one these clients can run: "
                        f"{', '.join(unable)}; nothing was averaged")
        if unmasked:
            raise Unfit(f"before round 1: {', '.join(unmasked)} cannot do secure aggregation (its /health does not "
                        "say secagg: true); nothing was sent")
        if len(dims) > 1:
            raise Unfit(f"clients disagree on the number of features: {sorted(dims)}")
        self.num_features = dims.pop() if dims else None
