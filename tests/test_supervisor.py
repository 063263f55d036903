"""Supervision: crashed plugins come back and take over their routes; crash loops are quarantined."""

from __future__ import annotations

import os
import queue
import signal

import pytest

from connectplugin import (
    Code,
    ConnectError,
    HealthState,
    Platform,
    PluginSpec,
    RestartPolicy,
    RetryConfig,
    RouterConfig,
    SupervisionEvent,
    Transition,
)
from connectplugin.gen.connectplugin.v1 import registry_pb2
from samples.kv.gen.kv.v1 import kv_pb2
from tests.helpers import provider_ids, provider_process, wait_until

FAST = RestartPolicy(RetryConfig(initial_backoff=0.0, jitter=0.0))
"""Restarts at once: what these tests look at is what happens, not when."""
EVENT_TIMEOUT = 30.0
"""A restart launches a Python process: generous, for a loaded machine."""


class Events:
    """Supervision events as they come, to wait on one at a time."""

    def __init__(self, host) -> None:
        self._queue: queue.Queue[SupervisionEvent] = queue.Queue()
        host.on_supervision(self._queue.put)

    def next(self) -> SupervisionEvent:
        try:
            return self._queue.get(timeout=EVENT_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no supervision event within {EVENT_TIMEOUT:g} s")

    def empty(self) -> bool:
        return self._queue.empty()


def _whoami(kv) -> str:
    return kv.get(kv_pb2.GetRequest(key="whoami")).value.decode()


def _crash(kv) -> None:
    with pytest.raises(ConnectError) as e:
        kv.get(kv_pb2.GetRequest(key="crash"))
    assert e.value.code is Code.UNAVAILABLE


# --- the policy -----------------------------------------------------------------------------


def test_restart_backoff_grows_exponentially_up_to_its_cap_with_jitter():
    def policy(jitter: float, draw: float) -> RestartPolicy:
        return RestartPolicy(RetryConfig(initial_backoff=1, multiplier=2, max_backoff=10, jitter=jitter, random=lambda: draw))

    assert [policy(0.0, 0.5).backoff.backoff(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 10, 10]
    assert [policy(0.5, 0.0).backoff.backoff(n) for n in (1, 2, 5)] == [1, 2, 10]
    assert [policy(0.5, 1.0).backoff.backoff(n) for n in (1, 2, 5)] == [0.5, 1.0, 5.0]


@pytest.mark.parametrize("fields", [{"max_crashes": 0}, {"window": 0}])
def test_a_restart_policy_refuses_nonsense(fields):
    with pytest.raises(ValueError):
        RestartPolicy(**fields)


# --- real crashing processes ----------------------------------------------------------------


def test_a_killed_supervised_plugin_comes_back_and_takes_over_its_routes(host, peer):
    events = Events(host)
    first = host.launch(provider_process("svc"), name="p", restart=FAST)
    caller = peer(host, "caller")
    old_endpoint = caller.discover("svc")
    kv = caller.kv(old_endpoint)
    old_pid = _whoami(kv)
    old_id = host.runtime_id(first)

    os.kill(first.running.pid, signal.SIGKILL)
    crashed, restarted = events.next(), events.next()

    assert (crashed.transition, crashed.runtime_id, crashed.exit_code) == (Transition.CRASHED, old_id, -9)
    assert restarted.transition is Transition.RESTARTED and restarted.attempt == 1
    now = host.current(first)
    assert now is not first and host.runtime_id(now) == restarted.runtime_id != old_id
    assert provider_ids(host, "svc") == [restarted.runtime_id]
    # Calls addressed to the dead instance's endpoint reach its successor.
    assert _whoami(kv) == str(now.running.pid) != old_pid
    assert _whoami(caller.kv(caller.discover("svc"))) == str(now.running.pid)
    assert host.supervised(first).restarts == 1 and not host.supervised(first).quarantined
    # The crash was reported as the old instance's health.
    assert host.reported_health(old_id).state is HealthState.UNHEALTHY


def test_calls_to_a_crashed_plugin_are_unavailable_until_its_successor_is_up(host, peer):
    waiting = RestartPolicy(RetryConfig(initial_backoff=600.0, max_backoff=600.0, jitter=0.0))  # the host's close ends the wait
    events = Events(host)
    first = host.launch(provider_process("svc"), name="p", restart=waiting)
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("svc"))

    os.kill(first.running.pid, signal.SIGKILL)
    crashed = events.next()

    assert crashed.transition is Transition.CRASHED and crashed.delay == 600.0
    for _ in range(2):  # the endpoint and discovery both say it may pass
        with pytest.raises(ConnectError) as e:
            kv.get(kv_pb2.GetRequest(key="whoami"))
        assert e.value.code is Code.UNAVAILABLE
    with pytest.raises(ConnectError) as e:
        caller.discover("svc")
    assert e.value.code is Code.UNAVAILABLE
    assert host.current(first) is first and host.supervised(first).client is None


def test_a_crash_loop_is_quarantined_unhealthy_with_its_last_stderr_lines(host, peer):
    now = [0.0]
    policy = RestartPolicy(FAST.backoff, max_crashes=2, window=10.0, clock=lambda: now[0])
    events = Events(host)
    first = host.launch(provider_process("svc"), name="p", restart=policy)
    caller = peer(host, "caller")
    kv = caller.kv(caller.discover("svc"))

    _crash(kv)  # at 0
    assert events.next().transition is Transition.CRASHED
    assert events.next().transition is Transition.RESTARTED
    now[0] = 20.0  # the first crash is out of the window: this one restarts too
    _crash(kv)
    assert [events.next().transition, events.next().transition] == [Transition.CRASHED, Transition.RESTARTED]
    last_id = host.runtime_id(host.current(first))
    now[0] = 21.0  # two within 10 s: quarantined
    _crash(kv)
    quarantined = events.next()

    assert quarantined.transition is Transition.QUARANTINED and quarantined.runtime_id == last_id
    assert "crashing as asked" in quarantined.stderr_tail
    report = host.reported_health(last_id)
    assert report.state is HealthState.UNHEALTHY
    assert "quarantined" in report.reason and "crashing as asked" in report.reason
    assert host.supervised(first).quarantined and host.supervised(first).client is None
    assert provider_ids(host, "svc") == []
    with pytest.raises(ConnectError) as e:
        kv.get(kv_pb2.GetRequest(key="whoami"))
    assert e.value.code in (Code.UNAVAILABLE, Code.NOT_FOUND)
    assert events.empty()


def test_a_supervised_plugin_the_host_stops_is_not_restarted(host):
    events = Events(host)
    client = host.launch(provider_process("svc"), name="p", restart=FAST)

    host.stop(client)

    assert events.empty() and provider_ids(host, "svc") == []
    assert host.supervised(client).client is None


def test_a_failed_restart_is_retried_with_backoff_and_counts_toward_quarantine(host):
    events = Events(host)
    strategies = iter([provider_process("svc")])
    broken = provider_process("svc")
    broken = type(broken)(["/nonexistent/plugin"], env=broken.env, cwd=broken.cwd)

    class FirstThenBroken:
        def start(self, ctx):
            return next(strategies, broken).start(ctx)

    policy = RestartPolicy(FAST.backoff, max_crashes=3)
    client = host.launch(FirstThenBroken(), name="p", restart=policy)
    os.kill(client.running.pid, signal.SIGKILL)

    seen = [events.next() for _ in range(3)]

    assert [e.transition for e in seen] == [Transition.CRASHED, Transition.RESTART_FAILED, Transition.QUARANTINED]
    assert seen[1].attempt == 2 and "could not be executed" in seen[1].detail
    assert host.supervised(client).quarantined


def test_platform_specs_opt_into_supervision_and_see_the_restarted_instance(host):
    platform = Platform(host)
    platform.add(PluginSpec("p", provider_process("svc"), provides=("svc",), restart=FAST))
    events = Events(host)
    first = platform.client("p")

    os.kill(first.running.pid, signal.SIGKILL)
    assert [events.next().transition, events.next().transition] == [Transition.CRASHED, Transition.RESTARTED]

    now = platform.client("p")
    assert now is not first and now.running.alive()
    wait_until(lambda: provider_ids(host, "svc") == [host.runtime_id(now)], "the new instance registered")
    platform.remove("p")
    assert events.empty() and provider_ids(host, "svc") == []


def test_routes_to_a_restarted_plugin_stay_bounded_and_lead_to_it(make_host, peer):
    host = make_host(router=RouterConfig(max_aliases=2))
    events = Events(host)
    first = host.launch(provider_process("svc"), name="p", restart=RestartPolicy(FAST.backoff, max_crashes=100))
    caller = peer(host, "caller")
    ids = [host.runtime_id(first)]
    found_first = caller.kv(caller.discover("svc"))  # before any restart: what callers hold most

    for _ in range(4):
        _crash(caller.kv(caller.discover("svc")))
        assert events.next().transition is Transition.CRASHED
        restarted = events.next()
        assert restarted.transition is Transition.RESTARTED
        ids.append(restarted.runtime_id)
        assert len(host.router.aliases()) <= 2

    # The first name and the latest predecessor's lead to the instance up now; those between
    # were forgotten.
    assert host.router.aliases() == {ids[0]: ids[-1], ids[-2]: ids[-1]}
    now = str(host.current(first).running.pid)
    assert _whoami(found_first) == now
    assert _whoami(caller.kv(registry_pb2.ServiceEndpoint(endpoint_url=f"/services/svc/{ids[-2]}"))) == now
    with pytest.raises(ConnectError) as forgotten:
        _whoami(caller.kv(registry_pb2.ServiceEndpoint(endpoint_url=f"/services/svc/{ids[1]}")))
    assert forgotten.value.code is Code.NOT_FOUND

    host.stop(host.current(first))  # gone for good: no name leads anywhere

    assert host.router.aliases() == {}
