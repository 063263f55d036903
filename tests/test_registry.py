"""The service registry: provider selection, version floors, health order, and watchers."""

from __future__ import annotations

import threading

import pytest

from connectplugin import (
    Client,
    ClientConfig,
    Code,
    ConnectError,
    Health,
    HostLink,
    HTTPConfig,
    RegistryConfig,
)
from connectplugin.gen.connectplugin.v1 import registry_pb2
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.host.registry import Declared, Registry
from samples.kv.gen.kv.v1 import kv_pb2
from tests.helpers import (
    AVAILABLE,
    DEGRADED,
    HEALTHY,
    SERVICE_DEGRADED,
    STATE,
    UNAVAILABLE,
    UNHEALTHY,
    Peer,
    in_process,
    wait_until,
)

# --- selection --------------------------------------------------------------------------------


def _providers(
    host, peer, count: int, service_type: str = "svc", **metadata_by_name: dict[str, str]
) -> list[Peer]:
    made = []
    for i in range(count):
        p = peer(host, f"p{i}", provides=(service_type,))
        p.register(service_type, **metadata_by_name.get(f"p{i}", {}))
        made.append(p)
    return made


def test_first_strategy_always_picks_the_earliest_usable_provider(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="first"))
    p0, _, _ = _providers(host, peer, 3)
    caller = peer(host, "caller")

    assert {caller.discover("svc").provider_id for _ in range(6)} == {p0.runtime_id}


def test_round_robin_strategy_cycles_through_every_provider_in_turn(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="round_robin"))
    providers = _providers(host, peer, 3)
    caller = peer(host, "caller")

    picks = [caller.discover("svc").provider_id for _ in range(9)]
    assert sorted(picks[:3]) == sorted(p.runtime_id for p in providers)
    assert picks == picks[:3] * 3


def test_random_strategy_spreads_picks_over_every_provider(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="random"))
    providers = _providers(host, peer, 3)
    caller = peer(host, "caller")

    picks = [caller.discover("svc").provider_id for _ in range(150)]
    # Expected 50 each; fewer than 15 has a probability around 1e-9.
    counts = {p.name: picks.count(p.runtime_id) for p in providers}
    assert min(counts.values()) >= 15, counts


def test_weighted_strategy_follows_the_weight_metadata(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="weighted"))
    zero, light, heavy = _providers(
        host, peer, 3, p0={"weight": "0"}, p1={"weight": "1"}, p2={"weight": "9"}
    )
    caller = peer(host, "caller")

    picks = [caller.discover("svc").provider_id for _ in range(300)]
    assert picks.count(zero.runtime_id) == 0
    # Expected 30 light and 270 heavy; light reaching 60 is more than five deviations away.
    assert 0 < picks.count(light.runtime_id) < 60
    assert picks.count(heavy.runtime_id) > 240


def test_discovered_endpoint_routes_to_the_picked_provider(host, peer):
    p0, p1 = _providers(host, peer, 2)
    p0.report(UNHEALTHY)
    caller = peer(host, "caller")

    endpoint = caller.discover("svc")
    assert endpoint.provider_id == p1.runtime_id
    assert caller.kv(endpoint).get(kv_pb2.GetRequest(key="whoami")).value == b"p1"


@pytest.mark.parametrize(
    "versions, min_version, picked",
    [
        pytest.param(["1.9.0", "1.10.0"], "1.10.0", "1.10.0", id="numeric-not-lexical"),
        pytest.param(["1.9.0", "1.10.0"], "1.9.5", "1.10.0", id="between"),
        pytest.param(["1.0.0-rc.1", "1.0.0"], "1.0.0", "1.0.0", id="pre-release-below-release"),
        pytest.param(
            ["1.0.0-rc.2", "1.0.0-rc.10"], "1.0.0-rc.3", "1.0.0-rc.10", id="numeric-pre-release-ids"
        ),
        pytest.param(
            ["1.0.0-alpha", "1.0.0-alpha.1"],
            "1.0.0-alpha.0",
            "1.0.0-alpha.1",
            id="longer-pre-release-higher",
        ),
        pytest.param(
            ["1.0.0-alpha.beta", "1.0.0-beta"],
            "1.0.0-alpha.gamma",
            "1.0.0-beta",
            id="text-pre-release-ids",
        ),
        pytest.param(["0.9.0", "2.0.0"], "v2", "2.0.0", id="v-prefixed-short-floor"),
        pytest.param(["1.2.3"], "1.2.3+build.5", "1.2.3", id="build-metadata-ignored"),
        pytest.param(["1.2.2", "1.2.3"], "1.2.3+build-7", "1.2.3", id="build-metadata-with-hyphen-ignored"),
    ],
)
def test_min_version_admits_only_providers_at_or_above_it_by_semver(
    host, peer, versions, min_version, picked
):
    for i, version in enumerate(versions):
        peer(host, f"p{i}", provides=("svc",)).register("svc", version)
    caller = peer(host, "caller")

    endpoint = caller.discover("svc", min_version)
    assert endpoint.version == picked


