"""The batched /train of a client host, ``POST /batch/train``: one request for
many of its clients, one reply of arrays (docs/PROTOCOL.md, "The batched
/train").

The request is a /train body (parsed by ``wire.parse_train_request``, field
for field) plus ``clients``, the hosted clients k (as in /clients/<k>, 1..K,
distinct), and, when mini-batches are asked, ``seeds``, each client's own
config.seed aligned with ``clients``: the one body the server would have sent
each of them, but for the seed.

The reply is JSON whose arrays travel as base64 of their little-endian bytes:

    {"strategy": "<name>", "clients": B,
     "arrays": {"<name>": {"dtype": "<f8" | "<i8" | "|b1", "shape": [...], "data": "<base64>"}, ...},
     "errors": {"<k>": "why client k's row cannot be used", ...},
     "absent": {"<k>": "why client k's row holds no result", ...}}

with the arrays of a ``population.BatchReply``, row j for clients[j]: ``ids``
(the k asked, in order), ``n``, ``loss_before``, ``loss_after``,
``diverged``, ``within_clip`` (DP without client noise only), and the
strategy's reply fields by their wire names (``local_model`` (B, p),
``gradient``, ``control_delta`` (B, p), ``steps`` (B,), Exact's
``stats.xtx`` (B, p, p) and ``stats.xty`` (B, p)). A diverged row's numbers
are whatever the arithmetic gave (NaN, inf): base64 carries them, and
``errors`` says why they cannot be used, as the per-client 422 does.
``absent`` (optional) names the rows that hold no result at all, as a
client that never answered: a client host's simulated dropouts and
stragglers (``fedavg.dropout``); their numbers are to be ignored.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .population import BatchReply
from .strategies import STRATEGIES, ClientTask, LocalBatch
from .strategies.fields import LOCAL_MODEL, STATS
from .strict_json import MAX_DATA_SIZE, ProtocolError, expect_int, expect_object
from .wire import TRAIN_CONFIG, TRAIN_FIELDS, parse_train_request

BATCH_PATH = "/batch/train"
# A host of a population's own clients: all of them described in one reply (K, n_k as an array), and
# evaluated in one call (sums): what a server reaching them by index asks instead of K /health, K /evaluate.
POPULATION_PATH = "/population"
BATCH_EVALUATE_PATH = "/batch/evaluate"
DTYPES = {"<f8": np.dtype("<f8"), "<i8": np.dtype("<i8"), "|b1": np.dtype("|b1")}
SEED = next(p for p in TRAIN_CONFIG if p.name == "seed")


@dataclass(frozen=True)
class BatchRequest:
    """A parsed /batch/train: the task all its clients share, the clients
    (0-based indices of the host's clients, in the order asked) and their
    seeds (None: not sent)."""

    task: ClientTask
    ids: np.ndarray
    seeds: list[int] | None


def parse_batch_request(value: Any, num_features: int, num_clients: int) -> BatchRequest:
    """POST /batch/train body → BatchRequest; ProtocolError naming the field
    (``clients[3]: client 0 is not on this host (1..K)``, ``seeds: …``)."""
    obj = expect_object(value, "", (*TRAIN_FIELDS, "clients", "seeds"), ("global_model", "clients"))
    clients, seeds = obj.get("clients"), obj.get("seeds")
    if not isinstance(clients, list) or not clients:
        raise ProtocolError("clients: must be a non-empty list of the host's client numbers k (/clients/<k>)")
    ks = [expect_int(k, f"clients[{i}]", ge=1) for i, k in enumerate(clients)]
    ids = np.array(ks, dtype=np.int64) - 1
    over = np.flatnonzero(ids >= num_clients)
    if len(over):
        raise ProtocolError(f"clients[{over[0]}]: client {ks[over[0]]} is not on this host (1..{num_clients})")
    seen: set[int] = set()
    for i, k in enumerate(ks):
        if k in seen:
            raise ProtocolError(f"clients[{i}]: client {k} is named more than once")
        seen.add(k)
    if seeds is not None:
        if not isinstance(seeds, list) or len(seeds) != len(ks):
            raise ProtocolError(f"seeds: must be a list of {len(ks)} seeds, one per entry of clients")
        seeds = [SEED.parse(s, f"seeds[{i}]") for i, s in enumerate(seeds)]
    task = parse_train_request({k: v for k, v in obj.items() if k not in ("clients", "seeds")}, num_features)
    if task.config.batch_size is not None and seeds is None:
        raise ProtocolError("seeds: missing (config.batch_size asks for mini-batches, each client shuffles "
                            "with its own seed)")
    return BatchRequest(task, ids, seeds)


def encode_array(values: np.ndarray) -> dict[str, Any]:
    """An array as {"dtype", "shape", "data": base64 of its little-endian bytes}."""
    dtype = {"f": "<f8", "i": "<i8", "u": "<i8", "b": "|b1"}[values.dtype.kind]
    data = np.ascontiguousarray(values, dtype=DTYPES[dtype])
    return {"dtype": dtype, "shape": list(values.shape), "data": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(value: Any, path: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """``encode_array``'s object back, exactly of ``dtype`` and ``shape``, else ProtocolError naming ``path``."""
    obj = expect_object(value, path, ("dtype", "shape", "data"), ("dtype", "shape", "data"))
    if obj["dtype"] != dtype:
        raise ProtocolError(f"{path}.dtype: must be {dtype!r}, got {str(obj['dtype'])[:20]!r}")
    if obj["shape"] != list(shape):
        raise ProtocolError(f"{path}.shape: must be {list(shape)}, got {str(obj['shape'])[:40]}")
    try:
        raw = base64.b64decode(obj["data"], validate=True) if isinstance(obj["data"], str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None:
        raise ProtocolError(f"{path}.data: must be base64 text")
    size = DTYPES[dtype].itemsize * int(np.prod(shape))
    if len(raw) != size:
        raise ProtocolError(f"{path}.data: holds {len(raw)} bytes, {list(shape)} of {dtype} is {size}")
    return np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)


def _fields(reply: BatchReply) -> dict[str, np.ndarray | None]:
    """The reply's arrays by wire name (the strategy's fields as its reply names them)."""
    return {"ids": reply.ids, "n": reply.n, "loss_before": reply.loss_before, "loss_after": reply.loss_after,
            "diverged": reply.diverged, "within_clip": reply.within_clip, LOCAL_MODEL.name: reply.local.theta,
            **reply.local.extra}


def batch_reply_json(reply: BatchReply, strategy: str, why_diverged: str,
                     absent: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A /batch/train reply; ``ids`` as the host numbers them (k = index + 1);
    ``absent``: k → why client k's row holds no result (none: no such key)."""
    arrays = {name: encode_array(values) for name, values in _fields(reply).items() if values is not None}
    arrays["ids"] = encode_array(reply.ids + 1)
    absent = absent or {}
    out = {"strategy": strategy, "clients": len(reply.ids), "arrays": arrays,
           "errors": {str(int(k) + 1): why_diverged for k in reply.ids[reply.diverged] if int(k) + 1 not in absent}}
    if absent:
        out["absent"] = {str(k): why for k, why in absent.items()}
    return out


def parse_absent(value: Any, ks: list[int]) -> dict[int, str]:
    """A /batch/train reply's ``absent`` (k → why that row holds no result),
    for the clients ``ks`` asked; {} when the reply has none. ProtocolError
    for a key that is not one of them, or a reason that is not text."""
    absent = value.get("absent") if isinstance(value, Mapping) else None
    if absent is None:
        return {}
    if not isinstance(absent, Mapping):
        raise ProtocolError("reply.absent: must be a JSON object")
    asked, out = set(ks), {}
    for key, why in absent.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) in asked):
            raise ProtocolError(f"reply.absent: {str(key)[:20]!r} is not a client asked for")
        if not isinstance(why, str):
            raise ProtocolError(f"reply.absent.{key}: must be text")
        out[int(key)] = why[:500]
    return out


