"""The privacy budget of a DP run: (ε, δ) after T rounds, from Google's
``dp-accounting`` (its Rényi-DP accountant; Mironov, 2017).

Each round is one sampled Gaussian mechanism: every client is sampled with
probability q, and the sum of the clipped updates gets noise of σ times the
clip bound S, S being one client's largest possible contribution (add or
remove one client). T rounds compose:

    event = SelfComposed(PoissonSampled(q, Gaussian(σ)), T)

and the accountant turns its Rényi divergences into the smallest ε with
(ε, δ)-DP. Adaptive clipping spends part of σ on the count of unclipped
clients (sensitivity ½: each bit is counted as bit − ½) but keeps the
total at σ (fedavg.privacy.update_noise_multiplier), so the same event
accounts for it.

A divergence the accountant cannot compute (σ so small that its
arithmetic overflows: NaN, a negative value, or an exception) bounds
nothing: that order is left out, and with none left ε is ∞. Its own
conversion would read a NaN as ε = 0.
"""
from __future__ import annotations

import functools
import logging
import math

import numpy as np
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

# Its series for orders just above 1 may not converge at large q; it then
# leaves those orders out (the bound stays valid) and says so on every call.
logging.getLogger("absl").setLevel(logging.ERROR)


def epsilon(q: float, noise_multiplier: float, rounds: int, delta: float,
            orders: tuple[float, ...] | None = None) -> float:
    """ε after ``rounds`` rounds of the sampled Gaussian mechanism (q, σ) at
    δ; 0 before any round, ∞ without noise. ``orders``: the Rényi orders to
    try (default: the accountant's, 1.1 to 1024)."""
    if rounds == 0 or q == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    orders, rdp = _one_round(q, noise_multiplier, orders)
    # Rényi divergences add up over rounds: T rounds cost T times one round's,
    # what SelfComposedDpEvent(…, T) computes (tests/test_privacy.py checks it).
    with np.errstate(over="ignore", invalid="ignore"):
        total = rounds * rdp
    usable = np.isfinite(total) & (total >= 0)
    if not usable.any():
        return math.inf
    return float(compute_epsilon(orders[usable], total[usable], delta)[0])


@functools.lru_cache(maxsize=64)
def _one_round(q: float, noise_multiplier: float,
               orders: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """The orders and one round's Rényi divergence at each (computed once
    per (q, σ): a run asks before every round)."""
    accountant = RdpAccountant(list(orders)) if orders else RdpAccountant()
    try:
        with np.errstate(all="ignore"):
            accountant.compose(PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier)))
    except (ArithmeticError, ValueError):  # its arithmetic broke down (σ ≤ 1e-200 divides by 0): nothing is bounded
        return np.asarray(accountant.orders, dtype=float), np.full(len(accountant.orders), math.nan)
    return np.asarray(accountant.orders, dtype=float), np.asarray(accountant.rdp, dtype=float)
