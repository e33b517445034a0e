"""make compare: each strategy run on a federation in this process (the
server app over client apps, driven through its API: ``compare.main``
called here), measured against the pooled optimum; its numbers checked
against references written here and in tests/reference.py. One test runs the
real `make compare` command, its federations in worker processes."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import compare
from conftest import ROOT
from labs import Progress
from reference import SEED_DATA, reference_fedavg

SVG = "{http://www.w3.org/2000/svg}"


def run_compare(capsys, *args: str) -> tuple[int, str, str]:
    """scripts/compare.py's main in this process, one federation (--jobs 1:
    a worker process would be a process of the everyday tier): (exit code,
    stdout, stderr); a usage error's SystemExit gives its code."""
    try:
        code = compare.main([*args, "--jobs", "1"])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def pooled_seed_line() -> tuple[float, float]:
    """Least squares on the four seed points: slope = cov(x, y)/var(x)."""
    points = [p for c in SEED_DATA for p in c]
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def reference_fedprox(rounds: int, mu: float, lr: float = 0.01, epochs: int = 10) -> list[tuple[float, float]]:
    """FedProx the plain way: local GD on L_k + mu/2·‖θ − θ_global‖² (its
    gradient adds mu·(θ − θ_global)), then the n_k-weighted average."""
    w, b, history = 0.0, 0.0, []
    for _ in range(rounds):
        total = sum(len(d) for d in SEED_DATA)
        new_w = new_b = 0.0
        for data in SEED_DATA:
            lw, lb = w, b
            for _ in range(epochs):
                dw = sum(2 / len(data) * (lw * x + lb - y) * x for x, y in data) + mu * (lw - w)
                db = sum(2 / len(data) * (lw * x + lb - y) for x, y in data) + mu * (lb - b)
                lw, lb = lw - lr * dw, lb - lr * db
            new_w += len(data) / total * lw
            new_b += len(data) / total * lb
        w, b = new_w, new_b
        history.append((w, b))
    return history


def svg_ids(path: Path) -> set[str]:
    return {el.get("id") for el in ET.parse(path).getroot().iter() if el.get("id")}


# `STRATEGIES="fedavg nosuch fedprox" ROUNDS=200 COMPARE_ARGS="--param fedprox.mu=0.5"`:
# the unknown strategy sits between the two real ones, so the second must still run.
SEED_ARGS = ["--scenario", "seed", "--strategies", "fedavg nosuch fedprox", "--rounds", "200",
             "--param", "fedprox.mu=0.5"]


def progress_lines(stdout: str, tool: str) -> list[str]:
    """A lab's progress lines, one as each run ends: "<tool>: [i/n] <label>: <how> … (t s so far,
    about r s left)", i counting 1..n in order, the last "(t s, all done)"; what each says."""
    found = [re.fullmatch(rf"{tool}: \[(\d+)/(\d+)\] (.*) \(([^()]*)\)", line) for line in stdout.splitlines()
             if line.startswith(f"{tool}: [")]
    assert found and all(found), stdout
    n = len(found)
    assert [(int(m[1]), int(m[2])) for m in found] == [(i, n) for i in range(1, n + 1)], stdout
    assert all(re.fullmatch(r"\d+\.\d s so far, (about [1-9]\d* s|under a second) left", m[4])
               for m in found[:-1]), stdout
    assert re.fullmatch(r"\d+\.\d s, all done", found[-1][4]), stdout
    return [m[3] for m in found]


def runs_ended(stdout: str) -> list[str]:
    """compare's progress lines up to their first comma: each run's label and how it ended."""
    return [re.split(r"[,(]", what)[0].strip() for what in progress_lines(stdout, "compare")]


