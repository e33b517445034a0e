"""SCAFFOLD (Karimireddy et al., 2020), control variates, option II.

Client drift comes from each client following its own gradient. SCAFFOLD
corrects every local step by c − c_k: the server's estimate of the average
gradient minus the client's estimate of its own, so that the local steps
follow the pooled objective instead of the client's.

Each client keeps c_k per run (``RunMemory``); a restarted client starts
again from c_k = 0. The server's c is stored with every round, and so is
what it is divided by (``memo``): a resumed run goes on exactly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..model import Theta, as_theta, split
from ..trace import TRACE_TERMS, explain_each, fmt, names
from ..training import local_gd_batch, local_steps, local_train
from .base import BatchMemory, ClientTask, Local, LocalBatch, Param, Result, RunMemory, State, Step, Strategy
from .fields import CONTROL, CONTROL_DELTA, LOCAL_MODEL

if TYPE_CHECKING:
    from ..population import Population


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
        # N, the Σ n_k that c is divided by, and the run's clients not counted
        # in it (no n_k yet: /health gave none and no reply yet, so c_k = 0).
        # None until the run's first step (or a resume from a record without them).
        self.total: int | None = None
        self.uncounted: set[str] = set()

    def memo(self) -> dict[str, Any]:
        if self.total is None:
            return {}
        # (in configuration order; no walk over a population's million clients when none is uncounted)
        return {"N": self.total, "uncounted": [u for u in self.clients if u in self.uncounted] if self.uncounted
                else []}

    def resume(self, memo: Mapping[str, Any] | None, clients: Sequence[str]) -> None:
        """c is stored as Σ_k n_k·c_k / N over the clients counted then: go on
        with that N, not with the n_k this server's /health probe happens to
        get (a client down then would be left out of N, and c rescaled when it
        replies). A client this server has and the stored run did not (resumed
        with {"clients": "current"}) is not counted yet: its c_k is 0. Without
        a memo (a record from before it was kept), N is learned again as in a
        new run."""
        if not memo:
            return
        self.total = int(memo["N"])
        self.uncounted = (set(memo["uncounted"]) | (set(self.clients) - set(clients))) & set(self.clients)

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

    @classmethod
    def local_batch(cls, task: ClientTask, population: Population, ids: np.ndarray,
                    memory: BatchMemory) -> LocalBatch:
        """``local`` for every client at once (full batch, τ = E): each
        client's own c_k from the batch memory (B, p), E corrected steps
        with c − c_k, then c_k⁺ and Δc_k per row. Mini-batches: the
        per-client loop."""
        if task.config.batch_size is not None:
            return cls.local_each(task, population, ids, memory)
        c = task.inputs["control"]
        run, round_no = task.config.run or "", task.round or 0
        c_k = memory.before(run, round_no, ids)
        theta_k = local_gd_batch(task.theta, population.xtx[ids], population.xty[ids], population.sizes[ids],
                                 task.config, correction=c - c_k)
        c_k_new = c_k - c + (task.theta - theta_k) / (task.config.local_epochs * task.config.lr)
        memory.after(run, round_no, ids, c_k_new)
        return LocalBatch(theta_k, {"control_delta": c_k_new - c_k})

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
        when it joins, and c is rescaled by N_before/N_after. N and the
        clients not counted yet are the memo: stored with every round."""
        c, trace = state["c"], []
        first = self.total is None
        if first:  # the run's first step: every n_k that /health gave
            # (a roster holding a population's n_k as arrays sums them itself: ``counted``)
            counted = getattr(self.sizes, "counted", None)
            if counted is not None:
                self.total, self.uncounted = counted(self.clients)
            else:
                self.total = sum(self.sizes.values())
                self.uncounted = {u for u in self.clients if u not in self.sizes}
        joining = [r for r in results if r.url in self.uncounted]
        if joining:
            before, self.total = self.total, self.total + sum(r.n for r in joining)
            self.uncounted -= {r.url for r in joining}
            if not first:
                trace.append(f"N = Σ n_k over every client known = {self.total}, was {before}: a client whose "
                             f"/health gave no n_k replied; c ← c·{before}/{self.total} (its c_k was 0)")
                c = c * (before / self.total)
        total = self.total
        ns = [r.n for r in results]
        dy = [r.theta - theta for r in results]
        dc = [r.extra["control_delta"] for r in results]
        # the updates' average is over those that replied: N_S, not N
        delta, dy_lines = self.combine(dy, ns, np.zeros_like(theta), symbol="Δy", total="N_S")
        eta = self.p["server_lr"]
        new = theta + eta * delta
        p = np.array(ns, dtype=float) / total
        c_new = c + p @ np.stack(dc)
        trace.append(f"N = Σ n_k over every client of the run, sampled or not = {total}"
                     + (f" ({len(self.uncounted)} more gave no n_k yet)" if self.uncounted else ""))
        for j, name in enumerate(names(len(theta), "c")):
            terms = [f"({n}/{total})·{fmt(v[j])}" for n, v in zip(ns[:TRACE_TERMS], dc)]
            more = f" + … ({len(ns)} terms)" if len(ns) > TRACE_TERMS else ""
            trace.append(f"{name} = {fmt(c[j])} + {' + '.join(terms)}{more} = {fmt(c_new[j])}")
        trace += dy_lines
        trace += explain_each(names(len(theta)), f"{{}} = {{}} + {fmt(eta)}·{{}} = {{}}", theta, delta, new)
        return Step(new, {"c": c_new}, trace)
