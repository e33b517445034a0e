"""The model and local training on their own, no HTTP: the gradient against
finite differences, FedAvg as distributed gradient descent, the seed's
defaults against the plain-loop reference, FedProx and mini-batches."""
from __future__ import annotations

import numpy as np
import pytest

from fedavg.aggregation import weighted_average
from fedavg.model import as_theta, gradients, mse
from fedavg.training import TrainConfig, local_steps, local_train
from reference import SEED_DATA, local_gd, reference_fedavg


def as_arrays(samples: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([[x] for x, _ in samples]), np.array([y for _, y in samples])


def fedavg_round(w: np.ndarray, b: float, data, config: TrainConfig = TrainConfig()) -> tuple[np.ndarray, float]:
    """One FedAvg round with the code under test: local_train, then weighted_average."""
    theta = weighted_average([as_theta(*local_train(w, b, X, y, config)) for X, y in data], [len(y) for _, y in data])
    return theta[:-1], float(theta[-1])


# --- the gradient ---------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3])
def test_gradients_match_central_finite_differences(d):
    rng = np.random.default_rng(d)
    X, y = rng.normal(size=(7, d)), rng.normal(size=7)
    w, b = rng.normal(size=d), float(rng.normal())
    dw, db = gradients(w, b, X, y)

    h = 1e-6
    numeric_dw = np.empty(d)
    for j in range(d):
        step = np.zeros(d)
        step[j] = h
        numeric_dw[j] = (mse(w + step, b, X, y) - mse(w - step, b, X, y)) / (2 * h)
    numeric_db = (mse(w, b + h, X, y) - mse(w, b - h, X, y)) / (2 * h)

    assert dw.shape == (d,)
    np.testing.assert_allclose(dw, numeric_dw, rtol=1e-6)
    assert db == pytest.approx(numeric_db, rel=1e-6)


def test_gradient_of_the_seed_data_by_hand():
    # err = (0·1 + 0 − 3, 0·2 + 0 − 5) = (−3, −5): dL/dw = 2/2·(−3·1 − 5·2) = −13, dL/db = −8
    X, y = as_arrays(SEED_DATA[0])
    dw, db = gradients(np.zeros(1), 0.0, X, y)
    assert dw.tolist() == [-13.0] and db == -8.0
    assert mse(np.zeros(1), 0.0, X, y) == 17.0


# --- FedAvg is distributed gradient descent -------------------------------------------


def test_one_epoch_full_batch_fedavg_equals_centralised_gradient_descent():
    """Pooled gradient = Σ_k n_k/N · local gradient_k, so one local step per
    round followed by the weighted average is one step of GD on the pooled data."""
    rng = np.random.default_rng(7)
    d = 2
    X1, X2 = rng.normal(size=(3, d)), rng.normal(size=(8, d))  # unequal n_k
    y1, y2 = X1 @ [1.5, -2.0] + 0.5 + rng.normal(size=3), X2 @ [1.5, -2.0] + 0.5 + rng.normal(size=8)
    X, y = np.vstack([X1, X2]), np.concatenate([y1, y2])
    config = TrainConfig(lr=0.05, local_epochs=1)

    w_fed, b_fed = np.zeros(d), 0.0
    w_gd, b_gd = np.zeros(d), 0.0
    for _ in range(20):
        w_fed, b_fed = fedavg_round(w_fed, b_fed, ((X1, y1), (X2, y2)), config)
        dw, db = gradients(w_gd, b_gd, X, y)
        w_gd, b_gd = w_gd - config.lr * dw, b_gd - config.lr * db
        np.testing.assert_allclose(w_fed, w_gd, rtol=0, atol=1e-12)
        assert abs(b_fed - b_gd) < 1e-12
    # and it is learning, so the equality is not between two models that stand still
    assert mse(w_gd, b_gd, X, y) < 0.5 * mse(np.zeros(d), 0.0, X, y)


# --- the seed's defaults, against the plain-loop reference ------------------------------


def test_reference_itself_by_hand():
    # one epoch, one round: client 1 steps to (0.13, 0.08), client 2 to (0.32, 0.09); equal n_k
    [(w, b)] = reference_fedavg(SEED_DATA, rounds=1, lr=0.01, epochs=1)
    assert w == pytest.approx(0.225, abs=1e-15) and b == pytest.approx(0.085, abs=1e-15)


def test_defaults_reproduce_the_reference_round_by_round():
    config = TrainConfig()
    assert (config.lr, config.local_epochs, config.batch_size, config.mu) == (0.01, 10, None, 0.0)
    data = [as_arrays(samples) for samples in SEED_DATA]
    expected = reference_fedavg(SEED_DATA, rounds=5, lr=0.01, epochs=10)

    w, b = np.zeros(1), 0.0
    for r, (w_ref, b_ref) in enumerate(expected, start=1):
        w, b = fedavg_round(w, b, data)
        assert abs(w[0] - w_ref) < 1e-9, f"round {r}: w"
        assert abs(b - b_ref) < 1e-9, f"round {r}: b"
    assert len(expected) == 5
    # five rounds move the model well away from the zeros it started at
    assert w[0] > 0.5 and b > 0.2


def test_local_train_matches_the_reference_loop_on_one_client():
    X, y = as_arrays(SEED_DATA[1])
    w, b = local_train(np.array([0.3]), -0.2, X, y, TrainConfig(lr=0.02, local_epochs=25))
    w_ref, b_ref = local_gd(SEED_DATA[1], 0.3, -0.2, lr=0.02, epochs=25)
    assert abs(w[0] - w_ref) < 1e-12 and abs(b - b_ref) < 1e-12


def test_local_train_does_not_modify_the_global_model_it_is_given():
    X, y = as_arrays(SEED_DATA[0])
    w_g = np.array([0.5])
    local_train(w_g, 0.0, X, y)
    assert w_g.tolist() == [0.5]


# --- FedProx and mini-batches -------------------------------------------------------------


def wide_data(n: int = 10, d: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X @ np.arange(1.0, d + 1) + 3.0 + 0.1 * rng.normal(size=n)


def test_fedprox_keeps_the_local_model_nearer_the_global_one():
    X, y = wide_data()
    w_g, b_g = np.array([-1.0, 0.5]), 0.0

    def distance(mu: float) -> float:
        w, b = local_train(w_g, b_g, X, y, TrainConfig(lr=0.05, local_epochs=50, mu=mu))
        return float(np.sqrt(np.sum((w - w_g) ** 2) + (b - b_g) ** 2))

    plain, prox, strong = distance(0.0), distance(1.0), distance(10.0)
    assert plain > 1.0  # plain local training goes a long way from a bad global model
    assert strong < prox < plain


def test_mini_batches_are_deterministic_for_a_seed_and_differ_between_seeds():
    X, y = wide_data(n=11)
    w_g = np.zeros(2)

    def train(seed: int) -> tuple[np.ndarray, float]:
        return local_train(w_g, 0.0, X, y, TrainConfig(lr=0.05, local_epochs=3, batch_size=4, seed=seed))

    (w1, b1), (w1_again, b1_again), (w2, b2) = train(1), train(1), train(2)
    assert w1.tolist() == w1_again.tolist() and b1 == b1_again
    assert not (np.allclose(w1, w2) and b1 == pytest.approx(b2))
    # a batch as large as the data is plain full-batch GD, whatever the seed
    full = local_train(w_g, 0.0, X, y, TrainConfig(lr=0.05, local_epochs=3))
    big = local_train(w_g, 0.0, X, y, TrainConfig(lr=0.05, local_epochs=3, batch_size=11, seed=9))
    assert full[0].tolist() == big[0].tolist() and full[1] == big[1]




def test_local_steps_counts_the_gradient_steps_local_train_takes():
    # τ = E·⌈n/B⌉: 3 epochs of ⌈10/4⌉ = 3 batches; full batch: one step an epoch
    assert local_steps(10, TrainConfig(local_epochs=3, batch_size=4)) == 9
    assert local_steps(10, TrainConfig(local_epochs=3, batch_size=10)) == 3
    assert local_steps(10, TrainConfig(local_epochs=3)) == 3
    assert local_steps(8, TrainConfig(local_epochs=2, batch_size=4)) == 4


def test_a_correction_is_added_to_every_steps_gradient():
    """SCAFFOLD's c − c_k: with a constant correction v, each step is
    W ← W − lr·(∇L(W) + v), checked against that loop written out in plain Python."""
    X, y = as_arrays(SEED_DATA[0])
    v = np.array([0.7, -0.3])
    w, b = local_train(np.array([0.1]), 0.2, X, y, TrainConfig(lr=0.02, local_epochs=7), correction=v)
    rw, rb = 0.1, 0.2
    for _ in range(7):
        dw = sum(2 / 2 * (rw * x + rb - t) * x for x, t in SEED_DATA[0]) + 0.7
        db = sum(2 / 2 * (rw * x + rb - t) for x, t in SEED_DATA[0]) - 0.3
        rw, rb = rw - 0.02 * dw, rb - 0.02 * db
    assert abs(w[0] - rw) < 1e-12 and abs(b - rb) < 1e-12
