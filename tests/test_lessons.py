"""docs/lessons/, every number checked, so that the lessons cannot rot.

A lesson states numbers in two ways, and this file checks both:

- **A command's output**, a fenced block right after ``<!-- output: NAME -->``.
  OUTPUTS[NAME] runs the same request in this process (the seed's apps
  through the server's API, ``scripts/compare.py``'s and
  ``scripts/privacy.py``'s main) and the block must be a run of consecutive
  lines of what it prints; ``…`` in a block stands for what changes from run
  to run (a wall time, DP's noise) and matches any text. REFERENCES[NAME]
  then checks the block's numbers against plain Python written here
  (tests/reference.py's FedAvg, closed forms), never the code's own output.
- **A number in the text**, followed by ``<!-- check: NAME -->`` (an HTML
  comment: invisible on the rendered page). CHECKS[NAME] computes it in
  plain Python; the number must equal it to the digits written.

The rule that keeps a lesson honest: every number in the text outside code
(a decimal point or an exponent; any number in the exercises' answers
counts the same) is either tagged, or the same literal as a tagged number
or a number of one of the lesson's output blocks. Inline code (`"lr": 0.01`)
holds what the reader types, not claims.
"""
from __future__ import annotations

import io
import logging
import math
import re
import shlex
import statistics
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from test_byzantine import client_data

import compare
import privacy
from conftest import ROOT, Federated
from reference import SEED_DATA, local_gd, local_mse, reference_fedavg
from test_strategies import fedavg_closed_form, scaffold_reference
from test_strategies import pooled_line as least_squares_line

LESSONS_DIR = ROOT / "docs" / "lessons"
LESSONS = sorted(LESSONS_DIR.glob("0[1-9]-*.md"))

NUM = r"[−-]?\d+(?:\.\d+)?(?:e[−+-]?\d+)?"
TAGGED = re.compile(rf"({NUM})\s*<!--\s*check:\s*(\w+)\s*-->")
OUTPUT = re.compile(r"<!--\s*output:\s*(\w+)\s*-->\n```[^\n]*\n(.*?)```", re.S)
DECIMAL = re.compile(r"(?<![\w.])[−-]?\d+\.\d+(?:e[−+-]?\d+)?|(?<![\w.])\d+e[−+-]?\d+")


@dataclass
class Lesson:
    path: Path
    text: str

    @property
    def outputs(self) -> list[tuple[str, str]]:
        return OUTPUT.findall(self.text)

    @property
    def tags(self) -> list[tuple[str, str]]:
        """(written number, check name) for each tagged number."""
        return TAGGED.findall(self.text)

    def prose(self) -> str:
        """The text a reader reads as claims: without fenced blocks, inline code, links' targets."""
        text = re.sub(r"^```.*?^```", "", self.text, flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)
        text = re.sub(r"\]\([^)]*\)|<https?://[^>]*>", "", text)
        return text


def lesson(path: Path) -> Lesson:
    return Lesson(path, path.read_text(encoding="utf-8"))


def as_float(text: str) -> float:
    return float(text.replace("−", "-"))