def parse_batch_reply(value: Any, ks: list[int], num_features: int, strategy: str) -> tuple[BatchReply, dict[int, str]]:
    """A host's /batch/train reply to the clients ``ks`` (as asked) →
    (BatchReply with ids = ks, the host's reason for each diverged row by
    k). Every array of the strategy's reply must be there, of its dtype and
    shape (ProtocolError naming it): the caller drops the whole host's
    clients then, since no row of a malformed reply can be trusted. Whether
    each row's numbers can join the aggregate is the caller's (``rows_usable``)."""
    if not isinstance(value, Mapping):
        raise ProtocolError("reply: must be a JSON object")
    if value.get("strategy") != strategy:
        raise ProtocolError(f"reply.strategy: asked for {strategy}, got {str(value.get('strategy'))[:40]!r}")
    arrays = value.get("arrays")
    if not isinstance(arrays, Mapping):
        raise ProtocolError("reply.arrays: must be a JSON object")
    b, p = len(ks), num_features + 1

    def get(name: str, dtype: str, shape: tuple[int, ...], optional: bool = False) -> np.ndarray | None:
        if name not in arrays:
            if optional:
                return None
            raise ProtocolError(f"reply.arrays.{name}: missing")
        return decode_array(arrays[name], f"reply.arrays.{name}", dtype, shape)

    ids = get("ids", "<i8", (b,))
    if not np.array_equal(ids, ks):
        raise ProtocolError("reply.arrays.ids: not the clients asked for, in their order")
    theta, extra = None, {}
    for sent in STRATEGIES[strategy].replies:
        if sent is LOCAL_MODEL:
            theta = get(sent.name, "<f8", (b, p))
        elif sent is STATS:
            extra["stats.xtx"] = get("stats.xtx", "<f8", (b, p, p))
            extra["stats.xty"] = get("stats.xty", "<f8", (b, p))
        elif sent.kind.name == "count":
            extra[sent.name] = get(sent.name, "<i8", (b,))
        else:
            extra[sent.name] = get(sent.name, "<f8", (b, p))
    reply = BatchReply(ids - 1, get("n", "<i8", (b,)), LocalBatch(theta, extra), get("loss_before", "<f8", (b,)),
                       get("loss_after", "<f8", (b,)), get("within_clip", "<f8", (b,), optional=True),
                       get("diverged", "|b1", (b,)))
    errors = value.get("errors") or {}
    if not isinstance(errors, Mapping):
        raise ProtocolError("reply.errors: must be a JSON object")
    why = {int(k): str(v)[:500] for k, v in errors.items() if isinstance(k, str) and k.isdigit()}
    return reply, why


