"""FedAvg (McMahan et al., 2017) and FedProx (Li et al., 2020).

Both average the clients' local models by sample count; FedProx's clients
add mu/2·‖W − W_t‖² to their loss, which keeps each local model near W_t.
"""
from __future__ import annotations

from ..model import Theta
from .base import Result, State, Step, Strategy


class FedAvg(Strategy):
    name = "fedavg"
    summary = "W_{t+1} = Σ_k n_k/N · W_k: the sample-weighted average of the local models"
    averages_models = True

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """W_{t+1} = Σ_k n_k/N · W_k over the clients that replied (or the
        run's robust rule in its place)."""
        new, trace = self.combine([r.theta for r in results], [r.n for r in results], theta)
        return Step(new, state, trace)


class FedProx(FedAvg):
    name = "fedprox"
    summary = ("FedAvg's average of local models trained on L_k(W) + mu/2·‖W − W_t‖² "
               "(the proximal term keeps them near W_t)")
    uses_mu = True
