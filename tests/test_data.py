"""A client's private CSV: loaded, or refused with the file, line and column."""
from __future__ import annotations

import pytest

from fedavg.data import DataError, load_csv
from reference import SEED_DATA

# --- the client's data file ----------------------------------------------------------------------


def write(tmp_path, text: str, name: str = "data.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_csv_one_feature(tmp_path):
    X, y = load_csv(write(tmp_path, "x,y\n1,3\n\n2,5.5\n"))
    assert X.shape == (2, 1) and X.tolist() == [[1.0], [2.0]] and y.tolist() == [3.0, 5.5]


def test_load_csv_two_features(tmp_path):
    X, y = load_csv(write(tmp_path, "x1,x2,y\n1,2,3\n-4, 5e-1 ,6\n"))
    assert X.tolist() == [[1.0, 2.0], [-4.0, 0.5]] and y.tolist() == [3.0, 6.0]


def test_load_csv_the_seed_files():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for k, samples in enumerate(SEED_DATA, start=1):
        X, y = load_csv(root / f"client_{k}" / "data.csv")
        assert list(zip(X[:, 0].tolist(), y.tolist())) == samples


@pytest.mark.parametrize("text, line, detail", [
    ("x,y\n1,3\n2,abc\n", 3, "not a number"),
    ("x,y\n1,3\nnan,5\n", 3, "not a finite number"),
    ("x,y\n1,inf\n", 2, "not a finite number"),
    ("x,y\n1,-Infinity\n", 2, "not a finite number"),
    ("x,y\n1,2\n1e309,3\n", 3, "not a finite number"),
    ("x,y\n1,3\n2,5,7\n", 3, "3 values"),
    ("x,y\n1,3\n\n4\n", 4, "1 value"),
    ("a,b\n1,3\n", 1, "header"),
])
def test_load_csv_bad_rows_name_the_file_and_the_line(tmp_path, text, line, detail):
    path = write(tmp_path, text, "client_data.csv")
    with pytest.raises(DataError) as e:
        load_csv(path)
    message = str(e.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert detail in message


@pytest.mark.parametrize("text, detail", [
    ("x,y\n", "no data rows"),
    ("x,y\n\n\n", "no data rows"),
    ("", "empty file"),
    ("\n  \n", "empty file"),
])
def test_load_csv_files_without_rows_name_the_file(tmp_path, text, detail):
    path = write(tmp_path, text, "client_data.csv")
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(path) in str(e.value) and detail in str(e.value)


def test_load_csv_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(path) in str(e.value) and "not found" in str(e.value)


def test_load_csv_not_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"x,y\n1,\xff\n")
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(path) in str(e.value)


