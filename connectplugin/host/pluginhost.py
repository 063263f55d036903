"""The host side: launching plugins, handing out typed clients, and the host's own services.

A :class:`PluginHost` serves the host half of the protocol (the handshake that gives
self-started plugins a runtime identity, and ``PluginLifecycle.ReportHealth``), launches
plugins through a strategy, and returns a :class:`PluginClient` for each.
"""

from __future__ import annotations

import atexit
import logging
import math
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..gen.connectplugin.v1 import handshake_pb2, lifecycle_pb2, plugininfo_pb2
from ..gen.connectplugin.v1.handshake_connect import HandshakeServiceHandler
from ..gen.connectplugin.v1.lifecycle_connect import PluginControlClient, PluginLifecycleHandler
from ..gen.connectplugin.v1.plugininfo_connect import PluginIdentityClient
from ..rpc.client import Client, ClientConfig
from ..rpc.errors import Code, ConnectError
from ..rpc.httpserver import HTTPConfig, HTTPServer
from ..rpc.server import App, Context, text_response
from ..runtime import handshake as hs
from ..runtime.launcher import LaunchContext, Strategy
from ..runtime.plugin import Plugin
from ..runtime.pluginclient import PluginClient
from .broker import DEFAULT_TTL, Broker, BrokerService
from .broker import ROUTE as BROKER_ROUTE
from .identities import Identities, Identity
from .registry import Registry, RegistryConfig, RegistryService
from .router import ROUTE as ROUTER_ROUTE
from .router import Router

log = logging.getLogger("connectplugin.host")


