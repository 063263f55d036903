"""The plugin host: both plugin models joining it, the heartbeat reaper, its own endpoints."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import connectplugin
from connectplugin import (
    Code,
    ConnectError,
    ForkedProcessError,
    HealthReport,
    HealthState,
    HostConfig,
    HostLink,
    HTTPConfig,
    PluginHost,
    ServingStatus,
)
from connectplugin.gen.connectplugin.v1 import lifecycle_pb2, registry_pb2
from connectplugin.gen.connectplugin.v1.lifecycle_connect import PluginLifecycleClient
from samples.kv.gen.kv.v1 import kv_pb2
from samples.platform import HANDSHAKE
from tests.helpers import (
    ENV,
    HEALTHY,
    ROOT,
    free_port,
    in_forked_child,
    module,
    provider_ids,
    provider_process,
    wait_until,
)
from tests.platform_plugins.provider import PLUGINS

# --- starting and stopping --------------------------------------------------------------------


def test_constructing_a_host_starts_no_thread_binds_no_socket_and_installs_no_handler():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = HTTPConfig(port=taken.getsockname()[1])

        host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(http=busy, handle_signals=True))

    assert set(threading.enumerate()) == threads
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    with pytest.raises(RuntimeError):
        host.url  # noqa: B018 - known only once started
    host.close()


def test_start_serves_at_the_hosts_url_and_returns_the_host():
    host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(http=HTTPConfig(threads=2)))
    try:
        assert host.start() is host
        assert requests.get(host.url + "/healthz", timeout=5).status_code == 200
        assert host.start() is host  # already started: nothing more happens
    finally:
        host.close()


def test_a_closed_host_cannot_be_started():
    host = PluginHost(HANDSHAKE, PLUGINS)
    host.close()

    with pytest.raises(RuntimeError):
        host.start()


_SIGNALS_SCRIPT = """
import os
import signal
from connectplugin import HostConfig, PluginHost
from samples.platform import HANDSHAKE
before = signal.getsignal(signal.SIGTERM)
with PluginHost(HANDSHAKE, {}):
    print(signal.getsignal(signal.SIGTERM) is before)
with PluginHost(HANDSHAKE, {}, HostConfig(handle_signals=True)):
    print(signal.getsignal(signal.SIGTERM) is before)
