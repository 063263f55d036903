"""Security: what an attacker on the same machine can and cannot do to a host and its plugins."""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import requests
from google.protobuf.message import Message

from connectplugin import (
    Client,
    ClientConfig,
    Code,
    ConnectError,
    HealthState,
    HostLink,
    HTTPConfig,
    HTTPServer,
    JoinToken,
    PluginClient,
    PluginHost,
    PluginServer,
    Rate,
    RegistryConfig,
    RouterConfig,
    ServeConfig,
    TLSConfig,
)
from connectplugin.gen.capability.logger.v1 import logger_pb2
from connectplugin.gen.capability.logger.v1.logger_connect import LoggerClient
from connectplugin.gen.connectplugin.v1 import (
    broker_pb2,
    handshake_pb2,
    lifecycle_pb2,
    plugininfo_pb2,
    registry_pb2,
)
from connectplugin.gen.connectplugin.v1.broker_connect import CapabilityBrokerClient
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.host.admission import Admission
from connectplugin.host.identities import Identities
from connectplugin.host.ratelimit import RateLimiter
from connectplugin.rpc import tls
from connectplugin.runtime import handshake as hs
from connectplugin.runtime.credentials import HOST_SECRET_HEADER
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.platform import HANDSHAKE
from samples.platform.capabilities import HostLogger
from tests.helpers import (
    BOTH_SERVERS,
    ENV,
    ROOT,
    Clock,
    Peer,
    free_port,
    host_secret,
    http_ok,
    in_process,
    provider_ids,
    provider_process,
    wait_until,
)
from tests.platform_plugins.provider import PLUGINS, Recorder

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
    too_big = host.router.config.read_limit + 1

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
def hygienic(server_kind, pki) -> Iterator[HTTPServer]:
    """A server with a small connection limit and short timeouts, so the test runs fast (on
    waitress, or cheroot over TLS for tests marked ``BOTH_SERVERS``)."""
    config = HTTPConfig(
        threads=2, connection_limit=20, request_timeout=0.5, idle_timeout=0.5, handshake_timeout=0.5,
        sweep_interval=0.05, tls=TLSConfig(key_pair=pki.host) if server_kind == "tls" else None,
    )
    server = HTTPServer(hello, config).start()
    yield server
    server.close(grace=0)


def _connect(server: HTTPServer, handshake: bool = True) -> socket.socket:
    """A connection to ``server``, over TLS (its handshake done, unless not ``handshake``)
    when it serves TLS."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    if server.config.tls is None or not handshake:
        return sock
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # an attacker checks nothing
    return context.wrap_socket(sock, server_hostname=server.host)


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


@BOTH_SERVERS
def test_slow_half_open_connections_do_not_lock_out_a_normal_call(hygienic, ca_file):
    slow = []
    try:
        for _ in range(3 * hygienic.config.connection_limit):
            sock = _connect(hygienic)
            sock.sendall(HEAD)
            slow.append(sock)

        response = requests.get(hygienic.url + "/", timeout=5, verify=ca_file)

        assert (response.status_code, response.text) == (200, "hello")
        wait_until(lambda: all(_closed_by_server(s) for s in slow), "every slow connection to be closed")
    finally:
        for sock in slow:
            sock.close()


@BOTH_SERVERS
def test_silent_connections_hold_no_worker_thread(server_kind, pki, ca_file):
    # Long limits: only a server that gives them no thread can answer while they are open.
    config = HTTPConfig(
        threads=2, max_streams=1, request_timeout=60, idle_timeout=60, handshake_timeout=60,
        tls=TLSConfig(key_pair=pki.host) if server_kind == "tls" else None,
    )
    with HTTPServer(hello, config) as server:
        # No request (plaintext) or not even a ClientHello (TLS), more of them than workers.
        silent = [_connect(server, handshake=False) for _ in range(3 * config.workers)]
        try:
            response = requests.get(server.url + "/", timeout=10, verify=ca_file)
        finally:
            for sock in silent:
                sock.close()

    assert (response.status_code, response.text) == (200, "hello")


@BOTH_SERVERS
def test_silent_connections_are_closed(hygienic):
    silent = [_connect(hygienic, handshake=False) for _ in range(3 * hygienic.config.workers)]
    try:
        wait_until(lambda: all(_closed_by_server(s) for s in silent), "every silent connection to be closed")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("server_kind", ["tls"], indirect=True)  # plaintext has no handshake
def test_a_tls_client_feeding_its_handshake_byte_by_byte_is_closed(hygienic):
    sock = _connect(hygienic, handshake=False)
    try:
        # The first bytes of a TLS 1.2 ClientHello record, one at a time, never the whole.
        for byte in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03":
            sock.sendall(bytes([byte]))
        wait_until(lambda: _closed_by_server(sock), "the connection stuck in its handshake to be closed")
    finally:
        sock.close()


def _hello_on(sock: socket.socket) -> bytes:
    """A request on a kept-alive connection, and the reply up to its body."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while not reply.endswith(b"hello"):
        data = sock.recv(4096)
        if not data:
            break
        reply += data
    return reply


@pytest.mark.parametrize("handshake", [False, True], ids=["half-open", "handshake-only"])
def test_a_flood_of_tls_connections_without_requests_makes_room_from_itself_not_from_established_ones(
    pki, ca_file, handshake
):
    # Long limits: only the connection limit makes room, and it must take it from the flood.
    config = HTTPConfig(
        threads=2, connection_limit=20, handshake_timeout=60, idle_timeout=60, request_timeout=60,
        tls=TLSConfig(key_pair=pki.host),
    )
    with HTTPServer(hello, config) as server:
        established = _connect(server)
        flood: list[socket.socket] = []
        try:
            assert _hello_on(established).endswith(b"hello")
            for n in range(3 * config.connection_limit):
                # Silent, or a ClientHello never finished; or a whole handshake and no request.
                sock = _connect(server, handshake=handshake)
                flood.append(sock)
                if n % 2 and not handshake:
                    sock.sendall(b"\x16\x03\x01\x02\x00\x01")
            wait_until(lambda: sum(map(_closed_by_server, flood)) >= 2 * config.connection_limit,
                       "the server to close the oldest of the flood")

            again = _hello_on(established)
            response = requests.get(server.url + "/", timeout=10, verify=ca_file)  # a new client too
        finally:
            established.close()
            for sock in flood:
                sock.close()

    assert again.endswith(b"hello")
    assert (response.status_code, response.text) == (200, "hello")


