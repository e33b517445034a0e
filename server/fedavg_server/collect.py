"""Collecting a round: the sampled clients' work, as the strategy aggregates it
and as the round record lists it.

``PlainCollector`` asks each client's /train and keeps each reply (the
seed's way); ``BatchedCollector`` asks each client host once for all its
sampled clients (/batch/train) and keeps each client's row as the reply it
would have sent, so that everything downstream is the same; ``SecureCollector`` runs a round of secure aggregation
(``secure``) and keeps only the sum, which the run's aggregator turns into
the one input it needs. Each returns what it gathered, the clients it
dropped with their reasons, the losses the clients measured on θ_t, and its
own part of the round record: who took part, N, the terms.
"""
from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedavg.batch_wire import (
    BATCH_EVALUATE_PATH,
    batch_reply_limit,
    parse_absent,
    parse_batch_evaluate_reply,
    parse_batch_reply,
    rows_usable,
)
from fedavg.model import Theta, split
from fedavg.privacy import DPAverage
from fedavg.strategies import Result, Strategy
from fedavg.strict_json import ProtocolError, model_json
from fedavg.trace import fmt
from fedavg.wire import MAX_DATA_SIZE, CannotDo, parse_evaluate_reply, parse_train_reply

from .privacy_settings import SecAggSettings
from .records import SUMMARY_ABOVE, Dropped, participant_json, terms_json
from .roster import Roster
from .transport import Reply

Body = Callable[[str], dict[str, Any]]  # url → its request body


@dataclass(frozen=True)
class Bodies:
    """A round's /train bodies: ``common`` (θ_t, the round, what the strategy
    sends) with each client's config, which differs by its seed alone
    (``config_for(seed)``, the mini-batch shuffle's, from ``seeds``). Called
    with a URL it is that client's body; ``shared`` is the one body a host's
    /batch/train carries for all its clients (their seeds beside it), built
    once, not once per client."""

    common: dict[str, Any]
    config_for: Callable[[int | None], dict[str, Any]]
    seeds: Mapping[str, int]

    def __call__(self, url: str) -> dict[str, Any]:
        return {**self.common, "config": self.config_for(self.seeds[url])}

    @functools.cached_property
    def shared(self) -> dict[str, Any]:
        return {**self.common, "config": self.config_for(None)}

    def batch(self, urls: list[str], ks: list[int]) -> dict[str, Any]:
        """The /batch/train body for clients ``ks`` (at ``urls``): the shared
        body, ``clients``, and each one's seed when its config asks for
        mini-batches (else unused, and not sent)."""
        out = {**self.shared, "clients": ks}
        if self.shared["config"].get("batch_size") is not None:
            out["seeds"] = [self.seeds[url] for url in urls]
        return out
log = logging.getLogger("fedavg.server")


class RoundFailed(Exception):
    """The round cannot count, and nothing of it was averaged; the message says
    why. ``diverged``: because clients' numbers blew up (the run then ends
    diverged, not failed)."""

    def __init__(self, why: str, diverged: bool = False) -> None:
        super().__init__(why)
        self.diverged = diverged


@dataclass
class Collected:
    """What a collector gathered in one round."""

    results: list[Result]  # what the strategy aggregates
    dropped: list[Dropped]
    losses: list[tuple[float, int]]  # (L_k, n_k) of θ_t: the previous round's federated loss
    contributors: int  # the clients whose work is in ``results``
    participants: list[dict[str, Any]]  # the record's list of who took part
    N: int
    terms: list[dict[str, Any]] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)  # written before the strategy's math (the unmasking)
    parts: dict[str, Any] = field(default_factory=dict)  # the collector's own record fields
    loss_clients: int | None = None  # how many clients' losses ``losses`` holds (None: one pair each)


class Collector(Protocol):
    def collect(self, r: int, theta: Theta, sample: list[str], body_for: Bodies) -> Collected:
        """Round r's work of the sampled clients (RoundFailed if the round cannot count)."""

    def evaluate(self, theta: Theta) -> tuple[list[tuple[float, int]], str, int]:
        """(L_k, n_k) of θ on every client, where they come from, and how many
        clients' losses they hold (RoundFailed: not measured)."""


