"""What every test shares, as flaskr's conftest does: scripts/ on the path
(tests start the apps with scripts/launcher.py, the code `make run-all` and
`make demo` use), the repository root, a WSGI app served on a free loopback
port for the tests that stand up a fake or in-process client, the seed's
three apps, and the headless Chromium the page tests drive.

The seed's data is in reference.py (with the plain-Python FedAvg that
checks the code); launcher.get_json and launcher.wait_for_run read the API.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


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


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, through Playwright (its own browser
    download cannot work offline). `make test` sets CHROMIUM (its one
    default, /usr/bin/chromium) and installs the browser first, or says how."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM")
    assert chromium, "run the page tests with `make test`: it sets CHROMIUM and installs Chromium when missing"
    assert Path(chromium).exists(), f"no browser at CHROMIUM={chromium}: `make browser` installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()
