"""Server-side optimizers on FedAvg's pseudo-gradient.

The clients train exactly as in FedAvg. The server treats Δ_t = avg − W_t,
with avg = Σ_k n_k/N · W_k, as a gradient step and feeds it to an optimizer
of its own, whose state (v; m and v) is stored with every round:

- FedAvgM (Hsu et al., 2019): server momentum.
- FedAdagrad, FedAdam, FedYogi (Reddi et al., 2021, "Adaptive Federated
  Optimization", Algorithm 2), with m_0 = 0 and v_0 = τ² and no bias correction,
  as in the paper.
"""
from __future__ import annotations

from abc import abstractmethod

import numpy as np

from ..model import Theta
from ..trace import explain_each, fmt, names
from .base import Param, Result, State, Step, Strategy
from .combine import Combine

SERVER_LR = Param("server_lr", 0.1, "η, the server's learning rate", gt=0, le=10)
BETA1 = Param("beta1", 0.9, "β1, the decay of the first moment m", ge=0, lt=1)
BETA2 = Param("beta2", 0.99, "β2, the decay of the second moment v", ge=0, lt=1)
TAU = Param("tau", 1e-3, "τ, the adaptivity: v's floor in η·m/(√v + τ)", gt=0, le=10)


def pseudo_gradient(theta: Theta, results: list[Result], combine: Combine) -> tuple[np.ndarray, np.ndarray,
                                                                                   list[str]]:
    """avg = Σ_k n_k/N · W_k (or the run's robust rule) and Δ = avg − W_t,
    with the lines that write them out."""
    avg, lines = combine([r.theta for r in results], [r.n for r in results], theta, symbol="avg")
    delta = avg - theta
    lines += explain_each(names(len(theta), "Δ"), "{} = {} − {} = {}", avg, theta, delta)
    return avg, delta, lines


class FedAvgM(Strategy):
    name = "fedavgm"
    summary = "v ← β·v + Δ,  W_{t+1} = W_t + η·v  with Δ = Σ_k n_k/N·W_k − W_t (server momentum)"
    params = (Param("server_lr", 1.0, "η, the server's learning rate", gt=0, le=10),
              Param("momentum", 0.9, "β, the server momentum", ge=0, lt=1))
    averages_models = True

    def initial_state(self, theta: Theta) -> State:
        return {"v": np.zeros_like(theta)}

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """v_t = β·v_{t-1} + Δ_t;  W_{t+1} = W_t + η·v_t."""
        _, delta, trace = pseudo_gradient(theta, results, self.combine)
        beta, eta = self.p["momentum"], self.p["server_lr"]
        v = beta * state["v"] + delta
        new = theta + eta * v
        trace += explain_each(names(len(theta), "v"), f"{{}} = {fmt(beta)}·{{}} + {{}} = {{}}", state["v"], delta, v)
        trace += explain_each(names(len(theta)), f"{{}} = {{}} + {fmt(eta)}·{{}} = {{}}", theta, v, new)
        return Step(new, {"v": v}, trace)


class _Adaptive(Strategy):
    """Reddi et al.'s Algorithm 2; subclasses differ only in how v moves."""

    params = (SERVER_LR, BETA1, BETA2, TAU)
    averages_models = True
    v_rule: str  # the formula of v_t, for the trace

    def initial_state(self, theta: Theta) -> State:
        return {"m": np.zeros_like(theta), "v": np.full_like(theta, self.p["tau"] ** 2)}

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta2: np.ndarray) -> np.ndarray:
        """v_t from v_{t-1} and Δ_t²: the one line where the three differ."""

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """m_t = β1·m_{t-1} + (1 − β1)·Δ_t;  v_t by the subclass's rule;
        W_{t+1} = W_t + η·m_t / (√v_t + τ)."""
        _, delta, trace = pseudo_gradient(theta, results, self.combine)
        b1, eta, tau = self.p["beta1"], self.p["server_lr"], self.p["tau"]
        m = b1 * state["m"] + (1 - b1) * delta
        v = self.second_moment(state["v"], delta * delta)
        new = theta + eta * m / (np.sqrt(v) + tau)
        trace += explain_each(names(len(theta), "m"), f"{{}} = {fmt(b1)}·{{}} + {fmt(1 - b1)}·{{}} = {{}}",
                              state["m"], delta, m)
        trace += explain_each(names(len(theta), "v"), f"{{}} = {self.v_rule} = {{}}", state["v"], delta, v)
        trace += explain_each(names(len(theta)), f"{{}} = {{}} + {fmt(eta)}·{{}}/(√{{}} + {fmt(tau)}) = {{}}",
                              theta, m, v, new)
        return Step(new, {"m": m, "v": v}, trace)


class FedAdagrad(_Adaptive):
    name = "fedadagrad"
    summary = "v ← v + Δ²,  W_{t+1} = W_t + η·m/(√v + τ)  (Reddi et al., 2021)"
    params = (SERVER_LR, BETA1, TAU)
    v_rule = "{} + {}²"

    def second_moment(self, v: np.ndarray, delta2: np.ndarray) -> np.ndarray:
        """v_t = v_{t-1} + Δ_t²."""
        return v + delta2


class FedAdam(_Adaptive):
    name = "fedadam"
    summary = "v ← β2·v + (1 − β2)·Δ²,  W_{t+1} = W_t + η·m/(√v + τ)  (Reddi et al., 2021)"

    @property
    def v_rule(self) -> str:
        return f"{fmt(self.p['beta2'])}·{{}} + {fmt(1 - self.p['beta2'])}·{{}}²"

    def second_moment(self, v: np.ndarray, delta2: np.ndarray) -> np.ndarray:
        """v_t = β2·v_{t-1} + (1 − β2)·Δ_t²."""
        return self.p["beta2"] * v + (1 - self.p["beta2"]) * delta2


class FedYogi(_Adaptive):
    name = "fedyogi"
    summary = "v ← v − (1 − β2)·Δ²·sign(v − Δ²),  W_{t+1} = W_t + η·m/(√v + τ)  (Reddi et al., 2021)"

    @property
    def v_rule(self) -> str:
        return f"{{}} − {fmt(1 - self.p['beta2'])}·{{}}²·sign(v − Δ²)"

    def second_moment(self, v: np.ndarray, delta2: np.ndarray) -> np.ndarray:
        """v_t = v_{t-1} − (1 − β2)·Δ_t²·sign(v_{t-1} − Δ_t²)."""
        return v - (1 - self.p["beta2"]) * delta2 * np.sign(v - delta2)
