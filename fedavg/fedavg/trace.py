"""How the math is written out: numbers, models and weighted sums as text.

Every function is *given* the values the algorithm produced and only formats
them, so the log and the page can never disagree with the model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .model import Weights

# Beyond this many clients the trace names the first few terms and the count,
# so that a 1000-client round still logs a few lines, built in O(K).
TRACE_TERMS = 6


def fmt(x: float) -> str:
    """How every number is written in logs and on the page (6 decimals, or
    scientific notation below 10⁻³, where it would hide digits, and from 10⁶,
    where a model that blew up would print as a hundred digits)."""
    x = float(x)
    if x != 0 and not 1e-3 <= abs(x) < 1e6:
        return f"{x:.6e}"
    return f"{x:.6f}"


def fmt_line(w: Weights, b: float) -> str:
    """The model as an equation, as every summary writes it: ``y = 2.000000·x
    − 1.000000`` (a negative term as − |v|, never ``+ -1``), or with several
    features ``y = w₁·x1 + w₂·x2 + … + b``; each number by ``fmt``."""
    w = np.asarray(w, dtype=float).ravel()
    xs = ["x"] if len(w) == 1 else [f"x{j + 1}" for j in range(len(w))]
    text = f"y = {fmt(w[0])}·{xs[0]}"
    for v, x in [*zip(w[1:], xs[1:]), (b, None)]:
        negative = math.copysign(1.0, float(v)) < 0  # (−0.0 too: "+ -0.000000" is what this replaces)
        text += f" {'−' if negative else '+'} {fmt(abs(float(v)))}" + (f"·{x}" if x else "")
    return text


def fmt_model(w: Weights, b: float) -> str:
    """w=… b=… with every weight written by ``fmt``."""
    w = np.asarray(w, dtype=float).ravel()
    ws = fmt(w[0]) if len(w) == 1 else "[" + ", ".join(fmt(v) for v in w) + "]"
    return f"w={ws} b={fmt(b)}"


def _sum_of_terms(terms: Sequence[str], count: int, shown: int = TRACE_TERMS) -> str:
    if count <= shown:
        return " + ".join(terms)
    return " + ".join(terms[: shown - 1]) + f" + … ({count} terms)"


def explain_weighted_sum(name: str, ns: Sequence[int], values: Sequence[float], result: float,
                         shown: int = TRACE_TERMS) -> str:
    """One line ``name = (n_1/N)·v_1 + (n_2/N)·v_2 + … = result``, O(K) to
    build: every term up to ``shown`` of them, else the first few and the count.

    ``result`` is passed in, not recomputed: the trace writes the value the
    algorithm produced, so the log can never disagree with the model.
    """
    total = sum(ns)
    terms = [f"({ns[k]}/{total})·{fmt(values[k])}" for k in range(min(len(ns), shown))]
    return f"{name} = {_sum_of_terms(terms, len(ns), shown)} = {fmt(result)}"


def names(dim: int, symbol: str = "") -> list[str]:
    """The coordinates of a θ of length ``dim`` as the trace writes them:
    w, b (one feature) or w[0] … w[d-1], b; with a ``symbol``, g_w, g_b …"""
    coords = ["w"] if dim == 2 else [f"w[{j}]" for j in range(dim - 1)]
    coords.append("b")
    return [f"{symbol}_{c}" for c in coords] if symbol else coords


def fmt_theta(theta: np.ndarray) -> str:
    """θ = [w…, b] written as ``w=… b=…``."""
    return fmt_model(theta[:-1], theta[-1])


def explain_average(ns: Sequence[int], vectors: Sequence[np.ndarray], result: np.ndarray,
                    symbol: str = "", total: str = "N") -> list[str]:
    """The weighted average written out with its numbers, one line a coordinate:

        N = 2 + 2 = 4
        w = (2/4)·1.2 + (2/4)·0.8 = 1.0
        b = (2/4)·0.4 + (2/4)·0.6 = 0.5

    (``w[0] = …, w[1] = …`` when there are several features; ``g_w = …``
    with ``symbol="g"``.) ``result`` is the average the algorithm computed.
    ``total`` names the sum of the weights (SCAFFOLD's ``N_S``: its N is another sum).
    """
    shown = [str(n) for n in ns[:TRACE_TERMS]]
    lines = [f"{total} = {_sum_of_terms(shown, len(ns))} = {sum(ns)}"]
    first = vectors[: TRACE_TERMS]
    for j, name in enumerate(names(len(result), symbol)):
        lines.append(explain_weighted_sum(name, ns, [v[j] for v in first], result[j]))
    return lines


def explain_each(names_: Sequence[str], formula: str, *columns: np.ndarray) -> list[str]:
    """One line per coordinate j: ``formula`` formatted with name_j and the
    j-th entry of each column, every number written by ``fmt``. For example
    ``explain_each(names(2, "m"), "{} = 0.9·{} + 0.1·{} = {}", m_old, delta, m)``."""
    return [formula.format(name, *(fmt(c[j]) for c in columns)) for j, name in enumerate(names_)]


def explain_mean_of_sum(mean: np.ndarray, weight: float) -> str:
    """θ̄ from a sum alone (secure aggregation's): ``θ̄ = Σ w_k·θ_k / Σ w_k = [...] over Σ w_k = W``."""
    return f"θ̄ = Σ w_k·θ_k / Σ w_k = [{', '.join(fmt(v) for v in mean)}] over Σ w_k = {fmt(weight)}"
