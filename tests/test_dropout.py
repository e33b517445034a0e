"""A client host's simulated dropouts and stragglers (``fedavg.dropout``,
``client_host --dropout P --stragglers P --straggle-s S``): the rate is P
(a binomial count within a bound a wrong rate fails), the draw is a function
of (seed, round, client) alone, both paths (each client's /train and the
host's /batch/train) drop the same clients with a reason naming the
simulation, and the run goes on without them. In this process."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import run_from_host
from fedavg.batch_wire import parse_absent
from fedavg.dropout import Dropout
from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg.strict_json import ProtocolError
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.transport import is_timeout

HOST = "http://127.0.0.1:6000"


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_the_share_dropped_is_the_rate(rate):
    """Over 200,000 clients and 3 rounds, each round's count is Binomial(K, P):
    within 6 standard deviations of K·P (a false alarm has probability < 2e-9),
    which a rate off by a fifth misses from P = 0.1 up (0.12: 24,000 ± 6·145
    against 20,000 ± 6·134)."""
    k = 200_000
    ks = np.arange(1, k + 1)
    sd = math.sqrt(k * rate * (1 - rate))
    for round_no in (1, 2, 3):
        count = int(Dropout(rate, seed=7).dropped(round_no, ks).sum())
        assert abs(count - k * rate) <= 6 * sd, (round_no, count)
    if rate >= 0.1:  # the bound's power: a rate 20% off lies over 12 sd away, so its count would fail it
        assert k * 0.2 * rate > 6 * sd + 6 * math.sqrt(k * 1.2 * rate * (1 - 1.2 * rate))


def test_the_draw_depends_on_seed_round_and_client_alone():
    d = Dropout(0.3, seed=1)
    ks = np.arange(1, 1001)
    whole = d.dropped(4, ks)
    # any subset, in any order, draws the same for each client
    some = ks[::-1][:300]
    assert np.array_equal(d.dropped(4, some), whole[some - 1])
    assert np.array_equal(Dropout(0.3, seed=1).dropped(4, ks), whole)
    # another round and another seed draw otherwise (of 1000 clients at 0.3, far from all alike)
    assert (d.dropped(5, ks) != whole).sum() > 100
    assert (Dropout(0.3, seed=2).dropped(4, ks) != whole).sum() > 100
    # the dropouts and the stragglers are independent draws
    both = Dropout(0.3, seed=1, straggle_rate=0.3, straggle_s=1.0)
    assert (both.straggles(4, ks) != whole).sum() > 100


@pytest.mark.parametrize("flags, said", [
    ({"rate": 1.0}, "--dropout: must be a probability in [0, 1)"),
    ({"rate": -0.1}, "--dropout: must be a probability in [0, 1)"),
    ({"straggle_rate": 0.1}, "--stragglers: needs --straggle-s"),
    ({"straggle_s": -1.0}, "--straggle-s: must be >= 0"),
])
def test_bad_settings_are_refused_naming_the_flag(flags, said):
    with pytest.raises(ValueError, match=said.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Dropout(**flags)


def run_both(servers, dropout: Dropout, k: int = 40, **settings):
    """The same run on two hosts of the same clients with ``dropout``, batched and per client."""
    runs = []
    for batched in (True, False):
        host = create_host_app(make_clients("iid", k, 3), dropout=dropout)
        fed = servers(InProcessTransport.hosted(host, k, HOST), BATCHED=batched)
        runs.append(fed.run(**{"rounds": 3, "seed": 5, **settings}))
    return runs


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_both_paths_drop_the_same_clients_and_the_run_goes_on(servers, strategy):
    """SCAFFOLD too: a client that dropped out keeps no c_k of that round on either path."""
    dropout = Dropout(0.25, seed=3)
    batched, per_client = run_both(servers, dropout, strategy=strategy)
    ks = np.arange(1, 41)
    for run in (batched, per_client):
        assert run["status"] == "completed", run["error"]
        for record in run["rounds"]:
            expected = [f"{HOST}/clients/{k}" for k in ks[dropout.dropped(record["round"], ks)]]
            assert [d["url"] for d in record["dropped"]] == expected
            assert all("simulated dropout" in d["reason"] and f"round {record['round']}" in d["reason"]
                       for d in record["dropped"])
            assert len(record["participants"]) == 40 - len(expected) > 0
            assert "timeouts" not in record  # a dropout is not a timeout
    for a, b in zip(batched["rounds"], per_client["rounds"]):
        np.testing.assert_allclose([a["global_model"]["w"], a["global_model"]["b"]],
                                   [b["global_model"]["w"], b["global_model"]["b"]], rtol=1e-12, atol=1e-12)


def test_stragglers_past_the_deadline_time_out_on_both_paths(servers):
    """Stragglers 1.5 s slower against a 1 s timeout: per client each really
    waits its 1 s and answers 408; batched, their rows are reported timed
    out without a wait. The same clients either way, counted as timeouts.
    (A timeout of 0.2 s let an honest client on a loaded machine time out too.)"""
    dropout = Dropout(0.0, seed=3, straggle_rate=0.1, straggle_s=1.5)
    batched, per_client = run_both(servers, dropout, rounds=2, client_timeout_s=1.0)
    ks = np.arange(1, 41)
    for run in (batched, per_client):
        assert run["status"] == "completed", run["error"]
        for record in run["rounds"]:
            late = [f"{HOST}/clients/{k}" for k in ks[dropout.straggles(record["round"], ks)]]
            assert [d["url"] for d in record["dropped"]] == late and late
            assert all(is_timeout(d["reason"]) and "simulated straggler" in d["reason"] for d in record["dropped"])
            assert record["timeouts"] == {"timed_out": len(late), "sampled": 40}


def test_a_batch_whose_every_client_dropped_out_has_only_absent_rows():
    dropout = Dropout(0.5, seed=3)
    ks = np.arange(1, 41)
    gone = [int(k) for k in ks[dropout.dropped(2, ks)]][:3]
    host = create_host_app(make_clients("iid", 40, 3), dropout=dropout)
    body = {"global_model": {"w": 0.0, "b": 0.0}, "round": 2, "clients": gone}
    reply = host.test_client().post("/batch/train", json=body).get_json()
    assert sorted(parse_absent(reply, gone)) == sorted(gone) and reply["errors"] == {}


def test_stragglers_within_the_deadline_take_part():
    dropout = Dropout(0.0, seed=3, straggle_rate=0.5, straggle_s=0.05)
    host = create_host_app(make_clients("iid", 4, 3), dropout=dropout)
    body = {"global_model": {"w": 0.0, "b": 0.0}, "round": 1, "clients": [1, 2, 3, 4]}
    reply = host.test_client().post("/batch/train", json=body, headers={"X-Deadline-S": "5"}).get_json()
    assert "absent" not in reply
    for k in (1, 2, 3, 4):
        r = host.test_client().post(f"/clients/{k}/train", json={"global_model": {"w": 0.0, "b": 0.0}, "round": 1},
                                    headers={"X-Deadline-S": "5"})
        assert r.status_code == 200


def test_a_reply_naming_an_absent_client_it_was_not_asked_for_is_refused():
    with pytest.raises(ProtocolError, match="reply.absent: '9' is not a client asked for"):
        parse_absent({"absent": {"9": "gone"}}, [1, 2])
    with pytest.raises(ProtocolError, match="reply.absent.1: must be text"):
        parse_absent({"absent": {"1": 3}}, [1, 2])
    assert parse_absent({"absent": {"2": "gone"}}, [1, 2]) == {2: "gone"} and parse_absent({}, [1]) == {}


@pytest.mark.system
def test_a_client_host_with_dropouts_over_http(tmp_path):
    """``client_host --population 300 --dropout 0.2 --stragglers 0.1
    --straggle-s 30``: its /health says the simulation, a run from it drops
    the drawn clients each round (the stragglers, 30 s past a 10 s deadline,
    reported timed out without a wait) and completes; a rate that is not a
    probability stops the host in one line."""
    import launcher

    flags = ["--scenario", "iid", "--population", "300", "--seed", "4", "--dropout", "0.2",
             "--stragglers", "0.1", "--straggle-s", "30"]
    host = launcher.start_app("client_host", launcher.free_port(), flags)
    apps = [host]
    try:
        launcher.wait_healthy(apps)
        said = launcher.get_json(host.url + "/health")["scenario"]
        assert "simulated dropout 0.2, stragglers 0.1 (30 s more)" in said
        run = run_from_host(host, apps, tmp_path / "runs.db", {"rounds": 2, "seed": 1})
        d = Dropout(0.2, 4, 0.1, 30.0)
        ks = np.arange(1, 301)
        for record in run["rounds"]:
            gone = d.dropped(record["round"], ks) | d.straggles(record["round"], ks)
            s = record["summary"]  # 300 clients: a round of more than 100 is recorded as a summary
            assert s["dropped"] == int(gone.sum()) and s["contributed"] == 300 - gone.sum()
            assert record["timeouts"]["timed_out"] == int((d.straggles(record["round"], ks) & ~d.dropped(
                record["round"], ks)).sum())
    finally:
        launcher.stop(apps)
    wrong = launcher.start_app("client_host", launcher.free_port(), ["--dropout", "1.5"])
    [(code, out, _)] = launcher.ended([wrong])
    assert code == 2 and "error: --dropout: must be a probability in [0, 1), got 1.5" in out, out
