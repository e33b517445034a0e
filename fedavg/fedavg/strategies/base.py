"""What a strategy is made of. ``fedavg.strategies`` lists them.

A strategy answers three questions, one method each, on plain NumPy data:

- ``local`` (client side): from the global model θ_t and its own data, what
  does a client compute and send back?
- ``inputs`` (server side): what does the server send besides θ_t?
- ``aggregate`` (server side): how do the replies become θ_{t+1}, and what
  state does the server carry to the next round?

θ is one vector [w_1 … w_d, b]. The server's state is a dict of NumPy
vectors, stored with every round, so a resumed run goes on exactly where it
stopped; what else a strategy's next step depends on (SCAFFOLD's N) is its
``memo``, stored beside it. A client's state (SCAFFOLD's c_k) lives in its
``RunMemory``.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..model import Theta, as_theta, split
from ..spec import Param
from ..training import TrainConfig, local_gd_batch, local_train
from .combine import Combine
from .fields import LOCAL_MODEL, STATS, Field

if TYPE_CHECKING:  # (population imports the strategies: only the type here)
    from ..population import Population

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Result:
    """One client's reply, as the server keeps it: the only participant record."""

    client_id: str
    url: str
    n: int
    theta: Theta | None  # its local model (None when the strategy sends none back)
    extra: dict[str, Any] = field(default_factory=dict)  # its strategy's other reply fields, by name
    metrics: dict[str, float] | None = None

    def value(self, sent: Field) -> Any:
        return value_of(sent, self.theta, self.extra)


@dataclass(frozen=True)
class Step:
    """What ``aggregate`` produced: the next model, the next state, and the
    lines that write the computation out with its numbers."""

    theta: Theta
    state: State
    trace: list[str]


@dataclass(frozen=True)
class Local:
    """What a client's ``local`` produced: the reply fields of its strategy."""

    theta: Theta | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the strategy's other reply fields, by name

    def value(self, sent: Field) -> Any:
        return value_of(sent, self.theta, self.extra)


def value_of(sent: Field, theta: Theta | None, extra: dict[str, Any]) -> Any:
    """A reply field's value: the local model is ``theta``, every other field is in ``extra``."""
    return theta if sent is LOCAL_MODEL else extra[sent.name]


class RunMemory:
    """What one client remembers between rounds of a run (SCAFFOLD's c_k).

    The value is kept per (run, round): asked before round r, it returns the
    value left by the latest round before r. A round that the server replays
    after a crash therefore starts from exactly the state it started from the
    first time. A restarted client remembers nothing (c_k starts at 0 again).
    Bounded, so a server cannot make a client hold unbounded state.

    ``move_to`` hands the values to another memory, which keeps them from
    then on: a client host keeps its clients' in its population's
    ``BatchMemory``, so that a client has one c_k whether the server calls
    its /train or its host's /batch/train.
    """

    RUNS = 8
    ROUNDS_PER_RUN = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, dict[int, np.ndarray]] = OrderedDict()
        self._moved: RunMemory | None = None  # where the values went (``move_to``)

    def before(self, run: str, round_no: int) -> np.ndarray | None:
        return self._before(run, round_no) if self._moved is None else self._moved.before(run, round_no)

    def after(self, run: str, round_no: int, value: np.ndarray) -> None:
        if self._moved is None:
            self._after(run, round_no, value)
        else:
            self._moved.after(run, round_no, value)

    def kept(self) -> list[tuple[str, int, np.ndarray]]:
        """Every value kept, as (run, round, value): the least recently
        written run first, each run's rounds in order."""
        return self._kept() if self._moved is None else self._moved.kept()

    def move_to(self, other: RunMemory) -> None:
        """Keep this client's values in ``other`` from now on, with those it
        holds now (written in order, so ``other`` keeps what this one kept).
        Done before the client serves: a training meanwhile may be lost."""
        for run, round_no, value in self.kept():
            other.after(run, round_no, value)
        with self._lock:
            self._runs.clear()
        self._moved = other

    def _before(self, run: str, round_no: int) -> np.ndarray | None:
        with self._lock:
            kept = self._runs.get(run, {})
            earlier = [r for r in kept if r < round_no]
            return None if not earlier else kept[max(earlier)].copy()

    def _after(self, run: str, round_no: int, value: np.ndarray) -> None:
        with self._lock:
            kept = self._runs.setdefault(run, {})
            self._runs.move_to_end(run)
            kept[round_no] = value.copy()
            for r in sorted(kept)[: -self.ROUNDS_PER_RUN]:
                del kept[r]
            while len(self._runs) > self.RUNS:
                self._runs.popitem(last=False)

    def _kept(self) -> list[tuple[str, int, np.ndarray]]:
        with self._lock:
            return [(run, r, kept[r].copy()) for run, kept in self._runs.items() for r in sorted(kept)]