@dataclass
class PlainCollector:
    """Each sampled client's /train reply, parsed by what its strategy declares."""

    roster: Roster
    strategy: Strategy
    timeout_s: float

    def collect(self, r: int, theta: Theta, sample: list[str], body_for: Body) -> Collected:
        got = self.gather(sample, body_for)
        return collected([got[url] for url in sample], self.strategy)

    def gather(self, urls: list[str], body_for: Body) -> dict[str, Result | Dropped]:
        """Each client's /train: url → its Result, or why it was dropped."""
        replies = self.roster.transport.call_all(urls, "POST", "/train", self.timeout_s, body_for)
        got: dict[str, Result | Dropped] = {}
        for reply in replies:
            try:
                got[reply.url] = self._result(reply)
            except CannotDo as e:  # its numbers mean something else: nothing is averaged
                raise RoundFailed(f"{self.roster.names[reply.url]} cannot run strategy {self.strategy.name}: "
                                  f"{e}; nothing was averaged") from None
            except ProtocolError as e:
                got[reply.url] = Dropped(self.roster.names[reply.url], reply.url, str(e), reply.diverged)
        return got

    def _result(self, reply: Reply) -> Result:
        """A reply that can join the aggregate, or ProtocolError saying why not."""
        if not reply.ok:
            raise ProtocolError(reply.reason)
        roster = self.roster
        parsed = parse_train_reply(reply.body, roster.num_features, self.strategy.name)
        said = roster.sizes.get(reply.url)
        if said is not None and parsed["data_size"] != said:
            # n_k is the client's vote in the average: a count that changes
            # between /health and /train is not one to trust.
            raise ProtocolError(f"reply.data_size: {parsed['data_size']} differs from the {said} its /health reported")
        if roster.num_features is None and parsed["theta"] is not None:
            roster.num_features = len(parsed["theta"]) - 1
        if parsed["client_id"]:
            roster.names[reply.url] = parsed["client_id"]
        return Result(roster.names[reply.url], reply.url, parsed["data_size"], parsed["theta"], parsed["extra"],
                      parsed["metrics"])

    def evaluate(self, theta: Theta) -> tuple[list[tuple[float, int]], str, int]:
        """One /evaluate wave; a client that cannot answer is left out, and said so.
        A hosted population's clients are evaluated by their host in one call
        (/batch/evaluate: Σ n_k·L_k and N over its clients, one pair)."""
        body = {"global_model": model_json(*split(theta))}
        clients = self.roster.clients
        replies = self.roster.transport.call_all(list(clients.own), "POST", "/evaluate", self.timeout_s,
                                                 lambda url: body)
        losses, count = [], 0
        for reply in replies:
            try:
                if not reply.ok:
                    raise ProtocolError(reply.reason)
                parsed = parse_evaluate_reply(reply.body)
                losses.append((parsed["loss"], parsed["data_size"]))
                count += 1
            except ProtocolError as e:
                log.info("%s  not evaluated: %s", self.roster.names[reply.url], e)
        hosts = self.roster.transport.call_all([h.base + BATCH_EVALUATE_PATH for h in clients.hosts], "POST", "",
                                               self.timeout_s, lambda url: body) if clients.hosts else []
        for host, reply in zip(clients.hosts, hosts):
            try:
                if not reply.ok:
                    raise ProtocolError(reply.reason)
                n, total = parse_batch_evaluate_reply(reply.body, host.size)
                if n:
                    losses.append((total / n, n))
                    count += reply.body["clients"]
            except ProtocolError as e:
                log.info("the %d clients of %s  not evaluated: %s", host.size, host.base, e)
        return losses, "final /evaluate", count


def collected(got: list[Result | Dropped], strategy: Strategy) -> Collected:
    """A round's Collected from each sampled client's Result or drop, in the sample's order."""
    results = [g for g in got if isinstance(g, Result)]
    losses = [(p.metrics["loss_before"], p.n) for p in results if p.metrics and "loss_before" in p.metrics]
    # (a round summarised for its size records no term: not worth building 10,000 of them)
    return Collected(results, [g for g in got if isinstance(g, Dropped)], losses, len(results),
                     [participant_json(p, strategy.replies) for p in results], sum(p.n for p in results),
                     terms_json(results) if len(results) <= SUMMARY_ABOVE else [])


