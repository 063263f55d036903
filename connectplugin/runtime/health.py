"""Plugin health: one shared state behind HealthService, PluginControl.GetHealth and host reports.

The public types (HealthState, ServingStatus, HealthReport) are plain Python; the
``*_wire`` functions convert them to and from protobuf where they cross the wire.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..gen.connectplugin.health.v1 import health_pb2
from ..gen.connectplugin.health.v1.health_connect import HealthServiceHandler
from ..gen.connectplugin.v1 import lifecycle_pb2
from ..rpc.errors import Code, ConnectError
from ..rpc.server import Context


class HealthState(enum.IntEnum):
    """A plugin's overall health (``connectplugin.v1.HealthState`` on the wire)."""

    HEALTHY = lifecycle_pb2.HEALTH_STATE_HEALTHY
    DEGRADED = lifecycle_pb2.HEALTH_STATE_DEGRADED
    """Serving, but with reduced function (a dependency is missing, say)."""
    UNHEALTHY = lifecycle_pb2.HEALTH_STATE_UNHEALTHY
    """Not fit to serve: discovery and the router pass it over."""


class ServingStatus(enum.IntEnum):
    """One service's status (``connectplugin.health.v1.ServingStatus`` on the wire)."""

    SERVING = health_pb2.SERVING_STATUS_SERVING
    NOT_SERVING = health_pb2.SERVING_STATUS_NOT_SERVING
    SERVICE_UNKNOWN = health_pb2.SERVING_STATUS_SERVICE_UNKNOWN


@dataclass(frozen=True)
class HealthReport:
    """A plugin's health as it reports it: the state, why, and which dependencies are missing."""

    state: HealthState
    reason: str = ""
    unavailable_dependencies: tuple[str, ...] = ()


HEALTHY, DEGRADED, UNHEALTHY = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.UNHEALTHY
SERVING, NOT_SERVING = ServingStatus.SERVING, ServingStatus.NOT_SERVING
SERVICE_UNKNOWN = ServingStatus.SERVICE_UNKNOWN

WATCH_CHECK_INTERVAL = 0.25
"""Seconds between checks, during a quiet watch, that its caller is still there."""

Listener = Callable[[HealthReport], None]

HealthMessage = TypeVar("HealthMessage", lifecycle_pb2.GetHealthResponse, lifecycle_pb2.ReportHealthRequest)


def report_to_wire(report: HealthReport, message: type[HealthMessage]) -> HealthMessage:
    """``report`` as ``GetHealthResponse`` or ``ReportHealthRequest`` (they share their fields)."""
    return message(
        state=report.state.value,  # type: ignore[arg-type]
        reason=report.reason,
        unavailable_dependencies=list(report.unavailable_dependencies),
    )


def report_from_wire(
    message: lifecycle_pb2.GetHealthResponse | lifecycle_pb2.ReportHealthRequest, blame: Code = Code.INTERNAL
) -> HealthReport:
    """The report a peer sent. A state this side does not know fails with ``blame``: ``internal``
    for an answer (a broken server), ``invalid_argument`` for a request (a broken caller)."""
    try:
        state = HealthState(message.state)
    except ValueError:
        raise ConnectError(blame, f"unknown health state {message.state}") from None
    return HealthReport(state, message.reason, tuple(message.unavailable_dependencies))


def status_from_wire(value: int) -> ServingStatus:
    """A serving status a peer sent; one this side does not know is a broken answer (``internal``)."""
    try:
        return ServingStatus(value)
    except ValueError:
        raise ConnectError(Code.INTERNAL, f"unknown serving status {value}") from None


class Health:
    """The health of one plugin: an overall state plus a serving status per service.

    Safe to call from any thread. Listeners run on the thread that changed the state,
    after the lock is released, so they may block (the host report does a network call).
    """

    def __init__(self) -> None:
        # _changed's lock guards every field below; waiters are woken on each change.
        self._changed = threading.Condition(threading.Lock())
        self._report = HealthReport(HealthState.HEALTHY)
        self._services: dict[str, ServingStatus] = {}
        self._version = 0
        self._listeners: list[Listener] = []

    def set(self, state: HealthState, reason: str = "", unavailable_dependencies: Sequence[str] = ()) -> None:
        """Report HEALTHY, DEGRADED or UNHEALTHY, with why and which dependencies are missing."""
        report = HealthReport(HealthState(state), reason, tuple(unavailable_dependencies))
        with self._changed:
            if report == self._report:
                return
            self._report = report
            self._bump()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(report)

    def set_service(self, service: str, status: ServingStatus) -> None:
        """Set one service's serving status (SERVING / NOT_SERVING); "" is the whole plugin."""
        with self._changed:
            self._services[service] = ServingStatus(status)
            self._bump()

    def get(self) -> HealthReport:
        with self._changed:
            return self._report

    def status(self, service: str = "") -> ServingStatus | None:
        """The serving status of ``service``, or None if it is not known here."""
        with self._changed:
            return self._status(service)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(report)`` after every change of the overall state."""
        with self._changed:
            self._listeners.append(listener)

    def watch(
        self, service: str, active: Callable[[], bool], check_interval: float = WATCH_CHECK_INTERVAL
    ) -> Iterator[ServingStatus]:
        """Yield the status of ``service`` now and on every change, while ``active()``.

        ``active`` cannot wake a waiter, so it is asked every ``check_interval`` seconds.
        """
        with self._changed:
            version, last = self._version, self._status(service)
        yield SERVICE_UNKNOWN if last is None else last
        while active():
            with self._changed:
                seen = version
                self._changed.wait_for(lambda: self._version != seen, timeout=check_interval)  # noqa: B023
                version, status = self._version, self._status(service)
            if status != last:
                last = status
                yield SERVICE_UNKNOWN if status is None else status

    def _status(self, service: str) -> ServingStatus | None:
        if service == "":
            overall = self._services.get("", SERVING)
            return NOT_SERVING if self._report.state == UNHEALTHY else overall
        return self._services.get(service)

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()


class HealthService(HealthServiceHandler):
    """``connectplugin.health.v1.HealthService`` over a :class:`Health`."""

    def __init__(self, health: Health) -> None:
        self._health = health

    def check(self, request: health_pb2.HealthCheckRequest, ctx: Context) -> health_pb2.HealthCheckResponse:
        status = self._health.status(request.service)
        if status is None:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status.value)  # type: ignore[arg-type]

    def watch(self, request: health_pb2.HealthCheckRequest, ctx: Context) -> Iterator[health_pb2.HealthCheckResponse]:
        for status in self._health.watch(request.service, ctx.is_active):
            yield health_pb2.HealthCheckResponse(status=status.value)  # type: ignore[arg-type]
