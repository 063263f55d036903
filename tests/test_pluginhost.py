"""The plugin host: both plugin models joining it, the heartbeat reaper, its own endpoints."""

from __future__ import annotations

import pytest
import requests

import connectplugin
from connectplugin import HostLink
from connectplugin.gen.connectplugin.v1 import registry_pb2
from samples.kv.gen.kv.v1 import kv_pb2
from samples.platform import HANDSHAKE
from tests.helpers import HEALTHY, free_port, module, provider_ids, wait_until

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
    # A provider that falls silent after the caller: the reaper looks at the caller no later
    # than at the provider, so once the provider is dropped the caller has been judged.
    provider = peer(host, "provider", provides=("svc",))
    provider.register("svc")

    wait_until(
        lambda: host.identities.get(provider.runtime_id) is None,
        "the silent provider to be dropped",
    )

    assert host.identities.get(link.runtime_id) is not None
    link.close()


# --- the host's own endpoints -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_host_answers_its_health_endpoints(host, path):
    response = requests.get(host.url + path, timeout=5)
    assert (response.status_code, response.text) == (200, "ok\n")
