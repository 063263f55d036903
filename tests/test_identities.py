"""Runtime identities: every host API and the router accept a plugin's own credentials only."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from connectplugin import Client, ClientConfig, Code, ConnectError
from connectplugin.gen.connectplugin.v1 import broker_pb2, lifecycle_pb2, registry_pb2
from connectplugin.gen.connectplugin.v1.broker_connect import CapabilityBrokerClient
from connectplugin.gen.connectplugin.v1.lifecycle_connect import PluginLifecycleClient
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from tests.helpers import HEALTHY, UNHEALTHY, World

# --- authentication ---------------------------------------------------------------------------


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
def test_host_api_refuses_bad_credentials(world, api, credentials):
    headers = CREDENTIALS[credentials](world)
    with Client(world.host.url, ClientConfig(timeout=5, headers=headers)) as client:
        with pytest.raises(ConnectError) as e:
            HOST_APIS[api](world, client)
    # Without a runtime id a host API call is malformed (invalid_argument, as the Go host
    # answers); the router answers unauthenticated, as the Go router's 401.
    malformed = "X-Plugin-Runtime-ID" not in headers and api != "router"
    assert e.value.code is (Code.INVALID_ARGUMENT if malformed else Code.UNAUTHENTICATED)
    # Nothing happened on a's behalf.
    [provider] = world.host.registry.providers("svc")
    assert (provider.registration_id, provider.health) == (world.registration, HEALTHY)


@pytest.mark.parametrize("api", HOST_APIS)
def test_host_api_accepts_the_plugins_own_credentials(world, api):
    with Client(world.host.url, ClientConfig(timeout=5, headers=world.a.credentials())) as client:
        HOST_APIS[api](world, client)
