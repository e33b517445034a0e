"""Secure aggregation (Bonawitz et al., CCS 2017), honest-but-curious version,
over a communication graph as in SecAgg+ (Bell et al., CCS 2020): the server
learns Σ_{i∈U3} x_i over the clients that survived, and no single x_i.

One method of ``SecAggClient`` per round; the server's side is ``unmask_sum``.
The server draws a graph over U1 (``secagg_graph``): client i masks with, and
shares its secrets among, only its k neighbours N(i), and N[i] = N(i) ∪ {i}
is its neighbourhood. With k = |U1| − 1 (the complete graph) this is
Bonawitz et al.'s protocol; with k ~ log n each client's work is O(k), not
O(n). The client needs no graph of its own: the server tells it its
neighbourhood, and each step below is read within it.

0. AdvertiseKeys: client i publishes two X25519 public keys, c_pk_i (to seal
   shares) and s_pk_i (for pair masks), and b_commit_i = SHA-256(b_i), its
   self-mask seed's commitment. U1 = the clients that did.
1. ShareKeys: i splits s_sk_i and b_i into Shamir shares (threshold t), one for
   each j in N[i], and seals j's pair under agree(c_sk_i, c_pk_j, "share").
   U2 = the clients that did.
2. Receiving: i opens every sealed pair sent to it; one that fails
   authentication names its sender (only i and j hold the key, and the pair
   is in the AAD), and i masks nothing in this session (``BadShares``). The
   accusation comes with its proof, c_sk_i: the server derives the pair's
   key itself and tries the ciphertext it relayed (``accusation_holds``).
   If it does not open, the server drops the sender and starts the round
   again without it, in a new session; if it does, the accuser lied, and is
   dropped. No masked input exists yet: this is a wave of its own.
3. MaskedInputCollection: with s_ij = agree(s_sk_i, s_pk_j, "mask") = s_ji:
       y_i = x_i + PRG(b_i) + Σ_{j∈U2∩N(i), j>i} PRG(s_ij) − Σ_{j∈U2∩N(i), j<i} PRG(s_ij)   (mod 2^64)
   U3 = the clients whose y_i arrived. b_i is a 128-bit seed and PRG(b_i) the
   ChaCha20 keystream under HKDF(b_i); PRG(s_ij) is the keystream under s_ij.
4. Unmasking: every survivor reveals its share of b_j for j in U3 ∩ N[i] and of
   s_sk_j for j in (U2 \\ U3) ∩ N(i), never both for one j. From t shares of each
   (so t survivors in each needed neighbourhood) the server gets
       Σ_{i∈U3} x_i = Σ_{i∈U3} y_i − Σ_{i∈U3} PRG(b_i) − Σ_{j∈U2\\U3} Σ_{i∈U3∩N(j)} ±PRG(s_ij)

x_i is fixed point (``encode``); for FedAvg x_k holds n_k·θ_k and n_k
(fedavg.secure_client.secure_input): the server learns Σ n_k·θ_k and N,
i.e. the average.
Every primitive is a library's: X25519, HKDF-SHA256, ChaCha20, AES-GCM and
SHA-256 from ``cryptography``; Shamir over GF(2^128) from pycryptodome.

The primitives are in ``secagg_crypto``, the wire format (``to_wire`` and
the ``*_from_wire`` parsers) in ``secagg_wire``; this module is the
protocol, and names all three's public parts (``__all__``).
"""
from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from .secagg_crypto import (
    SHARE_X,
    agree,
    combine_secret,
    expand,
    new_keypair,
    open_sealed,
    public_of,
    seal,
    self_mask,
    sha256,
    split_secret,
)
from .secagg_graph import check_graph, closed, show_ids
from .secagg_wire import (
    KEY_BYTES,
    bytes_from_wire,
    check_bytes,
    check_index,
    check_indices,
    check_keys,
    check_words,
    indexed_from_wire,
    indices_from_wire,
    keys_from_wire,
    reveal_from_wire,
    to_wire,
    vector_from_wire,
)
from .trace import TRACE_TERMS, fmt
from .wire import SECAGG_SCALE_BITS

