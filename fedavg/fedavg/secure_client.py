"""A client's side of secure aggregation: the steps of Bonawitz et
al.'s protocol (``fedavg.secagg``), in one session per round, each taking
its request's body (``fedavg.http.secure_routes`` serves them).

    POST /secagg/advertise  train on θ_t, keep the input x_k; send two public keys and b_commit
                            (with "evaluate": true, no training: x_k = [0, 0, n_k·L_k, n_k, 0],
                            the final model's federated loss)
    POST /secagg/share      its neighbourhood's keys in (all the others' in the complete graph);
                            shares of s_sk_k and b_k out, sealed to each neighbour
    POST /secagg/receive    the shares sealed to this client in; {"opened": count} out, or
                            {"bad_shares": {j: why}, "c_sk": c_sk_k}: the senders whose shares
                            do not open, and the key that lets the server check it
    POST /secagg/masked     who of its neighbourhood shared keys in; y_k = x_k + masks out
    POST /secagg/unmask     who of its neighbourhood survived in; shares of their b_j and of the
                            dropped ones' s_sk_j out

Each step stops, and answers 408, once the server no longer waits: its
X-Deadline-S has passed, or it has hung up (``Deadline``); nothing of a
stopped step is kept.

The input is x_k = [w_k·θ_k, w_k, n_k·L_k, n_k, bit_k] with w_k = n_k (1 when
the server asks for "equal_weights": DP-FedAvg's), L_k the loss of θ_t on this client's
data and bit_k always 0 (the slot is kept so that the input's layout does not change;
a count of clipped updates in the clear would be the server's to read, and adaptive
clipping, which would need it, is refused where clients add the noise): the server
learns Σ w_k·θ_k, Σ w_k, Σ n_k·L_k and N, i.e. the average and the federated loss,
and no single client's. A session lives in memory
only, and only for the last few rounds: a client restarted mid-round has
none, and the server starts that round again with fresh keys.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .strict_json import ProtocolError, expect_bool, expect_int, expect_object, expect_str
from .wire import SECAGG_SCALE_RANGE

if TYPE_CHECKING:
    from .client import LocalClient
    from .secagg import SecAggClient

log = logging.getLogger("fedavg.client")
MAX_SESSIONS = 4  # rounds a client keeps state for at once: a server cannot make it hold more
MAX_SESSION_NAME = 200
TRAIN_FIELDS = ("global_model", "round", "config")


@dataclass(frozen=True)
class Deadline:
    """When the server stops waiting for a step: ``seconds`` after ``start``
    (its X-Deadline-S; None: it did not say), or as soon as ``hung_up()``
    says it closed the connection, which a request still queued in a busy
    client host learns only that way (the HTTP server can tell)."""

    seconds: float | None
    hung_up: Callable[[], bool] | None = None
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def passed(self) -> bool:
        return self.why() is not None

    def why(self) -> str | None:
        """Why the server no longer waits, or None while it does."""
        left = self.left()
        if left is not None and left <= 0:
            return "the server's deadline passed"
        return "the server hung up" if self.hung_up is not None and self.hung_up() else None


class Sessions:
    """Session name → (SecAggClient, its input x_k); the oldest is forgotten past MAX_SESSIONS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[SecAggClient, np.ndarray]] = OrderedDict()

    def start(self, name: str, client: SecAggClient, x: np.ndarray) -> None:
        with self._lock:
            if name in self._open:
                raise ProtocolError(f"session: {name[:40]!r} has already begun on this client; a new round "
                                    "needs a new session (its keys must be fresh)")
            self._open[name] = (client, x)
            while len(self._open) > MAX_SESSIONS:
                self._open.popitem(last=False)

    def get(self, name: str) -> tuple[SecAggClient, np.ndarray]:
        with self._lock:
            found = self._open.get(name)
        if found is None:
            raise ProtocolError(f"session: no session {name[:40]!r} on this client (never advertised here, "
                                "or forgotten: a client keeps the last few)")
        return found


def secure_input(theta: np.ndarray, weight: float, n: int, loss: float, bit: float) -> np.ndarray:
    """x_k = [w_k·θ_k, w_k, n_k·L_k, n_k, bit_k]: what the server may learn the sum of."""
    return np.concatenate([weight * theta, [weight, n * loss, n, bit]])


