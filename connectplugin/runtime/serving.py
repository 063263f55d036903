"""The plugin side: ``serve()`` turns a blocking script into a plugin a host can launch.

A launched plugin reads the host's secret from the first line of its stdin, listens on an
ephemeral port, tells the host where with one line on stdout (``<core version>|<app
version>|<url>``), and from then on everything it prints is just log output. Only calls
carrying that secret reach its procedures (see ``gate``). It stops on SIGTERM, SIGINT or ``PluginControl.Shutdown`` (in-flight calls
get a grace period), and by itself when its host goes away, however the host died.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..gen.connectplugin.v1 import handshake_pb2, lifecycle_pb2, plugininfo_pb2
from ..gen.connectplugin.v1.lifecycle_connect import PluginControlHandler
from ..gen.connectplugin.v1.plugininfo_connect import PluginIdentityHandler
from ..rpc import tls
from ..rpc.errors import Code, ConnectError
from ..rpc.httpserver import HTTPConfig, HTTPServer
from ..rpc.server import App, Context, ServerConfig, text_response
from . import handshake as hs
from . import logs as plugin_logs
from .gate import HostGate, warn_unauthenticated
from .health import NOT_SERVING, SERVING, Health, HealthService, report_to_wire
from .hostlink import HostLink
from .plugin import Plugin, Requirement, ServiceDeclaration

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("connectplugin.plugin")

# The environment a host gives a plugin it launches.
ENV_APP_VERSIONS = "CONNECTPLUGIN_APP_PROTOCOL_VERSIONS"
ENV_HOST_URL = "CONNECTPLUGIN_HOST_URL"
ENV_JOIN_TOKEN = "CONNECTPLUGIN_JOIN_TOKEN"
"""Where a self-registering plugin finds its join token when ``ServeConfig.join_token`` is empty."""
ENV_WATCH_STDIN = "CONNECTPLUGIN_WATCH_STDIN"
"""Set to 1 when stdin is a pipe from the host: its end of file means the host is gone."""
ENV_SECRET_ON_STDIN = "CONNECTPLUGIN_SECRET_ON_STDIN"
"""Set to 1 when the first line on stdin is the host's secret for this launch. Never in the
environment or argv, which other local processes can read (``/proc/<pid>/environ``, ``ps``)
and which the plugin's own children would inherit."""
ENV_AUTO_MTLS = "CONNECTPLUGIN_AUTO_MTLS"
"""Set to 1 when the host asks for automatic mTLS: its certificate is the line after the
secret on stdin, and the plugin announces its own after its URL in the address line."""
ENV_HOST_CERTIFICATE = "CONNECTPLUGIN_HOST_CERTIFICATE"
"""Set to 1 when the host serves TLS: the next line on stdin (after the secret and the
automatic-mTLS certificate, when given) is the certificate the host serves with, which the
plugin's host link then accepts, pinned, for its calls back to the host (public material:
the host's key never leaves it)."""
ENV_ALLOW_UNAUTHENTICATED = "CONNECTPLUGIN_ALLOW_UNAUTHENTICATED"
"""Set to 1 to run a plugin by hand with no host secret (``ServeConfig.allow_unauthenticated``)."""
PROBE_PATHS = ("/healthz", "/readyz")
"""Plain-text probes any caller may read; every other path needs the host's secret."""
# The Go launch model (the Go reference's ProcessStrategy): a plugin gets only these two,
# listens on PORT, and joins the host at HOST_URL by itself; no cookie, no address line.
ENV_GO_PORT = "PORT"
ENV_GO_HOST_URL = "HOST_URL"


