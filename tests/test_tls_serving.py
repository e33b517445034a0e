"""Every app served over mutual TLS (--tls-cert/--tls-key/--tls-ca): who may
call what, and who gets nothing at all.

In this process: the flags and FEDAVG_TLS_* read and their files checked
(each error one line naming the flag or file), the peer's names read from
the environ the TLS server fills, and a client's and a client host's rule
(only the certificate naming --server-name trains, evaluates and takes part
in a secure sum; any verified peer reads /health), through Flask's test
client. System: client_1, a client host and the server started as the
README starts them with the flags, called over TLS with certificates made
here; the handshake failures, plain HTTP, silent peers, the flags' errors;
the TLS server's hang-up check.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import make_certs
import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import launcher
from conftest import ROOT
from fedavg import tls_files
from fedavg.http import service, tls
from fedavg.http.client_app import create_app
from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg.tls_files import TLSFiles
from fedavg_server import access
from fedavg_server import create_app as create_server_app

TRAIN = {"global_model": {"w": 0.5, "b": -1}, "round": 1}


# --- certificates, made here (with make certs' own functions) ------------------------------


def _write(folder: Path, name: str, issued: make_certs.Issued) -> TLSFiles:
    return TLSFiles(*make_certs.write_party(folder, name, issued), folder / "ca.crt")


@dataclass
class Certs:
    """A trial CA's parties (``server``, ``client_1``, ``client_2``, ``operator``), an
    ``expired`` server certificate from the same CA, and ``impostor``: a
    certificate naming itself server from another CA. Each a TLSFiles whose
    ca is the trial CA."""

    folder: Path
    server: TLSFiles
    client_1: TLSFiles
    client_2: TLSFiles
    operator: TLSFiles
    expired: TLSFiles
    impostor: TLSFiles


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca = make_certs.new_ca("Raw FedAvg test CA")
    (folder / "ca.crt").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    now = dt.datetime.now(dt.timezone.utc)
    parties = {name: _write(folder, name, make_certs.new_leaf(ca, name))
               for name in ("server", "client_1", "client_2", "operator")}
    return Certs(folder, **parties,
                 expired=_write(folder, "expired", make_certs.new_leaf(ca, "server", not_before=now - dt.timedelta(
                     days=30), not_after=now - dt.timedelta(days=1))),
                 impostor=_write(folder, "impostor", make_certs.new_leaf(make_certs.new_ca("Another CA"), "server")))


def flags(files: TLSFiles) -> list[str]:
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]


# --- in this process: the flags and the files ------------------------------------------------


def test_no_tls_flag_and_no_variable_is_plain_http():
    assert tls_files.from_env_or_args(environ={}) is None
    assert tls_files.from_env_or_args(None, "", None, environ={"FEDAVG_TLS_CERT": ""}) is None


def test_the_three_files_from_flags_from_the_environment_or_both(tmp_path):
    env = {"FEDAVG_TLS_CERT": "/e/c.pem", "FEDAVG_TLS_KEY": "/e/k.pem", "FEDAVG_TLS_CA": "/e/ca.pem"}
    assert tls_files.from_env_or_args(environ=env) == TLSFiles(Path("/e/c.pem"), Path("/e/k.pem"), Path("/e/ca.pem"))
    # A flag wins over its variable; the others still come from theirs.
    assert tls_files.from_env_or_args(cert="/f/c.pem", environ=env) == \
        TLSFiles(Path("/f/c.pem"), Path("/e/k.pem"), Path("/e/ca.pem"))
    assert tls_files.from_env_or_args("c", "k", "a", environ={}) == TLSFiles(Path("c"), Path("k"), Path("a"))


@pytest.mark.parametrize("given, missing", [
    ({"cert": "c"}, ["--tls-key (or FEDAVG_TLS_KEY)", "--tls-ca (or FEDAVG_TLS_CA)"]),
    ({"cert": "c", "key": "k"}, ["--tls-ca (or FEDAVG_TLS_CA)"]),
    ({"ca": "a"}, ["--tls-cert (or FEDAVG_TLS_CERT)", "--tls-key (or FEDAVG_TLS_KEY)"]),
])
def test_some_but_not_all_three_names_the_missing_ones(given, missing):
    with pytest.raises(ValueError) as e:
        tls_files.from_env_or_args(**given, environ={})
    message = str(e.value)
    assert "\n" not in message and all(m in message for m in missing), message
    with pytest.raises(ValueError, match="FEDAVG_TLS_CA"):  # the same from the environment
        tls_files.from_env_or_args(environ={"FEDAVG_TLS_CERT": "c", "FEDAVG_TLS_KEY": "k"})


def test_good_files_pass_the_check(certs):
    tls_files.check(certs.server)
    tls_files.check(certs.expired)  # its peers refuse it, naming why; the app itself may start
    assert tls_files.dns_names(certs.server.cert) == ["server", "localhost"]


def test_each_bad_file_is_named_in_one_line(certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(certs.server.key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    missing = tmp_path / "nowhere.crt"
    s = certs.server
    cases = [
        (TLSFiles(missing, s.key, s.ca), f"--tls-cert {missing}: cannot read it"),
        (TLSFiles(s.cert, missing, s.ca), f"--tls-key {missing}: cannot read it"),
        (TLSFiles(s.cert, s.key, missing), f"--tls-ca {missing}: cannot read it"),
        (TLSFiles(tmp_path, s.key, s.ca), f"--tls-cert {tmp_path}: cannot read it"),  # a directory
        (TLSFiles(garbage, s.key, s.ca), f"--tls-cert {garbage}: not a PEM certificate"),
        (TLSFiles(s.cert, garbage, s.ca), f"--tls-key {garbage}: not a PEM private key"),
        (TLSFiles(s.cert, s.cert, s.ca), f"--tls-key {s.cert}: not a PEM private key"),
        (TLSFiles(s.cert, encrypted, s.ca), f"--tls-key {encrypted}: the private key is encrypted"),
        (TLSFiles(s.cert, certs.client_1.key, s.ca),
         f"--tls-key {certs.client_1.key}: not the private key of the certificate {s.cert}"),
        (TLSFiles(s.cert, s.key, garbage), f"--tls-ca {garbage}: not PEM CA certificate(s)"),
    ]
    for files, expected in cases:
        with pytest.raises(ValueError) as e:
            tls_files.check(files)
        assert str(e.value).startswith(expected) and "\n" not in str(e.value), (expected, str(e.value))


def test_the_command_line_stops_on_half_a_setup_with_exit_2(certs, capsys, monkeypatch):
    for variable in ("FEDAVG_TLS_CERT", "FEDAVG_TLS_KEY", "FEDAVG_TLS_CA"):
        monkeypatch.delenv(variable, raising=False)
    parser = service.cli("test", 1)
    assert service.tls_from_args(parser.parse_args([])) is None
    assert service.tls_from_args(parser.parse_args(flags(certs.server))) == certs.server
    with pytest.raises(SystemExit) as e:
        service.tls_from_args(parser.parse_args(["--tls-cert", str(certs.server.cert)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--tls-key" in err
    monkeypatch.setenv("FEDAVG_TLS_KEY", str(certs.client_2.key))  # the wrong key, from the environment
    with pytest.raises(SystemExit) as e:
        service.tls_from_args(parser.parse_args(["--tls-cert", str(certs.server.cert), "--tls-ca",
                                                 str(certs.server.ca)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and str(certs.client_2.key) in err


def test_server_name_from_the_flag_the_environment_or_server(monkeypatch):
    monkeypatch.delenv("FEDAVG_SERVER_NAME", raising=False)
    parser = service.cli("test", 1)
    service.add_server_name(parser)
    assert parser.parse_args([]).server_name == "server"
    assert parser.parse_args(["--server-name", "agg.example"]).server_name == "agg.example"
    monkeypatch.setenv("FEDAVG_SERVER_NAME", "from-env")
    parser = service.cli("test", 1)
    service.add_server_name(parser)
    assert parser.parse_args([]).server_name == "from-env"


# --- in this process: who the caller is, and what it may do -----------------------------------


def verified(cn: str, *dns: str) -> dict[str, str]:
    """What cheroot's adapter puts in the environ for a verified certificate."""
    return {"SSL_CLIENT_VERIFY": "SUCCESS", "SSL_CLIENT_S_DN_CN": cn, "SSL_CLIENT_S_DN": f"CN={cn}",
            **{f"SSL_CLIENT_SAN_DNS_{i}": name for i, name in enumerate(dns)}}


