"""A population held as arrays (fedavg.population), in this process.

(a) The batched path (``Population.train``: each strategy's ``local_batch``)
equals the per-client path, each client's own ``/train`` on
``Population.client(k)`` (a LocalClient or Attacker on the same rows, given
the same JSON body), to 1e-12, for every strategy and a few settings; and the
per-client path equals tests/reference.py's plain-Python local GD for FedAvg.
(b) The data is the draw the module's docstring describes, regenerated here,
and each scenario has its property. (c) Bad inputs give one error naming the
field.

Tolerance: rtol = atol = 1e-12. The two paths do not share arithmetic (the
batch steps on X̃ᵀX̃ and X̃ᵀy, the client on its rows), so they agree to
rounding (about 1e-15 here), not bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

from fedavg.population import POPULATION_SCENARIOS, Population
from fedavg.scenarios import ATTACKS, LYING_N
from fedavg.strategies import STRATEGIES, BatchMemory, RunMemory
from fedavg.strict_json import ProtocolError, model_json
from fedavg.training import TrainConfig
from fedavg.wire import parse_train_request, train_config_json
from reference import local_gd, local_mse

TOL = {"rtol": 1e-12, "atol": 1e-12}
K, SAMPLES, SEED = 30, 8, 3
SETTINGS = {  # E = 1 and 10, two learning rates, FedProx's mu
    "E1": TrainConfig(lr=0.05, local_epochs=1),
    "E10": TrainConfig(lr=0.01, local_epochs=10),
    "E10-mu": TrainConfig(lr=0.02, local_epochs=10, mu=0.5),
}


@pytest.fixture(scope="module")
def skewed() -> Population:
    """Unequal n_k, from 1 row up: the batch's per-client sums must be cut right."""
    return Population.build("quantity-skew", K, seed=SEED, samples=SAMPLES)


def body_of(strategy: str, config: TrainConfig, theta: np.ndarray, round_no: int,
            control: np.ndarray | None = None) -> dict:
    """The /train body the server would send."""
    body = {"global_model": model_json(theta[:-1], theta[-1]), "round": round_no,
            "config": train_config_json(TrainConfig(**{**config.__dict__, "strategy": strategy, "run": "r1"}))}
    if control is not None:
        body["control"] = model_json(control[:-1], control[-1])
    return body


def assert_same(pop: Population, ids: np.ndarray, body: dict, clients: dict, memory) -> None:
    """The batch's reply, row by row, against each client's own /train reply."""
    d = pop.num_features
    task = parse_train_request(body, d)
    batch = pop.train(task, ids, memory)
    replies = [clients[int(k)].train(body) for k in ids]  # each client's own /train
    strategy = STRATEGIES[task.config.strategy]
    np.testing.assert_array_equal(batch.ids, ids)
    np.testing.assert_array_equal(batch.diverged, [status != 200 for _, status in replies])
    for j, (reply, status) in enumerate(replies):
        if status != 200:
            continue
        assert batch.n[j] == reply["data_size"]
        np.testing.assert_allclose(batch.loss_before[j], reply["metrics"]["loss_before"], **TOL)
        np.testing.assert_allclose(batch.loss_after[j], reply["metrics"]["loss_after"], **TOL)
        if "within_clip" in reply["metrics"]:
            assert batch.within_clip[j] == reply["metrics"]["within_clip"]
        local = batch.local.local(j)
        for sent in strategy.replies:
            theirs = sent.kind.parse(reply[sent.name], sent.name, d)
            ours = local.value(sent)
            if isinstance(theirs, dict):  # Exact's statistics
                for part in theirs:
                    np.testing.assert_allclose(ours[part], theirs[part], **TOL)
            else:
                np.testing.assert_allclose(ours, theirs, **TOL)


def clients_of(pop: Population) -> dict:
    return {k: pop.client(k) for k in range(pop.size)}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", [s for s in STRATEGIES if s != "scaffold"])
