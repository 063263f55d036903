"""The server side of the Connect protocol, pinned with raw HTTP against a real waitress server.

Each test sends bytes by hand (see ``tests/services.py``) so it can break one protocol rule
at a time; section names follow the Connect protocol specification.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import logging
import socket
import threading
import tracemalloc
import zlib
from urllib.parse import urlencode

import pytest
from werkzeug.test import Client as WSGITestClient
from werkzeug.test import EnvironBuilder, run_wsgi_app

from connectplugin import App, Code, ConnectError, HTTPServer, ServerConfig
from connectplugin.gen.connectplugin.v1 import plugininfo_pb2
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceHandler
from tests.helpers import wait_until
from tests.services import (
    DELETE,
    GET,
    GET_INFO,
    PUT,
    READ,
    SET_IDENTITY,
    WATCH,
    envelope,
    events,
    post,
    post_stream,
    post_unary,
    put_of_size,
    send,
    watch_of_size,
)

MiB = 1024 * 1024

# The spec's table "Error Codes": the HTTP status of a unary error with each code.
SPEC_HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


def get_response(value: bytes) -> kv_pb2.GetResponse:
    return kv_pb2.GetResponse(value=value, found=True)


def returns(message):
    return lambda request, ctx: message


def raises(error: BaseException):
    def handler(request, ctx):
        raise error

    return handler


def streams(*messages):
    return lambda request, ctx: iter(messages)


def unb64(value: str) -> bytes:
    return base64.b64decode(value + "=" * (-len(value) % 4))


@functools.cache
def gzip_bomb(inflated: int) -> bytes:
    """``inflated`` zero bytes, gzipped (about 1000:1), built without holding them in memory."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MiB)
    parts = [deflate.compress(chunk) for _ in range(inflated // MiB)]
    return b"".join(parts) + deflate.flush()


# --- routing (spec: Unary-Request "Path", Streaming-Request) --------------------------------


def test_unary_post_reaches_the_handler(url, kv):
    reply = post_unary(url, PUT, kv_pb2.PutRequest(key="a", value=b"1"))

    assert reply.status == 200
    assert kv.last.method == "put"
    assert kv.last.request == kv_pb2.PutRequest(key="a", value=b"1")


def test_unary_response_is_a_bare_message_of_the_request_codec(url, kv):
    kv.script("get", returns(get_response(b"xyz")))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.headers["Content-Type"] == "application/proto"
    assert kv_pb2.GetResponse.FromString(reply.body) == get_response(b"xyz")


@pytest.mark.parametrize(
    "path",
    [
        "/kv.v1.KVService/Nope",
        "/kv.v1.Nope/Get",
        "/kv.v1.kvservice/get",
        "/kv.v1.KVService",
        "/",
        "/kv.v1.KVService/Get/extra",
    ],
)
def test_unknown_procedure_is_404(url, path):
    reply = post(url, path, b"", "application/proto")

    assert reply.status == 404


def test_unknown_procedure_body_says_unimplemented(url):
    reply = post(url, "/kv.v1.KVService/Nope", b"", "application/proto")

    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json()["code"] == "unimplemented"


@pytest.mark.parametrize(
    "http_method, path, allowed",
    [
        ("PUT", PUT, {"POST"}),
        ("GET", PUT, {"POST"}),
        ("DELETE", DELETE, {"POST"}),
        ("PATCH", PUT, {"POST"}),
        ("GET", GET, {"POST"}),  # the samples' Get, as Go's testdata declares it
        ("PUT", READ, {"GET", "POST"}),
        ("DELETE", READ, {"GET", "POST"}),
        ("GET", WATCH, {"POST"}),
        ("PUT", WATCH, {"POST"}),
    ],
)
def test_wrong_http_method_is_405_with_allow(url, http_method, path, allowed):
    reply = send(url, http_method, path, b"", {"Content-Type": "application/proto"})

    assert reply.status == 405
    assert {m.strip() for m in reply.headers["Allow"].split(",")} == allowed


@pytest.mark.parametrize(
    "content_type",
    [
        "application/proto",
        "application/json",
        "application/json; charset=utf-8",
        "application/JSON;charset=UTF-8",
    ],
)
def test_unary_accepts_proto_and_json_content_types(url, kv, content_type):
    body = (
        b'{"key":"a"}'
        if "json" in content_type.lower()
        else kv_pb2.GetRequest(key="a").SerializeToString()
    )

    reply = post(url, GET, body, content_type)

    assert reply.status == 200
    assert kv.last.request == kv_pb2.GetRequest(key="a")


def test_unary_json_response_is_json(url, kv):
    kv.script("get", returns(get_response(b"\x00\xff")))

    reply = post(url, GET, b'{"key":"a"}', "application/json")

    assert reply.headers["Content-Type"].split(";")[0] == "application/json"
    assert reply.json() == {"value": "AP8=", "found": True}


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/xml",
        "application/grpc",
        "application/connect+proto",
        "application/connect+json",
        "application/json; charset=latin-1",
        "",
    ],
)
def test_unsupported_unary_content_type_is_415_with_accept_post(url, content_type):
    reply = post(url, GET, b"", content_type)

    assert reply.status == 415
    accepted = {t.strip() for t in reply.headers["Accept-Post"].split(",")}
    assert {"application/proto", "application/json"} <= accepted