_FEW_DESCRIPTORS_SERVER = """
import resource, sys, threading
from connectplugin import HTTPConfig, HTTPServer, TLSConfig
from connectplugin.rpc.tls import KeyPair
def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]
pair = KeyPair.from_pem(sys.stdin.readline().replace("|", "\\n"), sys.stdin.readline().replace("|", "\\n"))
resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))
config = HTTPConfig(threads=2, handshake_timeout=60, tls=TLSConfig(key_pair=pair))  # connection_limit 1000
server = HTTPServer(hello, config).start()
print(server.port, flush=True)
sys.stdin.read()
server.close(grace=0)
"""


def test_a_tls_server_out_of_file_descriptors_closes_half_open_connections_to_serve_a_new_client(pki, ca_file):
    files = 100  # far fewer than the connection limit allows: a process whose `ulimit -n` is low
    with subprocess.Popen(
        [sys.executable, "-c", _FEW_DESCRIPTORS_SERVER.replace("FILES", str(files))], env={**os.environ, **ENV},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        for pem in (pki.host.certificate_pem(), pki.host.private_key_pem()):
            process.stdin.write(pem.decode().replace("\n", "|") + "\n")
        process.stdin.flush()
        port = int(process.stdout.readline())
        flood = []
        try:
            for _ in range(2 * files):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            response = requests.get(f"https://127.0.0.1:{port}/", timeout=10, verify=ca_file)
        finally:
            for sock in flood:
                sock.close()
        errors = process.communicate(timeout=30)[1]  # its stdin closed: it stops

    assert (response.status_code, response.text) == (200, "hello")
    assert errors.count("Too many open files") <= 1, errors[-2000:]


_NO_DESCRIPTORS_LEFT_SERVER = """
import os, resource, socket, ssl, sys, time
from connectplugin import HTTPConfig, HTTPServer, TLSConfig
from connectplugin.rpc.tls import KeyPair
def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]
pair = KeyPair.from_pem(sys.stdin.readline().replace("|", "\\n"), sys.stdin.readline().replace("|", "\\n"))
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
server = HTTPServer(hello, HTTPConfig(threads=2, tls=TLSConfig(key_pair=pair))).start()
def sockets():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # closed since it was listed (the listing's own, for one)
            pass
    return count
listening = sockets()
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port))) as sock:
    sock.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200")  # serving: its selector and threads exist
# The server closes its side of that connection in its own time: a descriptor it frees after
# the ones below are taken would let the next client in without the warning this test awaits.
deadline = time.monotonic() + 30
while sockets() > listening:
    assert time.monotonic() < deadline, "the server kept its first connection open"
    time.sleep(0.01)
taken = []
try:
    while True:  # what the rest of a busy process might hold
        taken.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(server.port, flush=True)
sys.stdin.readline()
os.close(taken.pop())
sys.stdin.read()
server.close(grace=0)
"""


def test_a_tls_server_out_of_descriptors_with_none_of_its_own_waits_without_spinning_then_serves(pki, ca_file):
    with subprocess.Popen(
        [sys.executable, "-c", _NO_DESCRIPTORS_LEFT_SERVER], env={**os.environ, **ENV},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        for pem in (pki.host.certificate_pem(), pki.host.private_key_pem()):
            process.stdin.write(pem.decode().replace("\n", "|") + "\n")
        process.stdin.flush()
        port = int(process.stdout.readline())
        answers: list[requests.Response] = []
        client = threading.Thread(
            target=lambda: answers.append(requests.get(f"https://127.0.0.1:{port}/", timeout=30, verify=ca_file))
        )
        client.start()  # its connection waits in the listening socket's queue
        told = process.stderr.readline()  # the server's one warning: it could not accept
        before = _cpu_seconds(process.pid)
        threading.Event().wait(1.0)  # a window to measure in, not a synchronisation
        spent = _cpu_seconds(process.pid) - before
        process.stdin.write("free one\n")
        process.stdin.flush()
        client.join(timeout=30)
        errors = process.communicate(timeout=30)[1]

    assert "out of file descriptors with 0 connections waiting" in told, told + errors
    assert spent < 0.1, f"the server spent {spent:.2f} s of CPU in 1 s waiting for a descriptor"
    assert [(a.status_code, a.text) for a in answers] == [(200, "hello")]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@BOTH_SERVERS
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


@BOTH_SERVERS
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


@BOTH_SERVERS
def test_a_connection_with_a_call_in_progress_is_never_closed_as_slow(server_kind, pki, ca_file):
    release = threading.Event()

    def busy(environ, start_response):
        release.wait(2.0)  # the handler's work: longer than request_timeout
        return hello(environ, start_response)

    config = HTTPConfig(
        threads=2, request_timeout=0.1, idle_timeout=0.1, handshake_timeout=0.1, sweep_interval=0.02,
        tls=TLSConfig(key_pair=pki.host) if server_kind == "tls" else None,
    )
    with HTTPServer(busy, config) as server:
        response = requests.get(server.url + "/", timeout=5, verify=ca_file)

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
    host = make_host(registry=RegistryConfig(max_registrations_per_identity=2))
    joiner = peer(host, "joiner", provides=("a", "b"))
    joiner.register("a")
    joiner.register("b")

    error = _refused(lambda: joiner.register("a"))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "RegistryConfig.max_registrations_per_identity" in error.message
    assert len(host.registry.providers()) == 2


def test_a_plugin_allowed_more_services_than_the_cap_cannot_join(make_host, peer):
    token = JoinToken("j" * 32, service_types=("a", "b", "c"))
    host = make_host(
        registry=RegistryConfig(max_registrations_per_identity=2), join_tokens=[token]
    )

    error = _refused(lambda: peer(host, "joiner", join_token=token.secret))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert len(host.identities) == 0


def test_registration_metadata_over_the_size_cap_is_refused(make_host, peer):
    host = make_host(registry=RegistryConfig(max_metadata_bytes=1024))
    joiner = peer(host, "joiner", provides=("svc",))

    error = _refused(lambda: joiner.register("svc", padding="x" * 1024))

    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "RegistryConfig.max_metadata_bytes" in error.message
    assert host.registry.providers() == []


def test_watchers_per_type_are_capped_and_other_types_still_watchable(make_host, peer):
    host = make_host(registry=RegistryConfig(max_watchers_per_type=2))
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


# --- plugin endpoints (sec-plugin) ------------------------------------------------------------
# A plugin answers its host (and the host's router) only: every procedure needs the secret
# the host gave it (X-Plugin-Host-Secret); /healthz and /readyz stay open. Each test attacks
# a real launched or self-registered plugin process with a client holding no credentials,
# then checks that nothing changed: the plugin is alive, registered, and serving its host.

PLUGIN_SHUTDOWN = "/connectplugin.v1.PluginControl/Shutdown"
KV_PUT = "/kv.v1.KVService/Put"
SET_IDENTITY = "/connectplugin.v1.PluginIdentity/SetRuntimeIdentity"


def attack(url: str, procedure: str, message: Message | None = None, **headers: str) -> requests.Response:
    """A stranger's call: ``message`` (empty by default) posted with only ``headers``."""
    body = message.SerializeToString() if message is not None else b""
    return requests.post(url + procedure, data=body, headers={**UNARY, **headers}, timeout=10)


def refused(response: requests.Response) -> bool:
    return (response.status_code, response.json()["code"]) == (401, "unauthenticated")


def serving_its_host(host: PluginHost, client: PluginClient, service_type: str = "svc") -> bool:
    """The plugin is alive, still registered, and answers its host and routed callers."""
    kv = client.dispense("kv")
    kv.put(kv_pb2.PutRequest(key="after", value=b"attack"))
    return (
        client.running is not None
        and client.running.alive()
        and kv.get(kv_pb2.GetRequest(key="after")).value == b"attack"
        and provider_ids(host, service_type) == [host.runtime_id(client)]
    )


@pytest.fixture
def launched(host) -> PluginClient:
    """A provider of ``svc`` launched by the host as a subprocess."""
    return host.launch(provider_process("svc"), name="p")


def test_shutdown_by_a_stranger_is_unauthenticated_and_the_plugin_keeps_serving(host, launched):
    response = attack(launched.url, PLUGIN_SHUTDOWN, lifecycle_pb2.ShutdownRequest(reason="attacker"))

    assert refused(response)
    assert serving_its_host(host, launched)


@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {HOST_SECRET_HEADER: ""},
        {HOST_SECRET_HEADER: "not-the-secret"},
        {HOST_SECRET_HEADER: "x" * 43},
    ],
    ids=["no-header", "empty", "wrong", "wrong-same-length"],
)
def test_a_call_without_the_right_host_secret_is_unauthenticated(host, launched, credentials):
    responses = [attack(launched.url, procedure, **credentials) for procedure in (PLUGIN_SHUTDOWN, KV_PUT)]

    assert all(refused(response) for response in responses)
    assert serving_its_host(host, launched)


