"""Interop with the official Python Connect runtime, connectrpc 0.13, on real loopback sockets.

Both directions run the same matrix: connectrpc's sync client against our ``App`` serving the
sample ``KVStore``, and our ``Client`` against connectrpc's WSGI server serving a store written
against its API (tests/interop_connectrpc.py). Both servers run on waitress through our
``HTTPServer``, wrapped in a ``Recorder`` so tests can check what actually crossed the wire.
"""

from __future__ import annotations

import base64
import contextlib
import io
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from connectrpc.client import ResponseMetadata as TheirResponseMetadata
from connectrpc.code import Code as TheirCode
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError as TheirConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from google.protobuf import wrappers_pb2

from connectplugin import (
    App,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    Context,
    HTTPServer,
    Method,
    ResponseMetadata,
)
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_SERVICE, KVServiceClient
from samples.kv.store import KVStore
from tests.helpers import wait_until
from tests.interop_connectrpc import (
    ABORT_MESSAGE,
    ABORT_SUFFIX,
    DENIED_MESSAGE,
    DENIED_PREFIX,
    EMPTY_KEY_MESSAGE,
    END_SUFFIX,
    LOCKED_DETAIL,
    LOCKED_KEY,
    LOCKED_MESSAGE,
    READ,
    SLOW_KEY,
    SLOW_SECONDS,
    ConnectrpcKVClient,
    ConnectrpcKVStore,
    KVServiceWSGIApplication,
    echo_metadata,
)
from tests.kvget.gen.kvget.v1 import kvget_pb2
from tests.kvget.gen.kvget.v1.kvget_connect import KVGetServiceClient
from tests.services import ReadableKV

T = TypeVar("T")

BIG = bytes(range(256)) * 8
"""2 KiB: above both sides' compression threshold."""
PREFIX = "watch/" + "p" * 1100 + "/"
"""Watched keys are over 1 KiB, so every event (deletes too) is large enough to compress."""
READY_KEY = PREFIX + "ready"
BINARY = b"\x00\xffbin"
GZIP_MAGIC = b"\x1f\x8b"
TIMEOUT = 0.15
"""Seconds a caller waits in the timeout tests; well under SLOW_SECONDS."""


# --- the matrix -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    codec: str
    """``proto`` or ``json``."""
    compression: str
    """``gzip`` or ``identity``, for requests (and, where the client allows, responses)."""

    def __str__(self) -> str:
        return f"{self.codec}-{self.compression}"


WIRES = [
    Wire(codec, compression) for codec in ("proto", "json") for compression in ("gzip", "identity")
]
CODECS = [Wire(codec, "gzip") for codec in ("proto", "json")]


def their_options(wire: Wire) -> dict[str, Any]:
    """ConnectClientSync arguments for a wire: its codec, and gzip both ways or not at all."""
    gzip = wire.compression == "gzip"
    codec = (
        google_protobuf_binary_codec() if wire.codec == "proto" else google_protobuf_json_codec()
    )
    return {
        "codec": codec,
        "send_compression": GzipCompression() if gzip else None,
        "accept_compression": [GzipCompression()] if gzip else [],
    }


# --- recording what crosses the wire ----------------------------------------------------------


@dataclass
class Exchange:
    method: str
    path: str
    query: str
    request_headers: dict[str, str]
    request_body: bytes
    status: str = ""
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytearray = field(default_factory=bytearray)


