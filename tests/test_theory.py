"""Where FedAvg stops (fedavg/theory.py), against references written here:
the plain-Python FedAvg of tests/reference.py run until it settles, simple
regression's slope = cov/var, NumPy's lstsq, a hand-written NumPy FedAvg
loop. And the diabetes scenario, real data on which FedAvg drifts."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from fedavg import theory
from fedavg.client import LocalClient
from fedavg.scenarios import DIABETES_LR, make_clients
from reference import SEED_DATA, local_gd, reference_fedavg


def as_arrays(samples: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([[x] for x, _ in samples]), np.array([y for _, y in samples])


SEED = [as_arrays(c) for c in SEED_DATA]


def settled_reference(lr: float, epochs: int, rounds: int) -> tuple[float, float]:
    """The plain-Python FedAvg after ``rounds`` rounds; it must have stopped
    moving (two last rounds within 1e-12), or the comparison means nothing."""
    history = reference_fedavg(SEED_DATA, rounds=rounds, lr=lr, epochs=epochs)
    (w1, b1), (w2, b2) = history[-2], history[-1]
    assert abs(w2 - w1) < 1e-12 and abs(b2 - b1) < 1e-12, f"not settled after {rounds} rounds"
    return w2, b2


def numpy_fedavg(clients, lr: float, epochs: int, rounds: int, theta0: np.ndarray | None = None) -> np.ndarray:
    """FedAvg by iteration, written here: every client takes ``epochs``
    full-batch steps on 1/n Σ (w·x + b − y)² from the global θ, then the
    average weighted by n_k."""
    d = clients[0][0].shape[1]
    theta = np.zeros(d + 1) if theta0 is None else theta0.copy()
    total = sum(len(y) for _, y in clients)
    for _ in range(rounds):
        new = np.zeros(d + 1)
        for X, y in clients:
            w, b = theta[:d].copy(), theta[d]
            for _ in range(epochs):
                err = X @ w + b - y
                w, b = w - lr * 2 / len(y) * (X.T @ err), b - lr * 2 / len(y) * err.sum()
            new += len(y) / total * np.append(w, b)
        theta = new
    return theta


# --- the seed: the issue's numbers -----------------------------------------------


def test_pooled_optimum_of_the_seed_is_simple_regression_slope_cov_over_var():
    xs = [x for c in SEED_DATA for x, _ in c]
    ys = [y for c in SEED_DATA for _, y in c]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    assert (slope, intercept) == (0.5, 3.0)
    np.testing.assert_allclose(theory.pooled_optimum(SEED), [slope, intercept], atol=1e-12)


@pytest.mark.parametrize("epochs, rounds", [(1, 12000), (10, 3000), (100, 400)])
def test_fedavg_fixed_point_is_where_the_plain_python_fedavg_settles(epochs, rounds):
    w, b = settled_reference(0.01, epochs, rounds)
    np.testing.assert_allclose(theory.fedavg_fixed_point(SEED, 0.01, epochs), [w, b], atol=1e-9)


def test_the_issues_numbers():
    # "lr 0.01, 10 local epochs: FedAvg stops at 0.678506·x + 2.657290"
    np.testing.assert_allclose(theory.fedavg_fixed_point(SEED, 0.01, 10), [0.678506, 2.657290], atol=1e-6)
    # one local epoch: FedAvg is gradient descent on the pooled data, and reaches its optimum
    np.testing.assert_allclose(theory.fedavg_fixed_point(SEED, 0.01, 1), [0.5, 3.0], atol=1e-12)
    # "100 local epochs stall near 1.29·x + 1.41"
    np.testing.assert_allclose(theory.fedavg_fixed_point(SEED, 0.01, 100), [1.29, 1.41], atol=0.01)


def test_with_many_local_epochs_fedavg_stops_at_the_average_of_the_local_optima():
    # Each seed client's two points lie on a line: y = 2x + 1 and y = x + 1, so
    # its own optimum is that line, and p_k = 1/2 each.
    optima = theory.client_optima(SEED)
    np.testing.assert_allclose(optima[0], [2.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(optima[1], [1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(theory.fedavg_fixed_point(SEED, 0.01, 100_000), [1.5, 1.0], atol=1e-9)
    # and in between, the more local epochs, the nearer that average
    gaps = [np.linalg.norm(theory.fedavg_fixed_point(SEED, 0.01, e) - [1.5, 1.0]) for e in (1, 10, 100, 1000, 10000)]
    assert gaps == sorted(gaps, reverse=True) and len(set(gaps)) == len(gaps)


def test_the_issues_closed_form_when_every_hessian_is_invertible():
    # θ* = (Σ p_k (I − A_k^E))⁻¹ Σ p_k (I − A_k^E) θ̂_k, written out here with
    # each client's optimum from its own two points.
    lr, epochs = 0.01, 10
    lhs, rhs = np.zeros((2, 2)), np.zeros(2)
    for X, y in SEED:
        Xt = np.hstack([X, np.ones((len(y), 1))])
        A = np.eye(2) - lr * 2 / len(y) * Xt.T @ Xt
        own = np.linalg.solve(Xt, y)  # two points, two unknowns: the line through them
        B = np.eye(2) - np.linalg.matrix_power(A, epochs)
        lhs += 0.5 * B
        rhs += 0.5 * B @ own
    np.testing.assert_allclose(theory.fedavg_fixed_point(SEED, lr, epochs), np.linalg.solve(lhs, rhs), atol=1e-12)


# --- drift needs clients that differ in x AND in their own optimum ---------------------

# Three clients with the same x (so the same Hessian H_k = (2/n_k)·X̃ᵀX̃) and
# different y: one on y = 2x + 1, one on y = −x + 5, one with noise; the
# third holds its x twice over (n_k = 6, the same H_k), so the p_k differ.
SAME_X = [[(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)],
          [(1.0, 4.0), (2.0, 3.0), (4.0, 1.0)],
          [(1.0, 0.2), (2.0, 1.1), (4.0, 2.7), (1.0, -0.4), (2.0, 0.6), (4.0, 3.5)]]


def simple_regression(clients) -> list[float]:
    """The pooled least-squares line, w = cov(x, y)/var(x), b = ȳ − w·x̄, over every row."""
    rows = [row for data in clients for row in data]
    mx, my = sum(x for x, _ in rows) / len(rows), sum(y for _, y in rows) / len(rows)
    w = sum((x - mx) * (y - my) for x, y in rows) / sum((x - mx) ** 2 for x, _ in rows)
    return [w, my - w * mx]


@pytest.mark.parametrize("epochs", [1, 10, 100])
def test_clients_with_the_same_x_and_different_y_have_no_drift_at_any_epochs(epochs):
    """Every A_k = I − lr·H is the same A, and the fixed point solves
    (Σ_{j<E} A^j)·lr·(Hθ − Σ_k p_k g_k) = 0: the pooled normal equations."""
    pooled = simple_regression(SAME_X)
    data = [as_arrays(c) for c in SAME_X]
    np.testing.assert_allclose(theory.fedavg_fixed_point(data, 0.05, epochs), pooled, atol=1e-12)
    # the clients' own optima are far apart: the y differ, only the x agree
    assert min(np.linalg.norm(a - b) for a, b in zip(theory.client_optima(data), theory.client_optima(data)[1:])) > 1
    # move one client's x and the drift is back (the same y, other Hessians)
    shifted = [SAME_X[0], [(x + 1.0, y) for x, y in SAME_X[1]], SAME_X[2]]
    moved = theory.fedavg_fixed_point([as_arrays(c) for c in shifted], 0.05, epochs)
    gap = np.linalg.norm(moved - simple_regression(shifted))
    assert gap < 1e-12 if epochs == 1 else gap > 1e-2, gap


def test_clients_whose_rows_share_one_line_have_no_drift_whatever_their_x():
    """Different x (different H_k), but y = 0.5·x + 3 on every row: one model
    is every client's optimum, the fixed point of any weighted average of them."""
    clients = [[(x, 0.5 * x + 3) for x in xs] for xs in ([0.0, 1.0], [3.0, 4.0, 6.0], [10.0, 12.0])]
    fixed = theory.fedavg_fixed_point([as_arrays(c) for c in clients], 0.005, 10)
    np.testing.assert_allclose(fixed, [0.5, 3.0], atol=1e-12)


