"""Named data scenarios for simulated federations: each gives K clients their
private (X, y). A scenario is reproducible from its name and seed.

- ``seed``: the original two clients, (1,3),(2,5) on y=2x+1 and (3,4),(4,5) on y=x+1.
- ``iid``: every client draws x ~ U(0, 5), y = 2x + 1 + noise.
- ``feature-shift``: client k draws x from its own window of the line (non-IID x).
- ``label-shift``: client k's true slope runs from 1 to 3 (non-IID y|x).
- ``quantity-skew``: IID data, very unequal n_k (log-normal sizes).
- ``csv``: a user's CSV (``data.HEADER_RULE``: its target column named by ``target``) shuffled and
  split into K parts.
- ``diabetes``: real data, scikit-learn's bundled diabetes set (442 patients,
  10 features), split into K clients by age (non-IID); see ``diabetes_clients``.
- ``byzantine``: ``iid``'s clients, of which the first f are ``Attacker``s:
  honest data, lying replies (one of ``ATTACKS``); see ``Attacker``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .client import LocalClient
from .data import TARGET, load_csv
from .strategies import STRATEGIES
from .wire import parse_train_request

NOISE = 0.1

# byzantine: what an attacker sends instead of its honest reply
SCALE = 100.0  # scale: W_t + 100·(W_k − W_t)
FLIP = 10.0  # sign_flip: W_t − 10·(W_k − W_t)
HUGE = 1e12  # huge: every weight and b = 10^12
LYING_N = 10**9  # lying_n: n_k = 10^9, 50 million times the 20 rows it holds
ATTACKS = {
    "scale": f"sends W_t + {SCALE:g}·(W_k − W_t), its update scaled up",
    "sign_flip": f"sends W_t − {FLIP:g}·(W_k − W_t), its update reversed and scaled up",
    "huge": f"sends the model w = b = {HUGE:.0e}",
    "lying_n": f"sends its honest W_k but says n_k = {LYING_N:.0e} (in /train, /evaluate and /health)",
}
ATTACKERS = 2  # f, the default number of attackers


def make_clients(name: str, k: int, seed: int = 0, samples: int = 20,
                 csv_path: str | Path | None = None, attackers: int = ATTACKERS,
                 attack: str = "huge", target: str = TARGET) -> list[LocalClient]:
    """K clients of scenario ``name`` (``SCENARIOS``); ``samples`` is each
    client's n_k (the mean n_k for quantity-skew). ``attackers`` (f) and
    ``attack`` are byzantine's: the first f clients lie. ``csv_path`` and
    ``target`` (the name of its column to predict) are csv's."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    if k < 1 and name != "seed":
        raise ValueError("a scenario needs at least one client")
    return SCENARIOS[name](k, seed, samples, csv_path=csv_path, attackers=attackers, attack=attack,
                           target=target)


def about(name: str) -> str:
    """What generated scenario ``name``'s data, in one line: its function's
    docstring's first line (a client host shows it at start and in /health)."""
    return (SCENARIOS[name].__doc__ or name).strip().splitlines()[0]


def seed_clients(k: int, seed: int, samples: int, **options: Any) -> list[LocalClient]:
    """the original two clients: (1,3),(2,5) on y = 2x + 1 and (3,4),(4,5) on y = x + 1"""
    if k != 2:
        raise ValueError("scenario seed has exactly 2 clients")
    return [LocalClient("client_1", np.array([[1.0], [2.0]]), np.array([3.0, 5.0])),
            LocalClient("client_2", np.array([[3.0], [4.0]]), np.array([4.0, 5.0]))]


def csv_clients(k: int, seed: int, samples: int, csv_path: str | Path | None = None, target: str = TARGET,
                **options: Any) -> list[LocalClient]:
    """your CSV, shuffled and split into K parts"""
    if csv_path is None:
        raise ValueError("scenario csv needs a CSV file")
    X, y = load_csv(csv_path, target)
    if len(y) < k:
        raise ValueError(f"{csv_path}: {len(y)} rows cannot be split among {k} clients")
    order = np.random.default_rng(seed).permutation(len(y))
    return [LocalClient(f"part_{i + 1}", X[part], y[part]) for i, part in enumerate(np.array_split(order, k))]


