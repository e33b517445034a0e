"""POST /start names every bad field at once: "error" keeps the first
problem's message (as a 400 always has), "errors" lists all of them when
there are several. The server app in this process, its one client a loopback
URL that refuses every connection: nothing here reaches a client."""
from __future__ import annotations

import pytest

import launcher
from fedavg_server import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A test client of the server app."""
    db = tmp_path_factory.mktemp("start_errors") / "runs.db"
    with launcher.refusing_url() as nobody:
        app = create_app({"CLIENTS": [nobody], "DB": str(db), "TOKEN": None})
        yield app.test_client()
        app.extensions["fedavg"].transport.close()
        app.extensions["fedavg"].store.close()


@pytest.mark.parametrize("body, errors", [
    ({"rounds": 0, "lr": 0}, [("lr", "must be > 0, got 0"), ("rounds", "must be >= 1, got 0")]),
    # a field that fails to parse does not lead to a second, made-up error about it
    ({"mu": None, "rounds": 0}, [("mu", "must be a number, got null"), ("rounds", "must be >= 1, got 0")]),
    ({"strategy": "fedadam", "server_lr": 0, "beta1": 1, "seed": -1},
     [("server_lr", "must be > 0, got 0"), ("beta1", "must be < 1, got 1"), ("seed", "must be >= 0, got -1")]),
    ({"strategy": "fedavg", "momentum": 0.5, "pace_s": 61, "wait": 1},
     [("momentum", "not a setting of strategy fedavg (it belongs to fedavgm)"),
      ("pace_s", "must be <= 60, got 61"), ("wait", "must be true or false, got the number 1")]),
])
def test_every_bad_field_is_named(server, body, errors):
    r = server.post("/start", json=body)
    reply = r.get_json()
    assert r.status_code == 400
    assert [(e["field"], e["message"]) for e in reply["errors"]] == errors
    assert reply["error"] == f"{errors[0][0]}: {errors[0][1]}"
    assert server.get("/runs").get_json()["runs"] == []  # nothing started


def test_one_bad_field_keeps_the_one_key_body(server):
    r = server.post("/start", json={"rounds": 0})
    assert r.status_code == 400 and r.get_json() == {"error": "rounds: must be >= 1, got 0"}
