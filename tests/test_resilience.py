"""Retries and circuit breakers, against a real server; time is a fake clock moved by the test."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from connectplugin import (
    BreakerConfig,
    BreakerState,
    Call,
    CancelToken,
    CircuitBreaker,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    Retry,
    RetryConfig,
)
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.kv.store import KVStore
from tests.helpers import Clock, free_port, wait_until
from tests.kvget.gen.kvget.v1 import kvget_pb2
from tests.kvget.gen.kvget.v1.kvget_connect import KVGetServiceClient

GET = kv_pb2.GetRequest(key="k")
PUT = kv_pb2.PutRequest(key="k", value=b"v")


class Sleeper:
    """A ``sleep`` that moves a fake clock instead of waiting, and remembers each wait."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeper(clock) -> Sleeper:
    return Sleeper(clock)


def retry(clock: Clock, sleeper: Sleeper, **fields: Any) -> Retry:
    """A Retry on the fake clock, without jitter unless the test gives a random source."""
    fields.setdefault("random", lambda: 0.0)
    return Retry(RetryConfig(clock=clock, sleep=sleeper, **fields))


def failing(kv, name: str, *codes: Code) -> None:
    """Make ``kv.<name>`` fail with ``codes`` in turn, then answer as the store does."""
    left = list(codes)
    original = getattr(KVStore, name)

    def script(request, ctx):
        if left:
            raise ConnectError(left.pop(0), "scripted failure")
        return original(kv, request, ctx)

    kv.script(name, script)


def fail(client: Any, times: int) -> None:
    """Call ``client.get`` ``times`` times, each failing."""
    for _ in range(times):
        with pytest.raises(ConnectError):
            client.get(GET)


# --- retries ----------------------------------------------------------------------------------


def test_unavailable_is_retried_with_exponential_backoff_until_the_call_succeeds(connect, url, kv, clock, sleeper):
    failing(kv, "get", Code.UNAVAILABLE, Code.UNAVAILABLE)
    client = connect(url, interceptors=[retry(clock, sleeper, max_attempts=3)])

    assert client.get(GET) == kv_pb2.GetResponse()

    assert len(kv.calls) == 3
    assert sleeper.waits == [0.1, 0.2]


def test_cancelling_a_call_ends_its_retry_backoff_without_another_attempt(connect, url, kv, clock):
    failing(kv, "get", Code.UNAVAILABLE, Code.UNAVAILABLE)
    # An hour's backoff: the call returns only because the cancel ends it.
    never = Retry(RetryConfig(initial_backoff=3600.0, clock=clock, random=lambda: 0.0))
    client = connect(url, interceptors=[never])
    token = CancelToken()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.get(GET, cancel=token)
        except ConnectError as e:
            outcome.append(e)

    caller = threading.Thread(target=call, name="test-caller")
    caller.start()
    wait_until(lambda: len(kv.calls) == 1, "the first attempt to fail")
    token.cancel()
    caller.join(timeout=10)

    assert not caller.is_alive()
    assert [e.code for e in outcome] == [Code.CANCELED]  # type: ignore[attr-defined]
    assert len(kv.calls) == 1


@pytest.mark.parametrize(
    ("method", "code", "attempts"),
    [
        ("read", Code.UNAVAILABLE, 3),
        ("put", Code.UNAVAILABLE, 3),
        ("read", Code.DEADLINE_EXCEEDED, 3),  # declared side-effect free
        ("put", Code.DEADLINE_EXCEEDED, 1),  # Put may have happened
        ("get", Code.DEADLINE_EXCEEDED, 1),  # the samples' Get declares nothing (Go's contract)
        ("read", Code.RESOURCE_EXHAUSTED, 3),
        ("put", Code.RESOURCE_EXHAUSTED, 1),
        ("read", Code.INTERNAL, 1),
        ("read", Code.NOT_FOUND, 1),
        ("read", Code.INVALID_ARGUMENT, 1),
    ],
)
def test_what_is_retried_depends_on_the_code_and_whether_the_method_is_idempotent(
    url, kv, clock, sleeper, method, code, attempts
):
    failing(kv, "put" if method == "put" else "get", *[code] * 3)

    with Client(url, ClientConfig(interceptors=[retry(clock, sleeper, max_attempts=3)])) as rpc:
        calls = {
            "read": lambda: KVGetServiceClient(rpc).get(kvget_pb2.GetRequest(key="k")),
            "get": lambda: KVServiceClient(rpc).get(GET),
            "put": lambda: KVServiceClient(rpc).put(PUT),
        }
        with pytest.raises(ConnectError) as info:
            calls[method]()

    assert info.value.code is code
    assert len(kv.calls) == attempts


