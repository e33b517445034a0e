"""The wire format's parsers: strict JSON, every field named when it is wrong."""
from __future__ import annotations

import json

import pytest

from fedavg.strict_json import ProtocolError, loads, parse_model
from fedavg.training import TrainConfig
from fedavg.wire import (
    parse_evaluate_request,
    parse_health_reply,
    parse_train_config,
    parse_train_reply,
    parse_train_request,
)

# --- the wire format ------------------------------------------------------------------------------


# loads() keeps a non-finite number as a marker so that the field's validator
# refuses it and can say where it was; these go through both.
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_loads_refuses_non_finite_literals(literal):
    with pytest.raises(ProtocolError) as e:
        parse_train_request(loads(f'{{"global_model": {{"w": {literal}, "b": 0}}}}'), 1)
    assert literal in str(e.value) and str(e.value).startswith("global_model.w:")


@pytest.mark.parametrize("number", ["1e309", "-1e309", "1.5e400"])
def test_loads_refuses_floats_that_overflow(number):
    with pytest.raises(ProtocolError) as e:
        parse_train_config(loads(f'{{"lr": {number}}}'.encode()), "config")
    assert number in str(e.value) and "out of range" in str(e.value) and str(e.value).startswith("config.lr:")


def test_loads_refuses_an_integer_literal_too_long_to_convert():
    # Python refuses int(str) beyond 4300 digits with a plain ValueError; the
    # parser must turn that into a ProtocolError (a 400), like any bad number.
    with pytest.raises(ProtocolError):
        loads('{"global_model": {"w": 1' + "0" * 5000 + ', "b": 0}}')


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe", "[1, 2", b"", "{'w': 1}", "[" * 100_000])
def test_loads_refuses_what_is_not_json(body):
    with pytest.raises(ProtocolError):
        loads(body)


def test_loads_accepts_ordinary_json():
    assert loads(b'{"w": [1, 2.5e-3], "b": -0.0}') == {"w": [1, 0.0025], "b": -0.0}


def protocol_error(parse, *args) -> str:
    with pytest.raises(ProtocolError) as e:
        parse(*args)
    return str(e.value)


@pytest.mark.parametrize("value, field", [
    ({"w": float("nan"), "b": 0}, "global_model.w"),
    ({"w": 1, "b": float("inf")}, "global_model.b"),
    ({"w": [1, float("-inf")], "b": 0}, "global_model.w[1]"),
    ({"w": 10**400, "b": 0}, "global_model.w"),
    ({"w": True, "b": 0}, "global_model.w"),
    ({"w": 1, "b": False}, "global_model.b"),
    ({"w": [0, True], "b": 0}, "global_model.w[1]"),
    ({"w": "1", "b": 0}, "global_model.w"),
    ({"w": None, "b": 0}, "global_model.w"),
    ({"w": [], "b": 0}, "global_model.w"),
    ({"w": 1}, "global_model.b"),
    ({"b": 1}, "global_model.w"),
    ({"w": 1, "b": 0, "c": 2}, "global_model.c"),
    ([1, 0], "global_model"),
])
def test_parse_model_names_the_field(value, field):
    message = protocol_error(parse_model, value, "global_model", None)
    assert message.startswith(f"{field}:")


@pytest.mark.parametrize("w, d", [(1.0, 2), ([1.0, 2.0], 1), ([1.0, 2.0, 3.0], 2)])
def test_parse_model_refuses_the_wrong_dimension(w, d):
    message = protocol_error(parse_model, {"w": w, "b": 0}, "global_model", d)
    assert message.startswith("global_model.w:") and f"{d} feature" in message


def test_parse_model_accepts_number_or_list():
    w, b = parse_model({"w": 2, "b": -1}, "m", 1)
    assert w.tolist() == [2.0] and b == -1.0 and isinstance(b, float)
    w, b = parse_model({"w": [1, 2.5], "b": 0}, "m", 2)
    assert w.tolist() == [1.0, 2.5]


@pytest.mark.parametrize("config, field", [
    ({"lr": 0}, "config.lr"),
    ({"lr": -0.1}, "config.lr"),
    ({"lr": True}, "config.lr"),
    ({"lr": float("nan")}, "config.lr"),
    ({"local_epochs": 0}, "config.local_epochs"),
    ({"local_epochs": 2.0}, "config.local_epochs"),
    ({"local_epochs": 10_001}, "config.local_epochs"),
    ({"batch_size": 0}, "config.batch_size"),
    ({"batch_size": True}, "config.batch_size"),
    ({"mu": -1e-9}, "config.mu"),
    ({"seed": -1}, "config.seed"),
    ({"seed": 2**63}, "config.seed"),
    ({"momentum": 0.9}, "config.momentum"),
    ({"strategy": {}}, "config.strategy"),
    ({"strategy": "fedsomething"}, "config.strategy"),
    ({"run": ""}, "config.run"),
    ({"run": "x" * 201}, "config.run"),
])
def test_parse_train_config_names_the_field(config, field):
    assert protocol_error(parse_train_config, config).startswith(f"{field}:")


def test_parse_train_config_defaults_and_values():
    assert parse_train_config({}) == TrainConfig()
    assert parse_train_config({"lr": 0.5, "local_epochs": 3, "batch_size": 2, "mu": 0.1, "seed": 4}) == \
        TrainConfig(lr=0.5, local_epochs=3, batch_size=2, mu=0.1, seed=4)


@pytest.mark.parametrize("body, field", [
    (None, "body"),
    ([], "body"),
    ({}, "global_model"),
    ({"global_model": {"w": 0, "b": 0}, "extra": 1}, "extra"),
    ({"global_model": {"w": 0, "b": 0}, "round": True}, "round"),
    ({"global_model": {"w": 0, "b": 0}, "round": -1}, "round"),
    ({"global_model": {"w": 0, "b": 0}, "config": []}, "config"),
    ({"global_model": {"w": 0, "b": 0}, "config": {"lr": "fast"}}, "config.lr"),
])
def test_parse_train_request_names_the_field(body, field):
    assert protocol_error(parse_train_request, body, 1).startswith(f"{field}:")


def test_parse_train_request_seed_body():
    task = parse_train_request({"global_model": {"w": 0, "b": 0}}, 1)
    assert task.theta.tolist() == [0.0, 0.0] and task.round is None and task.config == TrainConfig()
    assert task.inputs == {}


def test_parse_evaluate_request_refuses_config():
    assert protocol_error(parse_evaluate_request, {"global_model": {"w": 0, "b": 0}, "config": {}}, 1) \
        .startswith("config:")


@pytest.mark.parametrize("reply, field", [
    ({"data_size": 2}, "reply.local_model"),
    ({"local_model": {"w": 1, "b": 0}}, "reply.data_size"),
    ({"local_model": {"w": 1, "b": 0}, "data_size": True}, "reply.data_size"),
    ({"local_model": {"w": 1, "b": 0}, "data_size": 0}, "reply.data_size"),
    ({"local_model": {"w": [1, 2], "b": 0}, "data_size": 2}, "reply.local_model.w"),
    ({"local_model": {"w": float("nan"), "b": 0}, "data_size": 2}, "reply.local_model.w"),
    ({"local_model": {"w": 1, "b": 0}, "data_size": 2, "metrics": {"loss_after": -1}}, "reply.metrics.loss_after"),
])
def test_parse_train_reply_names_the_field(reply, field):
    assert protocol_error(parse_train_reply, reply, 1).startswith(f"{field}:")


def test_parse_train_reply_of_a_seed_client_ignores_fields_it_does_not_know():
    parsed = parse_train_reply(json.loads('{"local_model": {"w": 1.5, "b": 2}, "data_size": 2, "note": "hi"}'))
    assert parsed["theta"].tolist() == [1.5, 2.0] and parsed["data_size"] == 2
    assert parsed["client_id"] is None and parsed["metrics"] is None


@pytest.mark.parametrize("body, key", [
    ('{"rounds": 1, "rounds": 2}', "rounds"),
    ('{"global_model": {"w": 1, "b": 0, "w": 5}}', "w"),
    ('[{"a": 1}, {"b": 1, "b": 1}]', "b"),
])
def test_loads_refuses_a_key_given_twice_naming_it(body, key):
    # json.loads would keep the last value: what a validator checked would not be what runs
    assert protocol_error(loads, body).startswith(f"{key}: given twice")


@pytest.mark.parametrize("n", [10**12 + 1, 10**309])
def test_a_sample_count_beyond_the_stated_maximum_is_refused(n):
    reply = {"local_model": {"w": 1, "b": 0}, "data_size": n}
    assert protocol_error(parse_train_reply, reply, 1).startswith("reply.data_size: must be <= 1000000000000")
    assert parse_health_reply({"data_size": n, "client_id": "c"})["data_size"] is None


def test_names_longer_than_200_characters_are_not_kept():
    assert parse_health_reply({"client_id": "x" * 201})["client_id"] is None
    assert parse_health_reply({"client_id": "x" * 200})["client_id"] == "x" * 200
    reply = {"local_model": {"w": 1, "b": 0}, "data_size": 2, "client_id": "x" * 201}
    assert protocol_error(parse_train_reply, reply, 1).startswith("reply.client_id: longer than 200")


def test_health_lists_only_strategies_that_exist():
    assert parse_health_reply({"strategies": ["fedavg", {"x": 1}, ["y"], "nosuch", "scaffold"]})["strategies"] == \
        ["fedavg", "scaffold"]
