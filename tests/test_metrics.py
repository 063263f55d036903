"""The host's Prometheus metrics: scraped from /metrics of real hosts with real plugins and
parsed with prometheus_client's own text parser."""

from __future__ import annotations

import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import Client as WSGIClient

from connectplugin import (
    Code,
    ConnectError,
    MetricsConfig,
    MetricsUnavailableError,
    OperatorToken,
    PluginHost,
    RestartPolicy,
    RetryConfig,
)
from connectplugin.host.metrics import ERROR_BODY_LIMIT, end_stream_code
from connectplugin.rpc import _protocol
from samples.kv.gen.kv.v1 import kv_pb2
from tests.helpers import in_process, provider_process, wait_until
from tests.platform_plugins.provider import PLUGINS

TOKEN = "operator-secret-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def metered(make_host):
    """``metered(**fields)``: a host keeping metrics, readable with ``TOKEN``."""

    def make(**fields):
        return make_host(metrics=MetricsConfig(), operator_tokens=[OperatorToken(TOKEN)], **fields)

    return make


def scrape(host: PluginHost, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of the host's /metrics by (name, labels)."""
    response = requests.get(host.url + "/metrics", headers=AUTH if headers is None else headers, timeout=5)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- calls, errors, latency -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["subprocess", "in-process"])
def test_routed_and_direct_calls_are_counted_per_plugin_with_errors_by_code(metered, peer, where):
    host = metered()
    client = host.launch(provider_process("svc") if where == "subprocess" else in_process("svc", "svc"), name="kv")
    caller = peer(host, "caller")
    routed = caller.kv(caller.discover("svc"))
    direct = client.dispense("kv")

    for _ in range(3):
        routed.get(kv_pb2.GetRequest(key="a"))
    with pytest.raises(ConnectError):
        routed.get(kv_pb2.GetRequest(key="fail/not_found"))
    direct.get(kv_pb2.GetRequest(key="a"))
    with pytest.raises(ConnectError):
        direct.get(kv_pb2.GetRequest(key="fail/permission_denied"))

    samples = scrape(host)
    router, mine = {"plugin": "svc", "via": "router"}, {"plugin": "svc", "via": "host"}
    assert value(samples, "connectplugin_calls_total", **router) == 4
    assert value(samples, "connectplugin_call_errors_total", **router, code="not_found") == 1
    assert value(samples, "connectplugin_call_duration_seconds_count", **router) == 4
    # The host's own control calls (plugin info, identity, health) are not the application's.
    assert value(samples, "connectplugin_calls_total", **mine) == 2
    assert value(samples, "connectplugin_call_errors_total", **mine, code="permission_denied") == 1
    assert value(samples, "connectplugin_call_duration_seconds_count", **mine) == 2


def test_routed_calls_refused_before_a_provider_is_picked_are_counted_by_code(metered, peer):
    host = metered()
    host.launch(provider_process("svc"), name="kv")
    caller = peer(host, "caller")
    endpoint = caller.discover("svc")

    response = requests.post(
        host.url + endpoint.endpoint_url + "/Get", data=b"{}", headers={"Content-Type": "application/json"}, timeout=5
    )

    assert response.status_code == 401
    assert value(scrape(host), "connectplugin_router_refused_total", code="unauthenticated") == 1


@pytest.mark.parametrize("via", ["router", "host"])
def test_open_streams_are_a_gauge_and_a_stream_closed_early_ends_canceled(metered, peer, via):
    host = metered()
    client = host.launch(provider_process("svc"), name="kv")
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("svc")) if via == "router" else client.dispense("kv")
    labels = {"plugin": "svc", "via": via}

    stream = kv.watch(kv_pb2.WatchRequest(prefix="k"), timeout=30)
    kv.put(kv_pb2.PutRequest(key="k1", value=b"1"))
    assert next(stream).key == "k1"
    assert value(scrape(host), "connectplugin_streams_open", **labels) == 1

    stream.close()

    wait_until(
        lambda: value(scrape(host), "connectplugin_streams_open", **labels) == 0, "the stream to be counted closed"
    )
    samples = scrape(host)
    assert value(samples, "connectplugin_call_errors_total", **labels, code="canceled") == 1
    assert value(samples, "connectplugin_calls_total", **labels) == 2  # the stream and the put