def test_a_federation_of_clients_with_the_same_x_reaches_the_pooled_optimum(federation):
    """FedAvg itself, on the clients' apps in this process: 10 local epochs a
    round, and it ends on the pooled least-squares line, not a drifted one."""
    fed = federation([LocalClient(f"same_x_{k}", *as_arrays(c)) for k, c in enumerate(SAME_X, start=1)])
    status, body = fed.post("/start", {"rounds": 300, "lr": 0.05, "local_epochs": 10, "seed": 1})
    assert status == 200 and body["status"] == "completed", body
    final = body["final_model"]
    np.testing.assert_allclose([final["w"], final["b"]], simple_regression(SAME_X), atol=1e-9)


def test_an_lr_at_which_fedavg_diverges_is_a_clear_error_and_the_reference_agrees():
    with pytest.raises(ValueError, match=r"does not converge at lr=0\.3.*spectral radius"):
        theory.fedavg_fixed_point(SEED, 0.3, 10)
    w, b = reference_fedavg(SEED_DATA, rounds=20, lr=0.3, epochs=10)[-1]
    assert abs(w) > 1e6  # the plain loop blows up too
    M, _ = theory.fedavg_round_map(SEED, 0.3, 10)
    assert theory.spectral_radius(M) > 1
    M, _ = theory.fedavg_round_map(SEED, 0.01, 10)
    assert theory.spectral_radius(M) < 1


