"""The host side: launching plugins, handing out typed clients, and the host's own services.

A :class:`PluginHost` serves the host half of the protocol (the handshake that gives
self-started plugins a runtime identity, and ``PluginLifecycle.ReportHealth``), launches
plugins through a strategy, and returns a :class:`PluginClient` for each.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..gen.connectplugin.health.v1 import health_pb2
from ..gen.connectplugin.health.v1.health_connect import HealthServiceClient
from ..gen.connectplugin.v1 import handshake_pb2, lifecycle_pb2, plugininfo_pb2
from ..gen.connectplugin.v1.handshake_connect import HandshakeServiceHandler
from ..gen.connectplugin.v1.lifecycle_connect import PluginControlClient, PluginLifecycleHandler
from ..gen.connectplugin.v1.plugininfo_connect import PluginIdentityClient
from ..rpc import tls
from ..rpc.client import Client, ClientConfig
from ..rpc.errors import Code, ConnectError
from ..rpc.httpserver import HTTPConfig, HTTPServer
from ..rpc.server import App, Context, text_response
from ..runtime import handshake as hs
from ..runtime.credentials import HOST_SECRET_HEADER, HOST_SECRET_KEY, RUNTIME_ID_HEADER, new_secret
from ..runtime.health import (
    SERVING,
    HealthReport,
    HealthState,
    ServingStatus,
    report_from_wire,
    status_from_wire,
)
from ..runtime.launcher import (
    ForkedProcessError,
    LaunchContext,
    LaunchError,
    LaunchFailure,
    Strategy,
)
from ..runtime.plugin import Plugin
from ..runtime.pluginclient import PluginClient, PluginClientConfig
from . import validation
from .admission import Admission, CertificateIdentity, JoinToken, Operators, OperatorToken
from .broker import DEFAULT_MAX_GRANTS, DEFAULT_TTL, Broker, BrokerService
from .broker import ROUTE as BROKER_ROUTE
from .dashboard import ROUTES as DASHBOARD_ROUTES
from .dashboard import Dashboard
from .identities import DEFAULT_ROTATION_GRACE, DEFAULT_TOKEN_TTL, Identities, Identity, utc_now
from .inventory import ROUTE as INVENTORY_ROUTE
from .inventory import InventoryEndpoint, PluginSummary, ServiceSummary
from .metrics import DirectCalls, HostMetrics, MetricsConfig, MetricsEndpoint
from .ratelimit import Rate, RateLimiter
from .registry import Declared, Provider, Registry, RegistryConfig, RegistryService
from .router import ROUTE as ROUTER_ROUTE
from .router import Router, RouterConfig
from .supervisor import RestartPolicy, Supervised, SupervisionListener, Supervisor

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("connectplugin.host")

EXIT_SLACK = 0.5
"""Seconds a stopping plugin gets beyond its grace period to exit after ``Shutdown``, before
it is signalled: it may answer the call and exit just as the grace period ends."""
MIN_SIGNAL_GRACE = 0.5
"""Least time between SIGTERM and SIGKILL, even when the grace period is used up."""
MIN_REAP_INTERVAL = 0.1
"""Floor of the default ``HostConfig.reap_interval``, so tiny heartbeat timeouts do not spin."""

HealthListener = Callable[[str, HealthReport], None]
"""``listener(runtime_id, report)``, called on the reporting thread with no lock held."""


@dataclass(frozen=True)
class HostConfig:
    """How the host listens, picks providers, and starts and stops its plugins."""

    http: HTTPConfig = field(default_factory=lambda: HTTPConfig(threads=16, max_streams=32))
    """Where the host listens. ``http.threads`` serve unary calls; ``http.max_streams`` caps the
    streams open at once (service watches and routed streams together), each on a thread of
    its own."""
    stop_grace: float = 5.0
    """Seconds a plugin gets to finish in-flight calls when it is stopped."""
    handle_signals: bool = False
    """On ``start()``, make SIGTERM/SIGINT unwind the main thread so ``with`` blocks and the
    atexit hook stop every plugin (earlier handlers still run). For entry points only: an
    application that owns its signals (a web framework, say) leaves it off."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    """How routed calls reach providers: the deadline of calls without one, circuit breakers."""
    client: PluginClientConfig = field(default_factory=PluginClientConfig)
    """How the host calls the plugins it launches: ``client.rpc`` holds the default deadline
    (``ClientConfig.timeout``) and interceptors of every client ``dispense()`` hands out."""
    grant_ttl: float = DEFAULT_TTL
    """Lifetime of capability grants, in seconds."""
    token_ttl: float = DEFAULT_TOKEN_TTL
    """Lifetime of runtime tokens, in seconds (24 h, as the Go reference). The host rotates
    its launched plugins' tokens at half-life; self-registered plugins rotate their own."""
    token_rotation_grace: float = DEFAULT_ROTATION_GRACE
    """Seconds a rotated-out runtime token still works, for calls already on their way."""
    clock: Callable[[], float] = time.monotonic
    """Where grant and token lifetimes are measured (seconds, never going back); tests pass a fake one."""
    register_timeout: float = 10.0
    """How long a launch waits for the plugin to register the services it declared."""
    join_tokens: Sequence[JoinToken] = ()
    """Secrets that admit self-registering plugins (model B), each with the service types a
    plugin joining with it may provide. With none (and no ``dev_cookie_joins``), only
    plugins the host launches get identities."""
    certificate_identities: Sequence[CertificateIdentity] = ()
    """Self ids whose client certificates admit self-registering plugins across machines
    (model B with a CA), each with the service types it may provide; no join token needed.
    Needs ``http.tls`` with a ``trust`` (the CAs that issue plugin certificates, and the
    revoked ones): the host then serves mTLS and every call made with such an identity must
    come with the certificate it joined with (see ``PluginHost.revoke_certificate``)."""
    wall_clock: Callable[[], datetime.datetime] = utc_now
    """Where certificate validity is checked on each call (an aware UTC datetime); tests
    pass a fake one. The TLS handshake itself checks against the system clock."""
    operator_tokens: Sequence[OperatorToken] = ()
    """Secrets that let people and tools observe the host (``Authorization: Bearer``):
    ``/metrics``, the dashboard and the registry-wide watch behind it. With none, only
    ``MetricsConfig.loopback_without_token`` opens ``/metrics``."""
    metrics: MetricsConfig | None = None
    """Keep Prometheus metrics and serve them at ``/metrics`` (needs ``prometheus_client``:
    ``pip install 'connectplugin[metrics]'``). None, the default: no metrics, nothing counted."""
    dev_cookie_joins: bool = False
    """Development only: admit self-registering plugins that present just the magic cookie,
    from loopback, to provide any service type no launched plugin declares. The cookie is
    no secret; the host logs a warning for each such join."""
    heartbeat_timeout: float = 5.0
    """A self-registered provider silent this long (no health report) is checked: the host
    asks its HealthService (``Check("")``, with ``health_check_timeout``). One that answers
    stays (the Go reference's plugins report health once and never heartbeat), unhealthy
    while it says NOT_SERVING; one that does not answer is dropped from the registry and its
    identity revoked, so if it is alive after all it simply joins again."""
    health_check_timeout: float = 2.0
    """Seconds the host's health check of a silent provider may take before it counts as gone."""
    reap_interval: float | None = None
    """Seconds between looks for silent plugins; None: a quarter of ``heartbeat_timeout``
    (at least ``MIN_REAP_INTERVAL``)."""
    control_timeout: float = 5.0
    """Seconds the host's own calls to a plugin (GetPluginInfo, SetRuntimeIdentity) may take."""
    shutdown_timeout: float = 2.0
    """Seconds the ``Shutdown`` call may take to be answered (the plugin drains afterwards)."""
    failed_launch_grace: float = 1.0
    """Grace period of a plugin stopped because its launch failed half-way."""
    close_grace: float = 1.0
    """Seconds the host's own in-flight calls get to finish when the host closes."""
    # Bounds on what callers can make the host hold (README "Security" lists them).
    handshake_rate: Rate = Rate(per_second=2.0, burst=20)
    """Handshakes allowed per peer address (the only thing an unauthenticated caller has)."""
    registration_rate: Rate = Rate(per_second=5.0, burst=40)
    """``RegisterService`` calls allowed per plugin."""
    grant_rate: Rate = Rate(per_second=10.0, burst=20)
    """``RequestCapability`` calls allowed per plugin."""
    max_identities: int = 1024
    """Identities the host holds at once before it refuses self-registering plugins
    (launched plugins always get one: the host chose to start them)."""
    identity_idle_timeout: float = 120.0
    """A self-registered identity unused this long (no authenticated call, heartbeats
    included) is revoked: a plugin that handshook and went away does not live on."""
    max_grants_per_identity: int = DEFAULT_MAX_GRANTS
    """Unexpired capability grants one plugin may hold at once."""
    max_rate_keys: int = 10_000
    """Peers (addresses, runtime ids) each rate limit tracks; beyond, new ones share one bucket."""
    auto_mtls: bool = False
    """Automatic mTLS with launched subprocess plugins: per launch the host makes a key pair
    and the plugin another (in memory, never on disk); each accepts only the other's
    certificate, so no other local process can call or impersonate the plugin, nor read
    the calls. Plugins must support it (connectplugin's ``serve()`` does). A host whose
    ``http.tls.trust`` requires client certificates uses it for every launch, whatever this
    says: its plugins call it back presenting their automatic-mTLS certificate, which it
    accepts while they run (``PluginHost.pins``) and only with their own runtime identity."""
    auto_mtls_lifetime: datetime.timedelta = tls.AUTO_LIFETIME
    """Validity of the host's automatic-mTLS certificates: ten years, so that no launch
    outlives them (a new launch makes new ones; see ``tls.AUTO_LIFETIME`` for why they are
    not short-lived and renewed)."""

    def __post_init__(self) -> None:
        if self.certificate_identities and (self.http.tls is None or self.http.tls.trust is None):
            raise ValueError(
                "HostConfig.certificate_identities needs HTTPConfig.tls with a trust (the CAs of plugin certificates)"
            )

    @property
    def reap_every(self) -> float:
        """The effective ``reap_interval``."""
        if self.reap_interval is not None:
            return self.reap_interval
        return max(MIN_REAP_INTERVAL, self.heartbeat_timeout / 4)


