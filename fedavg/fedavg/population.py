"""A population of simulated clients held as arrays, and training many of them
in one vectorised call.

``Population`` holds K clients' rows concatenated, client k's rows being
``X[offsets[k]:offsets[k+1]]`` (n_k = sizes[k] ≥ 1 of them), and each
client's least-squares statistics, x̃ = [x, 1]:

    G_k = X̃_kᵀX̃_k  (K, p, p),   h_k = X̃_kᵀy_k  (K, p),   p = d + 1,

from which full-batch local GD needs no row: ∇L_k(θ) = (2/n_k)·(G_k θ − h_k),
so E epochs cost O(E·p²) per client whatever n_k (``training.local_gd_batch``).
Losses and FedSGD's gradient are taken from the rows (one pass, np.add.reduceat
over the squared residuals): the statistics' form θᵀG θ/n − 2θᵀh/n + yᵀy/n
loses the digits of a loss that is small against yᵀy/n.

Its data is its own draw: ``Population.build(scenario, K, seed)`` draws every
row with one Generator, default_rng(seed), not make_clients' Generator per
client (default_rng([seed, i])), which would cost a million Generators. So a
population and make_clients' clients of the same name, K and seed hold
different numbers from the same distributions; make_clients, the client host
and every figure made with them are unchanged. ``client(k)`` gives client k
as a ``LocalClient`` (or ``Attacker``) on exactly its rows, so the per-client
path can be run on the same data.

A batch: ``train(task, ids, memory)`` answers /train for the clients ``ids``
(distinct, in any order) and gives a ``BatchReply``, B = len(ids) rows of
arrays in the order of ``ids``:

    ids          (B,) int64    the clients, as asked
    n            (B,) int64    n_k as each client states it (lying_n's attackers: 10⁹)
    local.theta  (B, p) float64 or None   W_k, after DP's clip and noise and an attacker's lie
    local.extra  the strategy's other reply fields, by name: a model-shaped
                 field (B, p) float64 (gradient, control_delta), a count (B,)
                 int64 (steps), Exact's statistics as "stats.xtx" (B, p, p)
                 and "stats.xty" (B, p)
    loss_before  (B,) float64  L_k(W_t), from the rows (inf or NaN when W_t is absurd)
    loss_after   (B,) float64  L_k(W_k), the honest W_k's (an attacker lies in what it sends only)
    within_clip  (B,) float64 or None   DP's bit ‖W_k − W_t‖ ≤ S (a DP run without client noise)
    diverged     (B,) bool     the per-client path's 422: a non-finite loss or field

Every array is fixed-width numbers, one row per client: slice 2 can send each
as raw float64/int64 bytes and the server can build one ``Result`` per client
from row j (``reply.local.local(j)``), or sum rows where a rule needs only sums.
The rows of the diverged clients hold whatever the arithmetic gave.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .client import LocalClient
from .privacy import clip_rows
from .scenarios import ATTACKERS, ATTACKS, LYING_N, NOISE, Attacker, poison
from .strategies import STRATEGIES, BatchMemory, ClientTask, LocalBatch
from .strategies.fields import LOCAL_MODEL
from .strict_json import ProtocolError

POPULATION_SCENARIOS = ("iid", "label-shift", "quantity-skew", "byzantine")
LOW, HIGH = 0.0, 5.0  # x ~ U(0, 5), as make_clients draws it
SLOPE, INTERCEPT = 2.0, 1.0  # y = 2x + 1 + noise (label-shift: slope 1 … 3)
SKEW_SIGMA = 1.0  # quantity-skew: n_k = max(1, round(LogNormal(ln samples, 1))), as make_clients


@dataclass(frozen=True)
class BatchReply:
    """What B clients of a population answered to one /train (the module
    docstring gives every field's shape)."""

    ids: np.ndarray
    n: np.ndarray
    local: LocalBatch
    loss_before: np.ndarray
    loss_after: np.ndarray
    within_clip: np.ndarray | None
    diverged: np.ndarray

    @staticmethod
    def concat(replies: list[BatchReply]) -> BatchReply:
        """One reply of the rows of ``replies``, in their order."""
        def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if arrays[0] is None else np.concatenate(arrays)
        first = replies[0].local
        local = LocalBatch(cat([r.local.theta for r in replies]),
                           {name: np.concatenate([r.local.extra[name] for r in replies]) for name in first.extra})
        return BatchReply(*(cat([getattr(r, f) for r in replies]) for f in ("ids", "n")), local,
                          *(cat([getattr(r, f) for r in replies]) for f in ("loss_before", "loss_after",
                                                                             "within_clip", "diverged")))


class Population:
    """K clients as arrays: rows X (rows, d) and y (rows,) concatenated,
    ``offsets`` (K + 1), ``sizes`` n_k (K), the statistics ``xtx`` G_k
    (K, p, p) and ``xty`` h_k (K, p). The first ``attackers`` clients are
    byzantine: honest data, lying replies (scenarios' ``ATTACKS``)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, offsets: np.ndarray, attackers: int = 0,
                 attack: str = "huge", scenario: str = "arrays", first: int = 0) -> None:
        X, y, offsets = np.asarray(X, dtype=float), np.asarray(y, dtype=float), np.asarray(offsets, dtype=np.int64)
        if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
            raise ValueError(f"X: must be (rows, d) with one row per entry of y, got {X.shape} and {y.shape}")
        if offsets.ndim != 1 or len(offsets) < 2:
            raise ValueError("K: a population needs at least one client (offsets of K + 1 entries)")
        sizes = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != len(y) or np.any(sizes < 1):
            raise ValueError("offsets: must run from 0 to the number of rows, each client holding at least one")
        if attack not in ATTACKS:
            raise ValueError(f"attack: unknown attack {attack!r} (known: {', '.join(ATTACKS)})")
        if not 0 <= attackers <= len(sizes):
            raise ValueError(f"attackers: must be 0..K={len(sizes)}, got {attackers}")
        self.X, self.y, self.offsets, self.sizes = X, y, offsets, sizes
        self.attackers, self.attack, self.scenario = attackers, attack, scenario
        # The global index of client 0: a shard of a larger population names its clients by their
        # place in the whole (``shard``), so that they are the same clients whatever the split.
        self.first = first
        self.xtx, self.xty = statistics(X, y, offsets)

    @classmethod
    def build(cls, scenario: str, k: int, seed: int = 0, samples: int = 20, attackers: int = ATTACKERS,
              attack: str = "huge") -> Population:
        """K clients of ``scenario``, every row drawn from one Generator,
        default_rng(seed), in this order: (quantity-skew) the K sizes, then
        x ~ U(0, 5) for all rows, then the noise N(0, 0.1²) for all rows;
        y = s_k·x + 1 + noise.

        - iid: n_k = samples, s_k = 2.
        - label-shift: n_k = samples, s_k = 1 + 2k/(K − 1) (1 … 3), iid's x and noise.
        - quantity-skew: n_k = max(1, round(LogNormal(ln samples, 1))), s_k = 2:
          ``samples`` is the median n_k; the mean is e^{1/2}·samples ≈ 1.65·samples.
        - byzantine: iid's data; the first ``attackers`` clients lie (``attack``).
        """
        if scenario not in POPULATION_SCENARIOS:
            raise ValueError(f"scenario: unknown population scenario {scenario!r} "
                             f"(known: {', '.join(POPULATION_SCENARIOS)})")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"K: a population needs at least one client, got {k!r}")
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"samples: must be a whole number ≥ 1, got {samples!r}")
        rng = np.random.default_rng(seed)
        if scenario == "quantity-skew":
            sizes = np.maximum(1, np.rint(rng.lognormal(math.log(samples), SKEW_SIGMA, size=k))).astype(np.int64)
        else:
            sizes = np.full(k, samples, dtype=np.int64)
        offsets = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        rows = int(offsets[-1])
        x = rng.uniform(LOW, HIGH, size=rows)
        y = rng.normal(0.0, NOISE, size=rows)  # the noise first, then y built on it in place (one array)
        if scenario == "label-shift":
            y += np.repeat(1.0 + 2.0 * np.arange(k) / max(k - 1, 1), sizes) * x
        else:
            y += SLOPE * x
        y += INTERCEPT
        f = attackers if scenario == "byzantine" else 0
        return cls(x[:, None], y, offsets, attackers=f, attack=attack, scenario=scenario)

    @classmethod
    def of(cls, clients: Sequence[LocalClient], scenario: str = "clients") -> Population:
        """The population of exactly these clients' rows, client k being
        ``clients[k]`` (make_clients' clients: the data a client host has
        always served). Its attackers (``Attacker``) must be the first f and
        share one attack, as make_clients makes them."""
        if not clients:
            raise ValueError("clients: a population needs at least one client")
        liars = [isinstance(c, Attacker) for c in clients]
        f = sum(liars)
        if any(liars[f:]) or len({c.attack for c in clients[:f]}) > 1:
            raise ValueError("clients: the attackers must be the first f clients, with one attack")
        offsets = np.zeros(len(clients) + 1, dtype=np.int64)
        np.cumsum([len(c.y) for c in clients], out=offsets[1:])
        return cls(np.vstack([c.X for c in clients]), np.concatenate([c.y for c in clients]), offsets,
                   attackers=f, attack=clients[0].attack if f else "huge", scenario=scenario)

    @property
    def size(self) -> int:
        """K, the number of clients."""
        return len(self.sizes)

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    def rows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Client k's (X, y): views of its rows."""
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.X[a:b], self.y[a:b]

    def client(self, k: int, memory: BatchMemory | None = None) -> LocalClient:
        """Client k as a ``LocalClient`` on exactly its rows (an ``Attacker``
        for the first ``attackers``), named as make_clients names them; with
        ``memory``, its c_k kept in its row of it (``BatchMemory.of``)."""
        k = int(self.check_ids([k], "k")[0])
        X, y = self.rows(k)
        kept = {} if memory is None else {"memory": memory.of(k)}
        if k < self.attackers:
            return Attacker(client_name(self.first + k, True), X, y, attack=self.attack, **kept)
        return LocalClient(client_name(self.first + k, False), X, y, **kept)

    def stated_sizes(self) -> np.ndarray:
        """n_k as each client's own /health states it (K,): its rows, or
        lying_n's 10⁹ for its attackers."""
        stated = self.sizes.copy()
        if self.attack == "lying_n":
            stated[:self.attackers] = LYING_N
        return stated

    def shard(self, i: int, n: int) -> Population:
        """Shard i of n (1-based) of this population: clients
        ⌊(i−1)·K/n⌋ … ⌊i·K/n⌋ − 1, each with exactly its rows, its global
        index (``first``, hence its name) and, for the attackers (the first
        F of the whole), its attack. The same clients with the same data
        whatever n: a split of the whole, not a draw of its own."""
        check_shard(i, n, self.size)
        lo, hi = self.size * (i - 1) // n, self.size * i // n
        a, b = self.offsets[lo], self.offsets[hi]
        return Population(self.X[a:b].copy(), self.y[a:b].copy(), self.offsets[lo:hi + 1] - a,
                          attackers=min(max(self.attackers - lo, 0), hi - lo), attack=self.attack,
                          scenario=self.scenario, first=self.first + lo)

    def clients(self, memory: BatchMemory) -> LazyClients:
        """Every client as ``client(k, memory)``, each built when first asked for."""
        return LazyClients(self, memory)

    def memory(self) -> BatchMemory:
        """An empty memory for every client (SCAFFOLD's c_k), as arrays."""
        return BatchMemory(self.size, self.num_features + 1)

    def check_ids(self, ids: object, path: str = "ids") -> np.ndarray:
        """``ids`` as an int64 array of distinct clients 0..K−1, else one
        ProtocolError naming ``path``."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or len(arr) == 0 or arr.dtype.kind not in "iu":
            raise ProtocolError(f"{path}: must be a non-empty list of client indices (whole numbers)")
        bad = (arr < 0) | (arr >= self.size)
        if np.any(bad):
            raise ProtocolError(f"{path}: client {int(arr[bad][0])} is not in 0..{self.size - 1}")
        arr = arr.astype(np.int64)
        unique, counts = np.unique(arr, return_counts=True)
        if len(unique) != len(arr):
            raise ProtocolError(f"{path}: client {int(unique[counts > 1][0])} is named more than once")
        return arr

    def _gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, starts): the row indices of the clients ``ids`` in their
        order, and where each client's run of them starts (B + 1 entries)."""
        n = self.sizes[ids]
        starts = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(n, out=starts[1:])
        rows = np.repeat(self.offsets[ids] - starts[:-1], n) + np.arange(starts[-1])
        return rows, starts

    def _residuals(self, theta: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """err_i = w_k·x_i + b_k − y_i over the rows of the clients ``ids``,
        θ_k = theta[j] (B, p) for the j-th; with the rows and their starts."""
        rows, starts = self._gather(ids)
        n = self.sizes[ids]
        X = self.X[rows]
        err = np.einsum("ij,ij->i", X, np.repeat(theta[:, :-1], n, axis=0))
        err += np.repeat(theta[:, -1], n)
        err -= self.y[rows]
        return err, X, starts

    def losses(self, theta: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """L_k(θ_k) = 1/n_k Σ_i (w_k·x_i + b_k − y_i)² for each client of
        ``ids``, θ_k = theta[j] (B, p), from the rows."""
        err, _, starts = self._residuals(theta, ids)
        return np.add.reduceat(err * err, starts[:-1]) / self.sizes[ids]

    def evaluate_all(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every client's /evaluate of one model θ at once: (L_k(θ) for k in
        0..K−1, n_k as each states it), L_k = 1/n_k Σ_i (w·x_i + b − y_i)²,
        from the rows in place (no gather: one pass over all of them)."""
        err = self.X @ theta[:-1] + theta[-1] - self.y
        return np.add.reduceat(err * err, self.offsets[:-1]) / self.sizes, self.stated_sizes()

    def gradients(self, theta: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """∇L_k(θ_k) = (2/n_k)·Σ_i x̃_i·err_i (B, p) for each client of
        ``ids``, θ_k = theta[j], from the rows (model.gradients per client)."""
        err, X, starts = self._residuals(theta, ids)
        at = starts[:-1]
        sums = [np.add.reduceat(err * X[:, j], at) for j in range(X.shape[1])] + [np.add.reduceat(err, at)]
        return (2.0 / self.sizes[ids])[:, None] * np.column_stack(sums)

    def train(self, task: ClientTask, ids: object, memory: BatchMemory,
              seeds: Sequence[int] | None = None) -> BatchReply:
        """/train for the clients ``ids`` at once: what ``LocalClient.learn``
        and ``Attacker.train`` do for one, row by row (the strategy's
        ``local_batch``; DP's W_t + clip_S(W_k − W_t) + N(0, s²·I); the losses
        before and after; the attackers' lies), in arrays (``BatchReply``).
        ``seeds``: each client's own config.seed, aligned with ``ids``; only
        mini-batches read it (a shuffle per client), and then each client
        trains with its own seed, one by one."""
        ids = self.check_ids(ids)
        if seeds is not None and task.config.batch_size is not None:
            if len(seeds) != len(ids):
                raise ProtocolError(f"seeds: has {len(seeds)} entries for {len(ids)} clients")
            return BatchReply.concat([self.train(replace(task, config=replace(task.config, seed=int(s))), [k],
                                                 memory) for k, s in zip(ids, seeds)])
        p = self.num_features + 1
        if task.theta.shape != (p,):
            raise ProtocolError(f"global_model: has {len(task.theta)} parameters, the population's model has {p}")
        strategy = STRATEGIES[task.config.strategy]
        at_t = np.broadcast_to(task.theta, (len(ids), p))
        within_clip = None
        # Overflow is possible with a large lr; it is flagged as divergence below, as LocalClient does.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss_before = self.losses(at_t, ids)
            local = strategy.local_batch(task, self, ids, memory)
            if task.config.private and local.theta is not None:
                bound = math.inf if task.config.dp_clip is None else task.config.dp_clip
                if task.config.dp_noise_std == 0:  # the bit only when the client adds no noise (LocalClient.learn)
                    within_clip = (np.linalg.norm(local.theta - task.theta, axis=1) <= bound).astype(float)
                local = replace(local, theta=privatize_batch(local.theta, task.theta, bound,
                                                             task.config.dp_noise_std))
            theta = at_t if local.theta is None else local.theta
            loss_after = self.losses(theta, ids)
            diverged = ~np.isfinite(loss_after) | ~finite_rows(theta)
            for values in local.extra.values():
                diverged |= ~finite_rows(values)
            n = self.sizes[ids].copy()
            local = self._lie(task, ids, local, n, diverged)
        return BatchReply(ids, n, local, loss_before, loss_after, within_clip, diverged)

    def _lie(self, task: ClientTask, ids: np.ndarray, local: LocalBatch, n: np.ndarray,
             diverged: np.ndarray) -> LocalBatch:
        """The attackers' rows of the reply as ``Attacker.train`` sends them:
        lying_n states n_k = 10⁹; every other attack poisons the fields that
        are its update (``poison``), and a poisoned value that is not finite
        is the per-client path's 422 (``diverged``)."""
        liars = ids < self.attackers
        if not np.any(liars):
            return local
        if self.attack == "lying_n":
            n[liars] = LYING_N
            return local
        theta, extra = local.theta, dict(local.extra)
        for sent in STRATEGIES[task.config.strategy].replies:
            if sent.update_from is None:
                continue
            values = (theta if sent is LOCAL_MODEL else extra[sent.name]).copy()
            center = task.theta if sent.update_from == "global" else np.zeros_like(task.theta)
            values[liars] = poison(self.attack, center, values[liars])
            diverged[liars] |= ~finite_rows(values[liars])
            if sent is LOCAL_MODEL:
                theta = values
            else:
                extra[sent.name] = values
        return LocalBatch(theta, extra)


class LazyClients(Sequence[LocalClient]):
    """A population's clients as a sequence, client k at index k: each built
    (``Population.client(k, memory)``) the first time it is asked for, then
    kept, so that its own state (its page's last model, its training slots,
    its secure-aggregation sessions) lasts as a LocalClient's does. A
    million clients cost nothing until they are called; each one called
    costs a LocalClient (views of its rows, no copy) from then on."""

    def __init__(self, population: Population, memory: BatchMemory) -> None:
        self.population, self.memory = population, memory
        self._built: dict[int, LocalClient] = {}
        self._lock = threading.Lock()  # two requests for one client build it once

    def __len__(self) -> int:
        return self.population.size

    def __getitem__(self, k):  # (an int only: the host asks for one client at a time)
        if not isinstance(k, (int, np.integer)) or not 0 <= k < len(self):
            raise IndexError(f"no client {k!r} in 0..{len(self) - 1}")
        with self._lock:
            if k not in self._built:
                self._built[k] = self.population.client(k, self.memory)
            return self._built[k]

    @property
    def built(self) -> int:
        """How many clients have been built so far."""
        return len(self._built)


def client_name(index: int, attacker: bool) -> str:
    """The name client ``index`` (0-based, in the whole population) gives in
    its /health: make_clients' names, attacker_{index+1} or sim_{index+1}."""
    return f"{'attacker' if attacker else 'sim'}_{index + 1}"


def parse_shard(spec: str) -> tuple[int, int]:
    """"i/n" → (i, n), 1 ≤ i ≤ n; else ValueError naming --shard."""
    i, sep, n = spec.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit():
        raise ValueError(f"--shard: must be i/n (this host holds shard i of n, e.g. 1/2), got {spec!r}")
    return int(i), int(n)


def check_shard(i: int, n: int, k: int) -> None:
    """ValueError naming --shard unless 1 ≤ i ≤ n ≤ K (every shard holds a client)."""
    if not 1 <= i <= n:
        raise ValueError(f"--shard: i/n needs 1 ≤ i ≤ n, got {i}/{n}")
    if n > k:
        raise ValueError(f"--shard: {n} shards of {k} clients would leave a shard empty")


def statistics(X: np.ndarray, y: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """G_k = X̃_kᵀX̃_k (K, p, p) and h_k = X̃_kᵀy_k (K, p) over each client's
    rows, x̃ = [x, 1]: (G_k)_ij = Σ_rows x̃_i·x̃_j, (h_k)_i = Σ_rows x̃_i·y,
    by np.add.reduceat over the products, one column pair at a time (a
    rows × p² temporary would cost 4× the rows' memory at d = 1)."""
    d, starts = X.shape[1], offsets[:-1]
    k, p = len(starts), d + 1
    xtx, xty = np.empty((k, p, p)), np.empty((k, p))
    for i in range(d):
        for j in range(i, d):
            xtx[:, i, j] = xtx[:, j, i] = np.add.reduceat(X[:, i] * X[:, j], starts)
        xtx[:, i, d] = xtx[:, d, i] = np.add.reduceat(X[:, i], starts)
        xty[:, i] = np.add.reduceat(X[:, i] * y, starts)
    xtx[:, d, d] = np.diff(offsets)
    xty[:, d] = np.add.reduceat(y, starts)
    return xtx, xty


def privatize_batch(theta: np.ndarray, center: np.ndarray, bound: float, std: float,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """privacy.privatize for each row: W_t + clip_S(W_k − W_t) + N(0, std²·I)
    (``privacy.clip_rows``). The noise, when asked, comes from the system's entropy."""
    out = center + clip_rows(theta - center, bound)
    if std > 0:
        out += (rng or np.random.default_rng()).normal(0.0, std, size=out.shape)
    return out


def finite_rows(values: np.ndarray) -> np.ndarray:
    """(B,) bool: is every number of row j finite? (JSON cannot carry the others.)"""
    if values.dtype.kind in "iu":
        return np.ones(len(values), dtype=bool)
    return np.isfinite(values.reshape(len(values), -1)).all(axis=1)


