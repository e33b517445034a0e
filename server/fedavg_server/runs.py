"""RunStore: every run and its rounds, in SQLite, as the API returns them.

Each round is committed the moment it completes (WAL journal), so a server
killed mid-run loses nothing it had finished; on the next start the runs that
were running read ``interrupted`` and can be resumed. One server at a time:
a store holds a lock on its file for as long as it is open.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedavg.strategies import REPLY_FIELDS

from .records import RoundRecord, clients_json, round_json

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
CREATE TABLE IF NOT EXISTS round_clients (
    run_id  INTEGER NOT NULL,
    round   INTEGER NOT NULL,
    clients TEXT NOT NULL,  -- JSON {"participants", "dropped"}: a summarised round's every client
    PRIMARY KEY (run_id, round)
);
"""

# The JSON that holds a round's every client (a summarised round's own row in
# round_clients, else its record), for SQL over rounds r LEFT JOIN round_clients c.
CLIENTS_OF = "COALESCE(c.clients, r.record)"
WITH_CLIENTS = "rounds r LEFT JOIN round_clients c ON c.run_id = r.run_id AND c.round = r.round"


# A run's row and how many rounds it has completed, without reading them.
SUMMARY = ("SELECT runs.*, (SELECT COUNT(*) FROM rounds WHERE rounds.run_id = runs.run_id) AS rounds_completed "
           "FROM runs")


class StoreError(Exception):
    """The run history cannot be read or written: the file is corrupt, its
    folder read-only, the disk full, or the file gone. The message says which."""


def _why(e: Exception) -> str:
    text = str(e)
    if "full" in text:
        return f"disk full: {text}"
    if "readonly" in text or "read-only" in text:
        return f"read-only: {text}"
    if "not a database" in text or "malformed" in text:
        return f"corrupt: {text}"
    return text