@dataclass
class BatchedCollector:
    """Each client host once per round for all of its sampled clients
    (``POST /batch/train``, the hosts concurrently), every client whose
    /health named its host's batched /train; anyone else by its own /train
    (``plain``). Each row of a host's reply becomes the ``Result`` that
    client's own /train reply would have given (the same n_k check against
    /health, the same metrics), so the strategies, the robust rules and
    the record downstream cannot tell the paths apart. A host that fails, or
    sends a reply that cannot be read, drops all its sampled clients, each
    named, with the host's reason; a row its host flags diverged is dropped
    as a client's 422 is (``Dropped.diverged``: the run then ends diverged);
    a row that holds what JSON could not carry, with the reason
    ``wire.parse_train_reply`` would give."""

    plain: PlainCollector

    def collect(self, r: int, theta: Theta, sample: list[str], body_for: Bodies) -> Collected:
        roster = self.plain.roster
        # batched /train URL → its sampled clients and their k there, in the sample's order
        hosts: dict[str, tuple[list[str], list[int]]] = {}
        alone = []
        for url in sample:
            where = roster.batch.get(url)
            if where is None:
                alone.append(url)
            else:
                urls, ks = hosts.setdefault(where[0], ([], []))
                urls.append(url)
                ks.append(where[1])
        got = self.plain.gather(alone, body_for)
        d = roster.num_features if roster.num_features is not None else len(theta) - 1
        limit = max((batch_reply_limit(len(urls), d) for urls, _ in hosts.values()), default=0)
        replies = roster.transport.call_all(list(hosts), "POST", "", self.plain.timeout_s,
                                            lambda host: body_for.batch(*hosts[host]), limit)
        for reply, (urls, ks) in zip(replies, hosts.values()):
            got |= self._rows(reply, urls, ks, d)
        return collected([got[url] for url in sample], self.plain.strategy)

    def _rows(self, reply: Reply, urls: list[str], ks: list[int], d: int) -> dict[str, Result | Dropped]:
        """Each client's Result or drop from its host's reply."""
        roster, strategy = self.plain.roster, self.plain.strategy
        names = roster.names
        try:
            if not reply.ok:
                raise ProtocolError(reply.reason)
            batch, why = parse_batch_reply(reply.body, ks, d, strategy.name)
            absent = parse_absent(reply.body, ks)
        except ProtocolError as e:
            return {url: Dropped(names[url], url, f"its host's {reply.url}: {e}", reply.diverged) for url in urls}
        problems = rows_usable(batch)
        got: dict[str, Result | Dropped] = {}
        for j, url in enumerate(urls):
            n, said = int(batch.n[j]), roster.sizes.get(url)
            if ks[j] in absent:  # no result at all, as a client that never answered
                got[url] = Dropped(names[url], url, f"{absent[ks[j]]} (its host's {reply.url})")
            elif batch.diverged[j]:
                got[url] = Dropped(names[url], url, f"{why.get(ks[j], 'diverged')} (its host's {reply.url})", True)
            elif problems[j] or (said is not None and n != said):
                got[url] = Dropped(names[url], url, problems[j] or f"reply.data_size: {n} differs from the {said} "
                                                                   "its /health reported")
            else:
                metrics = {"loss_after": float(batch.loss_after[j])}
                if math.isfinite(batch.loss_before[j]) and batch.loss_before[j] >= 0:
                    metrics["loss_before"] = float(batch.loss_before[j])
                if batch.within_clip is not None:
                    metrics["within_clip"] = float(batch.within_clip[j])
                local = batch.local.local(j)
                got[url] = Result(names[url], url, n, local.theta, local.extra, metrics)
        return got

    def evaluate(self, theta: Theta) -> tuple[list[tuple[float, int]], str, int]:
        return self.plain.evaluate(theta)


