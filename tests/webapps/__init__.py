"""Small web applications that embed plugin hosts, and a harness that serves them for real.

``flaskapp`` uses the Flask extension, ``djangoproject`` the Django app, ``handmade`` a host
started at import as people hand-embed one. Each answers ``/kv/<key>`` through the sample
KV plugin and ``/pids`` with its serving process and the plugins that process launched.

:class:`WebServer` runs one under a real server (gunicorn, waitress, a framework's reloader)
in its own session, and finds plugin processes by pid through ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from tests.helpers import ROOT, free_port, wait_until
from tests.webapps.gunicorn_conf import WORKER_READY

KV_COMMAND = [sys.executable, "-m", "tests.webapps.kv"]
KV_ENV = {"PYTHONPATH": str(ROOT), "WEBAPP_LAUNCH_LOG": os.environ.get("WEBAPP_LAUNCH_LOG", "")}
"""What the apps launch; ``WEBAPP_LAUNCH_LOG`` is the file their plugins note each launch in."""
WORKERS = 2
"""gunicorn workers in every test that runs it."""
GUNICORN = [
    sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", "127.0.0.1:{port}", "--graceful-timeout", "10",
    # Its control socket has one path per user: servers running side by side would share it.
    "--no-control-socket",
    "--config", "python:tests.webapps.gunicorn_conf",
]  # fmt: skip
"""Two sync workers; the app goes last."""
STARTUP_TIMEOUT = 30.0
"""Seconds a server gets to answer its first request (imports, forks, a loaded machine)."""
SHUTDOWN_PROMISE = 5.0
"""Seconds within which a server and its plugins are gone after the stop signal."""


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a dead process nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return parents


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (plugins run in their own sessions, but stay children)."""
    parents = _parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {
            pid for pid, ppid in parents.items() if ppid in frontier and running(pid)
        } - found
        found |= frontier
    return found


def is_kv_plugin(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"tests.webapps.kv" in cmdline


AS_FROM_A_TERMINAL = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])",
]  # fmt: skip
"""Runs the command that follows with Ctrl-C's SIGINT at its default, as a terminal would,
however these tests were started: a background job of a non-interactive shell (``pytest &``
in a script) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt, so
``runserver`` and ``flask run`` would not stop on the Ctrl-C the tests send."""


