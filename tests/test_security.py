"""Security: what an attacker on the same machine can and cannot do to a host and its plugins."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from connectplugin import (
    Client,
    ClientConfig,
    Code,
    ConnectError,
    HTTPConfig,
    HTTPServer,
    Rate,
    RegistryConfig,
)
from connectplugin.gen.connectplugin.v1 import broker_pb2, handshake_pb2, lifecycle_pb2
from connectplugin.gen.connectplugin.v1.broker_connect import CapabilityBrokerClient
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.host.ratelimit import RateLimiter
from connectplugin.runtime import handshake as hs
from samples.platform import HANDSHAKE
from samples.platform.capabilities import HostLogger
from tests.helpers import Clock, in_process, provider_ids, wait_until

# --- resource bounds (sec-bounds) -------------------------------------------------------------


class Reached:
    """Stands in for an in-process provider's app: counts the calls the router let through."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ, start_response):
        self.calls += 1
        start_response("200 OK", [("Content-Type", "application/proto"), ("Content-Length", "0")])
        return [b""]


def _routed(host, peer, provider=None):
    """A caller's credentials and the URL of ``Get`` of an in-process provider, through the router."""
    client = host.launch(in_process("p", "svc"), name="p")
    if provider is not None:
        host.router.attach_local(host.runtime_id(client), provider)
    caller = peer(host, "caller")
    return caller.credentials(), host.url + caller.discover("svc").endpoint_url + "/Get"


UNARY = {"Content-Type": "application/proto"}
STREAM = {"Content-Type": "application/connect+proto"}


@pytest.mark.parametrize(
    "headers, code",
    [
        ({**UNARY, "Connect-Timeout-Ms": "1234567890123"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "99999999999999999999999999999"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "-1"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "1e3"}, "invalid_argument"),
        ({**UNARY, "Connect-Protocol-Version": "2"}, "invalid_argument"),
        ({**UNARY, "Content-Encoding": "br"}, "unimplemented"),
        ({**STREAM, "Connect-Timeout-Ms": "12345678901"}, "invalid_argument"),
        ({**STREAM, "Connect-Content-Encoding": "zstd"}, "unimplemented"),
    ],
)
def test_router_refuses_bad_connect_headers_as_the_server_would(host, peer, caplog, headers, code):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    with caplog.at_level(logging.ERROR):
        response = requests.post(url, headers={**credentials, **headers}, data=b"", timeout=10)

    if headers["Content-Type"] == STREAM["Content-Type"]:
        assert response.status_code == 200  # a stream's error is its end-of-stream message
        assert f'"code":"{code}"'.encode() in response.content
    else:
        assert response.json()["code"] == code
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert provider.calls == 0


def test_router_relays_a_well_formed_call(host, peer):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.post(url, headers={**credentials, **UNARY, "Connect-Timeout-Ms": "5000"}, timeout=10)

    assert (response.status_code, provider.calls) == (200, 1)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/connect+xml", ""])
def test_router_answers_415_for_a_content_type_connect_does_not_know(host, peer, content_type):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.post(url, headers={**credentials, "Content-Type": content_type}, data=b"", timeout=10)

    assert (response.status_code, provider.calls) == (415, 0)


def test_router_refuses_a_body_over_the_read_limit_before_reading_it(host, peer):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)
    too_big = host.router.read_limit + 1

    response = requests.post(url, headers={**credentials, **UNARY}, data=b"\0" * too_big, timeout=10)

    assert (response.json()["code"], provider.calls) == ("resource_exhausted", 0)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_router_answers_405_for_methods_connect_does_not_use(host, peer, method):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.request(method, url, headers={**credentials, **UNARY}, data=b"", timeout=10)

    assert (response.status_code, provider.calls) == (405, 0)


# Connection hygiene: slow and idle connections give their slot back.

HEAD = b"POST /slow HTTP/1.1\r\nHost: attacker\r\n"
"""The start of a request whose head never ends."""


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


@pytest.fixture
def hygienic() -> Iterator[HTTPServer]:
    """A server with a small connection limit and short timeouts, so the test runs fast."""
    config = HTTPConfig(
        threads=2, connection_limit=20, request_timeout=0.5, idle_timeout=0.5, sweep_interval=0.05
    )
    server = HTTPServer(hello, config).start()
    yield server
    server.close(grace=0)


