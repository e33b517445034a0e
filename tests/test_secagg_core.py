"""Secure aggregation's core (fedavg/secagg.py, fedavg/secagg_graph.py) without
HTTP: the four rounds run in-process, over the complete graph and over
SecAgg+'s sparse one, and every number is checked against plain Python
written here (sums with math.fsum, fixed point with ints, HKDF with hmac,
published test vectors for ChaCha20 and X25519, the ring distances of a
Harary graph), never against the module's own output. A property (Hypothesis)
ties it together: for random inputs, K, t, graphs and dropouts at every step,
the sum is the integer fixed-point sum whenever the paper's conditions
(``first_refusal``) say it can be unmasked, and refused, nothing rebuilt,
whenever they say it cannot."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import random
from unittest import mock

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from fedavg import secagg, secagg_crypto, secagg_graph
from fedavg.trace import fmt

SESSION = b"run 1 round 1"
SCALE = secagg.SCALE_BITS


def ref_encode(v: float, scale_bits: int) -> int:
    return round(v * 2**scale_bits) % 2**64


def ref_decode(word: int, scale_bits: int) -> float:
    return (word - 2**64 if word >= 2**63 else word) / 2**scale_bits


def plain_sum(vectors: list[list[float]]) -> list[float]:
    return [math.fsum(column) for column in zip(*vectors)]


class Federation:
    """Rounds 0-2 of one session: every client advertises; those not in
    `before` share keys (U2) and send y_i. Unmasking is left to each test.
    With a `graph` {i: N(i)} (SecAgg+), each client is given only its
    neighbourhood N[i] = N(i) ∪ {i}, as the server does; without, all of U1."""

    def __init__(self, xs: dict[int, list[float]], t: int, before: tuple[int, ...] = (), session: bytes = SESSION,
                 graph: dict[int, set[int]] | None = None) -> None:
        self.xs, self.t, self.session, self.graph = xs, t, session, graph
        self.clients = {i: secagg.SecAggClient(i, session, t) for i in xs}
        self.public = {i: c.advertise() for i, c in self.clients.items()}  # U1
        self.sealed = {i: self.clients[i].share_keys({j: self.public[j] for j in self.hood(i)})
                       for i in xs if i not in before}
        self.u2 = sorted(self.sealed)
        self.masked = {i: self.clients[i].masked_input(xs[i], self.inbox(i), self.told(i, self.u2), len(xs))
                       for i in self.u2}

    def hood(self, i: int) -> set[int]:
        return set(self.xs) if self.graph is None else self.graph[i] | {i}

    def told(self, i: int, among: list[int]) -> list[int]:
        return sorted(self.hood(i) & set(among))

    def inbox(self, i: int) -> dict[int, bytes]:
        return {j: self.sealed[j][i] for j in self.told(i, self.u2) if j != i}

    def unmask(self, u3: list[int], silent: tuple[int, ...] = ()) -> dict:
        dropped = [j for j in self.u2 if j not in u3]
        return {i: self.clients[i].unmask(self.told(i, u3), self.told(i, dropped)) for i in u3 if i not in silent}

    def total(self, u3: list[int], replies: dict) -> tuple[np.ndarray, list[str]]:
        b, s_sk = secagg.collect_shares(replies)
        return secagg.unmask_sum({i: self.masked[i] for i in u3}, b, s_sk, self.public, survivors_u2=self.u2,
                                 session=self.session, threshold=self.t, length=len(next(iter(self.xs.values()))),
                                 neighbors=self.graph)


def random_inputs(k: int, d: int, seed: int) -> dict[int, list[float]]:
    rng = random.Random(seed)
    return {i: [rng.gauss(0, 10) * 10 ** rng.randint(-3, 3) for _ in range(d)] for i in range(1, k + 1)}


def assert_close(got: np.ndarray, want: list[float], parties: int) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert abs(g - w) <= parties * 2.0**-SCALE


# --- fixed point -------------------------------------------------------------

def test_encode_matches_integer_fixed_point_and_decodes_within_the_scale():
    values = [0.0, 1.0, -1.0, 0.5, -2.5e-8, 3.14159265, -123456.789, 9.9e5]
    words = secagg.encode(values, SCALE, 10)
    assert words.dtype == np.uint64
    assert [int(w) for w in words] == [ref_encode(v, SCALE) for v in values]
    for w, v in zip(secagg.decode(words, SCALE), values):
        assert w == ref_decode(ref_encode(v, SCALE), SCALE)
        assert abs(w - v) <= 2.0 ** -(SCALE + 1)


def test_encode_refuses_values_whose_sum_could_wrap_and_non_finite_values():
    limit = 2.0**63 / 2**SCALE / 100  # 100 parties: |x| must stay below this
    secagg.encode([limit * 0.999], SCALE, 100)
    with pytest.raises(ValueError, match=r"x\[1\].*wrap around"):
        secagg.encode([0.0, -limit], SCALE, 100)
    with pytest.raises(ValueError, match=r"x\[0\] is not finite"):
        secagg.encode([float("nan")], SCALE, 2)
    with pytest.raises(ValueError, match="scale_bits"):
        secagg.encode([1.0], 63, 2)


# --- the primitives against published vectors --------------------------------

def test_prg_is_chacha20_keystream_read_little_endian():
    # RFC 8439, appendix A.1, test vector 1: zero key, zero nonce, block counter 0.
    stream = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7")
    want = [int.from_bytes(stream[k:k + 8], "little") for k in range(0, 32, 8)]
    assert [int(w) for w in secagg.expand(bytes(32), 4)] == want


def test_agree_is_hkdf_sha256_of_x25519_and_symmetric():
    # RFC 7748, section 6.1.
    alice_sk = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_sk = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    bob_pk = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    # HKDF (RFC 5869) with no salt: PRK = HMAC(0^32, IKM), OKM = HMAC(PRK, info || 0x01).
    prk = hmac.new(bytes(32), shared, hashlib.sha256).digest()
    want = hmac.new(prk, b"mask" + SESSION + b"\x01", hashlib.sha256).digest()
    assert secagg.agree(alice_sk, bob_pk, secagg.MASK, SESSION) == want
    assert secagg.agree(bob_sk, secagg.public_of(alice_sk), secagg.MASK, SESSION) == want
    assert secagg.agree(alice_sk, bob_pk, secagg.SHARE, SESSION) != want


def test_another_session_gives_the_same_keys_other_masks():
    a_sk, a_pk = secagg.new_keypair()
    b_sk, b_pk = secagg.new_keypair()
    seed_1 = secagg.agree(a_sk, b_pk, secagg.MASK, b"run 3 round 7")
    seed_2 = secagg.agree(a_sk, b_pk, secagg.MASK, b"run 3 round 8")
    assert seed_1 == secagg.agree(b_sk, a_pk, secagg.MASK, b"run 3 round 7")
    assert seed_1 != seed_2
    assert not np.array_equal(secagg.expand(seed_1, 8), secagg.expand(seed_2, 8))


def test_malformed_public_keys_are_named():
    sk, _ = secagg.new_keypair()
    with pytest.raises(ValueError, match="s_pk of client 4: not a raw 32-byte"):
        secagg.agree(sk, bytes(31), secagg.MASK, SESSION, "s_pk of client 4")
    with pytest.raises(ValueError, match="c_pk of client 2: a low-order point"):
        secagg.agree(sk, bytes(32), secagg.SHARE, SESSION, "c_pk of client 2")
    client = secagg.SecAggClient(1, SESSION, 2)
    peers = {1: client.advertise(), 2: {"c_pk": bytes(32), "s_pk": secagg.new_keypair()[1]}}
    with pytest.raises(ValueError, match="c_pk of client 2"):
        client.share_keys(peers)
    peers[2] = {"c_pk": secagg.new_keypair()[1], "s_pk": b"short"}
    with pytest.raises(ValueError, match=r"peers\[2\].s_pk: must be 32 bytes"):
        client.share_keys(peers)
    peers[2] = {"c_pk": peers[1]["s_pk"], "s_pk": secagg.new_keypair()[1]}
    with pytest.raises(ValueError, match="c_pk of client 2 is also the s_pk of client 1"):
        client.share_keys(peers)


def test_shamir_any_t_shares_rebuild_a_32_byte_secret():
    secret = bytes(range(32))
    shares = secagg.split_secret(secret, 3, [5, 9, 2, 7])
    assert sorted(shares) == [2, 5, 7, 9]
    for holders in ([5, 9, 2], [2, 7, 9], [5, 9, 2, 7]):
        assert secagg.combine_secret({h: shares[h] for h in holders}, 3) == secret
    with pytest.raises(ValueError, match="only 2 of 3 shares"):
        secagg.combine_secret({5: shares[5], 9: shares[9]}, 3)
    assert secagg.combine_secret({5: shares[5], 9: shares[9]}, 2) != secret  # t−1 points: another polynomial


def test_sealed_shares_are_bound_to_key_and_aad():
    key = bytes(range(32))
    blob = secagg.seal(key, b"two shares", b"1>2")
    assert secagg.open_sealed(key, blob, b"1>2") == b"two shares"
    for bad_blob, aad in ((blob, b"2>1"), (blob[:-1] + bytes([blob[-1] ^ 1]), b"1>2"), (blob[:5], b"1>2")):
        with pytest.raises(ValueError, match="failed authentication"):
            secagg.open_sealed(key, bad_blob, aad)


# --- the whole protocol ----------------------------------------------------------

@pytest.mark.parametrize("k, t", [(2, 2), (3, 2), (10, 6)])
def test_unmasked_sum_is_the_plain_sum(k, t):
    xs = random_inputs(k, 4, seed=k)
    fed = Federation(xs, t)
    u3 = fed.u2
    total, trace = fed.total(u3, fed.unmask(u3))
    assert_close(total, plain_sum(list(xs.values())), k)
    assert trace[-1].startswith("= Σ x_i = ")


def test_a_masked_vector_alone_looks_uniform_and_says_nothing_of_its_input():
    d = 4000
    xs = random_inputs(3, d, seed=7)
    fed = Federation(xs, 2)
    for i, y in fed.masked.items():
        words = [int(w) for w in y]
        top = sum(w >> 63 for w in words) / d
        assert abs(top - 0.5) < 0.05  # the top bit of uniform words is a fair coin
        far = sum(abs(ref_decode(w, SCALE) - x) > 1e3 for w, x in zip(words, xs[i]))
        assert far > 0.99 * d


def test_a_client_lost_after_sharing_keys_has_its_masks_removed_and_input_left_out():
    xs = random_inputs(5, 3, seed=11)
    fed = Federation(xs, 3)
    u3 = [1, 2, 4, 5]  # client 3's y never reaches the server
    replies = fed.unmask(u3)
    assert all(list(r["s_sk"]) == [3] and list(r["b"]) == u3 for r in replies.values())
    total, trace = fed.total(u3, replies)
    assert_close(total, plain_sum([xs[i] for i in u3]), 5)
    assert any("dropped client 3" in line for line in trace)


def test_a_client_lost_before_sharing_keys_is_not_in_any_mask():
    xs = random_inputs(5, 3, seed=12)
    fed = Federation(xs, 3, before=(2,))
    assert fed.u2 == [1, 3, 4, 5]
    total, _ = fed.total(fed.u2, fed.unmask(fed.u2))
    assert_close(total, plain_sum([xs[i] for i in fed.u2]), 5)


def test_both_kinds_of_dropout_and_a_silent_survivor_together():
    xs = random_inputs(10, 2, seed=13)
    fed = Federation(xs, 5, before=(4, 9))
    u3 = [1, 2, 3, 6, 7, 10]  # 5 and 8 lost after sharing
    total, _ = fed.total(u3, fed.unmask(u3, silent=(2,)))  # 2 sent y but not its shares: 5 replies still ≥ t
    assert_close(total, plain_sum([xs[i] for i in u3]), 10)


def test_the_trace_writes_the_weighted_sum_and_n():
    thetas = {1: ([1.2, 0.4], 2), 2: ([0.8, 0.6], 6)}
    xs = {i: [n * v for v in theta] + [n] for i, (theta, n) in thetas.items()}
    fed = Federation(xs, 2)
    total, trace = fed.total([1, 2], fed.unmask([1, 2]))
    want = plain_sum([[n * v for v in theta] + [n] for theta, n in thetas.values()])  # [7.2, 4.4, 8]
    assert_close(total, want, 2)
    assert total[-1] == 8 and abs(total[0] / total[-1] - 0.9) < 1e-6
    assert trace[-1].endswith("[" + ", ".join(fmt(v) for v in want) + "]")
    assert trace[1].startswith(f"y_1 = [{int(fed.masked[1][0])}, ")


def test_protocol_over_json_with_the_wire_parsers():
    xs = random_inputs(3, 3, seed=14)
    clients = {i: secagg.SecAggClient(i, SESSION, 2) for i in xs}

    def wire(value):  # what the HTTP layer will do: JSON text and back
        return json.loads(json.dumps(secagg.to_wire(value)))

    public = {i: secagg.keys_from_wire(wire(c.advertise()), f"advertise[{i}]") for i, c in clients.items()}
    peers = secagg.indexed_from_wire(wire(public), "peers", secagg.keys_from_wire)
    sealed = {i: secagg.indexed_from_wire(wire(c.share_keys(peers)), "shares", secagg.bytes_from_wire)
              for i, c in clients.items()}
    u2 = secagg.indices_from_wire(wire([1, 2, 3]), "survivors_u2")
    masked = {}
    for i, c in clients.items():
        inbox = secagg.indexed_from_wire(wire({j: sealed[j][i] for j in u2 if j != i}), "received",
                                         secagg.bytes_from_wire)
        masked[i] = secagg.vector_from_wire(wire(c.masked_input(xs[i], inbox, u2)), "masked", 3)
    replies = {i: secagg.reveal_from_wire(wire(c.unmask(u2, [])), "unmask") for i, c in clients.items()}
    b, s_sk = secagg.collect_shares(replies)
    total, _ = secagg.unmask_sum(masked, b, s_sk, public, survivors_u2=u2, session=SESSION, threshold=2, length=3)
    assert_close(total, plain_sum(list(xs.values())), 3)


# --- refusals ---------------------------------------------------------------------

def test_fewer_than_t_survivors_the_server_fails_and_clients_refuse():
    fed = Federation(random_inputs(4, 2, seed=21), 3)
    u3 = [1, 2]
    for i in u3:
        with pytest.raises(ValueError, match="only 2 survivors, fewer than t=3"):
            fed.clients[i].unmask(u3, [3, 4])
    with pytest.raises(secagg.SecAggError, match="only 2 of t=3 clients"):
        fed.total(u3, {})


def test_too_few_shares_of_a_secret_is_a_secagg_error():
    fed = Federation(random_inputs(4, 2, seed=22), 3)
    replies = fed.unmask([1, 2, 3, 4], silent=(2, 3))
    with pytest.raises(secagg.SecAggError, match=r"b_1: only 2 of t=3 shares"):
        fed.total([1, 2, 3, 4], replies)


def test_a_client_never_reveals_both_shares_of_one_client():
    fed = Federation(random_inputs(3, 2, seed=23), 2)
    client = fed.clients[1]
    with pytest.raises(ValueError, match=r"both b and s_sk of client\(s\) \[3\]"):
        client.unmask([1, 2, 3], [3])
    client.unmask([1, 2, 3], [])
    with pytest.raises(ValueError, match=r"both b and s_sk of client\(s\) \[3\]"):
        client.unmask([1, 2], [3])  # a second request cannot get the other half


def test_a_client_refuses_to_talk_about_clients_it_has_no_shares_from():
    fed = Federation(random_inputs(4, 2, seed=24), 2, before=(4,))
    with pytest.raises(ValueError, match=r"client\(s\) \[4\] never sent this client shares"):
        fed.clients[1].unmask([1, 2, 3], [4])


def test_one_masked_input_per_session_a_retry_gets_the_same():
    fed = Federation(random_inputs(3, 2, seed=29), 2)
    again = fed.clients[1].masked_input(fed.xs[1], fed.inbox(1), fed.u2)
    assert np.array_equal(again, fed.masked[1])
    with pytest.raises(ValueError, match="already sent"):
        fed.clients[1].masked_input([v + 1 for v in fed.xs[1]], fed.inbox(1), fed.u2)


def test_shares_that_do_not_open_name_their_sender_before_anything_is_masked_and_c_sk_proves_it():
    """What client 2 sealed to client 1, with a bit flipped on the way:
    client 1 names the sender (AES-GCM under a key only the pair holds, the
    pair in the AAD) before it masks anything, and then masks nothing in
    this session. Its c_sk, which it shows only then, matches its c_pk, and
    with it the server finds the flipped pair does not open (the accusation
    holds) while the intact ones do (an accusation of them would be a lie);
    a key that is not behind c_pk_1 proves nothing. What client 3 sealed to
    client 2, passed on to client 1 as if from 3, names 3 (the pair is in
    the AAD) and does not open for the server either. (Before, the server
    believed any accusation unchecked.)"""
    xs = random_inputs(3, 2, seed=25)

    def session() -> tuple[dict[int, secagg.SecAggClient], dict[int, dict[str, bytes]], dict[int, dict[int, bytes]]]:
        clients = {i: secagg.SecAggClient(i, SESSION, 2) for i in xs}
        public = {i: c.advertise() for i, c in clients.items()}
        return clients, public, {i: c.share_keys(public) for i, c in clients.items()}
    clients, public, sealed = session()
    inbox = {i: {j: sealed[j][i] for j in xs if j != i} for i in xs}
    flipped = inbox[1][2][:-1] + bytes([inbox[1][2][-1] ^ 1])
    with pytest.raises(secagg.BadShares) as refused:
        clients[1].masked_input(xs[1], {**inbox[1], 2: flipped}, [1, 2, 3])
    assert list(refused.value.senders) == [2] and "failed authentication" in refused.value.senders[2]
    assert "client 2: the sealed shares failed authentication" in str(refused.value)
    with pytest.raises(ValueError, match="masks nothing"):
        clients[1].mask(xs[1], [1, 2, 3])
    c_sk = clients[1].reveal_c_sk()
    assert secagg.public_of(c_sk) == public[1]["c_pk"]
    assert secagg.accusation_holds(c_sk, public, 1, 2, flipped, SESSION)
    assert not secagg.accusation_holds(c_sk, public, 1, 2, inbox[1][2], SESSION)
    assert not secagg.accusation_holds(c_sk, public, 1, 3, inbox[1][3], SESSION)
    with pytest.raises(ValueError, match="not the private key of the c_pk client 1 advertised"):
        secagg.accusation_holds(secagg.new_keypair()[0], public, 1, 2, flipped, SESSION)
    assert clients[2].receive(inbox[2], [1, 2, 3]) == 2
    with pytest.raises(ValueError, match="reveal_c_sk: refused"):  # every pair opened: no key to show
        clients[2].reveal_c_sk()

    clients, public, sealed = session()
    with pytest.raises(secagg.BadShares) as redirected:
        clients[1].receive({2: sealed[2][1], 3: sealed[3][2]}, [1, 2, 3])
    assert list(redirected.value.senders) == [3]
    assert secagg.accusation_holds(clients[1].reveal_c_sk(), public, 1, 3, sealed[3][2], SESSION)


class StopAt:
    """A ``stop`` that says so from its n-th question on, and counts them."""

    def __init__(self, n: int) -> None:
        self.n, self.asked = n, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


def test_each_step_stops_between_units_of_work_when_told_and_keeps_nothing():
    """``stop`` is asked before each step begins and between its units of
    work: each peer's key agreement, each 16-byte Shamir split (s_sk_i is
    two, b_i one), each seal, each pair mask. A stop that says so at the 2nd
    split ends share_keys with one split done (Shamir.split called once, no
    share sealed); at the 2nd pair mask, masked_input with one mask added;
    before the unmasking, nothing revealed. Asked again without it, each
    step runs from scratch, and the round unmasks to the plain sum."""
    xs = random_inputs(4, 2, seed=31)
    clients = {i: secagg.SecAggClient(i, SESSION, 3) for i in xs}
    public = {i: c.advertise() for i, c in clients.items()}
    with mock.patch.object(secagg_crypto.Shamir, "split", wraps=secagg_crypto.Shamir.split) as split, \
            mock.patch.object(secagg, "seal", wraps=secagg.seal) as sealing:
        with pytest.raises(secagg.Stopped, match=r"^stopped after 1 of 3 Shamir splits$"):
            clients[1].share_keys(public, stop=StopAt(1 + 3 + 2))  # (begun, 3 agreements, 2nd split)
        assert split.call_count == 1 and sealing.call_count == 0
    with pytest.raises(secagg.Stopped, match=r"^stopped before it began$"):
        clients[2].share_keys(public, stop=StopAt(1))
    sealed = {i: c.share_keys(public) for i, c in clients.items()}
    inbox = {i: {j: sealed[j][i] for j in xs if j != i} for i in xs}
    with mock.patch.object(secagg, "expand", wraps=secagg.expand) as masks:
        with pytest.raises(secagg.Stopped, match=r"^stopped after 1 of 3 pair masks$"):
            clients[1].masked_input(xs[1], inbox[1], [1, 2, 3, 4], stop=StopAt(1 + 1 + 2))  # (received, begun)
        assert masks.call_count == 1
    masked = {i: c.masked_input(xs[i], inbox[i], [1, 2, 3, 4]) for i, c in clients.items()}
    with pytest.raises(secagg.Stopped, match=r"^stopped before it began$"):
        clients[1].unmask([1, 2, 3], [4], stop=StopAt(1))
    replies = {i: clients[i].unmask([1, 2, 3], [4]) for i in (1, 2, 3)}  # (4's y lost: its s_sk revealed)
    b, s_sk = secagg.collect_shares(replies)
    total, _ = secagg.unmask_sum({i: masked[i] for i in (1, 2, 3)}, b, s_sk, public, survivors_u2=[1, 2, 3, 4],
                                 session=SESSION, threshold=3, length=2)
    assert_close(total, plain_sum([xs[i] for i in (1, 2, 3)]), 4)


def test_a_wrong_share_is_left_out_and_named_when_spare_shares_exist():
    xs = random_inputs(5, 2, seed=26)
    fed = Federation(xs, 3)
    u3 = [1, 2, 3, 4]
    replies = fed.unmask(u3)
    share = replies[2]["b"][4]
    replies[2]["b"][4] = share[:-1] + bytes([share[-1] ^ 0xFF])
    share = replies[3]["s_sk"][5]
    replies[3]["s_sk"][5] = share[:6] + bytes([share[6] ^ 1]) + share[7:]
    total, trace = fed.total(u3, replies)
    assert_close(total, plain_sum([xs[i] for i in u3]), 5)
    assert any(line.startswith("b_4: the share(s) from client(s) [2] are wrong") for line in trace)
    assert any(line.startswith("s_sk_5: the share(s) from client(s) [3] are wrong") for line in trace)


def test_a_wrong_share_among_exactly_t_is_a_secagg_error_naming_the_holders():
    fed = Federation(random_inputs(3, 2, seed=27), 3)
    replies = fed.unmask([1, 2, 3])
    share = replies[3]["b"][1]
    replies[3]["b"][1] = share[:-1] + bytes([share[-1] ^ 1])  # a changed byte (setting it to 0: unchanged 1 in 256)
    with pytest.raises(secagg.SecAggError, match=r"b_1: the shares from clients \[1, 2, 3\]") as caught:
        fed.total([1, 2, 3], replies)
    assert caught.value.clients == [1, 2, 3]


def test_malformed_masked_vectors_are_named():
    fed = Federation(random_inputs(3, 2, seed=28), 2)
    replies = fed.unmask([1, 2, 3])
    b, s_sk = secagg.collect_shares(replies)
    kwargs = dict(survivors_u2=fed.u2, session=SESSION, threshold=2, length=2)
    for bad, message in ((fed.masked[2][:1], r"client 2: has shape \(1,\), expected 2 words"),
                         (np.array([0.5, 1.5]), "client 2: must be words in 0..2"),
                         (np.array([-1, 3]), "client 2: must be words in 0..2")):
        with pytest.raises(ValueError, match=message):
            secagg.unmask_sum({**fed.masked, 2: bad}, b, s_sk, fed.public, **kwargs)


# --- SecAgg+: the communication graph --------------------------------------------------

def ring_neighbours(order: list[int], k: int) -> dict[int, set[int]]:
    """H(k, n) for even k as its definition reads: i and j are neighbours when they
    sit at most k/2 places apart on the ring (either way round)."""
    n, place = len(order), {c: p for p, c in enumerate(order)}
    return {i: {j for j in order if j != i and min(abs(place[i] - place[j]), n - abs(place[i] - place[j])) <= k // 2}
            for i in order}


def connected(members: set[int], graph: dict[int, set[int]]) -> bool:
    if not members:
        return True
    seen, todo = set(), [min(members)]
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend((graph[i] & members) - seen)
    return seen == members


@pytest.mark.parametrize("n, k", [(5, 2), (12, 4), (30, 6), (100, 14)])
def test_harary_graph_with_even_k_joins_each_client_to_the_k_nearest_on_the_ring(n, k):
    order = random.Random(n).sample(range(1, n + 1), n)
    assert secagg_graph.harary_graph(order, k) == ring_neighbours(order, k)


@pytest.mark.parametrize("n, k", [(7, 2), (8, 3), (9, 3), (10, 4), (11, 5)])
def test_harary_graph_is_k_regular_symmetric_and_k_connected(n, k):
    """Every client has k neighbours (one has k + 1 when k and n are odd), and
    removing any k − 1 clients leaves the others connected: tried for every set."""
    order = random.Random(k).sample(range(1, n + 1), n)
    graph = secagg_graph.harary_graph(order, k)
    degrees = sorted(len(js) for js in graph.values())
    assert degrees == ([k] * (n - 1) + [k + 1] if k % 2 and n % 2 else [k] * n)
    assert all(i not in js and all(i in graph[j] for j in js) for i, js in graph.items())
    for removed in itertools.combinations(order, k - 1):
        assert connected(set(order) - set(removed), graph), removed


@pytest.mark.parametrize("n", [2, 3, 8, 9])
def test_k_of_n_minus_1_or_more_is_the_complete_graph(n):
    order = list(range(n, 0, -1))
    for k in (n - 1, n + 5):
        assert secagg_graph.harary_graph(order, max(k, 1)) == {i: set(order) - {i} for i in order}


def test_the_defaults_are_the_complete_graph_up_to_20_clients_then_2_log2_n_and_a_majority():
    assert [secagg_graph.default_neighbors(n) for n in (2, 3, 10, 20)] == [1, 2, 9, 19]
    assert [secagg_graph.default_neighbors(n) for n in (21, 100, 1000, 10_000)] == [
        2 * math.ceil(math.log2(n)) for n in (21, 100, 1000, 10_000)] == [10, 14, 20, 28]
    # t = a majority of the k + 1 clients of a neighbourhood; the complete graph's t = n//2 + 1 as before
    assert [secagg_graph.default_threshold(k) for k in (1, 2, 9, 14, 99)] == [2, 2, 6, 8, 51]


def sparse(n: int, k: int, seed: int) -> dict[int, set[int]]:
    return secagg_graph.harary_graph(random.Random(seed).sample(range(1, n + 1), n), k)


def test_over_a_graph_each_client_shares_with_its_neighbours_and_the_sum_is_the_plain_sum():
    xs = random_inputs(12, 3, seed=31)
    graph = sparse(12, 4, seed=31)
    fed = Federation(xs, 3, graph=graph)
    for i, sealed in fed.sealed.items():
        assert set(sealed) == graph[i]  # shares for its 4 neighbours only
    total, trace = fed.total(fed.u2, fed.unmask(fed.u2))
    assert_close(total, plain_sum(list(xs.values())), 12)
    assert "neighbours only" in trace[0]


def test_over_a_graph_dropouts_before_and_after_sharing_and_after_the_masked_input():
    """2 lost before sharing keys, 5 and 9 after (their pair masks come off with
    their rebuilt s_sk, only for their neighbours), 11 after its y arrived but
    silent at the unmasking (in the sum): the survivors' plain sum."""
    xs = random_inputs(14, 2, seed=32)
    graph = sparse(14, 6, seed=32)
    fed = Federation(xs, 3, before=(2,), graph=graph)
    u3 = [i for i in fed.u2 if i not in (5, 9)]
    replies = fed.unmask(u3, silent=(11,))
    for i, reply in replies.items():
        assert set(reply["s_sk"]) == {5, 9} & graph[i]  # asked only about its own neighbours
        assert set(reply["b"]) == set(u3) & (graph[i] | {i})
    assert secagg_graph.unmaskable(graph, fed.u2, u3, 3) == []
    total, trace = fed.total(u3, replies)
    assert_close(total, plain_sum([xs[i] for i in u3]), 14)
    for j in (5, 9):
        pairs = sorted(graph[j] & set(u3))
        assert any(line.startswith(f"− the masks of dropped client {j} ") and f"N({j}) = {pairs}" in line
                   for line in trace)


