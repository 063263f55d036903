"""The sample key-value store: an in-memory implementation of ``kv.v1.KVService``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import connectplugin
from connectplugin import Code, ConnectError, Context
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceHandler

_POLL = 0.25
"""How often a quiet Watch checks whether its caller is still there."""


class KVStore(KVServiceHandler):
    """Keys to bytes, with watchers told of every change in order. Safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, bytes] = {}
        self._watchers: list[tuple[str, queue.SimpleQueue[kv_pb2.WatchEvent]]] = []

    def get(self, request: kv_pb2.GetRequest, ctx: Context) -> kv_pb2.GetResponse:
        _require_key(request.key)
        with self._lock:
            value = self._data.get(request.key)
        return kv_pb2.GetResponse(value=value or b"", found=value is not None)

    def put(self, request: kv_pb2.PutRequest, ctx: Context) -> kv_pb2.PutResponse:
        _require_key(request.key)
        event = kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_PUT, key=request.key, value=request.value)
        with self._lock:
            self._data[request.key] = request.value
            self._notify(event)
        return kv_pb2.PutResponse()

    def delete(self, request: kv_pb2.DeleteRequest, ctx: Context) -> kv_pb2.DeleteResponse:
        _require_key(request.key)
        with self._lock:
            found = self._data.pop(request.key, None) is not None
            if found:
                self._notify(kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_DELETE, key=request.key))
        return kv_pb2.DeleteResponse(found=found)

    def watch(self, request: kv_pb2.WatchRequest, ctx: Context) -> Iterator[kv_pb2.WatchEvent]:
        # Subscribe now, not inside a generator: the caller may write as soon as the
        # stream's headers arrive, which is before a generator body would first run.
        return _Subscription(self, request.prefix, ctx)

    def _notify(self, event: kv_pb2.WatchEvent) -> None:
        # Called with the lock held, so every watcher sees changes in the order they happened.
        for prefix, events in self._watchers:
            if event.key.startswith(prefix):
                events.put(event)


class _Subscription:
    """One watcher's events; closing it (the server does, when the call ends) unsubscribes."""

    def __init__(self, store: KVStore, prefix: str, ctx: Context) -> None:
        self._store = store
        self._ctx = ctx
        self._events: queue.SimpleQueue[kv_pb2.WatchEvent] = queue.SimpleQueue()
        self._entry = (prefix, self._events)
        with store._lock:
            store._watchers.append(self._entry)

    def __iter__(self) -> _Subscription:
        return self

    def __next__(self) -> kv_pb2.WatchEvent:
        while self._ctx.is_active():
            try:
                return self._events.get(timeout=_poll_interval(self._ctx))
            except queue.Empty:
                continue
        self.close()
        raise StopIteration

    def close(self) -> None:
        with self._store._lock:
            if self._entry in self._store._watchers:
                self._store._watchers.remove(self._entry)


def _require_key(key: str) -> None:
    if not key:
        raise ConnectError(Code.INVALID_ARGUMENT, "key must not be empty")


def _poll_interval(ctx: connectplugin.Context) -> float:
    remaining = ctx.timeout_remaining()
    return _POLL if remaining is None else max(0.001, min(_POLL, remaining))
