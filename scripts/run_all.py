"""make run-all: start the three apps, each output line prefixed with its
app's name, until Ctrl-C; then stop all three and leave nothing behind.

The apps run in sessions of their own (launcher.start_app), so nothing the
terminal does reaches them: stopping them is this script's job, whatever
ends it — Ctrl-C, `kill` (SIGTERM), its terminal closing (SIGHUP), or its
reader going away (`make run-all | head`: a write fails with EPIPE/SIGPIPE).
Before starting, it checks that the ports are free and names whoever holds
one, so that an old app's /health is never taken for a new one's.
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading

from launcher import DEFAULT_PORTS, port_holders, port_in_use, start_federation, stop, who_holds

_print_lock = threading.Lock()
_stopping = False  # set by the first stop signal: later ones must not cut the stopping short


class Stop(KeyboardInterrupt):
    """Raised in the main thread by the first stop signal (a KeyboardInterrupt,
    so that launcher.start_federation stops what it started, as for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_signal(signum: int, _frame: object) -> None:
    global _stopping
    if _stopping:
        return  # already stopping: a second Ctrl-C, or SIGPIPE from the apps' last lines
    _stopping = True
    raise Stop(signum)


def echo(line: str) -> None:
    with _print_lock:
        try:
            print(line, flush=True)
        except OSError:  # EPIPE once `| head` has exited, EIO once the terminal has closed
            _discard_output()


def _discard_output() -> None:
    """Nobody reads our output any more: send it to /dev/null from now on, so
    that the apps' last lines, and Python's flush at exit, go nowhere instead
    of failing with a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _reader_gone() -> bool:
    """True once the read end of our stdout pipe is closed (`| head` exited).
    Polling tells a quiet run-all, which would otherwise learn it only at its
    next write; a terminal or a file never reports this."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def ports_taken(ports: dict[str, int]) -> list[str]:
    """One line for each port an app could not listen on: which process holds
    it and how to stop that, rather than report an old app's /health as ours."""
    lines = []
    for name, port in ports.items():
        if not port_in_use(port):
            continue
        flag = f"--{name.replace('_', '-')}-port"
        pids = " ".join(str(pid) for pid, _ in port_holders(port))
        way_out = f"stop it with `kill {pids}`, or" if pids else "stop it, or"
        lines.append(f"port {port} ({name}) is already in use by {who_holds(port)}: {way_out} choose another port "
                     f"with {flag} (make run-all ARGS=\"{flag} PORT\")")
    return lines


def main() -> int:
    global _stopping
    parser = argparse.ArgumentParser(description="Start client_1, client_2 and the server.")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=port, dest=name,
                            help=f"default {port}")
    parser.add_argument("--db", help="the server's SQLite run history (default: the server's own default)")
    args = vars(parser.parse_args())
    db = args.pop("db")
    ports = args
    if len(set(ports.values())) < len(ports):
        print(f"run-all: each app needs a port of its own, got {ports}", file=sys.stderr)
        return 2
    taken = ports_taken(ports)
    if taken:
        for line in taken:
            print(f"run-all: {line}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        # An inherited SIGINT or SIGHUP ignored means "keep going" (`nohup
        # make run-all &`); SIGPIPE Python itself ignores, so it is always ours.
        if sig == signal.SIGPIPE or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _stop_signal)
    apps = {}
    try:
        apps = start_federation(ports, echo=echo, server_args=["--db", db] if db else [])
        echo(f"run-all: all three apps answer /health. The page: {apps['server'].url}/\n"
             f"run-all: start the rounds there, or with:\n"
             f"    curl -X POST {apps['server'].url}/start\n"
             f"run-all: Ctrl-C stops all three.")
        while all(app.proc.poll() is None for app in apps.values()):
            if _reader_gone():
                _stop_signal(signal.SIGPIPE, None)  # as the next line's write would
            threading.Event().wait(0.5)  # a quiet main thread; the readers print
        dead = [a.name for a in apps.values() if a.proc.poll() is not None]
        echo(f"run-all: {', '.join(dead)} exited; stopping the others")
        return 1
    except Stop as e:
        if e.signum == signal.SIGPIPE:
            _discard_output()  # quietly: whoever read us is gone
        else:
            echo("run-all: stopping…")
        return 0 if apps else 130  # stopped once up is how run-all ends; before, it was interrupted
    except RuntimeError as e:
        print(f"run-all: {e}", file=sys.stderr)
        return 1
    finally:
        _stopping = True  # a signal now must not interrupt the stopping
        stop(list(apps.values()))
        if apps:
            echo(f"run-all: stopped {', '.join(apps)}: nothing of them is left running.")


if __name__ == "__main__":
    sys.exit(main())
