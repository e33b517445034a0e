"""FEDAVG_TOKEN: with a shared token set, the server sends it to the clients,
clients refuse /train and /evaluate without it, the server refuses /start and
/resume without it; read-only endpoints stay open, and each client's own
numbers need the token unless --public-read. The token read from each app's
environment runs on real processes (make test-all); the rest on the seed's
apps in this process (make test)."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

import launcher
from conftest import ROOT
from fedavg.http.client_app import create_app as create_client_app
from fedavg_server import create_app as create_server_app
from fedavg_server.inprocess import InProcessTransport

TOKEN = "s3cret-for-tests"
URLS = {"client_1": "http://127.0.0.1:5001", "client_2": "http://127.0.0.1:5002"}


def federation_with_token(db, **config):
    """The seed's two client apps and a server app over them, all with TOKEN,
    in this process: name → its app."""
    apps = {name: create_client_app({"CLIENT_ID": name, "DATA_PATH": str(ROOT / name / "data.csv"), "TOKEN": TOKEN})
            for name in URLS}
    apps["server"] = create_server_app({"TRANSPORT": InProcessTransport({URLS[n]: apps[n] for n in URLS}),
                                        "DB": str(db), "TOKEN": TOKEN, **config})
    return apps


def close(server) -> None:
    fed = server.extensions["fedavg"]
    fed.transport.close()
    fed.store.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """name → a test client of that app, each app with the token."""
    apps = federation_with_token(tmp_path_factory.mktemp("auth") / "runs.db")
    yield {name: app.test_client() for name, app in apps.items()}
    close(apps["server"])


def call(http, path: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    r = http.open(path, method=method, json=body, headers=headers)
    return r.status_code, r.get_json()


def post_json(url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    """POST over HTTP, with the bearer token if given."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.system
def test_the_shared_token_from_each_apps_environment_on_real_processes(tmp_path):
    """FEDAVG_TOKEN in the environment of the three apps as the README starts
    them: a run with the token works end to end (the server sends it), the
    server and a client refuse work without it, and no client warns; a client
    started without it warns that anyone can call it."""
    open_client = launcher.start_app("client_1", launcher.free_port(), env={"FEDAVG_TOKEN": ""})
    try:
        ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
        apps = launcher.start_federation(ports, server_args=["--db", str(tmp_path / "runs.db")],
                                         env={"FEDAVG_TOKEN": TOKEN})
        try:
            status, run = post_json(apps["server"].url + "/start", {"rounds": 2}, token=TOKEN)
            assert status == 200 and run["status"] == "completed", run
            assert all(r["N"] == 4 and not r["dropped"] for r in run["rounds"])
            status, body = post_json(apps["server"].url + "/start", {"rounds": 1})
            assert status == 401 and "token" in body["error"]
            status, body = post_json(apps["client_2"].url + "/train", {"global_model": {"w": 0, "b": 0}})
            assert status == 401 and "token" in body["error"]
            assert "no FEDAVG_TOKEN" not in apps["client_1"].output()
        finally:
            launcher.stop(list(apps.values()))
        launcher.wait_healthy([open_client])
        assert "no FEDAVG_TOKEN: anyone who can reach this port can call /train and /evaluate" in \
            open_client.output()
    finally:
        launcher.stop([open_client])


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_start_and_resume_refuse_a_missing_or_wrong_token(secured, token):
    server = secured["server"]
    status, body = call(server, "/start", "POST", {"rounds": 1}, token=token)
    assert status == 401 and "token" in body["error"]
    status, body = call(server, "/runs/1/resume", "POST", {}, token=token)
    assert status == 401


@pytest.mark.parametrize("path", ["/train", "/evaluate"])
def test_clients_refuse_work_without_the_token(secured, path):
    for name in ("client_1", "client_2"):
        status, body = call(secured[name], path, "POST", {"global_model": {"w": 0, "b": 0}})
        assert status == 401 and "token" in body["error"]
        status, _ = call(secured[name], path, "POST", {"global_model": {"w": 0, "b": 0}}, token=TOKEN)
        assert status == 200


def test_read_only_endpoints_stay_open(secured):
    for path in ("/health", "/status", "/runs", "/openapi.json"):
        status, _ = call(secured["server"], path)
        assert status == 200, path
    for name in ("client_1", "client_2"):
        assert call(secured[name], "/health")[0] == 200


