"""What every test shares, as flaskr's conftest does: scripts/ on the path
(tests start the apps with scripts/launcher.py, the code `make run-all` and
`make demo` use), the repository root, and a WSGI app served on a free
loopback port for the tests that stand up a fake or in-process client.

The seed's data is in reference.py (with the plain-Python FedAvg that
checks the code); launcher.get_json and launcher.wait_for_run read the API.
"""
from __future__ import annotations

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
