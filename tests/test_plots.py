"""The charts: SVG from the server for runs of 1 and 1000 rounds and a
FedSGD run (no local models), 404s as JSON, ``?since=`` for live polling,
several runs compared on one chart, and scripts/plot_run.py writing PNGs.

The server is the seed's, over its two client apps in this process
(conftest's ``seed_federation``), asked through its own API: the same
endpoints and charts a real one serves. plot_run.py's ``main`` reads it over
HTTP on a loopback port (a thread here); test_readme runs the script itself,
as the README does, against the real apps (make test-all)."""
from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import plot_run
import pytest

from conftest import ROOT, Served

# At the top, so at collection, outside any test: matplotlib's first import
# on a machine builds its font cache by running fc-list, a process the
# everyday tier refuses inside a test.
from fedavg_server.plots import render
from reference import SEED_DATA

SVG = "{http://www.w3.org/2000/svg}svg"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ("models", "params", "loss")


@pytest.fixture(scope="module")
def server(seed_federation):
    """The seed's server in this process, and finished runs on it: FedAvg for
    1 round and 1000 rounds, FedSGD (no local models, only gradients) for 3,
    exact for 1. Yields get(path) → (status, content type, body), and the runs."""
    runs = {"fedsgd": seed_federation.run(rounds=3, strategy="fedsgd", seed=7),
            "exact": seed_federation.run(rounds=1, strategy="exact")}
    for rounds in (1, 1000):  # the 1000 rounds last: plot_run draws the latest run
        runs[rounds] = seed_federation.run(rounds=rounds, pace_s=0, seed=7)
    for run in runs.values():
        assert run["status"] == "completed", run

    def get(path: str) -> tuple[int, str, bytes]:
        r = seed_federation.http.get(path)
        return r.status_code, r.content_type, r.data

    return get, runs


@pytest.fixture(scope="module")
def server_url(seed_federation, server) -> str:
    """The same server on a free loopback port, for plot_run.py, which reads a run over HTTP."""
    served = Served(seed_federation.app)
    yield served.url
    served.close()


def assert_svg(body: bytes) -> ET.Element:
    root = ET.fromstring(body)  # raises on anything that is not well-formed XML
    assert root.tag == SVG
    assert root.get("viewBox") or root.get("width")
    assert len(list(root.iter())) > 20  # axes, lines and text, not an empty document
    return root


@pytest.mark.parametrize("rounds", [1, 1000])
@pytest.mark.parametrize("name", NAMES)
def test_each_chart_is_valid_svg(server, rounds, name):
    get, runs = server
    status, ctype, body = get(f"/runs/{runs[rounds]['run_id']}/plots/{name}.svg")
    assert status == 200, body
    assert ctype.startswith("image/svg+xml")
    assert_svg(body)
    assert len(body) < 2_000_000  # 1000 rounds stay one line each, not 1000 elements per series
    assert b'id="outside-line"' not in body  # real clients: no pooled line the server could know


@pytest.mark.parametrize("name", NAMES)
def test_a_fedsgd_run_without_local_models_still_draws(server, name):
    """FedSGD's clients send gradients, not models: the charts draw the global
    model alone, and the model lines say why the clients' lines are missing."""
    get, runs = server
    run = runs["fedsgd"]
    assert all("local_model" not in p and "gradient" in p for r in run["rounds"] for p in r["participants"])
    for round_no in (1, 3):
        status, ctype, body = get(f"/runs/{run['run_id']}/plots/{name}.svg?round={round_no}")
        assert status == 200 and ctype.startswith("image/svg+xml"), body
        assert_svg(body)
    if name == "models":
        assert b"<!-- 2 client(s) sent no local model, so no line -->" in body
        assert b"strategy fedsgd" in body
    assert render(run, name, "png").startswith(PNG_SIGNATURE)


def compare_ids(root: ET.Element) -> set[str]:
    return {g.get("id") for g in root.iter("{http://www.w3.org/2000/svg}g") if (g.get("id") or "").startswith("run-")}


