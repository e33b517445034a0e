"""A client: private data in, local models out.

``LocalClient`` is what a client *does* (train, evaluate, describe itself),
on plain data, with no web framework: ``fedavg.http.client_app`` is its HTTP
face, which client_1/ and client_2/ serve, and ``fedavg.http.host_app``
serves many from one process through the very same blueprint.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .model import mse, split
from .privacy import privatize
from .secure_client import Sessions
from .strategies import STRATEGIES, ClientTask, Local, RunMemory
from .strategies.fields import LOCAL_MODEL
from .trace import fmt_theta
from .training import TrainingStopped
from .wire import parse_evaluate_request, parse_train_request, train_reply_json

log = logging.getLogger("fedavg.client")
MAX_TRAININGS = 2  # per client: the server's round and one more (a retry)


class LastModel:
    """The last global model this client received, for its own page: the
    request it came with (/train or /evaluate) and the round, if said.
    Request threads write it, the page reads it: hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, Any] | None = None

    def keep(self, theta: np.ndarray, via: str, round_no: int | None) -> None:
        w, b = split(np.asarray(theta, dtype=float))
        seen = {"w": w.tolist(), "b": float(b), "via": via, "round": round_no}
        with self._lock:
            self._seen = seen

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            return self._seen


def diverged_error(lr: float) -> str:
    """Why a client's training result cannot be sent (its 422; a batch's row)."""
    return f"local training diverged (non-finite model) with lr={lr:g}; use a smaller lr"


@dataclass(frozen=True)
class Learned:
    """One round's local work: the strategy's reply fields, the model it ends
    at (θ_t when the strategy sends no model), the losses, the strategy."""

    local: Local
    theta: np.ndarray
    metrics: dict[str, Any]
    strategy: str


