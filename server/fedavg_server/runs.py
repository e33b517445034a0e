"""RunStore: every run and its rounds, as the API returns them.

Kept in memory for now, behind a lock (the run's thread writes while request
threads read); every read returns a copy, so a caller never sees a half-written
round.
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Any


class RunStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[int, dict[str, Any]] = {}
        self._next_id = 1

    def create(self, settings: dict[str, Any], clients: list[str], init_model: dict[str, Any]) -> int:
        with self._lock:
            run_id = self._next_id
            self._next_id += 1
            self._runs[run_id] = {
                "run_id": run_id, "status": "running", "settings": copy.deepcopy(settings),
                "clients": list(clients), "error": None, "created_at": time.time(),
                "finished_at": None, "current_model": copy.deepcopy(init_model),
                "final_model": None, "rounds": [],
            }
            return run_id

    def add_round(self, run_id: int, record: dict[str, Any]) -> None:
        with self._lock:
            run = self._runs[run_id]
            run["rounds"].append(copy.deepcopy(record))
            run["current_model"] = copy.deepcopy(record["global_model"])

    def set_federated_loss(self, run_id: int, round_no: int, loss: float | None) -> None:
        with self._lock:
            self._runs[run_id]["rounds"][round_no - 1]["federated_loss"] = loss

    def finish(self, run_id: int, status: str, error: str | None = None) -> None:
        with self._lock:
            run = self._runs[run_id]
            run.update(status=status, error=error, finished_at=time.time())
            run["final_model"] = copy.deepcopy(run["current_model"])

    def get(self, run_id: int) -> dict[str, Any] | None:
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else copy.deepcopy(run)

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return copy.deepcopy(self._runs[self._next_id - 1]) if self._runs else None

    def summaries(self) -> list[dict[str, Any]]:
        """Every run without its rounds, newest first."""
        with self._lock:
            return [
                {k: copy.deepcopy(v) for k, v in run.items() if k != "rounds"}
                | {"rounds_completed": len(run["rounds"])}
                for run in sorted(self._runs.values(), key=lambda r: -r["run_id"])
            ]
