"""What a reader of a long or wide run costs the server: bounded by what it
answers or draws, not by what the run holds. The histories are written
straight into a RunStore as a server writes them (a run of 100 or 200 clients, a
run of 10,000 rounds), and read through the server app in this process;
Python's own allocations are measured with tracemalloc (the numbers of a
real server process are in docs/PERFORMANCE.md's neighbour, the report)."""
from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask

from conftest import ROOT, Served
from fedavg.http.client_app import create_app as create_client_app
from fedavg.strategies import LOCAL_MODEL, FedAvg, Result
from fedavg_server.api import PAGE_BYTES
from fedavg_server.records import SUMMARY_ABOVE, Dropped, RoundRecord, participant_json, terms_json
from fedavg_server.runs import RunStore
from fedavg_server.settings import RunSettings

# (name, URL, n_k) of 200 clients of one client host, and the seed's two.
WIDE = [(f"client_{k}", f"http://127.0.0.1:5100/clients/{k}", 20 + k) for k in range(1, 201)]
# The widest round a record lists client by client (a wider one is a summary: records.SUMMARY_ABOVE).
LISTED = WIDE[:SUMMARY_ABOVE]
SEED = [("client_1", "http://127.0.0.1:5001", 2), ("client_2", "http://127.0.0.1:5002", 2)]
REASON = "cannot connect: Connection refused"


def write_run(store: RunStore, rounds: int, clients: list[tuple[str, str, int]], planned: int | None = None,
              dropped_in: Callable[[int], set[int]] = lambda r: set(), status: str = "completed",
              first: int = 1, run_id: int | None = None) -> int:
    """A FedAvg run as a server records it: rounds ``first`` … ``first +
    rounds − 1`` of ``clients``, those ``dropped_in(r)`` (their indexes)
    dropped from round r, each round's loss 1/r; ended with ``status``."""
    if run_id is None:
        run_id = store.create(RunSettings(rounds=planned or rounds, seed=1).to_json(), [u for _, u, _ in clients],
                              {"w": 0.0, "b": 0.0})
    strategy = FedAvg(lr=0.01, num_clients=len(clients))
    theta = np.zeros(2)
    for r in range(first, first + rounds):
        out = dropped_in(r)
        results = [Result(name, url, n, theta + 0.01 * (k % 3 - 1), metrics={"loss_before": 1.0,
                                                                             "loss_after": 0.5})
                   for k, (name, url, n) in enumerate(clients) if k not in out]
        step = strategy.aggregate(theta, results, {})
        store.add_round(run_id, RoundRecord(
            r, "fedavg", theta, step, [participant_json(p, (LOCAL_MODEL,)) for p in results],
            [Dropped(clients[k][0], clients[k][1], REASON) for k in sorted(out)], sum(p.n for p in results),
            terms_json(results), 0.001))
        store.set_federated_loss(run_id, r, 1.0 / r)
        theta = step.theta
    if status != "running":
        store.finish(run_id, status, None if status == "completed" else "stopped")
    return run_id


def nobody(urls: list[str]) -> dict[str, Flask]:
    """Client URLs that answer nothing a client would (a 404): the readers
    below never need a client."""
    app = Flask("nobody")
    return dict.fromkeys(urls, app)


def peak_bytes(call: Callable[[], object], times: int = 2) -> tuple[int, object]:
    """Python's peak allocation while ``call`` runs (tracemalloc), and what it
    returned: the least of ``times`` calls. tracemalloc counts every thread's
    allocations, and a busy process's other threads (a pool, a collector)
    only ever add to a call's own; the least is the call's."""
    peaks = []
    for _ in range(times):
        tracemalloc.start()
        try:
            out = call()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return min(peaks), out


MiB = 1 << 20