def test_compare_overlays_one_labelled_line_per_run(server):
    get, runs = server
    ids = [runs[1]["run_id"], runs[1000]["run_id"], runs["fedsgd"]["run_id"]]
    status, ctype, body = get(f"/compare.svg?runs={','.join(map(str, ids))}")
    assert status == 200 and ctype.startswith("image/svg+xml")
    assert compare_ids(assert_svg(body)) == {f"run-{i}" for i in ids}
    for run_id, strategy in zip(ids, ("fedavg", "fedavg", "fedsgd")):
        assert f"<!-- run {run_id}: {strategy} -->".encode() in body  # the legend's label
    # the same run twice is one line
    status, _, body = get(f"/compare.svg?runs={ids[0]},{ids[0]}")
    assert status == 200 and compare_ids(assert_svg(body)) == {f"run-{ids[0]}"}


def pooled_line(clients: list[list[tuple[float, float]]]) -> tuple[float, float]:
    """Least squares through every client's points at once: slope and intercept in closed form."""
    points = [pt for data in clients for pt in data]
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    w = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return w, my - w * mx


def test_compare_draws_the_distance_to_an_exact_runs_optimum(server):
    """With an exact run on the same clients chosen, every other run's
    ‖θ_t − θ*‖ is drawn, its last value in the legend: here against the
    pooled line of the seed's four points, computed in this test. The exact
    run itself is θ* (to 1e-9 of the closed form) and gets no line."""
    get, runs = server
    w_star, b_star = pooled_line(SEED_DATA)
    exact_id = runs["exact"]["run_id"]
    chosen = [runs[1000], runs["fedsgd"], runs["exact"]]
    status, _, body = get(f"/compare.svg?runs={','.join(str(r['run_id']) for r in chosen)}")
    assert status == 200
    root = assert_svg(body)
    drawn = {g.get("id") for g in root.iter("{http://www.w3.org/2000/svg}g")
             if (g.get("id") or "").startswith("distance-")}
    assert drawn == {f"distance-run-{r['run_id']}" for r in chosen[:2]}
    assert math.hypot(runs["exact"]["final_model"]["w"] - w_star, runs["exact"]["final_model"]["b"] - b_star) < 1e-9
    for run in chosen[:2]:
        model = run["rounds"][-1]["global_model"]
        distance = math.hypot(model["w"] - w_star, model["b"] - b_star)
        name = f"run {run['run_id']}: {run['settings']['strategy']}"
        legend = rf"<!-- {name}, last (\S+) \(θ\* from run {exact_id}\) -->"
        found = re.search(legend, body.decode())
        assert found, legend
        assert abs(float(found.group(1)) - distance) <= 1e-6 * max(distance, 1e-3), (found.group(1), distance)
    # FedAvg stops short of θ* (0.4137 at its fixed point), the exact run is on it
    assert math.hypot(runs[1000]["final_model"]["w"] - w_star, runs[1000]["final_model"]["b"] - b_star) > 0.3


def test_compare_without_an_exact_run_says_how_to_get_the_distance(server):
    get, runs = server
    status, _, body = get(f"/compare.svg?runs={runs[1]['run_id']},{runs['fedsgd']['run_id']}")
    assert status == 200
    assert b"distance-run-" not in body
    assert b"compare with an exact run" in body


@pytest.mark.parametrize("query, status, message", [
    ("", 400, "runs: required, the run ids to compare, e.g. runs=1,2"),
    ("runs=", 400, "runs: must be run ids separated by commas, got ''"),
    ("runs=1,x", 400, "runs: must be run ids separated by commas, got '1,x'"),
    ("runs=1,-2", 400, "runs: must be run ids separated by commas, got '1,-2'"),
    ("runs=" + ",".join(["1"] * 11), 400, "runs: at most 10 runs on one chart, got 11"),
    ("runs=1&round=2", 400, "round: unknown query parameter"),
    ("runs=1,987654", 404, "no run 987654"),
    ("runs=" + "9" * 40, 404, "no run " + "9" * 40),
    ("runs=1," + "9" * 50, 404, "no run " + "9" * 40),
])
def test_compare_says_what_is_wrong_as_json(server, query, status, message):
    get, _ = server
    got, ctype, body = get(f"/compare.svg?{query}")
    assert got == status and ctype.startswith("application/json")
    assert json.loads(body) == {"error": message}


