"""A client's private data: a CSV file whose header names its columns, one
of them the target (``HEADER_RULE``).

The data is loaded once, validated completely, and never leaves the client.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and row."""


TARGET = "y"  # the target column's name when --target is not given
# The header's rule, stated once: every header error ends with it, and
# docs/SETTINGS.md quotes it (tests/test_data.py checks that it does).
HEADER_RULE = ("the first line names each column, each name once; the column named by --target (default y) "
               "is the target, every other column is a feature, in the file's order")


def add_target(parser: argparse.ArgumentParser) -> None:
    """--target, for every command that reads a CSV of data (a client's --data, a host's --csv)."""
    parser.add_argument("--target", default=TARGET, metavar="COLUMN",
                        help=f"the CSV's column to predict, named as in its header (default {TARGET}); every other "
                             "column is a feature")


def load_csv(path: str | Path, target: str = TARGET) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` → (X of shape (n, d), y of shape (n,)).

    ``y`` is the column the header names ``target`` (matched exactly, case
    and all); X is every other column, in the file's order (``HEADER_RULE``).
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
        raise DataError(f"{path}: empty file; {HEADER_RULE}")
    header_line, header = numbered[0]
    header = [c.strip() for c in header]
    problem = None
    if any(not name for name in header):
        problem = "a column without a name"
    elif len(set(header)) != len(header):
        problem = "a column named twice"
    elif target not in header:
        problem = f"no column {target!r} to predict, its columns are {', '.join(header)}"
    elif len(header) < 2:
        problem = f"no feature column besides the target {target!r}"
    if problem:
        raise DataError(f"{path}, line {header_line} (the header): {problem}; {HEADER_RULE}")
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
    y_col = header.index(target)
    return np.delete(values, y_col, axis=1), values[:, y_col]
