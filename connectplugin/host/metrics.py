"""Prometheus metrics of one host, served at ``/metrics``: calls, errors by code, latency and
open streams per plugin (routed calls and the host's own calls apart), supervision events, health.

Optional: needs ``prometheus_client`` (``pip install 'connectplugin[metrics]'``), imported only
by a host configured with ``HostConfig(metrics=MetricsConfig())``. Each host has a
``CollectorRegistry`` of its own, so several hosts in one process count apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..rpc import _protocol
from ..rpc.client import Call, ServerStream
from ..rpc.errors import Code, ConnectError
from ..rpc.httpserver import is_loopback
from ..rpc.server import text_response
from ..runtime.health import HealthState
from .admission import Operators
from .identities import Identities
from .registry import Registry
from .supervisor import SupervisionEvent

INSTALL = "pip install 'connectplugin[metrics]'"
"""What to install for metrics: prometheus_client, as the ``metrics`` extra."""

DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the latency histogram: sub-millisecond in-process calls to slow ones."""

ROUTED = "router"
"""``via`` label of calls plugins make to each other through the host's router."""
DIRECT = "host"
"""``via`` label of calls the host's application makes through ``dispense()`` clients."""

ERROR_BODY_LIMIT = 4096
"""Bytes of a relayed unary error answer kept to read its code; a longer one counts by its
HTTP status."""

GONE = "(gone)"
"""``plugin`` label of a call whose provider was revoked before it was counted."""


@dataclass(frozen=True)
class MetricsConfig:
    """Whether and how a host keeps metrics (``HostConfig.metrics``)."""

    latency_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    """Upper bounds of the unary latency histogram's buckets, in seconds."""
    loopback_without_token: bool = False
    """Let peers on loopback read ``/metrics`` without an operator token (a Prometheus on the
    same machine holding none). Off, the default: every scrape presents an operator token
    (``Authorization: Bearer``), since the launched plugins are local peers too. Peers
    elsewhere always need one."""


class MetricsUnavailableError(RuntimeError):
    """Metrics were asked for and ``prometheus_client`` is not installed."""

    def __init__(self, requirement: str = "prometheus-client", install: str = INSTALL) -> None:
        super().__init__(f"HostConfig.metrics needs {requirement}: {install}")
        self.requirement = requirement
        self.install = install


class Probe:
    """The metrics of one plugin instance for one ``via``, bound once so a call costs a dict
    lookup and a few counter updates. Safe from any thread (prometheus_client locks its values)."""

    __slots__ = ("_calls", "_latency", "_streams", "_errors", "_error_family", "_labels")

    def __init__(self, metrics: HostMetrics, plugin: str, via: str) -> None:
        self._labels = (plugin, via)
        self._calls = metrics._calls.labels(plugin, via)
        self._latency = metrics._latency.labels(plugin, via)
        self._streams = metrics._streams.labels(plugin, via)
        self._error_family = metrics._errors
        self._errors: dict[str, Any] = {}  # code -> bound counter, made on its first error

    def finished(self, started: float, code: str | None) -> None:
        """A unary call ended (``code`` None when it succeeded); ``started`` is its perf_counter()."""
        self._calls.inc()
        self._latency.observe(time.perf_counter() - started)
        if code is not None:
            self._error(code)

    def failed(self, code: str) -> None:
        """A stream that never opened: a call and an error, no latency."""
        self._calls.inc()
        self._error(code)

    def opened(self) -> None:
        self._calls.inc()
        self._streams.inc()

    def closed(self, code: str | None) -> None:
        self._streams.dec()
        if code is not None:
            self._error(code)

    def _error(self, code: str) -> None:
        counter = self._errors.get(code)
        if counter is None:
            counter = self._errors.setdefault(code, self._error_family.labels(*self._labels, code))
        counter.inc()