class Recorder:
    """WSGI middleware keeping each exchange's headers and raw bodies. Safe from any thread."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterator[bytes]:
        length = environ.get("CONTENT_LENGTH")
        body = environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read()
        environ["wsgi.input"] = io.BytesIO(body)
        headers = {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        exchange = Exchange(
            environ["REQUEST_METHOD"],
            environ["PATH_INFO"],
            environ.get("QUERY_STRING", ""),
            headers,
            body,
        )
        with self._lock:
            self._exchanges.append(exchange)

        def record_start(
            status: str, response_headers: list[tuple[str, str]], *exc_info: Any
        ) -> Any:
            exchange.status = status
            exchange.response_headers = {k.lower(): v for k, v in response_headers}
            return start_response(status, response_headers, *exc_info)

        return self._relay(self.app(environ, record_start), exchange)

    @staticmethod
    def _relay(body: Any, exchange: Exchange) -> Iterator[bytes]:
        try:
            for chunk in body:
                exchange.response_body += chunk
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def last(self, method: Method) -> Exchange:
        with self._lock:
            matching = [e for e in self._exchanges if e.path == method.path]
        assert matching, f"no call to {method.path} was recorded"
        return matching[-1]


def envelope_flags(body: bytes | bytearray) -> list[int]:
    """The flags byte of each envelope in a streaming body."""
    flags, pos = [], 0
    while pos < len(body):
        flag, length = struct.unpack_from(">BI", body, pos)
        flags.append(flag)
        pos += 5 + length
    assert pos == len(body), "the body is not a sequence of whole envelopes"
    return flags


# --- our side: the sample store plus the behaviours the interop tests trigger -----------------


class InteropStore(KVStore):
    """The sample KVStore with the special keys and header echo of tests/interop_connectrpc.py."""

    def get(self, request: kv_pb2.GetRequest, ctx: Context) -> kv_pb2.GetResponse:
        _echo(ctx)
        if request.key == SLOW_KEY:
            time.sleep(SLOW_SECONDS)
        if request.key == LOCKED_KEY:
            raise ConnectError(
                Code.FAILED_PRECONDITION,
                LOCKED_MESSAGE,
                [wrappers_pb2.StringValue(value=LOCKED_DETAIL)],
            )
        return super().get(request, ctx)

    def put(self, request: kv_pb2.PutRequest, ctx: Context) -> kv_pb2.PutResponse:
        _echo(ctx)
        return super().put(request, ctx)

    def delete(self, request: kv_pb2.DeleteRequest, ctx: Context) -> kv_pb2.DeleteResponse:
        _echo(ctx)
        return super().delete(request, ctx)

    def watch(self, request: kv_pb2.WatchRequest, ctx: Context) -> Iterator[kv_pb2.WatchEvent]:
        # Not a generator itself: headers and a refusal happen before the stream starts.
        _echo(ctx)
        if request.prefix.startswith(DENIED_PREFIX):
            raise ConnectError(Code.PERMISSION_DENIED, DENIED_MESSAGE)
        return self._until_end(super().watch(request, ctx))

    @staticmethod
    def _until_end(events: Iterator[kv_pb2.WatchEvent]) -> Iterator[kv_pb2.WatchEvent]:
        with contextlib.closing(events):  # type: ignore[type-var]
            for event in events:
                if event.key.endswith(ABORT_SUFFIX):
                    raise ConnectError(Code.ABORTED, ABORT_MESSAGE)
                yield event
                if event.key.endswith(END_SUFFIX):
                    return


def _echo(ctx: Context) -> None:
    remaining = ctx.timeout_remaining()
    echo_metadata(
        ctx.request_headers,
        ctx.response_headers,
        ctx.response_trailers,
        None if remaining is None else remaining * 1000,
    )


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    recorder: Recorder


@pytest.fixture
def our_server() -> Iterator[Served]:
    store = InteropStore()
    recorder = Recorder(App([store, ReadableKV(store)]))
    server = HTTPServer(recorder).start()
    yield Served(server.url, recorder)
    server.close()


@pytest.fixture
def their_server() -> Iterator[Served]:
    store = ConnectrpcKVStore()
    recorder = Recorder(KVServiceWSGIApplication(store))
    server = HTTPServer(recorder).start()
    yield Served(server.url, recorder)
    store.close()
    server.close()


@pytest.fixture
def wire() -> Wire:
    """The default wire; tests covering the matrix parametrise this name."""
    return Wire("proto", "gzip")


@pytest.fixture
def their_client(our_server: Served, wire: Wire) -> Iterator[ConnectrpcKVClient]:
    client = ConnectrpcKVClient(our_server.url, **their_options(wire))
    yield client
    client.close()


@pytest.fixture
def our_client(their_server: Served, wire: Wire) -> Iterator[Client]:
    client = Client(their_server.url, ClientConfig(codec=wire.codec, compression=wire.compression))
    yield client
    client.close()


@pytest.fixture
def our_kv(our_client: Client) -> KVServiceClient:
    return KVServiceClient(our_client)


# --- running a watch --------------------------------------------------------------------------

Emit = Callable[[kv_pb2.WatchEvent], None]


@dataclass(frozen=True)
class Writer:
    """Put and delete through one side's client, for driving a watch."""

    put: Callable[[str, bytes], Any]
    delete: Callable[[str], Any]


