"""The math on its own, no HTTP: the gradient, local training, the weighted
average and its trace, the data loader and the wire format's parsers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedavg.aggregation import (TRACE_TERMS, Update, explain_average, explain_weighted_sum, fmt,
                                weighted_average, weighted_loss_avg)
from fedavg.data import DataError, load_csv
from fedavg.model import gradients, mse
from fedavg.training import TrainConfig, local_train
from fedavg.wire import (ProtocolError, loads, parse_evaluate_request, parse_model, parse_train_config,
                         parse_train_reply, parse_train_request)
from reference import local_gd, reference_fedavg

SEED_DATA = [[(1.0, 3.0), (2.0, 5.0)], [(3.0, 4.0), (4.0, 5.0)]]


def as_arrays(samples: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([[x] for x, _ in samples]), np.array([y for _, y in samples])


# --- the gradient ---------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3])
def test_gradients_match_central_finite_differences(d):
    rng = np.random.default_rng(d)
    X, y = rng.normal(size=(7, d)), rng.normal(size=7)
    w, b = rng.normal(size=d), float(rng.normal())
    dw, db = gradients(w, b, X, y)

    h = 1e-6
    numeric_dw = np.empty(d)
    for j in range(d):
        step = np.zeros(d)
        step[j] = h
        numeric_dw[j] = (mse(w + step, b, X, y) - mse(w - step, b, X, y)) / (2 * h)
    numeric_db = (mse(w, b + h, X, y) - mse(w, b - h, X, y)) / (2 * h)

    assert dw.shape == (d,)
    np.testing.assert_allclose(dw, numeric_dw, rtol=1e-6)
    assert db == pytest.approx(numeric_db, rel=1e-6)


def test_gradient_of_the_seed_data_by_hand():
    # err = (0·1 + 0 − 3, 0·2 + 0 − 5) = (−3, −5): dL/dw = 2/2·(−3·1 − 5·2) = −13, dL/db = −8
    X, y = as_arrays(SEED_DATA[0])
    dw, db = gradients(np.zeros(1), 0.0, X, y)
    assert dw.tolist() == [-13.0] and db == -8.0
    assert mse(np.zeros(1), 0.0, X, y) == 17.0


# --- FedAvg is distributed gradient descent -------------------------------------------


def test_one_epoch_full_batch_fedavg_equals_centralised_gradient_descent():
    """Pooled gradient = Σ_k n_k/N · local gradient_k, so one local step per
    round followed by the weighted average is one step of GD on the pooled data."""
    rng = np.random.default_rng(7)
    d = 2
    X1, X2 = rng.normal(size=(3, d)), rng.normal(size=(8, d))  # unequal n_k
    y1, y2 = X1 @ [1.5, -2.0] + 0.5 + rng.normal(size=3), X2 @ [1.5, -2.0] + 0.5 + rng.normal(size=8)
    X, y = np.vstack([X1, X2]), np.concatenate([y1, y2])
    config = TrainConfig(lr=0.05, local_epochs=1)

    w_fed, b_fed = np.zeros(d), 0.0
    w_gd, b_gd = np.zeros(d), 0.0
    for _ in range(20):
        updates = [Update(*local_train(w_fed, b_fed, Xk, yk, config), len(yk)) for Xk, yk in ((X1, y1), (X2, y2))]
        w_fed, b_fed = weighted_average(updates)
        dw, db = gradients(w_gd, b_gd, X, y)
        w_gd, b_gd = w_gd - config.lr * dw, b_gd - config.lr * db
        np.testing.assert_allclose(w_fed, w_gd, rtol=0, atol=1e-12)
        assert abs(b_fed - b_gd) < 1e-12
    # and it is learning, so the equality is not between two models that stand still
    assert mse(w_gd, b_gd, X, y) < 0.5 * mse(np.zeros(d), 0.0, X, y)


# --- the weighted average -------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4])
def test_weighted_average_is_sum_of_n_k_w_k_over_sum_of_n_k(d):
    rng = np.random.default_rng(100 + d)
    ns = [3, 11, 1, 7, 20]
    ws = [rng.normal(size=d) for _ in ns]
    bs = [float(rng.normal()) for _ in ns]
    w, b = weighted_average([Update(wk, bk, nk) for wk, bk, nk in zip(ws, bs, ns)])

    expected_w = sum(nk * wk for nk, wk in zip(ns, ws)) / sum(ns)
    expected_b = sum(nk * bk for nk, bk in zip(ns, bs)) / sum(ns)
    assert w.shape == (d,)
    np.testing.assert_allclose(w, expected_w, rtol=1e-12, atol=1e-15)
    assert b == pytest.approx(expected_b, rel=1e-12, abs=1e-15)
    # unequal n_k matter: the plain mean is something else
    assert not np.allclose(w, np.mean(ws, axis=0))

    order = rng.permutation(len(ns))
    w_shuffled, b_shuffled = weighted_average([Update(ws[k], bs[k], ns[k]) for k in order])
    np.testing.assert_allclose(w_shuffled, w, rtol=1e-12, atol=1e-15)
    assert b_shuffled == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_weighted_average_of_the_docstring_example():
    w, b = weighted_average([Update(np.array([1.2]), 0.4, 2), Update(np.array([0.8]), 0.6, 2)])
    assert w.tolist() == pytest.approx([1.0]) and b == pytest.approx(0.5)


def test_weighted_average_refuses_no_updates():
    with pytest.raises(ValueError):
        weighted_average([])


def test_weighted_loss_avg_is_sum_of_n_k_l_k_over_sum_of_n_k():
    rng = np.random.default_rng(3)
    pairs = [(float(loss), int(n)) for loss, n in zip(rng.uniform(0, 10, size=6), [1, 2, 9, 4, 30, 5])]
    expected = sum(n * loss for loss, n in pairs) / sum(n for _, n in pairs)
    assert weighted_loss_avg(pairs) == pytest.approx(expected, rel=1e-12)
    assert weighted_loss_avg(pairs) != pytest.approx(np.mean([loss for loss, _ in pairs]), rel=1e-6)
    shuffled = [pairs[k] for k in rng.permutation(len(pairs))]
    assert weighted_loss_avg(shuffled) == pytest.approx(weighted_loss_avg(pairs), rel=1e-12)
    with pytest.raises(ValueError):
        weighted_loss_avg([])


# --- the seed's defaults, against the plain-loop reference ------------------------------


def test_reference_itself_by_hand():
    # one epoch, one round: client 1 steps to (0.13, 0.08), client 2 to (0.32, 0.09); equal n_k
    [(w, b)] = reference_fedavg(SEED_DATA, rounds=1, lr=0.01, epochs=1)
    assert w == pytest.approx(0.225, abs=1e-15) and b == pytest.approx(0.085, abs=1e-15)


def test_defaults_reproduce_the_reference_round_by_round():
    config = TrainConfig()
    assert (config.lr, config.local_epochs, config.batch_size, config.mu) == (0.01, 10, None, 0.0)
    data = [as_arrays(samples) for samples in SEED_DATA]
    expected = reference_fedavg(SEED_DATA, rounds=5, lr=0.01, epochs=10)

    w, b = np.zeros(1), 0.0
    for r, (w_ref, b_ref) in enumerate(expected, start=1):
        w, b = weighted_average([Update(*local_train(w, b, X, y), len(y)) for X, y in data])
        assert abs(w[0] - w_ref) < 1e-9, f"round {r}: w"
        assert abs(b - b_ref) < 1e-9, f"round {r}: b"
    assert len(expected) == 5
    # five rounds move the model well away from the zeros it started at
    assert w[0] > 0.5 and b > 0.2


def test_local_train_matches_the_reference_loop_on_one_client():
    X, y = as_arrays(SEED_DATA[1])
    w, b = local_train(np.array([0.3]), -0.2, X, y, TrainConfig(lr=0.02, local_epochs=25))
    w_ref, b_ref = local_gd(SEED_DATA[1], 0.3, -0.2, lr=0.02, epochs=25)
    assert abs(w[0] - w_ref) < 1e-12 and abs(b - b_ref) < 1e-12


def test_local_train_does_not_modify_the_global_model_it_is_given():
    X, y = as_arrays(SEED_DATA[0])
    w_g = np.array([0.5])
    local_train(w_g, 0.0, X, y)
    assert w_g.tolist() == [0.5]


# --- FedProx and mini-batches -------------------------------------------------------------


def wide_data(n: int = 10, d: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X @ np.arange(1.0, d + 1) + 3.0 + 0.1 * rng.normal(size=n)


def test_fedprox_keeps_the_local_model_nearer_the_global_one():
    X, y = wide_data()
    w_g, b_g = np.array([-1.0, 0.5]), 0.0

    def distance(mu: float) -> float:
        w, b = local_train(w_g, b_g, X, y, TrainConfig(lr=0.05, local_epochs=50, mu=mu))
        return float(np.sqrt(np.sum((w - w_g) ** 2) + (b - b_g) ** 2))

    plain, prox, strong = distance(0.0), distance(1.0), distance(10.0)
    assert plain > 1.0  # plain local training goes a long way from a bad global model
    assert strong < prox < plain


def test_mini_batches_are_deterministic_for_a_seed_and_differ_between_seeds():
    X, y = wide_data(n=11)
    w_g = np.zeros(2)

    def train(seed: int) -> tuple[np.ndarray, float]:
        return local_train(w_g, 0.0, X, y, TrainConfig(lr=0.05, local_epochs=3, batch_size=4, seed=seed))

    (w1, b1), (w1_again, b1_again), (w2, b2) = train(1), train(1), train(2)
    assert w1.tolist() == w1_again.tolist() and b1 == b1_again
    assert not (np.allclose(w1, w2) and b1 == pytest.approx(b2))
    # a batch as large as the data is plain full-batch GD, whatever the seed
    full = local_train(w_g, 0.0, X, y, TrainConfig(lr=0.05, local_epochs=3))
    big = local_train(w_g, 0.0, X, y, TrainConfig(lr=0.05, local_epochs=3, batch_size=11, seed=9))
    assert full[0].tolist() == big[0].tolist() and full[1] == big[1]


# --- the printed trace -----------------------------------------------------------------------


def test_explain_average_writes_the_numbers_and_ends_with_the_result():
    w, b = np.array([1.0]), 0.5
    lines = explain_average([2, 2], [np.array([1.2]), np.array([0.8])], [0.4, 0.6], w, b)
    assert lines == [
        "N = 2 + 2 = 4",
        "w = (2/4)·1.200000 + (2/4)·0.800000 = 1.000000",
        "b = (2/4)·0.400000 + (2/4)·0.600000 = 0.500000",
    ]


def test_explain_average_prints_the_result_it_is_given_for_several_features():
    rng = np.random.default_rng(5)
    ns = [3, 5, 2]
    ws, bs = [rng.normal(size=3) for _ in ns], [float(v) for v in rng.normal(size=3)]
    w, b = weighted_average([Update(wk, bk, nk) for wk, bk, nk in zip(ws, bs, ns)])
    lines = explain_average(ns, ws, bs, w, b)
    assert lines[0] == "N = 3 + 5 + 2 = 10"
    assert [line.split(" = ")[0] for line in lines[1:]] == ["w[0]", "w[1]", "w[2]", "b"]
    for line, value in zip(lines[1:], [*w, b]):
        assert line.endswith(f" = {fmt(value)}")
    assert f"(5/10)·{fmt(ws[1][2])}" in lines[3]


def test_explain_weighted_sum_prints_fmt_of_the_result():
    line = explain_weighted_sum("L", [1, 3], [2.0, 1e-5], 0.5000075)
    assert line == f"L = (1/4)·2.000000 + (3/4)·{fmt(1e-5)} = {fmt(0.5000075)}"
    assert fmt(1e-5) == "1.000000e-05" and fmt(12345678.0) == "1.234568e+07" and fmt(0) == "0.000000"


def test_the_trace_of_1000_clients_stays_a_few_short_lines():
    rng = np.random.default_rng(11)
    ns = [int(n) for n in rng.integers(1, 100, size=1000)]
    ws, bs = [rng.normal(size=1) for _ in ns], [float(v) for v in rng.normal(size=1000)]
    w, b = weighted_average([Update(wk, bk, nk) for wk, bk, nk in zip(ws, bs, ns)])
    lines = explain_average(ns, ws, bs, w, b)
    assert len(lines) == 3
    assert all(len(line) < 300 for line in lines)
    assert lines[0].endswith(f"(1000 terms) = {sum(ns)}")
    assert lines[1].startswith("w = ") and lines[1].endswith(f"(1000 terms) = {fmt(w[0])}")
    assert lines[2].startswith("b = ") and lines[2].endswith(f"(1000 terms) = {fmt(b)}")
    assert lines[1].count("·") == TRACE_TERMS - 1


# --- the client's data file ----------------------------------------------------------------------


def write(tmp_path, text: str, name: str = "data.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_csv_one_feature(tmp_path):
    X, y = load_csv(write(tmp_path, "x,y\n1,3\n\n2,5.5\n"))
    assert X.shape == (2, 1) and X.tolist() == [[1.0], [2.0]] and y.tolist() == [3.0, 5.5]


def test_load_csv_two_features(tmp_path):
    X, y = load_csv(write(tmp_path, "x1,x2,y\n1,2,3\n-4, 5e-1 ,6\n"))
    assert X.tolist() == [[1.0, 2.0], [-4.0, 0.5]] and y.tolist() == [3.0, 6.0]


def test_load_csv_the_seed_files():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for k, samples in enumerate(SEED_DATA, start=1):
        X, y = load_csv(root / f"client_{k}" / "data.csv")
        assert list(zip(X[:, 0].tolist(), y.tolist())) == samples


@pytest.mark.parametrize("text, line, detail", [
    ("x,y\n1,3\n2,abc\n", 3, "not a number"),
    ("x,y\n1,3\nnan,5\n", 3, "not a finite number"),
    ("x,y\n1,inf\n", 2, "not a finite number"),
    ("x,y\n1,-Infinity\n", 2, "not a finite number"),
    ("x,y\n1,2\n1e309,3\n", 3, "not a finite number"),
    ("x,y\n1,3\n2,5,7\n", 3, "3 values"),
    ("x,y\n1,3\n\n4\n", 4, "1 value"),
    ("a,b\n1,3\n", 1, "header"),
])
def test_load_csv_bad_rows_name_the_file_and_the_line(tmp_path, text, line, detail):
    path = write(tmp_path, text, "client_data.csv")
    with pytest.raises(DataError) as e:
        load_csv(path)
    message = str(e.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert detail in message


@pytest.mark.parametrize("text, detail", [
    ("x,y\n", "no data rows"),
    ("x,y\n\n\n", "no data rows"),
    ("", "empty file"),
    ("\n  \n", "empty file"),
])
def test_load_csv_files_without_rows_name_the_file(tmp_path, text, detail):
    path = write(tmp_path, text, "client_data.csv")
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(path) in str(e.value) and detail in str(e.value)


def test_load_csv_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(path) in str(e.value) and "not found" in str(e.value)


def test_load_csv_not_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"x,y\n1,\xff\n")
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(path) in str(e.value)


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
    w, b, rnd, config = parse_train_request({"global_model": {"w": 0, "b": 0}}, 1)
    assert w.tolist() == [0.0] and b == 0.0 and rnd is None and config == TrainConfig()


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
    assert parsed["w"].tolist() == [1.5] and parsed["b"] == 2.0 and parsed["data_size"] == 2
    assert parsed["client_id"] is None and parsed["metrics"] is None