def test_peer_names_are_the_verified_cn_then_the_dns_names():
    assert service.peer_names(verified("server", "server", "localhost")) == ["server", "server", "localhost"]
    assert service.peer_names(verified("agg", "a.example")) == ["agg", "a.example"]
    # Several CNs: each one, not the comma-joined string (which one name may look like).
    several = {**verified("x,server"), "SSL_CLIENT_S_DN_CN_0": "x", "SSL_CLIENT_S_DN_CN_1": "server"}
    assert service.peer_names(several) == ["x", "server"]
    assert service.peer_names(verified("x,server")) == ["x,server"]
    # No verified certificate, no names: plain HTTP, or a verification that did not succeed.
    assert service.peer_names({}) == []
    assert service.peer_names({**verified("server"), "SSL_CLIENT_VERIFY": "NONE"}) == []
    assert service.peer_names({"HTTP_SSL_CLIENT_S_DN_CN": "server"}) == []  # a header cannot forge it


@pytest.mark.parametrize("names, expected, allowed", [
    (["server", "localhost"], "server", True),
    (["agg"], "server", False),
    (["client_1", "server"], "server", True),  # a DNS name equal to it
    (["Server"], "server", False),  # exactly as written
    (["server.example"], "server", False),
    (["x,server"], "server", False),
    ([], "server", False),
    (["agg.example"], "agg.example", True),
])
def test_peer_allowed_only_when_a_name_equals_the_server_name(names, expected, allowed):
    assert service.peer_allowed(names, expected) is allowed


SEED_1 = ROOT / "client_1" / "data.csv"


@pytest.fixture
def tls_client():
    """client_1 as served over TLS (SERVER_PEER), through Flask's test client."""
    return create_app({"CLIENT_ID": "client_1", "DATA_PATH": str(SEED_1), "TOKEN": None,
                       "SERVER_PEER": "server", "OWNER_PEER": "client_1"}).test_client()


