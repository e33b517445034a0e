"""Start and stop the three apps exactly as the README does
(``cd X && poetry run python X_app.py``), for ``make run-all``, ``make demo``
and the integration tests. Standard library only: it runs before any app
environment exists.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORTS = {"client_1": 5001, "client_2": 5002, "server": 5000}


def poetry() -> str:
    """$POETRY, else poetry on PATH, else the copy ``make install`` bootstraps."""
    found = os.environ.get("POETRY") or shutil.which("poetry")
    if found:
        return found
    local = ROOT / ".tools" / "poetry" / "bin" / "poetry"
    if local.exists():
        return str(local)
    raise SystemExit("poetry not found: run `make install` first")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether an app would fail to listen on host:port now. Binds as the
    apps' WSGI servers do, with SO_REUSEADDR, so a connection of a stopped app
    still in TIME_WAIT does not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holders(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of each process with a TCP socket listening on
    ``port`` (any address): the socket inodes from /proc/net/tcp and tcp6,
    then the processes whose /proc/<pid>/fd links name one of them. Other
    users' processes show only to root; no holder found is an empty list."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]  # after the header
        except OSError:  # a kernel without IPv6 has no tcp6
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                sockets.add(f"socket:[{inode}]")
    holders = []
    if not sockets:
        return holders
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and sockets & _fd_links(proc):
            try:
                argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:  # it exited meanwhile
                continue
            holders.append((int(proc.name), " ".join(a.decode(errors="replace") for a in argv)))
    return sorted(holders)


def who_holds(port: int) -> str:
    """Who listens on ``port``, for a message: "pid 123 (python3 server_app.py …)",
    or, when we cannot see it (another user's process, not root), how to find it."""
    holders = port_holders(port)
    if not holders:
        return f"a process this user cannot see (`sudo ss -ltnp 'sport = :{port}'` names it)"
    return "; ".join(f"pid {pid} ({_short(cmd)})" for pid, cmd in holders)


def _short(cmd: str, limit: int = 160) -> str:
    """A command line on one line of a message."""
    cmd = " ".join(cmd.split())
    return cmd if len(cmd) <= limit else cmd[:limit - 1] + "…"


def _fd_links(proc: Path) -> set[str]:
    """What each open file descriptor of a process points to; empty if we may
    not look (another user's process) or it has exited."""
    links = set()
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return links
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:  # closed since the listing
            pass
    return links


@contextmanager
def refusing_url(host: str = "127.0.0.1") -> Iterator[str]:
    """A URL whose port is bound but never listens: every connection to it is
    refused at once, and no other process can take the port meanwhile."""
    with socket.socket() as hole:
        hole.bind((host, 0))
        yield f"http://{host}:{hole.getsockname()[1]}"


@dataclass
class App:
    """One app process and everything it has printed so far."""

    name: str
    url: str
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def output(self) -> str:
        return "".join(self.lines)


def start_app(name: str, port: int, args: Sequence[str] = (), host: str = "127.0.0.1",
              echo: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
              wrap: Sequence[str] = (), via_poetry: bool = True) -> App:
    """``cd <name> && poetry run python <name>_app.py --host H --port P [args]``,
    run under ``wrap`` if given (e.g. ``ip netns exec NS``). Its output is
    kept in ``App.lines`` and, if ``echo`` is given, passed on line by line
    as ``[name] line``. ``via_poetry=False`` runs the app's own
    ``.venv/bin/python`` (what ``poetry run`` picks) without Poetry's half
    second of start-up, for tools that start apps often; tests keep the
    README's way."""
    python = ROOT / name / ".venv" / "bin" / "python"
    launch = [str(python)] if not via_poetry and python.exists() else [poetry(), "run", "python"]
    cmd = [*wrap, *launch, f"{name}_app.py", "--host", host, "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT / name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group: we stop it and all it started
    )
    app = App(name, f"http://{host}:{port}", proc)

    def read() -> None:
        for line in proc.stdout:
            app.lines.append(line)
            if echo is not None:
                echo(f"[{name}] {line.rstrip()}")

    app._reader = threading.Thread(target=read, daemon=True, name=f"read-{name}")
    app._reader.start()
    return app


def wait_healthy(apps: Sequence[App], timeout_s: float = 120.0) -> None:
    """Poll each app's /health until it answers 200; fail early, with the
    app's own output, if it exits instead."""
    deadline = time.monotonic() + timeout_s
    pending = list(apps)
    while pending:
        for app in list(pending):
            if app.proc.poll() is not None:
                raise RuntimeError(f"{app.name} exited with code {app.proc.returncode}:\n{app.output()}")
            try:
                with urllib.request.urlopen(app.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        pending.remove(app)
            except (urllib.error.URLError, OSError):
                pass
        if pending:
            if time.monotonic() > deadline:
                names = ", ".join(a.name for a in pending)
                raise RuntimeError(f"no answer from /health of {names} within {timeout_s:g} s")
            time.sleep(0.05)  # polling interval, not a wait for anything in particular


def stop(apps: Sequence[App], grace_s: float = 5.0) -> None:
    """SIGTERM each app's process group, SIGKILL what is left after the grace."""
    for app in apps:
        if app.proc.poll() is None:
            _signal_group(app.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for app in apps:
        try:
            app.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(app.proc, signal.SIGKILL)
            app.proc.wait(5)
        if app._reader is not None:
            app._reader.join(2)


def ended(apps: Sequence[App], timeout_s: float = 60.0) -> list[tuple[int, str, list[str]]]:
    """Apps that should stop by themselves (a setting that cannot work, a
    taken port): each one's exit code, its output and its ``error:`` lines,
    once it has exited (any still running after ``timeout_s`` is stopped,
    and the wait's TimeoutExpired says so)."""
    try:
        codes = [app.proc.wait(timeout_s) for app in apps]
    finally:
        stop(apps)
    outs = [app.output() for app in apps]
    return [(code, out, [line for line in out.splitlines() if line.startswith("error:")])
            for code, out in zip(codes, outs)]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def start_federation(ports: dict[str, int] | None = None, echo: Callable[[str], None] | None = None,
                     host: str = "127.0.0.1", timeout_s: float = 120.0,
                     server_args: Sequence[str] = (), env: dict[str, str] | None = None) -> dict[str, App]:
    """Both clients, then the server pointed at them; returns once all three
    answer /health. On any failure everything started is stopped again."""
    ports = {**DEFAULT_PORTS, **(ports or {})}
    apps: dict[str, App] = {}
    try:
        for name in ("client_1", "client_2"):
            apps[name] = start_app(name, ports[name], host=host, echo=echo, env=env)
        clients = ",".join(apps[n].url for n in ("client_1", "client_2"))
        apps["server"] = start_app("server", ports["server"], ["--clients", clients, *server_args],
                                   host=host, echo=echo, env=env)
        wait_healthy(list(apps.values()), timeout_s)
    except BaseException:
        stop(list(apps.values()))
        raise
    return apps


def get_json(url: str, timeout_s: float = 60.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_for_run(server_url: str, run_id: int, until: Callable[[dict], bool], timeout_s: float = 60.0) -> dict:
    """GET /runs/<id> until ``until(run)`` holds; an error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = get_json(f"{server_url}/runs/{run_id}")
        if until(run):
            return run
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} did not get there in {timeout_s:g} s: {run['status']}, "
                               f"{len(run['rounds'])} rounds")
        time.sleep(0.02)  # polling interval


def fetch(url: str, timeout_s: float = 60.0) -> tuple[int, str, bytes]:
    """GET url: (status, content type, body) whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def post_json(url: str, body: dict | None = None, timeout_s: float = 300.0) -> tuple[int, dict]:
    """POST a JSON body; (status, parsed reply) whatever the status."""
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


if __name__ == "__main__":
    sys.exit("launcher.py is a module: use `make run-all` or `make demo`")
