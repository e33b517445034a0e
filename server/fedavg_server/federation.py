"""Orchestration: one run of FedAvg rounds over the configured clients.

Each round: sample clients, send them the global model, collect their local
models, take the weighted average. The math lives in ``fedavg.aggregation``;
this module only moves data and records what happened.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np

from fedavg.aggregation import Update, fmt_model, weighted_average, weighted_loss_avg
from fedavg.wire import (ProtocolError, model_json, parse_evaluate_reply, parse_health_reply, parse_train_reply,
                         train_config_json, weights_of)

from .clients import ClientPool, Reply
from .mathlog import loss_line, round_lines
from .runs import RunStore
from .settings import RunSettings

log = logging.getLogger("fedavg.server")


class Busy(Exception):
    """A run is in progress; only one runs at a time."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} is still running")
        self.run_id = run_id


class CannotResume(Exception):
    """The run is not one that can be resumed (it completed, or diverged)."""


class RunStopped(Exception):
    """The run cannot go on; ``status`` says how it ended."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class Federation:
    """The clients, the run history, and at most one run in progress."""

    def __init__(self, pool: ClientPool, store: RunStore) -> None:
        self.pool = pool
        self.store = store
        self._lock = threading.Lock()
        self._running: Run | None = None

    def start(self, settings: RunSettings) -> int:
        """Start a run in the background and return its id; Busy if one runs."""
        with self._lock:
            self._check_idle()
            run_id = self.store.create(settings.to_json(), self.pool.urls, settings.init or {"w": 0.0, "b": 0.0})
            self._launch(Run(run_id, settings, self.pool, self.store))
            return run_id

    def resume(self, run_id: int) -> None:
        """Continue an interrupted (or failed) run from its last completed
        round's global model up to its planned number of rounds."""
        with self._lock:
            self._check_idle()
            run = self.store.summary(run_id)
            if run is None:
                raise KeyError(run_id)
            if run["status"] not in ("interrupted", "failed"):
                raise CannotResume(f"run {run_id} is {run['status']}; only an interrupted or failed run "
                                   "can be resumed")
            settings = RunSettings(**run["settings"])
            if settings.min_clients > len(self.pool.urls):
                # The server may have been restarted with fewer clients.
                raise CannotResume(f"run {run_id} needs min_clients={settings.min_clients}; this server has "
                                   f"{len(self.pool.urls)} client(s)")
            done = run["rounds_completed"]
            self.store.set_status(run_id, "running")
            self._launch(Run(run_id, settings, self.pool, self.store, first_round=done + 1,
                             model=run["current_model"]))

    def feature_counts(self, timeout_s: float = 2.0) -> set[int]:
        """The feature counts the clients' /health replies state (empty when
        none says: seed clients have no /health)."""
        replies = self.pool.call_all(self.pool.urls, "GET", "/health", timeout_s)
        return {n for r in replies if r.ok and (n := parse_health_reply(r.body)["num_features"])}

    def stop(self, run_id: int) -> bool:
        """Ask the running run to stop after its current round; it then reads
        ``interrupted`` and can be resumed. False if it is not running."""
        with self._lock:
            run = self._running
            if run is None or run.run_id != run_id or not run.thread.is_alive():
                return False
            run.stop_requested.set()
            return True

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """The server is stopping: let the running run finish its round and
        record itself ``interrupted``, so that it can be resumed later."""
        with self._lock:
            run = self._running
        if run is not None and run.thread.is_alive():
            run.stop_requested.set()
            run.thread.join(timeout_s)

    def _check_idle(self) -> None:
        if self._running is not None and self._running.thread.is_alive():
            raise Busy(self._running.run_id)

    def _launch(self, run: Run) -> None:
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
            if self._running is not None and self._running.thread.is_alive():
                return self._running.run_id
            return None

    def _run(self, run: Run) -> None:
        try:
            run.execute()
        except Exception as e:  # a bug must end the run visibly, not hang it as "running"
            log.exception("run %s crashed", run.run_id)
            self.store.finish(run.run_id, "failed", f"internal error: {type(e).__name__}: {e}")