def _connect(server: HTTPServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_half_open_connections_do_not_lock_out_a_normal_call(hygienic):
    slow = []
    try:
        for _ in range(3 * hygienic.config.connection_limit):
            sock = _connect(hygienic)
            sock.sendall(HEAD)
            slow.append(sock)

        response = requests.get(hygienic.url + "/", timeout=5)

        assert (response.status_code, response.text) == (200, "hello")
        wait_until(lambda: all(_closed_by_server(s) for s in slow), "every slow connection to be closed")
    finally:
        for sock in slow:
            sock.close()


def test_a_request_trickling_in_is_closed_after_request_timeout_however_busy_it_looks(hygienic):
    sock = _connect(hygienic)
    closed = threading.Event()
    try:
        sock.sendall(HEAD)
        lines = 0
        # The attacker's pace: a header line every 50 ms, each one activity for waitress.
        while not closed.wait(0.05):
            try:
                sock.sendall(b"X-Trickle-%d: x\r\n" % lines)
            except OSError:
                break
            lines += 1
            if _closed_by_server(sock):
                break
            sock.setblocking(True)
            assert lines < 200, "a trickling request was never closed"
    finally:
        sock.close()


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(hygienic):
    sock = _connect(hygienic)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"hello"):
            reply += sock.recv(4096)

        wait_until(lambda: _closed_by_server(sock), "the idle connection to be closed")
    finally:
        sock.close()


def test_a_connection_with_a_call_in_progress_is_never_closed_as_slow():
    release = threading.Event()

    def busy(environ, start_response):
        release.wait(2.0)  # the handler's work: longer than request_timeout
        return hello(environ, start_response)

    config = HTTPConfig(threads=2, request_timeout=0.1, idle_timeout=0.1, sweep_interval=0.02)
    with HTTPServer(busy, config) as server:
        response = requests.get(server.url + "/", timeout=5)

    assert response.status_code == 200


# Rate limits and caps: what unauthenticated and authenticated callers can make the host hold.


def _handshake(host, self_id: str = "joiner") -> handshake_pb2.HandshakeResponse:
    with Client(host.url, ClientConfig(timeout=5)) as client:
        request = hs.request_for(HANDSHAKE, (), self_id=self_id, self_version="1.0.0")
        return HandshakeServiceClient(client).handshake(request)


def _refused(call) -> ConnectError:
    with pytest.raises(ConnectError) as e:
        call()
    return e.value


def test_handshakes_past_the_rate_limit_are_refused_naming_the_limit(make_host):
    host = make_host(handshake_rate=Rate(per_second=0, burst=5))
    for _ in range(5):
        _handshake(host)

    error = _refused(lambda: _handshake(host))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "HostConfig.handshake_rate" in error.message
    assert len(host.identities) == 5


def test_a_handshake_flood_leaves_only_the_burst_of_identities(make_host):
    host = make_host()
    refused = 0
    for _ in range(200):
        try:
            _handshake(host)
        except ConnectError as e:
            assert e.code is Code.RESOURCE_EXHAUSTED
            refused += 1

    # The loop is fast, but the bucket refills while it runs: a few beyond the burst pass.
    assert refused > 100
    assert len(host.identities) < 200 - refused + 1


def test_the_host_holds_at_most_max_identities(make_host):
    host = make_host(max_identities=3)
    for _ in range(3):
        _handshake(host)

    error = _refused(lambda: _handshake(host))

    assert (error.code, len(host.identities)) == (Code.RESOURCE_EXHAUSTED, 3)
    assert "HostConfig.max_identities" in error.message


def test_an_identity_that_handshook_and_did_nothing_is_dropped_but_a_launched_one_stays(make_host):
    host = make_host(identity_idle_timeout=0.3, reap_interval=0.05)
    client = host.launch(in_process("p", "svc"), name="p")
    idle = _handshake(host)

    wait_until(lambda: host.identities.get(idle.runtime_id) is None, "the unused identity to be dropped")

    assert host.identities.get(host.runtime_id(client)) is not None


def test_an_identity_in_use_is_kept_past_the_idle_timeout(make_host, peer):
    host = make_host(identity_idle_timeout=0.5, reap_interval=0.05)
    busy = peer(host, "busy")
    idle = _handshake(host)

    def busy_and_idle_gone() -> bool:
        busy.report(lifecycle_pb2.HEALTH_STATE_HEALTHY)  # an authenticated call: a use
        return host.identities.get(idle.runtime_id) is None

    wait_until(busy_and_idle_gone, "the unused identity, issued after the busy one, to be dropped")

    assert host.identities.get(busy.runtime_id) is not None


def test_registrations_past_the_rate_limit_are_refused(make_host, peer):
    host = make_host(registration_rate=Rate(per_second=0, burst=2))
    joiner = peer(host, "joiner", provides=("a", "b", "c"))
    joiner.register("a")
    joiner.register("b")

    error = _refused(lambda: joiner.register("c"))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "HostConfig.registration_rate" in error.message
    assert provider_ids(host, "c") == []


