"""A run's settings: what ``POST /start`` may say, checked before anything starts.

Every field is declared once as a ``Param`` (``fedavg.spec``): the parser
here, the OpenAPI document, the page's form and docs/PROTOCOL.md's tables
come from the declarations. The local training fields are the client's own
(``fedavg.wire.LOCAL_TRAINING``), the robust rule's are ``Combine``'s, the
strategies' are theirs, DP's and secure aggregation's are their settings
classes' (``privacy_settings``).
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from fedavg.spec import Param
from fedavg.strategies import PARAM_NAMES, ROBUST, ROBUST_OWNER, STRATEGIES, Combine, Strategy
from fedavg.strict_json import ProtocolError, _json_type, expect_object
from fedavg.training import TrainConfig
from fedavg.wire import LOCAL_TRAINING

from .privacy_settings import DPSettings, SecAggSettings, parse_fields

MAX_ROUNDS = 100_000
MAX_PACE_S = 60.0
MAX_CLIENT_TIMEOUT_S = 600.0
FEDPROX_DEFAULT_MU = 0.01

ROUNDS = Param("rounds", 5, "rounds to run", type="integer", ge=1, le=MAX_ROUNDS,
               doc_default="`5` (a strategy whose first round gives the answer, `exact`: 1)")
STRATEGY = Param("strategy", "fedavg", "see [STRATEGIES.md](STRATEGIES.md); only `fedprox` takes `mu` (> 0)",
                 type="string", choices=tuple(STRATEGIES), doc_default='`"fedavg"` (`"fedprox"` if `mu` > 0 is given)')
TRAINING = {p.name: p for p in LOCAL_TRAINING}
MU = replace(TRAINING["mu"], doc_default=f"`0` (`fedprox` without `mu`: {FEDPROX_DEFAULT_MU})")
FRACTION = Param("fraction", 1.0, "share of the K clients asked each round", gt=0, le=1)
MIN_CLIENTS = Param("min_clients", 1, "fewer good replies in a round ends the run as `failed`", type="integer", ge=1,
                    doc_range="`[1, K]`")
SEED = Param("seed", None, "decides client sampling and each client's shuffle seed; always recorded",
             type="integer", ge=0, le=2**63 - 1, nullable=True, doc_default="drawn at random")
INIT = Param("init", None, "starting global model; its `w` must match the clients' feature count (a 400 when "
             "their `/health` says otherwise; the run fails at its start when only their replies do)",
             type="model", nullable=True, doc_default="all zeros")
PACE = Param("pace_s", 0.0, "pause between rounds, in seconds", ge=0, le=MAX_PACE_S)
TIMEOUT = Param("client_timeout_s", 10.0, "how long to wait for each client call; sent to the client as "
                "`X-Deadline-S`", gt=0, le=MAX_CLIENT_TIMEOUT_S)
WAIT = Param("wait", True, "answer when the run ends (`true`) or at once with 202 (`false`)", type="boolean")
DP = Param("dp", None, "DP-FedAvg: the `dp.*` table and [PRIVACY.md](PRIVACY.md)", type="DPSettings",
           nullable=True, doc_default="`null` (no DP)")
SECAGG = Param("secagg", None, "secure aggregation: `true` for the defaults, or the `secagg.*` table; see "
               "[PRIVACY.md](PRIVACY.md#secure-aggregation-secagg-on-a-run)", type="boolean or SecAggSettings",
               nullable=True, doc_default="`null` (models in the clear)")


def strategy_params() -> list[Param]:
    """Every strategy's own settings, each name once (it means the same in
    every strategy that has it): the widest bounds any allows (each checks
    its own), and each strategy's default."""
    merged = []
    for name in PARAM_NAMES:
        owners = [(s, p) for s, kind in STRATEGIES.items() for p in kind.params if p.name == name]
        defaults: dict[float, list[str]] = {}
        for s, p in owners:
            defaults.setdefault(p.default, []).append(s)
        lows = [(p.gt, p.ge) for _, p in owners]
        highs = [(p.lt, p.le) for _, p in owners]
        low = min(lows, key=lambda b: b[0] if b[0] is not None else b[1])
        high = max(highs, key=lambda b: b[0] if b[0] is not None else b[1])
        merged.append(Param(name, None, "; ".join(dict.fromkeys(p.help for _, p in owners)), gt=low[0], ge=low[1],
                            lt=high[0], le=high[1], doc_default="the strategy's: " + ", ".join(
                                f"{d:g} ({', '.join(f'`{s}`' for s in who)})" for d, who in defaults.items())))
    return merged