def test_a_neighbourhood_left_with_fewer_than_t_is_named_and_nothing_is_rebuilt(monkeypatch):
    """Client 1 survives but only one of its 4 neighbours does: b_1 cannot get t = 3
    shares. unmaskable says so (the server asks for no share), and unmask_sum refuses
    before it rebuilds any secret, though 9 of 12 clients are left."""
    xs = random_inputs(12, 2, seed=33)
    graph = sparse(12, 4, seed=33)
    lost = sorted(graph[1])[:3]
    fed = Federation(xs, 3, graph=graph)
    u3 = [i for i in fed.u2 if i not in lost]
    problems = secagg_graph.unmaskable(graph, fed.u2, u3, 3)
    assert any(p.startswith("b_1: only 2 of the 5 clients of N[1] are left") for p in problems), problems
    replies = {i: fed.clients[i].unmask(fed.told(i, u3), fed.told(i, lost)) for i in u3 if i != 1}
    rebuilt = []
    monkeypatch.setattr(secagg, "combine_secret", lambda *a: rebuilt.append(a))
    with pytest.raises(secagg.SecAggError, match=r"b_1: only 1 of t=3 shares .*no secret was rebuilt"):
        fed.total(u3, replies)
    assert rebuilt == []
    with pytest.raises(ValueError, match="only 2 survivors, fewer than t=3"):
        fed.clients[1].unmask(fed.told(1, u3), fed.told(1, lost))  # the client itself refuses too