class CallCounts:
    """The probes of one ``via``, by runtime id. Safe from any thread; ``_lock`` guards
    additions (lookups read the dict without it)."""

    def __init__(self, metrics: HostMetrics, via: str) -> None:
        self._metrics = metrics
        self.via = via
        self._lock = threading.Lock()
        self._probes: dict[str, Probe] = {}

    def probe(self, runtime_id: str) -> Probe:
        probe = self._probes.get(runtime_id)
        if probe is not None:
            return probe
        identity = self._metrics._identities.get(runtime_id)
        if identity is None:  # revoked meanwhile: counted, but never kept
            return Probe(self._metrics, GONE, self.via)
        probe = Probe(self._metrics, identity.self_id, self.via)
        with self._lock:
            return self._probes.setdefault(runtime_id, probe)

    def outcome(self, runtime_id: str, started: float) -> Outcome:
        """What follows one call to ``runtime_id`` to its end (``started``: its perf_counter())."""
        return Outcome(self.probe(runtime_id), started)

    def refused(self, code: str) -> None:
        """A routed call refused before any provider was picked (unauthenticated, not_found...)."""
        self._metrics._refused.labels(code).inc()

    def forget(self, runtime_id: str) -> None:
        with self._lock:
            self._probes.pop(runtime_id, None)


class Outcome:
    """How one relayed response ended, learned from the bytes passing by: the code a unary
    error answer names, or the one in a stream's end message (the last envelope, looked for
    in the last two chunks only when the stream ends). Used by one thread."""

    __slots__ = ("_probe", "_started", "_status", "_headers", "_streamed", "_kept", "_last", "_ended")

    def __init__(self, probe: Probe, started: float) -> None:
        self._probe = probe
        self._started = started
        self._status = 200
        self._headers: Mapping[str, str] = {}
        self._streamed = False
        self._kept: list[bytes] = []  # a unary error's body, up to ERROR_BODY_LIMIT
        self._last = b""  # a stream's chunk before the latest
        self._ended = False

    def respond(self, status: int, headers: Mapping[str, str], streamed: bool) -> None:
        """The response's status and (lower-cased) headers, before its body."""
        self._status, self._headers, self._streamed = status, headers, streamed
        if streamed and status == 200:
            self._probe.opened()

    def feed(self, chunk: bytes) -> None:
        if self._status != 200:
            if sum(map(len, self._kept)) < ERROR_BODY_LIMIT:
                self._kept.append(chunk)
        elif self._streamed:
            self._kept = [self._last, chunk]
            self._last = chunk

    def end(self, code: str | None = None) -> None:
        """The response is over; ``code`` says how when the relay itself knows (the caller
        left, the provider went away), else it is read from what passed by."""
        if self._ended:
            return
        self._ended = True
        if code is None:
            code = self._code()
        if self._streamed and self._status == 200:
            self._probe.closed(code)
        elif self._streamed:
            self._probe.failed(code or Code.from_http_status(self._status).value)
        else:
            self._probe.finished(self._started, code)

    def _code(self) -> str | None:
        if self._status != 200:
            body = b"".join(self._kept)[:ERROR_BODY_LIMIT] if len(self._kept) else b""
            return _protocol.read_error(self._status, None, self._headers, body, {}).code.value
        if not self._streamed:
            return None
        return end_stream_code(b"".join(self._kept), self._headers.get(_protocol.STREAM_ENCODING_HEADER.lower(), ""))


