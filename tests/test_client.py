"""The client side of the Connect protocol: our Client against our server, and against tiny
hand-written WSGI apps (on real waitress servers) that answer with exactly the bytes a test needs.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from connectplugin import (
    App,
    CancelToken,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    Context,
    ErrorDetail,
    HTTPConfig,
    HTTPServer,
    ResponseMetadata,
    ServerStream,
)
from connectplugin.rpc import tls
from connectplugin.rpc._transport import WSGIAdapter
from connectplugin.rpc.client import DEFAULT_TIMEOUT
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.kv.store import KVStore
from tests.helpers import BOTH_SERVERS, wait_until
from tests.kvget.gen.kvget.v1 import kvget_pb2
from tests.kvget.gen.kvget.v1.kvget_connect import KVGetServiceClient
from tests.services import ScriptedKV, envelope, events

MiB = 1024 * 1024

# The spec's table "HTTP to Error Code": what a client infers from a non-Connect response.
SPEC_CODE_FOR_HTTP = [
    (400, Code.INTERNAL),
    (401, Code.UNAUTHENTICATED),
    (403, Code.PERMISSION_DENIED),
    (404, Code.UNIMPLEMENTED),
    (429, Code.UNAVAILABLE),
    (502, Code.UNAVAILABLE),
    (503, Code.UNAVAILABLE),
    (504, Code.UNAVAILABLE),
    (405, Code.UNKNOWN),
    (409, Code.UNKNOWN),
    (418, Code.UNKNOWN),
    (500, Code.UNKNOWN),
    (501, Code.UNKNOWN),
]

UNICODE_MESSAGE = "\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\n"


def returns(message):
    return lambda request, ctx: message


def raises(error: BaseException):
    def handler(request, ctx):
        raise error

    return handler


def canned(status: int, headers: list[tuple[str, str]], body: bytes | Iterable[bytes] = b""):
    """A WSGI app that answers every request with the same raw response."""
    line = f"{status} Whatever"

    def app(environ, start_response):
        environ["wsgi.input"].read()
        start_response(line, list(headers))
        return [body] if isinstance(body, bytes) else body

    return app


def stream_body(*frames: tuple[int, bytes]) -> bytes:
    return b"".join(envelope(data, flags) for flags, data in frames)


def end(obj: Any) -> tuple[int, bytes]:
    return 0x02, json.dumps(obj).encode()


def event(key: str) -> tuple[int, bytes]:
    return 0x00, kv_pb2.WatchEvent(key=key).SerializeToString()


PROTO = [("Content-Type", "application/proto")]
STREAM = [("Content-Type", "application/connect+proto")]
JSON_ERROR = [("Content-Type", "application/json")]


@pytest.fixture
def canned_client(serve, connect) -> Callable[..., KVServiceClient]:
    """``canned_client(status, headers, body, **config)``: a client of a canned-response server."""

    def make(
        status: int, headers: list[tuple[str, str]], body: Any = b"", **config: Any
    ) -> KVServiceClient:
        server = serve(canned(status, headers, body))
        return connect(server.url, **config)

    return make


def drain(stream: ServerStream) -> list:
    return list(stream)


# --- codecs and compression -----------------------------------------------------------------


@pytest.mark.parametrize("codec", ["proto", "json"])
def test_unary_round_trip_in_each_codec(connect, url, kv, codec):
    client = connect(url, codec=codec)

    client.put(kv_pb2.PutRequest(key="a", value=b"\x00\xff"))
    got = client.get(kv_pb2.GetRequest(key="a"))

    assert got == kv_pb2.GetResponse(value=b"\x00\xff", found=True)
    assert kv.last.headers["content-type"] == f"application/{codec}"


@BOTH_SERVERS
@pytest.mark.parametrize("codec", ["proto", "json"])
def test_server_stream_in_each_codec(connect, url, kv, codec):
    kv.script("watch", returns(iter(events(3, b"\x01"))))
    client = connect(url, codec=codec)

    got = drain(client.watch(kv_pb2.WatchRequest(prefix="k")))

    assert got == events(3, b"\x01")
    assert kv.last.headers["content-type"] == f"application/connect+{codec}"
    assert kv.last.request == kv_pb2.WatchRequest(prefix="k")


def test_large_unary_request_is_gzipped(kv_client, kv):
    kv_client.put(kv_pb2.PutRequest(key="a", value=b"z" * 2000))

    assert kv.last.headers.get("content-encoding") == "gzip"
    assert kv.last.request.value == b"z" * 2000


def test_small_unary_request_is_not_compressed(kv_client, kv):
    kv_client.put(kv_pb2.PutRequest(key="a", value=b"z" * 100))

    assert kv.last.headers.get("content-encoding", "identity") == "identity"


def test_identity_compression_config_never_compresses(connect, url, kv):
    connect(url, compression="identity").put(kv_pb2.PutRequest(key="a", value=b"z" * 5000))

    assert kv.last.headers.get("content-encoding", "identity") == "identity"


def test_large_stream_request_is_gzipped(kv_client, kv):
    kv.script("watch", returns(iter(events(1))))

    drain(kv_client.watch(kv_pb2.WatchRequest(prefix="p" * 2000)))

    assert kv.last.headers.get("connect-content-encoding") == "gzip"
    assert kv.last.request.prefix == "p" * 2000


def test_gzipped_responses_are_accepted_and_inflated(kv_client, kv):
    big = kv_pb2.GetResponse(value=b"q" * 50_000, found=True)
    kv.script("get", returns(big))

    with ResponseMetadata() as md:
        got = kv_client.get(kv_pb2.GetRequest(key="a"))

    assert md.headers.get("content-encoding") == "gzip"
    assert got == big


def test_gzipped_stream_messages_are_inflated(kv_client, kv):
    big = kv_pb2.WatchEvent(key="big", value=b"q" * 50_000)
    kv.script("watch", returns(iter([big])))

    assert drain(kv_client.watch(kv_pb2.WatchRequest())) == [big]


def test_empty_gzip_response_body_is_the_empty_message(canned_client):
    # Spec: clients must not attempt to decompress zero-length response content.
    client = canned_client(200, PROTO + [("Content-Encoding", "gzip")], b"")

    assert client.get(kv_pb2.GetRequest(key="a")) == kv_pb2.GetResponse()


@pytest.mark.parametrize("codec", ["proto", "json"])
def test_use_get_calls_side_effect_free_methods_with_get(url, kv, codec):
    with Client(url, ClientConfig(codec=codec, use_get=True)) as rpc:
        KVGetServiceClient(rpc).get(kvget_pb2.GetRequest(key="a/b?c=d&e"))

    assert kv.last.http_method == "GET"
    assert kv.last.request == kv_pb2.GetRequest(key="a/b?c=d&e")


def test_use_get_still_posts_methods_with_side_effects(connect, url, kv):
    client = connect(url, use_get=True)
    client.put(kv_pb2.PutRequest(key="a"))
    assert kv.last.http_method == "POST"
    # The samples' Get is one: Go's testdata declares no idempotency level for it.
    client.get(kv_pb2.GetRequest(key="a"))
    assert kv.last.http_method == "POST"


@pytest.mark.parametrize("use_get", [False, True])
def test_a_service_url_client_calls_its_base_url_plus_the_method_name(connect, url, kv, use_get):
    # A router's endpoint_url names one service: ".../services/kv/<id>" + "/Get".
    client = connect(url + "/kv.v1.KVService", service_url=True, use_get=use_get)

    client.put(kv_pb2.PutRequest(key="a", value=b"1"))
    assert client.get(kv_pb2.GetRequest(key="a")).value == b"1"
    assert kv.last.http_method == "POST"
    with Client(url + "/kvget.v1.KVGetService", ClientConfig(service_url=True, use_get=use_get)) as rpc:
        assert KVGetServiceClient(rpc).get(kvget_pb2.GetRequest(key="a")).value == b"1"
    assert kv.last.http_method == ("GET" if use_get else "POST")


# --- timeouts -------------------------------------------------------------------------------


def test_per_call_timeout_is_sent_as_connect_timeout_ms(kv_client, kv):
    kv_client.get(kv_pb2.GetRequest(key="a"), timeout=2.5)

    assert kv.last.headers["connect-timeout-ms"] == "2500"
    assert 0 < kv.last.timeout_remaining <= 2.5


def test_config_timeout_is_the_default(connect, url, kv):
    connect(url, timeout=1.5).get(kv_pb2.GetRequest(key="a"))

    assert kv.last.headers["connect-timeout-ms"] == "1500"


def test_per_call_timeout_overrides_the_default(connect, url, kv):
    connect(url, timeout=1.5).get(kv_pb2.GetRequest(key="a"), timeout=4)

    assert kv.last.headers["connect-timeout-ms"] == "4000"


def test_every_unary_call_has_a_deadline_by_default(kv_client, kv):
    kv_client.get(kv_pb2.GetRequest(key="a"))

    assert kv.last.headers["connect-timeout-ms"] == str(int(DEFAULT_TIMEOUT * 1000))


def test_no_timeout_sends_no_header(connect, url, kv):
    connect(url, timeout=None).get(kv_pb2.GetRequest(key="a"))

    assert "connect-timeout-ms" not in kv.last.headers


def test_streams_have_no_deadline_by_default(kv_client, kv):
    kv.script("watch", lambda request, ctx: iter(events(1)))

    drain(kv_client.watch(kv_pb2.WatchRequest()))

    assert "connect-timeout-ms" not in kv.last.headers


def test_stream_timeout_is_the_default_of_streams_only(connect, url, kv):
    kv.script("watch", lambda request, ctx: iter(events(1)))
    client = connect(url, timeout=None, stream_timeout=2.5)

    drain(client.watch(kv_pb2.WatchRequest()))
    assert kv.last.headers["connect-timeout-ms"] == "2500"
    client.get(kv_pb2.GetRequest(key="a"))
    assert "connect-timeout-ms" not in kv.last.headers


def test_unary_timeout_is_enforced_locally(kv_client, kv):
    def slow(request, ctx):
        kv.pause(5)
        return kv_pb2.GetResponse()

    kv.script("get", slow)
    started = time.monotonic()

    with pytest.raises(ConnectError) as info:
        kv_client.get(kv_pb2.GetRequest(key="a"), timeout=0.3)

    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5


def test_stream_timeout_is_enforced_while_waiting_for_a_message(kv_client, kv):
    def slow(request, ctx):
        yield from events(1)
        kv.pause(5)
        yield from events(1)

    kv.script("watch", slow)
    started = time.monotonic()
    stream = kv_client.watch(kv_pb2.WatchRequest(), timeout=0.5)

    assert next(stream) == events(1)[0]
    with pytest.raises(ConnectError) as info:
        next(stream)

    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


def test_stream_timeout_is_enforced_even_when_messages_keep_coming(serve, connect):
    # A server that ignores Connect-Timeout-Ms and trickles messages: only the client can stop it.
    stop = threading.Event()

    def trickle(environ, start_response):
        start_response("200 OK", STREAM)
        for i in range(100):
            if stop.wait(0.1):
                break
            yield envelope(kv_pb2.WatchEvent(key=str(i)).SerializeToString())
        yield envelope(b"{}", 0x02)

    server = serve(trickle)
    client = connect(server.url)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError) as info:
            drain(client.watch(kv_pb2.WatchRequest(), timeout=0.5))
    finally:
        stop.set()

    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


# --- transport failures and non-Connect responses (spec: HTTP to Error Code) ----------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_unavailable(connect):
    client = connect(f"http://127.0.0.1:{_free_port()}")

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.UNAVAILABLE


def test_connection_refused_on_a_stream_is_unavailable(connect):
    client = connect(f"http://127.0.0.1:{_free_port()}")

    with pytest.raises(ConnectError) as info:
        client.watch(kv_pb2.WatchRequest())

    assert info.value.code is Code.UNAVAILABLE


@pytest.mark.parametrize("status, code", SPEC_CODE_FOR_HTTP)
def test_non_connect_unary_response_maps_by_http_status(canned_client, status, code):
    client = canned_client(
        status, [("Content-Type", "text/html")], b"<html><h1>Bad Gateway</h1></html>"
    )

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is code


@pytest.mark.parametrize("status, code", SPEC_CODE_FOR_HTTP)
def test_non_connect_stream_response_maps_by_http_status(canned_client, status, code):
    client = canned_client(status, [("Content-Type", "text/plain")], b"upstream connect error")

    with pytest.raises(ConnectError) as info:
        drain(client.watch(kv_pb2.WatchRequest()))

    assert info.value.code is code


def test_error_status_with_a_non_json_body_ignores_the_body(canned_client):
    # Conformance "unexpected-error-body": the 403 decides, the proto body is ignored.
    client = canned_client(403, PROTO, kv_pb2.GetResponse(found=True).SerializeToString())

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.PERMISSION_DENIED


@pytest.mark.parametrize(
    "status, body, code, message",
    [
        (401, b"null", Code.UNAUTHENTICATED, None),
        (401, b'{"message": "oops"}', Code.UNAUTHENTICATED, "oops"),
        (502, b'{"error": "upstream timed out"}', Code.UNAVAILABLE, None),
        (401, b"{not json", Code.UNAUTHENTICATED, None),
        (
            422,
            b'{"code": "out_of_range", "message": "oops", "foobar": "baz"}',
            Code.OUT_OF_RANGE,
            "oops",
        ),
        pytest.param(
            401,
            b'{"code": null, "message": "oops"}',
            Code.UNAUTHENTICATED,
            "oops",
            id="null-code",
        ),
        pytest.param(
            429,
            b'{"code": "foobar", "message": "oops"}',
            Code.UNAVAILABLE,
            "oops",
            id="unrecognised-code",
        ),
    ],
)
def test_json_error_body_without_a_usable_code_falls_back_to_http_status(
    canned_client, status, body, code, message
):
    # Spec: infer the code from the HTTP status "if Bare-Message is missing or malformed";
    # the conformance suite (connect_client_error_endstream.yaml) pins each case here.
    client = canned_client(status, JSON_ERROR, body)

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is code
    if message is not None:
        assert info.value.message == message


def test_gzipped_error_body_is_inflated(canned_client):
    body = json.dumps(
        {
            "code": "out_of_range",
            "message": "oops",
            "details": [{"type": "kv.v1.GetRequest", "value": "CgJoaQ"}],
        }
    ).encode()
    client = canned_client(422, JSON_ERROR + [("Content-Encoding", "gzip")], gzip.compress(body))

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert (info.value.code, info.value.message) == (Code.OUT_OF_RANGE, "oops")
    assert info.value.details[0].unpack(kv_pb2.GetRequest) == kv_pb2.GetRequest(key="hi")


def test_200_with_a_non_connect_content_type_is_unknown(canned_client):
    client = canned_client(200, [("Content-Type", "image/jpeg")], b"\xff\xd8\xff")

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.UNKNOWN


def test_200_in_the_other_codec_is_internal(canned_client):
    client = canned_client(200, JSON_ERROR, b'{"found": true}')

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.INTERNAL


def test_unary_response_in_an_unknown_encoding_is_internal(canned_client):
    client = canned_client(200, PROTO + [("Content-Encoding", "foo")], b"\x28\xb5\x2f\xfd")

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.INTERNAL


def test_malformed_unary_response_is_internal(canned_client):
    client = canned_client(200, PROTO, b"\xff\xff\xff")

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.INTERNAL


# --- streams from a misbehaving server ------------------------------------------------------


def test_stream_without_an_end_stream_delivers_messages_then_internal(canned_client):
    client = canned_client(200, STREAM, stream_body(event("a")))
    stream = client.watch(kv_pb2.WatchRequest())

    assert next(stream).key == "a"
    with pytest.raises(ConnectError) as info:
        next(stream)

    assert info.value.code is Code.INTERNAL


@pytest.mark.parametrize(
    "tail",
    [b"\x00\x00\x00", b"\x00\x00\x00\x00\x0aAAAA"],
    ids=["cut-in-prefix", "cut-in-message"],
)
def test_truncated_stream_is_internal(canned_client, tail):
    client = canned_client(200, STREAM, stream_body(event("a")) + tail)
    stream = client.watch(kv_pb2.WatchRequest())

    assert next(stream).key == "a"
    with pytest.raises(ConnectError) as info:
        next(stream)

    assert info.value.code is Code.INTERNAL


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"error"'])
def test_malformed_end_stream_is_internal(canned_client, payload):
    client = canned_client(200, STREAM, stream_body((0x02, payload)))

    with pytest.raises(ConnectError) as info:
        drain(client.watch(kv_pb2.WatchRequest()))

    assert info.value.code is Code.INTERNAL


def test_compressed_message_without_a_stream_encoding_is_internal(canned_client):
    frames = stream_body(
        (0x01, gzip.compress(kv_pb2.WatchEvent(key="a").SerializeToString())), end({})
    )
    client = canned_client(200, STREAM + [("Connect-Content-Encoding", "identity")], frames)

    with pytest.raises(ConnectError) as info:
        drain(client.watch(kv_pb2.WatchRequest()))

    assert info.value.code is Code.INTERNAL


def test_stream_in_the_other_codec_is_internal(canned_client):
    client = canned_client(
        200, [("Content-Type", "application/connect+json")], stream_body(end({}))
    )

    with pytest.raises(ConnectError) as info:
        drain(client.watch(kv_pb2.WatchRequest()))

    assert info.value.code is Code.INTERNAL


@pytest.mark.parametrize(
    "end_stream, code, message",
    [
        ({"error": None}, None, None),
        ({}, None, None),
        ({"error": {"code": None, "message": "oops"}}, Code.UNKNOWN, "oops"),
        ({"error": {"message": "oops"}}, Code.UNKNOWN, "oops"),
        ({"error": {"code": "foobar", "message": "oops"}}, Code.UNKNOWN, "oops"),
        (
            {"error": {"code": "out_of_range", "message": "oops", "foobar": "baz"}},
            Code.OUT_OF_RANGE,
            "oops",
        ),
    ],
    ids=["null-error", "empty", "null-code", "missing-code", "unrecognised-code", "unknown-fields"],
)
def test_end_stream_error_decoding(canned_client, end_stream, code, message):
    # Straight from the conformance suite, connect_client_error_endstream.yaml.
    client = canned_client(200, STREAM, stream_body(event("a"), end(end_stream)))
    stream = client.watch(kv_pb2.WatchRequest())

    assert next(stream).key == "a"
    if code is None:
        assert drain(stream) == []
        return
    with pytest.raises(ConnectError) as info:
        next(stream)
    assert (info.value.code, info.value.message) == (code, message)


def test_compressed_end_stream_is_inflated(canned_client):
    payload = gzip.compress(
        json.dumps({"error": {"code": "out_of_range", "message": "oops"}}).encode()
    )
    client = canned_client(
        200, STREAM + [("Connect-Content-Encoding", "gzip")], stream_body((0x03, payload))
    )

    with pytest.raises(ConnectError) as info:
        drain(client.watch(kv_pb2.WatchRequest()))

    assert info.value.code is Code.OUT_OF_RANGE


def test_end_stream_with_an_undecodable_detail_is_still_a_connect_error(canned_client):
    bad = {
        "error": {
            "code": "not_found",
            "message": "gone",
            "details": [{"type": "x.Y", "value": "abcde"}],
        }
    }
    client = canned_client(200, STREAM, stream_body(end(bad)))

    with pytest.raises(ConnectError):
        drain(client.watch(kv_pb2.WatchRequest()))


# --- read limit -----------------------------------------------------------------------------


def test_unary_response_over_the_read_limit_is_resource_exhausted(connect, url, kv):
    kv.script("get", returns(kv_pb2.GetResponse(value=b"r" * 2000)))
    client = connect(url, read_limit=1024)

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.RESOURCE_EXHAUSTED


def test_stream_message_over_the_read_limit_is_resource_exhausted(connect, url, kv):
    kv.script("watch", returns(iter([kv_pb2.WatchEvent(key="a", value=bytes(range(256)) * 8)])))
    client = connect(url, read_limit=1024)

    with pytest.raises(ConnectError) as info:
        drain(client.watch(kv_pb2.WatchRequest()))

    assert info.value.code is Code.RESOURCE_EXHAUSTED


def _bomb(inflated: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MiB)
    return b"".join(deflate.compress(chunk) for _ in range(inflated // MiB)) + deflate.flush()


def test_gzip_bomb_response_is_resource_exhausted_without_inflating_it(canned_client):
    client = canned_client(200, PROTO + [("Content-Encoding", "gzip")], _bomb(64 * MiB))
    tracemalloc.start()
    try:
        with pytest.raises(ConnectError) as info:
            client.get(kv_pb2.GetRequest(key="a"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert info.value.code is Code.RESOURCE_EXHAUSTED
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB: the bomb was inflated"


def test_gzip_bomb_stream_message_is_resource_exhausted_without_inflating_it(canned_client):
    frames = stream_body((0x01, _bomb(64 * MiB)), end({}))
    client = canned_client(200, STREAM + [("Connect-Content-Encoding", "gzip")], frames)
    tracemalloc.start()
    try:
        with pytest.raises(ConnectError) as info:
            drain(client.watch(kv_pb2.WatchRequest()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert info.value.code is Code.RESOURCE_EXHAUSTED
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB: the bomb was inflated"


# --- errors from our server -----------------------------------------------------------------


def test_unary_connect_error_carries_code_message_details_and_metadata(kv_client, kv):
    detail = kv_pb2.PutRequest(key="why", value=b"\x01")
    kv.script("get", raises(ConnectError(Code.NOT_FOUND, "no key a", [detail], {"x-shard": "7"})))

    with pytest.raises(ConnectError) as info:
        kv_client.get(kv_pb2.GetRequest(key="a"))

    error = info.value
    assert (error.code, error.message) == (Code.NOT_FOUND, "no key a")
    assert [d.type for d in error.details] == ["kv.v1.PutRequest"]
    assert error.details[0].unpack(kv_pb2.PutRequest) == detail
    assert error.metadata["x-shard"] == "7"


def test_unary_error_metadata_holds_headers(kv_client, kv):
    def get(request, ctx):
        ctx.response_headers["x-served-by"] = "kv"
        raise ConnectError(Code.UNAUTHENTICATED, "who are you")

    kv.script("get", get)

    with pytest.raises(ConnectError) as info:
        kv_client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.metadata["x-served-by"] == "kv"


def test_unary_error_metadata_holds_trailers_without_their_prefix(kv_client, kv):
    def get(request, ctx):
        ctx.response_trailers["x-cost"] = "7"
        raise ConnectError(Code.UNAUTHENTICATED, "who are you")

    kv.script("get", get)

    with pytest.raises(ConnectError) as info:
        kv_client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.metadata.get("x-cost") == "7"
    assert "trailer-x-cost" not in info.value.metadata


def test_unicode_error_message_survives_the_round_trip(kv_client, kv):
    kv.script("get", raises(ConnectError(Code.INTERNAL, UNICODE_MESSAGE)))

    with pytest.raises(ConnectError) as info:
        kv_client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.message == UNICODE_MESSAGE


def test_stream_connect_error_carries_code_details_and_trailers(kv_client, kv):
    detail = kv_pb2.PutRequest(key="why", value=b"\x01")

    def watch(request, ctx):
        ctx.response_headers["x-served-by"] = "kv"

        def messages():
            yield from events(2)
            ctx.response_trailers["x-cost"] = "7"
            raise ConnectError(Code.RESOURCE_EXHAUSTED, "quota", [detail], {"x-quota": "0"})

        return messages()

    kv.script("watch", watch)
    stream = kv_client.watch(kv_pb2.WatchRequest())

    with pytest.raises(ConnectError) as info:
        drain(stream)

    error = info.value
    assert (error.code, error.message) == (Code.RESOURCE_EXHAUSTED, "quota")
    assert error.details[0].unpack(kv_pb2.PutRequest) == detail
    assert error.metadata["x-cost"] == "7"
    assert error.metadata["x-quota"] == "0"
    assert error.metadata["x-served-by"] == "kv"


def test_base_handler_is_unimplemented_through_the_client(serve, connect):
    from samples.kv.gen.kv.v1.kv_connect import KVServiceHandler

    client = connect(serve(App([KVServiceHandler()])).url)

    with pytest.raises(ConnectError) as info:
        client.get(kv_pb2.GetRequest(key="a"))

    assert info.value.code is Code.UNIMPLEMENTED


# --- metadata -------------------------------------------------------------------------------


def test_request_headers_reach_the_handler(kv_client, kv):
    kv_client.get(kv_pb2.GetRequest(key="a"), headers={"X-Tenant": "acme"})

    assert kv.last.headers["x-tenant"] == "acme"


def test_binary_request_header_arrives_as_bytes(kv_client, kv):
    kv_client.get(kv_pb2.GetRequest(key="a"), headers={"x-token-bin": b"\x00\xfb\xff"})

    assert kv.last.headers["x-token-bin"] == b"\x00\xfb\xff"


def test_response_metadata_captures_unary_headers_and_trailers(kv_client, kv):
    def get(request, ctx):
        ctx.response_headers["x-served-by"] = "kv"
        ctx.response_headers["x-blob-bin"] = b"\x00\x01\xfe"
        ctx.response_trailers["x-cost"] = "7"
        ctx.response_trailers["x-sum-bin"] = b"\xff"
        return kv_pb2.GetResponse()

    kv.script("get", get)

    with ResponseMetadata() as md:
        kv_client.get(kv_pb2.GetRequest(key="a"))

    assert md.headers["x-served-by"] == "kv"
    assert md.headers["x-blob-bin"] == b"\x00\x01\xfe"
    assert md.trailers == {"x-cost": "7", "x-sum-bin": b"\xff"}
    assert not any(k.startswith("trailer-") for k in md.headers)


@BOTH_SERVERS
def test_stream_headers_now_and_trailers_at_the_end(kv_client, kv):
    def watch(request, ctx):
        ctx.response_headers["x-served-by"] = "kv"

        def messages():
            yield from events(1)
            ctx.response_trailers["x-cost"] = "7"
            ctx.response_trailers["x-sum-bin"] = b"\x00\xff"

        return messages()

    kv.script("watch", watch)
    stream = kv_client.watch(kv_pb2.WatchRequest())

    assert stream.headers["x-served-by"] == "kv"
    drain(stream)
    assert stream.trailers == {"x-cost": "7", "x-sum-bin": b"\x00\xff"}


# --- stream lifetime ------------------------------------------------------------------------


@pytest.fixture
def one_worker(serve, kv):
    """A server with a single worker thread, so a stream left open would starve every later call."""
    finished = threading.Event()

    def endless(request, ctx):
        try:
            for i in range(500):
                yield kv_pb2.WatchEvent(key=str(i))
                kv.pause(0.02)
        finally:
            finished.set()

    kv.script("watch", endless)
    server = serve(App([kv]), threads=1)
    return server.url, finished


@BOTH_SERVERS
def test_closing_a_stream_early_ends_the_handler(connect, one_worker):
    url, finished = one_worker
    stream = connect(url).watch(kv_pb2.WatchRequest())
    next(stream)

    stream.close()

    assert finished.wait(5)


@BOTH_SERVERS
def test_leaving_a_stream_block_ends_the_handler(connect, one_worker):
    url, finished = one_worker

    with connect(url).watch(kv_pb2.WatchRequest()) as stream:
        next(stream)

    assert finished.wait(5)


@BOTH_SERVERS
def test_calls_after_an_early_close_still_work(connect, one_worker):
    url, finished = one_worker
    client = connect(url, pool_size=1)
    stream = client.watch(kv_pb2.WatchRequest())
    next(stream)
    stream.close()

    got = client.get(kv_pb2.GetRequest(key="missing"), timeout=5)

    assert got == kv_pb2.GetResponse(found=False)


@BOTH_SERVERS
def test_iterating_a_closed_stream_stops(connect, one_worker):
    url, finished = one_worker
    stream = connect(url).watch(kv_pb2.WatchRequest())
    next(stream)
    stream.close()

    assert drain(stream) == []


# --- interceptors ---------------------------------------------------------------------------


def make_client(url: str, *interceptors) -> tuple[Client, KVServiceClient]:
    client = Client(url, ClientConfig(interceptors=interceptors))
    return client, KVServiceClient(client)


@pytest.fixture
def intercepted(url):
    """``intercepted(*interceptors)`` -> KVServiceClient; its Client is closed after the test."""
    clients: list[Client] = []

    def make(*interceptors) -> KVServiceClient:
        client, typed = make_client(url, *interceptors)
        clients.append(client)
        return typed

    yield make
    for client in clients:
        client.close()


def test_interceptors_wrap_calls_first_outermost(intercepted, kv):
    log: list[str] = []

    def named(name):
        def interceptor(call, proceed):
            log.append(f"{name}>")
            result = proceed(call)
            log.append(f"<{name}")
            return result

        return interceptor

    intercepted(named("a"), named("b")).get(kv_pb2.GetRequest(key="x"))

    assert log == ["a>", "b>", "<b", "<a"]


def test_interceptor_can_add_headers(intercepted, kv):
    def auth(call, proceed):
        call.headers["authorization"] = "Bearer t0k3n"
        return proceed(call)

    intercepted(auth).get(kv_pb2.GetRequest(key="x"))

    assert kv.last.headers["authorization"] == "Bearer t0k3n"


def test_interceptor_can_change_the_timeout(intercepted, kv):
    def deadline(call, proceed):
        call.timeout = 3
        return proceed(call)

    intercepted(deadline).get(kv_pb2.GetRequest(key="x"))

    assert kv.last.headers["connect-timeout-ms"] == "3000"


def test_interceptor_can_retry(intercepted, kv):
    attempts = iter([ConnectError(Code.UNAVAILABLE, "warming up"), None])

    def flaky(request, ctx):
        error = next(attempts)
        if error:
            raise error
        return kv_pb2.GetResponse(found=True)

    kv.script("get", flaky)

    def retry_unavailable(call, proceed):
        try:
            return proceed(call)
        except ConnectError as e:
            if e.code is not Code.UNAVAILABLE:
                raise
            return proceed(call)

    got = intercepted(retry_unavailable).get(kv_pb2.GetRequest(key="x"))

    assert got.found
    assert len(kv.calls) == 2


def test_interceptor_sees_response_metadata(intercepted, kv):
    def get(request, ctx):
        ctx.response_headers["x-served-by"] = "kv"
        ctx.response_trailers["x-cost"] = "7"
        return kv_pb2.GetResponse()

    kv.script("get", get)
    seen: dict[str, Any] = {}

    def observe(call, proceed):
        result = proceed(call)
        seen.update(headers=dict(call.response_headers), trailers=dict(call.response_trailers))
        return result

    intercepted(observe).get(kv_pb2.GetRequest(key="x"))

    assert seen["headers"]["x-served-by"] == "kv"
    assert seen["trailers"] == {"x-cost": "7"}


def test_interceptor_can_fail_a_call_before_it_is_sent(intercepted, kv):
    def deny(call, proceed):
        raise ConnectError(Code.PERMISSION_DENIED, "not today")

    with pytest.raises(ConnectError) as info:
        intercepted(deny).get(kv_pb2.GetRequest(key="x"))

    assert info.value.code is Code.PERMISSION_DENIED
    assert kv.calls == []


def test_interceptor_wraps_streams_too(intercepted, kv):
    kv.script("watch", returns(iter(events(2))))
    seen: list[Any] = []

    def observe(call, proceed):
        call.headers["x-streaming"] = "yes"
        result = proceed(call)
        seen.append(result)
        return result

    got = drain(intercepted(observe).watch(kv_pb2.WatchRequest()))

    assert got == events(2)
    assert isinstance(seen[0], ServerStream)
    assert kv.last.headers["x-streaming"] == "yes"


# --- error details on the client ------------------------------------------------------------


def test_error_detail_of_another_type_unpacks_to_none(kv_client, kv):
    kv.script("get", raises(ConnectError(Code.ABORTED, "x", [kv_pb2.PutRequest(key="k")])))

    with pytest.raises(ConnectError) as info:
        kv_client.get(kv_pb2.GetRequest(key="a"))

    assert isinstance(info.value.details[0], ErrorDetail)
    assert info.value.details[0].unpack(kv_pb2.GetRequest) is None


def test_a_watch_closed_before_any_event_unsubscribes_from_the_store(kv_client, kv):
    streams = [kv_client.watch(kv_pb2.WatchRequest(prefix=f"p{i}/")) for i in range(3)]
    wait_until(lambda: len(kv._watchers) == 3, "the store to hear of all three watches")

    for stream in streams:
        stream.close()

    wait_until(lambda: kv._watchers == [], lambda: f"every watch to unsubscribe: {kv._watchers}")


# --- cancellation -----------------------------------------------------------------------------


def test_closing_a_stream_from_another_thread_gives_its_blocked_reader_canceled(serve, connect):
    url = serve(App([KVStore()])).url
    stream = connect(url).watch(kv_pb2.WatchRequest(prefix="quiet"))  # no message will come
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            next(iter(stream))
        except BaseException as e:  # noqa: BLE001 - the test asserts what it was
            outcome.append(e)

    reader = threading.Thread(target=read, name="test-reader")
    reader.start()
    # Inside next(), blocked on the socket: the state close() must handle.
    wait_until(lambda: stream._reading, "the reader to wait for the next message")
    stream.close()
    reader.join(timeout=5)

    assert not reader.is_alive()
    assert isinstance(outcome[0], ConnectError) and outcome[0].code is Code.CANCELED
    with pytest.raises(StopIteration):
        next(iter(stream))


class _Held:
    """A Get handler that answers only once its client has gone (``Context.is_active``
    false), noting the connection of each call it served."""

    def __init__(self, kv: ScriptedKV) -> None:
        self.started = threading.Event()
        self.saw_client_go = threading.Event()
        self.ports: list[str] = []
        self._kv = kv

    def __call__(self, request: kv_pb2.GetRequest, ctx: Context) -> kv_pb2.GetResponse:
        self.ports.append(ctx.environ.get("REMOTE_PORT", ""))
        if request.key != "hold":
            return kv_pb2.GetResponse(value=b"quick", found=True)
        self.started.set()
        # A handler has only is_active() to look at: it asks every 20 ms.
        while ctx.is_active() and not self._kv.released.wait(0.02):
            pass
        if not ctx.is_active():
            self.saw_client_go.set()
        return kv_pb2.GetResponse(value=b"too late", found=True)


class _AnAdapter(HTTPAdapter):
    """A requests adapter of the user's own: the client calls it through ``send``."""

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        return super().send(request, **kwargs)


