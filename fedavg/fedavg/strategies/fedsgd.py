"""FedSGD: one gradient step per round on the pooled objective.

Each client sends the full-batch gradient of its MSE at W_t; the server takes
one step with their sample-weighted average. Since Σ_k n_k/N · ∇L_k = ∇L of
the pooled data, this *is* centralised gradient descent, run federated.
"""
from __future__ import annotations

import numpy as np

from ..model import Theta, as_theta, gradients, split
from ..trace import explain_each, fmt, names
from .base import ClientTask, Local, Result, RunMemory, State, Step, Strategy
from .fields import GRADIENT


class FedSGD(Strategy):
    name = "fedsgd"
    summary = "W_{t+1} = W_t − lr · Σ_k n_k/N · ∇L_k(W_t): centralised gradient descent, federated"
    replies = (GRADIENT,)

    @classmethod
    def local(cls, task: ClientTask, X: np.ndarray, y: np.ndarray, memory: RunMemory) -> Local:
        """g_k = ∇L_k(W_t), the full-batch gradient of the client's MSE."""
        dw, db = gradients(*split(task.theta), X, y)
        return Local(extra={"gradient": as_theta(dw, db)})

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """g = Σ_k n_k/N · g_k;  W_{t+1} = W_t − lr·g."""
        g, trace = self.combine([r.extra["gradient"] for r in results], [r.n for r in results],
                                np.zeros_like(theta), symbol="g")
        new = theta - self.lr * g
        trace += explain_each(names(len(theta)), f"{{}} = {{}} − {fmt(self.lr)}·{{}} = {{}}", theta, g, new)
        return Step(new, state, trace)
