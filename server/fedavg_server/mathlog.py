"""The server's log of a round: the FedAvg arithmetic with its real numbers.

Every line is written from the round record that ``GET /runs/<id>`` returns,
so the log and the API always show the same values.
"""
from __future__ import annotations

from typing import Any

from fedavg.aggregation import TRACE_TERMS, explain_average, explain_weighted_sum, fmt, fmt_model
from fedavg.wire import weights_of


def _line_of(model: dict[str, Any]) -> str:
    w = weights_of(model)
    slope = fmt(w[0]) if len(w) == 1 else "[" + ", ".join(fmt(v) for v in w) + "]"
    return f"y = {slope}·x + {fmt(model['b'])}"


def round_lines(record: dict[str, Any], rounds_planned: int) -> list[str]:
    """The whole block for one aggregated round (see the README for an example)."""
    model_in = record["global_model_in"]
    lines = [f"── Round {record['round']}/{rounds_planned} ── global model in: "
             f"{fmt_model(weights_of(model_in), model_in['b'])}"]
    participants = record["participants"]
    width = max((len(p["client_id"]) for p in participants[:TRACE_TERMS]), default=0)
    for p in participants[:TRACE_TERMS]:
        m = p["local_model"]
        metrics = p.get("metrics") or {}
        loss = ""
        if "loss_before" in metrics and "loss_after" in metrics:
            loss = f"   (loss {fmt(metrics['loss_before'])}→{fmt(metrics['loss_after'])})"
        lines.append(f"{p['client_id']:<{width}}  n_k={p['data_size']}  local model: "
                     f"{fmt_model(weights_of(m), m['b'])}{loss}")
    if len(participants) > TRACE_TERMS:
        lines.append(f"… and {len(participants) - TRACE_TERMS} more clients (all in GET /runs/<id>)")
    for d in record["dropped"][:TRACE_TERMS]:
        lines.append(f"{d['client_id']}  DROPPED from this round: {d['reason']}")
    if len(record["dropped"]) > TRACE_TERMS:
        lines.append(f"… and {len(record['dropped']) - TRACE_TERMS} more dropped")
    out = record["global_model"]
    lines += explain_average([p["data_size"] for p in participants],
                             [weights_of(p["local_model"]) for p in participants],
                             [p["local_model"]["b"] for p in participants], weights_of(out), out["b"])
    lines.append(f"global model out: {_line_of(out)}")
    return lines


def loss_line(round_no: int, ns: list[int], losses: list[float], loss: float, source: str) -> str:
    """federated MSE of round r's model: L = Σ n_k/N · L_k, written out."""
    return f"federated MSE of round {round_no}'s model ({source}): " + \
        explain_weighted_sum("L", ns, losses, loss)
