"""The service registry: which plugin provides which service type, and in what health.

Several providers may offer one service type; the host picks one per discovery with a
selection strategy, healthy providers before degraded ones, unhealthy never. Watchers get
the current state of a type first, then every change, in order.
"""

from __future__ import annotations

import itertools
import queue
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import urlsplit

from ..gen.connectplugin.v1 import registry_pb2
from ..gen.connectplugin.v1.registry_connect import ServiceRegistryHandler
from ..rpc.errors import Code, ConnectError
from ..rpc.server import Context
from ..runtime.credentials import RUNTIME_ID_HEADER
from ..runtime.health import DEGRADED, HEALTHY, UNHEALTHY, HealthState
from . import validation
from .identities import Identities, Identity
from .ratelimit import RateLimiter

AVAILABLE = registry_pb2.SERVICE_STATE_AVAILABLE
UNAVAILABLE = registry_pb2.SERVICE_STATE_UNAVAILABLE
SERVICE_DEGRADED = registry_pb2.SERVICE_STATE_DEGRADED

STRATEGIES = ("first", "round_robin", "random", "weighted")

ALL_TYPES = ""
"""The service type to watch for every type at once (operators only: the dashboard)."""


@dataclass(frozen=True)
class Provider:
    """One registration: a plugin offering a service type at a path under its base URL."""

    registration_id: str
    provider_id: str
    """The providing plugin's runtime id."""
    service_type: str
    version: str
    endpoint_path: str
    base_url: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    health: HealthState = HEALTHY
    launched: bool = False
    """The host started this provider; launched providers are discovered first."""

    @property
    def weight(self) -> int:
        try:
            return max(0, int(self.metadata.get("weight", "1")))
        except ValueError:
            return 1


def version_key(version: str) -> tuple:
    """Semantic-version ordering: 1.10.0 > 1.9.0, and 1.0.0-rc.1 < 1.0.0."""
    # Build metadata ("+...") never affects order, and may itself contain hyphens.
    core, _, pre = version.strip().lstrip("vV").split("+", 1)[0].partition("-")
    numbers = [int(n) if n.isdigit() else 0 for n in (core.split(".") + ["0", "0"])[:3]]
    if not pre:
        return (*numbers, 1, ())
    # Pre-release identifiers: numeric ones compare as numbers and sort before text ones.
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*numbers, 0, ids)


@dataclass(frozen=True)
class Declared:
    """What one plugin may register: its declarations, as the host's policy admits them.

    A launched plugin declares ``service type -> endpoint path`` itself (``GetPluginInfo``);
    a self-registered one may register what its join token allows, at any service path
    (path ""), or, joined through the development switch (``any_type``), any type that no
    launched plugin declares.
    """

    launched: bool
    paths: Mapping[str, str] = field(default_factory=dict)
    any_type: bool = False


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def same_address(a: str, b: str) -> bool:
    """Whether base URLs ``a`` and ``b`` name one server: scheme, port and host alike, where
    any two loopback names are alike (a plugin told a port may say localhost or 127.0.0.1)."""
    x, y = urlsplit(a), urlsplit(b)
    try:
        if (x.scheme, x.port) != (y.scheme, y.port) or x.port is None:
            return False
    except ValueError:  # a port out of range
        return False
    return x.hostname == y.hostname or {x.hostname, y.hostname} <= _LOOPBACK_NAMES


