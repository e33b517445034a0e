"""A population the server reaches by index, in this process: a client host's
GET /population (every client's /health facts in one reply), the server's
roster built from it (``fedavg_server.hosted``: URLs, names, n_k and the
batched path as views of the host's arrays), runs over it equal to runs over
the same clients as a list of URLs, and no client's own /health asked."""
from __future__ import annotations

import numpy as np
import pytest

from fedavg.batch_wire import decode_array
from fedavg.dropout import Dropout
from fedavg.http.host_app import create_host_app
from fedavg.population import Population
from fedavg.scenarios import make_clients
from fedavg.strategies import STRATEGIES
from fedavg_server.hosted import ClientURLs, HostedPopulation
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.sampling import SeededSample

HOST = "http://127.0.0.1:6000"
K = 12


def test_population_describes_every_client_as_its_own_health_does():
    population = Population.build("byzantine", K, seed=3, attackers=2, attack="lying_n")
    http = create_host_app(None, population=population).test_client()
    body = http.get("/population").get_json()
    sizes = decode_array(body.pop("sizes"), "sizes", "<i8", (K,))
    assert body == {"clients": K, "first_id": 1, "attackers": 2, "num_features": 1,
                    "data_size": int(population.sizes.sum()), "strategies": list(STRATEGIES), "secagg": True,
                    "batch": "/batch/train"}
    for k in range(1, K + 1):
        health = http.get(f"/clients/{k}/health").get_json()
        assert sizes[k - 1] == health["data_size"]  # lying_n's 10⁹ for the two attackers, as their /health says
        assert HostedPopulation(HOST, 0, 2, 1, (), True, None, sizes).name(k - 1) == health["client_id"]
    assert sizes[0] == 10 ** 9 and sizes[5] == 20