def test_batch_equals_each_client(skewed: Population, name: str, setting: str) -> None:
    """Every strategy but SCAFFOLD (below, over rounds): a shuffled sample of
    12 clients, from two global models (one far, one near the data's line)."""
    ids = np.random.default_rng(1).permutation(K)[:12]
    for theta in (np.array([0.0, 0.0]), np.array([1.9, 1.2])):
        assert_same(skewed, ids, body_of(name, SETTINGS[setting], theta, 1), clients_of(skewed), skewed.memory())


@pytest.mark.parametrize("setting", SETTINGS)
def test_scaffold_over_rounds(skewed: Population, setting: str) -> None:
    """SCAFFOLD over 6 rounds, each client keeping its own c_k on both paths
    (RunMemory per client; the batch's BatchMemory arrays): a different
    sample and server c every round, so c_k differ between clients and some
    skip rounds; rounds replayed (4 again, as after a server crash; then 3
    and 2 after later ones) start from the c_k they first started from, as
    RunMemory's four kept rounds give them; and rounds 3 and 4 after 8..11
    find none (RunMemory dropped what is older than its four)."""
    rng = np.random.default_rng(2)
    clients, memory = clients_of(skewed), skewed.memory()
    theta = np.zeros(2)
    for round_no in (1, 2, 3, 4, 4, 3, 4, 5, 6, 2, 7, 8, 9, 10, 11, 3, 4):
        ids = rng.permutation(K)[:15]
        control = rng.normal(0.0, 0.5, size=2)
        assert_same(skewed, ids, body_of("scaffold", SETTINGS[setting], theta, round_no, control), clients, memory)
        theta = theta + rng.normal(0.5, 0.2, size=2)


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fednova", "fedsgd"])
def test_minibatches_fall_back_to_each_client(skewed: Population, name: str) -> None:
    """batch_size set: the per-client loop on each client's rows and memory,
    so τ_k and SCAFFOLD's c_k follow each client's n_k."""
    config = TrainConfig(lr=0.02, local_epochs=3, batch_size=4, seed=7)
    clients, memory = clients_of(skewed), skewed.memory()
    control = np.array([0.3, -0.2]) if name == "scaffold" else None
    for round_no in (1, 2):
        assert_same(skewed, np.arange(K)[::-1], body_of(name, config, np.array([1.0, 0.5]), round_no, control),
                    clients, memory)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold", "fedadam"])
def test_dp_clipping(skewed: Population, name: str) -> None:
    """A DP run's clients send W_t + clip_S(W_k − W_t) and the bit
    ‖W_k − W_t‖ ≤ S; S is the median update's norm, so half are clipped."""
    control = np.array([0.1, 0.1]) if name == "scaffold" else None
    ids, theta = np.arange(K), np.array([1.5, 0.5])
    plain = TrainConfig(lr=0.01, local_epochs=10, mu=0.1)
    free = skewed.train(parse_train_request(body_of(name, plain, theta, 1, control), 1), ids, skewed.memory())
    bound = float(np.median(np.linalg.norm(free.local.theta - theta, axis=1)))
    body = body_of(name, TrainConfig(**{**plain.__dict__, "dp_clip": bound}), theta, 1, control)
    batch = skewed.train(parse_train_request(body, 1), ids, skewed.memory())
    assert 0 < batch.within_clip.sum() < K  # the setting does test both sides of the clip
    assert_same(skewed, ids, body, clients_of(skewed), skewed.memory())