@dataclass(frozen=True)
class RegistryConfig:
    """How the registry picks providers and watches them."""

    strategy: str = "first"
    """How to pick among usable providers: first, round_robin, random or weighted."""
    max_watchers_per_type: int = 8
    """Open WatchService streams of one service type, so one type cannot take every watcher."""
    max_registrations_per_identity: int = 32
    """Services one plugin may declare, and registrations it may hold at once."""
    max_metadata_bytes: int = 4096
    """Largest metadata of one registration: its keys and values, in UTF-8 bytes."""
    max_service_types: int = 1024
    """Service types remembered as known (``not_found`` vs ``unavailable``); types with no
    provider left are forgotten first when it is reached."""
    watch_check_interval: float = 0.25
    """Seconds an idle watch waits between checks that its caller is still connected."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")


class Registry:
    """Providers by service type. Safe from any thread.

    ``_lock`` guards every table; watchers are fed under it (a queue put, no I/O), so every
    watcher sees events in the order the changes happened. ``_changed`` is signalled on every
    change to the providers or their health. Providers are indexed by type and by plugin, and
    each type's usable providers are kept until it changes, so a lookup costs the same with
    ten thousand providers as with one.
    """

    def __init__(self, config: RegistryConfig | None = None, route_prefix: str = "/services") -> None:
        self.config = config or RegistryConfig()
        self._prefix = route_prefix
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._providers: dict[str, Provider] = {}  # by registration id
        # The same providers by service type and by plugin (then registration id), in order.
        self._by_type: dict[str, dict[str, Provider]] = {}
        self._by_plugin: dict[str, dict[str, Provider]] = {}
        self._usable_now: dict[str, list[Provider]] = {}  # by type, until the type changes
        self._known_types: set[str] = set()
        self._declared: dict[str, Declared] = {}  # runtime id -> what it may register
        self._watchers: dict[str, list[queue.SimpleQueue[registry_pb2.WatchServiceEvent | None]]] = {}
        self._last_event: dict[str, tuple[int, str]] = {}
        self._round_robin = itertools.count()
        self._random = random.Random()

    # --- who may provide what -----------------------------------------------------------------

    def declare(self, runtime_id: str, declared: Declared) -> None:
        """Record what a plugin may register (its plugin info, or its join token's policy)."""
        limit = self.config.max_registrations_per_identity
        if len(declared.paths) > limit:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"a plugin may declare at most {limit} services (RegistryConfig.max_registrations_per_identity)",
            )
        with self._lock:
            self._declared[runtime_id] = declared

    # --- registration -------------------------------------------------------------------------

    def register(
        self, provider_id: str, service_type: str, version: str, endpoint_path: str, base_url: str,
        metadata: Mapping[str, str] | None = None,
    ) -> Provider:
        validation.check_name(service_type, "service_type")
        validation.check_version(version)
        validation.check_endpoint_path(endpoint_path)
        config = self.config
        size = sum(len(k.encode()) + len(v.encode()) for k, v in (metadata or {}).items())
        if size > config.max_metadata_bytes:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"registration metadata is {size} bytes, over RegistryConfig.max_metadata_bytes ({config.max_metadata_bytes})",
            )
        with self._lock:
            declared = self._declared.get(provider_id)
            self._check_declared(provider_id, declared, service_type, endpoint_path)
            assert declared is not None
            held = len(self._by_plugin.get(provider_id, ()))
            if held >= config.max_registrations_per_identity:
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED,
                    f"{provider_id} holds {held} registrations, RegistryConfig.max_registrations_per_identity",
                )
            if service_type not in self._known_types and not self._make_room_for_a_type():
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED,
                    f"the registry knows {len(self._known_types)} service types, RegistryConfig.max_service_types",
                )
            provider = Provider(
                registration_id=f"reg-{secrets.token_hex(6)}",
                provider_id=provider_id,
                service_type=service_type,
                version=version,
                endpoint_path=endpoint_path,
                base_url=base_url.rstrip("/"),
                metadata=dict(metadata or {}),
                health=self._health_of(provider_id),
                launched=declared.launched,
            )
            self._add(provider)
            self._known_types.add(service_type)
            self._publish(service_type)
        return provider

    def await_registered(self, provider_id: str, service_types: Sequence[str], timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds until ``provider_id`` has registered every one of
        ``service_types``; returns those still missing (empty once all are there)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                registered = {p.service_type for p in self._by_plugin.get(provider_id, {}).values()}
                missing = sorted(set(service_types) - registered)
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._changed.wait(remaining)

    def await_provider_at(self, base_url: str, timeout: float) -> Provider | None:
        """Wait up to ``timeout`` seconds for a registration whose base URL is ``base_url``
        (two loopback names for one port count as one address); None if none came."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((p for p in self._providers.values() if same_address(p.base_url, base_url)), None)
                remaining = deadline - time.monotonic()
                if found is not None or remaining <= 0:
                    return found
                self._changed.wait(remaining)

    def unregister(self, registration_id: str, provider_id: str | None = None) -> None:
        """Remove a registration; with ``provider_id``, only that plugin's own."""
        with self._lock:
            provider = self._providers.get(registration_id)
            if provider is None or (provider_id is not None and provider.provider_id != provider_id):
                raise ConnectError(Code.NOT_FOUND, f"no registration {registration_id!r} of yours")
            self._drop(provider)
            self._publish(provider.service_type)

    def remove_provider(self, provider_id: str) -> None:
        """Drop every registration of a plugin (it stopped or crashed)."""
        with self._lock:
            gone = list(self._by_plugin.get(provider_id, {}).values())
            for p in gone:
                self._drop(p)
            self._declared.pop(provider_id, None)
            for service_type in {p.service_type for p in gone}:
                self._publish(service_type)

    def set_health(self, provider_id: str, state: HealthState) -> None:
        with self._lock:
            changed = set()
            for p in list(self._by_plugin.get(provider_id, {}).values()):
                if p.health != state:
                    self._add(replace(p, health=state))
                    changed.add(p.service_type)
            for service_type in changed:
                self._publish(service_type)

    # --- lookup -------------------------------------------------------------------------------

    def provider(self, provider_id: str, service_type: str) -> Provider | None:
        with self._lock:
            for p in self._by_plugin.get(provider_id, {}).values():
                if p.service_type == service_type:
                    return p
        return None

    def providers(self, service_type: str | None = None) -> list[Provider]:
        with self._lock:
            if service_type is None:
                return list(self._providers.values())
            return list(self._by_type.get(service_type, {}).values())

    def discover(self, service_type: str, min_version: str = "") -> tuple[Provider, int]:
        """Pick a provider; returns it and how many were usable.

        An unknown service type is ``not_found``; a known one with no usable provider
        (all gone, unhealthy, or too old) is ``unavailable``, since that may pass.
        """
        with self._lock:
            if service_type not in self._known_types:
                raise ConnectError(Code.NOT_FOUND, f"no plugin has ever provided {service_type!r}")
            usable = self._usable(service_type, min_version)
            if not usable:
                what = f" at version {min_version} or later" if min_version else ""
                raise ConnectError(Code.UNAVAILABLE, f"no healthy provider of {service_type!r}{what}")
            return self._select(usable), len(usable)

    def endpoint(self, provider: Provider) -> registry_pb2.ServiceEndpoint:
        return registry_pb2.ServiceEndpoint(
            provider_id=provider.provider_id,
            version=provider.version,
            endpoint_url=f"{self._prefix}/{provider.service_type}/{provider.provider_id}",
            metadata=dict(provider.metadata),
        )

    # --- watching -----------------------------------------------------------------------------

    def watch(self, service_type: str, active: Callable[[], bool]) -> Iterator[registry_pb2.WatchServiceEvent]:
        """The current state of ``service_type``, then each change, while ``active()``.

        ``ALL_TYPES`` watches every type: the current state of each known one, then each
        change of any (``max_watchers_per_type`` counts such watchers as one type)."""
        poll = self.config.watch_check_interval
        events: queue.SimpleQueue[registry_pb2.WatchServiceEvent | None] = queue.SimpleQueue()
        with self._lock:
            if len(self._watchers.get(service_type, ())) >= self.config.max_watchers_per_type:
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED,
                    f"too many watchers of {service_type!r} (RegistryConfig.max_watchers_per_type, "
                    f"{self.config.max_watchers_per_type}); try again later",
                )
            self._watchers.setdefault(service_type, []).append(events)
            for watched in sorted(self._known_types) if service_type == ALL_TYPES else [service_type]:
                first = self._event(watched)
                self._last_event[watched] = (first.state, first.endpoint.provider_id)
                events.put(first)
        try:
            while active():
                try:
                    event = events.get(timeout=poll)
                except queue.Empty:
                    continue
                if event is None:
                    return
                yield event
        finally:
            with self._lock:
                watchers = self._watchers.get(service_type, [])
                if events in watchers:
                    watchers.remove(events)
                if not watchers:
                    # No key per type ever watched: the table holds only types watched now.
                    self._watchers.pop(service_type, None)
                    self._forget_quiet(service_type)

    def watching(self) -> dict[str, int]:
        """Open watchers by service type; only types watched now appear."""
        with self._lock:
            return {service_type: len(w) for service_type, w in self._watchers.items()}

    def close_watchers(self) -> None:
        with self._lock:
            for watchers in self._watchers.values():
                for events in watchers:
                    events.put(None)

    # --- internals (lock held) ----------------------------------------------------------------

    def _make_room_for_a_type(self) -> bool:
        """Whether one more known type fits, forgetting types nobody provides if needed."""
        if len(self._known_types) < self.config.max_service_types:
            return True
        for service_type in self._known_types - set(self._by_type) - set(self._watchers):
            self._known_types.discard(service_type)
            self._last_event.pop(service_type, None)
        return len(self._known_types) < self.config.max_service_types

    def _forget_quiet(self, service_type: str) -> None:
        """Drop the last event of a type nobody provides or watches (it is UNAVAILABLE anyway)."""
        if service_type not in self._watchers and service_type not in self._by_type:
            self._last_event.pop(service_type, None)

    def _add(self, provider: Provider) -> None:
        """Add a provider, or replace the one with its registration id."""
        reg_id = provider.registration_id
        self._providers[reg_id] = provider
        self._by_type.setdefault(provider.service_type, {})[reg_id] = provider
        self._by_plugin.setdefault(provider.provider_id, {})[reg_id] = provider

    def _drop(self, provider: Provider) -> None:
        reg_id = provider.registration_id
        del self._providers[reg_id]
        for index, key in ((self._by_type, provider.service_type), (self._by_plugin, provider.provider_id)):
            entries = index[key]
            del entries[reg_id]
            if not entries:
                del index[key]

    def _check_declared(self, provider_id: str, declared: Declared | None, service_type: str, path: str) -> None:
        if declared is not None and service_type in declared.paths:
            wanted = declared.paths[service_type]
            if wanted and wanted != path:
                raise ConnectError(
                    Code.PERMISSION_DENIED, f"{provider_id} declared {service_type!r} at {wanted!r}, not {path!r}"
                )
            return
        if declared is not None and declared.any_type and not declared.launched:
            if any(service_type in d.paths for d in self._declared.values() if d.launched):
                raise ConnectError(
                    Code.PERMISSION_DENIED, f"{service_type!r} is provided by a plugin the host launched"
                )
            return
        raise ConnectError(Code.PERMISSION_DENIED, f"{provider_id} may not provide {service_type!r}")

    def _health_of(self, provider_id: str) -> HealthState:
        for p in self._by_plugin.get(provider_id, {}).values():
            return p.health
        return HEALTHY

    def _usable(self, service_type: str, min_version: str) -> list[Provider]:
        if not min_version:
            usable = self._usable_now.get(service_type)
            if usable is None:
                usable = self._usable_now[service_type] = self._pick_usable(service_type, None)
            return usable
        return self._pick_usable(service_type, version_key(min_version))

    def _pick_usable(self, service_type: str, floor: tuple | None) -> list[Provider]:
        candidates = [
            p for p in self._by_type.get(service_type, {}).values()
            if p.health != UNHEALTHY and (floor is None or version_key(p.version) >= floor)
        ]
        # Policy: a plugin that joined by itself never displaces one the host launched; it
        # is picked only when no launched provider can serve the request.
        candidates = [p for p in candidates if p.launched] or candidates
        healthy = [p for p in candidates if p.health != DEGRADED]
        return healthy or candidates

    def _select(self, usable: list[Provider]) -> Provider:
        strategy = self.config.strategy
        if strategy == "round_robin":
            return usable[next(self._round_robin) % len(usable)]
        if strategy == "random":
            return self._random.choice(usable)
        if strategy == "weighted":
            weights = [p.weight for p in usable]
            if sum(weights) > 0:
                return self._random.choices(usable, weights=weights)[0]
        return usable[0]

    def _event(self, service_type: str) -> registry_pb2.WatchServiceEvent:
        usable = self._usable(service_type, "")
        if not usable:
            return registry_pb2.WatchServiceEvent(service_type=service_type, state=UNAVAILABLE)
        state = SERVICE_DEGRADED if all(p.health == DEGRADED for p in usable) else AVAILABLE
        return registry_pb2.WatchServiceEvent(
            service_type=service_type, state=state, endpoint=self.endpoint(usable[0])
        )

    def _publish(self, service_type: str) -> None:
        self._usable_now.pop(service_type, None)
        self._changed.notify_all()
        if service_type not in self._watchers and ALL_TYPES not in self._watchers:
            # Nobody to tell: a watcher that comes gets the state then (and it is remembered).
            self._last_event.pop(service_type, None)
            return
        event = self._event(service_type)
        key = (event.state, event.endpoint.provider_id)
        if self._last_event.get(service_type) == key:
            return
        self._last_event[service_type] = key
        for events in self._watchers.get(service_type, ()):
            events.put(event)
        for events in self._watchers.get(ALL_TYPES, ()):
            events.put(event)
        self._forget_quiet(service_type)


