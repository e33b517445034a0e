"""FedAvg for y = w·x + b written the plainest way: lists of floats and loops,
no NumPy and nothing from ``fedavg``. The tests compare the real code with it,
so it must stay independent of the code it checks."""
from __future__ import annotations

Sample = tuple[float, float]  # (x, y)

# The seed's two clients: (1,3),(2,5) on y = 2x + 1 and (3,4),(4,5) on y = x + 1.
SEED_DATA: list[list[Sample]] = [[(1.0, 3.0), (2.0, 5.0)], [(3.0, 4.0), (4.0, 5.0)]]


def local_gd(data: list[Sample], w: float, b: float, lr: float = 0.01, epochs: int = 10) -> tuple[float, float]:
    """Full-batch gradient descent on L = 1/n Σ (w·x + b − y)², one step per epoch."""
    n = len(data)
    for _ in range(epochs):
        dw = 0.0
        db = 0.0
        for x, y in data:
            err = w * x + b - y
            dw += 2.0 / n * err * x
            db += 2.0 / n * err
        w = w - lr * dw
        b = b - lr * db
    return w, b


def local_mse(data: list[Sample], w: float, b: float) -> float:
    return sum((w * x + b - y) ** 2 for x, y in data) / len(data)


def reference_fedavg(clients: list[list[Sample]], rounds: int = 5, lr: float = 0.01,
                     epochs: int = 10) -> list[tuple[float, float]]:
    """The global (w, b) after each round, starting from w = b = 0:
    every client trains from the global model, then W = Σ_k n_k/N · W_k."""
    w, b = 0.0, 0.0
    history = []
    for _ in range(rounds):
        total = sum(len(data) for data in clients)
        new_w, new_b = 0.0, 0.0
        for data in clients:
            w_k, b_k = local_gd(data, w, b, lr, epochs)
            new_w += len(data) / total * w_k
            new_b += len(data) / total * b_k
        w, b = new_w, new_b
        history.append((w, b))
    return history
