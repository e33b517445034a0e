"""SCAFFOLD (Karimireddy et al., 2020), control variates, option II.

Client drift comes from each client following its own gradient. SCAFFOLD
corrects every local step by c − c_k: the server's estimate of the average
gradient minus the client's estimate of its own, so that the local steps
follow the pooled objective instead of the client's.

Each client keeps c_k per run (``RunMemory``); a restarted client starts
again from c_k = 0. The server's c is stored with every round.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..model import Theta, as_theta, split
from ..trace import TRACE_TERMS, explain_each, fmt, names
from ..training import local_steps, local_train
from .base import ClientTask, Local, Param, Result, RunMemory, State, Step, Strategy
from .fields import CONTROL, CONTROL_DELTA, LOCAL_MODEL


class Scaffold(Strategy):
    name = "scaffold"
    summary = ("local steps y ← y − lr·(∇L_k(y) − c_k + c); W_{t+1} = W_t + η_g·Σ_{k∈S} n_k/N_S·(y_k − W_t), "
               "c ← c + Σ_{k∈S} n_k/N·Δc_k (N: every client's n_k)")
    params = (Param("server_lr", 1.0, "η_g, the server's step on the averaged update", gt=0, le=10),)
    replies = (LOCAL_MODEL, CONTROL_DELTA)
    sends = (CONTROL,)
    descends_own_loss = False  # its steps follow ∇L_k − c_k + c: a client's own loss may rightly grow

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # n_k of the clients whose /health gave none, from their replies; and
        # the N the state's c was last divided by (None: not yet, this run).
        self.learned: dict[str, int] = {}
        self.divided_by: int | None = None

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
        """Δy = Σ_{k∈S} n_k/N_S·(y_k − W_t) over the clients S that replied;
        W_{t+1} = W_t + η_g·Δy;  c⁺ = c + Σ_{k∈S} n_k/N·Δc_k, where N = Σ_k n_k
        over every client of the run, sampled or not.

        Why N and not N_S: c must stay Σ_k n_k/N·c_k, the average of every
        client's c_k (the paper's c = 1/K·Σ c_k with equal n_k). A round
        changes only the c_k of the clients in S, each by Δc_k, so that
        average moves by exactly Σ_{k∈S} n_k/N·Δc_k. Weighting by N_S instead
        (or by |S|/K·n_k/N_S) breaks it whenever the clients that replied are
        not a scaled copy of all of them (sampling or a dropout with unequal
        n_k), and the run settles away from the pooled optimum.

        n_k comes from each client's /health (``sizes``); a client whose
        /health gave none counts from its first reply on, with the n_k that
        reply states. Until then its c_k is 0, so Σ_k n_k·c_k is unchanged
        when it joins, and c is rescaled by N_before/N_after."""
        self.learned.update({r.url: r.n for r in results if r.url not in self.sizes})
        total = sum({**self.learned, **self.sizes}.values())
        c, trace = state["c"], []
        if self.divided_by is not None and self.divided_by != total:
            trace.append(f"N = Σ n_k over every client known = {total}, was {self.divided_by}: a client whose /health "
                         f"gave no n_k replied; c ← c·{self.divided_by}/{total} (its c_k was 0)")
            c = c * (self.divided_by / total)
        self.divided_by = total
        ns = [r.n for r in results]
        dy = [r.theta - theta for r in results]
        dc = [r.extra["control_delta"] for r in results]
        delta, dy_lines = self.combine(dy, ns, np.zeros_like(theta), symbol="Δy")
        eta = self.p["server_lr"]
        new = theta + eta * delta
        p = np.array(ns, dtype=float) / total
        c_new = c + p @ np.stack(dc)
        known = len({**self.learned, **self.sizes})
        trace.append(f"N = Σ n_k over all {known} clients, sampled or not = {total}"
                     + (f" ({self.num_clients - known} more gave no n_k yet)" if known < self.num_clients else ""))
        for j, name in enumerate(names(len(theta), "c")):
            terms = [f"({n}/{total})·{fmt(v[j])}" for n, v in zip(ns[:TRACE_TERMS], dc)]
            more = f" + … ({len(ns)} terms)" if len(ns) > TRACE_TERMS else ""
            trace.append(f"{name} = {fmt(c[j])} + {' + '.join(terms)}{more} = {fmt(c_new[j])}")
        if dy_lines and dy_lines[0].startswith("N = "):  # the updates' average is over those that replied
            dy_lines = ["N_S" + dy_lines[0][1:], *dy_lines[1:]]
        trace += dy_lines
        trace += explain_each(names(len(theta)), f"{{}} = {{}} + {fmt(eta)}·{{}} = {{}}", theta, delta, new)
        return Step(new, {"c": c_new}, trace)
