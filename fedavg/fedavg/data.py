"""A client's private data: a CSV file with header ``x,y`` or ``x1,...,xd,y``.

The data is loaded once, validated completely, and never leaves the client.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and row."""


def load_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` → (X of shape (n, d), y of shape (n,)).

    The last column is the target ``y``; every column before it is a feature.
    Blank lines are ignored; anything else that is not a finite number is an
    error naming the file, the line and the column.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read: {e}") from None

    numbered = [(i, row) for i, row in enumerate(rows, start=1) if any(c.strip() for c in row)]
    if not numbered:
        raise DataError(f"{path}: empty file (expected a header such as x,y)")
    header_line, header = numbered[0]
    header = [c.strip() for c in header]
    if len(header) < 2 or header[-1] != "y" or any(not name for name in header):
        raise DataError(f"{path}, line {header_line}: header must be x,y or x1,...,xd,y, got {','.join(header)}")
    if len(set(header)) != len(header):
        raise DataError(f"{path}, line {header_line}: repeated column name in header")
    body = numbered[1:]
    if not body:
        raise DataError(f"{path}: no data rows after the header")

    values = np.empty((len(body), len(header)))
    for r, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} values, the header has {len(header)}")
        for c, cell in enumerate(row):
            try:
                v = float(cell)
            except ValueError:
                raise DataError(f"{path}, line {line}, column {header[c]}: not a number: {cell.strip()!r}") from None
            if not math.isfinite(v):
                raise DataError(f"{path}, line {line}, column {header[c]}: not a finite number: {cell.strip()!r}")
            values[r, c] = v
    return values[:, :-1], values[:, -1]
