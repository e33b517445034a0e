"""`make bench` runs and writes well-formed results (it starts the apps:
make test-all), and the committed full results are well formed (make
test). Timings are the bench's business, not the tests': nothing here
asserts how fast anything is."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

# What --quick measures (K up to 50, so no K=200/1000 figures).
QUICK_FIGURES = {
    "train_ms", "train_bare_ms", "train_ratio", "train_local_train_ms", "train_mse_pass_ms", "train_ratio_loop",
    "seed_round_ms", "noop_floor_ms", "round_overhead_ratio", "demo_start_ms",
    "rss_server_mb", "rss_client_1_mb", "rss_client_2_mb", "rss_seed_total_mb", "pss_seed_total_mb",
    "train_call_requests_ms", "train_call_urllib3_ms", "train_call_ratio",
    "seed_round_ms_werkzeug", "noop_floor_ms_werkzeug", "round_overhead_ratio_werkzeug",
    "round_ms_k2", "round_ms_k10", "round_ms_k50", "rss_client_host_k50_mb", "round_ms_k50_werkzeug",
    "compare_all_s",
    "secagg_round_ms_k10", "secagg_plain_round_ms_k10", "secagg_ratio_k10",
    *(f"secagg_{part}_ms_k10" for part in ("agreement", "prg", "shamir_split", "shamir_combine", "sealing", "whole",
                                           "rest")),
}
TARGETED = {"round_overhead_ratio", "round_ms_k50", "train_ratio", "rss_seed_total_mb", "demo_start_ms",
            "secagg_ratio_k10"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr}"
    assert "| Figure |" in proc.stdout  # the table is printed
    return json.loads(out.read_text())


@pytest.mark.system
def test_every_figure_is_there_with_median_min_max(results):
    figures = results["figures"]
    assert set(figures) == QUICK_FIGURES
    for fid, fig in figures.items():
        for key in ("median", "min", "max"):
            assert isinstance(fig[key], float) and math.isfinite(fig[key]) and fig[key] > 0, (fid, key)
        assert fig["min"] <= fig["median"] <= fig["max"], fid
        assert fig["n"] == len(fig["samples"]) >= 1, fid
        assert isinstance(fig["label"], str) and fig["label"].strip() and isinstance(fig["unit"], str), fid
        assert fig["item"] in range(1, 9), fid


@pytest.mark.system
def test_targets_are_recorded_with_their_verdict(results):
    figures = results["figures"]
    for fid, fig in figures.items():
        if fid in TARGETED:
            target = fig["target"]
            assert target["op"] in ("<=", ">=") and isinstance(target["value"], (int, float)), fid
            assert target["judged_on"] in ("median", "max"), fid
            assert fig["result"] in ("PASS", "MISS"), fid
        else:
            assert fig["target"] is None and fig["result"] is None, fid
    assert results["misses"] == [fid for fid, f in figures.items() if f["result"] == "MISS"]


@pytest.mark.system
def test_the_machine_is_described(results):
    m = results["machine"]
    assert m["cpu_model"] and isinstance(m["cores"], int) and m["cores"] >= 1
    assert m["memory_gib"] > 0
    assert m["python"].count(".") == 2 and m["numpy"]
    assert m["date"].startswith("20")
    assert len(m["git_commit"]) == 40 and isinstance(m["git_dirty"], bool)
    assert results["quick"] is True and results["plan"]["repetitions"] >= 1


def test_the_committed_full_results_are_well_formed():
    """bench/results.json is the full run the README shows: >= 5 repetitions,
    every K up to 1000."""
    path = ROOT / "bench" / "results.json"
    assert path.exists(), "bench/results.json is committed: run make bench and commit it"
    full = json.loads(path.read_text())
    assert full["quick"] is False
    figures = full["figures"]
    for k in (2, 10, 50, 200, 1000):
        assert f"round_ms_k{k}" in figures
    assert "rss_client_host_k1000_mb" in figures and figures["round_ms_k1000"]["target"] is not None
    for fid, fig in figures.items():
        assert fig["n"] >= 5 and fig["min"] <= fig["median"] <= fig["max"], fid
