"""make run-all: start the three apps, each output line prefixed with its
app's name, until Ctrl-C; then stop all three and leave nothing behind."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from launcher import DEFAULT_PORTS, start_federation, stop

_print_lock = threading.Lock()


def echo(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description="Start client_1, client_2 and the server.")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=port, dest=name,
                            help=f"default {port}")
    parser.add_argument("--db", help="the server's SQLite run history (default: the server's own default)")
    args = vars(parser.parse_args())
    db = args.pop("db")
    ports = args
    # `kill` (SIGTERM) of make run-all stops the apps just as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        apps = start_federation(ports, echo=echo, server_args=["--db", db] if db else [])
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        print(f"run-all: {e}", file=sys.stderr)
        return 1
    echo(f"run-all: all three apps answer /health. Start the rounds with:\n"
         f"    curl -X POST {apps['server'].url}/start\n"
         f"run-all: Ctrl-C stops all three.")
    try:
        while all(app.proc.poll() is None for app in apps.values()):
            threading.Event().wait(0.5)  # a quiet main thread; the readers print
        dead = [a.name for a in apps.values() if a.proc.poll() is not None]
        echo(f"run-all: {', '.join(dead)} exited; stopping the others")
        return 1
    except KeyboardInterrupt:
        echo("run-all: stopping…")
        return 0
    finally:
        stop(list(apps.values()))


if __name__ == "__main__":
    sys.exit(main())
