"""DP-FedAvg's part of a run: the privacy stage.

It owns everything differential privacy adds to a round (the math is in
``fedavg.privacy``): Poisson sampling from the system's entropy, what each
/train config tells a client to do to its model (clip to S, and its share
of the noise under ``local_noise``), the aggregator that replaces the
strategy's average (``DPAverage``, set once), the clip bound S and how
adaptive clipping moves it, the budget that stops a run before it is
overspent, and the round record's ``privacy``: ε spent so far, S, the noise.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np

from fedavg.model import Theta
from fedavg.privacy import DPAverage, adapt_clip, client_noise_std, noise_std
from fedavg.strategies import Step

from .collect import Collected
from .privacy_settings import DPSettings
from .sampling import PoissonSample
from .stage import RunStopped, Stage


class Privacy(Stage):
    def __init__(self, dp: DPSettings, fraction: float, min_clients: int) -> None:
        self.dp = dp
        self.fraction = fraction
        self.sampler = PoissonSample(fraction, min_clients)
        self.bound = math.inf if dp.clip is None else dp.clip  # S, this round's
        self.aggregator = DPAverage(self.bound, dp.update_noise_multiplier, dp.expected, local=dp.local_noise)

    def describe(self) -> str:
        dp = self.dp
        return (f"DP-FedAvg: W_{{t+1}} = W_t + (Σ_k clip_S(W_k − W_t) + N(0, σ²S²)) / M with "
                f"σ={dp.noise_multiplier:g}, S={'∞' if dp.clip is None else format(dp.clip, 'g')}, "
                f"M=q·K={dp.expected:g}, δ={dp.delta:g}"
                + ("" if dp.target_epsilon is None else f", budget ε ≤ {dp.target_epsilon:g}")
                + (", noise added by the clients" if dp.local_noise else "")
                + ("" if not dp.adaptive else ", adaptive S: " + ", ".join(
                    f"{k}={v:g}" for k, v in asdict(dp.adaptive).items())))

    def resume(self, last: dict[str, Any]) -> None:
        """Where adaptive clipping left S (records before the stage kept it in the server state too)."""
        kept = (last.get("privacy") or {}).get("next_clip")
        if kept is None:
            kept = ((last.get("server_state") or {}).get("dp_clip") or [None])[0]
        if kept is not None:
            self._set_bound(float(kept))

    def before(self, r: int) -> None:
        """A run with a budget stops before the round that would overspend it."""
        target = self.dp.target_epsilon
        if target is None:
            return
        spent, next_eps = self.epsilon(r - 1), self.epsilon(r)
        if next_eps > target:
            raise RunStopped("budget_exhausted", f"round {r} would bring ε to {next_eps:.4g}, past the budget "
                                                 f"target_epsilon = {target:g} (δ = {self.dp.delta:g}); "
                                                 f"{r - 1} round(s) spent ε = {spent:.4g}")

    def config(self) -> dict[str, Any]:
        """What each client does to its model before sending it: clip, and its share of the noise."""
        dp = self.dp
        return {"dp_clip": None if math.isinf(self.bound) else self.bound,
                "dp_noise_std": (client_noise_std(dp.update_noise_multiplier, self.bound, dp.expected)
                                 if dp.local_noise else 0.0)}

    def after(self, r: int, theta: Theta, got: Collected, step: Step) -> tuple[Step, dict[str, Any]]:
        """The round's privacy record (ε spent so far, the clip bound and the
        noise it used) and, with adaptive clipping, the next round's S."""
        dp, bound, spent = self.dp, self.bound, self.epsilon(r)
        record = {"epsilon": spent if math.isfinite(spent) else None,  # None: ∞, no noise (JSON has no ∞)
                  "delta": dp.delta, "target_epsilon": dp.target_epsilon,
                  "clip": None if math.isinf(bound) else bound, "noise_multiplier": dp.noise_multiplier,
                  "update_noise_multiplier": dp.update_noise_multiplier,
                  "noise_std": noise_std(dp.update_noise_multiplier, bound, dp.expected),
                  "expected_clients": dp.expected}
        trace = [*step.trace, f"privacy: ε = {spent:.6g} spent after {r} round(s) at δ = {dp.delta:g}"
                 + ("" if dp.target_epsilon is None else f" (budget {dp.target_epsilon:g})")]
        if dp.adaptive:
            a = dp.adaptive
            # Each client's bit (its update fit under S before it clipped); a client that
            # did not say is counted from what it sent.
            unclipped = sum((x.metrics or {}).get("within_clip", float(np.linalg.norm(x.theta - theta) <= bound))
                            for x in got.results if x.theta is not None)
            new_bound, share = adapt_clip(bound, unclipped, dp.expected, a.target_quantile, a.lr,
                                          a.count_noise)
            record |= {"unclipped_share": share, "next_clip": new_bound}
            self._set_bound(new_bound)
            trace.append(f"adaptive clip: b̄ = (unclipped + N(0, σ_b²)) / M = {share:.6g}; S ← S·exp(−η(b̄ − γ)) = "
                         f"{bound:.6g}·exp(−{a.lr:g}·({share:.6g} − {a.target_quantile:g})) = {new_bound:.6g}")
        return Step(step.theta, step.state, trace), {"privacy": record}

    def epsilon(self, rounds: int) -> float:
        from .accountant import epsilon  # dp-accounting (with SciPy) only for runs that use it
        return epsilon(self.fraction, self.dp.noise_multiplier, rounds, self.dp.delta)

    def _set_bound(self, bound: float) -> None:
        self.bound = self.aggregator.bound = bound
