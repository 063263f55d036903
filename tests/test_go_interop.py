"""Against the Go reference itself (masegraye/connect-plugin-go at 6f150b6, as ``goref``).

Each test runs the real Go program next to ours, one row of docs/go-compat.md each: a Go
client's handshake and ours with the other's plugin (unary, stream, health); the same bad
request answered with the same code by both; app version fallback; the samples' KV
contract; our plugin self-registering with the Go host and called through the Go router
(HostLink); the Go platform (Model A) adding our running plugin; each launcher starting
the other's plugins; a Go plugin self-registering with our host and called through our
router. They skip, naming the missing file, on a checkout without ``../shared/goref/goref.xz``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest
import requests

from connectplugin import (
    Client,
    ClientConfig,
    Code,
    ConnectError,
    HandshakeConfig,
    Health,
    HostLink,
    LaunchContext,
    LaunchError,
    LaunchFailure,
    PluginClient,
    PluginClientConfig,
    PluginNotServedError,
    PluginServer,
    ProcessStrategy,
    ServingStatus,
)
from connectplugin.gen.connectplugin.health.v1 import health_pb2
from connectplugin.gen.connectplugin.health.v1.health_connect import HealthServiceClient
from connectplugin.gen.connectplugin.v1 import handshake_pb2, lifecycle_pb2, registry_pb2
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.gen.connectplugin.v1.lifecycle_connect import PluginLifecycleClient
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.runtime import handshake as hs
from connectplugin.runtime.launcher import PORT_ENV
from connectplugin.runtime.serving import ENV_ALLOW_UNAUTHENTICATED, ENV_HOST_URL
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from samples.kv.store import KVStore
from tests.helpers import (
    ENV,
    GO_HANDSHAKE,
    HEALTHY,
    ROOT,
    GoProcess,
    Reader,
    free_port,
    http_ok,
    listening,
    wait_until,
)

GO_KV = "tests.platform_plugins.go_kv"
"""Our sample KV store as a plugin under the Go reference's magic cookie."""

SERVING = health_pb2.SERVING_STATUS_SERVING


def go_address() -> tuple[str, str]:
    """A free loopback address for a Go server, as its ``-addr`` flag and as a URL."""
    addr = f"127.0.0.1:{free_port()}"
    return addr, f"http://{addr}"


def go_host(go) -> str:
    """``goref host`` on a free port, once it answers; returns its URL."""
    addr, url = go_address()
    go("host", "-addr", addr)
    wait_until(lambda: http_ok(url + "/health"), "the Go host to answer /health", timeout=10)
    return url


def caller(host_url: str) -> HostLink:
    """A plugin's link to the host at ``host_url``, joined as ``caller`` (close it after)."""
    link = HostLink()
    link.attach(Health(), (), host_url)
    try:
        link.connect(GO_HANDSHAKE, "caller", "1.0.0", base_url="")
    except BaseException:
        link.close()
        raise
    return link


def go_plugin(go, *flags: str) -> str:
    """``goref kv`` (the Go reference's KV plugin) on a free port, once it serves; its URL."""
    addr, url = go_address()
    go("kv", "-addr", addr, *flags)
    wait_until(lambda: http_ok(url + "/healthz"), "the Go plugin to serve", timeout=10)
    return url


def our_plugin(serve, handshake=GO_HANDSHAKE) -> str:
    """Our sample KV plugin under ``handshake`` (the Go cookie), served ungated; its URL."""
    return serve(PluginServer({"kv": KV_PLUGIN}, {"kv": KVStore()}, handshake).app).url


def code_of(call) -> Code | None:
    """The Connect code ``call()`` fails with; None when it succeeds."""
    try:
        call()
    except ConnectError as e:
        return e.code
    return None


def handshake(url: str, request: handshake_pb2.HandshakeRequest) -> handshake_pb2.HandshakeResponse:
    with Client(url, ClientConfig(timeout=5)) as client:
        return HandshakeServiceClient(client).handshake(request)


def check(url: str, service: str) -> int:
    with Client(url, ClientConfig(timeout=5)) as client:
        return (
            HealthServiceClient(client).check(health_pb2.HealthCheckRequest(service=service)).status
        )


# --- health ------------------------------------------------------------------------------------


