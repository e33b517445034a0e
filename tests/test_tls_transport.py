"""The server calling its clients over mutual TLS (HttpTransport with the
server's TLS files), in this process: the seed's clients' own Flask apps
served over TLS on loopback ports by a small keep-alive server in threads
(``TLSServed``: Python's http.server, an ssl.SSLContext that requires a
certificate from the test's CA), certificates made in the test.

What a user relies on: the seed's numbers over mutual TLS; a client whose
certificate the server cannot verify (expired, another CA, another name) or
that refuses the server's is dropped, the reason saying which, without a
second try; connection reuse keeps the handshake out of the rounds (one per
client over 20 rounds); https:// without TLS and http:// with it refused at
start; a client off this machine without TLS warned about."""
from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import make_certs
import pytest
from flask import Flask

from conftest import ROOT
from fedavg.http.client_app import create_app as create_client_app
from fedavg.tls_files import TLSFiles
from fedavg_server import create_app as create_server_app
from fedavg_server.http_transport import HttpTransport
from reference import SEED_DATA, local_gd, local_mse, reference_fedavg

# --- a client app served over TLS, with keep-alive ---------------------------------------------------


class WSGIOverTLS(BaseHTTPRequestHandler):
    """One TLS connection: its requests, one after another (HTTP/1.1 keep-alive),
    each handed to the server's Flask app with what the verified peer's
    certificate says in the environ, as cheroot's TLS adapter puts it there."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle kept-alive connection ends after this
    # One write per reply, sent at once: headers and body in two small writes
    # would wait out Nagle's algorithm against a delayed ACK (40 ms a call).
    wbufsize = 65536
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        with self.server.count:
            self.server.requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        peer = self.connection.getpeercert()
        names = dict(x[0] for x in peer["subject"])
        env = {"SSL_CLIENT_VERIFY": "SUCCESS", "SSL_CLIENT_S_DN_CN": names.get("commonName", "")}
        env |= {f"SSL_CLIENT_SAN_DNS_{i}": v
                for i, v in enumerate(v for k, v in peer.get("subjectAltName", ()) if k == "DNS")}
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")]
        resp = self.server.client.open(self.path, method=self.command, data=body, headers=headers,
                                       environ_overrides=env)
        payload = resp.get_data()
        self.send_response(resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() not in ("content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:  # quiet: the test reads the server's records
        pass


class TLSServed(ThreadingHTTPServer):
    """``app`` over TLS on a free loopback port: its certificate ``cert``/``key``,
    a certificate signed by ``ca`` required of every caller. Counts the
    handshakes begun (``attempts``) and completed (``handshakes``), each done
    in its connection's own thread, and the requests the app was given."""

    daemon_threads = True

    def __init__(self, app: Flask, cert: Path, key: Path, ca: Path) -> None:
        super().__init__(("127.0.0.1", 0), WSGIOverTLS)
        self.client = app.test_client(use_cookies=False)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cafile=ca)
        self.attempts = self.handshakes = self.requests = 0
        self.count = threading.Lock()
        self.url = f"https://127.0.0.1:{self.server_port}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.count:
            self.attempts += 1
        request.settimeout(10)  # a caller that stalls the handshake holds only its own thread
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):  # refused: closed, nothing written
            return
        with self.count:
            self.handshakes += 1
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            conn.close()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


# --- certificates, made here ------------------------------------------------------------------------


