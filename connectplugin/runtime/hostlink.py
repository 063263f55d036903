"""A plugin's link to its host: identity, health reports, registration, and calls to peers.

Plugin code reaches other plugins only through the host: ``link.client("logger", LoggerClient)``
discovers a provider and returns a typed client whose calls go through the host's router
with this plugin's credentials. Safe to use from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..gen.connectplugin.v1 import broker_pb2, handshake_pb2, lifecycle_pb2, registry_pb2
from ..gen.connectplugin.v1.broker_connect import CapabilityBrokerClient
from ..gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from ..gen.connectplugin.v1.lifecycle_connect import PluginLifecycleClient
from ..gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from ..rpc.client import Client, ClientConfig, Interceptor, ServerStream
from ..rpc.errors import Code, ConnectError
from ..rpc.tls import TLSConfig
from .credentials import HOST_SECRET_KEY, RUNTIME_ID_HEADER, bearer_matches, secret_matches
from .handshake import (
    BASE_URL_KEY,
    JOIN_TOKEN_KEY,
    TOKEN_TTL_KEY,
    HandshakeConfig,
    exchange,
    request_for,
)
from .health import Health, HealthReport, report_to_wire
from .plugin import ServiceDeclaration

log = logging.getLogger("connectplugin.hostlink")

C = TypeVar("C")


@dataclass(frozen=True)
class HostLinkConfig:
    """How long a plugin's calls to its host may take."""

    call_timeout: float = 10.0
    """Seconds for each unary call to the host (handshake, register, discover, capability
    requests), and the default call timeout of the capability clients it hands out."""
    report_timeout: float = 5.0
    """Seconds for one health report (``ReportHealth``), heartbeats included."""
    unregister_timeout: float = 2.0
    """Seconds for each ``UnregisterService`` call when the plugin stops."""