@pytest.mark.parametrize("name", ["fedavg", "fedsgd", "fednova"])
def test_divergence_flagged_as_each_client_does(skewed: Population, name: str) -> None:
    """lr = 10: every client's model overflows, or its gradient is returned
    as computed (FedSGD does not step), exactly as each client's 422 or 200."""
    body = body_of(name, TrainConfig(lr=10.0, local_epochs=400), np.array([1.0, 1.0]), 1)
    assert_same(skewed, np.arange(K), body, clients_of(skewed), skewed.memory())
    batch = skewed.train(parse_train_request(body, 1), np.arange(K), skewed.memory())
    assert batch.diverged.all() == (name != "fedsgd")


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("name", ["fedavg", "fedsgd", "scaffold", "fednova", "exact"])
def test_byzantine_attackers_lie_as_each_client_does(attack: str, name: str) -> None:
    """byzantine's first f clients lie in the batch as their Attacker does in
    its own /train: the poisoned update (the local model, FedSGD's gradient),
    or lying_n's n_k = 10⁹; the other fields and the losses stay honest."""
    pop = Population.build("byzantine", 8, seed=SEED, samples=10, attackers=3, attack=attack)
    ids = np.array([5, 0, 7, 2, 1])  # attackers 0, 1, 2 among honest clients, out of order
    control = np.array([0.2, -0.1]) if name == "scaffold" else None
    body = body_of(name, SETTINGS["E10"], np.array([1.0, 0.5]), 1, control)
    assert_same(pop, ids, body, clients_of(pop), pop.memory())
    batch = pop.train(parse_train_request(body, 1), ids, pop.memory())
    honest = Population.build("iid", 8, seed=SEED, samples=10)
    truth = honest.train(parse_train_request(body, 1), ids, honest.memory())
    liars = ids < 3
    if attack == "lying_n":
        assert (batch.n[liars] == LYING_N).all() and (batch.n[~liars] == truth.n[~liars]).all()
        np.testing.assert_array_equal(batch.local.theta if name != "fedsgd" else batch.local.extra["gradient"],
                                      truth.local.theta if name != "fedsgd" else truth.local.extra["gradient"])
    elif name == "exact":  # no update to poison: the statistics go as computed
        np.testing.assert_array_equal(batch.local.extra["stats.xty"], truth.local.extra["stats.xty"])
    else:  # the update differs from the honest client's on the liars' rows only
        ours, theirs = ((batch.local.extra["gradient"], truth.local.extra["gradient"]) if name == "fedsgd"
                        else (batch.local.theta, truth.local.theta))
        assert not np.isclose(ours[liars], theirs[liars]).any()
        np.testing.assert_array_equal(ours[~liars], theirs[~liars])
    np.testing.assert_array_equal(batch.loss_after, truth.loss_after)


def test_each_client_equals_plain_python_local_gd(skewed: Population) -> None:
    """FedAvg's per-client path (and so the batch) against tests/reference.py:
    a loop over (x, y) rows, no NumPy, E = 10 at the seed's lr."""
    ids = np.arange(K)
    body = body_of("fedavg", TrainConfig(), np.array([0.5, -0.5]), 1)
    batch = skewed.train(parse_train_request(body, 1), ids, skewed.memory())
    for j, k in enumerate(ids):
        X, y = skewed.rows(k)
        rows = [(float(a), float(b)) for a, b in zip(X[:, 0], y)]
        reply, status = skewed.client(k).train(body)
        assert status == 200
        w, b = local_gd(rows, 0.5, -0.5, lr=0.01, epochs=10)
        np.testing.assert_allclose([reply["local_model"]["w"], reply["local_model"]["b"]], [w, b], **TOL)
        np.testing.assert_allclose(batch.local.theta[j], [w, b], **TOL)
        np.testing.assert_allclose(batch.loss_before[j], local_mse(rows, 0.5, -0.5), **TOL)
        np.testing.assert_allclose(batch.loss_after[j], local_mse(rows, w, b), **TOL)


