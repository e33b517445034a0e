"""Fuzz every app against its own OpenAPI document (schemathesis): whatever
the request, no 5xx, and every reply conforms to the document."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import ROOT
from fedavg.http.client_app import create_app as create_client_app
from fedavg.http.host_app import create_host_app
from fedavg.scenarios import make_clients
from fedavg_server import create_app as create_server_app
from fedavg_server.inprocess import InProcessTransport

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def call_and_validate(case, **kwargs) -> None:
    """Every default check (no 5xx, status codes, content types and bodies as
    documented, invalid input rejected, 405 with Allow, …) except
    positive_data_acceptance: schema-valid input may still be refused for what
    a schema cannot say — strategy fedprox with mu = 0, min_clients beyond the
    clients that answer — or fail on the data (local training diverging, 422)."""
    case.call_and_validate(excluded_checks=[positive_data_acceptance], **kwargs)


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


client = schemathesis.pytest.from_fixture("client_schema")
wide = schemathesis.pytest.from_fixture("two_feature_client_schema")
server = schemathesis.pytest.from_fixture("server_schema")
host = schemathesis.pytest.from_fixture("host_schema")
hosted = schemathesis.pytest.from_fixture("hosted_client_schema")


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
