"""Where FedAvg ends up, in closed form, for y = w·x + b trained with
full-batch gradient descent: why it stops short of the pooled optimum.

Notation (the issue's). The model is θ = [w_1 … w_d, b], a vector of length
d+1, and X̃ = [X, 1] is the data with a column of ones, so X̃θ = Xw + b.
Client k holds (X_k, y_k) with n_k rows; N = Σ_k n_k and p_k = n_k/N. Its
loss is L_k(θ) = 1/n_k ‖X̃_kθ − y_k‖², with

    Hessian  H_k = (2/n_k) X̃_kᵀX̃_k,   and  g_k = (2/n_k) X̃_kᵀy_k,

so ∇L_k(θ) = H_kθ − g_k. One local step θ ← θ − lr·∇L_k(θ) is affine:

    θ ← A_kθ + lr·g_k,   A_k = I − lr·H_k,

and E local epochs (one step each) give θ_E = A_k^Eθ + S_k with
S_k = (Σ_{j<E} A_k^j)·lr·g_k. A FedAvg round with every client taking part
averages these with weights p_k, so the global model follows

    θ_{t+1} = Mθ_t + c,   M = Σ_k p_k A_k^E,   c = Σ_k p_k S_k.

Every client is handed (X, y) as a pair of NumPy arrays: X of shape (n_k, d)
(or (n_k,) for one feature) and y of shape (n_k,). Pure NumPy, no Flask: the
compare tool and the tests call it on data they already hold.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ClientData = tuple[np.ndarray, np.ndarray]


def augment(X: np.ndarray) -> np.ndarray:
    """X̃ = [X, 1]: the data with a column of ones, so X̃θ = Xw + b."""
    X = np.asarray(X, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    return np.hstack([X, np.ones((X.shape[0], 1))])


def _checked(clients: Sequence[ClientData]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client as (X̃_k, y_k) as floats; a ValueError for no clients, an
    empty client, rows that do not match, or clients of different widths."""
    if not clients:
        raise ValueError("no clients")
    out = []
    for k, (X, y) in enumerate(clients, start=1):
        Xt, y = augment(X), np.asarray(y, dtype=float).ravel()
        if len(y) == 0 or Xt.shape[0] != len(y):
            raise ValueError(f"client {k}: X has {Xt.shape[0]} rows and y {len(y)} values (need equal, >= 1)")
        if out and Xt.shape[1] != out[0][0].shape[1]:
            raise ValueError(f"client {k}: {Xt.shape[1] - 1} features, client 1 has {out[0][0].shape[1] - 1}")
        out.append((Xt, y))
    return out


def pooled_optimum(clients: Sequence[ClientData], ridge: float = 0.0) -> np.ndarray:
    """θ* of least squares on every client's rows pooled, the model one
    machine holding all the data would fit:

        (Σ_k X̃_kᵀX̃_k + λ·D) θ* = Σ_k X̃_kᵀy_k,   D = diag(1, …, 1, 0),

    λ = ``ridge`` on the weights w only, never on the bias b. With λ = 0 and
    data that do not pin θ down (fewer independent rows than d+1), the
    minimum-norm solution is returned (NumPy's lstsq); with λ > 0 the system
    is always solvable."""
    data = _checked(clients)
    Xt = np.vstack([X for X, _ in data])
    y = np.concatenate([y for _, y in data])
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0:
        # lstsq on the rows themselves, not the normal equations: same θ*,
        # without squaring the condition number.
        return np.linalg.lstsq(Xt, y, rcond=None)[0]
    D = np.eye(Xt.shape[1])
    D[-1, -1] = 0.0
    return np.linalg.solve(Xt.T @ Xt + ridge * D, Xt.T @ y)


def client_optima(clients: Sequence[ClientData]) -> list[np.ndarray]:
    """θ̂_k = argmin_θ ‖X̃_kθ − y_k‖² for each client on its own data: where
    its local training heads if run for ever. When client k's data do not
    pin θ̂_k down (fewer independent rows than d+1, e.g. one row, or a
    feature constant on that client), every θ on a line or plane fits
    equally well and the minimum-norm one, NumPy's lstsq, is returned."""
    return [np.linalg.lstsq(Xt, y, rcond=None)[0] for Xt, y in _checked(clients)]


