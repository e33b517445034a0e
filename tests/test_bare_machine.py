"""Commands on a bare machine, `make install` and `make test-all`, met the way
a newcomer meets them: the browser the page tests need (`make browser`, which
`make test-all` runs first: scripts/ensure_browser.sh) and Poetry when it is
not on PATH (the README's fallback)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system

NOBODY = 65534  # Debian's `nobody`: a user without root and without sudo
MISSING = "/nonexistent/chromium"


def fresh_env(**extra: str) -> dict[str, str]:
    """A login's environment: none of the variables the `make test-all` running
    these tests exports (POETRY, CHROMIUM, MAKEFLAGS…), and no poetry on PATH."""
    path = [d for d in os.environ["PATH"].split(":") if d and not (Path(d) / "poetry").exists()]
    return {"PATH": ":".join(path), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", **extra}


@dataclass
class Copy:
    """The Makefile and the ensure step in a folder any user can read."""

    root: Path
    bin: Path  # stand-ins for apt-get and sudo: they only log that they were called
    log: Path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def copy():
    # pytest's tmp_path is readable by root alone; `nobody` must read the Makefile.
    root = Path(tempfile.mkdtemp(prefix="bare-machine-"))
    try:
        root.chmod(0o755)
        shutil.copy2(ROOT / "Makefile", root / "Makefile")
        (root / "scripts").mkdir()
        shutil.copy2(ROOT / "scripts" / "ensure_browser.sh", root / "scripts")
        logs = root / "log"
        logs.mkdir()
        logs.chmod(0o777)  # so that a call made as nobody is logged too, not lost
        log = logs / "calls"
        bin_ = root / "bin"
        bin_.mkdir()
        # apt-get's stand-in "installs" chromium by creating the browser at $CHROMIUM.
        stand_in = (f'#!/bin/sh\necho "$(basename "$0") $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {log}\n'
                    'if [ "$1" = install ]; then printf "#!/bin/sh\\n" > "$CHROMIUM" && chmod 755 "$CHROMIUM"; fi\n')
        for name in ("apt-get", "sudo"):
            (bin_ / name).write_text(stand_in)
            (bin_ / name).chmod(0o755)
        yield Copy(root, bin_, log)
    finally:
        shutil.rmtree(root)


def test_make_test_all_without_chromium_and_without_root_stops_at_once_with_the_command(copy):
    """Not root: nothing to install with, so one line with the exact command,
    at once (before `make install`'s minutes), and no attempt at installing."""
    cmd = ["make", "test-all"]
    if os.geteuid() == 0:  # root would install: be the newcomer without it
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    env = fresh_env(CHROMIUM=MISSING)
    env["PATH"] = f"{copy.bin}:{env['PATH']}"
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=copy.root, env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert done.returncode != 0
    assert took < 10, f"took {took:.1f} s"
    assert done.stdout == ""
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]  # make's own trailer
    assert ours == [f"make test-all: the page tests need Chromium at {MISSING}; "
                    "install it with: sudo apt-get update && sudo apt-get install -y chromium"]
    assert copy.calls() == []
    assert not Path(MISSING).exists()


def test_make_browser_with_chromium_present_is_a_quiet_no_op(copy):
    """As root, who could install: a browser at CHROMIUM means nothing to do and nothing said."""
    browser = copy.root / "chromium"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    env = fresh_env(CHROMIUM=str(browser))
    env["PATH"] = f"{copy.bin}:{env['PATH']}"
    done = subprocess.run(["make", "browser"], cwd=copy.root, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert copy.calls() == []


def test_make_browser_as_root_installs_chromium_with_apt_get_and_no_prompt(copy):
    """Root with apt-get (CI, a fresh container): update the lists, install
    the package, never wait for an answer. A stand-in `id` says root, so this
    runs for every user; the stand-in apt-get creates the browser."""
    browser = copy.root / "installed" / "chromium"
    browser.parent.mkdir()
    (copy.bin / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && echo 0\n')
    (copy.bin / "id").chmod(0o755)
    env = fresh_env(CHROMIUM=str(browser))
    env["PATH"] = f"{copy.bin}:{env['PATH']}"
    done = subprocess.run(["make", "browser"], cwd=copy.root, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert copy.calls() == ["apt-get update -qq DEBIAN_FRONTEND=noninteractive",
                            "apt-get install -y -qq chromium DEBIAN_FRONTEND=noninteractive"]
    assert browser.exists()
    assert "installing Chromium" in done.stdout


def test_readme_poetry_fallback_works_in_every_app_folder():
    """The README's advice for a machine without Poetry, run as written:
    `make install`, its `export PATH=…` line from the repository root, then
    `poetry` inside each app folder (the old advice, the relative
    .tools/poetry/bin/poetry, failed there with "No such file or directory")."""
    readme = (ROOT / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("export PATH=") and ".tools/poetry" in line]
    assert len(lines) == 1, lines
    apps = ("client_1", "client_2", "server", "client_host")
    script = "\n".join([
        "set -e",
        "make install >/dev/null",
        lines[0],
        *(f'(cd {app} && echo "{app}: $(command -v poetry)" && poetry --version)' for app in apps),
    ])
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=fresh_env(), capture_output=True, text=True,
                          timeout=600)  # make install bootstraps Poetry if this machine had it on PATH
    assert done.returncode == 0, done.stderr
    for app in apps:
        assert f"{app}: {ROOT}/.tools/poetry/bin/poetry\n" in done.stdout
    assert done.stdout.count("Poetry (version 2.") == len(apps), done.stdout
