"""How a strategy combines its clients' vectors: FedAvg's weighted average, or
a robust rule when some clients may lie (a run's ``aggregator`` settings).

Every strategy that averages what its clients send (their models, updates,
gradients or per-step updates) calls ``Combine`` instead of the average
itself, so one setting makes any of them robust. Each rule returns the lines
that write it out with its numbers, like the average's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from ..aggregation import (
    capped_weights,
    clip_updates,
    coordinate_median,
    krum_scores,
    multi_krum,
    trimmed_mean,
    weights,
)
from ..spec import Param
from ..trace import explain_average, explain_mean_of_sum, fmt, names
from .rule import CannotCombine, Rule


@dataclass(frozen=True)
class Combine:
    """The rule and its settings, as the run's settings give them."""

    aggregator: str = "mean"
    trim: float = 0.1  # trimmed_mean: β, the share cut from each end of every coordinate
    byzantine: int = 1  # krum: f, the attackers it tolerates
    krum_m: int = 1  # krum: average the m best (multi-Krum when m > 1)
    clip_norm: float | None = None  # bound on each ‖V_k − center‖ before combining
    max_weight: float | None = None  # cap on any one client's share n_k/N

    def describe(self) -> str:
        """'aggregator=median', with each setting that is not its default."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                         if f.name == "aggregator" or getattr(self, f.name) != f.default)

    @property
    def plain(self) -> bool:
        """FedAvg's own average, untouched (its trace is the seed's)."""
        return self.aggregator == "mean" and self.clip_norm is None and self.max_weight is None

    def from_sum(self, weighted_sum: np.ndarray, weight: float, center: np.ndarray) -> tuple[np.ndarray, str]:
        """From Σ_k w_k·V_k and Σ_k w_k alone (what secure aggregation gives),
        the one vector that combined alone gives what combining the clients'
        vectors gives: their mean θ̄ = Σ w_k·V_k / Σ w_k; and the line that
        writes it out. A robust rule needs each vector: a sum is not enough."""
        if not self.plain:
            raise CannotCombine(f"aggregator {self.aggregator} needs each client's vector; a sum is not enough")
        mean = weighted_sum / weight
        return mean, explain_mean_of_sum(mean, weight)

    def __call__(self, vectors: Sequence[np.ndarray], ns: Sequence[int], center: np.ndarray,
                 symbol: str = "", total: str = "N") -> tuple[np.ndarray, list[str]]:
        """The combined vector and the lines that write it out. ``center`` is
        what the vectors are updates from (θ_t for models; 0 for gradients);
        ``total`` names Σ n_k in the lines (``explain_average``)."""
        if self.plain:
            result = weights(ns) @ np.stack(vectors)
            return result, explain_average(ns, vectors, result, symbol, total)
        lines = []
        if self.clip_norm is not None:
            # Norm bounding (Sun et al., 2019): no update longer than S.
            deltas = [v - center for v in vectors]
            clipped = clip_updates(deltas, self.clip_norm)
            cut = [k for k, (d, c) in enumerate(zip(deltas, clipped)) if c is not d]
            vectors = [center + c for c in clipped]
            lines.append(f"clip_norm S={fmt(self.clip_norm)}: {len(cut)} of {len(vectors)} update(s) scaled "
                         f"down to ‖Δ_k‖ = S" + (f" (clients {', '.join(str(k + 1) for k in cut[:6])}"
                                                  f"{' …' if len(cut) > 6 else ''})" if cut else ""))
        coords = names(len(center), symbol)
        result, more = RULES[self.aggregator].combine(vectors, ns, center, self, coords)
        return result, lines + more


class WeightedMean(Rule):
    name = "mean"
    summary = "FedAvg's weighted mean Σ_k n_k/N · V_k (shares capped by max_weight if given)"

    def combine(self, vectors: Sequence[np.ndarray], ns: Sequence[int], center: np.ndarray,
                settings: Combine, coords: list[str]) -> tuple[np.ndarray, list[str]]:
        """V = Σ_k p_k·V_k, p_k = n_k/N, or the capped shares (``capped_weights``)."""
        lines = []
        if settings.max_weight is not None:
            p = capped_weights(ns, settings.max_weight)
            lines.append(f"max_weight {fmt(settings.max_weight)}: shares p_k = n_k/N capped, the rest "
                         f"shared in proportion to n_k; largest p_k = {fmt(float(p.max()))}")
        else:
            p = weights(ns)
        result = p @ np.stack(vectors)
        lines += [f"{name} = " + " + ".join(f"{fmt(p[k])}·{fmt(v[j])}" for k, v in enumerate(vectors[:6]))
                  + (f" + … ({len(vectors)} terms)" if len(vectors) > 6 else "") + f" = {fmt(result[j])}"
                  for j, name in enumerate(coords)]
        return result, lines


class Median(Rule):
    name = "median"
    summary = "the coordinate-wise median (n_k not used)"

    def combine(self, vectors: Sequence[np.ndarray], ns: Sequence[int], center: np.ndarray,
                settings: Combine, coords: list[str]) -> tuple[np.ndarray, list[str]]:
        """V_j = median_k V_k,j (``coordinate_median``)."""
        result = coordinate_median(vectors)
        return result, [f"{name} = median of the {len(vectors)} clients' values = {fmt(result[j])}"
                        for j, name in enumerate(coords)]


class TrimmedMean(Rule):
    name = "trimmed_mean"
    summary = "the coordinate-wise trimmed mean (trim β cut from each end)"

    def combine(self, vectors: Sequence[np.ndarray], ns: Sequence[int], center: np.ndarray,
                settings: Combine, coords: list[str]) -> tuple[np.ndarray, list[str]]:
        """V_j = mean of the middle K − 2⌊βK⌋ values of coordinate j (``trimmed_mean``)."""
        cut = int(np.floor(settings.trim * len(vectors)))
        result = trimmed_mean(vectors, settings.trim)
        return result, [f"{name} = mean of the middle {len(vectors) - 2 * cut} of {len(vectors)} values "
                        f"(β={fmt(settings.trim)}: {cut} cut from each end) = {fmt(result[j])}"
                        for j, name in enumerate(coords)]


class Krum(Rule):
    name = "krum"
    summary = "(multi-)Krum: the krum_m vectors nearest their neighbours, averaged"

    def combine(self, vectors: Sequence[np.ndarray], ns: Sequence[int], center: np.ndarray,
                settings: Combine, coords: list[str]) -> tuple[np.ndarray, list[str]]:
        """The mean of the m vectors of lowest Krum score (``multi_krum``); needs K > f + 2."""
        f = settings.byzantine
        if len(vectors) <= f + 2:
            raise CannotCombine(f"krum with byzantine={f} needs more than {f + 2} replies, got {len(vectors)}")
        m = min(settings.krum_m, len(vectors))
        result, chosen = multi_krum(vectors, f, m)
        scores = krum_scores(vectors, f)
        lines = [f"Krum (f={f}): score_k = Σ ‖V_k − V_j‖² over its {len(vectors) - f - 2}"
                 f" nearest; lowest {m}: clients " + ", ".join(f"{k + 1} ({fmt(scores[k])})" for k in chosen[:6])]
        return result, lines + [f"{name} = mean of the {m} chosen = {fmt(result[j])}" for j, name in enumerate(coords)]


# The registry of rules, in the order /start's documentation lists them. A
# rule here is known everywhere without another edit: /start's checks and its
# OpenAPI enum, PROTOCOL.md's table, the page's form, the log's math, make compare's --aggregators.
RULES: dict[str, Rule] = {r.name: r for r in (
    WeightedMean(), Median(), TrimmedMean(), Krum(),
)}
AGGREGATORS = tuple(RULES)


# Combine's fields as a run's settings take them (its defaults are Combine's
# own); the bounds that depend on the server's K clients are set where K is known.
ROBUST: tuple[Param, ...] = (
    Param("aggregator", Combine.aggregator, "how the clients' vectors are combined: "
          + "; ".join(f"`{name}`, {rule.summary}" for name, rule in RULES.items()) + "; not for strategy exact",
          type="string", choices=AGGREGATORS),
    Param("trim", Combine.trim, "`trimmed_mean` only: β, the share cut from each end of every coordinate", ge=0,
          lt=0.5),
    Param("byzantine", Combine.byzantine, "`krum` only: f, the attackers tolerated; Krum's guarantee (Blanchard et "
          "al., 2017) needs K ≥ 2f + 3 clients", type="integer", ge=0, doc_range="`[0, ⌊(K−3)/2⌋]`"),
    Param("krum_m", Combine.krum_m, "`krum` only: average the m best-scored (multi-Krum when m > 1)",
          type="integer", ge=1, doc_range="`[1, K]`"),
    Param("clip_norm", Combine.clip_norm, "bound S on each update ‖W_k − W_t‖ before combining (any aggregator)",
          gt=0),
    Param("max_weight", Combine.max_weight, "`mean` only: cap on any one client's share n_k/N, the rest shared in "
          "proportion to n_k", gt=0, le=1),
)
# The rule each setting belongs to (the others apply to every rule).
ROBUST_OWNER = {"trim": "trimmed_mean", "byzantine": "krum", "krum_m": "krum", "max_weight": "mean"}