def test_a_dropped_client_with_fewer_than_t_neighbours_left_is_named_and_nothing_is_rebuilt(monkeypatch):
    """A ring of 10 in the order 1..10, k = 4, t = 3; clients 1, 2 and 3 drop after
    sharing their keys. Every survivor keeps t of its neighbourhood and U3 = 4..10 is
    one piece, but s_sk_1 is held by 9, 10, 2 and 3 alone, and only 9 and 10 are left
    (s_sk_2 and s_sk_3 likewise): unmaskable names the three, and unmask_sum refuses
    before it rebuilds any secret."""
    xs = random_inputs(10, 2, seed=35)
    graph = secagg_graph.harary_graph(list(range(1, 11)), 4)
    fed = Federation(xs, 3, graph=graph)
    u3 = list(range(4, 11))
    problems = secagg_graph.unmaskable(graph, fed.u2, u3, 3)
    assert [p.split(":")[0] for p in problems] == ["s_sk_1", "s_sk_2", "s_sk_3"], problems
    assert problems[0] == "s_sk_1: client 1 dropped, and only 2 of its 4 neighbours are left, [9, 10]"
    replies = fed.unmask(u3)
    rebuilt = []
    monkeypatch.setattr(secagg, "combine_secret", lambda *a: rebuilt.append(a))
    with pytest.raises(secagg.SecAggError,
                       match=r"s_sk_1: only 2 of t=3 shares \(from \[9, 10\]\).*no secret was rebuilt"):
        fed.total(u3, replies)
    assert rebuilt == []


