"""What every test shares, as flaskr's conftest does: scripts/ on the path
(tests start the apps with scripts/launcher.py, the code `make run-all` and
`make demo` use), the repository root, a WSGI app served on a free loopback
port for the tests that stand up a fake or in-process client, federations in
this process (``federation``, ``seed_federation``: the server app over client
apps through ``InProcessTransport``, driven through the server's own API),
the seed's three apps as processes, and the headless Chromium the page tests
drive.

The seed's data is in reference.py (with the plain-Python FedAvg that
checks the code); launcher.get_json and launcher.wait_for_run read the API.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def pytest_configure(config: pytest.Config) -> None:
    """matplotlib builds its font cache the first time it is imported on a
    machine, and asks fc-list, a process: let it do so now, before any
    test of the everyday tier (which starts no process) draws a chart."""
    import matplotlib.font_manager  # noqa: F401


@contextmanager
def _no_process_unless_system(item: pytest.Item) -> Iterator[None]:
    """make test's tier runs in this process: a test that starts a process
    (an app, a script, make, a browser), itself or through a fixture, belongs
    to make test-all and is marked ``@pytest.mark.system``. This keeps the
    everyday tier fast, and says so when a test forgets."""
    if item.get_closest_marker("system") is not None:
        yield
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{item.nodeid} starts a process ({args[0] if args else kwargs}): mark it "
                             "@pytest.mark.system (make test-all), or drive the apps in-process")

    popen, subprocess.Popen = subprocess.Popen, refuse
    try:
        yield
    finally:
        subprocess.Popen = popen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _no_process_unless_system(item):  # (a module's fixtures are set up here, with its first test)
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _no_process_unless_system(item):
        yield


class Served:
    """A WSGI app on a free loopback port, in a daemon thread."""

    def __init__(self, app: Flask) -> None:
        self.server = make_server(host="127.0.0.1", port=0, app=app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], Served]]:
    """serve(app) → the app on a free loopback port, closed when the test ends."""
    served: list[Served] = []

    def start(app: Flask) -> Served:
        served.append(Served(app))
        return served[-1]

    yield start
    for s in served:
        s.close()


@pytest.fixture(scope="module")
def seed_server(tmp_path_factory) -> Iterator[str]:
    """The seed's three apps started as the README starts them, the run
    history in a temporary file; yields the server's URL."""
    import launcher
    db = tmp_path_factory.mktemp("seed") / "runs.db"
    apps = launcher.start_federation({name: launcher.free_port() for name in launcher.DEFAULT_PORTS},
                                     server_args=["--db", str(db)])
    try:
        yield apps["server"].url
    finally:
        launcher.stop(list(apps.values()))


def run_from_host(host: Any, apps: list[Any], db: Path, body: dict[str, Any]) -> dict[str, Any]:
    """A server process started with ``--clients-from`` the client host
    ``host`` (added to ``apps``, which the caller stops) and the completed
    run of the /start ``body`` (any other end fails the test)."""
    import launcher
    server = launcher.start_app("server", launcher.free_port(), ["--clients-from", host.url, "--db", str(db)])
    apps.append(server)
    launcher.wait_healthy(apps)
    status, run = launcher.post_json(server.url + "/start", body)
    assert status == 200 and run["status"] == "completed", run.get("error")
    return run


class Federated:
    """A server app over client apps in this process, driven through its own
    API (Flask's test client): what a real federation answers, without a socket."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.http = app.test_client()
        self.fed = app.extensions["fedavg"]

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        r = self.http.post(path, json=body, headers=headers or {})
        return r.status_code, r.get_json()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        r = self.http.get(path, headers=headers or {})
        return r.status_code, r.get_json()

    def run(self, **settings: Any) -> dict[str, Any]:
        """POST /start with these settings and wait: the ended run (a 200, else the test fails),
        every round of it (the answer holds the first page; the rest is read with ?since=)."""
        status, body = self.post("/start", settings)
        assert status == 200, body
        return self.whole(body)

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        """A /start or /resume answer with every round: the rounds after its first page, read with ?since=."""
        while body.get("more"):
            status, page = self.get(f"/runs/{body['run_id']}?since={body['rounds'][-1]['round']}&limit=10000")
            assert status == 200, page
            body["rounds"] += page["rounds"]
            body["more"] = page.get("more", False)
        return body

    def close(self) -> None:
        self.fed.shutdown()
        self.fed.transport.close()
        self.fed.store.close()


@pytest.fixture
def federation(tmp_path) -> Iterator[Callable[..., Federated]]:
    """federation(clients, token=None, **server_config) → a Federated over
    those LocalClients (one client host app), its history in a temporary file."""
    from fedavg_server.inprocess import federation_app

    made: list[Federated] = []

    def make(clients: list[Any], token: str | None = None, **config: Any) -> Federated:
        made.append(Federated(federation_app(clients, tmp_path / f"runs-{len(made)}.db", token, **config)))
        return made[-1]

    yield make
    for f in made:
        f.close()


@pytest.fixture
def servers(tmp_path) -> Iterator[Callable[..., Federated]]:
    """servers(clients, db=None, **server_config) → a Federated over
    ``clients``: a Transport, or client apps by URL (called in-process); its
    history in ``db`` (default a file of its own). All shut down at the end."""
    from fedavg_server import create_app
    from fedavg_server.inprocess import InProcessTransport

    made: list[Federated] = []

    def make(clients: Any, db: Path | None = None, **config: Any) -> Federated:
        transport = InProcessTransport(clients) if isinstance(clients, dict) else clients
        db = db or tmp_path / f"servers-{len(made)}.db"
        made.append(Federated(create_app({"TRANSPORT": transport, "DB": str(db), "TOKEN": None, **config})))
        return made[-1]

    yield make
    for f in made:
        f.close()


@pytest.fixture(scope="module")
def seed_federation(tmp_path_factory) -> Iterator[Federated]:
    """The seed's two client apps (client_1/data.csv and client_2/data.csv,
    at the URLs the server calls by default) and its server, in this process."""
    from fedavg.http.client_app import create_app as client_app
    from fedavg_server import DEFAULT_CLIENTS, create_app
    from fedavg_server.inprocess import InProcessTransport

    apps = [client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"), "TOKEN": None})
            for name in ("client_1", "client_2")]
    db = tmp_path_factory.mktemp("seed-inprocess") / "runs.db"
    federated = Federated(create_app({"TRANSPORT": InProcessTransport(dict(zip(DEFAULT_CLIENTS, apps))),
                                      "DB": str(db), "TOKEN": None}))
    yield federated
    federated.close()


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, through Playwright (its own browser
    download cannot work offline). `make test-all` sets CHROMIUM (its one
    default, /usr/bin/chromium) and installs the browser first, or says how."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM")
    assert chromium, "run the page tests with `make test-all`: it sets CHROMIUM and installs Chromium when missing"
    assert Path(chromium).exists(), f"no browser at CHROMIUM={chromium}: `make browser` installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()
