"""Fuzz every app against its own OpenAPI document (schemathesis): whatever
the request, no 5xx, and every reply conforms to the document. In this
process through WSGI; and the server and client_1 as real processes over
mutual TLS (--tls-*, certificates made here), fuzzed over HTTPS by a caller
that verifies them against the CA and presents the certificate each one
answers in full: `operator` to the server, `server` to the client."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_tls_federation import new_ca, party
from test_tls_serving import flags, pool, wait_tls

import launcher
from conftest import ROOT
from fedavg.http.client_app import create_app as create_client_app
from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg.tls_files import TLSFiles
from fedavg_server import create_app as create_server_app
from fedavg_server.inprocess import InProcessTransport

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
# Over HTTPS each example is a real request to a real process: fewer of them.
HTTPS_FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


def call_and_validate(case, **kwargs) -> Any:
    """Every default check (no 5xx, status codes, content types and bodies as
    documented, invalid input rejected, 405 with Allow, …) except
    positive_data_acceptance: schema-valid input may still be refused for what
    a schema cannot say — strategy fedprox with mu = 0, min_clients beyond the
    clients that answer — or fail on the data (local training diverging, 422).
    Returns the response."""
    return case.call_and_validate(excluded_checks=[positive_data_acceptance], **kwargs)


@pytest.fixture
def client_schema():
    app = create_client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" / "data.csv")})
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


@pytest.fixture
def two_feature_client_schema(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("x1,x2,y\n1,2,3\n2,0,1\n4,1,7\n")
    app = create_client_app({"CLIENT_ID": "wide", "DATA_PATH": str(data)})
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


def nobody_there(url: str) -> InProcessTransport:
    """One client URL that no app in this process answers: every call to it
    fails at once, "cannot connect", so runs fail fast and cleanly. (A refused
    port over HTTP did the same after HttpTransport's 0.2 s pause before its
    one retry, paid on every /start, /clients and resume: 17 s of a pass.)"""
    transport = InProcessTransport({})
    transport.urls.append(url)
    transport.names[url] = url
    return transport


@pytest.fixture
def server_schema(tmp_path):
    app = create_server_app({"TRANSPORT": nobody_there("http://127.0.0.1:9"), "DB": str(tmp_path / "runs.db")})
    yield schemathesis.openapi.from_wsgi("/openapi.json", app)
    app.extensions["fedavg"].transport.close()


@pytest.fixture
def host_schema():
    app = create_host_app(make_clients("iid", 3, samples=5))
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


@pytest.fixture
def hosted_client_schema():
    """A client on a client host, through its /clients/<k> prefix."""
    app = create_host_app(make_clients("iid", 3, samples=5))
    return schemathesis.openapi.from_wsgi("/clients/2/openapi.json", app)


@pytest.fixture(scope="module")
def parties(tmp_path_factory) -> dict[str, TLSFiles]:
    """A CA's server and operator (for localhost and 127.0.0.1), and client_1
    for localhost only."""
    folder = tmp_path_factory.mktemp("fuzz-tls")
    ca = new_ca(folder)
    return {"server": party(folder, ca, "server"), "operator": party(folder, ca, "operator"),
            "client_1": party(folder, ca, "client_1", ["localhost"])}


def as_party(files: TLSFiles) -> dict[str, Any]:
    """requests' arguments for a caller presenting ``files``, trusting its CA only."""
    return {"verify": str(files.ca), "cert": (str(files.cert), str(files.key))}


@contextmanager
def served_over_tls(name: str, args: list[str], files: TLSFiles, caller: TLSFiles) -> Iterator[str]:
    """App ``name`` started as the README starts it with ``args`` and the
    --tls-* of ``files``; its https:// URL once it answers ``caller``'s
    certificate; stopped after."""
    port = launcher.free_port()
    app = launcher.start_app(name, port, [*args, *flags(files)])
    try:
        url = f"https://localhost:{port}"
        wait_tls(app, url + "/health", pool(caller, caller.ca))
        yield url
    finally:
        launcher.stop([app])


@pytest.fixture(scope="module")
def https_client(parties) -> Iterator[str]:
    """client_1 over TLS; its https:// URL."""
    with served_over_tls("client_1", [], parties["client_1"], parties["server"]) as url:
        yield url


@pytest.fixture(scope="module")
def https_server(parties, https_client, tmp_path_factory) -> Iterator[str]:
    """The server over TLS, its one client https_client called at
    127.0.0.1, an address its certificate does not name: every call fails
    its handshake at once and is not tried again, so runs fail fast, and
    always the same way (a client that trains would make each /start as
    long as the rounds the fuzzer asks for). Yields the server's https://
    URL once it answers the operator's certificate."""
    db = tmp_path_factory.mktemp("fuzz-tls-db") / "runs.db"
    with served_over_tls("server", ["--clients", https_client.replace("localhost", "127.0.0.1"), "--db", str(db)],
                         parties["server"], parties["operator"]) as url:
        yield url


@pytest.fixture(scope="module")
def https_server_schema(https_server, parties):
    return schemathesis.openapi.from_url(https_server + "/openapi.json", **as_party(parties["operator"]))


@pytest.fixture(scope="module")
def https_client_schema(https_client, parties):
    return schemathesis.openapi.from_url(https_client + "/openapi.json", **as_party(parties["server"]))


client = schemathesis.pytest.from_fixture("client_schema")
wide = schemathesis.pytest.from_fixture("two_feature_client_schema")
server = schemathesis.pytest.from_fixture("server_schema")
host = schemathesis.pytest.from_fixture("host_schema")
hosted = schemathesis.pytest.from_fixture("hosted_client_schema")
server_over_https = schemathesis.pytest.from_fixture("https_server_schema")
client_over_https = schemathesis.pytest.from_fixture("https_client_schema")


@client.parametrize()
@FUZZ
def test_client_conforms_to_its_openapi(case):
    call_and_validate(case)


@wide.parametrize()
@FUZZ
def test_multi_feature_client_conforms_to_its_openapi(case):
    call_and_validate(case)


@server.parametrize()
@FUZZ
def test_server_conforms_to_its_openapi(case):
    call_and_validate(case)


@host.parametrize()
@FUZZ
def test_client_host_conforms_to_its_openapi(case):
    call_and_validate(case)


@hosted.parametrize()
@FUZZ
def test_a_client_on_a_host_conforms_to_its_openapi(case):
    call_and_validate(case, base_url="http://localhost/clients/2")


@server_over_https.parametrize()
@HTTPS_FUZZ
def test_the_server_over_mutual_tls_conforms_to_its_openapi(case, parties):
    """Every request over HTTPS, as the operator's certificate: the
    operator's endpoints (/start, resume, /stop) are fuzzed too, never
    refused (a 401 is documented, so the checks alone would pass it)."""
    response = call_and_validate(case, **as_party(parties["operator"]))
    assert response.status_code != 401, response.text


@client_over_https.parametrize()
@HTTPS_FUZZ
def test_a_client_over_mutual_tls_conforms_to_its_openapi(case, parties):
    """Every request over HTTPS, as the server's certificate: /train,
    /evaluate and /secagg/* answer it, never with the 403 anyone else gets."""
    response = call_and_validate(case, **as_party(parties["server"]))
    assert response.status_code not in (401, 403), response.text