"""


def test_a_started_host_leaves_signals_alone_unless_told_to_handle_them():
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALS_SCRIPT],
        cwd=ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.stdout.split() == ["True", "False"], done.stderr


def test_the_hosts_http_config_reaches_its_listener(make_host):
    host = make_host(http=HTTPConfig(threads=2, max_request_body_size=1024))

    response = requests.post(
        host.url + "/connectplugin.v1.HandshakeService/Handshake",
        data=b"x" * 4096,
        headers={"Content-Type": "application/proto"},
        timeout=5,
    )

    assert response.status_code == 413


# --- the two plugin models --------------------------------------------------------------------


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
    first = make_host(http=HTTPConfig(port=port, threads=8))
    sidecar("samples.platform.storage", "--host-url", first.url)
    [first_id] = wait_until(
        lambda: provider_ids(first, "storage"), "storage to join the first host", timeout=10
    )

    first.close()
    second = make_host(http=HTTPConfig(port=port, threads=8))

    [runtime_id] = wait_until(
        lambda: provider_ids(second, "storage"), "storage to rejoin the new host", timeout=6
    )
    # A new identity from the new host's handshake, not the old one carried over.
    assert runtime_id != first_id and second.identities.get(runtime_id) is not None


def test_self_registered_plugin_that_goes_silent_is_dropped_and_watchers_are_told(
    make_host, sidecar, peer
):
    host = make_host(heartbeat_timeout=1.0)
    proc = sidecar("samples.platform.storage", "--host-url", host.url)
    [runtime_id] = wait_until(
        lambda: provider_ids(host, "storage"), "storage to register", timeout=10
    )
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


def test_a_quiet_identity_that_provides_nothing_is_not_reaped(make_host, peer):
    host = make_host(heartbeat_timeout=0.3)
    link = HostLink()
    link.attach(connectplugin.Health(), (), host.url)
    link.connect(HANDSHAKE, "caller", "1.0.0", base_url="")
    wait_until(lambda: host.reported_health(link.runtime_id), "the caller's one health report")
    # A provider that falls silent after the caller, and gone (its health check unanswered):
    # the reaper looks at the caller no later than at the provider, so once the provider is
    # dropped the caller has been judged.
    provider = peer(host, "provider", provides=("svc",))
    provider.register("svc")
    assert provider.http is not None
    provider.http.close(grace=0)

    wait_until(
        lambda: host.identities.get(provider.runtime_id) is None,
        "the silent provider to be dropped",
    )

    assert host.identities.get(link.runtime_id) is not None
    link.close()


def test_a_silent_provider_answering_not_serving_is_passed_over_until_it_serves_again(make_host, peer):
    host = make_host(heartbeat_timeout=0.3)
    provider = peer(host, "provider", provides=("svc",))
    provider.register("svc")

    def health() -> HealthState:
        return host.registry.providers("svc")[0].health

    provider.server.health.set_service("", ServingStatus.NOT_SERVING)
    wait_until(lambda: health() is HealthState.UNHEALTHY, "the health check to find it not serving")
    with pytest.raises(ConnectError) as e:
        host.discover("svc")
    assert e.value.code is Code.UNAVAILABLE

    provider.server.health.set_service("", ServingStatus.SERVING)
    wait_until(lambda: health() is HealthState.HEALTHY, "the health check to find it serving again")
    assert host.discover("svc").provider_id == provider.runtime_id


# --- the host's own endpoints -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_host_answers_its_health_endpoints(host, path):
    response = requests.get(host.url + path, timeout=5)
    assert (response.status_code, response.text) == (200, "ok\n")


# --- health -----------------------------------------------------------------------------------


def test_health_listeners_get_each_report_as_a_health_report(host):
    reports: list[tuple[str, HealthReport]] = []
    host.on_health(lambda runtime_id, report: reports.append((runtime_id, report)))

    client = host.launch(module("samples.platform.logger"), name="logger")

    [(runtime_id, report)] = wait_until(lambda: reports[:1], "the logger's first health report")
    assert runtime_id == host.runtime_id(client)
    assert isinstance(report, HealthReport) and report.state is HealthState.HEALTHY
    assert host.reported_health(runtime_id) == reports[-1][1]


def test_a_health_report_with_an_unknown_state_is_invalid_argument_and_changes_nothing(host, peer):
    caller = peer(host, "reporter")
    lifecycle = PluginLifecycleClient(caller.api)

    with pytest.raises(connectplugin.ConnectError) as e:
        lifecycle.report_health(lifecycle_pb2.ReportHealthRequest(state=42))  # type: ignore[arg-type]

    assert e.value.code is connectplugin.Code.INVALID_ARGUMENT
    assert host.reported_health(caller.runtime_id) is None


# --- fork safety: a child never touches its parent's plugins ----------------------------------


def test_a_forked_child_closing_its_copy_of_the_host_leaves_the_parents_plugin_running(host):
    plugin = host.launch(provider_process("svc"))
    pid = plugin.running.pid

    def child() -> dict:
        started = time.monotonic()
        host.close()
        connectplugin.host.pluginhost._exit_hooks._close_all()  # what atexit runs in the child
        return {"seconds": time.monotonic() - started}

    report = in_forked_child(child)

    assert report["seconds"] < 0.5
    assert plugin.running.alive() and plugin.running.pid == pid
    assert plugin.check_health() is connectplugin.ServingStatus.SERVING


def test_a_forked_child_is_refused_the_parents_host_plugins_and_clients(host):
    plugin = host.launch(provider_process("svc"))
    parent = os.getpid()

    def refused(action) -> list:
        try:
            action()
        except ForkedProcessError as e:
            return [e.owner_pid, e.pid]
        return []

    def child() -> dict:
        return {
            "start": refused(host.start),
            "launch": refused(lambda: host.launch(provider_process("svc"))),
            "stop": refused(lambda: host.stop(plugin)),
            "call": refused(plugin.check_health),
            "stdin_closed": plugin.running._proc.stdin.closed,
        }

    report = in_forked_child(child)

    forked = [parent, report["start"][1]]
    assert forked[1] != parent
    assert {k: v for k, v in report.items() if k != "stdin_closed"} == dict.fromkeys(
        ("start", "launch", "stop", "call"), forked
    )
    assert report["stdin_closed"]  # the plugin still sees EOF when the parent dies
    assert plugin.running.alive() and not plugin.running._proc.stdin.closed


def test_a_host_constructed_before_a_fork_and_started_after_it_serves_in_the_child():
    host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(http=HTTPConfig(threads=2)))

    def child() -> dict:
        with host:
            status = requests.get(host.url + "/healthz", timeout=5).status_code
        return {"status": status}

    assert in_forked_child(child) == {"status": 200}
    host.close()


# --- mounted: the host's endpoints inside another WSGI stack ----------------------------------


def test_a_mounted_host_serves_its_endpoints_under_the_prefix_without_a_server_of_its_own(serve):
    host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(stop_grace=1.0))
    outer = serve(DispatcherMiddleware(_not_found, {"/_plugins": host.app}))
    try:
        assert host.mount(outer.url + "/_plugins/") is host
        # The plugin registers and reports health through the outer server's port.
        client = host.launch(module("samples.platform.logger"), name="logger")
        runtime_id = host.runtime_id(client)
        report = wait_until(lambda: host.reported_health(runtime_id), "a report through the mount")

        assert host.url == outer.url + "/_plugins"
        assert report.state == HEALTHY
        assert [p.provider_id for p in host.registry.providers("logger")] == [runtime_id]
        assert requests.get(host.url + "/readyz", timeout=5).status_code == 200
        servers = [t.name for t in threading.enumerate() if t.name.startswith("waitress:")]
        assert servers == [f"waitress:{outer.port}"]
    finally:
        host.close()


def test_a_host_mounts_only_at_an_absolute_url():
    host = PluginHost(HANDSHAKE, PLUGINS)
    with pytest.raises(ValueError):
        host.mount("/_plugins")


def _not_found(environ, start_response):
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]
