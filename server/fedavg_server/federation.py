"""The federation: the configured clients, the run history, and at most one
run in progress (``run.Run``, the loop of rounds): starting, resuming and
stopping runs, recording how each ended, and what its status does not say.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

from fedavg.wire import parse_health_reply

from .hosted import as_client_urls, stored_clients, stored_urls
from .records import RoundRecord
from .roster import HEALTH_TIMEOUT_S
from .run import Run
from .runs import RunStore, StoreError
from .settings import RunSettings
from .timeouts import TimeoutTally
from .transport import Transport

log = logging.getLogger("fedavg.server")


class Busy(Exception):
    """A run is in progress; only one runs at a time."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} is still running")
        self.run_id = run_id


class CannotResume(Exception):
    """The run is not one that can be resumed (it completed, or diverged)."""


class NoSuchRun(LookupError):
    """No run has this id (a 404, and nothing else is)."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"no run {run_id}")
        self.run_id = run_id


# How often an end the store could not record (a full disk) is tried again.
RECORD_RETRY_S = 1.0


class Federation:
    """The clients, the run history, and at most one run in progress."""

    def __init__(self, transport: Transport, store: RunStore, batched: bool = True) -> None:
        self.transport = transport
        self.store = store
        self.batched = batched  # a client host may be called once for all its clients (Run's collector)
        self._lock = threading.Lock()
        self._running: Run | None = None
        self._tallies: dict[int, DropTally] = {}  # run id → its drops, read incrementally
        self._timeouts: dict[int, TimeoutTally] = {}  # run id → its rounds lost to timeouts, likewise
        # run id → (status, error) of a run that ended while the store could not
        # record it; the truth until a retry records it (see _record_end).
        self._unrecorded: dict[int, tuple[str, str | None]] = {}

    def start(self, settings: RunSettings) -> int:
        """Start a run in the background and return its id; Busy if one runs."""
        with self._lock:
            self._check_idle()
            run_id = self.store.create(settings.to_json(), stored_clients(self.transport.urls),
                                       settings.init or {"w": 0.0, "b": 0.0})
            self._launch(Run(run_id, settings, self.transport, self.store, key=_run_key(self.store.summary(run_id)),
                             batched=self.batched))
            return run_id

    def resume(self, run_id: int, current_clients: bool = False) -> None:
        """Continue an interrupted (or failed) run from its last completed
        round's global model up to its planned number of rounds, with the
        clients it ran with. A server restarted with other clients refuses,
        saying the difference, unless ``current_clients``: then the run goes
        on with this server's clients, and records them. The same URLs are
        not enough: a client that answers one of them now under another name
        or with another n_k than the run recorded (its /health, asked here)
        is another client, and is refused the same way."""
        with self._lock:
            self._check_idle()  # a run under way: its 409 now, not after asking every client's /health
        found = self.store.summary(run_id)
        # Who the run's clients were, and who answers at each URL now: read before the lock is
        # taken (a client may take seconds to answer, and a long run's records a second to count).
        recorded = now = None
        if not current_clients and found is not None and found["status"] in ("interrupted", "failed"):
            recorded = self.store.clients_seen(run_id)
            now = self._health_now(RunSettings.from_json(found["settings"]).client_timeout_s)
        with self._lock:
            self._check_idle()
            run = self.store.summary(run_id)
            if run is None:
                raise NoSuchRun(run_id)
            if run["status"] not in ("interrupted", "failed"):
                raise CannotResume(f"run {run_id} is {run['status']}; only an interrupted or failed run "
                                   "can be resumed")
            settings = RunSettings.from_json(run["settings"])
            if settings.min_clients > len(self.transport.urls):
                # The server may have been restarted with fewer clients.
                raise CannotResume(f"run {run_id} needs min_clients={settings.min_clients}; this server has "
                                   f"{len(self.transport.urls)} client(s)")
            again = 'resume with {"clients": "current"} to go on with this server\'s clients (recorded in the run)'
            here = stored_clients(self.transport.urls)  # (a hosted population as one entry, as stored)
            if run["clients"] != here:
                gone = [u for u in run["clients"] if u not in here]
                new = [u for u in here if u not in run["clients"]]
                if not current_clients:
                    change = (f"no longer here: {', '.join(gone[:6]) or 'none'}{' …' if len(gone) > 6 else ''}; "
                              f"new here: {', '.join(new[:6]) or 'none'}{' …' if len(new) > 6 else ''}"
                              if gone or new else "the same clients in another order (sampling follows the order)")
                    raise CannotResume(f"run {run_id} ran with other clients than this server's: {change}; {again}")
                self.store.set_clients(run_id, here)
                log.info("Run %s resumes with this server's clients: %d gone, %d new", run_id, len(gone), len(new))
            if recorded is not None and now is not None:
                swapped = _swapped(recorded, now)
                if swapped:
                    raise CannotResume(f"run {run_id} ran with other clients than this server's: "
                                       f"{'; '.join(swapped[:6])}{' …' if len(swapped) > 6 else ''}; {again}")
            done = run["rounds_completed"]
            self.store.set_status(run_id, "running")
            self._launch(Run(run_id, settings, self.transport, self.store, first_round=done + 1,
                             model=run["current_model"], last=self.store.last_round(run_id),
                             key=_run_key(run), clients_then=stored_urls(run["clients"]), batched=self.batched))

    def _health_now(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        """URL → what its /health says now (``parse_health_reply``), for each
        configured client that answers."""
        # (a hosted population's clients are its host's: no /health of theirs is asked)
        replies = self.transport.call_all(list(as_client_urls(self.transport.urls).own), "GET", "/health",
                                          min(timeout_s, HEALTH_TIMEOUT_S))
        return {r.url: parse_health_reply(r.body) for r in replies if r.ok}

    def feature_counts(self, timeout_s: float = 2.0) -> set[int]:
        """The feature counts the clients' /health replies state (empty when
        none says: seed clients have no /health)."""
        clients = as_client_urls(self.transport.urls)
        replies = self.transport.call_all(list(clients.own), "GET", "/health", timeout_s)
        return ({n for r in replies if r.ok and (n := parse_health_reply(r.body)["num_features"])}
                | {host.num_features for host in clients.hosts})

    def stop(self, run_id: int) -> bool:
        """Ask the running run to stop after its current round; it then reads
        ``interrupted`` and can be resumed. False if it is not running."""
        with self._lock:
            run = self._running
            if run is None or run.run_id != run_id or run.ended.is_set():
                return False
            run.stop_requested.set()
            return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """The server is stopping: calls still out to clients are given up on
        at once, and the running run records itself ``interrupted`` (its last
        completed round stays), so that /resume can continue it later."""
        with self._lock:
            run = self._running
        self.transport.stopping.set()
        if run is not None and not run.ended.is_set():
            run.stop_requested.set()
            run.thread.join(timeout_s)

    def _check_idle(self) -> None:
        if self._running is not None and not self._running.ended.is_set():
            raise Busy(self._running.run_id)

    def _launch(self, run: Run) -> None:
        # Its drops counted as each round is stored: read back from the store at the end, the
        # clients of 100 rounds of 10,000 are a million rows, and /status waited seconds for them.
        # (its callers hold self._lock: the tally is taken without it)
        run.on_stored = self._tallies.setdefault(run.run_id, DropTally()).add_round
        run.thread = threading.Thread(target=self._run, args=(run,), name=f"run-{run.run_id}", daemon=True)
        self._running = run
        run.thread.start()

    def wait(self, run_id: int) -> None:
        with self._lock:
            running = self._running
        if running is not None and running.run_id == run_id:
            running.thread.join()

    def running_id(self) -> int | None:
        with self._lock:
            if self._running is not None and not self._running.ended.is_set():
                return self._running.run_id
            return None

    def _run(self, run: Run) -> None:
        try:
            status, error = run.execute()
        except StoreError as e:  # a full disk, a deleted file: the run cannot go on
            log.error("Run %s FAILED: %s", run.run_id, e)
            status, error = "failed", str(e)
        except Exception as e:  # a bug must end the run visibly, not hang it as "running"
            log.exception("run %s crashed", run.run_id)
            status, error = "failed", f"internal error: {type(e).__name__}: {e}"
        try:
            self._record_end(run.run_id, status, error)
        finally:  # from here the run has ended for everyone (a new one may start), though this thread still logs
            run.ended.set()
        self._log_warnings(run.run_id)

    def _log_warnings(self, run_id: int) -> None:
        """"completed" must not hide a client that never took part: the run's
        warnings, in the log. The run has ended (a new one may have started,
        the server may be closing its history): a history it cannot read now
        costs the log those lines, not a traceback from this thread."""
        try:
            warnings = self.warnings(run_id)
        except StoreError as e:
            log.error("Run %s: its warnings cannot be read: %s", run_id, e)
            return
        for warning in warnings:
            log.info("Run %s WARNING: %s", run_id, warning)
        try:
            timeouts = self.timeouts(run_id)
        except StoreError:
            return
        if timeouts is not None:  # the run may read "completed": not silently
            log.warning("Run %s WARNING: %s", run_id, timeouts["message"])

    def _record_end(self, run_id: int, status: str, error: str | None) -> None:
        """Store how the run ended. If the store cannot take it now, the end is
        kept in memory (so /status and /runs tell the truth, and nothing reads
        "running" for ever) and tried again every RECORD_RETRY_S until it can."""
        try:
            self.store.finish(run_id, status, error)
            return
        except StoreError as e:
            log.error("Run %s: its end (%s) cannot be recorded yet: %s", run_id, status, e)
        with self._lock:
            self._unrecorded[run_id] = (status, error)

        def retry() -> None:
            while not self.transport.stopping.wait(RECORD_RETRY_S):
                try:
                    self.store.finish(run_id, status, error)
                except StoreError:
                    continue
                with self._lock:
                    self._unrecorded.pop(run_id, None)
                log.info("Run %s: its end (%s) is recorded now", run_id, status)
                return

        threading.Thread(target=retry, name=f"record-{run_id}", daemon=True).start()

    def truth(self, run: dict[str, Any]) -> dict[str, Any]:
        """A stored run as it really is: one whose end is not recorded yet
        reads its end, not the "running" the store still holds."""
        with self._lock:
            end = self._unrecorded.get(run["run_id"])
        return run if end is None else run | {"status": end[0], "error": end[1]}

    def unrecorded(self) -> dict[int, tuple[str, str | None]]:
        with self._lock:
            return dict(self._unrecorded)

    def warnings(self, run_id: int) -> list[str]:
        """What the run's status does not say: each client dropped from some
        of the rounds it was asked in (see DropTally). Only the rounds stored
        since the last call are counted, by the store (no record is read
        here: a 100,000-round run's first count took 700 MB when it was)."""
        tally = self._tally(run_id)
        with tally.lock:
            tally.add(*self.store.drop_counts(run_id, tally.last_round))
            return tally.warnings()

    def _tally(self, run_id: int) -> DropTally:
        with self._lock:
            return self._tallies.setdefault(run_id, DropTally())


    def timeouts(self, run_id: int) -> dict[str, Any] | None:
        """The run's rounds that lost at least LOUD_SHARE of their sample to
        timeouts (``TimeoutTally.summary``; None: none did), counted from the
        rounds stored since the last call."""
        with self._lock:
            tally = self._timeouts.setdefault(run_id, TimeoutTally())
        with tally.lock:
            tally.add(*self.store.timeout_counts(run_id, tally.last_round))
            if not tally.rounds:
                return None
        found = self.store.summary(run_id)  # (its settings: the advice names the run's timeout)
        return tally.summary(RunSettings.from_json(found["settings"]).client_timeout_s)


WARN_NAMED = 10  # the run's warnings name this many dropped clients, and count the rest


class DropTally:
    """Per client, the rounds it was asked in and the rounds it was dropped
    from, over a run's stored round records (participants and dropped)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_round = 0
        self.names: dict[str, str] = {}  # url → the name it is known by (its URL until it says one)
        self.asked: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.reason: dict[str, str] = {}  # url → why it was last dropped

    def add(self, upto: int, took_part: list[Mapping[str, Any]], dropped: list[Mapping[str, Any]]) -> None:
        """Add the counts of the rounds up to ``upto`` (``RunStore.drop_counts``)."""
        for p in took_part:
            self.names[p["url"]] = p["client_id"]
            self.asked[p["url"]] = self.asked.get(p["url"], 0) + p["rounds"]
        for d in dropped:
            self.names.setdefault(d["url"], d["client_id"])
            self.asked[d["url"]] = self.asked.get(d["url"], 0) + d["rounds"]
            self.dropped[d["url"]] = self.dropped.get(d["url"], 0) + d["rounds"]
            self.reason[d["url"]] = d["reason"]
        self.last_round = upto

    def add_round(self, rec: RoundRecord) -> None:
        """Count a round as it is stored, when it is the next one to count
        (the rounds before it were counted); otherwise the store's counts
        take it in order later. The same counts as ``add`` of the store's
        rows: each participant asked once, each dropped client asked and
        dropped once."""
        with self.lock:
            if rec.round == self.last_round + 1:
                self.add(rec.round, [{"url": p["url"], "client_id": p["client_id"], "rounds": 1}
                                     for p in rec.participants],
                         [{"url": d.url, "client_id": d.client_id, "reason": d.reason, "rounds": 1}
                          for d in rec.dropped])

    def warnings(self) -> list[str]:
        """'client_2 dropped in 2/2 rounds (last: cannot connect: …)', one per
        client dropped at least once, the most dropped first; a client dropped
        from every round says that the model is the other clients' alone. Past
        WARN_NAMED clients, one more line counts the rest by their last reason:
        a host lost, or a dropout rate, drops thousands (each is in its round's
        clients.csv), and a summary of 10,000 lines is no summary."""
        order = sorted(self.dropped, key=lambda url: (-self.dropped[url], self.names[url]))
        lines = []
        for url in order[:WARN_NAMED]:
            d, asked = self.dropped[url], self.asked[url]
            line = f"{self.names[url]} dropped in {d}/{asked} rounds"
            if asked != self.last_round:
                line += " it was sampled for"
            line += f" (last reason: {self.reason[url]})"
            if d == asked:
                line += "; it never took part: the model and the federated MSE are the other clients' alone"
            lines.append(line)
        rest = order[WARN_NAMED:]
        if rest:
            why = Counter(self.reason[url] for url in rest).most_common()
            said = "; ".join(f"{n:,} {reason}" for reason, n in why[:3]) + \
                (f"; {sum(n for _, n in why[3:]):,} for {len(why) - 3} other reason(s)" if len(why) > 3 else "")
            drops = sum(self.dropped[url] for url in rest)
            lines.append(f"and {len(rest):,} more clients dropped from some round, {drops:,} drops in all (by last "
                         f"reason: {said}; each round's clients.csv names them)")
        return lines


def _swapped(recorded: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    """'at URL: client_2 with n_k=2 was recorded, client_9 with n_k=40 answers
    now' for each URL whose client says another name or another n_k than
    the run recorded of it. What either side does not say (a client down
    now, a seed client without /health or a name, n_k under secure
    aggregation) is not compared."""
    out = []
    for url, was in recorded.items():
        said = now.get(url)
        if said is None:
            continue
        name_changed = was["client_id"] != url and said["client_id"] not in (None, was["client_id"])
        size_changed = was["data_size"] is not None and said["data_size"] not in (None, was["data_size"])
        if name_changed or size_changed:
            out.append(f"at {url}: {was['client_id']} with n_k={was['data_size'] or '?'} was recorded, "
                       f"{said['client_id'] or url} with n_k={said['data_size'] or '?'} answers now")
    return out


def _run_key(run: dict[str, Any]) -> str:
    """What names a run to clients that keep state per run: its id and the
    moment it was created, so a new database's run 1 is not an old run 1."""
    return f"{run['run_id']}@{run['created_at']!r}"
