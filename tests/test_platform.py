"""The platform manager: dependency order, impact, removal and blue-green replacement."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from connectplugin import ConnectError, DependencyError, Platform, PluginSpec, Requirement
from connectplugin.runtime.launcher import LaunchContext, Running
from samples.kv.gen.kv.v1 import kv_pb2
from tests.helpers import in_process, module, provider_ids, provider_process, wait_until

# --- the platform manager ---------------------------------------------------------------------


@dataclass
class Recording:
    """A strategy that notes the name of each plugin it starts."""

    inner: Any
    started: list[str]

    def start(self, ctx: LaunchContext) -> Running:
        self.started.append(ctx.name)
        return self.inner.start(ctx)


def _spec(
    started: list[str],
    name: str,
    provides: tuple[str, ...] = (),
    requires: tuple[Requirement, ...] = (),
) -> PluginSpec:
    return PluginSpec(name, Recording(in_process(name, *provides), started), provides, requires)


def test_platform_starts_providers_before_dependents_whatever_the_order_given(host):
    platform, started = Platform(host), []

    order = platform.add(
        _spec(started, "app", requires=(Requirement("cache"),)),
        _spec(started, "cache", ("cache",), requires=(Requirement("store"),)),
        _spec(started, "store", ("store",)),
    )

    assert order == started == ["store", "cache", "app"]
    assert sorted(platform.names()) == ["app", "cache", "store"]


def test_platform_refuses_a_dependency_cycle_naming_it(host):
    platform, started = Platform(host), []

    with pytest.raises(DependencyError) as e:
        platform.add(
            _spec(started, "solo", ("solo",)),
            _spec(started, "a", ("x",), requires=(Requirement("y"),)),
            _spec(started, "b", ("y",), requires=(Requirement("x"),)),
        )

    assert e.value.cycle in (["a", "b", "a"], ["b", "a", "b"])
    assert (e.value.plugin, e.value.missing) == ("", [])
    assert started == [] and platform.names() == [] and host.registry.providers() == []


def test_platform_refuses_a_missing_startup_dependency_naming_it(host):
    platform, started = Platform(host), []

    with pytest.raises(DependencyError) as e:
        platform.add(_spec(started, "app", requires=(Requirement("database", "2.0.0"),)))

    assert e.value.plugin == "app"
    assert e.value.missing == [Requirement("database", "2.0.0")]
    assert e.value.cycle == []
    assert started == [] and platform.names() == []


def test_platform_refuses_a_batch_with_a_missing_startup_dependency_before_starting_any(host):
    platform, started = Platform(host), []

    with pytest.raises(DependencyError) as e:
        platform.add(
            _spec(started, "store", ("store",)),
            _spec(started, "app", requires=(Requirement("store"), Requirement("database"))),
        )

    assert (e.value.plugin, e.value.missing) == ("app", [Requirement("database")])
    assert started == [] and platform.names() == [] and host.registry.providers() == []


def test_optional_dependency_missing_does_not_block_start(host):
    platform, started = Platform(host), []

    platform.add(
        _spec(started, "app", requires=(Requirement("metrics", required_for_startup=False),))
    )

    assert started == ["app"]


@dataclass
class Held:
    """A strategy whose ``start`` waits until the test releases it."""

    inner: Any
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def start(self, ctx: LaunchContext) -> Running:
        self.entered.set()
        self.release.wait(30)
        return self.inner.start(ctx)


def test_platform_answers_while_a_plugin_is_launching(host):
    platform, started = Platform(host), []
    platform.add(_spec(started, "store", ("store",)))
    held = Held(in_process("app"))
    adding = threading.Thread(
        target=platform.add, args=(PluginSpec("app", held, (), [Requirement("store")]),)
    )
    adding.start()
    try:
        assert held.entered.wait(5)
        answers: list[list[str]] = []
        reader = threading.Thread(target=lambda: answers.append(platform.names()))
        reader.start()
        reader.join(5)

        assert answers == [["store"]]
    finally:
        held.release.set()
        adding.join()
    assert sorted(platform.names()) == ["app", "store"]


def test_impact_lists_everything_that_would_lose_a_required_service_transitively(host):
    platform, started = Platform(host), []
    platform.add(
        _spec(started, "logger", ("logger",)),
        _spec(started, "cache", ("cache",), requires=(Requirement("logger"),)),
        _spec(started, "app", requires=(Requirement("cache"),)),
        _spec(started, "other"),
    )

    assert platform.impact("logger") == ["cache", "app"]
    assert platform.impact("cache") == ["app"]
    assert platform.impact("app") == []


def test_impact_is_empty_while_another_plugin_provides_the_service(host):
    platform, started = Platform(host), []
    platform.add(
        _spec(started, "logger", ("logger",)),
        _spec(started, "logger-2", ("logger",)),
        _spec(started, "cache", ("cache",), requires=(Requirement("logger"),)),
    )

    assert platform.impact("logger") == []


def test_remove_stops_the_plugin_withdraws_its_services_and_reports_the_impact(host):
    platform, started = Platform(host), []
    platform.add(
        _spec(started, "logger", ("logger",)),
        _spec(started, "cache", ("cache",), requires=(Requirement("logger"),)),
    )
    logger = platform.client("logger")

    affected = platform.remove("logger")

    assert affected == ["cache"]
    assert platform.names() == ["cache"]
    assert host.registry.providers("logger") == []
    assert not logger.running.alive()
    assert len(host.registry.providers("cache")) == 1  # dependents keep running


def test_platform_starts_the_sample_cache_after_its_logger_and_cache_logs_through_the_router(
    host, peer, caplog
):
    caplog.set_level(logging.INFO, logger="connectplugin.plugin.logger")
    platform = Platform(host)

    order = platform.add(
        PluginSpec(
            "cache", module("samples.platform.cache"), ["cache"], [Requirement("logger", "1.0.0")]
        ),
        PluginSpec("logger", module("samples.platform.logger"), ["logger"]),
    )
    caller = peer(host, "caller")
    caller.kv(caller.discover("cache")).put(kv_pb2.PutRequest(key="greeting", value=b"hi"))

    assert order == ["logger", "cache"]
    cache_id = host.runtime_id(platform.client("cache"))
    wait_until(
        lambda: any(
            f"[{cache_id}] cache put key=greeting" in r.getMessage() for r in caplog.records
        ),
        "the logger plugin to log the cache's write, tagged with the cache's runtime id",
    )


def test_blue_green_replace_under_load_fails_no_call(host, peer):
    platform = Platform(host)
    platform.add(PluginSpec("store", provider_process("store"), ["store"]))
    old = platform.client("store")
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("store"))  # addressed to the old instance
    answers: list[bytes] = []
    failures: list[ConnectError] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answers.append(kv.get(kv_pb2.GetRequest(key="whoami")).value)
            except ConnectError as e:
                failures.append(e)

    loaders = [threading.Thread(target=load) for _ in range(4)]
    for t in loaders:
        t.start()
    try:
        wait_until(lambda: len(answers) > 20, "calls to the old instance")
        before = len(answers)
        new = platform.replace("store", provider_process("store"))
        replaced_at = len(answers)
        assert replaced_at > before, "no call ran while the replacement was under way"
        wait_until(lambda: len(answers) > replaced_at + 40, "calls after the replacement")
    finally:
        stop.set()
        for t in loaders:
            t.join()

    assert failures == []
    old_pid, new_pid = str(old.running.pid).encode(), str(new.running.pid).encode()
    assert set(answers) == {old_pid, new_pid}
    assert set(answers[-20:]) == {new_pid}
    assert not old.running.alive()
    assert provider_ids(host, "store") == [host.runtime_id(new)]


def test_callers_of_a_twice_replaced_plugin_reach_the_latest_instance(host, peer):
    platform = Platform(host)
    platform.add(PluginSpec("store", in_process("v1", "store"), ["store"]))
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("store"))  # addressed to v1

    platform.replace("store", in_process("v2", "store"))
    platform.replace("store", in_process("v3", "store"))

    assert kv.get(kv_pb2.GetRequest(key="whoami")).value == b"v3"
    assert [p.provider_id for p in host.registry.providers("store")] == [
        host.runtime_id(platform.client("store"))
    ]
