"""docs/PROTOCOL.md's field tables, written from the code's declarations.

Each table of settings sits between ``<!-- fields: NAME -->`` and
``<!-- end fields -->``; this rewrites every one of them from the fields'
declarations (``fedavg.spec.Param``: the same ones the parsers and the
OpenAPI documents use). Run it after changing a setting, in the root
environment: ``.venv/bin/python scripts/protocol_tables.py``. With --check it
changes nothing and exits 1 when the doc is not current
(tests/test_protocol_doc.py checks the same).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fedavg.spec import doc_table
from fedavg.wire import TRAIN_CONFIG, TRAIN_DP
from fedavg_server.privacy_settings import AdaptiveClipping, DPSettings, SecAggSettings
from fedavg_server.settings import start_params

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
TABLES = {
    "start": (start_params(), ""),
    "dp": (DPSettings.SPEC, "dp."),
    "dp.adaptive": (AdaptiveClipping.SPEC, "dp.adaptive."),
    "secagg": (SecAggSettings.SPEC, "secagg."),
    "config": (TRAIN_CONFIG, "config."),
    "config.dp": (TRAIN_DP, "config.dp."),
}
BLOCK = re.compile(r"(<!-- fields: ([a-z.]+) -->\n).*?(<!-- end fields -->)", re.S)


def current(text: str) -> str:
    """``text`` with every field table written afresh from the code."""
    def table(m: re.Match[str]) -> str:
        if m.group(2) not in TABLES:
            raise KeyError(f"PROTOCOL.md names a table the code does not have: {m.group(2)!r}")
        params, prefix = TABLES[m.group(2)]
        return f"{m.group(1)}{doc_table(params, prefix)}\n{m.group(3)}"
    return BLOCK.sub(table, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the doc is not current")
    args = parser.parse_args(argv)
    text = PROTOCOL.read_text(encoding="utf-8")
    fresh = current(text)
    if args.check:
        if fresh != text:
            print(f"{PROTOCOL} is not current: run .venv/bin/python scripts/protocol_tables.py", file=sys.stderr)
            return 1
        return 0
    PROTOCOL.write_text(fresh, encoding="utf-8")
    print(f"protocol_tables: wrote {len(BLOCK.findall(fresh))} tables in {PROTOCOL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