def test_registrations_per_identity_are_capped(make_host, peer):
    host = make_host(registry=RegistryConfig(max_watchers=8, max_registrations_per_identity=2))
    joiner = peer(host, "joiner", provides=("a", "b"))
    joiner.register("a")
    joiner.register("b")

    error = _refused(lambda: joiner.register("a"))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "RegistryConfig.max_registrations_per_identity" in error.message
    assert len(host.registry.providers()) == 2


def test_a_plugin_declaring_more_services_than_the_cap_cannot_register(make_host, peer):
    host = make_host(registry=RegistryConfig(max_watchers=8, max_registrations_per_identity=2))
    joiner = peer(host, "joiner", provides=("a", "b", "c"))

    error = _refused(lambda: joiner.register("a"))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert host.registry.providers() == []


def test_registration_metadata_over_the_size_cap_is_refused(make_host, peer):
    host = make_host(registry=RegistryConfig(max_watchers=8, max_metadata_bytes=1024))
    joiner = peer(host, "joiner", provides=("svc",))

    error = _refused(lambda: joiner.register("svc", padding="x" * 1024))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "RegistryConfig.max_metadata_bytes" in error.message
    assert host.registry.providers() == []


def test_watchers_per_type_are_capped_and_other_types_still_watchable(make_host, peer):
    host = make_host(registry=RegistryConfig(max_watchers=8, max_watchers_per_type=2))
    watcher = peer(host, "watcher")
    first, second = watcher.watch("svc"), watcher.watch("svc")
    first.wait_for(1)
    second.wait_for(1)

    third = watcher.watch("svc")
    other = watcher.watch("other")

    third.join()
    assert third.error is not None and third.error.code is Code.RESOURCE_EXHAUSTED
    other.wait_for(1)
    assert host.registry.watching() == {"svc": 2, "other": 1}


def test_the_registry_keeps_no_entry_for_a_type_no_longer_watched(host, peer):
    watcher = peer(host, "watcher")
    for n in range(20):
        events = watcher.watch(f"type-{n}", limit=1)
        events.join()

    wait_until(lambda: host.registry.watching() == {}, "every finished watch to leave the registry")


def _grant(holder) -> broker_pb2.CapabilityGrant:
    request = broker_pb2.RequestCapabilityRequest(capability_type="logger", reason="test")
    return CapabilityBrokerClient(holder.api).request_capability(request).grant


def test_grant_requests_past_the_rate_limit_are_refused(make_host, peer):
    host = make_host(grant_rate=Rate(per_second=0, burst=2))
    host.broker.add("logger", "1.0.0", HostLogger())
    holder = peer(host, "holder")
    _grant(holder)
    _grant(holder)

    error = _refused(lambda: _grant(holder))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "HostConfig.grant_rate" in error.message


def test_unexpired_grants_per_identity_are_capped(make_host, peer):
    host = make_host(max_grants_per_identity=2)
    host.broker.add("logger", "1.0.0", HostLogger())
    holder = peer(host, "holder")
    _grant(holder)
    _grant(holder)

    error = _refused(lambda: _grant(holder))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "HostConfig.max_grants_per_identity" in error.message


# The token bucket itself, on a clock the test moves.


def test_a_bucket_refills_at_its_rate_up_to_its_burst():
    clock = Clock()
    limiter = RateLimiter(Rate(per_second=2, burst=2), "test_rate", clock=clock)
    limiter.check("peer")
    limiter.check("peer")
    assert _refused(lambda: limiter.check("peer")).code is Code.RESOURCE_EXHAUSTED

    clock.advance(0.5)
    limiter.check("peer")
    clock.advance(60)
    limiter.check("peer")
    limiter.check("peer")

    assert _refused(lambda: limiter.check("peer")).code is Code.RESOURCE_EXHAUSTED
    limiter.check("another peer")


def test_a_limiter_tracks_at_most_max_keys_peers():
    clock = Clock()
    limiter = RateLimiter(Rate(per_second=1, burst=1), "test_rate", max_keys=3, clock=clock)
    for n in range(3):
        limiter.check(f"peer-{n}")

    limiter.check("peer-3")  # no room: shares the overflow bucket
    assert _refused(lambda: limiter.check("peer-4")).code is Code.RESOURCE_EXHAUSTED
    assert len(limiter) == 4  # three peers and the overflow bucket

    clock.advance(10)  # every bucket full again: the same as none
    limiter.check("peer-5")
    assert len(limiter) <= 3