@pytest.mark.parametrize("content_type", ["application/connect+proto", "application/connect+json"])
def test_streaming_accepts_connect_proto_and_json(url, kv, content_type):
    kv.script("watch", streams(*events(1)))
    payload = (
        b'{"prefix":"p"}'
        if content_type.endswith("json")
        else kv_pb2.WatchRequest(prefix="p").SerializeToString()
    )

    reply = post(url, WATCH, envelope(payload), content_type)

    assert reply.status == 200
    assert reply.headers["Content-Type"] == content_type
    assert kv.last.request == kv_pb2.WatchRequest(prefix="p")


@pytest.mark.parametrize(
    "content_type",
    ["application/proto", "application/json", "application/grpc+proto", "text/plain"],
)
def test_unsupported_streaming_content_type_is_415_with_accept_post(url, content_type):
    reply = post(url, WATCH, envelope(b""), content_type)

    assert reply.status == 415
    accepted = {t.strip() for t in reply.headers["Accept-Post"].split(",")}
    assert {"application/connect+proto", "application/connect+json"} <= accepted


def test_close_never_pokes_a_trigger_the_loop_already_closed(kv):
    # Regression: close() set the stop flag and only then pulled waitress's trigger, which the
    # serving thread might already have closed (EBADF, or a write into a reused fd). White-box:
    # the pull is delayed until the serving thread has left its loop, making the race certain.
    server = HTTPServer(App([kv]))
    server.bind()
    real_pull = server._server.pull_trigger
    real_lock = server._lock
    trigger_next = threading.Event()  # the serving thread has closed every channel but the trigger

    class NoticedLock:
        def __enter__(self):
            if threading.current_thread() is server._thread:
                trigger_next.set()
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

    def late_pull(*args):
        with contextlib.suppress(OSError):
            socket.create_connection((server.host, server.port), timeout=1).close()  # wake the loop
        # Closing the trigger is all the serving thread has left to do: either it waits for
        # the lock close() holds (fixed), or it has closed the trigger and said it is done.
        wait_until(
            lambda: trigger_next.is_set() or server._done.is_set(),
            "the serving thread to close every channel",
            timeout=3,
        )
        real_pull(*args)

    server._lock = NoticedLock()

    server._server.pull_trigger = late_pull
    server.start()

    server.close(grace=1.0)

    assert server._done.is_set()


def test_app_is_plain_wsgi_and_needs_no_socket(kv):
    client = WSGITestClient(App([kv]))

    response = client.post(
        PUT,
        data=kv_pb2.PutRequest(key="w", value=b"1").SerializeToString(),
        content_type="application/proto",
    )

    assert response.status_code == 200
    assert kv.last.request.key == "w"


# --- unary errors (spec: Unary-Response, Error Codes) ---------------------------------------


@pytest.mark.parametrize("name, status", sorted(SPEC_HTTP_STATUS.items()))
def test_unary_error_code_maps_to_its_http_status(url, kv, name, status):
    kv.script("get", raises(ConnectError(Code(name), "it failed")))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.status == status
    assert reply.json()["code"] == name


def test_unary_error_body_is_connect_json(url, kv):
    kv.script("get", raises(ConnectError(Code.NOT_FOUND, "no such key")))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == {"code": "not_found", "message": "no such key"}


def test_unary_error_without_message_has_only_a_code(url, kv):
    kv.script("get", raises(ConnectError(Code.ABORTED)))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.json() == {"code": "aborted"}


def test_error_details_carry_type_name_and_unpadded_base64(url, kv):
    detail = kv_pb2.PutRequest(key="why", value=b"\x01")  # 8 bytes: padded base64 would end in "="
    kv.script("get", raises(ConnectError(Code.FAILED_PRECONDITION, "see details", [detail])))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    [wire] = reply.json()["details"]
    assert wire["type"] == "kv.v1.PutRequest"
    assert "=" not in wire["value"]
    assert kv_pb2.PutRequest.FromString(unb64(wire["value"])) == detail


def test_unexpected_exception_is_internal_with_a_generic_message(url, kv):
    kv.script("get", raises(RuntimeError("db password is hunter2")))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.status == 500
    assert reply.json()["code"] == "internal"
    assert b"hunter2" not in reply.body
    assert b"Traceback" not in reply.body


def test_unexpected_exception_traceback_is_logged_server_side(url, kv, caplog):
    kv.script("get", raises(RuntimeError("db password is hunter2")))

    with caplog.at_level(logging.ERROR, logger="connectplugin.server"):
        post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    logged = [r for r in caplog.records if r.exc_info and "hunter2" in str(r.exc_info[1])]
    assert logged, caplog.text
    assert "Traceback" in caplog.text


def test_handler_returning_the_wrong_type_is_internal(url, kv):
    kv.script("get", returns(kv_pb2.PutResponse()))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.status == 500
    assert reply.json()["code"] == "internal"