def test_default_local_batch_serves_a_strategy_that_overrides_local(skewed: Population,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A strategy whose ``local`` is its own (not FedAvg's GD) and that has
    no ``local_batch`` gets its own answer per client, never FedAvg's batch
    by inheritance: here a client that sends W_t + (n_k, n_k)."""
    from fedavg.strategies import FedAvg, Local

    class Counting(FedAvg):
        name = "counting"

        @classmethod
        def local(cls, task, X, y, memory):
            return Local(task.theta + len(y))

    monkeypatch.setitem(STRATEGIES, "counting", Counting)
    task = parse_train_request(body_of("fedavg", TrainConfig(), np.zeros(2), 1), 1)
    ids = np.array([4, 1])
    got = Counting.local_batch(task, skewed, ids, skewed.memory())
    np.testing.assert_array_equal(got.theta, np.repeat(skewed.sizes[ids], 2).reshape(2, 2))


# --- (b) the data ------------------------------------------------------------

def documented_draw(scenario: str, k: int, seed: int, samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The module's docstring, written out: one Generator, sizes (quantity-skew),
    then x ~ U(0, 5) for every row, then N(0, 0.1²); y = s_k·x + 1 + noise."""
    rng = np.random.default_rng(seed)
    if scenario == "quantity-skew":
        sizes = np.array([max(1, round(v)) for v in rng.lognormal(np.log(samples), 1.0, size=k)])
    else:
        sizes = np.full(k, samples)
    x = rng.uniform(0.0, 5.0, size=sizes.sum())
    noise = rng.normal(0.0, 0.1, size=sizes.sum())
    slopes = 1.0 + 2.0 * np.arange(k) / max(k - 1, 1) if scenario == "label-shift" else np.full(k, 2.0)
    return sizes, x, np.repeat(slopes, sizes) * x + 1.0 + noise


@pytest.mark.parametrize("scenario", POPULATION_SCENARIOS)
def test_data_is_the_documented_draw_and_reproducible(scenario: str) -> None:
    pop = Population.build(scenario, 50, seed=11, samples=6)
    sizes, x, y = documented_draw(scenario, 50, 11, 6)
    np.testing.assert_array_equal(pop.sizes, sizes)
    np.testing.assert_array_equal(pop.offsets, np.concatenate([[0], np.cumsum(sizes)]))
    np.testing.assert_array_equal(pop.X[:, 0], x)
    np.testing.assert_allclose(pop.y, y, **TOL)
    again = Population.build(scenario, 50, seed=11, samples=6)
    np.testing.assert_array_equal(again.y, pop.y)
    assert not np.array_equal(Population.build(scenario, 50, seed=12, samples=6).X, pop.X)
    for k in (0, 17, 49):  # client(k) holds exactly its rows, and its statistics are theirs
        X, y_k = pop.client(k).X, pop.client(k).y
        np.testing.assert_array_equal(X[:, 0], x[pop.offsets[k]:pop.offsets[k + 1]])
        X1 = np.column_stack([X, np.ones(len(y_k))])
        np.testing.assert_allclose(pop.xtx[k], X1.T @ X1, **TOL)
        np.testing.assert_allclose(pop.xty[k], X1.T @ y_k, **TOL)


def test_label_shift_slopes_run_from_1_to_3() -> None:
    """Each client's own least-squares slope is its s_k = 1 + 2k/(K − 1)
    within the noise (σ = 0.1 over 200 rows: about ±0.005)."""
    pop = Population.build("label-shift", 5, seed=0, samples=200)
    slopes = [pop.client(k).least_squares()[0] for k in range(5)]
    np.testing.assert_allclose(slopes, [1.0, 1.5, 2.0, 2.5, 3.0], atol=0.03)
    iid = Population.build("iid", 5, seed=0, samples=200)
    np.testing.assert_allclose([iid.client(k).least_squares()[0] for k in range(5)], 2.0, atol=0.03)


def test_quantity_skew_spread() -> None:
    """n_k log-normal around ``samples``: median ≈ samples, ln n_k's spread ≈ 1,
    a few rows at the low end and hundreds at the top; iid's are all equal."""
    pop = Population.build("quantity-skew", 20_000, seed=0, samples=20)
    assert abs(np.median(pop.sizes) - 20) <= 1
    assert 0.9 < np.log(pop.sizes).std() < 1.1
    assert pop.sizes.min() == 1 and pop.sizes.max() > 500
    assert (Population.build("iid", 100, seed=0, samples=20).sizes == 20).all()


def test_byzantine_is_iid_data_with_attackers_first() -> None:
    pop = Population.build("byzantine", 6, seed=4, attackers=2, attack="scale")
    iid = Population.build("iid", 6, seed=4)
    np.testing.assert_array_equal(pop.y, iid.y)
    assert [type(pop.client(k)).__name__ for k in range(4)] == ["Attacker", "Attacker", "LocalClient",
                                                                 "LocalClient"]
    assert pop.client(0).attack == "scale" and pop.client(0).client_id == "attacker_1"
    assert iid.attackers == 0  # only byzantine has attackers


# --- (c) bad inputs ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"scenario": "iid", "k": 0}, "K"),
    ({"scenario": "iid", "k": -3}, "K"),
    ({"scenario": "iid", "k": 2.5}, "K"),
    ({"scenario": "seed", "k": 2}, "scenario"),
    ({"scenario": "nope", "k": 2}, "scenario"),
    ({"scenario": "iid", "k": 2, "samples": 0}, "samples"),
    ({"scenario": "byzantine", "k": 2, "attackers": 3}, "attackers"),
    ({"scenario": "byzantine", "k": 2, "attack": "bribe"}, "attack"),
])
def test_bad_build_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        Population.build(**kwargs)


