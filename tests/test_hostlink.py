"""The host link from a plugin's side: calls on its host that must outlive ordinary timeouts,
and the clients it hands out for peers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from connectplugin import Call, ClientConfig, Health, HostLink, HostLinkConfig
from connectplugin.rpc.client import DEFAULT_TIMEOUT
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.platform import HANDSHAKE
from tests.helpers import Reader

# --- watching ---------------------------------------------------------------------------------


def test_hostlink_watch_outlives_the_host_clients_call_timeout(host):
    # Long enough for the handshake on a loaded machine, short enough to outlive quickly.
    link = HostLink(HostLinkConfig(call_timeout=1.0))
    link.attach(Health(), (), host.url)
    try:
        link.connect(HANDSHAKE, "watcher", "1.0.0", base_url="")
        watcher = Reader(lambda: link.watch("svc"))
        watcher.wait_for(1)
        ended = watcher.ended.wait(1.5)  # well past one call timeout
        assert not ended, f"the watch ended: {watcher.error}"
    finally:
        host.registry.close_watchers()
        link.close()


# --- clients of peers -------------------------------------------------------------------------


def test_peer_clients_take_a_config_and_interceptors_and_keep_this_plugins_credentials(host, peer):
    provider = peer(host, "p", provides=("svc",))
    provider.register("svc")
    link = HostLink()
    link.attach(Health(), (), host.url)
    seen: list[Call] = []

    def record(call: Call, proceed: Callable[[Call], Any]) -> Any:
        seen.append(call)
        return proceed(call)

    try:
        link.connect(HANDSHAKE, "caller", "1.0.0", base_url="")
        tuned = link.client("svc", KVServiceClient, config=ClientConfig(timeout=2.5), interceptors=[record])
        plain = link.client("svc", KVServiceClient)

        tuned_saw = json.loads(tuned.get(kv_pb2.GetRequest(key="headers")).value)
        plain_saw = json.loads(plain.get(kv_pb2.GetRequest(key="headers")).value)
    finally:
        link.close()

    assert [call.method.name for call in seen] == ["Get"]
    assert tuned_saw["x-plugin-caller-id"] == plain_saw["x-plugin-caller-id"] == link.runtime_id
    assert tuned_saw["connect-timeout-ms"] == "2500"
    assert plain_saw["connect-timeout-ms"] == str(int(DEFAULT_TIMEOUT * 1000))