def test_base_handler_answers_unimplemented_for_unary(serve):
    server = serve(App([KVServiceHandler()]))

    reply = post_unary(server.url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.status == 501
    assert reply.json()["code"] == "unimplemented"


def test_base_handler_answers_unimplemented_for_streaming(serve):
    server = serve(App([KVServiceHandler()]))

    reply = post_stream(server.url, WATCH, kv_pb2.WatchRequest())

    assert reply.status == 200
    assert reply.end_stream()["error"]["code"] == "unimplemented"


# --- streaming responses and errors (spec: Streaming-Response, EndStreamResponse) -----------


def test_stream_frames_are_flag_byte_and_big_endian_length(url, kv):
    event = kv_pb2.WatchEvent(key="k", value=b"v" * 300)  # longer than 255: all length bytes matter
    kv.script("watch", streams(event))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    payload = event.SerializeToString()
    assert reply.body[0] == 0x00
    assert reply.body[1:5] == len(payload).to_bytes(4, "big")
    assert reply.body[5 : 5 + len(payload)] == payload


def test_stream_delivers_every_message_in_order(url, kv):
    kv.script("watch", streams(*events(3)))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    assert [kv_pb2.WatchEvent.FromString(m).key for m in reply.messages()] == ["k0", "k1", "k2"]


def test_successful_stream_ends_with_an_empty_end_stream(url, kv):
    kv.script("watch", streams(*events(2)))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    assert reply.envelopes()[-1][0] == 0x02
    assert reply.end_stream() == {}


def test_streaming_error_is_an_end_stream_in_a_200(url, kv):
    kv.script("watch", raises(ConnectError(Code.NOT_FOUND, "no such prefix")))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/connect+proto"
    assert reply.messages() == []
    assert reply.end_stream()["error"] == {"code": "not_found", "message": "no such prefix"}


def test_streaming_error_after_messages_follows_them(url, kv):
    def watch(request, ctx):
        yield from events(2)
        raise ConnectError(Code.DATA_LOSS, "disk gone")

    kv.script("watch", watch)

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    assert len(reply.messages()) == 2
    assert reply.end_stream()["error"]["code"] == "data_loss"


def test_streaming_error_details_are_in_the_end_stream(url, kv):
    detail = kv_pb2.PutRequest(key="why", value=b"\x01")
    kv.script("watch", raises(ConnectError(Code.ABORTED, "retry", [detail])))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    [wire] = reply.end_stream()["error"]["details"]
    assert wire["type"] == "kv.v1.PutRequest"
    assert "=" not in wire["value"]
    assert kv_pb2.PutRequest.FromString(unb64(wire["value"])) == detail


def test_unexpected_exception_in_a_stream_is_internal_and_logged(url, kv, caplog):
    def watch(request, ctx):
        yield from events(1)
        raise KeyError("secret-internal-key")

    kv.script("watch", watch)

    with caplog.at_level(logging.ERROR, logger="connectplugin.server"):
        reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    error = reply.end_stream()["error"]
    assert error["code"] == "internal"
    assert b"secret-internal-key" not in reply.body
    assert "secret-internal-key" in caplog.text


# --- request envelopes (spec: Streaming-Request, Enveloped-Message) -------------------------


@pytest.mark.parametrize("flags", [0x04, 0x08, 0x10, 0x80, 0xFC])
def test_unknown_request_envelope_flags_are_invalid_argument(url, kv, flags):
    kv.script("watch", streams(*events(1)))
    body = envelope(kv_pb2.WatchRequest(prefix="p").SerializeToString(), flags)

    reply = post(url, WATCH, body, "application/connect+proto")

    assert reply.end_stream()["error"]["code"] == "invalid_argument"


def test_end_stream_flag_on_a_request_is_invalid_argument(url, kv):
    kv.script("watch", streams(*events(1)))
    body = envelope(kv_pb2.WatchRequest(prefix="p").SerializeToString(), 0x02)

    reply = post(url, WATCH, body, "application/connect+proto")

    assert reply.end_stream()["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize("count", [0, 2, 3])
def test_server_streaming_request_with_other_than_one_message_is_unimplemented(url, kv, count):
    # gRPC's status-code table, which Connect follows: "Unimplemented ... a server-streaming
    # RPC received zero or several request messages"; connect-go answers the same.
    kv.script("watch", streams(*events(1)))
    body = envelope(kv_pb2.WatchRequest(prefix="p").SerializeToString()) * count

    reply = post(url, WATCH, body, "application/connect+proto")

    assert reply.status == 200
    assert reply.end_stream()["error"]["code"] == "unimplemented"
    assert kv.calls == []


def test_one_message_followed_by_a_truncated_envelope_is_invalid_argument(url, kv):
    kv.script("watch", streams(*events(1)))
    body = envelope(kv_pb2.WatchRequest(prefix="p").SerializeToString()) + b"\x00\x00"

    reply = post(url, WATCH, body, "application/connect+proto")

    assert reply.end_stream()["error"]["code"] == "invalid_argument"
    assert kv.calls == []


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00",  # prefix cut short
        envelope(b"")[:4],
        b"\x00\x00\x00\x00\x64" + b"x" * 10,  # promises 100 bytes, carries 10
        envelope(kv_pb2.WatchRequest(prefix="abc").SerializeToString())[:-1],
    ],
    ids=["short-prefix", "four-byte-prefix", "short-payload", "one-byte-missing"],
)
def test_truncated_request_envelope_is_invalid_argument(url, kv, body):
    kv.script("watch", streams(*events(1)))

    reply = post(url, WATCH, body, "application/connect+proto")

    assert reply.end_stream()["error"]["code"] == "invalid_argument"
    assert kv.calls == []


