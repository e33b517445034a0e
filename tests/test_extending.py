"""The worked examples of the docs, run as written: docs/STRATEGIES.md's own
strategy (an unweighted mean) is added, file and registry line, to a fresh
copy of the code, which is then imported in place of this one; the
strategy must show up everywhere the doc says, and compute its formula."""
from __future__ import annotations

import re
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from conftest import ROOT
from reference import local_gd

STRATEGIES_MD = ROOT / "docs" / "STRATEGIES.md"
PACKAGES = {"fedavg": ROOT / "fedavg" / "fedavg", "fedavg_server": ROOT / "server" / "fedavg_server"}


def example(doc: Path, heading: str) -> dict[str, str]:
    """The fenced python blocks under ``heading``, by the path their first line names."""
    text = doc.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks}


@contextmanager
def code_with(tmp_path: Path, files: dict[str, str],
              edit: dict[str, tuple[str, str]]) -> Iterator[dict[str, ModuleType]]:
    """A copy of the packages with ``files`` added and each ``edit`` (path →
    (old, new)) made, imported in place of this one's; this one is back after."""
    for name, source in PACKAGES.items():
        shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in files.items():
        (tmp_path / "fedavg" / Path(path).relative_to("fedavg/fedavg")).write_text(text)
    for path, (old, new) in edit.items():
        target = tmp_path / "fedavg" / Path(path).relative_to("fedavg/fedavg")
        source = target.read_text()
        assert old in source, f"{path} no longer has {old!r}: the doc's instructions are out of date"
        target.write_text(source.replace(old, new, 1))
    ours = {k: m for k, m in sys.modules.items() if k.split(".")[0] in PACKAGES}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, str(tmp_path))
    try:
        import fedavg.strategies
        import fedavg_server
        yield {"fedavg.strategies": fedavg.strategies, "fedavg_server": fedavg_server}
    finally:
        # The copy's page warms its charts in a thread (web._warm_plots): let that import end
        # before its modules go, or it fails half-way with a KeyError in the import machinery.
        for thread in threading.enumerate():
            if thread.name == "warm-plots":
                thread.join(timeout=60)
        sys.path.remove(str(tmp_path))
        for k in [k for k in sys.modules if k.split(".")[0] in PACKAGES]:
            del sys.modules[k]
        sys.modules.update(ours)


# Three clients with 2, 3 and 6 rows: FedAvg's n_k/N weights and the mean's 1/K differ on them.
UNEQUAL = [[(1.0, 3.0), (2.0, 5.0)], [(0.0, 1.5), (1.0, 2.0), (3.0, 4.5)],
           [(x, 0.5 * x + 2.0 + (-1) ** i * 0.1) for i, x in enumerate((0.5, 1.0, 2.0, 2.5, 3.5, 4.0))]]


def test_your_own_strategy_is_one_file_and_one_registry_line(tmp_path, caplog):
    files = example(STRATEGIES_MD, "## Your own strategy")
    assert list(files) == ["fedavg/fedavg/strategies/mean.py"]
    registry = "STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (\n"
    # As the doc says: the import with the others, and Mean in the tuple.
    edit = {"fedavg/fedavg/strategies/__init__.py": (registry, "from .mean import Mean\n\n" + registry + "    Mean,\n")}
    with code_with(tmp_path, files, edit) as code:
        import numpy as np

        from fedavg.client import LocalClient
        from fedavg_server.inprocess import federation_app

        assert "mean" in code["fedavg.strategies"].STRATEGIES
        clients = [LocalClient(f"c{k + 1}", np.array([[x] for x, _ in rows]), np.array([y for _, y in rows]))
                   for k, rows in enumerate(UNEQUAL)]
        server = federation_app(clients, tmp_path / "runs.db")
        http = server.test_client()
        # Everywhere the doc says: each client's /health, /start's OpenAPI enum, the page's form.
        transport = server.extensions["fedavg"].transport
        assert all("mean" in transport.call(url, "GET", "/health", 5.0).body["strategies"] for url in transport.urls)
        schema = http.get("/openapi.json").get_json()["components"]["schemas"]["StartRequest"]
        assert "mean" in schema["properties"]["strategy"]["enum"]
        assert 'value="mean"' in http.get("/").get_data(as_text=True)
        with caplog.at_level("INFO", logger="fedavg.server"):
            run = http.post("/start", json={"strategy": "mean", "rounds": 3}).get_json()
        server.extensions["fedavg"].shutdown()
    assert run["status"] == "completed", run.get("error")
    # Its formula against plain Python: W_{t+1} = (1/K) Σ_k W_k, not FedAvg's Σ_k n_k/N · W_k.
    w, b = 0.0, 0.0
    for record in run["rounds"]:
        local = [local_gd(rows, w, b, 0.01, 10) for rows in UNEQUAL]
        weighted = sum(len(rows) * m[0] for rows, m in zip(UNEQUAL, local)) / 11
        w, b = sum(m[0] for m in local) / 3, sum(m[1] for m in local) / 3
        assert abs(weighted - w) > 1e-3  # the data tells the two apart
        assert (record["global_model"]["w"], record["global_model"]["b"]) == pytest.approx((w, b), abs=1e-12)
    assert "w = (1/3)·Σ_k = (1/3)·" in caplog.text and "mean: W_{t+1} = (1/K) Σ_k W_k" in caplog.text
