"""One run: the loop of rounds, Algorithm 1 of McMahan et al. (2017).

    for each round t = 1, 2, …:
        S_t ← a sample of the clients
        for each client k ∈ S_t:  W_k ← ClientUpdate(k, W_t)
        W_{t+1} ← the strategy's step from the replies (FedAvg: Σ_k n_k/N · W_k)

A collector gathers the round's replies (each client's /train, or the
secure sum of them); stages own what the features add around it (the
diagnosis of what goes wrong; DP-FedAvg's sampling, clipping, noise and
budget). ``pipeline`` picks them from the run's settings, once: the loop
below has no branch for any feature. The math is in ``fedavg.strategies``;
this module only moves data and records what happened.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedavg.aggregation import weighted_loss_avg
from fedavg.model import Theta, as_theta, split
from fedavg.strategies import STRATEGIES, CannotCombine, Combine, State, Step, Strategy
from fedavg.strict_json import model_json, parse_model
from fedavg.trace import fmt_theta
from fedavg.wire import train_config_json

from .collect import BatchedCollector, Bodies, Collected, Collector, PlainCollector, RoundFailed, SecureCollector
from .diagnosis import Diagnosis
from .dp import Privacy
from .mathlog import loss_line, opening_lines, partial_round_lines, round_lines
from .records import RoundRecord, state_of
from .roster import Roster, Unfit
from .runs import RunStore
from .sampling import Sampler, SeededSample
from .settings import RunSettings
from .stage import RunStopped, Stage
from .timeouts import TimeoutWatch
from .transport import Transport

log = logging.getLogger("fedavg.server")


def pipeline(s: RunSettings, roster: Roster, first_round: int, name: str, batched: bool = True) \
        -> tuple[Strategy, Sampler, Collector, list[Stage]]:
    """The strategy, the sampler, the collector and the stages a run's
    settings ask for: every choice a feature makes, made here once.
    ``batched``: the server may call a client host once for all its clients
    (the server's --per-client turns it off)."""
    stages: list[Stage] = []
    combine: Any = s.robust or Combine()
    sampler: Sampler = SeededSample(s.fraction, s.min_clients, s.seed)
    if s.dp:
        privacy = Privacy(s.dp, s.fraction, s.min_clients)
        combine, sampler = privacy.aggregator, privacy.sampler
        stages.append(privacy)
    # roster.sizes is filled by the probe before round 1: the strategy reads it then (SCAFFOLD's N).
    strategy = STRATEGIES[s.strategy](lr=s.lr, num_clients=len(roster.urls), combine=combine, sizes=roster.sizes,
                                      clients=roster.urls, **(s.params or {}))
    # Secure aggregation sums masked vectors client by client. Otherwise one call per client host, for
    # the clients whose host batches; DP too: every sampled client's config is the same (S, and the share
    # of noise σ·S/√n the round's sample size gives each), and the host clips and draws each client's
    # share from its own entropy row by row, as each client does on its own.
    plain = PlainCollector(roster, strategy, s.client_timeout_s)
    collector: Collector = (SecureCollector(roster, strategy, s.client_timeout_s, s.secagg, name) if s.secagg
                            else BatchedCollector(plain) if batched else plain)
    # The timeouts' count first (it says a round lost clients even when the round then fails); the
    # diagnosis next: a model that is no longer finite is named before anything is written of it.
    return strategy, sampler, collector, [TimeoutWatch(s.client_timeout_s, roster.transport),
                                          Diagnosis(strategy, s, first_round), *stages]


class Run:
    """One run: the loop of rounds and the state it carries between them."""

    def __init__(self, run_id: int, settings: RunSettings, transport: Transport, store: RunStore,
                 first_round: int = 1, model: dict[str, Any] | None = None, last: dict[str, Any] | None = None,
                 key: str = "", clients_then: list[str] | None = None, batched: bool = True) -> None:
        self.run_id, self.s, self.store = run_id, settings, store
        self.first_round = first_round
        self.model = model  # where a resumed run picks up; None = settings.init
        self.key = key  # names the run to clients that keep state per run
        # (clients_then: the URLs ``last`` was stored with, when this server's differ)
        self.roster = Roster(transport)
        self.strategy, self.sampler, self.collector, self.stages = pipeline(settings, self.roster, first_round,
                                                                            key or str(run_id), batched)
        self.state: State | None = None  # the strategy's state after the last stored round
        if last is not None:  # a resumed run: each part picks up where the last stored round left it
            # (records written before the privacy stage kept its S in the strategy's state, as dp_clip)
            self.state = {k: v for k, v in (state_of(last.get("server_state")) or {}).items() if k != "dp_clip"}
            self.strategy.resume(last.get("server_memo"), self.roster.urls if clients_then is None else clients_then)
            for stage in self.stages:
                stage.resume(last)
        self.stop_requested = threading.Event()  # POST /runs/<id>/stop, or the server stopping
        self.ended = threading.Event()  # its end is recorded: it no longer holds the federation
        self.thread: threading.Thread | None = None
        # Told of each round once it is stored (the federation counts its drops as it goes)
        self.on_stored: Callable[[RoundRecord], None] | None = None

    def execute(self) -> tuple[str, str | None]:
        """Run the rounds; return how the run ended: (status, error or None)."""
        s = self.s
        log.info("%s", "\n".join(opening_lines(self.run_id, s, len(self.roster.urls), self.first_round,
                                                [self.strategy.summary, *(st.describe() for st in self.stages)])))
        try:
            self._probe()
            theta = self._initial_model()
            if self.state is None:
                self.state = self.strategy.initial_state(theta)
            for r in range(self.first_round, s.rounds + 1):
                self._unless_stopped(r)
                theta = self._round(r, theta)
                if s.pace_s and r < s.rounds:
                    self.stop_requested.wait(s.pace_s)  # only when the user asked to watch slowly
            self._final_evaluation(s.rounds, theta)
        except RunStopped as stop:
            log.info("Run %s %s: %s", self.run_id, stop.status.upper(), stop)
            return stop.status, str(stop)
        log.info("Run %s completed: final global model %s", self.run_id, fmt_theta(theta))
        return "completed", None

    def _round(self, r: int, theta: Theta) -> Theta:
        """S_t ← a sample; W_k ← ClientUpdate(k, W_t) for k ∈ S_t; W_{t+1} ← the strategy's step."""
        started = time.perf_counter()
        for stage in self.stages:
            stage.before(r)
        sample = self.sampler.draw(r, self.roster.urls)
        for stage in self.stages:
            stage.drawn(r, sample)
        got = self._collect(r, theta, sample)
        self._record_loss(r - 1, got.losses, f"loss_before in round {r}'s replies",  # measured on θ_t
                          len(got.losses) if got.loss_clients is None else got.loss_clients)
        try:
            for stage in self.stages:
                stage.received(r, theta, got)
            self._enough(r, got, self.sampler.needed(len(sample)))
        except RunStopped:  # the round as far as it got, before the reason
            log.info("%s", "\n".join(partial_round_lines(r, self.s.rounds, theta, got.results, got.dropped)))
            raise
        try:
            step = self.strategy.aggregate(theta, got.results, self.state)
        except CannotCombine as e:
            raise RunStopped("failed", f"round {r}: {e}") from None
        step = Step(step.theta, step.state, [*got.trace, *step.trace])  # the collector's lines (an unmasking) first
        parts: dict[str, Any] = {}
        for stage in self.stages:
            step, mine = stage.after(r, theta, got, step)
            parts |= mine
        suspicious = parts.pop("suspicious", [])
        memo = self.strategy.memo()  # stored beside server_state: what a resumed run's next step needs too
        if memo:
            parts["server_memo"] = memo
        record = RoundRecord(r, self.s.strategy, theta, step, got.participants, got.dropped, got.N, got.terms,
                             time.perf_counter() - started, suspicious, parts | got.parts)
        for stage in self.stages:
            record = stage.redact(record)
        self._store(record)
        self.state = step.state
        return step.theta

    def _collect(self, r: int, theta: Theta, sample: list[str]) -> Collected:
        """The sampled clients' work on θ_t: each is sent θ_t, the round, its
        config (with a per-client seed for mini-batches from (run seed, round),
        so a replay shuffles the same way) and what the strategy sends besides."""
        seed_of = dict(zip(sample, np.random.SeedSequence([self.s.seed, r]).generate_state(len(sample)).tolist()))
        inputs = self.strategy.inputs(self.state)
        common = {"global_model": model_json(*split(theta)), "round": r,
                  **{f.name: f.kind.to_json(inputs[f.name]) for f in self.strategy.sends}}
        extra = {k: v for stage in self.stages for k, v in stage.config().items()}
        try:
            got = self.collector.collect(r, theta, sample, Bodies(common, lambda seed: train_config_json(
                self.s.train_config(seed, self.key, **extra)), seed_of))
        except RoundFailed as e:
            self._unless_server_stopping(r)
            raise RunStopped("diverged" if e.diverged else "failed", f"round {r}: {e}") from None
        self._unless_server_stopping(r)
        return got

    def _enough(self, r: int, got: Collected, needed: int) -> None:
        if got.contributors < needed:
            missing = ", ".join(d.url + (f" = {d.client_id}" if d.client_id != d.url else "") + f" ({d.reason})"
                                for d in got.dropped)
            raise RunStopped("failed", f"round {r}: {got.contributors} client(s) replied, min_clients is "
                                       f"{self.s.min_clients}; missing: {missing}")

    def _probe(self) -> None:
        try:
            self.roster.probe(type(self.strategy), bool(self.s.secagg), self.s.client_timeout_s)
        except Unfit as e:
            raise RunStopped("failed", str(e)) from None

    def _initial_model(self) -> Theta:
        start = self.model or self.s.init
        features = self.roster.num_features
        if start is None:
            return np.zeros((features or 1) + 1)
        theta = as_theta(*parse_model(start, "init"))
        if features is not None and len(theta) != features + 1:
            raise RunStopped("failed", f"init.w has {len(theta) - 1} weight(s) but the clients' data has "
                                       f"{features} feature(s)")
        return theta

    def _unless_server_stopping(self, r: int) -> None:
        if self.roster.transport.stopping.is_set():
            raise RunStopped("interrupted", f"the server stopped during round {r}; the rounds before it are "
                                            f"kept (POST /runs/{self.run_id}/resume continues it)")

    def _unless_stopped(self, r: int) -> None:
        if self.stop_requested.is_set():
            raise RunStopped("interrupted", f"stopped before round {r} (POST /runs/{self.run_id}/resume "
                                            "continues it)")

    # --- what is written down -------------------------------------------------

    def _store(self, record: RoundRecord) -> None:
        stored = self.store.add_round(self.run_id, record)
        if self.on_stored is not None:
            self.on_stored(record)
        # One record, one write: a line-by-line log costs a write (and a
        # wake-up of whoever reads the pipe) per line, every round.
        if log.isEnabledFor(logging.INFO):
            log.info("%s", "\n".join(round_lines(stored, self.s.rounds)))

    def _record_loss(self, round_no: int, losses: list[tuple[float, int]], source: str, clients: int) -> None:
        """Round ``round_no``'s federated loss L = Σ n_k/N · L_k, from the
        losses ``clients`` clients measured on its model: no extra calls.
        (After a resume too: round_no is in the store.) Written down unless a
        stage withholds it; the stages measure it either way."""
        if round_no < 1:
            return
        if not losses:
            log.info("federated MSE of round %d's model: no client reported a loss", round_no)
            return
        loss = weighted_loss_avg(losses)
        withheld = next((why for stage in self.stages if (why := stage.withholds_loss(clients))), None)
        if math.isfinite(loss) and not withheld:  # first: a stage that ends the run on it quotes it
            self.store.set_federated_loss(self.run_id, round_no, loss)
        for stage in self.stages:
            stage.measured(round_no, loss)
        if withheld:
            log.info("federated MSE of round %d's model: not recorded: %s", round_no, withheld)
        elif log.isEnabledFor(logging.INFO):
            for stage in self.stages:
                losses = stage.losses_written(losses)
            log.info("%s", loss_line(round_no, [n for _, n in losses], [x for x, _ in losses], loss, source))

    def _final_evaluation(self, round_no: int, theta: Theta) -> None:
        """The last model has no next round to measure it: one evaluation by the collector."""
        try:
            losses, source, clients = self.collector.evaluate(theta)
        except RoundFailed as e:
            log.info("federated MSE of round %d's model: not measured: %s", round_no, e)
            return
        if self.roster.transport.stopping.is_set():
            raise RunStopped("interrupted", "the server stopped during the final evaluation (POST "
                                            f"/runs/{self.run_id}/resume finishes it)")
        self._record_loss(round_no, losses, source, clients)
