"""The server's side of secure aggregation: one round of Bonawitz et al.'s
protocol over the clients' /secagg/* endpoints (``fedavg.secure_client``),
ending in the sum of their inputs and nothing else; over a graph of k
neighbours per client (SecAgg+, Bell et al.), the complete graph when k is
None or at least |U1| − 1.

Five waves of calls, each to the clients still in:

    U1 = those that trained and advertised keys      (POST /secagg/advertise)
    the graph: Harary's H(k, |U1|) over U1 in an order drawn from OS entropy
    U2 = those of U1 that sent their sealed shares   (POST /secagg/share, each given N[i]'s keys)
    the shares sealed to each, delivered and opened   (POST /secagg/receive)
    U3 = those of U2 whose masked input arrived      (POST /secagg/masked)
    the unmasking: U3's shares of each b_i (i ∈ U3) and of each s_sk_j (j ∈ U2 \\ U3),
    each client asked about its own neighbourhood only

Fewer than t clients at any step, fewer than t left in a neighbourhood
whose secret is needed, or survivors cut apart in the graph
(``fedavg.secagg_graph.unmaskable``), and the round fails before any share
is asked for: nothing is unmasked. A client whose message is malformed, whose
keys are bad or whose masked vector looks unmasked is dropped with its
reason, and the protocol goes on without it. A client whose sealed shares a
holder cannot open is named by that holder at /secagg/receive (AES-GCM under
a key only the two of them hold, the pair in the AAD), with its c_sk as the
proof: the server derives the pair's key itself and tries the ciphertext it
relayed (``secagg.accusation_holds``). If it does not open, the sender is
dropped and the round starts again without it, in a new session with fresh
keys (once; named senders in the second attempt fail the round); if it
does, or the c_sk is not the accuser's, the accuser is dropped instead, and
the round goes on. No masked input exists in a session whose shares were
accused (the masked wave comes after), so the c_sk shown unmasks nothing.
The keys, shares and masked vectors live in this call's memory
only; the round record keeps the trace (a masked vector's first words, the
unmasking, the sum).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from fedavg import secagg
from fedavg.secagg_graph import closed, harary_graph, unmaskable
from fedavg.strict_json import CONTROL, is_name
from fedavg.trace import TRACE_TERMS

from .records import Dropped
from .transport import Reply, Transport

# A masked word is uniform on [0, 2^64); an input in the clear is a small
# fixed-point number, within 2^56 of 0 mod 2^64. A vector whose every word
# is that close was not masked (for a masked one the odds are 2^-7 per word).
CLEAR = 2**56


class SecureRoundFailed(Exception):
    """Fewer than t clients are left: the round cannot be unmasked (and nothing
    was). ``diverged``: some were lost because their numbers blew up."""

    def __init__(self, why: str, diverged: bool = False) -> None:
        super().__init__(why)
        self.diverged = diverged


class SharesDidNotOpen(SecureRoundFailed):
    """Holders named senders whose sealed shares they could not open, and the
    server could not open them either: this session cannot go on (nothing was
    unmasked). ``culprits``: each sender dropped, with whom it failed, and
    each holder that accused falsely in the same wave."""

    def __init__(self, reason: str, culprits: list[Dropped]) -> None:
        super().__init__(reason)
        self.culprits = culprits


class Accusation(Exception):
    """A holder's /secagg/receive reply names senders whose shares did not open, and the server
    could not open them either (kept in ``accused``)."""


def reason_from_wire(value: Any, field: str) -> str:
    """Why a holder could not open a sender's shares: text, cut to 200 characters, each control
    character written as its escape (\\u000a), as it reaches the log and the round record."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be text saying why the shares did not open")
    return CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", value[:200])


@dataclass
class SecureSum:
    """What a round of secure aggregation gave: Σ_k x_k over U3, who took
    part (U3's URLs), who was dropped at which step and why, and the trace."""

    total: np.ndarray
    survivors: list[str]
    dropped: list[Dropped] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # url → client_id

    def participants(self, names: dict[str, str]) -> list[dict[str, Any]]:
        """U3 as a round record lists it: no number of their own (data_size null: the server learns only N)."""
        return [{"client_id": names.get(url, url), "url": url, "data_size": None} for url in self.survivors]