@pytest.mark.parametrize(
    "error", [None, ConnectError(Code.PERMISSION_DENIED, "no")], ids=["clean", "permission_denied"]
)
@pytest.mark.parametrize("before", [b"", _protocol.envelope(0, b"\x02\x00\x00\x00\x05hello")], ids=["alone", "after-a-message"])
def test_a_streams_code_is_read_from_its_end_message(error, before):
    tail = before + _protocol.end_stream(error, [("k", "v")])

    assert end_stream_code(tail, "") == (error.code.value if error else None)


def test_a_stream_without_an_end_message_counts_as_unknown():
    assert end_stream_code(_protocol.envelope(0, b"half a stream"), "") == "unknown"


def test_an_end_message_larger_than_the_limit_counts_as_unknown():
    huge = ConnectError(Code.PERMISSION_DENIED, "x" * (ERROR_BODY_LIMIT + 10))

    assert end_stream_code(_protocol.end_stream(huge), "") == "unknown"


# --- supervision and health -------------------------------------------------------------------


def test_restarts_and_health_are_exported(metered):
    host = metered()
    fast = RestartPolicy(backoff=RetryConfig(initial_backoff=0.01, max_backoff=0.01, jitter=0.0))
    client = host.launch(provider_process("svc"), name="kv", restart=fast)
    samples = scrape(host)
    runtime_id = host.runtime_id(client)
    assert value(samples, "connectplugin_plugin_health", plugin="svc", runtime_id=runtime_id, state="healthy") == 1
    assert value(samples, "connectplugin_plugin_health", plugin="svc", runtime_id=runtime_id, state="unhealthy") == 0
    assert value(
        samples, "connectplugin_plugin_provides", plugin="svc", runtime_id=runtime_id, service_type="svc", version="1.0.0"
    ) == 1

    with pytest.raises(ConnectError):
        client.dispense("kv").get(kv_pb2.GetRequest(key="crash"))

    wait_until(
        lambda: value(scrape(host), "connectplugin_supervision_events_total", plugin="kv", event="restarted") == 1,
        "the restart to be counted",
    )
    samples = scrape(host)
    assert value(samples, "connectplugin_supervision_events_total", plugin="kv", event="crashed") == 1
    successor = host.runtime_id(host.current(client))
    assert value(samples, "connectplugin_plugin_health", plugin="svc", runtime_id=successor, state="healthy") == 1
    assert value(samples, "connectplugin_plugin_health", plugin="svc", runtime_id=runtime_id, state="healthy") == 0


def test_two_hosts_in_one_process_count_apart(metered):
    one, two = metered(), metered()
    clients = [host.launch(in_process("svc", "svc"), name="kv") for host in (one, two)]

    for _ in range(2):
        clients[0].dispense("kv").get(kv_pb2.GetRequest(key="a"))

    assert value(scrape(one), "connectplugin_calls_total", plugin="svc", via="host") == 2
    assert value(scrape(two), "connectplugin_calls_total", plugin="svc", via="host") == 0


# --- who may read them ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-the-operator-token"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
def test_a_stranger_is_refused_metrics(metered, headers):
    host = metered()

    response = requests.get(host.url + "/metrics", headers=headers, timeout=5)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "connectplugin_" not in response.text


def test_a_plugins_own_token_does_not_read_metrics(metered, peer):
    host = metered()
    plugin = peer(host, "nosy")

    response = requests.get(host.url + "/metrics", headers=plugin.credentials(), timeout=5)

    assert response.status_code == 401


def test_loopback_without_token_opens_metrics_to_this_machine_only(make_host):
    host = make_host(metrics=MetricsConfig(loopback_without_token=True))

    assert requests.get(host.url + "/metrics", timeout=5).status_code == 200
    # The same request from another machine (in-process WSGI: the peer address is all that differs).
    remote = WSGIClient(host.app).get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert remote.status_code == 401


def test_metrics_are_off_unless_configured(host):
    response = requests.get(host.url + "/metrics", headers=AUTH, timeout=5)

    assert response.status_code == 404
    assert "connectplugin[metrics]" in response.text
    assert host.metrics is None


def test_asking_for_metrics_without_prometheus_client_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # what an import finds when it is not installed
    from connectplugin import HandshakeConfig, HostConfig

    with pytest.raises(MetricsUnavailableError) as raised:
        PluginHost(HandshakeConfig("K", "V"), PLUGINS, HostConfig(metrics=MetricsConfig()))

    assert raised.value.requirement == "prometheus-client"
    assert raised.value.install == "pip install 'connectplugin[metrics]'"
