"""The host platform end to end: registry, router, broker, auth, and the platform manager.

Every test runs a real :class:`PluginHost` on a real socket. Plugins are real too, in the
form the behaviour needs:

- subprocesses (``samples/platform/`` and ``tests/platform_plugins/provider.py``) where a
  process matters: a crash, a host restart, headers crossing HTTP, blue-green replacement;
- in-process launches (``InProcessStrategy``) for the platform manager's ordering logic;
- *peers*: plugins that join the host by hand (a ``PluginServer`` on waitress, a runtime
  identity from the host's handshake, host API calls with those credentials), so a test can
  register several providers of one type with chosen versions, weights and health.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

import connectplugin
from connectplugin import (
    Client,
    ClientConfig,
    Code,
    ConnectError,
    DependencyError,
    Health,
    HostConfig,
    HostLink,
    InProcessStrategy,
    Platform,
    PluginHost,
    PluginServer,
    PluginSpec,
    ProcessStrategy,
    RegistryConfig,
    Requirement,
    ServeConfig,
)
from connectplugin.gen.capability.logger.v1 import logger_pb2
from connectplugin.gen.capability.logger.v1.logger_connect import LoggerClient
from connectplugin.gen.connectplugin.v1 import (
    broker_pb2,
    lifecycle_pb2,
    plugininfo_pb2,
    registry_pb2,
)
from connectplugin.gen.connectplugin.v1.broker_connect import CapabilityBrokerClient
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.gen.connectplugin.v1.lifecycle_connect import PluginLifecycleClient
from connectplugin.gen.connectplugin.v1.plugininfo_connect import PluginIdentityClient
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.runtime import handshake as hs
from connectplugin.runtime.launcher import LaunchContext, Running
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from samples.platform import HANDSHAKE
from samples.platform.capabilities import HostLogger
from tests.platform_plugins.provider import PLUGINS, Recorder, declare

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}

HEALTHY = lifecycle_pb2.HEALTH_STATE_HEALTHY
DEGRADED = lifecycle_pb2.HEALTH_STATE_DEGRADED
UNHEALTHY = lifecycle_pb2.HEALTH_STATE_UNHEALTHY

STATE = registry_pb2.ServiceState.Name
AVAILABLE = "SERVICE_STATE_AVAILABLE"
UNAVAILABLE = "SERVICE_STATE_UNAVAILABLE"
SERVICE_DEGRADED = "SERVICE_STATE_DEGRADED"


# --- helpers --------------------------------------------------------------------------------


def module(name: str, *args: str) -> ProcessStrategy:
    """Launch ``python -m <name> <args>`` from the repository root."""
    return ProcessStrategy([sys.executable, "-m", name, *args], env=ENV, cwd=str(ROOT))


def provider_process(service_type: str, version: str = "1.0.0") -> ProcessStrategy:
    return module("tests.platform_plugins.provider", "--type", service_type, "--version", version)


def in_process(
    name: str, *provides: str, health: Health | None = None, link: HostLink | None = None
) -> InProcessStrategy:
    """A ``Recorder`` labelled ``name`` inside this process, declaring ``provides``."""
    config = ServeConfig(
        self_id=name, self_version="1.0.0", provides=[declare(t) for t in provides]
    )
    return InProcessStrategy({"kv": Recorder(name)}, config, health=health, link=link)


def wait_until(check: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll ``check()`` until it is truthy (and return it), failing the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def provider_ids(host: PluginHost, service_type: str) -> list[str]:
    return [p.provider_id for p in host.registry.providers(service_type)]


class Reader:
    """Reads a server stream on its own thread until it ends, or until ``limit`` messages or
    ``until(message)`` is true; then it hangs up itself."""

    def __init__(
        self,
        open_stream: Callable[[], Any],
        limit: int | None = None,
        until: Callable[[Any], bool] | None = None,
    ) -> None:
        self.messages: list[Any] = []
        self.error: ConnectError | None = None
        self.ended = threading.Event()
        self._open = open_stream
        self._limit = limit
        self._until = until
        self._thread = threading.Thread(target=self._read, name="test-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            stream = self._open()
            try:
                for message in stream:
                    self.messages.append(message)
                    if self._limit is not None and len(self.messages) >= self._limit:
                        break
                    if self._until is not None and self._until(message):
                        break
            finally:
                stream.close()
        except ConnectError as e:
            self.error = e
        finally:
            self.ended.set()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Any]:
        wait_until(
            lambda: len(self.messages) >= count or self.ended.is_set(), f"{count} messages", timeout
        )
        assert len(self.messages) >= count, f"stream ended after {self.messages} ({self.error})"
        return self.messages

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"

    @property
    def states(self) -> list[str]:
        return [STATE(e.state) for e in self.messages]


class Peer:
    """A plugin that joins the host by hand: its own server, a runtime identity, host API calls.

    Its server is a ``PluginServer`` (so the host can read its declarations with
    ``GetPluginInfo``) serving a ``Recorder`` labelled with the peer's name.
    """

    def __init__(
        self, host: PluginHost, name: str, version: str, server: PluginServer, base_url: str
    ) -> None:
        self.host_url = host.url
        self.name = name
        self.server = server
        self.base_url = base_url
        with Client(host.url, ClientConfig(timeout=5)) as client:
            request = hs.request_for(HANDSHAKE, (), self_id=name, self_version=version)
            response = HandshakeServiceClient(client).handshake(request)
        self.handshake = response
        self.runtime_id, self.token = response.runtime_id, response.runtime_token
        self._clients: list[Client] = []
        self.api = self.client(host.url)
        self.registry = ServiceRegistryClient(self.api)

    def credentials(self) -> dict[str, str]:
        return {"X-Plugin-Runtime-ID": self.runtime_id, "Authorization": f"Bearer {self.token}"}

    def client(
        self, url: str, timeout: float | None = 5.0, extra: dict[str, str] | None = None
    ) -> Client:
        client = Client(
            url, ClientConfig(timeout=timeout, headers={**self.credentials(), **(extra or {})})
        )
        self._clients.append(client)
        return client

    def register(self, service_type: str, version: str = "1.0.0", **metadata: str) -> str:
        request = registry_pb2.RegisterServiceRequest(
            service_type=service_type,
            version=version,
            endpoint_path=KV_PLUGIN.service_path,
            metadata={"base_url": self.base_url, **metadata},
        )
        return self.registry.register_service(request).registration_id

    def unregister(self, registration_id: str) -> None:
        self.registry.unregister_service(
            registry_pb2.UnregisterServiceRequest(registration_id=registration_id)
        )

    def report(self, state: lifecycle_pb2.HealthState) -> None:
        PluginLifecycleClient(self.api).report_health(
            lifecycle_pb2.ReportHealthRequest(state=state, reason="test")
        )

    def discover(self, service_type: str, min_version: str = "") -> registry_pb2.ServiceEndpoint:
        request = registry_pb2.DiscoverServiceRequest(
            service_type=service_type, min_version=min_version
        )
        return self.registry.discover_service(request).endpoint

    def kv(
        self, endpoint: registry_pb2.ServiceEndpoint, extra: dict[str, str] | None = None
    ) -> KVServiceClient:
        """A KV client for a discovered endpoint, called through the host's router."""
        return KVServiceClient(self.client(self.host_url + endpoint.endpoint_url, extra=extra))

    def watch(self, service_type: str, limit: int | None = None) -> Reader:
        streams = self.client(self.host_url, timeout=None)
        request = registry_pb2.WatchServiceRequest(service_type=service_type)
        return Reader(lambda: ServiceRegistryClient(streams).watch_service(request), limit)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.link.close()


