"""The weighted averages and the trace that writes them out, no HTTP."""
from __future__ import annotations

import numpy as np
import pytest

from fedavg.aggregation import weighted_average, weighted_loss_avg
from fedavg.trace import TRACE_TERMS, explain_average, explain_weighted_sum, fmt, fmt_line

# --- the weighted average -------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4])
def test_weighted_average_is_sum_of_n_k_w_k_over_sum_of_n_k(d):
    rng = np.random.default_rng(100 + d)
    ns = [3, 11, 1, 7, 20]
    ws = [rng.normal(size=d) for _ in ns]
    bs = [float(rng.normal()) for _ in ns]
    theta = weighted_average([np.append(wk, bk) for wk, bk in zip(ws, bs)], ns)
    w, b = theta[:-1], theta[-1]

    expected_w = sum(nk * wk for nk, wk in zip(ns, ws)) / sum(ns)
    expected_b = sum(nk * bk for nk, bk in zip(ns, bs)) / sum(ns)
    assert w.shape == (d,)
    np.testing.assert_allclose(w, expected_w, rtol=1e-12, atol=1e-15)
    assert b == pytest.approx(expected_b, rel=1e-12, abs=1e-15)
    # unequal n_k matter: the plain mean is something else
    assert not np.allclose(w, np.mean(ws, axis=0))

    order = rng.permutation(len(ns))
    shuffled = weighted_average([np.append(ws[k], bs[k]) for k in order], [ns[k] for k in order])
    np.testing.assert_allclose(shuffled, theta, rtol=1e-12, atol=1e-15)


def test_weighted_average_of_the_docstring_example():
    theta = weighted_average([np.array([1.2, 0.4]), np.array([0.8, 0.6])], [2, 2])
    assert theta.tolist() == pytest.approx([1.0, 0.5])


def test_weighted_average_refuses_no_updates():
    with pytest.raises(ValueError):
        weighted_average([], [])


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


# --- the printed trace -----------------------------------------------------------------------


def test_explain_average_writes_the_numbers_and_ends_with_the_result():
    lines = explain_average([2, 2], [np.array([1.2, 0.4]), np.array([0.8, 0.6])], np.array([1.0, 0.5]))
    assert lines == [
        "N = 2 + 2 = 4",
        "w = (2/4)·1.200000 + (2/4)·0.800000 = 1.000000",
        "b = (2/4)·0.400000 + (2/4)·0.600000 = 0.500000",
    ]


def test_explain_average_prints_the_result_it_is_given_for_several_features():
    rng = np.random.default_rng(5)
    ns = [3, 5, 2]
    ws, bs = [rng.normal(size=3) for _ in ns], [float(v) for v in rng.normal(size=3)]
    thetas = [np.append(wk, bk) for wk, bk in zip(ws, bs)]
    theta = weighted_average(thetas, ns)
    w, b = theta[:-1], theta[-1]
    lines = explain_average(ns, thetas, theta)
    assert lines[0] == "N = 3 + 5 + 2 = 10"
    assert [line.split(" = ")[0] for line in lines[1:]] == ["w[0]", "w[1]", "w[2]", "b"]
    for line, value in zip(lines[1:], [*w, b]):
        assert line.endswith(f" = {fmt(value)}")
    assert f"(5/10)·{fmt(ws[1][2])}" in lines[3]


def test_explain_weighted_sum_prints_fmt_of_the_result():
    line = explain_weighted_sum("L", [1, 3], [2.0, 1e-5], 0.5000075)
    assert line == f"L = (1/4)·2.000000 + (3/4)·{fmt(1e-5)} = {fmt(0.5000075)}"
    assert fmt(1e-5) == "1.000000e-05" and fmt(12345678.0) == "1.234568e+07" and fmt(0) == "0.000000"


def test_a_model_reads_as_an_equation_whatever_its_signs_and_size():
    """Not "y = 2.789530·x + -1.374227", and not a hundred digits for a model that blew up."""
    assert fmt_line([2.78953], -1.374227) == "y = 2.789530·x − 1.374227"
    assert fmt_line(np.array([1.396271]), 0.787802) == "y = 1.396271·x + 0.787802"
    assert fmt_line([-3.2e130], 4.5e6) == "y = -3.200000e+130·x + 4.500000e+06"
    assert fmt_line([1.0, -2.0], -0.0) == "y = 1.000000·x1 − 2.000000·x2 − 0.000000"
    assert fmt(999_999.0) == "999999.000000" and fmt(1e6) == "1.000000e+06" and fmt(-2.5e6) == "-2.500000e+06"


def test_the_trace_of_1000_clients_stays_a_few_short_lines():
    rng = np.random.default_rng(11)
    ns = [int(n) for n in rng.integers(1, 100, size=1000)]
    ws, bs = [rng.normal(size=1) for _ in ns], [float(v) for v in rng.normal(size=1000)]
    thetas = [np.append(wk, bk) for wk, bk in zip(ws, bs)]
    theta = weighted_average(thetas, ns)
    w, b = theta[:-1], theta[-1]
    lines = explain_average(ns, thetas, theta)
    assert len(lines) == 3
    assert all(len(line) < 300 for line in lines)
    assert lines[0].endswith(f"(1000 terms) = {sum(ns)}")
    assert lines[1].startswith("w = ") and lines[1].endswith(f"(1000 terms) = {fmt(w[0])}")
    assert lines[2].startswith("b = ") and lines[2].endswith(f"(1000 terms) = {fmt(b)}")
    assert lines[1].count("·") == TRACE_TERMS - 1


