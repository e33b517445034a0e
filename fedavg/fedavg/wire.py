"""The JSON wire format between server and clients, parsed and validated.

Every parser raises ``ProtocolError`` with a message that says what is wrong
and where (``config.lr: must be > 0``); the apps turn it into a 400 reply.
Parsing is strict: NaN/Infinity literals, numbers that overflow a float,
booleans where numbers belong and unknown fields are all rejected.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .model import Weights, as_theta, split
from .strategies import STRATEGIES, ClientTask, Local
from .training import TrainConfig

# Bounds that keep one request's work bounded (a client trains local_epochs
# passes over its data; a model has one weight per feature).
MAX_LOCAL_EPOCHS = 10_000
MAX_FEATURES = 10_000
# n_k is a client's vote in the average; no real client has more samples than
# this, and a larger count (10^309 was tried) must not reach the arithmetic.
MAX_DATA_SIZE = 10**12
MAX_NAME = 200  # any name the server keeps (client_id): logs, the page, the CSV


class ProtocolError(ValueError):
    """A message that does not follow the wire format (a 400, never a 500)."""


# --- strict JSON -----------------------------------------------------------

class NonFinite:
    """A NaN/Infinity literal or a number too large for a float, as read: kept
    as a marker so that the field validator can say *where* it was; anything
    that validates it as a number refuses it."""

    def __init__(self, text: str, why: str = "is not allowed in JSON (numbers must be finite)") -> None:
        self.text = text
        self.why = why

    def __repr__(self) -> str:
        return self.text


def _finite_float(text: str) -> float | NonFinite:
    value = float(text)
    return value if math.isfinite(value) else NonFinite(text, "is out of range for a 64-bit float")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: with {"rounds": 1, "rounds": 2}
    the last would silently win, so what was checked is not what runs."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ProtocolError(f"{dup}: given twice in one JSON object (each field once)")
    return obj


def loads(body: bytes | str) -> Any:
    """Parse a JSON document. NaN, Infinity and overflowing numbers come back
    as ``NonFinite`` markers, which every validator below rejects by field;
    a key given twice in one object is refused."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        return json.loads(text, parse_constant=NonFinite, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ProtocolError("body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ProtocolError("body is nested too deeply") from None
    except ProtocolError:
        raise
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ProtocolError(f"body has a number that cannot be read: {str(e)[:80]}") from None


# --- field validators --------------------------------------------------------

def _where(path: str) -> str:
    return path or "body"


def expect_object(value: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    """A JSON object whose keys are all in ``allowed`` and include ``required``."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{_where(path)}: must be a JSON object")
    allowed = set(allowed)
    unknown = sorted(k for k in value if k not in allowed)
    if unknown:
        prefix = f"{path}." if path else ""
        raise ProtocolError(f"{prefix}{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in value:
            prefix = f"{path}." if path else ""
            raise ProtocolError(f"{prefix}{key}: missing")
    return value


def expect_number(value: Any, path: str, *, gt: float | None = None, ge: float | None = None,
                  lt: float | None = None, le: float | None = None) -> float:
    """A finite JSON number (not a boolean), optionally within bounds."""
    if isinstance(value, NonFinite):
        raise ProtocolError(f"{path}: {value.text} {value.why}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{path}: must be a number, got {_json_type(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ProtocolError(f"{path}: number is out of range for a 64-bit float") from None
    if not math.isfinite(number):
        raise ProtocolError(f"{path}: must be finite")
    if gt is not None and not number > gt:
        raise ProtocolError(f"{path}: must be > {gt:g}, got {number:g}")
    if ge is not None and not number >= ge:
        raise ProtocolError(f"{path}: must be >= {ge:g}, got {number:g}")
    if lt is not None and not number < lt:
        raise ProtocolError(f"{path}: must be < {lt:g}, got {number:g}")
    if le is not None and not number <= le:
        raise ProtocolError(f"{path}: must be <= {le:g}, got {number:g}")
    return number


def expect_int(value: Any, path: str, *, ge: int | None = None, le: int | None = None) -> int:
    """A JSON integer (not a boolean, not 2.0), optionally within bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{path}: must be an integer, got {_json_type(value)}")
    if ge is not None and value < ge:
        raise ProtocolError(f"{path}: must be >= {ge}, got {value}")
    if le is not None and value > le:
        raise ProtocolError(f"{path}: must be <= {le}, got {value}")
    return value


def expect_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{path}: must be true or false, got {_json_type(value)}")
    return value


def expect_str(value: Any, path: str, *, max_len: int = 200) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{path}: must be a non-empty string, got {_json_type(value)}")
    if len(value) > max_len:
        raise ProtocolError(f"{path}: longer than {max_len} characters")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, NonFinite):
        return f"the non-finite number {value.text}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