def test_compressed_request_envelope_is_inflated(url, kv):
    kv.script("watch", streams(*events(1)))
    body = envelope(gzip.compress(kv_pb2.WatchRequest(prefix="zip").SerializeToString()), 0x01)

    reply = post(url, WATCH, body, "application/connect+proto", Connect_Content_Encoding="gzip")

    assert reply.end_stream() == {}
    assert kv.last.request == kv_pb2.WatchRequest(prefix="zip")


@pytest.mark.parametrize("encoding_header", [None, "identity"])
def test_compressed_flag_without_a_stream_encoding_is_internal(url, kv, encoding_header):
    # Spec: with Connect-Content-Encoding omitted or identity the compressed bit must be 0;
    # the conformance suite expects internal for this protocol error.
    kv.script("watch", streams(*events(1)))
    body = envelope(gzip.compress(kv_pb2.WatchRequest(prefix="zip").SerializeToString()), 0x01)
    headers = {"Connect_Content_Encoding": encoding_header} if encoding_header else {}

    reply = post(url, WATCH, body, "application/connect+proto", **headers)

    assert reply.end_stream()["error"]["code"] == "internal"


# --- compression (spec: Content-Encoding / Accept-Encoding and their Connect- variants) -----


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_unary_request_body_in_a_supported_encoding_is_accepted(url, kv, encoding):
    raw = kv_pb2.PutRequest(key="a", value=b"z" * 2000).SerializeToString()
    body = gzip.compress(raw) if encoding == "gzip" else raw

    reply = post(url, PUT, body, "application/proto", Content_Encoding=encoding)

    assert reply.status == 200
    assert kv.last.request.value == b"z" * 2000


def test_empty_gzip_request_body_is_not_decompressed(url, kv):
    # Spec: servers must not attempt to decompress zero-length request content.
    kv.script("get", returns(get_response(b"")))

    reply = post(url, GET, b"", "application/proto", Content_Encoding="gzip")

    assert reply.status == 200
    assert kv.last.request == kv_pb2.GetRequest()


@pytest.mark.parametrize("encoding", ["br", "zstd", "deflate", "x-custom"])
def test_unknown_unary_content_encoding_is_unimplemented_listing_gzip(url, encoding):
    reply = post(url, GET, b"\x0a\x01a", "application/proto", Content_Encoding=encoding)

    assert reply.status == 501
    assert reply.json()["code"] == "unimplemented"
    assert "gzip" in reply.json()["message"]


def test_unknown_stream_content_encoding_is_unimplemented(url, kv):
    kv.script("watch", streams(*events(1)))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest(), Connect_Content_Encoding="br")

    assert reply.end_stream()["error"]["code"] == "unimplemented"


def test_malformed_gzip_request_is_invalid_argument(url):
    reply = post(url, GET, b"\x1f\x8b\x08\x00garbage", "application/proto", Content_Encoding="gzip")

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"


@pytest.mark.parametrize("accept", ["gzip", "br, gzip", "gzip, br"])
def test_unary_response_above_threshold_is_gzipped_when_accepted(url, kv, accept):
    expected = get_response(b"a" * 1100)
    kv.script("get", returns(expected))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), Accept_Encoding=accept)

    assert reply.headers["Content-Encoding"] == "gzip"
    assert kv_pb2.GetResponse.FromString(gzip.decompress(reply.body)) == expected


def test_unary_response_below_threshold_is_not_compressed(url, kv):
    expected = get_response(b"a" * 1000)
    kv.script("get", returns(expected))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), Accept_Encoding="gzip")

    assert reply.headers.get("Content-Encoding", "identity") == "identity"
    assert kv_pb2.GetResponse.FromString(reply.body) == expected


@pytest.mark.parametrize("accept", ["identity", "br"])
def test_unary_response_is_not_gzipped_unless_accepted(url, kv, accept):
    expected = get_response(b"a" * 5000)
    kv.script("get", returns(expected))

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), Accept_Encoding=accept)

    assert reply.headers.get("Content-Encoding", "identity") == "identity"
    assert kv_pb2.GetResponse.FromString(reply.body) == expected


def test_compression_threshold_is_configurable(serve, kv):
    server = serve(App([kv], ServerConfig(compress_min_bytes=64)))
    kv.script("get", returns(get_response(b"a" * 100)))

    reply = post_unary(server.url, GET, kv_pb2.GetRequest(key="a"), Accept_Encoding="gzip")

    assert reply.headers["Content-Encoding"] == "gzip"