# The protocol's one entry: its steps, and the primitives and wire format it is built from.
__all__ = ["KEY_BYTES", "MASK", "SCALE_BITS", "SHARE", "BadShares", "SecAggClient", "SecAggError", "Stopped",
           "accusation_holds", "agree", "bytes_from_wire", "collect_shares",
           "combine_secret", "decode", "encode", "expand", "indexed_from_wire", "indices_from_wire", "keys_from_wire",
           "new_keypair", "open_sealed", "public_of", "reveal_from_wire", "seal", "self_mask", "sha256",
           "split_secret", "to_wire", "unmask_sum", "vector_from_wire"]
T = TypeVar("T")
MASK, SHARE = b"mask", b"share"  # the two purposes of a key agreement (HKDF's info, before the session)
SCALE_BITS = SECAGG_SCALE_BITS  # fixed point: 2^-24 ≈ 6e-8 per client, and |n·w| up to ~5e11 / parties still fits
# b_i, the self-mask seed: 128 bits, one Shamir chunk (sharing and rebuilding
# it is most of a round's cost); the PRG's 256-bit key is HKDF(b_i).
SEED_BYTES = 16
PAIR_BYTES = 2 * SHARE_X.size + KEY_BYTES + SEED_BYTES  # a sealed pair, opened: a share of s_sk_i, then of b_i
LEAVE_OUT_TRIES = 256  # subsets tried when a secret's shares disagree: bounded work per secret


class SecAggError(Exception):
    """The server cannot unmask the sum: too few survivors or shares, or
    shares that rebuild no secret matching what its owner published.
    ``clients`` names the clients at fault, or every suspect."""

    def __init__(self, reason: str, clients: Iterable[int] = ()) -> None:
        super().__init__(reason)
        self.clients = sorted(clients)


class BadShares(ValueError):
    """What some senders sealed to this client does not open: ``senders`` is
    {j: why}. AES-GCM under a key only j and this client hold, with the pair
    in the AAD: the fault is j's (or whoever changed it on the way)."""

    def __init__(self, senders: Mapping[int, str]) -> None:
        self.senders = dict(sorted(senders.items()))
        shown = "; ".join(f"client {j}: {why}" for j, why in list(self.senders.items())[:TRACE_TERMS])
        more = f"; … {len(self.senders) - TRACE_TERMS} more" if len(self.senders) > TRACE_TERMS else ""
        super().__init__(f"received: the sealed shares of {len(self.senders)} client(s) do not open ({shown}{more}); "
                         "nothing was masked")


class Stopped(Exception):
    """A step given up part way because its ``stop()`` said so (the server
    stopped waiting): nothing of it was kept, and the same request may
    be made again."""


def _go_on(stop: Callable[[], bool] | None, done: str | None = None) -> None:
    """Raise Stopped, saying how far the step got (``done``; None: not begun), once ``stop()`` holds."""
    if stop is not None and stop():
        raise Stopped("stopped before it began" if done is None else f"stopped after {done}")


# --- fixed point, mod 2^64 -----------------------------------------------------

def encode(values: Any, scale_bits: int, parties: int) -> np.ndarray:
    """x ↦ round(x·2^s) mod 2^64, refused when |x|·2^s·parties ≥ 2^63: a sum of
    `parties` such words must still read back as a signed 64-bit number."""
    _check_scale(scale_bits)
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
        raise ValueError(f"encode: parties must be a positive integer, got {parties!r}")
    v = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(v).all():
        raise ValueError(f"encode: x[{int(np.argmin(np.isfinite(v)))}] is not finite")
    limit = encode_limit(scale_bits, parties)
    if (np.abs(v) >= limit).any():
        k = int(np.argmax(np.abs(v) >= limit))
        raise ValueError(f"encode: |x[{k}]| = {fmt(abs(v[k]))} times 2^{scale_bits} times {parties} parties "
                         f"reaches 2^63, so the sum could wrap around (|x| must stay below {fmt(limit)}; "
                         "use fewer scale_bits)")
    return np.rint(v * 2.0**scale_bits).astype(np.int64).view(np.uint64)


