"""Why a run goes wrong, in the user's terms: the diagnosis stage.

Every round it flags the clients whose update is far larger than the
others' (``suspicious``, under any aggregator), and remembers which of them
alone explain a leap of the model (the culprits) and by how much the model
leapt (the jump). When a client's training diverges, the model stops being
finite, or the federated loss does, it ends the run ``diverged`` with the
likeliest cause: the lr, mu, a starting model too large for any lr, or an
outlier a robust rule would have held.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from fedavg.aggregation import outliers, update_norms
from fedavg.model import Theta
from fedavg.strategies import Result, Step, Strategy

from .collect import Collected
from .stage import RunStopped, Stage

# A weight this large is no model anyone trained: the sign of an attack or a
# typo, not of a learning rate (the largest double is ~1.8e308).
ABSURD = 1e100
# A model that grows this much in one round was pushed, not trained: an lr
# too large grows it by a steady factor a round, far less than this.
SUDDEN = 1e6
# An honest client's update moves the model by at most this many times its
# size (+1); an lr too large moves every client's by far more.
CALM = 10.0


class Diagnosis(Stage):
    def __init__(self, strategy: Strategy, lr: float, mu: float, first_round: int) -> None:
        self.strategy = strategy
        self.lr, self.mu = lr, mu
        self.first_round = first_round
        # The last round's outliers that alone explain a leap (the others moved
        # as trained models do): a lead when the next round blows up.
        self.culprits: list[dict[str, Any]] = []
        self.jump = 1.0  # ‖θ_{t+1}‖ / ‖θ_t‖ of the last round: a sudden leap is no learning rate's doing

    def received(self, r: int, theta: Theta, got: Collected) -> None:
        """A client whose local training blew up: averaging on without it
        would only hide why. Which was it: the lr, mu, or a model that was
        already absurd when it arrived?"""
        diverged = [d.client_id for d in got.dropped if d.diverged]
        if diverged:
            raise RunStopped("diverged", f"round {r}: local training diverged on {', '.join(diverged)}: "
                                         f"{self._why(r, theta)}")

    def after(self, r: int, theta: Theta, got: Collected, step: Step) -> tuple[Step, dict[str, Any]]:
        suspects, culprits = self._outliers(theta, got.results)
        if not np.all(np.isfinite(step.theta)):
            if culprits:
                raise RunStopped("diverged", f"round {r}: the aggregate is no longer finite: {_named(culprits)}; an "
                                             "outlier, not the lr: a robust aggregator (median, trimmed_mean, krum) "
                                             "or clip_norm would hold")
            raise RunStopped("diverged", f"round {r}: the global model is no longer finite "
                                         f"(lr={self.lr:g} is too large); try a smaller lr")
        before, after = update_norms([theta, step.theta])
        self.culprits, self.jump = culprits, after / max(before, 1.0)
        return step, {"suspicious": suspects}

    def measured(self, round_no: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise RunStopped("diverged", f"the federated loss of round {round_no}'s model is no longer finite "
                                         f"(lr={self.lr:g} is too large); try a smaller lr")

    def _why(self, r: int, theta: Theta) -> str:
        """The likeliest cause of a client's local training blowing up."""
        size = float(np.max(np.abs(theta)))
        if size > ABSURD and r == self.first_round:
            return f"the starting model has a weight of {size:.3g}, too large for any lr"
        if size > ABSURD and self.jump > SUDDEN and self.culprits:
            return (f"it started from a global model with a weight of {size:.3g}, {self.jump:.3g}× the one before, "
                    f"which round {r - 1}'s aggregate took from {_named(self.culprits)}: an outlier, not the lr; "
                    "a robust aggregator (median, trimmed_mean, krum) or clip_norm would hold")
        if self.mu and self.mu * self.lr >= 2:
            return f"mu={self.mu:g} is too large for lr={self.lr:g} (lr·mu ≥ 2 overshoots); try a smaller mu"
        return f"lr={self.lr:g} is too large for its data; try a smaller lr"

    def _outliers(self, theta: Theta, results: list[Result]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The clients whose update (W_k − W_t, or the gradient they sent) is
        far larger than the others': flagged under any aggregator, FedAvg too.
        Also those of them that alone explain a leap of the model: outliers
        while every other client moved as trained models do (by less than
        CALM × (‖W_t‖ + 1)); when all move wildly, the lr is the likelier cause."""
        updates = [self.strategy.update_of(r, theta) for r in results]
        if any(u is None for u in updates) or len(updates) < 2:
            return [], []  # exact sends statistics, not an update
        norms = update_norms(updates)
        flagged = outliers(norms)  # an update whose norm overflows is among them: the most suspicious of all
        suspects = [{"client_id": results[k].client_id, "url": results[k].url, **_sized(norms[k], ratio)}
                    for k, ratio in flagged]
        others = [n for k, n in enumerate(norms) if k not in {j for j, _ in flagged}]
        calm = bool(others) and max(others) <= CALM * (update_norms([theta])[0] + 1)
        # A client whose own loss grew while it trained is diverging at this
        # lr on its own data: honest, and the lr's doing.
        culprits = [x for (k, _), x in zip(flagged, suspects) if not _loss_grew(results[k])]
        return suspects, culprits if calm else []


def _loss_grew(result: Result) -> bool:
    m = result.metrics or {}
    return "loss_before" in m and "loss_after" in m and m["loss_after"] > m["loss_before"]


def _sized(norm: float, ratio: float) -> dict[str, Any]:
    """A flagged update's size as a record can hold it: JSON has no inf, so a
    norm beyond the largest float is written as that float, with "overflow"."""
    if math.isfinite(norm) and math.isfinite(ratio):
        return {"update_norm": float(norm), "ratio": float(ratio)}
    return {"update_norm": min(float(norm), sys.float_info.max), "ratio": min(float(ratio), sys.float_info.max),
            "overflow": True}


def _named(suspects: list[dict[str, Any]]) -> str:
    return ", ".join(f"{x['client_id']} (update norm over {sys.float_info.max:.3g}, beyond the largest float)"
                     if x.get("overflow") else
                     f"{x['client_id']} (update norm {x['update_norm']:.3g}, {x['ratio']:.3g}× the others')"
                     for x in suspects[:6])
