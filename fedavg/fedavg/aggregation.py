"""FedAvg's aggregation: the weighted average and the trace that writes it out.

Pure functions of plain data (weights and sample counts); nothing here knows
about HTTP. Each client k contributes its local model W_k = (w_k, b_k) trained
on n_k samples.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .model import Weights

# Beyond this many clients the trace names the first few terms and the count,
# so that a 1000-client round still logs a few lines, built in O(K).
TRACE_TERMS = 6


@dataclass(frozen=True)
class Update:
    """One client's reply to a round: its local model and its sample count."""

    w: Weights
    b: float
    n: int


def weighted_average(updates: Sequence[Update]) -> tuple[Weights, float]:
    """W_{t+1} = Σ_k n_k/N · W_k over the clients that replied, N = Σ_k n_k."""
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    n = np.array([u.n for u in updates], dtype=float)
    p = n / n.sum()
    w = p @ np.stack([np.asarray(u.w, dtype=float) for u in updates])
    b = float(p @ np.array([u.b for u in updates], dtype=float))
    return w, b


def weighted_loss_avg(losses: Sequence[tuple[float, int]]) -> float:
    """L = Σ_k n_k/N · L_k over the (L_k, n_k) pairs given, N = Σ_k n_k."""
    if not losses:
        raise ValueError("weighted_loss_avg needs at least one loss")
    total = sum(n for _, n in losses)
    return float(sum(n / total * loss for loss, n in losses))


def fmt(x: float) -> str:
    """How every number is written in logs and on the page (6 decimals, or
    scientific notation when that would hide its digits)."""
    x = float(x)
    if x != 0 and not 1e-3 <= abs(x) < 1e7:
        return f"{x:.6e}"
    return f"{x:.6f}"


def fmt_model(w: Weights, b: float) -> str:
    """w=… b=… with every weight written by ``fmt``."""
    w = np.asarray(w, dtype=float).ravel()
    ws = fmt(w[0]) if len(w) == 1 else "[" + ", ".join(fmt(v) for v in w) + "]"
    return f"w={ws} b={fmt(b)}"


def _sum_of_terms(terms: Sequence[str], count: int) -> str:
    if count <= TRACE_TERMS:
        return " + ".join(terms)
    return " + ".join(terms[: TRACE_TERMS - 1]) + f" + … ({count} terms)"


def explain_weighted_sum(name: str, ns: Sequence[int], values: Sequence[float], result: float) -> str:
    """One line ``name = (n_1/N)·v_1 + (n_2/N)·v_2 + … = result``, O(K) to build.

    ``result`` is passed in, not recomputed: the trace writes the value the
    algorithm produced, so the log can never disagree with the model.
    """
    total = sum(ns)
    terms = [f"({ns[k]}/{total})·{fmt(values[k])}" for k in range(min(len(ns), TRACE_TERMS))]
    return f"{name} = {_sum_of_terms(terms, len(ns))} = {fmt(result)}"


def explain_average(
    ns: Sequence[int], ws: Sequence[Weights], bs: Sequence[float], w: Weights, b: float
) -> list[str]:
    """The weighted average written out with its numbers:

        N = 2 + 2 = 4
        w = (2/4)·1.2 + (2/4)·0.8 = 1.0
        b = (2/4)·0.4 + (2/4)·0.6 = 0.5

    (``w[0] = …, w[1] = …`` when there are several features.)
    """
    shown = [str(n) for n in ns[:TRACE_TERMS]]
    lines = [f"N = {_sum_of_terms(shown, len(ns))} = {sum(ns)}"]
    d = len(w)
    for j in range(d):
        name = "w" if d == 1 else f"w[{j}]"
        lines.append(explain_weighted_sum(name, ns, [wk[j] for wk in ws], w[j]))
    lines.append(explain_weighted_sum("b", ns, bs, b))
    return lines
