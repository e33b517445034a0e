"""Settings written once: each field's type, bounds, default and meaning.

A ``Param`` is one field of a message or of a run's settings. The parser
(``parse``), the OpenAPI schema (``schema``), the page's form and the tables
of docs/PROTOCOL.md (``doc_row``, written by scripts/protocol_tables.py) all
come from it, so none of them can disagree with another.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .strict_json import ProtocolError, expect_bool, expect_int, expect_number, expect_str, parse_model

MODEL_REF = "#/components/schemas/Model"


@dataclass(frozen=True)
class Param:
    """One field: its JSON type, bounds, default and meaning."""

    name: str
    default: Any
    help: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    # number, integer, boolean, string, model ({"w", "b"}), or the name of an
    # object's schema; "boolean or X" for a flag that may also be an object X.
    type: str = "number"
    nullable: bool = False  # null is a value of its own (not only "use the default")
    choices: tuple[str, ...] = ()  # a string's allowed values
    max_len: int = 200  # a string's
    doc_default: str | None = None  # the doc's Default cell when no one value says it ("drawn at random")
    doc_range: str | None = None  # the doc's Range cell when a bound is not a number ("[1, K]")

    def bounded(self, **bounds: float | None) -> Param:
        """The same field with bounds that depend on the server (its K clients)."""
        return replace(self, **bounds)

    def parse(self, value: Any, path: str | None = None) -> Any:
        """The value checked, or ProtocolError naming the field and what is wrong."""
        at = path or self.name
        if value is None and self.nullable:
            return None
        if self.type == "number":
            return expect_number(value, at, gt=self.gt, ge=self.ge, lt=self.lt, le=self.le)
        if self.type == "integer":
            return expect_int(value, at, ge=self.ge, le=self.le)
        if self.type == "boolean":
            return expect_bool(value, at)
        if self.type == "string":
            text = expect_str(value, at, max_len=self.max_len)
            if self.choices and text not in self.choices:
                raise ProtocolError(f"{at}: unknown {self.name} {text[:40]!r} (known: {', '.join(self.choices)})")
            return text
        if self.type == "model":
            w, b = parse_model(value, at)
            return {"w": w.tolist(), "b": b}
        raise TypeError(f"{self.name}: a {self.type} is parsed by its own settings class")

    def schema(self) -> dict[str, Any]:
        """The field's OpenAPI 3.0 schema."""
        flag, _, ref = self.type.partition(" or ")
        if ref:
            out: dict[str, Any] = {"oneOf": [{"type": flag}, {"$ref": f"#/components/schemas/{ref}"}]}
        elif self.type == "model":
            out = {"$ref": MODEL_REF}
        elif self.type[:1].isupper():
            out = {"$ref": f"#/components/schemas/{self.type}"}
        else:
            out = {"type": self.type}
        for bound, key, flag_key in ((self.gt, "minimum", "exclusiveMinimum"), (self.ge, "minimum", None),
                                     (self.lt, "maximum", "exclusiveMaximum"), (self.le, "maximum", None)):
            if bound is not None:
                out[key] = bound
                if flag_key:
                    out[flag_key] = True
        if self.choices:
            out["enum"] = list(self.choices)
        if self.type == "string" and not self.choices:
            out |= {"minLength": 1, "maxLength": self.max_len}
        if self.nullable:
            out["nullable"] = True
        if self.default is not None and self.type in ("number", "integer", "boolean", "string"):
            out["default"] = self.default
        return out | {"description": self.help}

    def doc_row(self, prefix: str = "") -> str:
        """The field's row of a PROTOCOL.md table: | Field | Type | Range | Default | Meaning |."""
        kind = self.type if self.type[:1].islower() else self.type.lower()
        kind = " or ".join(part.lower() for part in kind.split(" or "))
        if self.nullable:
            kind += ", or `null`"
        return f"| `{prefix}{self.name}` | {kind} | {self._doc_range()} | {self._doc_default()} | {self.help} |"

    def _doc_range(self) -> str:
        if self.doc_range is not None:
            return self.doc_range
        if self.choices:
            return ", ".join(f"`{c}`" for c in self.choices)
        if self.type not in ("number", "integer"):
            return ""
        low = "(" + _num(self.gt) if self.gt is not None else "[" + _num(self.ge) if self.ge is not None else "(−∞"
        high = _num(self.lt) + ")" if self.lt is not None else _num(self.le) + "]" if self.le is not None else "∞)"
        return f"`{low}, {high}`"

    def _doc_default(self) -> str:
        if self.doc_default is not None:
            return self.doc_default
        if self.default is None:
            return "`null`" if self.nullable else "none"
        whole = isinstance(self.default, float) and self.default.is_integer() and abs(self.default) < 1e7
        return f"`{json.dumps(int(self.default) if whole else self.default)}`"


def _num(x: float) -> str:
    """A bound as the doc writes it: 100000, 0.5, 1e12, 2^63−1."""
    if x == 2**63 - 1:
        return "2^63−1"
    if float(x).is_integer() and abs(x) < 1e7:
        return str(int(x))
    return f"{x:g}" if math.isfinite(x) else "∞"


def doc_table(params: Sequence[Param], prefix: str = "") -> str:
    """The markdown table of these fields."""
    return "\n".join(["| Field | Type | Range | Default | Meaning |", "| :--- | :--- | :--- | :--- | :--- |",
                      *(p.doc_row(prefix) for p in params)])


def object_schema(params: Sequence[Param], description: str = "", required: Sequence[str] = ()) -> dict[str, Any]:
    """An object of these fields, and no others."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": {p.name: p.schema() for p in params}}
    if required:
        out["required"] = list(required)
    return out | ({"description": description} if description else {})