def test_a_page_of_rounds_holds_at_most_2_mib_and_the_pages_add_up_to_the_run(tmp_path, servers):
    """200 rounds of 100 clients are 6 MB of JSON: GET /runs/<id> answers a
    page of them within PAGE_BYTES (2 MiB) however many ?limit= allows, says
    "more", and the pages read with ?since= give the whole run, round for
    round as the store holds it."""
    db = tmp_path / "runs.db"
    store = RunStore(db)
    run_id = write_run(store, 200, LISTED)
    whole = store.get(run_id)["rounds"]
    assert len(json.dumps(whole)) > 2 * PAGE_BYTES  # the run is far more than a page
    store.close()
    http = servers(nobody([u for _, u, _ in LISTED]), db).http
    paged, since, pages = [], 0, 0
    while True:
        r = http.get(f"/runs/{run_id}?since={since}&limit=10000")
        assert r.status_code == 200
        assert len(r.data) <= PAGE_BYTES + 64 * 1024  # the rounds, and the run's own fields (100 URLs)
        page = r.get_json()
        assert page["rounds"] and page["rounds"][0]["round"] == since + 1
        paged += page["rounds"]
        pages += 1
        if not page["more"]:
            break
        since = page["rounds"][-1]["round"]
    assert pages >= 3 and paged == whole
    # a page always holds a round, however large
    one = http.get(f"/runs/{run_id}?since=199&limit=1").get_json()
    assert [x["round"] for x in one["rounds"]] == [200] and one["more"] is False


def test_a_run_that_waits_answers_its_summary_and_the_first_page(tmp_path, servers):
    """/resume (and /start) with wait: true answer the run's summary and the
    first page of its rounds, as GET /runs/<id> gives it: a run of 3000
    rounds (3 MB) is not sent whole; the rest follows with ?since=."""
    db = tmp_path / "runs.db"
    store = RunStore(db)
    run_id = write_run(store, 2999, SEED, planned=3000, status="interrupted")
    store.close()
    apps = {url: create_client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"), "TOKEN": None})
            for name, url, _ in SEED}
    http = servers(apps, db).http
    r = http.post(f"/runs/{run_id}/resume", json={})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert len(r.data) <= PAGE_BYTES + 16 * 1024
    body = r.get_json()
    assert body["status"] == "completed" and body["rounds_completed"] == 3000
    assert body["message"] == "FedAvg finished 3000 round(s)."
    assert body["more"] is True and 1 <= len(body["rounds"]) < 3000
    assert [x["round"] for x in body["rounds"]] == list(range(1, len(body["rounds"]) + 1))
    assert body["rounds"] == http.get(f"/runs/{run_id}").get_json()["rounds"]
    last = http.get(f"/runs/{run_id}?since=2999").get_json()
    assert [x["round"] for x in last["rounds"]] == [3000]
    assert last["rounds"][0]["global_model"] == body["final_model"]


def test_the_warnings_of_a_long_run_are_counted_without_reading_its_records(tmp_path, servers):
    """A run of 10,000 rounds in which client_2 was dropped from every 10th:
    the first GET /runs/<id>?limit=1 says so, counted exactly, in a few MB
    of Python (reading every record took 700 MB at 100,000 rounds); rounds
    stored later are added to the count."""
    db = tmp_path / "runs.db"
    store = RunStore(db)
    every_10th = lambda r: {1} if r % 10 == 0 else set()  # noqa: E731
    run_id = write_run(store, 10_000, SEED, planned=10_500, dropped_in=every_10th, status="running")
    store.close()
    fed = servers(nobody([u for _, u, _ in SEED]), db)
    peak, r = peak_bytes(lambda: fed.http.get(f"/runs/{run_id}?limit=1"))
    assert r.status_code == 200
    assert r.get_json()["warnings"] == [f"client_2 dropped in 1000/10000 rounds (last reason: {REASON})"]
    assert peak < 4 * MiB, peak
    # client_1 dropped from the next 500 rounds, client_2 from none: the tally goes on from round 10,000
    write_run(fed.fed.store, 500, SEED, dropped_in=lambda r: {0}, first=10_001, run_id=run_id)
    assert fed.http.get(f"/runs/{run_id}?limit=1").get_json()["warnings"] == [
        f"client_2 dropped in 1000/10500 rounds (last reason: {REASON})",
        f"client_1 dropped in 500/10500 rounds (last reason: {REASON})"]