@pytest.fixture
def make_host() -> Iterator[Callable[..., PluginHost]]:
    """``make_host(**HostConfig fields)``: a host on a real socket, closed after the test."""
    hosts: list[PluginHost] = []

    def make(**fields: Any) -> PluginHost:
        fields.setdefault("handle_signals", False)
        fields.setdefault("stop_grace", 1.0)
        fields.setdefault("threads", 8)
        fields.setdefault("registry", RegistryConfig(max_watchers=8))
        host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(**fields))
        hosts.append(host)
        return host

    yield make
    for host in reversed(hosts):
        host.close()


@pytest.fixture
def host(make_host) -> PluginHost:
    return make_host()


@pytest.fixture
def peer(serve, make_host) -> Iterator[Callable[..., Peer]]:
    """``peer(host, name, provides=(), version)``: a plugin joined by hand (see :class:`Peer`)."""
    peers: list[Peer] = []

    def make(
        host: PluginHost, name: str, provides: tuple[str, ...] = (), version: str = "1.0.0"
    ) -> Peer:
        config = ServeConfig(
            self_id=name, self_version=version, provides=[declare(t, version) for t in provides]
        )
        server = PluginServer(PLUGINS, {"kv": Recorder(name)}, HANDSHAKE, config)
        try:
            http = serve(server.app, threads=4)
            made = Peer(host, name, version, server, http.url)
        except BaseException:
            server.link.close()
            raise
        peers.append(made)
        return made

    yield make
    for p in peers:
        p.close()


@pytest.fixture
def sidecar(tmp_path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``sidecar(module, *args)``: a plugin process started by the test itself (not by a host)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}-{len(procs)}.log", "wb")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", name, *args],
                cwd=ROOT,
                env={**os.environ, **ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the two plugin models ------------------------------------------------------------------


def test_launched_plugin_registers_its_services_once_given_a_runtime_identity(host):
    client = host.launch(module("samples.platform.logger"), name="logger")

    runtime_id = host.runtime_id(client)
    [provider] = host.registry.providers("logger")
    assert runtime_id.startswith("logger-")
    assert (provider.provider_id, provider.base_url, provider.version) == (
        runtime_id,
        client.url,
        "1.0.0",
    )
    report = wait_until(lambda: host.reported_health(runtime_id), "the logger's health report")
    assert report.state == HEALTHY


def test_self_registering_plugin_handshakes_registers_and_reports_health(host, sidecar, peer):
    sidecar("samples.platform.storage", "--host-url", host.url)

    [runtime_id] = wait_until(
        lambda: provider_ids(host, "storage"), "storage to register", timeout=10
    )
    identity = host.identities.get(runtime_id)
    assert identity is not None and (identity.self_id, identity.self_version) == (
        "storage",
        "1.0.0",
    )
    report = wait_until(lambda: host.reported_health(runtime_id), "storage's health report")
    assert report.state == HEALTHY
    # The host learnt where it listens from the registration, and routes to it there.
    caller = peer(host, "caller")
    storage = caller.kv(caller.discover("storage"))
    storage.put(kv_pb2.PutRequest(key="k", value=b"v"))
    assert storage.get(kv_pb2.GetRequest(key="k")).value == b"v"


def test_self_registering_plugin_rejoins_a_restarted_host_by_itself(make_host, sidecar):
    port = free_port()
    first = make_host(port=port)
    sidecar("samples.platform.storage", "--host-url", first.url)
    [first_id] = wait_until(
        lambda: provider_ids(first, "storage"), "storage to join the first host", timeout=10
    )

    first.close()
    second = make_host(port=port)

    [runtime_id] = wait_until(
        lambda: provider_ids(second, "storage"), "storage to rejoin the new host", timeout=6
    )
    # A new identity from the new host's handshake, not the old one carried over.
    assert runtime_id != first_id and second.identities.get(runtime_id) is not None


def test_self_registered_plugin_that_goes_silent_is_dropped_and_watchers_are_told(make_host, sidecar, peer):
    host = make_host(heartbeat_timeout=1.0)
    proc = sidecar("samples.platform.storage", "--host-url", host.url)
    [runtime_id] = wait_until(lambda: provider_ids(host, "storage"), "storage to register", timeout=10)
    events = peer(host, "watcher").watch("storage", limit=2)
    events.wait_for(1)

    proc.kill()  # no unregister, no more heartbeats: only silence tells the host

    first, second = events.wait_for(2, timeout=5)
    assert (first.state, second.state) == (
        registry_pb2.SERVICE_STATE_AVAILABLE,
        registry_pb2.SERVICE_STATE_UNAVAILABLE,
    )
    assert provider_ids(host, "storage") == []
    assert host.identities.get(runtime_id) is None


def test_a_quiet_identity_that_provides_nothing_is_not_reaped(make_host):
    host = make_host(heartbeat_timeout=0.3)
    link = HostLink()
    link.attach(connectplugin.Health(), (), host.url)
    link.connect(HANDSHAKE, "caller", "1.0.0", base_url="")
    wait_until(lambda: host.reported_health(link.runtime_id), "the caller's one health report")

    time.sleep(1.0)  # several heartbeat timeouts without a word

    assert host.identities.get(link.runtime_id) is not None
    link.close()


# --- selection ------------------------------------------------------------------------------


def _providers(
    host, peer, count: int, service_type: str = "svc", **metadata_by_name: dict[str, str]
) -> list[Peer]:
    made = []
    for i in range(count):
        p = peer(host, f"p{i}", provides=(service_type,))
        p.register(service_type, **metadata_by_name.get(f"p{i}", {}))
        made.append(p)
    return made


def test_first_strategy_always_picks_the_earliest_usable_provider(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="first"))
    p0, _, _ = _providers(host, peer, 3)
    caller = peer(host, "caller")

    assert {caller.discover("svc").provider_id for _ in range(6)} == {p0.runtime_id}