def test_one_round_of_the_round_map_is_one_round_of_the_reference():
    M, c = theory.fedavg_round_map(SEED, 0.01, 10)
    theta = np.array([0.3, -0.7])
    expected = [0.0, 0.0]
    for data in SEED_DATA:
        w, b = local_gd(data, 0.3, -0.7, 0.01, 10)
        expected[0] += 0.5 * w
        expected[1] += 0.5 * b
    np.testing.assert_allclose(M @ theta + c, expected, atol=1e-13)


# --- several features, unequal n_k ---------------------------------------------------


def three_feature_clients() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three clients with 3 features, n_k = 5, 12, 30, each with its own true
    model and its own x range: non-IID, so FedAvg drifts."""
    rng = np.random.default_rng(9)
    clients = []
    for k, n in enumerate((5, 12, 30)):
        X = rng.normal(loc=0.5 * k, scale=1.0, size=(n, 3))
        w = np.array([1.0, -2.0, 0.5]) + k * np.array([0.5, 0.3, -0.4])
        clients.append((X, X @ w + 0.3 * k + rng.normal(0, 0.05, size=n)))
    return clients


def test_pooled_optimum_with_three_features_is_lstsq_on_the_stacked_rows():
    clients = three_feature_clients()
    X = np.vstack([X for X, _ in clients])
    y = np.concatenate([y for _, y in clients])
    expected, *_ = np.linalg.lstsq(np.column_stack([X, np.ones(len(y))]), y, rcond=None)
    np.testing.assert_allclose(theory.pooled_optimum(clients), expected, atol=1e-10)


def test_ridge_penalises_the_weights_and_not_the_bias():
    # Ridge as least squares on extra rows: √λ·e_j with target 0 for each
    # weight j (no row for b), so ‖X̃θ − y‖² + λ‖w‖² is minimised.
    clients, lam = three_feature_clients(), 2.5
    X = np.vstack([X for X, _ in clients])
    y = np.concatenate([y for _, y in clients])
    rows = np.vstack([np.column_stack([X, np.ones(len(y))]), np.sqrt(lam) * np.eye(3, 4)])
    expected, *_ = np.linalg.lstsq(rows, np.concatenate([y, np.zeros(3)]), rcond=None)
    np.testing.assert_allclose(theory.pooled_optimum(clients, ridge=lam), expected, atol=1e-10)
    # A constant shift of y moves only b: the bias is not shrunk.
    shifted = [(X, y + 100.0) for X, y in clients]
    delta = theory.pooled_optimum(shifted, ridge=lam) - theory.pooled_optimum(clients, ridge=lam)
    np.testing.assert_allclose(delta, [0, 0, 0, 100.0], atol=1e-9)


def test_fixed_point_with_three_features_is_where_a_numpy_fedavg_loop_settles():
    clients, lr, epochs = three_feature_clients(), 0.05, 5
    theta = numpy_fedavg(clients, lr, epochs, rounds=3000)
    assert np.allclose(numpy_fedavg(clients, lr, epochs, 1, theta0=theta), theta, atol=1e-13, rtol=0)
    predicted = theory.fedavg_fixed_point(clients, lr, epochs)
    np.testing.assert_allclose(predicted, theta, atol=1e-9)
    assert np.linalg.norm(predicted - theory.pooled_optimum(clients)) > 0.01  # non-IID: it drifts
    # with one local step, FedAvg is pooled gradient descent again
    np.testing.assert_allclose(theory.fedavg_fixed_point(clients, lr, 1), theory.pooled_optimum(clients), atol=1e-9)


def test_client_optima_solve_each_clients_normal_equations_or_return_the_minimum_norm_one():
    for (X, y), theta in zip(three_feature_clients(), theory.client_optima(three_feature_clients())):
        Xt = np.column_stack([X, np.ones(len(y))])
        np.testing.assert_allclose(Xt.T @ (Xt @ theta - y), 0, atol=1e-9)
    # One row, four unknowns: every θ with x̃·θ = y fits; the shortest is y·x̃/‖x̃‖².
    x, y = np.array([[1.0, 2.0, -1.0]]), np.array([3.0])
    (theta,) = theory.client_optima([(x, y)])
    xt = np.array([1.0, 2.0, -1.0, 1.0])
    np.testing.assert_allclose(theta, y[0] * xt / (xt @ xt), atol=1e-12)


def test_max_stable_lr_is_the_edge_of_pooled_gradient_descent():
    clients = three_feature_clients()
    edge = theory.max_stable_lr(clients)
    for factor, diverges in ((0.98, False), (1.02, True)):
        theta = numpy_fedavg(clients, factor * edge, 1, rounds=1500)
        assert bool(np.linalg.norm(theta) > 1e3) is diverges, (factor, theta)


@pytest.mark.parametrize("bad", [[], [(np.zeros((0, 1)), np.zeros(0))], [(np.ones((2, 1)), np.ones(3))],
                                 [(np.ones((2, 1)), np.ones(2)), (np.ones((2, 2)), np.ones(2))]])
def test_bad_client_data_is_refused_by_name(bad):
    with pytest.raises(ValueError):
        theory.pooled_optimum(bad)


def test_bad_settings_are_refused():
    for lr, epochs in ((0.0, 10), (-1.0, 10), (0.01, 0)):
        with pytest.raises(ValueError, match="lr > 0 and local_epochs >= 1"):
            theory.fedavg_fixed_point(SEED, lr, epochs)
    with pytest.raises(ValueError, match="ridge"):
        theory.pooled_optimum(SEED, ridge=-1)


# --- the diabetes scenario: real data, split by age -----------------------------


def diabetes_reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw data from scikit-learn, z-scored here: (ages in years, Z, t)."""
    from sklearn.datasets import load_diabetes
    X, y = load_diabetes(return_X_y=True, scaled=False)
    return X[:, 0], (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()


def test_diabetes_is_the_whole_data_set_split_by_age():
    ages, Z, t = diabetes_reference()
    clients = make_clients("diabetes", 5)
    sizes = [len(c.y) for c in clients]
    assert sum(sizes) == 442 and max(sizes) - min(sizes) <= 1
    # every row once, standardised as the docstring says
    got = np.vstack([np.column_stack([c.X, c.y]) for c in clients])
    want = np.column_stack([Z, t])
    np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], atol=1e-12)
    # non-IID by age: client k's patients are no younger than client k−1's
    age_of = dict(zip(np.round(Z[:, 0], 9), ages))
    client_ages = [[age_of[round(a, 9)] for a in c.X[:, 0]] for c in clients]
    for younger, older in zip(client_ages, client_ages[1:]):
        assert max(younger) <= min(older)
    means = [np.mean(a) for a in client_ages]
    assert means[-1] - means[0] > 25  # years between the youngest and the oldest group