class RunStore:
    """One SQLite file; one connection shared under a lock (writes are one
    small row per round, so a lock costs nothing and keeps reads consistent).
    Every SQLite failure leaves as ``StoreError``; so does a file another
    store holds (``_hold``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._held: IO[str] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._held = self._hold(self.path.with_name(self.path.name + ".lock"))
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.executescript(SCHEMA)
            # Whatever was running when the last server process died is not running now.
            self._db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
            self._file = os.stat(self.path)
        except (sqlite3.Error, OSError) as e:
            self._let_go()
            raise StoreError(f"cannot use {self.path} as the run history: {_why(e)}") from None

    def _hold(self, lock_path: Path) -> IO[str]:
        """An advisory lock (flock) on a file beside the history, with this
        process's id in it, held until ``close`` or the process ends (even by
        kill -9: the kernel lets go). Without it a second server on the same
        file would mark the first's live run ``interrupted`` (above) while it
        goes on, and it would end with no final model. Raises StoreError
        naming the holder's pid."""
        held = open(lock_path, "a+")  # "a+": the holder's pid must not be erased before we know we hold it
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            holder = held.read().strip() or "unknown"
            held.close()
            raise StoreError(f"the run history {self.path} is in use by another server (pid {holder}); stop it, "
                             "or give this one a history of its own (--db)") from None
        except OSError:
            held.close()
            raise
        held.truncate(0)
        held.write(f"{os.getpid()}\n")
        held.flush()
        return held

    def _let_go(self) -> None:
        if self._held is not None:
            self._held.close()  # closing the file releases the lock
            self._held = None

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._let_go()

    @contextmanager
    def _using(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite's errors as StoreError.
        Before a write: the file must still be the one opened (a history deleted
        while the server runs would otherwise take writes that nobody can read)."""
        with self._lock:
            if write:
                try:
                    now = os.stat(self.path)
                except OSError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (self._file.st_dev, self._file.st_ino):
                    raise StoreError(f"the run history {self.path} was deleted or replaced while the server ran; "
                                     "restart the server")
            try:
                yield self._db
            except sqlite3.Error as e:
                raise StoreError(f"the run history {self.path}: {_why(e)}") from None

    # --- writes -----------------------------------------------------------------

    def create(self, settings: dict[str, Any], clients: list[str], init_model: dict[str, Any]) -> int:
        with self._using(write=True):
            cur = self._db.execute(
                "INSERT INTO runs (status, settings, clients, created_at, current_model) VALUES (?, ?, ?, ?, ?)",
                ("running", json.dumps(settings), json.dumps(clients), time.time(), json.dumps(init_model)))
            return int(cur.lastrowid)

    def add_round(self, run_id: int, rec: RoundRecord) -> dict[str, Any]:
        """Commit one completed round and make its model the run's current one;
        return the round as stored (what the API and the log show)."""
        record = round_json(rec)
        body = {k: v for k, v in record.items() if k != "federated_loss"}
        clients = clients_json(rec)
        with self._using(write=True), self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO rounds (run_id, round, record, federated_loss) VALUES (?, ?, ?, ?)",
                             (run_id, record["round"], json.dumps(body), record.get("federated_loss")))
            if clients is not None:
                self._db.execute("INSERT INTO round_clients (run_id, round, clients) VALUES (?, ?, ?)",
                                 (run_id, record["round"], json.dumps(clients)))
            self._db.execute("UPDATE runs SET current_model = ? WHERE run_id = ?",
                             (json.dumps(record["global_model"]), run_id))
        return record

    def set_federated_loss(self, run_id: int, round_no: int, loss: float | None) -> None:
        with self._using(write=True):
            self._db.execute("UPDATE rounds SET federated_loss = ? WHERE run_id = ? AND round = ?",
                             (loss, run_id, round_no))

    def set_clients(self, run_id: int, clients: list[str]) -> None:
        with self._using(write=True):
            self._db.execute("UPDATE runs SET clients = ? WHERE run_id = ?", (json.dumps(clients), run_id))

    def set_status(self, run_id: int, status: str) -> None:
        with self._using(write=True):
            self._db.execute("UPDATE runs SET status = ?, error = NULL, finished_at = NULL WHERE run_id = ?",
                             (status, run_id))

    def finish(self, run_id: int, status: str, error: str | None = None) -> None:
        with self._using(write=True):
            self._db.execute("UPDATE runs SET status = ?, error = ?, finished_at = ?, final_model = current_model "
                             "WHERE run_id = ?", (status, error, time.time(), run_id))

    # --- reads ----------------------------------------------------------------------

    def get(self, run_id: int, since: int = 0, limit: int | None = None, every: int = 1,
            keep: tuple[int, ...] = ()) -> dict[str, Any] | None:
        """The run with its rounds after round ``since``: all of them, or the
        first ``limit`` (a 100,000-round run is 78 MB of JSON; pages keep a
        reader's memory bounded); with ``every`` > 1 only every such round
        and those in ``keep`` (a chart needs a few thousand points, not all)."""
        if not 0 <= run_id < 2**63:  # beyond SQLite's INTEGER: no such run
            return None
        since = min(max(since, 0), 2**63 - 1)
        with self._using():
            row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            rounds = self._db.execute(
                "SELECT record, federated_loss FROM rounds WHERE run_id = ? AND round > ? AND "
                f"(round % ? = 0 OR round IN ({', '.join('?' * len(keep)) or 'NULL'})) ORDER BY round LIMIT ?",
                (run_id, since, max(every, 1), *keep, -1 if limit is None else limit)).fetchall()
        run = _run_json(row)
        run["rounds"] = [_round_of(r) for r in rounds]
        return run

    def page(self, run_id: int, since: int = 0, limit: int = 1000, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
        """The run with the rounds after round ``since``: at most ``limit`` of
        them and, past the first, no more than ``max_bytes`` of stored JSON
        (a round of 200 clients is about 70 kB: 1000 of them would be 70 MB);
        "more" says whether rounds follow."""
        if not 0 <= run_id < 2**63:
            return None
        with self._using():
            row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            rows, more = self._rounds_after(run_id, since, limit, max_bytes)
        return _run_json(row) | {"rounds": [_round_of(r) for r in rows], "more": more}

    def _rounds_after(self, run_id: int, since: int, limit: int, max_bytes: int) -> tuple[list[sqlite3.Row], bool]:
        """The rows of the rounds after ``since`` (at most ``limit``, and
        ``max_bytes`` of records past the first), and whether more follow.
        Rows are fetched one at a time: what is not taken is never read."""
        since = min(max(since, 0), 2**63 - 1)
        rows, used = [], 0
        for r in self._db.execute("SELECT round, record, federated_loss FROM rounds WHERE run_id = ? AND round > ? "
                                  "ORDER BY round LIMIT ?", (run_id, since, limit + 1)):
            used += len(r["record"])
            if len(rows) == limit or (rows and used > max_bytes):
                return rows, True
            rows.append(r)
        return rows, False

    def chart_rounds(self, run_id: int, every: int = 1, keep: tuple[int, ...] = (), since: int = 0,
                     limit: int | None = None, clients: tuple[str, ...] | None = (),
                     vectors: bool = False) -> list[dict[str, Any]]:
        """Every ``every``-th round after ``since`` and those in ``keep``, as
        the charts draw them: "round", "federated_loss", "strategy",
        "num_features", "global_model" and "global_model_in" as {"w": w₁,
        "b": b} (the charts follow x₁); "participants" of the URLs in
        ``clients`` (None: all of them), each {"url", "client_id",
        "data_size", "local_model": {"w": w₁, "b": b} or None}; with
        ``vectors``, "global_model" whole. SQLite's JSON functions pick these
        numbers out of each record, so a chart's read costs what it draws,
        not what the rounds hold (200 clients' replies, their math)."""
        if not 0 <= run_id < 2**63:
            return []
        since = min(max(since, 0), 2**63 - 1)
        chosen = ("" if clients is None else
                  f" WHERE json_extract(p.value, '$.url') IN ({', '.join('?' * len(clients))})")
        people = "json('[]')" if clients == () else (
            "(SELECT json_group_array(json_array(json_extract(p.value, '$.url'), "
            "json_extract(p.value, '$.client_id'), json_extract(p.value, '$.data_size'), "
            f"{_first_weight('p.value', '$.local_model')})) FROM json_each({CLIENTS_OF}, '$.participants') p{chosen})")
        model = "json_extract(record, '$.global_model')" if vectors else _first_weight("record", "$.global_model")
        rows = self._read(
            "SELECT r.round, r.federated_loss, json_array(json_extract(record, '$.strategy'), "
            f"json_array_length(record, '$.global_model.w'), {model}, "
            f"{_first_weight('record', '$.global_model_in')}, {people}) "
            f"AS picked FROM {WITH_CLIENTS} WHERE r.run_id = ? AND r.round > ? AND "
            f"(r.round % ? = 0 OR r.round IN ({', '.join('?' * len(keep)) or 'NULL'})) ORDER BY r.round LIMIT ?",
            (*(clients or ()), run_id, since, max(every, 1), *keep, -1 if limit is None else limit))
        out = []
        for row in rows:
            strategy, d, model, model_in, people = json.loads(row["picked"])
            out.append({"round": row["round"], "federated_loss": row["federated_loss"], "strategy": strategy,
                        "num_features": max(d, 1), "global_model": model, "global_model_in": model_in,
                        "participants": [{"url": u, "client_id": c, "data_size": n, "local_model": m}
                                         for u, c, n, m in people]})
        return out

    def drop_counts(self, run_id: int, since: int) -> tuple[int, list[sqlite3.Row], list[sqlite3.Row]]:
        """Who was asked and who was dropped in the rounds after ``since``,
        counted by SQLite (no record is parsed here): (the last round
        counted; per URL of a participant: "url", "client_id" (its latest),
        "rounds"; per URL dropped: "url", "client_id", "reason" (the
        latest), "rounds")."""
        with self._using():
            upto = self._db.execute("SELECT MAX(round) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()[0]
            if upto is None or upto <= since:
                return since, [], []
            counted = []
            for part, extra in (("participants", ""), ("dropped", ", json_extract(e.value, '$.reason') AS reason")):
                counted.append(self._db.execute(
                    "SELECT json_extract(e.value, '$.url') AS url, MAX(r.round), "
                    f"json_extract(e.value, '$.client_id') AS client_id{extra}, "
                    f"COUNT(*) AS rounds FROM {WITH_CLIENTS}, json_each({CLIENTS_OF}, '$.{part}') e "
                    "WHERE r.run_id = ? AND r.round > ? AND r.round <= ? GROUP BY url",
                    (run_id, since, upto)).fetchall())
        return upto, counted[0], counted[1]

    def timeout_counts(self, run_id: int, since: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(the last round counted, (round, timed out, sampled) of each round
        after ``since`` whose record counts clients dropped for timeouts: its
        ``timeouts`` part, ``timeouts.TimeoutWatch``), picked out by SQLite."""
        with self._using():
            upto = self._db.execute("SELECT MAX(round) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()[0]
            if upto is None or upto <= since:
                return since, []
            rows = self._db.execute(
                "SELECT round, json_extract(record, '$.timeouts.timed_out') AS timed_out, "
                "json_extract(record, '$.timeouts.sampled') AS sampled FROM rounds "
                "WHERE run_id = ? AND round > ? AND round <= ? AND timed_out IS NOT NULL ORDER BY round",
                (run_id, since, upto)).fetchall()
        return upto, [(row["round"], row["timed_out"], row["sampled"]) for row in rows]

    def clients_seen(self, run_id: int) -> dict[str, dict[str, Any]]:
        """URL → {"client_id", "data_size"} of each client that took part in
        the run, as the last round it took part in recorded it (data_size is
        None under secure aggregation): who the run's clients were."""
        rows = self._read(
            "SELECT json_extract(p.value, '$.url') AS url, MAX(r.round), "
            "json_extract(p.value, '$.client_id') AS client_id, "
            f"json_extract(p.value, '$.data_size') AS data_size FROM {WITH_CLIENTS}, "
            f"json_each({CLIENTS_OF}, '$.participants') p WHERE r.run_id = ? GROUP BY url", (run_id,))
        return {r["url"]: {"client_id": r["client_id"], "data_size": r["data_size"]} for r in rows}

    def round_with_clients(self, run_id: int, round_no: int) -> dict[str, Any] | None:
        """Round ``round_no``'s record with its every participant and dropped
        client (a summarised round's from round_clients), or None."""
        if not (0 <= run_id < 2**63 and 0 <= round_no < 2**63):
            return None
        rows = self._read(f"SELECT r.record, r.federated_loss, c.clients FROM {WITH_CLIENTS} "
                          "WHERE r.run_id = ? AND r.round = ?", (run_id, round_no))
        if not rows:
            return None
        return _round_of(rows[0]) | (json.loads(rows[0]["clients"]) if rows[0]["clients"] else {})

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
        with self._using():
            return self._db.execute(sql, args).fetchall()

    def iter_rounds(self, run_id: int, batch: int = 1000, max_bytes: int = 1 << 20) -> Iterator[dict[str, Any]]:
        """Every round of a run, read ``batch`` (and ``max_bytes``) at a time
        (for a streamed CSV: the lock is held per batch, never for the whole
        run, and memory holds one batch)."""
        since = 0
        while True:
            with self._using():
                rows, more = self._rounds_after(run_id, since, batch, max_bytes)
            yield from (_round_of(r) for r in rows)
            if not more:
                return
            since = rows[-1]["round"]

    def summary(self, run_id: int) -> dict[str, Any] | None:
        """A run without its rounds, with rounds_completed."""
        if not 0 <= run_id < 2**63:
            return None
        with self._using():
            row = self._db.execute(SUMMARY + " WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else _run_json(row) | {"rounds_completed": row["rounds_completed"]}

    def last_round(self, run_id: int) -> dict[str, Any] | None:
        """The record of the run's last completed round (None before round 1):
        where a resumed run picks up its strategy's state and its stages' own."""
        with self._using():
            row = self._db.execute("SELECT record FROM rounds WHERE run_id = ? ORDER BY round DESC LIMIT 1",
                                   (run_id,)).fetchone()
        return None if row is None else json.loads(row["record"])

    def latest(self) -> dict[str, Any] | None:
        """The newest run's summary (no rounds: /status is polled often)."""
        with self._using():
            row = self._db.execute(SUMMARY + " ORDER BY run_id DESC LIMIT 1").fetchone()
        return None if row is None else _run_json(row) | {"rounds_completed": row["rounds_completed"]}

    def summaries(self) -> list[dict[str, Any]]:
        """Every run without its rounds, newest first."""
        with self._using():
            rows = self._db.execute(SUMMARY + " ORDER BY run_id DESC").fetchall()
        return [_run_json(row) | {"rounds_completed": row["rounds_completed"]} for row in rows]


# SQL for the JSON at a path: SQLite 3.38's -> keeps each number's text as
# stored; an older SQLite (Python 3.10 on Ubuntu 22.04 has 3.37) has only
# json_extract, which rounds a number to 15 significant digits: more than a
# chart can draw.
AT = "{0} -> '{1}'" if sqlite3.sqlite_version_info >= (3, 38) else "json_extract({0}, '{1}')"


def _first_weight(source: str, path: str) -> str:
    """SQL for {"w": w₁, "b": b} of the model at ``path`` of JSON ``source``
    (w is a number, or a list with several features), or NULL without one."""
    w1, w, b = (AT.format(source, f"{path}{key}") for key in (".w[0]", ".w", ".b"))
    return (f"CASE WHEN json_type({source}, '{path}') = 'object' THEN "
            f"json_object('w', COALESCE({w1}, {w}), 'b', {b}) END")


def _round_of(row: sqlite3.Row) -> dict[str, Any]:
    return json.loads(row["record"]) | {"federated_loss": row["federated_loss"]}


def _run_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "run_id": row["run_id"], "status": row["status"], "settings": json.loads(row["settings"]),
        "clients": json.loads(row["clients"]), "error": row["error"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "current_model": json.loads(row["current_model"]),
        "final_model": None if row["final_model"] is None else json.loads(row["final_model"]),
    }


def run_to_csv(run: dict[str, Any]) -> str:
    """The whole CSV of a run already read (see ``csv_lines``)."""
    return "".join(csv_lines(run["rounds"]))


def _csv_line() -> Callable[[list[Any]], str]:
    """A function writing one CSV row as a line of text."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")

    def line(row: list[Any]) -> str:
        out.seek(0)
        out.truncate()
        writer.writerow(row)
        return out.getvalue()
    return line


def csv_lines(rounds: Iterable[dict[str, Any]]) -> Iterator[str]:
    """One row per round: round, N, the global w (w or w1..wd) and b,
    federated loss, participants and dropped clients (';'-separated, each as
    name and URL; a summarised round's as a count), a line at a time, so a
    long run streams."""
    line = _csv_line()
    w_cols = None
    for r in rounds:
        w = r["global_model"]["w"]
        if w_cols is None:
            w_cols = ["w"] if not isinstance(w, list) else [f"w{j + 1}" for j in range(len(w))]
            yield line(["round", "N", *w_cols, "b", "federated_loss", "participants", "dropped"])
        yield line([r["round"], r["N"], *(w if isinstance(w, list) else [w]), r["global_model"]["b"],
                    "" if r["federated_loss"] is None else r["federated_loss"],
                    *_who_took_part(r)])
    if w_cols is None:
        yield line(["round", "N", "w", "b", "federated_loss", "participants", "dropped"])


def _who_took_part(r: dict[str, Any]) -> list[str]:
    """The participants' and the dropped clients' cells of a round's row."""
    if "summary" in r:  # 10,000 names in a cell help nobody: the count, and where the names are
        where = f"(its clients.csv: GET /runs/<id>/rounds/{r['round']}/clients.csv)"
        return [f"{r['summary']['contributed']} clients {where}", f"{r['summary']['dropped']} clients {where}"]
    return [_cell(";".join(_who(p) for p in r["participants"])), _cell(";".join(_who(x) for x in r["dropped"]))]


def client_csv_lines(record: dict[str, Any]) -> Iterator[str]:
    """One row per client of a round (``RunStore.round_with_clients``, as
    the reader may read it): client_id, url, n_k, weight n_k/N, each field
    its strategy declares (a model-shaped one as .w or .w1…wd and .b, least
    squares' sums as JSON), its losses (and clip bit), then "dropped": the
    reason a dropped client was left out (its numbers empty), a line at a time."""
    line = _csv_line()
    ps, N = record["participants"], record["N"]
    first = ps[0] if ps else {}
    fields = [f for f in REPLY_FIELDS if f.name in first]
    heads, cells = [], []
    for f in fields:
        if f.kind.name == "model":
            d = len(np.atleast_1d(first[f.name]["w"]))
            ws = ["w"] if d == 1 else [f"w{j + 1}" for j in range(d)]
            heads += [f"{f.name}.{c}" for c in (*ws, "b")]
            cells.append(lambda v: [*np.atleast_1d(v["w"]).tolist(), v["b"]])
        elif f.kind.name == "stats":
            heads += [f"{f.name}.xtx", f"{f.name}.xty"]
            cells.append(lambda v: [json.dumps(v["xtx"]), json.dumps(v["xty"])])
        else:
            heads.append(f.name)
            cells.append(lambda v: [v])
    metrics = list((first.get("metrics") or {}).keys())
    yield line(["client_id", "url", "n_k", "weight", *heads, *metrics, "dropped"])
    for p in ps:
        n = p["data_size"]
        got = p.get("metrics") or {}
        yield line([_cell(p["client_id"]), _cell(p["url"]), "" if n is None else n, "" if n is None else n / N,
                    *(c for f, cell in zip(fields, cells) for c in cell(p[f.name])),
                    *(got.get(m, "") for m in metrics), ""])
    blank = [""] * (2 + len(heads) + len(metrics))
    for x in record["dropped"]:
        yield line([_cell(x["client_id"]), _cell(x["url"]), *blank, _cell(x["reason"])])


def _who(client: dict[str, Any]) -> str:
    """A client as name and URL: two clients may give the same name."""
    return client["url"] if client["client_id"] == client["url"] else f"{client['client_id']} ({client['url']})"


def _cell(text: str) -> str:
    """A text cell a spreadsheet will not run: one that starts with = + - @
    (or a tab or carriage return) is a formula to Excel and LibreOffice, so it
    gets a leading apostrophe, which they show as text (OWASP's advice)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