def test_the_host_secret_in_authorization_or_the_plugins_own_token_is_no_credential(host, launched):
    """The header cannot be confused with the caller's Authorization, or the plugin's token."""
    secret = host_secret(host, launched)
    identity = host.identities.get(host.runtime_id(launched))
    assert identity is not None

    as_bearer = attack(launched.url, PLUGIN_SHUTDOWN, Authorization=f"Bearer {secret}")
    as_token = attack(launched.url, PLUGIN_SHUTDOWN, **{HOST_SECRET_HEADER: identity.token})

    assert refused(as_bearer) and refused(as_token)
    assert serving_its_host(host, launched)


def test_the_secret_of_another_plugin_is_unauthenticated(host, launched):
    other = host.launch(provider_process("other"), name="other")

    response = attack(launched.url, PLUGIN_SHUTDOWN, **{HOST_SECRET_HEADER: host_secret(host, other)})

    assert refused(response)
    assert serving_its_host(host, launched)
    assert serving_its_host(host, other, "other")


def test_a_forged_caller_id_without_the_host_secret_is_unauthenticated(host, launched):
    request = kv_pb2.GetRequest(key="headers")

    response = attack(launched.url, "/kv.v1.KVService/Get", request, **{"X-Plugin-Caller-ID": "the-host"})

    assert refused(response)


def test_a_plugin_serving_without_authentication_strips_the_caller_id_no_host_vouches_for(caplog):
    config = ServeConfig(allow_unauthenticated=True)
    server = PluginServer(PLUGINS, {"kv": Recorder("dev")}, HANDSHAKE, config)
    with caplog.at_level(logging.WARNING, logger="connectplugin.plugin"):
        url = server.listen()
    runner = threading.Thread(target=server.run, name="dev-plugin")
    runner.start()
    try:
        request = kv_pb2.GetRequest(key="headers")
        reply = attack(url, "/kv.v1.KVService/Get", request, **{"X-Plugin-Caller-ID": "the-host"})
    finally:
        server.stop(grace=0)
        runner.join(10)

    seen = json.loads(kv_pb2.GetResponse.FromString(reply.content).value)
    assert reply.status_code == 200
    assert "x-plugin-caller-id" not in seen
    assert "WITHOUT AUTHENTICATION" in caplog.text


def test_the_handler_never_sees_the_host_secret(host, launched):
    reply = launched.dispense("kv").get(kv_pb2.GetRequest(key="headers"))

    assert HOST_SECRET_HEADER.lower() not in json.loads(reply.value)


def test_probes_stay_open_to_anyone(launched):
    assert [requests.get(launched.url + p, timeout=10).status_code for p in ("/healthz", "/readyz")] == [200, 200]


def test_the_launch_secret_is_in_neither_the_plugins_environment_nor_its_command_line(host, launched):
    secret = host_secret(host, launched).encode()
    pid = launched.running.pid

    with open(f"/proc/{pid}/environ", "rb") as environ, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        assert secret not in environ.read()
        assert secret not in cmdline.read()


def test_a_plugin_started_without_a_secret_exits_naming_the_development_opt_out():
    env = {"PATH": os.environ.get("PATH", ""), **ENV, HANDSHAKE.magic_cookie_key: HANDSHAKE.magic_cookie_value}

    done = subprocess.run(
        [sys.executable, "-m", "tests.platform_plugins.provider", "--type", "svc"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert (done.returncode, done.stdout) == (1, "")
    assert "CONNECTPLUGIN_ALLOW_UNAUTHENTICATED=1" in done.stderr
    assert "Traceback" not in done.stderr


# Self-registering plugins (model B) have no launch secret: the host's handshake gives them
# the secret it will present, and until then they answer nobody.


def joining(sidecar, host_url: str, port: int) -> subprocess.Popen[bytes]:
    """A provider of ``joined`` started by hand, joining ``host_url``, listening on ``port``."""
    proc = sidecar(
        "tests.platform_plugins.provider", "--type", "joined", "--host-url", host_url, "--port", str(port)
    )
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), "the joining plugin to listen", timeout=15)
    return proc