def secure_sum(transport: Transport, urls: Sequence[str], names: dict[str, str], session: Callable[[], str],
               threshold: int, scale_bits: int, length: int, timeout_s: float,
               train_body: Callable[[str], dict[str, Any]], neighbors: int | None = None,
               equal_weights: bool = False) -> SecureSum:
    """Σ_k x_k over the clients of ``urls`` that survive a protocol run
    (``session()`` names each attempt, fresh each time); each input has
    ``length`` words, each client ``neighbors`` = k neighbours (None: all
    the others); ``equal_weights``: each client's w_k is 1, not n_k. The
    senders of shares that did not open (at their holders and at the server)
    are dropped and the run starts again without them, once. Raises
    SecureRoundFailed below t clients, overall or where a needed secret's
    shares are held, or when shares fail to open again."""
    culprits: list[Dropped] = []
    while True:
        gone = {d.url for d in culprits}
        try:
            # (the first attempt's dropped start the second's list: a failure names them too)
            result = _attempt(transport, [u for u in urls if u not in gone], names, session(), threshold, scale_bits,
                              length, timeout_s, train_body, neighbors, equal_weights, list(culprits))
        except SharesDidNotOpen as e:
            if culprits:  # once only: a round is not retried for as long as someone sends garbage
                raise SecureRoundFailed(f"{e}, in the round's second attempt too (the first dropped "
                                        f"{', '.join(d.client_id for d in culprits)})") from None
            culprits = e.culprits
            continue
        if culprits:
            result.trace.insert(1, "started again, in a new session with fresh keys, without "
                                + ", ".join(f"{d.client_id} ({d.reason})" for d in culprits[:TRACE_TERMS])
                                + (f", … ({len(culprits)})" if len(culprits) > TRACE_TERMS else ""))
        return result