def end_stream_code(tail: bytes, encoding: str) -> str | None:
    """The error code of the end-of-stream envelope that ``tail`` ends with (None: no error);
    ``unknown`` when no well-formed one is found there. Looks at most ``ERROR_BODY_LIMIT``
    bytes back, so a provider ending its streams with garbage costs the host little."""
    start = len(tail) - _protocol.ENVELOPE_HEADER_SIZE
    stop = max(0, start - ERROR_BODY_LIMIT)
    while start >= stop:
        flags = tail[start]
        size = int.from_bytes(tail[start + 1 : start + 5], "big")
        if flags & _protocol.FLAG_END_STREAM and start + _protocol.ENVELOPE_HEADER_SIZE + size == len(tail):
            data = tail[start + _protocol.ENVELOPE_HEADER_SIZE :]
            try:
                if flags & _protocol.FLAG_COMPRESSED:
                    data = _protocol.decompress(encoding or _protocol.GZIP, data, ERROR_BODY_LIMIT * 16)
                _, error = _protocol.read_end_stream(data, {})
            except ConnectError:
                break
            return None if error is None else error.code.value
        start -= 1
    return Code.UNKNOWN.value


class DirectCalls:
    """An interceptor counting the calls a host's application makes to one launched plugin
    through its dispensed clients (the host's own control calls are not counted). It counts
    once ``bind`` names the instance. Safe from any thread."""

    def __init__(self, counts: CallCounts, services: frozenset[str]) -> None:
        """``services``: the fully qualified names of the services ``dispense()`` hands out."""
        self._counts = counts
        self._services = services
        self._probe: Probe | None = None

    def bind(self, runtime_id: str) -> None:
        self._probe = self._counts.probe(runtime_id)

    def __call__(self, call: Call, proceed: Callable[[Call], Any]) -> Any:
        probe = self._probe
        if probe is None or call.method.service not in self._services:
            return proceed(call)
        started = time.perf_counter()
        try:
            result = proceed(call)
        except ConnectError as e:
            if call.method.server_streaming:
                probe.failed(e.code.value)
            else:
                probe.finished(started, e.code.value)
            raise
        if call.method.server_streaming:
            probe.opened()
            return _ObservedStream(result, probe)
        probe.finished(started, None)
        return result


class _ObservedStream(ServerStream[Any]):
    """A dispensed client's stream that tells its probe how it ended; otherwise the stream
    itself (a view of it: ``ServerStream.__init__`` is not run). A stream closed before its
    end counts as ``canceled``."""

    def __init__(self, inner: ServerStream[Any], probe: Probe) -> None:
        self._inner = inner
        self._probe = probe
        self._ended = threading.Lock()  # taken once, by whichever end comes first

    @property
    def headers(self) -> Any:
        return self._inner.headers

    @property
    def trailers(self) -> Any:
        return self._inner.trailers

    def __next__(self) -> Any:
        try:
            return next(self._inner)
        except StopIteration:
            self._end(None)
            raise
        except ConnectError as e:
            self._end(e.code.value)
            raise

    def close(self) -> None:
        self._inner.close()
        self._end(Code.CANCELED.value)

    def _end(self, code: str | None) -> None:
        if self._ended.acquire(blocking=False):
            self._probe.closed(code)


