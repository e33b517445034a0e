"""Who may read what: each client's own numbers belong to the server's operator.

A client's local model, its losses and what its strategy sends (a gradient,
Δc_k, Σ x̃x̃ᵀ) are functions of its private data: two points and the losses
at two known models give the points back. With a token set (FEDAVG_TOKEN),
those are shown only to requests that carry it; everyone else reads the
aggregates (the global models, N, the federated loss, who took part and who
was dropped). PUBLIC_READ (--public-read) shows everything to everyone: the
teaching view, for a demo on one machine. Without a token nothing is
private anyway: anyone who can reach the server can also start runs.

A DP run's rounds hold none of those numbers (its privacy stage keeps them
out of the record); one recorded before it did is shown to every reader,
the token's holder too, as it would be recorded now.
"""
from __future__ import annotations

from typing import Any

from flask import current_app

from fedavg.http.service import has_token
from fedavg.strategies import REPLY_FIELDS

# A participant's fields that come from its private data: what its strategy
# declares private, and the losses it measured.
PRIVATE = (*(f.name for f in REPLY_FIELDS if f.private), "metrics")
HIDDEN = ("each client's own numbers are shown only with the token (the server's operator), "
          "or on a server started with --public-read")
# The kept fields of a DP round's participant (records.without_clients_numbers).
WHO = ("client_id", "url", "data_size")
DP_BEFORE = ("a DP round recorded before DP runs kept each client's numbers out of the record: its math, which "
             "writes each update's norm, is not shown; the released model and ε are")


def reads_clients() -> bool:
    """May this request see each client's own numbers?"""
    token = current_app.config["TOKEN"]
    return token is None or current_app.config.get("PUBLIC_READ", False) or has_token(token)


def reader_view(run: dict[str, Any]) -> dict[str, Any]:
    """The run as this request may read it: whole, or with each client's own
    numbers taken out of every round (and "private": true saying so)."""
    run = run | {"rounds": [_as_released(r) for r in run["rounds"]]}
    if reads_clients():
        return run
    return run | {"private": True, "rounds": [_aggregates(r) for r in run["rounds"]]}


def _as_released(record: dict[str, Any]) -> dict[str, Any]:
    """A DP round as a DP run records it now (older records kept each client's numbers)."""
    if "privacy" not in record or (not record["terms"] and not record.get("suspicious")
                                   and all(set(p) <= set(WHO) for p in record["participants"])):
        return record
    return record | {"participants": [{k: p[k] for k in WHO if k in p} for p in record["participants"]],
                     "terms": [], "suspicious": [], "math": [DP_BEFORE]}


def _aggregates(record: dict[str, Any]) -> dict[str, Any]:
    return record | {
        "participants": [{k: v for k, v in p.items() if k not in PRIVATE} for p in record["participants"]],
        "terms": [{k: t[k] for k in ("client_id", "n_k", "weight")} for t in record["terms"]],
        "math": [HIDDEN],  # the trace writes every client's numbers out
    }
