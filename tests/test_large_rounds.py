"""Rounds of more than SUMMARY_ABOVE clients, in this process: the record is
a summary (counts, N, the weighted sums, the mean by groups of n_k, the top
contributors, the dropped counted by reason) and every client's row is in
GET /runs/<id>/rounds/<r>/clients.csv, read by the rules GET /runs/<id> is
read by. Everything is checked against plain Python over the clients
themselves or the CSV's rows: the counts, the sums, the groups, the log's
arithmetic. What reads every client of stored rounds (the drop warnings,
the charts, who a run's clients were) reads the summarised rounds' too."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re

import pytest

from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg_server.federation import WARN_NAMED
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.records import SUMMARY_ABOVE, SUSPICIOUS_LISTED, TOP_CONTRIBUTORS
from fedavg_server.transport import Reply

K = SUMMARY_ABOVE + 40
HOST = "http://127.0.0.1:6000"
OTHER = "http://127.0.0.1:6100"


def rows_of(fed, run_id: int, round_no: int, headers=None) -> list[dict[str, str]]:
    r = fed.http.get(f"/runs/{run_id}/rounds/{round_no}/clients.csv", headers=headers or {})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "text/csv"
    return list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A FedAvg run of 2 rounds over K quantity-skew clients (n_k from a few to
    dozens), and the clients."""
    from conftest import Federated
    from fedavg_server.inprocess import federation_app
    clients = make_clients("quantity-skew", K, 3)
    fed = Federated(federation_app(clients, tmp_path_factory.mktemp("large") / "runs.db"))
    run = fed.run(rounds=2, seed=1)
    assert run["status"] == "completed", run["error"]
    yield fed, run, clients
    fed.close()


def test_a_large_round_is_a_summary_with_its_counts_sums_groups_and_top(large):
    fed, run, clients = large
    sizes = {c.client_id: len(c.y) for c in clients}
    N = sum(sizes.values())
    for record in run["rounds"]:
        assert record["participants"] == [] and record["terms"] == [] and record["dropped"] == []
        s = record["summary"]
        assert (s["sampled"], s["contributed"], s["dropped"], s["dropped_by_reason"]) == (K, K, 0, [])
        assert record["N"] == N
        largest = sorted(sizes.values(), reverse=True)[:TOP_CONTRIBUTORS]
        assert [p["data_size"] for p in s["top"]] == largest
        for p in s["top"]:
            assert sizes[p["client_id"]] == p["data_size"] and p["weight"] == pytest.approx(p["data_size"] / N)
        rows = rows_of(fed, run["run_id"], record["round"])
        assert sorted(r["client_id"] for r in rows) == sorted(sizes)
        # the sums, the groups and the mean against plain Python over the CSV's rows
        w = [float(r["local_model.w"]) for r in rows]
        b = [float(r["local_model.b"]) for r in rows]
        n = [int(r["n_k"]) for r in rows]
        assert all(sizes[r["client_id"]] == int(r["n_k"]) for r in rows)
        assert all(float(r["weight"]) == pytest.approx(int(r["n_k"]) / N, rel=1e-15) for r in rows)
        sum_w, sum_b = sum(nk * x for nk, x in zip(n, w)), sum(nk * x for nk, x in zip(n, b))
        assert s["sums"]["local_model"]["w"] == pytest.approx(sum_w, rel=1e-12)
        assert s["sums"]["local_model"]["b"] == pytest.approx(sum_b, rel=1e-12)
        # FedAvg's W_{t+1} = Σ n_k/N · W_k: the CSV's rows give the global model
        assert record["global_model"]["w"] == pytest.approx(sum_w / N, rel=1e-12)
        assert record["global_model"]["b"] == pytest.approx(sum_b / N, rel=1e-12)
        groups = s["groups"]["groups"]
        for g in groups:
            members = [k for k, nk in enumerate(n) if g["n_k_from"] <= nk <= g["n_k_to"]]
            assert g["n_k_to"] == 2 * g["n_k_from"] - 1 and g["clients"] == len(members)
            assert g["N"] == sum(n[k] for k in members)
            assert g["mean"]["w"] == pytest.approx(sum(n[k] * w[k] for k in members) / g["N"], rel=1e-12)
        assert sum(g["clients"] for g in groups) == K and len(groups) > 1
        assert sum(g["N"] / N * g["mean"]["w"] for g in groups) == pytest.approx(sum_w / N, rel=1e-12)
        assert s["groups"]["mean"]["b"] == pytest.approx(sum_b / N, rel=1e-12)
        assert len(json.dumps(record)) < 8_000  # a summary, not K rows


def test_a_round_of_summary_above_clients_is_listed_whole(federation):
    fed = federation(make_clients("iid", SUMMARY_ABOVE, 1))
    record = fed.run(rounds=1)["rounds"][0]
    assert "summary" not in record and len(record["participants"]) == len(record["terms"]) == SUMMARY_ABOVE
    rows = rows_of(fed, 1, 1)  # the CSV of a round listed whole: its participants, the same numbers
    assert [(r["client_id"], float(r["local_model.w"]), float(r["loss_after"]))
            for r in rows] == [(p["client_id"], p["local_model"]["w"], p["metrics"]["loss_after"])
                               for p in record["participants"]]