class Trap:
    """A fake host on a real socket: records every request anyone sends it."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    def __call__(self, environ, start_response):
        self.requests.append(environ["PATH_INFO"])
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]


def test_set_runtime_identity_before_the_host_is_up_is_refused_and_the_plugin_joins_its_real_host(
    make_host, sidecar, serve
):
    host_port, plugin_port = free_port(), free_port()
    joining(sidecar, f"http://127.0.0.1:{host_port}", plugin_port)
    trap = Trap()
    trap_url = serve(trap).url
    plugin_url = f"http://127.0.0.1:{plugin_port}"
    hijack = plugininfo_pb2.SetRuntimeIdentityRequest(
        runtime_id="evil", runtime_token="t" * 43, host_url=trap_url
    )

    response = attack(plugin_url, SET_IDENTITY, hijack)

    assert refused(response)
    host = make_host(http=HTTPConfig(port=host_port, threads=8))
    wait_until(lambda: provider_ids(host, "joined"), "the plugin to join its real host", timeout=15)
    assert trap.requests == []


def test_a_self_registered_plugin_answers_only_its_host_and_takes_no_identity_from_it(host, sidecar, peer):
    port = free_port()
    joining(sidecar, host.url, port)
    (provider_id,) = wait_until(lambda: provider_ids(host, "joined"), "the plugin to register", timeout=15)
    plugin_url = f"http://127.0.0.1:{port}"
    identity = host.identities.get(provider_id)
    assert identity is not None
    as_host = {HOST_SECRET_HEADER: identity.host_secret}
    hijack = plugininfo_pb2.SetRuntimeIdentityRequest(runtime_id="evil", runtime_token="t" * 43, host_url=host.url)

    stranger = attack(plugin_url, PLUGIN_SHUTDOWN)
    from_host = attack(plugin_url, SET_IDENTITY, hijack, **as_host)

    assert refused(stranger)
    assert (from_host.status_code, from_host.json()["code"]) == (400, "failed_precondition")
    caller = peer(host, "caller")
    routed = caller.kv(caller.discover("joined"))
    routed.put(kv_pb2.PutRequest(key="k", value=b"v"))
    assert routed.get(kv_pb2.GetRequest(key="k")).value == b"v"
    assert provider_ids(host, "joined") == [provider_id]


def test_a_port_scan_finds_our_servers_and_a_stranger_reaches_no_procedure_but_the_hosts_handshake(
    host, launched, sidecar
):
    port = free_port()
    joined = joining(sidecar, host.url, port)
    wait_until(lambda: provider_ids(host, "joined"), "the plugin to register", timeout=15)
    pids = [os.getpid(), launched.running.pid, joined.pid]

    done = subprocess.run(
        [sys.executable, "-m", "tests.attacker", *map(str, pids)],
        cwd=ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    plugins = {launched.url, f"http://127.0.0.1:{port}"}
    assert set(report["servers"]) == plugins | {host.url}
    for url, calls in report["calls"].items():
        if url == host.url:
            # The host's handshake is its open door by design; the rest needs a runtime id
            # (invalid_argument without one, as the Go host answers) and token, and what the
            # host does not serve is simply not there.
            refusals = ("unauthenticated", "invalid_argument", "unimplemented")
            let_through = {path for path, code in calls.items() if code not in refusals}
            assert let_through <= {"/connectplugin.v1.HandshakeService/Handshake"}, calls
        else:
            # A plugin tells a stranger nothing, not even which procedures it serves.
            assert set(calls.values()) == {"unauthenticated"}, calls
    assert serving_its_host(host, launched)


def test_a_plugin_run_by_hand_with_the_opt_out_serves_anyone_and_says_so():
    env = {
        "PATH": os.environ.get("PATH", ""),
        **ENV,
        HANDSHAKE.magic_cookie_key: HANDSHAKE.magic_cookie_value,
        "CONNECTPLUGIN_ALLOW_UNAUTHENTICATED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.platform_plugins.provider", "--type", "svc"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().split("|")[-1]
        response = attack(url, KV_PUT, kv_pb2.PutRequest(key="k", value=b"v"))
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)

    assert response.status_code == 200
    assert "WITHOUT AUTHENTICATION" in stderr


def test_the_sample_kv_store_serves_standalone_only_with_an_explicit_insecure():
    done = subprocess.run(
        [sys.executable, "-m", "samples.kv", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, **ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert (done.returncode, done.stdout) == (2, "")
    assert "--insecure" in done.stderr


# --- registration and routing (sec-trust) -----------------------------------------------------
# The attacker is a self-registered plugin on this machine (``peer``): joined with the cookie
# alone through the development switch, or holding a join token of its own. It wants the
# router to reach what it was never given: another plugin, a control service, any URL.

JOINER_SECRET = "s" * 32


class Listener:
    """A socket that must never be called: counts the connections it is offered."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    made = Listener()
    yield made
    made.close()


def _register(joiner, service_type: str = "svc", version: str = "1.0.0", path: str = "/kv.v1.KVService/", **metadata):
    request = registry_pb2.RegisterServiceRequest(
        service_type=service_type, version=version, endpoint_path=path, metadata=metadata
    )
    return joiner.registry.register_service(request)


def _snapshot(host) -> list[tuple[str, str, str, str]]:
    return sorted((p.provider_id, p.service_type, p.endpoint_path, p.base_url) for p in host.registry.providers())


def test_a_joiner_cannot_move_its_base_url_to_a_launched_plugin_and_shut_it_down(host, peer):
    victim = host.launch(provider_process("svc"), name="victim")
    attacker = peer(host, "attacker")
    attacker.register("evil")  # pins the attacker's own URL
    before = _snapshot(host)

    error = _refused(lambda: attacker.register("evil", base_url=victim.running.url))

    assert error.code is Code.PERMISSION_DENIED
    assert _snapshot(host) == before
    assert victim.running.alive()
    assert serving_its_host(host, victim)


@pytest.mark.parametrize("spelling", ["127.0.0.1", "localhost", "0.0.0.0"])
def test_a_joiner_cannot_pin_its_base_url_where_a_launched_plugin_listens(host, peer, spelling):
    victim = host.launch(provider_process("svc"), name="victim")
    port = victim.running.url.rsplit(":", 1)[1]
    attacker = peer(host, "attacker")

    error = _refused(lambda: _register(attacker, "evil", base_url=f"http://{spelling}:{port}"))

    assert error.code is Code.PERMISSION_DENIED
    assert provider_ids(host, "evil") == []
    assert serving_its_host(host, victim)


