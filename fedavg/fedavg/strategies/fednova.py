"""FedNova (Wang et al., 2020): normalized averaging.

When clients take different numbers of local steps τ_k (mini-batches and
unequal n_k), FedAvg's average over-weights the clients that stepped most, and
converges to the optimum of a different objective. FedNova averages each
client's update per step, d_k = (W_t − W_k)/τ_k, and rescales by the
effective number of steps τ_eff = Σ_k n_k/N · τ_k (plain local SGD: a_k is all
ones, ‖a_k‖₁ = τ_k). With equal τ_k it is FedAvg.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..aggregation import weighted_average
from ..model import Theta
from ..trace import explain_each, explain_weighted_sum, fmt, names
from ..training import local_gd_batch, local_steps
from .base import BatchMemory, ClientTask, Local, LocalBatch, Result, RunMemory, State, Step, Strategy
from .fields import LOCAL_MODEL, STEPS

if TYPE_CHECKING:
    from ..population import Population


class FedNova(Strategy):
    name = "fednova"
    summary = "W_{t+1} = W_t − τ_eff · Σ_k n_k/N · (W_t − W_k)/τ_k,  τ_eff = Σ_k n_k/N · τ_k"
    replies = (LOCAL_MODEL, STEPS)

    @classmethod
    def local(cls, task: ClientTask, X: np.ndarray, y: np.ndarray, memory: RunMemory) -> Local:
        """FedAvg's local GD, and τ_k, the number of steps it took."""
        trained = super().local(task, X, y, memory)
        return Local(trained.theta, {"steps": local_steps(len(y), task.config)})

    @classmethod
    def local_batch(cls, task: ClientTask, population: Population, ids: np.ndarray,
                    memory: BatchMemory) -> LocalBatch:
        """Full batch: FedAvg's vectorised local GD, and τ_k = E for every
        client. Mini-batches: the per-client loop (τ_k = E·⌈n_k/B⌉ there)."""
        if task.config.batch_size is not None:
            return cls.local_each(task, population, ids, memory)
        theta_k = local_gd_batch(task.theta, population.xtx[ids], population.xty[ids], population.sizes[ids],
                                 task.config)
        return LocalBatch(theta_k, {"steps": np.full(len(ids), task.config.local_epochs, dtype=np.int64)})

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """d = Σ_k n_k/N · (W_t − W_k)/τ_k;  W_{t+1} = W_t − τ_eff·d."""
        ns = [r.n for r in results]
        taus = [r.extra["steps"] for r in results]
        tau_eff = float(weighted_average([np.array([t], dtype=float) for t in taus], ns)[0])
        per_step = [(theta - r.theta) / r.extra["steps"] for r in results]
        d, d_lines = self.combine(per_step, ns, np.zeros_like(theta), symbol="d")
        new = theta - tau_eff * d
        trace = [explain_weighted_sum("τ_eff", ns, taus, tau_eff)]
        trace += d_lines[1:] if self.combine.plain else d_lines  # (N is in the τ_eff line)
        trace += explain_each(names(len(theta)), f"{{}} = {{}} − {fmt(tau_eff)}·{{}} = {{}}", theta, d, new)
        return Step(new, state, trace)
