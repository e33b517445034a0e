"""A client host: one process serving many independent clients, client k at
``/clients/<k>`` with the same /train, /evaluate, /health beneath — the very
blueprint a single client serves, each with its own private data — and
``POST /batch/train``, /train for many of them in one call, answered by the
``Population`` of the same rows (``fedavg.batch_wire`` has its format)."""
from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from flask import Flask, g, request
from werkzeug.exceptions import NotFound

from ..batch_wire import (
    BATCH_EVALUATE_PATH,
    BATCH_PATH,
    POPULATION_PATH,
    batch_reply_json,
    encode_array,
    parse_batch_request,
)
from ..client import MAX_TRAININGS, LocalClient, diverged_error
from ..dropout import Dropout
from ..openapi import host_document
from ..population import BatchReply, Population
from ..strategies import STRATEGIES, LocalBatch
from ..theory import pooled_optimum
from ..training import TrainingStopped
from ..wire import parse_evaluate_request
from .client_app import client_blueprint, requested_deadline_s
from .service import (
    has_token,
    install_json_errors,
    install_request_guards,
    json_body,
    peer_allowed,
    peer_names,
    require_peer,
    require_token,
)


def with_absent_rows(reply: BatchReply, ids: np.ndarray, present: np.ndarray) -> BatchReply:
    """``reply``'s rows placed at the ``present`` rows of a reply to ``ids``, zeros elsewhere."""
    def place(values: np.ndarray | None) -> np.ndarray | None:
        if values is None:
            return None
        full = np.zeros((len(ids), *values.shape[1:]), dtype=values.dtype)
        full[present] = values[: int(present.sum())]
        return full
    local = LocalBatch(place(reply.local.theta), {name: place(v) for name, v in reply.local.extra.items()})
    return BatchReply(ids, place(reply.n), local, place(reply.loss_before), place(reply.loss_after),
                      place(reply.within_clip), place(reply.diverged))


