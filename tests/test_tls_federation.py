"""The seed's federation over mutual TLS, as the README starts it, with the
certificates `make certs` makes (its functions, into a temporary folder):
the three apps as real processes given --tls-cert/--tls-key/--tls-ca, the
server calling https:// client URLs. All system (make test-all)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import make_certs
import pytest
import urllib3
from cryptography.hazmat.primitives import serialization
from test_tls_serving import call, flags, pool, wait_tls

import launcher
from fedavg.tls_files import TLSFiles
from reference import SEED_DATA, reference_fedavg

pytestmark = pytest.mark.system


def new_ca(folder: Path, name: str = "Raw FedAvg trial CA") -> make_certs.Issued:
    """A CA (make certs' function), its certificate written as ``folder/ca.crt``."""
    folder.mkdir(exist_ok=True)
    ca = make_certs.new_ca(name)
    (folder / "ca.crt").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return ca


def party(folder: Path, ca: make_certs.Issued, name: str, hosts: Sequence[str] = make_certs.DEFAULT_HOSTS,
          file: str | None = None) -> TLSFiles:
    """``name``'s certificate from ``ca`` for ``hosts`` (as make certs'
    --host NAME=HOST makes it), written as ``file`` (default ``name``)
    into ``folder``, beside the CA's ``ca.crt``."""
    return TLSFiles(*make_certs.write_party(folder, file or name, make_certs.new_leaf(ca, name, hosts)),
                    folder / "ca.crt")


def trial(folder: Path) -> dict[str, TLSFiles]:
    """A CA and the parties of a trial (make certs' functions): server,
    client_1, client_2, and an operator who calls the server's API."""
    ca = new_ca(folder)
    return {name: party(folder, ca, name) for name in ("server", "client_1", "client_2", "operator")}


def seeds_run(operator: urllib3.PoolManager, server: str) -> dict:
    """A /start with the defaults as ``operator``: it completes at the seed's
    numbers, which the reference (plain Python) computes: y = 1.396271·x + 0.787802."""
    status, run = call(operator, "POST", server + "/start", {})
    assert status == 200 and run["status"] == "completed", run
    w, b = reference_fedavg(SEED_DATA, rounds=5)[-1]
    assert run["final_model"]["w"] == pytest.approx(w, abs=1e-12)
    assert run["final_model"]["b"] == pytest.approx(b, abs=1e-12)
    assert f"{w:.6f}" == "1.396271" and f"{b:.6f}" == "0.787802"
    return run


def test_the_seeds_numbers_over_mutual_tls_secure_too_and_a_client_the_server_cannot_verify_is_dropped(tmp_path):
    """The seed's 5 rounds over mutual TLS reach 1.396271·x + 0.787802, the
    plain-Python reference, and so does a run under secure aggregation. Then client_2 restarted with a certificate of
    another CA: the server drops it, naming the certificate problem, and the
    run goes on with client_1 alone (min_clients 1)."""
    certs = trial(tmp_path)
    ports = {name: launcher.free_port() for name in launcher.DEFAULT_PORTS}
    urls = [f"https://localhost:{ports['client_1']}", f"https://localhost:{ports['client_2']}"]
    apps = [launcher.start_app(name, ports[name], flags(certs[name])) for name in ("client_1", "client_2")]
    apps.append(launcher.start_app("server", ports["server"], ["--db", str(tmp_path / "runs.db"),
                                                               "--clients", ",".join(urls), *flags(certs["server"])]))
    operator = pool(certs["operator"], certs["operator"].ca)
    server = f"https://localhost:{ports['server']}"
    try:
        wait_tls(apps[-1], server + "/health", operator)
        plain = seeds_run(operator, server)["final_model"]
        # Secure aggregation over the same mutual TLS: its five waves reach the same line (to its fixed point).
        status, secure = call(operator, "POST", server + "/start", {"secagg": True})
        assert status == 200 and secure["status"] == "completed", secure
        assert secure["final_model"]["w"] == pytest.approx(plain["w"], abs=1e-6)
        assert secure["final_model"]["b"] == pytest.approx(plain["b"], abs=1e-6)
        assert "local_model" not in json.dumps(secure["rounds"])

        launcher.stop([apps[1]])
        other = trial(tmp_path / "other")  # the same names, another CA
        apps[1] = launcher.start_app("client_2", ports["client_2"], flags(TLSFiles(
            other["client_2"].cert, other["client_2"].key, certs["client_2"].ca)))
        # up: to a caller that trusts the other CA (and shows the server's certificate, which client_2 trusts)
        wait_tls(apps[1], f"{urls[1]}/health", pool(certs["server"], other["client_2"].ca))
        status, run = call(operator, "POST", server + "/start", {"rounds": 2, "min_clients": 1})
        assert status == 200 and run["status"] == "completed", run
        reasons = [d["reason"] for r in run["rounds"] for d in r["dropped"]]
        assert len(reasons) == 2 and all("unknown CA" in why for why in reasons), json.dumps(reasons)
        assert [p["client_id"] for r in run["rounds"] for p in r["participants"]] == ["client_1", "client_1"]
    finally:
        launcher.stop(apps)
