"""Shared by every test: scripts/ on the path, so tests start the apps with
scripts/launcher.py — the same code `make run-all` and `make demo` use."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