def test_round_robin_strategy_cycles_through_every_provider_in_turn(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="round_robin"))
    providers = _providers(host, peer, 3)
    caller = peer(host, "caller")

    picks = [caller.discover("svc").provider_id for _ in range(9)]
    assert sorted(picks[:3]) == sorted(p.runtime_id for p in providers)
    assert picks == picks[:3] * 3


def test_random_strategy_spreads_picks_over_every_provider(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="random"))
    providers = _providers(host, peer, 3)
    caller = peer(host, "caller")

    picks = [caller.discover("svc").provider_id for _ in range(150)]
    # Expected 50 each; fewer than 15 has a probability around 1e-9.
    counts = {p.name: picks.count(p.runtime_id) for p in providers}
    assert min(counts.values()) >= 15, counts


def test_weighted_strategy_follows_the_weight_metadata(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="weighted"))
    zero, light, heavy = _providers(
        host, peer, 3, p0={"weight": "0"}, p1={"weight": "1"}, p2={"weight": "9"}
    )
    caller = peer(host, "caller")

    picks = [caller.discover("svc").provider_id for _ in range(300)]
    assert picks.count(zero.runtime_id) == 0
    # Expected 30 light and 270 heavy; light reaching 60 is more than five deviations away.
    assert 0 < picks.count(light.runtime_id) < 60
    assert picks.count(heavy.runtime_id) > 240


def test_discovered_endpoint_routes_to_the_picked_provider(host, peer):
    p0, p1 = _providers(host, peer, 2)
    p0.report(UNHEALTHY)
    caller = peer(host, "caller")

    endpoint = caller.discover("svc")
    assert endpoint.provider_id == p1.runtime_id
    assert caller.kv(endpoint).get(kv_pb2.GetRequest(key="whoami")).value == b"p1"


@pytest.mark.parametrize(
    "versions, min_version, picked",
    [
        pytest.param(["1.9.0", "1.10.0"], "1.10.0", "1.10.0", id="numeric-not-lexical"),
        pytest.param(["1.9.0", "1.10.0"], "1.9.5", "1.10.0", id="between"),
        pytest.param(["1.0.0-rc.1", "1.0.0"], "1.0.0", "1.0.0", id="pre-release-below-release"),
        pytest.param(
            ["1.0.0-rc.2", "1.0.0-rc.10"], "1.0.0-rc.3", "1.0.0-rc.10", id="numeric-pre-release-ids"
        ),
        pytest.param(
            ["1.0.0-alpha", "1.0.0-alpha.1"],
            "1.0.0-alpha.0",
            "1.0.0-alpha.1",
            id="longer-pre-release-higher",
        ),
        pytest.param(
            ["1.0.0-alpha.beta", "1.0.0-beta"],
            "1.0.0-alpha.gamma",
            "1.0.0-beta",
            id="text-pre-release-ids",
        ),
        pytest.param(["0.9.0", "v2.0.0"], "2", "v2.0.0", id="v-prefix-and-short-floor"),
        pytest.param(["1.2.3+build.5"], "1.2.3", "1.2.3+build.5", id="build-metadata-ignored"),
        pytest.param(
            ["1.2.2", "1.2.3+build-7"],
            "1.2.3",
            "1.2.3+build-7",
            id="build-metadata-with-hyphen-ignored",
        ),
    ],
)
def test_min_version_admits_only_providers_at_or_above_it_by_semver(
    host, peer, versions, min_version, picked
):
    for i, version in enumerate(versions):
        peer(host, f"p{i}", provides=("svc",)).register("svc", version)
    caller = peer(host, "caller")

    endpoint = caller.discover("svc", min_version)
    assert endpoint.version == picked


@pytest.mark.parametrize(
    "versions, min_version",
    [(["1.9.0"], "1.10.0"), (["2.0.0-rc.1"], "2.0.0"), (["1.0.0-rc.10"], "1.0.0-rc.11")],
    ids=["older-minor", "pre-release-of-floor", "older-pre-release"],
)
def test_min_version_above_every_provider_is_unavailable(host, peer, versions, min_version):
    for i, version in enumerate(versions):
        peer(host, f"p{i}", provides=("svc",)).register("svc", version)
    caller = peer(host, "caller")

    with pytest.raises(ConnectError) as e:
        caller.discover("svc", min_version)
    assert e.value.code is Code.UNAVAILABLE