class WebServer:
    """A web server in its own session on a free loopback port; ``url`` once it answers."""

    def __init__(self, argv: Sequence[str], port: int, env: dict[str, str], log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workers = WORKERS if "gunicorn" in argv else 0
        """Workers that must handle signals themselves before the server counts as ready."""
        self.log = log
        self.seen_plugins: set[int] = set()  # every plugin pid a response named, for cleanup
        self.launch_log = log.with_suffix(".launches")
        self.launch_log.touch()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*AS_FROM_A_TERMINAL, *argv],
                cwd=ROOT,
                env={**os.environ, **KV_ENV, "WEBAPP_LAUNCH_LOG": str(self.launch_log), **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> WebServer:
        def answers() -> bool:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            try:
                return requests.get(self.url + "/pids", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(
            answers,
            lambda: f"{self.url} to answer; its log:\n{self.log.read_text()[-3000:]}",
            STARTUP_TIMEOUT,
        )
        wait_until(
            lambda: self.log.read_text().count(WORKER_READY) >= self.workers,
            lambda: f"{self.workers} workers to handle signals; the log:\n{self.log.read_text()[-3000:]}",
            STARTUP_TIMEOUT,
        )
        return self

    def put(self, key: str, value: bytes) -> None:
        response = requests.post(f"{self.url}/kv/{key}", data=value, timeout=30)
        assert response.status_code == 200, response.text

    def get(self, key: str) -> bytes:
        response = requests.get(f"{self.url}/kv/{key}", timeout=30)
        assert response.status_code == 200, response.text
        return response.content

    def pids(self) -> dict:
        """The answering process: ``{"pid": ..., "plugins": [...], "host_url": ...}``."""
        answer = requests.get(self.url + "/pids", timeout=10).json()
        self.seen_plugins.update(answer["plugins"])
        return answer

    def launches(self) -> list[int]:
        """The pid of every plugin launched for this server so far, running or not."""
        return [int(line) for line in self.launch_log.read_text().split()]

    def one_plugin_per_worker(self) -> set[int]:
        """Use the plugin through the app; check each serving process launched one plugin and
        the master none; the plugins launched, all running."""
        by_worker = self.plugins_by_process()
        plugins = {pid for pids in by_worker.values() for pid in pids}
        assert all(len(pids) <= 1 for pids in by_worker.values()), by_worker
        # gunicorn need not hand the later requests to every worker that served the first
        # one (sync workers under load alternate: one may serve every Get, the other every
        # /pids), so the answers may name no plugin at all: the launch log names them all.
        launched = set(self.launches())
        assert launched and plugins <= launched == self.plugin_processes(), (launched, by_worker)
        assert len(launched) <= WORKERS
        return launched

    def plugins_by_process(self, requests_made: int = 8) -> dict[int, list[int]]:
        """Call the plugin through the app a few times (gunicorn spreads them over its
        workers); the plugins each answering process has launched, by its pid."""
        self.put("a", b"1")
        by_process: dict[int, list[int]] = {}
        for _ in range(requests_made):
            assert self.get("a") in (b"1", b"")  # each worker's plugin is a store of its own
            answer = self.pids()
            by_process[answer["pid"]] = answer["plugins"]
        return by_process

    def use_mounted_host(self, prefix: str = "/_plugins") -> dict:
        """With the host's endpoints served by the app under ``prefix``: call the plugin through
        the app, wait until its health report reached the host through the app's own port,
        check the host answers there; the ``/pids`` answer."""
        self.put("a", b"1")

        def reported() -> dict | None:
            answer = self.pids()
            return answer if answer["reported"] == ["HEALTHY"] else None

        answer = wait_until(reported, "the plugin's health report through the mount")
        assert self.get("a") == b"1"
        assert answer["host_url"] == self.url + prefix
        assert requests.get(self.url + prefix + "/readyz", timeout=5).status_code == 200
        return answer

    def listening_ports(self) -> set[int]:
        """The TCP ports the server process listens on (its socket inodes in /proc/net/tcp)."""
        inodes = set()
        for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            target = str(fd.readlink()) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        ports = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].split(":")[1], 16))
        return ports

    def plugin_processes(self) -> set[int]:
        """The KV plugin processes running anywhere under the server."""
        return {pid for pid in descendants(self.proc.pid) if is_kv_plugin(pid)}

    def stop(self, signum: int = signal.SIGTERM, group: bool = False) -> float:
        """Send ``signum`` (to the whole session with ``group``, as a terminal's Ctrl-C does);
        the seconds until the server exited, failing past the shutdown promise."""
        started = time.monotonic()
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=SHUTDOWN_PROMISE)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the server did not exit within {SHUTDOWN_PROMISE:g} s: {self.log.read_text()[-3000:]}"
            ) from None
        return time.monotonic() - started

    def close(self) -> None:
        """Kill whatever is left: the server's session and every plugin it was seen to run."""
        for kill in (
            lambda: os.killpg(self.proc.pid, signal.SIGKILL),
            *[(lambda p=p: os.kill(p, signal.SIGKILL)) for p in self.seen_plugins],
        ):
            try:
                kill()
            except ProcessLookupError:
                pass
        self.proc.wait()


def serve_app(
    tmp_path: Path, argv: Sequence[str], env: dict[str, str] | None = None, port: int | None = None
) -> WebServer:
    """Start ``argv`` (``{port}`` in it replaced) and wait until it answers ``/pids``."""
    port = port or free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    server = WebServer(argv, port, env or {}, tmp_path / f"server-{port}.log")
    try:
        return server.wait_ready()
    except BaseException:
        server.close()
        raise