def test_progress_estimates_the_time_left_from_the_work_done():
    """After runs of work w_done in t seconds, the work left w_left takes about t·w_left/w_done."""
    ticks = iter([10.0, 13.0, 14.5, 16.0, 17.0])  # the clock at the start, then as each run ends
    progress = Progress([1.0, 2.0, 1.0, 20.0], clock=lambda: next(ticks))
    assert progress.line(0, "a: done") == f"[1/4] a: done (3.0 s so far, about {3.0 * 23 / 1:.0f} s left)"
    assert progress.line(1, "b: done") == f"[2/4] b: done (4.5 s so far, about {4.5 * 21 / 3:.0f} s left)"
    assert 6.0 * 1 / 23 < 0.5
    assert progress.line(3, "d: done") == "[3/4] d: done (6.0 s so far, under a second left)"
    assert progress.line(2, "c: done") == "[4/4] c: done (7.0 s, all done)"


def check_seed_report(out: Path, stdout: str) -> None:
    """What the run of SEED_ARGS printed and wrote, against the plain-Python
    FedAvg and FedProx and the pooled line computed here."""
    lines = stdout.splitlines()
    refused = next(line for line in lines if line.startswith("nosuch "))
    assert "refused (HTTP 400)" in refused and "unknown strategy 'nosuch'" in refused
    ended = runs_ended(stdout)  # one a run, in the order they ended
    assert sorted(ended) == sorted(["fedavg: completed", "nosuch: refused", "fedprox: completed"]), ended
    assert f"wrote {out / 'compare.json'}, {out / 'compare.png'}, {out / 'compare.svg'}" in stdout

    report = json.loads((out / "compare.json").read_text())
    optimum = pooled_seed_line()
    assert report["pooled_optimum"] == pytest.approx(list(optimum), abs=1e-12)
    assert report["settings"]["rounds"] == 200 and report["settings"]["lr"] == 0.01
    predicted = report["fedavg_fixed_point"]
    assert predicted["theta"] == pytest.approx([0.678506, 2.657290], abs=1e-6)  # the numbers
    assert predicted["distance"] == pytest.approx(math.dist(predicted["theta"], optimum), abs=1e-12)

    fedavg, nosuch, fedprox = report["results"]
    assert (nosuch["strategy"], nosuch["ok"], nosuch["http_status"]) == ("nosuch", False, 400)
    for result, history in ((fedavg, reference_fedavg(SEED_DATA, rounds=200)),
                            (fedprox, reference_fedprox(200, mu=0.5))):
        assert result["ok"] and result["status"] == "completed" and result["rounds_done"] == 200
        final = result["final_model"]
        assert (final["w"], final["b"]) == pytest.approx(history[-1], abs=1e-9)
        # the distance column: ‖θ_t − (0.5, 3)‖ of every round's model
        assert result["distances"] == pytest.approx([math.dist(t, optimum) for t in history], abs=1e-9)
        assert result["final_distance"] == pytest.approx(math.dist(history[-1], optimum), abs=1e-9)
        assert result["rounds_to_tol"] is None  # neither gets within 1e-3: they stop short
        assert result["final_loss"] > 0 and result["wall_s"] > 0
        row = next(line for line in lines if line.startswith(result["strategy"] + " "))
        assert f"{result['final_distance']:.3e}" in row and "never" in row
    # FedAvg approaches its predicted stop from above and never passes it
    assert min(fedavg["distances"]) > predicted["distance"]
    # The proximal term changes the path measurably (mu = 0.5 reached the server)
    assert abs(fedprox["final_model"]["w"] - fedavg["final_model"]["w"]) > 1e-4

    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ids = svg_ids(out / "compare.svg")
    assert {i for i in ids if i.startswith("strategy-")} == {"strategy-fedavg", "strategy-fedprox"}
    assert {i for i in ids if i.startswith("legend-")} == {
        "legend-strategy-fedavg", "legend-strategy-fedprox", "legend-fedavg-fixed-point"}
    assert "fedavg-fixed-point" in ids