def test_survivors_cut_in_two_by_the_dropouts_are_refused():
    """A ring (k = 2) of 8 that loses two opposite clients: each part could be
    unmasked on its own, which would tell the server each part's sum."""
    order = [1, 2, 3, 4, 5, 6, 7, 8]
    graph = secagg_graph.harary_graph(order, 2)
    u2 = order
    u3 = [1, 2, 3, 5, 6, 7]  # 4 and 8 dropped: {1, 2, 3} and {5, 6, 7} share no edge
    assert secagg_graph.unmaskable(graph, u2, u3, 2) == [
        "U3 falls apart in the graph: clients [5, 6, 7] have no path to client 1 through other survivors (the server "
        "would learn each part's sum)"]
    assert secagg_graph.unmaskable(graph, u2, [1, 2, 3, 4, 5, 6, 7], 2) == []


def test_unmask_sum_refuses_a_graph_that_is_not_one_over_u1():
    fed = Federation(random_inputs(4, 2, seed=34), 2)
    replies = fed.unmask(fed.u2)
    b, s_sk = secagg.collect_shares(replies)
    kwargs = dict(survivors_u2=fed.u2, session=SESSION, threshold=2, length=2)
    for graph, message in (({1: {2}, 2: {1}}, "must list every client of U1"),
                           ({1: {2}, 2: {3}, 3: {4}, 4: {1}}, r"neighbors\[1\]: must be other clients of U1, each")):
        with pytest.raises(ValueError, match=message):
            secagg.unmask_sum(fed.masked, b, s_sk, fed.public, neighbors=graph, **kwargs)


