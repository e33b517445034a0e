"""FEDAVG_TOKEN: with a shared token set, the server sends it to the clients,
clients refuse /train and /evaluate without it, the server refuses /start and
/resume without it; read-only endpoints stay open."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

import launcher

TOKEN = "s3cret-for-tests"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    db = tmp_path_factory.mktemp("auth") / "runs.db"
    apps = launcher.start_federation(ports, server_args=["--db", str(db)], env={"FEDAVG_TOKEN": TOKEN})
    yield apps
    launcher.stop(list(apps.values()))

def call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

def test_a_run_with_the_shared_token_works_end_to_end(secured):
    status, run = call(secured["server"].url + "/start", "POST", {"rounds": 2}, token=TOKEN)
    assert status == 200 and run["status"] == "completed", run
    assert all(r["N"] == 4 and not r["dropped"] for r in run["rounds"])

@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_start_and_resume_refuse_a_missing_or_wrong_token(secured, token):
    server = secured["server"].url
    status, body = call(server + "/start", "POST", {"rounds": 1}, token=token)
    assert status == 401 and "token" in body["error"]
    status, body = call(server + "/runs/1/resume", "POST", {}, token=token)
    assert status == 401

@pytest.mark.parametrize("path", ["/train", "/evaluate"])
def test_clients_refuse_work_without_the_token(secured, path):
    for name in ("client_1", "client_2"):
        status, body = call(secured[name].url + path, "POST", {"global_model": {"w": 0, "b": 0}})
        assert status == 401 and "token" in body["error"]
        status, _ = call(secured[name].url + path, "POST", {"global_model": {"w": 0, "b": 0}}, token=TOKEN)
        assert status == 200

def test_read_only_endpoints_stay_open(secured):
    for path in ("/health", "/status", "/runs", "/openapi.json"):
        status, _ = call(secured["server"].url + path)
        assert status == 200, path
    for name in ("client_1", "client_2"):
        assert call(secured[name].url + "/health")[0] == 200
