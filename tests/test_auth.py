"""FEDAVG_TOKEN: with a shared token set, the server sends it to the clients,
clients refuse /train and /evaluate without it, the server refuses /start and
/resume without it; read-only endpoints stay open, and each client's own
numbers need the token unless --public-read; a client host's scenario and
pooled line need it too. FEDAVG_TOKEN and FEDAVG_PUBLIC_READ are taken as
written (never as JSON). The token read from each app's environment, and
settings that stop each app, run on real processes (make test-all); the
rest on the seed's apps in this process (make test)."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

import launcher
from conftest import ROOT
from fedavg.http.client_app import create_app as create_client_app
from fedavg.http.host_app import create_host_app
from fedavg.http.service import shared_token
from fedavg.scenarios import make_clients
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


# --- FEDAVG_TOKEN and FEDAVG_PUBLIC_READ as written --------------------------------------


def federation_from_the_environment(db):
    """client_1's own app, client_2's rows on a client host and a server, each
    taking its token from FEDAVG_TOKEN as the apps do (client_host_app.py
    hands the host ``shared_token()``), in this process."""
    client_1 = create_client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" / "data.csv")})
    host = create_host_app(make_clients("seed", 2)[1:], shared_token())
    transport = InProcessTransport({URLS["client_1"]: client_1, "http://127.0.0.1:6000/clients/1": host})
    return create_server_app({"TRANSPORT": transport, "DB": str(db)})


@pytest.mark.parametrize("token", ["false", "0", "null", "1e3", "true", "1.50"])
def test_a_token_that_reads_as_json_is_the_token_on_every_app(tmp_path, monkeypatch, token):
    """Read as JSON, "false", "0" and "null" left the server open while the
    clients demanded them, and "1e3", "true" and "1.50" became 1000.0, True
    and 1.5, which no request could carry: each must be the token itself."""
    monkeypatch.setenv("FEDAVG_TOKEN", token)
    server = federation_from_the_environment(tmp_path / "runs.db")
    try:
        http = server.test_client()
        status, body = call(http, "/start", "POST", {"rounds": 2})
        assert status == 401 and "token" in body["error"]
        status, run = call(http, "/start", "POST", {"rounds": 2}, token=token)
        assert status == 200 and run["status"] == "completed", run
        assert [(r["N"], r["dropped"]) for r in run["rounds"]] == [(4, [])] * 2  # both clients took the token
    finally:
        close(server)


def test_an_empty_token_is_no_token_on_every_app(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAVG_TOKEN", "")
    server = federation_from_the_environment(tmp_path / "runs.db")
    try:
        status, run = call(server.test_client(), "/start", "POST", {"rounds": 2})
        assert status == 200 and [r["N"] for r in run["rounds"]] == [4, 4], run
    finally:
        close(server)


@pytest.mark.parametrize("token", [" s3cret", "s3cret ", "s3c\tret", "s3crét", "s3cret\n"])
def test_a_token_no_request_can_carry_is_refused_by_every_app(tmp_path, monkeypatch, token):
    """A header cannot carry it unchanged: outside printable ASCII, or with a
    space at either end (HTTP strips it). Refused at start, naming the
    variable, never showing the secret."""
    monkeypatch.setenv("FEDAVG_TOKEN", token)
    builds = [shared_token,
              lambda: create_client_app({"CLIENT_ID": "c", "DATA_PATH": str(ROOT / "client_1" / "data.csv")}),
              lambda: create_server_app({"CLIENTS": ["http://127.0.0.1:9"], "DB": str(tmp_path / "runs.db")})]
    for build in builds:
        with pytest.raises(ValueError, match="FEDAVG_TOKEN") as refused:
            build()
        assert "s3c" not in str(refused.value)


@pytest.mark.parametrize("value, public", [("yes", True), ("No", False), ("TRUE", True), ("false", False),
                                           ("On", True), ("off", False), ("1", True), ("0", False)])
def test_public_read_takes_yes_or_no_in_any_case(tmp_path, monkeypatch, value, public):
    monkeypatch.setenv("FEDAVG_PUBLIC_READ", value)
    app = create_server_app({"CLIENTS": ["http://127.0.0.1:9"], "DB": str(tmp_path / "runs.db")})
    assert app.config["PUBLIC_READ"] is public
    close(app)


@pytest.mark.parametrize("value", ["2", "-1", "[1]", "1e-300", "null", "", "maybe"])
def test_public_read_refuses_anything_but_yes_or_no(tmp_path, monkeypatch, value):
    """Read as JSON, 2, -1, [1] and 1e-300 each turned the public view on."""
    monkeypatch.setenv("FEDAVG_PUBLIC_READ", value)
    with pytest.raises(ValueError, match="FEDAVG_PUBLIC_READ: must be one of yes/no"):
        create_server_app({"CLIENTS": ["http://127.0.0.1:9"], "DB": str(tmp_path / "runs.db")})


def test_the_servers_other_variables_are_read_as_text(tmp_path, monkeypatch):
    """FEDAVG_DB=2024 is a file named 2024 (as JSON it was the number 2024,
    and the server died of a TypeError); FEDAVG_MAX_PARALLEL must be a whole
    number; FEDAVG_ALLOWED_HOSTS may still be a JSON list; an error names
    its variable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDAVG_DB", "2024")
    monkeypatch.setenv("FEDAVG_ALLOWED_HOSTS", '["fedavg.lan"]')
    app = create_server_app({"CLIENTS": ["http://127.0.0.1:9"]})
    assert app.config["DB"] == "2024" and (tmp_path / "2024").is_file()
    assert app.config["ALLOWED_HOSTS"] == ["fedavg.lan"]
    close(app)
    for bad in ("abc", "0", "1e3", "-2"):
        monkeypatch.setenv("FEDAVG_MAX_PARALLEL", bad)
        with pytest.raises(ValueError, match="FEDAVG_MAX_PARALLEL: must be a whole number"):
            create_server_app({"CLIENTS": ["http://127.0.0.1:9"]})
    monkeypatch.delenv("FEDAVG_MAX_PARALLEL")
    monkeypatch.setenv("FEDAVG_CLIENTS", "127.0.0.1:5001")
    with pytest.raises(ValueError, match="FEDAVG_CLIENTS: client URL must start with http://"):
        create_server_app()