def chart_paths(tmp_path: Path, servers, clients: list[tuple[str, str, int]]) -> tuple[object, dict[str, str]]:
    """A server over 5 runs of 40 rounds of ``clients``, and its charts' paths by name."""
    db = tmp_path / f"runs-{len(clients)}.db"
    store = RunStore(db)
    ids = [write_run(store, 40, clients) for _ in range(5)]
    store.close()
    return servers(nobody([u for _, u, _ in clients]), db).http, {
        "compare": f"/compare.svg?runs={','.join(map(str, ids))}",
        **{name: f"/runs/{ids[0]}/plots/{name}.svg?round=20" for name in ("models", "params", "loss")}}


def test_a_chart_reads_what_it_draws_not_what_the_rounds_hold(tmp_path, servers):
    """The same charts of 5 runs of 40 rounds, over 200 clients and over
    two: the loss lines and the comparison cost the same (200 clients'
    records read whole took 1 GB for 10 runs of 400 rounds); one round's
    model lines and the w and b chart draw 50 client lines instead of 2, and
    cost no more than those."""
    peaks = {}
    for clients in (SEED, WIDE):
        http, paths = chart_paths(tmp_path, servers, clients)
        if clients is SEED:  # matplotlib's caches (fonts, mathtext) filled before anything is measured
            assert all(http.get(path).status_code == 200 for path in paths.values())
        for name, path in paths.items():
            peaks[name, len(clients)], r = peak_bytes(lambda: http.get(path))
            assert r.status_code == 200 and r.content_type.startswith("image/svg+xml")
    for name in ("compare", "loss"):
        assert peaks[name, 200] < peaks[name, 2] + 2 * MiB, (name, peaks)
    assert peaks["models", 200] < peaks["models", 2] + 4 * MiB, peaks  # 50 lines and their labels, not 2
    assert peaks["params", 200] < peaks["params", 2] + 8 * MiB, peaks  # 50 lines of 40 points on two axes, not 2


def test_the_model_chart_of_a_round_that_is_not_there_is_a_400(tmp_path, servers):
    db = tmp_path / "runs.db"
    store = RunStore(db)
    run_id = write_run(store, 3, SEED)
    store.close()
    http = servers(nobody([u for _, u, _ in SEED]), db).http
    r = http.get(f"/runs/{run_id}/plots/models.svg?round=4")
    assert r.status_code == 400 and r.get_json() == {"error": f"round: run {run_id} has no round 4 (3 completed)"}
    r = http.get(f"/runs/{run_id}/plots/models.svg?round=2")
    assert r.status_code == 200 and f"<!-- Run {run_id}, round 2: ".encode() in r.data


@pytest.mark.system
def test_the_page_reads_a_wide_run_page_by_page(browser, tmp_path, servers):
    """The page (static/app.js) reads a run in pages (since, more): 200 rounds
    of 100 clients come in pages of at most 2 MiB, and it shows them all."""
    db = tmp_path / "runs.db"
    store = RunStore(db)
    run_id = write_run(store, 200, LISTED)
    store.close()
    served = Served(servers(nobody([u for _, u, _ in LISTED]), db).app)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(served.url + "/")  # the newest run is shown first
        tab.wait_for_function("document.querySelectorAll('#rounds tbody tr').length === 200", timeout=30_000)
        assert tab.locator("#progress-text").inner_text().strip() == "200 / 200 rounds"
        assert tab.locator("#run-select").input_value() == str(run_id)
        assert errors == []
    finally:
        context.close()
        served.close()

