"""`make certs` (scripts/make_certs.py), in this process: every certificate it
writes verifies against its CA under OpenSSL's strict checks, in a real TLS
handshake both ways (each party answers and calls); the names, addresses and
uses are the ones it documents; keys are its owner's only; an existing
folder is not overwritten without --force."""
from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import make_certs
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PARTIES = ["server", "client_1", "client_2", "client_3", "client_host", "operator"]


def server_context(folder: Path, name: str) -> ssl.SSLContext:
    """``name`` answering: its certificate, and a certificate from the CA required of the caller."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / f"{name}.crt", folder / f"{name}.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(folder / "ca.crt")
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_context(folder: Path, name: str) -> ssl.SSLContext:
    """``name`` calling: its certificate, the answerer's checked against the CA and the host name."""
    ctx = ssl.create_default_context(cafile=str(folder / "ca.crt"))  # CERT_REQUIRED, check_hostname
    ctx.load_cert_chain(folder / f"{name}.crt", folder / f"{name}.key")
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> dict:
    """A TLS handshake over a socket pair, each side in its own thread; the
    caller's certificate as the answering side verified it. A failure on either
    side is raised."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    results: dict[str, object] = {}

    def answer() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                results["peer"] = s.getpeercert()
                s.sendall(b"ok")  # so the caller learns the answerer accepted it (TLS 1.3 verifies last)
        except Exception as e:  # handed to the test
            results["server"] = e

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=host) as c:
            c.recv(2)
    except Exception as e:
        results["client"] = e
    thread.join(10)
    a.close()
    b.close()
    for side in ("client", "server"):
        if side in results:
            raise results[side]  # type: ignore[misc]
    return results["peer"]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("made") / "certs"
    old = os.umask(0)  # the keys must be 0600 whatever the umask
    try:
        assert make_certs.main(["--out", str(folder), "--clients", "3", "--host", "client_2=10.0.0.12,client-2.lan",
                                "--days", "30"]) == 0
    finally:
        os.umask(old)
    return folder


def load(folder: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / f"{name}.crt").read_bytes())


def test_it_writes_the_ca_and_a_certificate_and_key_for_each_party(certs, capsys):
    assert sorted(p.name for p in certs.iterdir()) == sorted(
        ["ca.crt"] + [f"{n}.{ext}" for n in PARTIES for ext in ("crt", "key")])


@pytest.mark.parametrize("caller", ["server", "client_1"])
@pytest.mark.parametrize("answerer", PARTIES)
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_every_certificate_verifies_against_the_ca_in_a_strict_handshake(certs, answerer, caller, host):
    peer = handshake(server_context(certs, answerer), client_context(certs, caller), host)
    assert dict(x[0] for x in peer["subject"])["commonName"] == caller


def test_a_certificate_is_refused_for_a_host_it_does_not_name(certs):
    # client_2's extra address is its own: client_1's certificate does not name it
    handshake(server_context(certs, "client_2"), client_context(certs, "server"), "10.0.0.12")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        handshake(server_context(certs, "client_1"), client_context(certs, "server"), "10.0.0.12")


def test_a_certificate_from_another_run_of_make_certs_is_refused(certs, tmp_path):
    other = tmp_path / "other"
    assert make_certs.main(["--out", str(other)]) == 0
    with pytest.raises(ssl.SSLError):
        handshake(server_context(certs, "client_1"), client_context(other, "server"), "localhost")


def test_names_addresses_and_uses_are_as_documented(certs):
    ca = load(certs, "ca")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for name in PARTIES:
        cert = load(certs, name)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.issuer == ca.subject
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        extra = ["client-2.lan"] if name == "client_2" else []
        assert san.get_values_for_type(x509.DNSName) == [name, "localhost", *extra]
        ips = [ipaddress.ip_address("127.0.0.1")] + ([ipaddress.ip_address("10.0.0.12")] if name == "client_2" else [])
        assert san.get_values_for_type(x509.IPAddress) == ips
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca is False
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert 30 <= days <= 31  # --days 30 (valid from a few minutes back)


def test_keys_are_their_owners_only(certs):
    for name in PARTIES:
        assert stat.S_IMODE((certs / f"{name}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert not (certs / "ca.key").exists()  # whoever holds it could make a "server"


def test_an_existing_folder_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "certs"
    assert make_certs.main(["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert make_certs.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert make_certs.main(["--out", str(out), "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != before["ca.crt"]
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600


def test_it_prints_the_three_flags_for_each_app(tmp_path, capsys):
    out = tmp_path / "c"
    make_certs.main(["--out", str(out), "--clients", "1"])
    printed = capsys.readouterr().out
    for name in ("server", "client_1", "client_host"):
        assert f"--tls-cert {out / name}.crt --tls-key {out / name}.key --tls-ca {out / 'ca.crt'}" in printed
    assert "--tls-cert " + str(out / "operator.crt") not in printed  # the operator is not an app: it calls
    assert (f"curl --cacert {out / 'ca.crt'} --cert {out / 'operator.crt'} --key {out / 'operator.key'} "
            "-X POST https://127.0.0.1:5000/start") in printed


@pytest.mark.parametrize("argv, message", [
    (["--clients", "0"], "--clients: at least 1"),
    (["--host", "client_9=10.0.0.9"], "--host: no party named client_9"),
    (["--host", "client_1"], "expected NAME=HOST"),
    (["--hosts", "localhost", "server"], "server is a party's name, not a host"),
    (["--host", "client_1=operator"], "operator is a party's name"),
])
def test_bad_options_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        make_certs.main(["--out", str(tmp_path / "c"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_shared_host_off_this_machine_is_warned_about_and_a_partys_own_name_is_fine(tmp_path, capsys):
    """--hosts goes into every certificate: each would then be valid for that
    host's URL, so the server could not tell its clients apart there."""
    assert make_certs.main(["--out", str(tmp_path / "a"), "--clients", "1", "--hosts", "localhost", "10.0.0.5",
                            "--host", "client_1=client_1,10.0.0.11"]) == 0
    err = capsys.readouterr().err
    assert "--hosts 10.0.0.5 goes into every certificate" in err and "--host NAME=HOST" in err
    assert make_certs.main(["--out", str(tmp_path / "b"), "--clients", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
