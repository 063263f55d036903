"""Starting plugins: as subprocesses, or inside the host's own process.

A strategy turns a launch request into a :class:`Running` plugin: a base URL, the
``requests`` session that reaches it, and a way to stop it. Write another strategy (a
container, a remote sidecar) by implementing :class:`Strategy`.
"""

from __future__ import annotations

import collections
import enum
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, Protocol

import requests

from ..rpc._transport import WSGIAdapter
from ..rpc.tls import (
    KeyPair,
    TLSConfig,
    auto_key_pair,
    decode_certificate,
    encode_certificate,
    pinned_to,
)
from . import handshake as hs
from . import logs as plugin_logs
from .health import Health
from .hostlink import HostLink
from .plugin import Plugin
from .serving import (
    ENV_APP_VERSIONS,
    ENV_AUTO_MTLS,
    ENV_GO_HOST_URL,
    ENV_GO_PORT,
    ENV_HOST_CERTIFICATE,
    ENV_HOST_URL,
    ENV_SECRET_ON_STDIN,
    ENV_WATCH_STDIN,
    PluginServer,
    ServeConfig,
    pinned_host,
)

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("connectplugin.launcher")

_LINE = re.compile(r"^(\d+)\|(\d+)\|(https?://[^\s|]+)(?:\|([A-Za-z0-9+/=]+))?$")
"""``<core>|<app>|<url>``, then ``|<certificate>`` (base64 DER) under automatic mTLS."""
_STDERR_TAIL_LINES = 20
"""How many of a plugin's last stderr lines a LaunchError carries."""
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT", "PYTHONPATH", "VIRTUAL_ENV")
"""Host variables a plugin inherits; everything else must be given explicitly."""

ADDRESS_LINE = "address-line"
"""Our launch protocol: the cookie and the secret go in, one ``<core>|<app>|<url>`` line comes out."""
PORT_ENV = "port-env"
"""The Go reference's launch protocol: ``PORT`` and ``HOST_URL`` go in; the plugin is ready
once the port accepts a connection and answers ``GET /``, and joins the host by itself."""
PROTOCOLS = (ADDRESS_LINE, PORT_ENV)
READY_GET_TIMEOUT = 1.0
"""``PORT_ENV``: seconds the readiness ``GET /`` may take once the port accepts (Go's 1 s)."""


class LaunchFailure(enum.Enum):
    """Why a plugin did not start."""

    NOT_EXECUTABLE = "could not be executed"
    EXITED = "exited before reporting its address"
    SILENT = "did not report its address in time"
    REFUSED = "reported an address line the host refuses (protocol versions)"
    LINE_TOO_LONG = "wrote a line longer than an address line may be before reporting its address"
    UNREACHABLE = "reported an address where it cannot be reached"
    SETUP = "failed its setup with the host (plugin info, runtime identity, registration)"


class LaunchError(Exception):
    """A plugin did not start. Its facts are attributes; the message says them in prose.

    ``plugin`` is its name, ``reason`` a :class:`LaunchFailure`, ``detail`` the specifics
    (the OS error, the refused version, the timeout), ``exit_code`` its exit status (None
    when it never ran or was still running), ``stderr_tail`` its last lines on stderr.
    """

    def __init__(
        self,
        plugin: str,
        reason: LaunchFailure,
        detail: str = "",
        exit_code: int | None = None,
        stderr_tail: Sequence[str] = (),
    ) -> None:
        self.plugin = plugin
        self.reason = reason
        self.detail = detail or reason.value
        self.exit_code = exit_code
        self.stderr_tail = tuple(stderr_tail)
        tail = "\n".join(self.stderr_tail)
        super().__init__(f"plugin {plugin!r} {self.detail}" + (f"; its last stderr lines:\n{tail}" if tail else ""))


