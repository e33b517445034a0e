"""Write a run's three charts as PNG files, for a report: the same charts the
web page shows (fedavg_server.plots), drawn by matplotlib.

    server/.venv/bin/python scripts/plot_run.py http://127.0.0.1:5000            # the latest run, into plots-out/
    server/.venv/bin/python scripts/plot_run.py http://127.0.0.1:5000/runs/3     # run 3
    server/.venv/bin/python scripts/plot_run.py fedavg-run-3.json --out report/  # a downloaded run

Runs in the server's environment (matplotlib, the fedavg_server package),
called by its path so that the files land where you are (`poetry run`
would run it in server/): in plots-out/ unless --out says otherwise, a
folder git ignores, so that a report's PNGs are never untracked files of
the repository. It prints the path of every file it writes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TIMEOUT_S = 30
DEFAULT_OUT = "plots-out"  # in .gitignore, as make compare's compare-out/ and make privacy's privacy-out/


class SourceError(Exception):
    """The run cannot be read from where the command line says."""


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        said = e.read().decode("utf-8", "replace")[:200]
        raise SourceError(f"{url}: HTTP {e.code} {said}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SourceError(f"{url}: {getattr(e, 'reason', e)}") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{url}: not JSON: {e}") from None


def load_run(source: str, run_id: int | None) -> dict[str, Any]:
    """The run as GET /runs/<id> gives it, from a server URL or a JSON file."""
    if source.startswith(("http://", "https://")):
        base = source.rstrip("/")
        found = re.search(r"/runs/(\d+)$", base)
        if found:
            return get_json(base)
        if run_id is None:
            runs = get_json(base + "/runs")["runs"]
            if not runs:
                raise SourceError(f"{base}: the server has no runs yet")
            run_id = runs[0]["run_id"]  # newest first
        return get_json(f"{base}/runs/{run_id}")
    path = Path(source)
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not a run's JSON: {e}") from None
    if not isinstance(run, dict) or not isinstance(run.get("rounds"), list) or "run_id" not in run:
        raise SourceError(f"{path}: not a run's JSON (no run_id and rounds): save GET /runs/<id>")
    return run


def write_charts(run: dict[str, Any], out_dir: Path, round_no: int | None = None) -> list[Path]:
    """run-<id>-models.png, run-<id>-params.png, run-<id>-loss.png in out_dir."""
    # Imported only now: matplotlib takes a second to load, and a wrong
    # argument should be reported at once.
    from fedavg_server.plots import PLOTS, render

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PLOTS:
        path = out_dir / f"run-{run['run_id']}-{name}.png"
        path.write_bytes(render(run, name, "png", round_no))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a FedAvg run's charts (model lines, w and b per round, "
                                                 "federated loss) as PNG files.")
    parser.add_argument("source", help="a server URL (http://127.0.0.1:5000, or …/runs/ID) or a run's JSON file")
    parser.add_argument("--run", type=int, help="the run id on the server (default: the latest run)")
    parser.add_argument("--round", type=int, help="the round whose model lines to draw (default: the last)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                        help=f"the folder to write to (default: {DEFAULT_OUT}, which git ignores)")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.source, args.run)
    except SourceError as e:
        print(f"plot_run: {e}", file=sys.stderr)
        return 2
    if args.round is not None and all(r["round"] != args.round for r in run["rounds"]):
        print(f"plot_run: run {run['run_id']} has no round {args.round}", file=sys.stderr)
        return 2
    written = write_charts(run, args.out, args.round)
    for path in written:
        print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
