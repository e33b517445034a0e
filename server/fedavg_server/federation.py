"""Orchestration: one run of federated rounds over the configured clients.

Each round: sample clients, send them the global model, collect their
replies, let the strategy turn them into the next global model. The math
lives in ``fedavg.strategies``; this module only moves data and records what
happened.
"""
from __future__ import annotations

import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedavg.aggregation import outliers, update_norms, weighted_loss_avg
from fedavg.model import Theta, as_theta, split
from fedavg.privacy import DPAverage, adapt_clip, client_noise_std, noise_std
from fedavg.strategies import CannotCombine, Result, State, Step, Strategy
from fedavg.strict_json import ProtocolError, model_json, parse_model
from fedavg.trace import fmt, fmt_theta
from fedavg.wire import CannotDo, parse_evaluate_reply, parse_health_reply, parse_train_reply, train_config_json

from .mathlog import loss_line, round_lines
from .runs import RoundRecord, RunStore, StoreError
from .settings import RunSettings, sampled_per_round
from .transport import Reply, Transport

if TYPE_CHECKING:
    from .secure import SecureSum

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


class RunStopped(Exception):
    """The run cannot go on; ``status`` says how it ended."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class Federation:
    """The clients, the run history, and at most one run in progress."""

    def __init__(self, transport: Transport, store: RunStore) -> None:
        self.transport = transport
        self.store = store
        self._lock = threading.Lock()
        self._running: Run | None = None
        self._tallies: dict[int, DropTally] = {}  # run id → its drops, read incrementally
        # run id → (status, error) of a run that ended while the store could not
        # record it; the truth until a retry records it (see _record_end).
        self._unrecorded: dict[int, tuple[str, str | None]] = {}

    def start(self, settings: RunSettings) -> int:
        """Start a run in the background and return its id; Busy if one runs."""
        with self._lock:
            self._check_idle()
            run_id = self.store.create(settings.to_json(), self.transport.urls, settings.init or {"w": 0.0, "b": 0.0})
            self._launch(Run(run_id, settings, self.transport, self.store, key=_run_key(self.store.summary(run_id))))
            return run_id

    def resume(self, run_id: int, current_clients: bool = False) -> None:
        """Continue an interrupted (or failed) run from its last completed
        round's global model up to its planned number of rounds, with the
        clients it ran with. A server restarted with other clients refuses,
        saying the difference, unless ``current_clients``: then the run goes
        on with this server's clients, and records them."""
        with self._lock:
            self._check_idle()
            run = self.store.summary(run_id)
            if run is None:
                raise NoSuchRun(run_id)
            if run["status"] not in ("interrupted", "failed"):
                raise CannotResume(f"run {run_id} is {run['status']}; only an interrupted or failed run "
                                   "can be resumed")
            settings = RunSettings(**run["settings"])
            if settings.min_clients > len(self.transport.urls):
                # The server may have been restarted with fewer clients.
                raise CannotResume(f"run {run_id} needs min_clients={settings.min_clients}; this server has "
                                   f"{len(self.transport.urls)} client(s)")
            if run["clients"] != self.transport.urls:
                gone = [u for u in run["clients"] if u not in self.transport.urls]
                new = [u for u in self.transport.urls if u not in run["clients"]]
                if not current_clients:
                    change = (f"no longer here: {', '.join(gone[:6]) or 'none'}{' …' if len(gone) > 6 else ''}; "
                              f"new here: {', '.join(new[:6]) or 'none'}{' …' if len(new) > 6 else ''}"
                              if gone or new else "the same clients in another order (sampling follows the order)")
                    raise CannotResume(
                        f"run {run_id} ran with other clients than this server's: {change}; resume with "
                        '{"clients": "current"} to go on with this server\'s clients (recorded in the run)')
                self.store.set_clients(run_id, self.transport.urls)
                log.info("Run %s resumes with this server's clients: %d gone, %d new", run_id, len(gone), len(new))
            done = run["rounds_completed"]
            self.store.set_status(run_id, "running")
            self._launch(Run(run_id, settings, self.transport, self.store, first_round=done + 1,
                             model=run["current_model"], state=self.store.server_state(run_id),
                             key=_run_key(run)))

    def feature_counts(self, timeout_s: float = 2.0) -> set[int]:
        """The feature counts the clients' /health replies state (empty when
        none says: seed clients have no /health)."""
        replies = self.transport.call_all(self.transport.urls, "GET", "/health", timeout_s)
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

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """The server is stopping: calls still out to clients are given up on
        at once, and the running run records itself ``interrupted`` (its last
        completed round stays), so that /resume can continue it later."""
        with self._lock:
            run = self._running
        self.transport.stopping.set()
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
            status, error = run.execute()
        except StoreError as e:  # a full disk, a deleted file: the run cannot go on
            log.error("Run %s FAILED: %s", run.run_id, e)
            status, error = "failed", str(e)
        except Exception as e:  # a bug must end the run visibly, not hang it as "running"
            log.exception("run %s crashed", run.run_id)
            status, error = "failed", f"internal error: {type(e).__name__}: {e}"
        self._record_end(run.run_id, status, error)
        # "completed" must not hide a client that never took part.
        for warning in self.warnings(run.run_id):
            log.info("Run %s WARNING: %s", run.run_id, warning)

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
        since the last call are read."""
        with self._lock:
            tally = self._tallies.setdefault(run_id, DropTally())
        with tally.lock:
            found = self.store.get(run_id, since=tally.last_round)
            if found is None:
                return []
            tally.add(found["rounds"])
            return tally.warnings()


class Run:
    """One run: the loop of rounds and the state it carries between them."""

    def __init__(self, run_id: int, settings: RunSettings, transport: Transport, store: RunStore,
                 first_round: int = 1, model: dict[str, Any] | None = None, state: State | None = None,
                 key: str = "") -> None:
        self.run_id = run_id
        self.s = settings
        self.transport = transport
        self.store = store
        self.first_round = first_round
        self.model = model  # where a resumed run picks up; None = settings.init
        self.strategy: Strategy = settings.make_strategy(len(transport.urls))
        self.state = state  # the strategy's state after the last stored round; None = its initial state
        self.key = key  # names the run to clients that keep state per run
        self.names = transport.names  # url → client_id, remembered across runs
        self.sizes: dict[str, int] = {}  # url → n_k as its /health reported it
        self.num_features: int | None = None
        self.stop_requested = threading.Event()  # POST /runs/<id>/stop, or the server stopping
        self.thread: threading.Thread | None = None
        # The last round's outliers that alone explain a leap (the others moved
        # as trained models do): a lead when the next round blows up.
        self.culprits: list[dict[str, Any]] = []
        self.jump = 1.0  # ‖θ_{t+1}‖ / ‖θ_t‖ of the last round: a sudden leap is no learning rate's doing

    def execute(self) -> tuple[str, str | None]:
        """Run the rounds; return how the run ended: (status, error or None)."""
        s = self.s
        log.info("Run %s: %s, %d round(s) over %d client(s), lr=%g, local_epochs=%d%s%s%s, seed=%d%s",
                 self.run_id, s.strategy, s.rounds, len(self.transport.urls), s.lr, s.local_epochs,
                 "" if s.batch_size is None else f", batch_size={s.batch_size}",
                 "" if not s.mu else f", mu={s.mu:g}",
                 "".join(f", {k}={v:g}" for k, v in (s.params or {}).items()), s.seed,
                 "" if self.first_round == 1 else f" (resumed at round {self.first_round})")
        log.info("%s: %s", s.strategy, self.strategy.summary)
        if s.robust:
            log.info("robust rule in place of the average: %s", ", ".join(f"{k}={v}" for k, v in s.robust.items()))
        if s.dp:
            log.info("DP-FedAvg: W_{t+1} = W_t + (Σ_k clip_S(W_k − W_t) + N(0, σ²S²)) / M with σ=%g, S=%s, M=q·K=%g, "
                     "δ=%g%s%s%s", s.dp["noise_multiplier"], "∞" if s.dp["clip"] is None else f"{s.dp['clip']:g}",
                     s.dp["expected"], s.dp["delta"],
                     "" if s.dp["target_epsilon"] is None else f", budget ε ≤ {s.dp['target_epsilon']:g}",
                     ", noise added by the clients" if s.dp["local_noise"] else "",
                     "" if not s.dp["adaptive"] else ", adaptive S: " + ", ".join(
                         f"{k}={v:g}" for k, v in s.dp["adaptive"].items()))
        try:
            self._probe_health()
            theta = self._initial_model()
            if self.state is None:
                self.state = self.strategy.initial_state(theta)
            for r in range(self.first_round, s.rounds + 1):
                self._unless_stopped(r)
                self._within_budget(r)
                theta = self._round(r, theta)
                if s.pace_s and r < s.rounds:
                    self.stop_requested.wait(s.pace_s)  # only when the user asked to watch slowly
            self._final_evaluation(s.rounds, theta)
        except RunStopped as stop:
            log.info("Run %s %s: %s", self.run_id, stop.status.upper(), stop)
            return stop.status, str(stop)
        log.info("Run %s completed: final global model %s", self.run_id, fmt_theta(theta))
        return "completed", None

    def _unless_server_stopping(self, r: int) -> None:
        if self.transport.stopping.is_set():
            raise RunStopped("interrupted", f"the server stopped during round {r}; the rounds before it are "
                                            f"kept (POST /runs/{self.run_id}/resume continues it)")

    def _unless_stopped(self, r: int) -> None:
        if self.stop_requested.is_set():
            raise RunStopped("interrupted", f"stopped before round {r} (POST /runs/{self.run_id}/resume "
                                            "continues it)")

    # --- before the first round --------------------------------------------

    def _probe_health(self) -> None:
        """Learn each client's name and feature count from /health, and make
        sure every client that answers can run the strategy. Seed clients have
        no /health; they keep their URL as their name, and can run FedAvg only."""
        replies = self.transport.call_all(self.transport.urls, "GET", "/health", min(self.s.client_timeout_s, 5.0))
        dims, unable, unmasked = set(), [], []
        for reply in replies:
            facts = parse_health_reply(reply.body) if reply.ok else None
            if facts is not None:
                if facts["client_id"]:
                    self.names[reply.url] = facts["client_id"]
                if facts["data_size"]:
                    self.sizes[reply.url] = facts["data_size"]
                if facts["num_features"]:
                    dims.add(facts["num_features"])
            # A client that is down may come back; one that answers must say it can.
            answered = reply.ok or reply.status is not None
            can = (facts or {}).get("strategies") or ()
            if self.s.strategy != "fedavg" and answered and self.s.strategy not in can:
                why = "its /health does not list it" if reply.ok else "no /health"
                unable.append(f"{self.names[reply.url]} ({why})")
            if self.s.secagg and answered and not (facts or {}).get("secagg"):
                unmasked.append(self.names[reply.url])
        if unable:
            raise RunStopped("failed", f"before round 1: strategy {self.s.strategy} is not one these clients can "
                                       f"run: {', '.join(unable)}; nothing was averaged")
        if unmasked:
            raise RunStopped("failed", f"before round 1: {', '.join(unmasked)} cannot do secure aggregation (its "
                                       "/health does not say secagg: true); nothing was sent")
        if len(dims) > 1:
            raise RunStopped("failed", f"clients disagree on the number of features: {sorted(dims)}")
        self.num_features = dims.pop() if dims else None

    def _initial_model(self) -> Theta:
        start = self.model or self.s.init
        if start is None:
            return np.zeros((self.num_features or 1) + 1)
        theta = as_theta(*parse_model(start, "init"))
        if self.num_features is not None and len(theta) != self.num_features + 1:
            raise RunStopped("failed", f"init.w has {len(theta) - 1} weight(s) but the clients' data has "
                                       f"{self.num_features} feature(s)")
        return theta

    def _within_budget(self, r: int) -> None:
        """A DP run with a budget stops before the round that would overspend it."""
        dp = self.s.dp
        if not dp or dp["target_epsilon"] is None:
            return
        spent, next_eps = (self._epsilon(n) for n in (r - 1, r))
        if next_eps > dp["target_epsilon"]:
            raise RunStopped("budget_exhausted", f"round {r} would bring ε to {next_eps:.4g}, past the budget "
                                                 f"target_epsilon = {dp['target_epsilon']:g} (δ = {dp['delta']:g}); "
                                                 f"{r - 1} round(s) spent ε = {spent:.4g}")

    def _epsilon(self, rounds: int) -> float:
        from .accountant import epsilon  # dp-accounting (with SciPy) only for runs that use it
        return epsilon(self.s.fraction, self.s.dp["noise_multiplier"], rounds, self.s.dp["delta"])

    # --- one round ----------------------------------------------------------

    def _round(self, r: int, theta: Theta) -> Theta:
        """One round of the strategy: the clients' work, then the server's step."""
        started = time.perf_counter()
        sample = self._sample(r)
        if self.s.secagg:
            results, dropped, secure = self._secure_replies(r, theta, sample)
        else:
            replies = self.transport.call_all(sample, "POST", "/train", self.s.client_timeout_s,
                                         self._train_bodies(r, theta, sample))
            self._unless_server_stopping(r)
            (results, dropped), secure = self._sort_replies(r, replies), None
        self._record_loss(r - 1, results)  # the loss each client measured on θ_t is round r−1's federated loss
        self._enough_replies(r, theta, results, dropped, len(sample), secure)
        suspects, culprits = self._outliers(theta, results)
        step = self._aggregate(r, theta, results)
        self._finite(r, step, culprits)
        privacy = None
        if self.s.dp:
            step, privacy = self._private_step(r, theta, results, step)
        self._store(RoundRecord(r, self.s.strategy, theta, results, dropped, step, time.perf_counter() - started,
                                suspects, privacy, secure))
        self.state, self.culprits = step.state, culprits
        before, after = update_norms([theta, step.theta])
        self.jump = after / max(before, 1.0)
        return step.theta

    def _secure_replies(self, r: int, theta: Theta, sample: list[str]) \
            -> tuple[list[Result], list[dict[str, Any]], SecureSum]:
        """The round's clients' work under secure aggregation: the server
        learns Σ_k x_k = [Σ w_k·θ_k, Σ w_k, Σ n_k·L_k, N, Σ bit_k] and gives the
        strategy that sum as one reply: the average θ̄ = Σ w_k·θ_k / Σ w_k
        with weight N = Σ w_k (for DP-FedAvg, θ_t + Σ_k Δ_k: it divides by M
        itself), and the federated loss as its loss_before."""
        from .secure import SecureRoundFailed, secure_sum  # cryptography: only for runs that use it
        d = self.num_features or len(theta) - 1
        # A fresh session each attempt: a round restarted after a crash gets fresh keys.
        session = f"{self.key or self.run_id}|round {r}|{secrets.token_hex(8)}"
        bodies = self._train_bodies(r, theta, sample)
        try:
            secure = secure_sum(self.transport, sample, self.names, session, self.s.secagg["threshold"],
                                self.s.secagg["scale_bits"], d + 5, self.s.client_timeout_s, bodies,
                                self.s.secagg.get("neighbors"))
        except SecureRoundFailed as e:
            self._unless_server_stopping(r)
            raise RunStopped("failed", f"round {r}: {e}") from None
        self._unless_server_stopping(r)
        total = secure.total
        weight = float(total[d + 1])
        mean = total[: d + 1] / weight
        model = theta + (total[: d + 1] - weight * theta) if self.s.dp else mean
        secure.trace.append(f"θ̄ = Σ w_k·θ_k / Σ w_k = [{', '.join(fmt(v) for v in mean)}] over Σ w_k = {fmt(weight)}"
                            + (f"; DP-FedAvg goes on from θ_t + Σ_k Δ_k = [{', '.join(fmt(v) for v in model)}]"
                               if self.s.dp else ""))
        metrics = {"loss_before": float(total[d + 2] / total[d + 3]), "within_clip": float(total[d + 4])}
        label = f"the secure sum of {len(secure.survivors)} clients"
        return [Result(label, "", max(1, round(weight)), model, {}, metrics)], secure.dropped, secure

    def _secure_evaluation(self, round_no: int, theta: Theta, body: dict[str, Any]) -> None:
        from .secure import SecureRoundFailed, secure_sum
        d = len(theta) - 1
        session = f"{self.key or self.run_id}|evaluation|{secrets.token_hex(8)}"
        try:
            total = secure_sum(self.transport, self.transport.urls, self.names, session, self.s.secagg["threshold"],
                               self.s.secagg["scale_bits"], d + 5, self.s.client_timeout_s,
                               lambda url: {**body, "evaluate": True}, self.s.secagg.get("neighbors")).total
        except SecureRoundFailed as e:
            log.info("federated MSE of round %d's model: not measured: %s", round_no, e)
            return
        self._save_loss(round_no, [(float(total[d + 2] / total[d + 3]), max(1, round(float(total[d + 3]))))],
                        "a secure sum of n_k·L_k over the clients")

    def _aggregate(self, r: int, theta: Theta, results: list[Result]) -> Step:
        if self.s.dp:
            # DP-FedAvg's clipped, noised average in place of the strategy's own,
            # with this round's clip bound S (adaptive clipping moves it).
            dp = self.s.dp
            self.strategy.combine = DPAverage(self._clip_bound(), dp["update_noise_multiplier"], dp["expected"],
                                              local=dp["local_noise"])
        try:
            return self.strategy.aggregate(theta, results, self.state)
        except CannotCombine as e:
            raise RunStopped("failed", f"round {r}: {e}") from None

    def _clip_bound(self) -> float:
        """This round's S: the setting, or where adaptive clipping left it (kept in the server state)."""
        if self.state and "dp_clip" in self.state:
            return float(self.state["dp_clip"][0])
        return math.inf if self.s.dp["clip"] is None else self.s.dp["clip"]

    def _private_step(self, r: int, theta: Theta, results: list[Result], step: Step) -> tuple[Step, dict[str, Any]]:
        """The round's privacy record (ε spent so far, the clip bound and the
        noise it used) and, with adaptive clipping, the next round's S."""
        dp, bound, spent = self.s.dp, self._clip_bound(), self._epsilon(r)
        record = {"epsilon": spent if math.isfinite(spent) else None,  # None: ∞, no noise (JSON has no ∞)
                  "delta": dp["delta"], "target_epsilon": dp["target_epsilon"],
                  "clip": None if math.isinf(bound) else bound, "noise_multiplier": dp["noise_multiplier"],
                  "update_noise_multiplier": dp["update_noise_multiplier"],
                  "noise_std": noise_std(dp["update_noise_multiplier"], bound, dp["expected"]),
                  "expected_clients": dp["expected"]}
        trace = [*step.trace, f"privacy: ε = {spent:.6g} spent after {r} round(s) at δ = {dp['delta']:g}"
                 + ("" if dp["target_epsilon"] is None else f" (budget {dp['target_epsilon']:g})")]
        state = {k: v for k, v in step.state.items() if k != "dp_clip"}
        if dp["adaptive"]:
            a = dp["adaptive"]
            # Each client's bit (its update fit under S before it clipped); a client that
            # did not say is counted from what it sent.
            unclipped = sum((x.metrics or {}).get("within_clip", float(np.linalg.norm(x.theta - theta) <= bound))
                            for x in results if x.theta is not None)
            new_bound, share = adapt_clip(bound, unclipped, dp["expected"], a["target_quantile"], a["lr"],
                                          a["count_noise"])
            record |= {"unclipped_share": share, "next_clip": new_bound}
            state["dp_clip"] = np.array([new_bound])
            trace.append(f"adaptive clip: b̄ = (unclipped + N(0, σ_b²)) / M = {share:.6g}; S ← S·exp(−η(b̄ − γ)) = "
                         f"{bound:.6g}·exp(−{a['lr']:g}·({share:.6g} − {a['target_quantile']:g})) = {new_bound:.6g}")
        return Step(step.theta, state, trace), record

    def _outliers(self, theta: Theta, results: list[Result]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The clients whose update (W_k − W_t, or the gradient they sent) is
        far larger than the others': flagged under any aggregator, FedAvg too.
        Also those of them that alone explain a leap of the model: outliers
        while every other client moved as trained models do (by less than
        CALM × (‖W_t‖ + 1)); when all move wildly, the lr is the likelier cause."""
        updates = [self.strategy.update_of(r, theta) for r in results]
        if any(u is None for u in updates) or len(updates) < 2:
            return [], []  # exact sends statistics, not an update
        norms = update_norms(updates)
        flagged = [(k, ratio) for k, ratio in outliers(norms) if np.isfinite(norms[k]) and np.isfinite(ratio)]
        suspects = [{"client_id": results[k].client_id, "url": results[k].url, "update_norm": float(norms[k]),
                     "ratio": ratio} for k, ratio in flagged]
        others = [n for k, n in enumerate(norms) if k not in {j for j, _ in flagged}]
        calm = bool(others) and max(others) <= CALM * (update_norms([theta])[0] + 1)
        # A client whose own loss grew while it trained is diverging at this
        # lr on its own data: honest, and the lr's doing.
        culprits = [x for (k, _), x in zip(flagged, suspects) if not _loss_grew(results[k])]
        return suspects, culprits if calm else []

    def _sample(self, r: int) -> list[str]:
        """This round's clients: all of them, or a seeded random share
        ``max(min_clients, ceil(fraction·K))`` that is the same on every replay.
        A DP run samples each client with probability q = fraction on its own
        (Poisson sampling, what its accountant assumes) from the system's
        entropy: a sample the seed could replay would be no secret."""
        urls = self.transport.urls
        if self.s.dp and self.s.fraction < 1:
            draw = random.SystemRandom()
            return [url for url in urls if draw.random() < self.s.fraction]
        m = sampled_per_round(self.s, len(urls))
        if m == len(urls):
            return list(urls)
        picked = np.random.default_rng([self.s.seed, r]).choice(len(urls), size=m, replace=False)
        return [urls[i] for i in sorted(picked)]

    def _train_bodies(self, r: int, theta: Theta, sample: list[str]) -> Callable[[str], dict[str, Any]]:
        """url → its /train body: θ_t, the round, its config, and what the
        strategy sends besides. Per-client seeds for mini-batch shuffling come
        from (run seed, round), so a replay of the run shuffles the same way."""
        seed_of = dict(zip(sample, np.random.SeedSequence([self.s.seed, r]).generate_state(len(sample))))
        common = {"global_model": model_json(*split(theta)), "round": r,
                  **{k: model_json(*split(v)) for k, v in self.strategy.inputs(self.state).items()}}
        key = self.key if self.s.strategy != "fedavg" else None
        private = {}
        if self.s.dp:  # what each client does to its model before sending it: clip, and its share of the noise
            dp, bound = self.s.dp, self._clip_bound()
            private = {"dp_clip": None if math.isinf(bound) else bound,
                       "dp_noise_std": (client_noise_std(dp["update_noise_multiplier"], bound, dp["expected"])
                                        if dp["local_noise"] else 0.0)}
        return lambda url: {**common, "config": train_config_json(self.s.train_config(int(seed_of[url]), key,
                                                                                      **private))}

    def _sort_replies(self, r: int, replies: list[Reply]) -> tuple[list[Result], list[dict[str, Any]]]:
        """The replies that can join the aggregate, and the clients dropped with
        their reasons. A client that ran another strategy fails the run: its
        numbers mean something else, and nothing is averaged."""
        results, dropped = [], []
        for reply in replies:
            try:
                results.append(self._result(reply))
            except CannotDo as e:
                raise RunStopped("failed", f"round {r}: {self.names[reply.url]} cannot run strategy "
                                           f"{self.s.strategy}: {e}; nothing was averaged") from None
            except ProtocolError as e:
                dropped.append({"client_id": self.names[reply.url], "url": reply.url, "reason": str(e),
                                "diverged": reply.diverged})
        return results, dropped

    def _result(self, reply: Reply) -> Result:
        """A reply that can join the aggregate, or ProtocolError saying why not."""
        if not reply.ok:
            raise ProtocolError(reply.reason)
        parsed = parse_train_reply(reply.body, self.num_features, self.s.strategy)
        said = self.sizes.get(reply.url)
        if said is not None and parsed["data_size"] != said:
            # n_k is the client's vote in the average: a count that changes
            # between /health and /train is not one to trust.
            raise ProtocolError(f"reply.data_size: {parsed['data_size']} differs from the {said} its /health reported")
        if self.num_features is None and parsed["theta"] is not None:
            self.num_features = len(parsed["theta"]) - 1
        if parsed["client_id"]:
            self.names[reply.url] = parsed["client_id"]
        return Result(self.names[reply.url], reply.url, parsed["data_size"], parsed["theta"], parsed["extra"],
                      parsed["metrics"])

    def _enough_replies(self, r: int, theta: Theta, results: list[Result], dropped: list[dict[str, Any]],
                        sampled: int, secure: SecureSum | None = None) -> None:
        diverged = [d["client_id"] for d in dropped if d["diverged"]]
        if diverged:
            # A client whose local training blew up: averaging on without it
            # would only hide why. Which was it: the lr, mu, or a model that
            # was already absurd when it arrived?
            self._log_partial(r, theta, results, dropped)
            raise RunStopped("diverged", f"round {r}: local training diverged on {', '.join(diverged)}: "
                                         f"{self._why_diverged(r, theta)}")
        # (A DP round may sample fewer than min_clients, or none: its release is then mostly noise.)
        replied = len(secure.survivors) if secure else len(results)
        if replied < (min(self.s.min_clients, sampled) if self.s.dp else self.s.min_clients):
            self._log_partial(r, theta, results, dropped)
            missing = ", ".join(d["url"] + (f" = {d['client_id']}" if d["client_id"] != d["url"] else "")
                                + f" ({d['reason']})" for d in dropped)
            raise RunStopped("failed", f"round {r}: {replied} client(s) replied, min_clients is "
                                       f"{self.s.min_clients}; missing: {missing}")

    def _finite(self, r: int, step: Step, culprits: list[dict[str, Any]]) -> None:
        if np.all(np.isfinite(step.theta)):
            return
        if culprits:
            raise RunStopped("diverged", f"round {r}: the aggregate is no longer finite: {_named(culprits)}; an "
                                         "outlier, not the lr: a robust aggregator (median, trimmed_mean, krum) or "
                                         "clip_norm would hold")
        raise RunStopped("diverged", f"round {r}: the global model is no longer finite "
                                     f"(lr={self.s.lr:g} is too large); try a smaller lr")

    def _why_diverged(self, r: int, theta: Theta) -> str:
        """The likeliest cause of a client's local training blowing up."""
        size = float(np.max(np.abs(theta)))
        if size > ABSURD and r == self.first_round:
            return f"the starting model has a weight of {size:.3g}, too large for any lr"
        if size > ABSURD and self.jump > SUDDEN and self.culprits:
            return (f"it started from a global model with a weight of {size:.3g}, {self.jump:.3g}× the one before, "
                    f"which round {r - 1}'s aggregate took from {_named(self.culprits)}: an outlier, not the lr; "
                    "a robust aggregator (median, trimmed_mean, krum) or clip_norm would hold")
        if self.s.mu and self.s.mu * self.s.lr >= 2:
            return f"mu={self.s.mu:g} is too large for lr={self.s.lr:g} (lr·mu ≥ 2 overshoots); try a smaller mu"
        return f"lr={self.s.lr:g} is too large for its data; try a smaller lr"

    def _store(self, record: RoundRecord) -> None:
        for d in record.dropped:
            d.pop("diverged", None)
        stored = self.store.add_round(self.run_id, record)
        # One record, one write: a line-by-line log costs a write (and a
        # wake-up of whoever reads the pipe) per line, every round.
        log.info("%s", "\n".join(round_lines(stored, self.s.rounds)))

    def _log_partial(self, r: int, theta: Theta, results: list[Result], dropped: list[dict[str, Any]]) -> None:
        log.info("── Round %d/%d ── global model in: %s", r, self.s.rounds, fmt_theta(theta))
        for p in results:
            log.info("%s  replied (n_k=%d)", p.client_id, p.n)
        for d in dropped:
            log.info("%s  DROPPED from this round: %s", d["client_id"], d["reason"])

    # --- federated loss ---------------------------------------------------------

    def _record_loss(self, round_no: int, results: list[Result]) -> None:
        """Round ``round_no``'s federated loss from the loss_before each client
        measured on that round's model: no extra calls. (After a resume too:
        round_no is in the store.)"""
        if round_no < 1:
            return
        self._save_loss(round_no, [(p.metrics["loss_before"], p.n) for p in results
                                   if p.metrics and "loss_before" in p.metrics],
                        f"loss_before in round {round_no + 1}'s replies")

    def _save_loss(self, round_no: int, losses: list[tuple[float, int]], source: str) -> None:
        if not losses:
            log.info("federated MSE of round %d's model: no client reported a loss", round_no)
            return
        loss = weighted_loss_avg(losses)
        if not math.isfinite(loss):
            raise RunStopped("diverged", f"the federated loss of round {round_no}'s model is no longer finite "
                                         f"(lr={self.s.lr:g} is too large); try a smaller lr")
        self.store.set_federated_loss(self.run_id, round_no, loss)
        log.info("%s", loss_line(round_no, [n for _, n in losses], [x for x, _ in losses], loss, source))

    def _final_evaluation(self, round_no: int, theta: Theta) -> None:
        """The last model has no next round to measure it: one /evaluate wave
        (under secure aggregation, one secure sum of n_k·L_k and n_k)."""
        body = {"global_model": model_json(*split(theta))}
        if self.s.secagg:
            self._secure_evaluation(round_no, theta, body)
            return
        replies = self.transport.call_all(self.transport.urls, "POST", "/evaluate", self.s.client_timeout_s,
                                     lambda url: body)
        if self.transport.stopping.is_set():
            raise RunStopped("interrupted", "the server stopped during the final evaluation (POST "
                                            f"/runs/{self.run_id}/resume finishes it)")
        losses = []
        for reply in replies:
            try:
                if not reply.ok:
                    raise ProtocolError(reply.reason)
                parsed = parse_evaluate_reply(reply.body)
                losses.append((parsed["loss"], parsed["data_size"]))
            except ProtocolError as e:
                log.info("%s  not evaluated: %s", self.names[reply.url], e)
        self._save_loss(round_no, losses, "final /evaluate")


class DropTally:
    """Per client, the rounds it was asked in and the rounds it was dropped
    from, counted over stored round records (participants and dropped)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_round = 0
        self.names: dict[str, str] = {}  # url → the name it is known by (its URL until it says one)
        self.asked: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.reason: dict[str, str] = {}  # url → why it was last dropped

    def add(self, rounds: list[dict[str, Any]]) -> None:
        for record in rounds:
            for p in record["participants"]:
                self.names[p["url"]] = p["client_id"]
                self.asked[p["url"]] = self.asked.get(p["url"], 0) + 1
            for d in record["dropped"]:
                self.names.setdefault(d["url"], d["client_id"])
                self.asked[d["url"]] = self.asked.get(d["url"], 0) + 1
                self.dropped[d["url"]] = self.dropped.get(d["url"], 0) + 1
                self.reason[d["url"]] = d["reason"]
            self.last_round = max(self.last_round, record["round"])

    def warnings(self) -> list[str]:
        """'client_2 dropped in 2/2 rounds (last: cannot connect: …)', one per
        client dropped at least once; a client dropped from every round says
        that the model is the other clients' alone."""
        lines = []
        for url, d in self.dropped.items():
            asked = self.asked[url]
            line = f"{self.names[url]} dropped in {d}/{asked} rounds"
            if asked != self.last_round:
                line += " it was sampled for"
            line += f" (last reason: {self.reason[url]})"
            if d == asked:
                line += "; it never took part: the model and the federated MSE are the other clients' alone"
            lines.append(line)
        return lines


# A weight this large is no model anyone trained: the sign of an attack or a
# typo, not of a learning rate (the largest double is ~1.8e308).
ABSURD = 1e100
# A model that grows this much in one round was pushed, not trained: an lr
# too large grows it by a steady factor a round, far less than this.
SUDDEN = 1e6
# An honest client's update moves the model by at most this many times its
# size (+1); an lr too large moves every client's by far more.
CALM = 10.0


def _loss_grew(result: Result) -> bool:
    m = result.metrics or {}
    return "loss_before" in m and "loss_after" in m and m["loss_after"] > m["loss_before"]


def _named(suspects: list[dict[str, Any]]) -> str:
    return ", ".join(f"{x['client_id']} (update norm {x['update_norm']:.3g}, {x['ratio']:.3g}× the others')"
                     for x in suspects[:6])


def _run_key(run: dict[str, Any]) -> str:
    """What names a run to clients that keep state per run: its id and the
    moment it was created, so a new database's run 1 is not an old run 1."""
    return f"{run['run_id']}@{run['created_at']!r}"