PRIVATE = ("local_model", "metrics", "gradient", "control_delta", "stats")


def client_losses(run: dict) -> list[tuple[float, float]] | None:
    """What the attack needs: each client's losses at known models. A client's
    MSE is a quadratic in (w, b) whose coefficients are its Σx², Σx, Σxy, Σy
    and Σy²; losses at five known models give them, and with two points they
    give the points."""
    rounds = run["rounds"]
    seen = [p for r in rounds for p in r["participants"] if p.get("metrics")]
    return [(p["metrics"]["loss_before"], p["metrics"]["loss_after"]) for p in seen] or None


def test_each_clients_numbers_need_the_token_the_aggregates_do_not(secured):
    server = secured["server"]
    status, run = call(server, "/start", "POST", {"rounds": 3, "seed": 4}, token=TOKEN)
    assert status == 200
    status, open_view = call(server, f"/runs/{run['run_id']}")
    assert status == 200 and open_view["private"] is True
    for full, seen in zip(run["rounds"], open_view["rounds"]):
        assert seen["global_model"] == full["global_model"] and seen["N"] == full["N"]
        assert seen["federated_loss"] == full["federated_loss"]
        assert [p["client_id"] for p in seen["participants"]] == [p["client_id"] for p in full["participants"]]
        assert not any(k in p for p in seen["participants"] for k in PRIVATE)
        assert all(set(t) == {"client_id", "n_k", "weight"} for t in seen["terms"])
        # no trace line holds a client's number
        for p in full["participants"]:
            assert f"{p['local_model']['w']:.6f}" not in " ".join(seen["math"])
    assert client_losses(open_view) is None and client_losses(run) is not None
    status, operator_view = call(server, f"/runs/{run['run_id']}", token=TOKEN)
    assert status == 200 and "private" not in operator_view
    assert operator_view["rounds"][0]["participants"][0]["local_model"] == run["rounds"][0]["participants"][0][
        "local_model"]
    # the model chart draws no client's line without the token
    r = server.get(f"/runs/{run['run_id']}/plots/models.svg")
    assert r.status_code == 200
    svg = r.get_data(as_text=True)
    assert "client_1" not in svg and "global out" in svg


def test_public_read_keeps_the_teaching_view(tmp_path):
    apps = federation_with_token(tmp_path / "runs.db", PUBLIC_READ=True)
    try:
        server = apps["server"].test_client()
        status, run = call(server, "/start", "POST", {"rounds": 1}, token=TOKEN)
        status, seen = call(server, f"/runs/{run['run_id']}")
        assert status == 200 and "private" not in seen
        assert seen["rounds"][0]["participants"][0]["local_model"] == run["rounds"][0]["participants"][0][
            "local_model"]
    finally:
        close(apps["server"])


def test_a_clients_own_page_needs_the_token_as_a_password(secured):
    client = secured["client_1"]
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"me:wrong").decode()},
                    {"Authorization": "Bearer wrong"}):
        r = client.get("/", headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
    login = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    r = client.get("/", headers={"Authorization": f"Basic {login}"})
    assert r.status_code == 200 and "3" in r.get_data(as_text=True)  # its points: (1, 3), (2, 5)


def test_the_servers_yes_no_and_list_settings_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAVG_ALLOWED_HOSTS", "fedavg.lan, other.lan")
    monkeypatch.setenv("FEDAVG_PUBLIC_READ", "no")
    app = create_server_app({"CLIENTS": ["http://127.0.0.1:9"], "DB": str(tmp_path / "runs.db")})
    assert app.config["ALLOWED_HOSTS"] == ["fedavg.lan", "other.lan"] and app.config["PUBLIC_READ"] is False
    client = app.test_client()
    assert client.get("/health", headers={"Host": "fedavg.lan"}).status_code == 200
    assert client.get("/health", headers={"Host": "f"}).status_code == 403
    app.extensions["fedavg"].transport.close()
    monkeypatch.setenv("FEDAVG_PUBLIC_READ", "maybe")
    with pytest.raises(ValueError, match="FEDAVG_PUBLIC_READ"):
        create_server_app({"CLIENTS": ["http://127.0.0.1:9"], "DB": str(tmp_path / "runs2.db")})