def test_our_plugin_answers_health_for_its_plugin_name_as_the_go_plugin_does(go, serve):
    addr, go_url = go_address()
    go("kv", "-addr", addr)
    wait_until(lambda: http_ok(go_url + "/healthz"), "the Go plugin to serve", timeout=10)
    ours = serve(PluginServer({"kv": KV_PLUGIN}, {"kv": KVStore()}, GO_HANDSHAKE).app)
    assert check(go_url, "kv") == check(ours.url, "kv") == SERVING
    assert check(ours.url, "kv.v1.KVService") == SERVING


# --- a Go client and ours, each with the other's plugin --------------------------------------------


def go_client_handshake(requested: list[str]) -> handshake_pb2.HandshakeRequest:
    """What the Go reference's ``Client.Connect`` sends (client.go): its one app version, no
    version list, its own metadata. (goref has no KV client subcommand: this is its request.)"""
    return handshake_pb2.HandshakeRequest(
        core_protocol_version=1,
        app_protocol_version=1,
        magic_cookie_key=GO_HANDSHAKE.magic_cookie_key,
        magic_cookie_value=GO_HANDSHAKE.magic_cookie_value,
        requested_plugins=requested,
        client_metadata={"client_version": "0.1.0"},
    )


def test_our_plugin_answers_the_go_clients_handshake_as_the_go_plugin_does(go, serve):
    request = go_client_handshake(["kv"])

    answers = [handshake(url, request) for url in (go_plugin(go), our_plugin(serve))]

    # What the Go client checks: core 1, its own app version, every requested plugin listed.
    go_answer, ours = [(a.core_protocol_version, a.app_protocol_version, [p.name for p in a.plugins]) for a in answers]
    assert go_answer == ours == (1, 1, ["kv"])
    # A deviation no Go peer reads (docs/go-compat.md): Go's generated metadata names the
    # service bare, ours as the path prefix.
    assert [a.plugins[0].service_path for a in answers] == ["kv.v1.KVService", "/kv.v1.KVService/"]


def test_our_client_calls_a_go_plugin_unary_stream_and_health(go):
    client = PluginClient(go_plugin(go), {"kv": KV_PLUGIN}, GO_HANDSHAKE)
    try:
        answer = client.handshake()
        assert (answer.app_protocol_version, [p.name for p in answer.plugins]) == (1, ["kv"])
        kv = client.dispense("kv")
        # The Go store's watch opens with a "_watch_started" event.
        watch = Reader(lambda: client.dispense("kv").watch(kv_pb2.WatchRequest(prefix="w")), until=lambda e: e.key == "w")

        def put_seen() -> bool:
            kv.put(kv_pb2.PutRequest(key="w", value=b"go"))
            return watch.ended.is_set()

        wait_until(put_seen, "a watch event from the Go plugin")
        assert (watch.messages[-1].type, watch.messages[-1].value) == (kv_pb2.EVENT_TYPE_PUT, b"go")
        watch.join()
        assert kv.get(kv_pb2.GetRequest(key="w")) == kv_pb2.GetResponse(value=b"go", found=True)
        assert kv.delete(kv_pb2.DeleteRequest(key="w")) == kv_pb2.DeleteResponse(found=True)
        assert kv.get(kv_pb2.GetRequest(key="w")) == kv_pb2.GetResponse(found=False)
        assert client.check_health("kv") is ServingStatus.SERVING
        assert client.check_health() is ServingStatus.SERVING
    finally:
        client.close()


# --- the same bad request, the same answer -------------------------------------------------------


def test_a_core_version_mismatch_is_invalid_argument_from_go_and_from_us(go, serve, make_host):
    request = hs.request_for(GO_HANDSHAKE, ["kv"])
    request.core_protocol_version = 2
    urls = {
        "Go plugin": go_plugin(go),
        "Go host": go_host(go),
        "our plugin": our_plugin(serve),
        "our host": go_kv_host(make_host).url,
    }

    codes = {who: code_of(lambda url=url: handshake(url, request)) for who, url in urls.items()}

    assert codes == dict.fromkeys(urls, Code.INVALID_ARGUMENT)