def test_a_joiner_cannot_pin_its_base_url_at_the_host(host, peer):
    attacker = peer(host, "attacker")

    error = _refused(lambda: _register(attacker, "evil", base_url=host.url))

    assert error.code is Code.PERMISSION_DENIED
    assert provider_ids(host, "evil") == []


@pytest.mark.parametrize(
    "path, code",
    [
        ("/connectplugin.v1.PluginControl/", Code.PERMISSION_DENIED),
        ("/connectplugin.v1.PluginIdentity/", Code.PERMISSION_DENIED),
        ("/connectplugin.v1.HandshakeService/", Code.PERMISSION_DENIED),
        ("/connectplugin.health.v1.HealthService/", Code.PERMISSION_DENIED),
        ("/grpc.health.v1.Health/", Code.PERMISSION_DENIED),
        ("kv.v1.KVService/", Code.INVALID_ARGUMENT),
        ("/kv.v1.KVService", Code.INVALID_ARGUMENT),
        ("/kv.v1.KVService/Put", Code.INVALID_ARGUMENT),
        ("/../connectplugin.v1.PluginControl/", Code.INVALID_ARGUMENT),
        ("/", Code.INVALID_ARGUMENT),
        ("", Code.INVALID_ARGUMENT),
    ],
)
def test_an_endpoint_path_that_is_not_an_ordinary_service_prefix_is_refused(host, peer, path, code):
    attacker = peer(host, "attacker")

    error = _refused(lambda: _register(attacker, "evil", path=path, base_url=attacker.base_url))

    assert error.code is code
    assert provider_ids(host, "evil") == []


def test_a_launched_plugin_registers_only_the_path_it_declared(host):
    link = HostLink()
    host.launch(in_process("p", "svc", link=link), name="p")
    with Client(host.url, ClientConfig(timeout=5, headers=link.headers())) as client:
        request = registry_pb2.RegisterServiceRequest(
            service_type="svc", version="1.0.0", endpoint_path="/other.v1.Other/"
        )
        error = _refused(lambda: ServiceRegistryClient(client).register_service(request))

    assert error.code is Code.PERMISSION_DENIED
    assert [p.endpoint_path for p in host.registry.providers("svc")] == ["/kv.v1.KVService/"]


def test_an_unauthenticated_caller_makes_the_host_call_no_url(make_host, listener):
    host = make_host(dev_cookie_joins=False, join_tokens=[JoinToken(JOINER_SECRET, ("svc",))])
    with Client(host.url, ClientConfig(timeout=5)) as client:
        joined = hs.request_for(HANDSHAKE, (), self_id="attacker", self_version="1.0.0")
        joined.client_metadata[hs.BASE_URL_KEY] = listener.url
        joined.client_metadata[hs.JOIN_TOKEN_KEY] = "not-the-join-token-at-all"
        handshake_error = _refused(lambda: HandshakeServiceClient(client).handshake(joined))
        forged = {"X-Plugin-Runtime-ID": "attacker-00000000", "Authorization": "Bearer " + "t" * 43}
        register = registry_pb2.RegisterServiceRequest(
            service_type="svc", version="1.0.0", endpoint_path="/kv.v1.KVService/",
            metadata={"base_url": listener.url},
        )
        register_error = _refused(
            lambda: ServiceRegistryClient(client).register_service(register, headers=forged)
        )

    assert handshake_error.code is Code.UNAUTHENTICATED
    assert register_error.code is Code.UNAUTHENTICATED
    assert listener.connections() == 0
    assert len(host.identities) == 0


def test_a_base_url_where_no_plugin_of_ours_answers_is_refused(host, peer, hang_up):
    attacker = peer(host, "attacker")

    error = _refused(lambda: _register(attacker, "evil", base_url=hang_up))

    assert error.code is Code.FAILED_PRECONDITION
    assert provider_ids(host, "evil") == []


# --- exits ---


def test_a_sigkilled_launched_plugin_loses_its_token_grants_routes_and_watchers_are_told(world):
    host = world.host
    victim = host.launch(provider_process("victim"), name="victim")
    identity = host.identities.get(host.runtime_id(victim))
    assert identity is not None
    stolen = {"X-Plugin-Runtime-ID": identity.runtime_id, "Authorization": f"Bearer {identity.token}"}
    with Client(host.url, ClientConfig(timeout=5, headers=stolen)) as api:
        grant = CapabilityBrokerClient(api).request_capability(
            broker_pb2.RequestCapabilityRequest(capability_type="logger")
        ).grant
    watch = world.b.watch("victim", limit=2)
    watch.wait_for(1)

    os.kill(victim.running.pid, signal.SIGKILL)
    wait_until(lambda: host.identities.get(identity.runtime_id) is None, "the crash to revoke the identity")

    with Client(host.url, ClientConfig(timeout=5, headers=stolen)) as api:
        discover = registry_pb2.DiscoverServiceRequest(service_type="svc")
        assert _refused(lambda: ServiceRegistryClient(api).discover_service(discover)).code is Code.UNAUTHENTICATED
        ask = broker_pb2.RequestCapabilityRequest(capability_type="logger")
        assert _refused(lambda: CapabilityBrokerClient(api).request_capability(ask)).code is Code.UNAUTHENTICATED
    with Client(f"{host.url}/services/svc/{world.a.runtime_id}", ClientConfig(timeout=5, headers=stolen)) as routed:
        get = kv_pb2.GetRequest(key="k")
        assert _refused(lambda: KVServiceClient(routed).get(get)).code is Code.UNAUTHENTICATED
    opened = {"Authorization": f"Bearer {grant.bearer_token}"}
    with Client(grant.endpoint_url, ClientConfig(timeout=5, headers=opened)) as logger:
        log_call = logger_pb2.LogRequest(level="info", message="after death")
        assert _refused(lambda: LoggerClient(logger).log(log_call)).code is Code.UNAUTHENTICATED
    watch.wait_for(2)
    assert watch.states[-1] == "SERVICE_STATE_UNAVAILABLE"
    assert provider_ids(host, "victim") == []
    assert host.reported_health(identity.runtime_id).state is HealthState.UNHEALTHY


# --- joining ---


def test_self_registration_is_off_without_join_tokens(make_host):
    host = make_host(dev_cookie_joins=False)

    error = _refused(lambda: _handshake(host))

    assert error.code is Code.PERMISSION_DENIED
    assert len(host.identities) == 0