class HostMetrics:
    """One host's metrics in a ``CollectorRegistry`` of its own. Safe from any thread.

    Labels: ``plugin`` is the plugin's self id (a restarted plugin keeps its series), ``via``
    is ``router`` or ``host``. Health and what each plugin provides are read from the
    registry at each scrape, so they are never stale.
    """

    def __init__(self, config: MetricsConfig, identities: Identities, registry: Registry) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise MetricsUnavailableError() from None
        self.config = config
        self._identities = identities
        self.registry = prom.CollectorRegistry()
        labels = ("plugin", "via")
        self._calls = prom.Counter(
            "connectplugin_calls", "Calls to plugins (unary calls and streams)", labels, registry=self.registry
        )
        self._errors = prom.Counter(
            "connectplugin_call_errors", "Calls that ended with an error, by Connect code",
            (*labels, "code"), registry=self.registry,
        )
        self._latency = prom.Histogram(
            "connectplugin_call_duration_seconds", "Duration of unary calls", labels,
            buckets=config.latency_buckets, registry=self.registry,
        )
        self._streams = prom.Gauge(
            "connectplugin_streams_open", "Server streams open now", labels, registry=self.registry
        )
        self._supervision = prom.Counter(
            "connectplugin_supervision_events", "Crashes, restarts, failed restarts and quarantines",
            ("plugin", "event"), registry=self.registry,
        )
        self._refused = prom.Counter(
            "connectplugin_router_refused", "Routed calls refused before a provider was picked",
            ("code",), registry=self.registry,
        )
        self.registry.register(_RegistryCollector(registry, identities, prom))
        self.routed = CallCounts(self, ROUTED)
        self.direct = CallCounts(self, DIRECT)
        self._generate = prom.generate_latest
        self.content_type = prom.CONTENT_TYPE_LATEST

    def supervision(self, event: SupervisionEvent) -> None:
        """A supervision listener (``PluginHost.on_supervision``)."""
        self._supervision.labels(event.name, event.transition.value).inc()

    def forget(self, runtime_id: str) -> None:
        """A plugin instance is gone: drop its probes (its series stay, by self id)."""
        self.routed.forget(runtime_id)
        self.direct.forget(runtime_id)

    def calls(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(calls, errors) so far by (plugin, via), for the dashboard's rates."""
        out: dict[tuple[str, str], list[float]] = {}
        for family in self.registry.collect():
            if family.name not in ("connectplugin_calls", "connectplugin_call_errors"):
                continue
            index = 0 if family.name == "connectplugin_calls" else 1
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["plugin"], sample.labels["via"])
                    out.setdefault(key, [0.0, 0.0])[index] += sample.value
        return {k: (v[0], v[1]) for k, v in out.items()}

    def exposition(self) -> bytes:
        return self._generate(self.registry)


class _RegistryCollector:
    """Health and provided services of every registered plugin, read at scrape time."""

    def __init__(self, registry: Registry, identities: Identities, prom: Any) -> None:
        self._registry = registry
        self._identities = identities
        self._gauge = prom.metrics_core.GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        health = self._gauge(
            "connectplugin_plugin_health", "1 for a registered plugin's current health state",
            labels=("plugin", "runtime_id", "state"),
        )
        provides = self._gauge(
            "connectplugin_plugin_provides", "1 for each service a registered plugin provides",
            labels=("plugin", "runtime_id", "service_type", "version"),
        )
        seen: set[str] = set()
        for p in self._registry.providers():
            identity = self._identities.get(p.provider_id)
            name = identity.self_id if identity is not None else GONE
            provides.add_metric((name, p.provider_id, p.service_type, p.version), 1)
            if p.provider_id in seen:
                continue
            seen.add(p.provider_id)
            for state in HealthState:
                health.add_metric((name, p.provider_id, state.name.lower()), 1 if p.health == state else 0)
        yield health
        yield provides

    def describe(self) -> Iterable[Any]:
        return ()


class MetricsEndpoint:
    """``/metrics``: the text exposition, for operators (see ``MetricsConfig``). A WSGI app."""

    def __init__(self, metrics: HostMetrics | None, operators: Operators) -> None:
        self._metrics = metrics
        self._operators = operators

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        metrics = self._metrics
        if metrics is None:
            return text_response(
                start_response, 404, f"metrics are off: HostConfig(metrics=MetricsConfig()), with {INSTALL}"
            )
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        local = metrics.config.loopback_without_token and is_loopback(environ.get("REMOTE_ADDR", ""))
        if not local:
            try:
                self._operators.check(environ.get("HTTP_AUTHORIZATION", ""))
            except ConnectError as e:
                body = (e.message + "\n").encode()
                start_response(
                    "401 Unauthorized",
                    [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("WWW-Authenticate", "Bearer")],
                )
                return [body]
        body = metrics.exposition()
        start_response(
            "200 OK",
            [("Content-Type", metrics.content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")],
        )
        return [b""] if environ["REQUEST_METHOD"] == "HEAD" else [body]
