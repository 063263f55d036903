"""_protocol.py on its own: the Connect wire facts both sides share, built and read back."""

from __future__ import annotations

import gzip
import json
from urllib.parse import parse_qs

import pytest

from connectplugin import Code, ConnectError
from connectplugin.rpc import _protocol
from samples.kv.gen.kv.v1 import kv_pb2

DETAIL = kv_pb2.PutRequest(key="why", value=b"\x01")


def payload(envelope: bytes) -> tuple[int, bytes]:
    return envelope[0], envelope[5:]


# --- end of stream (spec: "Streaming-Response", EndStreamResponse) --------------------------


def test_an_end_stream_without_error_or_trailers_is_an_empty_object():
    flags, data = payload(_protocol.end_stream())

    assert flags == _protocol.FLAG_END_STREAM
    assert json.loads(data) == {}
    assert _protocol.read_end_stream(data, {}) == ({}, None)


def test_end_stream_trailers_round_trip_with_repeated_keys_joined():
    _, data = payload(_protocol.end_stream(metadata=[("x-a", "1"), ("x-a", "2"), ("x-b", "3")]))

    assert json.loads(data) == {"metadata": {"x-a": ["1", "2"], "x-b": ["3"]}}
    assert _protocol.read_end_stream(data, {}) == ({"x-a": "1, 2", "x-b": "3"}, None)


def test_end_stream_error_round_trips_with_details_and_carries_headers_and_trailers():
    sent = ConnectError(Code.NOT_FOUND, "gone", [DETAIL])

    _, data = payload(_protocol.end_stream(sent, [("x-t", "v")]))
    trailers, error = _protocol.read_end_stream(data, {"x-h": "h"})

    assert trailers == {"x-t": "v"}
    assert error is not None
    assert (error.code, error.message) == (Code.NOT_FOUND, "gone")
    assert error.details[0].unpack(kv_pb2.PutRequest) == DETAIL
    assert error.metadata == {"x-h": "h", "x-t": "v"}


@pytest.mark.parametrize("data", [b"", b"[]", b"nope", b'"text"'])
def test_an_end_stream_that_is_not_a_json_object_is_internal(data):
    with pytest.raises(ConnectError) as e:
        _protocol.read_end_stream(data, {})

    assert e.value.code is Code.INTERNAL


def test_end_stream_metadata_that_is_not_lists_of_strings_is_ignored():
    data = json.dumps({"metadata": {"x-a": "flat", "x-b": [1, "ok"]}}).encode()

    assert _protocol.read_end_stream(data, {}) == ({"x-b": "ok"}, None)


# --- unary errors ---------------------------------------------------------------------------


def test_unary_error_body_round_trips():
    sent = ConnectError(Code.PERMISSION_DENIED, "no", [DETAIL])
    headers = {"content-type": _protocol.ERROR_CONTENT_TYPE}

    error = _protocol.read_error(403, "Forbidden", headers, _protocol.error_body(sent), {"x": "y"})

    assert (error.code, error.message, error.metadata) == (Code.PERMISSION_DENIED, "no", {"x": "y"})
    assert error.details[0].unpack(kv_pb2.PutRequest) == DETAIL


def test_a_gzipped_unary_error_body_is_read():
    body = gzip.compress(_protocol.error_body(ConnectError(Code.ABORTED, "busy")))
    headers = {"content-type": "application/json", "content-encoding": "gzip"}

    assert _protocol.read_error(409, None, headers, body, {}).code is Code.ABORTED


@pytest.mark.parametrize(
    "headers, body",
    [({"content-type": "text/html"}, b"<h1>bad gateway</h1>"), ({"content-type": "application/json"}, b"{")],
)
def test_an_error_without_a_readable_connect_body_takes_its_code_from_the_status(headers, body):
    error = _protocol.read_error(502, "Bad Gateway", headers, body, {})

    assert (error.code, error.message) == (Code.UNAVAILABLE, "HTTP 502 Bad Gateway")


