"""The server app through Flask's test client, with real client apps served
over HTTP on free loopback ports: runs, their records, and bad /start input.
Where the network plays no part (sampling, a client that diverges, a reply
the parser refuses) the same client apps answer in this process
(conftest's ``servers``), without a socket's cost."""
from __future__ import annotations

import time

import pytest
from flask import Flask, Response, request

import launcher
from conftest import ROOT, Served
from fedavg.http.client_app import create_app as create_client_app
from fedavg_server import create_app as create_server_app
from reference import SEED_DATA, local_gd, local_mse, reference_fedavg


def seed_style_client(data: list[tuple[float, float]]) -> Flask:
    """A client as the seed wrote it: /train only, answering just local_model
    and data_size (no client_id, no metrics, no /health, no /evaluate)."""
    app = Flask("seed-style")

    @app.post("/train")
    def train():
        model = request.get_json()["global_model"]
        w, b = local_gd(data, float(model["w"]), float(model["b"]), lr=0.01, epochs=10)
        return {"local_model": {"w": w, "b": b}, "data_size": len(data)}

    return app


@pytest.fixture
def dead():
    """A loopback URL whose port is held bound, never listening: refused at once."""
    with launcher.refusing_url() as url:
        yield url


@pytest.fixture(scope="module")
def clients():
    served = [Served(create_client_app({"CLIENT_ID": f"client_{k}", "TOKEN": None,
                                        "DATA_PATH": str(ROOT / f"client_{k}" / "data.csv")}))
              for k in (1, 2)]
    yield served
    for s in served:
        s.close()


@pytest.fixture(scope="module")
def seed_client():
    served = Served(seed_style_client(SEED_DATA[1]))
    yield served
    served.close()


def client_apps(*names: str) -> dict[str, Flask]:
    """The seed's clients by name, as apps in this process: URL → app."""
    return {f"http://127.0.0.1:500{name[-1]}": create_client_app({"CLIENT_ID": name, "TOKEN": None,
                                                                  "DATA_PATH": str(ROOT / name / "data.csv")})
            for name in names}


@pytest.fixture
def make_server_client(tmp_path):
    """server(urls) → a test client of a fresh server on its own database;
    teardown waits for any run still going, so no run outlives its test."""
    apps = []

    def make(urls: list[str]):
        app = create_server_app({"CLIENTS": urls, "DB": str(tmp_path / f"runs{len(apps)}.db"),
                                 "TOKEN": None})
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        fed = app.extensions["fedavg"]
        running = fed.running_id()
        if running is not None:
            fed.wait(running)
        fed.transport.close()
        fed.store.close()


@pytest.fixture
def server(clients, make_server_client):
    return make_server_client([c.url for c in clients])