@pytest.mark.parametrize(
    "versions, min_version",
    [(["1.9.0"], "1.10.0"), (["2.0.0-rc.1"], "2.0.0"), (["1.0.0-rc.10"], "1.0.0-rc.11")],
    ids=["older-minor", "pre-release-of-floor", "older-pre-release"],
)
def test_min_version_above_every_provider_is_unavailable(host, peer, versions, min_version):
    for i, version in enumerate(versions):
        peer(host, f"p{i}", provides=("svc",)).register("svc", version)
    caller = peer(host, "caller")

    with pytest.raises(ConnectError) as e:
        caller.discover("svc", min_version)
    assert e.value.code is Code.UNAVAILABLE


def test_healthy_providers_are_picked_before_degraded_ones(host, peer):
    p0, p1 = _providers(host, peer, 2)
    p0.report(DEGRADED)
    caller = peer(host, "caller")

    assert {caller.discover("svc").provider_id for _ in range(5)} == {p1.runtime_id}


def test_degraded_provider_is_picked_when_no_healthy_one_remains(host, peer):
    p0, p1 = _providers(host, peer, 2)
    p0.report(DEGRADED)
    p1.report(UNHEALTHY)
    caller = peer(host, "caller")

    assert caller.discover("svc").provider_id == p0.runtime_id


def test_unhealthy_provider_is_never_picked(make_host, peer):
    host = make_host(registry=RegistryConfig(strategy="round_robin"))
    p0, p1, p2 = _providers(host, peer, 3)
    p1.report(UNHEALTHY)
    caller = peer(host, "caller")

    picks = {caller.discover("svc").provider_id for _ in range(12)}
    assert picks == {p0.runtime_id, p2.runtime_id}


def test_discovering_a_type_nobody_ever_provided_is_not_found(host, peer):
    _providers(host, peer, 1)
    caller = peer(host, "caller")

    with pytest.raises(ConnectError) as e:
        caller.discover("nobody-provides-this")
    assert e.value.code is Code.NOT_FOUND


@pytest.mark.parametrize("why", ["unregistered", "unhealthy", "too old"])
def test_discovering_a_known_type_with_no_usable_provider_is_unavailable(host, peer, why):
    p0 = peer(host, "p0", provides=("svc",))
    registration = p0.register("svc", "1.0.0")
    if why == "unregistered":
        p0.unregister(registration)
    elif why == "unhealthy":
        p0.report(UNHEALTHY)
    caller = peer(host, "caller")

    with pytest.raises(ConnectError) as e:
        caller.discover("svc", "2.0.0" if why == "too old" else "")
    assert e.value.code is Code.UNAVAILABLE


# --- watching ---------------------------------------------------------------------------------


def test_watcher_gets_the_current_state_first(host, peer):
    p0 = peer(host, "p0", provides=("svc",))
    p0.register("svc")
    p0.report(DEGRADED)
    watcher = peer(host, "watcher").watch("svc", limit=1)

    [first] = watcher.wait_for(1)
    assert (STATE(first.state), first.endpoint.provider_id) == (SERVICE_DEGRADED, p0.runtime_id)
    assert first.endpoint.endpoint_url == f"/services/svc/{p0.runtime_id}"
    watcher.join()


def test_watchers_see_providers_come_change_health_and_go_in_order(host, peer):
    caller = peer(host, "watcher")
    watchers = [caller.watch("svc") for _ in range(3)]
    for w in watchers:
        w.wait_for(1)  # the current state: nobody provides svc yet

    p0 = peer(host, "p0", provides=("svc",))
    registration = p0.register("svc")
    p0.report(DEGRADED)
    p0.report(HEALTHY)
    p0.report(UNHEALTHY)
    p0.report(HEALTHY)
    p0.unregister(registration)
    for w in watchers:
        w.wait_for(7)
    host.registry.close_watchers()
    for w in watchers:
        w.join()

    expected = [
        UNAVAILABLE,
        AVAILABLE,
        SERVICE_DEGRADED,
        AVAILABLE,
        UNAVAILABLE,
        AVAILABLE,
        UNAVAILABLE,
    ]
    assert [w.states for w in watchers] == [expected] * 3
    assert {
        e.endpoint.provider_id for e in watchers[0].messages if STATE(e.state) != UNAVAILABLE
    } == {p0.runtime_id}