def test_a_host_api_call_without_a_runtime_id_is_invalid_argument_from_go_and_from_us(go, make_host):
    register = registry_pb2.RegisterServiceRequest(
        service_type="kv", version="1.0.0", endpoint_path=KV_PLUGIN.service_path,
        metadata={"base_url": "http://127.0.0.1:9"},
    )
    report = lifecycle_pb2.ReportHealthRequest(state=HEALTHY)
    hosts = {"Go host": go_host(go), "our host": go_kv_host(make_host).url}

    def codes(headers: dict[str, str]) -> dict[str, tuple]:
        found = {}
        for who, url in hosts.items():
            with Client(url, ClientConfig(timeout=5, headers=headers)) as client:
                found[who] = (
                    code_of(lambda: ServiceRegistryClient(client).register_service(register)),
                    code_of(lambda: PluginLifecycleClient(client).report_health(report)),
                )
        return found

    invalid = (Code.INVALID_ARGUMENT, Code.INVALID_ARGUMENT)
    assert codes({}) == codes({"Authorization": "Bearer x"}) == {"Go host": invalid, "our host": invalid}
    # A runtime id with a wrong token: the Go host takes it (it checks no token there); ours
    # stays unauthenticated (a deliberate deviation, docs/go-compat.md).
    wrong = {"X-Plugin-Runtime-ID": "kv-0000", "Authorization": "Bearer x"}
    assert codes(wrong) == {
        "Go host": (None, None),
        "our host": (Code.UNAUTHENTICATED, Code.UNAUTHENTICATED),
    }


def test_a_routed_call_without_a_runtime_id_is_unauthenticated_from_go_and_from_us(go, make_host):
    hosts = {"Go host": go_host(go), "our host": go_kv_host(make_host).url}

    def get(url: str) -> None:
        with Client(url + "/services/kv/kv-0000", ClientConfig(timeout=5, service_url=True)) as client:
            KVServiceClient(client).get(kv_pb2.GetRequest(key="k"))

    assert {who: code_of(lambda url=url: get(url)) for who, url in hosts.items()} == dict.fromkeys(
        hosts, Code.UNAUTHENTICATED
    )


def test_an_unknown_requested_plugin_is_left_out_of_the_answer_by_go_and_by_us(go, serve):
    request = hs.request_for(GO_HANDSHAKE, ["kv", "cache"])
    plugins = {"Go plugin": go_plugin(go), "our plugin": our_plugin(serve)}

    answered = {who: [p.name for p in handshake(url, request).plugins] for who, url in plugins.items()}

    assert answered == dict.fromkeys(plugins, ["kv"])


def test_our_client_names_the_plugin_a_go_plugin_or_ours_does_not_serve(go, serve):
    cache = dataclasses.replace(KV_PLUGIN, name="cache")
    for url in (go_plugin(go), our_plugin(serve)):
        client = PluginClient(url, {"kv": KV_PLUGIN, "cache": cache}, GO_HANDSHAKE, name="store")
        try:
            with pytest.raises(PluginNotServedError) as e:
                client.dispense("kv")
        finally:
            client.close()
        assert (e.value.plugin, e.value.url, e.value.missing, e.value.served) == ("store", url, ("cache",), ("kv",))
        assert "'store'" in str(e.value) and "cache" in str(e.value)


# --- app protocol versions --------------------------------------------------------------------

V1_V2 = HandshakeConfig(GO_HANDSHAKE.magic_cookie_key, GO_HANDSHAKE.magic_cookie_value, (1, 2))
"""The Go cookie, offering app protocol versions 1 and 2 (the Go reference speaks only 1)."""


def test_a_go_plugin_refuses_another_app_version_by_name_and_our_v1_plugin_negotiates(go, serve):
    request = hs.request_for(V1_V2, ["kv"])  # asks for 2, lists 1 and 2

    with pytest.raises(ConnectError) as e:
        handshake(go_plugin(go), request)
    assert e.value.code is Code.FAILED_PRECONDITION
    assert "version mismatch: client=2, server=1" in e.value.message
    assert handshake(our_plugin(serve), request).app_protocol_version == 1


def test_our_client_offering_versions_1_and_2_settles_on_1_with_a_go_plugin_and_with_ours(go, serve):
    for url in (go_plugin(go), our_plugin(serve)):
        client = PluginClient(url, {"kv": KV_PLUGIN}, V1_V2)
        try:
            assert client.app_protocol_version == 1
            kv = client.dispense("kv")
            assert kv.put(kv_pb2.PutRequest(key="v", value=b"1")) == kv_pb2.PutResponse()
            assert kv.get(kv_pb2.GetRequest(key="v")) == kv_pb2.GetResponse(value=b"1", found=True)
        finally:
            client.close()