class HostLink:
    """The plugin side of the host relationship; pass one to ``serve(link=...)`` to keep a handle.

    Identity arrives either from the host (``SetRuntimeIdentity``, platform-managed) or
    from this plugin's own handshake (``connect()``, self-registering). Once known, the
    plugin's declared services are registered and every health change is reported, in
    order, by a thread (``host-link``) that starts with the first identity. Constructing
    one starts nothing. Safe to use from any thread.
    """

    def __init__(self, config: HostLinkConfig | None = None) -> None:
        self.config = config or HostLinkConfig()
        self.health = Health()
        self._provides: list[ServiceDeclaration] = []
        # _lock guards every field below; _changed is notified when the identity, the
        # pending report or _closed changes.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.host_url = ""
        self.runtime_id = ""
        self._token = ""
        self._host_secret = ""  # what the host presents when it calls us
        self._base_url = ""
        self._registrations: list[str] = []
        self._host_client: Client | None = None
        self._pending: HealthReport | None = None
        self._closed = False
        self._reporter: threading.Thread | None = None
        self._peers: dict[str, Client] = {}
        self._grant_clients: list[Client] = []
        self._rotate_at = float("inf")  # monotonic time to renew a self-registered identity's token
        self._tls: TLSConfig | None = None

    def attach(
        self, health: Health, provides: Sequence[ServiceDeclaration], host_url: str, tls: TLSConfig | None = None
    ) -> None:
        """Called by the plugin server: the health to report, the services to register, and
        how to reach an https:// host (``tls``: our certificate, and whom we trust as host)."""
        self.health = health
        self._provides = list(provides)
        self.host_url = host_url.rstrip("/")
        self._tls = tls
        health.add_listener(self._health_changed)

    def _config(self, url: str, **settings: Any) -> ClientConfig:
        """A client config for ``url`` at the host: over TLS with our settings when https://."""
        return ClientConfig(tls=self._tls if url.startswith("https://") else None, **settings)

    # --- identity -----------------------------------------------------------------------------

    def assign(self, runtime_id: str, token: str, host_url: str, base_url: str = "") -> None:
        """Take a runtime identity, then register this plugin's services with the host.

        A new token for the identity we already hold (a rotation) only replaces the token.
        """
        with self._lock:
            rotation = bool(self._token) and runtime_id == self.runtime_id
            self.runtime_id, self._token = runtime_id, token
            self.host_url = (host_url or self.host_url).rstrip("/")
            self._base_url = base_url or self._base_url
            # Clients holding the old credentials are closed below, after release.
            stale = [self._host_client, *self._peers.values()]
            self._peers.clear()
            # Unary calls below pass their own deadlines; watches have none (stream_timeout).
            self._host_client = Client(self.host_url, self._config(self.host_url, headers=self._auth()))
            first = self._reporter is None
            if first:
                self._reporter = threading.Thread(target=self._report_loop, name="host-link", daemon=True)
            reporter = self._reporter
            self._changed.notify_all()
        if first and reporter is not None:
            reporter.start()
        for client in stale:
            if client is not None:
                client.close()
        if rotation:
            log.info("runtime token of %s renewed", runtime_id)
            return
        self._register()
        self._health_changed(self.health.get())

    def connect(
        self, handshake: HandshakeConfig, self_id: str, self_version: str, base_url: str, join_token: str = ""
    ) -> None:
        """Self-registration: handshake with the host as ``self_id`` and take the identity it gives.

        ``join_token`` is the secret the host admits self-registering plugins with; the host
        fixes ``base_url`` as where it reaches this plugin from now on.
        """
        metadata = {BASE_URL_KEY: base_url} if base_url else {}
        if join_token:
            metadata[JOIN_TOKEN_KEY] = join_token
        response = self._handshake(handshake, self_id, self_version, metadata, {})
        if not response.runtime_token:
            raise ConnectError(Code.FAILED_PRECONDITION, "the host gave no runtime identity")
        host_secret = response.server_metadata.get(HOST_SECRET_KEY, "")
        if not host_secret:
            # A host that presents no credential (the Go reference): nobody can prove to be
            # it, so a plugin serving behind a HostGate answers no one unless it opted out.
            log.warning("host %s gave no host secret: calls to this plugin cannot be authenticated", self.host_url)
        # Before registering: the host calls us, with this secret, to check where we listen.
        self.expect_host(host_secret)
        self.assign(response.runtime_id, response.runtime_token, self.host_url, base_url)

    def expect_host(self, secret: str) -> None:
        """Accept calls presenting ``secret`` as the host's (given at launch or by the handshake)."""
        with self._lock:
            self._host_secret = secret

    def is_host(self, secret: object) -> bool:
        """Whether ``secret`` is the current host's credential (constant time); False with none."""
        with self._lock:
            expected = self._host_secret
        return secret_matches(secret, expected)

    def rotate_if_due(self, handshake: HandshakeConfig, self_id: str, self_version: str) -> None:
        """Renew a self-registered identity's token once it is past half its lifetime.

        The renewal is a handshake carrying the current credentials: the host answers with
        the same runtime id and a new token, and this plugin stays registered.
        """
        with self._lock:
            due = bool(self._token) and time.monotonic() >= self._rotate_at
        if not due:
            return
        response = self._handshake(handshake, self_id, self_version, {}, self.headers())
        if response.runtime_id != self.runtime_id or not response.runtime_token:
            raise ConnectError(Code.FAILED_PRECONDITION, "the host answered a token renewal with another identity")
        self.assign(response.runtime_id, response.runtime_token, self.host_url)

    def _handshake(
        self, handshake: HandshakeConfig, self_id: str, self_version: str, metadata: dict[str, str], headers: dict[str, str]
    ) -> handshake_pb2.HandshakeResponse:
        request = request_for(handshake, (), self_id=self_id, self_version=self_version)
        request.client_metadata.update(metadata)
        with Client(self.host_url, self._config(self.host_url, timeout=self.config.call_timeout, headers=headers)) as client:
            response = exchange(handshake, request, HandshakeServiceClient(client).handshake, them="host")
        try:
            ttl = float(response.server_metadata.get(TOKEN_TTL_KEY, "inf"))
        except ValueError:
            ttl = float("inf")
        with self._lock:
            self._rotate_at = time.monotonic() + ttl / 2
        return response

    @property
    def connected(self) -> bool:
        with self._lock:
            return bool(self._token)

    def wait_connected(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: bool(self._token), timeout)

    def is_current(self, authorization: object) -> bool:
        """Whether ``authorization`` is ``Bearer <our current token>`` (constant time)."""
        with self._lock:
            token = self._token
        return bearer_matches(authorization, token)

    def reset(self) -> None:
        """Forget the identity (the host no longer knows it); a self-registering plugin rejoins.

        The host's secret goes too: until the rejoin, nobody may call this plugin."""
        with self._lock:
            self.runtime_id, self._token, self._host_secret = "", "", ""

    def headers(self) -> dict[str, str]:
        """The credentials host API calls carry."""
        with self._lock:
            return self._auth()

    def _auth(self) -> dict[str, str]:
        return {RUNTIME_ID_HEADER: self.runtime_id, "Authorization": f"Bearer {self._token}"}

    def _identified_client(self) -> Client:
        """The client of the host's API, carrying this plugin's credentials."""
        with self._lock:
            if self._host_client is None:
                raise ConnectError(Code.FAILED_PRECONDITION, "this plugin has no runtime identity yet")
            return self._host_client

    # --- peers and capabilities ---------------------------------------------------------------

    def discover(self, service_type: str, min_version: str = "") -> registry_pb2.DiscoverServiceResponse:
        return ServiceRegistryClient(self._identified_client()).discover_service(
            registry_pb2.DiscoverServiceRequest(service_type=service_type, min_version=min_version),
            timeout=self.config.call_timeout,
        )

    def client(
        self,
        service_type: str,
        client_class: type[C],
        min_version: str = "",
        timeout: float | None = None,
        *,
        config: ClientConfig | None = None,
        interceptors: Sequence[Interceptor] = (),
    ) -> C:
        """A typed client for a provider of ``service_type``, called through the host's router
        at the discovered ``endpoint_url`` + ``/MethodName``.

        ``timeout`` is its unary calls' deadline (None: ``config``'s, by default
        ``DEFAULT_TIMEOUT``); ``config`` its other settings and ``interceptors`` more of them,
        run inside the config's (``Retry()``, ``CircuitBreaker()``). This plugin's credentials
        are always added.
        """
        endpoint = self.discover(service_type, min_version).endpoint
        base = self.host_url + endpoint.endpoint_url
        with self._lock:
            # One pooled client per provider endpoint, so repeated lookups reuse connections.
            peer = self._peers.get(base)
            if peer is None:
                # endpoint_url + "/Method": the form both our router and the Go one serve.
                peer = self._peers[base] = Client(base, self._config(base, headers=self._auth(), service_url=True))
            auth = self._auth()
        chosen = config or ClientConfig()
        if timeout is not None:
            chosen = replace(chosen, timeout=timeout)
        chosen = replace(
            chosen,
            headers={**chosen.headers, **auth},
            service_url=True,
            interceptors=(*chosen.interceptors, *interceptors),
        )
        return client_class(peer.derive(chosen))  # type: ignore[call-arg]

    def watch(self, service_type: str) -> ServerStream[registry_pb2.WatchServiceEvent]:
        return ServiceRegistryClient(self._identified_client()).watch_service(
            registry_pb2.WatchServiceRequest(service_type=service_type)
        )

    def capability(self, capability_type: str, client_class: type[C], min_version: str = "", reason: str = "") -> C:
        """A typed client for a host capability, opened with a fresh grant."""
        grant = CapabilityBrokerClient(self._identified_client()).request_capability(
            broker_pb2.RequestCapabilityRequest(capability_type=capability_type, min_version=min_version, reason=reason),
            timeout=self.config.call_timeout,
        ).grant
        auth = {"Authorization": f"Bearer {grant.bearer_token}"}
        client = Client(grant.endpoint_url, self._config(grant.endpoint_url, timeout=self.config.call_timeout, headers=auth))
        with self._lock:
            self._grant_clients.append(client)
        return client_class(client)  # type: ignore[call-arg]

    # --- registration and health --------------------------------------------------------------

    def _register(self) -> None:
        host = self._identified_client()
        registry = ServiceRegistryClient(host)
        ids = []
        for decl in self._provides:
            metadata = {"base_url": self._base_url} if self._base_url else {}
            response = registry.register_service(
                registry_pb2.RegisterServiceRequest(
                    service_type=decl.service_type, version=decl.version, endpoint_path=decl.path, metadata=metadata
                ),
                timeout=self.config.call_timeout,
            )
            ids.append(response.registration_id)
        with self._lock:
            self._registrations = ids
        if ids:
            log.info("registered %s with the host", ", ".join(d.service_type for d in self._provides))

    def unregister(self) -> None:
        with self._lock:
            ids, self._registrations = self._registrations, []
            host = self._host_client
        if host is None:
            return
        for reg_id in ids:
            try:
                ServiceRegistryClient(host).unregister_service(
                    registry_pb2.UnregisterServiceRequest(registration_id=reg_id),
                    timeout=self.config.unregister_timeout,
                )
            except ConnectError as e:
                log.debug("unregister %s: %s", reg_id, e)

    def _health_changed(self, report: HealthReport) -> None:
        # Read the state again rather than trust the argument: listeners of two quick
        # changes may run in either order, and the host must end up with the last one.
        current = self.health.get()
        with self._lock:
            self._pending = current
            self._changed.notify_all()

    def _report_loop(self) -> None:
        """Send the latest health state, in order, off the caller's thread."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or (self._pending is not None and self._host_client is not None))
                if self._closed:
                    return
                report, self._pending = self._pending, None
                host = self._host_client
            assert report is not None and host is not None
            try:
                self._report(host, report)
            except ConnectError as e:
                log.warning("could not report health to %s: %s", self.host_url, e)

    def heartbeat(self) -> None:
        """Report current health now; raises if the host no longer knows this plugin."""
        self._report(self._identified_client(), self.health.get())

    def _report(self, host: Client, report: HealthReport) -> None:
        PluginLifecycleClient(host).report_health(
            report_to_wire(report, lifecycle_pb2.ReportHealthRequest), timeout=self.config.report_timeout
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            clients = [self._host_client, *self._peers.values(), *self._grant_clients]
            self._peers.clear()
            self._grant_clients.clear()
        for client in clients:
            if client is not None:
                client.close()

