"""Riding out a failing peer: retries with backoff, and a circuit breaker.

Both are interceptors (``ClientConfig(interceptors=[Retry(), CircuitBreaker()])``; the first
listed is outermost, so retries go through the breaker). The host's router keeps a
:class:`CircuitBreaker` per provider. Clocks, sleep and randomness are injectable, so tests
move time instead of waiting for it.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .client import Call
from .errors import Code, ConnectError

log = logging.getLogger("connectplugin.resilience")

ALWAYS_RETRYABLE = frozenset({Code.UNAVAILABLE})
"""Retried for any method: the call did not get through (gRPC's retry guidance)."""
IDEMPOTENT_RETRYABLE = frozenset({Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED})
"""Retried only for side-effect-free methods (``Method.idempotent``): the server may have
acted on the call, so only a call that changes nothing may be sent again."""
BREAKER_FAILURES = frozenset(
    {Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.INTERNAL, Code.UNKNOWN, Code.DEADLINE_EXCEEDED}
)
"""The codes a circuit breaker counts as its peer failing (the Go reference's set); others
(``not_found``, ``invalid_argument``...) are the caller's business and count as answers."""


# --- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryConfig:
    """How :class:`Retry` retries: exponential backoff with jitter, within the call's deadline.

    The defaults are the Go reference's: 3 attempts, 100 ms doubling up to 10 s, jittered.
    """

    max_attempts: int = 3
    """Attempts in all, the first included (1: never retry)."""
    initial_backoff: float = 0.1
    """Seconds before the first retry."""
    max_backoff: float = 10.0
    """Longest wait between attempts, in seconds."""
    multiplier: float = 2.0
    """Each backoff is this many times the one before."""
    jitter: float = 0.5
    """Fraction of each backoff drawn at random (0: none; 0.5: between half and all of it),
    so callers that failed together do not come back together."""
    clock: Callable[[], float] = time.monotonic
    """Where deadlines are measured (seconds, never going back); tests pass a fake one."""
    sleep: Callable[[float], None] = time.sleep
    """How a backoff is waited out; tests pass one that moves their fake clock. A call given
    a :class:`~connectplugin.rpc.client.CancelToken` waits on its token instead, so cancelling
    it ends the backoff."""
    random: Callable[[], float] = random.random
    """Uniform in [0, 1): the jitter's source; tests pass a fixed one."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, not {self.jitter}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must not be negative, and the multiplier at least 1")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return base * (1 - self.jitter * self.random())


class Retry:
    """An interceptor that sends a call again when it fails in a way that may pass.

    ``unavailable`` is retried for every method; ``deadline_exceeded`` and
    ``resource_exhausted`` only for side-effect-free ones (:data:`IDEMPOTENT_RETRYABLE`).
    The call's deadline covers all its attempts: each gets what is left of it, and no retry
    starts (nor backoff begins) that could not finish in time; the last error is raised. A
    stream is retried only while it opens, never once it has started. Holds no state: one
    may serve any number of clients and threads.
    """

    def __init__(self, config: RetryConfig | None = None) -> None:
        self.config = config or RetryConfig()

    def retryable(self, call: Call, error: ConnectError) -> bool:
        if error.code in ALWAYS_RETRYABLE:
            return True
        return error.code in IDEMPOTENT_RETRYABLE and call.method.idempotent

    def __call__(self, call: Call, proceed: Callable[[Call], Any]) -> Any:
        config = self.config
        deadline = None if call.timeout is None else config.clock() + call.timeout
        attempt = 1
        while True:
            try:
                return proceed(call)
            except ConnectError as e:
                if attempt >= config.max_attempts or not self.retryable(call, e):
                    raise
                delay = config.backoff(attempt)
                if deadline is not None:
                    left = deadline - config.clock() - delay
                    if left <= 0:
                        raise
                    call.timeout = left
                log.debug("retrying %s in %.3f s (attempt %d failed: %s)", call.method.path, delay, attempt, e)
                if call.cancel is None:
                    config.sleep(delay)
                elif call.cancel.wait(delay):  # cancelled during the backoff: no retry
                    raise ConnectError(Code.CANCELED, "the call was cancelled") from None
                attempt += 1


# --- circuit breaker --------------------------------------------------------------------------


class BreakerState(enum.Enum):
    CLOSED = "closed"
    """Calls pass; consecutive failures are counted."""
    OPEN = "open"
    """Calls fail at once with ``unavailable``, until ``reset_timeout`` has passed."""
    HALF_OPEN = "half_open"
    """A few probe calls pass; enough successes close the circuit, one failure opens it."""


BreakerListener = Callable[[BreakerState, BreakerState], None]
"""``listener(old, new)``, called on the thread whose call changed the state, no lock held."""


@dataclass(frozen=True)
class BreakerConfig:
    """When a :class:`CircuitBreaker` opens and closes; the defaults are the Go reference's."""

    failure_threshold: int = 5
    """Consecutive failures that open the circuit."""
    reset_timeout: float = 10.0
    """Seconds the circuit stays open before it lets probe calls through (half-open)."""
    success_threshold: int = 2
    """Consecutive successful probes that close it again."""
    half_open_calls: int = 1
    """Probe calls let through at once while half-open; the others fail fast, so a peer
    that is coming back is not flooded."""
    failures: frozenset[Code] = BREAKER_FAILURES
    """The error codes that count as the peer failing."""
    clock: Callable[[], float] = time.monotonic
    """Where ``reset_timeout`` is measured; tests pass a fake one."""

    def __post_init__(self) -> None:
        if min(self.failure_threshold, self.success_threshold, self.half_open_calls) < 1:
            raise ValueError("failure_threshold, success_threshold and half_open_calls must be at least 1")
        if self.reset_timeout < 0:
            raise ValueError(f"reset_timeout must not be negative, not {self.reset_timeout}")


class CircuitBreaker:
    """Fails calls fast while a peer keeps failing, and lets it recover.

    Used as an interceptor, or directly: ``admit()`` before a call (raises ``unavailable``
    while open) and ``record(admitted, failed)`` after it. Late results of calls admitted
    before the state last changed are ignored. A stream counts once, when it opens.
    Safe from any thread: ``_lock`` guards the state and the counts; listeners run after
    it is released.
    """

    def __init__(self, config: BreakerConfig | None = None, name: str = "", on_change: BreakerListener | None = None) -> None:
        self.config = config or BreakerConfig()
        self.name = name
        """What the breaker guards, for messages and logs (a URL, a provider id)."""
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._generation = 0  # bumped on every change of state
        self._failures = 0  # consecutive, while closed
        self._successes = 0  # consecutive probe successes, while half-open
        self._probes = 0  # probes in flight, while half-open
        self._opened_at = -math.inf

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def admit(self) -> int:
        """Let a call through, or raise ``ConnectError(unavailable)`` while the circuit is open.

        Returns a ticket for :meth:`record`.
        """
        with self._lock:
            change = None
            if self._state is BreakerState.OPEN:
                wait = self._opened_at + self.config.reset_timeout - self.config.clock()
                if wait > 0:
                    raise self._refusal(f"retry in {wait:.1f} s")
                change = self._become(BreakerState.HALF_OPEN)
            if self._state is BreakerState.HALF_OPEN:
                if self._probes >= self.config.half_open_calls:
                    raise self._refusal("a probe call is in flight")
                self._probes += 1
            ticket = self._generation
        self._announce(change)
        return ticket

    def record(self, ticket: int, failed: bool) -> None:
        """The outcome of a call :meth:`admit` let through."""
        with self._lock:
            if ticket != self._generation:
                return  # admitted under an earlier state: its news is stale
            change = None
            if self._state is BreakerState.CLOSED:
                self._failures = self._failures + 1 if failed else 0
                if self._failures >= self.config.failure_threshold:
                    change = self._become(BreakerState.OPEN)
            elif self._state is BreakerState.HALF_OPEN:
                self._probes -= 1
                if failed:
                    change = self._become(BreakerState.OPEN)
                else:
                    self._successes += 1
                    if self._successes >= self.config.success_threshold:
                        change = self._become(BreakerState.CLOSED)
        self._announce(change)

    def __call__(self, call: Call, proceed: Callable[[Call], Any]) -> Any:
        ticket = self.admit()
        failed = True  # until proven otherwise: an interrupted call must not leak its probe slot
        try:
            result = proceed(call)
            failed = False
            return result
        except ConnectError as e:
            failed = e.code in self.config.failures
            raise
        finally:
            self.record(ticket, failed)

    # --- internals ----------------------------------------------------------------------------

    def _refusal(self, detail: str) -> ConnectError:
        guarded = f" for {self.name}" if self.name else ""
        return ConnectError(Code.UNAVAILABLE, f"circuit breaker open{guarded}: {detail}")

    def _become(self, state: BreakerState) -> tuple[BreakerState, BreakerState]:
        """Change state (lock held); returns the change for :meth:`_announce`."""
        old, self._state = self._state, state
        self._generation += 1
        self._failures = self._successes = self._probes = 0
        if state is BreakerState.OPEN:
            self._opened_at = self.config.clock()
        return old, state

    def _announce(self, change: tuple[BreakerState, BreakerState] | None) -> None:
        if change is None:
            return
        old, new = change
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit breaker%s: %s -> %s", f" for {self.name}" if self.name else "", old.value, new.value)
        if self._on_change is not None:
            self._on_change(old, new)
