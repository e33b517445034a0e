"""The messages between server and clients (/train, /evaluate, /health),
parsed and validated.

Every parser raises ``ProtocolError`` with a message that says what is wrong
and where (``config.lr: must be > 0``); the apps turn it into a 400 reply.
Parsing is strict (``strict_json``): NaN/Infinity literals, numbers that
overflow a float, booleans where numbers belong and unknown fields are all
rejected. A strategy's own fields come from its declarations
(``strategies.fields``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .model import Weights, as_theta
from .spec import Param
from .strategies import SENT_FIELDS, STRATEGIES, ClientTask, Local
from .strategies.fields import LOCAL_MODEL, MODEL
from .strict_json import (
    MAX_DATA_SIZE,
    ProtocolError,
    expect_int,
    expect_name,
    expect_number,
    expect_object,
    is_name,
    parse_model,
)
from .training import TrainConfig

# The seed's strategy speaks the seed's protocol, field for field: its /train
# config names no strategy and no run, and its reply need not name one either.
SEED_STRATEGY = "fedavg"

# A client trains local_epochs passes over its data: this bounds one request's work.
MAX_LOCAL_EPOCHS = 10_000


# --- the client's endpoints ------------------------------------------------------

# Secure aggregation's default fixed point: inputs are integers mod 2^64 in
# units of 2^-SECAGG_SCALE_BITS (fedavg.secagg; a run may choose 8 to 40:
# fewer round the models away, more leave too little room for the sum).
SECAGG_SCALE_BITS = 24
SECAGG_SCALE_RANGE = (8, 40)
MAX_RUN_NAME = 200
SEED = TrainConfig()  # the seed's local training: every default below is its own

# /train's "config": how to train this round. The first four are what a run's
# settings say about local training (POST /start takes them as they are).
LOCAL_TRAINING: tuple[Param, ...] = (
    Param("lr", SEED.lr, "learning rate", gt=0),
    Param("local_epochs", SEED.local_epochs, "passes over the local data", type="integer", ge=1,
          le=MAX_LOCAL_EPOCHS),
    Param("batch_size", SEED.batch_size, "`null`, or a size >= n_k, means full batch: one step per epoch; "
          "otherwise mini-batches of a fresh shuffle each epoch (the last may be smaller)", type="integer", ge=1,
          nullable=True),
    Param("mu", SEED.mu, "FedProx's proximal weight; 0 is plain FedAvg", ge=0),
)
TRAIN_CONFIG: tuple[Param, ...] = (
    *LOCAL_TRAINING,
    Param("seed", SEED.seed, "seeds the mini-batch shuffle; unused for full batch", type="integer", ge=0,
          le=2**63 - 1, nullable=True),
    Param("strategy", SEED.strategy, "what to compute and send back; sent only for strategies other than "
          "`fedavg`, so FedAvg's request is the seed's", type="string", choices=tuple(STRATEGIES)),
    Param("run", SEED.run, "names the run, for state the client keeps between rounds (SCAFFOLD's c_k); sent with "
          "`config.strategy`", type="string", nullable=True, max_len=MAX_RUN_NAME, doc_range="1 to 200 characters"),
    Param("dp", None, "a DP run's: the client sends W_t + clip_S(W_k − W_t) + N(0, s²) instead of W_k "
          "(next table)", type="TrainDP", nullable=True),
)
TRAIN_DP: tuple[Param, ...] = (
    Param("clip", SEED.dp_clip, "S, the bound on ‖W_k − W_t‖; `null` is ∞", gt=0, nullable=True),
    Param("noise_std", SEED.dp_noise_std, "s, the standard deviation of the noise on each coordinate", ge=0),
)


def parse_train_config(value: Any, path: str = "config") -> TrainConfig:
    """The optional "config" of /train; a missing field takes the seed's default."""
    obj = expect_object(value, path, [p.name for p in TRAIN_CONFIG])
    at = f"{path}." if path else ""
    given = {p.name: p.parse(obj[p.name], at + p.name) for p in TRAIN_CONFIG[:-1] if p.name in obj}
    dp = {}
    if obj.get("dp") is not None:
        dp_obj = expect_object(obj["dp"], f"{at}dp", [p.name for p in TRAIN_DP])
        dp = {f"dp_{p.name}": p.parse(dp_obj[p.name], f"{at}dp.{p.name}") for p in TRAIN_DP if p.name in dp_obj}
    return replace(SEED, **given, **dp)


def train_config_json(config: TrainConfig) -> dict[str, Any]:
    """The "config" of /train. FedAvg's is the seed's, field for field: the
    strategy and the run's name are sent only when another strategy needs them."""
    fields = TRAIN_CONFIG[:-1] if config.strategy != SEED_STRATEGY else TRAIN_CONFIG[:-3]
    out = {p.name: getattr(config, p.name) for p in fields}
    if config.private:  # a DP run's: what the client does to its model before it sends it
        out["dp"] = {"clip": config.dp_clip, "noise_std": config.dp_noise_std}
    return out


# /train's fields: the model, the round, the config, and what any strategy sends besides.
TRAIN_FIELDS = ("global_model", "round", "config", *(f.name for f in SENT_FIELDS))


