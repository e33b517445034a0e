"""Differential privacy for federated averaging: DP-FedAvg (McMahan, Ramage,
Talwar and Zhang, ICLR 2018, "Learning Differentially Private Recurrent
Language Models") with adaptive clipping (Andrew, Thakkar, McMahan and
Ramaswamy, NeurIPS 2021, "Differentially Private Learning with Adaptive
Clipping").

One round releases

    W_{t+1} = W_t + (Σ_{k∈S_t} clip_S(Δ_k) + N(0, σ²S²·I)) / M,
    Δ_k = W_k − W_t,   clip_S(Δ) = Δ·min(1, S/‖Δ‖),   M = q·K

with equal weights and a fixed denominator M, the number of clients a round
samples on average (q the sampling probability, K the clients): whatever one
client sends, it moves the model by at most S/M, and the Gaussian noise of
standard deviation σ·S/M on every coordinate hides that move. FedAvg's
n_k/N weights are not used: they would let a client with a large n_k move
the model by more, and N itself would depend on who was sampled.

The noise comes from the operating system's entropy, never from the run's
seed: the seed is stored with the run, and noise that can be replayed can
be subtracted. A DP run therefore cannot be replayed exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .trace import explain_mean_of_sum, fmt, names


def clip(delta: np.ndarray, bound: float) -> np.ndarray:
    """clip_S(Δ) = Δ·min(1, S/‖Δ‖): Δ itself when ‖Δ‖ ≤ S (or S = ∞)."""
    norm = float(np.linalg.norm(delta))
    if not norm > bound:  # (a NaN norm is not clipped: the finiteness check names it)
        return delta
    return delta * (bound / norm)


def noise_std(noise_multiplier: float, bound: float, expected: float) -> float:
    """σ·S/M: the standard deviation DP-FedAvg's noise adds to each
    coordinate of the model (0 when σ = 0, also with S = ∞)."""
    return 0.0 if noise_multiplier == 0 else noise_multiplier * bound / expected


def client_noise_std(noise_multiplier: float, bound: float, expected: float) -> float:
    """σ·S/√M: each client's share of the noise when the clients add it
    themselves (distributed DP): M clients' independent N(0, σ²S²/M) sum to
    N(0, σ²S²), the noise the server would have added."""
    return 0.0 if noise_multiplier == 0 else noise_multiplier * bound / math.sqrt(expected)


def privatize(theta: np.ndarray, center: np.ndarray, bound: float, std: float,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """A client's side: W_t + clip_S(W_k − W_t) + N(0, std²·I), the model it
    sends instead of W_k (std = 0: clipping only)."""
    out = center + clip(theta - center, bound)
    if std > 0:
        out = out + (rng or np.random.default_rng()).normal(0.0, std, size=len(out))
    return out


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al., 2021): with adaptive
    clipping each round releases the noised update and the noised count of
    unclipped clients; the update's multiplier grows so that the two
    together cost what one release with multiplier z would. Needs 2σ_b > z."""
    if noise_multiplier == 0:
        return 0.0
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


def adapt_clip(bound: float, unclipped: int, expected: float, target_quantile: float, lr: float,
               count_noise: float, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Andrew et al.'s geometric update of the clipping bound:

        b̄ = (Σ_k 1[‖Δ_k‖ ≤ S] + N(0, σ_b²)) / M,   S_{t+1} = S_t · exp(−η·(b̄ − γ))

    S grows while fewer than the target share γ of updates fit under it, and
    shrinks while more do. Returns (S_{t+1}, b̄)."""
    noise = (rng or np.random.default_rng()).normal(0.0, count_noise) if count_noise > 0 else 0.0
    share = (unclipped + noise) / expected
    return bound * math.exp(-lr * (share - target_quantile)), share


@dataclass
class DPAverage:
    """DP-FedAvg's release in place of a strategy's average (see the module
    docstring); called like ``Combine``. ``local`` when the clients clipped
    and added their shares of the noise themselves (distributed DP): the
    server only sums, since clipping a noised update again would change its
    noise. The bound on any one client's move then rests on the clients, as
    it does under secure aggregation, where the server sees no update."""

    bound: float  # S (adaptive clipping moves it between rounds)
    noise_multiplier: float  # σ (already z_Δ under adaptive clipping)
    expected: float  # M = q·K
    local: bool = False
    rng: np.random.Generator = field(default_factory=np.random.default_rng)  # OS entropy: never the run's seed
    plain = False  # not FedAvg's own average: a strategy writes out its whole computation

    def from_sum(self, weighted_sum: np.ndarray, weight: float, center: np.ndarray) -> tuple[np.ndarray, str]:
        """From the clients' sum alone (secure aggregation, equal weights w_k = 1):
        θ_t + Σ_k Δ_k = θ_t + Σ_k W_k − (Σ_k w_k)·θ_t, the one model whose
        update is every client's: the release divides it by M itself. Only
        when the clients clipped and noised their own updates (``local``)."""
        if not self.local:
            raise ValueError("DP-FedAvg from a sum needs the clients to clip and noise their own updates (local_noise)")
        model = center + (weighted_sum - weight * center)
        return model, (explain_mean_of_sum(weighted_sum / weight, weight) +
                       f"; DP-FedAvg goes on from θ_t + Σ_k Δ_k = [{', '.join(fmt(v) for v in model)}]")

    def __call__(self, vectors: Sequence[np.ndarray], ns: Sequence[int], center: np.ndarray,
                 symbol: str = "") -> tuple[np.ndarray, list[str]]:
        """W_t + (Σ_k clip_S(W_k − W_t) + N(0, σ²S²·I)) / M and the lines that
        write it out: each update's norm, the noise's size, the release. Not
        the noise drawn, nor the sum before it: they are what DP hides."""
        deltas = [v - center for v in vectors]
        norms = [float(np.linalg.norm(d)) for d in deltas]
        shown = ", ".join(fmt(n) for n in norms[:6]) + (f", … ({len(norms)})" if len(norms) > 6 else "")
        if self.local:
            noised = sum(deltas, np.zeros_like(center))
            lines = [f"DP-FedAvg, noise from the clients: each sent W_t + clip_S(Δ_k) + N(0, σ²S²/M), S = "
                     f"{fmt(self.bound)}, σ = {fmt(self.noise_multiplier)}; ‖Δ_k‖ as received = {shown}"]
        else:
            std = self.noise_multiplier * self.bound if self.noise_multiplier > 0 else 0.0
            total = sum((clip(d, self.bound) for d in deltas), np.zeros_like(center))
            noised = total + self.rng.normal(0.0, std, size=len(center)) if std > 0 else total
            lines = [f"DP-FedAvg: Δ_k = W_k − W_t clipped to S = {fmt(self.bound)}: ‖Δ_k‖ = {shown}; "
                     f"{sum(n > self.bound for n in norms)} of {len(norms)} scaled down",
                     f"noise N(0, σ²S²) per coordinate, σ = {fmt(self.noise_multiplier)}: std σ·S = {fmt(std)}"]
        result = center + noised / self.expected
        coords = names(len(center), symbol)
        lines += [f"{name} = {fmt(center[j])} + (Σ_k clip(Δ_k) + noise) / M = {fmt(center[j])} + "
                  f"{fmt(noised[j])} / {fmt(self.expected)} = {fmt(result[j])}" for j, name in enumerate(coords)]
        return result, lines
