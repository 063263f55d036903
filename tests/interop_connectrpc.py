"""kv.v1.KVService on the official Python Connect runtime (``connectrpc`` 0.13), for interop tests.

connectrpc ships no protoc plugin, so this module writes by hand what its generator would emit:
``MethodInfo`` descriptors built from our ``KV_SERVICE``, a sync client with one method per RPC,
and a WSGI application serving a store written against connectrpc's handler API.

Both stores under test (this one and ``InteropStore`` in test_interop.py) give the same few keys
and headers a special meaning, so each behaviour can be triggered from either side:

- Get of ``SLOW_KEY`` sleeps ``SLOW_SECONDS`` before answering.
- Get of ``LOCKED_KEY`` fails with failed_precondition and a ``google.protobuf.StringValue`` detail.
- Watch of a prefix under ``DENIED_PREFIX`` fails with permission_denied before any event.
- A watched key ending in ``ABORT_SUFFIX`` fails the watch with aborted instead of being delivered;
  one ending in ``END_SUFFIX`` is delivered and then ends the watch cleanly.
- Request header ``x-echo`` comes back as response header ``x-echo`` and trailer ``x-echo-trailer``;
  ``x-echo-bin`` comes back as response header ``x-echo-bin``; a deadline is reported in
  response header ``x-timeout-ms`` (milliseconds left when the handler started).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from connectrpc.client import ConnectClientSync
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectWSGIApplication, EndpointSync
from protobuf.wkt import StringValue

from connectplugin import Method
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_SERVICE
from tests.kvget.gen.kvget.v1 import kvget_pb2
from tests.kvget.gen.kvget.v1.kvget_connect import KV_GET_SERVICE

SLOW_KEY = "slow"
SLOW_SECONDS = 0.5
LOCKED_KEY = "locked"
LOCKED_MESSAGE = "locked is held by another writer"
LOCKED_DETAIL = "retry after the lock is released"
EMPTY_KEY_MESSAGE = "key must not be empty"
DENIED_PREFIX = "denied/"
DENIED_MESSAGE = "watching denied/ is not allowed"
ABORT_SUFFIX = "/abort"
ABORT_MESSAGE = "watch aborted by the store"
END_SUFFIX = "/end"

_POLL = 0.05


def method_info(method: Method) -> MethodInfo:
    """connectrpc's descriptor for one of our generated methods."""
    return MethodInfo(
        name=method.name,
        service_name=method.service,
        input=method.input,
        output=method.output,
        idempotency_level=(
            IdempotencyLevel.NO_SIDE_EFFECTS if method.idempotent else IdempotencyLevel.UNKNOWN
        ),
        stream_type=StreamType.SERVER_STREAM if method.server_streaming else StreamType.UNARY,
    )


KV_METHODS: dict[str, MethodInfo] = {name: method_info(m) for name, m in KV_SERVICE.methods.items()}
READ = KV_GET_SERVICE.methods["Get"]
"""The store's Get declared side-effect free (tests/kvget): what GET calls go to."""


def echo_metadata(
    request_headers: Mapping[str, Any],
    response_headers: MutableMapping[str, Any],
    response_trailers: MutableMapping[str, Any],
    timeout_ms: float | None,
) -> None:
    """The header echo both stores perform (see the module docstring)."""
    if "x-echo" in request_headers:
        response_headers["x-echo"] = request_headers["x-echo"]
        response_trailers["x-echo-trailer"] = request_headers["x-echo"]
    if "x-echo-bin" in request_headers:
        response_headers["x-echo-bin"] = request_headers["x-echo-bin"]
    if timeout_ms is not None:
        response_headers["x-timeout-ms"] = str(int(timeout_ms))