# --- a property: any inputs, K, t, k and dropouts ------------------------------------------

DEATHS = ("dies before advertise", "dies after advertise", "dies after share", "dies after masked")


def first_refusal(graph: dict[int, set[int]], u1: set[int], u2: set[int], u3: set[int], answered: set[int],
                  t: int) -> str | None:
    """The step after which the protocol cannot go on (None: it unmasks), from
    Bonawitz et al.'s and Bell et al.'s conditions written out here: t clients
    at every step; every secret that will be needed keeps t holders in its
    neighbourhood (b_i for i ∈ U3 in N[i], s_sk_j for a dropped j with a
    neighbour in U3 in N(j)), counted in U2 once keys are shared, in U3 once
    the inputs are in, among those that answer at the unmasking; and the
    survivors stay one piece of the graph, else each part's sum would show.
    ``graph`` is {i: N(i)} over U1; U1 ⊇ U2 ⊇ U3 ⊇ answered."""
    if len(u1) < t:
        return "advertise"

    def short(alive: set[int], inputs: set[int], lost: set[int]) -> bool:
        return (any(len((graph[i] | {i}) & alive) < t for i in inputs)
                or any(graph[j] & inputs and len(graph[j] & alive) < t for j in lost))
    if len(u2) < t or short(u2, u2, set()) or not connected(u2, graph):
        return "share"
    if len(u3) < t or short(u3, u3, u2 - u3) or not connected(u3, graph):
        return "masked"
    if len(answered) < t or short(answered, u3, u2 - u3):
        return "unmask"
    return None