def test_over_tls_a_clients_page_opens_only_to_its_own_certificate(tls_client):
    """The page shows the client's rows: not to the server, not to another
    client of the CA (every one of whose certificates also names localhost)."""
    page = tls_client.get("/", environ_overrides=verified("client_1", "client_1", "localhost"))
    assert page.status_code == 200 and "client_1" in page.get_data(as_text=True)
    for other in (verified("client_2", "client_2", "localhost"), verified("server", "server"),
                  verified("operator"), {}):
        refused = tls_client.get("/", environ_overrides=other)
        assert refused.status_code == 403 and "'client_1'" in refused.get_json()["error"]
        assert refused.is_json  # an error, not the page
    host = create_host_app(make_clients("iid", 2, 0, 20, None, 0, "huge"), server_name="server",
                           owner_name="client_host").test_client()
    assert host.get("/clients/1/", environ_overrides=verified("client_host")).status_code == 200
    assert host.get("/clients/1/", environ_overrides=verified("server")).status_code == 403


SECURE_STEPS = ["/secagg/advertise", "/secagg/share", "/secagg/receive", "/secagg/masked", "/secagg/unmask"]


def test_a_client_over_tls_works_only_for_the_server(tls_client):
    plain = create_app({"CLIENT_ID": "client_1", "DATA_PATH": str(SEED_1), "TOKEN": None}).test_client()
    as_server = tls_client.post("/train", json=TRAIN, environ_overrides=verified("server", "server", "localhost"))
    assert as_server.status_code == 200
    assert as_server.get_json() == plain.post("/train", json=TRAIN).get_json()
    assert tls_client.post("/evaluate", json={"global_model": {"w": 1, "b": 1}},
                           environ_overrides=verified("server")).status_code == 200
    for who in (verified("client_1", "client_1", "localhost"), verified("client_2"), {}):
        for path in ["/train", "/evaluate", *SECURE_STEPS]:
            r = tls_client.post(path, json={}, environ_overrides=who)
            assert r.status_code == 403, (path, who, r.get_json())
            error = r.get_json()["error"]
            assert "'server'" in error and "--server-name" in error, error
            if who:
                assert repr(who["SSL_CLIENT_S_DN_CN"]) in error, error
            else:
                assert "no verified certificate" in error
        # /health and the client's OpenAPI document: any verified peer (its page: its owner's only, below).
        for path in ("/health", "/openapi.json"):
            assert tls_client.get(path, environ_overrides=who).status_code == 200, path


def test_the_token_still_counts_on_top_of_the_certificate():
    app = create_app({"CLIENT_ID": "client_1", "DATA_PATH": str(SEED_1), "TOKEN": "t0ken",
                      "SERVER_PEER": "server"}).test_client()
    server, client = verified("server"), verified("client_1")
    bearer = {"Authorization": "Bearer t0ken"}
    assert app.post("/train", json=TRAIN, environ_overrides=server).status_code == 401
    assert app.post("/train", json=TRAIN, environ_overrides=server, headers=bearer).status_code == 200
    assert app.post("/train", json=TRAIN, environ_overrides=client, headers=bearer).status_code == 403


def test_each_client_of_a_host_over_tls_works_only_for_the_server():
    clients = make_clients("iid", 3, 0, 20, None, 0, "huge")
    app = create_host_app(clients, None, "iid", server_name="agg").test_client()
    assert app.post("/clients/2/train", json=TRAIN, environ_overrides=verified("x", "agg")).status_code == 200
    assert app.get("/scenario", environ_overrides=verified("agg")).status_code == 200
    for path in ["/clients/2/train", "/clients/2/evaluate", *(f"/clients/3{p}" for p in SECURE_STEPS)]:
        r = app.post(path, json={}, environ_overrides=verified("server"))  # not the name this host was given
        assert r.status_code == 403 and "'agg'" in r.get_json()["error"], path
    assert app.get("/scenario", environ_overrides=verified("client_1")).status_code == 403
    for path in ("/health", "/clients", "/clients/1/health"):
        assert app.get(path, environ_overrides=verified("client_1")).status_code == 200, path


def test_without_tls_nothing_is_asked_of_the_caller():
    """SERVER_PEER unset (the apps without --tls-*): /train answers as before."""
    plain = create_app({"CLIENT_ID": "client_1", "DATA_PATH": str(SEED_1), "TOKEN": None}).test_client()
    assert plain.post("/train", json=TRAIN).status_code == 200
    host = create_host_app(make_clients("iid", 2, 0, 20, None, 0, "huge")).test_client()
    assert host.post("/clients/1/train", json=TRAIN).status_code == 200


@pytest.fixture
def tls_server(certs, tmp_path) -> Iterator[Any]:
    """tls_server(token) → a test client of a server app serving TLS (the server's certificate)."""
    apps: list[Any] = []

    def make(token: str | None, tls: bool = True) -> Any:
        apps.append(create_server_app({"DB": str(tmp_path / f"runs{len(apps)}.db"), "TOKEN": token,
                                       "TLS": certs.server if tls else None}))
        return apps[-1].test_client()

    yield make
    for app in apps:
        app.extensions["fedavg"].shutdown()
        app.extensions["fedavg"].transport.close()
        app.extensions["fedavg"].store.close()