@pytest.mark.parametrize("secret", ["", "wrong-" + "s" * 26])
def test_a_join_needs_the_right_join_token_when_tokens_are_configured(make_host, secret):
    host = make_host(dev_cookie_joins=False, join_tokens=[JoinToken(JOINER_SECRET, ("svc",))])
    request = hs.request_for(HANDSHAKE, (), self_id="joiner", self_version="1.0.0")
    if secret:
        request.client_metadata[hs.JOIN_TOKEN_KEY] = secret
    with Client(host.url, ClientConfig(timeout=5)) as client:
        error = _refused(lambda: HandshakeServiceClient(client).handshake(request))

    assert error.code is Code.UNAUTHENTICATED
    assert len(host.identities) == 0


def test_the_development_switch_admits_loopback_peers_only():
    admission = Admission((), (), True, HANDSHAKE, Identities(), _NoHost(), 1.0)

    assert admission.admit("joiner", {}, "127.0.0.1", None)[0].any_type
    assert admission.admit("joiner", {}, "::1", None)[0].any_type
    assert _refused(lambda: admission.admit("joiner", {}, "192.0.2.7", None)).code is Code.UNAUTHENTICATED


class _NoHost:
    url = "http://127.0.0.1:9"


def test_a_join_token_admits_only_the_service_types_it_lists(make_host, peer):
    host = make_host(dev_cookie_joins=False, join_tokens=[JoinToken(JOINER_SECRET, ("storage",))])
    joiner = peer(host, "joiner", join_token=JOINER_SECRET)

    joiner.register("storage")
    error = _refused(lambda: joiner.register("svc"))

    assert error.code is Code.PERMISSION_DENIED
    assert provider_ids(host, "storage") == [joiner.runtime_id]
    assert provider_ids(host, "svc") == []


def test_a_cookie_joiner_cannot_claim_a_type_a_launched_plugin_provides(host, peer):
    launched = host.launch(provider_process("svc", "2.0.0"), name="p")
    attacker = peer(host, "attacker")

    error = _refused(lambda: attacker.register("svc", version="9.9.9"))

    assert error.code is Code.PERMISSION_DENIED
    assert provider_ids(host, "svc") == [host.runtime_id(launched)]


def test_a_joiner_allowed_a_type_never_outranks_the_launched_provider(make_host, peer):
    host = make_host(join_tokens=[JoinToken(JOINER_SECRET, ("svc",))])
    joiner = peer(host, "joiner", join_token=JOINER_SECRET)
    joiner.register("svc", version="9.9.9")  # first, so "first" selection would pick it
    launched = host.launch(provider_process("svc", "2.0.0"), name="p")
    caller = peer(host, "caller")

    picked = caller.discover("svc", min_version="2.0.0")

    assert picked.provider_id == host.runtime_id(launched)


@pytest.mark.parametrize(
    "field, value",
    [("self_id", "bad id/x"), ("self_id", "1plugin"), ("self_id", "x" * 129)],
)
def test_a_malformed_self_id_is_refused_as_the_go_host_does(host, field, value):
    error = _refused(lambda: _handshake(host, value))

    assert error.code is Code.INVALID_ARGUMENT
    assert len(host.identities) == 0


@pytest.mark.parametrize("version", ["banana", "v1.0.0", "1.0", "1.0.0+build.1", ""])
def test_a_version_that_is_not_strict_semver_is_refused_as_the_go_host_does(host, peer, version):
    joiner = peer(host, "joiner")

    error = _refused(lambda: joiner.register("svc", version=version))

    assert error.code is Code.INVALID_ARGUMENT
    assert provider_ids(host, "svc") == []


# --- token lifetime ---


def test_a_joiner_rotates_its_token_and_stays_registered(make_host, peer):
    clock = Clock()
    host = make_host(clock=clock, token_ttl=100.0, token_rotation_grace=5.0)
    joiner = peer(host, "joiner", provides=("svc",))
    joiner.register("svc")
    old = joiner.credentials()
    with Client(host.url, ClientConfig(timeout=5, headers=old)) as client:
        request = hs.request_for(HANDSHAKE, (), self_id="joiner", self_version="1.0.0")
        rotated = HandshakeServiceClient(client).handshake(request)

    assert rotated.runtime_id == joiner.runtime_id and rotated.runtime_token != joiner.token
    assert rotated.server_metadata[hs.TOKEN_TTL_KEY] == "100"
    joiner.token = rotated.runtime_token
    assert joiner.discover("svc").provider_id == joiner.runtime_id
    clock.advance(6.0)
    with Client(host.url, ClientConfig(timeout=5, headers=old)) as client:
        discover = registry_pb2.DiscoverServiceRequest(service_type="svc")
        assert _refused(lambda: ServiceRegistryClient(client).discover_service(discover)).code is Code.UNAUTHENTICATED
    assert provider_ids(host, "svc") == [joiner.runtime_id]


def test_rotation_needs_a_current_identity_of_the_same_self_id(host, peer):
    joiner = peer(host, "joiner")
    with Client(host.url, ClientConfig(timeout=5, headers=joiner.credentials())) as client:
        as_other = hs.request_for(HANDSHAKE, (), self_id="other", self_version="1.0.0")
        error = _refused(lambda: HandshakeServiceClient(client).handshake(as_other))

    assert error.code is Code.PERMISSION_DENIED
    assert host.identities.get(joiner.runtime_id).token == joiner.token


def test_an_expired_token_authenticates_nothing_and_the_host_withdraws_its_plugin(make_host, peer):
    clock = Clock()
    host = make_host(clock=clock, token_ttl=100.0, reap_interval=0.05)
    joiner = peer(host, "joiner", provides=("svc",))
    joiner.register("svc")

    clock.advance(101.0)

    assert _refused(lambda: joiner.discover("svc")).code is Code.UNAUTHENTICATED
    wait_until(lambda: not provider_ids(host, "svc"), "the host to withdraw the expired plugin")


def test_the_host_renews_a_launched_plugins_token_before_it_expires(make_host):
    clock = Clock()
    host = make_host(clock=clock, token_ttl=100.0, reap_interval=0.05)
    link = HostLink()
    client = host.launch(in_process("p", "svc", link=link), name="p")
    first = link.headers()["Authorization"]

    clock.advance(60.0)  # past half its lifetime

    wait_until(lambda: link.headers()["Authorization"] != first, "the launched plugin to get a new token")
    clock.advance(60.0)  # the first token would have expired by now
    wait_until(lambda: link.connected, "the link to hold its identity")
    link.discover("svc")
    assert provider_ids(host, "svc") == [host.runtime_id(client)]