class ConnectrpcKVStore:
    """An in-memory kv.v1.KVService written against connectrpc's sync handler API.

    Safe from any thread. ``close()`` ends open watches so a server can stop promptly.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, bytes] = {}
        self._watchers: list[tuple[str, queue.SimpleQueue[kv_pb2.WatchEvent]]] = []
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()

    def get(self, request: kv_pb2.GetRequest, ctx: RequestContext) -> kv_pb2.GetResponse:
        _echo(ctx)
        _require_key(request.key)
        if request.key == SLOW_KEY:
            time.sleep(SLOW_SECONDS)
        if request.key == LOCKED_KEY:
            raise ConnectError(
                Code.FAILED_PRECONDITION, LOCKED_MESSAGE, details=[StringValue(value=LOCKED_DETAIL)]
            )
        with self._lock:
            value = self._data.get(request.key)
        return kv_pb2.GetResponse(value=value or b"", found=value is not None)

    def put(self, request: kv_pb2.PutRequest, ctx: RequestContext) -> kv_pb2.PutResponse:
        _echo(ctx)
        _require_key(request.key)
        with self._lock:
            self._data[request.key] = request.value
            self._notify(
                kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_PUT, key=request.key, value=request.value)
            )
        return kv_pb2.PutResponse()

    def delete(self, request: kv_pb2.DeleteRequest, ctx: RequestContext) -> kv_pb2.DeleteResponse:
        _echo(ctx)
        _require_key(request.key)
        with self._lock:
            found = self._data.pop(request.key, None) is not None
            if found:
                self._notify(kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_DELETE, key=request.key))
        return kv_pb2.DeleteResponse(found=found)

    def watch(
        self, request: kv_pb2.WatchRequest, ctx: RequestContext
    ) -> Iterator[kv_pb2.WatchEvent]:
        # Not a generator itself: headers and a refusal happen before the stream starts.
        _echo(ctx)
        if request.prefix.startswith(DENIED_PREFIX):
            raise ConnectError(Code.PERMISSION_DENIED, DENIED_MESSAGE)
        return self._stream(request.prefix, ctx)

    def _stream(self, prefix: str, ctx: RequestContext) -> Iterator[kv_pb2.WatchEvent]:
        events: queue.SimpleQueue[kv_pb2.WatchEvent] = queue.SimpleQueue()
        watcher = (prefix, events)
        with self._lock:
            self._watchers.append(watcher)
        try:
            while not self._closed.is_set():
                # connectrpc's sync server leaves deadlines to the handler.
                remaining = ctx.timeout_ms
                if remaining is not None and remaining <= 0:
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "watch outlived its timeout")
                wait = _POLL if remaining is None else min(_POLL, remaining / 1000)
                try:
                    event = events.get(timeout=wait)
                except queue.Empty:
                    continue
                if event.key.endswith(ABORT_SUFFIX):
                    raise ConnectError(Code.ABORTED, ABORT_MESSAGE)
                yield event
                if event.key.endswith(END_SUFFIX):
                    return
        finally:
            with self._lock:
                self._watchers.remove(watcher)

    def _notify(self, event: kv_pb2.WatchEvent) -> None:
        for prefix, events in self._watchers:
            if event.key.startswith(prefix):
                events.put(event)


def _echo(ctx: RequestContext) -> None:
    echo_metadata(ctx.request_headers, ctx.response_headers, ctx.response_trailers, ctx.timeout_ms)


def _require_key(key: str) -> None:
    if not key:
        raise ConnectError(Code.INVALID_ARGUMENT, EMPTY_KEY_MESSAGE)


class KVServiceWSGIApplication(ConnectWSGIApplication):
    """connectrpc's WSGI server for kv.v1.KVService, speaking google.protobuf messages."""

    def __init__(self, store: ConnectrpcKVStore) -> None:
        endpoints: dict[str, Any] = {}
        for method in KV_SERVICE.methods.values():
            info, function = KV_METHODS[method.name], getattr(store, method.attr)
            if method.server_streaming:
                endpoints[method.path] = EndpointSync.server_stream(method=info, function=function)
            else:
                endpoints[method.path] = EndpointSync.unary(method=info, function=function)

        def read(request: kvget_pb2.GetRequest, ctx: RequestContext) -> kvget_pb2.GetResponse:
            found = store.get(kv_pb2.GetRequest(key=request.key), ctx)
            return kvget_pb2.GetResponse(value=found.value, found=found.found)

        endpoints[READ.path] = EndpointSync.unary(method=method_info(READ), function=read)
        super().__init__(endpoints=endpoints, codecs=google_protobuf_codecs())

    @property
    def path(self) -> str:
        return "/" + KV_SERVICE.name


class ConnectrpcKVClient(ConnectClientSync):
    """connectrpc's sync client for kv.v1.KVService, one method per RPC."""

    def get(
        self,
        request: kv_pb2.GetRequest,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        use_get: bool = False,
    ) -> kv_pb2.GetResponse:
        return self.execute_unary(
            request=request,
            method=KV_METHODS["Get"],
            headers=headers,
            timeout_ms=timeout_ms,
            use_get=use_get,
        )

    def read(self, request: kvget_pb2.GetRequest, *, use_get: bool = False) -> kvget_pb2.GetResponse:
        """Get as the side-effect-free ``kvget.v1.KVGetService/Get`` (GET allowed)."""
        return self.execute_unary(request=request, method=method_info(READ), use_get=use_get)

    def put(
        self, request: kv_pb2.PutRequest, *, headers: Mapping[str, str] | None = None
    ) -> kv_pb2.PutResponse:
        return self.execute_unary(request=request, method=KV_METHODS["Put"], headers=headers)

    def delete(
        self, request: kv_pb2.DeleteRequest, *, headers: Mapping[str, str] | None = None
    ) -> kv_pb2.DeleteResponse:
        return self.execute_unary(request=request, method=KV_METHODS["Delete"], headers=headers)

    def watch(
        self,
        request: kv_pb2.WatchRequest,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
    ) -> Iterator[kv_pb2.WatchEvent]:
        return self.execute_server_stream(
            request=request, method=KV_METHODS["Watch"], headers=headers, timeout_ms=timeout_ms
        )