def test_retries_end_after_max_attempts_with_the_last_error(connect, url, kv, clock, sleeper):
    failing(kv, "get", *[Code.UNAVAILABLE] * 5)
    client = connect(url, interceptors=[retry(clock, sleeper, max_attempts=4)])

    with pytest.raises(ConnectError) as info:
        client.get(GET)

    assert info.value.code is Code.UNAVAILABLE
    assert len(kv.calls) == 4
    assert sleeper.waits == [0.1, 0.2, 0.4]


def test_each_attempt_gets_what_is_left_of_the_deadline_and_none_starts_past_it(connect, url, kv, clock, sleeper):
    failing(kv, "get", *[Code.UNAVAILABLE] * 5)
    client = connect(url, interceptors=[retry(clock, sleeper, max_attempts=5, initial_backoff=0.25)])

    with pytest.raises(ConnectError) as info:
        client.get(GET, timeout=1.0)

    # 1 s in all: the first attempt has it whole, the second 0.75 s after a 0.25 s backoff,
    # the third 0.25 s after 0.5 more; a fourth would begin after another 1 s, past the
    # deadline, so it is not made.
    assert info.value.code is Code.UNAVAILABLE
    assert [c.headers["connect-timeout-ms"] for c in kv.calls] == ["1000", "750", "250"]
    assert sleeper.waits == [0.25, 0.5]


def test_a_refused_connection_is_retried(connect, clock, sleeper):
    client = connect(f"http://127.0.0.1:{free_port()}", interceptors=[retry(clock, sleeper, max_attempts=3)])

    with pytest.raises(ConnectError) as info:
        client.get(GET)

    assert info.value.code is Code.UNAVAILABLE
    assert len(sleeper.waits) == 2


def test_a_stream_that_cannot_be_opened_is_retried(connect, clock, sleeper):
    client = connect(f"http://127.0.0.1:{free_port()}", interceptors=[retry(clock, sleeper, max_attempts=2)])

    with pytest.raises(ConnectError) as info:
        client.watch(kv_pb2.WatchRequest())

    assert info.value.code is Code.UNAVAILABLE
    assert len(sleeper.waits) == 1


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 0.4), (0.5, 0.3), (0.999, 0.2)])
def test_jitter_takes_up_to_its_fraction_off_each_backoff(draw, expected):
    config = RetryConfig(initial_backoff=0.1, multiplier=2, jitter=0.5, random=lambda: draw)

    assert config.backoff(3) == pytest.approx(expected, abs=1e-3)