def test_launched_plugins_own_health_changes_reach_watchers(host, peer):
    health = Health()
    client = host.launch(in_process("p", "svc", health=health), name="p")
    runtime_id = host.runtime_id(client)
    watcher = peer(host, "watcher").watch("svc")
    watcher.wait_for(1)

    health.set(DEGRADED, reason="slow disk")
    watcher.wait_for(2)
    assert host.reported_health(runtime_id).reason == "slow disk"
    health.set(HEALTHY)
    watcher.wait_for(3)
    host.stop(client, grace=0)
    watcher.wait_for(4)

    assert watcher.states == [AVAILABLE, SERVICE_DEGRADED, AVAILABLE, UNAVAILABLE]


def test_watchers_beyond_the_cap_are_resource_exhausted_while_unary_calls_keep_working(
    make_host, peer
):
    host = make_host(http=HTTPConfig(threads=2, max_streams=2))
    _providers(host, peer, 1)
    caller = peer(host, "caller")
    open_watchers = [caller.watch("svc") for _ in range(2)]
    for w in open_watchers:
        w.wait_for(1)

    refused = caller.watch("svc")
    refused.join()

    assert refused.error is not None and refused.error.code is Code.RESOURCE_EXHAUSTED
    for _ in range(10):
        assert caller.discover("svc").provider_id
    assert all(not w.ended.is_set() for w in open_watchers)


def test_a_watcher_that_leaves_frees_its_slot(make_host, peer):
    host = make_host(http=HTTPConfig(max_streams=1))
    _providers(host, peer, 1)
    caller = peer(host, "caller")
    caller.watch("svc", limit=1).join()  # reads the current state, then hangs up

    def admitted() -> bool:
        attempt = caller.watch("svc", limit=1)
        attempt.join()
        return attempt.error is None

    wait_until(admitted, "the freed slot to admit a new watcher")


# --- registration -----------------------------------------------------------------------------


def test_launched_plugin_registering_an_undeclared_service_is_permission_denied(host):
    link = HostLink()
    host.launch(in_process("p", "svc", link=link), name="p")

    with Client(host.url, ClientConfig(timeout=5, headers=link.headers())) as client:
        with pytest.raises(ConnectError) as e:
            ServiceRegistryClient(client).register_service(
                registry_pb2.RegisterServiceRequest(
                    service_type="other", version="1.0.0", endpoint_path="/x/"
                )
            )
    assert e.value.code is Code.PERMISSION_DENIED
    assert host.registry.providers("other") == []


def test_awaiting_registration_wakes_when_the_provider_registers():
    registry = Registry()
    registry.declare("p-1", Declared(launched=True, paths={"svc": "/svc/"}))
    waiting = threading.Event()
    missing: list[list[str]] = []

    def wait() -> None:
        waiting.set()
        missing.append(registry.await_registered("p-1", ["svc"], timeout=30))

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiting.wait(5)
    registry.register("p-1", "svc", "1.0.0", "/svc/", "http://127.0.0.1:1")
    waiter.join(5)

    assert missing == [[]]


def test_awaiting_registration_names_what_is_still_missing_when_time_is_up():
    registry = Registry()
    registry.declare("p-1", Declared(launched=True, paths={"svc": "/svc/", "other": "/other/"}))
    registry.register("p-1", "svc", "1.0.0", "/svc/", "http://127.0.0.1:1")

    assert registry.await_registered("p-1", ["svc", "other"], timeout=0.01) == ["other"]


def test_lookups_follow_every_change_of_the_providers():
    """The registry's indexes (by type, by plugin, usable per type) never answer from before a change."""
    registry = Registry(RegistryConfig(max_registrations_per_identity=2))
    for plugin in ("a", "b"):
        registry.declare(plugin, Declared(launched=True, paths={"svc": "/svc/", "other": "/other/"}))
    a_svc = registry.register("a", "svc", "1.0.0", "/svc/", "http://127.0.0.1:1")
    registry.register("a", "other", "1.0.0", "/other/", "http://127.0.0.1:1")
    b_svc = registry.register("b", "svc", "1.0.0", "/svc/", "http://127.0.0.1:2")
    assert registry.discover("svc", "")[0] == a_svc

    registry.set_health("a", UNHEALTHY)
    assert registry.discover("svc", "") == (registry.provider("b", "svc"), 1)
    assert registry.provider("a", "other").health == UNHEALTHY

    registry.unregister(b_svc.registration_id)
    with pytest.raises(ConnectError) as e:
        registry.discover("svc", "")
    assert e.value.code is Code.UNAVAILABLE
    registry.register("b", "other", "1.0.0", "/other/", "http://127.0.0.1:2")  # room again

    registry.remove_provider("a")
    assert [p.provider_id for p in registry.providers()] == ["b"]
    assert registry.providers("svc") == [] and registry.provider("a", "other") is None
