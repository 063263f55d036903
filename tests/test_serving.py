"""The plugin side of serving, as its host sees it: the identity a plugin accepts, what a
plugin that cannot join says, the threads it keeps for unary calls while streams are open."""

from __future__ import annotations

import logging
import threading

import pytest
import requests

from connectplugin import (
    CertificateIdentity,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    HTTPConfig,
    PluginServer,
    ServeConfig,
    ServingStatus,
    TLSConfig,
    Trust,
)
from connectplugin.gen.connectplugin.v1 import plugininfo_pb2
from connectplugin.gen.connectplugin.v1.plugininfo_connect import PluginIdentityClient
from connectplugin.rpc import tls
from connectplugin.runtime.credentials import HOST_SECRET_HEADER
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.platform import HANDSHAKE
from tests.helpers import host_secret, provider_ids, provider_process, wait_until
from tests.platform_plugins.provider import PLUGINS, Recorder

# --- runtime identity -------------------------------------------------------------------------


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


def test_a_runtime_identity_with_no_host_url_for_a_plugin_that_knows_none_is_refused(serve):
    # What the Go reference's Platform sends: its plugins are told the host URL at start.
    server = PluginServer(PLUGINS, {"kv": Recorder("p")}, HANDSHAKE, ServeConfig(allow_unauthenticated=True))
    url = serve(server.wsgi).url
    request = plugininfo_pb2.SetRuntimeIdentityRequest(runtime_id="p-1", runtime_token="t" * 32)

    with Client(url, ClientConfig(timeout=5)) as client, pytest.raises(ConnectError) as e:
        PluginIdentityClient(client).set_runtime_identity(request)

    assert e.value.code is Code.FAILED_PRECONDITION
    assert not server.link.connected
    server.link.close()


# --- joining by itself --------------------------------------------------------------------------


def test_a_plugin_that_cannot_join_says_why_once_and_keeps_trying(make_host, pki, caplog):
    host = make_host(
        http=HTTPConfig(threads=4, tls=TLSConfig(key_pair=pki.host, trust=Trust(cas=(pki.ca.certificate,)))),
        certificate_identities=[CertificateIdentity("kv", ["svc"])],
        dev_cookie_joins=False,
    )
    stranger = tls.make_dev_pki(["kv"])  # another CA, which did not issue the host's certificate
    own = TLSConfig(key_pair=stranger.plugins["kv"], trust=Trust(cas=(stranger.ca.certificate,)))
    config = ServeConfig(
        self_id="kv", self_version="1.0.0", host_url=host.url, http=HTTPConfig(threads=2, tls=own),
        heartbeat_interval=0.02,
    )
    server = PluginServer(PLUGINS, {"kv": Recorder("kv")}, HANDSHAKE, config)
    url = server.listen()
    caplog.set_level(logging.DEBUG, "connectplugin.plugin")
    threads = [
        threading.Thread(target=server.run, name="joiner"),
        threading.Thread(target=server._stay_joined, args=(url,), name="joiner-join"),
    ]
    for thread in threads:
        thread.start()

    def attempts() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("cannot join the host")]

    try:
        wait_until(lambda: len(attempts()) >= 3, "three attempts to join", timeout=30)
    finally:
        server.stop(grace=0)
        for thread in threads:
            thread.join(timeout=10)

    [warning] = [r for r in attempts() if r.levelno == logging.WARNING]
    assert f"cannot join the host at {host.url}: unavailable: " in warning.getMessage()
    assert "the server's certificate is not from a CA (or a pinned certificate) the client trusts" in warning.getMessage()
    assert not server.link.connected


# --- streams and threads ----------------------------------------------------------------------


def test_open_streams_up_to_the_cap_leave_unary_calls_and_probes_served_and_one_more_is_refused(
    host,
):
    client = host.launch(provider_process("svc"), name="p")
    assert ServeConfig().http.max_streams == 8
    secret = {HOST_SECRET_HEADER: host_secret(host, client)}
    streams_client = Client(client.url, ClientConfig(headers=secret))  # no deadline: watches stay open
    kv = KVServiceClient(streams_client)
    watches = []
    try:
        # watch() returns once the stream's headers are in, so each of these holds its slot.
        watches = [kv.watch(kv_pb2.WatchRequest(prefix="w")) for _ in range(8)]

        with pytest.raises(ConnectError) as refused:
            next(iter(kv.watch(kv_pb2.WatchRequest(prefix="w"))))

        unary = KVServiceClient(Client(client.url, ClientConfig(timeout=5, headers=secret)))
        unary.put(kv_pb2.PutRequest(key="w1", value=b"v"))
        assert unary.get(kv_pb2.GetRequest(key="w1")).value == b"v"
        assert client.check_health() is ServingStatus.SERVING
        assert requests.get(client.url + "/healthz", timeout=5).status_code == 200
        assert [next(iter(w)).key for w in watches] == ["w1"] * 8
    finally:
        for w in watches:
            w.close()
        streams_client.close()
    assert refused.value.code is Code.RESOURCE_EXHAUSTED


def test_a_stream_the_caller_closes_gives_its_slot_back(host):
    client = host.launch(provider_process("svc"), name="p")
    secret = {HOST_SECRET_HEADER: host_secret(host, client)}
    streams_client = Client(client.url, ClientConfig(headers=secret))
    kv = KVServiceClient(streams_client)
    unary = KVServiceClient(Client(client.url, ClientConfig(timeout=5, headers=secret)))
    cap = ServeConfig().http.max_streams
    watches = [kv.watch(kv_pb2.WatchRequest(prefix="w")) for _ in range(cap)]

    def admitted() -> bool:
        with kv.watch(kv_pb2.WatchRequest(prefix="w")) as stream:
            unary.put(kv_pb2.PutRequest(key="w", value=b"v"))
            try:
                return next(iter(stream)).key == "w"
            except ConnectError as e:
                assert e.code is Code.RESOURCE_EXHAUSTED
                return False

    try:
        assert not admitted()
        watches.pop().close()
        wait_until(admitted, "the closed stream's slot to admit a new one")
    finally:
        for w in watches:
            w.close()
        streams_client.close()
