"""The server's log of a round: the strategy's arithmetic with its real numbers.

Every line is written from the round record that ``GET /runs/<id>`` returns
(the strategy's own trace is in its "math"), so the log and the API always
show the same values.
"""
from __future__ import annotations

from typing import Any

from fedavg.strategies import REPLY_FIELDS
from fedavg.strict_json import weights_of
from fedavg.trace import TRACE_TERMS, explain_weighted_sum, fmt, fmt_line, fmt_model, fmt_theta, names


def _line_of(model: dict[str, Any]) -> str:
    return fmt_line(weights_of(model), model["b"])


def _model(m: dict[str, Any]) -> str:
    return fmt_model(weights_of(m), m["b"])


def round_lines(record: dict[str, Any], rounds_planned: int) -> list[str]:
    """The whole block for one aggregated round (see the README for an example)."""
    lines = [f"── Round {record['round']}/{rounds_planned} ── global model in: {_model(record['global_model_in'])}"]
    if "summary" in record:
        return [*lines, *summary_lines(record), *record["math"],
                f"global model out: {_line_of(record['global_model'])}"]
    participants = record["participants"]
    width = max((len(p["client_id"]) for p in participants[:TRACE_TERMS]), default=0)
    for p in participants[:TRACE_TERMS]:
        metrics = p.get("metrics") or {}
        loss = ""
        if "loss_before" in metrics and "loss_after" in metrics:
            loss = f"   (loss {fmt(metrics['loss_before'])}→{fmt(metrics['loss_after'])})"
        sent = [f.kind.text(f.label, p[f.name]) for f in REPLY_FIELDS if f.name in p]
        if p["data_size"] is None:  # secure aggregation: the server has nothing of this client's own
            sent = ["its input masked: only the sum below is known"]
        elif not sent and not metrics and "privacy" in record:  # DP: its numbers are kept out of the record
            sent = ["its update is not recorded: DP-FedAvg records only the noised release below"]
        lines.append(f"{p['client_id']:<{width}}  n_k={p['data_size'] if p['data_size'] is not None else '?'}  "
                     f"{'  '.join(sent)}{loss}")
    if len(participants) > TRACE_TERMS:
        lines.append(f"… and {len(participants) - TRACE_TERMS} more clients (all in GET /runs/<id>)")
    for x in record.get("suspicious", [])[:TRACE_TERMS]:
        lines.append(f"{x['client_id']}  SUSPICIOUS: its update's norm {fmt(x['update_norm'])} is "
                     f"{x['ratio']:.3g}× the others' median")
    for d in record["dropped"][:TRACE_TERMS]:
        lines.append(f"{d['client_id']}  DROPPED from this round: {d['reason']}")
    if len(record["dropped"]) > TRACE_TERMS:
        lines.append(f"… and {len(record['dropped']) - TRACE_TERMS} more dropped")
    lines += record["math"]
    lines.append(f"global model out: {_line_of(record['global_model'])}")
    return lines