def _live_trust(config: HostConfig) -> tuple[HostConfig, tls.RevocationList, tls.PinList]:
    """``config`` whose TLS trust refuses what ``revoke_certificate`` adds and accepts the
    certificates of the plugins the host launched while they run, and those two lists (the
    ones given, when ``http.tls.trust`` holds them already)."""
    server_tls = config.http.tls
    trust = server_tls.trust if server_tls is not None else None
    if trust is None or server_tls is None:
        return config, tls.RevocationList(), tls.PinList()
    revoked = trust.revoked if isinstance(trust.revoked, tls.RevocationList) else tls.RevocationList(trust.revoked)
    pins = trust.live_pins if trust.live_pins is not None else tls.PinList()
    server_tls = replace(server_tls, trust=replace(trust, revoked=revoked, live_pins=pins))
    return replace(config, http=replace(config.http, tls=server_tls)), revoked, pins


def _declared(info: plugininfo_pb2.GetPluginInfoResponse) -> Declared:
    """What a launched plugin says it provides, held to the same rules as registrations."""
    paths = {}
    for d in info.provides:
        validation.check_name(d.type, "declared service type")
        validation.check_endpoint_path(d.path)
        paths[d.type] = d.path
    return Declared(launched=True, paths=paths)


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
            host_capabilities=self._host.broker.advertised(self._host.url),
        )
        self._host.handshake_rate.check(ctx.peer)
        if request.self_id:
            validation.check_name(request.self_id, "self_id")
            if ctx.request_headers.get(RUNTIME_ID_HEADER.lower()):
                identity = self._host._rotate(request, ctx)
            else:
                identity = self._host._join(request, ctx)
            response.runtime_id = identity.runtime_id
            response.runtime_token = identity.token
            # What the host and its router will present when they call this plugin.
            response.server_metadata[HOST_SECRET_KEY] = identity.host_secret
            response.server_metadata[hs.TOKEN_TTL_KEY] = f"{self._host.config.token_ttl:g}"
        return response


