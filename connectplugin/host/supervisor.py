"""Supervision: launched plugins that crash come back, and crash loops are quarantined.

Opt-in per plugin: ``PluginHost.launch(strategy, name, restart=RestartPolicy())`` (or
``PluginSpec.restart`` on a :class:`Platform`). When a supervised plugin exits without the
host stopping it, its identity is revoked as for any crash (registrations withdrawn,
watchers told), then after a backoff (exponential, with jitter) the host launches it again
with the same strategy; the new instance takes over the old one's routes as a blue-green
replacement does (``Router.alias``), so callers addressing the old endpoint reach it. Callers
see ``unavailable`` only while no instance is up. ``max_crashes`` crashes within ``window``
seconds quarantine it: no more restarts, its last health is UNHEALTHY with its last stderr
lines, and listeners get a ``quarantined`` event.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..rpc.resilience import RetryConfig
from ..runtime.health import HealthReport, HealthState
from ..runtime.launcher import LaunchError, Strategy
from ..runtime.pluginclient import PluginClient

if TYPE_CHECKING:
    from .pluginhost import PluginHost

log = logging.getLogger("connectplugin.supervisor")


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervised plugin is restarted after a crash."""

    backoff: RetryConfig = RetryConfig(initial_backoff=0.5, max_backoff=30.0, multiplier=2.0, jitter=0.5)
    """The wait before restart *n* in a row: ``backoff.backoff(n)`` (exponential, capped, with
    jitter so plugins that crashed together do not restart together; its ``random`` is the
    jitter's source). Only the backoff fields apply, not ``max_attempts``."""
    max_crashes: int = 5
    """This many crashes (failed restarts included) within ``window`` seconds quarantine the
    plugin: it is not restarted again."""
    window: float = 60.0
    """Seconds over which crashes are counted for ``max_crashes``."""
    clock: Callable[[], float] = time.monotonic
    """Where crash times are measured (seconds, never going back); tests pass a fake one."""

    def __post_init__(self) -> None:
        if self.max_crashes < 1 or self.window <= 0:
            raise ValueError("RestartPolicy: max_crashes must be at least 1 and window positive")


class Transition(enum.Enum):
    """What happened to a supervised plugin."""

    CRASHED = "crashed"
    RESTARTED = "restarted"
    RESTART_FAILED = "restart_failed"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class SupervisionEvent:
    """One transition of a supervised plugin, as listeners get it.

    ``runtime_id`` is the instance it concerns (the new one for ``RESTARTED``);
    ``attempt`` counts restarts since the plugin was last up; ``delay`` is the backoff
    before the next restart (0 when none follows); ``stderr_tail`` holds the last lines
    the crashed instance (or failed launch) wrote to stderr.
    """

    name: str
    transition: Transition
    runtime_id: str = ""
    attempt: int = 0
    delay: float = 0.0
    exit_code: int | None = None
    stderr_tail: Sequence[str] = field(default=())
    detail: str = ""


SupervisionListener = Callable[[SupervisionEvent], None]
"""``listener(event)``, called on the supervising thread with no lock held."""


class Supervised:
    """One supervised plugin: its current client and state. Read from any thread."""

    def __init__(self, name: str, strategy: Strategy, policy: RestartPolicy, client: PluginClient) -> None:
        self.name = name
        self.strategy = strategy
        self.policy = policy
        self._lock = threading.Lock()  # guards the fields below
        self._client: PluginClient | None = client
        self._crashes: deque[float] = deque()
        self._quarantined = False
        self._released = False
        self.restarts = 0

    @property
    def client(self) -> PluginClient | None:
        """The instance now up (None while restarting, quarantined or released)."""
        with self._lock:
            return self._client

    @property
    def quarantined(self) -> bool:
        with self._lock:
            return self._quarantined


