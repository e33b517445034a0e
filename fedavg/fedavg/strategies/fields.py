"""What a strategy's messages carry, declared once.

A strategy lists the fields its clients send back (``replies``) and those
the server sends them besides θ_t (``sends``). A field has a name (its key
on the wire, in the round record and in GET /runs), a kind (how its value
crosses the wire: a model-shaped vector, a step count, least-squares sums)
and a privacy (a function of the client's data is shown only to the
server's operator). The wire codecs, the OpenAPI documents, the round
record, access control, the log and the page all loop over these
declarations: a strategy with a new field is one new ``Field`` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model import as_theta, split
from ..strict_json import MAX_FEATURES, ProtocolError, expect_int, expect_number, expect_object, model_json, parse_model
from ..trace import fmt_model

MODEL_SCHEMA = {"$ref": "#/components/schemas/Model"}


class Kind:
    """How a value crosses the wire: parsed from JSON (naming the field when
    it is wrong), written as JSON, described in OpenAPI, shown in the log."""

    name: str

    def parse(self, value: Any, path: str, num_features: int | None) -> Any:
        raise NotImplementedError

    def to_json(self, value: Any) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def text(self, label: str, value: Any) -> str:
        """The field as the log writes it, from its JSON."""
        raise NotImplementedError

    def finite(self, value: Any) -> bool:
        """Can JSON carry it? (A diverged client's numbers cannot.)"""
        return True


class ModelKind(Kind):
    """A vector shaped like θ = [w…, b]: {"w": number or list, "b"} on the wire."""

    name = "model"

    def parse(self, value: Any, path: str, num_features: int | None) -> np.ndarray:
        return as_theta(*parse_model(value, path, num_features))

    def to_json(self, value: np.ndarray) -> dict[str, Any]:
        return model_json(*split(value))

    def schema(self) -> dict[str, Any]:
        return MODEL_SCHEMA

    def text(self, label: str, value: Any) -> str:
        return f"{label}: {fmt_model(np.atleast_1d(np.asarray(value['w'], dtype=float)), value['b'])}"

    def finite(self, value: np.ndarray) -> bool:
        return bool(np.all(np.isfinite(value)))


class CountKind(Kind):
    """A whole number of at least 1 (a count of local steps)."""

    name = "count"

    def parse(self, value: Any, path: str, num_features: int | None) -> int:
        return expect_int(value, path, ge=1)

    def to_json(self, value: int) -> int:
        return int(value)

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": 1}

    def text(self, label: str, value: Any) -> str:
        return f"{label}={value}"


class StatsKind(Kind):
    """Least squares' sufficient statistics of a client's rows:
    {"xtx": Σ x̃x̃ᵀ, (d+1)×(d+1) symmetric, "xty": Σ x̃y, d+1 numbers}."""

    name = "stats"

    def parse(self, value: Any, path: str, num_features: int | None) -> dict[str, np.ndarray]:
        obj = expect_object(value, path, ("xtx", "xty"), ("xtx", "xty"))
        xty = obj["xty"]
        if not isinstance(xty, list) or not 2 <= len(xty) <= MAX_FEATURES + 1:
            raise ProtocolError(f"{path}.xty: must be a list of 2 to {MAX_FEATURES + 1} numbers")
        dim = len(xty)
        if num_features is not None and dim != num_features + 1:
            raise ProtocolError(f"{path}.xty: has {dim} entries, the model has {num_features + 1}")
        rows = obj["xtx"]
        if not isinstance(rows, list) or len(rows) != dim or not all(isinstance(r, list) and len(r) == dim
                                                                     for r in rows):
            raise ProtocolError(f"{path}.xtx: must be a {dim}×{dim} list of lists")
        xtx = np.array([[expect_number(v, f"{path}.xtx[{i}][{j}]") for j, v in enumerate(row)]
                        for i, row in enumerate(rows)])
        if not np.allclose(xtx, xtx.T, rtol=1e-9, atol=0.0):
            raise ProtocolError(f"{path}.xtx: must be symmetric (it is Σ x̃x̃ᵀ)")
        return {"xtx": xtx, "xty": np.array([expect_number(v, f"{path}.xty[{i}]") for i, v in enumerate(xty)])}

    def to_json(self, value: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"xtx": value["xtx"].tolist(), "xty": value["xty"].tolist()}

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["xtx", "xty"]}

    def text(self, label: str, value: Any) -> str:
        return f"{label}: Σ x̃x̃ᵀ, Σ x̃y"

    def finite(self, value: dict[str, np.ndarray]) -> bool:
        return bool(np.all(np.isfinite(value["xtx"])) and np.all(np.isfinite(value["xty"])))


MODEL, COUNT, STATS = ModelKind(), CountKind(), StatsKind()


@dataclass(frozen=True)
class Field:
    """One field of a strategy's messages."""

    name: str  # its key on the wire, in the round record and in GET /runs
    kind: Kind
    label: str  # how the log names it
    columns: tuple[str, ...]  # the page's column heads for it (model: w and b; stats: the two sums)
    help: str  # its description in the OpenAPI documents
    private: bool = True  # a function of the client's data: shown only with the token
    # Which of a client's fields is its update, for the outlier flags and an
    # attacker's lie: "global" (the update is the value − W_t) or "zero" (the value is the update).
    update_from: str | None = None

    def describe(self) -> dict[str, Any]:
        """The field as the page reads it (its columns and kind)."""
        return {"name": self.name, "kind": self.kind.name, "columns": list(self.columns)}


LOCAL_MODEL = Field("local_model", MODEL, "local model", ("local w_k", "local b_k"),
                    "W_k, the client's model after local training", update_from="global")
GRADIENT = Field("gradient", MODEL, "gradient", ("gradient ∂L_k/∂w", "∂L_k/∂b"),
                 "g_k = ∇L_k(W_t), the full-batch gradient of the client's MSE (fedsgd)", update_from="zero")
CONTROL_DELTA = Field("control_delta", MODEL, "control_delta", ("Δc_k (w)", "Δc_k (b)"),
                      "Δc_k = c_k⁺ − c_k, the change of the client's control variate (scaffold)")
STEPS = Field("steps", COUNT, "steps τ_k", ("steps τ_k",), "τ_k, the local steps the client took (fednova)")
STATS = Field("stats", STATS, "stats", ("Σx̃x̃ᵀ", "Σx̃y"),
              "Σ x̃x̃ᵀ and Σ x̃y over the client's rows, x̃ = [x, 1] (exact)")
CONTROL = Field("control", MODEL, "control", ("c (w)", "c (b)"), "scaffold only: the server's c", private=False)
