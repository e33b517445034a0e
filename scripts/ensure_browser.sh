#!/usr/bin/env bash
# `make browser` (and so `make test-all`): the page tests (tests/test_page.py)
# drive Debian's Chromium through Playwright. Playwright's own browser
# download cannot work offline, so it is never used. Present: a quiet no-op.
# Missing: as root with apt-get, install it; otherwise stop at once with the
# one command to run, rather than fail minutes later inside pytest.
set -euo pipefail
# The Makefile sets CHROMIUM (default /usr/bin/chromium, where Debian's
# package puts it); tests/test_page.py reads the same variable.
chromium="${CHROMIUM:?set CHROMIUM to the browser the page tests use (the Makefile sets it)}"

[ -x "$chromium" ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "make test-all: the page tests need Chromium at $chromium; install Chromium and run: make test-all CHROMIUM=<its path>" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "make test-all: the page tests need Chromium at $chromium; install it with: sudo apt-get update && sudo apt-get install -y chromium" >&2
  exit 1
fi

echo "make test-all: installing Chromium for the page tests: apt-get update && apt-get install -y chromium"
export DEBIAN_FRONTEND=noninteractive  # never stop at a prompt (CI has no one to answer)
apt-get update -qq
apt-get install -y -qq chromium
if [ ! -x "$chromium" ]; then
  echo "make test-all: apt-get installed chromium, but $chromium is still missing; run: make test-all CHROMIUM=<its path>" >&2
  exit 1
fi
