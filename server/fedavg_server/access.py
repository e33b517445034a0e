"""Who the operator is, and who may read what: each client's own numbers
belong to the server's operator.

The operator starts, stops and resumes runs. Without TLS it is whoever
sends the token (FEDAVG_TOKEN), or everyone when none is set (the seed's
one machine). Over TLS it is the caller whose verified certificate names
``operator`` (make certs writes one), with the token as well when one is
set: the server sends the token to every client, so over TLS the token
alone would make any client the operator, and the certificate is what
tells the parties apart. The server's port takes callers without a
certificate (a browser, curl), who read what everyone reads.

A client's local model, its losses and what its strategy sends (a gradient,
Δc_k, Σ x̃x̃ᵀ) are functions of its private data: two points and the losses
at two known models give the points back. With a token set (FEDAVG_TOKEN),
or over TLS, those are shown only to the operator; everyone else reads the
aggregates (the global models, N, the federated loss, who took part and who
was dropped). PUBLIC_READ (--public-read) shows everything to everyone: the
teaching view, for a demo on one machine. With neither a token nor TLS
nothing is private anyway: anyone who can reach the server can also start
runs.

A DP run's rounds hold none of those numbers (its privacy stage keeps them
out of the record); one recorded before it did is shown to every reader,
the token's holder too, as it would be recorded now.
"""
from __future__ import annotations

from typing import Any

from flask import current_app, request
from werkzeug.exceptions import Unauthorized

from fedavg.http.service import has_token, peer_allowed, peer_names
from fedavg.strategies import REPLY_FIELDS

# A participant's fields that come from its private data: what its strategy
# declares private, and the losses it measured.
PRIVATE = (*(f.name for f in REPLY_FIELDS if f.private), "metrics")
# The name the operator's certificate carries (CN or DNS name), over TLS.
OPERATOR = "operator"
HIDDEN = ("each client's own numbers are shown only to the server's operator (the token; over TLS the "
          "operator certificate), or on a server started with --public-read")
# The kept fields of a DP round's participant (records.without_clients_numbers).
WHO = ("client_id", "url", "data_size")
DP_BEFORE = ("a DP round recorded before DP runs kept each client's numbers out of the record: its math, which "
             "writes each update's norm, is not shown; the released model and ε are")


def is_operator() -> bool:
    """Is this request the operator's: over TLS a verified certificate
    naming ``operator`` and the token if one is set; without TLS the token,
    or anyone when none is set."""
    token = current_app.config["TOKEN"]
    if token is not None and not has_token(token, page=True):  # (a browser's Basic login counts too)
        return False
    return current_app.config.get("TLS") is None or peer_allowed(peer_names(request.environ), OPERATOR)


def require_operator() -> None:
    """401 unless ``is_operator``, saying what would let the caller in."""
    if is_operator():
        return
    needs = [f"a certificate of this server's CA naming {OPERATOR!r} (make certs writes operator.crt)"] \
        if current_app.config.get("TLS") is not None else []
    if current_app.config["TOKEN"] is not None:
        needs.append("the shared token (Authorization: Bearer $FEDAVG_TOKEN)")
    raise Unauthorized(f"only the server's operator may do this: send {' and '.join(needs)}")


def reads_clients() -> bool:
    """May this request see each client's own numbers?"""
    return current_app.config.get("PUBLIC_READ", False) or is_operator()


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
    out = record | {
        "participants": [_public(p) for p in record["participants"]],
        "terms": [{k: t[k] for k in ("client_id", "n_k", "weight")} for t in record["terms"]],
        "math": [HIDDEN],  # the trace writes every client's numbers out
    }
    if "summary" in record:  # a summarised round: its top contributors' numbers, and a group may be one client
        summary = record["summary"]
        groups = summary["groups"] and summary["groups"] | {
            "mean": None, "groups": [{k: v for k, v in g.items() if k != "mean"} for g in summary["groups"]["groups"]]}
        out["summary"] = summary | {"top": [_public(p) for p in summary["top"]], "sums": {}, "groups": groups}
    return out


def _public(participant: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in participant.items() if k not in PRIVATE}


def reader_round(record: dict[str, Any]) -> dict[str, Any]:
    """One round (with its every client, ``RunStore.round_with_clients``)
    as this request may read it: ``reader_view``'s rules."""
    return reader_view({"rounds": [record]})["rounds"][0]