def test_population_needs_the_token_as_the_private_health_does():
    http = create_host_app(None, token="s3cret", population=Population.build("iid", 3)).test_client()
    assert http.get("/population").status_code == 401
    assert http.get("/population", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_host_of_listed_clients_has_no_population():
    """A host of make_clients' clients names them its own way: the server lists them (/clients) as before."""
    http = create_host_app(make_clients("iid", 3, 0)).test_client()
    assert http.get("/population").status_code == 404


def test_client_urls_behave_as_the_list_they_stand_for():
    population = HostedPopulation(HOST, 0, 0, 1, (), True, "/batch/train", np.arange(1, 6))
    urls = ClientURLs(["http://a:1", population, "http://b:2"])
    plain = ["http://a:1", *(f"{HOST}/clients/{k}" for k in range(1, 6)), "http://b:2"]
    assert len(urls) == len(plain) and list(urls) == plain and urls == plain and plain == urls
    assert [urls[i] for i in range(len(plain))] == plain and urls[-1] == plain[-1] and urls[2:5] == plain[2:5]
    assert all(urls.index(u) == i for i, u in enumerate(plain))
    for missing in (f"{HOST}/clients/6", f"{HOST}/clients/0", f"{HOST}/clients/01", "http://c:3"):
        assert missing not in urls
    with pytest.raises(IndexError):
        urls[len(plain)]


class CountingPopulation(HostedPopulation):
    made = 0

    def url(self, k: int) -> str:
        CountingPopulation.made += 1
        return super().url(k)


def test_sampling_a_million_makes_only_the_sampled_urls():
    """SeededSample over 1,000,000 hosted clients: the same clients the list of URLs gives, and only the
    m sampled URLs made (nothing per client of the population in Python)."""
    big = CountingPopulation(HOST, 0, 0, 1, (), True, "/batch/train", np.ones(1_000_000, dtype=np.int64))
    urls = ClientURLs([big])
    sample = SeededSample(0.01, 1, seed=7).draw(3, urls)
    assert CountingPopulation.made == len(sample) == 10_000
    picked = np.sort(np.random.default_rng([7, 3]).choice(1_000_000, size=10_000, replace=False))
    assert sample == [f"{HOST}/clients/{i + 1}" for i in picked]


class Watching(InProcessTransport):
    """Counts the calls by path."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.paths: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def call(self, url, method, path, timeout_s, body=None, **kw):
        self.paths.append(url.rsplit("/", 1)[-1] + path if "/clients/" in url else url + path)
        reply = super().call(url, method, path, timeout_s, body, **kw)
        self.failed += [] if reply.ok else [(url + path, reply.reason)]
        return reply


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold", "fedadam"])
def test_a_run_by_index_equals_the_run_over_the_list_of_urls(servers, strategy):
    from test_batch import assert_same_run
    runs = []
    for by_index in (True, False):
        host = create_host_app(None, population=Population.build("quantity-skew", K, seed=4))
        transport = (Watching.populations({HOST: host}) if by_index
                     else Watching.hosted(host, K, HOST))
        runs.append(servers(transport).run(strategy=strategy, rounds=4, seed=2, fraction=0.5))
        if by_index:
            assert isinstance(transport.urls, ClientURLs) and len(transport.urls) == K
            # the run's probe: one /population, no client's own /health; one /batch/train a round
            assert not any(p.endswith("/health") for p in transport.paths), transport.paths
            assert transport.paths.count(HOST + "/population") == 1
            assert transport.paths.count(HOST + "/batch/train") == 4
            assert transport.paths.count(HOST + "/batch/evaluate") == 1
    assert runs[0]["status"] == "completed", runs[0]["error"]
    assert_same_run(*runs)


def test_a_run_mixes_clients_of_their_own_with_a_hosted_population(servers):
    from test_batch import assert_same_run

    from conftest import ROOT
    from fedavg.http.client_app import create_app as client_app
    runs = []
    for by_index in (True, False):
        host = create_host_app(None, population=Population.build("iid", 5, seed=1))
        seed = {"http://127.0.0.1:5001": client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" /
                                                                                               "data.csv"),
                                                     "TOKEN": None})}
        if by_index:
            transport = InProcessTransport.populations({HOST: host}, list(seed), seed)
        else:
            transport = InProcessTransport({**seed, **{f"{HOST}/clients/{k}": host for k in range(1, 6)}})
        runs.append(servers(transport).run(strategy="scaffold", rounds=3, seed=1))
    assert runs[0]["status"] == "completed", runs[0]["error"]
    assert [p["client_id"] for p in runs[0]["rounds"][0]["participants"]] == \
           ["client_1", *(f"sim_{k}" for k in range(1, 6))]
    assert_same_run(*runs)


def test_the_servers_health_lists_the_first_10000_of_a_population(servers):
    host = create_host_app(None, population=Population.build("iid", 20_000, samples=2))
    status, body = servers(InProcessTransport.populations({HOST: host})).get("/health")
    assert status == 200
    assert body["clients_total"] == 20_000
    assert body["clients"] == [f"{HOST}/clients/{k}" for k in range(1, 10_001)]


@pytest.mark.parametrize("batch_size", [None, 4])
def test_a_hosts_batch_body_is_built_once_with_each_clients_seed(batch_size):
    """The /batch/train body is the per-client body but for the seed: built once a round, not once per
    client (a round of 10,000 built 10,000 configs and compared them), with each client's own seed when
    the config asks for mini-batches."""
    from fedavg_server.collect import Bodies
    from fedavg_server.settings import parse_start

    settings, _ = parse_start({"batch_size": batch_size} if batch_size else {}, 4)
    made = []

    def config_for(seed):
        made.append(seed)
        return {**settings.train_config(seed, "run").__dict__, "strategy": None}

    urls = [f"{HOST}/clients/{k}" for k in range(1, 5)]
    bodies = Bodies({"global_model": {"w": 0.0, "b": 0.0}, "round": 2}, config_for, dict(zip(urls, [11, 12, 13, 14])))
    one, two = bodies.batch(urls[:2], [1, 2]), bodies.batch(urls[2:], [3, 4])
    assert made == [None]
    for body, ks in ((one, [1, 2]), (two, [3, 4])):
        assert body["clients"] == ks
        own = [bodies(urls[k - 1]) for k in ks]
        assert all({**b, "config": {**b["config"], "seed": None}} == {k: v for k, v in body.items()
                                                                       if k not in ("clients", "seeds")}
                   for b in own)
        assert body.get("seeds") == ([b["config"]["seed"] for b in own] if batch_size else None)


def test_a_population_over_1_mib_is_read_whole_at_each_probe(servers):
    """150,000 clients' n_k are 1.6 MB of base64: more than any one client's reply may be, read whole."""
    host = create_host_app(None, population=Population.build("quantity-skew", 150_000, samples=1))
    transport = Watching.populations({HOST: host})
    run = servers(transport).run(rounds=1, fraction=0.0001, min_clients=1)
    assert run["status"] == "completed", run["error"]
    assert transport.paths.count(HOST + "/population") == 1 and transport.failed == []


# --- shards ---------------------------------------------------------------------------------------

SHARDED = "http://127.0.0.1:6001", "http://127.0.0.1:6002", "http://127.0.0.1:6003"


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_shard_holds_exactly_its_clients_of_the_whole(n):
    whole = Population.build("byzantine", 11, seed=6, attackers=3, attack="scale")
    shards = [whole.shard(i, n) for i in range(1, n + 1)]
    assert [s.first for s in shards] == [11 * (i - 1) // n for i in range(1, n + 1)]
    assert sum(s.size for s in shards) == 11 and sum(s.attackers for s in shards) == 3
    for s in shards:
        for k in range(s.size):
            mine, theirs = s.client(k), whole.client(s.first + k)
            assert (mine.client_id, type(mine)) == (theirs.client_id, type(theirs))
            np.testing.assert_array_equal(mine.X, theirs.X)
            np.testing.assert_array_equal(mine.y, theirs.y)
        np.testing.assert_array_equal(s.xtx, whole.xtx[s.first:s.first + s.size])


@pytest.mark.parametrize("spec, error", [("2", "--shard: must be i/n"), ("a/b", "--shard: must be i/n"),
                                         ("0/2", "--shard: i/n needs 1 ≤ i ≤ n, got 0/2"),
                                         ("3/2", "--shard: i/n needs 1 ≤ i ≤ n, got 3/2")])
def test_a_bad_shard_is_one_error_naming_the_flag(spec, error):
    from fedavg.population import check_shard, parse_shard
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(")):
        check_shard(*parse_shard(spec), 10)
    with pytest.raises(ValueError, match="--shard: 20 shards of 10 clients would leave a shard empty"):
        check_shard(1, 20, 10)


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_shard_hosts_give_the_run_one_host_gives(servers, strategy):
    """Three hosts each holding a shard of one population: every round's model to 1e-12 as the whole on one
    host, the same clients (names, n_k) sampled; one /batch/train per host per round."""
    from test_batch import assert_same_run
    whole = Population.build("label-shift", K, seed=8)
    one = Watching.populations({HOST: create_host_app(None, population=whole)})
    three = Watching.populations({url: create_host_app(None, population=whole.shard(i, 3))
                                  for i, url in enumerate(SHARDED, 1)})
    runs = [servers(t).run(strategy=strategy, rounds=4, seed=3, fraction=0.5) for t in (one, three)]
    assert runs[0]["status"] == "completed", runs[0]["error"]
    assert_same_run(*runs)
    # one call a round to each host with sampled clients (shard i: clients 4i−3 … 4i)
    sampled = [{int(p["client_id"].split("_")[1]) for p in r["participants"]} for r in runs[1]["rounds"]]
    assert [three.paths.count(url + "/batch/train") for url in SHARDED] == \
           [sum(any(4 * i - 3 <= k <= 4 * i for k in ks) for ks in sampled) for i in (1, 2, 3)]


def test_shard_hosts_drop_out_the_clients_one_host_drops(servers):
    """A dropout rate is drawn by each client's global number: three shard hosts drop out of each
    round exactly the clients the whole on one host drops (and train the same rest, to 1e-12)."""
    from test_batch import assert_same_run
    whole, dropout = Population.build("iid", K, seed=8), Dropout(0.3, seed=5)
    one = Watching.populations({HOST: create_host_app(None, population=whole, dropout=dropout)})
    three = Watching.populations({url: create_host_app(None, population=whole.shard(i, 3), dropout=dropout)
                                  for i, url in enumerate(SHARDED, 1)})
    runs = [servers(t).run(rounds=4, seed=3, min_clients=1) for t in (one, three)]
    assert runs[0]["status"] == "completed", runs[0]["error"]
    for a, b in zip(runs[0]["rounds"], runs[1]["rounds"]):
        assert sorted(d["client_id"] for d in a["dropped"]) == sorted(d["client_id"] for d in b["dropped"])
    assert sum(len(r["dropped"]) for r in runs[0]["rounds"]) > 0  # (0.3 of 12 clients in 4 rounds)
    assert_same_run(*runs)


class LosingHost(Watching):
    """The second shard's host is gone in round 2 (its /batch/train cannot connect)."""

    def call(self, url, method, path, timeout_s, body=None, **kw):
        if url == SHARDED[1] + "/batch/train" and body["round"] == 2:
            from fedavg_server.transport import Reply
            return Reply(url, reason="cannot connect: Connection refused")
        return super().call(url, method, path, timeout_s, body, **kw)


def test_a_host_lost_mid_run_drops_its_sampled_clients_for_that_round(servers):
    whole = Population.build("iid", K, seed=2)
    transport = LosingHost.populations({url: create_host_app(None, population=whole.shard(i, 3))
                                        for i, url in enumerate(SHARDED, 1)})
    run = servers(transport).run(rounds=3, seed=1, min_clients=2)
    assert run["status"] == "completed", run["error"]
    lost = [f"sim_{k}" for k in range(5, 9)]  # shard 2 of 3 of 12: clients 5..8
    rounds = run["rounds"]
    assert [d["client_id"] for d in rounds[1]["dropped"]] == lost
    assert {d["reason"] for d in rounds[1]["dropped"]} == \
           {f"its host's {SHARDED[1]}/batch/train: cannot connect: Connection refused"}
    assert [p["client_id"] for p in rounds[1]["participants"]] == \
           [f"sim_{k}" for k in range(1, K + 1) if f"sim_{k}" not in lost]
    assert rounds[0]["dropped"] == rounds[2]["dropped"] == [] and len(rounds[2]["participants"]) == K


class StopPopulationInRound(InProcessTransport):
    """``stop()`` called once round ``at``'s /batch/train has been answered."""

    at: int | None = None
    stop = None

    def call(self, url, method, path, timeout_s, body=None, **limit):
        reply = super().call(url, method, path, timeout_s, body, **limit)
        if url.endswith("/batch/train") and body["round"] == self.at and self.stop is not None:
            stop, self.stop = self.stop, None
            stop()
        return reply


def test_a_run_over_a_population_stores_it_as_one_entry_and_resumes(servers, tmp_path):
    """The run's clients stored as "<host>/clients/1..K" (a million URLs would be 40 MB that every
    /status reads back); SCAFFOLD stopped after round 2 and resumed on a new server over the same
    history equals the run not stopped, to 1e-12; a server whose host holds other clients is refused,
    naming both entries."""
    from test_batch import assert_same_run
    population, db = Population.build("quantity-skew", K, seed=9), tmp_path / "resumed.db"
    settings = {"strategy": "scaffold", "rounds": 5, "seed": 4}
    host = create_host_app(None, population=population)
    first = StopPopulationInRound.populations({HOST: host})
    first.at = 2
    fed = servers(first, db)
    first.stop = lambda: fed.post(f"/runs/{fed.fed.running_id()}/stop")
    body = fed.whole(fed.run(**settings))
    assert body["status"] == "interrupted" and len(body["rounds"]) == 2
    assert body["clients"] == [f"{HOST}/clients/1..{K}"]
    fed.close()
    other = servers(InProcessTransport.populations({HOST: create_host_app(None, population=population.shard(1, 2))}),
                    db)
    status, refused = other.post(f"/runs/{body['run_id']}/resume")
    assert status == 409 and f"no longer here: {HOST}/clients/1..{K}; new here: {HOST}/clients/1..{K // 2}" \
        in refused["error"], refused
    other.close()
    again = servers(InProcessTransport.populations({HOST: host}), db)
    status, resumed = again.post(f"/runs/{body['run_id']}/resume")
    assert status == 200, resumed
    resumed = again.whole(resumed)
    assert resumed["status"] == "completed", resumed["error"]
    whole = servers(InProcessTransport.populations({HOST: create_host_app(None, population=population)}))
    assert_same_run(resumed, whole.run(**settings))


def test_a_population_hosts_pooled_line_is_least_squares_over_all_its_rows():
    """From the clients' statistics (the normal equations), not a copy of every row: lstsq's answer."""
    population = Population.build("label-shift", 500, seed=5)
    said = create_host_app(None, population=population).test_client().get("/scenario").get_json()["pooled_line"]
    X1 = np.column_stack([population.X[:, 0], np.ones(len(population.y))])
    w, b = np.linalg.lstsq(X1, population.y, rcond=None)[0]
    assert said == pytest.approx({"w": w, "b": b}, abs=1e-9)


@pytest.mark.system
def test_make_sim_of_a_population_with_its_progress_bar_and_final_model():
    """``make sim POPULATION=… FRACTION=… ROUNDS=…``: a host of the population, the server reaching it by
    index, a progress line a round (not a terminal: plain lines), the final model and the last round's
    counts; a bad --shard on the host is one line naming it."""
    import re
    import subprocess

    from conftest import ROOT
    done = subprocess.run(["make", "sim", "POPULATION=300", "FRACTION=0.1", "ROUNDS=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "3 rounds over a population of 300 clients, 30 a round (fraction 0.1)" in out
    bars = re.findall(r"^\[[#-]{30}\] (\d)/3 rounds, 30 clients/round, [\d.]+ s elapsed, ETA (\S+)", out, re.M)
    assert [int(done) for done, _ in bars] == sorted({int(done) for done, _ in bars}) and bars[-1] == ("3", "0")
    assert re.search(r"^sim: run completed in [\d.]+ s: 3 rounds; final model w = [-\d.e]+, b = [-\d.e]+$", out, re.M)
    assert re.search(r"^sim: round 3: 30 clients, 0 dropped, N = 600, federated MSE ", out, re.M), out
    bad = subprocess.run([str(ROOT / "client_host" / ".venv" / "bin" / "python"), "client_host_app.py",
                          "--population", "9", "--shard", "3/2"], cwd=ROOT / "client_host", capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "error: --shard: i/n needs 1 ≤ i ≤ n, got 3/2"), bad.stderr
