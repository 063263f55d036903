"""errors.py on its own: the code table, error details, and the JSON error object."""

from __future__ import annotations

import base64

import pytest

from connectplugin import Code, ConnectError, ErrorDetail
from samples.kv.gen.kv.v1 import kv_pb2

# The sixteen codes of the spec's "Error Codes" table, by wire name.
SPEC_CODES = [
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
]

DETAIL = kv_pb2.PutRequest(key="why", value=b"\x01")  # 8 bytes on the wire: base64 needs one "="
DETAIL_B64 = base64.b64encode(DETAIL.SerializeToString()).decode()


# --- codes ----------------------------------------------------------------------------------


def test_there_are_exactly_the_sixteen_spec_codes():
    assert sorted(c.value for c in Code) == sorted(SPEC_CODES)


@pytest.mark.parametrize("name", SPEC_CODES)
def test_parse_finds_each_code_by_wire_name(name):
    assert Code.parse(name).value == name


@pytest.mark.parametrize(
    "name", ["foobar", "", "NOT_FOUND", "Not_Found", "5", None, 5, ["not_found"]]
)
def test_parse_of_anything_else_is_unknown(name):
    assert Code.parse(name) is Code.UNKNOWN


def test_str_of_a_code_is_its_wire_name():
    assert str(Code.DEADLINE_EXCEEDED) == "deadline_exceeded"
    assert f"{Code.NOT_FOUND}" == "not_found"


@pytest.mark.parametrize(
    "status, name",
    [
        (400, "internal"),
        (401, "unauthenticated"),
        (403, "permission_denied"),
        (404, "unimplemented"),
        (429, "unavailable"),
        (502, "unavailable"),
        (503, "unavailable"),
        (504, "unavailable"),
        (200, "unknown"),
        (405, "unknown"),
        (409, "unknown"),
        (500, "unknown"),
        (501, "unknown"),
    ],
)
def test_from_http_status_follows_the_spec_client_table(status, name):
    assert Code.from_http_status(status).value == name


# --- error details --------------------------------------------------------------------------


def test_pack_records_the_full_type_name_and_bytes():
    detail = ErrorDetail.pack(DETAIL)

    assert detail.type == "kv.v1.PutRequest"
    assert detail.value == DETAIL.SerializeToString()


def test_unpack_returns_the_packed_message():
    assert ErrorDetail.pack(DETAIL).unpack(kv_pb2.PutRequest) == DETAIL


def test_unpack_as_another_type_is_none():
    assert ErrorDetail.pack(DETAIL).unpack(kv_pb2.GetRequest) is None


def test_detail_json_value_is_unpadded_base64():
    wire = ErrorDetail.pack(DETAIL).to_json()

    assert wire == {"type": "kv.v1.PutRequest", "value": DETAIL_B64.rstrip("=")}
    assert DETAIL_B64.endswith("=")  # so the assertion above really tests the stripping


@pytest.mark.parametrize("value", [DETAIL_B64, DETAIL_B64.rstrip("=")], ids=["padded", "unpadded"])
def test_detail_from_json_accepts_padded_and_unpadded_base64(value):
    detail = ErrorDetail.from_json({"type": "kv.v1.PutRequest", "value": value})

    assert detail.unpack(kv_pb2.PutRequest) == DETAIL


def test_detail_debug_survives_the_round_trip_but_is_not_required():
    wire = {"type": "kv.v1.PutRequest", "value": DETAIL_B64, "debug": {"key": "why"}}

    detail = ErrorDetail.from_json(wire)

    assert detail.debug == {"key": "why"}
    assert detail.to_json()["debug"] == {"key": "why"}
    assert "debug" not in ErrorDetail.pack(DETAIL).to_json()


def test_detail_from_json_ignores_unknown_properties():
    detail = ErrorDetail.from_json(
        {"type": "kv.v1.PutRequest", "value": DETAIL_B64, "frob": "nitz"}
    )

    assert detail.unpack(kv_pb2.PutRequest) == DETAIL


# --- ConnectError ---------------------------------------------------------------------------


def test_connect_error_packs_message_details():
    error = ConnectError(Code.ABORTED, "retry", [DETAIL])

    assert error.details == [ErrorDetail.pack(DETAIL)]


def test_connect_error_to_json_has_code_message_and_details():
    error = ConnectError(Code.ABORTED, "retry", [DETAIL])

    assert error.to_json() == {
        "code": "aborted",
        "message": "retry",
        "details": [{"type": "kv.v1.PutRequest", "value": DETAIL_B64.rstrip("=")}],
    }


def test_connect_error_to_json_omits_empty_message_and_details():
    assert ConnectError(Code.UNAVAILABLE).to_json() == {"code": "unavailable"}


def test_connect_error_from_json_round_trips():
    original = ConnectError(Code.OUT_OF_RANGE, "past the end", [DETAIL])

    error = ConnectError.from_json(original.to_json(), Code.UNKNOWN, {"x-a": "1"})

    assert (error.code, error.message, error.details) == (
        original.code,
        original.message,
        original.details,
    )
    assert error.metadata == {"x-a": "1"}


def test_connect_error_from_json_without_a_code_uses_the_fallback():
    assert (
        ConnectError.from_json({"message": "oops"}, Code.UNAUTHENTICATED).code
        is Code.UNAUTHENTICATED
    )


@pytest.mark.parametrize("obj", [None, [], "unavailable", 14])
def test_connect_error_from_json_of_a_non_object_uses_the_fallback(obj):
    assert ConnectError.from_json(obj, Code.PERMISSION_DENIED).code is Code.PERMISSION_DENIED


@pytest.mark.parametrize(
    "obj",
    [{"code": None, "message": "oops"}, {"code": "foobar", "message": "oops"}],
    ids=["null-code", "unrecognised-code"],
)
def test_connect_error_from_json_with_an_unusable_code_uses_the_fallback(obj):
    assert ConnectError.from_json(obj, Code.UNAVAILABLE).code is Code.UNAVAILABLE


def test_connect_error_str_and_repr_name_code_and_message():
    error = ConnectError(Code.NOT_FOUND, "no key a")

    assert str(error) == "not_found: no key a"
    assert repr(error) == "ConnectError('not_found', 'no key a')"
    assert str(ConnectError(Code.NOT_FOUND)) == "not_found"


def test_connect_error_metadata_is_a_copy():
    given = {"x-a": "1"}
    error = ConnectError(Code.INTERNAL, metadata=given)
    given["x-b"] = "2"

    assert error.metadata == {"x-a": "1"}