def test_diabetes_is_reproducible_and_the_seed_only_orders_equal_ages():
    a, b, other = make_clients("diabetes", 8, seed=3), make_clients("diabetes", 8, seed=3), \
        make_clients("diabetes", 8, seed=4)
    for x, y, z in zip(a, b, other):
        np.testing.assert_array_equal(x.X, y.X)
        np.testing.assert_array_equal(x.y, y.y)
        assert sorted(x.X[:, 0]) == sorted(z.X[:, 0])  # the same ages in each client
    assert any(not np.array_equal(x.X, z.X) for x, z in zip(a, other))  # other patients of those ages
    with pytest.raises(ValueError, match="1..442"):
        make_clients("diabetes", 443)


def test_diabetes_pooled_optimum_is_lstsq_on_all_patients_and_fedavg_drifts_from_it():
    _, Z, t = diabetes_reference()
    expected, *_ = np.linalg.lstsq(np.column_stack([Z, np.ones(len(t))]), t, rcond=None)
    data = [(c.X, c.y) for c in make_clients("diabetes", 4)]
    pooled = theory.pooled_optimum(data)
    np.testing.assert_allclose(pooled, expected, atol=1e-10)

    assert theory.max_stable_lr(data) > DIABETES_LR
    fixed = theory.fedavg_fixed_point(data, DIABETES_LR, 10)
    assert np.linalg.norm(fixed - pooled) > 0.1  # the drift, in standard deviations of the target
    # and it is where FedAvg itself goes: iterate it (ρ ≈ 0.984 a round, so 2500 rounds is ~1e-17)
    theta = numpy_fedavg(data, DIABETES_LR, 10, rounds=2500)
    np.testing.assert_allclose(theta, fixed, atol=1e-9)
    with pytest.raises(ValueError, match="does not converge"):
        theory.fedavg_fixed_point(data, 0.2, 10)  # the docstring's "lr = 0.2 diverges"


@pytest.mark.system
def test_scikit_learn_stays_out_of_the_apps_that_do_not_need_it():
    for app in ("client_1", "client_2", "server", "fedavg"):
        text = (ROOT / app / "pyproject.toml").read_text()
        assert "scikit-learn" not in text, app
        lock = ROOT / app / "poetry.lock"
        assert not lock.exists() or 'name = "scikit-learn"' not in lock.read_text(), app
    assert 'name = "scikit-learn"' in (ROOT / "client_host" / "poetry.lock").read_text()
    # importing the scenarios (as every client host does) does not import it; choosing diabetes does
    probe = ("import sys, fedavg.scenarios as s; assert 'sklearn' not in sys.modules; "
             "s.make_clients('diabetes', 2); assert 'sklearn' in sys.modules")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)
