"""DP-FedAvg's part of a run: the privacy stage.

It owns everything differential privacy adds to a round (the math is in
``fedavg.privacy``): Poisson sampling from the system's entropy, what each
/train config tells a client to do to its model (clip to S, and its share
of the noise under ``local_noise``), the aggregator that replaces the
strategy's average (``DPAverage``, set once), the clip bound S and how
adaptive clipping moves it, the budget that stops a run before it is
overspent, and the round record's ``privacy``: ε spent so far, S, the noise.

It also decides what of a round may be written down. The mechanism
releases the noised model; each client's update, loss and clip bit are
not covered by ε, so the record (the store, the API, the log written from
it) keeps only who took part, the release and the aggregates (``redact``).
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
from .records import RoundRecord, without_clients_numbers
from .sampling import PoissonSample
from .stage import RunStopped, Stage


class Privacy(Stage):
    def __init__(self, dp: DPSettings, fraction: float, min_clients: int) -> None:
        self.dp = dp
        self.fraction = fraction
        self.sampler = PoissonSample(fraction, min_clients)
        self.bound = math.inf if dp.clip is None else dp.clip  # S, this round's
        self.aggregator = DPAverage(self.bound, dp.update_noise_multiplier, dp.expected, local=dp.local_noise)
        self.sampled = 0  # n, the clients this round sampled: each one's share of local noise is σ²S²/n

    def describe(self) -> str:
        dp = self.dp
        return (f"DP-FedAvg: W_{{t+1}} = W_t + (Σ_k clip_S(W_k − W_t) + N(0, σ²S²)) / M with "
                f"σ={dp.noise_multiplier:g}, S={'∞' if dp.clip is None else format(dp.clip, 'g')}, "
                f"M=q·K={dp.expected:g}, δ={dp.delta:g}"
                + ("" if dp.target_epsilon is None else f", budget ε ≤ {dp.target_epsilon:g}")
                + (", noise added by the clients" if dp.local_noise else "")
                + ("" if not dp.adaptive else ", adaptive S: " + ", ".join(
                    f"{k}={v:g}" for k, v in asdict(dp.adaptive).items()))
                + "; each client's update, loss and clip bit are kept out of the record and the log")

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

    def drawn(self, r: int, sample: list[str]) -> None:
        self.sampled = len(sample)

    def config(self) -> dict[str, Any]:
        """What each client does to its model before sending it: clip, and its share of the noise."""
        dp = self.dp
        return {"dp_clip": None if math.isinf(self.bound) else self.bound,
                "dp_noise_std": (client_noise_std(dp.update_noise_multiplier, self.bound, self.sampled)
                                 if dp.local_noise else 0.0)}

    def received(self, r: int, theta: Theta, got: Collected) -> None:
        """With the clients' noise: how much of it reached the sum. A sampled
        client lost on the way (a dropout, a reply refused) took its share
        with it; the server adds that part, so that the release has the noise
        the accountant counts whoever replied (all of it when nobody was sampled)."""
        if self.dp.local_noise:
            n = self.sampled
            self.aggregator.missing = 1.0 if n == 0 else max(n - got.contributors, 0) / n

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
        trace = list(step.trace)
        if dp.local_noise:
            missing = self.aggregator.missing
            record |= {"sampled": self.sampled, "noise_shares_in_sum": got.contributors,
                       "server_noise_share": missing}
            if missing > 0 and got.trace:
                # The collector's lines (secure aggregation's) write out the sum it unmasked, whose noise
                # fell short: only the release, topped up, may be written.
                trace = [f"secure aggregation: the sum of {got.contributors} of the {self.sampled} sampled clients' "
                         "inputs (not written: their noise is short of σ²S² until the server adds the rest)",
                         *trace[len(got.trace):]]
        trace.append(f"privacy: ε = {spent:.6g} spent after {r} round(s) at δ = {dp.delta:g}"
                     + ("" if dp.target_epsilon is None else f" (budget {dp.target_epsilon:g})"))
        if dp.adaptive:
            a = dp.adaptive
            # Each client's bit (its update fit under S before it clipped); a client that
            # did not say is counted from what it sent.
            bits = [(x.metrics or {}).get("within_clip", float(np.linalg.norm(x.theta - theta) <= bound))
                    for x in got.results if x.theta is not None]
            new_bound, share = adapt_clip(bound, bits, dp.expected, a.target_quantile, a.lr, a.count_noise)
            record |= {"unclipped_share": share, "next_clip": new_bound}
            self._set_bound(new_bound)
            trace.append(f"adaptive clip: b̄ = clamp_[0,1]((Σ_k (bit_k − ½) + N(0, σ_b²)) / M + ½) = {share:.6g}; "
                         f"S ← S·exp(−η(b̄ − γ)) = {bound:.6g}·exp(−{a.lr:g}·({share:.6g} − "
                         f"{a.target_quantile:g})) = {new_bound:.6g}")
        return Step(step.theta, step.state, trace), {"privacy": record}

    def redact(self, record: RoundRecord) -> RoundRecord:
        """Only what the mechanism releases (the noised model, ε, the settings) and who took part."""
        return without_clients_numbers(record)

    def losses_written(self, losses: list[tuple[float, int]]) -> list[tuple[float, int]]:
        return []  # the federated loss alone: no client's own

    def withholds_loss(self, clients: int) -> str | None:
        # With Poisson sampling a round often has one participant: its "federated" loss is then its own.
        return None if clients >= 2 else "under DP a loss of one client alone is its own number"

    def epsilon(self, rounds: int) -> float:
        from .accountant import epsilon  # dp-accounting (with SciPy) only for runs that use it
        return epsilon(self.fraction, self.dp.noise_multiplier, rounds, self.dp.delta)

    def _set_bound(self, bound: float) -> None:
        self.bound = self.aggregator.bound = bound