def their_writer(client: ConnectrpcKVClient) -> Writer:
    return Writer(
        lambda key, value: client.put(kv_pb2.PutRequest(key=key, value=value)),
        lambda key: client.delete(kv_pb2.DeleteRequest(key=key)),
    )


def our_writer(kv: KVServiceClient) -> Writer:
    return Writer(
        lambda key, value: kv.put(kv_pb2.PutRequest(key=key, value=value)),
        lambda key: kv.delete(kv_pb2.DeleteRequest(key=key)),
    )


def their_watch(client: ConnectrpcKVClient, **options: Any) -> Callable[[Emit], None]:
    def consume(emit: Emit) -> None:
        for event in client.watch(kv_pb2.WatchRequest(prefix=PREFIX), **options):
            emit(event)

    return consume


def our_watch(kv: KVServiceClient, **options: Any) -> Callable[[Emit], None]:
    def consume(emit: Emit) -> None:
        with kv.watch(kv_pb2.WatchRequest(prefix=PREFIX), **options) as stream:
            for event in stream:
                emit(event)

    return consume


def put_event(key: str, value: bytes) -> kv_pb2.WatchEvent:
    return kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_PUT, key=key, value=value)


def delete_event(key: str) -> kv_pb2.WatchEvent:
    return kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_DELETE, key=key)


END_KEY = PREFIX + END_SUFFIX.lstrip("/")
ABORT_KEY = PREFIX + ABORT_SUFFIX.lstrip("/")


def standard_writes(writer: Writer) -> None:
    """Two puts, a delete, and the key that ends the watch; see EXPECTED_EVENTS."""
    writer.put(PREFIX + "a", BIG)
    writer.put(PREFIX + "b", BIG[::-1])
    writer.delete(PREFIX + "a")
    writer.put(END_KEY, b"")


EXPECTED_EVENTS = [
    put_event(PREFIX + "a", BIG),
    put_event(PREFIX + "b", BIG[::-1]),
    delete_event(PREFIX + "a"),
    put_event(END_KEY, b""),
]


def aborting_writes(writer: Writer) -> None:
    writer.put(PREFIX + "a", b"1")
    writer.put(ABORT_KEY, b"")


def run_watch(
    consume: Callable[[Emit], T],
    writer: Writer,
    writes: Callable[[Writer], None] = standard_writes,
) -> tuple[list[kv_pb2.WatchEvent], T]:
    """Runs ``consume(emit)``, which watches PREFIX and emits each event, on a thread.

    Nothing on the wire says when a watch is registered, so ``writer`` puts READY_KEY until an
    event arrives, then ``writes(writer)`` runs. Returns the events other than READY_KEY (in
    the order received) and what ``consume`` returned.
    """
    received: queue.SimpleQueue[kv_pb2.WatchEvent] = queue.SimpleQueue()
    with ThreadPoolExecutor(1, thread_name_prefix="watch") as pool:
        done = pool.submit(consume, received.put)

        def delivered() -> bool:
            if done.done():
                done.result()
                pytest.fail("the watch ended before it delivered an event")
            writer.put(READY_KEY, b"")
            try:
                received.get(timeout=0.05)
            except queue.Empty:
                return False
            return True

        wait_until(delivered, "the watch to deliver its first event")
        writes(writer)
        result = done.result(timeout=5)
    events = []
    while not received.empty():
        event = received.get()
        if event.key != READY_KEY:
            events.append(event)
    return events, result


def unpadded_b64decode(value: str) -> bytes:
    return base64.b64decode(value + "=" * (-len(value) % 4))