def test_healthy_providers_are_picked_before_degraded_ones(host, peer):
    p0, p1 = _providers(host, peer, 2)
    p0.report(DEGRADED)
    caller = peer(host, "caller")

    assert {caller.discover("svc").provider_id for _ in range(5)} == {p1.runtime_id}


def test_degraded_provider_is_picked_when_no_healthy_one_remains(host, peer):
    p0, p1 = _providers(host, peer, 2)
    p0.report(DEGRADED)
    p1.report(UNHEALTHY)
    caller = peer(host, "caller")

    assert caller.discover("svc").provider_id == p0.runtime_id


def test_unhealthy_provider_is_never_picked(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="round_robin"))
    p0, p1, p2 = _providers(host, peer, 3)
    p1.report(UNHEALTHY)
    caller = peer(host, "caller")

    picks = {caller.discover("svc").provider_id for _ in range(12)}
    assert picks == {p0.runtime_id, p2.runtime_id}


def test_discovering_a_type_nobody_ever_provided_is_not_found(host, peer):
    _providers(host, peer, 1)
    caller = peer(host, "caller")

    with pytest.raises(ConnectError) as e:
        caller.discover("nobody-provides-this")
    assert e.value.code is Code.NOT_FOUND


@pytest.mark.parametrize("why", ["unregistered", "unhealthy", "too old"])
def test_discovering_a_known_type_with_no_usable_provider_is_unavailable(host, peer, why):
    p0 = peer(host, "p0", provides=("svc",))
    registration = p0.register("svc", "1.0.0")
    if why == "unregistered":
        p0.unregister(registration)
    elif why == "unhealthy":
        p0.report(UNHEALTHY)
    caller = peer(host, "caller")

    with pytest.raises(ConnectError) as e:
        caller.discover("svc", "2.0.0" if why == "too old" else "")
    assert e.value.code is Code.UNAVAILABLE


# --- watching -------------------------------------------------------------------------------


def test_watcher_gets_the_current_state_first(host, peer):
    p0 = peer(host, "p0", provides=("svc",))
    p0.register("svc")
    p0.report(DEGRADED)
    watcher = peer(host, "watcher").watch("svc", limit=1)

    [first] = watcher.wait_for(1)
    assert (STATE(first.state), first.endpoint.provider_id) == (SERVICE_DEGRADED, p0.runtime_id)
    assert first.endpoint.endpoint_url == f"/services/svc/{p0.runtime_id}"
    watcher.join()


def test_watchers_see_providers_come_change_health_and_go_in_order(host, peer):
    caller = peer(host, "watcher")
    watchers = [caller.watch("svc") for _ in range(3)]
    for w in watchers:
        w.wait_for(1)  # the current state: nobody provides svc yet

    p0 = peer(host, "p0", provides=("svc",))
    registration = p0.register("svc")
    p0.report(DEGRADED)
    p0.report(HEALTHY)
    p0.report(UNHEALTHY)
    p0.report(HEALTHY)
    p0.unregister(registration)
    for w in watchers:
        w.wait_for(7)
    host.registry.close_watchers()
    for w in watchers:
        w.join()

    expected = [
        UNAVAILABLE,
        AVAILABLE,
        SERVICE_DEGRADED,
        AVAILABLE,
        UNAVAILABLE,
        AVAILABLE,
        UNAVAILABLE,
    ]
    assert [w.states for w in watchers] == [expected] * 3
    assert {
        e.endpoint.provider_id for e in watchers[0].messages if STATE(e.state) != UNAVAILABLE
    } == {p0.runtime_id}


def test_launched_plugins_own_health_changes_reach_watchers(host, peer):
    health = Health()
    client = host.launch(in_process("p", "svc", health=health), name="p")
    runtime_id = host.runtime_id(client)
    watcher = peer(host, "watcher").watch("svc")
    watcher.wait_for(1)

    health.set(DEGRADED, reason="slow disk")
    watcher.wait_for(2)
    assert host.reported_health(runtime_id).reason == "slow disk"
    health.set(HEALTHY)
    watcher.wait_for(3)
    host.stop(client, grace=0)
    watcher.wait_for(4)

    assert watcher.states == [AVAILABLE, SERVICE_DEGRADED, AVAILABLE, UNAVAILABLE]


def test_watchers_beyond_the_cap_are_resource_exhausted_while_unary_calls_keep_working(
    make_host, peer
):
    host = make_host(threads=2, registry=RegistryConfig(max_watchers=2))
    _providers(host, peer, 1)
    caller = peer(host, "caller")
    open_watchers = [caller.watch("svc") for _ in range(2)]
    for w in open_watchers:
        w.wait_for(1)

    refused = caller.watch("svc")
    refused.join()

    assert refused.error is not None and refused.error.code is Code.RESOURCE_EXHAUSTED
    for _ in range(10):
        assert caller.discover("svc").provider_id
    assert all(not w.ended.is_set() for w in open_watchers)


def test_a_watcher_that_leaves_frees_its_slot(make_host, peer):
    host = make_host(registry=RegistryConfig(max_watchers=1))
    _providers(host, peer, 1)
    caller = peer(host, "caller")
    caller.watch("svc", limit=1).join()  # reads the current state, then hangs up

    def admitted() -> bool:
        attempt = caller.watch("svc", limit=1)
        attempt.join()
        return attempt.error is None

    wait_until(admitted, "the freed slot to admit a new watcher")


