"""Rounds that lost many clients to timeouts, said loudly.

A client dropped now and then is in the run's ``warnings``, one line per
client. A round in which a large share of the sampled clients timed out is
another matter: the timeout does not fit the round (the issue's K = 10,000
lost 3,243 clients in one round to the default 10 s, and the run read
``completed``). Such a round writes a WARNING line to the log at once, and
the run's summary (``GET /runs/<id>``, ``/start`` with ``wait``, the page)
carries a ``timeouts`` field, built here from the rounds' own counts.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from fedavg.model import Theta
from fedavg.strategies import Step

from .collect import Collected
from .stage import Stage
from .transport import Transport, is_timeout

log = logging.getLogger("fedavg.server")

# The share of a round's sample lost to timeouts that is said loudly. Below
# it, a few slow clients are the per-client warnings' business (a sample
# drawn from a population has stragglers); at a tenth, the round's N and
# its average rest on visibly fewer clients than were drawn, and the cause
# is a setting, not a client.
LOUD_SHARE = 0.10
# The loud rounds the summary lists (after them, only their count): a long
# run where every round times out must not make its summary long.
LISTED_ROUNDS = 20


def loud(timed_out: int, sampled: int) -> bool:
    """Whether a round that sampled ``sampled`` clients and lost
    ``timed_out`` of them to timeouts says so loudly: timed_out / sampled ≥ LOUD_SHARE."""
    return sampled > 0 and timed_out >= LOUD_SHARE * sampled


def advice(timeout_s: float, max_parallel: int | None) -> str:
    """What to change when clients time out."""
    at_once = "" if max_parallel is None else f" (now {max_parallel})"
    return (f"raise client_timeout_s (now {timeout_s:g} s), or lower the server's --max-parallel{at_once} if "
            "the clients share a host that answers fewer calls at once")


class TimeoutWatch(Stage):
    """Counts each round's clients dropped for timeouts (``is_timeout``:
    no reply within the deadline, never called, or a client's own 408) and
    writes the count into the round's record (``timeouts``: timed_out,
    sampled) when there are any; a round at or over LOUD_SHARE logs a
    WARNING line with the count, the share and what to change."""

    def __init__(self, timeout_s: float, transport: Transport) -> None:
        self.timeout_s = timeout_s
        self.max_parallel = getattr(transport, "max_parallel", None)  # (the in-process transport has none)
        self.sampled = 0
        self.timed_out = 0

    def drawn(self, r: int, sample: list[str]) -> None:
        self.sampled = len(sample)

    def received(self, r: int, theta: Theta, got: Collected) -> None:
        self.timed_out = sum(1 for d in got.dropped if is_timeout(d.reason))
        if loud(self.timed_out, self.sampled):
            log.warning("Round %d WARNING: %d of %d sampled clients (%.0f%%) timed out and were dropped: %s",
                        r, self.timed_out, self.sampled, 100 * self.timed_out / self.sampled,
                        advice(self.timeout_s, self.max_parallel))

    def after(self, r: int, theta: Theta, got: Collected, step: Step) -> tuple[Step, dict[str, Any]]:
        if not self.timed_out:
            return step, {}
        return step, {"timeouts": {"timed_out": self.timed_out, "sampled": self.sampled}}


@dataclass
class TimeoutTally:
    """A run's loud rounds, counted incrementally from the stored rounds'
    ``timeouts`` parts (``RunStore.timeout_counts``), like the drop tally."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    last_round: int = 0
    rounds: int = 0  # loud rounds
    timed_out: int = 0  # clients dropped for timeouts in them
    worst: dict[str, Any] | None = None
    listed: list[dict[str, Any]] = field(default_factory=list)

    def add(self, upto: int, counts: list[tuple[int, int, int]]) -> None:
        """Add (round, timed out, sampled) of the rounds up to ``upto``."""
        for r, timed_out, sampled in counts:
            if not loud(timed_out, sampled):
                continue
            one = {"round": r, "timed_out": timed_out, "sampled": sampled}
            self.rounds += 1
            self.timed_out += timed_out
            if self.worst is None or timed_out / sampled > self.worst["timed_out"] / self.worst["sampled"]:
                self.worst = one
            if len(self.listed) < LISTED_ROUNDS:
                self.listed.append(one)
        self.last_round = upto

    def summary(self, timeout_s: float) -> dict[str, Any] | None:
        """The run's ``timeouts`` field: None when no round was loud; else
        how many rounds and clients, the worst round, the first
        LISTED_ROUNDS rounds, and ``message``, the line that says it."""
        if not self.rounds or self.worst is None:
            return None
        w = self.worst
        message = (f"{self.rounds} round(s) lost at least {LOUD_SHARE:.0%} of their sampled clients to timeouts "
                   f"({self.timed_out} client call(s) in all; worst: round {w['round']}, {w['timed_out']} of "
                   f"{w['sampled']}, {w['timed_out'] / w['sampled']:.0%}): {advice(timeout_s, None)}")
        return {"rounds": self.rounds, "timed_out": self.timed_out, "worst": w, "listed": self.listed,
                "message": message}