@pytest.mark.system
def test_a_setting_that_cannot_work_stops_each_app_in_one_line(tmp_path):
    """The three apps as the README starts them: a token no request can carry
    stops each (the client, the client host, the server), FEDAVG_PUBLIC_READ=2
    the server, with one line naming the variable and exit code 2."""
    cases = [("client_1", [], {"FEDAVG_TOKEN": "s3cret "}, "FEDAVG_TOKEN"),
             ("client_host", ["--clients", "2"], {"FEDAVG_TOKEN": "s3cret "}, "FEDAVG_TOKEN"),
             ("server", ["--db", str(tmp_path / "a.db")], {"FEDAVG_TOKEN": "s3cret "}, "FEDAVG_TOKEN"),
             ("server", ["--db", str(tmp_path / "b.db")], {"FEDAVG_PUBLIC_READ": "2"}, "FEDAVG_PUBLIC_READ")]
    apps = [launcher.start_app(name, launcher.free_port(), args, env=env) for name, args, env, _ in cases]
    for (code, out, errors), (name, _, _, variable) in zip(launcher.ended(apps), cases):
        assert code == 2 and len(errors) == 1 and variable in errors[0], (name, out)
        assert "Traceback" not in out and "serving on" not in out and "s3cret" not in out


# --- the client host's own endpoints -------------------------------------------------------


def least_squares(rows: list[tuple[float, float]]) -> tuple[float, float]:
    """y = w·x + b through the rows, in closed form: w = cov(x, y)/var(x), b = ȳ − w·x̄."""
    mx, my = sum(x for x, _ in rows) / len(rows), sum(y for _, y in rows) / len(rows)
    w = sum((x - mx) * (y - my) for x, y in rows) / sum((x - mx) ** 2 for x, _ in rows)
    return w, my - w * mx


def test_a_client_hosts_scenario_and_data_file_need_the_token(tmp_path):
    """With a token, the host's /scenario (the line through every row of the
    user's CSV) and its /health's scenario (the file's absolute path) are
    only for who has it; /health still says it is alive."""
    csv = tmp_path / "private.csv"
    rows = [(float(i), 3.0 * i + 1 + (-1) ** i * 0.5) for i in range(8)]
    csv.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in rows))
    description = f"csv: your CSV, shuffled and split into K parts ({csv}); K=2, seed=0"
    host = create_host_app(make_clients("csv", 2, csv_path=csv), TOKEN, description).test_client()
    status, body = call(host, "/scenario")
    assert status == 401 and "token" in body["error"]
    status, alive = call(host, "/health")
    assert status == 200 and alive == {"status": "ok", "clients": 2}
    status, said = call(host, "/scenario", token=TOKEN)
    w, b = least_squares(rows)
    assert status == 200 and said["pooled_line"] == pytest.approx({"w": w, "b": b}, abs=1e-9)
    status, health = call(host, "/health", token=TOKEN)
    assert status == 200 and str(csv) in health["scenario"] and health["data_size"] == len(rows)
    # without a token nothing is private: the simulation's view, as before
    host = create_host_app(make_clients("csv", 2, csv_path=csv), None, description).test_client()
    assert call(host, "/scenario")[0] == 200 and str(csv) in call(host, "/health")[1]["scenario"]


def test_clients_from_a_host_with_a_token_sends_it(serve):
    """server_app.py's --clients-from: the host's client list and its pooled
    line (drawn on the page as outside knowledge) with the token; without it
    the host gives no line."""
    from test_newcomer import load
    server_app = load(ROOT / "server" / "server_app.py", "server_app")
    clients = make_clients("iid", 3, seed=3)
    host = serve(create_host_app(clients, TOKEN, "iid")).url
    assert server_app.clients_from(host, 5, TOKEN) == [f"{host}/clients/{k}" for k in (1, 2, 3)]
    w, b = least_squares([(float(x[0]), float(y)) for c in clients for x, y in zip(c.X, c.y)])
    line = server_app.outside_line(host, TOKEN)
    assert line is not None and line["w"] == pytest.approx(w, abs=1e-9) and line["b"] == pytest.approx(b, abs=1e-9)
    assert server_app.outside_line(host) is None