def start_params(num_clients: int | None = None) -> tuple[Param, ...]:
    """Every field of a /start body, in the order the docs list them; with
    ``num_clients``, the bounds that depend on the server's K clients set."""
    robust = {p.name: p for p in ROBUST}
    if num_clients is not None:
        robust["byzantine"] = robust["byzantine"].bounded(le=max(krum_tolerates(num_clients), 0))
        robust["krum_m"] = robust["krum_m"].bounded(le=max(num_clients, 1))
    clients = MIN_CLIENTS.bounded(le=num_clients) if num_clients is not None else MIN_CLIENTS
    return (ROUNDS, STRATEGY, TRAINING["lr"], TRAINING["local_epochs"], TRAINING["batch_size"], MU, FRACTION,
            clients, SEED, INIT, PACE, TIMEOUT, WAIT, *strategy_params(), *robust.values(), DP, SECAGG)


START_FIELDS = tuple(p.name for p in start_params())


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides a run; stored with it, so a run can be re-read
    (and repeated: the seed is always recorded, drawn at random if not given)."""

    rounds: int = ROUNDS.default
    strategy: str = STRATEGY.default
    lr: float = TRAINING["lr"].default
    local_epochs: int = TRAINING["local_epochs"].default
    batch_size: int | None = TRAINING["batch_size"].default
    mu: float = TRAINING["mu"].default
    fraction: float = FRACTION.default
    min_clients: int = MIN_CLIENTS.default
    seed: int | None = None
    init: dict[str, Any] | None = None  # {"w", "b"}; None = all zeros
    pace_s: float = PACE.default
    client_timeout_s: float = TIMEOUT.default
    params: dict[str, float] | None = None  # the strategy's own settings (server_lr, beta1, …), defaults filled in
    robust: Combine | None = None  # a robust rule instead of the average; None = FedAvg's weighted mean
    dp: DPSettings | None = None  # DP-FedAvg's settings; None = no DP
    secagg: SecAggSettings | None = None  # secure aggregation's k, t and fixed point; None = models in the clear

    def train_config(self, client_seed: int | None, run: str | None = None, dp_clip: float | None = None,
                     dp_noise_std: float = 0.0) -> TrainConfig:
        return TrainConfig(lr=self.lr, local_epochs=self.local_epochs, batch_size=self.batch_size,
                           mu=self.mu, seed=client_seed, strategy=self.strategy, run=run, dp_clip=dp_clip,
                           dp_noise_std=dp_noise_std)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> RunSettings:
        """The inverse of ``to_json``, for a run stored by this or an earlier
        version (whose robust settings held only the fields given)."""
        robust, dp, secagg = stored.get("robust"), stored.get("dp"), stored.get("secagg")
        return cls(**{**stored, "robust": None if robust is None else Combine(**robust),
                      "dp": None if dp is None else DPSettings.from_json(dp),
                      "secagg": None if secagg is None else SecAggSettings(**secagg)})


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
    # min_clients above K gets a message of its own, below; the other K-bound fields say their bound.
    spec = {p.name: p for p in start_params(num_clients)} | {"min_clients": MIN_CLIENTS}

    def value(name: str, fallback: Any) -> Any:
        """The field parsed when the body gives it (its problem noted), else ``fallback``."""
        return parse_fields(obj, (spec[name],), "", problems).get(name, fallback)

    # lr, local_epochs, batch_size and mu mean exactly what they mean to a client: its own Params check them.
    settings = RunSettings(**{k: value(k, TRAINING[k].default) for k in TRAINING})
    strategy = value("strategy", None) if "strategy" in obj else "fedprox" if settings.mu > 0 else "fedavg"
    if strategy is not None:
        settings = _with_strategy(settings, STRATEGIES[strategy], obj, num_clients, problems)
    settings = replace(settings, rounds=value("rounds", settings.rounds), fraction=value("fraction", settings.fraction),
                       min_clients=value("min_clients", settings.min_clients),
                       seed=value("seed", None), init=value("init", None), pace_s=value("pace_s", settings.pace_s),
                       client_timeout_s=value("client_timeout_s", settings.client_timeout_s))
    if settings.min_clients > num_clients:
        problems.append(ProtocolError(f"min_clients: {settings.min_clients} is more than the {num_clients} "
                                      "client(s) this server is configured with"))
    if settings.seed is None:
        settings = replace(settings, seed=secrets.randbelow(2**31))
    if obj.get("dp") is not None:
        settings = replace(settings, dp=DPSettings.parse(obj["dp"], settings.fraction, num_clients, _averages_models(
            "dp", "DP-FedAvg's clipped, noised average of the models replaces it", settings, obj), problems))
    if not isinstance(obj.get("secagg"), (bool, dict, type(None))):
        # 0 == False in Python: without this check "secagg": 0 ran with models in the clear
        problems.append(ProtocolError(f"secagg: must be true, false, null or an object of secagg.* settings, got "
                                      f"{_json_type(obj['secagg'])}"))
    elif obj.get("secagg") not in (None, False):
        asked = sampled_per_round(settings.fraction, settings.min_clients, num_clients)
        secagg = SecAggSettings.parse(obj["secagg"], asked, problems)
        problems += _averages_models("secagg", "the server learns only the sum of the models", settings, obj)
        if settings.dp and not settings.dp.local_noise:
            problems.append(ProtocolError("secagg: with dp the server cannot clip or noise updates it cannot see; "
                                          "set dp.local_noise to true (each client adds its share of the noise)"))
        settings = replace(settings, secagg=None if problems else secagg)
    wait = value("wait", True)
    if problems:
        raise SettingsError(problems)
    return settings, wait


def _with_strategy(settings: RunSettings, kind: type[Strategy], obj: Mapping[str, Any], num_clients: int,
                   problems: list[ProtocolError]) -> RunSettings:
    """The strategy, its own settings and the robust rule; each problem added to ``problems``."""
    if not kind.uses_mu and settings.mu > 0:
        problems.append(ProtocolError(f"mu: the proximal term belongs to strategy fedprox; {kind.name} needs mu = 0"))
    if kind.uses_mu and "mu" not in obj:
        settings = replace(settings, mu=FEDPROX_DEFAULT_MU)
    if kind.uses_mu and settings.mu == 0 and "mu" in obj and isinstance(obj["mu"], (int, float)):
        problems.append(ProtocolError(f"mu: strategy {kind.name} needs mu > 0"))  # (a mu that did not parse is named)
    # A setting of another strategy is a mistake worth naming.
    own = {p.name for p in kind.params}
    for name in PARAM_NAMES:
        if name in obj and name not in own:
            users = ", ".join(s for s, k in STRATEGIES.items() if name in {p.name for p in k.params})
            problems.append(ProtocolError(f"{name}: not a setting of strategy {kind.name} (it belongs to {users})"))
    params = {p.name: p.default for p in kind.params} | parse_fields(obj, kind.params, "", problems)
    settings = replace(settings, strategy=kind.name, params=params, robust=_robust(kind, obj, num_clients, problems))
    if kind.one_round and "rounds" not in obj:
        settings = replace(settings, rounds=1)  # its one round already gives the answer
    return settings


def _robust(kind: type[Strategy], obj: Mapping[str, Any], num_clients: int,
            problems: list[ProtocolError]) -> Combine | None:
    """The robust rule from the /start body (None: FedAvg's weighted average).
    A setting of another rule is a mistake worth naming."""
    given = [p.name for p in ROBUST if p.name in obj]
    if not given:
        return None
    if not kind.combines:
        problems.append(ProtocolError(f"{given[0]}: strategy {kind.name} sums the clients' statistics; "
                                      "a robust rule does not apply to it"))
        return None
    spec = {p.name: p for p in start_params(num_clients)}
    rule = Combine.aggregator
    if "aggregator" in obj:
        rule = parse_fields(obj, (spec["aggregator"],), "", problems).get("aggregator")
        if rule is None:
            return None
    for name, owner in ROBUST_OWNER.items():
        if name in obj and rule != owner:
            problems.append(ProtocolError(f"{name}: a setting of aggregator {owner}, not {rule}"))
    # byzantine's bound depends on K: checked below, where the message can say why.
    spec["byzantine"] = next(p for p in ROBUST if p.name == "byzantine")
    out = Combine(**{"aggregator": rule, **parse_fields(obj, tuple(spec[n] for n in given if n != "aggregator"), "",
                                                         problems)})
    if rule == "krum" and krum_tolerates(num_clients) < 0:
        problems.append(ProtocolError(f"aggregator: krum needs at least 3 clients (K ≥ 2f + 3, even with f = 0); "
                                      f"this server has {num_clients}"))
    elif rule == "krum" and out.byzantine > krum_tolerates(num_clients):
        problems.append(ProtocolError(f"byzantine: krum holds f attackers only among K ≥ 2f + 3 clients (Blanchard "
                                      f"et al., 2017); this server has {num_clients}, so byzantine is at most "
                                      f"{krum_tolerates(num_clients)}, got {out.byzantine}"
                                      + ("" if "byzantine" in obj else " (its default)")))
    return out


def krum_tolerates(num_clients: int) -> int:
    """The most attackers f Krum holds among K clients: Blanchard et al.
    (2017) prove it resilient when K ≥ 2f + 3, so f = ⌊(K − 3)/2⌋ (negative:
    no f, K < 3). Beyond it, f attackers that agree outvote the honest
    clients' neighbourhoods (K = 10 with f = 7 and 2 attackers sending
    w = b = 10¹² ends at 10¹²)."""
    return (num_clients - 3) // 2


# The strategies whose server step starts from the average of the local
# models (``averages_models``): what DP-FedAvg's noised average replaces, and
# all that secure aggregation gives the server. FedSGD, SCAFFOLD and FedNova
# send more than a model (gradients, control variates, step counts); exact
# sends statistics.
MODEL_AVERAGING = tuple(name for name, kind in STRATEGIES.items() if kind.averages_models)


def _averages_models(name: str, because: str, settings: RunSettings, obj: Mapping[str, Any]) -> list[ProtocolError]:
    """DP and secure aggregation both work on the average of the models: a
    strategy that sends more, or a rule that needs each update, is a 400."""
    problems = []
    if settings.strategy not in MODEL_AVERAGING:
        problems.append(ProtocolError(f"{name}: strategy {settings.strategy} needs more than the average of the "
                                      f"models, and {because} (strategies: {', '.join(MODEL_AVERAGING)})"))
    robust = sorted(p.name for p in ROBUST if p.name in obj)
    if robust:
        problems.append(ProtocolError(f"{name}: {', '.join(robust)} needs each update, and {because}"))
    return problems


def sampled_per_round(fraction: float, min_clients: int, num_clients: int) -> int:
    """How many clients a round asks: max(min_clients, ⌈fraction·K⌉), at most K."""
    return min(num_clients, max(min_clients, math.ceil(fraction * num_clients - 1e-9)))