def test_our_client_with_no_version_the_go_plugin_speaks_fails_naming_both(go):
    v2_v3 = dataclasses.replace(V1_V2, app_protocol_versions=(2, 3))
    client = PluginClient(go_plugin(go), {"kv": KV_PLUGIN}, v2_v3, name="kv")
    try:
        with pytest.raises(ConnectError) as e:
            client.handshake()
    finally:
        client.close()
    assert e.value.code is Code.FAILED_PRECONDITION
    assert "plugin 'kv' supports [1]" in e.value.message and "[2, 3]" in e.value.message


def test_our_plugin_offering_versions_1_and_2_joins_the_go_host_on_1(go):
    host_url = go_host(go)
    link = HostLink()
    link.attach(Health(), (), host_url)
    try:
        link.connect(V1_V2, "versions", "1.0.0", base_url="")
        assert link.runtime_id.startswith("versions-")
        with pytest.raises(ConnectError) as e:  # an identity the Go host accepts
            link.discover("nothing")
        assert e.value.code is Code.NOT_FOUND
    finally:
        link.close()


# --- the samples' KV contract ------------------------------------------------------------------


def test_our_client_with_use_get_gets_from_a_go_plugin_as_from_ours(go, serve):
    config = PluginClientConfig(rpc=ClientConfig(timeout=5, use_get=True))
    for url in (go_plugin(go), our_plugin(serve)):
        # Get declares no idempotency level in Go's testdata: a GET is refused by both...
        query = "?connect=v1&encoding=json&message=%7B%7D"
        refused = requests.get(f"{url}/kv.v1.KVService/Get{query}", timeout=5)
        assert (refused.status_code, refused.headers.get("Allow")) == (405, "POST")
        # ...so our client posts it, even configured to use GET where it may.
        client = PluginClient(url, {"kv": KV_PLUGIN}, GO_HANDSHAKE, config=config)
        try:
            kv = client.dispense("kv")
            kv.put(kv_pb2.PutRequest(key="g", value=b"posted"))
            assert kv.get(kv_pb2.GetRequest(key="g")) == kv_pb2.GetResponse(value=b"posted", found=True)
        finally:
            client.close()


# --- our plugin with the Go host ---------------------------------------------------------------


def test_host_link_calls_a_peer_through_the_go_router_in_its_path_form(go, sidecar):
    host_url = go_host(go)
    sidecar(GO_KV, "--host-url", host_url)
    link = caller(host_url)
    try:
        endpoint = wait_until(
            lambda: _discovered(link, "kv"), "our plugin to register with the Go host"
        )
        assert endpoint.endpoint_url == f"/services/kv/{endpoint.provider_id}"
        assert endpoint.provider_id.startswith("py-kv")
        kv = link.client("kv", KVServiceClient, timeout=5)
        watch = Reader(
            lambda: link.client("kv", KVServiceClient).watch(kv_pb2.WatchRequest(prefix="a")),
            limit=1,
        )
        kv.put(kv_pb2.PutRequest(key="a", value=b"through Go"))
        assert kv.get(kv_pb2.GetRequest(key="a")) == kv_pb2.GetResponse(
            value=b"through Go", found=True
        )

        # The watch may open after a put: put until it has seen one (each put is an event).
        def put_seen() -> list:
            kv.put(kv_pb2.PutRequest(key="a", value=b"through Go"))
            return watch.messages

        wait_until(put_seen, "a watch event")
        event = watch.messages[0]
        assert (event.key, event.value) == ("a", b"through Go")
        watch.join()
    finally:
        link.close()


def _discovered(link: HostLink, service_type: str):
    try:
        return link.discover(service_type).endpoint
    except ConnectError:
        return None


def test_the_go_platform_adds_our_running_plugin_which_registers_and_reports_health(go):
    addr, host_url = go_address()
    # Started by hand for a Go platform: the cookie, the host's URL (the Go Platform sends
    # none with the identity), and no host secret, since a Go host presents none.
    plugin = GoProcess(
        [sys.executable, "-m", GO_KV],
        {
            GO_HANDSHAKE.magic_cookie_key: GO_HANDSHAKE.magic_cookie_value,
            ENV_HOST_URL: host_url,
            ENV_ALLOW_UNAUTHENTICATED: "1",
        },
    )
    try:
        plugin_url = plugin.line("1|1|")
        # GetPluginInfo, SetRuntimeIdentity, then it waits for our HEALTHY report.
        added = go("platform", "-plugin", plugin_url, "-addr", addr).line("ADDED", timeout=40)
        runtime_id, path = added.strip("[]").split()
        assert runtime_id.startswith("py-kv-") and path == KV_PLUGIN.service_path
        link = caller(host_url)
        try:
            endpoint = wait_until(lambda: _discovered(link, "kv"), "our plugin's registration")
            assert endpoint.provider_id == runtime_id
            kv = link.client("kv", KVServiceClient, timeout=5)
            kv.put(kv_pb2.PutRequest(key="model", value=b"A"))
            assert kv.get(kv_pb2.GetRequest(key="model")).value == b"A"
        finally:
            link.close()
        assert check(plugin_url, "kv") == SERVING
    finally:
        plugin.stop()