def test_stream_messages_above_threshold_are_gzipped_when_accepted(url, kv):
    big, small = kv_pb2.WatchEvent(key="big", value=b"b" * 2000), kv_pb2.WatchEvent(key="small")
    kv.script("watch", streams(big, small))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest(), Connect_Accept_Encoding="gzip")

    assert reply.headers["Connect-Content-Encoding"] == "gzip"
    (big_flags, big_data), (small_flags, small_data), _ = reply.envelopes()
    assert big_flags == 0x01
    assert kv_pb2.WatchEvent.FromString(gzip.decompress(big_data)) == big
    assert small_flags == 0x00
    assert kv_pb2.WatchEvent.FromString(small_data) == small


def test_stream_messages_are_not_compressed_unless_accepted(url, kv):
    big = kv_pb2.WatchEvent(key="big", value=b"b" * 2000)
    kv.script("watch", streams(big))

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    (flags, data), _ = reply.envelopes()
    assert flags == 0x00
    assert kv_pb2.WatchEvent.FromString(data) == big


# --- timeouts (spec: Connect-Timeout-Ms) ----------------------------------------------------


def test_handler_sees_the_deadline_from_connect_timeout_ms(url, kv):
    post_unary(url, GET, kv_pb2.GetRequest(key="a"), Connect_Timeout_Ms="5000")

    assert 4.0 < kv.last.timeout_remaining <= 5.0


def test_handler_sees_no_deadline_without_a_timeout(url, kv):
    post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert kv.last.timeout_remaining is None


def test_ten_digit_timeout_is_accepted(url, kv):
    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), Connect_Timeout_Ms="9999999999")

    assert reply.status == 200
    assert kv.last.timeout_remaining > 9_000_000


def test_unary_handler_outliving_its_timeout_is_deadline_exceeded(url, kv):
    def slow(request, ctx):
        kv.pause(0.5)
        return get_response(b"late")

    kv.script("get", slow)

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), Connect_Timeout_Ms="100")

    assert reply.status == 504
    assert reply.json()["code"] == "deadline_exceeded"


def test_stream_outliving_its_timeout_is_deadline_exceeded(url, kv):
    def slow(request, ctx):
        kv.pause(0.5)
        yield from events(1)

    kv.script("watch", slow)

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest(), Connect_Timeout_Ms="100")

    assert reply.messages() == []
    assert reply.end_stream()["error"]["code"] == "deadline_exceeded"


def test_stream_messages_before_the_deadline_arrive_then_deadline_exceeded(url, kv):
    def slow(request, ctx):
        yield from events(1)
        kv.pause(0.5)
        yield from events(1)

    kv.script("watch", slow)

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest(), Connect_Timeout_Ms="150")

    assert len(reply.messages()) == 1
    assert reply.end_stream()["error"]["code"] == "deadline_exceeded"


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "-1",
        "1.5",
        "1e3",
        "12345678901",  # 11 digits: the spec allows at most 10
        "0x10",
        "\u00b2",  # SUPERSCRIPT TWO: str.isdigit() says yes, int() says no
    ],
)
def test_malformed_unary_timeout_is_invalid_argument(url, kv, value):
    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), Connect_Timeout_Ms=value)

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"
    assert kv.calls == []


def test_malformed_stream_timeout_is_invalid_argument(url, kv):
    reply = post_stream(url, WATCH, kv_pb2.WatchRequest(), Connect_Timeout_Ms="soon")

    assert reply.end_stream()["error"]["code"] == "invalid_argument"
    assert kv.calls == []


# --- protocol version (spec: Connect-Protocol-Version) --------------------------------------


@pytest.mark.parametrize("version", ["1", None])
def test_protocol_version_1_or_absent_is_accepted(url, version):
    headers = {"Connect_Protocol_Version": version} if version else {}

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), **headers)

    assert reply.status == 200


@pytest.mark.parametrize("version", ["2", "0", "v1", "1.0"])
def test_other_unary_protocol_versions_are_invalid_argument(url, version):
    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"), Connect_Protocol_Version=version)

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"


def test_other_stream_protocol_version_is_invalid_argument(url, kv):
    reply = post_stream(url, WATCH, kv_pb2.WatchRequest(), Connect_Protocol_Version="2")

    assert reply.end_stream()["error"]["code"] == "invalid_argument"


# --- GET (spec: Unary-Get-Request) ----------------------------------------------------------


def get_query(**params: str) -> str:
    return READ + "?" + urlencode(params)


def test_get_with_json_message(url, kv):
    kv.script("get", returns(get_response(b"hi")))

    reply = send(url, "GET", get_query(connect="v1", encoding="json", message='{"key":"a b+c"}'))

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert kv.last.request == kv_pb2.GetRequest(key="a b+c")
    assert kv.last.http_method == "GET"


@pytest.mark.parametrize("padded", [False, True])
def test_get_with_base64_proto_message(url, kv, padded):
    raw = kv_pb2.GetRequest(key="\u00ff\u00fe?>").SerializeToString()  # urlsafe alphabet matters
    message = base64.urlsafe_b64encode(raw).decode()
    message = message if padded else message.rstrip("=")

    reply = send(url, "GET", get_query(connect="v1", encoding="proto", base64="1", message=message))

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/proto"
    assert kv.last.request == kv_pb2.GetRequest(key="\u00ff\u00fe?>")


