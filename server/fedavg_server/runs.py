"""RunStore: every run and its rounds, in SQLite, as the API returns them.

Each round is committed the moment it completes (WAL journal), so a server
killed mid-run loses nothing it had finished; on the next start the runs that
were running read ``interrupted`` and can be resumed.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    status        TEXT NOT NULL,
    settings      TEXT NOT NULL,  -- JSON
    clients       TEXT NOT NULL,  -- JSON list of URLs
    error         TEXT,
    created_at    REAL NOT NULL,
    finished_at   REAL,
    current_model TEXT NOT NULL,  -- JSON {"w", "b"}: the latest global model
    final_model   TEXT            -- JSON, set when the run ends
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id         INTEGER NOT NULL REFERENCES runs(run_id),
    round          INTEGER NOT NULL,
    record         TEXT NOT NULL,  -- JSON: the round as GET /runs/<id> shows it
    federated_loss REAL,           -- known one round later (or after the final /evaluate)
    PRIMARY KEY (run_id, round)
);
"""


# A run's row and how many rounds it has completed, without reading them.
SUMMARY = ("SELECT runs.*, (SELECT COUNT(*) FROM rounds WHERE rounds.run_id = runs.run_id) AS rounds_completed "
           "FROM runs")


class RunStore:
    """One SQLite file; one connection shared under a lock (writes are one
    small row per round, so a lock costs nothing and keeps reads consistent)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.executescript(SCHEMA)
            # Whatever was running when the last server process died is not running now.
            self._db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes -----------------------------------------------------------------

    def create(self, settings: dict[str, Any], clients: list[str], init_model: dict[str, Any]) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO runs (status, settings, clients, created_at, current_model) VALUES (?, ?, ?, ?, ?)",
                ("running", json.dumps(settings), json.dumps(clients), time.time(), json.dumps(init_model)))
            return int(cur.lastrowid)

    def add_round(self, run_id: int, record: dict[str, Any]) -> None:
        """Commit one completed round and make its model the run's current one."""
        body = {k: v for k, v in record.items() if k != "federated_loss"}
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO rounds (run_id, round, record, federated_loss) VALUES (?, ?, ?, ?)",
                             (run_id, record["round"], json.dumps(body), record.get("federated_loss")))
            self._db.execute("UPDATE runs SET current_model = ? WHERE run_id = ?",
                             (json.dumps(record["global_model"]), run_id))

    def set_federated_loss(self, run_id: int, round_no: int, loss: float | None) -> None:
        with self._lock:
            self._db.execute("UPDATE rounds SET federated_loss = ? WHERE run_id = ? AND round = ?",
                             (loss, run_id, round_no))

    def set_status(self, run_id: int, status: str) -> None:
        with self._lock:
            self._db.execute("UPDATE runs SET status = ?, error = NULL, finished_at = NULL WHERE run_id = ?",
                             (status, run_id))

    def finish(self, run_id: int, status: str, error: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE runs SET status = ?, error = ?, finished_at = ?, final_model = current_model "
                             "WHERE run_id = ?", (status, error, time.time(), run_id))

    # --- reads ----------------------------------------------------------------------

    def get(self, run_id: int, since: int = 0) -> dict[str, Any] | None:
        """The run with its rounds after round ``since`` (all by default)."""
        if not 0 <= run_id < 2**63:  # beyond SQLite's INTEGER: no such run
            return None
        since = min(max(since, 0), 2**63 - 1)
        with self._lock:
            row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            rounds = self._db.execute("SELECT record, federated_loss FROM rounds WHERE run_id = ? AND round > ? "
                                      "ORDER BY round", (run_id, since)).fetchall()
        run = _run_json(row)
        run["rounds"] = [json.loads(r["record"]) | {"federated_loss": r["federated_loss"]} for r in rounds]
        return run

    def summary(self, run_id: int) -> dict[str, Any] | None:
        """A run without its rounds, with rounds_completed."""
        if not 0 <= run_id < 2**63:
            return None
        with self._lock:
            row = self._db.execute(SUMMARY + " WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else _run_json(row) | {"rounds_completed": row["rounds_completed"]}

    def latest(self) -> dict[str, Any] | None:
        """The newest run's summary (no rounds: /status is polled often)."""
        with self._lock:
            row = self._db.execute(SUMMARY + " ORDER BY run_id DESC LIMIT 1").fetchone()
        return None if row is None else _run_json(row) | {"rounds_completed": row["rounds_completed"]}

    def summaries(self) -> list[dict[str, Any]]:
        """Every run without its rounds, newest first."""
        with self._lock:
            rows = self._db.execute(SUMMARY + " ORDER BY run_id DESC").fetchall()
        return [_run_json(row) | {"rounds_completed": row["rounds_completed"]} for row in rows]


def _run_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "run_id": row["run_id"], "status": row["status"], "settings": json.loads(row["settings"]),
        "clients": json.loads(row["clients"]), "error": row["error"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "current_model": json.loads(row["current_model"]),
        "final_model": None if row["final_model"] is None else json.loads(row["final_model"]),
    }


def run_to_csv(run: dict[str, Any]) -> str:
    """One row per round: round, N, the global w (w or w1..wd) and b,
    federated loss, participants and dropped clients (';'-separated ids)."""
    import csv
    import io

    rounds = run["rounds"]
    d = len(rounds[0]["global_model"]["w"]) if rounds and isinstance(rounds[0]["global_model"]["w"], list) else 1
    w_cols = ["w"] if d == 1 else [f"w{j + 1}" for j in range(d)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["round", "N", *w_cols, "b", "federated_loss", "participants", "dropped"])
    for r in rounds:
        w = r["global_model"]["w"]
        writer.writerow([r["round"], r["N"], *(w if isinstance(w, list) else [w]), r["global_model"]["b"],
                         "" if r["federated_loss"] is None else r["federated_loss"],
                         ";".join(p["client_id"] for p in r["participants"]),
                         ";".join(x["client_id"] for x in r["dropped"])])
    return out.getvalue()
