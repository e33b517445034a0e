"""A client does not train for a server that stopped waiting: the server
sends each call's deadline (X-Deadline-S), the client stops when it passes,
and answers 429 while it is already at its limit of trainings. The client
app in this process, called through Flask's test client: the deadline and
the limit are the app's own, whoever calls it."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedavg.http.client_app import create_app

EPOCHS = 10_000  # on 200,000 rows: many seconds of work if nothing stops it


@pytest.fixture(scope="module")
def slow_client(tmp_path_factory):
    path = tmp_path_factory.mktemp("slow") / "big.csv"
    x = np.random.default_rng(0).uniform(0, 5, 200_000)
    path.write_text("x,y\n" + "\n".join(f"{v:.6f},{2 * v + 1:.6f}" for v in x) + "\n")
    return create_app({"CLIENT_ID": "client_1", "DATA_PATH": str(path), "TOKEN": None})


def train(app, deadline_s: float | None) -> tuple[int, dict, float]:
    """POST /train of EPOCHS epochs, each call through its own test client (one per thread)."""
    headers = {} if deadline_s is None else {"X-Deadline-S": str(deadline_s)}
    t0 = time.monotonic()
    r = app.test_client().post("/train", json={"global_model": {"w": 0, "b": 0}, "config": {"local_epochs": EPOCHS}},
                               headers=headers)
    return r.status_code, r.get_json(), time.monotonic() - t0


def test_training_stops_when_the_servers_deadline_passes(slow_client):
    status, body, took = train(slow_client, 0.5)
    assert status == 408 and "the server's deadline passed" in body["error"], body
    assert took < 5, f"the client trained on for {took:.1f} s after a 0.5 s deadline"
    stopped_after = int(body["error"].split("stopped after ")[1].split(" ")[0])
    assert 0 < stopped_after < EPOCHS


def test_a_third_training_at_once_is_told_to_come_back(slow_client):
    results: list[tuple[int, dict, float]] = []
    threads = [threading.Thread(target=lambda: results.append(train(slow_client, 3.0))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(code for code, _, _ in results)
    assert codes == [408, 408, 429], results
    busy = next(body for code, body, _ in results if code == 429)
    assert "busy: 2 trainings already in progress" in busy["error"]
    # and once they are done, it trains again
    assert train(slow_client, 0.3)[0] == 408


@pytest.mark.parametrize("value", ["soon", "0", "-1", "3601", "nan", "inf"])
def test_a_malformed_deadline_is_a_400_naming_the_header(slow_client, value):
    r = slow_client.test_client().post("/train", json={"global_model": {"w": 0, "b": 0}},
                                       headers={"X-Deadline-S": value})
    assert r.status_code == 400 and r.get_json()["error"].startswith("X-Deadline-S:")