class PKI:
    """The test's CA and parties; another CA; the bad certificates."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        ca = make_certs.new_ca("test CA")
        other = make_certs.new_ca("another CA")
        self.ca = self._write("ca", ca)
        self.other_ca = self._write("other_ca", other)
        past = dt.datetime.now(dt.timezone.utc)
        issued = {
            "server": make_certs.new_leaf(ca, "server"),
            "client_1": make_certs.new_leaf(ca, "client_1"),
            "client_2": make_certs.new_leaf(ca, "client_2"),
            "expired": make_certs.new_leaf(ca, "client_2", not_before=past - dt.timedelta(days=30),
                                           not_after=past - dt.timedelta(days=1)),
            "unknown_ca": make_certs.new_leaf(other, "client_2"),
            "wrong_name": make_certs.new_leaf(ca, "client_2", hosts=["elsewhere.example", "10.9.9.9"]),
            "other_server": make_certs.new_leaf(other, "server"),
        }
        self.pairs = {name: make_certs.write_party(folder, name, i) for name, i in issued.items()}

    def _write(self, name: str, issued: make_certs.Issued) -> Path:
        path = self.folder / f"{name}.crt"
        path.write_bytes(issued.cert.public_bytes(make_certs.serialization.Encoding.PEM))
        return path

    def files(self, name: str, ca: Path | None = None) -> TLSFiles:
        cert, key = self.pairs[name]
        return TLSFiles(cert, key, ca or self.ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def seed_client(k: int) -> Flask:
    return create_client_app({"CLIENT_ID": f"client_{k}", "TOKEN": None,
                              "DATA_PATH": str(ROOT / f"client_{k}" / "data.csv")})


@pytest.fixture
def served() -> Iterator[Any]:
    """served(app, tls_files) → the app over TLS; all closed when the test ends."""
    servers: list[TLSServed] = []

    def start(app: Flask, files: TLSFiles) -> TLSServed:
        servers.append(TLSServed(app, files.cert, files.key, files.ca))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def tls_server(tmp_path, pki) -> Iterator[Any]:
    """tls_server(urls) → a test client of a server app with TLS (the server's certificate) on its own history."""
    apps: list[Flask] = []

    def make(urls: list[str]) -> Any:
        apps.append(create_server_app({"CLIENTS": urls, "DB": str(tmp_path / f"runs{len(apps)}.db"),
                                       "TOKEN": None, "TLS": pki.files("server")}))
        client = apps[-1].test_client()
        # The operator calls it: what cheroot puts in the environ for a certificate naming operator.
        client.environ_base.update({"SSL_CLIENT_VERIFY": "SUCCESS", "SSL_CLIENT_S_DN_CN": "operator"})
        return client

    yield make
    for app in apps:
        app.extensions["fedavg"].shutdown()
        app.extensions["fedavg"].transport.close()
        app.extensions["fedavg"].store.close()


def start(server: Any, body: dict | None = None) -> dict:
    r = server.post("/start", json=body) if body is not None else server.post("/start")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


# --- the seed over mutual TLS ----------------------------------------------------------------------


def test_the_seeds_numbers_over_mutual_tls(pki, served, tls_server):
    clients = [served(seed_client(k), pki.files(f"client_{k}")) for k in (1, 2)]
    run = start(tls_server([c.url for c in clients]))  # the seed's bodiless /start: 5 rounds

    assert run["status"] == "completed", run
    expected = reference_fedavg(SEED_DATA, rounds=5, lr=0.01, epochs=10)
    assert len(run["rounds"]) == 5
    model_in = {"w": 0.0, "b": 0.0}
    for record, (w, b) in zip(run["rounds"], expected):
        assert record["dropped"] == [] and record["N"] == 4
        assert [p["client_id"] for p in record["participants"]] == ["client_1", "client_2"]
        for p, data in zip(record["participants"], SEED_DATA):  # each client's own model, trained over TLS
            w_k, b_k = local_gd(data, model_in["w"], model_in["b"])
            assert p["local_model"] == pytest.approx({"w": w_k, "b": b_k}, abs=1e-9)
        assert record["global_model"] == pytest.approx({"w": w, "b": b}, abs=1e-9)
        loss = sum(0.5 * local_mse(data, w, b) for data in SEED_DATA)
        assert record["federated_loss"] == pytest.approx(loss, abs=1e-9)
        model_in = record["global_model"]
    for c in clients:
        assert c.handshakes == c.attempts == 1


def test_one_handshake_per_client_over_twenty_rounds(pki, served, tls_server):
    clients = [served(seed_client(k), pki.files(f"client_{k}")) for k in (1, 2)]
    run = start(tls_server([c.url for c in clients]), {"rounds": 20})
    assert run["status"] == "completed" and len(run["rounds"]) == 20
    assert all(r["dropped"] == [] for r in run["rounds"])
    # /health before round 1, then /train in each of the 20 rounds: over one kept-alive connection
    assert [(c.attempts, c.handshakes) for c in clients] == [(1, 1), (1, 1)]


# --- clients the server cannot verify, or that refuse it -----------------------------------------


@pytest.mark.parametrize("cert, host, reason", [
    ("expired", "127.0.0.1", "TLS: certificate has expired"),
    ("unknown_ca", "127.0.0.1", "TLS: unknown CA (not signed by --tls-ca)"),
    ("wrong_name", "127.0.0.1", "TLS: wrong name: the certificate is for client_2, elsewhere.example, 10.9.9.9, "
                                "not 127.0.0.1"),
    ("wrong_name", "localhost", "TLS: wrong name: the certificate is for client_2, elsewhere.example, 10.9.9.9, "
                                "not localhost"),
])
def test_a_client_the_server_cannot_verify_is_dropped_with_the_reason(pki, served, tls_server, cert, host, reason):
    good = served(seed_client(1), pki.files("client_1"))
    bad = served(seed_client(2), pki.files(cert))
    bad_url = bad.url.replace("127.0.0.1", host)
    run = start(tls_server([good.url, bad_url]), {"rounds": 2})

    assert run["status"] == "completed"
    for record in run["rounds"]:
        [dropped] = record["dropped"]
        assert dropped["url"] == bad_url and dropped["reason"].startswith(reason), dropped
        assert [p["client_id"] for p in record["participants"]] == ["client_1"]
    # The average is client_1's alone: the reference on its data.
    w, b = reference_fedavg(SEED_DATA[:1], rounds=2)[-1]
    assert run["final_model"] == pytest.approx({"w": w, "b": b}, abs=1e-9)
    assert bad.requests == 0  # not one request was sent to it
    assert f"last reason: {reason}" in " ".join(run["warnings"])


@pytest.mark.parametrize("cert", ["expired", "unknown_ca", "wrong_name"])
def test_a_certificate_failure_is_not_tried_again(pki, served, cert):
    bad = served(seed_client(2), pki.files(cert))
    transport = HttpTransport([bad.url], tls=pki.files("server"))
    try:
        reply = transport.call(bad.url, "GET", "/health", 5)
    finally:
        transport.close()
    assert reply.reason.startswith("TLS: ") and bad.attempts == 1  # one handshake begun: no retry


def test_a_client_that_trusts_another_ca_refuses_the_server_and_the_reason_says_so(pki, served, tls_server):
    good = served(seed_client(1), pki.files("client_1"))
    # client_2's own certificate is good, but it accepts only callers from another CA
    refusing = served(seed_client(2), pki.files("client_2", ca=pki.other_ca))
    run = start(tls_server([good.url, refusing.url]), {"rounds": 1})

    [dropped] = run["rounds"][0]["dropped"]
    assert dropped["url"] == refusing.url
    # Under TLS 1.3 the refusal arrives as the client's alert or, racing it, as the connection closing.
    assert dropped["reason"] in ("TLS: the client refused the server's certificate (unknown CA: it trusts another "
                                 "CA than ours)",
                                 "TLS: closed during TLS setup (it may not accept our certificate)"), dropped
    assert refusing.handshakes == refusing.requests == 0


def test_a_client_that_speaks_plain_http_at_an_https_url_is_dropped(pki, serve, tls_server, served):
    good = served(seed_client(1), pki.files("client_1"))
    plain = serve(seed_client(2))  # werkzeug, plain HTTP: answers the TLS hello with an HTTP 400
    url = plain.url.replace("http://", "https://")
    run = start(tls_server([good.url, url]), {"rounds": 1, "client_timeout_s": 2})
    [dropped] = run["rounds"][0]["dropped"]
    assert dropped["url"] == url and dropped["reason"].startswith("TLS: the client does not speak TLS"), dropped


# --- the server's settings --------------------------------------------------------------------------


def test_an_https_url_without_tls_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match=r"client URL https://127.0.0.1:5001: https:// needs the server's own "
                                         r"certificate: start the server with --tls-cert, --tls-key and --tls-ca"):
        create_server_app({"CLIENTS": ["https://127.0.0.1:5001"], "DB": str(tmp_path / "r.db"), "TOKEN": None})