class Supervisor:
    """The host's supervised plugins. ``_lock`` guards the tables; launches run without it."""

    def __init__(self, host: PluginHost) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._by_client: dict[int, Supervised] = {}  # id(client) of every instance ever -> its plugin
        self._listeners: list[SupervisionListener] = []
        self._threads: list[threading.Thread] = []
        self._forgetting: set[int] = set()  # id() of crashed instances being stopped by us
        self._closed = threading.Event()

    def supervise(self, strategy: Strategy, name: str, policy: RestartPolicy) -> PluginClient:
        client = self._host._launch(strategy, name, on_crash=self._crashed)
        plugin = Supervised(name, strategy, policy, client)
        with self._lock:
            self._by_client[id(client)] = plugin
        if not client.running or not client.running.alive():  # it crashed before we knew it
            self._crashed(client, client.exit_code)
        return client

    def of(self, client: PluginClient) -> Supervised | None:
        """The supervised plugin ``client`` is (or was) an instance of."""
        with self._lock:
            return self._by_client.get(id(client))

    def on_event(self, listener: SupervisionListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def release(self, client: PluginClient) -> bool:
        """The host stops ``client``: on purpose, and its plugin is no longer restarted, unless
        it is a crashed instance the supervisor forgets before restarting it (then True)."""
        plugin = self.of(client)
        with self._lock:
            ours = id(client) in self._forgetting
        if plugin is not None and not ours:
            with plugin._lock:
                plugin._released = True
                plugin._client = None
        return ours

    def close(self) -> None:
        """No more restarts; waits for restarts under way (they stop what they started)."""
        self._closed.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join()

    def _crashed(self, client: PluginClient, code: int | None) -> None:
        """``on_crash`` of every supervised instance: called on its exit-waiter thread."""
        plugin = self.of(client)
        if plugin is None or self._closed.is_set():
            return
        with plugin._lock:
            if plugin._released or plugin._client is not client:
                return
            plugin._client = None
        runtime_id = self._host.runtime_id(client)
        if runtime_id:  # calls to its endpoint are unavailable, not not_found, until it is back
            self._host.router.alias(runtime_id, runtime_id)
        thread = threading.Thread(
            target=self._recover, args=(plugin, client, runtime_id, code), name=f"supervisor:{plugin.name}", daemon=True
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _recover(self, plugin: Supervised, old: PluginClient, old_id: str, code: int | None) -> None:
        running = old.running
        tail: Sequence[str] = running.last_stderr() if running is not None and hasattr(running, "last_stderr") else ()
        with self._lock:
            self._forgetting.add(id(old))
        self._host.stop(old, grace=0)  # forget it: the crash already revoked its identity
        attempt, previous_id = 0, old_id
        event = SupervisionEvent(plugin.name, Transition.CRASHED, old_id, exit_code=code, stderr_tail=tuple(tail))
        while True:
            attempt += 1
            if self._count_crash(plugin):
                self._quarantine(plugin, previous_id, event)
                return
            delay = plugin.policy.backoff.backoff(attempt)
            self._emit(_with(event, attempt=attempt, delay=delay))
            if self._closed.wait(delay) or plugin._released:
                return
            try:
                new = self._host._launch(plugin.strategy, plugin.name, on_crash=self._crashed)
            except LaunchError as e:
                event = SupervisionEvent(
                    plugin.name, Transition.RESTART_FAILED, exit_code=e.exit_code,
                    stderr_tail=tuple(e.stderr_tail), detail=str(e),
                )
                continue
            except Exception as e:  # the host closing under us, say
                if self._closed.is_set():
                    return
                event = SupervisionEvent(plugin.name, Transition.RESTART_FAILED, detail=str(e))
                continue
            new_id = self._host.runtime_id(new)
            self._host.router.alias(previous_id, new_id)
            with self._lock:
                self._by_client[id(new)] = plugin
            with plugin._lock:
                keep = not plugin._released and not self._closed.is_set()
                if keep:
                    plugin._client = new
                    plugin.restarts += 1
            if not keep:
                self._host.stop(new, grace=0)
                return
            log.warning("restarted %s as %s (attempt %d)", plugin.name, new_id, attempt)
            self._emit(SupervisionEvent(plugin.name, Transition.RESTARTED, new_id, attempt=attempt))
            if not new.running or not new.running.alive():  # crashed before it was recorded
                self._crashed(new, new.exit_code)
            return

    def _count_crash(self, plugin: Supervised) -> bool:
        """Note a crash; True once the crash loop limit is reached."""
        policy = plugin.policy
        now = policy.clock()
        with plugin._lock:
            plugin._crashes.append(now)
            while plugin._crashes and plugin._crashes[0] <= now - policy.window:
                plugin._crashes.popleft()
            if len(plugin._crashes) >= policy.max_crashes:
                plugin._quarantined = True
        return plugin._quarantined

    def _quarantine(self, plugin: Supervised, runtime_id: str, last: SupervisionEvent) -> None:
        policy = plugin.policy
        reason = f"quarantined: crashed {policy.max_crashes} times within {policy.window:g} s"
        if last.stderr_tail:
            reason += "; last stderr:\n" + "\n".join(last.stderr_tail)
        log.error("%s %s", plugin.name, reason)
        if runtime_id:
            self._host._record_health(runtime_id, HealthReport(HealthState.UNHEALTHY, reason))
        self._emit(_with(last, transition=Transition.QUARANTINED, runtime_id=runtime_id, detail=reason))

    def _emit(self, event: SupervisionEvent) -> None:
        if event.transition is Transition.CRASHED:
            log.warning("%s crashed (status %s); restarting in %.2f s", event.name, event.exit_code, event.delay)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("supervision listener failed on %s", event)


def _with(event: SupervisionEvent, **changes: object) -> SupervisionEvent:
    return replace(event, **changes)  # type: ignore[arg-type]