class BatchMemory:
    """``RunMemory`` for every client of a population at once, as arrays
    (K × p floats per kept round, not K dicts): SCAFFOLD's c_k.

    The same rule as RunMemory, client by client: per run, each client keeps
    the values of its latest RunMemory.ROUNDS_PER_RUN rounds (a slot each:
    the value and the round that left it); asked before round r, it gives
    the value of the latest kept round before r, so a replayed round starts
    from the state it started from the first time. Arrays are allocated on a
    run's first write; at most RunMemory.RUNS runs are kept."""

    EMPTY = -1  # the round of a slot that holds nothing (rounds are ≥ 0)
    SLOTS = RunMemory.ROUNDS_PER_RUN

    def __init__(self, size: int, dim: int) -> None:
        self.size, self.dim = size, dim
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # run → (values, rounds)

    def lookup(self, run: str, round_no: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values (B, p), found (B,)): each client's value of its latest kept
        round before ``round_no`` (0 where it has none)."""
        with self._lock:
            if run not in self._runs:
                return np.zeros((len(ids), self.dim)), np.zeros(len(ids), dtype=bool)
            values, rounds = self._runs[run]
            kept = rounds[ids]  # (B, SLOTS)
            eligible = (kept != self.EMPTY) & (kept < round_no)
            latest = np.argmax(np.where(eligible, kept, self.EMPTY - 1), axis=1)
            found = eligible.any(axis=1)
            out = values[ids, latest]
        return np.where(found[:, None], out, 0.0), found

    def before(self, run: str, round_no: int, ids: np.ndarray) -> np.ndarray:
        """c_k before round ``round_no`` for each client of ``ids`` (B, p); 0 if none."""
        return self.lookup(run, round_no, ids)[0]

    def after(self, run: str, round_no: int, ids: np.ndarray, values: np.ndarray) -> None:
        """Keep ``values`` (B, p) as the clients' value left by round ``round_no``:
        in the slot of that round if kept, else in place of the oldest (an
        empty slot's round, −1, is the oldest) when it is older than this one."""
        with self._lock:
            if run not in self._runs:
                self._runs[run] = (np.zeros((self.size, self.SLOTS, self.dim)),
                                   np.full((self.size, self.SLOTS), self.EMPTY, dtype=np.int64))
            self._runs.move_to_end(run)
            kept_values, rounds = self._runs[run]
            kept = rounds[ids]
            same = kept == round_no
            oldest = np.argmin(kept, axis=1)
            slot = np.where(same.any(axis=1), np.argmax(same, axis=1), oldest)
            # RunMemory keeps the latest rounds: one older than all it keeps is dropped at once
            write = same.any(axis=1) | (kept[np.arange(len(ids)), oldest] < round_no)
            kept_values[ids[write], slot[write]] = values[write]
            rounds[ids[write], slot[write]] = round_no
            while len(self._runs) > RunMemory.RUNS:
                self._runs.popitem(last=False)

    def kept(self, k: int) -> list[tuple[str, int, np.ndarray]]:
        """Client k's values as ``RunMemory.kept`` lists them."""
        with self._lock:
            out = []
            for run, (values, rounds) in self._runs.items():
                for slot in np.argsort(rounds[k]):
                    if rounds[k, slot] != self.EMPTY:
                        out.append((run, int(rounds[k, slot]), values[k, slot].copy()))
            return out

    def of(self, k: int) -> ClientMemory:
        """Client k's memory as the one-client ``local`` reads it."""
        return ClientMemory(self, k)


class ClientMemory(RunMemory):
    """One client's row of a ``BatchMemory``, as a ``RunMemory``: what
    ``local`` is given when a batch falls back to the per-client loop, and
    where a hosted client's own /train keeps its values (``move_to``)."""

    def __init__(self, batch: BatchMemory, k: int) -> None:
        super().__init__()
        self.batch, self.k, self.ids = batch, k, np.array([k])

    def _before(self, run: str, round_no: int) -> np.ndarray | None:
        value, found = self.batch.lookup(run, round_no, self.ids)
        return value[0] if found[0] else None

    def _after(self, run: str, round_no: int, value: np.ndarray) -> None:
        self.batch.after(run, round_no, self.ids, np.asarray(value, dtype=float)[None, :])

    def _kept(self) -> list[tuple[str, int, np.ndarray]]:
        return self.batch.kept(self.k)


@dataclass(frozen=True)
class LocalBatch:
    """What ``local_batch`` produced for B clients: ``Local``'s fields, one
    row per client. ``theta`` (B, p) the local models, or None when the
    strategy sends none; ``extra`` its other reply fields by name, each an
    array with the clients on axis 0: a model-shaped field (B, p), a count
    (B,) int64, and Exact's statistics as two arrays, "stats.xtx" (B, p, p)
    and "stats.xty" (B, p)."""

    theta: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def local(self, j: int) -> Local:
        """The j-th client's ``Local``, as its own ``local`` would have given it."""
        extra: dict[str, Any] = {}
        for name, values in self.extra.items():
            if name.startswith(STATS.name + "."):
                extra.setdefault(STATS.name, {})[name.split(".", 1)[1]] = values[j]
            elif values.dtype.kind == "i":
                extra[name] = int(values[j])
            else:
                extra[name] = values[j]
        return Local(None if self.theta is None else self.theta[j], extra)

    @staticmethod
    def stack(locals_: Sequence[Local]) -> LocalBatch:
        """The batch of B one-client ``Local``s (the per-client loop's result)."""
        first = locals_[0]
        theta = None if first.theta is None else np.stack([lo.theta for lo in locals_])
        extra: dict[str, np.ndarray] = {}
        for name, value in first.extra.items():
            if isinstance(value, dict):  # Exact's statistics: one array per sum
                for part in value:
                    extra[f"{name}.{part}"] = np.stack([lo.extra[name][part] for lo in locals_])
            else:
                extra[name] = np.array([lo.extra[name] for lo in locals_])
        return LocalBatch(theta, extra)


@dataclass(frozen=True)
class ClientTask:
    """Everything a client is asked to do in one round, parsed from /train."""

    theta: Theta
    round: int | None
    config: TrainConfig
    inputs: dict[str, np.ndarray]  # what the strategy sends besides θ_t (SCAFFOLD's c), by field name
    deadline: float | None = None  # time.monotonic() after which the server no longer waits

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class Strategy(ABC):
    """The base: FedAvg's client side (plain local GD), no server state."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: the update and where it comes from
    params: ClassVar[tuple[Param, ...]] = ()
    replies: ClassVar[tuple[Field, ...]] = (LOCAL_MODEL,)  # what a client's reply holds (``fields``)
    sends: ClassVar[tuple[Field, ...]] = ()  # what the server sends besides θ_t (``inputs``)
    uses_mu: ClassVar[bool] = False  # its clients take FedProx's proximal term
    # Its server step starts from the average of the local models, all that
    # DP-FedAvg's noised average and secure aggregation's sum give the server.
    averages_models: ClassVar[bool] = False
    combines: ClassVar[bool] = True  # it combines vectors with the run's rule, so a robust rule applies
    one_round: ClassVar[bool] = False  # its first round gives the answer: a run of it is one round unless asked
    # Its clients' local steps are gradient descent on their own loss (+ FedProx's term): a client
    # whose loss grows over them is diverging at this lr (the server's diagnosis relies on it).
    descends_own_loss: ClassVar[bool] = True

    def __init__(self, lr: float = 0.01, num_clients: int = 1, combine: Combine = Combine(),
                 sizes: Mapping[str, int] | None = None, clients: Sequence[str] = (), **values: float) -> None:
        self.lr = lr  # the run's lr (FedSGD's server step uses it)
        self.num_clients = num_clients  # K, every client configured
        # their URLs: the run's own sequence, not a copy (a population's million are made when asked for)
        self.clients = clients
        # url → n_k of every client configured, as its /health said (the run's
        # roster, filled before round 1): SCAFFOLD's c is weighted over all of them.
        # A mapping with counted(clients) → (Σ n_k, the clients without one) sums
        # itself (a hosted population's arrays: no walk over a million clients).
        self.sizes: Mapping[str, int] = {} if sizes is None else sizes
        self.combine = combine  # FedAvg's weighted average, or a robust rule
        self.p = {param.name: float(values.get(param.name, param.default)) for param in self.params}

    def initial_state(self, theta: Theta) -> State:
        return {}

    def inputs(self, state: State) -> dict[str, np.ndarray]:
        """What the server sends besides θ_t, by the names ``sends`` declares."""
        return {}

    @abstractmethod
    def aggregate(self, theta: Theta, results: list[Result], state: State) -> Step:
        """θ_{t+1} and the next state from θ_t, the replies and the state."""

    def memo(self) -> dict[str, Any]:
        """What its next step depends on besides the state's vectors, as JSON
        (SCAFFOLD: the N its c is divided by, and the clients not counted in
        it yet). Stored with every round beside the state, and given back by
        ``resume``, so that a resumed run goes on exactly. {} for most."""
        return {}

    def resume(self, memo: Mapping[str, Any] | None, clients: Sequence[str]) -> None:
        """Pick up ``memo`` from the last stored round of a resumed run.
        ``clients``: the URLs the run had when it was stored (this server's
        may differ, when resumed with {"clients": "current"}). None: the
        record has none (it was written before strategies kept one)."""

    @classmethod
    def gives_optimum(cls, params: dict[str, float]) -> bool:
        """Is its model, with these settings, the pooled least-squares optimum θ*
        of the clients it took? (A chart can then measure every run against it.)"""
        return False

    @classmethod
    def update_of(cls, result: Result, theta: Theta) -> np.ndarray | None:
        """Δ_k, what the client's reply moves the model by: W_k − W_t, or the
        gradient it sent; None when it sends no update (exact's statistics)."""
        for sent in cls.replies:
            if sent.update_from == "global":
                return result.value(sent) - theta
            if sent.update_from == "zero":
                return result.value(sent)
        return None

    # --- the client side -------------------------------------------------------

    @classmethod
    def local(cls, task: ClientTask, X: np.ndarray, y: np.ndarray, memory: RunMemory) -> Local:
        w, b = local_train(*split(task.theta), X, y, task.config, stop=task.past_deadline)
        return Local(as_theta(w, b))

    @classmethod
    def local_batch(cls, task: ClientTask, population: Population, ids: np.ndarray,
                    memory: BatchMemory) -> LocalBatch:
        """``local`` for the clients ``ids`` of a population at once.

        FedAvg's full-batch local GD (this base ``local``, which FedProx and
        the FedOpt family inherit) runs vectorised on the clients' statistics
        (``local_gd_batch``). Anything else runs ``local`` client by client
        on the client's own rows and memory, so every strategy is served and
        gives exactly its own ``local``'s answer: a strategy that overrides
        ``local`` (one of the docs' own, say) is never given FedAvg's batch
        by inheritance; mini-batches (batch_size set) need the rows and a
        shuffle per client. The strategies with a vectorised form of their
        own override this."""
        if cls.local.__func__ is Strategy.local.__func__ and task.config.batch_size is None:
            return LocalBatch(local_gd_batch(task.theta, population.xtx[ids], population.xty[ids],
                                             population.sizes[ids], task.config))
        return cls.local_each(task, population, ids, memory)

    @classmethod
    def local_each(cls, task: ClientTask, population: Population, ids: np.ndarray,
                   memory: BatchMemory) -> LocalBatch:
        """The per-client loop: ``local`` on each client's rows, stacked."""
        return LocalBatch.stack([cls.local(task, *population.rows(k), memory.of(k)) for k in ids])