def test_the_clients_csv_of_a_large_round_hides_each_clients_numbers_without_the_token(federation):
    fed = federation(make_clients("iid", K, 2), token="s3cret")
    status, run = fed.post("/start", {"rounds": 1}, {"Authorization": "Bearer s3cret"})
    assert status == 200, run
    public = rows_of(fed, run["run_id"], 1)
    assert len(public) == K
    assert list(public[0]) == ["client_id", "url", "n_k", "weight", "dropped"]  # no local model, no loss
    operator = rows_of(fed, run["run_id"], 1, {"Authorization": "Bearer s3cret"})
    assert {"local_model.w", "local_model.b", "loss_before", "loss_after"} <= set(operator[0])
    status, seen = fed.get(f"/runs/{run['run_id']}")
    summary = seen["rounds"][0]["summary"]
    assert summary["sums"] == {} and summary["groups"]["mean"] is None
    assert all("mean" not in g for g in summary["groups"]["groups"])
    assert all(set(p) == {"client_id", "url", "data_size", "weight"} for p in summary["top"])


def test_a_dp_rounds_clients_csv_has_no_clients_numbers_even_for_the_operator(federation):
    fed = federation(make_clients("iid", K, 4))
    run = fed.run(rounds=1, fraction=1.0, dp={"noise_multiplier": 1.0, "clip": 1.0, "target_epsilon": 1000})
    assert run["status"] == "completed", run["error"]
    rows = rows_of(fed, run["run_id"], 1)
    assert len(rows) == run["rounds"][0]["summary"]["contributed"] > SUMMARY_ABOVE
    assert list(rows[0]) == ["client_id", "url", "n_k", "weight", "dropped"]
    assert run["rounds"][0]["summary"]["groups"] is None and run["rounds"][0]["summary"]["sums"] == {}


class HostLost(InProcessTransport):
    """OTHER's client host answers /health, then fails every batched call."""

    def call(self, url, method, path, timeout_s, body=None, **limit):
        if url.startswith(OTHER) and url.endswith("/batch/train"):
            return Reply(url, reason="cannot connect: the host went away")
        return super().call(url, method, path, timeout_s, body, **limit)


def test_a_host_lost_is_counted_by_reason_named_first_few_and_warned_about(servers, caplog):
    caplog.set_level(logging.INFO, logger="fedavg.server")
    ours, theirs = make_clients("iid", K, 5), make_clients("iid", K, 6)
    host, lost = create_host_app(ours), create_host_app(theirs)
    apps = {**{f"{HOST}/clients/{k}": host for k in range(1, K + 1)},
            **{f"{OTHER}/clients/{k}": lost for k in range(1, K + 1)}}
    fed = servers(HostLost(apps))
    run = fed.run(rounds=2, seed=3)
    assert run["status"] == "completed", run["error"]
    record = run["rounds"][0]
    s = record["summary"]
    assert (s["sampled"], s["contributed"], s["dropped"]) == (2 * K, K, K)
    assert s["dropped_by_reason"] == [{"reason": f"its host's {OTHER}/batch/train: cannot connect: the host went "
                                                 "away", "clients": K}]
    assert [d["client_id"] for d in record["dropped"]] == [c.client_id for c in theirs[:len(record["dropped"])]]
    assert 0 < len(record["dropped"]) < 10
    logged = "\n".join(r.getMessage() for r in caplog.records)  # the log counts them too, and names the first
    assert f"{K} client(s) DROPPED from this round: its host's {OTHER}/batch/train: cannot connect" in logged
    assert f"dropped first: {', '.join(d['client_id'] for d in record['dropped'])} and " \
           f"{K - len(record['dropped'])} more" in logged
    rows = rows_of(fed, run["run_id"], 1)  # every dropped client, with its reason
    assert sum(1 for r in rows if r["dropped"]) == K and sum(1 for r in rows if not r["dropped"]) == K
    # the warnings count every client of every round, not only those the record names: the first
    # WARN_NAMED by name, the rest in one line (the run's summary is not a line per client)
    warnings = fed.get(f"/runs/{run['run_id']}")[1]["warnings"]
    named, rest = warnings[:WARN_NAMED], warnings[WARN_NAMED:]
    assert [w.split(" dropped in ")[0] for w in named] == sorted(c.client_id for c in theirs)[:WARN_NAMED]
    assert all("dropped in 2/2 rounds" in w for w in named)
    assert rest == [f"and {K - WARN_NAMED:,} more clients dropped from some round, {2 * (K - WARN_NAMED):,} drops in "
                    f"all (by last reason: {K - WARN_NAMED:,} its host's {OTHER}/batch/train: cannot connect: the host "
                    "went away; each round's clients.csv names them)"]
    # who took part, for a resume's check and the charts: every participant
    assert len(fed.fed.store.clients_seen(run["run_id"])) == K
    assert len(fed.fed.store.chart_rounds(run["run_id"], clients=None)[0]["participants"]) == K