@dataclass
class SecureCollector:
    """A round of secure aggregation: the server learns Σ_k x_k = [Σ w_k·θ_k,
    Σ w_k, Σ n_k·L_k, N, Σ bit_k] and nothing of any one client. The run's
    aggregator turns the sum into the one model it combines alone to the
    same result (``from_sum``: the mean for FedAvg's average, θ_t + Σ Δ_k
    for DP-FedAvg, which divides by M itself); the federated loss is
    Σ n_k·L_k / N.

    What it can check of a sum it cannot see into, it does (``_check``):
    each slot against what honest inputs give over the survivors U3. A sum
    that fails fails the round, naming secure aggregation: one input was not
    an honest client's, and the protocol hides whose."""

    roster: Roster
    strategy: Strategy
    timeout_s: float
    secagg: SecAggSettings
    run_name: str  # names the session to the clients, with the round and a fresh token

    @property
    def equal_weights(self) -> bool:
        """DP-FedAvg sums the updates unweighted: each client's w_k is 1, not n_k."""
        return isinstance(self.strategy.combine, DPAverage)

    def collect(self, r: int, theta: Theta, sample: list[str], body_for: Body) -> Collected:
        secure = self._sum(f"round {r}", sample, body_for, len(theta) - 1)
        d = self.roster.num_features or len(theta) - 1
        total = secure.total
        self._check(total, d, secure.survivors, training=True)
        weight = float(total[d + 1])
        model, line = self.strategy.combine.from_sum(total[: d + 1], weight, theta)
        n = max(1, round(weight))
        loss = float(total[d + 2] / total[d + 3])
        # (Σ bit_k is not passed on: every client sends 0, and adaptive clipping, which would read it,
        # is refused with local_noise, which DP under secure aggregation requires)
        result = Result(f"the secure sum of {len(secure.survivors)} clients", "", n, model, {},
                        {"loss_before": loss})
        # The server saw only the sum: the participants without a number of their own, N from the sum.
        return Collected([result], secure.dropped, [(loss, n)], len(secure.survivors),
                         secure.participants(secure.names), n, [], [*secure.trace, line],
                         {"secagg": {"survivors": len(secure.survivors)}}, len(secure.survivors))

    def evaluate(self, theta: Theta) -> tuple[list[tuple[float, int]], str, int]:
        """One more secure sum, of n_k·L_k and n_k: the federated loss without any client's own."""
        body = {"global_model": model_json(*split(theta)), "evaluate": True}
        d = len(theta) - 1
        secure = self._sum("evaluation", self.roster.urls, lambda url: body, d)
        total = secure.total
        self._check(total, d, secure.survivors, training=False)
        loss, n = float(total[d + 2] / total[d + 3]), max(1, round(float(total[d + 3])))
        return [(loss, n)], "a secure sum of n_k·L_k over the clients", len(secure.survivors)

    def _check(self, total: np.ndarray, d: int, survivors: list[str], training: bool) -> None:
        """RoundFailed unless every slot the run reads is one honest inputs give: N = Σ n_k
        over U3 (each survivor's n_k from /health, or anything from 1 to 10¹² for one that did
        not say), Σ n_k·L_k ≥ 0, and for a training round Σ w_k in that range and equal to the
        N of the sum (w_k = n_k; 1 each under DP: |U3|) and Σ bit_k in [0, |U3|]. Fixed point
        carries these integers exactly, so an honest sum meets them exactly; a lie in a weight,
        or words that are not a masked input, would have to hit them to pass. (A lie in a
        model cannot be seen, nor one in n_k told to w_k and N alike by a client whose /health
        did not say it: see PRIVACY.md.)"""
        m = len(survivors)
        known = [self.roster.sizes[url] for url in survivors if url in self.roster.sizes]
        low, high = sum(known) + (m - len(known)), sum(known) + (m - len(known)) * MAX_DATA_SIZE
        said = f"{low}, the n_k their /health reported" if low == high else \
            f"between {low} and {high} ({m - len(known)} of them never said their n_k)"
        problems = []
        n, losses = float(total[d + 3]), float(total[d + 2])
        if not low <= n <= high:
            problems.append(f"N = Σ n_k = {fmt(n)} where the {m} survivors' is {said}")
        if losses < 0:
            problems.append(f"Σ n_k·L_k = {fmt(losses)} is negative, and no loss is")
        if training:
            weight, bits = float(total[d + 1]), float(total[d + 4])
            if self.equal_weights and weight != m:
                problems.append(f"Σ w_k = {fmt(weight)} where DP's equal weights give |U3| = {m}")
            elif not self.equal_weights and not low <= weight <= high:
                problems.append(f"Σ w_k = {fmt(weight)} where the {m} survivors' is {said}")
            elif not self.equal_weights and weight != n:
                problems.append(f"Σ w_k = {fmt(weight)} differs from N = Σ n_k = {fmt(n)}, and each honest "
                                "client's w_k is its n_k")
            if not 0 <= bits <= m:
                problems.append(f"the count of updates within the clip bound Σ bit_k = {fmt(bits)} is outside "
                                f"[0, |U3| = {m}]")
        if problems:
            raise RoundFailed("secure aggregation: the sum of the survivors' inputs is not one honest clients "
                              "send: " + "; ".join(problems) + ". One client's input is not what it should be (a "
                              "weight or a count it lied about, or words that are not a masked input), and "
                              "secure aggregation hides whose; nothing of this round was averaged")

    def _sum(self, what: str, urls: list[str], body_for: Body, d: int) -> Any:
        from .secure import SecureRoundFailed, secure_sum  # cryptography: only for runs that use it

        def session() -> str:
            # A fresh session each attempt: a round restarted after a crash, or without a client whose
            # shares did not open, gets fresh keys.
            return f"{self.run_name}|{what}|{secrets.token_hex(8)}"
        try:
            return secure_sum(self.roster.transport, urls, self.roster.names, session, self.secagg.threshold,
                              self.secagg.scale_bits, (self.roster.num_features or d) + 5, self.timeout_s,
                              body_for, self.secagg.neighbors, self.equal_weights)
        except SecureRoundFailed as e:
            raise RoundFailed(str(e), e.diverged) from None