# === connectrpc's client -> our server ========================================================


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_their_client_round_trips_put_get_delete_on_our_server(
    their_client: ConnectrpcKVClient,
) -> None:
    assert their_client.put(kv_pb2.PutRequest(key="k", value=BIG)) == kv_pb2.PutResponse()
    assert their_client.get(kv_pb2.GetRequest(key="k")) == kv_pb2.GetResponse(value=BIG, found=True)
    assert their_client.delete(kv_pb2.DeleteRequest(key="k")).found is True
    assert their_client.get(kv_pb2.GetRequest(key="k")) == kv_pb2.GetResponse(found=False)


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_their_client_request_compression_is_accepted_by_our_server(
    their_client: ConnectrpcKVClient, our_server: Served, wire: Wire
) -> None:
    their_client.put(kv_pb2.PutRequest(key="k", value=BIG))

    sent = our_server.recorder.last(KV_SERVICE.methods["Put"])
    assert sent.status.startswith("200")
    assert sent.request_headers["content-type"] == f"application/{wire.codec}"
    if wire.compression == "gzip":
        assert sent.request_headers["content-encoding"] == "gzip"
        assert sent.request_body.startswith(GZIP_MAGIC)
    else:
        assert sent.request_headers.get("content-encoding", "identity") == "identity"
        assert not sent.request_body.startswith(GZIP_MAGIC)


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_our_server_compresses_responses_only_when_their_client_accepts_gzip(
    their_client: ConnectrpcKVClient, our_server: Served, wire: Wire
) -> None:
    their_client.put(kv_pb2.PutRequest(key="k", value=BIG))

    assert their_client.get(kv_pb2.GetRequest(key="k")).value == BIG
    answered = our_server.recorder.last(KV_SERVICE.methods["Get"])
    if wire.compression == "gzip":
        assert answered.response_headers["content-encoding"] == "gzip"
        assert answered.response_body.startswith(GZIP_MAGIC)
    else:
        assert "content-encoding" not in answered.response_headers
        assert not answered.response_body.startswith(GZIP_MAGIC)


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_their_client_receives_our_watch_events_in_order(their_client: ConnectrpcKVClient) -> None:
    events, _ = run_watch(their_watch(their_client, timeout_ms=5000), their_writer(their_client))

    assert events == EXPECTED_EVENTS


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_watch_messages_between_their_client_and_our_server_are_compressed_when_negotiated(
    their_client: ConnectrpcKVClient, our_server: Served, wire: Wire
) -> None:
    run_watch(their_watch(their_client, timeout_ms=5000), their_writer(their_client))

    stream = our_server.recorder.last(KV_SERVICE.methods["Watch"])
    assert stream.request_headers["content-type"] == f"application/connect+{wire.codec}"
    request_flags, response_flags = (
        envelope_flags(stream.request_body),
        envelope_flags(stream.response_body),
    )
    assert len(response_flags) >= len(EXPECTED_EVENTS) + 2  # ready marker(s), events, end
    if wire.compression == "gzip":
        assert stream.request_headers["connect-content-encoding"] == "gzip"
        assert stream.response_headers["connect-content-encoding"] == "gzip"
        assert request_flags == [0x01]
        assert response_flags[:-1] == [0x01] * (len(response_flags) - 1)
    else:
        assert "connect-content-encoding" not in stream.response_headers
        assert request_flags == [0x00]
        assert response_flags[:-1] == [0x00] * (len(response_flags) - 1)
    assert response_flags[-1] & 0x02


@pytest.mark.parametrize("wire", CODECS, ids=str)
def test_their_client_gets_invalid_argument_with_message_for_an_empty_key(
    their_client: ConnectrpcKVClient,
) -> None:
    with pytest.raises(TheirConnectError) as caught:
        their_client.put(kv_pb2.PutRequest(key="", value=b"v"))

    assert caught.value.code is TheirCode.INVALID_ARGUMENT
    assert caught.value.message == EMPTY_KEY_MESSAGE