def agrees(written: str, value: float) -> bool:
    """``written`` is ``value`` to the digits written: within half a unit of its last digit."""
    mantissa, _, exponent = written.replace("−", "-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    unit = 10.0 ** (int(exponent or 0) - decimals)
    return abs(as_float(written) - value) <= unit / 2 * (1 + 1e-9) + 1e-12 * abs(value)


# --- plain-Python references --------------------------------------------------------

SEED = [[(float(x), float(y)) for x, y in rows] for rows in SEED_DATA]


def one_step(data: list[tuple[float, float]], w: float, b: float, lr: float = 0.01) -> tuple[float, float]:
    return local_gd(data, w, b, lr, epochs=1)


def round_one() -> dict[str, float]:
    """Round 1 of the seed from (0, 0), by tests/reference.py's loops."""
    (w1, b1), (w2, b2) = (local_gd(d, 0.0, 0.0) for d in SEED)
    w, b = (w1 + w2) / 2, (b1 + b2) / 2
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w": w, "b": b}


def pooled_line(rows: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares through ``rows`` (test_strategies' cov/var line, on one client holding them all)."""
    w, b = least_squares_line([rows])
    return w, b


def lesson_1_checks() -> dict[str, float]:
    r = round_one()
    mse_1 = [local_mse(d, r["w"], r["b"]) for d in SEED]
    w_star, b_star = pooled_line([p for d in SEED for p in d])
    return {
        "c1_loss0": local_mse(SEED[0], 0.0, 0.0), "c2_loss0": local_mse(SEED[1], 0.0, 0.0),
        "c1_step1_w": one_step(SEED[0], 0, 0)[0], "c1_step1_b": one_step(SEED[0], 0, 0)[1],
        "c2_step1_w": one_step(SEED[1], 0, 0)[0], "c2_step1_b": one_step(SEED[1], 0, 0)[1],
        "r1_2w": 2 * r["w"], "c1_loss_r1": mse_1[0], "c2_loss_r1": mse_1[1], "r1_mse": sum(mse_1) / 2,
        "pooled_w": w_star,
        "ex_six_points_w": 2 / 8 * r["w1"] + 6 / 8 * r["w2"],
        "r1_distance": math.hypot(r["w"] - w_star, r["b"] - b_star),
    }


def round_map(clients: list[list[tuple[float, float]]], lr: float,
              epochs: int) -> tuple[list[list[float]], list[float]]:
    """(M, c) of one FedAvg round, θ → Mθ + c, read off reference.py's round:
    c is where it takes (0, 0), M's columns where it takes (1, 0) and (0, 1), less c."""
    def step(w: float, b: float) -> list[float]:
        total = sum(len(d) for d in clients)
        models = [local_gd(d, w, b, lr, epochs) for d in clients]
        return [sum(len(d) / total * m[i] for d, m in zip(clients, models)) for i in (0, 1)]
    c, e1, e2 = step(0, 0), step(1, 0), step(0, 1)
    return [[e1[0] - c[0], e2[0] - c[0]], [e1[1] - c[1], e2[1] - c[1]]], c


def spectral_radius(M: list[list[float]]) -> float:
    """max |λ| of a 2×2 matrix: λ = tr/2 ± √(tr²/4 − det)."""
    tr, det = M[0][0] + M[1][1], M[0][0] * M[1][1] - M[0][1] * M[1][0]
    disc = tr * tr / 4 - det
    return max(abs(tr / 2 + math.sqrt(disc)), abs(tr / 2 - math.sqrt(disc))) if disc >= 0 else math.sqrt(det)


def rho(epochs: int) -> float:
    return spectral_radius(round_map(SEED, 0.01, epochs)[0])


def lesson_2_checks() -> dict[str, float]:
    w_star, b_star = pooled_line([p for d in SEED for p in d])
    fixed = fedavg_closed_form(SEED, 0.01, 10)
    history = reference_fedavg(SEED, rounds=200)
    gap = [math.hypot(history[t - 1][0] - fixed[0], history[t - 1][1] - fixed[1]) for t in (100, 200)]
    optima = [pooled_line(d) for d in SEED]  # each client's own line through its two points
    w_inf, b_inf = (sum(o[i] for o in optima) / 2 for i in (0, 1))
    h = [sum(2 / len(d) * x * x for x, _ in d) for d in SEED]  # H_k[0][0]
    tr, det = 15 + 2, 15 * 2 - 5 * 5  # the pooled Hessian [[15, 5], [5, 2]]
    lam = tr / 2 - math.sqrt(tr * tr / 4 - det)
    return {
        "r5_w": reference_fedavg(SEED, rounds=5)[-1][0], "r5_b": reference_fedavg(SEED, rounds=5)[-1][1],
        "gap_e10": math.hypot(fixed[0] - w_star, fixed[1] - b_star), "h_ratio": h[1] / h[0],
        "w_inf": w_inf, "b_inf": b_inf, "dist_r100": gap[0], "dist_r200": gap[1], "ratio_100_200": gap[1] / gap[0],
        "rho10_pow100": rho(10) ** 100,
        "lambda_min": lam, "rounds_e1_exact": math.log(1000) / -math.log(rho(1)),
        "rounds_e1": math.ceil(math.log(1000) / -math.log(rho(1))),
        "rounds_e10_exact": math.log(1000) / -math.log(rho(10)),
        "rounds_e10": math.ceil(math.log(1000) / -math.log(rho(10))),
        "gap_inf": math.hypot(w_inf - w_star, b_inf - b_star),
    }


def fedsgd_reference(rounds: int, lr: float = 0.01) -> list[tuple[float, float]]:
    """FedSGD on the seed: gradient descent on the four points pooled, one step a round."""
    rows, (w, b), out = [p for d in SEED for p in d], (0.0, 0.0), []
    for _ in range(rounds):
        w, b = local_gd(rows, w, b, lr, epochs=1)
        out.append((w, b))
    return out


def models_of(strategy: str, rounds: int) -> list[tuple[float, float]]:
    """Each round's global model of ``strategy`` on the seed, in plain Python."""
    if strategy == "fedavg":
        return reference_fedavg(SEED, rounds=rounds)
    if strategy == "fedsgd":
        return fedsgd_reference(rounds)
    if strategy == "scaffold":
        return [tuple(m) for m in scaffold_reference(SEED, [[0, 1]] * rounds, 0.01, 10)]
    assert strategy == "exact", strategy
    return [pooled_line([p for d in SEED for p in d])] * rounds


def settled_at(models: list[tuple[float, float]], target: tuple[float, float], tol: float) -> int | None:
    """The first round from which every model is within ``tol`` of ``target``."""
    far = [t for t, (w, b) in enumerate(models, start=1) if math.hypot(w - target[0], b - target[1]) > tol]
    last = far[-1] if far else 0
    return last + 1 if last < len(models) else None


def lesson_3_checks() -> dict[str, float]:
    star = pooled_line([p for d in SEED for p in d])
    rows = [p for d in SEED for p in d]
    fedsgd = settled_at(fedsgd_reference(3000), star, 1e-3)
    scaffold = settled_at(models_of("scaffold", 400), star, 1e-3)
    # client_1's sums: n = 2, Σx, Σx², Σy, Σxy; its points back from them
    sx, sxx = sum(x for x, _ in SEED[0]), sum(x * x for x, _ in SEED[0])
    sy, sxy = sum(y for _, y in SEED[0]), sum(x * y for x, y in SEED[0])
    prod = (sx * sx - sxx) / 2
    x1, x2 = sorted([(sx - math.sqrt(sx * sx - 4 * prod)) / 2, (sx + math.sqrt(sx * sx - 4 * prod)) / 2])
    y2 = (sxy - x1 * sy) / (x2 - x1)
    return {
        "pooled_mse": local_mse(rows, *star), "rho_e1": rho(1),
        "fedsgd_dist200": distance_of(fedsgd_reference(200)[-1]),
        "start_gap": math.hypot(*star), "fedsgd_rounds": fedsgd, "fedsgd_calls": 2 * fedsgd,
        "scaffold_calls": 2 * scaffold, "scaffold_calls_100": 100 * scaffold,
        "fedsgd_estimate": math.log(math.hypot(*star) / 1e-3) / -math.log(rho(1)),
        "c1_x1": x1, "c1_x2": x2, "c1_y1": sy - y2, "c1_y2": y2,
    }


BYZANTINE_K, HUGE = 10, 1e12


def byzantine_run(f: int, rule: str, rounds: int) -> list[tuple[float, float]]:
    """The byzantine scenario in plain Python: K clients of test_byzantine's
    documented draw, the first f sending w = b = 10¹² each round, the rest
    their honest local models (reference.py's GD); the server's rule over
    the ten models: the mean (equal n_k), the coordinate-wise median, or Krum
    told f (the model with the least sum of squared distances to its
    K − f − 2 nearest others)."""
    data = [client_data(i) for i in range(BYZANTINE_K)]
    w = b = 0.0
    out = []
    for _ in range(rounds):
        sent = [(HUGE, HUGE) if i < f else local_gd(d, w, b) for i, d in enumerate(data)]
        if rule == "mean":
            w, b = (sum(m[j] for m in sent) / len(sent) for j in (0, 1))
        elif rule == "median":
            w, b = (statistics.median(m[j] for m in sent) for j in (0, 1))
        else:
            assert rule == "krum", rule
            def score(m: tuple[float, float]) -> float:
                d2 = sorted((m[0] - o[0]) ** 2 + (m[1] - o[1]) ** 2 for o in sent if o is not m)
                return sum(d2[:BYZANTINE_K - f - 2])
            w, b = min(sent, key=score)
        out.append((w, b))
    return out


def honest_line(f: int) -> tuple[float, float]:
    return pooled_line([p for i in range(f, BYZANTINE_K) for p in client_data(i)])


def krum_max_f(k: int) -> int:
    """Blanchard et al.'s bound: the largest f with K ≥ 2f + 3."""
    return max(f for f in range(k) if k >= 2 * f + 3)


def lesson_4_checks() -> dict[str, float]:
    star = honest_line(1)
    first = byzantine_run(1, "mean", 1)[-1]

    def median_holds(f: int) -> bool:  # one round's median stays near the honest models
        return abs(byzantine_run(f, "median", 1)[-1][0]) < 100
    return {
        "byz1_w": star[0], "byz1_b": star[1], "share": 20 / 200, "mean_round1_w": first[0],
        "median_dist": math.dist(byzantine_run(1, "median", 50)[-1], star),
        "krum_dist": math.dist(byzantine_run(1, "krum", 50)[-1], star),
        "median_holds": max(f for f in range(BYZANTINE_K) if median_holds(f)),
        "krum_f10": krum_max_f(10), "krum_f25": krum_max_f(25),
        "beta": 0.2, "trimmed_drops": math.floor(0.2 * BYZANTINE_K),
    }


# dp-accounting's default Rényi orders α: 1.1 … 10.9 in steps of 0.1, then 12 … 63
ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


def gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` rounds of the Gaussian mechanism (every client every
    round, q = 1): its Rényi divergence of order α is α/(2σ²) a round, and
    they add up; then ε = min_α rdp(α) + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)
    (Balle et al. 2020's conversion), over ORDERS."""
    return min(rounds * a / (2 * sigma ** 2) + math.log(1 - 1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in ORDERS)


def lesson_5_checks() -> dict[str, float]:
    r = round_one()
    return {
        "noise_ratio": (0.5 / 2) / (0.5 / 50), "c1_round1_w": r["w1"], "avg_round1_w": r["w"],
        "c2_round1_w": 2 * r["w"] - r["w1"], "sigma_equal": 1 * (0.5 / 50) / (0.5 / 2),
        "eps_one_round": gaussian_epsilon(1.0, 1, 1e-5),
        "eps_ratio": gaussian_epsilon(1.0, 50, 1e-5) / gaussian_epsilon(4.0, 50, 1e-5),
    }


def distance_of(model: tuple[float, float]) -> float:
    star = pooled_line([p for d in SEED for p in d])
    return math.hypot(model[0] - star[0], model[1] - star[1])


@cache
def checks() -> dict[str, float]:
    """Every tag's value, by name (a name means the same in every lesson)."""
    return {**lesson_1_checks(), **lesson_2_checks(), **lesson_3_checks(), **lesson_4_checks(), **lesson_5_checks()}


# --- the commands, run in this process ------------------------------------------------

CURL = re.compile(r"curl -s -X POST http://127\.0\.0\.1:5000/start"
                  r"(?: -H 'Content-Type: application/json' -d '(?P<body>[^']*)')?(?: \| head -n (?P<head>\d+))?")
MAKE = {"SCENARIO": "--scenario", "STRATEGIES": "--strategies", "ROUNDS": "--rounds", "CLIENTS": "--clients"}


def command_of(text: str, name: str) -> str:
    """The command an output block shows the output of: the one line of the
    last ```bash block before its marker."""
    before = text[:text.index(f"<!-- output: {name} -->")]
    block = re.findall(r"^```bash\n(.*?)^```", before, re.S | re.M)[-1]
    lines = [x for x in block.splitlines() if x.strip() and not x.startswith("#")]
    assert len(lines) == 1, f"{name}: one command per block, got {lines}"
    return lines[0]


def head(text: str, n: str | None) -> str:
    return text if n is None else "\n".join(text.splitlines()[:int(n)]) + "\n"


RUNS: dict[str, tuple[str, str]] = {}


class Ctx:
    """Runs a lesson's command in this process: what it prints, and the server's log meanwhile."""

    def __init__(self, seed: Federated, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
        self.seed, self.caplog, self.tmp_path = seed, caplog, tmp_path

    def run(self, command: str) -> tuple[str, str]:
        """What ``command`` prints and the server's log meanwhile; once per
        command (several blocks may show parts of one command's output)."""
        if command not in RUNS:
            RUNS[command] = self.run_now(command)
        return RUNS[command]

    def run_now(self, command: str) -> tuple[str, str]:
        self.caplog.clear()
        out = io.StringIO()
        with self.caplog.at_level(logging.INFO, logger="fedavg.server"), redirect_stdout(out):
            if m := CURL.fullmatch(command):
                printed = head(self.curl(m["body"]), m["head"])
            elif command.startswith("make compare"):
                code = compare.main(self.make_args(command[len("make compare"):], MAKE, "COMPARE_ARGS"))
                assert code == 0, out.getvalue()
                printed = out.getvalue()
            elif command.startswith("make privacy"):
                assert privacy.main(self.make_args(command[len("make privacy"):], {}, "PRIVACY_ARGS")) == 0
                printed = out.getvalue()
            elif m := re.fullmatch(r'\.venv/bin/python -c "(.*)"', command):
                exec(m[1], {})
                printed = out.getvalue()
            else:
                raise AssertionError(f"no way to run {command!r} here")
        log = "\n".join(rec.getMessage() for rec in self.caplog.records if rec.name == "fedavg.server")
        return printed, log

    def curl(self, body: str | None) -> str:
        """``curl -s -X POST …/start`` (``-d body`` as JSON when given) as curl
        prints the reply: curl's Accept: */* gets one key a line."""
        r = (self.seed.http.post("/start") if body is None else
             self.seed.http.post("/start", data=body, headers={"Accept": "*/*", "Content-Type": "application/json"}))
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_data(as_text=True)

    def make_args(self, variables: str, flags: dict[str, str], extra: str) -> list[str]:
        """make's VAR=value words as the Makefile passes them to the script; one
        job (this process), the files into the test's own folder."""
        args = ["--jobs", "1", "--out", str(self.tmp_path / "out")]
        for word in shlex.split(variables):
            var, _, value = word.partition("=")
            args += shlex.split(value) if var == extra else [flags[var], value]
        return args


# What of a command's run each block shows: what it prints, or the server's log meanwhile.
OUTPUTS: dict[str, str] = {
    "seed_head": "stdout",
    "seed_round_1": "log",
    "fixed_point_head": "stdout",
    "e100_head": "stdout",
    "theory_seed": "stdout",
    "compare_200": "stdout",
    "compare_300": "stdout",
    "byzantine_one": "stdout",
    "byzantine_five": "stdout",
    "secagg_head": "stdout",
    "privacy_noise": "stdout",
    "privacy_seed": "stdout",
    "privacy_iid": "stdout",
}


def f6(v: float) -> str:
    return f"{v:.6f}"


def line(w: float, b: float) -> str:
    return f"y = {w:.6f}·x {'−' if b < 0 else '+'} {abs(b):.6f}"


def check_seed_round_1(block: str) -> None:
    r = round_one()
    losses = [(local_mse(d, 0, 0), local_mse(d, r[f"w{k}"], r[f"b{k}"])) for k, d in enumerate(SEED, start=1)]
    expected = [
        "── Round 1/5 ── global model in: w=0.000000 b=0.000000",
        *(f"client_{k}  n_k=2  local model: w={f6(r[f'w{k}'])} b={f6(r[f'b{k}'])}   "
          f"(loss {f6(losses[k - 1][0])}→{f6(losses[k - 1][1])})" for k in (1, 2)),
        "N = 2 + 2 = 4",
        f"w = (2/4)·{f6(r['w1'])} + (2/4)·{f6(r['w2'])} = {f6(r['w'])}",
        f"b = (2/4)·{f6(r['b1'])} + (2/4)·{f6(r['b2'])} = {f6(r['b'])}",
        f"global model out: {line(r['w'], r['b'])}",
    ]
    assert block.splitlines() == expected


def check_head(block: str, rounds: int, epochs: int) -> None:
    """A /start reply's first lines: the run's final line at the reference (the
    closed-form fixed point for long runs), to the 6 decimals it prints."""
    w, b = (fedavg_closed_form(SEED, 0.01, epochs) if rounds >= 300 else
            reference_fedavg(SEED, rounds=rounds, epochs=epochs)[-1])
    assert f'"message": "FedAvg finished {rounds} round(s)."' in block
    assert f'"final_line": "{line(w, b)}"' in block


def check_theory_seed(block: str) -> None:
    """E, FedAvg's fixed point and ρ at E local epochs, NumPy's printing of 6 decimals."""
    for text in block.splitlines():
        m = re.fullmatch(r"(\d+) \[(\S+)\s+(\S+)\s*\] (\S+)", text)
        epochs = int(m[1])
        for written, value in zip(m.groups()[1:], [*fedavg_closed_form(SEED, 0.01, epochs), rho(epochs)]):
            assert agrees(written.rstrip("."), value) and len(written.partition(".")[2]) <= 6, (text, value)
    assert [int(x.split()[0]) for x in block.splitlines()] == [1, 10, 100]


def check_compare_table(block: str, rounds: int) -> None:
    """make compare's rows on the seed: each strategy's final model, its
    distance to θ*, the MSE on the pooled rows and the round it settled
    within 0.001, from the plain-Python runs (a … is what changes from run
    to run: the wall time, exact's distance at rounding level, below 1e-12)."""
    star = pooled_line([p for d in SEED for p in d])
    rows = [p for d in SEED for p in d]
    body = block.splitlines()[2:]
    for text in body:
        m = re.fullmatch(r"(\w+)\s+(y = \S+·x [+−] \S+)\s+(\S+)\s+(\S+)\s+(\w+)\s+…", text)
        assert m, text
        models = models_of(m[1], rounds)
        final = models[-1]
        assert m[2] == line(*final), (text, final)
        assert m[3] == f"{distance_of(final):.3e}" or (m[3] == "…" and distance_of(final) < 1e-12), text
        assert m[4] == f"{local_mse(rows, *final):.6g}", (text, local_mse(rows, *final))
        settled = settled_at(models, star, 1e-3)
        assert m[5] == (str(settled) if settled else "never"), (text, settled)
    assert body, block


def check_byzantine_table(block: str, attackers: int, rounds: int) -> None:
    """make compare's rows on the byzantine scenario against byzantine_run:
    the final model, its distance to the honest θ*, the MSE over every
    client's rows (the attackers' /evaluate is honest), to the digits
    printed; a refused Krum naming the bound K ≥ 2f + 3."""
    star = honest_line(attackers)
    rows = [p for i in range(BYZANTINE_K) for p in client_data(i)]
    for text in block.splitlines()[2:]:
        if m := re.fullmatch(r"fedavg\+krum\s+refused \(HTTP 400\): (.*)", text):
            assert krum_max_f(BYZANTINE_K) < attackers
            assert f"at most {krum_max_f(BYZANTINE_K)}, got {attackers}" in m[1], text
            continue
        m = re.fullmatch(r"fedavg\+(\w+)\s+y = (\S+)·x ([+−]) (\S+)\s+(\S+)\s+(\S+)\s+(\w+)\s+…", text)
        assert m, text
        models = byzantine_run(attackers, m[1], rounds)
        w, b = models[-1]
        assert agrees(m[2], w) and agrees(m[4], b if m[3] == "+" else -b), (text, w, b)
        assert agrees(m[5], math.dist((w, b), star)), (text, math.dist((w, b), star))
        assert agrees(m[6], local_mse(rows, w, b)), (text, local_mse(rows, w, b))
        assert m[7] == (str(settled_at(models, star, 1e-3) or "never")), text


def check_privacy_noise(block: str) -> None:
    """σ·S/M, the noise on each coordinate a round, with M = K (every client every round)."""
    for text in block.splitlines():
        m = re.fullmatch(r"privacy: \w+, K=(\d+), 50 rounds, clip S=(\S+), M=(\d+): noise σ·S/M = σ × (\S+) .*", text)
        assert m and m[1] == m[3] and agrees(m[4], float(m[2]) / int(m[3])), text


def check_privacy_table(block: str, clients: list[list[tuple[float, float]]]) -> None:
    """make privacy's table for one federation: without DP, FedAvg after 50
    rounds (its MSE on the pooled rows and its distance to θ*, plain Python);
    with σ, the ε of 50 Gaussian rounds at δ = 1e-5 (gaussian_epsilon)."""
    rows = [p for d in clients for p in d]
    star = pooled_line(rows)
    head, _, *settings = block.splitlines()
    assert re.fullmatch(rf"\w+, K={len(clients)}, 50 rounds, S=0\.5, δ=1e-05 .*", head), head
    for text in settings:
        if m := re.fullmatch(r"no DP\s+-\s+(\S+)\s+(\S+)", text):
            w, b = reference_fedavg(clients, rounds=50)[-1]
            assert agrees(m[1], local_mse(rows, w, b)) and agrees(m[2], math.dist((w, b), star)), text
        else:
            m = re.fullmatch(r"σ = (\S+)\s+(\S+)\s+…\s+…", text)
            assert m and agrees(m[2], gaussian_epsilon(float(m[1]), 50, 1e-5)), text
    assert settings, block


REFERENCES: dict[str, Callable[[str], None]] = {
    "secagg_head": lambda block: check_head(block, 5, 10),
    "privacy_noise": check_privacy_noise,
    "privacy_seed": lambda block: check_privacy_table(block, SEED),
    "privacy_iid": lambda block: check_privacy_table(block, [client_data(i) for i in range(50)]),
    "byzantine_one": lambda block: check_byzantine_table(block, 1, 50),
    "byzantine_five": lambda block: check_byzantine_table(block, 5, 50),
    "compare_200": lambda block: check_compare_table(block, 200),
    "compare_300": lambda block: check_compare_table(block, 300),
    "fixed_point_head": lambda block: check_head(block, 1000, 10),
    "e100_head": lambda block: check_head(block, 300, 100),
    "theory_seed": check_theory_seed,
    "seed_head": lambda block: check_head(block, 5, 10),
    "seed_round_1": check_seed_round_1,
}


def excerpt_of(block: str, output: str) -> bool:
    """``block``'s lines are consecutive lines of ``output``, ``…`` matching any text."""
    def pattern(line: str) -> re.Pattern[str]:
        return re.compile(r"\s*.+?\s*".join(re.escape(part) for part in re.split(r"\s*…\s*", line)))
    want = [pattern(x) for x in block.rstrip("\n").split("\n")]
    have = output.rstrip("\n").split("\n")
    return any(all(p.fullmatch(have[i + j]) for j, p in enumerate(want)) for i in range(len(have) - len(want) + 1))


# --- the tests --------------------------------------------------------------------------

OUTPUT_BLOCKS = [(p.name, name, block) for p in LESSONS for name, block in lesson(p).outputs]


def test_five_lessons_in_order_each_listed_in_the_path_and_the_path_linked_from_the_readme():
    assert [p.name[:3] for p in LESSONS] == ["01-", "02-", "03-", "04-", "05-"]
    path = (LESSONS_DIR / "README.md").read_text(encoding="utf-8")
    for p in LESSONS:
        assert f"]({p.name})" in path, p.name
        assert 40 <= len(p.read_text(encoding="utf-8").splitlines()) <= 160, p.name
    for p in [LESSONS_DIR / "README.md", *LESSONS]:  # every relative link resolves
        for target in re.findall(r"\]\(([^)#]+)\)", p.read_text(encoding="utf-8")):
            assert target.startswith("http") or (LESSONS_DIR / target).exists(), (p.name, target)
    assert "](docs/lessons/)" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_every_number_in_a_lesson_is_tagged_or_from_a_checked_output(path):
    text = lesson(path)
    assert text.outputs or text.tags, "a lesson with nothing checked"
    assert "<details>" in text.text and len(re.findall(r"^\d+\. ", text.text.split("<details>")[1], re.M)) >= 2
    checked = {n for n, _ in text.tags}
    for _, block in text.outputs:
        checked |= set(re.findall(NUM, block))
    prose = TAGGED.sub("", text.prose())
    loose = [n for n in DECIMAL.findall(prose) if n not in checked]
    assert not loose, f"{path.name}: numbers stated with no check (tag them <!-- check: name -->): {loose}"
    answers = re.split(r"^\d+\. ", text.prose().split("<details>")[1], flags=re.M)[1:]
    unchecked = [a.strip() for a in answers if not TAGGED.search(a)]
    assert not unchecked, f"{path.name}: answers with no checked number: {unchecked}"
    blocks = set(OUTPUTS)
    assert {n for n, _ in text.outputs} <= blocks, "an output block with no command run here"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_every_tagged_number_equals_its_plain_python_reference(path):
    wrong = [(written, name, checks().get(name)) for written, name in lesson(path).tags
             if name not in checks() or not agrees(written, checks()[name])]
    assert not wrong, f"{path.name}: (written, check, reference): {wrong}"


def test_every_check_and_output_is_used_by_a_lesson():
    used = {name for p in LESSONS for _, name in lesson(p).tags}
    assert set(checks()) == used, sorted(set(checks()) ^ used)
    assert {name for _, name, _ in OUTPUT_BLOCKS} == set(OUTPUTS) == set(REFERENCES)


@pytest.mark.parametrize("path,name,block", OUTPUT_BLOCKS, ids=[n for _, n, _ in OUTPUT_BLOCKS])
def test_each_output_block_is_what_its_command_prints_and_agrees_with_the_reference(
        path, name, block, seed_federation, caplog, tmp_path):
    printed, log = Ctx(seed_federation, caplog, tmp_path).run(command_of(lesson(LESSONS_DIR / path).text, name))
    output = printed if OUTPUTS[name] == "stdout" else log
    assert excerpt_of(block, output), f"{name}: the lesson's block is not in what the command prints:\n{output}"
    REFERENCES[name](block)