def test_the_chart_keeps_the_strategies_decades_when_one_reaches_the_optimum_exactly():
    """exact ends 1e-15 from θ* (rounding): drawn along the axis' bottom and labelled so, it
    must not stretch the axis to 1e-16 and squash every other line into its top."""
    fedavg = [0.7 * 0.9 ** t + 0.2 for t in range(50)]  # stops short at about 0.2, as FedAvg does
    scaffold = [0.7 * 0.8 ** t for t in range(50)]  # on its way, 1e-5 by round 50
    results = [{"label": "fedavg", "ok": True, "distances": fedavg},
               {"label": "scaffold", "ok": True, "distances": scaffold},
               {"label": "exact", "ok": True, "distances": [0.7, 3e-15, 1e-15, *[2e-15] * 47]}]
    fig = compare.chart(results, {"distance": 0.2, "lr": 0.01, "local_epochs": 10}, "seed")
    ax = fig.axes[0]
    lowest_other = min(scaffold)
    assert lowest_other / 100 <= ax.get_ylim()[0] < lowest_other  # the others' decades, and just below
    lines = {line.get_gid(): line for line in ax.get_lines()}
    drawn = lines["strategy-exact"].get_ydata()
    assert drawn[0] == 0.7 and all(y == lowest_other / 10 for y in drawn[1:])  # along the bottom
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "exact (0 to machine precision)" in labels and "fedavg" in labels and "scaffold" in labels