class ForkedProcessError(RuntimeError):
    """Something that belongs to one process was used in a fork of it.

    A forked child (a gunicorn ``--preload`` worker, say) holds copies of its parent's hosts
    and plugins but owns none of them: it never stops, signals or waits for them. ``what``
    names the object, ``owner_pid`` the process that started it, ``pid`` the one that tried.
    """

    def __init__(self, what: str, owner_pid: int, pid: int) -> None:
        self.what = what
        self.owner_pid = owner_pid
        self.pid = pid
        super().__init__(
            f"{what} belongs to process {owner_pid}; process {pid} is a fork of it and may not use "
            "it: create and start hosts in the process that uses them (after the fork)"
        )


@dataclass(frozen=True)
class LaunchContext:
    """What every strategy needs from the host."""

    name: str
    handshake_config: hs.HandshakeConfig
    plugins: Mapping[str, Plugin]
    host_url: str = ""
    on_exit: Callable[[int | None], None] = lambda code: None
    """Called once when the plugin stops by itself or crashes (with its exit code)."""
    host_secret: str = field(default="", repr=False)
    """What the host will present on every call to the plugin; a strategy hands it over
    where no other process can read it (a subprocess: the first line of its stdin)."""
    auto_mtls: KeyPair | None = field(default=None, repr=False)
    """The host's pair for automatic mTLS with this launch: a subprocess gets its certificate
    after the secret, serves TLS accepting only it, and announces its own certificate, which
    it also presents calling the host back; an in-process plugin (no socket) makes a pair
    only to present to a TLS host."""
    host_certificate: x509.Certificate | None = None
    """The certificate the host serves ``host_url`` with, when it serves TLS: the plugin's
    calls back to the host accept exactly it (public material; the key stays with the host)."""