def test_backoff_is_capped_at_max_backoff():
    config = RetryConfig(initial_backoff=1, max_backoff=5, jitter=0)

    assert [config.backoff(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_retry_defaults_are_the_go_references():
    config = RetryConfig()

    assert (config.max_attempts, config.initial_backoff, config.max_backoff, config.multiplier) == (3, 0.1, 10.0, 2.0)


# --- circuit breaker --------------------------------------------------------------------------


def breaker(clock: Clock, changes: list | None = None, **fields: Any) -> CircuitBreaker:
    on_change = (lambda old, new: changes.append((old, new))) if changes is not None else None
    return CircuitBreaker(BreakerConfig(clock=clock, **fields), name="kv", on_change=on_change)


def test_breaker_opens_after_failure_threshold_and_then_fails_fast_without_calling(connect, url, kv, clock):
    failing(kv, "get", *[Code.UNAVAILABLE] * 3)
    guard = breaker(clock, failure_threshold=3)
    client = connect(url, interceptors=[guard])
    fail(client, 3)

    with pytest.raises(ConnectError) as info:
        client.get(GET)

    assert guard.state is BreakerState.OPEN
    assert info.value.code is Code.UNAVAILABLE
    assert "circuit breaker open for kv" in info.value.message
    assert len(kv.calls) == 3  # the fourth never left the client


def test_a_success_resets_the_count_of_consecutive_failures(connect, url, kv, clock):
    guard = breaker(clock, failure_threshold=2)
    client = connect(url, interceptors=[guard])
    for _ in range(3):
        failing(kv, "get", Code.UNAVAILABLE)
        with pytest.raises(ConnectError):
            client.get(GET)
        client.get(GET)

    assert guard.state is BreakerState.CLOSED


def test_the_callers_own_errors_do_not_open_the_breaker(connect, url, kv, clock):
    failing(kv, "get", *[Code.NOT_FOUND] * 10)
    guard = breaker(clock, failure_threshold=2)
    client = connect(url, interceptors=[guard])
    fail(client, 10)

    assert guard.state is BreakerState.CLOSED


def test_breaker_half_opens_after_reset_timeout_and_closes_after_success_threshold(connect, url, kv, clock):
    failing(kv, "get", Code.UNAVAILABLE)
    changes: list = []
    guard = breaker(clock, changes, failure_threshold=1, reset_timeout=10, success_threshold=2)
    client = connect(url, interceptors=[guard])
    with pytest.raises(ConnectError):
        client.get(GET)
    clock.advance(9.9)
    with pytest.raises(ConnectError):
        client.get(GET)  # still open

    clock.advance(0.1)
    client.get(GET)
    assert guard.state is BreakerState.HALF_OPEN
    client.get(GET)

    assert guard.state is BreakerState.CLOSED
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_a_failed_probe_opens_the_breaker_again_for_another_reset_timeout(connect, url, kv, clock):
    failing(kv, "get", Code.UNAVAILABLE, Code.UNAVAILABLE)
    guard = breaker(clock, failure_threshold=1, reset_timeout=10)
    client = connect(url, interceptors=[guard])
    with pytest.raises(ConnectError):
        client.get(GET)
    clock.advance(10)

    with pytest.raises(ConnectError):
        client.get(GET)  # the probe fails

    assert guard.state is BreakerState.OPEN
    clock.advance(5)
    with pytest.raises(ConnectError) as info:
        client.get(GET)
    assert "retry in 5.0 s" in info.value.message
    assert len(kv.calls) == 2


def test_while_half_open_only_half_open_calls_probes_go_at_once(connect, url, kv, clock):
    probing = threading.Event()
    release = threading.Event()

    def slow(request, ctx):
        probing.set()
        release.wait(5)
        return kv_pb2.GetResponse()

    failing(kv, "get", Code.UNAVAILABLE)
    guard = breaker(clock, failure_threshold=1, reset_timeout=1, half_open_calls=1)
    client = connect(url, interceptors=[guard])
    with pytest.raises(ConnectError):
        client.get(GET)
    clock.advance(1)
    kv.script("get", slow)
    probe = threading.Thread(target=client.get, args=(GET,), name="probe")
    probe.start()
    try:
        assert probing.wait(5)
        with pytest.raises(ConnectError) as info:
            client.get(GET)
        assert "a probe call is in flight" in info.value.message
    finally:
        release.set()
        probe.join()

    client.get(GET)  # the probe's slot is free again
    assert guard.state is BreakerState.CLOSED


def test_breaker_defaults_are_the_go_references():
    config = BreakerConfig()

    assert (config.failure_threshold, config.reset_timeout, config.success_threshold) == (5, 10.0, 2)


# --- composition ------------------------------------------------------------------------------


def test_retry_breaker_and_a_users_interceptor_compose_in_the_order_given(connect, url, kv, clock, sleeper):
    """Retry outermost, then the breaker, then the user's: each attempt passes them all."""
    seen: list[float | None] = []

    def record(call: Call, proceed: Callable[[Call], Any]) -> Any:
        seen.append(call.timeout)
        return proceed(call)

    failing(kv, "get", *[Code.UNAVAILABLE] * 10)
    guard = breaker(clock, failure_threshold=2)
    client = connect(url, interceptors=[retry(clock, sleeper, max_attempts=5), guard, record])

    with pytest.raises(ConnectError) as info:
        client.get(GET, timeout=10)

    # Two attempts reach the server and open the breaker; the other three fail fast in it.
    assert len(kv.calls) == 2
    assert len(seen) == 2
    assert "circuit breaker open" in info.value.message
    assert len(sleeper.waits) == 4


def test_a_probe_interrupted_by_an_error_of_another_kind_counts_as_failed_and_frees_its_slot(connect, url, clock):
    guard = breaker(clock, failure_threshold=1, reset_timeout=1)
    ticket = guard.admit()
    guard.record(ticket, failed=True)
    clock.advance(1)

    def explode(call: Call, proceed: Callable[[Call], Any]) -> Any:
        raise RuntimeError("a bug in an interceptor")

    client = connect(url, interceptors=[guard, explode])
    with pytest.raises(RuntimeError):
        client.get(GET)

    assert guard.state is BreakerState.OPEN  # counted as a failure, and the slot is not leaked
    clock.advance(1)
    guard.admit()  # a probe may go again