class Run:
    """One run: the loop of rounds and the state it carries between them."""

    def __init__(self, run_id: int, settings: RunSettings, pool: ClientPool, store: RunStore,
                 first_round: int = 1, model: dict[str, Any] | None = None) -> None:
        self.run_id = run_id
        self.s = settings
        self.pool = pool
        self.store = store
        self.first_round = first_round
        self.model = model  # where a resumed run picks up; None = settings.init
        self.names = pool.names  # url → client_id, remembered across runs
        self.sizes: dict[str, int] = {}  # url → n_k as its /health reported it
        self.num_features: int | None = None
        self.stop_requested = threading.Event()  # POST /runs/<id>/stop, or the server stopping
        self.thread: threading.Thread | None = None

    def execute(self) -> None:
        s = self.s
        log.info("Run %s: %d round(s) over %d client(s), lr=%g, local_epochs=%d%s%s, seed=%d%s",
                 self.run_id, s.rounds, len(self.pool.urls), s.lr, s.local_epochs,
                 "" if s.batch_size is None else f", batch_size={s.batch_size}",
                 "" if not s.mu else f", mu={s.mu:g}", s.seed,
                 "" if self.first_round == 1 else f" (resumed at round {self.first_round})")
        try:
            self._probe_health()
            w, b = self._initial_model()
            for r in range(self.first_round, s.rounds + 1):
                self._unless_stopped(r)
                w, b = self._round(r, w, b)
                if s.pace_s and r < s.rounds:
                    self.stop_requested.wait(s.pace_s)  # only when the user asked to watch slowly
            self._final_evaluation(s.rounds, w, b)
        except RunStopped as stop:
            log.info("Run %s %s: %s", self.run_id, stop.status.upper(), stop)
            self.store.finish(self.run_id, stop.status, str(stop))
            return
        self.store.finish(self.run_id, "completed")
        log.info("Run %s completed: final global model %s", self.run_id, fmt_model(w, b))

    def _unless_stopped(self, r: int) -> None:
        if self.stop_requested.is_set():
            raise RunStopped("interrupted", f"stopped before round {r} (POST /runs/{self.run_id}/resume "
                                            "continues it)")

    # --- before the first round --------------------------------------------

    def _probe_health(self) -> None:
        """Learn each client's name and feature count from /health. Seed
        clients have no /health; they keep their URL as their name."""
        replies = self.pool.call_all(self.pool.urls, "GET", "/health", min(self.s.client_timeout_s, 5.0))
        dims = set()
        for reply in replies:
            if reply.ok:
                facts = parse_health_reply(reply.body)
                if facts["client_id"]:
                    self.names[reply.url] = facts["client_id"]
                if facts["data_size"]:
                    self.sizes[reply.url] = facts["data_size"]
                if facts["num_features"]:
                    dims.add(facts["num_features"])
        if len(dims) > 1:
            raise RunStopped("failed", f"clients disagree on the number of features: {sorted(dims)}")
        self.num_features = dims.pop() if dims else None

    def _initial_model(self) -> tuple[np.ndarray, float]:
        start = self.model or self.s.init
        if start is None:
            return np.zeros(self.num_features or 1), 0.0
        w = weights_of(start)
        if self.num_features is not None and len(w) != self.num_features:
            raise RunStopped("failed", f"init.w has {len(w)} weight(s) but the clients' data has "
                                       f"{self.num_features} feature(s)")
        return w, float(start["b"])

    # --- one round ----------------------------------------------------------

    def _sample(self, r: int) -> list[str]:
        """This round's clients: all of them, or a seeded random share
        ``max(min_clients, ceil(fraction·K))`` that is the same on every replay."""
        urls = self.pool.urls
        m = min(len(urls), max(self.s.min_clients, math.ceil(self.s.fraction * len(urls) - 1e-9)))
        if m == len(urls):
            return list(urls)
        picked = np.random.default_rng([self.s.seed, r]).choice(len(urls), size=m, replace=False)
        return [urls[i] for i in sorted(picked)]

    def _round(self, r: int, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        sample = self._sample(r)
        # Per-client seeds for mini-batch shuffling, derived from (run seed, round)
        # so a replay of the run shuffles exactly the same way.
        seeds = dict(zip(sample, np.random.SeedSequence([self.s.seed, r]).generate_state(len(sample))))
        model_in = model_json(w, b)

        def body_for(url: str) -> dict[str, Any]:
            return {"global_model": model_in, "round": r,
                    "config": train_config_json(self.s.train_config(int(seeds[url])))}

        replies = self.pool.call_all(sample, "POST", "/train", self.s.client_timeout_s, body_for)
        participants, dropped = [], []
        for reply in replies:
            try:
                participants.append(self._participant(reply))
            except ProtocolError as e:
                dropped.append({"client_id": self.names[reply.url], "url": reply.url, "reason": str(e),
                                "diverged": reply.diverged})

        # The loss each client measured on the incoming model *is* the
        # federated evaluation of the previous round's model: no extra calls.
        if r > 1:  # (after a resume too: round r-1 is in the store)
            self._record_loss(r - 1, [(p["metrics"]["loss_before"], p["data_size"]) for p in participants
                                      if p["metrics"] and "loss_before" in p["metrics"]], "loss_before in round "
                              f"{r}'s replies")

        diverged = [d["client_id"] for d in dropped if d["diverged"]]
        if diverged:
            # A client whose local training blew up says the lr is too large
            # for its data; averaging on without it would only hide that.
            self._log_partial(r, model_in, participants, dropped)
            raise RunStopped("diverged", f"round {r}: local training diverged on {', '.join(diverged)} "
                                         f"(lr={self.s.lr:g} is too large for its data); try a smaller lr")
        if len(participants) < self.s.min_clients:
            self._log_partial(r, model_in, participants, dropped)
            missing = ", ".join(d["url"] + (f" = {d['client_id']}" if d["client_id"] != d["url"] else "")
                                + f" ({d['reason']})" for d in dropped)
            raise RunStopped("failed", f"round {r}: {len(participants)} client(s) replied, min_clients is "
                                       f"{self.s.min_clients}; missing: {missing}")

        new_w, new_b = weighted_average([Update(weights_of(p["local_model"]),
                                                p["local_model"]["b"], p["data_size"]) for p in participants])
        if not (np.all(np.isfinite(new_w)) and math.isfinite(new_b)):
            raise RunStopped("diverged", f"round {r}: the global model is no longer finite "
                                         f"(lr={self.s.lr:g} is too large); try a smaller lr")
        total = sum(p["data_size"] for p in participants)
        record = {
            "round": r,
            "global_model_in": model_in,
            "participants": participants,
            "dropped": [{k: v for k, v in d.items() if k != "diverged"} for d in dropped],
            "N": total,
            "terms": [_term(p, total) for p in participants],
            "global_model": model_json(new_w, new_b),
            "federated_loss": None,  # filled in by the next round, or the final evaluation
            "duration_s": time.perf_counter() - started,  # sampling, the calls and the average
        }
        self.store.add_round(self.run_id, record)
        for line in round_lines(record, self.s.rounds):
            log.info("%s", line)
        return new_w, new_b

    def _participant(self, reply: Reply) -> dict[str, Any]:
        """A reply that can join the average, or ProtocolError saying why not."""
        if not reply.ok:
            raise ProtocolError(reply.reason)
        parsed = parse_train_reply(reply.body, self.num_features)
        said = self.sizes.get(reply.url)
        if said is not None and parsed["data_size"] != said:
            # n_k is the client's vote in the average: a count that changes
            # between /health and /train is not one to trust.
            raise ProtocolError(f"reply.data_size: {parsed['data_size']} differs from the {said} its /health reported")
        if self.num_features is None:
            self.num_features = len(parsed["w"])
        if parsed["client_id"]:
            self.names[reply.url] = parsed["client_id"]
        return {"client_id": self.names[reply.url], "url": reply.url, "data_size": parsed["data_size"],
                "local_model": model_json(parsed["w"], parsed["b"]), "metrics": parsed["metrics"]}

    def _log_partial(self, r: int, model_in: dict, participants: list, dropped: list) -> None:
        log.info("── Round %d/%d ── global model in: %s", r, self.s.rounds, fmt_model(weights_of(model_in), model_in["b"]))
        for p in participants:
            log.info("%s  replied (n_k=%d)", p["client_id"], p["data_size"])
        for d in dropped:
            log.info("%s  DROPPED from this round: %s", d["client_id"], d["reason"])

    # --- federated loss ---------------------------------------------------------

    def _record_loss(self, round_no: int, losses: list[tuple[float, int]], source: str) -> None:
        if not losses:
            log.info("federated MSE of round %d's model: no client reported a loss", round_no)
            return
        loss = weighted_loss_avg(losses)
        if not math.isfinite(loss):
            raise RunStopped("diverged", f"the federated loss of round {round_no}'s model is no longer finite "
                                         f"(lr={self.s.lr:g} is too large); try a smaller lr")
        self.store.set_federated_loss(self.run_id, round_no, loss)
        log.info("%s", loss_line(round_no, [n for _, n in losses], [l for l, _ in losses], loss, source))

    def _final_evaluation(self, round_no: int, w: np.ndarray, b: float) -> None:
        """The last model has no next round to measure it: one /evaluate wave."""
        body = {"global_model": model_json(w, b)}
        replies = self.pool.call_all(self.pool.urls, "POST", "/evaluate", self.s.client_timeout_s,
                                     lambda url: body)
        losses = []
        for reply in replies:
            try:
                if not reply.ok:
                    raise ProtocolError(reply.reason)
                parsed = parse_evaluate_reply(reply.body)
                losses.append((parsed["loss"], parsed["data_size"]))
            except ProtocolError as e:
                log.info("%s  not evaluated: %s", self.names[reply.url], e)
        self._record_loss(round_no, losses, "final /evaluate")


def _term(p: dict[str, Any], total: int) -> dict[str, Any]:
    """One client's share of the average: n_k/N, and n_k/N · w_k, n_k/N · b_k."""
    weight = p["data_size"] / total
    w = weights_of(p["local_model"])
    return {"client_id": p["client_id"], "n_k": p["data_size"], "weight": weight,
            **model_json(weight * w, weight * p["local_model"]["b"])}