def test_get_with_gzip_compressed_message(url, kv):
    packed = base64.urlsafe_b64encode(
        gzip.compress(kv_pb2.GetRequest(key="gz").SerializeToString())
    )

    reply = send(
        url,
        "GET",
        get_query(
            connect="v1",
            encoding="proto",
            base64="1",
            compression="gzip",
            message=packed.decode().rstrip("="),
        ),
    )

    assert reply.status == 200
    assert kv.last.request == kv_pb2.GetRequest(key="gz")


def test_get_query_params_in_any_order_with_unknown_ones(url, kv):
    target = READ + "?message=%7B%22key%22%3A%22o%22%7D&cachebust=123&encoding=json&connect=v1"

    reply = send(url, "GET", target)

    assert reply.status == 200
    assert kv.last.request == kv_pb2.GetRequest(key="o")


def test_get_with_unknown_compression_is_unimplemented(url):
    reply = send(
        url, "GET", get_query(connect="v1", encoding="json", compression="br", message="{}")
    )

    assert reply.status == 501
    assert reply.json()["code"] == "unimplemented"


@pytest.mark.parametrize("encoding", [None, "xml", "connect+proto"])
def test_get_with_unknown_encoding_is_415(url, encoding):
    params = {"connect": "v1", "message": "{}"}
    if encoding:
        params["encoding"] = encoding

    reply = send(url, "GET", get_query(**params))

    assert reply.status == 415


def test_get_with_other_connect_version_is_invalid_argument(url):
    reply = send(url, "GET", get_query(connect="v2", encoding="json", message="{}"))

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"


def test_get_with_invalid_base64_is_invalid_argument(url):
    reply = send(url, "GET", get_query(connect="v1", encoding="proto", base64="1", message="a"))

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"


def test_get_response_is_gzipped_when_accepted(url, kv):
    expected = get_response(b"a" * 4000)
    kv.script("get", returns(expected))

    reply = send(
        url,
        "GET",
        get_query(connect="v1", encoding="json", message="{}"),
        headers={"Accept-Encoding": "gzip"},
    )

    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.status == 200


def test_get_gzip_bomb_is_resource_exhausted(url, kv):
    bomb = base64.urlsafe_b64encode(gzip_bomb(10 * MiB)).decode().rstrip("=")

    reply = send(
        url,
        "GET",
        get_query(connect="v1", encoding="proto", base64="1", compression="gzip", message=bomb),
    )

    assert reply.status == 429
    assert reply.json()["code"] == "resource_exhausted"
    assert kv.calls == []


# --- metadata (spec: Leading-Metadata, Prefixed-Trailing-Metadata, Binary-Metadata) ---------


def test_request_headers_reach_the_handler_with_lower_case_keys(url, kv):
    post_unary(url, GET, kv_pb2.GetRequest(key="a"), X_Trace_ID="AbC-123")

    assert kv.last.headers["x-trace-id"] == "AbC-123"
    assert not any(k != k.lower() for k in kv.last.headers)


BLOB = b"\xfb\xff\xbf\x00"  # base64 "+/+/AA==": exercises both alphabets and the padding


@pytest.mark.parametrize(
    "wire", ["+/+/AA", "+/+/AA==", "-_-_AA"], ids=["unpadded", "padded", "urlsafe"]
)
def test_binary_request_header_reaches_the_handler_decoded(url, kv, wire):
    post_unary(url, GET, kv_pb2.GetRequest(key="a"), X_Blob_Bin=wire)

    assert kv.last.headers["x-blob-bin"] == BLOB


def test_unary_response_headers_and_prefixed_trailers_are_sent(url, kv):
    def get(request, ctx):
        ctx.response_headers["x-served-by"] = "kv"
        ctx.response_trailers["x-cost"] = "7"
        return get_response(b"")

    kv.script("get", get)

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.headers["x-served-by"] == "kv"
    assert reply.headers["trailer-x-cost"] == "7"
    assert reply.headers.get("x-cost") is None


def test_binary_response_header_is_sent_as_unpadded_base64(url, kv):
    def get(request, ctx):
        ctx.response_headers["x-blob-bin"] = BLOB
        ctx.response_trailers["x-sum-bin"] = BLOB
        return get_response(b"")

    kv.script("get", get)

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.headers["x-blob-bin"] == "+/+/AA"
    assert reply.headers["trailer-x-sum-bin"] == "+/+/AA"


def test_unary_error_carries_headers_trailers_and_error_metadata(url, kv):
    def get(request, ctx):
        ctx.response_headers["x-served-by"] = "kv"
        ctx.response_trailers["x-cost"] = "7"
        raise ConnectError(Code.UNAVAILABLE, "busy", metadata={"retry-after-ms": "250"})

    kv.script("get", get)

    reply = post_unary(url, GET, kv_pb2.GetRequest(key="a"))

    assert reply.status == 503
    assert reply.headers["x-served-by"] == "kv"
    assert reply.headers["trailer-x-cost"] == "7"
    assert reply.headers["retry-after-ms"] == "250"


