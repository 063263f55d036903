"""The router: plugin-to-plugin calls through the host, credentials stopping at it, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import requests

import connectplugin
from connectplugin import (
    BreakerConfig,
    BreakerState,
    CancelToken,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    RouterConfig,
    ServeConfig,
)
from connectplugin.gen.connectplugin.v1 import lifecycle_pb2
from connectplugin.runtime.credentials import HOST_SECRET_HEADER
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from tests.helpers import (
    AVAILABLE,
    ENV,
    ROOT,
    STATE,
    UNAVAILABLE,
    UNHEALTHY,
    Clock,
    Reader,
    host_secret,
    in_process,
    provider_ids,
    provider_process,
    wait_until,
)

# --- the router -------------------------------------------------------------------------------


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
        "connectplugin.v1.PluginControl",
        "Shutdown",
        lifecycle_pb2.ShutdownRequest,
        lifecycle_pb2.ShutdownResponse,
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


def test_unary_calls_pass_through_the_router_both_ways(host, peer):
    host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("svc"))

    kv.put(kv_pb2.PutRequest(key="k", value=b"\x00value"))
    assert kv.get(kv_pb2.GetRequest(key="k")) == kv_pb2.GetResponse(value=b"\x00value", found=True)
    with pytest.raises(ConnectError) as e:
        kv.get(kv_pb2.GetRequest(key=""))  # the provider's own error comes back as it is
    assert e.value.code is Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "service_url", [True, False], ids=["endpoint_url+method", "full-procedure-path"]
)
def test_router_serves_the_go_form_and_the_full_procedure_path(host, peer, service_url):
    a = peer(host, "a", provides=("svc",))
    a.register("svc")
    caller = peer(host, "caller")
    url = host.url + caller.discover("svc").endpoint_url
    config = ClientConfig(timeout=5, headers=caller.credentials(), service_url=service_url)
    with Client(url, config) as client:
        kv = KVServiceClient(client)
        kv.put(kv_pb2.PutRequest(key="k", value=b"v"))
        assert kv.get(kv_pb2.GetRequest(key="whoami")).value == b"a"
        assert kv.get(kv_pb2.GetRequest(key="k")).value == b"v"


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


def test_a_quiet_routed_stream_gives_the_caller_its_headers_at_once(host, peer):
    host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")
    kv = caller.kv(endpoint)
    # Without the headers watch() would wait for them until the stream ends at this deadline.
    streamer = KVServiceClient(caller.client(caller.host_url + endpoint.endpoint_url, timeout=10))

    with streamer.watch(kv_pb2.WatchRequest(prefix="quiet")) as stream:
        assert stream.headers["content-type"] == "application/connect+proto"
        kv.put(kv_pb2.PutRequest(key="quiet", value=b"1"))
        assert next(iter(stream)).key == "quiet"  # still open: it returned before any message


# --- streams released -------------------------------------------------------------------------


class _Admissions:
    """Opens watches one at a time, keeping those admitted: a refused one holds no slot, so
    trying again never competes with the streams whose release is awaited."""

    def __init__(self, kv: KVServiceClient, streamer: KVServiceClient) -> None:
        self._kv = kv
        self._streamer = streamer
        self.held: list = []

    def one_more(self) -> bool:
        stream = self._streamer.watch(kv_pb2.WatchRequest(prefix="again"))
        self._kv.put(kv_pb2.PutRequest(key="again", value=b"1"))
        try:
            next(iter(stream))  # an admitted watch hears the put; a refused one ends
        except ConnectError as e:
            assert e.code is Code.RESOURCE_EXHAUSTED
            return False
        self.held.append(stream)
        return True

    def close(self) -> None:
        for stream in self.held:
            stream.close()


def test_a_killed_caller_holding_routed_streams_leaves_host_and_plugin_serving(host, peer):
    client = host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")
    url = caller.host_url + endpoint.endpoint_url
    count = ServeConfig().http.max_streams  # every stream slot the plugin has
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.platform_plugins.stream_caller", url, str(count)],
        cwd=ROOT,
        env={**os.environ, **ENV, "CALLER_RUNTIME_ID": caller.runtime_id, "CALLER_TOKEN": caller.token},
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()

    # Within 2 s: routed, direct, dispensed and probed, each with a 2 s deadline.
    routed = KVServiceClient(caller.client(url, timeout=2))
    direct = KVServiceClient(
        caller.client(client.url, timeout=2, extra={HOST_SECRET_HEADER: host_secret(host, client)})
    )
    routed.put(kv_pb2.PutRequest(key="k", value=b"v"))
    assert routed.get(kv_pb2.GetRequest(key="k")).value == b"v"
    assert direct.get(kv_pb2.GetRequest(key="k")).value == b"v"
    assert client.dispense("kv").get(kv_pb2.GetRequest(key="k"), timeout=2).value == b"v"
    assert requests.get(host.url + "/healthz", timeout=2).status_code == 200
    # The router saw its caller go and closed the upstreams; the plugin saw them close.
    admissions = _Admissions(routed, KVServiceClient(caller.client(url, timeout=None)))
    try:
        for _ in range(count):
            wait_until(admissions.one_more, "a stream slot of the killed caller to be free")
    finally:
        admissions.close()


@pytest.mark.parametrize("path", ["direct", "routed"])
def test_a_cancelled_call_and_a_closed_stream_reach_the_providers_handler(host, peer, path):
    client = host.launch(provider_process("svc"), name="p")
    caller = peer(host, "caller")
    if path == "routed":
        url, extra = caller.host_url + caller.discover("svc").endpoint_url, None
    else:
        url, extra = client.url, {HOST_SECRET_HEADER: host_secret(host, client)}
    # A minute's deadline: what releases the handler is the cancel, never its deadline.
    held = KVServiceClient(caller.client(url, timeout=60, extra=extra))
    probe = KVServiceClient(caller.client(url, extra=extra))

    def state(name: str) -> bytes:
        return probe.get(kv_pb2.GetRequest(key=f"held/{name}")).value

    token = CancelToken()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            held.get(kv_pb2.GetRequest(key="hold/unary"), cancel=token)
        except ConnectError as e:
            outcome.append(e)

    caller_thread = threading.Thread(target=call, name="test-caller")
    caller_thread.start()
    wait_until(lambda: state("unary") == b"holding", "the provider to hold the call")
    token.cancel()
    caller_thread.join(timeout=10)

    assert not caller_thread.is_alive()
    assert [e.code for e in outcome] == [Code.CANCELED]  # type: ignore[attr-defined]
    wait_until(lambda: state("unary") == b"released", lambda: f"the handler to see its client go: {state('unary')!r}")

    # A stream closed by its caller, and one whose token is cancelled.
    watchers = lambda: probe.get(kv_pb2.GetRequest(key="watchers")).value  # noqa: E731
    streams = KVServiceClient(caller.client(url, timeout=None, extra=extra))
    stream_token = CancelToken()
    closed = streams.watch(kv_pb2.WatchRequest(prefix="a"))
    cancelled = streams.watch(kv_pb2.WatchRequest(prefix="b"), cancel=stream_token)
    wait_until(lambda: watchers() == b"2", "both watches to be open")
    closed.close()
    wait_until(lambda: watchers() == b"1", lambda: f"the closed watch to end: {watchers()!r} open")
    stream_token.cancel()
    wait_until(lambda: watchers() == b"0", lambda: f"the cancelled watch to end: {watchers()!r} open")
    with pytest.raises(ConnectError) as e:
        next(iter(cancelled))
    assert e.value.code is Code.CANCELED


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
    # Withdrawn by the router before it answered, not when the host notices the exit.
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


def test_provider_that_drops_the_connection_is_withdrawn_before_the_caller_hears(host, peer, hang_up):
    provider = peer(host, "p", provides=("svc",))
    # Straight into the registry: through the host API a base URL is checked once and fixed.
    host.registry.register(provider.runtime_id, "svc", "1.0.0", KV_PLUGIN.service_path, hang_up)
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("svc"))

    with pytest.raises(ConnectError) as e:
        kv.get(kv_pb2.GetRequest(key="k"))

    assert e.value.code is Code.UNAVAILABLE
    with pytest.raises(ConnectError) as gone:
        caller.discover("svc")
    assert gone.value.code is Code.UNAVAILABLE


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


# --- deadlines and circuit breakers -------------------------------------------------------------


def test_routed_call_without_a_deadline_ends_at_the_routers_unary_timeout(make_host, peer):
    host = make_host(router=RouterConfig(unary_timeout=0.3))
    provider = peer(host, "p", provides=("svc",))
    provider.register("svc")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")
    patient = KVServiceClient(caller.client(caller.host_url + endpoint.endpoint_url, timeout=None))

    with pytest.raises(ConnectError) as e:
        patient.get(kv_pb2.GetRequest(key="sleep/1"))

    assert e.value.code is Code.DEADLINE_EXCEEDED
    assert caller.discover("svc").provider_id == provider.runtime_id  # slow is not gone


def test_router_config_keeps_at_least_the_first_and_the_latest_alias():
    with pytest.raises(ValueError):
        RouterConfig(max_aliases=1)


def test_router_breaker_opens_per_provider_fails_fast_and_closes_after_probes(make_host, peer):
    clock = Clock()
    breakers = BreakerConfig(failure_threshold=2, reset_timeout=10, success_threshold=2, clock=clock)
    host = make_host(router=RouterConfig(breaker=breakers))
    failing, healthy = peer(host, "p", provides=("svc",)), peer(host, "q", provides=("svc",))
    failing.register("svc")
    healthy.register("svc")
    caller = peer(host, "caller")
    to_failing, to_healthy = (
        caller.kv(host.registry.endpoint(host.registry.provider(p.runtime_id, "svc"))) for p in (failing, healthy)
    )
    for _ in range(2):
        with pytest.raises(ConnectError):
            to_failing.get(kv_pb2.GetRequest(key="fail/unavailable"))

    with pytest.raises(ConnectError) as e:
        to_failing.get(kv_pb2.GetRequest(key="k"))

    assert e.value.code is Code.UNAVAILABLE
    assert f"circuit breaker open for provider {failing.runtime_id}" in e.value.message
    assert to_healthy.get(kv_pb2.GetRequest(key="whoami")).value == b"q"  # its own breaker
    assert failing.runtime_id in provider_ids(host, "svc")  # open, not withdrawn
    clock.advance(10)
    for _ in range(2):
        to_failing.get(kv_pb2.GetRequest(key="k"))
    assert host.router.breaker(failing.runtime_id).state is BreakerState.CLOSED


def test_a_providers_answers_to_bad_calls_do_not_open_its_breaker(make_host, peer):
    host = make_host(router=RouterConfig(breaker=BreakerConfig(failure_threshold=2)))
    provider = peer(host, "p", provides=("svc",))
    provider.register("svc")
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("svc"))
    for _ in range(3):
        with pytest.raises(ConnectError):
            kv.get(kv_pb2.GetRequest(key="fail/not_found"))

    assert kv.get(kv_pb2.GetRequest(key="whoami")).value == b"p"
    assert host.router.breaker(provider.runtime_id).state is BreakerState.CLOSED
