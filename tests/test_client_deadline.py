"""A client does not train for a server that stopped waiting: the server
sends each call's deadline (X-Deadline-S), the client stops when it passes,
and answers 429 while it is already at its limit of trainings."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import launcher

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system

EPOCHS = 10_000  # on 200,000 rows: many seconds of work if nothing stops it


@pytest.fixture(scope="module")
def slow_client(tmp_path_factory):
    path = tmp_path_factory.mktemp("slow") / "big.csv"
    x = np.random.default_rng(0).uniform(0, 5, 200_000)
    path.write_text("x,y\n" + "\n".join(f"{v:.6f},{2 * v + 1:.6f}" for v in x) + "\n")
    app = launcher.start_app("client_1", launcher.free_port(), ["--data", str(path)])
    launcher.wait_healthy([app], timeout_s=120)
    yield app
    launcher.stop([app])


def train(url: str, deadline_s: float | None) -> tuple[int, dict, float]:
    body = json.dumps({"global_model": {"w": 0, "b": 0}, "config": {"local_epochs": EPOCHS}}).encode()
    headers = {"Content-Type": "application/json"}
    if deadline_s is not None:
        headers["X-Deadline-S"] = str(deadline_s)
    req = urllib.request.Request(url + "/train", data=body, method="POST", headers=headers)
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.monotonic() - t0


def test_training_stops_when_the_servers_deadline_passes(slow_client):
    status, body, took = train(slow_client.url, 0.5)
    assert status == 408 and "the server's deadline passed" in body["error"], body
    assert took < 5, f"the client trained on for {took:.1f} s after a 0.5 s deadline"
    stopped_after = int(body["error"].split("stopped after ")[1].split(" ")[0])
    assert 0 < stopped_after < EPOCHS


def test_a_third_training_at_once_is_told_to_come_back(slow_client):
    results: list[tuple[int, dict, float]] = []
    threads = [threading.Thread(target=lambda: results.append(train(slow_client.url, 3.0))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(code for code, _, _ in results)
    assert codes == [408, 408, 429], results
    busy = next(body for code, body, _ in results if code == 429)
    assert "busy: 2 trainings already in progress" in busy["error"]
    # and once they are done, it trains again
    assert train(slow_client.url, 0.3)[0] == 408


@pytest.mark.parametrize("value", ["soon", "0", "-1", "3601", "nan", "inf"])
def test_a_malformed_deadline_is_a_400_naming_the_header(slow_client, value):
    body = json.dumps({"global_model": {"w": 0, "b": 0}}).encode()
    req = urllib.request.Request(slow_client.url + "/train", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "X-Deadline-S": value})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["error"].startswith("X-Deadline-S:")