@dataclass(frozen=True)
class HostConfig:
    """How the host listens, picks providers, and stops its plugins."""

    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 16
    """Threads for unary calls; watchers get ``registry.max_watchers`` more on top."""
    stop_grace: float = 5.0
    """Seconds a plugin gets to finish in-flight calls when it is stopped."""
    handle_signals: bool = True
    """Stop every plugin on SIGTERM/SIGINT (main thread only; earlier handlers still run)."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    grant_ttl: float = DEFAULT_TTL
    """Lifetime of capability grants, in seconds."""
    register_timeout: float = 10.0
    """How long a launch waits for the plugin to register the services it declared."""
    allow_self_registration: bool = True
    """Give identities to plugins that handshake on their own (model B). Anyone who knows
    the magic cookie can then join: turn it off when only launched plugins should."""
    heartbeat_timeout: float = 5.0
    """A self-registered plugin silent this long (no health report) is dropped from the
    registry; its identity is revoked, so if it is alive it simply joins again."""


class _HostHandshake(HandshakeServiceHandler):
    """Phase 2 handshake: a plugin that names itself gets a runtime id and token."""

    def __init__(self, host: PluginHost) -> None:
        self._host = host

    def handshake(self, request: handshake_pb2.HandshakeRequest, ctx: Context) -> handshake_pb2.HandshakeResponse:
        version = hs.check_request(self._host.handshake_config, request, "host")
        response = handshake_pb2.HandshakeResponse(
            core_protocol_version=hs.CORE_PROTOCOL_VERSION,
            app_protocol_version=version,
            server_metadata={hs.VERSIONS_KEY: hs.format_versions(self._host.handshake_config.app_protocol_versions)},
            host_capabilities=self._host.broker.advertised(),
        )
        if request.self_id:
            if not self._host.config.allow_self_registration:
                raise ConnectError(Code.PERMISSION_DENIED, "this host does not accept self-registering plugins")
            # Watched for silence from its first registration or health report on; an
            # identity that only calls others has nothing to withdraw, so it is not reaped.
            identity = self._host.identities.issue(request.self_id, request.self_version)
            log.info("handshake from %s %s: runtime id %s", request.self_id, request.self_version, identity.runtime_id)
            response.runtime_id = identity.runtime_id
            response.runtime_token = identity.token
        return response


class _Lifecycle(PluginLifecycleHandler):
    def __init__(self, host: PluginHost) -> None:
        self._host = host

    def report_health(
        self, request: lifecycle_pb2.ReportHealthRequest, ctx: Context
    ) -> lifecycle_pb2.ReportHealthResponse:
        identity = self._host.identities.verify(ctx.request_headers)
        self._host._record_health(identity, request)
        return lifecycle_pb2.ReportHealthResponse()


class PluginHost:
    """Launches plugins and serves the host's side of the protocol; a context manager.

    Closing it (explicitly, at interpreter exit, or on SIGTERM/SIGINT) stops every plugin
    it started. Safe to use from any thread.
    """

    def __init__(
        self,
        handshake: hs.HandshakeConfig,
        plugins: Mapping[str, Plugin],
        config: HostConfig | None = None,
    ) -> None:
        self.handshake_config = handshake
        self.plugins = dict(plugins)
        self.config = config = config or HostConfig()
        self.identities = Identities()
        self.registry = Registry(config.registry)
        self.broker = Broker(lambda: self.url, lambda rid: self.identities.get(rid) is not None, config.grant_ttl)
        self.router = Router(self.registry, self.identities)
        self._lock = threading.Lock()
        self._launched: list[tuple[PluginClient, Identity]] = []
        self._urls: dict[str, str] = {}  # runtime id -> base URL, for plugins this host launched
        self._health: dict[str, lifecycle_pb2.ReportHealthRequest] = {}
        self._health_listeners: list[Callable[[str, lifecycle_pb2.ReportHealthRequest], None]] = []
        self.app = App(
            [
                _HostHandshake(self),
                _Lifecycle(self),
                RegistryService(self.registry, self.identities, self._url_of, self._declare_from_info),
                BrokerService(self.broker, self.identities, lambda: self.url),
            ],
            routes={
                ROUTER_ROUTE: self.router,
                BROKER_ROUTE: self.broker.endpoint,
                "/healthz": lambda environ, start_response: text_response(start_response, 200, "ok"),
                "/readyz": self._ready,
            },
        )
        # Each open watch holds a thread for its whole life: size the pool so that
        # the capped number of watchers can never starve unary calls.
        threads = config.threads + config.registry.max_watchers
        self._http = HTTPServer(self.app, HTTPConfig(host=config.host, port=config.port, threads=threads))
        self._http.start()
        self._closed = False
        self._seen: dict[str, float] = {}  # self-registered runtime id -> last sign of life
        self._stop_reaper = threading.Event()
        threading.Thread(target=self._reap, name="host-reaper", daemon=True).start()
        _register_for_exit(self, config.handle_signals)

    @property
    def url(self) -> str:
        return self._http.url

    def launch(self, strategy: Strategy, name: str = "") -> PluginClient:
        """Start a plugin, give it a runtime identity, and return its client."""
        name = name or next(iter(self.plugins))
        holder: list[PluginClient] = []

        def on_exit(code: int | None) -> None:
            if holder:
                holder[0]._exited(code)
                identity = self._identity_of(holder[0])
                if identity is not None:
                    self.registry.remove_provider(identity.runtime_id)
                    self._record_health(
                        identity,
                        lifecycle_pb2.ReportHealthRequest(
                            state=lifecycle_pb2.HEALTH_STATE_UNHEALTHY, reason=f"exited with status {code}"
                        ),
                    )

        running = strategy.start(LaunchContext(name, self.handshake_config, self.plugins, self.url, on_exit))
        client = PluginClient(
            running.url, self.plugins, self.handshake_config, session=running.session, running=running, name=name
        )
        holder.append(client)
        try:
            info = client.plugin_info()
            identity = self.identities.issue(info.self_id or name, info.self_version)
            self.registry.declare(identity.runtime_id, [d.type for d in info.provides])
            with self._lock:
                self._launched.append((client, identity))
                self._urls[identity.runtime_id] = running.url
            local_app = getattr(running, "app", None)
            if local_app is not None:
                self.router.attach_local(identity.runtime_id, local_app)
            PluginIdentityClient(client.rpc).set_runtime_identity(
                plugininfo_pb2.SetRuntimeIdentityRequest(
                    runtime_id=identity.runtime_id, runtime_token=identity.token, host_url=self.url
                ),
                timeout=5,
            )
            self._await_registration(identity.runtime_id, [d.type for d in info.provides])
        except BaseException:
            self.stop(client, grace=1)
            raise
        log.info("launched %s (pid %s) at %s as %s", name, running.pid, running.url, identity.runtime_id)
        return client

    def _await_registration(self, runtime_id: str, service_types: list[str]) -> None:
        """Wait until the plugin has registered what it declared (so dependents can start)."""
        deadline = time.monotonic() + self.config.register_timeout
        while True:
            registered = {p.service_type for p in self.registry.providers() if p.provider_id == runtime_id}
            missing = sorted(set(service_types) - registered)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ConnectError(
                    Code.DEADLINE_EXCEEDED,
                    f"{runtime_id} did not register {', '.join(missing)} within {self.config.register_timeout:g} s",
                )
            time.sleep(0.01)

    def runtime_id(self, client: PluginClient) -> str:
        identity = self._identity_of(client)
        return identity.runtime_id if identity else ""

    def reported_health(self, runtime_id: str) -> lifecycle_pb2.ReportHealthRequest | None:
        """The last health a plugin reported (or its crash), by runtime id."""
        with self._lock:
            return self._health.get(runtime_id)

    def on_health(self, listener: Callable[[str, lifecycle_pb2.ReportHealthRequest], None]) -> None:
        with self._lock:
            self._health_listeners.append(listener)

    def stop(self, client: PluginClient, grace: float | None = None) -> None:
        """Stop one launched plugin: Shutdown, then SIGTERM, then SIGKILL after the grace period."""
        grace = self.config.stop_grace if grace is None else grace
        running = client.running
        identity = self._identity_of(client)
        with self._lock:
            self._launched = [(c, i) for c, i in self._launched if c is not client]
        if identity is not None:
            # New calls stop reaching it now; calls already routed to it may finish.
            self.registry.remove_provider(identity.runtime_id)
            self.broker.revoke_all(identity.runtime_id)
        if running is None:
            return
        running.mark_stopping()
        deadline = time.monotonic() + grace
        if running.alive():
            try:
                PluginControlClient(client.rpc).shutdown(
                    # Whole seconds on the wire: round up so in-flight calls keep their time.
                    lifecycle_pb2.ShutdownRequest(grace_period_seconds=math.ceil(grace), reason="host stopping it"),
                    timeout=2,
                )
            except ConnectError as e:
                if running.alive():
                    log.warning("shutdown request to %s failed: %s", client.name, e)
            running.wait(max(0.0, deadline - time.monotonic()) + 0.5)
        # Whatever is left of the grace period, then SIGTERM, then SIGKILL.
        running.stop(max(0.5, deadline - time.monotonic()))
        client.close()
        if identity is not None:
            self.router.detach_local(identity.runtime_id)
            self.identities.revoke(identity.runtime_id)
            with self._lock:
                self._urls.pop(identity.runtime_id, None)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            launched = list(self._launched)
        threads = [threading.Thread(target=self.stop, args=(c,)) for c, _ in launched]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._stop_reaper.set()
        self.registry.close_watchers()
        self._http.close(grace=1)
        self.router.close()

    def _ready(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self._lock:
            closed = self._closed
        return text_response(start_response, 503, "closing") if closed else text_response(start_response, 200, "ok")

    def __enter__(self) -> PluginHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _identity_of(self, client: PluginClient) -> Identity | None:
        with self._lock:
            for c, identity in self._launched:
                if c is client:
                    return identity
        return None

    def _url_of(self, identity: Identity) -> str:
        """Where a launched plugin listens ("" for a self-registered one, which says so itself)."""
        self._alive(identity)
        with self._lock:
            return self._urls.get(identity.runtime_id, "")

    def _declare_from_info(self, identity: Identity, base_url: str) -> None:
        """A self-registered plugin's declarations come from its own GetPluginInfo."""
        with Client(base_url, ClientConfig(timeout=5)) as client:
            info = PluginIdentityClient(client).get_plugin_info(plugininfo_pb2.GetPluginInfoRequest())
        self.registry.declare(identity.runtime_id, [d.type for d in info.provides])

    def _reap(self) -> None:
        """Drop self-registered plugins that stopped reporting (a launched one is watched directly)."""
        interval = max(0.1, self.config.heartbeat_timeout / 4)
        while not self._stop_reaper.wait(interval):
            cutoff = time.monotonic() - self.config.heartbeat_timeout
            with self._lock:
                silent = [rid for rid, seen in self._seen.items() if seen < cutoff]
                for rid in silent:
                    del self._seen[rid]
            # Only providers are withdrawn: a plugin that merely calls others offers nothing
            # that could go stale, and keeps its identity however quiet it is.
            providing = {p.provider_id for p in self.registry.providers()}
            silent = [rid for rid in silent if rid in providing]
            for rid in silent:
                log.warning("%s stopped reporting; dropping it from the registry", rid)
                self.registry.remove_provider(rid)
                self.broker.revoke_all(rid)
                self.identities.revoke(rid)

    def _alive(self, identity: Identity) -> None:
        with self._lock:
            if identity.runtime_id not in self._urls:
                self._seen[identity.runtime_id] = time.monotonic()

    def _record_health(self, identity: Identity, report: lifecycle_pb2.ReportHealthRequest) -> None:
        self._alive(identity)
        self.registry.set_health(identity.runtime_id, report.state)
        with self._lock:
            self._health[identity.runtime_id] = report
            listeners = list(self._health_listeners)
        for listener in listeners:
            listener(identity.runtime_id, report)


_hosts: weakref.WeakSet[PluginHost] = weakref.WeakSet()
_hooks_installed = False


def _close_all() -> None:
    for host in list(_hosts):
        host.close()


def _register_for_exit(host: PluginHost, handle_signals: bool) -> None:
    """Stop plugins at interpreter exit and on SIGTERM/SIGINT, chaining earlier handlers."""
    global _hooks_installed
    _hosts.add(host)
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_all)
    if not handle_signals or threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(num: int, frame: Any, previous: Any = previous) -> None:
            # Never close hosts here: the interrupted code may hold their locks. Unwind
            # instead; ``with`` blocks and the atexit hook stop the plugins on the way out.
            if callable(previous) and previous is not signal.default_int_handler:
                previous(num, frame)
                return
            if num == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + num)

        signal.signal(signum, handler)