# --- a malicious provider behind the router (sec-relay) ----------------------------------------
# The attacker is a joined plugin whose address, once registered (the host checks it once),
# answers the router with raw bytes. It wants to reach the caller beyond its own answer (split
# headers into it, desynchronise its keep-alive connection) or to hold the host's threads.


class RawProvider:
    """Takes over a registered peer's port: answers each request with ``head``, then sends
    ``drip`` every 50 ms until the router closes the connection (``closed``) or 30 s pass."""

    def __init__(self, peer, head: bytes, drip: bytes = b"") -> None:
        assert peer.http is not None
        port = peer.http.port
        peer.http.close(grace=0)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen()
        self.head, self.drip = head, drip
        self.asked = threading.Event()
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="raw-provider", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:  # closed: the test is over
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            self.asked.set()
            conn.sendall(self.head)
            conn.settimeout(0.05)
            for _ in range(600):
                try:
                    if self.drip:
                        conn.sendall(self.drip)
                    if not conn.recv(65536):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
        self.closed.set()

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux)
        self._listener.close()
        self._thread.join(35)


@pytest.fixture
def raw_provider(peer) -> Iterator[Callable[..., tuple[RawProvider, Peer]]]:
    """``raw_provider(host, head, drip=b"")``: a provider of ``svc`` that answers raw bytes."""
    made: list[RawProvider] = []

    def make(host, head: bytes, drip: bytes = b""):
        provider = peer(host, "rogue")
        provider.register("svc")
        made.append(RawProvider(provider, head, drip))
        return made[-1], provider

    yield make
    for provider in made:
        provider.close()


def _call_through_router(host, caller, provider, headers: dict[str, str] | None = None) -> http.client.HTTPConnection:
    """A caller's keep-alive connection to the host with a routed unary call to ``provider`` sent."""
    conn = http.client.HTTPConnection(host.url.split("://")[1], timeout=10)
    conn.request(
        "POST",
        f"/services/svc/{provider.runtime_id}/Get",
        b"{}",
        {**caller.credentials(), "Content-Type": "application/json", **(headers or {})},
    )
    return conn


def _assert_the_host_answers_next(conn, caller):
    """The next request on a caller's connection gets the host's own answer (a registry call
    for a type nobody provides: not_found), not bytes a provider left behind."""
    conn.request("POST", "/connectplugin.v1.ServiceRegistry/DiscoverService", b'{"serviceType":"none"}',
                 {**caller.credentials(), "Content-Type": "application/json"})
    answer = conn.getresponse()
    assert (answer.status, json.loads(answer.read())["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: v\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: v\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \xb2\r\n\r\n{}",
    ],
    ids=["lone-LF-in-value", "lone-CR-in-value", "LF-in-reason", "NUL-in-value", "non-ASCII-digit-length"],
)
def test_a_provider_cannot_split_headers_into_its_callers_answer(host, peer, raw_provider, head):
    provider, registered = raw_provider(host, head)
    caller = peer(host, "caller")
    conn = _call_through_router(host, caller, registered)
    try:
        answer = conn.getresponse()
        body = json.loads(answer.read())
        assert (answer.status, body["code"], answer.getheader("Set-Cookie")) == (503, "unavailable", None)
        _assert_the_host_answers_next(conn, caller)  # the caller's connection is not desynchronised
    finally:
        conn.close()


def test_a_provider_sending_a_length_beside_chunks_cannot_desynchronise_its_callers_connection(host, peer, raw_provider):
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    provider, registered = raw_provider(host, head)
    caller = peer(host, "caller")
    conn = _call_through_router(host, caller, registered)
    try:
        answer = conn.getresponse()
        assert (answer.status, answer.getheader("Content-Length"), answer.read()) == (200, None, b"{}")
        if not answer.will_close:
            _assert_the_host_answers_next(conn, caller)
    finally:
        conn.close()


@pytest.mark.parametrize(
    "head, drip",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n", b" "),
        (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", b"X-T: 1\r\n"),
    ],
    ids=["trickled-body", "interim-flood", "trailer-flood"],
)
def test_a_trickling_provider_holds_the_router_no_longer_than_the_callers_deadline(make_host, peer, raw_provider, head, drip):
    host = make_host(router=RouterConfig(deadline_margin=0.1))
    provider, registered = raw_provider(host, head, drip)
    caller = peer(host, "caller")
    conn = _call_through_router(host, caller, registered, {"Connect-Timeout-Ms": "200", "Connect-Protocol-Version": "1"})
    try:
        assert provider.closed.wait(10), "the router kept reading from the provider past the deadline"
    finally:
        conn.close()


def test_a_trickling_provider_holds_the_router_no_longer_than_its_caller_stays(host, peer, raw_provider):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    provider, registered = raw_provider(host, head, b" ")
    caller = peer(host, "caller")
    conn = _call_through_router(host, caller, registered)  # no deadline: the host's unary_timeout (30 s) applies
    assert provider.asked.wait(10)
    conn.close()  # the caller gives up

    assert provider.closed.wait(10), "the router kept reading from the provider for a caller gone"


# --- the TLS server (cheroot) as strict as waitress ----------------------------------------------


def _raw_connection(server: HTTPServer, pki) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    if server.config.tls is None:
        return sock
    context = tls.client_context(tls.TLSConfig(trust=tls.Trust(cas=(pki.ca.certificate,))))
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def _exchange(sock: socket.socket, request: bytes) -> http.client.HTTPResponse:
    sock.sendall(request)
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    return answer


@BOTH_SERVERS
def test_an_apps_header_with_a_line_break_never_reaches_the_client(serve, pki):
    def splitting(environ, start_response):
        start_response("200 OK", [("X-A", "v\r\nSet-Cookie: injected=1"), ("Content-Length", "2")])
        return [b"{}"]

    with _raw_connection(serve(splitting), pki) as sock:
        answer = _exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (answer.status, answer.getheader("Set-Cookie")) == (500, None)


@BOTH_SERVERS
def test_an_answer_shorter_than_its_content_length_closes_the_connection(serve, pki):
    def short(environ, start_response):
        start_response("200 OK", [("Content-Length", "100")])
        return [b"{}"]

    with _raw_connection(serve(short), pki) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while True:  # the server must close, or the next answer would be read as this one's rest
            data = sock.recv(65536)
            if not data:
                break
            received += data
        assert received.endswith(b"{}")