def _client_over(transport: str, url: str, kv: ScriptedKV, pki: Any) -> Client:
    if transport == "pool":
        return Client(url)
    if transport == "adapter":
        session = requests.Session()
        session.mount("http://", _AnAdapter(max_retries=0))
        return Client(url, session=session)
    if transport == "tls":
        return Client(url, ClientConfig(tls=tls.TLSConfig(trust=tls.Trust(cas=(pki.ca.certificate,)))))
    session = requests.Session()
    session.mount("http://in-process", WSGIAdapter(App([kv])))
    return Client("http://in-process", session=session)


def _call_in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - the test asserts what it was
            outcome.append(e)

    thread = threading.Thread(target=run, name="test-caller")
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("transport", ["pool", "adapter", "tls", "in-process"])
def test_cancelling_a_unary_call_from_another_thread_ends_it_and_its_handler_sees_the_client_go(
    serve, pki, transport
):
    kv = ScriptedKV()
    held = _Held(kv)
    kv.script("get", held)
    config = HTTPConfig(tls=tls.TLSConfig(key_pair=pki.host)) if transport == "tls" else HTTPConfig()
    server = HTTPServer(App([kv]), config).start()
    client = _client_over(transport, server.url, kv, pki)
    token = CancelToken()
    try:
        stub = KVServiceClient(client)
        # The connection the cancelled call will take is one this client used before.
        assert stub.get(kv_pb2.GetRequest(key="warm")).value == b"quick"
        caller, outcome = _call_in_thread(lambda: stub.get(kv_pb2.GetRequest(key="hold"), cancel=token))
        assert held.started.wait(5)

        token.cancel()
        caller.join(timeout=10)  # without the cancel it would wait out the 30 s default deadline

        assert not caller.is_alive()
        assert isinstance(outcome[0], ConnectError) and outcome[0].code is Code.CANCELED
        assert held.saw_client_go.wait(5)
        assert stub.get(kv_pb2.GetRequest(key="after")).value == b"quick"
        if transport != "in-process":
            warm, cancelled, after = held.ports
            assert cancelled == warm  # taken from the pool...
            assert after != cancelled  # ...and not given back to it
    finally:
        kv.released.set()
        client.close()
        server.close(grace=2.0)


