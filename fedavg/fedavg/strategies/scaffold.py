"""SCAFFOLD (Karimireddy et al., 2020), control variates, option II.

Client drift comes from each client following its own gradient. SCAFFOLD
corrects every local step by c − c_k: the server's estimate of the average
gradient minus the client's estimate of its own, so that the local steps
follow the pooled objective instead of the client's.

Each client keeps c_k per run (``RunMemory``); a restarted client starts
again from c_k = 0. The server's c is stored with every round.
"""
from __future__ import annotations

import numpy as np

from ..aggregation import weighted_average
from ..model import Theta, as_theta, split
from ..trace import explain_average, explain_each, fmt, names
from ..training import local_steps, local_train
from .base import ClientTask, Local, Param, Result, RunMemory, State, Step, Strategy
from .fields import CONTROL, CONTROL_DELTA, LOCAL_MODEL


class Scaffold(Strategy):
    name = "scaffold"
    summary = ("local steps y ← y − lr·(∇L_k(y) − c_k + c); W_{t+1} = W_t + η_g·Σ_k n_k/N·(y_k − W_t), "
               "c ← c + |S|/K · Σ_k n_k/N·Δc_k")
    params = (Param("server_lr", 1.0, "η_g, the server's step on the averaged update", gt=0, le=10),)
    replies = (LOCAL_MODEL, CONTROL_DELTA)
    sends = (CONTROL,)

    def initial_state(self, theta: Theta) -> State:
        return {"c": np.zeros_like(theta)}

    def inputs(self, state: State) -> dict[str, np.ndarray]:
        return {"control": state["c"]}

    @classmethod
    def local(cls, task: ClientTask, X: np.ndarray, y: np.ndarray, memory: RunMemory) -> Local:
        """τ steps of y ← y − lr·(∇L_k(y) − c_k + c) from y = W_t, then
        c_k⁺ = c_k − c + (W_t − y)/(τ·lr) (option II) and Δc_k = c_k⁺ − c_k."""
        c = task.inputs["control"]
        run = task.config.run or ""
        c_k = memory.before(run, task.round or 0)
        if c_k is None:
            c_k = np.zeros_like(task.theta)
        w, b = local_train(*split(task.theta), X, y, task.config, correction=c - c_k,
                           stop=task.past_deadline)
        theta_k = as_theta(w, b)
        tau = local_steps(len(y), task.config)
        c_k_new = c_k - c + (task.theta - theta_k) / (tau * task.config.lr)
        memory.after(run, task.round or 0, c_k_new)
        return Local(theta_k, {"control_delta": c_k_new - c_k})

    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """Δy = Σ_k n_k/N·(y_k − W_t);  W_{t+1} = W_t + η_g·Δy;
        c⁺ = c + |S|/K · Σ_k n_k/N·Δc_k (with equal n_k: the paper's 1/K·Σ Δc_k)."""
        ns = [r.n for r in results]
        dy = [r.theta - theta for r in results]
        dc = [r.extra["control_delta"] for r in results]
        delta, dy_lines = self.combine(dy, ns, np.zeros_like(theta), symbol="Δy")
        eta = self.p["server_lr"]
        new = theta + eta * delta
        share = len(results) / max(self.num_clients, len(results))
        dc_avg = weighted_average(dc, ns)
        c = state["c"] + share * dc_avg
        k = max(self.num_clients, len(results))
        trace = explain_average(ns, dc, dc_avg, symbol="Δc")
        trace += explain_each(names(len(theta), "c"), f"{{}} = {{}} + ({len(results)}/{k})·{{}} = {{}}",
                              state["c"], dc_avg, c)
        trace += dy_lines[1:] if self.combine.plain else dy_lines  # (N is written above)
        trace += explain_each(names(len(theta)), f"{{}} = {{}} + {fmt(eta)}·{{}} = {{}}", theta, delta, new)
        return Step(new, {"c": c}, trace)