def parse_train_request(value: Any, num_features: int) -> ClientTask:
    """POST /train body → the client's task: θ_t, the round, the config, and
    what the strategy sends besides (its ``sends``: SCAFFOLD's "control")."""
    obj = expect_object(value, "", TRAIN_FIELDS, ("global_model",))
    w, b = parse_model(obj["global_model"], "global_model", num_features)
    rnd = expect_int(obj["round"], "round", ge=0) if obj.get("round") is not None else None
    config = parse_train_config(obj["config"]) if obj.get("config") is not None else TrainConfig()
    strategy = STRATEGIES[config.strategy]
    inputs = {}
    for sent in strategy.sends:
        if obj.get(sent.name) is None:
            raise ProtocolError(f"{sent.name}: missing (strategy {config.strategy} sends it)")
        inputs[sent.name] = sent.kind.parse(obj[sent.name], sent.name, num_features)
    unexpected = [f.name for f in SENT_FIELDS if f.name in obj and f not in strategy.sends]
    if unexpected:
        raise ProtocolError(f"{unexpected[0]}: not part of strategy {config.strategy}")
    return ClientTask(as_theta(w, b), rnd, config, inputs)


def train_reply_json(client_id: str, n: int, local: Local, metrics: dict[str, Any],
                     strategy: str) -> dict[str, Any]:
    """A client's /train reply. FedAvg's is the seed's (local_model, data_size)
    plus client_id and metrics; other strategies also say which one they ran
    and send their own fields."""
    body: dict[str, Any] = {"data_size": n, "client_id": client_id, "metrics": metrics}
    if strategy != SEED_STRATEGY:
        body["strategy"] = strategy
    for sent in STRATEGIES[strategy].replies:
        body[sent.name] = sent.kind.to_json(local.value(sent))
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


def parse_train_reply(value: Any, num_features: int | None = None, strategy: str = SEED_STRATEGY) -> dict[str, Any]:
    """A client's /train reply → {"theta" (its local model, or None), "extra"
    (the strategy's own fields as vectors), "data_size", "client_id" or None,
    "metrics" or None}.

    For FedAvg only local_model and data_size are required, so the seed's
    minimal clients work, and fields we don't know are ignored (a newer client
    may say more). Any other strategy's reply must name that strategy and hold
    its fields; one that does not raises ``CannotDo``."""
    if not isinstance(value, Mapping):
        raise ProtocolError("reply: must be a JSON object")
    if strategy != SEED_STRATEGY and value.get("strategy") != strategy:
        said = value.get("strategy")
        raise CannotDo(f"reply.strategy: asked for {strategy}, the client "
                       + ("did not say which strategy it ran (a client that ignores the config?)" if said is None
                          else f"ran {str(said)[:40]!r}"))
    fields = STRATEGIES[strategy].replies
    for key in (*(f.name for f in fields), "data_size"):
        if key not in value:
            raise (CannotDo if strategy != SEED_STRATEGY else ProtocolError)(f"reply.{key}: missing")
    theta, extra = None, {}
    for sent in fields:
        parsed = sent.kind.parse(value[sent.name], f"reply.{sent.name}", num_features)
        if sent is LOCAL_MODEL:
            theta = parsed
        else:
            extra[sent.name] = parsed
        if sent.kind is MODEL and num_features is None:
            num_features = len(parsed) - 1  # the fields that follow must agree with it
    data_size = expect_int(value["data_size"], "reply.data_size", ge=1, le=MAX_DATA_SIZE)
    client_id = value.get("client_id")
    if client_id is not None:
        client_id = expect_name(client_id, "reply.client_id")
    metrics = value.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, Mapping):
            raise ProtocolError("reply.metrics: must be a JSON object")
        # within_clip: a DP client's bit, 1 if its update was no longer than the
        # clip bound before it clipped (adaptive clipping counts them)
        metrics = {k: expect_number(metrics[k], f"reply.metrics.{k}", ge=0, le=1 if k == "within_clip" else None)
                   for k in ("loss_before", "loss_after", "within_clip") if metrics.get(k) is not None}
    return {"theta": theta, "extra": extra, "data_size": data_size, "client_id": client_id, "metrics": metrics}


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
        "client_id": None if client_id is None else expect_name(client_id, "reply.client_id"),
    }


def parse_health_reply(value: Any) -> dict[str, Any]:
    """A client's /health reply → {"client_id", "data_size", "num_features",
    "strategies", "secagg", "batch" ((path, id): a hosted client whose host
    batches, at that path of its origin)}, each None (False) when missing or not what it should be (seed
    clients have no /health at all; what a client says here is a hint,
    checked again later)."""
    body = value if isinstance(value, Mapping) else {}

    def count(key: str) -> int | None:
        v = body.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DATA_SIZE else None

    name = body.get("client_id")
    strategies = body.get("strategies")
    known = [s for s in strategies if isinstance(s, str) and s in STRATEGIES] if isinstance(strategies, list) else None
    batch = body.get("batch")
    batch = (batch["path"], batch["id"]) if (
        isinstance(batch, Mapping) and isinstance(batch.get("path"), str) and batch["path"].startswith("/")
        and len(batch["path"]) <= MAX_RUN_NAME and isinstance(batch.get("id"), int)
        and not isinstance(batch["id"], bool) and 1 <= batch["id"] <= MAX_DATA_SIZE) else None
    return {"client_id": name if is_name(name) else None,
            "data_size": count("data_size"), "num_features": count("num_features"),
            "strategies": known, "secagg": body.get("secagg") is True, "batch": batch}
