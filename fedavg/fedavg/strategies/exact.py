"""Exact: federated least squares in one round.

For a linear model the pooled least-squares solution needs only sums:
each client sends n_k, Σ x̃x̃ᵀ and Σ x̃y over its rows (x̃ = [x, 1]), and the
server solves the normal equations

    (Σ_k X̃_kᵀX̃_k + λ·D) W = Σ_k X̃_kᵀy_k,   D = diag(1, …, 1, 0)

(λ is an optional ridge on w, never on b). What this reveals: each client's
second moments Σ x̃x̃ᵀ and Σ x̃y, far more than a model does (with two rows
and one feature they determine the rows). FedAvg exists anyway because most
models (anything non-linear) have no such closed form.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..model import Theta
from ..trace import fmt, names
from .base import BatchMemory, ClientTask, Local, LocalBatch, Param, Result, RunMemory, State, Step, Strategy
from .fields import STATS

if TYPE_CHECKING:
    from ..population import Population


class Exact(Strategy):
    name = "exact"
    summary = "solve (Σ_k X̃_kᵀX̃_k + λ·D) W = Σ_k X̃_kᵀy_k: the pooled least-squares model in one round"
    params = (Param("ridge", 0.0, "λ, a ridge penalty on w (not on b)", ge=0, le=1e12),)
    replies = (STATS,)
    combines = False  # it sums statistics: no robust rule applies
    one_round = True

    @classmethod
    def gives_optimum(cls, params: dict[str, float]) -> bool:
        """Without a ridge, the normal equations' solution is θ* itself."""
        return not params.get("ridge")

    @classmethod
    def local(cls, task: ClientTask, X: np.ndarray, y: np.ndarray, memory: RunMemory) -> Local:
        """X̃ᵀX̃ and X̃ᵀy over the client's rows, X̃ = [X, 1]."""
        X1 = np.hstack([X, np.ones((len(y), 1))])
        return Local(extra={"stats": {"xtx": X1.T @ X1, "xty": X1.T @ y}})

    @classmethod
    def local_batch(cls, task: ClientTask, population: Population, ids: np.ndarray,
                    memory: BatchMemory) -> LocalBatch:
        """X̃_kᵀX̃_k and X̃_kᵀy_k: the population already holds them."""
        return LocalBatch(extra={"stats.xtx": population.xtx[ids], "stats.xty": population.xty[ids]})

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """W = (Σ X̃ᵀX̃ + λ·D)⁻¹ Σ X̃ᵀy (least squares when the sum is singular)."""
        A = sum(r.extra["stats"]["xtx"] for r in results)
        c = sum(r.extra["stats"]["xty"] for r in results)
        D = np.eye(len(theta))
        D[-1, -1] = 0.0
        lam = self.p["ridge"]
        lhs = A + lam * D
        new, _, rank, _ = np.linalg.lstsq(lhs, c, rcond=None)
        coords = names(len(theta))
        trace = [f"N = {sum(r.n for r in results)} rows in {len(results)} client(s); "
                 f"Σ X̃ᵀX̃ + {fmt(lam)}·D = [" + "; ".join(" ".join(fmt(v) for v in row) for row in lhs) + "]",
                 "Σ X̃ᵀy = [" + " ".join(fmt(v) for v in c) + "]"]
        if rank < len(theta):
            trace.append(f"the system has rank {rank} < {len(theta)}: the minimum-norm least-squares solution")
        trace += [f"{name} = {fmt(value)}" for name, value in zip(coords, new)]
        return Step(new, state, trace)