def test_model_lines_of_a_chosen_round(server):
    get, runs = server
    run_id = runs[1000]["run_id"]
    for round_no in (1, 500, 1000):
        status, _, body = get(f"/runs/{run_id}/plots/models.svg?round={round_no}")
        assert status == 200
        assert_svg(body)
    status, _, body = get(f"/runs/{run_id}/plots/params.svg?round=500")
    assert status == 200
    assert_svg(body)


@pytest.mark.parametrize("query, message", [
    ("round=1001", "round: run {id} has no round 1001 (1000 completed)"),
    ("round=0", "round: must be a round number >= 1, got '0'"),
    ("round=x", "round: must be a round number >= 1, got 'x'"),
    ("size=big", "size: unknown query parameter"),
])
def test_bad_query_is_a_400_json(server, query, message):
    get, runs = server
    run_id = runs[1000]["run_id"]
    status, ctype, body = get(f"/runs/{run_id}/plots/models.svg?{query}")
    assert status == 400 and ctype.startswith("application/json")
    assert json.loads(body) == {"error": message.format(id=run_id)}


def test_missing_run_is_a_404_json(server):
    get, _ = server
    status, ctype, body = get("/runs/987654/plots/models.svg")
    assert status == 404 and ctype.startswith("application/json")
    assert json.loads(body) == {"error": "no run 987654"}


def test_unknown_chart_is_a_404_json(server):
    get, runs = server
    status, ctype, body = get(f"/runs/{runs[1]['run_id']}/plots/scatter.svg")
    assert status == 404 and ctype.startswith("application/json")
    assert json.loads(body) == {"error": "no plot 'scatter' (known: models, params, loss)"}


def test_since_gives_only_the_later_rounds(server):
    get, runs = server
    run = runs[1000]
    status, _, body = get(f"/runs/{run['run_id']}?since=998")
    assert status == 200
    later = json.loads(body)
    assert later["rounds"] == run["rounds"][998:]
    # the same run as /start answered, less its summary (which /start puts first); both are the last page
    summary = ("message", "final_line", "rounds_completed", "url")
    assert later["more"] is False and run["more"] is False
    assert {k: v for k, v in later.items() if k != "rounds"} == {k: v for k, v in run.items()
                                                                if k != "rounds" and k not in summary}
    assert json.loads(get(f"/runs/{run['run_id']}?since=0")[2])["rounds"] == run["rounds"]
    assert json.loads(get(f"/runs/{run['run_id']}?since={'9' * 40}")[2])["rounds"] == []
    status, _, body = get(f"/runs/{run['run_id']}?since=-1")
    assert status == 400 and json.loads(body) == {"error": "since: must be a whole number >= 0, got '-1'"}


def test_a_run_without_rounds_still_draws():
    """A run that failed before its first round: every chart says so instead of failing."""
    run = {"run_id": 5, "status": "failed", "clients": ["http://a"], "rounds": []}
    for name in NAMES:
        assert_svg(render(run, name, "svg"))
        assert render(run, name, "png").startswith(PNG_SIGNATURE)