def test_hostlink_watch_outlives_the_host_clients_call_timeout(host):
    link = HostLink()
    link.attach(Health(), (), host.url)
    try:
        link.connect(HANDSHAKE, "watcher", "1.0.0", base_url="")
        watcher = Reader(lambda: link.watch("svc"))
        watcher.wait_for(1)
        time.sleep(10.5)
        assert not watcher.ended.is_set(), f"the watch ended: {watcher.error}"
    finally:
        host.registry.close_watchers()
        link.close()


# --- authentication -------------------------------------------------------------------------


@dataclass
class World:
    """A host offering the ``logger`` capability; ``a`` provides ``svc``, ``b`` only calls."""

    host: PluginHost
    a: Peer
    b: Peer
    registration: str
    logger: HostLogger


@pytest.fixture
def world(make_host, peer) -> World:
    host = make_host()
    logger = HostLogger()
    host.broker.add("logger", "1.0.0", logger)
    a = peer(host, "a", provides=("svc",))
    b = peer(host, "b")
    return World(host, a, b, a.register("svc"), logger)


CREDENTIALS: dict[str, Callable[[World], dict[str, str]]] = {
    "nothing": lambda w: {},
    "missing token": lambda w: {"X-Plugin-Runtime-ID": w.a.runtime_id},
    "missing runtime id": lambda w: {"Authorization": f"Bearer {w.a.token}"},
    "wrong token": lambda w: {
        "X-Plugin-Runtime-ID": w.a.runtime_id,
        "Authorization": "Bearer not-the-token",
    },
    "another plugin's token": lambda w: {
        "X-Plugin-Runtime-ID": w.a.runtime_id,
        "Authorization": f"Bearer {w.b.token}",
    },
    "unknown runtime id": lambda w: {
        "X-Plugin-Runtime-ID": "nobody-00000000",
        "Authorization": f"Bearer {w.a.token}",
    },
    "not a bearer token": lambda w: {
        "X-Plugin-Runtime-ID": w.a.runtime_id,
        "Authorization": f"Basic {w.a.token}",
    },
}


def _register(w: World, client: Client) -> None:
    ServiceRegistryClient(client).register_service(
        registry_pb2.RegisterServiceRequest(
            service_type="svc",
            version="1.0.0",
            endpoint_path=KV_PLUGIN.service_path,
            metadata={"base_url": w.a.base_url},
        )
    )


def _unregister(w: World, client: Client) -> None:
    ServiceRegistryClient(client).unregister_service(
        registry_pb2.UnregisterServiceRequest(registration_id=w.registration)
    )


def _discover(w: World, client: Client) -> None:
    ServiceRegistryClient(client).discover_service(
        registry_pb2.DiscoverServiceRequest(service_type="svc")
    )


def _watch(w: World, client: Client) -> None:
    with ServiceRegistryClient(client).watch_service(
        registry_pb2.WatchServiceRequest(service_type="svc"), timeout=5
    ) as s:
        next(iter(s))


def _report_health(w: World, client: Client) -> None:
    PluginLifecycleClient(client).report_health(lifecycle_pb2.ReportHealthRequest(state=UNHEALTHY))


def _request_capability(w: World, client: Client) -> None:
    CapabilityBrokerClient(client).request_capability(
        broker_pb2.RequestCapabilityRequest(capability_type="logger")
    )


def _routed_call(w: World, client: Client) -> None:
    with Client(f"{client.base_url}/services/svc/{w.a.runtime_id}", client.config) as routed:
        KVServiceClient(routed).get(kv_pb2.GetRequest(key="whoami"))


HOST_APIS = {
    "RegisterService": _register,
    "UnregisterService": _unregister,
    "DiscoverService": _discover,
    "WatchService": _watch,
    "ReportHealth": _report_health,
    "RequestCapability": _request_capability,
    "router": _routed_call,
}


@pytest.mark.parametrize("api", HOST_APIS)
@pytest.mark.parametrize("credentials", CREDENTIALS)
def test_host_api_refuses_bad_credentials_as_unauthenticated(world, api, credentials):
    with Client(
        world.host.url, ClientConfig(timeout=5, headers=CREDENTIALS[credentials](world))
    ) as client:
        with pytest.raises(ConnectError) as e:
            HOST_APIS[api](world, client)
    assert e.value.code is Code.UNAUTHENTICATED
    # Nothing happened on a's behalf.
    [provider] = world.host.registry.providers("svc")
    assert (provider.registration_id, provider.health) == (world.registration, HEALTHY)


@pytest.mark.parametrize("api", HOST_APIS)
def test_host_api_accepts_the_plugins_own_credentials(world, api):
    with Client(world.host.url, ClientConfig(timeout=5, headers=world.a.credentials())) as client:
        HOST_APIS[api](world, client)


def test_registering_an_undeclared_service_is_permission_denied(world):
    # a declared (in its plugin info) that it provides svc, and nothing else.
    with pytest.raises(ConnectError) as e:
        world.a.register("other")
    assert e.value.code is Code.PERMISSION_DENIED
    assert world.host.registry.providers("other") == []


def test_launched_plugin_registering_an_undeclared_service_is_permission_denied(host):
    link = HostLink()
    host.launch(in_process("p", "svc", link=link), name="p")

    with Client(host.url, ClientConfig(timeout=5, headers=link.headers())) as client:
        with pytest.raises(ConnectError) as e:
            ServiceRegistryClient(client).register_service(
                registry_pb2.RegisterServiceRequest(
                    service_type="other", version="1.0.0", endpoint_path="/x/"
                )
            )
    assert e.value.code is Code.PERMISSION_DENIED
    assert host.registry.providers("other") == []


# --- capabilities ---------------------------------------------------------------------------


def _grant(peer_: Peer, capability_type: str = "logger") -> broker_pb2.CapabilityGrant:
    request = broker_pb2.RequestCapabilityRequest(capability_type=capability_type, reason="test")
    return CapabilityBrokerClient(peer_.api).request_capability(request).grant


