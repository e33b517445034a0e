"""How a round is written down: the record that GET /runs/<id> returns, the
log prints and the store keeps.

Who took part and what each sent is the collector's to say (``collect``):
each participant with the fields its strategy declares, or under secure
aggregation only their names. The stages add their own parts (the
suspicious updates, the privacy spent); the strategy adds its math and its
state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedavg.aggregation import weights
from fedavg.model import Theta, split
from fedavg.strategies import Field, Result, State, Step
from fedavg.strict_json import model_json, printable


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


def round_json(rec: RoundRecord) -> dict[str, Any]:
    """The round as the API shows it. FedAvg's fields are the ones it always
    had; "math" is the strategy's trace, "server_state" what it carries on."""
    body: dict[str, Any] = {
        "round": rec.round,
        "strategy": rec.strategy,
        "global_model_in": model_json(*split(rec.theta_in)),
        "participants": rec.participants,
        "dropped": [d.json() for d in rec.dropped],
        "suspicious": rec.suspicious,
        "N": rec.N,
        "terms": rec.terms,
        "math": rec.step.trace,
        "global_model": model_json(*split(rec.step.theta)),
        "federated_loss": None,  # filled in by the next round, or the final evaluation
        "duration_s": rec.duration_s,
    }
    if rec.step.state:
        body["server_state"] = state_json(rec.step.state)
    return body | rec.parts


def state_json(state: State) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in state.items()}


def state_of(stored: dict[str, list[float]] | None) -> State | None:
    """The inverse of ``state_json``: a stored server state back as vectors."""
    return None if stored is None else {k: np.array(v, dtype=float) for k, v in stored.items()}
