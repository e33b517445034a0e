"""Each client's own page (GET / on the client, /clients/<k>/ on a client
host): the private points it holds, its local least-squares line against
the closed form, and the last global model it received against the run's
final model. And a client asked to /start says it is a client.

The apps are in this process, asked through Flask's test client, the
server reaching its clients through InProcessTransport: the same handlers
and templates the processes serve. One system test starts a client the way
the README does, with --data and --client-id, and reads its page over HTTP."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pytest

import launcher
from conftest import ROOT, Federated
from fedavg.http.client_app import create_app as create_client_app
from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg_server import create_app as create_server_app
from fedavg_server.inprocess import InProcessTransport

# Values found nowhere else: the page must show them; the server must never hold them.
POINTS = [(0.5, 2.25), (1.75, 4.125), (3.0, 6.5), (4.25, 8.375), (-1.5, -1.875)]


class Page(HTMLParser):
    """The elements of a client's page the tests read: every tag's attributes by id,
    the table's data-x/data-y cells, the scatter's circles, and the text by id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.circles = 0
        self.lines: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self._open: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.by_id[a["id"]] = a
            self.text[a["id"]] = ""
        self._open.append(a.get("id", ""))
        if "data-x" in a:
            self.xs.append(float(a["data-x"]))
        if "data-y" in a:
            self.ys.append(float(a["data-y"]))
        if tag == "circle" and a.get("class") == "point":
            self.circles += 1
        if tag == "line" and a.get("class") in ("lstsq", "global"):
            self.lines[a["class"]] = a

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self._open.pop()

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.text[i] += data


def page_of(client, path: str = "/") -> Page:
    """The page at ``path`` through a Flask test client."""
    r = client.get(path)
    assert r.status_code == 200 and r.content_type.startswith("text/html"), (r.status_code, r.data[:200])
    return Page(r.get_data(as_text=True))


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """client "alice" on the CSV above, client_2 on its own seed data, and a
    server using both, all in this process: a test client for each."""
    tmp = tmp_path_factory.mktemp("client_page")
    csv = tmp / "alice.csv"
    csv.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in POINTS))
    alice = create_client_app({"CLIENT_ID": "alice", "DATA_PATH": str(csv), "TOKEN": None})
    client_2 = create_client_app({"CLIENT_ID": "client_2", "DATA_PATH": str(ROOT / "client_2" / "data.csv"),
                                  "TOKEN": None})
    transport = InProcessTransport({"http://127.0.0.1:5001": alice, "http://127.0.0.1:5002": client_2})
    server = Federated(create_server_app({"TRANSPORT": transport, "DB": str(tmp / "runs.db"), "TOKEN": None}))
    yield {"alice": alice.test_client(), "client_2": client_2.test_client(), "server": server}
    server.close()


def assert_points_and_least_squares_line(page: Page) -> None:
    x = np.array([p[0] for p in POINTS])
    y = np.array([p[1] for p in POINTS])
    assert page.xs == x.tolist() and page.ys == y.tolist()  # the table, every point
    assert page.circles == len(POINTS)  # the scatter, every point
    # least squares in closed form: slope = cov(x, y)/var(x), intercept = ȳ − slope·x̄
    slope = float(np.mean((x - x.mean()) * (y - y.mean())) / np.mean((x - x.mean()) ** 2))
    intercept = float(y.mean() - slope * x.mean())
    lstsq = page.by_id["lstsq"]
    assert float(lstsq["data-w"]) == pytest.approx(slope, rel=1e-12)
    assert float(lstsq["data-b"]) == pytest.approx(intercept, rel=1e-12)


def test_the_page_shows_the_points_and_the_local_least_squares_line(apps):
    page = page_of(apps["alice"])
    assert_points_and_least_squares_line(page)
    assert "lstsq" in page.lines and "global" not in page.lines  # nothing received yet
    assert "None yet" in page.text["last-global"]
    # the page says plainly that only this client serves it, and what /health gives away
    assert "Only this client serves this page" in page.text["only-here"]
    assert "small, deliberate leak" in page.text["only-here"]


def test_health_reports_the_x_range_of_the_first_feature(apps):
    r = apps["alice"].get("/health")
    xs = [p[0] for p in POINTS]
    assert r.status_code == 200 and r.get_json()["x_range"] == [min(xs), max(xs)]


def test_after_a_run_the_page_shows_the_final_global_model(apps):
    server = apps["server"]
    run = server.run(rounds=3, seed=4)
    assert run["status"] == "completed", run
    final = run["rounds"][-1]["global_model"]  # the final /evaluate sends the last round's model out
    assert run["final_model"] == final
    page = page_of(apps["alice"])
    last = page.by_id["last-global"]
    assert float(last["data-w"]) == final["w"] and float(last["data-b"]) == final["b"]
    assert last["data-via"] == "/evaluate"
    assert "global" in page.lines
    # the server's own replies never carry alice's points
    for path in ("/runs", f"/runs/{run['run_id']}", "/clients", "/"):
        body = server.http.get(path).data
        assert b"2.25" not in body and b"4.125" not in body and b"8.375" not in body, path


@pytest.mark.parametrize("method, path", [("POST", "/start"), ("GET", "/start"), ("GET", "/runs")])
def test_a_client_asked_to_start_says_it_is_a_client(apps, method, path):
    # the body and content type urllib sends with data: what a hand-written request would carry
    r = apps["alice"].open(path, method=method, data=b"{}" if method == "POST" else None,
                           content_type="application/x-www-form-urlencoded" if method == "POST" else None)
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"
    error = r.get_json()["error"]
    assert error.startswith("this is a client (alice), not the server")
    assert "http://127.0.0.1:5000" in error


def test_a_client_on_a_host_has_its_own_page():
    host = create_host_app(make_clients("iid", 3, samples=7)).test_client()
    for k in (1, 3):
        page = page_of(host, f"/clients/{k}/")
        assert len(page.xs) == page.circles == 7
        assert page.by_id["scatter"]["aria-label"].startswith(f"7 private points of sim_{k},")
        x, y = np.array(page.xs), np.array(page.ys)
        slope = np.mean((x - x.mean()) * (y - y.mean())) / np.mean((x - x.mean()) ** 2)
        assert float(page.by_id["lstsq"]["data-w"]) == pytest.approx(slope, rel=1e-9)
    assert host.get("/clients/4/").status_code == 404


@pytest.mark.system
def test_a_client_started_with_its_own_data_and_name_serves_its_page(tmp_path):
    """client_1_app.py --data alice.csv --target score --client-id alice, as
    docs/SETTINGS.md starts a client on a file whose target is named score
    (and comes first): its page over HTTP shows that file's points (hours,
    score) and their least-squares line, and it answers /start in that name."""
    csv = tmp_path / "alice.csv"
    csv.write_text("score,hours\n" + "".join(f"{y},{x}\n" for x, y in POINTS))
    alice = launcher.start_app("client_1", launcher.free_port(),
                               ["--data", str(csv), "--target", "score", "--client-id", "alice"])
    try:
        launcher.wait_healthy([alice])
        status, ctype, body = launcher.fetch(alice.url + "/")
        assert status == 200 and ctype.startswith("text/html"), (status, body[:200])
        assert_points_and_least_squares_line(Page(body.decode()))
        req = urllib.request.Request(alice.url + "/start", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 404 and e.value.headers["Content-Type"] == "application/json"
        assert json.loads(e.value.read())["error"].startswith("this is a client (alice), not the server")
    finally:
        launcher.stop([alice])