# --- launch models -----------------------------------------------------------------------------


def test_the_go_launcher_starts_our_plugin_which_joins_the_go_host(go, tmp_path):
    host_url = go_host(go)
    # The Go launcher runs a program without arguments, as PluginSpec.BinaryPath.
    program = tmp_path / "py-kv"
    program.write_text(f"#!/bin/sh\nexec {sys.executable} -m {GO_KV}\n")
    program.chmod(0o755)
    port = free_port()
    launcher = go("launch", "-binary", str(program), "-port", str(port), "-host-url", host_url, "-hold", "60s")

    assert launcher.line("LAUNCHED").split()[0] == f"http://localhost:{port}"
    link = caller(host_url)
    try:
        endpoint = wait_until(lambda: _discovered(link, "kv"), "our plugin to join the Go host")
        assert endpoint.metadata["base_url"] == f"http://127.0.0.1:{port}"
        kv = link.client("kv", KVServiceClient, timeout=5)
        kv.put(kv_pb2.PutRequest(key="launched", value=b"by Go"))
        assert kv.get(kv_pb2.GetRequest(key="launched")).value == b"by Go"
    finally:
        link.close()
    launcher.stop()  # the Go launcher stops its plugin with SIGINT
    wait_until(lambda: not listening(port), "our plugin to exit with its launcher", timeout=10)


def go_plugin_program(goref: str, tmp_path, *flags: str) -> str:
    """A program written for the Go launcher: ``goref kv`` told its port and host by PORT and
    HOST_URL (what a Go plugin's main reads), with ``flags`` added."""
    program = tmp_path / "go-kv"
    extra = " ".join(flags)
    program.write_text(f'#!/bin/sh\nexec {goref} kv -addr "127.0.0.1:$PORT" -host-url "$HOST_URL" {extra}\n')
    program.chmod(0o755)
    return str(program)


def test_our_port_env_launcher_starts_a_go_plugin_which_joins_the_go_host(go, goref, tmp_path):
    host_url = go_host(go)
    strategy = ProcessStrategy(
        [go_plugin_program(goref, tmp_path)], env={"CONNECTPLUGIN_DISABLE_TLS_WARNING": "1"}, protocol=PORT_ENV
    )
    running = strategy.start(LaunchContext("kv", GO_HANDSHAKE, {"kv": KV_PLUGIN}, host_url))
    try:
        assert running.joins_by_itself
        link = caller(host_url)
        try:
            endpoint = wait_until(lambda: _discovered(link, "kv"), "the Go plugin to join the Go host")
            assert endpoint.metadata["base_url"] == running.url
            kv = link.client("kv", KVServiceClient, timeout=5)
            kv.put(kv_pb2.PutRequest(key="k", value=b"v"))
            assert kv.get(kv_pb2.GetRequest(key="k")).value == b"v"
        finally:
            link.close()
    finally:
        running.stop(grace=5)
    assert not running.alive()


def test_a_port_env_plugin_that_never_listens_fails_its_launch_as_silent(tmp_path):
    program = tmp_path / "deaf"
    program.write_text("#!/bin/sh\nexec sleep 30\n")
    program.chmod(0o755)
    strategy = ProcessStrategy([str(program)], protocol=PORT_ENV, start_timeout=0.5)

    with pytest.raises(LaunchError) as e:
        strategy.start(LaunchContext("deaf", GO_HANDSHAKE, {"kv": KV_PLUGIN}, "http://127.0.0.1:9"))
    assert e.value.reason is LaunchFailure.SILENT
    assert "answer on port" in e.value.detail


# --- a Go plugin with our host -------------------------------------------------------------------


def go_kv_host(make_host, **fields):
    """Our host speaking the Go reference's cookie; Go plugins join it with the cookie alone,
    from loopback, through the development switch (``dev_cookie_joins``, make_host's default)."""
    return make_host(handshake=GO_HANDSHAKE, plugins={"kv": KV_PLUGIN}, **fields)