@dataclass(frozen=True)
class LocalClient:
    """One client's private data (X, y) and its answers to the server.
    Nothing it returns contains a data row."""

    client_id: str
    X: np.ndarray
    y: np.ndarray
    # State kept between rounds, per run (SCAFFOLD's c_k); gone when the client restarts. A client
    # host moves it into its population's memory, shared with /batch/train (host_app).
    memory: RunMemory = field(default_factory=RunMemory, compare=False, repr=False)
    # The last global model received, shown on this client's own page only.
    last_global: LastModel = field(default_factory=LastModel, compare=False, repr=False)
    # Trainings in progress at once; a server that keeps calling after its own
    # timeouts must not pile up abandoned jobs.
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_TRAININGS),
                                              compare=False, repr=False)
    # Secure aggregation's sessions in progress (fedavg.secure_client), a few rounds at most.
    sessions: Sessions = field(default_factory=Sessions, compare=False, repr=False)

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    def health(self) -> dict[str, Any]:
        # x_range (min and max of the first feature) lets the server's chart
        # frame the model lines; it is a small, deliberate leak about the data.
        x = self.X[:, 0]
        return {"status": "ok", "client_id": self.client_id, "data_size": len(self.y),
                "num_features": self.num_features, "strategies": list(STRATEGIES), "secagg": True,
                "x_range": [float(x.min()), float(x.max())]}

    def least_squares(self) -> np.ndarray:
        """θ = [w..., b] minimising Σ_i (w·x_i + b − y_i)² on this client's
        data alone: lstsq over X̃ = [X, 1] (the minimum-norm one if it is not unique)."""
        X1 = np.column_stack([self.X, np.ones(len(self.y))])
        return np.linalg.lstsq(X1, self.y, rcond=None)[0]

    def train(self, body: Any, deadline_s: float | None = None) -> tuple[dict[str, Any], int]:
        """POST /train: what the strategy asks of a client, from the global model
        (for FedAvg: local gradient descent, and the local model back).
        ``deadline_s``: the server stops waiting after that long, so training
        stops then too (an abandoned job would only hold the next round up).
        At most MAX_TRAININGS at once: one more is a 429."""
        task = self.task(body, deadline_s)
        return self.guarded(task, lambda: self._train(task))

    def task(self, body: Any, deadline_s: float | None = None) -> ClientTask:
        """A /train body (or secure aggregation's first request) → the task, with the server's deadline."""
        task = parse_train_request(body, self.num_features)
        return task if deadline_s is None else replace(task, deadline=time.monotonic() + deadline_s)

    def guarded(self, task: ClientTask, work: Callable[[], tuple[dict[str, Any], int]]) -> tuple[dict[str, Any], int]:
        """``work()`` (which trains on ``task``) in one of the MAX_TRAININGS
        slots: 429 when none is free, 408 when the server's deadline passed."""
        if not self.slots.acquire(blocking=False):
            return {"error": f"busy: {MAX_TRAININGS} trainings already in progress; try again later"}, 429
        try:
            return work()
        except TrainingStopped as e:
            log.warning("%s round %s: the server's deadline passed: %s of %d", self.client_id, task.round, e,
                        task.config.local_epochs)
            return {"error": f"the server's deadline passed: training {e} of {task.config.local_epochs}"}, 408
        finally:
            self.slots.release()

    def _train(self, task: ClientTask) -> tuple[dict[str, Any], int]:
        learned = self.learn(task, "/train")
        if isinstance(learned, tuple):
            return learned
        return train_reply_json(self.client_id, len(self.y), learned.local, learned.metrics,
                                learned.strategy), 200

    def learn(self, task: ClientTask, via: str) -> Learned | tuple[dict[str, Any], int]:
        """What the strategy computes from θ_t on this client's data (privatized
        for a DP run), with the losses before and after; or the 422 reply when
        local training diverged."""
        self.last_global.keep(task.theta, via, task.round)
        strategy = STRATEGIES[task.config.strategy]
        # Overflow is possible with a large lr; it is detected below and
        # reported as divergence, so NumPy need not warn about it.
        with np.errstate(over="ignore", invalid="ignore"):
            loss_before = mse(*split(task.theta), self.X, self.y)
            local = strategy.local(task, self.X, self.y, self.memory)
            within_clip = None
            if task.config.private and local.theta is not None:
                # DP-FedAvg: only the clipped (and, if asked, noised) model leaves this client, and
                # the bit adaptive clipping counts: was the update no longer than the bound? Not
                # when it adds its own noise: the server is then the party it does not trust, and
                # the bit would reach it un-noised (adaptive clipping is refused in that mode).
                bound = math.inf if task.config.dp_clip is None else task.config.dp_clip
                if task.config.dp_noise_std == 0:
                    within_clip = float(np.linalg.norm(local.theta - task.theta) <= bound)
                local = replace(local, theta=privatize(local.theta, task.theta, bound, task.config.dp_noise_std))
            theta = task.theta if local.theta is None else local.theta
            loss_after = mse(*split(theta), self.X, self.y)
        sent = [(f.kind, local.value(f)) for f in strategy.replies if f is not LOCAL_MODEL]
        if not (math.isfinite(loss_after) and np.all(np.isfinite(theta)) and all(k.finite(v) for k, v in sent)):
            # JSON cannot carry inf/NaN; say plainly what happened instead.
            log.warning("%s round %s: local training diverged with lr=%g", self.client_id, task.round,
                        task.config.lr)
            return {"error": diverged_error(task.config.lr), "diverged": True}, 422
        if log.isEnabledFor(logging.INFO):
            log.info("%s round %s: %s%s → %s  (loss %s → %s)", self.client_id,
                     "-" if task.round is None else task.round,
                     "" if strategy.name == "fedavg" else f"[{strategy.name}] ", fmt_theta(task.theta),
                     fmt_theta(theta), f"{loss_before:.6g}", f"{loss_after:.6g}")
        metrics = {"loss_before": loss_before if math.isfinite(loss_before) else None, "loss_after": loss_after}
        if within_clip is not None:
            metrics["within_clip"] = within_clip
        return Learned(local, theta, metrics, strategy.name)

    def loss(self, theta: np.ndarray, via: str, round_no: int | None) -> float:
        """The MSE of θ on this client's data (inf or NaN when θ is absurd)."""
        self.last_global.keep(theta, via, round_no)
        with np.errstate(over="ignore", invalid="ignore"):
            return mse(*split(theta), self.X, self.y)

    def evaluate(self, body: Any) -> tuple[dict[str, Any], int]:
        """POST /evaluate: the MSE of a model on this client's data."""
        w, b = parse_evaluate_request(body, self.num_features)
        loss = self.loss(np.append(w, b), "/evaluate", body.get("round"))
        if not math.isfinite(loss):
            return {"error": "loss is not finite for this model", "diverged": True}, 422
        return {"loss": loss, "data_size": len(self.y), "client_id": self.client_id}, 200