def test_their_client_gets_unimplemented_for_a_procedure_our_server_lacks(
    their_client: ConnectrpcKVClient,
) -> None:
    compact = MethodInfo(
        name="Compact",
        service_name="kv.v1.KVService",
        input=kv_pb2.GetRequest,
        output=kv_pb2.GetResponse,
        idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=StreamType.UNARY,
    )

    with pytest.raises(TheirConnectError) as caught:
        their_client.execute_unary(request=kv_pb2.GetRequest(key="k"), method=compact)

    assert caught.value.code is TheirCode.UNIMPLEMENTED
    assert "/kv.v1.KVService/Compact" in caught.value.message


def test_their_client_receives_our_error_details(their_client: ConnectrpcKVClient) -> None:
    with pytest.raises(TheirConnectError) as caught:
        their_client.get(kv_pb2.GetRequest(key=LOCKED_KEY))

    error = caught.value
    assert (error.code, error.message) == (TheirCode.FAILED_PRECONDITION, LOCKED_MESSAGE)
    assert [d.type_name for d in error.details] == ["google.protobuf.StringValue"]
    assert (
        wrappers_pb2.StringValue.FromString(error.details[0].message_bytes).value == LOCKED_DETAIL
    )


def test_their_client_sees_our_watch_fail_before_any_event(
    their_client: ConnectrpcKVClient,
) -> None:
    with pytest.raises(TheirConnectError) as caught:
        list(their_client.watch(kv_pb2.WatchRequest(prefix=DENIED_PREFIX), timeout_ms=5000))

    assert (caught.value.code, caught.value.message) == (
        TheirCode.PERMISSION_DENIED,
        DENIED_MESSAGE,
    )


def test_their_client_sees_our_watch_fail_after_events(their_client: ConnectrpcKVClient) -> None:
    def consume(emit: Emit) -> TheirConnectError | None:
        try:
            their_watch(their_client, timeout_ms=5000)(emit)
        except TheirConnectError as e:
            return e
        return None

    events, error = run_watch(consume, their_writer(their_client), aborting_writes)

    assert events == [put_event(PREFIX + "a", b"1")]
    assert error is not None
    assert (error.code, error.message) == (TheirCode.ABORTED, ABORT_MESSAGE)


def test_their_client_timeout_is_deadline_exceeded_against_our_slow_handler(
    their_client: ConnectrpcKVClient,
) -> None:
    started = time.monotonic()
    with pytest.raises(TheirConnectError) as caught:
        their_client.get(kv_pb2.GetRequest(key=SLOW_KEY), timeout_ms=int(TIMEOUT * 1000))

    assert caught.value.code is TheirCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < SLOW_SECONDS


def test_our_server_answers_deadline_exceeded_when_the_handler_outlives_their_timeout(
    their_client: ConnectrpcKVClient, our_server: Served
) -> None:
    # The deadline goes as a header only, so their client waits and our server must report it.
    with pytest.raises(TheirConnectError) as caught:
        their_client.get(
            kv_pb2.GetRequest(key=SLOW_KEY),
            headers={"connect-timeout-ms": str(int(TIMEOUT * 1000))},
        )

    assert caught.value.code is TheirCode.DEADLINE_EXCEEDED
    assert our_server.recorder.last(KV_SERVICE.methods["Get"]).status.startswith("504")


def test_their_client_timeout_is_deadline_exceeded_against_our_quiet_watch(
    their_client: ConnectrpcKVClient,
) -> None:
    with pytest.raises(TheirConnectError) as caught:
        list(their_client.watch(kv_pb2.WatchRequest(prefix=PREFIX), timeout_ms=int(TIMEOUT * 1000)))

    assert caught.value.code is TheirCode.DEADLINE_EXCEEDED


def test_our_server_ends_a_watch_that_outlives_its_deadline_with_deadline_exceeded(
    their_client: ConnectrpcKVClient,
) -> None:
    # The deadline goes as a header only, so only our server can end the stream with an error.
    with pytest.raises(TheirConnectError) as caught:
        list(
            their_client.watch(
                kv_pb2.WatchRequest(prefix=PREFIX), headers={"connect-timeout-ms": "200"}
            )
        )

    assert caught.value.code is TheirCode.DEADLINE_EXCEEDED


