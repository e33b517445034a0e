"""The privacy features' settings, as /start takes them: DP-FedAvg's ("dp")
and secure aggregation's ("secagg"). Each is a frozen dataclass whose
fields are declared once (``SPEC``: the parser, the OpenAPI schema and
PROTOCOL.md's tables), with the checks that tie its fields to the run's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedavg.privacy import COUNT_SENSITIVITY, update_noise_multiplier
from fedavg.secagg_graph import default_neighbors, default_threshold
from fedavg.spec import Param
from fedavg.strict_json import ProtocolError, expect_object
from fedavg.wire import SECAGG_SCALE_BITS, SECAGG_SCALE_RANGE

DP_DELTA = 1e-5
ADAPTIVE_QUANTILE = 0.5
ADAPTIVE_LR = 0.2


def parse_fields(obj: Mapping[str, Any], spec: tuple[Param, ...], path: str, problems: list[ProtocolError],
                 null_is_default: bool = False) -> dict[str, Any]:
    """Each field of ``spec`` that ``obj`` gives, parsed; each problem is
    added to ``problems``, and that field left out. With ``null_is_default``
    a null where null is not a value of the field's own takes its default."""
    out = {}
    for p in spec:
        if p.name not in obj or (null_is_default and obj[p.name] is None and not p.nullable):
            continue
        try:
            out[p.name] = p.parse(obj[p.name], f"{path}.{p.name}" if path else p.name)
        except ProtocolError as e:
            problems.append(e)
    return out


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clipping (Andrew et al., 2021): S tracks the quantile γ of the
    update norms, moving by η a round; σ_b is the noise on the count of
    unclipped updates (default: M/20, the paper's choice, or σ if larger)."""

    target_quantile: float = ADAPTIVE_QUANTILE
    lr: float = ADAPTIVE_LR
    count_noise: float = 0.0

    SPEC: ClassVar[tuple[Param, ...]] = (
        Param("target_quantile", ADAPTIVE_QUANTILE, "γ, the share of updates S should fit", gt=0, lt=1),
        Param("lr", ADAPTIVE_LR, "η, the step of S ← S·exp(−η(b̄ − γ))", gt=0, le=10),
        Param("count_noise", None, "σ_b, the noise on the count of unclipped updates; must be > noise_multiplier/2",
              ge=0, le=1e6, doc_default="max(M/20, σ)"),
    )


@dataclass(frozen=True)
class DPSettings:
    """DP-FedAvg (``fedavg.privacy``): W_{t+1} = W_t + (Σ_k clip_S(W_k − W_t) +
    N(0, σ²S²)) / M, M = fraction·K. ``expected`` (M) and
    ``update_noise_multiplier`` (σ, or z_Δ under adaptive clipping) follow
    from the others and the run's, and are stored with them."""

    noise_multiplier: float
    clip: float | None  # S; None = ∞
    delta: float = DP_DELTA
    target_epsilon: float | None = None
    local_noise: bool = False
    adaptive: AdaptiveClipping | None = None
    expected: float = 1.0
    update_noise_multiplier: float = 0.0

    SPEC: ClassVar[tuple[Param, ...]] = (
        Param("noise_multiplier", None, "σ: the noise on the sum of clipped updates is N(0, σ²S²); 0, or large "
                                          "enough for a finite ε", ge=0, le=1e6,
              doc_default="required"),
        Param("clip", None, "S, the L2 bound on each client's update W_k − W_t; `null` is ∞, only with σ = 0", gt=0,
              le=1e12, nullable=True, doc_default="required"),
        Param("delta", DP_DELTA, "δ of the (ε, δ) reported", gt=0, lt=1),
        Param("target_epsilon", None, "the budget: the run ends `budget_exhausted` before a round that would pass "
                                      "it (needs σ > 0)", gt=0, le=1e6, nullable=True),
        Param("local_noise", False, "each of the n clients a round samples clips and adds N(0, σ²S²/n) itself; "
                                    "the server sums, and adds the shares of clients lost in the round",
              type="boolean"),
        Param("adaptive", None, "adaptive clipping (Andrew et al., 2021): S tracks a quantile of the update norms "
                                "(next table); not with `local_noise`", type="AdaptiveClipping", nullable=True),
    )

    @classmethod
    def parse(cls, value: Any, fraction: float, num_clients: int, requirements: list[ProtocolError],
              problems: list[ProtocolError]) -> DPSettings | None:
        """The "dp" object of a /start body, defaults filled in; None (with
        every problem added to ``problems``) if it cannot work, or if the
        run's other settings do not meet DP's ``requirements``."""
        try:
            obj = expect_object(value, "dp", [p.name for p in cls.SPEC], ("noise_multiplier", "clip"))
        except ProtocolError as e:
            problems.append(e)
            return None
        found = len(problems)
        given = parse_fields(obj, cls.SPEC[:-1], "dp", problems, null_is_default=True)  # (adaptive: below)
        sigma = given.get("noise_multiplier", 0.0)
        expected = fraction * num_clients
        problems.extend(requirements)
        if obj.get("clip") is None and sigma > 0:
            problems.append(ProtocolError("dp.clip: noise is σ·S: it needs a finite clip bound S when "
                                          "noise_multiplier > 0"))
        if given.get("target_epsilon") is not None and sigma == 0:
            problems.append(ProtocolError("dp.target_epsilon: without noise (noise_multiplier = 0) ε is infinite"))
        if sigma > 0:
            cls._accountable(sigma, fraction, given.get("delta", DP_DELTA), problems)
        adaptive = None
        if obj.get("adaptive") is not None:
            if given.get("local_noise"):
                # Its bits would reach the server un-noised (or, under secure aggregation, their exact sum):
                # the server this mode does not trust would add the count's noise itself.
                problems.append(ProtocolError("dp.adaptive: adaptive clipping counts each client's bit "
                                              "(‖Δ_k‖ ≤ S) and the server noises the count, which local_noise does "
                                              "not trust it to do; use a fixed dp.clip with local_noise"))
            adaptive = cls._adaptive(obj["adaptive"], sigma, expected, obj.get("clip") is None, problems)
        if len(problems) > found:
            return None
        return cls(sigma, given["clip"], given.get("delta", DP_DELTA), given.get("target_epsilon"),
                   given.get("local_noise", False), adaptive, expected,
                   update_noise_multiplier(sigma, adaptive.count_noise) if adaptive else sigma)

    @staticmethod
    def _accountable(sigma: float, fraction: float, delta: float, problems: list[ProtocolError]) -> None:
        """σ > 0 must give a finite ε: a σ so small that the accountant's
        arithmetic overflows would report ∞, or (its own conversion) 0, for a
        run that adds next to no noise."""
        from .accountant import epsilon  # dp-accounting (with SciPy) only for runs that use it
        one_round = epsilon(fraction, sigma, 1, delta)
        if not math.isfinite(one_round):
            problems.append(ProtocolError(f"dp.noise_multiplier: σ = {sigma:g} is too small to account for: one "
                                          f"round's ε (q = {fraction:g}, δ = {delta:g}) is not a finite number; give "
                                          "a larger σ, or 0 for no noise (ε = ∞)"))

    @staticmethod
    def _adaptive(value: Any, sigma: float, expected: float, no_bound: bool,
                  problems: list[ProtocolError]) -> AdaptiveClipping | None:
        try:
            obj = expect_object(value, "dp.adaptive", [p.name for p in AdaptiveClipping.SPEC])
        except ProtocolError as e:
            problems.append(e)
            return None
        found = len(problems)
        given = parse_fields(obj, AdaptiveClipping.SPEC, "dp.adaptive", problems)
        if len(problems) > found:
            return None
        out = AdaptiveClipping(**{"count_noise": max(expected / 20, sigma), **given})
        if no_bound:
            problems.append(ProtocolError("dp.adaptive: adapts a finite clip bound; give dp.clip as its start"))
        # The count's own noise multiplier, count_noise / its sensitivity, must exceed σ: the
        # update's is then (σ⁻² − (count_noise / sensitivity)⁻²)^(−1/2) (update_noise_multiplier).
        if sigma > 0 and not out.count_noise / COUNT_SENSITIVITY > sigma:
            limit = sigma * COUNT_SENSITIVITY
            problems.append(ProtocolError(f"dp.adaptive.count_noise: must be > noise_multiplier/2 = {limit:g}, "
                                          f"so that the update keeps some of the noise; got {out.count_noise:g}"))
        return out

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> DPSettings:
        adaptive = stored.get("adaptive")
        return cls(**{**stored, "adaptive": None if adaptive is None else AdaptiveClipping(**adaptive)})


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation: each client masks with, and shares its secrets
    among, k others (SecAgg+'s graph; k = the clients a round asks − 1 is the
    complete graph, Bonawitz et al.'s protocol). t shares rebuild a secret,
    so t survivors are needed in a neighbourhood of k + 1, and fewer than t
    of a client's neighbours together learn nothing of it. Inputs are fixed
    point with s fractional bits."""

    neighbors: int
    threshold: int
    scale_bits: int = SECAGG_SCALE_BITS

    SPEC: ClassVar[tuple[Param, ...]] = (
        Param("neighbors", None, "k: Harary's graph H(k, n) over the round's n clients in an order drawn from OS "
                                 "entropy; k = n − 1 is Bonawitz et al.'s protocol; 1 only with 2 clients",
              type="integer", ge=1, doc_range="`[1, n−1]`",
              doc_default="n − 1 up to 20 clients (the complete graph), else 2⌈log2 n⌉"),
        Param("threshold", None, "t: shares that rebuild a client's secrets; t survivors are needed in each "
                                 "neighbourhood whose secret the unmasking needs, and fewer than t of a client's "
                                 "neighbours learn nothing of its input",
              type="integer", ge=2, doc_range="`[2, k+1]`", doc_default="a majority of k + 1"),
        Param("scale_bits", SECAGG_SCALE_BITS, "fixed point: inputs are integers mod 2^64 in units of 2^−s",
              type="integer", ge=SECAGG_SCALE_RANGE[0], le=SECAGG_SCALE_RANGE[1]),
    )

    @classmethod
    def parse(cls, value: Any, asked: int, problems: list[ProtocolError]) -> SecAggSettings | None:
        """``true`` for the defaults, or {"neighbors": k, "threshold": t,
        "scale_bits": s}, for rounds that ask ``asked`` clients."""
        try:
            obj = {} if value is True else expect_object(value, "secagg", [p.name for p in cls.SPEC])
        except ProtocolError as e:
            problems.append(e)
            return None
        found = len(problems)
        neighbors = cls.SPEC[0].bounded(le=max(asked - 1, 1))
        given = parse_fields(obj, (neighbors, *cls.SPEC[1:]), "secagg", problems)
        if len(problems) > found:
            return None
        k = given.get("neighbors", default_neighbors(asked))
        out = cls(k, given.get("threshold", default_threshold(k)), given.get("scale_bits", SECAGG_SCALE_BITS))
        if asked < 2:
            problems.append(ProtocolError(f"secagg: a round asks {asked} client; a sum of one client's input is that "
                                          "input (secure aggregation needs at least 2)"))
        elif k == 1 and asked > 2:
            problems.append(ProtocolError(f"secagg.neighbors: with 1 neighbour each the {asked} clients fall apart "
                                          "into pairs, and the server would learn each pair's sum (at least 2)"))
        if out.threshold > k + 1:
            problems.append(ProtocolError(
                f"secagg.threshold: {out.threshold} is more than the {asked} clients a round asks" if k == asked - 1
                else f"secagg.threshold: {out.threshold} is more than the {k + 1} clients of a neighbourhood (a "
                     f"client and its {k} neighbours): no secret could be rebuilt"))
        return out if len(problems) == found else None