def test_the_run_csv_counts_a_large_rounds_clients(large):
    fed, run, _ = large
    text = fed.http.get(f"/runs/{run['run_id']}?format=csv").get_data(as_text=True)
    row = list(csv.DictReader(io.StringIO(text)))[0]
    assert row["participants"].startswith(f"{K} clients (its clients.csv") and row["dropped"].startswith("0 clients")


def test_no_such_round_is_a_404(large):
    fed, run, _ = large
    assert fed.http.get(f"/runs/{run['run_id']}/rounds/99/clients.csv").status_code == 404
    assert fed.http.get("/runs/999/rounds/1/clients.csv").get_json() == {"error": "no run 999"}


def test_the_log_writes_a_large_rounds_average_as_a_sum_over_groups_that_adds_up(federation, caplog):
    """The log's Σ_g N_g/N · x̄_g, read back from its text: the printed groups
    cover every client, their N_g add up to N, and the printed terms add up
    (to the printed digits) to the printed total, which is the global model
    and the plain-Python mean of the CSV's rows."""
    caplog.set_level(logging.INFO, logger="fedavg.server")
    fed = federation(make_clients("quantity-skew", K, 7))
    run = fed.run(rounds=1, seed=2)
    record = run["rounds"][0]
    block = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("── Round 1/1"))
    lines = block.splitlines()
    assert len(lines) < 40  # not a line per client
    assert f"{K} clients sampled: {K} contributed (N = {record['N']}), 0 dropped" in lines
    number = r"(-?[\d.]+(?:e[+-]\d+)?)"
    groups = [re.fullmatch(rf"  n_k (\d+)–(\d+): (\d+) clients, N_g = (\d+), x̄_g: w={number} b={number}", line)
              for line in lines if line.startswith("  n_k ")]
    assert groups and all(groups)
    assert sum(int(g[3]) for g in groups) == K and sum(int(g[4]) for g in groups) == record["N"]
    rows = rows_of(fed, run["run_id"], 1)
    for coordinate, column in (("w", 5), ("b", 6)):
        line = next(x for x in lines if x.startswith(f"  {coordinate} = ("))
        terms, total = line.split(" = ")[1], float(line.rsplit(" = ", 1)[1])
        printed = [(int(n), int(d), float(v)) for n, d, v in re.findall(rf"\((\d+)/(\d+)\)·{number}", terms)]
        assert [(n, d) for n, d, _ in printed] == [(int(g[4]), record["N"]) for g in groups]
        assert [v for _, _, v in printed] == [float(g[column]) for g in groups]
        assert math.isclose(sum(n / d * v for n, d, v in printed), total, rel_tol=1e-5, abs_tol=1e-5)
        # the total is the global model, and the clients' own mean, from the CSV
        assert math.isclose(total, record["global_model"][coordinate], rel_tol=1e-6, abs_tol=1e-6)
        mean = sum(int(r["n_k"]) * float(r[f"local_model.{coordinate}"]) for r in rows) / record["N"]
        assert math.isclose(total, mean, rel_tol=1e-6, abs_tol=1e-6)
    top = lines.index(f"the {TOP_CONTRIBUTORS} largest weights n_k/N:")
    largest = sorted(rows, key=lambda r: -int(r["n_k"]))[:TOP_CONTRIBUTORS]
    assert [x.split()[1] for x in lines[top + 1: top + 1 + TOP_CONTRIBUTORS]] == \
        [f"n_k={r['n_k']}" for r in largest]


def test_a_large_rounds_suspicious_updates_are_counted_and_the_largest_listed(tmp_path):
    """30 attackers among K clients: the summary counts every flagged update, the record lists the
    SUSPICIOUS_LISTED largest; both against the flags recomputed here from the clients.csv's models
    (‖W_k − W_0‖ more than 10× the median of the others', W_0 = 0)."""
    from conftest import Federated
    from fedavg_server.inprocess import federation_app
    clients = make_clients("byzantine", K, 4, attackers=30, attack="huge")
    fed = Federated(federation_app(clients, tmp_path / "runs.db"))
    try:
        run = fed.run(rounds=1, seed=1, aggregator="median")
        rows = rows_of(fed, run["run_id"], 1)
    finally:
        fed.close()
    norms = {r["client_id"]: math.hypot(float(r["local_model.w"]), float(r["local_model.b"])) for r in rows}

    def ratio(name: str) -> float:
        others = sorted(v for k, v in norms.items() if k != name)
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        return norms[name] / median

    flagged = {name: ratio(name) for name in norms if ratio(name) > 10}
    record = run["rounds"][0]
    assert record["summary"]["suspicious"] == len(flagged) == 30 > SUSPICIOUS_LISTED
    listed = record["suspicious"]
    assert len(listed) == SUSPICIOUS_LISTED and {x["client_id"] for x in listed} <= set(flagged)
    assert [x["ratio"] for x in listed] == pytest.approx(sorted(flagged.values(), reverse=True)[:SUSPICIOUS_LISTED])