def test_compare_on_the_seed_measures_each_strategy_and_reports_a_refused_one(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_compare(capsys, *SEED_ARGS, "--out", str(out))
    assert code == 0, stdout + stderr
    check_seed_report(out, stdout)
    # One federation in this process: the runs end in the order asked, each line before the table.
    assert runs_ended(stdout) == ["fedavg: completed", "nosuch: refused", "fedprox: completed"]
    assert stdout.index("compare: [3/3]") < stdout.index("\nstrategy ")


@pytest.mark.system
def test_make_compare_on_the_seed_measures_each_strategy_and_reports_a_refused_one(tmp_path):
    """The command the README gives, its federations in two worker processes
    (the default --jobs): the same report as in this process."""
    out = tmp_path / "out"
    proc = subprocess.run(["make", "--no-print-directory", "compare", "SCENARIO=seed",
                           "STRATEGIES=fedavg nosuch fedprox", "ROUNDS=200", f"OUT={out}",
                           "COMPARE_ARGS=--param fedprox.mu=0.5 --jobs 2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MAKEFLAGS": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 federations, one per worker process" in proc.stdout
    check_seed_report(out, proc.stdout)


def test_compare_on_diabetes_matches_a_numpy_fedavg_on_the_same_patients(tmp_path, capsys):
    from sklearn.datasets import load_diabetes
    code, stdout, stderr = run_compare(capsys, "--scenario", "diabetes", "--strategies", "fedavg", "--rounds", "40",
                                       "--out", str(tmp_path))
    assert code == 0, stdout + stderr
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["settings"]["clients"] == 4 and report["settings"]["lr"] == 0.1

    # θ*: lstsq on all 442 patients, z-scored here as the scenario's docstring says
    X, y = load_diabetes(return_X_y=True, scaled=False)
    Z, t = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    rows = np.column_stack([Z, np.ones(len(t))])
    expected, *_ = np.linalg.lstsq(rows, t, rcond=None)
    np.testing.assert_allclose(report["pooled_optimum"], expected, atol=1e-10)

    # FedAvg by hand on the clients the federation served (their split is tested in test_theory.py)
    from fedavg.scenarios import make_clients
    clients = [(c.X, c.y) for c in make_clients("diabetes", 4, seed=0)]
    theta = np.zeros(11)
    for _ in range(40):
        new = np.zeros(11)
        for Xk, yk in clients:
            w, b = theta[:10].copy(), theta[10]
            for _ in range(10):
                err = Xk @ w + b - yk
                w, b = w - 0.1 * 2 / len(yk) * (Xk.T @ err), b - 0.1 * 2 / len(yk) * err.sum()
            new += len(yk) / 442 * np.append(w, b)
        theta = new
    (fedavg,) = report["results"]
    got = np.append(fedavg["final_model"]["w"], fedavg["final_model"]["b"])
    np.testing.assert_allclose(got, theta, atol=1e-9)
    assert fedavg["final_distance"] == pytest.approx(float(np.linalg.norm(theta - expected)), abs=1e-9)


def test_compare_fails_only_when_no_strategy_runs(tmp_path, capsys):
    code, stdout, stderr = run_compare(capsys, "--strategies", "nosuch,alsonot", "--rounds", "3",
                                       "--out", str(tmp_path))
    assert code == 1, stdout + stderr
    assert stdout.count("refused (HTTP 400)") == 4  # a progress line and a table row each
    report = json.loads((tmp_path / "compare.json").read_text())
    assert [r["ok"] for r in report["results"]] == [False, False]
    assert "strategy-" not in (tmp_path / "compare.svg").read_text()  # an empty chart, still written


def test_a_run_past_the_timeout_is_stopped_and_the_next_one_still_runs(tmp_path, capsys):
    """--timeout: a run that has not answered in time is a row "no usable
    reply" and is stopped, so the same federation takes the next strategy."""
    code, stdout, stderr = run_compare(capsys, "--strategies", "fedavg,fedprox", "--rounds", "3",
                                       "--param", "fedavg.rounds=100000", "--timeout", "1", "--out", str(tmp_path))
    assert code == 0, stdout + stderr
    fedavg, fedprox = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert not fedavg["ok"] and fedavg["error"] == "no usable reply: no reply within 1 s (the run was told to stop)"
    assert fedprox["ok"] and fedprox["rounds_done"] == 3
    assert next(line for line in stdout.splitlines() if line.startswith("fedavg ")).endswith(fedavg["error"])


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds"),
    (["--strategies", " "], "--strategies"),
    (["--param", "nonsense"], "--param wants NAME=VALUE"),
    (["--scenario", "seed", "--clients", "3"], "exactly 2 clients"),
])
def test_usage_errors_exit_2_before_starting_anything(args, message, tmp_path, capsys):
    code, _, stderr = run_compare(capsys, *args, "--out", str(tmp_path / "out"))
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_compare_all_strategies_on_the_seed_separates_those_that_drift_from_those_that_do_not(tmp_path, capsys):
    """Every strategy the server knows completes; the ones that remove client
    drift (scaffold, exact) get within 1e-3 of the pooled line, the ones that
    average drifted models (fedavg, fedprox, fednova with equal steps) stay
    outside FedAvg's predicted stop."""
    code, stdout, stderr = run_compare(capsys, "--rounds", "300", "--out", str(tmp_path))
    assert code == 0, stdout + stderr
    report = json.loads((tmp_path / "compare.json").read_text())
    results = {r["strategy"]: r for r in report["results"]}
    assert set(results) == {"fedavg", "fedsgd", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi",
                            "fedadagrad", "fednova", "exact"}
    assert all(r["status"] == "completed" and r["rounds_done"] == 300 for r in results.values())
    optimum = pooled_seed_line()
    assert results["exact"]["rounds_to_tol"] == 1
    assert math.dist((results["exact"]["final_model"]["w"], results["exact"]["final_model"]["b"]), optimum) < 1e-9
    assert results["scaffold"]["rounds_to_tol"] is not None and results["scaffold"]["rounds_to_tol"] < 300
    stop = report["fedavg_fixed_point"]["distance"]
    for name in ("fedavg", "fedprox", "fednova"):
        assert results[name]["rounds_to_tol"] is None and min(results[name]["distances"]) > stop, name
    ids = svg_ids(tmp_path / "compare.svg")
    assert {i for i in ids if i.startswith("strategy-")} == {f"strategy-{name}" for name in results}
