"""What a stage of the round is, and how a run stops.

A stage is a feature that joins the round at named points, like Flower's
mods: it keeps its own state, writes its own part of the round record, and
is absent from the loop's code when the run does not use it. The run calls
every stage at each point, in order; the base does nothing at any of them.
"""
from __future__ import annotations

from typing import Any

from fedavg.model import Theta
from fedavg.strategies import Step

from .collect import Collected
from .records import RoundRecord


class RunStopped(Exception):
    """The run cannot go on; ``status`` says how it ended (failed, diverged,
    interrupted, budget_exhausted)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class Stage:
    """A part of the round that one feature owns."""

    def describe(self) -> str | None:
        """Its line in the run's first lines of log."""
        return None

    def resume(self, last: dict[str, Any]) -> None:
        """Pick up its state from the last stored round's record."""

    def before(self, r: int) -> None:
        """Before round r asks anything (RunStopped to end the run there)."""

    def drawn(self, r: int, sample: list[str]) -> None:
        """Round r's sample is drawn; nobody is asked yet."""

    def config(self) -> dict[str, Any]:
        """What every /train config of the round carries for it (TrainConfig's fields)."""
        return {}

    def received(self, r: int, theta: Theta, got: Collected) -> None:
        """The round's replies are in, nothing aggregated yet."""

    def after(self, r: int, theta: Theta, got: Collected, step: Step) -> tuple[Step, dict[str, Any]]:
        """The strategy's step is taken: the step as it goes on (its trace and
        state may grow), and this stage's fields of the round record."""
        return step, {}

    def measured(self, round_no: int, loss: float) -> None:
        """Round ``round_no``'s federated loss is known."""

    def withholds_loss(self, clients: int) -> str | None:
        """Why a federated loss over ``clients`` clients may not be written
        down (None: it may). The stages still measure it."""
        return None

    def redact(self, record: RoundRecord) -> RoundRecord:
        """The round as it may be written down (stored, served, logged): a
        feature whose guarantee covers only part of what the round saw keeps
        the rest out of the record. Every stage's, in order, before the store."""
        return record

    def losses_written(self, losses: list[tuple[float, int]]) -> list[tuple[float, int]]:
        """The clients' (L_k, n_k) the log may write out beside the federated
        loss L = Σ n_k/N · L_k (none: L alone)."""
        return losses
