"""docs/EXTENDING.md's three worked examples, run as written: each file is
taken from the doc, added with its registry line to a fresh copy of the code
(imported in place of this one, and this one put back after), and must show
up everywhere the doc says and compute its formula, checked against plain
Python written here."""
from __future__ import annotations

import importlib
import json
import math
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from form_html import form_choice
from reference import local_gd

EXTENDING_MD = ROOT / "docs" / "EXTENDING.md"
PACKAGES = {"fedavg": ROOT / "fedavg" / "fedavg", "fedavg_server": ROOT / "server" / "fedavg_server"}
# scripts/ modules that read the registries when imported: imported afresh from the copy too.
SCRIPTS = ("compare", "labs")


def example(heading: str) -> dict[str, str]:
    """The fenced python blocks under ``heading``, by the path their first line names."""
    text = EXTENDING_MD.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks}


def registry_edit(heading: str, path: str, anchor: str, import_line: str, entry: str) -> dict[str, tuple[str, str]]:
    """The doc's registry line as an edit of ``path``: ``import_line`` before
    ``anchor`` (the registry's first line) and ``entry`` as its first item.
    The doc must give both lines, as written here."""
    text = EXTENDING_MD.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)]
    flat = " ".join(section.split())
    for line in (import_line, entry):
        assert f"`{line}`" in flat, f"docs/EXTENDING.md's {heading!r} no longer says to add {line!r}"
    return {path: (anchor, f"{import_line}\n\n{anchor}    {entry}\n")}


@contextmanager
def code_with(tmp_path: Path, files: dict[str, str], edit: dict[str, tuple[str, str]]) -> Iterator[None]:
    """A copy of the packages with ``files`` added and each ``edit`` (path →
    (old, new)) made, imported in place of this one's; this one is back after."""
    for name, source in PACKAGES.items():
        shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in files.items():
        (tmp_path / "fedavg" / Path(path).relative_to("fedavg/fedavg")).write_text(text)
    for path, (old, new) in edit.items():
        target = tmp_path / "fedavg" / Path(path).relative_to("fedavg/fedavg")
        source = target.read_text()
        assert old in source, f"{path} no longer has {old!r}: the doc's instructions are out of date"
        target.write_text(source.replace(old, new, 1))
    ours = {k: m for k, m in sys.modules.items() if k.split(".")[0] in PACKAGES or k in SCRIPTS}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, str(tmp_path))
    try:
        yield
    finally:
        # The copy's page warms its charts in a thread (web._warm_plots): let that import end
        # before its modules go, or it fails half-way with a KeyError in the import machinery.
        for thread in threading.enumerate():
            if thread.name == "warm-plots":
                thread.join(timeout=60)
        sys.path.remove(str(tmp_path))
        for k in [k for k in sys.modules if k.split(".")[0] in PACKAGES or k in SCRIPTS]:
            del sys.modules[k]
        sys.modules.update(ours)