def test_a_go_plugin_joins_our_host_and_stays_while_it_answers_health_checks(go, make_host, peer, caplog):
    caplog.set_level(logging.DEBUG, logger="connectplugin.host")
    host = go_kv_host(make_host, heartbeat_timeout=0.5)
    addr, plugin_url = go_address()
    plugin = go("kv", "-addr", addr, "-host-url", host.url, "-self-id", "go-kv")  # reports health once
    runtime_id = plugin.line("RUNTIME_ID")
    plugin.line("REPORTED_HEALTH")
    link = caller(host.url)
    try:
        endpoint = link.discover("kv").endpoint
        assert endpoint.provider_id == runtime_id
        assert endpoint.metadata["base_url"] == plugin_url
        kv = link.client("kv", KVServiceClient, timeout=5)
        # The Go store's watch opens with a "_watch_started" event.
        stream = link.client("kv", KVServiceClient)
        watch = Reader(lambda: stream.watch(kv_pb2.WatchRequest(prefix="g")), until=lambda e: e.key == "g")

        def put_seen() -> bool:
            kv.put(kv_pb2.PutRequest(key="g", value=b"routed"))
            return watch.ended.is_set()

        wait_until(put_seen, "a watch event through our router")
        assert (watch.messages[-1].key, watch.messages[-1].value) == ("g", b"routed")
        watch.join()
        assert kv.get(kv_pb2.GetRequest(key="g")) == kv_pb2.GetResponse(value=b"routed", found=True)
        assert check(plugin_url, "kv") == SERVING

        # Silent past heartbeat_timeout, it is asked, answers, and stays.
        wait_until(
            lambda: any(runtime_id in r.getMessage() and "answers health checks" in r.getMessage() for r in caplog.records),
            "the host to check the silent Go plugin's health",
        )
        assert [p.provider_id for p in host.registry.providers("kv")] == [runtime_id]
        assert kv.get(kv_pb2.GetRequest(key="g")).value == b"routed"

        # Gone, it no longer answers: withdrawn.
        plugin.stop()
        wait_until(lambda: not host.registry.providers("kv"), "the stopped Go plugin to be withdrawn")
        assert host.identities.get(runtime_id) is None
    finally:
        link.close()


def test_our_host_launches_a_go_plugin_in_the_go_launch_model(go, goref, make_host, tmp_path):
    host = go_kv_host(make_host)
    strategy = ProcessStrategy(
        [go_plugin_program(goref, tmp_path, "-self-id", "launched-go-kv")],
        env={"CONNECTPLUGIN_DISABLE_TLS_WARNING": "1"},
        protocol=PORT_ENV,
    )

    client = host.launch(strategy, name="kv")

    runtime_id = host.runtime_id(client)
    assert runtime_id.startswith("launched-go-kv-")
    assert host.discover("kv").provider_id == runtime_id
    assert client.dispense("kv").put(kv_pb2.PutRequest(key="direct", value=b"1")) == kv_pb2.PutResponse()
    link = caller(host.url)
    try:
        kv = link.client("kv", KVServiceClient, timeout=5)
        assert kv.get(kv_pb2.GetRequest(key="direct")).value == b"1"
    finally:
        link.close()
    host.stop(client)
    assert not host.registry.providers("kv")
    assert not client.running.alive()


def test_a_go_plugin_launched_into_a_host_that_admits_no_joiners_fails_saying_why(go, goref, make_host, tmp_path):
    host = go_kv_host(make_host, dev_cookie_joins=False)
    strategy = ProcessStrategy([go_plugin_program(goref, tmp_path)], protocol=PORT_ENV)

    with pytest.raises(LaunchError) as e:
        host.launch(strategy, name="kv")

    # goref kv joins before it listens, and exits when the host refuses it.
    assert e.value.reason is LaunchFailure.EXITED
    assert "does not accept self-registering plugins" in "\n".join(e.value.stderr_tail)


def test_a_port_env_plugin_that_listens_first_fails_at_once_where_no_joiner_is_admitted(make_host):
    host = go_kv_host(make_host, dev_cookie_joins=False)
    ours = ProcessStrategy([sys.executable, "-m", GO_KV], env=ENV, cwd=str(ROOT), protocol=PORT_ENV)

    with pytest.raises(LaunchError) as e:
        host.launch(ours, name="kv")

    assert e.value.reason is LaunchFailure.SETUP
    assert "dev_cookie_joins" in e.value.detail
    assert not host.registry.providers("kv")
