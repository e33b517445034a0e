"""The batched host protocol, in this process: a client host's POST
/batch/train (one call for many of its clients, a reply of base64 arrays)
and the server's BatchedCollector that calls it once per host per round.

The check that matters: the same run over the same host's clients, once
through the batched collector and once client by client (the server's
--per-client), gives the same global model in every round to 1e-12, for
every strategy and robust rule, and the host's own counters say which way
it was called. Drops (a host that fails, a diverged client) and bad
/batch/train bodies are checked here too. System: the same over HTTP, the
client host and the server started as the README starts them."""
from __future__ import annotations

import numpy as np
import pytest

import launcher
from conftest import run_from_host
from fedavg.batch_wire import batch_reply_json, parse_batch_reply
from fedavg.http.host_app import create_host_app
from fedavg.population import Population
from fedavg.scenarios import make_clients
from fedavg.strategies import STRATEGIES
from fedavg.strict_json import ProtocolError
from fedavg.wire import parse_train_request
from fedavg_server.collect import BatchedCollector, PlainCollector, SecureCollector
from fedavg_server.inprocess import InProcessTransport
from fedavg_server.roster import Roster
from fedavg_server.run import pipeline
from fedavg_server.settings import parse_start

K = 9
HOST = "http://127.0.0.1:6000"
OTHER = "http://127.0.0.1:6100"


def calls(host) -> dict[str, int]:
    """How the host was called: its /health's counters of /batch/train and of its clients' /train."""
    return host.test_client().get("/health").get_json()["calls"]


def both(servers, scenario: str = "quantity-skew", k: int = K, **settings):
    """The same run (rounds 3, seed 5 unless said) on two copies of one host's clients,
    batched and per client: (batched run, per-client run, batched host, per-client host)."""
    runs, hosts = [], []
    for batched in (True, False):
        host = create_host_app(make_clients(scenario, k, 3))
        fed = servers(InProcessTransport.hosted(host, k, HOST), BATCHED=batched)
        runs.append(fed.run(**{"rounds": 3, "seed": 5, **settings}))
        hosts.append(host)
    return (*runs, *hosts)