def operates(server: Any, environ: dict[str, str], headers: dict[str, str] | None = None) -> int:
    """The status of an operator's call that goes no further than its body:
    400 once let in (rounds 0 is refused), 401 when kept out."""
    return server.post("/start", json={"rounds": 0}, environ_overrides=environ, headers=headers or {}).status_code


def test_a_clients_owner_is_its_certificates_cn_else_its_first_dns_name_else_no_one(certs, tmp_path):
    ca = make_certs.new_ca("Raw FedAvg test CA")
    san_only = _write(tmp_path, "san", make_certs.new_leaf(ca, "-", ["client-9.lan", "127.0.0.1"], named=False))
    ip_only = _write(tmp_path, "ip", make_certs.new_leaf(ca, "-", ["127.0.0.1"], named=False))
    assert [tls_files.own_name(f.cert) for f in (certs.client_1, san_only, ip_only)] == ["client_1", "client-9.lan",
                                                                                       None]
    # A client whose certificate names no one: over TLS its page opens to nobody, not to everybody.
    nameless = create_app({"CLIENT_ID": "client_9", "DATA_PATH": str(SEED_1), "TOKEN": None,
                           "SERVER_PEER": "server", "OWNER_PEER": None}).test_client()
    for who in (verified("client_2", "client_2"), verified("server"), {}):
        refused = nameless.get("/", environ_overrides=who)
        assert refused.status_code == 403 and "no CN and no DNS name" in refused.get_json()["error"]


def test_over_tls_a_hosts_health_names_its_scenario_to_the_server_only():
    where = "csv: /home/a/private.csv"
    host = create_host_app(make_clients("iid", 2, 0, 20, None, 0, "huge"), description=where,
                           server_name="server", owner_name="client_host").test_client()
    assert host.get("/health", environ_overrides=verified("server")).get_json()["scenario"] == where
    for who in (verified("client_1"), verified("operator")):
        assert host.get("/health", environ_overrides=who).get_json() == {"status": "ok", "clients": 2}


def test_the_operators_token_may_come_as_a_browsers_basic_login(tls_server):
    server = tls_server("s3cret")
    basic = {"Authorization": "Basic " + base64.b64encode(b"me:s3cret").decode()}
    assert operates(server, verified("operator"), basic) == 400
    assert operates(server, {}, basic) == 401


def test_over_tls_without_a_token_only_the_operator_certificate_operates(tls_server):
    server = tls_server(None)
    assert operates(server, verified("operator")) == 400
    assert operates(server, verified("ops-desk", "operator")) == 400  # a DNS name equal to it
    for environ in ({}, verified("client_1", "localhost"), verified("server", "server"), verified("Operator")):
        assert operates(server, environ) == 401
    refusal = server.post("/runs/1/stop", json={}).get_json()["error"]
    assert "naming 'operator'" in refusal and "operator.crt" in refusal and "token" not in refusal


def test_over_tls_with_a_token_the_operator_needs_both(tls_server):
    """Every client holds the token (the server sends it on every call): over
    TLS it is the certificate that makes the operator, the token on top."""
    server = tls_server("s3cret")
    bearer = {"Authorization": "Bearer s3cret"}
    assert operates(server, verified("operator"), bearer) == 400
    for environ, headers in (({}, bearer), (verified("client_1"), bearer), (verified("operator"), {}),
                             (verified("operator"), {"Authorization": "Bearer wrong"})):
        assert operates(server, environ, headers) == 401
    refusal = server.post("/start", json={}).get_json()["error"]
    assert "naming 'operator'" in refusal and "Bearer $FEDAVG_TOKEN" in refusal


def test_without_tls_and_without_a_token_everyone_operates_as_before(tls_server):
    assert operates(tls_server(None, tls=False), {}) == 400


@pytest.mark.parametrize("token, environ, headers, reads", [
    (None, {}, {}, False),
    (None, verified("client_1"), {}, False),
    (None, verified("operator"), {}, True),
    ("s3cret", {}, {"Authorization": "Bearer s3cret"}, False),
    ("s3cret", verified("operator"), {"Authorization": "Bearer s3cret"}, True),
])
def test_over_tls_each_clients_own_numbers_are_the_operators(tls_server, token, environ, headers, reads):
    app = tls_server(token).application
    with app.test_request_context("/runs/1", environ_base=environ, headers=headers):
        assert access.reads_clients() is reads


# --- real processes ---------------------------------------------------------------------------


def pool(files: TLSFiles | None, ca: Path, timeout_s: float = 30.0) -> urllib3.PoolManager:
    """A caller presenting ``files`` (None: no certificate), trusting ``ca``,
    each call failing after ``timeout_s``."""
    cert = {"cert_file": str(files.cert), "key_file": str(files.key)} if files else {}
    return urllib3.PoolManager(ca_certs=str(ca), cert_reqs="CERT_REQUIRED", retries=False, timeout=timeout_s,
                               **cert)