def test_stream_headers_are_http_headers_and_trailers_are_end_stream_metadata(url, kv):
    def watch(request, ctx):
        # Headers go out when the stream starts: they are set before the iterator is returned.
        ctx.response_headers["x-served-by"] = "kv"

        def messages():
            yield from events(1)
            ctx.response_trailers["x-cost"] = "7"
            ctx.response_trailers["x-sum-bin"] = BLOB

        return messages()

    kv.script("watch", watch)

    reply = post_stream(url, WATCH, kv_pb2.WatchRequest())

    assert reply.headers["x-served-by"] == "kv"
    assert reply.headers.get("trailer-x-cost") is None
    assert reply.end_stream() == {"metadata": {"x-cost": ["7"], "x-sum-bin": ["+/+/AA"]}}


def test_stream_error_metadata_is_in_the_end_stream(url, kv):
    def watch(request, ctx):
        ctx.response_trailers["x-cost"] = "7"
        yield from events(1)
        raise ConnectError(Code.UNAVAILABLE, "busy", metadata={"retry-after-ms": "250"})

    kv.script("watch", watch)

    end = post_stream(url, WATCH, kv_pb2.WatchRequest()).end_stream()

    assert end["error"]["code"] == "unavailable"
    assert end["metadata"] == {"x-cost": ["7"], "retry-after-ms": ["250"]}


# --- read limit -----------------------------------------------------------------------------


def test_default_read_limit_admits_a_4_mib_message(url, kv):
    reply = post_unary(url, PUT, put_of_size(4 * MiB))

    assert reply.status == 200
    assert kv.last.request.ByteSize() == 4 * MiB


def test_default_read_limit_rejects_a_message_over_4_mib(url, kv):
    reply = post_unary(url, PUT, put_of_size(4 * MiB + 1))

    assert reply.status == 429
    assert reply.json()["code"] == "resource_exhausted"
    assert kv.calls == []


@pytest.fixture
def small_limit(serve, kv):
    """A server whose read limit is 1 KiB."""
    kv.script("watch", streams(*events(1)))
    return serve(App([kv], ServerConfig(read_limit=1024))).url


def test_configured_read_limit_admits_a_message_at_the_limit(small_limit, kv):
    reply = post_unary(small_limit, PUT, put_of_size(1024))

    assert reply.status == 200


def test_configured_read_limit_rejects_a_unary_message_over_it(small_limit, kv):
    reply = post_unary(small_limit, PUT, put_of_size(1025))

    assert reply.status == 429
    assert reply.json()["code"] == "resource_exhausted"


def test_configured_read_limit_admits_a_stream_message_at_the_limit(small_limit, kv):
    reply = post_stream(small_limit, WATCH, watch_of_size(1024))

    assert reply.end_stream() == {}


def test_configured_read_limit_rejects_a_stream_message_over_it(small_limit, kv):
    reply = post_stream(small_limit, WATCH, watch_of_size(1025))

    assert reply.status == 200
    assert reply.end_stream()["error"]["code"] == "resource_exhausted"
    assert kv.calls == []


def test_chunked_body_over_the_limit_is_resource_exhausted(small_limit, kv):
    body = put_of_size(4096).SerializeToString()
    chunks = (body[i : i + 500] for i in range(0, len(body), 500))

    reply = send(small_limit, "POST", PUT, chunks, {"Content-Type": "application/proto"})

    assert reply.status == 429
    assert kv.calls == []


def test_envelope_length_over_the_limit_is_rejected_before_reading_it(url, kv):
    # The prefix promises 5 MiB but only 10 bytes follow: the size, not the truncation, is reported.
    body = b"\x00" + (5 * MiB).to_bytes(4, "big") + b"x" * 10

    reply = post(url, WATCH, body, "application/connect+proto")

    assert reply.end_stream()["error"]["code"] == "resource_exhausted"


class EndlessInput:
    """A wsgi.input that never ends; counts what the app reads and refuses unbounded reads."""

    def __init__(self) -> None:
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        assert n is not None and n >= 0, "the app tried to read an unbounded body in one go"
        self.consumed += n
        return b"\x00" * n

    def readline(self, n: int = -1) -> bytes:  # pragma: no cover - WSGI completeness
        return self.read(max(n, 0))


def call_wsgi(app: App, path: str, stream, content_type: str, content_length: int | None):
    environ = EnvironBuilder(path=path, method="POST", content_type=content_type).get_environ()
    environ["wsgi.input"] = stream
    environ.pop("CONTENT_LENGTH", None)
    if content_length is not None:
        environ["CONTENT_LENGTH"] = str(content_length)
    app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
    return int(status.split()[0]), b"".join(app_iter)


@pytest.mark.parametrize(
    "path, content_type", [(PUT, "application/proto"), (WATCH, "application/connect+proto")]
)
def test_declared_length_over_the_limit_is_refused_without_reading(kv, path, content_type):
    stream = EndlessInput()

    status, body = call_wsgi(
        App([kv], ServerConfig(read_limit=1024)), path, stream, content_type, 10 * MiB
    )

    assert b"resource_exhausted" in body
    assert stream.consumed == 0


