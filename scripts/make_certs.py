"""Certificates for a trial of mutual TLS (`make certs`): a CA, and a
certificate and key for the server, client_1 … client_N, the client host and
the operator (who starts runs: curl's --cert), written into one folder that
git ignores. For a real deployment use your own
CA's certificates instead; docs/DEPLOY.md says what they must hold.

    python scripts/make_certs.py [--out certs/] [--clients 2] [--hosts localhost 127.0.0.1]
                                 [--host NAME=HOST[,HOST]] [--days 365] [--force]

Each party's certificate names it (CN and a DNS SAN: ``server``,
``client_1``, …; a client checks that its caller's names ``server``) and the
host names and addresses it is reached at (SANs: the server checks each
client URL's host against them). Every party both answers and calls over
TLS, so each certificate may do both (EKU serverAuth and clientAuth). The
certificates pass OpenSSL's strict checks (VERIFY_X509_STRICT). The keys
are written readable by their owner only (0600).

The functions (``new_ca``, ``new_leaf``, ``write_party``) are what the tests
make their own certificates with, good and bad."""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_NAME = "Raw FedAvg trial CA"
# A certificate made now is valid from a little earlier: clocks of machines differ.
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256: what every TLS stack speaks, and fast to make in tests.
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_ca(name: str = CA_NAME, days: int = 365) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _key()
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - CLOCK_SKEW).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(key, cert)


def san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    """Each name as an IP SAN when it is an address, else a DNS SAN."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def new_leaf(ca: Issued, name: str, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365,
             not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
             named: bool = True) -> Issued:
    """A certificate for one party, signed by ``ca``: CN ``name``; SANs
    ``name`` and ``hosts``; usable to answer and to call (serverAuth,
    clientAuth). ``not_before``/``not_after`` override the validity (a
    test's expired certificate); ``named=False`` leaves ``name`` out (an
    empty subject, SANs ``hosts`` only: a certificate some CAs issue)."""
    key = _key()
    start = not_before or _now() - CLOCK_SKEW
    end = not_after or _now() + dt.timedelta(days=days)
    unique = list(dict.fromkeys([name, *hosts] if named else hosts))
    subject = _name(name) if named else x509.Name([])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(san_entries(unique)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issued(key, cert)


def write_private(path: Path, data: bytes) -> None:
    """``data`` into ``path``, readable and writable by its owner only (0600),
    from the moment it exists: the key is never readable by others, even
    briefly, whatever the umask."""
    if path.exists():
        path.unlink()  # a file made by someone else could keep wider permissions
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def write_party(out: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    """``out/name.crt`` and ``out/name.key`` (PEM; the key unencrypted, 0600)."""
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    cert_path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return cert_path, key_path


def parse_host_option(text: str) -> tuple[str, list[str]]:
    """--host NAME=HOST[,HOST] → (NAME, [HOST, …])."""
    name, sep, hosts = text.partition("=")
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if not sep or not name.strip() or not names:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST[,HOST], e.g. client_1=10.0.0.11, got {text!r}")
    return name.strip(), names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a CA and certificates for a trial of mutual TLS.")
    p.add_argument("--out", type=Path, default=ROOT / "certs",
                   help="the folder to write (default: certs/ at the repository's root, ignored by git)")
    p.add_argument("--clients", type=int, default=2, metavar="N",
                   help="certificates for client_1 … client_N (default 2)")
    p.add_argument("--hosts", nargs="+", default=list(DEFAULT_HOSTS), metavar="HOST",
                   help="host names and IP addresses every certificate is valid for (default: localhost "
                        "127.0.0.1, a trial on one machine; commas also separate); each machine's own address "
                        "goes to its party with --host")
    p.add_argument("--host", action="append", type=parse_host_option, default=[], metavar="NAME=HOST[,HOST]",
                   help="more host names or addresses for one party only, e.g. client_1=10.0.0.11 (repeatable)")
    p.add_argument("--days", type=int, default=365, help="how long the certificates are valid (default 365)")
    p.add_argument("--force", action="store_true", help="write into --out even if it already holds files")
    return p


# Not an app: the person at the server, whose certificate makes them its
# operator (fedavg_server.access) without the token.
OPERATOR = "operator"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parties(clients: int) -> list[str]:
    return ["server", *(f"client_{k}" for k in range(1, clients + 1)), "client_host", OPERATOR]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    hosts = [h.strip() for item in args.hosts for h in item.split(",") if h.strip()]
    extra: dict[str, list[str]] = {}
    for name, names in args.host:
        extra.setdefault(name, []).extend(names)
    if args.clients < 1:
        p.error("--clients: at least 1")
    if args.days < 1:
        p.error("--days: at least 1")
    unknown = sorted(set(extra) - set(parties(args.clients)))
    if unknown:
        p.error(f"--host: no party named {', '.join(unknown)} (the parties: {', '.join(parties(args.clients))})")
    # A certificate's DNS names are identities too (a client answers the
    # certificate that names "server"): a host name that is a party's name
    # would make every certificate, or another party's, that party.
    named = sorted({h for h in hosts if h in parties(args.clients)}
                   | {h for name, extra_hosts in extra.items() for h in extra_hosts
                      if h in parties(args.clients) and h != name})
    if named:
        p.error(f"--hosts/--host: {', '.join(named)} is a party's name, not a host: a certificate for it would "
                "make its holder that party")
    shared = [h for h in hosts if not _loopback(h)]
    if shared:
        print(f"make certs: warning: --hosts {' '.join(shared)} goes into every certificate, so each party's "
              "certificate is valid for every such host: give each machine's address to its own party with "
              "--host NAME=HOST instead", file=sys.stderr)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.force:
        print(f"error: {out} already holds files; certificates made anew would not match the ones the apps use: "
              f"pass --force to replace them, or --out another folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # the keys' folder: its owner's only

    ca = new_ca(days=args.days)
    ca_path = out / "ca.crt"
    ca_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    # The CA's key is not written: whoever holds it can make a certificate
    # that says "server", and a folder copied whole to every machine would
    # hand it to every client. To add a party, make the whole set anew.
    written = {name: write_party(out, name, new_leaf(ca, name, [*hosts, *extra.get(name, [])], args.days))
               for name in parties(args.clients)}

    print(f"wrote {out}: ca.crt (the CA's key is not kept), and a certificate and key (0600) for each of "
          f"{', '.join(written)}, valid {args.days} days for {', '.join(hosts)}")
    print("copy to each machine its own two files and ca.crt (never another party's key), and start it with:")
    operator = written.pop(OPERATOR)
    for name, (cert, key) in written.items():
        print(f"  {name + ':':<13} --tls-cert {cert} --tls-key {key} --tls-ca {ca_path}")
    print("and give the server https:// client URLs, e.g. --clients https://127.0.0.1:5001,https://127.0.0.1:5002")
    print(f"the operator starts a run with  curl --cacert {ca_path} --cert {operator[0]} --key {operator[1]} "
          f"-X POST https://127.0.0.1:5000/start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