def _log_with(grant: broker_pb2.CapabilityGrant, token: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {grant.bearer_token if token is None else token}"}
    with Client(grant.endpoint_url, ClientConfig(timeout=5, headers=headers)) as client:
        LoggerClient(client).log(logger_pb2.LogRequest(level="info", message="hello"))


def test_handshake_response_advertises_the_hosts_capabilities(world):
    [capability] = world.a.handshake.host_capabilities
    assert (capability.type, capability.version) == ("logger", "1.0.0")
    assert capability.endpoint == f"{world.host.url}/capabilities/logger"


def test_capability_grant_opens_its_capability(world):
    grant = _grant(world.a)

    _log_with(grant)

    assert [e.message for e in world.logger.entries] == ["hello"]
    assert grant.endpoint_url == f"{world.host.url}/capabilities/logger/{grant.grant_id}"


def test_expired_grant_is_unauthenticated(make_host, peer):
    host = make_host(grant_ttl=0.2)
    host.broker.add("logger", "1.0.0", HostLogger())
    grant = _grant(peer(host, "a"))
    _log_with(grant)  # good while it lasts

    time.sleep(0.3)
    with pytest.raises(ConnectError) as e:
        _log_with(grant)
    assert e.value.code is Code.UNAUTHENTICATED


def test_revoked_grant_is_unauthenticated(world):
    grant = _grant(world.a)
    _log_with(grant)

    world.host.broker.revoke(grant.grant_id)
    with pytest.raises(ConnectError) as e:
        _log_with(grant)
    assert e.value.code is Code.UNAUTHENTICATED


@pytest.mark.parametrize("token", ["", "not-the-token", "another grant's"])
def test_capability_endpoint_refuses_a_token_that_is_not_the_grants(world, token):
    grant = _grant(world.a)
    if token == "another grant's":
        token = _grant(world.b).bearer_token

    with pytest.raises(ConnectError) as e:
        _log_with(grant, token)
    assert e.value.code is Code.UNAUTHENTICATED
    assert world.logger.entries == []


def test_stopping_a_plugin_revokes_its_grants(host):
    host.broker.add("logger", "1.0.0", HostLogger())
    link = HostLink()
    client = host.launch(in_process("p", "svc", link=link), name="p")
    logger = link.capability("logger", LoggerClient)
    logger.log(logger_pb2.LogRequest(message="before"))

    host.stop(client, grace=0)
    with pytest.raises(ConnectError) as e:
        logger.log(logger_pb2.LogRequest(message="after"))
    assert e.value.code is Code.UNAUTHENTICATED


# --- the router -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["subprocess", "in-process"])
def test_provider_sees_the_caller_id_but_never_the_callers_credentials(host, peer, where):
    strategy = provider_process("svc") if where == "subprocess" else in_process("p", "svc")
    host.launch(strategy, name="p")
    caller = peer(host, "caller")

    reply = caller.kv(caller.discover("svc")).get(kv_pb2.GetRequest(key="headers"))

    seen = json.loads(reply.value)
    assert seen["x-plugin-caller-id"] == caller.runtime_id
    assert "authorization" not in seen
    assert "x-plugin-runtime-id" not in seen


@pytest.mark.parametrize("where", ["subprocess", "in-process"])
def test_caller_cannot_forge_its_caller_id(host, peer, where):
    strategy = provider_process("svc") if where == "subprocess" else in_process("p", "svc")
    host.launch(strategy, name="p")
    caller = peer(host, "caller")

    kv = caller.kv(caller.discover("svc"), extra={"X-Plugin-Caller-ID": "someone-else"})
    seen = json.loads(kv.get(kv_pb2.GetRequest(key="headers")).value)

    assert seen["x-plugin-caller-id"] == caller.runtime_id


def test_router_does_not_reach_the_providers_control_services(host, peer):
    client = host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")
    shutdown = connectplugin.Method(
        "connectplugin.v1.PluginControl", "Shutdown", lifecycle_pb2.ShutdownRequest, lifecycle_pb2.ShutdownResponse
    )
    routed = connectplugin.Client(
        host.url + endpoint.endpoint_url, ClientConfig(timeout=5, headers=caller.credentials())
    )
    try:
        with pytest.raises(ConnectError) as e:
            routed.call_unary(shutdown, lifecycle_pb2.ShutdownRequest())
    finally:
        routed.close()

    assert e.value.code is Code.NOT_FOUND
    assert client.running.alive()


def test_a_malformed_routed_path_does_not_make_the_provider_unhealthy(host, peer):
    host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")

    reply = requests.post(
        host.url + endpoint.endpoint_url + "/Get%20x",
        data=b"",
        headers={**caller.credentials(), "Content-Type": "application/proto"},
        timeout=5,
    )

    assert reply.status_code == 404  # the provider has no such procedure
    assert caller.discover("svc").provider_id == endpoint.provider_id


def test_routed_stream_errors_are_end_stream_messages_in_a_200(host, peer):
    caller = peer(host, "caller")
    body = b"\x00\x00\x00\x00\x00"
    reply = requests.post(
        host.url + "/services/svc/nobody/kv.v1.KVService/Watch",
        data=body,
        headers={**caller.credentials(), "Content-Type": "application/connect+proto"},
        timeout=5,
    )

    assert reply.status_code == 200
    assert reply.content[0] == 0x02 and b'"not_found"' in reply.content


def test_a_plugin_refuses_a_second_runtime_identity_without_its_current_token(host):
    client = host.launch(provider_process("svc"), name="p")
    identity = PluginIdentityClient(client.rpc)
    request = plugininfo_pb2.SetRuntimeIdentityRequest(
        runtime_id="intruder", runtime_token="t" * 32, host_url="http://127.0.0.1:9"
    )

    with pytest.raises(ConnectError) as e:
        identity.set_runtime_identity(request, timeout=5)

    assert e.value.code is Code.PERMISSION_DENIED
    assert provider_ids(host, "svc") == [host.runtime_id(client)]


def test_a_grant_stops_working_once_its_holders_identity_is_revoked(host):
    host.broker.add("logger", "1.0.0", HostLogger())
    link = HostLink()
    host.launch(in_process("p", "svc", link=link), name="p")
    logger = link.capability("logger", LoggerClient)
    logger.log(logger_pb2.LogRequest(message="before"))

    host.identities.revoke(link.runtime_id)

    with pytest.raises(ConnectError) as e:
        logger.log(logger_pb2.LogRequest(message="after"))
    assert e.value.code is Code.UNAUTHENTICATED


def test_unary_calls_pass_through_the_router_both_ways(host, peer):
    host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("svc"))

    kv.put(kv_pb2.PutRequest(key="k", value=b"\x00value"))
    assert kv.get(kv_pb2.GetRequest(key="k")) == kv_pb2.GetResponse(value=b"\x00value", found=True)
    with pytest.raises(ConnectError) as e:
        kv.get(kv_pb2.GetRequest(key=""))  # the provider's own error comes back as it is
    assert e.value.code is Code.INVALID_ARGUMENT