@pytest.mark.parametrize(
    "path, content_type", [(PUT, "application/proto"), (WATCH, "application/connect+proto")]
)
def test_body_without_a_length_is_read_no_further_than_the_limit(kv, path, content_type):
    stream = EndlessInput()

    status, body = call_wsgi(
        App([kv], ServerConfig(read_limit=1024)), path, stream, content_type, None
    )

    assert b"resource_exhausted" in body
    assert stream.consumed <= 1024 + 64


def test_unary_gzip_bomb_is_resource_exhausted_without_inflating_it(url, kv):
    bomb = gzip_bomb(64 * MiB)  # about 64 KiB on the wire
    tracemalloc.start()
    try:
        reply = post(url, PUT, bomb, "application/proto", Content_Encoding="gzip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert reply.status == 429
    assert reply.json()["code"] == "resource_exhausted"
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB: the bomb was inflated"


def test_stream_gzip_bomb_is_resource_exhausted_without_inflating_it(url, kv):
    body = envelope(gzip_bomb(64 * MiB), 0x01)
    tracemalloc.start()
    try:
        reply = post(url, WATCH, body, "application/connect+proto", Connect_Content_Encoding="gzip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert reply.end_stream()["error"]["code"] == "resource_exhausted"
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB: the bomb was inflated"
    assert kv.calls == []


def test_gzip_bomb_against_a_small_limit_inflates_only_that_much(small_limit, kv):
    tracemalloc.start()
    try:
        reply = post(
            small_limit, PUT, gzip_bomb(10 * MiB), "application/proto", Content_Encoding="gzip"
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert reply.status == 429
    assert peak < 2 * MiB, f"peak {peak / MiB:.1f} MiB"


# --- message codecs (spec: Protocol Buffers; proto3 JSON mapping) ---------------------------


@pytest.mark.parametrize(
    "body",
    [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x08"],
    ids=["bad-wire-type", "short-string", "bad-utf8", "missing-varint"],
)
def test_malformed_protobuf_is_invalid_argument(url, kv, body):
    reply = post(url, GET, body, "application/proto")

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"
    assert kv.calls == []


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'"key"', b"null", b'{"key": 5}', b"{'key': 'a'}", b"\xff\xfe{}"],
    ids=["unclosed", "array", "string", "null", "wrong-type", "single-quotes", "not-utf8"],
)
def test_malformed_json_is_invalid_argument(url, kv, body):
    reply = post(url, GET, body, "application/json")

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"
    assert kv.calls == []


def test_malformed_stream_message_is_invalid_argument(url, kv):
    reply = post(url, WATCH, envelope(b"\xff"), "application/connect+proto")

    assert reply.end_stream()["error"]["code"] == "invalid_argument"
    assert kv.calls == []


def test_json_out_uses_camel_case_names(url):
    reply = post(url, GET_INFO, b"{}", "application/json")

    assert reply.json() == {"selfId": "kv-plugin", "selfVersion": "1.2.3"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"runtime_id": "r1", "runtime_token": "t", "host_url": "http://h"}',
        b'{"runtimeId": "r1", "runtimeToken": "t", "hostUrl": "http://h"}',
        b'{"runtime_id": "r1", "runtimeToken": "t", "hostUrl": "http://h"}',
    ],
    ids=["snake", "camel", "mixed"],
)
def test_json_in_accepts_snake_and_camel_case(url, identity, body):
    reply = post(url, SET_IDENTITY, body, "application/json")

    assert reply.status == 200
    assert identity.requests[-1] == plugininfo_pb2.SetRuntimeIdentityRequest(
        runtime_id="r1", runtime_token="t", host_url="http://h"
    )


def test_json_in_ignores_unknown_fields(url, identity):
    reply = post(
        url, SET_IDENTITY, b'{"runtimeId": "r1", "addedInV2": {"x": [1]}}', "application/json"
    )

    assert reply.status == 200
    assert identity.requests[-1].runtime_id == "r1"


# --- robustness -----------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["truncated", "trailing-junk"])
def test_truncated_or_padded_gzip_request_is_invalid_argument(url, kv, cut):
    kv.script("get", returns(get_response(b"")))
    data = gzip.compress(kv_pb2.GetRequest(key="k" * 2000).SerializeToString())
    data = data[:-8] if cut == "truncated" else data + b"junk"

    reply = post(url, GET, data, "application/proto", Content_Encoding="gzip")

    assert reply.status == 400
    assert reply.json()["code"] == "invalid_argument"
    assert kv.calls == []


def test_metadata_a_handler_cannot_send_is_dropped_not_a_broken_response(url, kv, caplog):
    def handler(request, ctx):
        ctx.response_headers["x-not-binary"] = b"\x00\x01"  # bytes need a -bin key
        ctx.response_headers["x-fine"] = "yes"
        return get_response(b"v")

    kv.script("get", handler)

    reply = post(url, GET, kv_pb2.GetRequest(key="k").SerializeToString(), "application/proto")

    assert reply.status == 200
    assert reply.headers["x-fine"] == "yes" and reply.headers["x-not-binary"] is None
    assert "x-not-binary" in caplog.text