def encode_limit(scale_bits: int, parties: int) -> float:
    """The largest |x| ``encode`` takes: 2^63 / 2^s / parties."""
    return 2.0**63 / 2.0**scale_bits / parties


def _check_scale(scale_bits: Any) -> None:
    if isinstance(scale_bits, bool) or not isinstance(scale_bits, int) or not 0 <= scale_bits <= 62:
        raise ValueError(f"scale_bits: must be an integer in 0..62, got {scale_bits!r}")


def _check_threshold(threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
        raise ValueError(f"threshold: must be an integer >= 2 (with t = 1 any one client could rebuild another's "
                         f"secrets), got {threshold!r}")


def decode(total: np.ndarray, scale_bits: int) -> np.ndarray:
    """Words mod 2^64 read as signed 64-bit numbers, divided by 2^s."""
    return np.ascontiguousarray(total, dtype=np.uint64).view(np.int64) / 2.0**scale_bits


def _aad(session: bytes, sender: int, recipient: int) -> bytes:
    # Binds a ciphertext to its pair and session: the server cannot replay or redirect it.
    return b"secagg shares" + struct.pack(">II", sender, recipient) + session


# --- one client ------------------------------------------------------------------

class SecAggClient:
    """One client in one session: its keys and self-mask seed b_i, and what it
    was told. Each round's method refuses what would reveal too much."""

    def __init__(self, index: int, session: bytes, threshold: int, scale_bits: int = SCALE_BITS) -> None:
        if not isinstance(session, bytes) or not session:
            raise ValueError("session: must be non-empty bytes naming run and round, e.g. b'run 3 round 7'")
        _check_threshold(threshold)
        _check_scale(scale_bits)
        self.index, self.session = check_index(index, "index"), session
        self.threshold, self.scale_bits = threshold, scale_bits
        self._c_sk, self.c_pk = new_keypair()
        self._s_sk, self.s_pk = new_keypair()
        self._b = os.urandom(SEED_BYTES)  # drawn now, so that AdvertiseKeys can commit to it
        self.peers: dict[int, dict[str, bytes]] | None = None
        self._sealed: dict[int, bytes] = {}
        self._own = b""  # this client's own share of s_sk_i, then of b_i
        self._seeds: dict[int, bytes] = {}
        self._box: dict[int, bytes] = {}  # j → the key sealing what i and j send each other
        self._u2: set[int] | None = None
        self._received: dict[int, bytes] = {}
        self._opened: dict[int, bytes] = {}  # j → the share pair j sealed to this client, opened
        self._bad: dict[int, str] = {}  # j → why what j sealed to this client did not open
        self._sent: tuple[np.ndarray, np.ndarray] | None = None  # (encode(x), y_i), to answer a retry alike
        self._revealed: dict[str, set[int]] = {"b": set(), "s_sk": set()}

    def advertise(self) -> dict[str, bytes]:
        """AdvertiseKeys: {"c_pk", "s_pk", "b_commit" = SHA-256(b_i)} (the same on a retry)."""
        return {"c_pk": self.c_pk, "s_pk": self.s_pk, "b_commit": sha256(self._b)}

    def share_keys(self, peers: Mapping[int, Mapping[str, bytes]],
                   stop: Callable[[], bool] | None = None) -> dict[int, bytes]:
        """ShareKeys: {j: seal(agree(c_sk_i, c_pk_j, "share"), j's share of s_sk_i + of b_i)}
        for every j ≠ i in `peers`: N[i], i's neighbourhood in U1 (all of U1 in the complete
        graph), which lists i itself, with its own keys. `stop` is asked before each peer's
        key agreement and seal and each Shamir split (Stopped when it says so)."""
        peers = {check_index(j, "peers"): check_keys(keys, f"peers[{j}]") for j, keys in peers.items()}
        if self.peers is not None:
            if peers == self.peers:  # a retried request: the same ciphertexts
                return dict(self._sealed)
            raise ValueError("share_keys: already done in this session with other peers (a second set of shares "
                             "of the same secrets would let fewer than t clients rebuild them)")
        mine = peers.get(self.index, {})
        if (mine.get("c_pk"), mine.get("s_pk")) != (self.c_pk, self.s_pk):
            raise ValueError(f"peers: must list this client ({self.index}) with the keys it advertised")
        if len(peers) < self.threshold:
            raise ValueError(f"peers: {len(peers)} clients, fewer than the threshold t={self.threshold}")
        seen: dict[bytes, str] = {}
        for j, keys in peers.items():
            for name in ("c_pk", "s_pk"):
                first = seen.setdefault(keys[name], f"{name} of client {j}")
                if first != f"{name} of client {j}":
                    raise ValueError(f"peers: {name} of client {j} is also the {first} (every key must differ)")
        others = [j for j in peers if j != self.index]
        _go_on(stop)
        # Every peer key is used now, so a bad one is named in this round and not in a later one.
        box, seeds = {}, {}
        for done, j in enumerate(others):
            _go_on(stop, f"{done} of {len(others)} key agreements")
            box[j] = agree(self._c_sk, peers[j]["c_pk"], SHARE, self.session, f"c_pk of client {j}")
            seeds[j] = agree(self._s_sk, peers[j]["s_pk"], MASK, self.session, f"s_pk of client {j}")
        # Shamir's split is most of this step's work (O(|N[i]|·t) per 16 bytes): stop between chunks.
        chunks, first = (len(self._s_sk) + len(self._b)) // 16, len(self._s_sk) // 16
        s_shares = split_secret(self._s_sk, self.threshold, peers,
                                between=lambda k: _go_on(stop, f"{k} of {chunks} Shamir splits"))
        b_shares = split_secret(self._b, self.threshold, peers,
                                between=lambda k: _go_on(stop, f"{first + k} of {chunks} Shamir splits"))
        sealed = {}
        for done, j in enumerate(others):
            _go_on(stop, f"sealing {done} of {len(others)} share pairs")
            sealed[j] = seal(box[j], s_shares[j] + b_shares[j], _aad(self.session, self.index, j))
        self._sealed = sealed
        self._own, self._seeds, self._box, self.peers = s_shares[self.index] + b_shares[self.index], seeds, box, peers
        return dict(self._sealed)

    def receive(self, received: Mapping[int, bytes], survivors_u2: Iterable[int],
                stop: Callable[[], bool] | None = None) -> int:
        """The pairs sealed to this client, opened: `received` is {j: what j sealed for i} for every
        j in U2 \\ {i}, U2 = `survivors_u2` told within N[i] (the peers of ``share_keys``). Returns
        how many opened; BadShares names the senders of those that do not open, and then this
        session masks nothing (the server must go on without them, in a new session, and may ask
        for c_sk: ``reveal_c_sk``). Once per session: a retry with the same arguments gets the same
        answer, anything else is refused. `stop` is asked once, before any pair is opened."""
        if self.peers is None:
            raise ValueError("receive: share_keys comes first")
        u2 = set(check_indices(survivors_u2, "survivors_u2"))
        if self.index not in u2 or not u2 <= set(self.peers):
            raise ValueError(f"survivors_u2: must hold this client ({self.index}) and only clients of U1")
        if len(u2) < self.threshold:
            raise ValueError(f"survivors_u2: {len(u2)} clients, fewer than the threshold t={self.threshold}")
        received = {check_index(j, "received"): check_bytes(blob, f"received[{j}]") for j, blob in received.items()}
        odd = sorted((u2 - {self.index}) ^ set(received))
        if odd:
            raise ValueError(f"received: {'no' if odd[0] in u2 else 'an unexpected'} ciphertext from client "
                             f"{odd[0]} (one is due from every other client of U2, and only from them)")
        if self._u2 is not None:
            if (u2, received) != (self._u2, self._received):
                raise ValueError("receive: already done in this session with other shares")
            if self._bad:
                raise BadShares(self._bad)
            return len(self._opened)
        # Opened in a step of their own, before anyone masks: a sender whose shares do not open is
        # named while no masked input of this session exists, so that proving it (c_sk) reveals
        # nothing that could unmask one (see ``reveal_c_sk``).
        _go_on(stop)  # (opening is AES-GCM over a few dozen bytes a pair: no unit of work worth stopping within)
        opened, bad = {}, {}
        for j in sorted(received):
            try:
                opened[j] = self._open(j, received[j])
            except ValueError as e:
                bad[j] = str(e)
        self._u2, self._received, self._opened, self._bad = u2, received, opened, bad
        if bad:
            raise BadShares(bad)
        return len(opened)

    def reveal_c_sk(self) -> bytes:
        """c_sk_i, the proof of a BadShares: with it the server derives agree(c_sk_i, c_pk_j, "share")
        itself and tries to open what j sealed to i (``accusation_holds``). Only in a session whose
        shares did not all open, where this client therefore masks nothing. c_sk_i seals shares
        only; it is not s_sk_i, the key of the pair masks. What it opens is this session's pairs
        to and from i: shares of the others' s_sk_j and b_j, one per secret, and all of i's own
        (never used: i masks nothing). No masked input of the session exists yet (``receive`` is
        the step before ``mask``, and the server asks for no masked input after an accusation),
        and the next attempt draws every key afresh, so none of it can unmask anything."""
        if not self._bad or self._sent is not None:
            raise ValueError("reveal_c_sk: refused; only a client whose received shares did not open, and that "
                             "masked nothing in this session, shows its c_sk")
        return self._c_sk

    def mask(self, x: Any, survivors_u2: Iterable[int], n_parties: int | None = None,
             stop: Callable[[], bool] | None = None) -> np.ndarray:
        """MaskedInputCollection: y_i = encode(x) + PRG(b_i) + Σ_{j∈U2, j>i} PRG(s_ij) − Σ_{j∈U2, j<i} PRG(s_ij)
        (mod 2^64), U2 = `survivors_u2`, the same as ``receive`` was told, and only once every pair
        it was sent opened. `n_parties` (default |N[i]|, the peers it was given; the server sends
        |U1|) bounds the sum for ``encode``'s overflow check. Once per session: a retry with the
        same arguments gets the same y_i, anything else is refused. `stop` is asked before each
        pair mask (Stopped when it says so)."""
        if self.peers is None:
            raise ValueError("masked_input: share_keys comes first")
        if self._u2 is None:
            raise ValueError("masked_input: receive comes first (the shares sealed to this client must open)")
        if self._bad:
            raise ValueError(f"masked_input: refused, the shares of client(s) {sorted(self._bad)} did not open in "
                             "this session, which therefore masks nothing")
        u2 = set(check_indices(survivors_u2, "survivors_u2"))
        if u2 != self._u2:
            raise ValueError(f"survivors_u2: {sorted(u2)}, not the {sorted(self._u2)} whose shares it received")
        words = encode(x, self.scale_bits, n_parties or len(self.peers))
        if self._sent is not None:
            if np.array_equal(words, self._sent[0]):
                return self._sent[1].copy()
            raise ValueError("masked_input: already sent in this session (two inputs under the same masks "
                             "would reveal their difference)")
        _go_on(stop)
        y = words + self_mask(self._b, len(words))
        for done, j in enumerate(sorted(u2 - {self.index})):
            _go_on(stop, f"{done} of {len(u2) - 1} pair masks")
            # s_ij = s_ji: j adds the same mask with the opposite sign, so the pair cancels in the sum.
            y = y + expand(self._seeds[j], len(y)) if j > self.index else y - expand(self._seeds[j], len(y))
        self._sent = (words, y)
        return y.copy()

    def masked_input(self, x: Any, received: Mapping[int, bytes], survivors_u2: Iterable[int],
                     n_parties: int | None = None, stop: Callable[[], bool] | None = None) -> np.ndarray:
        """``receive`` then ``mask``, in one call (the server asks for them in two waves)."""
        self.receive(received, survivors_u2, stop)
        return self.mask(x, survivors_u2, n_parties, stop)

    def unmask(self, survivors_u3: Iterable[int], dropped: Iterable[int],
               stop: Callable[[], bool] | None = None) -> dict[str, dict[int, bytes]]:
        """Unmasking: {"b": {j: share of b_j} for j in U3, "s_sk": {j: share of s_sk_j} for j in dropped},
        (both told within N[i]), refused when they overlap, |U3| < t, or they are not a split of U2.
        (The shares were opened by ``receive``; `stop` is asked once, before anything is revealed.)"""
        _go_on(stop)
        if self._sent is None:
            raise ValueError("unmask: masked_input comes first")
        u3, gone = set(check_indices(survivors_u3, "survivors_u3")), set(check_indices(dropped, "dropped"))
        both = (u3 & gone) | (u3 & self._revealed["s_sk"]) | (gone & self._revealed["b"])
        if both:
            raise ValueError(f"unmask: refused, asked for both b and s_sk of client(s) {sorted(both)}; together "
                             "they unmask that client's input")
        if len(u3) < self.threshold:
            raise ValueError(f"unmask: refused, only {len(u3)} survivors, fewer than t={self.threshold}: "
                             "a sum of so few inputs would say too much about each")
        unknown = sorted((u3 | gone) - self._u2)
        if unknown:
            raise ValueError(f"unmask: refused, client(s) {unknown} never sent this client shares (not in U2)")
        if u3 | gone != self._u2:
            raise ValueError(f"unmask: client(s) {sorted(self._u2 - u3 - gone)} of U2 are neither in survivors_u3 "
                             "nor in dropped")
        pairs = {j: self._own if j == self.index else self._opened[j] for j in sorted(u3 | gone)}
        half = len(self._own) - (SHARE_X.size + SEED_BYTES)  # (its share of s_sk_i, then of b_i)
        self._revealed["b"] |= u3
        self._revealed["s_sk"] |= gone
        return {"b": {j: pairs[j][half:] for j in sorted(u3)}, "s_sk": {j: pairs[j][:half] for j in sorted(gone)}}

    def _open(self, j: int, blob: bytes) -> bytes:
        """What j sealed to this client, or ValueError saying why it does not open."""
        plain = open_sealed(self._box[j], blob, _aad(self.session, j, self.index))
        if len(plain) != PAIR_BYTES:
            raise ValueError(f"{len(plain)} bytes once opened, expected {PAIR_BYTES}")
        return plain


# --- the server ------------------------------------------------------------------

def accusation_holds(c_sk: bytes, public: Mapping[int, Mapping[str, bytes]], accuser: int, sender: int,
                     sealed: bytes, session: bytes) -> bool:
    """Whether what ``sender`` sealed to ``accuser`` fails to open, judged with the accuser's c_sk
    (``SecAggClient.reveal_c_sk``) as the accuser's own ``receive`` judges it: the key
    agree(c_sk, c_pk_sender, "share"), the pair in the AAD, and PAIR_BYTES once opened.
    ValueError when c_sk is not the key behind the c_pk the accuser advertised in ``public``."""
    check_bytes(c_sk, "c_sk", KEY_BYTES)
    if public_of(c_sk) != public[accuser]["c_pk"]:
        raise ValueError(f"c_sk: not the private key of the c_pk client {accuser} advertised")
    key = agree(c_sk, public[sender]["c_pk"], SHARE, session, f"c_pk of client {sender}")
    try:
        plain = open_sealed(key, sealed, _aad(session, sender, accuser))
    except ValueError:
        return True
    return len(plain) != PAIR_BYTES


def collect_shares(replies: Mapping[int, Mapping[str, Mapping[int, bytes]]]) \
        -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
    """The unmask replies {holder: {"b": {j: share}, "s_sk": {j: share}}} regrouped per
    secret: ({j: {holder: share of b_j}}, {j: {holder: share of s_sk_j}})."""
    b: dict[int, dict[int, bytes]] = {}
    s_sk: dict[int, dict[int, bytes]] = {}
    for holder, reply in replies.items():
        for j, share in reply.get("b", {}).items():
            b.setdefault(j, {})[holder] = share
        for j, share in reply.get("s_sk", {}).items():
            s_sk.setdefault(j, {})[holder] = share
    return b, s_sk


def unmask_sum(masked: Mapping[int, Any], b_shares: Mapping[int, Mapping[int, bytes]],
               s_sk_shares: Mapping[int, Mapping[int, bytes]], public: Mapping[int, Mapping[str, bytes]], *,
               survivors_u2: Iterable[int], session: bytes, threshold: int, length: int,
               scale_bits: int = SCALE_BITS,
               neighbors: Mapping[int, Iterable[int]] | None = None) -> tuple[np.ndarray, list[str]]:
    """Σ_{i∈U3} x_i = Σ_{i∈U3} y_i − Σ_{i∈U3} PRG(b_i) − Σ_{j∈U2\\U3} Σ_{i∈U3∩N(j)} ±PRG(s_ij), decoded.

    U3 = the keys of `masked` (y_i, `length` words each), U1 = those of `public` (the advertised
    keys and b_commit), `neighbors` the graph {i: N(i)} over U1 (None: the complete graph). Only
    shares from a secret's neighbourhood count, and every secret needed must have t of them before
    any is rebuilt. Each b_i must hash to b_commit_i and each s_sk_j give s_pk_j. Returns the sum
    and the trace."""
    _check_threshold(threshold)
    _check_scale(scale_bits)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: must be a positive integer, got {length!r}")
    public = {check_index(i, "public"): check_keys(keys, f"public[{i}]", commit=True) for i, keys in public.items()}
    u2 = set(check_indices(survivors_u2, "survivors_u2"))
    ys = {check_index(i, "masked"): check_words(y, f"masked input of client {i}", length) for i, y in masked.items()}
    u3 = sorted(ys)
    if not set(u3) <= u2 <= set(public):
        i = min((set(u3) - u2) | (u2 - set(public)))
        raise ValueError(f"client {i}: {'in U2 but advertised no keys' if i in u2 else 'sent y but is not in U2'}")
    if len(u3) < threshold:
        raise SecAggError(f"only {len(u3)} of t={threshold} clients sent a masked input (U3 = {u3}): "
                          "too few to unmask", u3)
    graph = check_graph(neighbors, public)
    gone = sorted(u2 - set(u3))
    # The shares that count: from a secret's neighbourhood (no one else was sent one).
    hoods = {i: closed(graph, i) for i in u3}
    b_of = {i: {h: s for h, s in b_shares.get(i, {}).items() if h in hoods[i]} for i in u3}
    s_sk_of = {j: {h: s for h, s in s_sk_shares.get(j, {}).items() if h in graph[j]}
               for j in gone if graph[j] & set(u3)}
    lacking = [f"{name}_{i}: only {len(got)} of t={threshold} shares (from {sorted(got)})"
               for name, shares in (("b", b_of), ("s_sk", s_sk_of)) for i, got in shares.items()
               if len(got) < threshold]
    if lacking:
        more = f"; … {len(lacking) - TRACE_TERMS} more" if len(lacking) > TRACE_TERMS else ""
        raise SecAggError("; ".join(lacking[:TRACE_TERMS]) + more + "; cannot unmask, and no secret was rebuilt")
    complete = all(len(js) == len(public) - 1 for js in graph.values())
    trace = [f"U1 = {len(public)} clients advertised keys, U2 = {sorted(u2)} shared them, U3 = {u3} sent y_i"
             + (f"; dropped after sharing: {gone}" if gone else "")
             + ("" if complete else "; each masked with and shared among its neighbours only: "
                + ", ".join(f"N({i}) = {sorted(graph[i])}" for i in sorted(graph)[:3]) + ", …")]
    trace += [f"y_{i} = {_show_words(ys[i])} (noise mod 2^64; its first entry decoded: "
              f"{fmt(decode(ys[i][:1], scale_bits)[0])})" for i in u3[:TRACE_TERMS]]
    trace += [f"… and {len(u3) - TRACE_TERMS} more masked inputs"] if len(u3) > TRACE_TERMS else []
    total = np.zeros(length, dtype=np.uint64)
    for i in u3:
        total = total + ys[i]
    trace.append(f"Σ y_i = {_show_words(total)}")
    selfmask = np.zeros(length, dtype=np.uint64)
    for i in u3:
        b = _recover(f"b_{i}", b_of[i], threshold, lambda s, i=i: sha256(s) == public[i]["b_commit"], trace)
        selfmask = selfmask + self_mask(b, length)
    total = total - selfmask
    trace.append(f"− Σ PRG(b_i) = {_show_words(selfmask)} (each b_i rebuilt from its shares, equal to its commitment)")
    for j in gone:
        pairs = sorted(graph[j] & set(u3))
        if not pairs:
            continue  # no survivor masked with j: nothing of j's is in the sum, and s_sk_j stays secret
        s_sk = _recover(f"s_sk_{j}", s_sk_of[j], threshold,
                        lambda s, j=j: len(s) == KEY_BYTES and public_of(s) == public[j]["s_pk"], trace)
        undo = np.zeros(length, dtype=np.uint64)
        for i in pairs:
            mask = expand(agree(s_sk, public[i]["s_pk"], MASK, session, f"s_pk of client {i}"), length)
            undo = undo + mask if j > i else undo - mask  # what i added for its pair with j
        total = total - undo
        if j in gone[:TRACE_TERMS]:
            trace.append(f"− the masks of dropped client {j} = {_show_words(undo)} (s_sk_{j} rebuilt, "
                         f"matches s_pk_{j}; its pairs with U3 ∩ N({j}) = {show_ids(pairs)})")
    trace += [f"… and those of {len(gone) - TRACE_TERMS} more dropped clients"] if len(gone) > TRACE_TERMS else []
    x = decode(total, scale_bits)
    trace.append(f"= Σ x_i = {_show_words(total)}, decoded ÷ 2^{scale_bits}: {_show_floats(x)}")
    return x, trace


def _recover(name: str, shares: Mapping[int, bytes], threshold: int, verify: Callable[[bytes], bool],
             trace: list[str]) -> bytes:
    """The secret from its shares, checked against what its owner published: first from t of
    them (interpolation is pycryptodome's pure Python, O(m²) for m shares, so t rather than all
    saves most of the time); when the check fails, from all of them, then with the fewest holders
    left out whose shares explain it, named, as long as t shares remain."""
    holders = sorted(shares)
    if len(holders) < threshold:
        raise SecAggError(f"{name}: only {len(holders)} of t={threshold} shares (from {holders}); cannot unmask")

    def attempt(subset: Iterable[int]) -> bytes | None:
        try:
            secret = combine_secret({h: shares[h] for h in subset}, threshold)
        except ValueError:
            return None
        return secret if verify(secret) else None

    if (secret := attempt(holders[:threshold])) is not None:
        return secret  # t shares that rebuild the committed value: any others would only agree
    if (secret := attempt(holders)) is not None:
        return secret
    removals = itertools.chain.from_iterable(itertools.combinations(holders, r)
                                             for r in range(1, len(holders) - threshold + 1))
    for removed in itertools.islice(removals, LEAVE_OUT_TRIES):
        if (secret := attempt(h for h in holders if h not in removed)) is not None:
            trace.append(f"{name}: the share(s) from client(s) {list(removed)} are wrong (the other "
                         f"{len(holders) - len(removed)} rebuild the committed value); left out")
            return secret
    raise SecAggError(f"{name}: the shares from clients {holders} rebuild no value matching its owner's public "
                      f"key or commitment, nor does any subset of t={threshold} or more that was tried: the wrong "
                      "share(s) are among these clients'", holders)


def _show_words(v: np.ndarray) -> str:
    return "[" + ", ".join(str(int(w)) for w in v[:3]) + (", …]" if len(v) > 3 else "]")


def _show_floats(v: np.ndarray) -> str:
    return "[" + ", ".join(fmt(w) for w in v[:TRACE_TERMS]) + (f", … ({len(v)} entries)]" if len(v) > TRACE_TERMS
                                                                else "]")


