"""Starting plugins: as subprocesses, or inside the host's own process.

A strategy turns a launch request into a :class:`Running` plugin: a base URL, the
``requests`` session that reaches it, and a way to stop it. Write another strategy (a
container, a remote sidecar) by implementing :class:`Strategy`.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from . import handshake as hs
from .health import Health
from .hostlink import HostLink
from .plugin import Plugin
from .serving import ENV_APP_VERSIONS, ENV_HOST_URL, ENV_WATCH_STDIN, PluginServer, ServeConfig

log = logging.getLogger("connectplugin.launcher")

_LINE = re.compile(r"^(\d+)\|(\d+)\|(https?://\S+)$")
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT", "PYTHONPATH", "VIRTUAL_ENV")
"""Host variables a plugin inherits; everything else must be given explicitly."""


class LaunchError(Exception):
    """A plugin did not start: it exited, or never said where it listens in time."""


@dataclass(frozen=True)
class LaunchContext:
    """What every strategy needs from the host."""

    name: str
    handshake: hs.HandshakeConfig
    plugins: Mapping[str, Plugin]
    host_url: str = ""
    on_exit: Callable[[int | None], None] = lambda code: None
    """Called once when the plugin stops by itself or crashes (with its exit code)."""


class Running(Protocol):
    """A started plugin."""

    url: str
    session: requests.Session | None
    """A session whose adapter reaches ``url``; None means plain HTTP."""
    pid: int | None

    def alive(self) -> bool: ...

    def mark_stopping(self) -> None:
        """The host is about to stop it: its exit from now on is expected, not a crash."""
        ...

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for it to exit by itself; True once it has."""
        ...

    def stop(self, grace: float) -> None: ...


class Strategy(Protocol):
    def start(self, ctx: LaunchContext) -> Running: ...