def test_an_http_url_with_tls_is_refused_at_start(pki, tmp_path):
    with pytest.raises(ValueError, match=r"client URL http://127.0.0.1:5002: with --tls-\* the server calls its "
                                         r"clients over https:// only"):
        create_server_app({"CLIENTS": ["https://127.0.0.1:5001", "http://127.0.0.1:5002"], "TOKEN": None,
                           "DB": str(tmp_path / "r.db"), "TLS": pki.files("server")})


def test_with_tls_the_default_clients_are_the_seeds_over_https(pki, tmp_path):
    app = create_server_app({"DB": str(tmp_path / "r.db"), "TOKEN": None, "TLS": pki.files("server")})
    try:
        assert app.config["CLIENTS"] == ["https://127.0.0.1:5001", "https://127.0.0.1:5002"]
    finally:
        app.extensions["fedavg"].transport.close()
        app.extensions["fedavg"].store.close()


@pytest.mark.parametrize("field, make_bad, flag", [
    ("cert", lambda p: p / "missing.crt", "--tls-cert"),
    ("key", lambda p: p / "ca.crt", "--tls-key"),  # a certificate where the key should be
    ("ca", lambda p: p / "missing_ca.crt", "--tls-ca"),
])
def test_tls_files_that_cannot_be_used_are_named_at_start(pki, tmp_path, field, make_bad, flag):
    files = pki.files("server")
    bad = TLSFiles(**{**files.__dict__, field: make_bad(pki.folder)})
    with pytest.raises(ValueError) as error:
        create_server_app({"DB": str(tmp_path / "r.db"), "TOKEN": None, "TLS": bad})
    assert f"{flag} {getattr(bad, field)}" in str(error.value) and "\n" not in str(error.value)


