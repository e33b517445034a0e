"""Local training: what a client does with the global model it receives."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .model import Weights, gradients


@dataclass(frozen=True)
class TrainConfig:
    """How a client trains locally in one round (the seed's defaults)."""

    lr: float = 0.01
    local_epochs: int = 10
    batch_size: int | None = None  # None = full batch: one step per epoch
    mu: float = 0.0  # FedProx proximal weight; 0 = plain FedAvg
    seed: int | None = None  # shuffles mini-batches; unused for full batch
    strategy: str = "fedavg"  # what the client computes (fedavg.strategies)
    run: str | None = None  # names the run, for state a client keeps between rounds (SCAFFOLD's c_k)
    # DP-FedAvg (fedavg.privacy): clip W_k − W_t to this L2 norm, then add
    # N(0, dp_noise_std²) to each coordinate, before replying. None/0: neither.
    dp_clip: float | None = None
    dp_noise_std: float = 0.0

    @property
    def private(self) -> bool:
        return self.dp_clip is not None or self.dp_noise_std > 0


class TrainingStopped(Exception):
    """``stop()`` said to give up (the server's deadline passed) after ``epochs`` epochs."""

    def __init__(self, epochs: int) -> None:
        super().__init__(f"stopped after {epochs} epoch(s)")
        self.epochs = epochs


def local_train(
    w: Weights, b: float, X: np.ndarray, y: np.ndarray, config: TrainConfig = TrainConfig(),
    correction: np.ndarray | None = None, stop: Callable[[], bool] | None = None,
) -> tuple[Weights, float]:
    """Gradient descent from the global model (w_g, b_g) on local data:

        w ← w − lr·(dL/dw + mu·(w − w_g) + c_w),   b ← b − lr·(dL/db + mu·(b − b_g) + c_b)

    once per epoch (full batch) or once per mini-batch of a fresh shuffle each
    epoch. mu > 0 adds FedProx's proximal term (Li et al., 2020), which keeps
    the local model near the global one; mu = 0 is plain FedAvg. ``correction``
    (c_w…, c_b), when given, is added to every step's gradient: SCAFFOLD's
    c − c_k (Karimireddy et al., 2020). ``stop``, asked before every epoch,
    ends the training with TrainingStopped when it says so.
    """
    w_g, b_g = np.array(w, dtype=float), float(b)
    w, b = w_g.copy(), b_g
    n = len(y)
    full_batch = config.batch_size is None or config.batch_size >= n
    rng = None if full_batch else np.random.default_rng(config.seed)
    for epoch in range(config.local_epochs):
        if stop is not None and stop():
            raise TrainingStopped(epoch)
        batches = [slice(None)] if full_batch else _minibatches(rng, n, config.batch_size)
        for rows in batches:
            dw, db = gradients(w, b, X[rows], y[rows])
            if config.mu:
                dw = dw + config.mu * (w - w_g)
                db = db + config.mu * (b - b_g)
            if correction is not None:
                dw = dw + correction[:-1]
                db = db + correction[-1]
            w = w - config.lr * dw
            b = b - config.lr * db
    return w, b


def local_steps(n: int, config: TrainConfig) -> int:
    """How many gradient steps ``local_train`` takes on n samples:
    τ = local_epochs · ⌈n / batch_size⌉ (local_epochs for full batch)."""
    if config.batch_size is None or config.batch_size >= n:
        return config.local_epochs
    return config.local_epochs * -(-n // config.batch_size)


def _minibatches(rng: np.random.Generator, n: int, batch_size: int) -> list[np.ndarray]:
    """A fresh permutation of 0..n-1 cut into batches (the last may be smaller)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def local_gd_batch(theta: np.ndarray, xtx: np.ndarray, xty: np.ndarray, n: np.ndarray, config: TrainConfig,
                   correction: np.ndarray | None = None) -> np.ndarray:
    """``local_train``'s full-batch gradient descent for B clients at once,
    from the least-squares statistics of their rows (x̃ = [x, 1]):

        G_k = X̃_kᵀX̃_k  (B, p, p),   h_k = X̃_kᵀy_k  (B, p),   p = d + 1,
        ∇L_k(θ) = (2/n_k)·(G_k θ − h_k),
        θ_k ← θ_k − lr·(∇L_k(θ_k) + mu·(θ_k − θ_t) + corr_k)

    E times (config.local_epochs), from θ_k = θ_t for every k. Each epoch
    costs O(B·p²) whatever the n_k. ``correction`` (B, p): SCAFFOLD's
    c − c_k per client. Mini-batches need the rows: ``config.batch_size``
    must be None (the caller falls back to ``local_train`` per client)."""
    if config.batch_size is not None:
        raise ValueError("local_gd_batch is full-batch gradient descent: batch_size must be None")
    scale = (2.0 / n)[:, None]
    theta_k = np.broadcast_to(theta, xty.shape).copy()
    for _ in range(config.local_epochs):
        grad = scale * (np.einsum("kij,kj->ki", xtx, theta_k) - xty)
        if config.mu:
            grad = grad + config.mu * (theta_k - theta)
        if correction is not None:
            grad = grad + correction
        theta_k = theta_k - config.lr * grad
    return theta_k