# --- the model ------------------------------------------------------------------

def parse_model(value: Any, path: str, num_features: int | None = None) -> tuple[Weights, float]:
    """{"w": number or [numbers], "b": number} → (w as a float vector, b)."""
    obj = expect_object(value, path, ("w", "b"), ("w", "b"))
    raw_w = obj["w"]
    if isinstance(raw_w, list):
        if not raw_w:
            raise ProtocolError(f"{path}.w: must not be empty")
        if len(raw_w) > MAX_FEATURES:
            raise ProtocolError(f"{path}.w: more than {MAX_FEATURES} weights")
        w = np.array([expect_number(v, f"{path}.w[{i}]") for i, v in enumerate(raw_w)])
    else:
        w = np.array([expect_number(raw_w, f"{path}.w")])
    if num_features is not None and len(w) != num_features:
        raise ProtocolError(f"{path}.w: has {len(w)} weight(s), the data has {num_features} feature(s)")
    return w, expect_number(obj["b"], f"{path}.b")


def weights_of(model: Mapping[str, Any]) -> Weights:
    """The inverse of ``model_json`` for w: a number or a list → a float vector."""
    return np.atleast_1d(np.asarray(model["w"], dtype=float))


def model_json(w: Weights, b: float) -> dict[str, Any]:
    """(w, b) → {"w", "b"}; w is a plain number when there is one feature."""
    w = np.asarray(w, dtype=float).ravel()
    return {"w": float(w[0]) if len(w) == 1 else [float(v) for v in w], "b": float(b)}


# --- the client's endpoints ------------------------------------------------------

# What a run's settings say about local training (POST /start takes them as is).
LOCAL_TRAINING_FIELDS = ("lr", "local_epochs", "batch_size", "mu")
TRAIN_CONFIG_FIELDS = (*LOCAL_TRAINING_FIELDS, "seed", "strategy", "run")
DP_CONFIG_FIELDS = ("clip", "noise_std")
# Secure aggregation's default fixed point: inputs are integers mod 2^64 in
# units of 2^-SECAGG_SCALE_BITS (fedavg.secagg; a run may choose 8 to 40).
SECAGG_SCALE_BITS = 24
MAX_RUN_NAME = 200


def parse_train_config(value: Any, path: str = "config") -> TrainConfig:
    """The optional "config" of /train; a missing field takes the seed's default."""
    obj = expect_object(value, path, (*TRAIN_CONFIG_FIELDS, "dp"))
    at = f"{path}." if path else ""
    dp = expect_object(obj["dp"], f"{at}dp", DP_CONFIG_FIELDS) if obj.get("dp") is not None else {}
    default = TrainConfig()
    batch = obj.get("batch_size")
    seed = obj.get("seed")
    strategy = expect_str(obj.get("strategy", default.strategy), f"{at}strategy")
    if strategy not in STRATEGIES:
        raise ProtocolError(f"{at}strategy: unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    return TrainConfig(
        lr=expect_number(obj["lr"], f"{at}lr", gt=0) if "lr" in obj else default.lr,
        local_epochs=(expect_int(obj["local_epochs"], f"{at}local_epochs", ge=1, le=MAX_LOCAL_EPOCHS)
                      if "local_epochs" in obj else default.local_epochs),
        batch_size=None if batch is None else expect_int(batch, f"{at}batch_size", ge=1),
        mu=expect_number(obj["mu"], f"{at}mu", ge=0) if "mu" in obj else default.mu,
        seed=None if seed is None else expect_int(seed, f"{at}seed", ge=0, le=2**63 - 1),
        strategy=strategy,
        run=None if obj.get("run") is None else expect_str(obj["run"], f"{at}run", max_len=MAX_RUN_NAME),
        dp_clip=None if dp.get("clip") is None else expect_number(dp["clip"], f"{at}dp.clip", gt=0),
        dp_noise_std=expect_number(dp["noise_std"], f"{at}dp.noise_std", ge=0) if "noise_std" in dp else 0.0,
    )