def poll_run(server, run_id: int, timeout_s: float = 30.0) -> dict:
    """GET /runs/<id> until the run is no longer running (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = server.get(f"/runs/{run_id}")
        assert r.status_code == 200, r.get_data(as_text=True)
        run = r.get_json()
        if run["status"] != "running":
            return run
        assert time.monotonic() < deadline, f"run {run_id} still running after {timeout_s} s"
        time.sleep(0.02)


def assert_model_close(model: dict, w: float, b: float, tol: float = 1e-9) -> None:
    assert abs(model["w"] - w) < tol and abs(model["b"] - b) < tol, (model, w, b)


# --- a run --------------------------------------------------------------------------------------


def test_start_with_no_body_runs_the_seed_federation(server, clients):
    r = server.post("/start")  # the seed's `curl -X POST .../start`: no body, no content type
    assert r.status_code == 200, r.get_data(as_text=True)
    run = r.get_json()
    assert run["message"] == "FedAvg finished 5 round(s)."
    assert isinstance(run["run_id"], int) and run["status"] == "completed" and run["error"] is None
    assert run["clients"] == [c.url for c in clients]
    assert run["settings"]["rounds"] == 5 and run["settings"]["lr"] == 0.01
    assert run["settings"]["local_epochs"] == 10 and isinstance(run["settings"]["seed"], int)

    expected = reference_fedavg(SEED_DATA, rounds=5, lr=0.01, epochs=10)
    assert [record["round"] for record in run["rounds"]] == [1, 2, 3, 4, 5]
    model_in = {"w": 0.0, "b": 0.0}
    for record, (w, b) in zip(run["rounds"], expected):
        assert record["global_model_in"] == model_in
        assert [p["client_id"] for p in record["participants"]] == ["client_1", "client_2"]
        assert [p["url"] for p in record["participants"]] == [c.url for c in clients]
        assert record["dropped"] == [] and record["N"] == 4
        for p, data in zip(record["participants"], SEED_DATA):
            w_k, b_k = local_gd(data, model_in["w"], model_in["b"])
            assert p["data_size"] == 2
            assert_model_close(p["local_model"], w_k, b_k)
            assert p["metrics"]["loss_before"] == pytest.approx(local_mse(data, model_in["w"], model_in["b"]),
                                                                abs=1e-9)
            assert p["metrics"]["loss_after"] == pytest.approx(local_mse(data, w_k, b_k), abs=1e-9)
        terms = record["terms"]
        assert [t["client_id"] for t in terms] == ["client_1", "client_2"]
        assert [t["n_k"] for t in terms] == [2, 2] and [t["weight"] for t in terms] == [0.5, 0.5]
        for t, p in zip(terms, record["participants"]):
            assert t["w"] == pytest.approx(0.5 * p["local_model"]["w"], abs=1e-12)
            assert t["b"] == pytest.approx(0.5 * p["local_model"]["b"], abs=1e-12)
        assert sum(t["w"] for t in terms) == pytest.approx(record["global_model"]["w"], abs=1e-12)
        assert sum(t["b"] for t in terms) == pytest.approx(record["global_model"]["b"], abs=1e-12)
        assert_model_close(record["global_model"], w, b)
        # federated loss of this round's model: Σ n_k/N · MSE_k over both clients
        loss = sum(0.5 * local_mse(data, w, b) for data in SEED_DATA)
        assert record["federated_loss"] == pytest.approx(loss, abs=1e-9)
        model_in = record["global_model"]
    assert_model_close(run["final_model"], *expected[-1])
    assert run["final_model"] == run["rounds"][-1]["global_model"] == run["current_model"]
    # FedAvg learns (not monotonically: round 2's w overshoots on this data)
    losses = [record["federated_loss"] for record in run["rounds"]]
    assert losses[-1] < losses[0] < sum(0.5 * local_mse(data, 0.0, 0.0) for data in SEED_DATA)


def test_wait_false_answers_202_then_the_run_can_be_polled(server):
    r = server.post("/start", json={"wait": False, "rounds": 3})
    assert r.status_code == 202
    body = r.get_json()
    assert body["status"] == "running" and body["url"] == f"/runs/{body['run_id']}"
    run = poll_run(server, body["run_id"])
    assert run["status"] == "completed" and len(run["rounds"]) == 3
    assert_model_close(run["final_model"], *reference_fedavg(SEED_DATA, rounds=3)[-1])
    assert all(record["federated_loss"] is not None for record in run["rounds"])


def test_status_before_and_after_a_run(server):
    r = server.get("/status")
    assert r.status_code == 200
    assert r.get_json() == {"current_global_model": {"w": 0.0, "b": 0.0}, "global_rounds_planned": 5,
                            "run_id": None, "round": 0, "status": "idle"}
    run = server.post("/start", json={"rounds": 4, "lr": 0.02}).get_json()
    status = server.get("/status").get_json()
    assert status == {"current_global_model": run["final_model"], "global_rounds_planned": 4,
                      "run_id": run["run_id"], "round": 4, "status": "completed"}
    assert_model_close(status["current_global_model"], *reference_fedavg(SEED_DATA, rounds=4, lr=0.02)[-1])


def test_runs_lists_every_run_newest_first(server):
    assert server.get("/runs").get_json() == {"runs": []}
    first = server.post("/start", json={"rounds": 1}).get_json()
    second = server.post("/start", json={"rounds": 2}).get_json()
    runs = server.get("/runs").get_json()["runs"]
    assert [r["run_id"] for r in runs] == [second["run_id"], first["run_id"]]
    assert [r["rounds_completed"] for r in runs] == [2, 1]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert all("rounds" not in r for r in runs)
    assert runs[0]["final_model"] == second["final_model"]


def test_unknown_run_is_404_json(server):
    r = server.get("/runs/999")
    assert r.status_code == 404 and r.get_json() == {"error": "no run 999"}
    r = server.get("/runs/" + "9" * 30)
    assert r.status_code == 404 and r.is_json


def test_health(server, clients):
    r = server.get("/health")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ok", "clients": [c.url for c in clients], "clients_total": 2,
                            "running_run_id": None}


def test_a_second_start_while_one_runs_is_409_with_the_running_id(server):
    r = server.post("/start", json={"wait": False, "rounds": 3, "pace_s": 0.5})
    assert r.status_code == 202
    running = r.get_json()["run_id"]
    assert server.get("/health").get_json()["running_run_id"] == running

    r = server.post("/start", json={"rounds": 1})
    assert r.status_code == 409
    body = r.get_json()
    assert body["run_id"] == running and str(running) in body["error"]
    assert server.get("/status").get_json()["run_id"] == running
    assert poll_run(server, running)["status"] == "completed"
    # the refused start left no trace, and the next one is welcome at once
    assert [run["run_id"] for run in server.get("/runs").get_json()["runs"]] == [running]
    assert server.get("/health").get_json()["running_run_id"] is None
    assert server.post("/start", json={"rounds": 1}).status_code == 200


def test_a_run_that_reads_ended_no_longer_holds_the_server(servers):
    """The moment a run reads as ended, /health names no run and /start is
    welcome, though its thread may still be logging (a client dropped from
    every round gives a warning to log after the end is recorded: before,
    a /start right then was a 409 about one time in four)."""
    fed = servers(client_apps("client_1") | {"http://127.0.0.1:9": Flask("nothing")})
    for _ in range(30):
        status, started = fed.post("/start", {"wait": False, "rounds": 1})
        assert status == 202
        run = poll_run(fed.http, started["run_id"])
        assert run["status"] == "completed" and run["warnings"], run
        assert fed.get("/health")[1]["running_run_id"] is None
    status, _ = fed.post("/start", {"wait": False, "rounds": 1})
    assert status == 202


# --- clients that are not all there ------------------------------------------------------------


def test_a_client_that_refuses_connections_is_dropped_with_its_reason(clients, make_server_client, dead):
    server = make_server_client([clients[0].url, dead])
    r = server.post("/start", json={"rounds": 2, "min_clients": 1})
    assert r.status_code == 200
    run = r.get_json()
    assert run["status"] == "completed"
    w, b = 0.0, 0.0
    for record in run["rounds"]:
        assert [p["client_id"] for p in record["participants"]] == ["client_1"]
        [dropped] = record["dropped"]
        assert dropped["url"] == dead and dropped["client_id"] == dead
        assert "cannot connect" in dropped["reason"]
        assert record["N"] == 2 and [t["weight"] for t in record["terms"]] == [1.0]
        w, b = local_gd(SEED_DATA[0], w, b)  # the average of one client is its own model
        assert_model_close(record["global_model"], w, b)
        assert record["federated_loss"] == pytest.approx(local_mse(SEED_DATA[0], w, b), abs=1e-9)


def test_too_few_clients_fails_the_run_naming_the_missing_one(clients, make_server_client, dead):
    server = make_server_client([clients[0].url, dead])
    r = server.post("/start", json={"rounds": 2, "min_clients": 2})
    assert r.status_code == 200
    run = r.get_json()
    assert run["status"] == "failed"
    assert dead in run["error"] and "min_clients" in run["error"]
    assert run["message"].startswith("Run failed:") and dead in run["message"]
    assert run["rounds"] == []
    assert server.get("/status").get_json()["status"] == "failed"


def test_a_seed_style_client_takes_part_named_by_its_url(clients, seed_client, make_server_client):
    server = make_server_client([clients[0].url, seed_client.url])
    run = server.post("/start").get_json()
    assert run["status"] == "completed", run
    # same data as the seed's client_2, so the same numbers as the reference
    expected = reference_fedavg(SEED_DATA, rounds=5, lr=0.01, epochs=10)
    for record, (w, b) in zip(run["rounds"], expected):
        assert [p["client_id"] for p in record["participants"]] == ["client_1", seed_client.url]
        assert record["participants"][1]["metrics"] is None
        assert [t["client_id"] for t in record["terms"]] == ["client_1", seed_client.url]
        assert record["dropped"] == [] and record["N"] == 4
        assert_model_close(record["global_model"], w, b)
        # the seed client reports no loss: the federated loss is client_1's alone
        assert record["federated_loss"] == pytest.approx(local_mse(SEED_DATA[0], w, b), abs=1e-9)
        both = 0.5 * local_mse(SEED_DATA[0], w, b) + 0.5 * local_mse(SEED_DATA[1], w, b)
        assert record["federated_loss"] != pytest.approx(both, abs=1e-6)
    assert_model_close(run["final_model"], *expected[-1])


def test_a_client_replying_an_unconvertible_integer_is_dropped_not_fatal(servers):
    # The shared parser reads client replies too: a 5000-digit integer must be
    # one bad reply (that client dropped), not a crash of the whole run.
    app = Flask("huge-int")

    @app.post("/train")
    def train():
        return Response('{"local_model": {"w": 1' + "0" * 5000 + ', "b": 0}, "data_size": 2}',
                        mimetype="application/json")

    bad = "http://127.0.0.1:5009"
    run = servers({**client_apps("client_1"), bad: app}).http.post("/start", json={"rounds": 1}).get_json()
    assert run["status"] == "completed", run["error"]
    [record] = run["rounds"]
    assert [p["client_id"] for p in record["participants"]] == ["client_1"]
    assert [d["url"] for d in record["dropped"]] == [bad]


def test_fraction_with_a_seed_samples_the_same_clients_on_repeat(servers):
    server = servers(client_apps("client_1", "client_2")).http

    def sample(seed: int) -> list[list[str]]:
        run = server.post("/start", json={"rounds": 5, "fraction": 0.5, "seed": seed}).get_json()
        assert run["status"] == "completed" and run["settings"]["seed"] == seed
        return [[p["client_id"] for p in record["participants"]] for record in run["rounds"]]

    first = sample(1234)
    assert sample(1234) == first
    assert all(len(picked) == 1 for picked in first)  # ceil(0.5 · 2) = 1 client per round
    # the seed decides: across a few seeds the samples are not all the same
    assert len({tuple(map(tuple, sample(seed))) for seed in range(4)} | {tuple(map(tuple, first))}) > 1


# --- bad /start input ----------------------------------------------------------------------------


@pytest.mark.parametrize("body, words", [
    ("{not json", ["not valid JSON"]),
    ("[]", ["body", "JSON object"]),
    ("null", ["body", "JSON object"]),
    ({"rounds": 0}, ["rounds", ">= 1"]),
    ({"rounds": 100_001}, ["rounds", "<= 100000"]),
    ({"rounds": True}, ["rounds", "boolean"]),
    ({"rounds": 2.5}, ["rounds", "integer"]),
    ({"lr": "x"}, ["lr", "number"]),
    ({"lr": 0}, ["lr", "> 0"]),
    ('{"lr": NaN}', ["NaN"]),
    ('{"lr": 1e309}', ["1e309", "out of range"]),
    ({"local_epochs": 0}, ["local_epochs", ">= 1"]),
    ({"fraction": 0}, ["fraction", "> 0"]),
    ({"fraction": 1.5}, ["fraction", "<= 1"]),
    ({"fraction": "half"}, ["fraction", "number"]),
    ({"min_clients": 3}, ["min_clients", "3", "2 client"]),
    ({"min_clients": 0}, ["min_clients", ">= 1"]),
    ({"batch_size": 0}, ["batch_size", ">= 1"]),
    ({"mu": -1}, ["mu", ">= 0"]),
    ('{"rounds": 1, "rounds": 2}', ["rounds", "given twice"]),
    ({"strategy": {}}, ["strategy", "must be a non-empty string"]),
    ({"strategy": ["fedavg"]}, ["strategy", "must be a non-empty string"]),
    ({"strategy": "fedsomething"}, ["strategy", "fedsomething", "known: fedavg, fedsgd, fedprox, scaffold"]),
    ({"strategy": "fedadam", "beta1": 1}, ["beta1", "< 1"]),
    ({"strategy": "fedadam", "server_lr": 0}, ["server_lr", "> 0"]),
    ({"strategy": "fedavg", "beta1": 0.5}, ["beta1", "not a setting of strategy fedavg", "fedadam"]),
    ({"strategy": "scaffold", "mu": 0.1}, ["mu", "fedprox", "scaffold"]),
    ({"strategy": "exact", "ridge": -1}, ["ridge", ">= 0"]),
    ({"seed": -5}, ["seed", ">= 0"]),
    ({"speed": 1}, ["speed", "unknown field"]),
    ({"config": {"lr": 0.1}}, ["config", "unknown field"]),
    ({"init": [0, 0]}, ["init", "JSON object"]),
    ({"init": {"w": "0", "b": 0}}, ["init.w", "number"]),
    ({"init": {"w": 0, "b": True}}, ["init.b", "boolean"]),
    ({"init": {"w": 0}}, ["init.b", "missing"]),
    ({"wait": "yes"}, ["wait", "true or false"]),
    ({"wait": 0}, ["wait", "true or false"]),
    ({"pace_s": -1}, ["pace_s", ">= 0"]),
    ({"client_timeout_s": 0}, ["client_timeout_s", "> 0"]),
    # 0 == False in Python: "secagg": 0 once ran with every model in the clear
    ({"secagg": 0}, ["secagg", "must be true, false, null or an object", "the number 0"]),
    ({"secagg": 0.0}, ["secagg", "must be true, false, null or an object", "the number 0.0"]),
    ({"secagg": 1}, ["secagg", "must be true, false, null or an object", "the number 1"]),
    ({"secagg": "true"}, ["secagg", "must be true, false, null or an object", "a string"]),
])
def test_bad_start_input_is_400_naming_the_field(server, body, words):
    if isinstance(body, str):
        r = server.post("/start", data=body, content_type="application/json")
    else:
        r = server.post("/start", json=body)
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert set(r.get_json()) == {"error"}
    for word in words:
        assert word in error, error
    assert server.get("/runs").get_json() == {"runs": []}  # nothing started


def test_an_integer_too_long_to_convert_in_start_is_400_not_500(server):
    r = server.post("/start", data='{"rounds": 1' + "0" * 5000 + "}", content_type="application/json")
    assert r.status_code == 400, r.get_data(as_text=True)
    assert "error" in r.get_json()


def test_unknown_query_parameter_is_400(server):
    r = server.post("/start?rounds=3", json={})
    assert r.status_code == 400 and "rounds" in r.get_json()["error"] and "query" in r.get_json()["error"]
    r = server.get("/status?verbose=1")
    assert r.status_code == 400 and "verbose" in r.get_json()["error"]
    assert server.get("/runs").get_json() == {"runs": []}


def test_server_routing_errors_are_json(server):
    r = server.get("/start")
    assert r.status_code == 405 and r.is_json and "POST" in r.headers["Allow"]
    r = server.get("/nowhere")
    assert r.status_code == 404 and r.is_json
    r = server.post("/start", data="{" + " " * (1024 * 1024) + "}", content_type="application/json")
    assert r.status_code == 413 and r.is_json


def test_an_init_that_does_not_fit_the_clients_data_is_400_before_anything_starts(clients, make_server_client):
    server = make_server_client([c.url for c in clients])
    r = server.post("/start", json={"init": {"w": [1, 2], "b": 0}})
    assert r.status_code == 400
    assert r.get_json()["error"] == "init.w: has 2 weight(s), the clients' data has 1 feature(s)"
    assert server.get("/runs").get_json()["runs"] == []  # nothing was started, nothing recorded
    fits = server.post("/start", json={"init": {"w": [0.5], "b": 1}, "rounds": 1})
    assert fits.status_code == 200 and fits.get_json()["rounds"][0]["global_model_in"] == {"w": 0.5, "b": 1.0}


def test_a_client_that_diverges_ends_the_run_as_diverged(servers):
    """lr 0.1 makes client_2's local training blow up after some rounds while
    client_1 still returns finite numbers: the run must not carry on without it."""
    run = servers(client_apps("client_1", "client_2")).http.post("/start", json={"rounds": 500, "lr": 0.1}).get_json()
    assert run["status"] == "diverged" and "smaller lr" in run["error"]
    assert len(run["rounds"]) < 500


def test_rounds_come_in_pages_that_add_up_to_the_run(server):
    run = server.post("/start", json={"rounds": 25, "seed": 3}).get_json()
    every = run["rounds"]
    first = server.get(f"/runs/{run['run_id']}?limit=10").get_json()
    assert [r["round"] for r in first["rounds"]] == list(range(1, 11)) and first["more"] is True
    last = server.get(f"/runs/{run['run_id']}?since=20&limit=10").get_json()
    assert [r["round"] for r in last["rounds"]] == list(range(21, 26)) and last["more"] is False
    paged, since = [], 0
    while True:
        page = server.get(f"/runs/{run['run_id']}?since={since}&limit=7").get_json()
        paged += page["rounds"]
        if not page["more"]:
            break
        since = page["rounds"][-1]["round"]
    assert [r["global_model"] for r in paged] == [r["global_model"] for r in every]
    for bad in ("limit=0", "limit=10001", "limit=x"):
        r = server.get(f"/runs/{run['run_id']}?{bad}")
        assert r.status_code == 400 and r.get_json()["error"].startswith("limit:")


def test_no_such_run_is_a_404_everywhere(server):
    for method, path in (("get", "/runs/999"), ("get", "/runs/999?format=csv"), ("post", "/runs/999/resume"),
                         ("post", "/runs/999/stop")):
        r = getattr(server, method)(path)
        assert r.status_code == 404 and r.get_json() == {"error": "no run 999"}, path
