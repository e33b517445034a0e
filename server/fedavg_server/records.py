"""How a round is written down: the record that GET /runs/<id> returns, the
log prints and the store keeps.

Who took part and what each sent is the collector's to say (``collect``):
each participant with the fields its strategy declares, or under secure
aggregation only their names. The stages add their own parts (the
suspicious updates, the privacy spent); the strategy adds its math and its
state.

A round of more than SUMMARY_ABOVE participants is written as a summary
(``summary_json``): the counts, the weighted sums, the average by groups,
the top contributors and the first few dropped; every client's row goes to
a table of its own (``clients_json``, GET /runs/<id>/rounds/<r>/clients.csv),
not into the record that pages, charts and the log read.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedavg.aggregation import weights
from fedavg.model import Theta, split
from fedavg.strategies import REPLY_FIELDS, Field, Result, State, Step
from fedavg.strategies.fields import MODEL
from fedavg.strict_json import model_json, printable
from fedavg.trace import TRACE_TERMS

# The most participants a round's record lists one by one. Past it a row
# per client is what makes a record big (a 10,000-client round was 3.6 MB of
# JSON and 75 ms to encode), and nobody reads 10,000 rows on a page or in a
# log: the record becomes a summary and the rows go to their own table.
# 100 keeps every run of the seed, the labs and make sim as it was.
SUMMARY_ABOVE = 100
# How many of a summarised round's clients it names: the top contributors by
# weight n_k/N, and the dropped clients (the rest are counted by reason).
TOP_CONTRIBUTORS = TRACE_TERMS
DROPPED_NAMED = TRACE_TERMS
# How many of a summarised round's suspicious updates it lists, the largest
# first (a byzantine tenth of 10,000 clients is 1,000 of them): the summary
# counts them all ("suspicious").
SUSPICIOUS_LISTED = 20
# The most distinct reasons a summary counts drops under (a host lost drops
# thousands for one reason; a flood of distinct reasons is counted as "other").
DROP_REASONS = 20


@dataclass(frozen=True)
class Dropped:
    """A client left out of a round, and why. ``diverged``: it said its own
    training blew up, which ends the run instead of dropping it."""

    client_id: str
    url: str
    reason: str
    diverged: bool = False

    def __post_init__(self) -> None:
        # A reason often quotes what the client sent: it must not write lines of its own.
        object.__setattr__(self, "reason", printable(self.reason))

    def json(self) -> dict[str, str]:
        return {"client_id": self.client_id, "url": self.url, "reason": self.reason}


def participant_json(r: Result, replies: tuple[Field, ...]) -> dict[str, Any]:
    """One client of the round as the record lists it: who, n_k, each field
    its strategy declares, and the losses it measured."""
    return {"client_id": r.client_id, "url": r.url, "data_size": r.n,
            **{f.name: f.kind.to_json(r.value(f)) for f in replies}, "metrics": r.metrics}


def terms_json(results: list[Result]) -> list[dict[str, Any]]:
    """Each client's share of the average, n_k/N and n_k/N · W_k, when every
    client sent a model (none for FedSGD's gradients or exact's sums)."""
    if not results or any(r.theta is None for r in results):
        return []
    return [{"client_id": r.client_id, "n_k": r.n, "weight": float(p), **model_json(*split(p * r.theta))}
            for r, p in zip(results, weights([r.n for r in results]))]


@dataclass(frozen=True)
class RoundRecord:
    """One completed round as the federation keeps it; ``round_json`` writes
    it as GET /runs/<id> shows it."""

    round: int
    strategy: str
    theta_in: Theta
    step: Step  # the next model, the next state, and the math (the collector's lines first)
    participants: list[dict[str, Any]]
    dropped: list[Dropped]
    N: int
    terms: list[dict[str, Any]]
    duration_s: float  # sampling, the calls and the aggregation
    suspicious: list[dict[str, Any]] = field(default_factory=list)  # updates far larger than the others'
    parts: dict[str, Any] = field(default_factory=dict)  # what stages and collectors add (privacy, secagg)


def without_clients_numbers(rec: RoundRecord) -> RoundRecord:
    """The round with nothing of any one client's own: who took part (name,
    URL and the n_k its /health publishes), N, the models, the math as
    written from the aggregate; no local model or other reply field, no
    loss, no clip bit, no term n_k/N · W_k, no update norm (``suspicious``)."""
    return replace(rec, participants=[{k: p[k] for k in ("client_id", "url", "data_size")} for p in rec.participants],
                   terms=[], suspicious=[])


def summarised(rec: RoundRecord) -> bool:
    """Is the round written as a summary (more than SUMMARY_ABOVE participants)?"""
    return len(rec.participants) > SUMMARY_ABOVE


def round_json(rec: RoundRecord) -> dict[str, Any]:
    """The round as the API shows it. FedAvg's fields are the ones it always
    had; "math" is the strategy's trace, "server_state" what it carries on.
    A summarised round lists no participant and no term, names only the
    first DROPPED_NAMED dropped, and has its "summary" (``summary_json``)."""
    big = summarised(rec)
    body: dict[str, Any] = {
        "round": rec.round,
        "strategy": rec.strategy,
        "global_model_in": model_json(*split(rec.theta_in)),
        "participants": [] if big else rec.participants,
        "dropped": [d.json() for d in (rec.dropped[:DROPPED_NAMED] if big else rec.dropped)],
        "suspicious": largest(rec.suspicious) if big else rec.suspicious,
        "N": rec.N,
        "terms": [] if big else rec.terms,
        "math": rec.step.trace,
        "global_model": model_json(*split(rec.step.theta)),
        "federated_loss": None,  # filled in by the next round, or the final evaluation
        "duration_s": rec.duration_s,
    }
    if big:
        body["summary"] = summary_json(rec)
    if rec.step.state:
        body["server_state"] = state_json(rec.step.state)
    return body | rec.parts


def clients_json(rec: RoundRecord) -> dict[str, list[dict[str, Any]]] | None:
    """A summarised round's every client, as the record lists them below
    SUMMARY_ABOVE ("participants", "dropped"), kept beside the record
    (``RunStore``); None for a round the record lists whole."""
    if not summarised(rec):
        return None
    return {"participants": rec.participants, "dropped": [d.json() for d in rec.dropped]}


def summary_json(rec: RoundRecord) -> dict[str, Any]:
    """What a summarised round's record says of its clients: how many were
    sampled, contributed and were dropped (counted per reason, the most
    frequent first); "sums", Σ_k n_k·x_k of each model-shaped field they
    sent (FedAvg's average is Σ_k n_k·W_k / N); "groups", that field's
    weighted mean by n_k (``groups_json``); "top", the TOP_CONTRIBUTORS
    participants of the largest weight n_k/N, each with its "weight". What
    the stages kept out of the participants (DP's) is not in it either."""
    ps = rec.participants
    reasons: dict[str, int] = {}
    for d in rec.dropped:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    counted = sorted(reasons.items(), key=lambda kv: -kv[1])
    by_reason = [{"reason": why, "clients": n} for why, n in counted[:DROP_REASONS]]
    if len(counted) > DROP_REASONS:
        by_reason.append({"reason": f"other ({len(counted) - DROP_REASONS} more reasons)",
                          "clients": sum(n for _, n in counted[DROP_REASONS:])})
    n = np.array([p["data_size"] or 0 for p in ps], dtype=float)
    N = n.sum()
    top = sorted(range(len(ps)), key=lambda k: -n[k])[:TOP_CONTRIBUTORS] if N > 0 else []
    stacked = {f.name: _stacked(ps, f) for f in REPLY_FIELDS
               if f.kind is MODEL and ps and all(p.get(f.name) is not None for p in ps)}
    update = next((f.name for f in REPLY_FIELDS if f.name in stacked and f.update_from is not None), None)
    sums = {name: model_json(*split(n @ x)) for name, x in stacked.items()}
    return {"sampled": len(ps) + len(rec.dropped), "contributed": len(ps), "dropped": len(rec.dropped),
            "suspicious": len(rec.suspicious), "dropped_by_reason": by_reason, "sums": sums,
            "groups": None if update is None else groups_json(update, n, stacked[update]),
            "top": [ps[k] | {"weight": float(n[k] / N)} for k in top]}


def largest(suspicious: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The SUSPICIOUS_LISTED updates flagged with the largest ratio to the others' median."""
    return sorted(suspicious, key=lambda x: -x["ratio"])[:SUSPICIOUS_LISTED]


def _stacked(ps: list[dict[str, Any]], f: Field) -> np.ndarray:
    """Each participant's model-shaped ``f`` ({"w": number or list, "b"}) as
    a row [w…, b] (in plain Python: a NumPy call per client costs more than
    the whole sum)."""
    return np.array([[*(m["w"] if isinstance(m["w"], list) else (m["w"],)), m["b"]]
                     for m in (p[f.name] for p in ps)], dtype=float)


def groups_json(name: str, n: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """The weighted mean Σ_k n_k/N · x_k of the clients' ``name`` as a mean
    of group means, the clients grouped by n_k in powers of two
    (2^j ≤ n_k < 2^{j+1}): Σ_g N_g/N · x̄_g with N_g = Σ_{k∈g} n_k and
    x̄_g = Σ_{k∈g} n_k/N_g · x_k. Grouped by n_k because n_k is what weighs:
    it shows where N sits, the many small clients against the few large
    ones, whatever hosts hold them. "mean" is the whole mean, computed once
    from the clients, as the groups' sum must give it."""
    bucket = np.floor(np.log2(np.maximum(n, 1))).astype(int)
    groups = []
    for j in np.unique(bucket):
        member = bucket == j
        N_g = float(n[member].sum())
        groups.append({"n_k_from": 2 ** int(j), "n_k_to": 2 ** (int(j) + 1) - 1, "clients": int(member.sum()),
                       "N": int(N_g), "mean": model_json(*split(n[member] @ values[member] / N_g))})
    return {"field": name, "N": int(n.sum()), "groups": groups,
            "mean": model_json(*split(n @ values / n.sum()))}


def state_json(state: State) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in state.items()}


def state_of(stored: dict[str, list[float]] | None) -> State | None:
    """The inverse of ``state_json``: a stored server state back as vectors."""
    return None if stored is None else {k: np.array(v, dtype=float) for k, v in stored.items()}
