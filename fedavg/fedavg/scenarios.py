"""Named data scenarios for simulated federations: each gives K clients their
private (X, y). A scenario is reproducible from its name and seed.

- ``seed``: the original two clients, (1,3),(2,5) on y=2x+1 and (3,4),(4,5) on y=x+1.
- ``iid``: every client draws x ~ U(0, 5), y = 2x + 1 + noise.
- ``feature-shift``: client k draws x from its own window of the line (non-IID x).
- ``label-shift``: client k's true slope runs from 1 to 3 (non-IID y|x).
- ``quantity-skew``: IID data, very unequal n_k (log-normal sizes).
- ``csv``: a user's CSV (x,y or x1..xd,y) shuffled and split into K parts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .client import LocalClient
from .data import load_csv

SCENARIOS = ("seed", "iid", "feature-shift", "label-shift", "quantity-skew", "csv")
NOISE = 0.1


def make_clients(name: str, k: int, seed: int = 0, samples: int = 20,
                 csv_path: str | Path | None = None) -> list[LocalClient]:
    """K clients of scenario ``name``; ``samples`` is each client's n_k
    (the mean n_k for quantity-skew)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    if name == "seed":
        if k != 2:
            raise ValueError("scenario seed has exactly 2 clients")
        return [LocalClient("client_1", np.array([[1.0], [2.0]]), np.array([3.0, 5.0])),
                LocalClient("client_2", np.array([[3.0], [4.0]]), np.array([4.0, 5.0]))]
    if k < 1:
        raise ValueError("a scenario needs at least one client")
    if name == "csv":
        if csv_path is None:
            raise ValueError("scenario csv needs a CSV file")
        X, y = load_csv(csv_path)
        if len(y) < k:
            raise ValueError(f"{csv_path}: {len(y)} rows cannot be split among {k} clients")
        order = np.random.default_rng(seed).permutation(len(y))
        return [LocalClient(f"part_{i + 1}", X[part], y[part])
                for i, part in enumerate(np.array_split(order, k))]
    if samples < 1:
        raise ValueError("samples must be at least 1")

    clients = []
    for i in range(k):
        rng = np.random.default_rng([seed, i])  # client i's data depends on nothing else
        n, lo, hi, slope = samples, 0.0, 5.0, 2.0
        if name == "feature-shift":
            lo = 5.0 * i / k
            hi = lo + 5.0 / k + 0.5
        elif name == "label-shift":
            slope = 1.0 + 2.0 * i / max(k - 1, 1)
        elif name == "quantity-skew":
            n = max(1, int(round(rng.lognormal(np.log(samples), 1.0))))
        x = rng.uniform(lo, hi, size=n)
        y = slope * x + 1.0 + rng.normal(0.0, NOISE, size=n)
        clients.append(LocalClient(f"sim_{i + 1}", x[:, None], y))
    return clients