def test_a_call_whose_token_was_cancelled_already_fails_without_being_sent(kv_client, kv):
    token = CancelToken()
    token.cancel()

    with pytest.raises(ConnectError) as e:
        kv_client.get(kv_pb2.GetRequest(key="a"), cancel=token)

    assert e.value.code is Code.CANCELED
    assert kv.calls == []


def test_a_token_cancelled_after_its_call_leaves_the_connection_to_later_calls(serve, kv, connect):
    held = _Held(kv)
    kv.script("get", held)
    stub = connect(serve(App([kv])).url)
    token = CancelToken()

    assert stub.get(kv_pb2.GetRequest(key="one"), cancel=token).value == b"quick"
    token.cancel()  # the call is over: its connection, back in the pool, is someone else's
    assert stub.get(kv_pb2.GetRequest(key="two")).value == b"quick"

    first, second = held.ports
    assert second == first


def test_cancelling_a_token_closes_its_stream_and_its_blocked_reader_gets_canceled(serve, connect):
    url = serve(App([KVStore()])).url
    token = CancelToken()
    stream = connect(url).watch(kv_pb2.WatchRequest(prefix="quiet"), cancel=token)
    reader, outcome = _call_in_thread(lambda: next(iter(stream)))
    wait_until(lambda: stream._reading, "the reader to wait for the next message")

    token.cancel()
    reader.join(timeout=5)

    assert not reader.is_alive()
    assert isinstance(outcome[0], ConnectError) and outcome[0].code is Code.CANCELED
    with pytest.raises(ConnectError) as later:
        next(iter(stream))
    assert later.value.code is Code.CANCELED


def test_one_token_cancels_every_call_made_with_it(serve, connect):
    store = KVStore()
    url = serve(App([store])).url
    token = CancelToken()
    streams = [connect(url).watch(kv_pb2.WatchRequest(prefix=f"p{i}/"), cancel=token) for i in range(3)]
    wait_until(lambda: len(store._watchers) == 3, "the store to hear of all three watches")

    token.cancel()

    for stream in streams:
        with pytest.raises(ConnectError) as e:
            next(iter(stream))
        assert e.value.code is Code.CANCELED
    wait_until(lambda: store._watchers == [], "every watch to see its client go")