def train_config_json(config: TrainConfig) -> dict[str, Any]:
    """The "config" of /train. FedAvg's is the seed's, field for field: the
    strategy and the run's name are sent only when another strategy needs them."""
    fields = TRAIN_CONFIG_FIELDS if config.strategy != "fedavg" else TRAIN_CONFIG_FIELDS[:-2]
    out = {name: getattr(config, name) for name in fields}
    if config.private:  # a DP run's: what the client does to its model before it sends it
        out["dp"] = {"clip": config.dp_clip, "noise_std": config.dp_noise_std}
    return out


def parse_train_request(value: Any, num_features: int) -> ClientTask:
    """POST /train body → the client's task: θ_t, the round, the config, and
    what the strategy sends besides ("control": SCAFFOLD's c)."""
    obj = expect_object(value, "", ("global_model", "round", "config", "control"), ("global_model",))
    w, b = parse_model(obj["global_model"], "global_model", num_features)
    rnd = expect_int(obj["round"], "round", ge=0) if obj.get("round") is not None else None
    config = parse_train_config(obj["config"]) if obj.get("config") is not None else TrainConfig()
    strategy = STRATEGIES[config.strategy]
    inputs = {}
    for name in strategy.input_fields:
        if obj.get(name) is None:
            raise ProtocolError(f"{name}: missing (strategy {config.strategy} sends it)")
        inputs[name] = as_theta(*parse_model(obj[name], name, num_features))
    unexpected = [k for k in ("control",) if k in obj and k not in strategy.input_fields]
    if unexpected:
        raise ProtocolError(f"{unexpected[0]}: not part of strategy {config.strategy}")
    return ClientTask(as_theta(w, b), rnd, config, inputs)


def train_reply_json(client_id: str, n: int, local: Local, metrics: dict[str, Any],
                     strategy: str) -> dict[str, Any]:
    """A client's /train reply. FedAvg's is the seed's (local_model, data_size)
    plus client_id and metrics; other strategies also say which one they ran
    and send their own fields."""
    body: dict[str, Any] = {"data_size": n, "client_id": client_id, "metrics": metrics}
    if local.theta is not None:
        body["local_model"] = model_json(*split(local.theta))
    if strategy != "fedavg":
        body["strategy"] = strategy
    for key, value in local.extra.items():
        if key in ("gradient", "control_delta"):
            body[key] = model_json(*split(value))
        elif key == "steps":
            body[key] = int(value)
    if "xtx" in local.extra:
        body["stats"] = {"xtx": local.extra["xtx"].tolist(), "xty": local.extra["xty"].tolist()}
    return body


def parse_evaluate_request(value: Any, num_features: int) -> tuple[Weights, float]:
    """POST /evaluate body → (w, b)."""
    obj = expect_object(value, "", ("global_model", "round"), ("global_model",))
    if obj.get("round") is not None:
        expect_int(obj["round"], "round", ge=0)
    return parse_model(obj["global_model"], "global_model", num_features)


# --- what the server reads back ----------------------------------------------------

class CannotDo(ProtocolError):
    """A client's reply shows it did not run the strategy asked for: its
    numbers mean something else, and averaging them would be wrong math."""


