"""The three files of an app's mutual TLS (--tls-cert, --tls-key, --tls-ca
or FEDAVG_TLS_*), read from the command line or the environment and checked
before anything serves. Flask-free: the server's transport reads them too."""
from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# flag, environment variable and TLSFiles field, in the order they are named.
SOURCES = (("--tls-cert", "FEDAVG_TLS_CERT", "cert"),
           ("--tls-key", "FEDAVG_TLS_KEY", "key"),
           ("--tls-ca", "FEDAVG_TLS_CA", "ca"))


@dataclass(frozen=True)
class TLSFiles:
    """An app's mutual TLS: ``cert``, the PEM certificate (chain) it presents
    when it serves and when it calls; ``key``, that certificate's PEM private
    key (unencrypted: the app starts unattended); ``ca``, the PEM CA
    certificate(s) a peer's certificate must chain to. An app given these
    serves HTTPS only and requires every caller to present a certificate
    that chains to ``ca`` (on the server's own port a certificate is
    optional: its operator's browser may have none)."""

    cert: Path
    key: Path
    ca: Path


def from_env_or_args(cert: str | os.PathLike | None = None, key: str | os.PathLike | None = None,
                     ca: str | os.PathLike | None = None,
                     environ: Mapping[str, str] = os.environ) -> TLSFiles | None:
    """The TLS files from the flags' values, each falling back to its
    FEDAVG_TLS_* variable (an empty value is none): all three, or None when
    none is given. Raises ValueError naming what is missing when only some
    are given: half a TLS setup must not quietly serve plain HTTP. The
    files themselves are checked by ``check``."""
    given = {"cert": cert, "key": key, "ca": ca}
    values = {field: given[field] or environ.get(env) or None for _, env, field in SOURCES}
    missing = [f"{flag} (or {env})" for flag, env, field in SOURCES if values[field] is None]
    if len(missing) == len(SOURCES):
        return None
    if missing:
        present = ", ".join(flag for flag, _, field in SOURCES if values[field] is not None)
        raise ValueError(f"TLS needs --tls-cert, --tls-key and --tls-ca together: {present} given, "
                         f"{' and '.join(missing)} missing")
    return TLSFiles(**{field: Path(value) for field, value in values.items()})


def check(files: TLSFiles) -> None:
    """Raise ValueError, in one line naming the flag and the file, unless
    every file can be read and is what it should be: ``cert`` a PEM
    certificate, ``key`` an unencrypted PEM private key of that very
    certificate, ``ca`` PEM certificate(s) ssl can verify with. Checked at
    start, so that a wrong file stops the app at once instead of failing
    every handshake later. An expired ``cert`` passes: the peer says so."""
    cert_pem, key_pem, ca_pem = (_read(flag, getattr(files, field)) for flag, _, field in SOURCES)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ValueError(f"--tls-cert {files.cert}: not a PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # cryptography's way of saying "it is encrypted"
        raise ValueError(f"--tls-key {files.key}: the private key is encrypted; give it unencrypted "
                         "(the app starts without anyone to type a passphrase)") from None
    except ValueError:
        raise ValueError(f"--tls-key {files.key}: not a PEM private key") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*raw) != private_key.public_key().public_bytes(*raw):
        raise ValueError(f"--tls-key {files.key}: not the private key of the certificate {files.cert} "
                         "(--tls-cert)")
    try:
        x509.load_pem_x509_certificates(ca_pem)
        ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    except (ValueError, ssl.SSLError, UnicodeDecodeError):
        raise ValueError(f"--tls-ca {files.ca}: not PEM CA certificate(s)") from None


def own_name(cert: Path) -> str | None:
    """Whom a PEM certificate names: its subject's CN (the first), else its
    first DNS name; None when it names no one (IP addresses only)."""
    certificate = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names and names[0].value else next(iter(dns_names(cert)), None)


def dns_names(cert: Path) -> list[str]:
    """The DNS names in a PEM certificate's subjectAltName (none: [])."""
    certificate = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None
