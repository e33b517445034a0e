"""The README, run as a newcomer runs it: every command in its ```bash
blocks is either run here (on free ports: 5000-5002 may be taken) or named
in COVERED_BY with the test that runs it, and nothing is left out. The
"why not 0.5·x + 3?" curl lines are checked against references computed
here: the closed-form fixed point of FedAvg (tests/test_strategies.py) and
the pooled least-squares line 0.5·x + 3. The commands run on real processes
(make test-all); the map, the README's length and links, and the docs'
facts are read here (make test)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import launcher
from conftest import ROOT
from reference import SEED_DATA, reference_fedavg
from test_strategies import fedavg_closed_form

README = ROOT / "README.md"

# Commands run by another test (file::test), or by CI (.ci/run).
COVERED_BY = {
    "make demo": "tests/test_demo.py::test_make_demo_with_port_5000_taken_prints_the_seeds_numbers",
    "make test": ".ci/run",
    "make test-all": ".ci/run",
    'export PATH="$PWD/.tools/poetry/bin:$PATH"':
        "tests/test_bare_machine.py::test_readme_poetry_fallback_works_in_every_app_folder",
    # make run-all is `python3 scripts/run_all.py` once installed; that test
    # runs it on free ports, which the make target cannot take.
    "make run-all": "tests/test_integration.py::test_run_all_starts_three_and_ctrl_c_leaves_nothing_behind",
}
TERMINALS = {
    "client_1": "cd client_1 && poetry install && poetry run python client_1_app.py",
    "client_2": "cd client_2 && poetry install && poetry run python client_2_app.py",
    "server": "cd server   && poetry install && poetry run python server_app.py",
}
SEED_CURL = "curl -X POST http://127.0.0.1:5000/start"
JSON_START = "curl -s -X POST http://127.0.0.1:5000/start -H 'Content-Type: application/json' -d "
DRIFT_CURLS = {  # local epochs → the README's line
    10: JSON_START + """'{"rounds": 1000}' | head -n 5""",
    1: JSON_START + """'{"rounds": 10000, "local_epochs": 1}' | head -n 5""",
    100: JSON_START + """'{"rounds": 300, "local_epochs": 100}' | head -n 5""",
}
PLOT = "server/.venv/bin/python scripts/plot_run.py http://127.0.0.1:5000/runs/1"
SIM = 'make sim K=50 ROUNDS=10 SIM_ARGS="--scenario label-shift"'
RUN_HERE = {*TERMINALS.values(), SEED_CURL, *DRIFT_CURLS.values(), PLOT, SIM}


def blocks(lang: str) -> list[str]:
    """The text of every ```lang block of the README (lang "" for plain ones)."""
    found, current, kind = [], None, None
    for line in README.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, kind = [], line[3:].strip()
            else:
                if kind == lang:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


def commands() -> list[str]:
    """Each command line of the README's bash blocks, its trailing comment cut."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def test_every_readme_command_is_run_here_or_by_the_test_the_map_names():
    listed = set(commands())
    assert listed == RUN_HERE | set(COVERED_BY), (
        f"not covered: {sorted(listed - RUN_HERE - set(COVERED_BY))}; "
        f"no longer in the README: {sorted((RUN_HERE | set(COVERED_BY)) - listed)}")
    for command, where in COVERED_BY.items():
        path, _, test = where.partition("::")
        text = (ROOT / path).read_text(encoding="utf-8")
        assert (f"def {test}(" in text) if test else (command in text), (command, where)


def test_the_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 165  # "about 150": the seed's compare table and log are most of the rest
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_docs_keep_what_the_readme_gave_up():
    """The reference moved to docs/: spot-check one fact from each part."""
    facts = {"SETTINGS.md": ["| `client_timeout_s` | 10 |", "--clients-from", "`warnings`"],
             "FAILURES.md": ["one retry after 0.2 s", "dropped in 2/2 rounds"],
             "PERFORMANCE.md": ["Why waitress and urllib3", "| 2 | round, K=1000 clients on one client host |"],
             "TESTS.md": ["tests/test_readme.py", "tests/test_fuzz.py"],
             "MATHLOG.md": ["federated MSE of round 1's model"],
             "MAP.md": ["`server/fedavg_server/federation.py`"]}
    for name, needles in facts.items():
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        for needle in needles:
            assert needle in text, (name, needle)


def start_bodies() -> list[dict]:
    """The /start body of each README curl, as written (the seed curl's is {})."""
    bodies = []
    for command in commands():
        if command == SEED_CURL:
            bodies.append({})
        elif command.startswith(JSON_START):
            bodies.append(json.loads(re.fullmatch(r"'(.*?)'.*", command[len(JSON_START):]).group(1)))
    return bodies


@pytest.mark.parametrize("body", [b for b in start_bodies() if b.get("rounds", 5) <= 1000], ids=json.dumps)
def test_the_readme_s_runs_complete_on_the_seed_where_it_says(seed_federation, body):
    """Each README run on the seed's apps in this process: completed, not
    diverged, at the model the README's references give (the 10,000-round
    one, about 30 s, runs over processes in the system test above). The
    server ends a run diverged from a client's own loss growing; none may."""
    assert len(start_bodies()) == 1 + len(DRIFT_CURLS)
    run = seed_federation.run(seed=1, **body)
    assert run["status"] == "completed" and run["error"] is None, run["error"]
    rounds, epochs = body.get("rounds", 5), body.get("local_epochs", 10)
    assert run["rounds_completed"] == rounds
    w, b = (fedavg_closed_form(SEED_DATA, 0.01, epochs) if rounds >= 300 else
            reference_fedavg(SEED_DATA, rounds=rounds, lr=0.01, epochs=epochs)[-1])
    model = run["final_model"]
    assert abs(model["w"] - w) < 1e-8 and abs(model["b"] - b) < 1e-8, (model, w, b)


def on_port(command: str, port: int) -> str:
    return command.replace("127.0.0.1:5000", f"127.0.0.1:{port}")


def shell(command: str, cwd: Path = ROOT, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          env=os.environ | {"PATH": f"{Path(launcher.poetry()).parent}:{os.environ['PATH']}"})


def summary(head: str) -> dict:
    """`| head -n 5` of a /start answer: '{' and its first four keys."""
    lines = head.splitlines()
    assert lines[0] == "{", head
    return json.loads("{" + ",".join(line.rstrip(",") for line in lines[1:]) + "}")


@pytest.fixture
def three_terminals(tmp_path):
    """The README's three terminals, each command as written plus --port
    (and for the server its clients' URLs and a fresh run history)."""
    ports = {name: launcher.free_port() for name in TERMINALS}
    clients = f"http://127.0.0.1:{ports['client_1']},http://127.0.0.1:{ports['client_2']}"
    env = os.environ | {"PATH": f"{Path(launcher.poetry()).parent}:{os.environ['PATH']}",
                        "FEDAVG_CLIENTS": clients, "FEDAVG_DB": str(tmp_path / "runs.db"), "PYTHONUNBUFFERED": "1"}
    apps = []
    try:
        for name, command in TERMINALS.items():
            log = (tmp_path / f"{name}.log").open("w")
            proc = subprocess.Popen(f"{command} --port {ports[name]}", shell=True, cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            apps.append(launcher.App(name, f"http://127.0.0.1:{ports[name]}", proc))
        launcher.wait_healthy(apps, timeout_s=180)
        yield apps[-1], tmp_path
    finally:
        launcher.stop(apps)


@pytest.mark.system
def test_three_terminals_the_seed_curl_and_why_not_half_x_plus_3(three_terminals):
    server, tmp_path = three_terminals
    port = int(server.url.rsplit(":", 1)[1])

    done = shell(on_port(SEED_CURL, port))
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert list(run)[:3] == ["message", "status", "final_line"]
    assert run["message"] == "FedAvg finished 5 round(s)." and run["warnings"] == []
    w, b = reference_fedavg(SEED_DATA, rounds=5, lr=0.01, epochs=10)[-1]
    assert abs(run["final_model"]["w"] - w) < 1e-9 and abs(run["final_model"]["b"] - b) < 1e-9
    assert run["final_line"] == f"y = {w:.6f}·x + {b:.6f}"

    readme = README.read_text(encoding="utf-8")
    for epochs, command in DRIFT_CURLS.items():
        started = time.monotonic()
        done = shell(on_port(command, port))
        assert done.returncode == 0, done.stderr
        head = summary(done.stdout)
        model = head["final_model"]
        if epochs == 1:  # plain GD on the pooled data: the least-squares line
            assert abs(model["w"] - 0.5) < 1e-4 and abs(model["b"] - 3.0) < 1e-4, model
        w, b = fedavg_closed_form(SEED_DATA, 0.01, epochs)
        assert abs(model["w"] - w) < 1e-8 and abs(model["b"] - b) < 1e-8, (epochs, model, w, b)
        assert head["final_line"] == f"y = {w:.6f}·x + {b:.6f}"
        assert head["message"].startswith("FedAvg finished") and head["status"] == "completed"
        if epochs == 10:  # the README shows this answer as it is
            assert done.stdout in [block for block in blocks("") if block.startswith("{\n")], done.stdout
            assert f"{w:.4f}·x + {b:.4f}" in readme
        else:
            assert f"{w:.6f}·x + {b:.6f}" in readme
        print(f"E={epochs}: {time.monotonic() - started:.1f} s")
    w100, b100 = fedavg_closed_form(SEED_DATA, 0.01, 100)
    assert f"{w100:.2f}·x + {b100:.2f}" in readme
    # "A curl is silent until its run ends: the server's terminal prints each round meanwhile"
    assert "the server's\nterminal prints each round meanwhile" in readme
    assert (tmp_path / "server.log").read_text(encoding="utf-8").count("/10000 ── global model in") == 10000

    # plot_run, from another directory: the files land in its plots-out/, and nowhere else.
    before = set(ROOT.glob("**/run-1-*.png"))
    where = tmp_path / "report"
    where.mkdir()
    done = shell(on_port(PLOT, port).replace("server/.venv", f"{ROOT}/server/.venv")
                 .replace("scripts/", f"{ROOT}/scripts/"), cwd=where)
    assert done.returncode == 0, done.stderr
    written = [Path(p) for p in done.stdout.split()]
    assert sorted(p.name for p in written) == ["run-1-loss.png", "run-1-models.png", "run-1-params.png"]
    for path in written:
        assert path.parent == where / "plots-out" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(ROOT.glob("**/run-1-*.png")) == before


@pytest.mark.system
def test_make_sim_as_the_readme_writes_it():
    done = shell(SIM)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "sim: the clients' data: label-shift: x ~ U(0, 5), y = a_k·x + 1" in out
    assert re.search(r"sim: the page, while this runs: http://127\.0\.0\.1:\d+/", out)
    assert len(re.findall(r"^\s+\d+\s+1000\s+50\s+0\s", out, re.M)) == 10, out  # N = 50 × 20
    assert "sim: run completed" in out
