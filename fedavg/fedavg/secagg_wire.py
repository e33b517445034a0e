"""Secure aggregation's messages: the checks both sides make, and the wire
format. Keys, commitments, shares and ciphertexts are base64 text (standard
alphabet, padded, canonical); a masked vector is the base64 of its
little-endian uint64 words; client indices are JSON integers, and decimal
text when they are object keys ({"3": "…"}). Every parser raises ValueError
naming the field.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
KEY_BYTES = 32  # an X25519 key, a derived key
MAX_INDEX = 2**32 - 1  # an index is packed in 4 bytes (a share's x, a ciphertext's aad)
MAX_PARTIES = 10_000  # and the parsers bound how many a message may name


def check_index(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_INDEX:
        raise ValueError(f"{field}: a client index must be an integer in 0..{MAX_INDEX}, got {value!r}")
    return int(value)


def check_indices(values: Iterable[Any], field: str) -> list[int]:
    indices = [check_index(v, field) for v in values]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{field}: client {next(i for i in indices if indices.count(i) > 1)} is listed twice")
    return sorted(indices)


def check_bytes(value: Any, field: str, length: int | None = None) -> bytes:
    if not isinstance(value, bytes) or (length is not None and len(value) != length):
        raise ValueError(f"{field}: must be {length or 'some'} bytes, got {type(value).__name__} "
                         f"of length {len(value) if isinstance(value, (bytes, str)) else '-'}")
    return value


def check_keys(keys: Any, field: str, commit: bool = False) -> dict[str, bytes]:
    if not isinstance(keys, Mapping) or not {"c_pk", "s_pk"} <= set(keys) <= {"c_pk", "s_pk", "b_commit"}:
        got = sorted(keys) if isinstance(keys, Mapping) else type(keys).__name__
        raise ValueError(f"{field}: must hold c_pk and s_pk (and b_commit), got {got}")
    if commit and "b_commit" not in keys:
        raise ValueError(f"{field}.b_commit: missing")
    return {name: check_bytes(value, f"{field}.{name}", KEY_BYTES) for name, value in keys.items()}


def check_words(value: Any, field: str, length: int) -> np.ndarray:
    y = np.asarray(value)
    if y.dtype != np.uint64 and not (y.dtype.kind in "iu" and y.size and y.min() >= 0):
        raise ValueError(f"{field}: must be words in 0..2^64-1 (uint64), got {y.dtype} values")
    if y.shape != (length,):
        raise ValueError(f"{field}: has shape {y.shape}, expected {length} words")
    return y.astype(np.uint64)


def to_wire(value: Any) -> Any:
    """What JSON carries: bytes → base64 text, a uint64 vector → base64 of its little-endian
    words, int keys → decimal text; dicts, lists and tuples recursively; anything else as is."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, np.ndarray):
        return to_wire(check_words(value, "vector", len(value)).astype("<u8").tobytes())
    if isinstance(value, Mapping):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def bytes_from_wire(value: Any, field: str, length: int | None = None, max_length: int = 4096) -> bytes:
    """Base64 text (standard alphabet, padded, canonical) → bytes, of exactly `length` if given."""
    limit = length if length is not None else max_length
    if not isinstance(value, str) or len(value) > 4 * ((limit + 2) // 3):
        raise ValueError(f"{field}: must be base64 text of {'' if length is not None else 'at most '}{limit} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: is not base64 text (standard alphabet, padded)") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise ValueError(f"{field}: is not canonical base64")
    return check_bytes(raw, field, length) if length is not None else raw


def vector_from_wire(value: Any, field: str, length: int) -> np.ndarray:
    """Base64 of `length` little-endian uint64 words → a uint64 vector."""
    return np.frombuffer(bytes_from_wire(value, field, 8 * length), dtype="<u8").astype(np.uint64)


def indices_from_wire(value: Any, field: str) -> list[int]:
    """A JSON list of distinct client indices → their sorted list."""
    if not isinstance(value, list) or len(value) > MAX_PARTIES:
        raise ValueError(f"{field}: must be a list of at most {MAX_PARTIES} client indices")
    return check_indices(value, field)


def indexed_from_wire(value: Any, field: str, parse: Callable[[Any, str], T]) -> dict[int, T]:
    """{"3": v, …} → {3: parse(v, "field.3"), …}: keys are client indices as decimal text."""
    if not isinstance(value, dict) or len(value) > MAX_PARTIES:
        raise ValueError(f"{field}: must be an object of at most {MAX_PARTIES} entries keyed by client index")
    for key in value:
        if not isinstance(key, str) or not re.fullmatch(r"0|[1-9][0-9]{0,9}", key) or int(key) > MAX_INDEX:
            raise ValueError(f"{field}: key {key!r} is not a client index (decimal, 0..{MAX_INDEX})")
    return {int(key): parse(v, f"{field}.{key}") for key, v in value.items()}


def keys_from_wire(value: Any, field: str) -> dict[str, bytes]:
    """{"c_pk", "s_pk"[, "b_commit"]} (AdvertiseKeys) → 32-byte values."""
    if not isinstance(value, dict) or not {"c_pk", "s_pk"} <= set(value) <= {"c_pk", "s_pk", "b_commit"}:
        raise ValueError(f"{field}: must be an object with c_pk and s_pk (and b_commit)")
    return check_keys({k: bytes_from_wire(v, f"{field}.{k}", KEY_BYTES) for k, v in value.items()}, field)


def reveal_from_wire(value: Any, field: str) -> dict[str, dict[int, bytes]]:
    """An unmask reply {"b": {j: share}, "s_sk": {j: share}} → bytes per index."""
    if not isinstance(value, dict) or set(value) != {"b", "s_sk"}:
        raise ValueError(f"{field}: must be an object with exactly b and s_sk")
    return {kind: indexed_from_wire(value[kind], f"{field}.{kind}", bytes_from_wire) for kind in ("b", "s_sk")}
