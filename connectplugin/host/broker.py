"""The capability broker: time-limited grants to services the host itself provides.

The host registers capabilities (a type, a version, a handler object such as a
``capability.logger.v1.Logger`` implementation). A plugin asks for one with
``RequestCapability`` and gets a grant: an endpoint under
``/capabilities/{type}/{grant_id}/`` and a bearer token that alone opens it, until it
expires or is revoked.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ..gen.connectplugin.v1 import broker_pb2, handshake_pb2
from ..gen.connectplugin.v1.broker_connect import CapabilityBrokerHandler
from ..rpc.errors import Code, ConnectError
from ..rpc.server import App, Context, error_response
from ..runtime.credentials import bearer_matches
from .identities import Identities
from .ratelimit import RateLimiter
from .registry import version_key

log = logging.getLogger("connectplugin.broker")

CAPABILITIES_PREFIX = "/capabilities"
ROUTE = f"{CAPABILITIES_PREFIX}/<capability_type>/<grant_id>/<path:rest>"
DEFAULT_TTL = 3600.0
"""Seconds a capability grant stays valid unless revoked (``HostConfig.grant_ttl``)."""
DEFAULT_MAX_GRANTS = 64
"""Unexpired grants one plugin may hold at once (``HostConfig.max_grants_per_identity``)."""


@dataclass(frozen=True)
class Grant:
    grant_id: str
    capability_type: str
    token: str
    runtime_id: str
    expires_at: float
    """The broker's ``clock()`` reading after which the grant no longer opens anything."""


@dataclass
class _Capability:
    capability_type: str
    version: str
    app: App


class Broker:
    """Capabilities and their grants. Safe from any thread; ``_lock`` guards both tables.

    A grant dies with its holder: it opens nothing once ``identities`` no longer holds the
    holder's runtime id. ``ttl`` seconds after it is given it expires, as read on ``clock``.
    """

    def __init__(
        self, identities: Identities, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.monotonic,
        max_grants_per_identity: int = DEFAULT_MAX_GRANTS,
    ) -> None:
        self._identities = identities
        self.ttl = ttl
        self.max_grants_per_identity = max_grants_per_identity
        self._clock = clock
        self._lock = threading.Lock()
        self._capabilities: dict[str, _Capability] = {}
        self._grants: dict[str, Grant] = {}

    def add(self, capability_type: str, version: str, handler: Any) -> None:
        """Offer ``handler`` (a generated handler subclass) as ``capability_type``."""
        with self._lock:
            self._capabilities[capability_type] = _Capability(capability_type, version, App([handler]))

    def advertised(self, base_url: str) -> list[handshake_pb2.Capability]:
        """What the handshake response lists: where, under the host's ``base_url``, to ask for each."""
        with self._lock:
            caps = list(self._capabilities.values())
        return [
            handshake_pb2.Capability(
                type=c.capability_type, version=c.version, endpoint=f"{base_url}{CAPABILITIES_PREFIX}/{c.capability_type}"
            )
            for c in caps
        ]

    def grant(self, runtime_id: str, capability_type: str, min_version: str = "", reason: str = "") -> tuple[Grant, str]:
        with self._lock:
            capability = self._capabilities.get(capability_type)
        if capability is None:
            raise ConnectError(Code.NOT_FOUND, f"the host offers no capability {capability_type!r}")
        if min_version and version_key(capability.version) < version_key(min_version):
            raise ConnectError(
                Code.FAILED_PRECONDITION,
                f"capability {capability_type!r} is version {capability.version}, older than {min_version}",
            )
        grant = Grant(
            grant_id=f"grant-{secrets.token_hex(8)}",
            capability_type=capability_type,
            token=secrets.token_urlsafe(32),
            runtime_id=runtime_id,
            expires_at=self._clock() + self.ttl,
        )
        now = self._clock()
        with self._lock:
            for gid in [g.grant_id for g in self._grants.values() if g.expires_at <= now]:
                del self._grants[gid]  # expired grants go when new ones come, not only when used
            held = sum(1 for g in self._grants.values() if g.runtime_id == runtime_id)
            if held < self.max_grants_per_identity:
                self._grants[grant.grant_id] = grant
        if held >= self.max_grants_per_identity:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"{runtime_id} holds {held} unexpired grants, HostConfig.max_grants_per_identity; "
                "reuse one or wait for one to expire",
            )
        log.info("granted %s to %s (%s)", capability_type, runtime_id, reason or "no reason given")
        return grant, capability.version

    def revoke(self, grant_id: str) -> None:
        with self._lock:
            self._grants.pop(grant_id, None)

    def revoke_all(self, runtime_id: str) -> None:
        with self._lock:
            for gid in [g.grant_id for g in self._grants.values() if g.runtime_id == runtime_id]:
                del self._grants[gid]

    def endpoint(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        """WSGI: ``/capabilities/{type}/{grant}/{Service}/{Method}`` -> the capability, if the token opens it."""
        args = environ.get("connectplugin.route_args", {})
        try:
            capability = self._open(args.get("grant_id", ""), args.get("capability_type", ""), environ.get("HTTP_AUTHORIZATION", ""))
        except ConnectError as e:
            return error_response(start_response, e)
        inner = dict(environ)
        inner["PATH_INFO"] = "/" + args.get("rest", "")
        return capability.app(inner, start_response)

    def _open(self, grant_id: str, capability_type: str, authorization: str) -> _Capability:
        with self._lock:
            grant = self._grants.get(grant_id)
            capability = self._capabilities.get(capability_type)
            if grant is not None and self._clock() >= grant.expires_at:
                del self._grants[grant_id]
                grant = None
        if (
            not bearer_matches(authorization, grant.token if grant is not None else None)
            or grant is None
            or grant.capability_type != capability_type
            or not self._identities.is_current(grant.runtime_id)
        ):
            raise ConnectError(Code.UNAUTHENTICATED, "capability grant is invalid, expired or revoked")
        assert capability is not None
        return capability


class HostAddress(Protocol):
    """Where the host serves: grants are endpoints under its URL."""

    @property
    def url(self) -> str: ...


class BrokerService(CapabilityBrokerHandler):
    """``connectplugin.v1.CapabilityBroker``: authenticated plugins request grants."""

    def __init__(self, broker: Broker, identities: Identities, host: HostAddress, rate: RateLimiter) -> None:
        """``rate``: requests allowed per plugin, by runtime id."""
        self._broker = broker
        self._identities = identities
        self._host = host
        self._rate = rate

    def request_capability(
        self, request: broker_pb2.RequestCapabilityRequest, ctx: Context
    ) -> broker_pb2.RequestCapabilityResponse:
        identity = self._identities.caller(ctx)
        self._rate.check(identity.runtime_id)
        grant, version = self._broker.grant(identity.runtime_id, request.capability_type, request.min_version, request.reason)
        return broker_pb2.RequestCapabilityResponse(
            grant=broker_pb2.CapabilityGrant(
                grant_id=grant.grant_id,
                endpoint_url=f"{self._host.url}{CAPABILITIES_PREFIX}/{grant.capability_type}/{grant.grant_id}",
                bearer_token=grant.token,
                capability_type=grant.capability_type,
                version=version,
            )
        )
