"""A client's private CSV: loaded, or refused with the file, line and column;
its target column named with --target, and a federation of such clients (a
client app's TARGET, a host's csv scenario) trained on that column."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedavg.data import HEADER_RULE, DataError, load_csv
from fedavg.scenarios import make_clients
from reference import SEED_DATA

ROOT = Path(__file__).resolve().parent.parent

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
    for k, samples in enumerate(SEED_DATA, start=1):
        X, y = load_csv(ROOT / f"client_{k}" / "data.csv")
        assert list(zip(X[:, 0].tolist(), y.tolist())) == samples


@pytest.mark.parametrize("text, line, detail", [
    ("x,y\n1,3\n2,abc\n", 3, "not a number"),
    ("x,y\n1,3\nnan,5\n", 3, "not a finite number"),
    ("x,y\n1,inf\n", 2, "not a finite number"),
    ("x,y\n1,-Infinity\n", 2, "not a finite number"),
    ("x,y\n1,2\n1e309,3\n", 3, "not a finite number"),
    ("x,y\n1,3\n2,5,7\n", 3, "3 values"),
    ("x,y\n1,3\n\n4\n", 4, "1 value"),
    ("a,b\n1,3\n", 1, "no column 'y' to predict, its columns are a, b"),
    ("x,,y\n1,2,3\n", 1, "a column without a name"),
    ("x,x,y\n1,2,3\n", 1, "a column named twice"),
    ("y\n3\n", 1, "no feature column besides the target 'y'"),
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




# --- the target column: --target ------------------------------------------------------------


def test_the_target_is_the_column_named_wherever_it_stands(tmp_path):
    """The features are the other columns in the file's order; the target may come first."""
    X, y = load_csv(write(tmp_path, "hours,score\n1,3\n2,5\n"), "score")
    assert X.tolist() == [[1.0], [2.0]] and y.tolist() == [3.0, 5.0]
    X, y = load_csv(write(tmp_path, "score,a,b\n3,1,7\n5,2,8\n"), "score")
    assert X.tolist() == [[1.0, 7.0], [2.0, 8.0]] and y.tolist() == [3.0, 5.0]
    X, y = load_csv(write(tmp_path, "hours,y\n1,3\n"))  # y needs no flag, whatever the features are called
    assert X.tolist() == [[1.0]] and y.tolist() == [3.0]


def test_names_are_matched_exactly_as_documented(tmp_path):
    """X,Y has no column y: refused, naming its columns and --target; --target Y reads it."""
    path = write(tmp_path, "X,Y\n1,3\n")
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(e.value) == f"{path}, line 1 (the header): no column 'y' to predict, its columns are X, Y; {HEADER_RULE}"
    X, y = load_csv(path, "Y")
    assert X.tolist() == [[1.0]] and y.tolist() == [3.0]


def test_a_missing_target_names_the_columns_the_rule_and_the_flag(tmp_path):
    path = write(tmp_path, "hours,score,age\n1,3,40\n")
    with pytest.raises(DataError) as e:
        load_csv(path, "grade")
    message = str(e.value)
    assert "\n" not in message
    assert "no column 'grade' to predict, its columns are hours, score, age" in message
    assert "--target" in message and message.endswith(HEADER_RULE)


def test_settings_states_the_rule_the_errors_state():
    """One rule: docs/SETTINGS.md's "Your own data" says what the errors say, word for word."""
    doc = " ".join((ROOT / "docs" / "SETTINGS.md").read_text().split())
    assert HEADER_RULE in doc
    assert "--target" in HEADER_RULE


HOURS = [[(1.0, 52.0), (2.0, 55.0), (4.0, 61.0)], [(5.0, 68.0), (7.0, 71.0), (8.0, 79.0), (10.0, 83.0)]]


def least_squares(rows: list[tuple[float, float]]) -> list[float]:
    """Plain Python: the line score = w·hours + b through every row (cov/var)."""
    xs, ys = [x for x, _ in rows], [y for _, y in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    w = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return [w, my - w * mx]


def test_client_apps_with_target_score_train_on_the_score_column(tmp_path, servers):
    """Two client apps given TARGET (their --target) on hours,score files, one
    with score first: Exact's one round is the least-squares line of score on hours."""
    from fedavg.http.client_app import create_app as client_app

    one = write(tmp_path, "hours,score\n" + "".join(f"{h},{s}\n" for h, s in HOURS[0]), "one.csv")
    two = write(tmp_path, "score,hours\n" + "".join(f"{s},{h}\n" for h, s in HOURS[1]), "two.csv")
    apps = {f"http://127.0.0.1:{5001 + i}": client_app({"CLIENT_ID": f"c{i}", "DATA_PATH": str(path),
                                                        "TARGET": "score", "TOKEN": None})
            for i, path in enumerate((one, two))}
    body = servers(apps).run(strategy="exact", seed=1)
    assert body["status"] == "completed", body
    final = body["final_model"]
    assert [p["data_size"] for p in body["rounds"][0]["participants"]] == [3, 4]
    assert final["w"] == pytest.approx(least_squares(HOURS[0] + HOURS[1])[0], abs=1e-9)
    assert final["b"] == pytest.approx(least_squares(HOURS[0] + HOURS[1])[1], abs=1e-9)


def test_a_hosts_csv_scenario_with_target_score_trains_on_the_score_column(tmp_path, federation):
    rows = HOURS[0] + HOURS[1]
    path = write(tmp_path, "hours,score\n" + "".join(f"{h},{s}\n" for h, s in rows), "hours.csv")
    body = federation(make_clients("csv", 3, seed=2, csv_path=path, target="score")).run(strategy="exact", seed=1)
    assert body["status"] == "completed", body
    assert [body["final_model"]["w"], body["final_model"]["b"]] == pytest.approx(least_squares(rows), abs=1e-9)
    with pytest.raises(DataError, match=re.escape("no column 'y' to predict, its columns are hours, score")):
        make_clients("csv", 3, csv_path=path)