def fedavg_round_map(clients: Sequence[ClientData], lr: float, local_epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, c) of one FedAvg round with full participation and full-batch
    local GD, θ_{t+1} = Mθ_t + c:

        M = Σ_k p_k A_k^E,   c = Σ_k p_k S_k,
        A_k = I − lr·H_k,    S_k = Σ_{j<E} A_k^j · lr·g_k,

    with H_k = (2/n_k) X̃_kᵀX̃_k and g_k = (2/n_k) X̃_kᵀy_k. S_k is where E
    local steps from θ = 0 end, so it is computed by taking them."""
    if lr <= 0 or local_epochs < 1:
        raise ValueError(f"need lr > 0 and local_epochs >= 1, got lr={lr}, local_epochs={local_epochs}")
    data = _checked(clients)
    total = sum(len(y) for _, y in data)
    size = data[0][0].shape[1]
    M, c = np.zeros((size, size)), np.zeros(size)
    for Xt, y in data:
        n = len(y)
        H = 2.0 / n * Xt.T @ Xt
        g = 2.0 / n * Xt.T @ y
        A = np.eye(size) - lr * H
        S = np.zeros(size)
        for _ in range(local_epochs):
            S = A @ S + lr * g
        M += n / total * np.linalg.matrix_power(A, local_epochs)
        c += n / total * S
    return M, c


def spectral_radius(M: np.ndarray) -> float:
    """ρ(M) = max |eigenvalue of M|: the error ‖θ_t − θ*‖ of the round map
    shrinks like ρ^t, and only if ρ < 1."""
    return float(np.max(np.abs(np.linalg.eigvals(M))))


def fedavg_fixed_point(clients: Sequence[ClientData], lr: float, local_epochs: int) -> np.ndarray:
    """θ_FedAvg, where FedAvg (full participation, full-batch local GD, E =
    ``local_epochs`` steps per round) stops: the fixed point of
    θ_{t+1} = Mθ_t + c (see ``fedavg_round_map``), the solution of

        (I − Σ_k p_k A_k^E) θ = Σ_k p_k S_k.

    When every H_k is invertible, S_k = (I − A_k^E) θ̂_k with θ̂_k the client's
    own optimum, and this is the issue's form

        θ = (Σ_k p_k (I − A_k^E))⁻¹ Σ_k p_k (I − A_k^E) θ̂_k,

    an average of the clients' optima weighted by how far E steps move each.
    With E = 1 it is the pooled optimum (Σ_k p_k H_k θ = Σ_k p_k g_k are the
    pooled normal equations); as E → ∞ (lr < 2/λ_max(H_k)) it tends to
    Σ_k p_k θ̂_k, the average of the local optima.

    FedAvg reaches this point from any start only if the round map contracts,
    ρ(M) < 1; otherwise a ValueError says so (at this lr FedAvg diverges or
    never settles, and no fixed point describes it)."""
    M, c = fedavg_round_map(clients, lr, local_epochs)
    rho = spectral_radius(M)
    if not rho < 1:
        raise ValueError(f"FedAvg does not converge at lr={lr:g}, local_epochs={local_epochs}: "
                         f"the round map's spectral radius is {rho:.6g} >= 1")
    return np.linalg.solve(np.eye(len(c)) - M, c)


def max_stable_lr(clients: Sequence[ClientData]) -> float:
    """2/λ_max(H), H = Σ_k p_k H_k = (2/N) Σ_k X̃_kᵀX̃_k the pooled Hessian:
    full-batch GD on the pooled loss converges only for lr below it (and
    FedAvg with E = 1 is exactly that GD)."""
    data = _checked(clients)
    total = sum(len(y) for _, y in data)
    H = sum(2.0 / total * Xt.T @ Xt for Xt, _ in data)
    return 2.0 / float(np.max(np.linalg.eigvalsh(H)))