def create_host_app(clients: Sequence[LocalClient] | None, token: str | None = None,
                    description: str = "", server_name: str | None = None, owner_name: str | None = None,
                    population: Population | None = None, batch: bool = True,
                    dropout: Dropout | None = None) -> Flask:
    """Serve ``clients`` as /clients/1 … /clients/K, and ``population``
    (default: the population of exactly their rows, ``Population.of``) at
    POST /batch/train, which each client's /health then advertises
    (``batch``: false, neither). ``clients`` None: the population's own
    clients (``Population.clients``: each built when first called, so a
    million cost nothing at start). With a ``token``, what
    the clients' data gives away (the pooled line of every row, a CSV's
    path in ``description``) is only for requests that carry it. With
    ``server_name`` (served over TLS), each client's /train, /evaluate and
    /secagg/*, and /batch/train, answer only the caller whose certificate names it; with
    ``owner_name``, each client's page only the certificate naming that
    (the host's own: its owner's). With ``dropout``, its clients drop out
    of rounds and straggle as it draws (``fedavg.dropout``), on both paths."""
    app = Flask(__name__)
    # 4 MiB: a client's /train; for /batch/train, about 130,000 client numbers with their seeds.
    app.config["MAX_CONTENT_LENGTH"] = 4 * 1024 * 1024
    install_json_errors(app)
    install_request_guards(app)
    if clients is None and population is None:
        raise ValueError("clients: give the clients, or a population (clients=None)")
    population = population if population is not None else Population.of(clients)
    memory = population.memory()
    # One c_k per client, whichever way the server calls it: its own /train keeps it in its row of the
    # memory /batch/train reads and writes (a client hosted before brings what it kept there).
    own = clients is None  # a population's own clients: named by their index, so /population can describe them
    if own:
        clients = population.clients(memory)
    else:
        for k, client in enumerate(clients):
            client.memory.move_to(memory.of(k))
    batches = threading.BoundedSemaphore(MAX_TRAININGS)  # as each client's slots: a round and one more
    calls: Counter[str] = Counter()  # the training calls answered, for /health: how the server called
    calls_lock = threading.Lock()

    def count(what: str) -> None:
        with calls_lock:
            calls[what] += 1

    def pick(values: dict[str, Any]) -> LocalClient:
        k = values.pop("k")
        if not 1 <= k <= len(clients):
            raise NotFound(f"no client {k} on this host (it has 1..{len(clients)})")
        g.k = k
        return clients[k - 1]

    def advertise() -> dict[str, Any]:
        return {"batch": {"path": BATCH_PATH, "id": g.k}}

    app.register_blueprint(client_blueprint(pick, token, url_prefix="/clients/<int:k>", server_name=server_name,
                                            owner_name=owner_name, health_extra=advertise if batch else None))

    @app.before_request
    def count_train() -> Any:
        if request.endpoint == "client.train" and request.method == "POST":
            count("train")
            if dropout is not None:
                return simulated(g.k)
        return None

    def simulated(k: int) -> Any:
        """A client's /train as its simulated dropout or straggling has it:
        an error reply for a client that left the round; for a straggler, a
        real wait of ``straggle_s`` (up to the server's deadline: past it,
        the 408 of a client whose deadline passed); None: answer as usual."""
        require_peer(server_name)  # (who may not train it learns nothing of its simulation either)
        require_token(token)
        body = request.get_json(silent=True)
        round_no = body.get("round") if isinstance(body, dict) else None
        if not isinstance(round_no, int) or isinstance(round_no, bool):
            return None  # the client's own parser names what is wrong with the body
        ks = np.array([k + population.first])  # its global number: the same draw whatever the shards
        if dropout.dropped(round_no, ks)[0]:
            return {"error": dropout.why_dropped(round_no, k + population.first)}, 503
        if dropout.straggles(round_no, ks)[0]:
            deadline_s = requested_deadline_s()
            late = deadline_s is not None and dropout.straggle_s >= deadline_s
            threading.Event().wait(min(dropout.straggle_s, deadline_s) if deadline_s is not None
                                   else dropout.straggle_s)  # the straggler's extra time, really spent
            if late:
                return {"error": f"the server's deadline passed: simulated straggler, {dropout.straggle_s:g} s "
                                 "more than the others (the host's --straggle-s)"}, 408
        return None

    # θ* of every client's rows at once: what only a simulation knows (the chart draws one feature).
    # Solved when first asked for. A population's own clients (up to a million): from the normal
    # equations of their statistics, θ* = (Σ_k X̃_kᵀX̃_k)⁻¹ Σ_k X̃_kᵀy_k, since lstsq over all the rows
    # holds copies of them (1 GB more at a million clients, the server asks at its start).
    @functools.cache
    def pooled_line() -> dict[str, float] | None:
        if population.num_features != 1:
            return None
        if own:
            w, b = np.linalg.solve(population.xtx.sum(axis=0), population.xty.sum(axis=0))
        else:
            w, b = pooled_optimum([(population.X, population.y)])
        return {"w": float(w), "b": float(b)}

    @app.get("/health")
    def health():
        """Liveness for anyone; the scenario (with --scenario csv, the file's
        absolute path), the rows in all and the training calls answered
        (``calls``: /batch/train, and every client's /train), without a
        token or with it, and over TLS to the server only (as /scenario)."""
        alive = {"status": "ok", "clients": len(clients)}
        if token is not None and not has_token(token):
            return alive
        if server_name is not None and not peer_allowed(peer_names(request.environ), server_name):
            return alive
        return {**alive, "scenario": description, "data_size": int(population.sizes.sum()),
                "calls": {"batch_train": calls["batch_train"], "train": calls["train"]}}

    @app.get("/openapi.json")
    def openapi():
        return host_document(len(clients), population.num_features, batch)

    @app.get("/scenario")
    def scenario():
        """What only a simulation can say: the least-squares line of all its
        clients' rows pooled (one feature only). The server's page may draw
        it, labelled as outside knowledge; no run ever reads it. With a
        token, only for who has it: the line of a user's CSV is a fact of
        its rows; over TLS, only for the server, as the clients' /evaluate."""
        require_peer(server_name)
        require_token(token)
        return {"scenario": description, "simulated": True, "clients": len(clients), "pooled_line": pooled_line()}

    if own:
        @app.get(POPULATION_PATH)
        def describe_population():
            """Every client here in one reply, what each one's /health would
            say of it (a server reaching a million clients by index asks this
            once, not a million /health): K, the global index of the first
            (``first_id``, 1-based: a shard's), how many of the first are
            attackers (client k is named attacker_{first_id+k−1} or
            sim_{first_id+k−1}), num_features, the rows in all, the strategies,
            secagg, the batched /train's path, and n_k of every client as one
            int64 array (``batch_wire.encode_array``). Guarded as the private
            part of /health and /scenario: the token, over TLS the server's
            certificate."""
            require_peer(server_name)
            require_token(token)
            return {"clients": population.size, "first_id": population.first + 1,
                    "attackers": population.attackers, "num_features": population.num_features,
                    "data_size": int(population.sizes.sum()), "strategies": list(STRATEGIES), "secagg": True,
                    "batch": BATCH_PATH if batch else None, "sizes": encode_array(population.stated_sizes())}

        @app.post(BATCH_EVALUATE_PATH)
        def batch_evaluate():
            """/evaluate of every client here at once, as sums (all the
            federated loss needs): ``loss_sum`` Σ n_k·L_k(θ) and
            ``data_size`` N = Σ n_k over the ``clients`` whose loss is finite
            (n_k as each client's /evaluate states it), and how many were not
            (``not_finite``: each one's /evaluate would be a 422)."""
            require_peer(server_name)
            require_token(token)
            w, b = parse_evaluate_request(json_body(), population.num_features)
            losses, n = population.evaluate_all(np.append(w, b))
            ok = np.isfinite(losses)
            return {"clients": int(ok.sum()), "data_size": int(n[ok].sum()), "loss_sum": float(n[ok] @ losses[ok]),
                    "not_finite": int((~ok).sum())}

    @app.get("/clients")
    def urls():
        """The path of every client here, for the server's client list."""
        return {"clients": [f"/clients/{k}" for k in range(1, len(clients) + 1)]}

    if batch:
        @app.post(BATCH_PATH)
        def batch_train():
            """/train for many of the clients here at once: the population's
            vectorised ``train``, its arrays as base64 (``batch_wire``)."""
            require_peer(server_name)
            require_token(token)
            deadline_s = requested_deadline_s()
            asked = parse_batch_request(json_body(), population.num_features, population.size)
            task = asked.task if deadline_s is None else replace(asked.task, deadline=time.monotonic() + deadline_s)
            if not batches.acquire(blocking=False):
                return ({"error": f"busy: {MAX_TRAININGS} batches already in progress; try again later"}, 429,
                        {"Retry-After": "1"})
            try:
                count("batch_train")
                if task.past_deadline():  # (the vectorised training has no epoch to stop between)
                    return {"error": "the server's deadline passed before training started"}, 408
                absent = absent_rows(task.round, asked.ids + 1, deadline_s)
                reply = train_present(task, asked, absent)
            except TrainingStopped as e:  # mini-batches train client by client, and stop between epochs
                return {"error": f"the server's deadline passed: training {e}"}, 408
            finally:
                batches.release()
            return batch_reply_json(reply, task.config.strategy, diverged_error(task.config.lr), absent)

    def train_present(task: Any, asked: Any, absent: dict[int, str]) -> BatchReply:
        """The batch trained but for its absent clients, which train nothing
        and keep nothing (as their own /train, refused before training):
        their rows zeros, which the reply's ``absent`` says to ignore."""
        present = ~np.isin(asked.ids + 1, np.array(list(absent), dtype=np.int64))
        if present.all():
            return population.train(task, asked.ids, memory, asked.seeds)
        if not present.any():  # shapes only, from a memory nobody keeps
            return with_absent_rows(population.train(task, asked.ids[:1], population.memory(),
                                                     asked.seeds and asked.seeds[:1]), asked.ids, present)
        seeds = None if asked.seeds is None else [s for s, p in zip(asked.seeds, present) if p]
        return with_absent_rows(population.train(task, asked.ids[present], memory, seeds), asked.ids, present)

    def absent_rows(round_no: int | None, ks: np.ndarray, deadline_s: float | None) -> dict[int, str]:
        """k → why client k's row holds no result: its simulated dropout, or
        (without sleeping) a straggler whose extra time passes the deadline."""
        if dropout is None or round_no is None:
            return {}
        drawn = ks + population.first  # by global number, as each client's /train: whatever the shards
        absent = {int(k): dropout.why_dropped(round_no, int(k) + population.first)
                  for k in ks[dropout.dropped(round_no, drawn)]}
        if deadline_s is not None and dropout.straggle_s >= deadline_s:
            for k in ks[dropout.straggles(round_no, drawn)]:
                absent.setdefault(int(k), dropout.why_late(deadline_s))
        return absent

    return app