@BOTH_SERVERS
@pytest.mark.parametrize(
    "line",
    [b"X\x0bA: 1", b"X-A: a\x00b", b"X-Plugin-Caller-ID\x0b: evil", b"X-A: a\nX-B: b", b"X-A: a\rb", b" X-A: folded, of no header"],
)
def test_a_request_header_with_a_control_character_a_bare_line_break_or_a_leading_fold_is_400(serve, pki, line):
    with _raw_connection(serve(hello), pki) as sock:
        answer = _exchange(sock, b"GET / HTTP/1.1\r\n" + line + b"\r\nHost: x\r\n\r\n")
        assert answer.status == 400


@pytest.mark.parametrize("server_kind", ["tls"], indirect=True)
def test_a_folded_request_header_line_is_400_over_tls(serve, pki):
    # RFC 9112 5.2 lets a server refuse obsolete line folding; waitress unfolds it instead.
    with _raw_connection(serve(hello), pki) as sock:
        answer = _exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n")
        assert answer.status == 400


@BOTH_SERVERS
def test_a_request_head_longer_than_one_read_arrives_whole(serve, pki):
    seen = []

    def app(environ, start_response):
        seen.append(len(environ.get("HTTP_X_BIG", "")))
        return hello(environ, start_response)

    with _raw_connection(serve(app), pki) as sock:  # 40 kB: more than the TLS reader takes at once
        answer = _exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert answer.status == 200
    assert seen == [40_000]


_LIMIT = HTTPConfig.max_request_header_size


@BOTH_SERVERS
@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * _LIMIT + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: a\r\n" * (_LIMIT // 8) + b"\r\n",
        b"GET /" + b"a" * _LIMIT + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["long-header", "many-headers", "long-request-line"],
)
def test_a_request_head_over_the_limit_is_431_and_closes_the_connection(serve, pki, head):
    with _raw_connection(serve(hello), pki) as sock:
        answer = _exchange(sock, head)
        assert (answer.status, answer.getheader("Connection")) == (431, "close")
        answer.read()
        assert sock.recv(1) == b""


@BOTH_SERVERS
def test_a_request_head_sent_forever_is_cut_off(serve, pki):
    # The server reads a head up to its limit, then refuses and closes: the sender is stopped
    # long before the 64 MiB go out (the TLS server buffered all it was sent until request_timeout).
    server = serve(hello)
    line = b"X-A: " + b"a" * 8000 + b"\r\n"
    sent = 0
    with _raw_connection(server, pki) as sock, pytest.raises((ConnectionError, ssl.SSLError)):  # not a timeout
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        while sent < 64 * 1024 * 1024:
            sock.sendall(line * 16)
            sent += len(line) * 16
    assert sent < 32 * 1024 * 1024, "the server kept reading the head"


def _reading(environ, start_response):
    environ["wsgi.input"].read()
    return hello(environ, start_response)


_CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@BOTH_SERVERS
@pytest.mark.parametrize(
    ("start", "more"),
    [(b"1;a=", b"b" * 65536), (b"", b"0" * 65536), (b"", b"10000\r\n" + b"a" * 65536 + b"\r\n")],
    ids=["endless-chunk-extension", "endless-chunk-size", "endless-chunks"],
)
def test_a_chunked_body_sent_forever_is_cut_off(http_config, pki, start, more):
    # The TLS server buffered a chunk size line however long, until request_timeout.
    config = dataclasses.replace(http_config, max_request_body_size=1024 * 1024)
    server = HTTPServer(_reading, config).start()
    sent = 0
    try:
        with _raw_connection(server, pki) as sock, pytest.raises((ConnectionError, ssl.SSLError)):  # not a timeout
            sock.sendall(_CHUNKED + start)
            while sent < 64 * 1024 * 1024:
                sock.sendall(more)
                sent += len(more)
    finally:
        server.close(grace=1.0)
    assert sent < 32 * 1024 * 1024, "the server kept reading the body"


@BOTH_SERVERS
def test_a_chunked_body_over_the_limit_is_413(http_config, pki):
    server = HTTPServer(_reading, dataclasses.replace(http_config, max_request_body_size=1024)).start()
    try:
        with _raw_connection(server, pki) as sock:
            answer = _exchange(sock, _CHUNKED + b"800\r\n" + b"a" * 2048 + b"\r\n0\r\n\r\n")
            assert answer.status == 413
    finally:
        server.close(grace=1.0)


@BOTH_SERVERS
@pytest.mark.parametrize("size", [b"0x5", b"+5", b"0_5", b" 5", b"5 ", b"\xd9\xa5"], ids=repr)
def test_a_chunk_size_int_would_take_but_http_forbids_is_400(serve, pki, size):
    # The TLS server took whatever int(x, 16) takes; waitress, and every strict reader after
    # it, would frame the same body differently.
    with _raw_connection(serve(_reading), pki) as sock:
        answer = _exchange(sock, _CHUNKED + size + b"\r\nhello\r\n0\r\n\r\n")
        assert answer.status == 400


@BOTH_SERVERS
def test_a_chunk_size_with_an_extension_is_read(serve, pki):
    with _raw_connection(serve(_reading), pki) as sock:
        answer = _exchange(sock, _CHUNKED + b"5;name=value\r\nhello\r\n0\r\n\r\n")
        assert (answer.status, answer.read()) == (200, b"hello")


@BOTH_SERVERS
def test_request_headers_reach_the_environ_where_wsgi_puts_them(serve, pki):
    seen: list[dict] = []

    def app(environ, start_response):
        seen.append({k: v for k, v in environ.items() if k.startswith(("HTTP_", "CONTENT_"))})
        environ["wsgi.input"].read()
        return hello(environ, start_response)

    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"x-custom-header: v\r\nAccept: a\r\nAccept: b\r\n\r\n{}"
    )
    with _raw_connection(serve(app), pki) as sock:
        for _ in range(2):  # the second on the same connection, its names seen before
            answer = _exchange(sock, request)
            assert (answer.status, answer.read()) == (200, b"hello")
    want = {
        "HTTP_HOST": "x",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "2",
        "HTTP_X_CUSTOM_HEADER": "v",
        "HTTP_ACCEPT": "a, b",
    }
    assert seen == [want, want]


@BOTH_SERVERS
def test_a_request_header_named_with_an_underscore_never_reaches_the_app(serve, pki):
    seen = []

    def app(environ, start_response):
        seen.extend(key for key in environ if key.startswith("HTTP_"))
        return hello(environ, start_response)

    with _raw_connection(serve(app), pki) as sock:
        answer = _exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization_: x\r\nX_Plugin_Caller_ID: evil\r\n\r\n")
        assert answer.status == 200
    assert seen == ["HTTP_HOST"]
