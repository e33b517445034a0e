"""FedSGD: one gradient step per round on the pooled objective.

Each client sends the full-batch gradient of its MSE at W_t; the server takes
one step with their sample-weighted average. Since Σ_k n_k/N · ∇L_k = ∇L of
the pooled data, this *is* centralised gradient descent, run federated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..model import Theta, as_theta, gradients, split
from ..trace import explain_each, fmt, names
from .base import BatchMemory, ClientTask, Local, LocalBatch, Result, RunMemory, State, Step, Strategy
from .fields import GRADIENT

if TYPE_CHECKING:
    from ..population import Population


class FedSGD(Strategy):
    name = "fedsgd"
    summary = "W_{t+1} = W_t − lr · Σ_k n_k/N · ∇L_k(W_t): centralised gradient descent, federated"
    replies = (GRADIENT,)

    @classmethod
    def local(cls, task: ClientTask, X: np.ndarray, y: np.ndarray, memory: RunMemory) -> Local:
        """g_k = ∇L_k(W_t), the full-batch gradient of the client's MSE."""
        dw, db = gradients(*split(task.theta), X, y)
        return Local(extra={"gradient": as_theta(dw, db)})

    @classmethod
    def local_batch(cls, task: ClientTask, population: Population, ids: np.ndarray,
                    memory: BatchMemory) -> LocalBatch:
        """g_k = (2/n_k)·Σ_i x̃_i·err_i for every client at once, from its rows
        (one pass; not (2/n_k)·(G_k θ − h_k), which loses digits when g_k is
        small against G_k θ)."""
        return LocalBatch(extra={"gradient": population.gradients(np.broadcast_to(task.theta, (len(ids),
                                                                                                len(task.theta))),
                                                                   ids)})

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """g = Σ_k n_k/N · g_k;  W_{t+1} = W_t − lr·g."""
        g, trace = self.combine([r.extra["gradient"] for r in results], [r.n for r in results],
                                np.zeros_like(theta), symbol="g")
        new = theta - self.lr * g
        trace += explain_each(names(len(theta)), f"{{}} = {{}} − {fmt(self.lr)}·{{}} = {{}}", theta, g, new)
        return Step(new, state, trace)