def parse_batch_evaluate_reply(value: Any, clients: int) -> tuple[int, float]:
    """A host's /batch/evaluate reply → (N = Σ n_k, Σ n_k·L_k) over the
    clients whose loss is finite; ProtocolError naming the field."""
    obj = expect_object(value, "reply", ("clients", "data_size", "loss_sum", "not_finite"),
                        ("clients", "data_size", "loss_sum"))
    expect_int(obj["clients"], "reply.clients", ge=0, le=clients)
    n = expect_int(obj["data_size"], "reply.data_size", ge=0)
    total = obj["loss_sum"]
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not total >= 0:
        raise ProtocolError("reply.loss_sum: must be a number >= 0")
    return n, float(total)


def rows_usable(reply: BatchReply) -> np.ndarray:
    """(B,) the reason each row cannot join the aggregate, "" when it can:
    what ``wire.parse_train_reply`` refuses of one client's JSON reply (a
    non-finite number, which JSON cannot carry; n_k outside 1..10¹²; a step
    count below 1; a loss below 0; Exact's Σ x̃x̃ᵀ not symmetric), checked
    on all rows at once. Diverged rows are the caller's (the per-client 422)."""
    why = np.full(len(reply.ids), "", dtype=object)

    def flag(bad: np.ndarray, text: str) -> None:
        why[bad & (why == "")] = text

    def finite(values: np.ndarray) -> np.ndarray:
        return np.isfinite(values.reshape(len(values), -1)).all(axis=1)

    flag((reply.n < 1) | (reply.n > MAX_DATA_SIZE), f"reply.data_size: must be 1 to {MAX_DATA_SIZE}")
    if reply.local.theta is not None:
        flag(~finite(reply.local.theta), f"reply.{LOCAL_MODEL.name}: not finite")
    for name, values in reply.local.extra.items():
        if values.dtype.kind == "i":
            flag(values < 1, f"reply.{name}: must be >= 1")
        else:
            flag(~finite(values), f"reply.{name}: not finite")
    if "stats.xtx" in reply.local.extra:
        xtx = reply.local.extra["stats.xtx"]
        symmetric = np.isclose(xtx, np.swapaxes(xtx, 1, 2), rtol=1e-9, atol=0.0).all(axis=(1, 2))
        flag(~symmetric, "reply.stats.xtx: must be symmetric (it is Σ x̃x̃ᵀ)")
    flag(~np.isfinite(reply.loss_after) | (reply.loss_after < 0), "reply.metrics.loss_after: must be a number >= 0")
    if reply.within_clip is not None:
        flag(~np.isin(reply.within_clip, (0.0, 1.0)), "reply.metrics.within_clip: must be 0 or 1")
    return why


def batch_reply_limit(clients: int, num_features: int) -> int:
    """The most bytes a /batch/train reply for ``clients`` clients can need:
    1 MiB (what any one reply may be) plus, per client, base64 of the widest
    row (Exact's p² + p, plus ids, n, the losses, the bit and the flag) and
    its error text."""
    p = num_features + 1
    return 1024 * 1024 + clients * (((8 * (p * p + 3 * p + 6)) * 4) // 3 + 600)