class _Lifecycle(PluginLifecycleHandler):
    def __init__(self, host: PluginHost) -> None:
        self._host = host

    def report_health(
        self, request: lifecycle_pb2.ReportHealthRequest, ctx: Context
    ) -> lifecycle_pb2.ReportHealthResponse:
        identity = self._host.identities.caller(ctx)
        self._host._record_health(identity.runtime_id, report_from_wire(request, blame=Code.INVALID_ARGUMENT))
        return lifecycle_pb2.ReportHealthResponse()


class _HealthCheck:
    """Asks a plugin how it is as a Go host would: ``HealthService.Check("")`` at its base URL."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout

    def status(self, identity: Identity) -> ServingStatus | None:
        """Its overall serving status; None when nothing answers in time. A server that
        answers without a HealthService (any other error) is up: SERVING."""
        config = ClientConfig(
            timeout=self._timeout, headers={HOST_SECRET_HEADER: identity.host_secret}, tls=identity.client_tls
        )
        try:
            with Client(identity.base_url, config) as client:
                response = HealthServiceClient(client).check(health_pb2.HealthCheckRequest(service=""))
            return status_from_wire(response.status)
        except ConnectError as e:
            return None if e.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED) else SERVING


class Roster:
    """When self-registered plugins were last heard from.

    Safe from any thread; ``_lock`` guards the table. A launched plugin is watched through
    its process, so only self-registered ones are tracked for silence.
    """

    def __init__(self, identities: Identities) -> None:
        self._identities = identities
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # self-registered runtime id -> last sign of life

    def forget(self, runtime_id: str) -> None:
        with self._lock:
            self._seen.pop(runtime_id, None)

    def heard_from(self, runtime_id: str) -> None:
        identity = self._identities.get(runtime_id)
        if identity is None or identity.launched:
            return
        with self._lock:
            self._seen[runtime_id] = time.monotonic()

    def take_silent(self, cutoff: float) -> list[str]:
        """Self-registered plugins not heard from since ``cutoff`` (monotonic); forgets them."""
        with self._lock:
            silent = [rid for rid, seen in self._seen.items() if seen < cutoff]
            for rid in silent:
                del self._seen[rid]
        return silent


class PluginHost:
    """Launches plugins and serves the host's side of the protocol; a context manager.

    Construction starts nothing: ``start()`` (or ``with``) binds the socket, starts serving
    and the reaper of silent plugins, and registers an atexit hook; ``mount(url)`` does the
    same without a server, for a host whose ``app`` another WSGI stack serves. Closing it
    (explicitly, at interpreter exit, or on SIGTERM/SIGINT with ``handle_signals``) stops
    every plugin it started. Safe to use from any thread; ``_lock`` guards the launched
    plugins, their health, the listeners and the open/closed state.

    A started host belongs to the process that started it. In a fork of that process
    (a gunicorn ``--preload`` worker) ``close()`` and the atexit hook leave the parent's
    plugins alone, and ``start()``, ``mount()``, ``launch()`` and ``stop()`` raise
    :class:`ForkedProcessError`: a child builds and starts a host of its own. A host that
    was constructed but never started may be started in any one process.
    """

    def __init__(
        self,
        handshake: hs.HandshakeConfig,
        plugins: Mapping[str, Plugin],
        config: HostConfig | None = None,
    ) -> None:
        self.handshake_config = handshake
        self.plugins = dict(plugins)
        config = config or HostConfig()
        config, self.revoked, self.pins = _live_trust(config)
        self.config = config
        self.identities = Identities(
            config.token_ttl, config.clock, config.token_rotation_grace, self.revoked, config.wall_clock
        )
        self.registry = Registry(config.registry)
        self.broker = Broker(self.identities, config.grant_ttl, config.clock, config.max_grants_per_identity)
        self.handshake_rate = RateLimiter(config.handshake_rate, "HostConfig.handshake_rate", config.max_rate_keys)
        self.registration_rate = RateLimiter(config.registration_rate, "HostConfig.registration_rate", config.max_rate_keys)
        self.grant_rate = RateLimiter(config.grant_rate, "HostConfig.grant_rate", config.max_rate_keys)
        self.operators = Operators(config.operator_tokens)
        self.metrics = HostMetrics(config.metrics, self.identities, self.registry) if config.metrics else None
        self.router = Router(
            self.registry, self.identities, config.router, calls=self.metrics.routed if self.metrics else None
        )
        self._supervisor = Supervisor(self)
        if self.metrics is not None:
            self._supervisor.on_event(self.metrics.supervision)
        # The services dispense() hands out: the host's own calls to them are counted.
        self._services = frozenset(p.service.name for p in self.plugins.values())
        self._roster = Roster(self.identities)
        self._health_check = _HealthCheck(config.health_check_timeout)
        self._admission = Admission(
            config.join_tokens, config.certificate_identities, config.dev_cookie_joins, handshake, self.identities, self, config.control_timeout
        )
        self._lock = threading.Lock()
        self._launched: list[tuple[PluginClient, Identity]] = []
        self._health: dict[str, HealthReport] = {}
        self._health_listeners: list[HealthListener] = []
        self._http: HTTPServer | None = None
        self._url = ""  # set once started: the server's URL, or the URL it is mounted at
        self._owner_pid = 0  # the process that started it
        self._starting = False
        self._closed = False
        self._started = threading.Event()  # set once the first start() has finished, well or not
        self._stop_reaper = threading.Event()
        self.app = App(
            [
                _HostHandshake(self),
                _Lifecycle(self),
                RegistryService(
                    self.registry, self.identities, self._roster, self._admission, self.registration_rate,
                    self.operators,
                ),
                BrokerService(self.broker, self.identities, self, self.grant_rate),
            ],
            routes={
                ROUTER_ROUTE: self.router,
                BROKER_ROUTE: self.broker.endpoint,
                "/healthz": lambda environ, start_response: text_response(start_response, 200, "ok"),
                "/readyz": self._ready,
                "/metrics": MetricsEndpoint(self.metrics, self.operators),
                INVENTORY_ROUTE: InventoryEndpoint(self.inventory, self.operators),
                **dict.fromkeys(DASHBOARD_ROUTES, Dashboard(self.inventory, self.operators, self.metrics)),
            },
        )

    def start(self) -> PluginHost:
        """Bind, serve on a thread, start the reaper and the exit hooks; returns self.

        Starting a started host does nothing (a concurrent caller waits until it serves).
        """
        return self._open("")

    def mount(self, url: str) -> PluginHost:
        """Start without a server of its own: the caller serves ``self.app`` at ``url``.

        ``url`` is where plugins reach the host's endpoints, e.g. ``http://127.0.0.1:8000/_plugins``
        when a web application passes requests under ``/_plugins`` to ``app`` (with
        ``SCRIPT_NAME``/``PATH_INFO`` split there, as WSGI dispatchers do). The reaper and the
        exit hooks start as with ``start()``; returns self. Every call a plugin makes to its
        host must reach this process, so mount only in a server with one serving process.
        ``config.http`` does not apply: calls and streams take the caller's server threads.
        """
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a mounted host needs an absolute http(s) URL, not {url!r}")
        return self._open(url.rstrip("/"))

    def _open(self, mounted_url: str) -> PluginHost:
        # Before the lock: in a fork, another thread of the parent may have held it.
        self._check_owner()
        with self._lock:
            if self._closed:
                raise RuntimeError("this PluginHost is closed; make a new one")
            first = not self._starting
            self._starting = True
            if first:
                self._owner_pid = os.getpid()
        if not first:
            self._started.wait()
            with self._lock:
                failed = not self._url
            if failed:
                raise RuntimeError("this PluginHost failed to start")
            return self
        config = self.config
        server = None
        try:
            if not mounted_url:
                server = HTTPServer(self.app, config.http).start()
            with self._lock:
                closed = self._closed
                if not closed:
                    self._http = server
                    self._url = server.url if server is not None else mounted_url
        finally:
            self._started.set()
        if closed:  # close() ran while the server was starting, and had nothing to close
            if server is not None:
                server.close(grace=0)
            raise RuntimeError("this PluginHost was closed while it started")
        threading.Thread(target=self._reap, name="host-reaper", daemon=True).start()
        _exit_hooks.add(self, config.handle_signals)
        if config.dev_cookie_joins:
            log.warning("development switch on: plugins on this machine may join with the magic cookie alone")
        if config.metrics and not config.operator_tokens and not config.metrics.loopback_without_token:
            log.warning(
                "metrics are kept but nobody may read /metrics: set HostConfig.operator_tokens "
                "or MetricsConfig.loopback_without_token"
            )
        return self

    def _check_owner(self) -> None:
        """Raise ForkedProcessError in a fork of the process that started this host."""
        pid = os.getpid()
        if self._owner_pid and pid != self._owner_pid:
            raise ForkedProcessError("this PluginHost", self._owner_pid, pid)

    @property
    def url(self) -> str:
        """The host's base URL; known once ``start()`` or ``mount()`` has returned."""
        with self._lock:
            url = self._url
        if not url:
            raise RuntimeError("this PluginHost is not started: call start() or use it in a with block")
        return url

    def launch(self, strategy: Strategy, name: str = "", restart: RestartPolicy | None = None) -> PluginClient:
        """Start a plugin, give it a runtime identity, and return its client.

        With ``restart`` the plugin is supervised: restarted after a crash, its successor
        taking over its routes (see ``connectplugin.host.supervisor``); ``current(client)``
        is the instance up now, ``supervised(client)`` its state.
        """
        self._check_owner()
        name = name or next(iter(self.plugins))
        if restart is not None:
            return self._supervisor.supervise(strategy, name, restart)
        return self._launch(strategy, name)

    def current(self, client: PluginClient) -> PluginClient:
        """The instance now up of the plugin ``client`` was launched as (``client`` itself
        unless it is supervised and was restarted since)."""
        plugin = self._supervisor.of(client)
        latest = plugin.client if plugin is not None else None
        return latest or client

    def supervised(self, client: PluginClient) -> Supervised | None:
        """The supervision state of the plugin ``client`` is an instance of (None if unsupervised)."""
        return self._supervisor.of(client)

    def on_supervision(self, listener: SupervisionListener) -> None:
        """Call ``listener(event)`` on each crash, restart, failed restart and quarantine."""
        self._supervisor.on_event(listener)

    def _launch(
        self, strategy: Strategy, name: str, on_crash: Callable[[PluginClient, int | None], None] | None = None
    ) -> PluginClient:
        holder: list[PluginClient] = []
        issued: list[Identity] = []

        def on_exit(code: int | None) -> None:
            if holder:
                holder[0]._exited(code)
            if issued:
                crashed = holder and self._identity_of(holder[0]) is not None  # not stopped by us
                self._revoke(issued[0].runtime_id, f"exited with status {code}")
                if crashed:
                    report = HealthReport(HealthState.UNHEALTHY, f"exited with status {code}")
                    self._record_health(issued[0].runtime_id, report)
                    if on_crash is not None:
                        on_crash(holder[0], code)

        # One secret per launch: what this plugin will accept from us and our router only.
        secret = new_secret()
        # A host requiring client certificates accepts its plugins' automatic-mTLS ones: on.
        requires_certificates = self._requires_client_certificates()
        auto_mtls = self.config.auto_mtls or requires_certificates
        pair = tls.auto_key_pair(self.config.auto_mtls_lifetime) if auto_mtls else None
        served = self.config.http.tls
        # What our plugin needs to call us back over TLS: the certificate we serve with.
        host_certificate = served.key_pair.certificate if served and served.key_pair and self.url.startswith("https://") else None
        context = LaunchContext(
            name, self.handshake_config, self.plugins, self.url, on_exit, host_secret=secret, auto_mtls=pair,
            host_certificate=host_certificate,
        )
        running = strategy.start(context)
        running_tls = getattr(running, "tls", None)
        # The certificate it calls us back with: accepted while its identity lasts (_revoke).
        certificate = getattr(running, "client_certificate", None) if requires_certificates else None
        if certificate is not None:
            self.pins.add(certificate)
        counted = DirectCalls(self.metrics.direct, self._services) if self.metrics is not None else None
        client = PluginClient(
            running.url,
            self.plugins,
            self.handshake_config,
            config=self._client_config(running_tls, counted),
            session=None if running_tls else running.session,
            running=running,
            name=name,
            host_secret=secret,
        )
        holder.append(client)
        try:
            if running.joins_by_itself:
                if not self._admission.open:
                    raise ConnectError(
                        Code.FAILED_PRECONDITION,
                        "it joins the host by itself (the Go launch model), and this host admits no "
                        "self-registering plugins (HostConfig.join_tokens, dev_cookie_joins)",
                    )
                identity = self._await_join(running.url)
                issued.append(identity)
                if counted is not None:
                    counted.bind(identity.runtime_id)
                with self._lock:
                    self._launched.append((client, identity))
                if not running.alive():
                    self._revoke(identity.runtime_id, "exited while launching")
                log.info("launched %s (pid %s) at %s; it joined as %s", name, running.pid, running.url, identity.runtime_id)
                return client
            info = client.plugin_info()
            declared = _declared(info)
            identity = self.identities.issue(
                info.self_id or name, info.self_version, launched=True, base_url=running.url,
                host_secret=secret, tls=running_tls, certificate=certificate,
            )
            issued.append(identity)
            if counted is not None:
                counted.bind(identity.runtime_id)
            self.registry.declare(identity.runtime_id, declared)
            with self._lock:
                self._launched.append((client, identity))
            if not running.alive():  # it exited before its identity was issued: on_exit missed it
                self._revoke(identity.runtime_id, "exited while launching")
            local_app = getattr(running, "app", None)
            if local_app is not None:
                self.router.attach_local(identity.runtime_id, local_app)
            PluginIdentityClient(client.rpc).set_runtime_identity(
                plugininfo_pb2.SetRuntimeIdentityRequest(
                    runtime_id=identity.runtime_id, runtime_token=identity.token, host_url=self.url
                ),
                timeout=self.config.control_timeout,
            )
            self._await_registration(identity.runtime_id, list(declared.paths))
        except ConnectError as e:
            self.stop(client, grace=self.config.failed_launch_grace)
            self._unpin(certificate)
            reason = LaunchFailure.UNREACHABLE if e.code is Code.UNAVAILABLE else LaunchFailure.SETUP
            raise LaunchError(
                name, reason, f"{reason.value} ({running.url}): {e.code.value}: {e.message}", client.exit_code
            ) from e
        except BaseException:
            self.stop(client, grace=self.config.failed_launch_grace)
            self._unpin(certificate)
            raise
        log.info("launched %s (pid %s) at %s as %s", name, running.pid, running.url, identity.runtime_id)
        return client

    def _unpin(self, certificate: x509.Certificate | str | None) -> None:
        """Accept a launched plugin's client certificate (or fingerprint) no more."""
        if certificate:
            self.pins.discard(certificate)

    def _requires_client_certificates(self) -> bool:
        """Whether our own TLS server requires a certificate of every caller (a mounted
        host's server is another's, which hands us none)."""
        served = self.config.http.tls
        with self._lock:
            serving = self._http is not None
        return serving and served is not None and served.trust is not None

    def _client_config(self, running_tls: tls.TLSConfig | None, counted: DirectCalls | None) -> PluginClientConfig:
        """``HostConfig.client``, speaking TLS to a plugin that serves it (auto mTLS), its
        dispensed clients' calls counted when the host keeps metrics."""
        config = self.config.client
        if running_tls:
            config = replace(config, rpc=replace(config.rpc, tls=running_tls))
        if counted is not None:
            config = replace(config, rpc=replace(config.rpc, interceptors=(counted, *config.rpc.interceptors)))
        return config

    def _await_join(self, url: str) -> Identity:
        """The identity of the launched plugin that joined by itself and registered at ``url``
        (the Go launch model: the host learns nothing else about which joiner it started)."""
        timeout = self.config.register_timeout
        provider = self.registry.await_provider_at(url, timeout)
        identity = self.identities.get(provider.provider_id) if provider is not None else None
        if identity is None:
            raise ConnectError(Code.DEADLINE_EXCEEDED, f"no plugin joined and registered at {url} within {timeout:g} s")
        return identity

    def _await_registration(self, runtime_id: str, service_types: list[str]) -> None:
        """Wait until the plugin has registered what it declared (so dependents can start)."""
        timeout = self.config.register_timeout
        missing = self.registry.await_registered(runtime_id, service_types, timeout)
        if missing:
            raise ConnectError(
                Code.DEADLINE_EXCEEDED, f"{runtime_id} did not register {', '.join(missing)} within {timeout:g} s"
            )

    def runtime_id(self, client: PluginClient) -> str:
        identity = self._identity_of(client)
        return identity.runtime_id if identity else ""

    def discover(self, service_type: str, min_version: str = "") -> Provider:
        """The provider discovery would pick for ``service_type`` now.

        Raises ConnectError: ``not_found`` for a type nobody ever provided, ``unavailable``
        when no provider is usable (gone, unhealthy, or older than ``min_version``).
        """
        provider, _ = self.registry.discover(service_type, min_version)
        return provider

    def redirect(self, old: PluginClient, new: PluginClient) -> None:
        """Route calls addressed to ``old``'s endpoints to ``new`` from now on (blue-green)."""
        self.router.alias(self.runtime_id(old), self.runtime_id(new))

    def inventory(self) -> list[PluginSummary]:
        """The plugins this host launched or that registered services, with those services
        and their health, as operators see them (``GET /plugins``, ``connectplugin list``)."""
        with self._lock:
            names = {identity.runtime_id: client.name for client, identity in self._launched}
            health = dict(self._health)
        providers: dict[str, list[Provider]] = {runtime_id: [] for runtime_id in names}
        for provider in self.registry.providers():
            providers.setdefault(provider.provider_id, []).append(provider)
        summaries = []
        for runtime_id, provided in providers.items():
            identity = self.identities.get(runtime_id)
            if identity is None:  # revoked since: gone
                continue
            reported = health.get(runtime_id)
            worst = max((p.health for p in provided), default=HealthState.HEALTHY)
            state = reported.state if reported else worst
            services = tuple(
                ServiceSummary(p.service_type, p.version, p.endpoint_path, p.health.name)
                for p in sorted(provided, key=lambda p: (p.service_type, p.version))
            )
            if runtime_id in names:
                services += tuple(
                    ServiceSummary(d.name, d.version, d.service_path, state.name, registered=False)
                    for d in self.plugins.values()
                )
            summaries.append(
                PluginSummary(
                    name=names.get(runtime_id, identity.self_id), runtime_id=runtime_id,
                    self_id=identity.self_id, version=identity.self_version, launched=identity.launched,
                    health=state.name,
                    reason=reported.reason if reported else "", services=services,
                )
            )
        return sorted(summaries, key=lambda s: (s.name, s.runtime_id))

    def reported_health(self, runtime_id: str) -> HealthReport | None:
        """The last health a plugin reported (or its crash), by runtime id."""
        with self._lock:
            return self._health.get(runtime_id)

    def on_health(self, listener: HealthListener) -> None:
        """Call ``listener(runtime_id, report)`` on every health report and every crash."""
        with self._lock:
            self._health_listeners.append(listener)

    def stop(self, client: PluginClient, grace: float | None = None) -> None:
        """Stop one launched plugin: Shutdown, then SIGTERM, then SIGKILL after the grace period."""
        self._check_owner()
        restarting = self._supervisor.release(client)
        grace = self.config.stop_grace if grace is None else grace
        running = client.running
        identity = self._identity_of(client)
        with self._lock:
            self._launched = [(c, i) for c, i in self._launched if c is not client]
        if identity is not None:
            # New calls stop reaching it now; calls already routed to it may finish.
            self.registry.remove_provider(identity.runtime_id)
            if not restarting:  # gone for good: the names that led to it lead nowhere
                self.router.forget(identity.runtime_id)
        if running is None:
            if identity is not None:
                self._revoke(identity.runtime_id, "stopped")
            return
        running.mark_stopping()
        deadline = time.monotonic() + grace
        if running.alive():
            try:
                PluginControlClient(client.rpc).shutdown(
                    # Whole seconds on the wire: round up so in-flight calls keep their time.
                    lifecycle_pb2.ShutdownRequest(grace_period_seconds=math.ceil(grace), reason="host stopping it"),
                    timeout=self.config.shutdown_timeout,
                )
            except ConnectError as e:
                # Unheard (unreachable, say): signals come at once, SIGTERM still drains.
                if running.alive():
                    log.warning("shutdown request to %s failed: %s", client.name, e)
            else:
                running.wait(max(0.0, deadline - time.monotonic()) + EXIT_SLACK)
        # Whatever is left of the grace period, then SIGTERM, then SIGKILL.
        running.stop(max(MIN_SIGNAL_GRACE, deadline - time.monotonic()))
        client.close()
        if identity is not None:
            self._revoke(identity.runtime_id, "stopped")

    def close(self) -> None:
        """Stop every plugin, then stop serving. Safe from any thread, more than once.

        In a fork of the process that started the host, only marks this copy closed: the
        plugins and the server belong to the parent.
        """
        # Checked before taking the lock: another thread of the parent may have held it at
        # the fork, and in the child nobody would ever release it.
        if self._owner_pid and os.getpid() != self._owner_pid:
            log.debug("closing a forked copy of a host of process %d: its plugins are left alone", self._owner_pid)
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _exit_hooks.discard(self)
        self._supervisor.close()  # no restart from now on
        with self._lock:
            launched = list(self._launched)
            server = self._http
        threads = [
            threading.Thread(target=self.stop, args=(c,), name=f"host-stop:{c.name}") for c, _ in launched
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._stop_reaper.set()
        self.registry.close_watchers()
        if server is not None:
            server.close(grace=self.config.close_grace)
        self.router.close()

    def _ready(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self._lock:
            closed = self._closed
        return text_response(start_response, 503, "closing") if closed else text_response(start_response, 200, "ok")

    def __enter__(self) -> PluginHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _identity_of(self, client: PluginClient) -> Identity | None:
        with self._lock:
            for c, identity in self._launched:
                if c is client:
                    return identity
        return None

    def _reap(self) -> None:
        """Drop self-registered plugins that stopped reporting (a launched one is watched
        directly) and identities whose token expired; rotate launched plugins' tokens."""
        while not self._stop_reaper.wait(self.config.reap_every):
            silent = self._roster.take_silent(time.monotonic() - self.config.heartbeat_timeout)
            # Only providers are withdrawn: a plugin that merely calls others offers nothing
            # that could go stale, and keeps its identity however quiet it is.
            providing = {p.provider_id for p in self.registry.providers()}
            for rid in [rid for rid in silent if rid in providing]:
                self._check_silent(rid)
            # However quiet a caller may be, a self-registered identity nobody uses is dropped.
            unused = self.identities.unused_since(self.config.clock() - self.config.identity_idle_timeout)
            for rid in unused:
                identity = self.identities.get(rid)
                if identity is not None and not identity.launched:
                    log.info("%s unused for %g s; revoking its identity", rid, self.config.identity_idle_timeout)
                    self._revoke(rid, "unused")
            for expired in self.identities.take_expired():
                log.warning("%s: its runtime token expired", expired.runtime_id)
                self._revoke(expired.runtime_id, "token expired")
            self._rotate_launched()

    def _check_silent(self, runtime_id: str) -> None:
        """A provider missed its heartbeats: ask it before withdrawing it (see ``heartbeat_timeout``)."""
        identity = self.identities.get(runtime_id)
        status = self._health_check.status(identity) if identity is not None and identity.base_url else None
        if status is None:
            log.warning("%s stopped reporting and does not answer health checks; dropping it", runtime_id)
            self._revoke(runtime_id, "stopped reporting")
            return
        log.debug("%s sends no heartbeats but answers health checks: %s", runtime_id, status.name)
        self._roster.heard_from(runtime_id)
        self.identities.touch(runtime_id)
        with self._lock:
            reported = self._health.get(runtime_id)
        if status != SERVING:
            self.registry.set_health(runtime_id, HealthState.UNHEALTHY)
        else:
            self.registry.set_health(runtime_id, reported.state if reported else HealthState.HEALTHY)

    def revoke_certificate(self, *certificates: Any) -> None:
        """Refuse client certificates (given as certificates or SHA-256 fingerprints) from now
        on: at every later TLS handshake, and on every call of the identities bound to them,
        which are revoked here (their registrations withdrawn, watchers told). Safe from any
        thread."""
        self.revoked.add(*certificates)
        prints = {tls.parse_fingerprint(c) if isinstance(c, str) else tls.fingerprint(c) for c in certificates}
        for runtime_id in self.identities.bound_to(prints):
            self._revoke(runtime_id, "its client certificate was revoked")

    def _revoke(self, runtime_id: str, why: str) -> None:
        """Everything an identity held ends here, whatever ended it (crash, stop, silence,
        expiry, a failed join): its registrations (watchers are told), the routes to it, its
        grants, its token, a launched plugin's live pin, and what the host kept about it (a
        launched plugin's last health stays readable: it says how it ended). Idempotent."""
        identity = self.identities.get(runtime_id)
        self.registry.remove_provider(runtime_id)
        self.router.detach_local(runtime_id)
        self.broker.revoke_all(runtime_id)
        self.identities.revoke(runtime_id)
        self._roster.forget(runtime_id)
        self.registration_rate.forget(runtime_id)
        self.grant_rate.forget(runtime_id)
        if self.metrics is not None:
            self.metrics.forget(runtime_id)
        if identity is not None and identity.launched:
            self._unpin(identity.certificate)
        elif identity is not None:
            with self._lock:
                self._health.pop(runtime_id, None)
        log.info("revoked %s (%s)", runtime_id, why)

    def _join(self, request: handshake_pb2.HandshakeRequest, ctx: Context) -> Identity:
        """A new identity for a plugin that joins by itself, if the host's policy admits it."""
        certificate = tls.peer_certificate(ctx.environ)
        if certificate is not None:
            self.identities.check_certificate(certificate)
        declared, admitted_by = self._admission.admit(request.self_id, request.client_metadata, ctx.peer, certificate)
        server_tls = self.config.http.tls
        if server_tls is not None and certificate is not None and request.self_id in tls.certificate_ids(certificate):
            # Joined by a certificate naming it: the server it calls must be that plugin too,
            # not another one of the same CA answering at its address.
            server_tls = replace(server_tls, plugin_id=request.self_id)
        identity = self.identities.issue(
            request.self_id, request.self_version,
            limit=self.config.max_identities, limit_name="HostConfig.max_identities",
            # The router calls a plugin serving TLS as the host serves: our certificate, our CAs.
            tls=server_tls, certificate=certificate,
        )
        try:
            self.registry.declare(identity.runtime_id, declared)
            base_url = request.client_metadata.get(hs.BASE_URL_KEY, "")
            if base_url:
                self._admission.pin(identity, base_url)
        except BaseException:
            self._revoke(identity.runtime_id, "join refused")
            raise
        # Watched for silence from its first registration or health report on; an identity
        # that only calls others has nothing to withdraw, so it is not reaped.
        log.info(
            "%s %s joined through %s from %s: runtime id %s",
            request.self_id, request.self_version, admitted_by, ctx.peer, identity.runtime_id,
        )
        return identity

    def _rotate(self, request: handshake_pb2.HandshakeRequest, ctx: Context) -> Identity:
        """A handshake carrying a current identity: the same identity with a fresh token."""
        identity = self.identities.caller(ctx)
        if identity.self_id != request.self_id:
            raise ConnectError(Code.PERMISSION_DENIED, f"{identity.runtime_id} is not {request.self_id!r}")
        return self.identities.rotate(identity.runtime_id)

    def _rotate_launched(self) -> None:
        """Give launched plugins past their token's half-life a fresh one (``SetRuntimeIdentity``)."""
        with self._lock:
            launched = list(self._launched)
        due = self.identities.due_for_rotation({i.runtime_id for _, i in launched})
        for client, identity in launched:
            if identity.runtime_id not in due:
                continue
            try:
                rotated = self.identities.rotate(identity.runtime_id)
                PluginIdentityClient(client.rpc).set_runtime_identity(
                    plugininfo_pb2.SetRuntimeIdentityRequest(
                        runtime_id=rotated.runtime_id, runtime_token=rotated.token, host_url=self.url
                    ),
                    headers={"Authorization": f"Bearer {rotated.previous_token}"},
                    timeout=self.config.control_timeout,
                )
            except ConnectError as e:
                log.warning("could not give %s its new runtime token: %s", identity.runtime_id, e)

    def _record_health(self, runtime_id: str, report: HealthReport) -> None:
        self._roster.heard_from(runtime_id)
        self.registry.set_health(runtime_id, report.state)
        with self._lock:
            self._health[runtime_id] = report
            listeners = list(self._health_listeners)
        for listener in listeners:
            listener(runtime_id, report)


class _ExitHooks:
    """Stops started hosts at interpreter exit and, when asked, unwinds on SIGTERM/SIGINT.

    Installed by the first ``PluginHost.start()``, never at import or construction.
    ``_lock`` guards the flags and the host set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: weakref.WeakSet[PluginHost] = weakref.WeakSet()
        self._atexit = False
        self._signals = False

    def add(self, host: PluginHost, handle_signals: bool) -> None:
        with self._lock:
            self._hosts.add(host)
            register_atexit, self._atexit = not self._atexit, True
            # signal.signal works only on the main thread; elsewhere the host just goes without.
            on_main = threading.current_thread() is threading.main_thread()
            install_signals = handle_signals and on_main and not self._signals
            self._signals = self._signals or install_signals
        if register_atexit:
            atexit.register(self._close_all)
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                _unwind_on(signum)

    def discard(self, host: PluginHost) -> None:
        with self._lock:
            self._hosts.discard(host)

    def _close_all(self) -> None:
        with self._lock:
            hosts = list(self._hosts)
        for host in hosts:
            host.close()


def _unwind_on(signum: int) -> None:
    """Make ``signum`` unwind the main thread, chaining an earlier Python handler."""
    previous = signal.getsignal(signum)

    def handler(num: int, frame: Any) -> None:
        # Never close hosts here: the interrupted code may hold their locks. Unwind
        # instead; ``with`` blocks and the atexit hook stop the plugins on the way out.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(num, frame)
            return
        if num == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + num)

    signal.signal(signum, handler)


_exit_hooks = _ExitHooks()