def test_their_client_timeout_reaches_our_handler(their_client: ConnectrpcKVClient) -> None:
    with TheirResponseMetadata() as md:
        their_client.get(kv_pb2.GetRequest(key="k"), timeout_ms=4000)

    assert 3000 < int(md.headers["x-timeout-ms"]) <= 4000


def test_their_client_sees_our_unary_headers_and_trailers(their_client: ConnectrpcKVClient) -> None:
    with TheirResponseMetadata() as md:
        their_client.put(kv_pb2.PutRequest(key="k", value=b"v"), headers={"x-echo": "hello"})

    assert md.headers["x-echo"] == "hello"
    assert md.trailers["x-echo-trailer"] == "hello"
    assert "trailer-x-echo-trailer" not in md.headers


def test_their_client_sees_our_headers_and_trailers_with_an_error(
    their_client: ConnectrpcKVClient,
) -> None:
    with TheirResponseMetadata() as md, pytest.raises(TheirConnectError):
        their_client.get(kv_pb2.GetRequest(key=LOCKED_KEY), headers={"x-echo": "hello"})

    assert md.headers["x-echo"] == "hello"
    assert md.trailers["x-echo-trailer"] == "hello"


def test_their_client_sees_our_watch_headers_and_trailers(their_client: ConnectrpcKVClient) -> None:
    def consume(emit: Emit) -> TheirResponseMetadata:
        # connectrpc keeps response metadata in a context variable: capture on this thread.
        with TheirResponseMetadata() as md:
            their_watch(their_client, headers={"x-echo": "hello"}, timeout_ms=5000)(emit)
        return md

    _, md = run_watch(consume, their_writer(their_client))

    assert md.headers["x-echo"] == "hello"
    assert md.trailers["x-echo-trailer"] == "hello"


def test_binary_metadata_from_their_client_round_trips_through_our_server(
    their_client: ConnectrpcKVClient,
) -> None:
    padded = base64.b64encode(BINARY).decode()
    assert padded.endswith("=")  # the spec says servers must accept padded values too

    with TheirResponseMetadata() as md:
        their_client.put(kv_pb2.PutRequest(key="k", value=b"v"), headers={"x-echo-bin": padded})

    assert unpadded_b64decode(md.headers["x-echo-bin"]) == BINARY


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_their_client_gets_from_our_server_with_http_get(
    their_client: ConnectrpcKVClient, our_server: Served, wire: Wire
) -> None:
    their_client.put(kv_pb2.PutRequest(key="k", value=BIG))

    assert their_client.read(kvget_pb2.GetRequest(key="k"), use_get=True) == kvget_pb2.GetResponse(
        value=BIG, found=True
    )
    sent = our_server.recorder.last(READ)
    assert (sent.method, sent.request_body) == ("GET", b"")
    assert f"encoding={wire.codec}" in sent.query


# === our client -> connectrpc's server ========================================================


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_our_client_round_trips_put_get_delete_on_their_server(our_kv: KVServiceClient) -> None:
    assert our_kv.put(kv_pb2.PutRequest(key="k", value=BIG)) == kv_pb2.PutResponse()
    assert our_kv.get(kv_pb2.GetRequest(key="k")) == kv_pb2.GetResponse(value=BIG, found=True)
    assert our_kv.delete(kv_pb2.DeleteRequest(key="k")).found is True
    assert our_kv.get(kv_pb2.GetRequest(key="k")) == kv_pb2.GetResponse(found=False)


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_our_client_request_compression_is_accepted_by_their_server(
    our_kv: KVServiceClient, their_server: Served, wire: Wire
) -> None:
    our_kv.put(kv_pb2.PutRequest(key="k", value=BIG))

    sent = their_server.recorder.last(KV_SERVICE.methods["Put"])
    assert sent.status.startswith("200")
    assert sent.request_headers["content-type"] == f"application/{wire.codec}"
    if wire.compression == "gzip":
        assert sent.request_headers["content-encoding"] == "gzip"
        assert sent.request_body.startswith(GZIP_MAGIC)
    else:
        assert "content-encoding" not in sent.request_headers
        assert not sent.request_body.startswith(GZIP_MAGIC)


