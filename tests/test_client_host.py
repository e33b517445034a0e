"""Many clients in one process (the client host), data scenarios, and a
federation of a client host as make sim runs it (make sim itself, a real
process: tests/test_readme.py)."""
from __future__ import annotations

import numpy as np
import pytest

from fedavg.http.host_app import create_host_app
from fedavg.scenarios import SCENARIOS, make_clients


# byzantine's clients are iid's under other names: tests/test_byzantine.py
@pytest.mark.parametrize("name", [s for s in SCENARIOS if s not in ("seed", "csv", "byzantine")])
def test_a_scenario_is_reproducible_from_its_name_and_seed(name):
    a, b, other = make_clients(name, 8, seed=3), make_clients(name, 8, seed=3), make_clients(name, 8, seed=4)
    assert [c.client_id for c in a] == [f"sim_{k}" for k in range(1, 9)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.X, y.X)
        np.testing.assert_array_equal(x.y, y.y)
    assert any(not np.array_equal(x.X, z.X) for x, z in zip(a, other))


def test_scenarios_differ_the_way_their_names_say():
    iid = make_clients("iid", 10, samples=50)
    assert {len(c.y) for c in iid} == {50}
    shifted = make_clients("feature-shift", 10, samples=50)
    lows = [c.X.min() for c in shifted]
    assert lows == sorted(lows) and lows[-1] - lows[0] > 3  # each client sees its own x window
    labels = make_clients("label-shift", 5, samples=200)
    slopes = [np.polyfit(c.X[:, 0], c.y, 1)[0] for c in labels]
    assert slopes == sorted(slopes)
    assert slopes[0] == pytest.approx(1, abs=0.1) and slopes[-1] == pytest.approx(3, abs=0.1)
    skewed = [len(c.y) for c in make_clients("quantity-skew", 50, samples=20)]
    assert max(skewed) > 5 * min(skewed)
    seed = make_clients("seed", 2)
    assert [c.y.tolist() for c in seed] == [[3.0, 5.0], [4.0, 5.0]]


def test_a_csv_is_split_among_clients_row_by_row(tmp_path):
    data = tmp_path / "mine.csv"
    rows = [(i, 2 * i + 1) for i in range(23)]
    data.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in rows))
    parts = make_clients("csv", 5, seed=1, csv_path=data)
    assert sorted(len(p.y) for p in parts) == [4, 4, 5, 5, 5]
    got = sorted((float(x), float(y)) for p in parts for x, y in zip(p.X[:, 0], p.y))
    assert got == sorted((float(x), float(y)) for x, y in rows)
    with pytest.raises(ValueError, match="cannot be split among 30"):
        make_clients("csv", 30, csv_path=data)


@pytest.mark.parametrize("bad", [("nope", 3), ("seed", 3), ("iid", 0)])
def test_bad_scenarios_are_refused(bad):
    with pytest.raises(ValueError):
        make_clients(*bad)


def test_the_host_serves_each_client_under_its_own_prefix():
    clients = make_clients("iid", 3, samples=5)
    http = create_host_app(clients).test_client()
    assert http.get("/health").get_json()["clients"] == 3
    assert http.get("/clients").get_json() == {"clients": ["/clients/1", "/clients/2", "/clients/3"]}
    for k, c in enumerate(clients, start=1):
        # its own facts, and where its host trains many clients at once (/batch/train, as client k)
        assert http.get(f"/clients/{k}/health").get_json() == {**c.health(), "batch": {"path": "/batch/train",
                                                                                       "id": k}}
        reply = http.post(f"/clients/{k}/train", json={"global_model": {"w": 0, "b": 0}})
        assert reply.status_code == 200 and reply.get_json()["client_id"] == c.client_id
        assert reply.get_json() == c.train({"global_model": {"w": 0, "b": 0}})[0]
    missing = http.get("/clients/4/health")
    assert missing.status_code == 404 and "1..3" in missing.get_json()["error"]
    bad = http.post("/clients/1/train", json={"global_model": {"w": True, "b": 0}})
    assert bad.status_code == 400 and bad.get_json()["error"].startswith("global_model.w")


def test_a_client_hosts_federation_as_make_sim_runs_it(federation):
    """sim.py's run of 40 quantity-skew clients for 4 rounds (its defaults:
    seed 0, 20 samples on average, lr 0.01, every client each round): every
    round has all 40, none dropped."""
    run = federation(make_clients("quantity-skew", 40, seed=0, samples=20)).run(rounds=4, seed=0, lr=0.01)
    assert run["status"] == "completed"
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3, 4]
    assert all(len(r["participants"]) == 40 and r["dropped"] == [] for r in run["rounds"])  # none dropped