class Roster(Protocol):
    """What the registry service tells the host about a calling plugin."""

    def heard_from(self, runtime_id: str) -> None:
        """A sign of life from a plugin that joined by itself (one that falls silent is dropped)."""
        ...


class BaseURLs(Protocol):
    """Fixes where a self-registered plugin listens, the first time it says so."""

    def reachable(self, identity: Identity, requested: str) -> str:
        """Where the router reaches ``identity``'s plugin, fixing it to ``requested`` (when it
        has no base URL yet) and checking it once; a different ``requested`` is refused."""
        ...


class Operators(Protocol):
    """Tells operators (people and tools observing the host) by their credential."""

    def token(self, authorization: str) -> object | None:
        """The operator token an ``Authorization`` value presents, None for any other."""
        ...

    def check(self, authorization: str) -> object:
        """As ``token``, raising ``unauthenticated`` for anything but an operator token."""
        ...


class RegistryService(ServiceRegistryHandler):
    """``connectplugin.v1.ServiceRegistry`` for plugins: every call is authenticated. Operators
    may also watch, every type at once included (``ALL_TYPES``)."""

    def __init__(
        self,
        registry: Registry,
        identities: Identities,
        roster: Roster,
        base_urls: BaseURLs,
        rate: RateLimiter,
        operators: Operators,
    ) -> None:
        """``rate``: registrations allowed per plugin, by runtime id."""
        self._operators = operators
        self._registry = registry
        self._identities = identities
        self._roster = roster
        self._base_urls = base_urls
        self._rate = rate

    def register_service(self, request: registry_pb2.RegisterServiceRequest, ctx: Context) -> registry_pb2.RegisterServiceResponse:
        identity = self._identities.caller(ctx)
        self._rate.check(identity.runtime_id)
        self._roster.heard_from(identity.runtime_id)
        # A self-registering plugin (model B) that did not say where it listens in its
        # handshake says it here, in metadata["base_url"] (as Go plugins do), once.
        base_url = self._base_urls.reachable(identity, request.metadata.get("base_url", ""))
        provider = self._registry.register(
            identity.runtime_id, request.service_type, request.version, request.endpoint_path, base_url, request.metadata
        )
        return registry_pb2.RegisterServiceResponse(registration_id=provider.registration_id)

    def unregister_service(self, request: registry_pb2.UnregisterServiceRequest, ctx: Context) -> registry_pb2.UnregisterServiceResponse:
        identity = self._identities.caller(ctx)
        self._registry.unregister(request.registration_id, identity.runtime_id)
        return registry_pb2.UnregisterServiceResponse()

    def discover_service(self, request: registry_pb2.DiscoverServiceRequest, ctx: Context) -> registry_pb2.DiscoverServiceResponse:
        self._identities.caller(ctx)
        provider, count = self._registry.discover(request.service_type, request.min_version)
        return registry_pb2.DiscoverServiceResponse(endpoint=self._registry.endpoint(provider), single_provider=count == 1)

    def watch_service(self, request: registry_pb2.WatchServiceRequest, ctx: Context) -> Iterator[registry_pb2.WatchServiceEvent]:
        authorization = str(ctx.request_headers.get("authorization", ""))
        if request.service_type == ALL_TYPES:
            self._operators.check(authorization)
        elif not ctx.request_headers.get(RUNTIME_ID_HEADER.lower()) and self._operators.token(authorization):
            pass  # an operator watching one type
        else:
            self._identities.caller(ctx)
        return self._registry.watch(request.service_type, ctx.is_active)