@pytest.mark.parametrize("sparse", [False, True], ids=["complete graph", "SecAgg+"])
@settings(max_examples=40, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
@given(data=st.data())
def test_the_secure_sum_is_the_fixed_point_sum_whenever_it_can_be_unmasked_and_refused_otherwise(sparse, data):
    """Random inputs (d entries in ±10^6), K clients, t, the graph (complete,
    or SecAgg+'s with k of 1..K − 3 neighbours) and deaths (before
    advertising, after it, after sharing keys, after the masked input: silent
    at the unmasking), drawn by Hypothesis; this test is the server. When
    ``first_refusal`` says the protocol can unmask, the sum is exactly
    Σ_{i∈U3} round(x_i·2^24) mod 2^64 read as a signed number (integers
    here), so within K·2^-24 of the plain sum. When it cannot: the clients
    refuse to share among fewer than t, or ``unmaskable`` names the problem
    before any masked input or share is asked for, or ``unmask_sum`` refuses
    before it rebuilds any secret. Same examples every run (derandomize), so
    a failure here fails again."""
    if sparse:
        n = data.draw(st.integers(5, 11), label="K")
        k = data.draw(st.integers(1, n - 3), label="neighbors")
    else:
        n, k = data.draw(st.integers(2, 10), label="K"), None
    t = data.draw(st.integers(2, n if k is None else k + 1), label="threshold")
    d = data.draw(st.integers(1, 4), label="d")
    value = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    xs = {i: data.draw(st.lists(value, min_size=d, max_size=d), label=f"x_{i}") for i in range(1, n + 1)}
    # Each client stays or dies at one of the four points: as likely as not in the complete
    # graph. In a sparse one, where a few deaths in one neighbourhood stop the round, 2 in 5,
    # most often after sharing keys: its pair masks then come off with s_sk_j, rebuilt from the
    # shares its neighbours alone hold.
    pool = ("stays",) * 12 + DEATHS + (DEATHS[2],) * 4 if sparse else ("stays",) * 4 + DEATHS
    fates = data.draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n), label="fates")
    deaths = {i: fate for i, fate in enumerate(fates, start=1) if fate != "stays"}

    u1 = {i for i in xs if deaths.get(i) != DEATHS[0]}
    u2 = u1 - {i for i in xs if deaths.get(i) == DEATHS[1]}
    u3 = u2 - {i for i in xs if deaths.get(i) == DEATHS[2]}
    answered = u3 - {i for i in xs if deaths.get(i) == DEATHS[3]}
    # The server draws the graph over U1, in an order of its own.
    order = data.draw(st.permutations(sorted(u1)), label="order")
    graph = ({i: u1 - {i} for i in u1} if k is None or not u1
             else secagg_graph.harary_graph(order, min(k, max(len(u1) - 1, 1))))
    refused = first_refusal(graph, u1, u2, u3, answered, t)

    clients = {i: secagg.SecAggClient(i, SESSION, t) for i in u1}
    public = {i: c.advertise() for i, c in clients.items()}

    def hood(i: int) -> set[int]:
        return graph[i] | {i}

    def told(i: int, among: set[int]) -> list[int]:
        return sorted(hood(i) & among)
    if refused == "advertise":  # fewer than t in the round: no client shares its secrets among so few
        for i in sorted(u1):
            with pytest.raises(ValueError, match="fewer than the threshold"):
                clients[i].share_keys({j: public[j] for j in hood(i)})
        return
    sealed = {i: clients[i].share_keys({j: public[j] for j in hood(i)}) for i in sorted(u2)}

    def inbox(i: int) -> dict[int, bytes]:
        return {j: sealed[j][i] for j in told(i, u2) if j != i}
    if refused == "share":  # the server stops here: no masked input, no share asked for
        assert len(u2) < t or secagg_graph.unmaskable(graph, u2, u2, t) != []
        for i in sorted(u2) if len(u2) < t else ():  # (and a client asked anyway refuses to mask)
            with pytest.raises(ValueError, match="fewer than the threshold"):
                clients[i].masked_input(xs[i], inbox(i), told(i, u2), len(u1))
        return
    assert secagg_graph.unmaskable(graph, u2, u2, t) == []
    masked = {i: clients[i].masked_input(xs[i], inbox(i), told(i, u2), len(u1)) for i in sorted(u2)}
    if refused == "masked":  # no share asked for
        assert len(u3) < t or secagg_graph.unmaskable(graph, u2, u3, t) != []
        for i in sorted(u3) if len(u3) < t else ():  # (and a client asked anyway refuses to reveal)
            with pytest.raises(ValueError, match="fewer than t"):
                clients[i].unmask(told(i, u3), told(i, u2 - u3))
        return
    assert secagg_graph.unmaskable(graph, u2, u3, t) == []
    replies = {i: clients[i].unmask(told(i, u3), told(i, u2 - u3)) for i in sorted(answered)}
    b, s_sk = secagg.collect_shares(replies)

    def unmask() -> np.ndarray:
        return secagg.unmask_sum({i: masked[i] for i in u3}, b, s_sk, public, survivors_u2=u2, session=SESSION,
                                 threshold=t, length=d, neighbors=None if k is None else graph)[0]
    if refused == "unmask":  # the answers are in, too few for some secret: none is rebuilt
        with mock.patch.object(secagg, "combine_secret", wraps=secagg.combine_secret) as rebuilt:
            with pytest.raises(secagg.SecAggError, match="no secret was rebuilt"):
                unmask()
        assert rebuilt.call_count == 0
        return
    total = unmask()
    words = [sum(ref_encode(xs[i][e], SCALE) for i in u3) % 2**64 for e in range(d)]
    assert list(total) == [ref_decode(w, SCALE) for w in words]
    assert_close(total, plain_sum([xs[i] for i in sorted(u3)]), n)