def call(caller: urllib3.PoolManager, method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    r = caller.request(method, url, body=None if body is None else json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"} if body is not None else {})
    return r.status, json.loads(r.data)


def wait_tls(app: launcher.App, url: str, caller: urllib3.PoolManager, timeout_s: float = 120.0) -> None:
    """Poll ``url`` over TLS until it answers 200; fail with the app's output if it exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if app.proc.poll() is not None:
            raise RuntimeError(f"{app.name} exited with code {app.proc.returncode}:\n{app.output()}")
        try:
            if caller.request("GET", url).status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from {url} within {timeout_s:g} s:\n{app.output()}")
        time.sleep(0.05)  # polling interval


def wait_for_line(app: launcher.App, text: str, after: int = 0, timeout_s: float = 30.0) -> str:
    """The app's first line containing ``text`` from its line ``after`` on, waiting for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [line for line in app.lines[after:] if text in line]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {app.name}'s output within {timeout_s:g} s:\n{app.output()}")
        time.sleep(0.05)  # polling interval


def what_comes_back(port: int, files: TLSFiles | None, ca: Path) -> bytes:
    """A TLS connection presenting ``files``, a GET /health sent: every byte
    the app sends back before it ends the connection (a recv timeout fails
    the test: it must end it)."""
    context = ssl.create_default_context(cafile=str(ca))
    if files is not None:
        context.load_cert_chain(str(files.cert), str(files.key))
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                while chunk := tls.recv(65536):
                    received += chunk
        except (ssl.SSLError, ConnectionError):  # the refusal: an alert, or the connection closed
            pass
    return received


def plain_http_reply(port: int) -> bytes:
    """Every byte the port sends back to a plain HTTP GET, until it closes
    the connection (a recv timeout fails the test: it must close)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:  # closed with our request unread: closed all the same
            pass
    return received


@pytest.fixture(scope="module")
def client_1(certs) -> Iterator[tuple[launcher.App, str]]:
    """client_1 started as the README starts it, with the TLS flags of its own certificate."""
    port = launcher.free_port()
    app = launcher.start_app("client_1", port, flags(certs.client_1))
    try:
        url = f"https://localhost:{port}"
        wait_tls(app, url + "/health", pool(certs.server, certs.server.ca))
        yield app, url
    finally:
        launcher.stop([app])


@pytest.mark.system
def test_client_1_over_tls_trains_for_the_server_only(certs, client_1):
    app, url = client_1
    assert f"serving on https://127.0.0.1:{url.rsplit(':', 1)[1]}" in app.output()
    assert "no FEDAVG_TOKEN" not in app.output()  # over TLS only the server's certificate gets an answer
    server = pool(certs.server, certs.server.ca)
    status, health = call(server, "GET", url + "/health")
    assert status == 200 and health["client_id"] == "client_1"
    local = create_app({"CLIENT_ID": "client_1", "DATA_PATH": str(SEED_1), "TOKEN": None}).test_client()
    status, reply = call(server, "POST", url + "/train", TRAIN)
    assert status == 200 and reply == local.post("/train", json=TRAIN).get_json()
    # By address as well: the server's certificate is checked by CA, the caller's name by --server-name.
    status, _ = call(server, "POST", url.replace("localhost", "127.0.0.1") + "/evaluate",
                     {"global_model": {"w": 1, "b": 1}})
    assert status == 200
    for who in (certs.client_1, certs.client_2):
        caller = pool(who, certs.server.ca)
        status, body = call(caller, "POST", url + "/train", TRAIN)
        assert status == 403, body
        name = who.cert.stem
        assert f"your certificate names {name!r}" in body["error"] and "'server'" in body["error"], body
        assert call(caller, "POST", url + "/secagg/advertise", {})[0] == 403
        assert call(caller, "GET", url + "/health")[0] == 200  # any verified peer
        # Its page shows its rows: to its own certificate only.
        assert caller.request("GET", url + "/").status == (200 if who is certs.client_1 else 403)


@pytest.mark.system
def test_no_certificate_another_cas_server_an_expired_one_and_plain_http_get_nothing(certs, client_1):
    app, url = client_1
    port = int(url.rsplit(":", 1)[1])
    cases = [(None, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
             (certs.impostor, "its certificate: unable to get local issuer certificate"),
             (certs.expired, "its certificate: certificate has expired")]
    for files, reason in cases:
        seen = len(app.lines)
        received = what_comes_back(port, files, certs.server.ca)
        assert received == b"", (files, received)
        assert reason in wait_for_line(app, "refused during the handshake", seen)
    seen = len(app.lines)
    assert plain_http_reply(port) == b""
    assert "HTTP_REQUEST" in wait_for_line(app, "refused during the handshake", seen)
    # And the client still serves the server.
    assert call(pool(certs.server, certs.server.ca), "GET", url + "/health")[0] == 200


def still_open(s: socket.socket) -> bool:
    """Nothing to read and no end of file on ``s``, now."""
    s.setblocking(False)
    try:
        s.recv(1)
        return False
    except BlockingIOError:
        return True
    except ConnectionError:
        return False


@pytest.mark.system
def test_silent_and_stalled_peers_do_not_hold_up_the_server(certs, client_1):
    """Fifty connections that never start TLS, more than the app's worker
    threads (cherrypy/cheroot#748: cheroot's handshake in its accepting
    thread makes every caller wait for each), and three that start and
    stall: the server's /health answers while all are open; the stalled
    ones are then closed after the handshake timeout, while the silent
    ones hold no thread, only a connection, until the idle timeout."""
    app, url = client_1
    port = int(url.rsplit(":", 1)[1])
    seen = len(app.lines)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(50)]
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    try:
        for s in stalled:
            s.sendall(b"\x16\x03\x01")  # the first bytes of a TLS record, and no more
        assert call(pool(certs.server, certs.server.ca), "GET", url + "/health")[0] == 200
        assert all(still_open(s) for s in silent + stalled)
        for s in stalled:
            s.settimeout(30)  # the handshake timeout is 5 s; a recv timeout fails the test
            assert s.recv(1) == b""  # closed by the app, without a byte
        assert all(still_open(s) for s in silent)
    finally:
        for s in silent + stalled:
            s.close()
    assert "no handshake within" in wait_for_line(app, "refused during the handshake", seen)


ATTACKER = "127.0.0.2"  # another address than the callers' 127.0.0.1: the stallers' own


class Stallers:
    """Connections from ATTACKER that hold an app's worker threads as long
    as they can, each sending one more byte every half second until the app
    closes it: ``hellos`` drip a TLS ClientHello; ``heads`` shake hands
    (presenting ``files``; None: no certificate) and drip a request head;
    ``bodies`` send a whole head announcing 100 kB and drip the body. TLS
    over the raw socket through a MemoryBIO, so that the raw socket shows
    when the app closes it (recv → b"" or a reset)."""

    HEAD = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
    BODY = (b"POST /train HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")

    def __init__(self, port: int, ca: Path, files: TLSFiles | None, hellos: int, heads: int, bodies: int = 0):
        self.port, self.ca, self.files = port, ca, files
        self.drips: list[Iterator[bytes]] = []
        self.socks: list[socket.socket] = []
        self.closed: set[int] = set()
        self._stop = threading.Event()
        try:
            for opening in [self.HEAD] * heads + [self.BODY] * bodies:  # first: each handshake needs a thread
                self._add(*self._shake_hands(opening))
            for _ in range(hellos):
                hello = client_hello(self._context())
                self._add(self._connect(), (hello[i:i + 1] for i in range(len(hello))))
        except BaseException:  # the app let no more in (as before the deadlines): free what is held
            for raw in self.socks:
                raw.close()
            raise
        self._dripper = threading.Thread(target=self._drip, daemon=True)
        self._dripper.start()

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if self.files is not None:
            context.load_cert_chain(str(self.files.cert), str(self.files.key))
        return context

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30, source_address=(ATTACKER, 0))

    def _shake_hands(self, opening: bytes) -> tuple[socket.socket, Iterator[bytes]]:
        raw, incoming, outgoing = self._connect(), ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_object = self._context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        tls_object.write(opening)
        raw.sendall(outgoing.read())

        def drip() -> Iterator[bytes]:
            while True:
                tls_object.write(b"a")
                yield outgoing.read()
        return raw, drip()

    def _add(self, raw: socket.socket, drip: Iterator[bytes]) -> None:
        raw.setblocking(False)
        self.socks.append(raw)
        self.drips.append(drip)

    def _drip(self) -> None:
        while not self._stop.wait(0.5):  # the drip's pace
            for i, (raw, drip) in enumerate(zip(self.socks, self.drips)):
                if i in self.closed:
                    continue
                try:
                    while raw.recv(65536):  # what the app sends (TLS tickets): read and dropped
                        pass
                    self.closed.add(i)  # b"": the app closed it
                    continue
                except BlockingIOError:
                    pass
                except OSError:  # reset
                    self.closed.add(i)
                    continue
                try:
                    raw.send(next(drip, b""))
                except OSError:
                    self.closed.add(i)

    def wait_all_closed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.closed) < len(self.socks):
            assert time.monotonic() < deadline, f"{len(self.socks) - len(self.closed)} of {len(self.socks)} " \
                                                 f"stalled connections still open after {timeout_s:g} s"
            time.sleep(0.05)  # polling interval

    def close(self) -> None:
        self._stop.set()
        self._dripper.join(30)
        for raw in self.socks:
            raw.close()


def client_hello(context: ssl.SSLContext) -> bytes:
    """The ClientHello a connection with ``context`` sends first."""
    outgoing = ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):  # it waits for the server's answer
        context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost").do_handshake()
    return outgoing.read()


@pytest.mark.system
def test_more_stalled_handshakes_and_heads_than_threads_do_not_keep_the_server_out(certs, client_1):
    """Another client (a verified peer, from another address) drips
    ClientHellos, request heads and a body over more connections than
    client_1 has worker threads: the server's /health and /train are still
    answered, and each stalled connection is closed by the app once its
    deadline (handshake, head, body) has passed, however slowly it drips.
    Before: every read waited up to 120 s, so they held every thread."""
    app, url = client_1
    port = int(url.rsplit(":", 1)[1])
    seen = len(app.lines)
    n = tls.MIN_THREADS // 2 + 8
    stallers = Stallers(port, certs.server.ca, certs.client_2, hellos=n, heads=n, bodies=4)
    try:
        server = pool(certs.server, certs.server.ca, timeout_s=60)
        assert call(server, "GET", url + "/health")[0] == 200
        status, reply = call(server, "POST", url + "/train", TRAIN)
        assert status == 200 and "local_model" in reply
        stallers.wait_all_closed(timeout_s=120)
    finally:
        stallers.close()
    for reason in ("no handshake within", "no request head within", "no request body within"):
        wait_for_line(app, reason, seen)


@pytest.mark.system
def test_stalled_callers_without_a_certificate_do_not_keep_the_operator_out(certs, tmp_path):
    """The server's port takes callers without a certificate (a browser,
    curl): anyone can drip handshakes and request heads there. The
    operator's /health is still answered; the stallers are closed."""
    port = launcher.free_port()
    app = launcher.start_app("server", port, ["--db", str(tmp_path / "runs.db"), *flags(certs.server)])
    try:
        url = f"https://localhost:{port}"
        operator = pool(certs.operator, certs.server.ca, timeout_s=60)
        wait_tls(app, url + "/health", operator)
        n = tls.MIN_THREADS // 2 + 8
        stallers = Stallers(port, certs.server.ca, None, hellos=n, heads=n)
        try:
            assert call(operator, "GET", url + "/health")[0] == 200
            stallers.wait_all_closed(timeout_s=120)
        finally:
            stallers.close()
    finally:
        launcher.stop([app])


def send_and_read(port: int, files: TLSFiles | None, ca: Path, *parts: bytes) -> bytes:
    """Over TLS presenting ``files``: send ``parts``, then read what the app
    sends until it closes or has sent a head (a recv timeout ends it). One
    thread only: an SSL socket must not be read and written at once. An app
    that refuses while the parts still go out may close first: then what it
    sent may be lost (b"")."""
    context = ssl.create_default_context(cafile=str(ca))
    if files is not None:
        context.load_cert_chain(str(files.cert), str(files.key))
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as s:
        try:
            for part in parts:
                s.sendall(part)
            while (chunk := s.recv(65536)) and b"\r\n\r\n" not in received + chunk:
                received += chunk
            received += chunk
        except (ssl.SSLError, ConnectionError):  # the app refused and closed
            pass
    return received


@pytest.mark.system
def test_a_huge_request_head_or_body_over_tls_is_refused_and_the_app_serves_on(certs, client_1):
    """A 1 MB header line is refused (cheroot's 413/414, or the connection
    cut while it is still sending), never answered: it is not held in
    memory (the app's head limit is 256 KiB, as waitress's). A body larger
    than the app's MAX_CONTENT_LENGTH is refused at its head, before a byte
    of it is read or waited for. Afterwards the app answers as before."""
    app, url = client_1
    port = int(url.rsplit(":", 1)[1])
    head = send_and_read(port, certs.server, certs.server.ca,
                         b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ", b"a" * 1_000_000, b"\r\n\r\n")
    assert head == b"" or head.startswith((b"HTTP/1.1 413", b"HTTP/1.1 414")), head[:100]
    too_big = create_app({"DATA_PATH": str(SEED_1)}).config["MAX_CONTENT_LENGTH"] + 1
    for path in ("/train", "/health"):  # read by the app, or not at all
        body = send_and_read(port, certs.server, certs.server.ca,
                             f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {too_big}\r\n\r\n".encode())
        assert body.startswith(b"HTTP/1.1 413"), (path, body[:100])
    assert call(pool(certs.server, certs.server.ca), "GET", url + "/health")[0] == 200


@pytest.mark.system
def test_a_client_host_over_tls_trains_for_the_server_only(certs):
    port = launcher.free_port()
    app = launcher.start_app("client_host", port, ["--clients", "3", *flags(certs.client_2)])
    try:
        url = f"https://localhost:{port}"
        server = pool(certs.server, certs.server.ca)
        wait_tls(app, url + "/health", server)
        assert f"at https://127.0.0.1:{port}/clients/1" in app.output()
        status, reply = call(server, "POST", url + "/clients/1/train", TRAIN)
        assert status == 200 and "local_model" in reply
        other = pool(certs.client_1, certs.server.ca)
        status, body = call(other, "POST", url + "/clients/1/train", TRAIN)
        assert status == 403 and "'client_1'" in body["error"], body
        assert call(other, "GET", url + "/clients/1/health")[0] == 200
        assert what_comes_back(port, None, certs.server.ca) == b""
        assert plain_http_reply(port) == b""
    finally:
        launcher.stop([app])


@pytest.mark.system
def test_the_server_serves_its_api_over_tls_with_its_certificate(certs, tmp_path):
    port = launcher.free_port()
    app = launcher.start_app("server", port, ["--db", str(tmp_path / "runs.db"), *flags(certs.server)])
    try:
        url = f"https://localhost:{port}"
        anyone = pool(None, certs.server.ca)  # a browser or curl: no certificate, the CA trusted
        wait_tls(app, url + "/health", anyone)
        assert f"serving on https://127.0.0.1:{port}" in app.output()
        # What it prints to start a run is what starts one: the CA and the operator certificate.
        assert (f"curl --cacert {certs.server.ca} --cert {certs.folder / 'operator.crt'} "
                f"--key {certs.folder / 'operator.key'} -X POST https://127.0.0.1:{port}/start") in app.output()
        # The certificate it serves with is its own: the one naming server.
        context = ssl.create_default_context(cafile=str(certs.server.ca))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        assert served == x509.load_pem_x509_certificate(certs.server.cert.read_bytes())
        assert anyone.request("GET", url + "/").status == 200
        # Only the operator starts runs: no certificate, or a client's, is kept out.
        for caller in (anyone, pool(certs.client_1, certs.server.ca)):
            status, body = call(caller, "POST", url + "/start", {"rounds": 0})
            assert status == 401 and "operator" in body["error"]
        status, body = call(pool(certs.operator, certs.server.ca), "POST", url + "/start", {"rounds": 0})
        assert status == 400 and "rounds" in body["error"]  # let in; its bad setting named
        # A certificate presented must verify; plain HTTP gets nothing.
        assert what_comes_back(port, certs.impostor, certs.server.ca) == b""
        assert what_comes_back(port, certs.expired, certs.server.ca) == b""
        assert plain_http_reply(port) == b""
    finally:
        launcher.stop([app])


@pytest.mark.system
def test_a_tls_setup_that_cannot_work_stops_each_app_in_one_line(certs, tmp_path):
    """As the README starts them: half the flags, or a file that cannot be
    read or does not match, stop the app before it serves: exit 2, one line
    naming the flag or file."""
    s = certs.server
    missing = tmp_path / "nowhere.key"
    cases = [
        ("client_1", ["--tls-cert", str(s.cert)], {}, "--tls-key"),
        ("client_1", ["--tls-cert", str(s.cert), "--tls-key", str(missing), "--tls-ca", str(s.ca)], {},
         str(missing)),
        ("client_1", [], {"FEDAVG_TLS_CERT": str(s.cert), "FEDAVG_TLS_KEY": str(certs.client_1.key),
                          "FEDAVG_TLS_CA": str(s.ca)}, str(certs.client_1.key)),
        ("client_host", ["--clients", "2", "--tls-ca", str(s.ca)], {}, "--tls-cert"),
        ("server", ["--db", str(tmp_path / "a.db"), "--tls-cert", str(s.cert), "--tls-key", str(s.key)], {},
         "--tls-ca"),
    ]
    apps = [launcher.start_app(name, launcher.free_port(), args, env=env) for name, args, env, _ in cases]
    for (code, out, errors), (name, _, _, named) in zip(launcher.ended(apps), cases):
        assert code == 2 and len(errors) == 1 and named in errors[0], (name, out)
        assert "Traceback" not in out and "serving on" not in out


@pytest.mark.system
def test_the_tls_server_tells_the_app_when_the_caller_hangs_up(certs):
    """What secure_routes reads (service.hung_up) under TLS: a request whose
    caller closes its connection sees hung_up() turn true; one whose caller
    waits does not."""
    seen: dict[str, bool] = {}
    release = threading.Event()

    def app(environ, start_response):
        check = service.hung_up(environ)
        deadline = time.monotonic() + 30
        while not release.is_set() and not check() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling interval
        seen[environ["PATH_INFO"]] = check()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = tls.make_server(app, "127.0.0.1", 0, certs.client_1, threads=2, limit=16)
    server.prepare()
    runner = threading.Thread(target=server.serve, daemon=True)
    runner.start()
    try:
        port = server.bind_addr[1]
        context = ssl.create_default_context(cafile=str(certs.server.ca))
        context.load_cert_chain(str(certs.server.cert), str(certs.server.key))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"GET /gone HTTP/1.1\r\nHost: localhost\r\n\r\n")
        caller = pool(certs.server, certs.server.ca)
        deadline = time.monotonic() + 30
        while "/gone" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)  # polling interval
        assert seen.get("/gone") is True
        waiter = threading.Thread(target=lambda: caller.request("GET", f"https://localhost:{port}/stays"))
        waiter.start()
        release.set()
        waiter.join(30)
        assert seen.get("/stays") is False
    finally:
        server.stop()


@pytest.mark.system
def test_a_tls_client_at_its_limit_of_open_files_closes_the_excess_and_serves_on(certs):
    """client_1 over TLS allowed 200 open files (ulimit -n 200) gets 300
    connections: it holds its limit (200 − 64) and closes the rest at once,
    saying so in one line, instead of accepting until no descriptor is left
    (cheroot alone spins on "Too many open files"); once they close, the
    server's certificate is answered again."""
    port = launcher.free_port()
    app = launcher.start_app("client_1", port, flags(certs.client_1),
                             wrap=["sh", "-c", 'ulimit -n 200 && exec "$@"', "sh"])
    held: list[socket.socket] = []
    try:
        url = f"https://localhost:{port}"
        server = pool(certs.server, certs.server.ca)
        wait_tls(app, url + "/health", server)
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(300)]
        wait_for_line(app, "connections open, this app's limit")
        deadline = time.monotonic() + 30
        while (closed := sum(not still_open(s) for s in held)) < 300 - 136 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval
        # The excess closed without a byte, the rest held: 136 with the connection wait_tls keeps alive.
        assert 300 - closed == 136 - 1
        assert len([line for line in app.lines if "this app's limit" in line]) == 1
        for s in held:
            s.close()
        wait_tls(app, url + "/health", server, timeout_s=30)
    finally:
        for s in held:
            s.close()
        launcher.stop([app])
    assert "Traceback" not in app.output() and "Too many open files" not in app.output()


@pytest.mark.system
def test_a_taken_port_stops_a_tls_client_in_one_line_as_over_plain_http(certs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [(code, out, errors)] = launcher.ended([launcher.start_app("client_1", port, flags(certs.client_1))])
    assert code == 1 and errors == [f"error: cannot listen on 127.0.0.1:{port}: "
                                    "Address already in use"], out
    assert "Traceback" not in out and "serving on" not in out
