"""Secure aggregation's primitives, each a library's: the ChaCha20 PRG,
X25519 key agreement with HKDF-SHA256, SHA-256 and AES-GCM from
``cryptography``; Shamir's secret sharing over GF(2^128) from pycryptodome.
``fedavg.secagg`` builds the protocol from them; none is our own.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .secagg_wire import KEY_BYTES, check_indices

SHARE_X = struct.Struct(">I")  # a Shamir share starts with its x-coordinate


def expand(seed: bytes, length: int) -> np.ndarray:
    """PRG(seed): `length` little-endian uint64 words of ChaCha20's keystream under
    key = seed. The nonce is fixed: every seed is derived for one session and masks one vector."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"expand: the seed must be {KEY_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def self_mask(seed: bytes, length: int) -> np.ndarray:
    """PRG(b_i): the ChaCha20 keystream under HKDF-SHA256(b_i), ``length`` words."""
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"self mask").derive(seed)
    return expand(key, length)


def sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw 32-byte encodings (private, public)."""
    key = X25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def public_of(private_raw: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes_raw()


def agree(private_raw: bytes, peer_public_raw: bytes, purpose: bytes, session: bytes,
          what: str = "peer public key") -> bytes:
    """key = HKDF-SHA256(X25519(sk_i, pk_j), info = purpose + session): the same from
    either end of the pair, and new in every session. `what` names the peer's key in errors."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public_raw)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: not a raw {KEY_BYTES}-byte X25519 public key") from None
    try:
        shared = X25519PrivateKey.from_private_bytes(private_raw).exchange(peer)
    except ValueError:  # cryptography refuses a low-order point: the shared secret would be all zeros
        raise ValueError(f"{what}: a low-order point (the shared secret would be all zeros)") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose + session).derive(shared)


def split_secret(secret: bytes, threshold: int, indices: Iterable[int],
                 between: Callable[[int], None] | None = None) -> dict[int, bytes]:
    """Shamir: any `threshold` of the shares rebuild `secret`, fewer tell nothing. Each
    16-byte chunk is shared alone at the same x; a share is x (4 bytes) + one value per chunk.
    ``between(k)`` is called before chunk k is split (it may raise to give up the work)."""
    holders = check_indices(indices, "indices")
    if not secret or len(secret) % 16:
        raise ValueError(f"split_secret: the secret must be a multiple of 16 bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"split_secret: threshold {threshold} must be between 1 and {len(holders)} holders")
    chunks = []
    for k in range(0, len(secret), 16):
        if between is not None:
            between(k // 16)
        chunks.append(Shamir.split(threshold, len(holders), secret[k:k + 16]))
    return {h: SHARE_X.pack(x) + b"".join(chunk[x - 1][1] for chunk in chunks) for x, h in enumerate(holders, 1)}


def combine_secret(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (more are fine: a polynomial of
    degree t−1 through more points is the same polynomial, so every share counts)."""
    if len(shares) < threshold:
        raise ValueError(f"combine_secret: only {len(shares)} of {threshold} shares")
    sizes = {len(s) for s in shares.values()}
    if len(sizes) != 1 or (size := sizes.pop() - SHARE_X.size) <= 0 or size % 16:
        raise ValueError("combine_secret: shares must all be 4 + 16·k bytes long")
    points = [(SHARE_X.unpack(s[:SHARE_X.size])[0], s[SHARE_X.size:]) for s in shares.values()]
    try:
        return b"".join(Shamir.combine([(x, y[k:k + 16]) for x, y in points]) for k in range(0, size, 16))
    except ValueError as e:  # two shares at the same x
        raise ValueError(f"combine_secret: {e}") from None


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-GCM under `key`: a random 12-byte nonce, then the ciphertext and its tag."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise ValueError("the sealed shares failed authentication (altered, or sealed for another pair "
                         "or session)") from None