def advertise(client: LocalClient, body: Any, deadline: Deadline) -> tuple[dict[str, Any], int]:
    """Step 0: train on θ_t (or, with "evaluate", only measure its loss), keep
    the input x_k, and send two public keys and b_commit. Training stops at
    the deadline, as /train's does."""
    from . import secagg  # cryptography and pycryptodome: only for clients that are asked
    obj = expect_object(body, "", ("session", "index", "threshold", "scale_bits", "evaluate", "equal_weights",
                                   *TRAIN_FIELDS), ("session", "index", "threshold", "global_model"))
    name = _session_name(obj)
    equal = expect_bool(obj.get("equal_weights", False), "equal_weights")
    if deadline.passed():
        return _stopped(client, "advertise", deadline, secagg.Stopped("stopped before it began"))
    task = client.task({k: obj[k] for k in TRAIN_FIELDS if k in obj}, deadline.left())

    def work() -> tuple[dict[str, Any], int]:
        n = len(client.y)
        if expect_bool(obj.get("evaluate", False), "evaluate"):
            loss = client.loss(task.theta, "/secagg/advertise", task.round)
            if not math.isfinite(loss):
                return {"error": "loss is not finite for this model", "diverged": True}, 422
            x = secure_input(np.zeros_like(task.theta), 0.0, n, loss, 0.0)
        else:
            learned = client.learn(task, "/secagg/advertise")
            if isinstance(learned, tuple):  # diverged: the 422 as /train says it
                return learned
            # bit_k is always 0: the server would learn the exact count of clipped updates from the sum,
            # and nothing uses it (adaptive clipping is refused where the clients add the noise, which
            # secure aggregation with DP requires).
            x = secure_input(learned.theta, 1.0 if equal else float(n), n,
                             learned.metrics.get("loss_before") or 0.0, 0.0)
        party = _protocol(lambda: secagg.SecAggClient(
            expect_int(obj["index"], "index", ge=1), name.encode(), expect_int(obj["threshold"], "threshold"),
            expect_int(obj.get("scale_bits", secagg.SCALE_BITS), "scale_bits", ge=SECAGG_SCALE_RANGE[0],
                       le=SECAGG_SCALE_RANGE[1])))
        client.sessions.start(name, party, x)
        return {"client_id": client.client_id, "keys": secagg.to_wire(party.advertise()), "length": len(x)}, 200
    return client.guarded(task, work)


def share(client: LocalClient, body: Any, deadline: Deadline) -> tuple[dict[str, Any], int]:
    """Step 1: its neighbourhood's keys in; Shamir shares of s_sk_k and b_k out, each sealed to its holder."""
    from . import secagg
    obj = expect_object(body, "", ("session", "peers"), ("session", "peers"))
    party, _ = client.sessions.get(_session_name(obj))
    peers = _protocol(lambda: secagg.indexed_from_wire(obj["peers"], "peers", secagg.keys_from_wire))
    try:
        sealed = _protocol(lambda: party.share_keys(peers, stop=deadline.passed))
    except secagg.Stopped as e:
        return _stopped(client, "share", deadline, e)
    return {"shares": secagg.to_wire(sealed)}, 200


def receive(client: LocalClient, body: Any, deadline: Deadline) -> tuple[dict[str, Any], int]:
    """Step 2: the shares sealed to this client in; {"opened": count} out. When some do not
    open, {"bad_shares": {j: why}, "c_sk": c_sk_k} instead, and this session masks nothing: a
    holder that cannot open a pair knows who sealed it, and its c_sk lets the server check
    (fedavg.secagg.accusation_holds) before it drops that sender, not the accuser."""
    from . import secagg
    obj = expect_object(body, "", ("session", "survivors", "received"), ("session", "survivors", "received"))
    party, _ = client.sessions.get(_session_name(obj))
    received = _protocol(lambda: secagg.indexed_from_wire(obj["received"], "received", secagg.bytes_from_wire))
    survivors = _protocol(lambda: secagg.indices_from_wire(obj["survivors"], "survivors"))
    try:
        opened = _protocol(lambda: party.receive(received, survivors, stop=deadline.passed))
    except secagg.BadShares as e:
        log.warning("%s: /secagg/receive: %s", client.client_id, e)
        return {"bad_shares": secagg.to_wire(e.senders), "c_sk": secagg.to_wire(party.reveal_c_sk())}, 200
    except secagg.Stopped as e:
        return _stopped(client, "receive", deadline, e)
    return {"opened": opened}, 200


