"""RunStore on a real SQLite file: what it does when the file is corrupt,
deleted while in use, or full, and reading a long run in pages."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedavg.strategies import LOCAL_MODEL, Result, Step
from fedavg_server.records import RoundRecord, participant_json, terms_json
from fedavg_server.runs import RunStore, StoreError, csv_lines, run_to_csv


def record(r: int) -> RoundRecord:
    theta = np.array([0.1 * r, 0.2])
    results = [Result("client_1", "http://c1", 2, theta + 0.01), Result("client_2", "http://c2", 2, theta - 0.01)]
    return RoundRecord(r, "fedavg", theta, Step(theta, {}, ["N = 2 + 2 = 4"]),
                       [participant_json(p, (LOCAL_MODEL,)) for p in results], [], 4, terms_json(results), 0.001)


def test_a_file_that_is_not_a_database_is_refused_in_one_line(tmp_path):
    path = tmp_path / "runs.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError) as e:
        RunStore(path)
    assert str(path) in str(e.value) and "corrupt" in str(e.value) and "\n" not in str(e.value)


def test_a_history_deleted_while_in_use_is_noticed_at_the_next_write(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create({"rounds": 3}, ["http://c1"], {"w": 0.0, "b": 0.0})
    store.add_round(run_id, record(1))
    (tmp_path / "runs.db").unlink()
    with pytest.raises(StoreError, match="deleted or replaced"):
        store.add_round(run_id, record(2))


def test_a_full_disk_is_a_store_error_that_says_so(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create({"rounds": 3}, ["http://c1"], {"w": 0.0, "b": 0.0})
    # SQLite's own cap on the file's size: past it every write fails as on a full disk (SQLITE_FULL)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match="disk full"):
        for r in range(1, 200):
            store.add_round(run_id, record(r))
    assert store.summary(run_id)["status"] == "running"  # reads still work


def test_pages_of_rounds_and_the_streamed_csv_give_the_whole_run(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create({"rounds": 25}, ["http://c1"], {"w": 0.0, "b": 0.0})
    for r in range(1, 26):
        store.add_round(run_id, record(r))
    whole = store.get(run_id)["rounds"]
    assert [x["round"] for x in whole] == list(range(1, 26))
    paged, since = [], 0
    while page := store.get(run_id, since=since, limit=10)["rounds"]:
        assert len(page) <= 10
        paged += page
        since = page[-1]["round"]
    assert paged == whole
    assert list(store.iter_rounds(run_id, batch=7)) == whole
    assert "".join(csv_lines(store.iter_rounds(run_id, batch=7))) == run_to_csv({"rounds": whole})
    assert len(run_to_csv({"rounds": whole}).splitlines()) == 26


def test_a_thinned_read_keeps_every_kth_round_and_those_asked_for(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create({"rounds": 23}, ["http://c1"], {"w": 0.0, "b": 0.0})
    for r in range(1, 24):
        store.add_round(run_id, record(r))
    thinned = store.get(run_id, every=5, keep=(1, 23, 7))["rounds"]
    assert [x["round"] for x in thinned] == [1, 5, 7, 10, 15, 20, 23]
    assert [x["round"] for x in store.get(run_id, every=1)["rounds"]] == list(range(1, 24))


@pytest.mark.parametrize("at", ["{0} -> '{1}'", "json_extract({0}, '{1}')"])
def test_the_charts_read_w1_and_b_with_or_without_sqlite_3_38(tmp_path, monkeypatch, at):
    """The charts' reads pick w₁ and b out of each record with SQLite's JSON
    functions. SQLite 3.38's -> keeps each number's text; an older SQLite
    (3.37 with Python 3.10 on Ubuntu 22.04, where -> and ->> are a syntax
    error and every chart and warning read failed) has json_extract, which
    rounds to 15 significant digits. Both read a one- and a two-feature run."""
    import fedavg_server.runs as runs
    monkeypatch.setattr(runs, "AT", at)
    store = RunStore(tmp_path / "runs.db")
    for theta in (np.array([1.3962712345678912, 0.7878021234567891]),
                  np.array([1.3962712345678912, -2.5, 0.7878021234567891])):
        run_id = store.create({"rounds": 1}, ["http://c1"], {"w": 0.0, "b": 0.0})
        result = Result("client_1", "http://c1", 2, theta + 0.01)
        store.add_round(run_id, RoundRecord(1, "fedavg", theta, Step(theta, {}, []),
                                            [participant_json(result, (LOCAL_MODEL,))], [], 2, terms_json([result]),
                                            0.001))
        [read] = store.chart_rounds(run_id, clients=None)
        digits = 17 if "->" in at else 15
        for got, want in ((read["global_model"], theta), (read["participants"][0]["local_model"], theta + 0.01)):
            assert got["w"] == pytest.approx(want[0], rel=10.0 ** (1 - digits))
            assert got["b"] == pytest.approx(want[-1], rel=10.0 ** (1 - digits))
        assert read["num_features"] == len(theta) - 1
        assert store.drop_counts(run_id, 0)[0] == 1
        assert store.clients_seen(run_id)["http://c1"]["client_id"] == "client_1"
    # (this machine's SQLite has ->: no other SQL of the store may need it)
    assert re.findall(r"->>?\s*'", Path(runs.__file__).read_text()) == ["-> '"]  # AT's alone