def run_compare(capsys, tmp_path: Path, *args: str) -> tuple[dict, str]:
    """The copy's scripts/compare.py main in this process, one federation: (its JSON report, stdout)."""
    compare = importlib.import_module("compare")
    out = tmp_path / "compare-out"
    code = compare.main([*args, "--jobs", "1", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    return json.loads((out / "compare.json").read_text()), stdout


def clients_of(rows_by_client):
    from fedavg.client import LocalClient

    return [LocalClient(f"c{k + 1}", np.array([[x] for x, _ in rows]), np.array([y for _, y in rows]))
            for k, rows in enumerate(rows_by_client)]


# Three clients with 2, 3 and 6 rows: FedAvg's n_k/N weights and the mean's 1/K differ on them.
UNEQUAL = [[(1.0, 3.0), (2.0, 5.0)], [(0.0, 1.5), (1.0, 2.0), (3.0, 4.5)],
           [(x, 0.5 * x + 2.0 + (-1) ** i * 0.1) for i, x in enumerate((0.5, 1.0, 2.0, 2.5, 3.5, 4.0))]]


def test_a_strategy_of_your_own_is_one_file_and_one_registry_line(tmp_path, caplog, capsys):
    files = example("## A strategy")
    assert list(files) == ["fedavg/fedavg/strategies/mean.py"]
    edit = registry_edit("## A strategy", "fedavg/fedavg/strategies/__init__.py",
                         "STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (\n",
                         "from .mean import Mean", "Mean,")
    with code_with(tmp_path, files, edit):
        from fedavg.strategies import STRATEGIES
        from fedavg_server.inprocess import federation_app

        assert "mean" in STRATEGIES
        server = federation_app(clients_of(UNEQUAL), tmp_path / "runs.db")
        http = server.test_client()
        # Everywhere the doc says: each client's /health, /start's OpenAPI enum, the page's form.
        transport = server.extensions["fedavg"].transport
        assert all("mean" in transport.call(url, "GET", "/health", 5.0).body["strategies"] for url in transport.urls)
        schema = http.get("/openapi.json").get_json()["components"]["schemas"]["StartRequest"]
        assert "mean" in schema["properties"]["strategy"]["enum"]
        assert 'value="mean"' in http.get("/").get_data(as_text=True)
        with caplog.at_level("INFO", logger="fedavg.server"):
            run = http.post("/start", json={"strategy": "mean", "rounds": 3}).get_json()
        server.extensions["fedavg"].shutdown()
        # make compare with no STRATEGIES: every registered strategy, the new one too.
        report, stdout = run_compare(capsys, tmp_path, "--scenario", "seed", "--rounds", "5")
        registered = list(STRATEGIES)
    assert run["status"] == "completed", run.get("error")
    # Its formula against plain Python: W_{t+1} = (1/K) Σ_k W_k, not FedAvg's Σ_k n_k/N · W_k.
    w, b = 0.0, 0.0
    for record in run["rounds"]:
        local = [local_gd(rows, w, b, 0.01, 10) for rows in UNEQUAL]
        weighted = sum(len(rows) * m[0] for rows, m in zip(UNEQUAL, local)) / 11
        w, b = sum(m[0] for m in local) / 3, sum(m[1] for m in local) / 3
        assert abs(weighted - w) > 1e-3  # the data tells the two apart
        assert (record["global_model"]["w"], record["global_model"]["b"]) == pytest.approx((w, b), abs=1e-12)
    assert "w = (1/3)·Σ_k = (1/3)·" in caplog.text and "mean: W_{t+1} = (1/K) Σ_k W_k" in caplog.text

    assert [r["strategy"] for r in report["results"]] == registered and "mean" in registered
    assert re.search(r"^compare: \[\d+/\d+\] mean: completed", stdout, re.M), stdout
    # On the seed (n_k = 2 and 2) the unweighted mean is plain-Python FedAvg.
    seed = [[(1.0, 3.0), (2.0, 5.0)], [(3.0, 4.0), (4.0, 5.0)]]
    w, b = 0.0, 0.0
    for _ in range(5):
        local = [local_gd(rows, w, b, 0.01, 10) for rows in seed]
        w, b = (local[0][0] + local[1][0]) / 2, (local[0][1] + local[1][1]) / 2
    mean = next(r for r in report["results"] if r["strategy"] == "mean")
    assert (mean["final_model"]["w"], mean["final_model"]["b"]) == pytest.approx((w, b), abs=1e-12)


def distance_sum(points: list[list[float]], m: list[float]) -> float:
    """Σ_k ‖V_k − m‖, in plain Python."""
    return sum(math.dist(p, m) for p in points)


def first_order(points: list[list[float]], m: list[float]) -> float:
    """‖Σ_k (V_k − m)/‖V_k − m‖‖: 0 at the geometric median when it is none of the points."""
    total = [0.0] * len(m)
    for p in points:
        d = math.dist(p, m)
        total = [t + (pi - mi) / d for t, pi, mi in zip(total, p, m)]
    return math.hypot(*total)


def brute_force_median(points: list[list[float]], steps: int = 200) -> list[float]:
    """argmin Σ_k ‖V_k − m‖ over a grid on the points' box, refined five times around the best."""
    lo = [min(p[j] for p in points) for j in range(2)]
    hi = [max(p[j] for p in points) for j in range(2)]
    for _ in range(5):
        grid = [[lo[0] + (hi[0] - lo[0]) * i / steps, lo[1] + (hi[1] - lo[1]) * j / steps]
                for i in range(steps + 1) for j in range(steps + 1)]
        best = min(grid, key=lambda m: distance_sum(points, m))
        half = [(hi[j] - lo[j]) / steps * 2 for j in range(2)]
        lo, hi = [best[j] - half[j] for j in range(2)], [best[j] + half[j] for j in range(2)]
    return best


def test_a_robust_rule_of_your_own_the_geometric_median(tmp_path, caplog, capsys):
    files = example("## A robust rule")
    assert list(files) == ["fedavg/fedavg/strategies/geomedian.py"]
    edit = registry_edit("## A robust rule", "fedavg/fedavg/strategies/combine.py",
                         "RULES: dict[str, Rule] = {r.name: r for r in (\n",
                         "from .geomedian import GeometricMedian", "GeometricMedian(),")
    # Three honest clients and one far away: the mean follows the liar, the median does not.
    liar = [[(x, 1e3 * x) for x in (1.0, 2.0, 3.0)]]
    data = UNEQUAL + liar
    with code_with(tmp_path, files, edit):
        from fedavg.strategies import AGGREGATORS
        from fedavg.strategies.geomedian import weiszfeld
        from fedavg_server.inprocess import federation_app

        assert "geometric_median" in AGGREGATORS
        # The function against plain Python: five points of the plane, not on a line.
        points = [[0.0, 0.0], [4.0, 0.5], [1.0, 3.0], [5.0, 4.0], [-2.0, 2.5]]
        m, steps = weiszfeld(np.array(points))
        m = list(map(float, m))
        assert first_order(points, m) < 1e-8 and steps > 1
        best = brute_force_median(points)
        assert distance_sum(points, m) <= distance_sum(points, best) + 1e-12
        assert math.dist(m, best) < 1e-6
        # The guards: the mean (the first iterate) is one of the points, and the median by symmetry;
        # the median is a point (an angle over 120° there), which the iteration only crawls towards.
        cross = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        assert weiszfeld(cross)[0] == pytest.approx([0.0, 0.0], abs=1e-12)
        obtuse = [[0.0, 0.0], [1.0, 0.1], [-1.0, 0.1], [0.0, -50.0]]
        assert first_order(obtuse[1:], [0.0, 0.0]) <= 1  # Kuhn: the others pull on (0, 0) by at most 1
        assert list(weiszfeld(np.array(obtuse))[0]) == [0.0, 0.0]
        assert distance_sum(obtuse, [0.0, 0.0]) <= distance_sum(obtuse, brute_force_median(obtuse)) + 1e-12

        server = federation_app(clients_of(data), tmp_path / "runs.db")
        http = server.test_client()
        schema = http.get("/openapi.json").get_json()["components"]["schemas"]["StartRequest"]
        assert "geometric_median" in schema["properties"]["aggregator"]["enum"]
        # The page's form: an option of the Aggregator select, with its summary as the line and tooltip.
        form = form_choice(http.get("/").get_data(as_text=True), "aggregator")
        summary = "the geometric median argmin_m Σ_k ‖V_k − m‖ (Weiszfeld's iteration; n_k not used)"
        assert {"value": "geometric_median", "summary": summary, "title": summary, "selected": False} \
            in form.options
        refused = http.post("/start", json={"aggregator": "nosuch"}).get_json()["error"]
        assert "aggregator" in refused and "geometric_median" in refused
        with caplog.at_level("INFO", logger="fedavg.server"):
            run = http.post("/start", json={"aggregator": "geometric_median", "rounds": 3}).get_json()
        server.extensions["fedavg"].shutdown()
        report, _ = run_compare(capsys, tmp_path, "--scenario", "byzantine", "--strategies", "fedavg",
                                "--aggregators", "mean,geometric_median", "--rounds", "20")
    assert run["status"] == "completed", run.get("error")
    # Each round's global model is the geometric median of the local models computed here.
    w, b = 0.0, 0.0
    for record in run["rounds"]:
        local = [list(local_gd(rows, w, b, 0.01, 10)) for rows in data]
        w, b = record["global_model"]["w"], record["global_model"]["b"]
        # Near-collinear local models make Weiszfeld crawl: MAX_STEPS leaves Σ_k ‖W_k − m‖ within 1e-7
        # (relative) of the brute-force minimum here, not the 1e-12 of the five points above.
        assert distance_sum(local, [w, b]) <= distance_sum(local, brute_force_median(local)) * (1 + 1e-7)
        assert abs(w) < 10  # the liar's local model is hundreds away: the median stays with the others
    assert "Weiszfeld: m_(j+1)" in caplog.text and "w = geometric median's coordinate = " in caplog.text
    # make compare's --aggregators: against huge attackers the mean is lost, the median is not.
    final = {r["label"]: r["final_distance"] for r in report["results"]}
    assert final["fedavg+geometric_median"] < 0.5 < 1e3 < final["fedavg+mean"]


def test_a_scenario_of_your_own_is_one_file_and_one_registry_line(tmp_path, capsys):
    files = example("## A data source")
    assert list(files) == ["fedavg/fedavg/steep_line.py"]
    edit = registry_edit("## A data source", "fedavg/fedavg/scenarios.py",
                         "SCENARIOS: dict[str, Callable[..., list[LocalClient]]] = {\n",
                         "from .steep_line import steep_line", '"steep-line": steep_line,')
    with code_with(tmp_path, files, edit):
        from fedavg.scenarios import SCENARIOS, about, make_clients

        assert "steep-line" in SCENARIOS
        assert about("steep-line") == ("x ~ U(0, 4), y = 3x − 2 + N(0, (0.1·k)²) noise for client k = 1 … K, "
                                       "n_k = samples")
        clients = make_clients("steep-line", 5, seed=1, samples=200)
        again = make_clients("steep-line", 5, seed=1, samples=200)
        report, stdout = run_compare(capsys, tmp_path, "--scenario", "steep-line", "--clients", "4",
                                     "--strategies", "fedavg", "--rounds", "3")
        compared = make_clients("steep-line", 4)
    # What the doc says the data is, against plain Python on its rows.
    assert [c.client_id for c in clients] == [f"steep_{k}" for k in range(1, 6)]
    assert all(np.array_equal(c.X, d.X) and np.array_equal(c.y, d.y) for c, d in zip(clients, again))
    spreads = []
    for k, c in enumerate(clients, start=1):
        xs, ys = [float(x) for x in c.X[:, 0]], [float(y) for y in c.y]
        assert len(xs) == 200 and all(0.0 <= x <= 4.0 for x in xs)
        residuals = [y - (3 * x - 2) for x, y in zip(xs, ys)]
        spread = math.sqrt(sum(r * r for r in residuals) / len(residuals))
        assert spread == pytest.approx(0.1 * k, rel=0.25)  # N(0, (0.1·k)²): 200 draws' RMS within 25 %
        spreads.append(spread)
    assert spreads == sorted(spreads)
    # make compare SCENARIO=steep-line: its pooled optimum is the least-squares line of the rows (closed form).
    xs = [float(x) for c in compared for x in c.X[:, 0]]
    ys = [float(y) for c in compared for y in c.y]
    n, sx, sy = len(xs), sum(xs), sum(ys)
    sxx, sxy = sum(x * x for x in xs), sum(x * y for x, y in zip(xs, ys))
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    intercept = (sy - slope * sx) / n
    assert report["pooled_optimum"] == pytest.approx([slope, intercept], abs=1e-9)
    assert report["pooled_optimum"] == pytest.approx([3.0, -2.0], abs=0.2)
    assert re.search(r"^compare: \[1/1\] fedavg: completed", stdout, re.M), stdout