@pytest.mark.parametrize("ids, says", [
    ([0, 30], "client 30 is not in 0..29"),
    ([-1], "client -1 is not in 0..29"),
    ([3, 5, 3], "client 3 is named more than once"),
    ([], "non-empty"),
    ([1.0, 2.0], "whole numbers"),
    ([[1, 2]], "non-empty list"),
])
def test_bad_ids_name_the_field(skewed: Population, ids: list, says: str) -> None:
    task = parse_train_request(body_of("fedavg", TrainConfig(), np.zeros(2), 1), 1)
    with pytest.raises(ProtocolError, match=f"^ids: .*{says}"):
        skewed.train(task, np.array(ids), skewed.memory())
    with pytest.raises(ProtocolError, match="^k: "):
        skewed.client(30)


def test_a_model_of_another_size_is_refused(skewed: Population) -> None:
    task = parse_train_request({"global_model": {"w": [0.0, 0.0], "b": 0.0}}, 2)
    with pytest.raises(ProtocolError, match="^global_model: has 3 parameters"):
        skewed.train(task, np.array([0]), skewed.memory())



def test_a_memory_moved_to_a_batch_row_and_on_answers_as_before():
    """RunMemory.move_to: a client's values (three runs, the latest four
    rounds of each kept) moved into row 2 of a BatchMemory, then on into
    row 0 of another, answer every ``before`` as the memory never moved
    did; what is written after a move lands in the last row only."""
    values = {(run, r): np.array([r, len(run)], dtype=float) for run in ("a", "bb", "ccc") for r in range(7)}
    never, moved = RunMemory(), RunMemory()
    for (run, r), value in values.items():
        never.after(run, r, value)
        moved.after(run, r, value)
    first, second = BatchMemory(3, 2), BatchMemory(1, 2)
    moved.move_to(first.of(2))
    assert [len(first.kept(k)) for k in range(3)] == [0, 0, 3 * RunMemory.ROUNDS_PER_RUN]
    moved.move_to(second.of(0))
    for run in ("a", "bb", "ccc", "other"):
        for r in range(9):
            want, got = never.before(run, r), moved.before(run, r)
            assert (want is None and got is None) or np.array_equal(want, got), (run, r)
    moved.after("a", 7, np.array([9.0, 9.0]))
    assert np.array_equal(second.before("a", 8, np.array([0]))[0], [9.0, 9.0])
    assert not np.array_equal(first.before("a", 8, np.array([2]))[0], [9.0, 9.0])