def test_routed_stream_delivers_each_message_before_the_stream_ends(host, peer):
    host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")
    kv = caller.kv(endpoint)
    streamer = KVServiceClient(caller.client(caller.host_url + endpoint.endpoint_url, timeout=None))
    watch = Reader(
        lambda: streamer.watch(kv_pb2.WatchRequest(prefix="")), until=lambda e: e.key == "second"
    )

    def first_event_arrived() -> bool:
        # The provider's watch starts listening when its handler runs: put until it hears.
        kv.put(kv_pb2.PutRequest(key="first", value=b"1"))
        return bool(watch.messages)

    wait_until(first_event_arrived, "the first event")
    assert not watch.ended.is_set()  # the stream is still open: the event was not held back
    kv.put(kv_pb2.PutRequest(key="second", value=b"2"))
    watch.join()

    assert watch.error is None
    assert {e.key for e in watch.messages} == {"first", "second"}


def test_provider_crash_during_a_routed_call_is_unavailable_and_withdraws_it(host, peer):
    client = host.launch(provider_process("svc"), name="p")
    runtime_id = host.runtime_id(client)
    caller = peer(host, "caller")
    watcher = caller.watch("svc")
    watcher.wait_for(1)
    kv = caller.kv(caller.discover("svc"))

    with pytest.raises(ConnectError) as e:
        kv.get(kv_pb2.GetRequest(key="crash"))

    assert e.value.code is Code.UNAVAILABLE
    with pytest.raises(ConnectError) as gone:
        caller.discover("svc")
    assert gone.value.code is Code.UNAVAILABLE
    wait_until(lambda: not provider_ids(host, "svc"), "the crashed provider to be removed")
    wait_until(lambda: client.exit_code == 3, "the exit status")
    watcher.wait_for(2)
    assert [(STATE(e.state), e.endpoint.provider_id) for e in watcher.messages] == [
        (AVAILABLE, runtime_id),
        (UNAVAILABLE, ""),
    ]


def test_provider_crash_mid_stream_ends_the_routed_stream_as_unavailable(host, peer):
    client = host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")
    kv = caller.kv(endpoint)
    streamer = KVServiceClient(caller.client(caller.host_url + endpoint.endpoint_url, timeout=None))
    watch = Reader(lambda: streamer.watch(kv_pb2.WatchRequest(prefix="")))

    def first_event_arrived() -> bool:
        kv.put(kv_pb2.PutRequest(key="k", value=b"v"))
        return bool(watch.messages)

    wait_until(first_event_arrived, "the first event")
    os.kill(client.running.pid, signal.SIGKILL)
    watch.join()

    assert watch.error is not None and watch.error.code is Code.UNAVAILABLE


def test_routing_to_a_provider_the_host_does_not_know_is_not_found(world):
    with Client(
        f"{world.host.url}/services/svc/nobody-00000000",
        ClientConfig(timeout=5, headers=world.b.credentials()),
    ) as c:
        with pytest.raises(ConnectError) as e:
            KVServiceClient(c).get(kv_pb2.GetRequest(key="whoami"))
    assert e.value.code is Code.NOT_FOUND


def test_routing_to_an_unhealthy_provider_is_unavailable(world):
    world.a.report(UNHEALTHY)
    with Client(
        f"{world.host.url}/services/svc/{world.a.runtime_id}",
        ClientConfig(timeout=5, headers=world.b.credentials()),
    ) as c:
        with pytest.raises(ConnectError) as e:
            KVServiceClient(c).get(kv_pb2.GetRequest(key="whoami"))
    assert e.value.code is Code.UNAVAILABLE


# --- the platform manager -------------------------------------------------------------------


@dataclass
class Recording:
    """A strategy that notes the name of each plugin it starts."""

    inner: Any
    started: list[str]

    def start(self, ctx: LaunchContext) -> Running:
        self.started.append(ctx.name)
        return self.inner.start(ctx)


def _spec(
    started: list[str],
    name: str,
    provides: tuple[str, ...] = (),
    requires: tuple[Requirement, ...] = (),
) -> PluginSpec:
    return PluginSpec(name, Recording(in_process(name, *provides), started), provides, requires)


def test_platform_starts_providers_before_dependents_whatever_the_order_given(host):
    platform, started = Platform(host), []

    order = platform.add(
        _spec(started, "app", requires=(Requirement("cache"),)),
        _spec(started, "cache", ("cache",), requires=(Requirement("store"),)),
        _spec(started, "store", ("store",)),
    )

    assert order == started == ["store", "cache", "app"]
    assert sorted(platform.names()) == ["app", "cache", "store"]