def assert_same_run(a: dict, b: dict) -> None:
    """Every round's global model to 1e-12, the same participants and drops, the same end."""
    assert (a["status"], a["error"]) == (b["status"], b["error"])
    assert len(a["rounds"]) == len(b["rounds"]) > 0
    for ra, rb in zip(a["rounds"], b["rounds"]):
        for key in ("global_model_in", "global_model"):
            np.testing.assert_allclose([ra[key]["b"], *np.atleast_1d(ra[key]["w"])],
                                       [rb[key]["b"], *np.atleast_1d(rb[key]["w"])], rtol=1e-12, atol=1e-12)
        assert [(p["client_id"], p["data_size"]) for p in ra["participants"]] == \
               [(p["client_id"], p["data_size"]) for p in rb["participants"]]
        assert [d["client_id"] for d in ra["dropped"]] == [d["client_id"] for d in rb["dropped"]]
        assert [s["client_id"] for s in ra["suspicious"]] == [s["client_id"] for s in rb["suspicious"]]
        if ra["federated_loss"] is not None:
            assert ra["federated_loss"] == pytest.approx(rb["federated_loss"], rel=1e-12)
    fa, fb = a["final_model"], b["final_model"]
    np.testing.assert_allclose([fa["b"], fa["w"]], [fb["b"], fb["w"]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_batched_equals_per_client(servers, strategy):
    batched, per_client, host_b, host_p = both(servers, strategy=strategy)
    assert batched["status"] == "completed", batched["error"]
    assert_same_run(batched, per_client)
    rounds = len(batched["rounds"])
    assert calls(host_b) == {"batch_train": rounds, "train": 0}  # one call per host per round
    assert calls(host_p) == {"batch_train": 0, "train": rounds * K}


@pytest.mark.parametrize("robust", [{"aggregator": "median"}, {"aggregator": "trimmed_mean", "trim": 0.2},
                                    {"aggregator": "krum", "byzantine": 2, "krum_m": 3}, {"clip_norm": 0.5},
                                    {"max_weight": 0.15}],
                         ids=["median", "trimmed_mean", "krum", "clip_norm", "max_weight"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedsgd", "fedadam"])
def test_robust_rules_batched_equal_per_client(servers, strategy, robust):
    # byzantine: the first two clients send w = b = 10^12 (flagged suspicious on both paths)
    scenario = "quantity-skew" if "max_weight" in robust else "byzantine"
    batched, per_client, host_b, _ = both(servers, scenario, strategy=strategy, **robust)
    assert batched["status"] == "completed", batched["error"]
    assert_same_run(batched, per_client)
    assert calls(host_b)["train"] == 0


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold", "fednova"])
def test_mini_batches_shuffle_with_each_clients_own_seed(servers, strategy):
    """batch_size below n_k: each client shuffles with the seed the per-client path sends it."""
    batched, per_client, host_b, _ = both(servers, strategy=strategy, batch_size=3, local_epochs=2)
    assert_same_run(batched, per_client)
    assert calls(host_b) == {"batch_train": 3, "train": 0}


def test_a_fraction_and_a_host_beside_single_clients(servers):
    """fraction < 1 (the seeded sample), and clients of two hosts: one call per host per round."""
    runs, hosts = [], []
    for batched in (True, False):
        one, two = create_host_app(make_clients("iid", 6, 1)), create_host_app(make_clients("label-shift", 5, 2))
        apps = {**{f"{HOST}/clients/{k}": one for k in range(1, 7)}, **{f"{OTHER}/clients/{k}": two
                                                                         for k in range(1, 6)}}
        runs.append(servers(InProcessTransport(apps), BATCHED=batched).run(rounds=4, seed=9, fraction=0.6))
        hosts.append((one, two))
    assert_same_run(*runs)
    for host in hosts[0]:
        assert calls(host) == {"batch_train": 4, "train": 0}


class StopInRound(InProcessTransport):
    """The clients in this process, and ``stop()`` called once, as soon as
    round ``at``'s first training call (a client's /train, or its host's
    /batch/train) has been answered: the run ends after that round, interrupted."""

    def __init__(self, apps, at: int | None) -> None:
        super().__init__(apps)
        self.at, self.stop = at, None

    def call(self, url, method, path, timeout_s, body=None, **limit):
        reply = super().call(url, method, path, timeout_s, body, **limit)
        if path in ("/train", "") and body["round"] == self.at and self.stop is not None:
            stop, self.stop = self.stop, None
            stop()
        return reply


def test_a_scaffold_run_that_changes_path_keeps_each_clients_c_k(servers, tmp_path):
    """SCAFFOLD's c_k is one memory per hosted client, whichever way its host
    is called: a run stopped and resumed on the other path four times (rounds
    1–2 client by client, 3 batched, 4–5 client by client, 6–8 batched, 9–12
    client by client; each resume on a new server over the same history)
    equals a run on one path to 1e-12. (A client's /train and /batch/train
    once kept a c_k each: every switch started c_k from 0.)"""
    settings = {"strategy": "scaffold", "rounds": 12, "seed": 5}
    host, db = create_host_app(make_clients("quantity-skew", K, 3)), tmp_path / "switched.db"
    apps = {f"{HOST}/clients/{k}": host for k in range(1, K + 1)}
    body: dict = {}
    for i, at in enumerate([2, 3, 5, 8, None]):
        transport = StopInRound(apps, at)
        fed = servers(transport, db, BATCHED=i % 2 == 1)
        transport.stop = lambda fed=fed: fed.post(f"/runs/{fed.fed.running_id()}/stop")
        if not body:
            body = fed.run(**settings)
        else:
            status, body = fed.post(f"/runs/{body['run_id']}/resume")
            assert status == 200, body
        body = fed.whole(body)
        assert body["status"] == ("completed" if at is None else "interrupted"), body.get("error")
        assert len(body["rounds"]) == (at or 12)
        fed.close()
    assert calls(host) == {"batch_train": 1 + 3, "train": (2 + 2 + 4) * K}  # both paths, as planned
    one_path = servers(InProcessTransport.hosted(create_host_app(make_clients("quantity-skew", K, 3)), K, HOST))
    assert_same_run(body, one_path.run(**settings))


@pytest.mark.parametrize("settings", [{"lr": 10.0}, {"lr": 10.0, "local_epochs": 1000, "rounds": 1}],
                         ids=["lr10", "all-diverge"])
def test_diverged_clients_are_dropped_as_their_422_is(servers, settings):
    """Rows the host flags diverged end the run as the clients' own 422s do: the same status,
    the same error naming the same clients, the same drops before it."""
    batched, per_client, host_b, _ = both(servers, **settings)
    assert batched["status"] == per_client["status"] == "diverged"
    assert batched["error"] == per_client["error"]
    assert [[d["client_id"] for d in r["dropped"]] for r in batched["rounds"]] == \
           [[d["client_id"] for d in r["dropped"]] for r in per_client["rounds"]]
    assert calls(host_b)["train"] == 0


def failing_batch(app, status: int = 503):
    """``app`` with its /batch/train answering ``status``: a host whose batched call fails."""
    def wsgi(environ, start_response):
        if environ["PATH_INFO"] == "/batch/train":
            start_response(f"{status} Unavailable", [("Content-Type", "application/json")])
            return [b'{"error": "the host is overloaded"}']
        return app(environ, start_response)
    return wsgi


def test_a_failing_host_drops_its_sampled_clients_each_named(servers):
    good, bad = create_host_app(make_clients("iid", 4, 1)), failing_batch(create_host_app(make_clients("iid", 3, 2)))
    apps = {**{f"{HOST}/clients/{k}": good for k in range(1, 5)}, **{f"{OTHER}/clients/{k}": bad for k in range(1, 4)}}
    run = servers(InProcessTransport(apps)).run(rounds=2, seed=3)
    assert run["status"] == "completed", run["error"]
    for r in run["rounds"]:
        assert [p["url"] for p in r["participants"]] == [f"{HOST}/clients/{k}" for k in range(1, 5)]
        assert [(d["client_id"], d["url"]) for d in r["dropped"]] == \
               [(f"sim_{k}", f"{OTHER}/clients/{k}") for k in range(1, 4)]
        for d in r["dropped"]:
            assert d["reason"] == f"its host's {OTHER}/batch/train: HTTP 503: the host is overloaded"


def test_a_malformed_batch_reply_drops_the_hosts_clients(servers):
    host = create_host_app(make_clients("iid", 3, 1))

    def truncated(environ, start_response):
        if environ["PATH_INFO"] == "/batch/train":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"strategy": "fedavg", "clients": 3, "arrays": {}, "errors": {}}']
        return host(environ, start_response)
    fed = servers(InProcessTransport({f"{HOST}/clients/{k}": truncated for k in range(1, 4)}))
    run = fed.run(rounds=1, seed=1)
    assert run["status"] == "failed"
    assert f"its host's {HOST}/batch/train: reply.arrays.ids: missing" in run["error"]


def test_pipeline_batches_dp_and_keeps_secure_aggregation_client_by_client():
    transport = InProcessTransport.hosted(create_host_app(make_clients("iid", 4, 0)), 4, HOST)

    def collector(batched: bool = True, **body):
        settings, _ = parse_start(body, 4)
        return pipeline(settings, Roster(transport), 1, "run", batched)[2]
    assert isinstance(collector(), BatchedCollector)
    assert type(collector(batched=False)) is PlainCollector
    assert isinstance(collector(dp={"noise_multiplier": 0, "clip": 1.0}), BatchedCollector)
    assert type(collector(batched=False, dp={"noise_multiplier": 0, "clip": 1.0})) is PlainCollector
    assert type(collector(secagg=True)) is SecureCollector
    dp = {"noise_multiplier": 1.0, "clip": 1.0, "local_noise": True}
    assert type(collector(secagg=True, dp=dp)) is SecureCollector


def test_a_population_hosts_clients_are_built_when_first_called():
    population = Population.build("byzantine", 30, seed=2, attackers=2)
    clients = population.clients(population.memory())
    assert len(clients) == 30 and clients.built == 0
    first = clients[0]
    assert clients[0] is first and clients.built == 1 and first.client_id == "attacker_1"
    with pytest.raises(IndexError):
        clients[30]
    http = create_host_app(None, population=population).test_client()
    assert http.get("/health").get_json()["data_size"] == int(population.sizes.sum())
    body = {"global_model": {"w": 0.5, "b": 0.0}, "round": 1, "config": {"strategy": "fedprox", "mu": 0.1}}
    for k in (1, 17, 30):  # an attacker's lie too, as Population.client(k) sends it
        assert http.get(f"/clients/{k}/health").get_json()["data_size"] == population.sizes[k - 1]
        assert http.post(f"/clients/{k}/train", json=body).get_json() == population.client(k - 1).train(body)[0]


def test_a_population_host_batched_equals_per_client(servers):
    """SCAFFOLD on a host of a population's own clients (each c_k in the population's memory)."""
    runs, hosts = [], []
    for batched in (True, False):
        host = create_host_app(None, population=Population.build("label-shift", K, seed=4))
        runs.append(servers(InProcessTransport.hosted(host, K, HOST), BATCHED=batched).run(
            strategy="scaffold", rounds=4, seed=2))
        hosts.append(host)
    assert runs[0]["status"] == "completed", runs[0]["error"]
    assert_same_run(*runs)
    assert [calls(h) for h in hosts] == [{"batch_train": 4, "train": 0}, {"batch_train": 0, "train": 4 * K}]


# --- /batch/train on the host ------------------------------------------------------

BODY = {"global_model": {"w": 0.0, "b": 0.0}, "round": 1, "clients": [1, 2, 3]}


@pytest.mark.parametrize("body, error", [
    ({"global_model": {"w": 0.0, "b": 0.0}}, "clients: missing"),
    ({**BODY, "clients": []}, "clients: must be a non-empty list"),
    ({**BODY, "clients": "1,2"}, "clients: must be a non-empty list"),
    ({**BODY, "clients": [1, 0]}, "clients[1]: must be"),
    ({**BODY, "clients": [1, 2.0]}, "clients[1]: "),
    ({**BODY, "clients": [1, True]}, "clients[1]: "),
    ({**BODY, "clients": [1, 7]}, "clients[1]: client 7 is not on this host (1..6)"),
    ({**BODY, "clients": [4, 2, 4]}, "clients[2]: client 4 is named more than once"),
    ({**BODY, "seeds": [1, 2]}, "seeds: must be a list of 3 seeds"),
    ({**BODY, "seeds": [1, 2, -1]}, "seeds[2]: "),
    ({**BODY, "config": {"batch_size": 2}}, "seeds: missing (config.batch_size"),
    ({**BODY, "config": {"lr": 0}}, "config.lr: must be > 0"),
    ({**BODY, "config": {"strategy": "scaffold", "run": "r"}}, "control: missing (strategy scaffold sends it)"),
    ({**BODY, "control": {"w": 0.0, "b": 0.0}}, "control: not part of strategy fedavg"),
    ({**BODY, "global_model": {"w": [0.0, 1.0], "b": 0.0}}, "global_model.w"),
    ({**BODY, "extra": 1}, "extra: unknown field (allowed: clients, config, control, global_model, round, seeds)"),
])
def test_bad_batch_bodies_are_400s_naming_the_field(body, error):
    http = create_host_app(make_clients("iid", 6, 0)).test_client()
    r = http.post("/batch/train", json=body)
    assert r.status_code == 400, r.get_json()
    assert r.get_json()["error"].startswith(error), r.get_json()


def test_batch_train_has_the_guards_of_train():
    http = create_host_app(make_clients("iid", 3, 0), token="s3cret").test_client()
    auth = {"Authorization": "Bearer s3cret"}
    assert http.post("/batch/train", json=BODY).status_code == 401
    assert http.post("/batch/train", data="x", headers={**auth, "Content-Type": "text/plain"}).status_code == 415
    assert http.post("/batch/train", json=BODY, headers={**auth, "X-Deadline-S": "0"}).status_code == 400
    assert http.post("/batch/train", json=BODY, headers=auth).status_code == 200
    off = create_host_app(make_clients("iid", 3, 0), batch=False).test_client()
    assert off.post("/batch/train", json=BODY).status_code == 404
    assert "batch" not in off.get("/clients/1/health").get_json()
    assert create_host_app(make_clients("iid", 3, 0)).test_client().get("/clients/2/health").get_json()["batch"] \
        == {"path": "/batch/train", "id": 2}


def test_the_batch_reply_decodes_to_the_rows_the_clients_send():
    """Each row of /batch/train's reply against that client's own /train reply (byzantine:
    the attackers' lies in their rows too), and a reply of the wrong shape refused naming the array."""
    clients = make_clients("byzantine", 5, 0)
    http = create_host_app(clients).test_client()
    body = {**BODY, "clients": [5, 1, 3], "config": {"strategy": "fednova", "run": "r"}}
    reply = http.post("/batch/train", json=body).get_json()
    batch, why = parse_batch_reply(reply, [5, 1, 3], 1, "fednova")
    assert why == {}
    for j, k in enumerate([5, 1, 3]):
        own = http.post(f"/clients/{k}/train", json={key: body[key] for key in ("global_model", "round", "config")})
        own = own.get_json()
        assert batch.n[j] == own["data_size"]
        np.testing.assert_allclose(batch.local.theta[j], [own["local_model"]["w"], own["local_model"]["b"]],
                                   rtol=1e-12)
        assert batch.local.extra["steps"][j] == own["steps"]
        assert batch.loss_after[j] == pytest.approx(own["metrics"]["loss_after"], rel=1e-12)
    reply["arrays"]["local_model"]["shape"] = [3, 3]
    with pytest.raises(ProtocolError, match=r"reply.arrays.local_model.shape: must be \[3, 2\]"):
        parse_batch_reply(reply, [5, 1, 3], 1, "fednova")
    with pytest.raises(ProtocolError, match="reply.arrays.ids: not the clients asked for"):
        parse_batch_reply(http.post("/batch/train", json=body).get_json(), [1, 5, 3], 1, "fednova")


def test_population_of_clients_holds_exactly_their_rows():
    clients = make_clients("byzantine", 6, 4, attackers=2, attack="scale")
    population = Population.of(clients)
    assert (population.attackers, population.attack) == (2, "scale")
    for k, c in enumerate(clients):
        X, y = population.rows(k)
        assert np.array_equal(X, c.X) and np.array_equal(y, c.y)
    with pytest.raises(ValueError, match="attackers must be the first f"):
        Population.of(clients[2:] + clients[:2])
    task = parse_train_request({"global_model": {"w": 0.0, "b": 0.0}}, 1)
    reply = population.train(task, [0, 4], population.memory())
    assert batch_reply_json(reply, "fedavg", "why")["errors"] == {}


# --- over HTTP ---------------------------------------------------------------------


@pytest.mark.system
def test_over_http_the_batched_run_equals_the_per_client_run(tmp_path):
    """A client host and two servers as the README starts them, both
    ``--clients-from`` the host, one with ``--per-client``: the same SCAFFOLD
    run on each gives every round's model to 1e-12, and the host's /health
    counts one /batch/train per round for the first and only clients' own
    /train for the second."""
    k, rounds = 12, 4
    host = launcher.start_app("client_host", launcher.free_port(), ["--scenario", "quantity-skew",
                                                                    "--clients", str(k)])
    apps = [host]
    try:
        launcher.wait_healthy(apps)
        servers = {}
        for how, extra in (("batched", []), ("per-client", ["--per-client"])):
            servers[how] = launcher.start_app("server", launcher.free_port(), [
                "--clients-from", host.url, "--db", str(tmp_path / f"{how}.db"), *extra])
            apps.append(servers[how])
        launcher.wait_healthy(apps)
        runs, counted = {}, {}
        for how, server in servers.items():
            status, runs[how] = launcher.post_json(server.url + "/start", {"strategy": "scaffold",
                                                                           "rounds": rounds, "seed": 4})
            assert status == 200 and runs[how]["status"] == "completed", runs[how].get("error")
            counted[how] = launcher.get_json(host.url + "/health")["calls"]
        assert_same_run(runs["batched"], runs["per-client"])
        assert counted == {"batched": {"batch_train": rounds, "train": 0},
                           "per-client": {"batch_train": rounds, "train": rounds * k}}
    finally:
        launcher.stop(apps)
    for app in apps:
        assert "Traceback" not in app.output(), app.output()[-2000:]


@pytest.mark.system
def test_a_client_host_of_a_population_over_http(tmp_path):
    """``--population K``: a run from ``--clients-from`` it, one /batch/train a
    round; a scenario that is not drawn as a population, refused in one line."""
    host = launcher.start_app("client_host", launcher.free_port(), ["--scenario", "label-shift",
                                                                    "--population", "300"])
    apps = [host]
    try:
        launcher.wait_healthy(apps)
        run = run_from_host(host, apps, tmp_path / "runs.db", {"rounds": 2, "seed": 1})
        assert [r["summary"]["contributed"] for r in run["rounds"]] == [300, 300]  # (> 100: a summary)
        assert launcher.get_json(host.url + "/health")["calls"] == {"batch_train": 2, "train": 0}
    finally:
        launcher.stop(apps)
    wrong = launcher.start_app("client_host", launcher.free_port(), ["--scenario", "diabetes", "--population", "9"])
    [(code, out, _)] = launcher.ended([wrong])
    assert code == 2 and "--population: scenario diabetes is not drawn as a population" in out, out