def test_an_expired_server_certificate_is_refused_at_start(pki, tmp_path):
    cert, key = pki.pairs["expired"]
    with pytest.raises(ValueError, match=rf"--tls-cert {cert}: valid from .* UTC, not now: every client would "
                                         "refuse it"):
        create_server_app({"DB": str(tmp_path / "r.db"), "TOKEN": None, "TLS": TLSFiles(cert, key, pki.ca)})


def test_an_encrypted_key_is_refused_not_asked_for(pki, tmp_path):
    issued = make_certs.new_leaf(make_certs.new_ca(), "server")
    key = tmp_path / "enc.key"
    key.write_bytes(issued.key.private_bytes(
        make_certs.serialization.Encoding.PEM, make_certs.serialization.PrivateFormat.PKCS8,
        make_certs.serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValueError, match="the private key is encrypted"):
        HttpTransport([], tls=TLSFiles(pki.pairs["server"][0], key, pki.ca))


def test_a_client_off_this_machine_without_tls_is_warned_about_once(tmp_path, caplog):
    urls = ["http://127.0.0.1:5001", "http://localhost:5003", "http://[::1]:5004", "http://10.0.0.12:5002",
            "http://client-3.lan:5005"]
    with caplog.at_level(logging.WARNING, logger="fedavg.server"):
        app = create_server_app({"CLIENTS": urls, "DB": str(tmp_path / "r.db"), "TOKEN": None})
    app.extensions["fedavg"].transport.close()
    app.extensions["fedavg"].store.close()
    [line] = [r.getMessage() for r in caplog.records if r.name == "fedavg.server"]
    assert "http://10.0.0.12:5002, http://client-3.lan:5005 not on this machine, and TLS is off" in line
    assert "--tls-cert, --tls-key and --tls-ca" in line and "127.0.0.1" not in line and "localhost" not in line


def test_clients_on_this_machine_without_tls_are_not_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedavg.server"):
        app = create_server_app({"DB": str(tmp_path / "r.db"), "TOKEN": None})  # the seed's two
    app.extensions["fedavg"].transport.close()
    app.extensions["fedavg"].store.close()
    assert [r for r in caplog.records if r.name == "fedavg.server"] == []