# --- the wire format ----------------------------------------------------------------

def test_wire_round_trips_and_rejects_malformed_fields_by_name():
    key = secagg.new_keypair()[1]
    assert secagg.bytes_from_wire(secagg.to_wire(key), "c_pk", 32) == key
    words = np.array([0, 1, 2**64 - 1], dtype=np.uint64)
    assert [int(w) for w in secagg.vector_from_wire(secagg.to_wire(words), "y", 3)] == [0, 1, 2**64 - 1]
    assert secagg.to_wire({3: [b"\x00"]}) == {"3": ["AA=="]}
    bad = [
        (lambda: secagg.bytes_from_wire("not base64!", "c_pk", 32), "c_pk: is not base64"),
        (lambda: secagg.bytes_from_wire(secagg.to_wire(key[:31]), "c_pk", 32), "c_pk: must be 32 bytes"),
        (lambda: secagg.bytes_from_wire("QR==", "share"), "share: is not canonical"),
        (lambda: secagg.bytes_from_wire(12, "share"), "share: must be base64"),
        (lambda: secagg.vector_from_wire(secagg.to_wire(words), "y", 2), "y: must be base64 text of 16 bytes"),
        (lambda: secagg.indices_from_wire([1, 2, 1], "survivors_u3"), "survivors_u3: client 1 is listed twice"),
        (lambda: secagg.indices_from_wire([1, True], "dropped"), "dropped: a client index"),
        (lambda: secagg.indexed_from_wire({"03": "AA=="}, "received", secagg.bytes_from_wire), "received: key '03'"),
        (lambda: secagg.indexed_from_wire({"3": "?"}, "received", secagg.bytes_from_wire), r"received\.3: is not"),
        (lambda: secagg.keys_from_wire({"c_pk": "AA==", "x": 1}, "peers.2"), "peers.2: must be an object with"),
        (lambda: secagg.reveal_from_wire({"b": {}}, "unmask"), "unmask: must be an object with exactly b and s_sk"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
