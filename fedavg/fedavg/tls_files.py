"""Where an app's TLS material is: the three files of --tls-cert, --tls-key and --tls-ca."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TLSFiles:
    """An app's certificate and its private key (PEM), and the CA (PEM) that
    every peer's certificate must chain to: the server's, for a client; each
    client's, for the server. All three or none: an app without them talks
    plain HTTP."""

    cert: Path
    key: Path
    ca: Path