@pytest.mark.parametrize("wire", CODECS, ids=str)
def test_our_client_reads_gzip_responses_from_their_server(
    our_kv: KVServiceClient, their_server: Served
) -> None:
    our_kv.put(kv_pb2.PutRequest(key="k", value=BIG))

    assert our_kv.get(kv_pb2.GetRequest(key="k")).value == BIG
    answered = their_server.recorder.last(KV_SERVICE.methods["Get"])
    assert answered.response_headers["content-encoding"] == "gzip"
    assert answered.response_body.startswith(GZIP_MAGIC)


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_our_client_receives_their_watch_events_in_order(our_kv: KVServiceClient) -> None:
    events, _ = run_watch(our_watch(our_kv, timeout=5), our_writer(our_kv))

    assert events == EXPECTED_EVENTS


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_watch_messages_between_our_client_and_their_server_are_compressed_when_negotiated(
    our_kv: KVServiceClient, their_server: Served, wire: Wire
) -> None:
    run_watch(our_watch(our_kv, timeout=5), our_writer(our_kv))

    stream = their_server.recorder.last(KV_SERVICE.methods["Watch"])
    assert stream.request_headers["content-type"] == f"application/connect+{wire.codec}"
    request_flags, response_flags = (
        envelope_flags(stream.request_body),
        envelope_flags(stream.response_body),
    )
    assert len(response_flags) >= len(EXPECTED_EVENTS) + 2  # ready marker(s), events, end
    # Our client always accepts gzip; the request is compressed only when configured.
    assert stream.response_headers["connect-content-encoding"] == "gzip"
    assert all(flags & 0x01 for flags in response_flags)
    assert response_flags[-1] & 0x02
    if wire.compression == "gzip":
        assert stream.request_headers["connect-content-encoding"] == "gzip"
        assert request_flags == [0x01]
    else:
        assert "connect-content-encoding" not in stream.request_headers
        assert request_flags == [0x00]


@pytest.mark.parametrize("wire", CODECS, ids=str)
def test_our_client_gets_invalid_argument_with_message_for_an_empty_key(
    our_kv: KVServiceClient,
) -> None:
    with pytest.raises(ConnectError) as caught:
        our_kv.put(kv_pb2.PutRequest(key="", value=b"v"))

    assert (caught.value.code, caught.value.message) == (Code.INVALID_ARGUMENT, EMPTY_KEY_MESSAGE)


def test_our_client_gets_unimplemented_for_a_procedure_their_server_lacks(
    our_client: Client,
) -> None:
    compact = Method(
        service="kv.v1.KVService",
        name="Compact",
        input=kv_pb2.GetRequest,
        output=kv_pb2.GetResponse,
    )

    with pytest.raises(ConnectError) as caught:
        our_client.call_unary(compact, kv_pb2.GetRequest(key="k"))

    assert caught.value.code is Code.UNIMPLEMENTED


def test_our_client_receives_their_error_details(our_kv: KVServiceClient) -> None:
    with pytest.raises(ConnectError) as caught:
        our_kv.get(kv_pb2.GetRequest(key=LOCKED_KEY))

    error = caught.value
    assert (error.code, error.message) == (Code.FAILED_PRECONDITION, LOCKED_MESSAGE)
    assert [d.type for d in error.details] == ["google.protobuf.StringValue"]
    detail = error.details[0].unpack(wrappers_pb2.StringValue)
    assert detail is not None and detail.value == LOCKED_DETAIL


def test_our_client_sees_their_watch_fail_before_any_event(our_kv: KVServiceClient) -> None:
    with pytest.raises(ConnectError) as caught:
        list(our_kv.watch(kv_pb2.WatchRequest(prefix=DENIED_PREFIX), timeout=5))

    assert (caught.value.code, caught.value.message) == (Code.PERMISSION_DENIED, DENIED_MESSAGE)


def test_our_client_sees_their_watch_fail_after_events(our_kv: KVServiceClient) -> None:
    def consume(emit: Emit) -> ConnectError | None:
        try:
            our_watch(our_kv, timeout=5)(emit)
        except ConnectError as e:
            return e
        return None

    events, error = run_watch(consume, our_writer(our_kv), aborting_writes)

    assert events == [put_event(PREFIX + "a", b"1")]
    assert error is not None
    assert (error.code, error.message) == (Code.ABORTED, ABORT_MESSAGE)


