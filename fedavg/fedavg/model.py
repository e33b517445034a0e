"""The linear model y = w·x + b and its loss, as pure NumPy functions.

``w`` is a vector of d weights (d = number of feature columns), ``b`` a scalar
bias, ``X`` an (n, d) matrix of samples and ``y`` an (n,) vector of targets.
"""
from __future__ import annotations

import numpy as np

Weights = np.ndarray  # shape (d,), float64
Theta = np.ndarray  # shape (d + 1,): [w_1 … w_d, b], the model as one vector


def as_theta(w: Weights, b: float) -> Theta:
    """θ = [w_1 … w_d, b]: the form the strategies' vector math works on."""
    return np.append(np.asarray(w, dtype=float).ravel(), float(b))


def split(theta: Theta) -> tuple[Weights, float]:
    """θ → (w, b), the inverse of ``as_theta``."""
    return theta[:-1], float(theta[-1])


def predict(w: Weights, b: float, X: np.ndarray) -> np.ndarray:
    """y_hat = X·w + b."""
    return X @ w + b


def mse(w: Weights, b: float, X: np.ndarray, y: np.ndarray) -> float:
    """L(w, b) = 1/n Σ_i (w·x_i + b − y_i)²."""
    err = predict(w, b, X) - y
    return float(err @ err) / len(y)


def gradients(w: Weights, b: float, X: np.ndarray, y: np.ndarray) -> tuple[Weights, float]:
    """dL/dw = 2/n Σ_i x_i·err_i,  dL/db = 2/n Σ_i err_i,  err_i = w·x_i + b − y_i."""
    err = predict(w, b, X) - y
    scale = 2.0 / len(y)
    return scale * (err @ X), scale * float(err.sum())