@dataclass(frozen=True)
class ServeConfig:
    """How a plugin serves. Identity fields default to the first plugin's name and version."""

    http: HTTPConfig = field(default_factory=HTTPConfig)
    """Where and how the plugin listens (port 0: an ephemeral port, reported to the host)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    grace_period: float = 10.0
    """Seconds in-flight calls get to finish on SIGTERM/SIGINT (Shutdown names its own)."""
    min_grace: float = 0.25
    """Even a stop with no grace leaves this long for replies already being written
    (the Shutdown call's own among them)."""
    host_gone_grace: float = 1.0
    """Seconds in-flight calls get when the plugin stops because its host went away."""
    unregister_wait: float = 3.0
    """Seconds ``run()`` waits, after draining, for the host to withdraw our registrations."""
    self_id: str = ""
    self_version: str = ""
    host_url: str = ""
    """Self-registering mode: join the host at this URL on our own (no launch, no cookie check).
    An https:// host is reached with ``http.tls``: its key pair is our client certificate
    (with a host that admits certificates, it is our identity) and its trust checks the host."""
    advertise_url: str = ""
    """The URL the host should call us at, when it differs from where we listen."""
    join_token: str = ""
    """Self-registering mode: the secret the host admits joining plugins with (sent in the
    handshake); empty: the ``CONNECTPLUGIN_JOIN_TOKEN`` environment variable, if set."""
    heartbeat_interval: float = 1.0
    """Self-registering mode: seconds between health reports to the host, and between
    attempts to (re)join it; keep it well under the host's heartbeat timeout."""
    provides: Sequence[ServiceDeclaration] = ()
    requires: Sequence[Requirement] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    allow_unauthenticated: bool = False
    """Development only: serve every procedure to any caller, with no host secret, logging a
    warning (``X-Plugin-Caller-ID`` is then stripped, as no host vouches for it). ``serve()``
    also turns it on when ``CONNECTPLUGIN_ALLOW_UNAUTHENTICATED=1`` is in the environment."""
    secret_timeout: float = 10.0
    """Seconds a launched plugin waits for its host's secret on stdin before giving up."""
    structured_logs: bool = True
    """A plugin a host launched logs INFO and above on stderr as JSON lines, which the host
    re-emits at their level (``runtime/logs.py``); never when the program configured logging
    itself (the root logger has a handler) nor when it is not launched by our host."""


def _declaration_to_wire(declaration: ServiceDeclaration) -> handshake_pb2.ServiceDeclaration:
    return handshake_pb2.ServiceDeclaration(
        type=declaration.service_type, version=declaration.version, path=declaration.path
    )


def _requirement_to_wire(requirement: Requirement) -> handshake_pb2.ServiceDependency:
    return handshake_pb2.ServiceDependency(
        type=requirement.service_type,
        min_version=requirement.min_version,
        required_for_startup=requirement.required_for_startup,
    )


class _Control(PluginControlHandler):
    def __init__(self, server: PluginServer) -> None:
        self._server = server

    def get_health(self, request: lifecycle_pb2.GetHealthRequest, ctx: Context) -> lifecycle_pb2.GetHealthResponse:
        return report_to_wire(self._server.health.get(), lifecycle_pb2.GetHealthResponse)

    def shutdown(self, request: lifecycle_pb2.ShutdownRequest, ctx: Context) -> lifecycle_pb2.ShutdownResponse:
        if request.grace_period_seconds < 0:
            raise ConnectError(Code.INVALID_ARGUMENT, "grace_period_seconds must not be negative")
        self._server.stop(float(request.grace_period_seconds), request.reason or "host asked")
        return lifecycle_pb2.ShutdownResponse(acknowledged=True)


class _IdentityService(PluginIdentityHandler):
    def __init__(self, info: plugininfo_pb2.GetPluginInfoResponse, link: HostLink, self_registering: bool) -> None:
        self._info = info
        self._link = link
        self._self_registering = self_registering

    def get_plugin_info(
        self, request: plugininfo_pb2.GetPluginInfoRequest, ctx: Context
    ) -> plugininfo_pb2.GetPluginInfoResponse:
        return self._info

    def set_runtime_identity(
        self, request: plugininfo_pb2.SetRuntimeIdentityRequest, ctx: Context
    ) -> plugininfo_pb2.SetRuntimeIdentityResponse:
        if self._self_registering:
            # Its identity and host come from its own configuration and handshake, never a caller.
            raise ConnectError(Code.FAILED_PRECONDITION, "this plugin joins its host by itself")
        if not request.runtime_id or not request.runtime_token:
            raise ConnectError(Code.INVALID_ARGUMENT, "runtime_id and runtime_token are required")
        if not request.host_url and not self._link.host_url:
            # The Go reference's Platform sends no host_url: its plugins are told it at start.
            raise ConnectError(
                Code.FAILED_PRECONDITION, f"no host_url given, and this plugin was started without {ENV_HOST_URL}"
            )
        # Only the first assignment is free; changing it takes the identity being replaced.
        if self._link.connected and not self._link.is_current(ctx.request_headers.get("authorization", "")):
            raise ConnectError(Code.PERMISSION_DENIED, "this plugin already has a runtime identity")
        log.info("runtime identity assigned: %s", request.runtime_id)
        # Registering calls back into the host, which may be waiting on this reply.
        threading.Thread(
            target=self._assign,
            args=(request.runtime_id, request.runtime_token, request.host_url),
            name="assign-identity",
            daemon=True,
        ).start()
        return plugininfo_pb2.SetRuntimeIdentityResponse(acknowledged=True)

    def _assign(self, runtime_id: str, token: str, host_url: str) -> None:
        try:
            self._link.assign(runtime_id, token, host_url)
        except ConnectError as e:
            log.error("could not register with the host at %s: %s", host_url, e)


class PluginServer:
    """A plugin's server, built but not running: ``serve()`` is the usual way in.

    Constructing one binds no port and starts no thread: ``listen()`` binds, ``run()``
    serves on the caller's thread. Exposed so tests and in-process launches can run a
    plugin on a thread or call its WSGI ``app`` directly. ``stop()`` is safe from any thread.

    What listens on the socket is ``wsgi``: ``app`` behind a :class:`HostGate` that admits
    only calls carrying the secret ``link`` holds (``link.expect_host``; a self-registering
    plugin gets it from its host's handshake). ``app`` itself checks nothing: it is for
    callers in this process, such as an in-process launch.
    """

    def __init__(
        self,
        plugins: Mapping[str, Plugin],
        impls: Mapping[str, Any],
        handshake: hs.HandshakeConfig,
        config: ServeConfig | None = None,
        health: Health | None = None,
        link: HostLink | None = None,
        *,
        host_tls: tls.TLSConfig | None = None,
    ) -> None:
        """``host_tls``: how ``link`` reaches an https:// host, when not with ``config.http.tls``
        (a launched plugin: pinned to the certificate its host handed over)."""
        self.config = config = config or ServeConfig()
        self.health = health or Health()
        self.handshake_config = handshake
        _check_plugins(plugins, impls)
        first = next(iter(plugins.values()))
        self.info = plugininfo_pb2.GetPluginInfoResponse(
            self_id=config.self_id or next(iter(plugins)),
            self_version=config.self_version or first.version,
            provides=[_declaration_to_wire(d) for d in config.provides],
            requires=[_requirement_to_wire(r) for r in config.requires],
            metadata=dict(config.metadata),
        )
        self.link = link or HostLink()
        self_registering = bool(config.host_url)
        self.link.attach(
            self.health,
            config.provides,
            config.host_url or os.environ.get(ENV_HOST_URL, ""),
            host_tls if host_tls is not None else config.http.tls,
        )
        handlers: list[Any] = [impls[name] for name in plugins]
        handlers += [
            hs.PluginHandshake(handshake, plugins),
            HealthService(self.health),
            _Control(self),
            _IdentityService(self.info, self.link, self_registering),
        ]
        for name, plugin in plugins.items():
            # Under the service name, and under the plugin name as the Go reference does.
            self.health.set_service(plugin.service.name, SERVING)
            self.health.set_service(name, SERVING)
        self.app = App(handlers, config.server, routes={"/healthz": self._live, "/readyz": self._ready})
        self.wsgi = HostGate(self.app, self.link, PROBE_PATHS, config.allow_unauthenticated)
        self._http = HTTPServer(self.wsgi, config.http)
        self._stopped = threading.Event()  # stop() was called
        self._finished = threading.Event()  # run() returned: drained, link closed
        self._unregister: threading.Thread | None = None

    def listen(self) -> str:
        """Bind the port (without serving yet) and return the base URL."""
        url = self._http.bind()
        if self.config.allow_unauthenticated:
            warn_unauthenticated(url)
        return url

    def run(self) -> None:
        """Serve on this thread until stopped, then drain in-flight calls."""
        try:
            self._http.serve_forever()
            if self._unregister is not None:
                # The host should stop offering us before we go.
                self._unregister.join(timeout=self.config.unregister_wait)
            self.link.close()
        finally:
            self._finished.set()

    def stop(self, grace: float | None = None, reason: str = "") -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting down%s", f" ({reason})" if reason else "")
        self.health.set_service("", NOT_SERVING)
        self.app.stopping.set()
        grace = max(self.config.min_grace, self.config.grace_period if grace is None else grace)
        self._unregister = threading.Thread(target=self.link.unregister, name="unregister", daemon=True)
        self._unregister.start()
        # From a handler thread: let the reply go out, then drain without blocking it.
        threading.Thread(target=self._http.close, args=(grace,), name="drain", daemon=True).start()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``stop()``; True once it has been called."""
        return self._stopped.wait(timeout)

    def _live(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        return text_response(start_response, 200, "ok")

    def _ready(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.stopped or self.health.status("") != SERVING:
            return text_response(start_response, 503, "not ready")
        return text_response(start_response, 200, "ready")

    def _stay_joined(self, base_url: str) -> None:
        """Self-registering: (re)join the host whenever it is new or back, until ``run()`` ends."""
        link, interval = self.link, self.config.heartbeat_interval
        refused = ""  # why the last attempt to join failed: told once, not every interval
        while not self._finished.is_set():
            try:
                if not link.connected:
                    join_token = self.config.join_token or os.environ.get(ENV_JOIN_TOKEN, "")
                    link.connect(self.handshake_config, self.info.self_id, self.info.self_version, base_url, join_token)
                    log.info("connected to host %s as %s", link.host_url, link.runtime_id)
                    refused = ""
                else:
                    link.rotate_if_due(self.handshake_config, self.info.self_id, self.info.self_version)
                    link.heartbeat()
            except ConnectError as e:
                if link.connected and e.code in (Code.UNAUTHENTICATED, Code.UNAVAILABLE):
                    log.warning("lost the host at %s (%s); reconnecting", link.host_url, e.code.value)
                    link.reset()
                elif not link.connected:
                    # A wrong CA, certificate or join token never heals by itself: say so at once.
                    reason = f"{e.code.value}: {e.message}"
                    log.log(
                        logging.DEBUG if reason == refused else logging.WARNING,
                        "cannot join the host at %s: %s (trying again every %g s)", link.host_url, reason, interval,
                    )
                    refused = reason
            self._finished.wait(interval)


def serve(
    plugins: Mapping[str, Plugin],
    impls: Mapping[str, Any],
    *,
    handshake: hs.HandshakeConfig,
    config: ServeConfig | None = None,
    health: Health | None = None,
    link: HostLink | None = None,
) -> None:
    """Serve ``impls`` (name -> handler object) as the plugins ``plugins`` describe; blocks.

    Must be started by a host: with the magic cookie in the environment and the host's
    secret on stdin it is a plugin our host launched (without the cookie it explains that it
    is a plugin and exits with status 1, and so it does without the secret unless
    ``allow_unauthenticated``); with ``config.host_url`` it joins that host on its own, and
    answers calls only once the host's handshake has given it the secret the host calls it
    with. Started by the Go reference's launcher (``PORT`` and ``HOST_URL`` in the
    environment, no cookie) it listens on ``PORT``, joins ``HOST_URL`` on its own and,
    since Go hosts present no credential, answers any caller (``allow_unauthenticated``);
    the cookie is then checked in the handshake, as Go does. Returns after a graceful
    shutdown. Pass ``health`` to set
    this plugin's health from your code, and ``link`` to call other plugins through the host.
    The entry point: it alone installs SIGTERM/SIGINT handlers.
    """
    config = config or ServeConfig()
    if not config.host_url and handshake.magic_cookie_key not in os.environ:
        config = _go_launched(config)
    if os.environ.get(ENV_ALLOW_UNAUTHENTICATED) == "1":
        config = dataclasses.replace(config, allow_unauthenticated=True)
    version, secret, announced, host_tls = 0, "", "", None
    if not config.host_url:
        version = _launched_version(handshake, _importing_module(sys._getframe(1)))
        if config.structured_logs:
            plugin_logs.install(sys.stderr)
        secret = _launch_secret(config)
        if os.environ.get(ENV_AUTO_MTLS) == "1":
            config, announced = _auto_mtls(config)
        if os.environ.get(ENV_HOST_CERTIFICATE) == "1":
            host_tls = _host_tls(config)
    server = PluginServer(plugins, impls, handshake, config, health, link, host_tls=host_tls)
    if secret:
        server.link.expect_host(secret)
    url = server.listen()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop(reason="signal"))
    if os.environ.get(ENV_WATCH_STDIN) == "1":
        threading.Thread(target=_watch_host, args=(server,), name="host-watch", daemon=True).start()
    if config.host_url:
        log.info("serving at %s; joining host %s", url, config.host_url)
        base_url = config.advertise_url or url
        threading.Thread(target=server._stay_joined, args=(base_url,), name="host-join", daemon=True).start()
    else:
        certificate = f"|{announced}" if announced else ""
        sys.stdout.write(f"{hs.CORE_PROTOCOL_VERSION}|{version}|{url}{certificate}\n")
        sys.stdout.flush()
    server.run()


def _go_launched(config: ServeConfig) -> ServeConfig:
    """``config`` for the Go launch model when ``PORT`` and ``HOST_URL`` say we are in it."""
    port, host_url = os.environ.get(ENV_GO_PORT, ""), os.environ.get(ENV_GO_HOST_URL, "")
    if not port or not host_url:
        return config
    if not port.isdigit() or not 0 < int(port) < 65536:
        sys.stderr.write(f"connectplugin: {ENV_GO_PORT}={port!r} is not a port number\n")
        sys.exit(1)
    log.info("started in the Go launch model: listening on port %s, joining %s", port, host_url)
    # Go hosts call and route to plugins with no credential: the plugin must answer them.
    http = dataclasses.replace(config.http, port=int(port))
    return dataclasses.replace(config, http=http, host_url=host_url, allow_unauthenticated=True)


class NotLaunchedError(RuntimeError):
    """``serve()`` was called while the module ``module`` was being imported, in a process
    no host launched: typically a plugin script without ``if __name__ == "__main__":``
    imported by a host (for ``InProcessStrategy``). Raised, not exited, so the importing
    host keeps running and sees where the call came from."""

    def __init__(self, module: str) -> None:
        self.module = module
        super().__init__(
            f"serve() was called while importing {module!r}, in a process no host launched as a "
            f"plugin; put the call under `if __name__ == \"__main__\":` so that importing {module!r} "
            "(for InProcessStrategy, say) does not serve"
        )


def _importing_module(frame: types.FrameType | None) -> str:
    """The module whose top-level code made this call (a module being imported), or "" when
    the call comes from ``__main__`` or a function it called."""
    while frame is not None and frame.f_code.co_name != "<module>":
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return "" if name == "__main__" else str(name)


def _launched_version(handshake: hs.HandshakeConfig, importing: str) -> int:
    """The app version agreed with the launching host; exits 1 when no host launched us (and
    raises NotLaunchedError when the call comes from a module being imported)."""
    if os.environ.get(handshake.magic_cookie_key) != handshake.magic_cookie_value:
        if importing:
            raise NotLaunchedError(importing)
        if ENV_APP_VERSIONS in os.environ or ENV_WATCH_STDIN in os.environ:
            # A host did start us, with another magic cookie than ours.
            sys.stderr.write(
                "connectplugin: the host that started this plugin gave it a different magic cookie\n"
                f"than the plugin expects (it expects the environment variable {handshake.magic_cookie_key}\n"
                "with its own value): host and plugin must use the same HandshakeConfig.\n"
            )
        else:
            sys.stderr.write(
                "This program is a connectplugin plugin: a host application starts it and talks to it.\n"
                "Run the host instead, or, to try the plugin by hand, set the environment variable\n"
                f"{handshake.magic_cookie_key} to the host's magic cookie value.\n"
            )
        sys.exit(1)
    offered = os.environ.get(ENV_APP_VERSIONS)
    try:
        host_versions = hs.parse_versions(offered) if offered else list(handshake.app_protocol_versions)
        return hs.negotiate(handshake.app_protocol_versions, host_versions, us="plugin", them="host")
    except ConnectError as e:
        sys.stderr.write(f"connectplugin: {e.message}\n")
        sys.exit(1)


def _launch_secret(config: ServeConfig) -> str:
    """The host's secret from stdin's first line; exits 1 when there is none and it is needed."""
    secret = ""
    if os.environ.get(ENV_SECRET_ON_STDIN) == "1":
        secret = _read_line(0, config.secret_timeout).strip()
    if not secret and not config.allow_unauthenticated:
        sys.stderr.write(
            "connectplugin: no host secret on stdin, so no caller could be trusted. A host starts\n"
            "this plugin and hands it one; to try the plugin by hand with no authentication at all\n"
            f"(development only), set {ENV_ALLOW_UNAUTHENTICATED}=1.\n"
        )
        sys.exit(1)
    return secret


def _auto_mtls(config: ServeConfig) -> tuple[ServeConfig, str]:
    """Serve TLS accepting only the host's certificate (the line after the secret on stdin),
    with a key pair made now, in memory; returns the config and our certificate to announce."""
    try:
        host_certificate = tls.decode_certificate(_read_line(0, config.secret_timeout))
    except ValueError as e:
        sys.stderr.write(f"connectplugin: automatic mTLS without the host's certificate on stdin: {e}\n")
        sys.exit(1)
    own = tls.auto_key_pair()
    http = dataclasses.replace(config.http, tls=tls.pinned_to(own, host_certificate))
    return dataclasses.replace(config, http=http), tls.encode_certificate(own.certificate)


def _host_tls(config: ServeConfig) -> tls.TLSConfig:
    """How the host link reaches the TLS host that launched us, whose certificate is the
    next line on stdin."""
    try:
        certificate = tls.decode_certificate(_read_line(0, config.secret_timeout))
    except ValueError as e:
        sys.stderr.write(f"connectplugin: the host serves TLS but its certificate is not on stdin: {e}\n")
        sys.exit(1)
    return pinned_host(config, certificate)


def pinned_host(config: ServeConfig, certificate: x509.Certificate) -> tls.TLSConfig:
    """A launched plugin's TLS for calls to its host: accepting exactly the ``certificate``
    the host serves with, presenting our own pair if we have one (automatic mTLS's)."""
    own = config.http.tls.key_pair if config.http.tls is not None else None
    return tls.TLSConfig(key_pair=own, trust=tls.Trust(pinned=(certificate,)))


def _read_line(fd: int, timeout: float) -> str:
    """One line from ``fd``, read a byte at a time so nothing after it is consumed; "" when
    nothing complete arrives within ``timeout`` seconds, the pipe ends first, or ``fd`` is
    not open (the caller then explains what is missing)."""
    line = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return ""
            byte = os.read(fd, 1)
            if not byte:
                return ""
            line += byte
    except (OSError, ValueError):
        return ""
    return line.decode(errors="replace")


def _watch_host(server: PluginServer) -> None:
    """Stop when stdin, a pipe whose other end only the host holds, reaches end of file."""
    try:
        # The raw descriptor, not sys.stdin: a buffered reader's lock would abort
        # interpreter shutdown while this daemon thread sits in read().
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    if not server.stopped:
        log.warning("host went away; shutting down")
        server.stop(grace=server.config.host_gone_grace, reason="host gone")


def _check_plugins(plugins: Mapping[str, Plugin], impls: Mapping[str, Any]) -> None:
    if not plugins:
        raise ValueError("serve() needs at least one plugin")
    if set(plugins) != set(impls):
        raise ValueError(
            f"plugins and impls must name the same plugins: {sorted(plugins)} vs {sorted(impls)}"
        )
    for name, plugin in plugins.items():
        if not isinstance(impls[name], plugin.handler):
            raise TypeError(f"impls[{name!r}] must subclass {plugin.handler.__qualname__}")