def test_our_client_timeout_is_deadline_exceeded_against_their_slow_handler(
    our_kv: KVServiceClient,
) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        our_kv.get(kv_pb2.GetRequest(key=SLOW_KEY), timeout=TIMEOUT)

    assert caught.value.code is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < SLOW_SECONDS


def test_our_client_timeout_is_deadline_exceeded_against_their_quiet_watch(
    our_kv: KVServiceClient,
) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        list(our_kv.watch(kv_pb2.WatchRequest(prefix=PREFIX), timeout=TIMEOUT))

    assert caught.value.code is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2


def test_our_client_timeout_reaches_their_handler(our_kv: KVServiceClient) -> None:
    with ResponseMetadata() as md:
        our_kv.get(kv_pb2.GetRequest(key="k"), timeout=4)

    assert 3000 < int(md.headers["x-timeout-ms"]) <= 4000


def test_our_client_sees_their_unary_headers_and_trailers(our_kv: KVServiceClient) -> None:
    with ResponseMetadata() as md:
        our_kv.put(kv_pb2.PutRequest(key="k", value=b"v"), headers={"x-echo": "hello"})

    assert md.headers["x-echo"] == "hello"
    assert md.trailers == {"x-echo-trailer": "hello"}


def test_our_client_error_carries_their_response_headers(our_kv: KVServiceClient) -> None:
    with pytest.raises(ConnectError) as caught:
        our_kv.get(kv_pb2.GetRequest(key=LOCKED_KEY), headers={"x-echo": "hello"})

    assert caught.value.metadata["x-echo"] == "hello"


def test_our_client_error_carries_their_trailers_without_the_wire_prefix(
    our_kv: KVServiceClient,
) -> None:
    with pytest.raises(ConnectError) as caught:
        our_kv.get(kv_pb2.GetRequest(key=LOCKED_KEY), headers={"x-echo": "hello"})

    assert caught.value.metadata.get("x-echo-trailer") == "hello"
    assert "trailer-x-echo-trailer" not in caught.value.metadata


def test_our_client_sees_their_watch_headers_and_trailers(our_kv: KVServiceClient) -> None:
    def consume(emit: Emit) -> tuple[dict[str, Any], dict[str, Any]]:
        request = kv_pb2.WatchRequest(prefix=PREFIX)
        with our_kv.watch(request, headers={"x-echo": "hello"}, timeout=5) as stream:
            for event in stream:
                emit(event)
        return dict(stream.headers), dict(stream.trailers)

    _, (headers, trailers) = run_watch(consume, our_writer(our_kv))

    assert headers["x-echo"] == "hello"
    assert trailers == {"x-echo-trailer": "hello"}


def test_binary_metadata_from_our_client_round_trips_through_their_server(
    our_kv: KVServiceClient,
) -> None:
    with ResponseMetadata() as md:
        # The generated client types headers as str, though Client takes bytes for -bin keys.
        headers: dict[str, Any] = {"x-echo-bin": BINARY}
        our_kv.put(kv_pb2.PutRequest(key="k", value=b"v"), headers=headers)

    assert md.headers["x-echo-bin"] == BINARY


@pytest.mark.parametrize("wire", CODECS, ids=str)
def test_our_client_gets_from_their_server_with_http_get(
    our_kv: KVServiceClient, their_server: Served, wire: Wire
) -> None:
    our_kv.put(kv_pb2.PutRequest(key="k", value=BIG))

    with Client(their_server.url, ClientConfig(codec=wire.codec, use_get=True)) as client:
        assert KVGetServiceClient(client).get(kvget_pb2.GetRequest(key="k")) == kvget_pb2.GetResponse(
            value=BIG, found=True
        )
    sent = their_server.recorder.last(READ)
    assert (sent.method, sent.status[:3], sent.request_body) == ("GET", "200", b"")
    assert f"encoding={wire.codec}" in sent.query
