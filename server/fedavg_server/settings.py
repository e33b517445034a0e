"""A run's settings: what ``POST /start`` may say, checked before anything starts."""
from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from fedavg.privacy import update_noise_multiplier
from fedavg.secagg_graph import default_neighbors, default_threshold
from fedavg.strategies import AGGREGATORS, PARAM_NAMES, STRATEGIES, Combine, Strategy
from fedavg.strict_json import (
    ProtocolError,
    expect_bool,
    expect_int,
    expect_number,
    expect_object,
    expect_str,
    parse_model,
)
from fedavg.training import TrainConfig
from fedavg.wire import LOCAL_TRAINING_FIELDS, SECAGG_SCALE_BITS, parse_train_config

MAX_ROUNDS = 100_000
MAX_PACE_S = 60.0
MAX_CLIENT_TIMEOUT_S = 600.0
# DP-FedAvg's defaults (docs/PRIVACY.md; the OpenAPI document states the same values).
DP_DELTA = 1e-5
ADAPTIVE_QUANTILE = 0.5
ADAPTIVE_LR = 0.2
FEDPROX_DEFAULT_MU = 0.01


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides a run; stored with it, so a run can be re-read
    (and repeated: the seed is always recorded, drawn at random if not given)."""

    rounds: int = 5
    strategy: str = "fedavg"
    lr: float = 0.01
    local_epochs: int = 10
    batch_size: int | None = None
    mu: float = 0.0
    fraction: float = 1.0
    min_clients: int = 1
    seed: int | None = None
    init: dict[str, Any] | None = None  # {"w", "b"}; None = all zeros
    pace_s: float = 0.0
    client_timeout_s: float = 10.0
    params: dict[str, float] | None = None  # the strategy's own settings (server_lr, beta1, …), defaults filled in
    robust: dict[str, Any] | None = None  # a robust rule instead of the average (aggregator, trim, …); None = mean
    dp: dict[str, Any] | None = None  # DP-FedAvg's settings (fedavg.privacy), defaults filled in; None = no DP
    secagg: dict[str, int] | None = None  # secure aggregation's neighbors k, threshold t, scale_bits; None = clear

    def train_config(self, client_seed: int | None, run: str | None = None, dp_clip: float | None = None,
                     dp_noise_std: float = 0.0) -> TrainConfig:
        return TrainConfig(lr=self.lr, local_epochs=self.local_epochs, batch_size=self.batch_size,
                           mu=self.mu, seed=client_seed, strategy=self.strategy, run=run, dp_clip=dp_clip,
                           dp_noise_std=dp_noise_std)

    def make_strategy(self, num_clients: int) -> Strategy:
        return STRATEGIES[self.strategy](lr=self.lr, num_clients=num_clients, combine=Combine(**(self.robust or {})),
                                         **(self.params or {}))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ROBUST_FIELDS = ("aggregator", "trim", "byzantine", "krum_m", "clip_norm", "max_weight")
START_FIELDS = ("rounds", "strategy", *LOCAL_TRAINING_FIELDS, *PARAM_NAMES, *ROBUST_FIELDS, "fraction", "min_clients",
                "seed", "init", "pace_s", "client_timeout_s", "dp", "secagg", "wait")
# The strategies whose server step starts from the average of the local
# models (``averages_models``): what DP-FedAvg's noised average replaces, and
# all that secure aggregation gives the server. FedSGD, SCAFFOLD and FedNova
# send more than a model (gradients, control variates, step counts); exact
# sends statistics.
MODEL_AVERAGING = tuple(name for name, kind in STRATEGIES.items() if kind.averages_models)
DP_FIELDS = ("noise_multiplier", "clip", "delta", "target_epsilon", "local_noise", "adaptive")
ADAPTIVE_FIELDS = ("target_quantile", "lr", "count_noise")
SECAGG_FIELDS = ("neighbors", "threshold", "scale_bits")


class SettingsError(ProtocolError):
    """Every problem of a /start body at once: ``str(e)`` is the first one
    (what the API has always said), ``errors`` all of them, each
    {"field", "message"}, so a form can show each next to its field."""

    def __init__(self, problems: list[ProtocolError]) -> None:
        super().__init__(str(problems[0]))
        self.errors = [_field_error(str(p)) for p in problems]


def _field_error(text: str) -> dict[str, str]:
    """"rounds: must be >= 1, got 0" → {"field": "rounds", "message": "must be >= 1, got 0"};
    a message that names no field has the field ""."""
    field, sep, message = text.partition(": ")
    if not sep or " " in field:
        return {"field": "", "message": text}
    return {"field": field, "message": message}


def parse_start(body: Any, num_clients: int) -> tuple[RunSettings, bool]:
    """POST /start body (a JSON object; {} for defaults) → (settings, wait).
    Raises SettingsError (a ProtocolError) naming every field that cannot
    work, so a bad run never starts and the form can say all that is wrong."""
    obj = expect_object(body, "", START_FIELDS)  # not an object, or unknown fields: nothing else to check
    problems: list[ProtocolError] = []

    def check(parse: Callable[[], Any], fallback: Any) -> Any:
        """parse(), or note its error and carry on with ``fallback``."""
        try:
            return parse()
        except ProtocolError as e:
            problems.append(e)
            return fallback

    # lr, local_epochs, batch_size and mu mean exactly what they mean to a
    # client, so the client's own parser checks them, one field at a time.
    train, bad = {}, object()
    for k in LOCAL_TRAINING_FIELDS:
        if k in obj:
            value = check(lambda k=k: getattr(parse_train_config({k: obj[k]}, ""), k), bad)
            if value is not bad:  # (batch_size may be None: the whole data set)
                train[k] = value
    settings = RunSettings(**train)
    strategy = check(lambda: _strategy_name(obj, settings.mu), None)
    if strategy is not None:
        kind = STRATEGIES[strategy]
        if not kind.uses_mu and settings.mu > 0:
            problems.append(ProtocolError(
                f"mu: the proximal term belongs to strategy fedprox; {strategy} needs mu = 0"))
        if kind.uses_mu and "mu" not in obj:
            settings = replace(settings, mu=FEDPROX_DEFAULT_MU)
        if kind.uses_mu and settings.mu == 0 and "mu" in train:  # (a mu that did not parse is already named)
            problems.append(ProtocolError(f"mu: strategy {strategy} needs mu > 0"))
        settings = replace(settings, strategy=strategy, params=_strategy_params(kind, obj, problems),
                           robust=_robust(strategy, obj, num_clients, problems))
        if kind.one_round and "rounds" not in obj:
            settings = replace(settings, rounds=1)  # its one round already gives the answer
    if "rounds" in obj:
        settings = replace(settings, rounds=check(
            lambda: expect_int(obj["rounds"], "rounds", ge=1, le=MAX_ROUNDS), settings.rounds))
    if "fraction" in obj:
        settings = replace(settings, fraction=check(
            lambda: expect_number(obj["fraction"], "fraction", gt=0, le=1), settings.fraction))
    if "min_clients" in obj:
        settings = replace(settings, min_clients=check(
            lambda: expect_int(obj["min_clients"], "min_clients", ge=1), settings.min_clients))
    if settings.min_clients > num_clients:
        problems.append(ProtocolError(f"min_clients: {settings.min_clients} is more than the {num_clients} "
                                      "client(s) this server is configured with"))
    seed = obj.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else check(
        lambda: expect_int(seed, "seed", ge=0, le=2**63 - 1), None)
    settings = replace(settings, seed=seed)
    if obj.get("init") is not None:
        init = check(lambda: parse_model(obj["init"], "init"), None)
        if init is not None:
            settings = replace(settings, init={"w": init[0].tolist(), "b": init[1]})
    if "pace_s" in obj:
        settings = replace(settings, pace_s=check(
            lambda: expect_number(obj["pace_s"], "pace_s", ge=0, le=MAX_PACE_S), settings.pace_s))
    if "client_timeout_s" in obj:
        settings = replace(settings, client_timeout_s=check(lambda: expect_number(
            obj["client_timeout_s"], "client_timeout_s", gt=0, le=MAX_CLIENT_TIMEOUT_S), settings.client_timeout_s))
    if obj.get("dp") is not None:
        settings = replace(settings, dp=_dp(obj, settings, num_clients, problems))
    if obj.get("secagg") not in (None, False):
        settings = replace(settings, secagg=_secagg(obj["secagg"], settings, num_clients, problems))
    wait = check(lambda: expect_bool(obj["wait"], "wait"), True) if "wait" in obj else True
    if problems:
        raise SettingsError(problems)
    return settings, wait


def _strategy_name(obj: dict[str, Any], mu: float) -> str:
    strategy = expect_str(obj.get("strategy", "fedprox" if mu > 0 else "fedavg"), "strategy")
    if strategy not in STRATEGIES:
        raise ProtocolError(f"strategy: unknown strategy {str(strategy)[:40]!r} (known: {', '.join(STRATEGIES)})")
    return strategy


def _strategy_params(kind: type[Strategy], obj: dict[str, Any],
                     problems: list[ProtocolError]) -> dict[str, float]:
    """The strategy's own settings from the /start body, defaults filled in;
    a setting that belongs to another strategy is a mistake worth naming.
    Each problem is added to ``problems``."""
    own = {p.name for p in kind.params}
    for name in PARAM_NAMES:
        if name in obj and name not in own:
            users = ", ".join(s for s, k in STRATEGIES.items() if name in {p.name for p in k.params})
            problems.append(ProtocolError(f"{name}: not a setting of strategy {kind.name} (it belongs to {users})"))
    params = {}
    for p in kind.params:
        try:
            params[p.name] = (expect_number(obj[p.name], p.name, gt=p.gt, ge=p.ge, lt=p.lt, le=p.le)
                              if p.name in obj else p.default)
        except ProtocolError as e:
            problems.append(e)
            params[p.name] = p.default
    return params


def _robust(strategy: str, obj: dict[str, Any], num_clients: int,
            problems: list[ProtocolError]) -> dict[str, Any] | None:
    """The robust rule's settings from the /start body (None: FedAvg's
    weighted average). A setting of another rule is a mistake worth naming."""
    given = [f for f in ROBUST_FIELDS if f in obj]
    if not given:
        return None
    if not STRATEGIES[strategy].combines:
        problems.append(ProtocolError(f"{given[0]}: strategy {strategy} sums the clients' statistics; "
                                      "a robust rule does not apply to it"))
        return None
    out: dict[str, Any] = {}
    try:
        out["aggregator"] = expect_str(obj.get("aggregator", "mean"), "aggregator")
        if out["aggregator"] not in AGGREGATORS:
            raise ProtocolError(f"aggregator: unknown {out['aggregator'][:40]!r} (known: {', '.join(AGGREGATORS)})")
    except ProtocolError as e:
        problems.append(e)
        return None
    rule = out["aggregator"]
    belongs = {"trim": "trimmed_mean", "byzantine": "krum", "krum_m": "krum", "max_weight": "mean"}
    for name, owner in belongs.items():
        if name in obj and rule != owner:
            problems.append(ProtocolError(f"{name}: a setting of aggregator {owner}, not {rule}"))
    checks = {
        "trim": lambda v: expect_number(v, "trim", ge=0, lt=0.5),
        "byzantine": lambda v: expect_int(v, "byzantine", ge=0, le=max(num_clients - 3, 0)),
        "krum_m": lambda v: expect_int(v, "krum_m", ge=1, le=num_clients),
        "clip_norm": lambda v: expect_number(v, "clip_norm", gt=0),
        "max_weight": lambda v: expect_number(v, "max_weight", gt=0, le=1),
    }
    for name, check in checks.items():
        if name in obj:
            try:
                out[name] = check(obj[name])
            except ProtocolError as e:
                problems.append(e)
    if rule == "krum" and num_clients <= out.get("byzantine", 1) + 2:
        problems.append(ProtocolError(f"aggregator: krum with byzantine={out.get('byzantine', 1)} needs more than "
                                      f"{out.get('byzantine', 1) + 2} clients; this server has {num_clients}"))
    return out


def _dp(obj: dict[str, Any], settings: RunSettings, num_clients: int,
        problems: list[ProtocolError]) -> dict[str, Any] | None:
    """DP-FedAvg's settings from the /start body's "dp" object, defaults
    filled in, with ``expected`` = M = q·K (the denominator of every round's
    release) and ``update_noise_multiplier`` (σ, or z_Δ with adaptive clipping)."""
    try:
        dp = expect_object(obj["dp"], "dp", DP_FIELDS, ("noise_multiplier", "clip"))
    except ProtocolError as e:
        problems.append(e)
        return None
    found = len(problems)

    def field(name: str, parse: Callable[[Any, str], Any], default: Any = None) -> Any:
        if dp.get(name) is None:
            return default
        try:
            return parse(dp[name], f"dp.{name}")
        except ProtocolError as e:
            problems.append(e)
            return default

    sigma = field("noise_multiplier", lambda v, at: expect_number(v, at, ge=0, le=1e6), 0.0)
    bound = field("clip", lambda v, at: expect_number(v, at, gt=0, le=1e12), math.inf)
    out = {"noise_multiplier": sigma, "clip": None if math.isinf(bound) else bound,
           "delta": field("delta", lambda v, at: expect_number(v, at, gt=0, lt=1), DP_DELTA),
           "target_epsilon": field("target_epsilon", lambda v, at: expect_number(v, at, gt=0, le=1e6)),
           "local_noise": field("local_noise", expect_bool, False),
           "expected": settings.fraction * num_clients, "adaptive": None}
    _averages_models("dp", "DP-FedAvg's clipped, noised average of the models replaces it", settings, problems)
    if dp.get("clip") is None and sigma > 0:
        problems.append(ProtocolError("dp.clip: noise is σ·S: it needs a finite clip bound S when "
                                      "noise_multiplier > 0"))
    if out["target_epsilon"] is not None and sigma == 0:
        problems.append(ProtocolError("dp.target_epsilon: without noise (noise_multiplier = 0) ε is infinite"))
    if dp.get("adaptive") is not None:
        out["adaptive"] = _adaptive(dp["adaptive"], sigma, out["expected"], dp.get("clip") is None, problems)
    if len(problems) > found:
        return None
    out["update_noise_multiplier"] = (update_noise_multiplier(sigma, out["adaptive"]["count_noise"])
                                      if out["adaptive"] else sigma)
    return out


def _adaptive(value: Any, sigma: float, expected: float, no_bound: bool,
              problems: list[ProtocolError]) -> dict[str, float] | None:
    """Adaptive clipping's settings (Andrew et al., 2021): the quantile γ of
    update norms S should track, the step η, and σ_b, the noise on the count
    of unclipped clients (default: M/20, the paper's choice, or σ if larger)."""
    try:
        obj = expect_object(value, "dp.adaptive", ADAPTIVE_FIELDS)
        out = {"target_quantile": expect_number(obj.get("target_quantile", ADAPTIVE_QUANTILE),
                                                "dp.adaptive.target_quantile",
                                                gt=0, lt=1),
               "lr": expect_number(obj.get("lr", ADAPTIVE_LR), "dp.adaptive.lr", gt=0, le=10),
               "count_noise": (expect_number(obj["count_noise"], "dp.adaptive.count_noise", ge=0, le=1e6)
                               if "count_noise" in obj else max(expected / 20, sigma))}
    except ProtocolError as e:
        problems.append(e)
        return None
    if no_bound:
        problems.append(ProtocolError("dp.adaptive: adapts a finite clip bound; give dp.clip as its start"))
    if sigma > 0 and not 2 * out["count_noise"] > sigma:
        problems.append(ProtocolError(f"dp.adaptive.count_noise: must be > noise_multiplier/2 = {sigma / 2:g}, so "
                                      "that the update keeps some of the noise; got " f"{out['count_noise']:g}"))
    return out


def _averages_models(name: str, because: str, settings: RunSettings, problems: list[ProtocolError]) -> None:
    """DP and secure aggregation both work on the average of the models: a
    strategy that sends more, or a rule that needs each update, is a 400."""
    if settings.strategy not in MODEL_AVERAGING:
        problems.append(ProtocolError(f"{name}: strategy {settings.strategy} needs more than the average of the "
                                      f"models, and {because} (strategies: {', '.join(MODEL_AVERAGING)})"))
    if settings.robust:
        problems.append(ProtocolError(f"{name}: {', '.join(sorted(settings.robust))} needs each update, and "
                                      f"{because}"))


def sampled_per_round(fraction: float, min_clients: int, num_clients: int) -> int:
    """How many clients a round asks: max(min_clients, ⌈fraction·K⌉), at most K."""
    return min(num_clients, max(min_clients, math.ceil(fraction * num_clients - 1e-9)))


def _secagg(value: Any, settings: RunSettings, num_clients: int,
            problems: list[ProtocolError]) -> dict[str, int] | None:
    """Secure aggregation's settings: ``true`` for the defaults, or
    {"neighbors": k, "threshold": t, "scale_bits": s}. Each client masks
    with and shares its secrets among k others (SecAgg+'s graph; k = the
    clients a round asks − 1 is the complete graph, Bonawitz et al.'s
    protocol): 1 ≤ k < the clients a round asks, default the complete graph
    up to 20 clients, else 2⌈log2 n⌉ (fedavg.secagg_graph). t
    shares rebuild a secret, so t survivors are needed in a neighbourhood of
    k + 1 and fewer than t of a client's neighbours together learn nothing
    of it; 2 ≤ t ≤ k + 1 (default: a majority of k + 1). Inputs are fixed
    point with s fractional bits."""
    asked = sampled_per_round(settings.fraction, settings.min_clients, num_clients)
    try:
        obj = {} if value is True else expect_object(value, "secagg", SECAGG_FIELDS)
        out = {"neighbors": (expect_int(obj["neighbors"], "secagg.neighbors", ge=1, le=max(asked - 1, 1))
                             if "neighbors" in obj else default_neighbors(asked)),
               "threshold": expect_int(obj["threshold"], "secagg.threshold", ge=2) if "threshold" in obj else None,
               "scale_bits": expect_int(obj.get("scale_bits", SECAGG_SCALE_BITS), "secagg.scale_bits", ge=8, le=40)}
    except ProtocolError as e:
        problems.append(e)
        return None
    found = len(problems)
    k = out["neighbors"]
    if out["threshold"] is None:
        out["threshold"] = default_threshold(k)
    if asked < 2:
        problems.append(ProtocolError(f"secagg: a round asks {asked} client; a sum of one client's input is that "
                                      "input (secure aggregation needs at least 2)"))
    elif k == 1 and asked > 2:
        problems.append(ProtocolError(f"secagg.neighbors: with 1 neighbour each the {asked} clients fall apart into "
                                      "pairs, and the server would learn each pair's sum (at least 2)"))
    if out["threshold"] > k + 1:
        problems.append(ProtocolError(
            f"secagg.threshold: {out['threshold']} is more than the {asked} clients a round asks" if k == asked - 1
            else f"secagg.threshold: {out['threshold']} is more than the {k + 1} clients of a neighbourhood (a "
                 f"client and its {k} neighbours): no secret could be rebuilt"))
    _averages_models("secagg", "the server learns only the sum of the models", settings, problems)
    if settings.dp and not settings.dp["local_noise"]:
        problems.append(ProtocolError("secagg: with dp the server cannot clip or noise updates it cannot see; "
                                      "set dp.local_noise to true (each client adds its share of the noise)"))
    return out if len(problems) == found else None
