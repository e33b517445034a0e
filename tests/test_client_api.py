"""The client app through Flask's test client: what /health, /train and
/evaluate answer, and how every kind of bad request is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedavg.http.client_app import create_app
from fedavg.model import mse
from fedavg.training import TrainConfig, local_train

# Values that occur nowhere else, so a reply that leaked a data row would show them.
ONE_FEATURE_CSV = "x,y\n1.25,3.375\n2.5,5.875\n-0.75,1.625\n"
ONE_X, ONE_Y = np.array([[1.25], [2.5], [-0.75]]), np.array([3.375, 5.875, 1.625])
TWO_FEATURE_CSV = "x1,x2,y\n1.5,-2.25,7.125\n0.5,4.75,-3.625\n3.25,1.0,9.875\n2.0,2.0,0.375\n"
TWO_X = np.array([[1.5, -2.25], [0.5, 4.75], [3.25, 1.0], [2.0, 2.0]])
TWO_Y = np.array([7.125, -3.625, 9.875, 0.375])
SECRET_STRINGS = ["3.375", "5.875", "1.625", "7.125", "3.625", "9.875", "0.375", "1.25,3.375"]


@pytest.fixture
def replies():
    """Every response body the test saw, to check at the end that none of them
    carries a raw data value."""
    seen: list[str] = []
    yield seen
    for text in seen:
        for secret in SECRET_STRINGS:
            assert secret not in text, f"a reply contains the private value {secret}: {text[:200]}"


def make_client(tmp_path, csv_text: str, client_id: str, replies: list[str]):
    path = tmp_path / f"{client_id}.csv"
    path.write_text(csv_text)
    app = create_app({"CLIENT_ID": client_id, "DATA_PATH": str(path), "TOKEN": None})
    client = app.test_client()

    def record(response):
        replies.append(response.get_data(as_text=True))
        return response

    original_open = client.open

    def open_and_record(*args, **kwargs):
        return record(original_open(*args, **kwargs))

    client.open = open_and_record
    return client


@pytest.fixture
def client(tmp_path, replies):
    return make_client(tmp_path, ONE_FEATURE_CSV, "alice", replies)


@pytest.fixture
def wide_client(tmp_path, replies):
    return make_client(tmp_path, TWO_FEATURE_CSV, "bob", replies)


def post_raw(client, path: str, body, content_type: str | None = "application/json"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(path, data=data, content_type=content_type)


# --- what a good request gets -------------------------------------------------------


def test_health(client, wide_client):
    r = client.get("/health")
    assert r.status_code == 200
    # what the client can run (strategies, secure aggregation): the server checks it before round 1
    strategies = ["fedavg", "fedsgd", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                  "fednova", "exact"]
    assert r.get_json() == {"status": "ok", "client_id": "alice", "data_size": 3, "num_features": 1,
                            "strategies": strategies, "secagg": True, "x_range": [-0.75, 2.5]}
    assert wide_client.get("/health").get_json() == {"status": "ok", "client_id": "bob", "data_size": 4,
                                                     "num_features": 2, "strategies": strategies, "secagg": True,
                                                     "x_range": [0.5, 3.25]}


def test_train_with_the_seed_body(client):
    r = post_raw(client, "/train", {"global_model": {"w": 0, "b": 0}})
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {"local_model", "data_size", "client_id", "metrics"}
    w, b = local_train(np.zeros(1), 0.0, ONE_X, ONE_Y, TrainConfig())
    assert body["client_id"] == "alice" and body["data_size"] == 3
    assert isinstance(body["local_model"]["w"], float)
    assert body["local_model"]["w"] == pytest.approx(w[0], abs=1e-12)
    assert body["local_model"]["b"] == pytest.approx(b, abs=1e-12)
    assert body["metrics"]["loss_before"] == pytest.approx(mse(np.zeros(1), 0.0, ONE_X, ONE_Y), abs=1e-12)
    assert body["metrics"]["loss_after"] == pytest.approx(mse(w, b, ONE_X, ONE_Y), abs=1e-12)
    assert body["metrics"]["loss_after"] < body["metrics"]["loss_before"]


def test_train_with_a_config(client):
    config = {"lr": 0.05, "local_epochs": 7, "batch_size": 2, "mu": 0.3, "seed": 42}
    body = {"global_model": {"w": 0.5, "b": -1}, "round": 3, "config": config}
    r = post_raw(client, "/train", body)
    assert r.status_code == 200
    w, b = local_train(np.array([0.5]), -1.0, ONE_X, ONE_Y, TrainConfig(**config))
    got = r.get_json()["local_model"]
    assert got["w"] == pytest.approx(w[0], abs=1e-12) and got["b"] == pytest.approx(b, abs=1e-12)
    # the same request again: the seed fixes the mini-batches
    assert post_raw(client, "/train", body).get_json()["local_model"] == got
    # and the config matters: the defaults give another model
    default = post_raw(client, "/train", {"global_model": {"w": 0.5, "b": -1}}).get_json()["local_model"]
    assert default != got


def test_train_with_two_features_answers_w_as_a_list(wide_client):
    r = post_raw(wide_client, "/train", {"global_model": {"w": [0.1, -0.2], "b": 0.3}, "config": {"lr": 0.02}})
    assert r.status_code == 200
    body = r.get_json()
    w, b = local_train(np.array([0.1, -0.2]), 0.3, TWO_X, TWO_Y, TrainConfig(lr=0.02))
    assert isinstance(body["local_model"]["w"], list) and len(body["local_model"]["w"]) == 2
    np.testing.assert_allclose(body["local_model"]["w"], w, atol=1e-12)
    assert body["local_model"]["b"] == pytest.approx(b, abs=1e-12)
    assert body["data_size"] == 4 and body["client_id"] == "bob"


def test_train_accepts_a_one_element_list_for_one_feature(client):
    as_list = post_raw(client, "/train", {"global_model": {"w": [0.25], "b": 0}}).get_json()
    as_number = post_raw(client, "/train", {"global_model": {"w": 0.25, "b": 0}}).get_json()
    assert as_list == as_number and isinstance(as_list["local_model"]["w"], float)


def test_evaluate_is_the_mse(client, wide_client):
    r = post_raw(client, "/evaluate", {"global_model": {"w": 1.5, "b": 0.5}, "round": 2})
    assert r.status_code == 200
    assert r.get_json() == {"loss": pytest.approx(mse(np.array([1.5]), 0.5, ONE_X, ONE_Y), abs=1e-12),
                            "data_size": 3, "client_id": "alice"}
    r = post_raw(wide_client, "/evaluate", {"global_model": {"w": [1, 2], "b": -1}})
    assert r.get_json()["loss"] == pytest.approx(mse(np.array([1.0, 2.0]), -1.0, TWO_X, TWO_Y), abs=1e-12)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_refused(client, content_type):
    """A web page can send text/plain or a form anywhere without the browser
    asking first; only JSON needs the app's consent. (The seed's server sends
    requests.post(json=...); curl -d needs -H 'Content-Type: application/json'.)"""
    r = post_raw(client, "/train", '{"global_model": {"w": 0, "b": 0}}', content_type=content_type)
    assert r.status_code == 415 and "Content-Type: application/json" in r.get_json()["error"]


# --- bad input: 400 with the field named ------------------------------------------------


def assert_400(response, *words: str) -> str:
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


SEED_MODEL = {"w": 0, "b": 0}


@pytest.mark.parametrize("path", ["/train", "/evaluate"])
@pytest.mark.parametrize("body, words", [
    ("{not json", ["not valid JSON"]),
    ("", ["body", "JSON object"]),
    ("   ", ["body", "JSON object"]),
    ("null", ["body", "JSON object"]),
    ("[1, 2]", ["body", "JSON object"]),
    ('"global_model"', ["body", "JSON object"]),
    (b"\xff\xfe{}", ["UTF-8"]),
    ({}, ["global_model", "missing"]),
    ({"global_model": None}, ["global_model", "JSON object"]),
    ({"global_model": [0, 0]}, ["global_model", "JSON object"]),
    ({"global_model": {"w": "0", "b": 0}}, ["global_model.w", "number"]),
    ({"global_model": {"w": 0, "b": None}}, ["global_model.b", "number"]),
    ({"global_model": {"w": {"x": 1}, "b": 0}}, ["global_model.w", "number"]),
    ({"global_model": {"w": True, "b": 0}}, ["global_model.w", "boolean"]),
    ({"global_model": {"w": 0, "b": False}}, ["global_model.b", "boolean"]),
    ({"global_model": {"w": [True], "b": 0}}, ["global_model.w[0]", "boolean"]),
    ({"global_model": {"w": 0}}, ["global_model.b", "missing"]),
    ({"global_model": {"w": [0, 0], "b": 0}}, ["global_model.w", "2 weight", "1 feature"]),
    ({"global_model": {"w": [], "b": 0}}, ["global_model.w"]),
    ({"global_model": {"w": 0, "b": 0, "c": 0}}, ["global_model.c", "unknown field"]),
    ({"global_model": SEED_MODEL, "extra": 1}, ["extra", "unknown field"]),
    ({"global_model": SEED_MODEL, "round": "1"}, ["round", "integer"]),
    ({"global_model": SEED_MODEL, "round": True}, ["round", "boolean"]),
    ({"global_model": SEED_MODEL, "round": 1.5}, ["round", "integer"]),
    ({"global_model": SEED_MODEL, "round": -1}, ["round", ">= 0"]),
])
def test_bad_bodies_are_400_naming_the_field(client, path, body, words):
    assert_400(post_raw(client, path, body), *words)


@pytest.mark.parametrize("path", ["/train", "/evaluate"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_400(client, path, literal):
    assert_400(post_raw(client, path, f'{{"global_model": {{"w": {literal}, "b": 0}}}}'), literal)


@pytest.mark.parametrize("path", ["/train", "/evaluate"])
@pytest.mark.parametrize("number", ["1e309", "-1e309"])
def test_numbers_that_overflow_a_float_are_400(client, path, number):
    assert_400(post_raw(client, path, f'{{"global_model": {{"w": 0, "b": {number}}}}}'), number, "out of range")


@pytest.mark.parametrize("path", ["/train", "/evaluate"])
def test_an_integer_too_long_to_convert_is_400_not_500(client, path):
    # 5000 digits: Python's int() refuses strings over 4300 digits with a ValueError.
    body = '{"global_model": {"w": 1' + "0" * 5000 + ', "b": 0}}'
    assert_400(post_raw(client, path, body))


def test_a_big_integer_weight_is_400_naming_the_field(client):
    # 400 digits parse as an int, but overflow a float.
    assert_400(post_raw(client, "/train", '{"global_model": {"w": 1' + "0" * 400 + ', "b": 0}}'),
               "global_model.w", "out of range")


@pytest.mark.parametrize("config, words", [
    ([], ["config", "JSON object"]),
    ("fast", ["config", "JSON object"]),
    ({"lr": 0}, ["config.lr", "> 0"]),
    ({"lr": -0.01}, ["config.lr", "> 0"]),
    ({"lr": "0.1"}, ["config.lr", "number"]),
    ({"lr": True}, ["config.lr", "boolean"]),
    ({"local_epochs": 0}, ["config.local_epochs", ">= 1"]),
    ({"local_epochs": 1.0}, ["config.local_epochs", "integer"]),
    ({"local_epochs": True}, ["config.local_epochs", "boolean"]),
    ({"local_epochs": 10**9}, ["config.local_epochs", "<="]),
    ({"batch_size": 0}, ["config.batch_size", ">= 1"]),
    ({"batch_size": "2"}, ["config.batch_size", "integer"]),
    ({"mu": -0.1}, ["config.mu", ">= 0"]),
    ({"mu": False}, ["config.mu", "boolean"]),
    ({"seed": -1}, ["config.seed", ">= 0"]),
    ({"seed": 1.5}, ["config.seed", "integer"]),
    ({"momentum": 0.9}, ["config.momentum", "unknown field"]),
])
def test_bad_configs_are_400_naming_the_field(client, config, words):
    assert_400(post_raw(client, "/train", {"global_model": SEED_MODEL, "config": config}), *words)


def test_two_feature_client_refuses_one_weight(wide_client):
    assert_400(post_raw(wide_client, "/train", {"global_model": {"w": 1, "b": 0}}),
               "global_model.w", "1 weight", "2 feature")
    assert_400(post_raw(wide_client, "/evaluate", {"global_model": {"w": [1, 2, 3], "b": 0}}),
               "global_model.w", "3 weight", "2 feature")


# --- divergence, routing and size limits ------------------------------------------------------


@pytest.mark.parametrize("lr", [1e50, 1e300])
def test_a_huge_lr_is_422_diverged_not_nan(client, lr):
    r = post_raw(client, "/train", {"global_model": SEED_MODEL, "config": {"lr": lr}})
    assert r.status_code == 422
    text = r.get_data(as_text=True)
    assert "NaN" not in text and "Infinity" not in text
    body = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the reply"))
    assert body["diverged"] is True and "lr" in body["error"]
    assert "local_model" not in body


def test_evaluate_of_a_model_whose_loss_overflows_is_422(client):
    r = post_raw(client, "/evaluate", {"global_model": {"w": 1e200, "b": 0}})
    assert r.status_code == 422 and r.get_json()["diverged"] is True
    assert "NaN" not in r.get_data(as_text=True) and "Infinity" not in r.get_data(as_text=True)


def test_train_from_a_model_whose_starting_loss_overflows_says_diverged(client):
    r = post_raw(client, "/train", {"global_model": {"w": 1e200, "b": 0}})
    assert r.status_code == 422 and r.get_json()["diverged"] is True


def test_unknown_route_is_404_json(client):
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.is_json and "error" in r.get_json()
    r = client.post("/train/extra", json={})
    assert r.status_code == 404 and r.is_json


@pytest.mark.parametrize("method, path", [("GET", "/train"), ("GET", "/evaluate"), ("POST", "/health"),
                                          ("DELETE", "/train")])
def test_wrong_method_is_405_json_with_allow(client, method, path):
    r = client.open(path, method=method)
    assert r.status_code == 405 and r.is_json and "error" in r.get_json()
    assert r.headers["Allow"]


def test_a_body_over_the_limit_is_413_json(client):
    limit = client.application.config["MAX_CONTENT_LENGTH"]
    assert limit == 4 * 1024 * 1024
    padding = " " * (limit + 1 - len('{"global_model": {"w": 0, "b": 0}}'))
    r = post_raw(client, "/train", '{"global_model": {"w": 0, "b": 0}}' + padding)
    assert r.status_code == 413 and r.is_json and "error" in r.get_json()
    # just under the limit is fine
    r = post_raw(client, "/train", '{"global_model": {"w": 0, "b": 0}}' + padding[:-1])
    assert r.status_code == 200


def test_a_sweep_of_odd_requests_never_gets_a_500_or_data(client, replies):
    # The `replies` fixture checks every body below for the private data values.
    for body in ['{"global_model": {"w": 0, "b": 0}}', "{}", "[]", "0", '{"global_model": 1}']:
        for path in ("/train", "/evaluate", "/health", "/openapi.json", "/"):
            for method in ("GET", "POST", "PUT"):
                if (method, path) == ("GET", "/"):
                    continue  # the client's own page shows its data by design (tests/test_client_page.py)
                r = client.open(path, method=method, data=body, content_type="application/json")
                assert r.status_code < 500, (method, path, body, r.get_data(as_text=True))
                assert r.is_json
    assert len(replies) == 5 * 5 * 3 - 5