def test_platform_refuses_a_dependency_cycle_naming_it(host):
    platform, started = Platform(host), []

    with pytest.raises(DependencyError) as e:
        platform.add(
            _spec(started, "solo", ("solo",)),
            _spec(started, "a", ("x",), requires=(Requirement("y"),)),
            _spec(started, "b", ("y",), requires=(Requirement("x"),)),
        )

    message = str(e.value)
    assert "cycle" in message
    assert "a -> b -> a" in message or "b -> a -> b" in message, message
    assert "solo" not in message
    assert started == [] and platform.names() == [] and host.registry.providers() == []


def test_platform_refuses_a_missing_startup_dependency_naming_it(host):
    platform, started = Platform(host), []

    with pytest.raises(DependencyError) as e:
        platform.add(_spec(started, "app", requires=(Requirement("database", "2.0.0"),)))

    assert "app" in str(e.value) and "database" in str(e.value)
    assert started == [] and platform.names() == []


def test_platform_refuses_a_batch_with_a_missing_startup_dependency_before_starting_any(host):
    platform, started = Platform(host), []

    with pytest.raises(DependencyError, match="database"):
        platform.add(
            _spec(started, "store", ("store",)),
            _spec(started, "app", requires=(Requirement("store"), Requirement("database"))),
        )

    assert started == [] and platform.names() == [] and host.registry.providers() == []


def test_optional_dependency_missing_does_not_block_start(host):
    platform, started = Platform(host), []

    platform.add(
        _spec(started, "app", requires=(Requirement("metrics", required_for_startup=False),))
    )

    assert started == ["app"]


def test_impact_lists_everything_that_would_lose_a_required_service_transitively(host):
    platform, started = Platform(host), []
    platform.add(
        _spec(started, "logger", ("logger",)),
        _spec(started, "cache", ("cache",), requires=(Requirement("logger"),)),
        _spec(started, "app", requires=(Requirement("cache"),)),
        _spec(started, "other"),
    )

    assert platform.impact("logger") == ["cache", "app"]
    assert platform.impact("cache") == ["app"]
    assert platform.impact("app") == []


def test_impact_is_empty_while_another_plugin_provides_the_service(host):
    platform, started = Platform(host), []
    platform.add(
        _spec(started, "logger", ("logger",)),
        _spec(started, "logger-2", ("logger",)),
        _spec(started, "cache", ("cache",), requires=(Requirement("logger"),)),
    )

    assert platform.impact("logger") == []


def test_remove_stops_the_plugin_withdraws_its_services_and_reports_the_impact(host):
    platform, started = Platform(host), []
    platform.add(
        _spec(started, "logger", ("logger",)),
        _spec(started, "cache", ("cache",), requires=(Requirement("logger"),)),
    )
    logger = platform.client("logger")

    affected = platform.remove("logger")

    assert affected == ["cache"]
    assert platform.names() == ["cache"]
    assert host.registry.providers("logger") == []
    assert not logger.running.alive()
    assert len(host.registry.providers("cache")) == 1  # dependents keep running


def test_platform_starts_the_sample_cache_after_its_logger_and_cache_logs_through_the_router(
    host, peer, caplog
):
    caplog.set_level(logging.INFO, logger="connectplugin.plugin.logger")
    platform = Platform(host)

    order = platform.add(
        PluginSpec(
            "cache", module("samples.platform.cache"), ["cache"], [Requirement("logger", "1.0.0")]
        ),
        PluginSpec("logger", module("samples.platform.logger"), ["logger"]),
    )
    caller = peer(host, "caller")
    caller.kv(caller.discover("cache")).put(kv_pb2.PutRequest(key="greeting", value=b"hi"))

    assert order == ["logger", "cache"]
    cache_id = host.runtime_id(platform.client("cache"))
    wait_until(
        lambda: any(
            f"[{cache_id}] cache put key=greeting" in r.getMessage() for r in caplog.records
        ),
        "the logger plugin to log the cache's write, tagged with the cache's runtime id",
    )


def test_blue_green_replace_under_load_fails_no_call(host, peer):
    platform = Platform(host)
    platform.add(PluginSpec("store", provider_process("store"), ["store"]))
    old = platform.client("store")
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("store"))  # addressed to the old instance
    answers: list[bytes] = []
    failures: list[ConnectError] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answers.append(kv.get(kv_pb2.GetRequest(key="whoami")).value)
            except ConnectError as e:
                failures.append(e)

    loaders = [threading.Thread(target=load) for _ in range(4)]
    for t in loaders:
        t.start()
    try:
        wait_until(lambda: len(answers) > 20, "calls to the old instance")
        before = len(answers)
        new = platform.replace("store", provider_process("store"))
        replaced_at = len(answers)
        assert replaced_at > before, "no call ran while the replacement was under way"
        wait_until(lambda: len(answers) > replaced_at + 40, "calls after the replacement")
    finally:
        stop.set()
        for t in loaders:
            t.join()

    assert failures == []
    old_pid, new_pid = str(old.running.pid).encode(), str(new.running.pid).encode()
    assert set(answers) == {old_pid, new_pid}
    assert set(answers[-20:]) == {new_pid}
    assert not old.running.alive()
    assert provider_ids(host, "store") == [host.runtime_id(new)]


def test_callers_of_a_twice_replaced_plugin_reach_the_latest_instance(host, peer):
    platform = Platform(host)
    platform.add(PluginSpec("store", in_process("v1", "store"), ["store"]))
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("store"))  # addressed to v1

    platform.replace("store", in_process("v2", "store"))
    platform.replace("store", in_process("v3", "store"))

    assert kv.get(kv_pb2.GetRequest(key="whoami")).value == b"v3"
    assert [p.provider_id for p in host.registry.providers("store")] == [
        host.runtime_id(platform.client("store"))
    ]


# --- the host's own endpoints ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_host_answers_its_health_endpoints(host, path):
    response = requests.get(host.url + path, timeout=5)
    assert (response.status_code, response.text) == (200, "ok\n")