def test_plot_run_writes_three_pngs_from_the_server_and_from_a_file(server, server_url, tmp_path, monkeypatch,
                                                                   capsys):
    """plot_run.py's main with the arguments its command line takes (the
    script itself, run by its path from another folder, is test_readme's)."""
    get, runs = server
    run = runs[1000]
    monkeypatch.chdir(tmp_path)  # where relative paths land, as for a command run here
    assert plot_run.main([server_url, "--out", str(tmp_path / "latest")]) == 0
    files = [tmp_path / "latest" / f"run-{run['run_id']}-{name}.png" for name in NAMES]
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    for f in files:
        data = f.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000

    # the run's JSON as the page downloads it (GET /runs/<id>), saved to a file
    saved = tmp_path / "run.json"
    saved.write_bytes(get(f"/runs/{runs[1]['run_id']}")[2])
    assert plot_run.main([str(saved), "--out", "from-file", "--round", "1"]) == 0
    for name in NAMES:
        data = (tmp_path / "from-file" / f"run-{runs[1]['run_id']}-{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_plot_run_writes_into_an_ignored_folder_by_default(server, server_url, tmp_path, monkeypatch, capsys):
    """The README's line, without --out, in a checkout: the PNGs go to plots-out/, which git
    ignores (not loose files in the repository's root), and their paths are printed."""
    _, runs = server
    monkeypatch.chdir(tmp_path)
    assert plot_run.main([server_url]) == 0
    files = [tmp_path / "plots-out" / f"run-{runs[1000]['run_id']}-{name}.png" for name in NAMES]
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    assert all(f.read_bytes().startswith(PNG_SIGNATURE) for f in files)
    assert f"{plot_run.DEFAULT_OUT}/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("args, message", [
    (["missing.json"], "missing.json: No such file or directory"),
    (["{url}/runs/987654"], "HTTP 404"),
    (["{url}", "--run", "{id}", "--round", "2"], "has no round 2"),
])
def test_plot_run_says_what_is_wrong(server, server_url, tmp_path, monkeypatch, capsys, args, message):
    _, runs = server
    monkeypatch.chdir(tmp_path)
    assert plot_run.main([a.format(url=server_url, id=runs[1]["run_id"]) for a in args]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_the_model_lines_span_the_x_the_clients_report(server):
    """The seed's clients report x₁ in [1, 2] and [3, 4] in /health: the
    chart spans [1, 4] with 5% either side, and says where the range came from."""
    get, runs = server
    clients = json.loads(get("/clients")[2])["clients"]
    assert [c["x_range"] for c in clients] == [[1.0, 2.0], [3.0, 4.0]]
    status, _, body = get(f"/runs/{runs[1]['run_id']}/plots/models.svg")
    assert status == 200
    assert_svg(body)
    assert "<!-- x; the clients report x₁ from 1 to 4 -->".encode() in body
    # the figure itself: x from 1 − 0.15 to 4 + 0.15
    from fedavg_server.plots import X_RANGE, models_figure
    (ax,) = models_figure(runs[1], None, [(1.0, 2.0), (3.0, 4.0)]).axes
    assert ax.get_xlim() == pytest.approx((1.0 - 0.15, 4.0 + 0.15))
    # a run downloaded and drawn elsewhere: no ranges, the fixed frame
    (ax,) = models_figure(runs[1]).axes
    assert ax.get_xlim() == pytest.approx(X_RANGE)


def test_a_chart_that_cannot_get_its_turn_is_a_503_not_a_hang(tmp_path, monkeypatch):
    """Another request is drawing (the lock is held): after LOCK_WAIT_S the
    chart request answers 503 with Retry-After instead of queueing for good."""
    from fedavg_server import create_app, plots

    app = create_app({"CLIENTS": ["http://127.0.0.1:9"], "DB": str(tmp_path / "runs.db")})
    store = app.extensions["fedavg"].store
    run_id = store.create({"rounds": 1, "strategy": "fedavg"}, ["http://127.0.0.1:9"], {"w": 0.0, "b": 0.0})
    monkeypatch.setattr(plots, "LOCK_WAIT_S", 0.2)
    with plots._render_lock:
        r = app.test_client().get(f"/runs/{run_id}/plots/loss.svg")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "try again" in r.get_json()["error"]
    assert app.test_client().get(f"/runs/{run_id}/plots/loss.svg").status_code == 200
    app.extensions["fedavg"].transport.close()