class Running(Protocol):
    """A started plugin."""

    url: str
    session: requests.Session | None
    """A session whose adapter reaches ``url``; None means plain HTTP."""
    pid: int | None
    tls: TLSConfig | None
    """How a client reaches ``url`` over automatic mTLS (our pair, its pinned certificate);
    None when it is not served over TLS."""
    client_certificate: x509.Certificate | None
    """The certificate it presents when it calls the host back (its automatic-mTLS one, or
    an in-process plugin's made for the launch); None when it presents none. A host that
    requires client certificates accepts it while the plugin runs."""
    joins_by_itself: bool
    """It joins the host on its own (the Go launch model): the host waits for its
    registration instead of giving it an identity."""

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
    handshake settings; the host's secret is the first line written to its stdin (a pipe the
    host holds until the plugin stops). Its stdout and stderr lines go to the logger
    ``connectplugin.plugin.<name>``: stderr's JSON records at their own level, other lines
    at INFO or the level of a ``[LEVEL]`` prefix (see ``runtime/logs.py``).
    """

    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    start_timeout: float = 15.0
    """Seconds the plugin gets to report its address; then it is killed and the launch fails."""
    output_timeout: float = 2.0
    """Seconds to wait, once the plugin has exited, for its last output lines (a helper
    process it started may hold its pipes open longer)."""
    exit_record_timeout: float = 5.0
    """Seconds ``stop()`` waits, once the process is gone, for its exit to be recorded
    (``LaunchContext.on_exit`` run)."""
    line_limit: int = 16384
    """Longest line, in bytes, read from the plugin's stdout or stderr. Before its address
    line a longer stdout line fails the launch (an address line is far shorter); output
    after it, and on stderr, is logged in pieces of at most this size, never held whole."""
    protocol: str = ADDRESS_LINE
    """How the plugin is told its settings and says it is ready: ``ADDRESS_LINE`` (ours) or
    ``PORT_ENV`` (the Go reference's launcher: a plugin written for it joins the host by
    itself, and ``PluginHost.launch`` waits for that registration)."""
    port: int = 0
    """``PORT_ENV`` only: the port the plugin is told to listen on; 0 picks a free one."""
    ready_poll_interval: float = 0.1
    """``PORT_ENV`` only: seconds between looks at the port (the Go launcher's 100 ms)."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")

    def start(self, ctx: LaunchContext) -> Running:
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.update(self.env)
        if self.protocol == PORT_ENV:
            return self._start_port_env(ctx, env)
        env.update(
            {
                ctx.handshake_config.magic_cookie_key: ctx.handshake_config.magic_cookie_value,
                ENV_APP_VERSIONS: hs.format_versions(ctx.handshake_config.app_protocol_versions),
                ENV_WATCH_STDIN: "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if ctx.host_url:
            env[ENV_HOST_URL] = ctx.host_url
        if ctx.host_secret:
            env[ENV_SECRET_ON_STDIN] = "1"
        if (ctx.auto_mtls is not None or ctx.host_certificate is not None) and not ctx.host_secret:
            raise ValueError("the host's certificates are handed over with the host secret")
        if ctx.auto_mtls is not None:
            env[ENV_AUTO_MTLS] = "1"
        if ctx.host_certificate is not None:
            env[ENV_HOST_CERTIFICATE] = "1"
        proc = self._popen(ctx, env)
        if ctx.host_secret:
            lines = [ctx.host_secret]
            if ctx.auto_mtls is not None:
                lines.append(encode_certificate(ctx.auto_mtls.certificate))
            if ctx.host_certificate is not None:
                lines.append(encode_certificate(ctx.host_certificate))
            _hand_over(proc, lines)
        running = _Process(ctx, proc, self)
        running.await_address()
        return running

    def _start_port_env(self, ctx: LaunchContext, env: dict[str, str]) -> Running:
        # As the Go launcher does: no cookie and no secret (a Go plugin reads neither); our
        # own plugins recognise this model by PORT and HOST_URL. Stdin is still our pipe.
        port = self.port or _free_port()
        env.update({ENV_GO_PORT: str(port), ENV_GO_HOST_URL: ctx.host_url, ENV_WATCH_STDIN: "1", "PYTHONUNBUFFERED": "1"})
        proc = self._popen(ctx, env)
        running = _Process(ctx, proc, self)
        running.await_port(port)
        return running

    def _popen(self, ctx: LaunchContext, env: dict[str, str]) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
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
            raise LaunchError(
                ctx.name, LaunchFailure.NOT_EXECUTABLE, f"could not be executed ({' '.join(self.command)}): {e}"
            ) from None


def _free_port() -> int:
    """A loopback port nobody listens on now (the plugin is told to take it; a race with
    another process is possible, as with the Go launcher's configured ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int, timeout: float) -> bool:
    """Whether the port accepts a connection and then answers ``GET /`` with any status
    (the Go launcher's readiness: even a 404 means the server is up)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
        conn = http.client.HTTPConnection(host, port, timeout=max(timeout, READY_GET_TIMEOUT))
        try:
            conn.request("GET", "/")
            conn.getresponse().read(0)
        finally:
            conn.close()
        return True
    except (OSError, http.client.HTTPException):
        return False


def _hand_over(proc: subprocess.Popen[bytes], lines: Sequence[str]) -> None:
    """Write the secret line (and the host's certificate line) to the child's stdin: a pipe
    buffer holds them, so this never blocks; a child that already exited fails its launch
    on its own."""
    assert proc.stdin is not None
    try:
        proc.stdin.write("".join(line + "\n" for line in lines).encode())
        proc.stdin.flush()
    except OSError:
        pass


def _announced(url: str, certificate: str) -> tuple[x509.Certificate | None, str]:
    """The certificate a plugin announced with ``url`` under automatic mTLS, or why it is refused."""
    if not certificate or not url.startswith("https://"):
        return None, "it did not announce a TLS certificate (it does not support automatic mTLS)"
    try:
        return decode_certificate(certificate), ""
    except ValueError as e:
        return None, f"it announced a certificate the host cannot read ({e})"


class _Process:
    """A plugin subprocess: ``ProcessStrategy.start`` makes it, then ``await_address()`` returns
    once it has reported its address (or raises LaunchError). Three named threads per plugin read its
    stdout and stderr and wait for its exit. ``stop()`` and ``alive()`` are safe from any thread.
    """

    session: requests.Session | None = None
    pid: int | None

    def __init__(self, ctx: LaunchContext, proc: subprocess.Popen[bytes], strategy: ProcessStrategy) -> None:
        self.pid = proc.pid
        self.url = ""
        self.tls: TLSConfig | None = None
        self.client_certificate: x509.Certificate | None = None
        self.owner_pid = os.getpid()
        self._ctx = ctx
        self._proc = proc
        self._strategy = strategy
        self._logger = logging.getLogger(f"connectplugin.plugin.{ctx.name}")
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        # The lock of _reported_or_exited guards url, _refused, _overlong and _reaped; it is
        # notified when the address line arrives (accepted or refused), an overlong line
        # comes first, or the process exits.
        self._reported_or_exited = threading.Condition(threading.Lock())
        self._refused = ""
        self._overlong = False
        self._reaped = False
        self._launched = False
        self._launch_decided = threading.Event()  # _launched is final: the exit waiter may act
        self._exit_recorded = threading.Event()  # the exit has been recorded (on_exit run)
        self._stopping = False
        self.joins_by_itself = strategy.protocol == PORT_ENV
        self._port = 0
        _forks.track(self)
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"{ctx.name}-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"{ctx.name}-stderr", daemon=True),
        ]

    def await_address(self) -> None:
        """Start reading its output and watching for its exit; return once it has reported
        its address, or raise LaunchError (it exited, was refused, or stayed silent)."""
        self._watch()
        with self._reported_or_exited:
            self._reported_or_exited.wait_for(
                lambda: bool(self.url or self._refused or self._overlong or self._reaped),
                timeout=self._strategy.start_timeout,
            )
        self._decide()

    def await_port(self, port: int) -> None:
        """``PORT_ENV``: return once the plugin answers on ``port`` (polled, as the Go launcher
        does), or raise LaunchError (it exited or never answered)."""
        self._port = port
        self._watch()
        deadline = time.monotonic() + self._strategy.start_timeout
        interval = self._strategy.ready_poll_interval
        while True:
            with self._reported_or_exited:
                if self._reaped:
                    break
            if _answers("127.0.0.1", port, interval):
                with self._reported_or_exited:
                    self.url = f"http://127.0.0.1:{port}"
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with self._reported_or_exited:  # an exit ends the wait at once
                self._reported_or_exited.wait_for(lambda: self._reaped, timeout=min(interval, remaining))
        self._decide()

    def _watch(self) -> None:
        waiter = threading.Thread(target=self._await_exit, name=f"{self._ctx.name}-wait", daemon=True)
        for t in [*self._readers, waiter]:
            t.start()

    def _decide(self) -> None:
        with self._reported_or_exited:
            started = bool(self.url)
        if not started:
            self._fail()
        self._launched = True
        self._launch_decided.set()

    def _fail(self) -> None:
        code = self._proc.poll()
        if self._refused:
            self._kill()
            reason, detail = LaunchFailure.REFUSED, f"was refused: {self._refused}"
        elif self._overlong:
            self._kill()
            reason = LaunchFailure.LINE_TOO_LONG
            detail = f"wrote a stdout line over {self._strategy.line_limit} bytes before reporting its address"
        elif code is None:
            self._kill()
            reason = LaunchFailure.SILENT
            where = f"answer on port {self._port}" if self.joins_by_itself else "report its address"
            detail = f"did not {where} within {self._strategy.start_timeout:g} s"
        else:
            for t in self._readers:  # its last words are in the pipes still
                t.join(timeout=self._strategy.output_timeout)
            reason, detail = LaunchFailure.EXITED, f"exited with status {code} before reporting its address"
        self._launch_decided.set()
        self._close_pipes()
        raise LaunchError(self._ctx.name, reason, detail, exit_code=code, stderr_tail=list(self._stderr_tail))

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for raw in _lines(self._proc.stdout, self._strategy.line_limit):
            if not self.url and not self.joins_by_itself:
                if not raw.endswith(b"\n") and len(raw) == self._strategy.line_limit:
                    # Not an address line, and maybe endless: stop reading. The launch fails;
                    # a plugin still writing blocks on the full pipe until it is killed.
                    with self._reported_or_exited:
                        self._overlong = True
                        self._reported_or_exited.notify_all()
                    return
                match = _LINE.match(raw.decode(errors="replace").rstrip("\r\n"))
                if match:
                    self._accept(int(match[1]), int(match[2]), match[3], match[4] or "")
                    continue
            self._logger.info("%s", raw.decode(errors="replace").rstrip("\r\n"))

    def _accept(self, core: int, app: int, url: str, certificate: str) -> None:
        refused = ""
        announced = None
        if core != hs.CORE_PROTOCOL_VERSION:
            refused = f"it speaks core protocol {core}, not {hs.CORE_PROTOCOL_VERSION}"
        elif app not in self._ctx.handshake_config.app_protocol_versions:
            refused = f"it chose app protocol {app}; the host offers {sorted(self._ctx.handshake_config.app_protocol_versions)}"
        elif self._ctx.auto_mtls is not None:
            announced, refused = _announced(url, certificate)
        with self._reported_or_exited:
            # A refusal fails the launch now rather than at the start timeout.
            if refused:
                self._refused = refused
            else:
                self.app_protocol_version = app
                if self._ctx.auto_mtls is not None and announced is not None:
                    self.tls = pinned_to(self._ctx.auto_mtls, announced)
                    self.client_certificate = announced
                self.url = url
            self._reported_or_exited.notify_all()

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        limit = self._strategy.line_limit
        continued = False  # the previous piece was the start of a line longer than limit
        for raw in _lines(self._proc.stderr, limit):
            line = raw.decode(errors="replace").rstrip("\r\n")
            piece = continued or (len(raw) == limit and not raw.endswith(b"\n"))
            continued = len(raw) == limit and not raw.endswith(b"\n")
            # A piece of an overlong line is no whole record: logged as it is, at INFO.
            level, message = (logging.INFO, line) if piece else plugin_logs.parse(line)
            self._stderr_tail.append(message if level == logging.INFO else f"{logging.getLevelName(level)} {message}")
            self._logger.log(level, "%s", message)

    def _await_exit(self) -> None:
        code = self._proc.wait()
        with self._reported_or_exited:
            self._reaped = True
            self._reported_or_exited.notify_all()
        self._launch_decided.wait()
        if self._launched:  # a failed launch is reported by its LaunchError, not on_exit
            if not self._stopping:
                log.error("plugin %r (pid %d) exited unexpectedly with status %s", self._ctx.name, self.pid, code)
            else:
                log.info("plugin %r (pid %d) exited with status %s", self._ctx.name, self.pid, code)
            self._ctx.on_exit(code)
        self._exit_recorded.set()
        # Its last output may still be in the pipes (a child of it may even hold them open).
        for t in self._readers:
            t.join(timeout=self._strategy.output_timeout)

    def last_stderr(self) -> tuple[str, ...]:
        """Its last lines on stderr; once it has exited, after they are read (at most
        ``output_timeout`` seconds: a child of it may hold the pipe open)."""
        if self._proc.poll() is not None:
            for t in self._readers:
                if t.ident is not None:
                    t.join(timeout=self._strategy.output_timeout)
        return tuple(self._stderr_tail)

    def _check_owner(self) -> None:
        pid = os.getpid()
        if pid != self.owner_pid:
            raise ForkedProcessError(f"plugin {self._ctx.name!r} (pid {self.pid})", self.owner_pid, pid)

    def alive(self) -> bool:
        self._check_owner()
        return self._proc.poll() is None

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. (The host tries Shutdown first.)

        Signals go to the plugin's whole process group, so helpers it started go too.
        Returns once the exit has been recorded. In a fork of the owner, does nothing.
        """
        if os.getpid() != self.owner_pid:
            log.debug("not stopping plugin %r (pid %d): it belongs to process %d", self._ctx.name, self.pid, self.owner_pid)
            return
        self._stopping = True
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("plugin %r ignored SIGTERM for %g s; killing it", self._ctx.name, grace)
                self._kill()
        self._exit_recorded.wait(timeout=self._strategy.exit_record_timeout)
        self._close_pipes()

    def wait(self, timeout: float) -> bool:
        self._check_owner()
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


class _Forks:
    """Closes a forked child's copies of its parent's plugin stdin pipes, right after the fork.

    A plugin exits on end-of-file on stdin, which comes only once every copy of the pipe's
    write end is closed: a child that kept one would keep its parent's plugin alive after the
    parent died. The fork hook is registered with the first plugin process, not at import.
    ``_lock`` guards ``_processes`` and ``_hooked``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: weakref.WeakSet[_Process] = weakref.WeakSet()
        self._hooked = False

    def track(self, process: _Process) -> None:
        with self._lock:
            self._processes.add(process)
            hook, self._hooked = not self._hooked, True
        if hook:
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        # Only this thread exists in the child, and the lock may have been held by another
        # thread at the fork: take a fresh one rather than the inherited copy.
        self._lock = threading.Lock()
        for process in list(self._processes):
            process._close_pipes()
        self._processes = weakref.WeakSet()


_forks = _Forks()


def _lines(pipe: IO[bytes], limit: int) -> Iterator[bytes]:
    """The pipe's lines, newline kept; one longer than ``limit`` bytes comes in pieces."""
    while True:
        line = pipe.readline(limit)
        if not line:
            return
        yield line


# --- in-process -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InProcessStrategy:
    """Run the plugin inside the host's process: no subprocess and no socket.

    Calls go through a ``requests`` transport adapter that invokes the plugin's WSGI app
    directly, on the caller's thread. No other process can reach such a plugin, so it
    takes no host secret: only the host's own clients and router hold its app.
    """

    impls: Mapping[str, Any]
    config: ServeConfig = field(default_factory=ServeConfig)
    health: Health | None = None
    link: HostLink | None = None
    plugins: Mapping[str, Plugin] | None = None
    """The plugin definitions to serve; by default the host's own map."""

    def start(self, ctx: LaunchContext) -> Running:
        plugins = self.plugins if self.plugins is not None else ctx.plugins
        host_tls = None if ctx.host_certificate is None else pinned_host(self.config, ctx.host_certificate)
        if host_tls is not None and host_tls.key_pair is None and ctx.auto_mtls is not None:
            # No socket to encrypt, but a host requiring client certificates needs one on its
            # calls back: a pair made for this launch, in memory, which the host accepts while
            # the plugin runs.
            host_tls = replace(host_tls, key_pair=auto_key_pair())
        server = PluginServer(
            plugins, self.impls, ctx.handshake_config, self.config, self.health, self.link, host_tls=host_tls
        )
        return _InProcess(ctx, server, host_tls.key_pair.certificate if host_tls and host_tls.key_pair else None)


class _InProcess:
    pid: int | None = None
    tls: TLSConfig | None = None  # no socket: nothing to encrypt
    joins_by_itself = False

    def __init__(self, ctx: LaunchContext, server: PluginServer, client_certificate: x509.Certificate | None) -> None:
        self._ctx = ctx
        self._server = server
        self.client_certificate = client_certificate
        self.url = f"http://{ctx.name}.inprocess.invalid"
        self.app_protocol_version = max(ctx.handshake_config.app_protocol_versions)
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