def _attempt(transport: Transport, urls: Sequence[str], names: dict[str, str], session: str, threshold: int,
             scale_bits: int, length: int, timeout_s: float, train_body: Callable[[str], dict[str, Any]],
             neighbors: int | None, equal_weights: bool, earlier: list[Dropped]) -> SecureSum:
    """One protocol run among ``urls`` (client i is urls[i − 1]) in ``session``; ``earlier``:
    those a previous attempt at this round dropped, listed first among this one's."""
    index = {url: i for i, url in enumerate(urls, start=1)}
    url_of = {i: url for url, i in index.items()}
    dropped: list[Dropped] = earlier
    accused: dict[int, dict[int, str]] = {}  # sender j → {holder that could not open j's shares: why}
    liars: set[int] = set()  # holders whose accusation the server disproved, or that gave no proof

    def drop(url: str, step: str, reason: str, diverged: bool = False) -> None:
        dropped.append(Dropped(names.get(url, url), url, f"secagg {step}: {reason}", diverged))

    def wave(step: str, members: list[int], body: Callable[[int], dict[str, Any]],
             parse: Callable[[int, dict[str, Any]], Any]) -> dict[int, Any]:
        """Call /secagg/<step> on ``members``; {i: parse(i, reply)} for those
        whose reply parses, the others dropped with the reason."""
        replies: list[Reply] = transport.call_all([url_of[i] for i in members], "POST", f"/secagg/{step}", timeout_s,
                                             lambda url: {"session": session, **body(index[url])})
        got = {}
        for i, reply in zip(members, replies):
            if not reply.ok:
                drop(url_of[i], step, reply.reason, reply.diverged)
                continue
            try:
                got[i] = parse(i, reply.body)
            except Accusation:
                pass  # an honest holder, naming whose shares did not open: below, once all are in
            except ValueError as e:  # (ProtocolError too)
                drop(url_of[i], step, str(e))
        if accused:
            culprits = [culprit(j, by) for j, by in sorted(accused.items())]
            raise SharesDidNotOpen(f"after /secagg/{step}: the sealed shares of "
                                   f"{', '.join(d.client_id for d in culprits[:TRACE_TERMS])} did not open at their "
                                   "holders; nothing was revealed",
                                   culprits + [d for d in dropped if d.url in {url_of[i] for i in liars}])
        if len(got) < threshold:
            fail(f"after /secagg/{step} only {len(got)} client(s) are left, fewer than the threshold t={threshold}")
        return got

    def culprit(j: int, by: dict[int, str]) -> Dropped:
        """Sender j, dropped: the holders that could not open its shares, and why the first could not."""
        holders = [names.get(url_of[h], url_of[h]) for h in sorted(by)]
        shown = ", ".join(holders[:TRACE_TERMS]) + (f", … ({len(holders)})" if len(holders) > TRACE_TERMS else "")
        return Dropped(names.get(url_of[j], url_of[j]), url_of[j],
                       f"secagg share: its sealed shares did not open at {shown} ({by[min(by)]}), nor at the server "
                       "with the key they revealed")

    def fail(why: str) -> NoReturn:
        shown = "; ".join(f"{d.client_id}: {d.reason}" for d in dropped[:TRACE_TERMS])
        more = f"; … {len(dropped) - TRACE_TERMS} more" if len(dropped) > TRACE_TERMS else ""
        raise SecureRoundFailed(f"{why}: the round cannot be unmasked, and nothing was revealed ({len(dropped)} "
                                f"dropped: {shown}{more})", diverged=any(d.diverged for d in dropped))

    def enough(step: str, u2: list[int], u3: list[int]) -> None:
        """Every secret the unmasking will need keeps t holders in its neighbourhood, and U3 is connected."""
        problems = unmaskable(graph, u2, u3, threshold)
        if problems:
            more = f"; … {len(problems) - 3} more" if len(problems) > 3 else ""
            fail(f"after /secagg/{step} a neighbourhood has fewer than the threshold t={threshold} clients left "
                 f"or the survivors' graph is cut: " + "; ".join(problems[:3]) + more)

    seen: dict[bytes, int] = {}  # every public key advertised so far → its client

    def advertised(i: int, body: dict[str, Any]) -> dict[str, bytes]:
        if body.get("length") != length:
            raise ValueError(f"reply.length: its input has {body.get('length')!r} words, this round's have {length}")
        if is_name(body.get("client_id")):  # (a name with a control character would forge log lines)
            names[url_of[i]] = body["client_id"]
        keys = secagg.keys_from_wire(body.get("keys"), "reply.keys")
        if "b_commit" not in keys:
            raise ValueError("reply.keys.b_commit: missing")
        for name in ("c_pk", "s_pk"):
            # One exchange with a throwaway key: a point no one can agree with (of small order) is
            # refused here, before the other clients use it and fail on it.
            secagg.agree(secagg.new_keypair()[0], keys[name], secagg.MASK, b"check", f"reply.keys.{name}")
            if keys[name] in seen:
                raise ValueError(f"reply.keys.{name}: the same key as client {seen[keys[name]]} sent")
            seen[keys[name]] = i
        return keys

    public = wave("advertise", sorted(url_of), lambda i: {**train_body(url_of[i]), "index": i, "threshold": threshold,
                                                          "scale_bits": scale_bits,
                                                          **({"equal_weights": True} if equal_weights else {})},
                  advertised)
    keys = secagg.to_wire(public)
    u1 = sorted(public)
    # A fresh order from OS entropy each round, never the run's seed: who neighbours whom is
    # decided only now, after U1 is known, and a replayed seed cannot foresee it.
    k = len(u1) - 1 if neighbors is None else min(neighbors, len(u1) - 1)
    graph = harary_graph(random.SystemRandom().sample(u1, len(u1)), k)

    def shared(i: int, body: dict[str, Any]) -> dict[int, bytes]:
        sealed = secagg.indexed_from_wire(body.get("shares"), "reply.shares", secagg.bytes_from_wire)
        if set(sealed) != graph[i]:
            raise ValueError(f"reply.shares: sealed for clients {sorted(sealed)}, not for every neighbour of "
                             f"client {i} {sorted(graph[i])}")
        return sealed

    sealed = wave("share", u1, lambda i: {"peers": {str(j): keys[str(j)] for j in sorted(closed(graph, i))}},
                  shared)
    u2 = sorted(sealed)
    enough("share", u2, u2)

    def inbox(i: int) -> dict[int, bytes]:
        """What the others of U2 ∩ N(i) sealed to i."""
        return {j: sealed[j][i] for j in told(i, u2) if j != i}

    def opened(i: int, body: dict[str, Any]) -> bool:
        if "bad_shares" in body:
            try:
                judge(i, secagg.indexed_from_wire(body["bad_shares"], "reply.bad_shares", reason_from_wire),
                      body.get("c_sk"))
            except ValueError:
                liars.add(i)  # (dropped, and left out of a new attempt with the senders it truly named)
                raise
        if body.get("opened") != len(inbox(i)):
            raise ValueError(f"reply.opened: {body.get('opened')!r}, not the {len(inbox(i))} share pairs it was sent")
        return True

    def judge(i: int, bad: dict[int, str], c_sk: Any) -> NoReturn:
        """Each sender i names, tried with i's c_sk: Accusation when some do not open, ValueError
        (i is dropped) when c_sk is not i's or one opens: a holder that accuses falsely is the
        one lying. (What is true of another sender still counts: it is dropped too.)"""
        sent = set(inbox(i))
        if not bad or not set(bad) <= sent:
            raise ValueError(f"reply.bad_shares: names clients {sorted(bad)}, not some of those that sealed "
                             f"shares to client {i} {sorted(sent)}")
        key = secagg.bytes_from_wire(c_sk, "reply.c_sk", secagg.KEY_BYTES)
        try:
            held = {j: secagg.accusation_holds(key, public, i, j, sealed[j][i], session.encode()) for j in sorted(bad)}
        except ValueError as e:  # not the key behind its c_pk: no proof
            raise ValueError(f"reply.{e}: its accusation is unproven") from None
        for j in (j for j, holds in held.items() if holds):
            accused.setdefault(j, {})[i] = bad[j]
        if not all(held.values()):
            false = [names.get(url_of[j], url_of[j]) for j, holds in held.items() if not holds]
            raise ValueError(f"reply.bad_shares: a false accusation: the sealed shares of {', '.join(false)} open "
                             "under the c_sk it revealed")
        raise Accusation

    def masked(i: int, body: dict[str, Any]) -> np.ndarray:
        y = secagg.vector_from_wire(body.get("masked"), "reply.masked", length)
        if np.all(np.minimum(y, np.uint64(0) - y) < np.uint64(CLEAR)):
            # Its numbers are not written anywhere: it sent them in the clear, the server keeps them out.
            raise ValueError("reply.masked: every word is a small fixed-point number, not a masked one: the input "
                             "was sent unmasked, and is left out")
        return y

    def told(i: int, among: list[int]) -> list[int]:
        return sorted(closed(graph, i).intersection(among))

    received = wave("receive", u2, lambda i: {"survivors": told(i, u2), "received": secagg.to_wire(inbox(i))},
                    opened)
    ys = wave("masked", sorted(received), lambda i: {"survivors": told(i, u2), "parties": len(u1)}, masked)
    u3 = sorted(ys)
    gone = [j for j in u2 if j not in ys]
    enough("masked", u2, u3)

    def revealed(i: int, body: dict[str, Any]) -> dict[str, dict[int, bytes]]:
        reveal = secagg.reveal_from_wire(body, "reply")
        for kind, asked in (("b", told(i, u3)), ("s_sk", told(i, gone))):
            if sorted(reveal[kind]) != asked:
                raise ValueError(f"reply.{kind}: shares for clients {sorted(reveal[kind])}, asked for {asked}")
        return reveal

    reveals = wave("unmask", u3, lambda i: {"survivors": told(i, u3), "dropped": told(i, gone)}, revealed)
    b_shares, s_shares = secagg.collect_shares(reveals)
    try:
        total, trace = secagg.unmask_sum(ys, b_shares, s_shares, public, survivors_u2=u2,
                                         session=session.encode(), threshold=threshold, length=length,
                                         scale_bits=scale_bits, neighbors=graph)
    except secagg.SecAggError as e:
        culprits = ", ".join(names.get(url_of[i], url_of[i]) for i in e.clients if i in url_of)
        raise SecureRoundFailed(f"unmasking failed: {e}" + (f" (clients: {culprits})" if culprits else "")) from None
    who = {i: names.get(url_of[i], url_of[i]) for i in u1}
    trace = [f"secure aggregation, t={threshold}, inputs x_k = [w_k·θ_k, w_k, n_k·L_k, n_k, bit_k] in fixed point "
             f"(2^-{scale_bits}): clients " + ", ".join(f"{i} = {who[i]}" for i in u1[:10])
             + (f", … ({len(u1)})" if len(u1) > 10 else "")
             + ("" if k == len(u1) - 1 else f"; SecAgg+: k={k} neighbours each, Harary's H({k}, {len(u1)}) over "
                "U1 in an order drawn from OS entropy, t of a neighbourhood's k + 1 needed"), *trace]
    return SecureSum(total, [url_of[i] for i in u3], dropped, trace, {url_of[i]: who[i] for i in u3})