def masked(client: LocalClient, body: Any, deadline: Deadline) -> tuple[dict[str, Any], int]:
    """Step 3: who of its neighbourhood shared keys (U2, as /secagg/receive was told) in;
    y_k = x_k + its masks out. Only once every pair sealed to it has opened."""
    from . import secagg
    obj = expect_object(body, "", ("session", "survivors", "parties"), ("session", "survivors"))
    party, x = client.sessions.get(_session_name(obj))
    survivors = _protocol(lambda: secagg.indices_from_wire(obj["survivors"], "survivors"))
    parties = expect_int(obj["parties"], "parties", ge=1) if "parties" in obj else None
    # (the sum's parties as mask counts them; before share_keys it refuses the step itself)
    beyond = party.peers is not None and _beyond_fixed_point(x, party.scale_bits, parties or len(party.peers))
    if beyond:
        return {"error": beyond, "diverged": True}, 422
    try:
        y = _protocol(lambda: party.mask(x, survivors, parties, stop=deadline.passed))
    except secagg.Stopped as e:
        return _stopped(client, "masked", deadline, e)
    return {"masked": secagg.to_wire(y)}, 200


def _beyond_fixed_point(x: np.ndarray, scale_bits: int, parties: int) -> str | None:
    """Why x_k cannot be summed, when a number in it is at or beyond what the
    fixed point holds (|x| < 2^63 / 2^s / parties, ``secagg.encode``): in
    a run under way that means its model or its loss on the global model has
    blown up, which /train would answer 422 "diverged" too."""
    from .secagg import encode_limit
    limit = encode_limit(scale_bits, parties)
    big = np.flatnonzero(~(np.abs(x) < limit))  # NaN too
    if not big.size:
        return None
    k, d = int(big[0]), len(x) - 5  # x_k = [w_k·θ_k (d + 1 numbers), w_k, n_k·L_k, n_k, bit_k]
    what = ("its weighted model w_k·θ_k" if k <= d else
            {d + 1: "its weight w_k", d + 2: "its loss term n_k·L_k", d + 3: "its n_k"}.get(k, "its clip bit"))
    return (f"{what} = {x[k]:.4g} is beyond what secure aggregation's fixed point can sum ({limit:.4g} at "
            f"scale_bits {scale_bits} over {parties} parties): a model this far off is diverging, try a smaller lr "
            "(unless the data's own scale needs fewer scale_bits)")


def unmask(client: LocalClient, body: Any, deadline: Deadline) -> tuple[dict[str, Any], int]:
    """Step 4: who of its neighbourhood survived in; shares of their b_j and of the dropped ones' s_sk_j out."""
    from . import secagg
    obj = expect_object(body, "", ("session", "survivors", "dropped"), ("session", "survivors", "dropped"))
    party, _ = client.sessions.get(_session_name(obj))
    survivors = _protocol(lambda: secagg.indices_from_wire(obj["survivors"], "survivors"))
    dropped = _protocol(lambda: secagg.indices_from_wire(obj["dropped"], "dropped"))
    try:
        revealed = _protocol(lambda: party.unmask(survivors, dropped, stop=deadline.passed))
    except secagg.Stopped as e:
        return _stopped(client, "unmask", deadline, e)
    return secagg.to_wire(revealed), 200


def _session_name(obj: dict[str, Any]) -> str:
    return expect_str(obj["session"], "session", max_len=MAX_SESSION_NAME)


def _protocol(step: Callable[[], Any]) -> Any:
    """A protocol step; what it refuses (fedavg.secagg's ValueError, with its reason) is a 400,
    except BadShares, which the step answers itself."""
    from .secagg import BadShares
    try:
        return step()
    except (ProtocolError, BadShares):
        raise
    except ValueError as e:
        raise ProtocolError(str(e)) from None


def _stopped(client: LocalClient, step: str, deadline: Deadline, e: Exception) -> tuple[dict[str, Any], int]:
    """The 408 of a step given up because the server no longer waits (nothing of it was kept)."""
    why = deadline.why() or "the server's deadline passed"
    log.warning("%s: /secagg/%s: %s: %s", client.client_id, step, why, e)
    return {"error": f"{why}: /secagg/{step} {e}"}, 408
