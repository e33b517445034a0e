"""The strategies: how clients train and how the server combines their replies.

Each is a small class in a module of its own (``base`` says what a strategy
is). ``STRATEGIES`` maps each name to its class; ``combine.RULES`` each
robust rule's name to the rule (``rule`` says what a rule is).
"""
from __future__ import annotations

from .base import BatchMemory, ClientTask, Local, LocalBatch, Param, Result, RunMemory, State, Step, Strategy
from .combine import AGGREGATORS, ROBUST, ROBUST_OWNER, RULES, CannotCombine, Combine
from .exact import Exact
from .fedavg import FedAvg, FedProx
from .fednova import FedNova
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from .fedsgd import FedSGD
from .fields import LOCAL_MODEL, Field
from .rule import Rule
from .scaffold import Scaffold

# The registry, in the order the page and the docs list them. A strategy here
# is known everywhere without another edit: /health, /start's checks and its
# OpenAPI schema, the page's form, the log's math, make compare.
STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (
    FedAvg, FedSGD, FedProx, Scaffold, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedNova, Exact,
)}
# Every field any strategy's clients send back, each once, in a stable order.
REPLY_FIELDS: tuple[Field, ...] = tuple(dict.fromkeys(f for s in STRATEGIES.values() for f in s.replies))
SENT_FIELDS: tuple[Field, ...] = tuple(dict.fromkeys(f for s in STRATEGIES.values() for f in s.sends))
# Every server-side parameter any strategy has, each once (the same name means
# the same thing everywhere; its default may differ by strategy).
PARAM_NAMES: tuple[str, ...] = tuple(dict.fromkeys(p.name for s in STRATEGIES.values() for p in s.params))

__all__ = ["STRATEGIES", "PARAM_NAMES", "REPLY_FIELDS", "SENT_FIELDS", "AGGREGATORS", "ROBUST", "ROBUST_OWNER",
           "RULES", "CannotCombine", "Combine", "Rule",
           "BatchMemory", "ClientTask", "Field", "LOCAL_MODEL", "Local", "LocalBatch", "Param", "Result", "RunMemory",
           "State", "Step", "Strategy"]