def line_clients(kind: str, k: int, seed: int, samples: int) -> list[LocalClient]:
    """The generated scenarios' clients on y = slope·x + 1 + N(0, NOISE²):
    iid, feature-shift (client i's x in its own window), label-shift (slope
    from 1 to 3 across clients), quantity-skew (log-normal n_k)."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    clients = []
    for i in range(k):
        rng = np.random.default_rng([seed, i])  # client i's data depends on nothing else
        n, lo, hi, slope = samples, 0.0, 5.0, 2.0
        if kind == "feature-shift":
            lo = 5.0 * i / k
            hi = lo + 5.0 / k + 0.5
        elif kind == "label-shift":
            slope = 1.0 + 2.0 * i / max(k - 1, 1)
        elif kind == "quantity-skew":
            n = max(1, int(round(rng.lognormal(np.log(samples), 1.0))))
        x = rng.uniform(lo, hi, size=n)
        y = slope * x + 1.0 + rng.normal(0.0, NOISE, size=n)
        clients.append(LocalClient(f"sim_{i + 1}", x[:, None], y))
    return clients


def drawn(kind: str, about_: str) -> Callable[..., list[LocalClient]]:
    """Scenario ``kind`` of ``line_clients``, described by ``about_``."""
    def make(k: int, seed: int, samples: int, **options: Any) -> list[LocalClient]:
        return line_clients(kind, k, seed, samples)
    make.__doc__ = about_
    return make


def byzantine(k: int, seed: int, samples: int, attackers: int = ATTACKERS, attack: str = "huge",
              **options: Any) -> list[LocalClient]:
    clients = line_clients("iid", k, seed, samples)
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r} (known: {', '.join(ATTACKS)})")
    if not 0 <= attackers <= k:
        raise ValueError(f"scenario byzantine: attackers must be 0..K={k}, got {attackers}")
    # the same data as iid (same seed, same client index), only the replies lie
    clients[:attackers] = [Attacker(f"attacker_{i + 1}", c.X, c.y, attack=attack)
                           for i, c in enumerate(clients[:attackers])]
    return clients


byzantine.__doc__ = (f"x ~ U(0, 5), y = 2x + 1 + N(0, {NOISE}²) noise, the same for every client (as iid); the "
                     "first F clients (attacker_1 …) train honestly and then lie in their replies")


def diabetes(k: int, seed: int, samples: int, **options: Any) -> list[LocalClient]:
    """scikit-learn's diabetes data (442 patients, 10 features, z-scored), split into K clients by age"""
    return diabetes_clients(k, seed)


def honest(clients: list[LocalClient]) -> list[LocalClient]:
    """The clients that do not lie (all but byzantine's attackers)."""
    return [c for c in clients if not isinstance(c, Attacker)]


def poison(attack: str, theta_t: np.ndarray, theta_k: np.ndarray) -> np.ndarray:
    """What an attacker sends instead of its honest model W_k, from the global
    model W_t it was given (FedSGD's gradient g is an update from 0)."""
    if attack == "scale":
        return theta_t + SCALE * (theta_k - theta_t)
    if attack == "sign_flip":
        return theta_t - FLIP * (theta_k - theta_t)
    if attack == "huge":
        return np.full_like(theta_k, HUGE)
    return theta_k  # lying_n: the model is honest, the count is not


@dataclass(frozen=True)
class Attacker(LocalClient):
    """A Byzantine client: honest data, honest training, then a lie in its
    /train reply (``ATTACKS``). It poisons the local model (FedSGD: the
    gradient); SCAFFOLD's Δc_k, FedNova's steps and Exact's statistics are
    sent as computed. Its /evaluate losses are honest; a lying_n attacker
    claims n_k = 10^9 everywhere, so the server's /health check agrees."""

    attack: str = "huge"

    def health(self) -> dict[str, Any]:
        facts = super().health()
        if self.attack == "lying_n":
            facts["data_size"] = LYING_N
        return facts

    def train(self, body: Any, deadline_s: float | None = None) -> tuple[dict[str, Any], int]:
        reply, status = super().train(body, deadline_s)  # the honest reply: the request is valid
        if status != 200:
            return reply, status
        if self.attack == "lying_n":
            return {**reply, "data_size": LYING_N}, status
        task = parse_train_request(body, self.num_features)
        # The fields that are its update (the local model, FedSGD's gradient) carry the lie.
        updates = [f for f in STRATEGIES[task.config.strategy].replies if f.update_from is not None]
        for sent in updates:
            value = sent.kind.parse(reply[sent.name], sent.name, self.num_features)
            center = task.theta if sent.update_from == "global" else np.zeros_like(value)
            with np.errstate(over="ignore", invalid="ignore"):
                lie = poison(self.attack, center, value)
            if not sent.kind.finite(lie):
                return {"error": "the poisoned model is not finite", "diverged": True}, 422
            reply[sent.name] = sent.kind.to_json(lie)
        return reply, status

    def evaluate(self, body: Any) -> tuple[dict[str, Any], int]:
        reply, status = super().evaluate(body)
        if status == 200 and self.attack == "lying_n":
            reply["data_size"] = LYING_N
        return reply, status


