"""Why a run goes wrong, in the user's terms: the diagnosis stage.

Every round it flags the clients whose update is far larger than the
others' (``suspicious``, under any aggregator), and remembers which of them
alone explain a leap of the model (the culprits) and by how much the model
leapt (the jump). When a client's training diverges, the model stops being
finite, or the federated loss does, it ends the run ``diverged`` with the
likeliest cause: the lr, mu, a starting model too large for any lr, or an
outlier a robust rule would have held.

It also ends a run that is diverging long before anything overflows, from
three facts it is given every round (``_unstable``):

1. A client's own loss grew over its local epochs. Full-batch gradient
   descent on its MSE L_k (+ FedProx's mu/2·‖θ − θ_t‖²), a quadratic with
   Hessian H = H_k (+ mu·I), changes the loss by a step's
   −lr·‖g‖² + lr²/2·gᵀHg ≤ −lr·‖g‖²·(1 − lr·λ_max(H)/2): it cannot grow
   unless lr·λ_max(H) > 2, and then the error along that eigenvector grows
   by |1 − lr·λ_max| > 1 a step. So loss_after > loss_before proves that
   this lr is too large for that client's data.
2. The federated loss of the current model is above that of the model the
   run started from, on the same clients.
3. The global model's last step ‖θ_t − θ_{t−1}‖ is longer than the one
   before it, which the server measures itself.

(1) and (2) are what the clients say; (3) is what the server saw. None
alone, nor (1) and (2) together, proves the run diverges. (1) alone:
averaging can cancel one client's unstable direction (on the seed, E = 1 is
gradient descent on the pooled data, stable up to lr 0.12, while client_2's
own steps diverge from lr 0.074). (2) alone: a run that started near the
pooled optimum can settle on a worse fixed point (client drift); with (1)
too (started at the optimum, lr 0.075, E = 2) it still converges, with
steps that shrink. And one client can report (1) and (2) falsely. But when
every client is stable (lr·λ_max(H_k) < 2 for all k), each ‖A_k^E‖ ≤ 1 and
FedAvg's round map θ ← Σ_k p_k A_k^E θ + c cannot diverge: divergence always
shows (1), a diverging model's loss grows without bound, so (2) follows, and
the steps δ_t = M·δ_{t−1} of an unstable map grow, (3); a converging one's
shrink. So the run ends at the first round with all three, from round 3
(two steps to compare). (1) is read only from that training: full batch, no
correction of the steps (SCAFFOLD's c − c_k), no noise added by the client
(DP's local_noise). Every run, those included (and a server step that
overshoots, FedAvgM's momentum or FedAdam's steps, while every client's
training is stable), is also ended by a runaway (``_runaway``): for RUNAWAY
rounds in a row the global model's norm at least doubled and the federated
loss grew, to above the start's. A converging run does neither for long:
its model approaches a fixed point (so ‖θ‖ cannot double again and again)
and its loss settles; an unstable linear map grows both by a steady factor a
round. The cause named is an outlier when one alone explains the leaps, else
the lr, or server_lr when no client's own loss grew (fact 1 clears the lr).

Under DP a run records only what the mechanism releases (PRIVACY.md), and
the error is recorded with it: it then says how many clients' own loss grew
or which updates stood out, never whose, nor their losses or norms, nor a
federated loss (it may be one client's).
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from fedavg.aggregation import outliers, update_norms
from fedavg.model import Theta
from fedavg.strategies import Result, Step, Strategy

from .collect import Collected
from .settings import RunSettings
from .stage import RunStopped, Stage

# A weight this large is no model anyone trained: the sign of an attack or a
# typo, not of a learning rate (the largest double is ~1.8e308).
ABSURD = 1e100
# A model that grows this much in one round was pushed, not trained: an lr
# too large grows it by a steady factor a round, far less than this.
SUDDEN = 1e6
# An honest client's update moves the model by at most this many times its
# size (+1); an lr too large moves every client's by far more.
CALM = 10.0
# Rounds in a row in which ‖θ‖ at least doubled and the federated loss grew:
# a runaway (×16 at least), which no converging run shows.
RUNAWAY = 4


class Diagnosis(Stage):
    def __init__(self, strategy: Strategy, s: RunSettings, first_round: int) -> None:
        self.strategy = strategy
        self.lr, self.mu, self.epochs, self.batch_size = s.lr, s.mu, s.local_epochs, s.batch_size
        self.rounds = s.rounds
        self.first_round = first_round
        # Does a client's loss growing over its local epochs prove the lr too large (fact 1 above)?
        self.descent = type(strategy).descends_own_loss and not (s.dp and s.dp.local_noise)
        self.private = s.dp is not None  # the error is written down: no client's own number in it
        # Fact 2's reference: (L_k, n_k) of the model this run started (or resumed) from,
        # by url, as the first round's replies measured it.
        self.start: dict[str, tuple[float, int]] = {}
        self.origin = ("the model the run started from" if first_round == 1 else
                       f"the model it resumed from (round {first_round - 1}'s)")
        self.grew: list[Result] = []  # the last round's clients whose own loss grew (fact 1)
        self.descended = 0  # how many of the last round's replies fact 1 could be read from
        self.read = 0  # that round
        # The last round's outliers that alone explain a leap (the others moved
        # as trained models do): a lead when the next round blows up.
        self.culprits: list[dict[str, Any]] = []
        self.jump = 1.0  # ‖θ_{t+1}‖ / ‖θ_t‖ of the last round: a sudden leap is no learning rate's doing
        self.steps: list[float] = []  # ‖θ_r − θ_{r−1}‖ of the last two rounds (fact 3)
        # Round → (‖θ_r‖, its federated loss) over the last RUNAWAY + 1 rounds measured: a runaway's trail.
        self.norms: dict[int, float] = {}
        self.trail: list[tuple[int, float, float]] = []

    def received(self, r: int, theta: Theta, got: Collected) -> None:
        """A client whose local training blew up: averaging on without it
        would only hide why. Which was it: the lr, mu, or a model that was
        already absurd when it arrived?"""
        diverged = [d.client_id for d in got.dropped if d.diverged]
        if diverged:
            raise RunStopped("diverged", f"round {r}: local training diverged on {', '.join(diverged)}: "
                                         f"{self._why(r, theta)}")
        certain = [x for x in got.results if self._certifies(x)]
        self.descended, self.grew, self.read = len(certain), [x for x in certain if _loss_grew(x)], r
        if r == self.first_round:
            self.start = {x.url: (x.metrics["loss_before"], x.n) for x in got.results
                          if x.metrics and x.metrics.get("loss_before") is not None}
            return
        # Fact 2 on the clients that measured both models: round r's replies measured θ_t = round r−1's model.
        now = {x.url: (x.metrics["loss_before"], x.n) for x in got.results
               if x.url in self.start and x.metrics and x.metrics.get("loss_before") is not None}
        if self.grew and now and self._steps_grew():
            self._unstable(f"round {r}: ", f"round {r - 1}'s model", _average(now.values()),
                           _average(self.start[url] for url in now), len(now))

    def measured(self, round_no: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise RunStopped("diverged", f"the federated loss of round {round_no}'s model is no longer finite: "
                                         f"{self._lr_cause()}")
        # The last round's model has no next round: the final evaluation measures it on every
        # client, comparable with the start's loss when every client measured that too.
        if round_no == self.rounds and self.grew and len(self.start) == self.strategy.num_clients \
                and self._steps_grew():
            self._unstable("", f"the final model (round {round_no})", loss, _average(self.start.values()),
                           len(self.start))
        self._runaway(round_no, loss)

    def _steps_grew(self) -> bool:
        """Fact 3: the global model's last step is longer than the one before."""
        return len(self.steps) == 2 and self.steps[1] > self.steps[0]

    def _runaway(self, round_no: int, loss: float) -> None:
        """Ends the run when, over the last RUNAWAY rounds, ‖θ_r‖ ≥ 2·‖θ_{r−1}‖
        and L(θ_r) > L(θ_{r−1}) each round, and L(θ_r) is above the loss of the
        model the run started from (or, without it, the first one measured)."""
        if round_no not in self.norms:
            return
        if self.trail and self.trail[-1][0] != round_no - 1:
            self.trail = []  # a round without a loss breaks the trail
        self.trail = [*self.trail, (round_no, self.norms.pop(round_no), loss)][-(RUNAWAY + 1):]
        start = _average(self.start.values()) if self.start else self.trail[0][2]
        steps = list(zip(self.trail, self.trail[1:]))
        if len(steps) < RUNAWAY or loss <= start or \
                not all(b[1] >= 2 * a[1] and b[2] > a[2] for a, b in steps):
            return
        (r0, norm0, loss0), (r1, norm1, _) = self.trail[0], self.trail[-1]
        losses = ("" if self.private else  # under DP a federated loss may be one client's own
                  f", from {loss0:.4g} to {loss:.4g} (the start's: {start:.4g})")
        raise RunStopped("diverged", f"the global model is running away: its norm grew {norm1 / norm0:.3g}× from "
                                     f"round {r0} to round {r1} ({norm0:.4g} to {norm1:.4g}, at least doubling every "
                                     f"round) and the federated loss with it{losses}: {self._outlier_or_lr()}")

    def _outlier_or_lr(self) -> str:
        """The cause of a model that grows round after round: the outliers
        that alone explained its last leap, else the lr (or server_lr)."""
        if self.culprits:
            return (f"{self._named(self.culprits)} stood out: an outlier, not the lr; a robust aggregator "
                    "(median, trimmed_mean, krum) or clip_norm would hold")
        return self._lr_cause()

    def _certifies(self, result: Result) -> bool:
        """Can fact 1 be read from this reply: local training that is
        full-batch gradient descent on its own loss, both losses measured?"""
        full_batch = self.batch_size is None or self.batch_size >= result.n
        m = result.metrics or {}
        return self.descent and full_batch and "loss_before" in m and "loss_after" in m

    def _lr_cause(self, data: str = "this data") -> str:
        """Why numbers overflowed when no outlier explains it: the lr, unless
        the last round showed every client's own training stable (no loss grew,
        fact 1) under a strategy with a server step: that step overshoots."""
        if self.descended and not self.grew and "server_lr" in self.strategy.p:
            return (f"no client's own loss grew over its local epochs at lr={self.lr:g} in round {self.read}, so "
                    f"the lr suits their data and the server's step overshoots: try a smaller server_lr "
                    f"(now {self.strategy.p['server_lr']:g})")
        return f"lr={self.lr:g} is too large for {data}; try a smaller lr"

    def _unstable(self, where: str, model: str, now: float, then: float, clients: int) -> None:
        """Ends the run when the federated loss ``now`` is above ``then``, the
        start's on the same clients, while a client's training at this lr
        raised its own loss and the model's steps grow (the three facts of the
        module's docstring; the caller has checked the first and the third)."""
        if not now > then:
            return
        steps = f"its last step {self.steps[1]:.4g} long, after {self.steps[0]:.4g}"
        if self.culprits:  # an outlier pushed the model: what the clients say of their losses is beside the point
            raise RunStopped("diverged", f"{where}the global model's steps grow ({steps}): {self._outlier_or_lr()}")
        worst = sorted(self.grew, key=lambda x: x.metrics["loss_after"] / max(x.metrics["loss_before"], 1e-300),
                       reverse=True)
        grown = ", ".join(f"{x.client_id}'s own loss grew from {x.metrics['loss_before']:.4g} to "
                          f"{x.metrics['loss_after']:.4g}" for x in worst[:3])
        more = f" (and {len(worst) - 3} more clients')" if len(worst) > 3 else ""  # the steepest growth first
        if self.private:
            grown, more = f"the own loss of {len(worst)} of the {self.descended} clients grew", ""
        if self.mu and self.lr * self.mu >= 2:
            cause = f"mu={self.mu:g} is too large for lr={self.lr:g} (lr·mu ≥ 2 overshoots); try a smaller mu"
        else:
            cause = (f"lr={self.lr:g} is too large for this data" + (f" with mu={self.mu:g}" if self.mu else "")
                     + "; try a smaller lr")
        hessian = "its data's Hessian" + (" + mu·I" if self.mu else "")
        above = ("is above that" if self.private else  # under DP a federated loss may be one client's own
                 f"is {now:.4g}, above the {then:.4g}")
        raise RunStopped("diverged", f"{where}the federated loss of {model} {above} of {self.origin} (on the same "
                                     f"{clients} client(s)) and the model's steps grow ({steps}); "
                                     f"{grown}{more} over {self.epochs} local epoch(s) at lr={self.lr:g}, which "
                                     f"gradient descent does only when lr·λ_max > 2 (λ_max: the largest "
                                     f"eigenvalue of {hessian}): {cause}")

    def after(self, r: int, theta: Theta, got: Collected, step: Step) -> tuple[Step, dict[str, Any]]:
        suspects, culprits = self._outliers(theta, got.results)
        if not np.all(np.isfinite(step.theta)):
            if culprits:
                raise RunStopped("diverged", f"round {r}: the aggregate is no longer finite: "
                                             f"{self._named(culprits)}; an outlier, not the lr: a robust aggregator "
                                             "(median, trimmed_mean, krum) or clip_norm would hold")
            raise RunStopped("diverged", f"round {r}: the global model is no longer finite: {self._lr_cause()}")
        before, after = update_norms([theta, step.theta])
        self.culprits, self.jump = culprits, after / max(before, 1.0)
        self.norms = {r: after}  # its loss is measured next round (or by the final evaluation)
        self.steps = [*self.steps, float(np.linalg.norm(step.theta - theta))][-2:]
        return step, {"suspicious": suspects}

    def _why(self, r: int, theta: Theta) -> str:
        """The likeliest cause of a client's local training blowing up."""
        size = float(np.max(np.abs(theta)))
        if size > ABSURD and r == self.first_round:
            return f"the starting model has a weight of {size:.3g}, too large for any lr"
        if size > ABSURD and self.jump > SUDDEN and self.culprits:
            return (f"it started from a global model with a weight of {size:.3g}, {self.jump:.3g}× the one before, "
                    f"which round {r - 1}'s aggregate took from {self._named(self.culprits)}: an outlier, not the lr; "
                    "a robust aggregator (median, trimmed_mean, krum) or clip_norm would hold")
        if self.mu and self.mu * self.lr >= 2:
            return f"mu={self.mu:g} is too large for lr={self.lr:g} (lr·mu ≥ 2 overshoots); try a smaller mu"
        return self._lr_cause("its data")

    def _named(self, suspects: list[dict[str, Any]]) -> str:
        """The outliers with their norms; under DP only how many (no update's norm is written)."""
        return _named(suspects, self.private)

    def _outliers(self, theta: Theta, results: list[Result]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The clients whose update (W_k − W_t, or the gradient they sent) is
        far larger than the others': flagged under any aggregator, FedAvg too.
        Also those of them that alone explain a leap of the model: outliers
        while every other client moved as trained models do (by less than
        CALM × (‖W_t‖ + 1)); when all move wildly, the lr is the likelier cause."""
        updates = [self.strategy.update_of(r, theta) for r in results]
        if any(u is None for u in updates) or len(updates) < 2:
            return [], []  # exact sends statistics, not an update
        norms = update_norms(updates)
        flagged = outliers(norms)  # an update whose norm overflows is among them: the most suspicious of all
        suspects = [{"client_id": results[k].client_id, "url": results[k].url, **_sized(norms[k], ratio)}
                    for k, ratio in flagged]
        others = [n for k, n in enumerate(norms) if k not in {j for j, _ in flagged}]
        calm = bool(others) and max(others) <= CALM * (update_norms([theta])[0] + 1)
        # A client whose own loss grew while it trained is diverging at this
        # lr on its own data: honest, and the lr's doing.
        culprits = [x for (k, _), x in zip(flagged, suspects) if not _loss_grew(results[k])]
        return suspects, culprits if calm else []


def _average(losses: Any) -> float:
    """Σ_k n_k·L_k / Σ_k n_k over (L_k, n_k) pairs: the federated loss of those clients."""
    pairs = list(losses)
    return sum(n * loss for loss, n in pairs) / sum(n for _, n in pairs)


def _loss_grew(result: Result) -> bool:
    m = result.metrics or {}
    return "loss_before" in m and "loss_after" in m and m["loss_after"] > m["loss_before"]


def _sized(norm: float, ratio: float) -> dict[str, Any]:
    """A flagged update's size as a record can hold it: JSON has no inf, so a
    norm beyond the largest float is written as that float, with "overflow"."""
    if math.isfinite(norm) and math.isfinite(ratio):
        return {"update_norm": float(norm), "ratio": float(ratio)}
    return {"update_norm": min(float(norm), sys.float_info.max), "ratio": min(float(ratio), sys.float_info.max),
            "overflow": True}


def _named(suspects: list[dict[str, Any]], private: bool = False) -> str:
    if private:
        return f"{len(suspects)} client(s)' update(s), far larger than the others'"
    return ", ".join(f"{x['client_id']} (update norm over {sys.float_info.max:.3g}, beyond the largest float)"
                     if x.get("overflow") else
                     f"{x['client_id']} (update norm {x['update_norm']:.3g}, {x['ratio']:.3g}× the others')"
                     for x in suspects[:6])
