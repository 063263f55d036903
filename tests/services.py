"""Test-only handlers and raw-HTTP helpers shared by the codec tests.

``ScriptedKV`` is the sample KV store with one extra ability: a test may replace any of its
methods for the duration of the test, and every call records what the handler saw.
The helpers below speak Connect by hand (``http.client``), so a test can send bytes the
real client would never produce and look at exactly what came back.
"""

from __future__ import annotations

import gzip
import http.client
import json
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.message import Message as HTTPHeaders
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import Message

from connectplugin import Context
from connectplugin.gen.connectplugin.v1 import plugininfo_pb2
from connectplugin.gen.connectplugin.v1.plugininfo_connect import PluginIdentityHandler
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.store import KVStore
from tests.kvget.gen.kvget.v1 import kvget_pb2
from tests.kvget.gen.kvget.v1.kvget_connect import KVGetServiceHandler

KV = "/kv.v1.KVService"
GET, PUT, DELETE, WATCH = f"{KV}/Get", f"{KV}/Put", f"{KV}/Delete", f"{KV}/Watch"
READ = "/kvget.v1.KVGetService/Get"
"""The store's Get declared side-effect free (tests/kvget): callable with GET, retried."""
IDENTITY = "/connectplugin.v1.PluginIdentity"
GET_INFO, SET_IDENTITY = f"{IDENTITY}/GetPluginInfo", f"{IDENTITY}/SetRuntimeIdentity"

Script = Callable[[Message, Context], Any]


# --- handlers -------------------------------------------------------------------------------


@dataclass
class Seen:
    """What one handler invocation saw."""

    method: str
    request: Message
    headers: dict[str, Any]
    timeout_remaining: float | None
    http_method: str


class ScriptedKV(KVStore):
    """The sample store; ``script(name, fn)`` replaces one of its methods for a test.

    ``pause(s)`` sleeps until ``released`` is set (the fixtures set it at teardown), so a
    handler that "outlives its deadline" never keeps a server from closing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, Script] = {}
        self.calls: list[Seen] = []
        self.released = threading.Event()

    def script(self, name: str, fn: Script) -> None:
        self.scripts[name] = fn

    def pause(self, seconds: float) -> None:
        self.released.wait(seconds)

    @property
    def last(self) -> Seen:
        assert self.calls, "the handler was never called"
        return self.calls[-1]

    def get(self, request, ctx):  # type: ignore[override]
        return self._dispatch("get", request, ctx)

    def put(self, request, ctx):  # type: ignore[override]
        return self._dispatch("put", request, ctx)

    def delete(self, request, ctx):  # type: ignore[override]
        return self._dispatch("delete", request, ctx)

    def watch(self, request, ctx):  # type: ignore[override]
        return self._dispatch("watch", request, ctx)

    def _dispatch(self, name: str, request: Message, ctx: Context) -> Any:
        self.calls.append(
            Seen(
                name,
                request,
                dict(ctx.request_headers),
                ctx.timeout_remaining(),
                ctx.environ["REQUEST_METHOD"],
            )
        )
        fn = self.scripts.get(name)
        if fn is None:
            return getattr(KVStore, name)(self, request, ctx)
        return fn(request, ctx)


class ReadableKV(KVGetServiceHandler):
    """``kv``'s Get as ``kvget.v1.KVGetService/Get``, a method declared side-effect free (the
    samples' KV contract is Go's, whose Get is not); a ``ScriptedKV`` records and scripts it
    as its own Get."""

    def __init__(self, kv: KVStore) -> None:
        self.kv = kv

    def get(self, request, ctx):  # type: ignore[override]
        found = self.kv.get(kv_pb2.GetRequest(key=request.key), ctx)
        if isinstance(found, kv_pb2.GetResponse):
            return kvget_pb2.GetResponse(value=found.value, found=found.found)
        return found


class IdentityRecorder(PluginIdentityHandler):
    """A service whose messages have multi-word fields, for the JSON name mapping."""

    def __init__(self) -> None:
        self.requests: list[plugininfo_pb2.SetRuntimeIdentityRequest] = []

    def get_plugin_info(self, request, ctx):  # type: ignore[override]
        return plugininfo_pb2.GetPluginInfoResponse(self_id="kv-plugin", self_version="1.2.3")

    def set_runtime_identity(self, request, ctx):  # type: ignore[override]
        self.requests.append(request)
        return plugininfo_pb2.SetRuntimeIdentityResponse(acknowledged=True)


def events(n: int, value: bytes = b"") -> list[kv_pb2.WatchEvent]:
    return [
        kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_PUT, key=f"k{i}", value=value) for i in range(n)
    ]


def sized(make: Callable[[int], Message], size: int) -> Message:
    """``make(n)`` with n chosen so that the binary encoding is exactly ``size`` bytes."""
    for overhead in range(1, 16):
        message = make(size - overhead)
        if message.ByteSize() == size:
            return message
    raise ValueError(f"cannot build a message of exactly {size} bytes")


def put_of_size(size: int) -> kv_pb2.PutRequest:
    return sized(lambda n: kv_pb2.PutRequest(key="k", value=b"v" * n), size)  # type: ignore[return-value]


def watch_of_size(size: int) -> kv_pb2.WatchRequest:
    return sized(lambda n: kv_pb2.WatchRequest(prefix="p" * n), size)  # type: ignore[return-value]


# --- raw Connect over http.client -----------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: HTTPHeaders
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def envelopes(self) -> list[tuple[int, bytes]]:
        return split_envelopes(self.body)

    def end_stream(self) -> dict[str, Any]:
        """The end-stream message, checked to be the last and only one."""
        frames = self.envelopes()
        ends = [i for i, (flags, _) in enumerate(frames) if flags & 0x02]
        assert ends == [len(frames) - 1], f"end-stream must be last and unique: {frames!r}"
        flags, data = frames[-1]
        if flags & 0x01:
            data = gzip.decompress(data)
        return json.loads(data)

    def messages(self) -> list[bytes]:
        return [data for flags, data in self.envelopes() if not flags & 0x02]


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def split_envelopes(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 5, f"truncated envelope prefix at {pos}"
        flags, length = struct.unpack(">BI", data[pos : pos + 5])
        assert len(data) - pos - 5 >= length, f"truncated envelope at {pos}"
        frames.append((flags, data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return frames


def send(
    url: str,
    method: str,
    target: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """One raw HTTP/1.1 exchange; an iterable body goes out chunked, without Content-Length."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        conn.request(method, target, body=body, headers=dict(headers or {}), encode_chunked=chunked)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def post(url: str, path: str, body: bytes, content_type: str, **headers: str) -> Reply:
    """POST with ``Content_Type``-style keyword headers (underscores become dashes)."""
    all_headers = {"Content-Type": content_type}
    all_headers.update({k.replace("_", "-"): v for k, v in headers.items()})
    return send(url, "POST", path, body, all_headers)


def post_unary(url: str, path: str, message: Message, **headers: str) -> Reply:
    return post(url, path, message.SerializeToString(), "application/proto", **headers)


def post_stream(url: str, path: str, message: Message, **headers: str) -> Reply:
    return post(
        url, path, envelope(message.SerializeToString()), "application/connect+proto", **headers
    )