DIABETES_ROWS = 442
DIABETES_AGE = 0  # the column of age (years) in load_diabetes(scaled=False)
# A step size that converges for every split into K <= 10 clients, E = 10
# (see diabetes_clients); ten times the seed's default lr.
DIABETES_LR = 0.1


def diabetes_clients(k: int, seed: int = 0) -> list[LocalClient]:
    """scikit-learn's diabetes data (Efron et al. 2004: 442 patients; age,
    sex, BMI, blood pressure and six blood serum values; y = disease
    progression one year later), shipped inside the package, split by age:
    the patients sorted by age (equal ages in an order drawn from ``seed``,
    the only thing the seed changes) and cut into K runs of consecutive
    patients, sizes differing by at most one. Client 1 holds the youngest,
    client K the oldest: non-IID in age, and in whatever goes with age.

    Scaling, a simulation convenience (this tool knows all the data; a real
    federation would have to agree on the scales first): every feature is
    z-scored with the mean and standard deviation (ddof=0) of all 442 rows,
    x' = (x − mean)/std, and so is the target, y' = (y − 152.13)/77.01. The
    model then predicts progression in standard deviations.

    Step size. The pooled Hessian H = (2/N) X̃ᵀX̃ has λ_max ≈ 8.05 (the six
    serum values are strongly correlated), so gradient descent on the pooled
    data needs lr < 2/λ_max ≈ 0.248; each client's own H_k is larger (its
    rows are not centred), 2/λ_max(H_k) ≥ 0.201 for K = 2, 0.167 for K = 4
    and 0.118 for K = 10 (seed 0). ``DIABETES_LR`` = 0.1 converges for
    K <= 10; with E = 10 and K >= 4, lr = 0.2 diverges (the round map's
    spectral radius is 7.4 at K = 4). At lr = 0.1, E = 10, K = 4 (seed 0)
    FedAvg's fixed point lies 0.171 (Euclidean, in these units) from the
    pooled optimum, and the round map contracts by ρ ≈ 0.984 a round (about
    420 rounds to settle to 1e-3); λ_min(H) ≈ 0.017 makes E = 1 (plain
    pooled GD, which does reach the optimum) slow: ρ ≈ 0.998."""
    try:
        from sklearn.datasets import load_diabetes  # only here: no other app needs scikit-learn
    except ImportError as e:
        raise ValueError("scenario diabetes needs scikit-learn (it is in client_host's environment)") from e
    if not 1 <= k <= DIABETES_ROWS:
        raise ValueError(f"scenario diabetes splits {DIABETES_ROWS} patients: K must be 1..{DIABETES_ROWS}, got {k}")
    X, y = load_diabetes(return_X_y=True, scaled=False)
    age = X[:, DIABETES_AGE]
    # lexsort sorts by its last key first: by age, equal ages by a seeded draw.
    order = np.lexsort((np.random.default_rng(seed).random(len(y)), age))
    Z = (X - X.mean(axis=0)) / X.std(axis=0)
    t = (y - y.mean()) / y.std()
    return [LocalClient(f"sim_{i + 1}", Z[part], t[part]) for i, part in enumerate(np.array_split(order, k))]


# The registry: each scenario's name and the function that makes its K
# clients, (k, seed, samples, **options) → list[LocalClient], its docstring's
# first line what generated the data (``about``). A scenario here is known
# everywhere without another edit: the client host's --scenario and /health,
# make sim, make compare's SCENARIO.
SCENARIOS: dict[str, Callable[..., list[LocalClient]]] = {
    "seed": seed_clients,
    "iid": drawn("iid", f"x ~ U(0, 5), y = 2x + 1 + N(0, {NOISE}²) noise, the same for every client"),
    "feature-shift": drawn("feature-shift", f"y = 2x + 1 + N(0, {NOISE}²) noise, client k's x from its own "
                           "window of [0, 5.5] (non-IID x)"),
    "label-shift": drawn("label-shift", f"x ~ U(0, 5), y = a_k·x + 1 + N(0, {NOISE}²) noise, slope a_k from 1 "
                         "to 3 across clients (non-IID y|x)"),
    "quantity-skew": drawn("quantity-skew", f"x ~ U(0, 5), y = 2x + 1 + N(0, {NOISE}²) noise, log-normal client "
                           "sizes n_k"),
    "csv": csv_clients,
    "diabetes": diabetes,
    "byzantine": byzantine,
}