# --- content types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, table, codec",
    [
        ("application/proto", _protocol.UNARY_TYPES, "proto"),
        ("Application/JSON; charset=utf-8", _protocol.UNARY_TYPES, "json"),
        ('application/json; charset="UTF8"', _protocol.UNARY_TYPES, "json"),
        ("application/json; charset=latin-1", _protocol.UNARY_TYPES, ""),
        ("application/connect+proto", _protocol.UNARY_TYPES, ""),
        ("application/connect+json", _protocol.STREAM_TYPES, "json"),
        ("application/proto", _protocol.STREAM_TYPES, ""),
        ("text/plain", _protocol.UNARY_TYPES, ""),
    ],
)
def test_codec_for_a_content_type(content_type, table, codec):
    assert _protocol.codec_for(content_type, table) == codec


@pytest.mark.parametrize(
    "received, expected, code",
    [
        ("application/proto; charset=x", "application/proto", None),
        ("application/json", "application/proto", Code.INTERNAL),
        ("text/html", "application/proto", Code.UNKNOWN),
        ("application/connect+json", "application/connect+proto", Code.INTERNAL),
        ("text/html", "application/connect+proto", Code.INTERNAL),
    ],
)
def test_a_response_content_type_must_match_the_request_codec(received, expected, code):
    if code is None:
        _protocol.check_response_type(received, expected, {})
        return
    with pytest.raises(ConnectError) as e:
        _protocol.check_response_type(received, expected, {"x": "y"})

    assert (e.value.code, e.value.metadata) == (code, {"x": "y"})


# --- version, compression, timeouts ---------------------------------------------------------


@pytest.mark.parametrize("version", [None, "1"])
def test_an_absent_or_v1_protocol_version_is_accepted(version):
    _protocol.check_version(version)


def test_another_protocol_version_is_invalid_argument():
    with pytest.raises(ConnectError) as e:
        _protocol.check_version("2")

    assert e.value.code is Code.INVALID_ARGUMENT


@pytest.mark.parametrize("value, encoding", [(None, "identity"), ("", "identity"), ("gzip", "gzip")])
def test_check_encoding_names_the_compression_used(value, encoding):
    assert _protocol.check_encoding(value) == encoding


def test_an_unknown_compression_is_unimplemented():
    with pytest.raises(ConnectError) as e:
        _protocol.check_encoding("br")

    assert e.value.code is Code.UNIMPLEMENTED


@pytest.mark.parametrize("seconds, value", [(1.5, "1500"), (0.0001, "1"), (1e12, "9999999999")])
def test_timeouts_are_formatted_within_the_spec_range_and_parse_back(seconds, value):
    assert _protocol.format_timeout_ms(seconds) == value
    assert _protocol.parse_timeout_ms(value) == int(value) / 1000


@pytest.mark.parametrize("value", ["", "-1", "1.5", "12345678901", "\u0661"])
def test_a_malformed_timeout_is_invalid_argument(value):
    with pytest.raises(ConnectError) as e:
        _protocol.parse_timeout_ms(value)

    assert e.value.code is Code.INVALID_ARGUMENT


# --- unary GET (spec: "Unary-Get-Request") --------------------------------------------------


@pytest.mark.parametrize("codec", ["proto", "json"])
def test_a_get_query_round_trips_its_message(codec):
    data = _protocol.CODECS[codec].encode(DETAIL)

    query = parse_qs(_protocol.get_query(codec, data))

    assert _protocol.get_codec(query) == codec
    assert _protocol.get_payload(query, 1024) == data


def test_a_get_query_of_another_protocol_version_is_invalid_argument():
    with pytest.raises(ConnectError) as e:
        _protocol.get_payload(parse_qs("encoding=json&connect=v2&message={}"), 1024)

    assert e.value.code is Code.INVALID_ARGUMENT
