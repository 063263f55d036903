"""The capability broker: grants that open one capability until they expire or are revoked."""

from __future__ import annotations

import pytest

from connectplugin import Client, ClientConfig, Code, ConnectError, HostLink
from connectplugin.gen.capability.logger.v1 import logger_pb2
from connectplugin.gen.capability.logger.v1.logger_connect import LoggerClient
from connectplugin.gen.connectplugin.v1 import broker_pb2
from connectplugin.gen.connectplugin.v1.broker_connect import CapabilityBrokerClient
from samples.platform.capabilities import HostLogger
from tests.helpers import Clock, Peer, in_process

# --- capabilities -----------------------------------------------------------------------------


def _grant(peer_: Peer, capability_type: str = "logger") -> broker_pb2.CapabilityGrant:
    request = broker_pb2.RequestCapabilityRequest(capability_type=capability_type, reason="test")
    return CapabilityBrokerClient(peer_.api).request_capability(request).grant


def _log_with(grant: broker_pb2.CapabilityGrant, token: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {grant.bearer_token if token is None else token}"}
    with Client(grant.endpoint_url, ClientConfig(timeout=5, headers=headers)) as client:
        LoggerClient(client).log(logger_pb2.LogRequest(level="info", message="hello"))


def test_handshake_response_advertises_the_hosts_capabilities(world):
    [capability] = world.a.handshake.host_capabilities
    assert (capability.type, capability.version) == ("logger", "1.0.0")
    assert capability.endpoint == f"{world.host.url}/capabilities/logger"


def test_capability_grant_opens_its_capability(world):
    grant = _grant(world.a)

    _log_with(grant)

    assert [e.message for e in world.logger.entries] == ["hello"]
    assert grant.endpoint_url == f"{world.host.url}/capabilities/logger/{grant.grant_id}"


def test_expired_grant_is_unauthenticated(make_host, peer):
    clock = Clock()
    host = make_host(grant_ttl=60.0, clock=clock)
    host.broker.add("logger", "1.0.0", HostLogger())
    grant = _grant(peer(host, "a"))
    clock.advance(59.5)
    _log_with(grant)  # good while it lasts

    clock.advance(0.5)
    with pytest.raises(ConnectError) as e:
        _log_with(grant)
    assert e.value.code is Code.UNAUTHENTICATED


def test_revoked_grant_is_unauthenticated(world):
    grant = _grant(world.a)
    _log_with(grant)

    world.host.broker.revoke(grant.grant_id)
    with pytest.raises(ConnectError) as e:
        _log_with(grant)
    assert e.value.code is Code.UNAUTHENTICATED


@pytest.mark.parametrize("token", ["", "not-the-token", "another grant's"])
def test_capability_endpoint_refuses_a_token_that_is_not_the_grants(world, token):
    grant = _grant(world.a)
    if token == "another grant's":
        token = _grant(world.b).bearer_token

    with pytest.raises(ConnectError) as e:
        _log_with(grant, token)
    assert e.value.code is Code.UNAUTHENTICATED
    assert world.logger.entries == []


def test_stopping_a_plugin_revokes_its_grants(host):
    host.broker.add("logger", "1.0.0", HostLogger())
    link = HostLink()
    client = host.launch(in_process("p", "svc", link=link), name="p")
    logger = link.capability("logger", LoggerClient)
    logger.log(logger_pb2.LogRequest(message="before"))

    host.stop(client, grace=0)
    with pytest.raises(ConnectError) as e:
        logger.log(logger_pb2.LogRequest(message="after"))
    assert e.value.code is Code.UNAUTHENTICATED


def test_a_grant_stops_working_once_its_holders_identity_is_revoked(host):
    host.broker.add("logger", "1.0.0", HostLogger())
    link = HostLink()
    host.launch(in_process("p", "svc", link=link), name="p")
    logger = link.capability("logger", LoggerClient)
    logger.log(logger_pb2.LogRequest(message="before"))

    host.identities.revoke(link.runtime_id)

    with pytest.raises(ConnectError) as e:
        logger.log(logger_pb2.LogRequest(message="after"))
    assert e.value.code is Code.UNAUTHENTICATED
