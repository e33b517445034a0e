"""`make demo`, the README's first command, run as a newcomer runs it: its
last lines give FedAvg's 5-round model, the pooled least-squares line and
where FedAvg settles, each checked against a reference computed here."""
from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from conftest import ROOT
from reference import SEED_DATA, reference_fedavg
from test_strategies import fedavg_closed_form

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system

LINE = re.compile(r"y = (-?\d+\.\d+)·x \+ (-?\d+\.\d+)")


def test_make_demo_with_port_5000_taken_prints_the_seeds_numbers():
    """Port 5000 held by another program (here this test; a newcomer's is often some other
    web app): the demo says whose, takes a free port instead, and prints the seed's numbers."""
    holder, mine = socket.socket(), True
    try:
        holder.bind(("127.0.0.1", 5000))
        holder.listen()
    except OSError:  # someone else holds it already: taken either way
        mine = False
    with holder:
        done = subprocess.run(["make", "--no-print-directory", "demo"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    moved = re.search(r"^demo: port 5000 \(server\) is in use by (.+): using (\d+) instead$", out, re.M)
    assert moved, out[:2000]
    server_port = int(moved.group(2))
    if mine:  # the holder named, as the user needs it to stop it
        assert moved.group(1).startswith(f"pid {os.getpid()} ("), moved.group(1)
    assert server_port != 5000 and f"the server (:{server_port})" in out
    final = next(ln for ln in out.splitlines() if ln.startswith("demo: final global model"))
    pooled = next(ln for ln in out.splitlines() if "pooled least-squares model" in ln)
    settles = next(ln for ln in out.splitlines() if "where FedAvg settles" in ln)

    def numbers(text: str) -> tuple[float, float]:
        w, b = LINE.search(text).groups()
        return float(w), float(b)

    w5, b5 = reference_fedavg(SEED_DATA, rounds=5)[-1]
    assert numbers(final) == (round(w5, 6), round(b5, 6)) == (1.396271, 0.787802)
    assert numbers(pooled) == (0.5, 3.0)  # the least-squares line through the four points
    fixed = fedavg_closed_form(SEED_DATA, 0.01, 10)
    assert numbers(settles) == (round(fixed[0], 6), round(fixed[1], 6))
    # the FedAvg math of every round is in the output, as the seed promised
    assert out.count("── Round ") == 5 and "w = (2/4)·" in out
    assert "demo: stopped all three apps." in out
    # The README shows how the demo ends: exactly these lines, so that it cannot fall out of date.
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("It ends with:\n\n```\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert out.rstrip("\n").splitlines()[-len(shown):] == shown