# --- subprocess -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessStrategy:
    """Run ``command`` as a child process with a clean, explicit environment.

    The child gets only the variables in ``_PASSED_ENV`` from the host, then ``env``, then the
    handshake settings. Its stdout and stderr lines go to the logger
    ``connectplugin.plugin.<name>``.
    """

    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    start_timeout: float = 15.0

    def start(self, ctx: LaunchContext) -> Running:
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.update(self.env)
        env.update(
            {
                ctx.handshake.magic_cookie_key: ctx.handshake.magic_cookie_value,
                ENV_APP_VERSIONS: hs.format_versions(ctx.handshake.app_protocol_versions),
                ENV_WATCH_STDIN: "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if ctx.host_url:
            env[ENV_HOST_URL] = ctx.host_url
        try:
            proc = subprocess.Popen(
                list(self.command),
                env=env,
                cwd=self.cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Its own process group: a Ctrl-C at the terminal reaches the host, which
                # then stops its plugins in order.
                start_new_session=True,
            )
        except OSError as e:
            raise LaunchError(f"cannot start plugin {ctx.name!r} ({' '.join(self.command)}): {e}") from None
        return _Process(ctx, proc, self.start_timeout)


class _Process:
    session: requests.Session | None = None
    pid: int | None

    def __init__(self, ctx: LaunchContext, proc: subprocess.Popen[bytes], start_timeout: float) -> None:
        self.pid = proc.pid
        self._ctx = ctx
        self._proc = proc
        self._logger = logging.getLogger(f"connectplugin.plugin.{ctx.name}")
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._ready = threading.Event()
        self._refused = ""
        self._exited = threading.Event()
        self._stopping = False
        self.url = ""
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"{ctx.name}-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"{ctx.name}-stderr", daemon=True),
        ]
        for t in self._readers:
            t.start()
        deadline = time.monotonic() + start_timeout
        while not self._ready.wait(0.02):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
        if not self.url:
            self._fail(start_timeout)
        threading.Thread(target=self._wait, name=f"{ctx.name}-wait", daemon=True).start()

    def _fail(self, start_timeout: float) -> None:
        code = self._proc.poll()
        if self._refused:
            self._kill()
            what = f"was refused: {self._refused}"
        elif code is None:
            self._kill()
            what = f"did not report its address within {start_timeout:g} s"
        else:
            for t in self._readers:
                t.join(timeout=1)
            what = f"exited with status {code} before reporting its address"
        self._close_pipes()
        tail = "\n".join(self._stderr_tail)
        raise LaunchError(
            f"plugin {self._ctx.name!r} {what}" + (f"; its last stderr lines:\n{tail}" if tail else "")
        )

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not self.url:
                match = _LINE.match(line)
                if match:
                    self._accept(int(match[1]), int(match[2]), match[3])
                    continue
            self._logger.info("%s", line)

    def _accept(self, core: int, app: int, url: str) -> None:
        if core != hs.CORE_PROTOCOL_VERSION:
            self._refused = f"it speaks core protocol {core}, not {hs.CORE_PROTOCOL_VERSION}"
        elif app not in self._ctx.handshake.app_protocol_versions:
            self._refused = (
                f"it chose app protocol {app}; the host offers "
                f"{sorted(self._ctx.handshake.app_protocol_versions)}"
            )
        if self._refused:
            self._ready.set()  # fail the launch now rather than at the start timeout
            return
        self.url = url
        self.app_protocol_version = app
        self._ready.set()

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self._stderr_tail.append(line)
            self._logger.info("%s", line)

    def _wait(self) -> None:
        code = self._proc.wait()
        if not self._stopping:
            log.error("plugin %r (pid %d) exited unexpectedly with status %s", self._ctx.name, self._proc.pid, code)
        else:
            log.info("plugin %r (pid %d) exited with status %s", self._ctx.name, self._proc.pid, code)
        self._ctx.on_exit(code)
        self._exited.set()
        # Its last output may still be in the pipes (a child of it may even hold them open).
        for t in self._readers:
            t.join(timeout=2)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. (The host tries Shutdown first.)

        Signals go to the plugin's whole process group, so helpers it started go too.
        Returns once the exit has been recorded.
        """
        self._stopping = True
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("plugin %r ignored SIGTERM for %g s; killing it", self._ctx.name, grace)
                self._kill()
        self._exited.wait(timeout=5)
        self._close_pipes()

    def wait(self, timeout: float) -> bool:
        try:
            self._proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def mark_stopping(self) -> None:
        self._stopping = True

    def _signal(self, signum: int) -> None:
        try:
            # start_new_session made the plugin a group leader: its pid is the group id.
            os.killpg(self._proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill(self) -> None:
        self._signal(signal.SIGKILL)
        self._proc.wait()

    def _close_pipes(self) -> None:
        # stdin only: the reader threads own stdout and stderr and close them at their end.
        for pipe in (self._proc.stdin,):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


# --- in-process -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InProcessStrategy:
    """Run the plugin inside the host's process: no subprocess and no socket.

    Calls go through a ``requests`` transport adapter that invokes the plugin's WSGI app
    directly, on the caller's thread.
    """

    impls: Mapping[str, Any]
    config: ServeConfig = field(default_factory=ServeConfig)
    health: Health | None = None
    link: HostLink | None = None
    plugins: Mapping[str, Plugin] | None = None
    """The plugin definitions to serve; by default the host's own map."""

    def start(self, ctx: LaunchContext) -> Running:
        plugins = self.plugins if self.plugins is not None else ctx.plugins
        server = PluginServer(plugins, self.impls, ctx.handshake, self.config, self.health, self.link)
        return _InProcess(ctx, server)


class _InProcess:
    pid: int | None = None

    def __init__(self, ctx: LaunchContext, server: PluginServer) -> None:
        self._ctx = ctx
        self._server = server
        self.url = f"http://{ctx.name}.inprocess.invalid"
        self.app_protocol_version = max(ctx.handshake.app_protocol_versions)
        self.app = server.app
        self.session: requests.Session | None = requests.Session()
        self.session.mount(self.url, WSGIAdapter(server.app))  # type: ignore[arg-type]

    def alive(self) -> bool:
        return not self._server.stopped

    def mark_stopping(self) -> None:
        pass  # an in-process plugin never crashes on its own: nothing to tell apart

    def wait(self, timeout: float) -> bool:
        return self._server.wait_stopped(timeout)

    def stop(self, grace: float) -> None:
        self._server.stop(grace, reason="host stopped it")
        self._server.link.close()
        if self.session is not None:
            self.session.close()


class WSGIAdapter(BaseAdapter):
    """A ``requests`` transport that calls a WSGI app in this process instead of a socket."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        super().__init__()
        self.app = app

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        url = urlsplit(request.url or "")
        raw_body = request.body or b""
        body = raw_body.encode() if isinstance(raw_body, str) else bytes(raw_body)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method or "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": url.path or "/",
            "QUERY_STRING": url.query,
            "SERVER_NAME": url.hostname or "localhost",
            "SERVER_PORT": str(url.port or 80),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "in-process",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": url.scheme or "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for key, value in request.headers.items():
            name = key.upper().replace("-", "_")
            if name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[name] = value
            else:
                environ["HTTP_" + name] = value
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return lambda data: None

        streaming = environ.get("CONTENT_TYPE", "").startswith("application/connect+")
        if streaming:
            # A stream runs on its own thread, as it would in a server, so the handler
            # makes progress (and sees the caller leave) whether or not the caller reads.
            raw: io.RawIOBase = _PumpedBody(self.app, environ, start_response)
        else:
            app_iter = self.app(environ, start_response)
            chunks = iter(app_iter)
            first = next(chunks, b"")  # runs the app far enough to call start_response
            raw = _BodyReader(first, chunks, app_iter)
        if not started:  # the app failed before it could answer: what a server would send
            started[:] = ["500 Internal Server Error", [("Content-Length", "0")]]
            raw = _BodyReader(b"", iter(()), ())
        response = requests.Response()
        status, headers = started
        response.status_code = int(status.split(" ", 1)[0])
        response.reason = status.split(" ", 1)[1] if " " in status else ""
        response.headers = CaseInsensitiveDict(headers)
        response.raw = raw
        response.url = request.url or ""
        response.request = request
        response.connection = self  # type: ignore[assignment]
        return response

    def close(self) -> None:
        pass


class _BodyReader(io.RawIOBase):
    """A file over a WSGI response iterable, read lazily so streams arrive as they are made."""

    def __init__(self, first: bytes, rest: Iterable[bytes], app_iter: Iterable[bytes]) -> None:
        super().__init__()
        self._buffer = bytearray(first)
        self._rest = iter(rest)
        self._app_iter = app_iter

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1, **_: Any) -> bytes:
        if n is None or n < 0:
            for chunk in self._rest:
                self._buffer += chunk
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        while len(self._buffer) < n:
            more = next(self._rest, None)
            if more is None:
                break
            self._buffer += more
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def release_conn(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        super().close()


class _PumpedBody(io.RawIOBase):
    """A WSGI response produced on a worker thread and read through a queue."""

    def __init__(self, app: Callable[..., Iterable[bytes]], environ: dict[str, Any], start_response: Any) -> None:
        super().__init__()
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._buffer = bytearray()
        self._eof = False
        self._gone = threading.Event()
        environ["connectplugin.client_disconnected"] = self._gone.is_set
        started = threading.Event()

        def marking_start_response(*args: Any) -> Any:
            write = start_response(*args)
            started.set()
            return write

        def pump() -> None:
            app_iter: Iterable[bytes] = ()
            try:
                app_iter = app(environ, marking_start_response)
                for chunk in app_iter:
                    started.set()
                    if self._gone.is_set():
                        break
                    if chunk:
                        self._chunks.put(chunk)
            finally:
                close = getattr(app_iter, "close", None)
                if close is not None:
                    close()
                started.set()
                self._chunks.put(None)

        threading.Thread(target=pump, name="inprocess-stream", daemon=True).start()
        started.wait()

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1, **_: Any) -> bytes:
        want = sys.maxsize if n is None or n < 0 else n
        while len(self._buffer) < want and not self._eof:
            chunk = self._chunks.get()
            if chunk is None:
                self._eof = True
            else:
                self._buffer += chunk
        data = bytes(self._buffer[:want])
        del self._buffer[:want]
        return data

    def release_conn(self) -> None:
        self.close()

    def close(self) -> None:
        self._gone.set()
        super().close()
