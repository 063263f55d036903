"""A server for the fuzz tests to attack from outside: ``python -m tests.fuzz_target host|plugin``.

It prints one JSON line (its URL, and for the host the credentials and paths a caller
would use), then serves until its standard input closes. Running it as a process lets the
fuzz test read its memory (``/proc/<pid>/status``) and its log (stderr) as an operator would.

- ``plugin``: the sample KV store, standalone and open to any caller (``--insecure``).
- ``host``: a host with a launched KV provider of type ``svc``, a joined caller and a
  ``logger`` capability granted to it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any

from connectplugin import (
    Client,
    ClientConfig,
    HostConfig,
    HTTPConfig,
    JoinToken,
    PluginHost,
    PluginServer,
    ServeConfig,
)
from connectplugin.gen.connectplugin.v1 import broker_pb2
from connectplugin.gen.connectplugin.v1.broker_connect import CapabilityBrokerClient
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.runtime import handshake as hs
from samples.kv import plugin
from samples.kv.store import KVStore
from samples.platform import HANDSHAKE
from samples.platform.capabilities import HostLogger
from tests.helpers import provider_process
from tests.platform_plugins.provider import PLUGINS


def _plugin() -> tuple[dict[str, Any], Any]:
    config = ServeConfig(http=HTTPConfig(threads=4), self_id="kv-store", allow_unauthenticated=True)
    server = PluginServer(plugin.PLUGINS, {"kv": KVStore()}, plugin.HANDSHAKE, config)
    url = server.listen()
    serving = threading.Thread(target=server.run, name="plugin-serving", daemon=True)
    serving.start()
    return {"url": url}, lambda: server.stop(grace=0, reason="fuzzing over")


def _host() -> tuple[dict[str, Any], Any]:
    caller = JoinToken("fuzzing-caller-join-token", name="caller")  # may call, provides nothing
    host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(http=HTTPConfig(threads=8), join_tokens=[caller])).start()
    host.broker.add("logger", "1.0.0", HostLogger())
    host.launch(provider_process("svc"), name="p")
    with Client(host.url, ClientConfig(timeout=5)) as client:
        request = hs.request_for(HANDSHAKE, (), self_id="caller", self_version="1.0.0")
        request.client_metadata[hs.JOIN_TOKEN_KEY] = caller.secret
        joined = HandshakeServiceClient(client).handshake(request)
    credentials = {"X-Plugin-Runtime-ID": joined.runtime_id, "Authorization": f"Bearer {joined.runtime_token}"}
    with Client(host.url, ClientConfig(timeout=5, headers=credentials)) as client:
        grant = CapabilityBrokerClient(client).request_capability(
            broker_pb2.RequestCapabilityRequest(capability_type="logger")
        ).grant
    provider = host.discover("svc")
    facts = {
        "url": host.url,
        "credentials": credentials,
        "routed": f"/services/svc/{provider.provider_id}",
        "grant": {"path": grant.endpoint_url[len(host.url) :], "token": grant.bearer_token},
    }
    return facts, host.close


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    facts, stop = _host() if sys.argv[1:] == ["host"] else _plugin()
    print(json.dumps(facts), flush=True)
    try:
        sys.stdin.read()
    finally:
        stop()


if __name__ == "__main__":
    main()