def parse_train_reply(value: Any, num_features: int | None = None, strategy: str = "fedavg") -> dict[str, Any]:
    """A client's /train reply → {"theta" (its local model, or None), "extra"
    (the strategy's own fields as vectors), "data_size", "client_id" or None,
    "metrics" or None}.

    For FedAvg only local_model and data_size are required, so the seed's
    minimal clients work, and fields we don't know are ignored (a newer client
    may say more). Any other strategy's reply must name that strategy and hold
    its fields; one that does not raises ``CannotDo``."""
    if not isinstance(value, Mapping):
        raise ProtocolError("reply: must be a JSON object")
    if strategy != "fedavg" and value.get("strategy") != strategy:
        said = value.get("strategy")
        raise CannotDo(f"reply.strategy: asked for {strategy}, the client "
                       + ("did not say which strategy it ran (a client that ignores the config?)" if said is None
                          else f"ran {str(said)[:40]!r}"))
    fields = STRATEGIES[strategy].reply_fields
    for key in (*fields, "data_size"):
        if key not in value:
            raise (CannotDo if strategy != "fedavg" else ProtocolError)(f"reply.{key}: missing")
    theta, extra = None, {}
    if "local_model" in fields:
        theta = as_theta(*parse_model(value["local_model"], "reply.local_model", num_features))
        num_features = len(theta) - 1
    for key in ("gradient", "control_delta"):
        if key in fields:
            extra[key] = as_theta(*parse_model(value[key], f"reply.{key}", num_features))
    if "steps" in fields:
        extra["steps"] = expect_int(value["steps"], "reply.steps", ge=1)
    if "stats" in fields:
        extra.update(_parse_stats(value["stats"], num_features))
    data_size = expect_int(value["data_size"], "reply.data_size", ge=1, le=MAX_DATA_SIZE)
    client_id = value.get("client_id")
    if client_id is not None:
        client_id = expect_str(client_id, "reply.client_id", max_len=MAX_NAME)
    metrics = value.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, Mapping):
            raise ProtocolError("reply.metrics: must be a JSON object")
        # within_clip: a DP client's bit, 1 if its update was no longer than the
        # clip bound before it clipped (adaptive clipping counts them)
        metrics = {k: expect_number(metrics[k], f"reply.metrics.{k}", ge=0, le=1 if k == "within_clip" else None)
                   for k in ("loss_before", "loss_after", "within_clip") if metrics.get(k) is not None}
    return {"theta": theta, "extra": extra, "data_size": data_size, "client_id": client_id, "metrics": metrics}


def _parse_stats(value: Any, num_features: int | None) -> dict[str, np.ndarray]:
    """{"xtx": (d+1)×(d+1) symmetric, "xty": d+1 numbers} → vectors."""
    obj = expect_object(value, "reply.stats", ("xtx", "xty"), ("xtx", "xty"))
    xty = obj["xty"]
    if not isinstance(xty, list) or not 2 <= len(xty) <= MAX_FEATURES + 1:
        raise ProtocolError(f"reply.stats.xty: must be a list of 2 to {MAX_FEATURES + 1} numbers")
    dim = len(xty)
    if num_features is not None and dim != num_features + 1:
        raise ProtocolError(f"reply.stats.xty: has {dim} entries, the model has {num_features + 1}")
    rows = obj["xtx"]
    if not isinstance(rows, list) or len(rows) != dim or not all(isinstance(r, list) and len(r) == dim for r in rows):
        raise ProtocolError(f"reply.stats.xtx: must be a {dim}×{dim} list of lists")
    xtx = np.array([[expect_number(v, f"reply.stats.xtx[{i}][{j}]") for j, v in enumerate(row)]
                    for i, row in enumerate(rows)])
    if not np.allclose(xtx, xtx.T, rtol=1e-9, atol=0.0):
        raise ProtocolError("reply.stats.xtx: must be symmetric (it is Σ x̃x̃ᵀ)")
    return {"xtx": xtx, "xty": np.array([expect_number(v, f"reply.stats.xty[{i}]") for i, v in enumerate(xty)])}


def parse_evaluate_reply(value: Any) -> dict[str, Any]:
    """A client's /evaluate reply → {"loss", "data_size", "client_id" or None}."""
    if not isinstance(value, Mapping):
        raise ProtocolError("reply: must be a JSON object")
    for key in ("loss", "data_size"):
        if key not in value:
            raise ProtocolError(f"reply.{key}: missing")
    client_id = value.get("client_id")
    return {
        "loss": expect_number(value["loss"], "reply.loss", ge=0),
        "data_size": expect_int(value["data_size"], "reply.data_size", ge=1, le=MAX_DATA_SIZE),
        "client_id": None if client_id is None else expect_str(client_id, "reply.client_id", max_len=MAX_NAME),
    }


def parse_health_reply(value: Any) -> dict[str, Any]:
    """A client's /health reply → {"client_id", "data_size", "num_features",
    "strategies", "secagg"}, each None (False) when missing or not what it should be (seed
    clients have no /health at all; what a client says here is a hint,
    checked again later)."""
    body = value if isinstance(value, Mapping) else {}

    def count(key: str) -> int | None:
        v = body.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DATA_SIZE else None

    name = body.get("client_id")
    strategies = body.get("strategies")
    known = [s for s in strategies if isinstance(s, str) and s in STRATEGIES] if isinstance(strategies, list) else None
    return {"client_id": name if isinstance(name, str) and 0 < len(name) <= MAX_NAME else None,
            "data_size": count("data_size"), "num_features": count("num_features"),
            "strategies": known, "secagg": body.get("secagg") is True}