def summary_lines(record: dict[str, Any]) -> list[str]:
    """A summarised round's clients (``records.summary_json``): the counts;
    the clients' weighted mean as Σ over groups by n_k, each group's N_g and
    mean, then the sum written out to the mean; the top contributors; the
    suspicious; the dropped, counted by reason."""
    s = record["summary"]
    lines = [f"{s['sampled']} clients sampled: {s['contributed']} contributed (N = {record['N']}), "
             f"{s['dropped']} dropped"]
    grouped = s["groups"]
    if grouped is not None:
        label = next(f.label for f in REPLY_FIELDS if f.name == grouped["field"])
        lines.append(f"the clients' {label}s, averaged: Σ_k n_k/N · x_k = Σ_g N_g/N · x̄_g, the clients grouped "
                     f"by n_k (N_g = Σ n_k, x̄_g = Σ n_k/N_g · x_k in group g):")
        groups = grouped["groups"]
        for g in groups:
            lines.append(f"  n_k {g['n_k_from']}–{g['n_k_to']}: {g['clients']} clients, N_g = {g['N']}, "
                         f"x̄_g: {_model(g['mean'])}")
        means = [[*weights_of(g["mean"]), g["mean"]["b"]] for g in groups]
        whole = [*weights_of(grouped["mean"]), grouped["mean"]["b"]]
        for j, name in enumerate(names(len(whole))):
            # every group's term: there are at most log2(10¹²) = 40 of them, and the sum is the lesson
            lines.append("  " + explain_weighted_sum(name, [g["N"] for g in groups], [m[j] for m in means], whole[j],
                                                     shown=len(groups)))
    if s["top"]:
        lines.append(f"the {len(s['top'])} largest weights n_k/N:")
        for p in s["top"]:
            sent = [f.kind.text(f.label, p[f.name]) for f in REPLY_FIELDS if f.name in p]
            lines.append(f"  {p['client_id']}  n_k={p['data_size']}  n_k/N={fmt(p['weight'])}  {'  '.join(sent)}")
    for x in record.get("suspicious", [])[:TRACE_TERMS]:
        lines.append(f"{x['client_id']}  SUSPICIOUS: its update's norm {fmt(x['update_norm'])} is "
                     f"{x['ratio']:.3g}× the others' median")
    if len(record.get("suspicious", [])) > TRACE_TERMS:
        lines.append(f"… and {len(record['suspicious']) - TRACE_TERMS} more suspicious")
    for d in s["dropped_by_reason"]:
        lines.append(f"{d['clients']} client(s) DROPPED from this round: {d['reason']}")
    if record["dropped"]:
        more = s["dropped"] - len(record["dropped"])
        lines.append(f"dropped first: {', '.join(d['client_id'] for d in record['dropped'])}"
                     + (f" and {more} more (all in this round's clients.csv)" if more else ""))
    return lines


def loss_line(round_no: int, ns: list[int], losses: list[float], loss: float, source: str) -> str:
    """federated MSE of round r's model: L = Σ n_k/N · L_k, written out (L
    alone when no L_k may be written: a DP run's)."""
    if not losses:
        return (f"federated MSE of round {round_no}'s model ({source}): L = Σ n_k/N · L_k = {fmt(loss)} "
                "(no client's L_k is written: not covered by DP's ε)")
    return f"federated MSE of round {round_no}'s model ({source}): " + \
        explain_weighted_sum("L", ns, losses, loss)


def opening_lines(run_id: int, s: Any, clients: int, first_round: int, about: list[str | None]) -> list[str]:
    """A run's first lines: its settings, the strategy's formula, then each
    stage's line (``about``: the strategy's summary, then the stages')."""
    lines = [f"Run {run_id}: {s.strategy}, {s.rounds} round(s) over {clients} client(s), lr={s.lr:g}, "
             f"local_epochs={s.local_epochs}" + ("" if s.batch_size is None else f", batch_size={s.batch_size}")
             + ("" if not s.mu else f", mu={s.mu:g}") + "".join(f", {k}={v:g}" for k, v in (s.params or {}).items())
             + f", seed={s.seed}" + ("" if first_round == 1 else f" (resumed at round {first_round})"),
             f"{s.strategy}: {about[0]}"]
    if s.robust:
        lines.append(f"robust rule in place of the average: {s.robust.describe()}")
    return lines + [line for line in about[1:] if line]


def partial_round_lines(r: int, rounds_planned: int, theta: Any, results: list[Any], dropped: list[Any]) -> list[str]:
    """A round that ended the run before its average: who replied, who was dropped and why."""
    return ([f"── Round {r}/{rounds_planned} ── global model in: {fmt_theta(theta)}"]
            + [f"{p.client_id}  replied (n_k={p.n})" for p in results]
            + [f"{d.client_id}  DROPPED from this round: {d.reason}" for d in dropped])
