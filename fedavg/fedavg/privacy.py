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
be subtracted. A DP run therefore cannot be replayed exactly. Nothing here
writes out a number of any one client's (an update's norm, whether it was
clipped): the trace holds the release and what it is computed from in
aggregate only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .trace import explain_mean_of_sum, fmt, names


def clip(delta: np.ndarray, bound: float) -> np.ndarray:
    """clip_S(Δ) = Δ·min(1, S/‖Δ‖): Δ itself when ‖Δ‖ ≤ S (or S = ∞; a NaN
    norm is not clipped: the finiteness check names it)."""
    return clip_rows(delta[None, :], bound)[0]


def clip_rows(deltas: np.ndarray, bound: float) -> np.ndarray:
    """``clip`` for each row Δ_k of ``deltas`` (B, p) at once, in a new array:
    Δ_k·(S/‖Δ_k‖) for the rows longer than S, the others as they are."""
    with np.errstate(over="ignore"):  # a norm past what a double holds is ∞: that row clips to 0·Δ, as one alone
        norm = np.linalg.norm(deltas, axis=1)
    over = norm > bound
    out = np.array(deltas, dtype=float)
    out[over] *= (bound / norm[over])[:, None]
    return out


def noise_std(noise_multiplier: float, bound: float, expected: float) -> float:
    """σ·S/M: the standard deviation DP-FedAvg's noise adds to each
    coordinate of the model (0 when σ = 0, also with S = ∞)."""
    return 0.0 if noise_multiplier == 0 else noise_multiplier * bound / expected


def client_noise_std(noise_multiplier: float, bound: float, sampled: int) -> float:
    """σ·S/√n: each client's share of the noise when the clients add it
    themselves (distributed DP), n the clients the round sampled: n
    independent N(0, σ²S²/n) sum to N(0, σ²S²), the noise the server would
    have added, whatever n is (sized on M = q·K instead, the noise would
    follow the sample's size, which Poisson sampling makes vary)."""
    return 0.0 if noise_multiplier == 0 else noise_multiplier * bound / math.sqrt(max(sampled, 1))


def privatize(theta: np.ndarray, center: np.ndarray, bound: float, std: float,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """A client's side: W_t + clip_S(W_k − W_t) + N(0, std²·I), the model it
    sends instead of W_k (std = 0: clipping only)."""
    out = center + clip(theta - center, bound)
    if std > 0:
        out = out + (rng or np.random.default_rng()).normal(0.0, std, size=len(out))
    return out


# Each client's bit is counted as bit_k − ½ (Andrew et al.; tensorflow_privacy's
# QuantileEstimatorQuery): ±½, so adding or removing one client moves the sum by ½.
COUNT_SENSITIVITY = 0.5


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_Δ = (z⁻² − (σ_b/½)⁻²)^(−1/2) = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et
    al., 2021, Theorem 1): with adaptive clipping each round releases the
    noised update (sensitivity S, noise z_Δ·S) and the noised count of
    unclipped clients (sensitivity ½, noise σ_b: see ``adapt_clip``). Gaussian
    releases compose as one whose 1/z² is the sum of their 1/z², so the two
    together cost what one release with multiplier z would. Needs 2σ_b > z."""
    if noise_multiplier == 0:
        return 0.0
    return (noise_multiplier ** -2 - (count_noise / COUNT_SENSITIVITY) ** -2) ** -0.5


def adapt_clip(bound: float, bits: Sequence[float], expected: float, target_quantile: float, lr: float,
               count_noise: float, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Andrew et al.'s geometric update of the clipping bound (their
    Algorithm 1, as tensorflow_privacy's QuantileEstimatorQuery computes it):

        b̄ = clamp_[0,1]((Σ_k (bit_k − ½) + N(0, σ_b²)) / M + ½),   S_{t+1} = S_t · exp(−η·(b̄ − γ))

    bit_k = 1 when ‖Δ_k‖ ≤ S_t. The −½ makes the noised sum's sensitivity ½
    (what ``update_noise_multiplier`` assumes), not 1; b̄ is an estimate of a
    share, so it is kept in [0, 1] (post-processing: free), which bounds one
    round's move to S·exp(−η(1 − γ)) ≤ S_{t+1} ≤ S·exp(η·γ). S grows while
    fewer than the target share γ of updates fit under it, and shrinks while
    more do. Returns (S_{t+1}, b̄)."""
    noise = (rng or np.random.default_rng()).normal(0.0, count_noise) if count_noise > 0 else 0.0
    share = min(1.0, max(0.0, (sum(b - COUNT_SENSITIVITY for b in bits) + noise) / expected + COUNT_SENSITIVITY))
    return bound * math.exp(-lr * (share - target_quantile)), share


@dataclass
class DPAverage:
    """DP-FedAvg's release in place of a strategy's average (see the module
    docstring); called like ``Combine``. ``local`` when the clients clipped
    and added their shares of the noise themselves (distributed DP): the
    server does not clip again (it would change their noise) and adds only
    ``missing``, the part of N(0, σ²S²) their shares did not bring: 0 when
    every sampled client's share is in the sum, (n − c)/n when c of the n
    sampled clients' are, 1 when nobody was sampled. The release then has
    N(0, σ²S²) on its sum whoever replied, as the accountant assumes. The
    bound on any one client's move rests on the clients, as it does under
    secure aggregation, where the server sees no update."""

    bound: float  # S (adaptive clipping moves it between rounds)
    noise_multiplier: float  # σ (already z_Δ under adaptive clipping)
    expected: float  # M = q·K
    local: bool = False
    missing: float = 0.0  # local: the share of σ²S² that the clients' noise did not bring this round
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
        write it out: the bound, the noise's size, the release. Not the noise
        drawn, nor the sum before it, nor any one update's norm or whether it
        was clipped: they are what DP hides."""
        # One (B, p) array: at 10,000 clients a round, a Python loop of clips cost ~60 ms.
        deltas = np.asarray(vectors, dtype=float).reshape(len(vectors), len(center)) - center
        sigma, bound = self.noise_multiplier, self.bound
        if self.local:
            std = sigma * bound * math.sqrt(self.missing) if sigma > 0 else 0.0
            total = deltas.sum(axis=0)
            lines = [f"DP-FedAvg, noise from the clients: each of the round's sampled clients sent W_t + clip_S(Δ_k) + "
                     f"N(0, σ²S²/n), S = {fmt(bound)}, σ = {fmt(sigma)}"
                     + ("" if self.missing == 0 else
                        f"; their shares bring {fmt(1 - self.missing)} of σ²S², the server adds the rest: "
                        f"N(0, {fmt(self.missing)}·σ²S²) per coordinate, std {fmt(std)}")]
        else:
            std = sigma * bound if sigma > 0 else 0.0
            total = clip_rows(deltas, bound).sum(axis=0)
            lines = [f"DP-FedAvg: each Δ_k = W_k − W_t clipped to S = {fmt(bound)} (no update's norm is written: "
                     f"DP covers only the release)",
                     f"noise N(0, σ²S²) per coordinate, σ = {fmt(sigma)}: std σ·S = {fmt(std)}"]
        noised = total + self.rng.normal(0.0, std, size=len(center)) if std > 0 else total
        result = center + noised / self.expected
        coords = names(len(center), symbol)
        lines += [f"{name} = {fmt(center[j])} + (Σ_k clip(Δ_k) + noise) / M = {fmt(center[j])} + "
                  f"{fmt(noised[j])} / {fmt(self.expected)} = {fmt(result[j])}" for j, name in enumerate(coords)]
        return result, lines
