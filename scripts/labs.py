"""What the labs share (make compare, make privacy): federations in this
process, and runs spread over worker processes.

A lab's federation is the server app over a scenario's clients served by a
client host app, both in this process (``fedavg_server.inprocess``), driven
through the server's own API with the /start bodies a real server takes:
the same code a federation of processes runs, without the sockets. One run
keeps one core busy, so the runs go to one worker process per core, each
holding federations of its own.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flask.testing import FlaskClient

from fedavg.client import LocalClient
from fedavg_server.inprocess import federation_app

Task = TypeVar("Task")
Result = TypeVar("Result")


def federation(clients: list[LocalClient], db: str) -> FlaskClient:
    """The server app over ``clients`` served by a client host app, both in
    this process, its history in ``db``: its API through Flask's test client."""
    return federation_app(clients, db).test_client()


def close(http: FlaskClient) -> None:
    """What the server does when it stops (a worker's federations end with its process)."""
    fed = http.application.extensions["fedavg"]
    fed.shutdown()
    fed.transport.close()
    fed.store.close()


def processes() -> Any:
    """multiprocessing's fork where there is one: a child starts with this
    process's imports (NumPy, Flask, the server) instead of importing them
    again, a second of CPU each."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def default_jobs() -> int:
    return os.cpu_count() or 2


class Progress:
    """A lab's runs counted as they end, a line each: ``[i/n]``, the time so
    far and an estimate of the time left, elapsed·(work left)/(work done),
    a run's work its ``costs`` entry (clients × rounds, say: the runs of a
    lab differ; equal costs make it elapsed·(n − i)/i). Elapsed is wall
    time, so runs side by side are counted as they run. ``clock`` is
    time.monotonic but for a test."""

    def __init__(self, costs: Sequence[float], clock: Callable[[], float] = time.monotonic) -> None:
        self.costs, self.clock, self.started = list(costs), clock, clock()
        self.done, self.work_done = 0, 0.0

    def line(self, i: int, what: str) -> str:
        """Run ``i`` ended, ``what`` says how → "[done/n] what (t s so far, about r s left)"
        ("under a second left" below half a second; "(t s, all done)" after the last)."""
        self.done += 1
        self.work_done += self.costs[i]
        elapsed = self.clock() - self.started
        if self.done == len(self.costs):
            return f"[{self.done}/{self.done}] {what} ({elapsed:.1f} s, all done)"
        left = elapsed * (sum(self.costs) - self.work_done) / self.work_done
        estimate = f"about {left:.0f} s left" if left >= 0.5 else "under a second left"
        return f"[{self.done}/{len(self.costs)}] {what} ({elapsed:.1f} s so far, {estimate})"


def spread(tasks: Sequence[Task], start: Callable[[], Any], work: Callable[[Any, Task], Result], jobs: int,
           report: Callable[[int, Result], None] = lambda i, r: None,
           meanwhile: Callable[[], None] = lambda: None) -> list[Result]:
    """``work(state, task)`` for every task, in ``tasks``' order; ``state`` is
    what ``start()`` builds (a worker's federations). With ``jobs`` 1 all in
    this process; else in ``jobs`` worker processes, each with a state of its
    own, each taking the next task as soon as its last one ended.
    ``report(i, result)`` as each ends; ``meanwhile`` runs in this process
    while the workers work."""
    results: list[Any] = [None] * len(tasks)
    if jobs == 1:
        state = start()
        for i, task in enumerate(tasks):
            results[i] = work(state, task)
            report(i, results[i])
        meanwhile()
        return results
    with processes().Pool(jobs, _start_worker, (start, work)) as pool:
        done = pool.imap_unordered(_work_in_worker, list(enumerate(tasks)))
        meanwhile()
        for i, result in done:
            results[i] = result
            report(i, result)
    return results


# A worker process's state and work (spread with jobs > 1), set by _start_worker.
_worker: dict[str, Any] = {}


def _start_worker(start: Callable[[], Any], work: Callable[[Any, Any], Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the pool
    _worker["work"] = work
    try:
        _worker["state"] = start()
    except Exception as e:  # raised by the first task: a pool only restarts a worker whose start fails, for ever
        _worker["error"] = e


def _work_in_worker(task: tuple[int, Any]) -> tuple[int, Any]:
    if "error" in _worker:
        raise _worker["error"]
    i, job = task
    return i, _worker["work"](_worker["state"], job)
