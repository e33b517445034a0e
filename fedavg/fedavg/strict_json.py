"""Strict JSON and the checks every message is built from.

``loads`` refuses what Python's json module lets through: NaN and Infinity
literals, numbers that overflow a float, and a key given twice in one
object. Each ``expect_*`` check raises ``ProtocolError`` with a message
that says what is wrong and where (``config.lr: must be > 0``); the apps
turn it into a 400 reply. ``parse_model`` and ``model_json`` carry a model
{"w", "b"} across the wire.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .model import Weights

# A model has one weight per feature: this bounds one request's work.
MAX_FEATURES = 10_000
# n_k is a client's vote in the average; no real client has more samples than
# this, and a larger count (10^309 was tried) must not reach the arithmetic.
MAX_DATA_SIZE = 10**12
MAX_NAME = 200  # any name the server keeps (client_id): logs, the page, the CSV
# Characters no name may hold: the C0 and C1 controls (a newline, a carriage
# return, ESC's terminal sequences) and Unicode's line and paragraph
# separators. A name is written into the server's log, its messages, the CSV
# and the page: "client_2\nRun 1 completed: …" would forge a line of the log.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


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


def expect_name(value: Any, path: str) -> str:
    """A name the server keeps (a client's ``client_id``): a non-empty
    string of at most MAX_NAME characters with no control character
    (``CONTROL``). The error names the character, never repeats the name."""
    name = expect_str(value, path, max_len=MAX_NAME)
    found = CONTROL.search(name)
    if found:
        raise ProtocolError(f"{path}: has the control character U+{ord(found.group()):04X} at position "
                            f"{found.start()}; a name is written into the log, the CSV and the page")
    return name


def printable(text: str) -> str:
    """``text`` with each control character (``CONTROL``) written as \\uXXXX:
    what a client wrote (an error, a reason), safe on one line of the log,
    the CSV or the page, as a name is."""
    return CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def is_name(value: Any) -> bool:
    """Whether ``value`` would pass ``expect_name`` (for hints, such as
    /health's, that are ignored rather than refused)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and not CONTROL.search(value)


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
    w = np.asarray(w, dtype=float).ravel().tolist()  # (tolist: Python floats in one call; a record has K of these)
    return {"w": w[0] if len(w) == 1 else w, "b": float(b)}
