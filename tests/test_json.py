"""The proto3 JSON fast path (``connectplugin.rpc._json``) against ``google.protobuf.json_format``.

``_json.to_dict`` must give what ``json_format.MessageToDict(m)`` gives, and ``_json.from_dict``
must accept and reject what ``json_format.ParseDict(obj, m, ignore_unknown_fields=True)`` does,
for every message shape it handles itself; everything else it hands to json_format.

The test messages live in ``tests/protos/jsontest/v1/`` and are compiled with grpc_tools' protoc
once per module. Random messages come from a seeded ``random.Random``, so a failure replays.

Messages are compared by their deterministic wire bytes, not with ``==``: NaN != NaN, so two
messages holding the same NaN double never compare equal, while their bytes do (every NaN here
is Python's canonical ``float("nan")``, which is also what "NaN" decodes to). Bytes also tell
-0.0 from 0.0, which ``==`` would not.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` pin the correct behaviour where the fast
path (or the codec around it) is wrong today; when a bug is fixed, its test starts passing and
strict mode makes it fail until the marker is removed.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import random
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from connectplugin.rpc import _json
from connectplugin.rpc._protocol import JsonCodec
from connectplugin.rpc.errors import Code, ConnectError

PROTOS = Path(__file__).resolve().parent / "protos"
PROTO_FILES = ("jsontest/v1/jsontest.proto", "jsontest/v1/jsontest_proto2.proto")
SEED = 20240611

_F = FieldDescriptor


# --- the compiled test protos ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory):
    """``jsontest_pb2``, freshly compiled from ``tests/protos`` into a temporary directory."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    out = tmp_path_factory.mktemp("jsontest_gen")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--proto_path={Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out}",
            *(str(PROTOS / name) for name in PROTO_FILES),
        ]
    )
    assert status == 0, "protoc failed on the test protos"
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("jsontest.v1.jsontest_pb2")
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def p2(pb):
    """The proto2 test file: extensions and closed enums."""
    return importlib.import_module("jsontest.v1.jsontest_proto2_pb2")


# --- helpers ---------------------------------------------------------------------------------


def wire(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


def assert_same(actual: Message, expected: Message) -> None:
    """Equal as messages, NaN included (see the module docstring)."""
    assert type(actual) is type(expected)
    if wire(actual) != wire(expected):
        # Fall back on the readable forms only to produce a useful failure message.
        assert json_format.MessageToDict(actual) == json_format.MessageToDict(expected)
        assert wire(actual) == wire(expected)


def ours_decode(obj: Any, message_type: type[Message]) -> Message:
    message = message_type()
    _json.from_dict(obj, message)
    return message


def theirs_decode(obj: Any, message_type: type[Message]) -> Message:
    message = message_type()
    json_format.ParseDict(obj, message, ignore_unknown_fields=True)
    return message


def as_text(obj: Any) -> str:
    """JSON text: stricter than ``==``, which takes 1 == 1.0 == True and -0.0 == 0.0."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def deep_tree_json(levels: int) -> dict[str, Any]:
    """A Tree with ``levels`` messages nested under the top one (levels + 1 in all)."""
    top: dict[str, Any] = {}
    node = top
    for _ in range(levels):
        node["left"] = {}
        node = node["left"]
    return top


def deep_tree_message(pb, levels: int) -> Message:
    top = pb.Tree()
    node = top
    for _ in range(levels):
        node = node.left
        node.SetInParent()
    return top


# --- random messages -------------------------------------------------------------------------

_INT_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1),
    _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}
_DOUBLES = [
    0.0, -0.0, 1.0, -1.5, 0.1, 1e-7, 123456789.125, 2.0**53, 2.0**53 + 2, 1e21, 1e308,
    -1e308, 5e-324, 2.2250738585072014e-308, math.pi, float("nan"), float("inf"), float("-inf"),
]  # fmt: skip
# Not the largest float32: json_format writes it as 3.4028235e38, which its own parser then
# rejects as out of range (a json_format round-trip problem the fallback path inherits).
_FLOATS32 = [0.0, -0.0, 0.1, 1.5, -2.75, 3.4e38, 1e-45, 1.17549435e-38, 16777217.0,
             float("nan"), float("inf"), float("-inf")]  # fmt: skip
_TEXT = ["a", "Z", "0", " ", "_", "ü", "é", "e\u0301", "日本", "😀", "\U0010ffff", "\u2028", "\ufeff",
         "\x00", "\n", "\t", '"', "\\", "/", "</script>", "\x7f"]  # fmt: skip
_UNKNOWN_ENUM_NUMBERS = [4, 7, 100, -1, 2**31 - 1, -(2**31)]


def random_int(rng: random.Random, field_type: int) -> int:
    low, high = _INT_RANGES[field_type]
    pick = rng.random()
    if pick < 0.25:
        return rng.choice([low, high, 0, 1, low + 1, high - 1, 2**31 - 1 if high > 2**31 else high])
    if pick < 0.5:
        return max(low, min(high, rng.randint(-1000, 1000)))
    return rng.randint(low, high)


def random_float32(rng: random.Random) -> float:
    value = rng.choice(_FLOATS32) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
    return value if not math.isfinite(value) else struct.unpack("<f", struct.pack("<f", value))[0]


def random_scalar(rng: random.Random, field: FieldDescriptor) -> Any:
    t = field.type
    if t in _INT_RANGES:
        return random_int(rng, t)
    if t == _F.TYPE_DOUBLE:
        return rng.choice(_DOUBLES) if rng.random() < 0.6 else rng.uniform(-1e9, 1e9)
    if t == _F.TYPE_FLOAT:
        return random_float32(rng)
    if t == _F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == _F.TYPE_STRING:
        return "".join(rng.choice(_TEXT) for _ in range(rng.randrange(0, 6)))
    if t == _F.TYPE_BYTES:  # lengths 0..11 cover every amount of base64 padding
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 12)))
    if t == _F.TYPE_ENUM:
        if field.enum_type.is_closed or rng.random() < 0.8:
            return rng.choice(field.enum_type.values).number
        return rng.choice(_UNKNOWN_ENUM_NUMBERS)
    raise AssertionError(f"no random value for {field.full_name}")


def fill(message: Message, rng: random.Random, depth: int = 0, density: float = 0.5) -> Message:
    """Set a random subset of the fields; several oneof members may be set, the last one wins."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        message.seconds = rng.randint(-62135596800, 253402300799)
        message.nanos = rng.choice([0, rng.randrange(10**9), 1000, 1_000_000])
        return message
    fields = list(message.DESCRIPTOR.fields)
    rng.shuffle(fields)
    for field in fields:
        if rng.random() > density:
            continue
        count = rng.randrange(0, 4) if depth < 3 else rng.randrange(0, 2)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            target = getattr(message, field.name)
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            for _ in range(count):
                key = random_scalar(rng, key_field)
                if value_field.type == _F.TYPE_MESSAGE:
                    fill(target[key], rng, depth + 1, density * 0.6)
                else:
                    target[key] = random_scalar(rng, value_field)
        elif field.is_repeated:
            target = getattr(message, field.name)
            for _ in range(count):
                if field.type == _F.TYPE_MESSAGE:
                    fill(target.add(), rng, depth + 1, density * 0.6)
                else:
                    target.append(random_scalar(rng, field))
        elif field.type == _F.TYPE_MESSAGE:
            if depth < 4:
                sub = getattr(message, field.name)
                sub.SetInParent()  # an empty sub-message is present too: "{}"
                fill(sub, rng, depth + 1, density * 0.6)
        else:
            setattr(message, field.name, random_scalar(rng, field))
    return message


def random_messages(pb, name: str, count: int, seed_offset: int = 0) -> list[Message]:
    rng = random.Random(SEED + seed_offset)
    cls = getattr(pb, name)
    return [fill(cls(), rng, density=rng.choice([0.15, 0.4, 0.8])) for _ in range(count)]


FAST = ("Everything", "Tree", "Leaf")
FALLBACK = ("Floaty", "HoldsFloaty", "Timed")


@pytest.fixture(scope="module")
def corpus(pb) -> list[Message]:
    """A few hundred random messages of every test type (except the mutual-recursion pairs)."""
    sizes = {"Everything": 220, "Tree": 50, "Leaf": 20, "Floaty": 40, "HoldsFloaty": 20, "Timed": 30}
    out: list[Message] = []
    for offset, (name, count) in enumerate(sizes.items()):
        out += random_messages(pb, name, count, offset)
    # Fixed edge cases next to the random ones.
    e = pb.Everything
    out += [
        e(),
        e(f_int32=-(2**31), f_sint32=-(2**31), f_sfixed32=-(2**31), f_uint32=2**32 - 1,
          f_fixed32=2**32 - 1, f_int64=-(2**63), f_sint64=-(2**63), f_sfixed64=-(2**63),
          f_uint64=2**64 - 1, f_fixed64=2**64 - 1),
        e(f_int32=2**31 - 1, f_sint32=2**31 - 1, f_sfixed32=2**31 - 1, f_int64=2**63 - 1,
          f_sint64=2**63 - 1, f_sfixed64=2**63 - 1),
        e(r_double=[float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 5e-324]),
        e(f_double=float("nan")), e(f_double=float("-inf")), e(f_double=-0.0),
        e(f_enum=7, r_enum=[0, 5, -3], m_int32_enum={1: 9, -2: 2}, c_enum=-(2**31)),
        e(o_int32=0, o_int64=0, o_uint64=0, o_double=0.0, o_bool=False, o_string="",
          o_bytes=b"", o_enum=0),
        e(c_string=""), e(c_int64=0), e(c_bool=False), e(c_bytes=b""), e(c_enum=0),
        e(f_string="ünïcödé 日本語 😀 \U0010ffff \x00 \u2028", f_bytes=bytes(range(256))),
        e(m_bool_bytes={True: b"\xff", False: b""}, m_uint64_double={2**64 - 1: float("nan")},
          m_int64_int64={-(2**63): 2**63 - 1}, m_fixed64_string={0: ""}, m_sint32_bool={-1: False}),
    ]  # fmt: skip
    out[-1].c_leaf.SetInParent()
    out[-1].o_leaf.SetInParent()
    out[-1].m_string_leaf["empty"].SetInParent()
    out[-1].m_int64_leaf[0].id = 0
    return out


# --- the fixture proto is what the tests assume ----------------------------------------------


def test_test_messages_take_the_intended_path(pb):
    """Fast-path types must really be fast-path, or the comparisons below prove nothing."""
    for name in FAST:
        assert _json.is_simple(getattr(pb, name).DESCRIPTOR), name
    for name in FALLBACK:
        assert not _json.is_simple(getattr(pb, name).DESCRIPTOR), name
    kinds = {f.type for f in pb.Everything.DESCRIPTOR.fields}
    assert set(_INT_RANGES) | {_F.TYPE_DOUBLE, _F.TYPE_BOOL, _F.TYPE_STRING, _F.TYPE_BYTES,
                               _F.TYPE_ENUM, _F.TYPE_MESSAGE} <= kinds  # fmt: skip


# --- 1. encoding -----------------------------------------------------------------------------


def test_corpus_covers_every_field(pb, corpus):
    seen = {f.name for m in corpus if isinstance(m, pb.Everything) for f, _ in m.ListFields()}
    assert seen == {f.name for f in pb.Everything.DESCRIPTOR.fields}


def test_encoding_matches_json_format(corpus):
    # No encoding difference permitted by the spec (key order, 1 vs 1.0, exponent forms...)
    # shows up today, so the comparison is exact, as JSON text and as Python values.
    for message in corpus:
        ours, theirs = _json.to_dict(message), json_format.MessageToDict(message)
        assert ours == theirs, message
        assert as_text(ours) == as_text(theirs), message


def test_encoding_fixed_forms(pb):
    m = pb.Everything(
        f_int64=-(2**63), f_uint64=2**64 - 1, f_uint32=2**32 - 1, f_double=float("nan"),
        r_double=[float("inf"), float("-inf"), 1.0], f_bytes=b"\xfb\xff", f_enum=2,
        r_enum=[1, 42], m_bool_bytes={True: b"a"}, m_int64_int64={-1: 5}, o_int32=0, c_string="",
    )  # fmt: skip
    m.f_leaf.SetInParent()
    assert _json.to_dict(m) == {
        "fUint32": 4294967295,
        "fInt64": "-9223372036854775808",
        "fUint64": "18446744073709551615",
        "fDouble": "NaN",
        "fBytes": "+/8=",
        "fEnum": "COLOR_GREEN",
        "fLeaf": {},
        "rDouble": ["Infinity", "-Infinity", 1.0],
        "rEnum": ["COLOR_RED", 42],
        "mBoolBytes": {"true": "YQ=="},
        "mInt64Int64": {"-1": "5"},
        "oInt32": 0,
        "cString": "",
    }


def test_encoding_of_fallback_types(pb, p2):
    f = pb.Floaty(f_float=0.1, r_float=[3.4028234663852886e38, float("nan")], f_double=0.1)
    assert _json.to_dict(f) == {
        "fFloat": 0.1,  # shortest float32 form, not 0.10000000149011612
        "rFloat": [3.4028235e38, "NaN"],
        "fDouble": 0.1,
    }
    t = pb.Timed(name="x")
    t.at.seconds = 5
    assert _json.to_dict(t) == {"at": "1970-01-01T00:00:05Z", "name": "x"}
    h = pb.HoldsFloaty(id=1)
    h.inner.f_float = 1.5
    assert _json.to_dict(h) == json_format.MessageToDict(h) == {"inner": {"fFloat": 1.5}, "id": 1}
    ext = p2.Extendable(id=3)
    ext.Extensions[p2.note] = "hi"
    ext.Extensions[p2.tags].extend([1, -(2**63)])
    holder = p2.HoldsExtendable()
    holder.inner.CopyFrom(ext)
    for message in (ext, holder):
        assert _json.to_dict(message) == json_format.MessageToDict(message)
    assert _json.to_dict(ext) == {
        "id": 3,
        "[jsontest.v1.note]": "hi",
        "[jsontest.v1.tags]": ["1", "-9223372036854775808"],
    }


# --- 2. decoding -----------------------------------------------------------------------------


def test_decoding_inverts_encoding(corpus):
    for message in corpus:
        for obj in (
            json_format.MessageToDict(message),
            json_format.MessageToDict(message, preserving_proto_field_name=True),
            json.loads(json.dumps(json_format.MessageToDict(message))),
        ):
            assert_same(ours_decode(obj, type(message)), message)


def _loosen(obj: Any, descriptor: Descriptor, rng: random.Random) -> Any:
    """Rewrite JSON from MessageToDict into other spellings the spec says parsers accept.

    Per field, at random: the proto name instead of the JSON name; ints as strings, as
    integral floats or in exponent form; int64 as JSON numbers; doubles as strings or ints;
    bytes as URL-safe and/or unpadded base64; enums as numbers. Unknown fields and nulls for
    absent fields are added. The result must decode to the same message.
    """
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    by_json = {f.json_name: f for f in descriptor.fields}
    for key, value in obj.items():
        field = by_json[key]
        name = field.name if rng.random() < 0.3 else key
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            out[name] = {k: _loosen_value(v, value_field, rng) for k, v in value.items()}
        elif field.is_repeated:
            out[name] = [_loosen_value(v, field, rng) for v in value]
        else:
            out[name] = _loosen_value(value, field, rng)
    if rng.random() < 0.3:
        out["zzUnknownField"] = rng.choice([None, 1, "x", [1, {"a": None}], {"fInt32": "bad"}])
    absent = [f for f in descriptor.fields if f.json_name not in obj and f.containing_oneof is None]
    if absent and rng.random() < 0.3:
        out[rng.choice(absent).json_name] = None  # null means the default
    return out


def _loosen_value(value: Any, field: FieldDescriptor, rng: random.Random) -> Any:
    t = field.type
    if t == _F.TYPE_MESSAGE:
        return _loosen(value, field.message_type, rng)
    pick = rng.random()
    if t in _INT_RANGES:
        number = int(value)
        if pick < 0.25:
            return str(number)
        if pick < 0.5 and abs(number) <= 2**53:
            return float(number)
        if pick < 0.6 and abs(number) < 10**6 and number % 10 == 0 and number:
            return f"{number // 10}e1"
        return number
    if t == _F.TYPE_DOUBLE and isinstance(value, float):
        if pick < 0.3:
            return repr(value)
        if pick < 0.5 and value.is_integer() and abs(value) <= 2**53 and math.copysign(1, value) > 0:
            return int(value)
        return value
    if t == _F.TYPE_BYTES:
        raw = base64.b64decode(value)
        if pick < 0.25:
            return base64.urlsafe_b64encode(raw).decode()
        if pick < 0.5:
            return base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if pick < 0.75:
            return value.rstrip("=")
        return value
    if t == _F.TYPE_ENUM and isinstance(value, str) and pick < 0.4:
        return field.enum_type.values_by_name[value].number
    return value


def test_decoding_accepts_every_spelling_like_json_format(pb, corpus):
    rng = random.Random(SEED + 99)
    for message in corpus:
        if type(message).__name__ not in FAST:
            continue
        obj = _loosen(json_format.MessageToDict(message), message.DESCRIPTOR, rng)
        assert_same(theirs_decode(obj, type(message)), message)
        assert_same(ours_decode(obj, type(message)), message)


def _everything(pb, **fields: Any) -> Callable[[], Message]:
    return lambda: pb.Everything(**fields)


def _with(build: Callable[[Any], Message]) -> Callable[[Any], Callable[[], Message]]:
    return lambda pb: lambda: build(pb)


def _leaf_in(attribute: str, **leaf: Any) -> Callable[[Any], Callable[[], Message]]:
    def build(pb):
        m = pb.Everything()
        getattr(m, attribute).CopyFrom(pb.Leaf(**leaf))
        return m

    return _with(build)


# (JSON input, expected message built from the pb module). Each must be accepted by both.
ACCEPTED: list[tuple[str, Any, Callable[[Any], Callable[[], Message]]]] = [
    # ints as strings, integral floats and exponent forms; extremes as numbers and strings
    ("int32 string", {"fInt32": "42"}, lambda pb: _everything(pb, f_int32=42)),
    ("int32 float", {"fInt32": 42.0}, lambda pb: _everything(pb, f_int32=42)),
    ("int32 exp string", {"fInt32": "4.2e1"}, lambda pb: _everything(pb, f_int32=42)),
    ("int32 exp float", {"fInt32": 1e9}, lambda pb: _everything(pb, f_int32=10**9)),
    ("int32 -0", {"fInt32": "-0"}, lambda pb: _everything(pb)),
    ("sint32 min string", {"fSint32": "-2147483648"}, lambda pb: _everything(pb, f_sint32=-(2**31))),
    ("sfixed32 min", {"fSfixed32": -(2**31)}, lambda pb: _everything(pb, f_sfixed32=-(2**31))),
    ("uint32 max float", {"fUint32": 4294967295.0}, lambda pb: _everything(pb, f_uint32=2**32 - 1)),
    ("fixed32 max", {"fFixed32": "4294967295"}, lambda pb: _everything(pb, f_fixed32=2**32 - 1)),
    ("int64 number", {"fInt64": 42}, lambda pb: _everything(pb, f_int64=42)),
    ("int64 max", {"fInt64": "9223372036854775807"}, lambda pb: _everything(pb, f_int64=2**63 - 1)),
    ("int64 min number", {"fInt64": -(2**63)}, lambda pb: _everything(pb, f_int64=-(2**63))),
    ("sint64 min", {"fSint64": "-9223372036854775808"}, lambda pb: _everything(pb, f_sint64=-(2**63))),
    ("sfixed64 exp", {"fSfixed64": "-1e18"}, lambda pb: _everything(pb, f_sfixed64=-(10**18))),
    ("uint64 max", {"fUint64": "18446744073709551615"}, lambda pb: _everything(pb, f_uint64=2**64 - 1)),
    ("uint64 float", {"fUint64": 1e19}, lambda pb: _everything(pb, f_uint64=10**19)),
    ("fixed64 max", {"fFixed64": 2**64 - 1}, lambda pb: _everything(pb, f_fixed64=2**64 - 1)),
    # doubles
    ("double int", {"fDouble": 1}, lambda pb: _everything(pb, f_double=1.0)),
    ("double string", {"fDouble": "1.5"}, lambda pb: _everything(pb, f_double=1.5)),
    ("double exp string", {"fDouble": "-2.5e-3"}, lambda pb: _everything(pb, f_double=-2.5e-3)),
    ("double NaN", {"fDouble": "NaN"}, lambda pb: _everything(pb, f_double=float("nan"))),
    ("double Infinity", {"fDouble": "Infinity"}, lambda pb: _everything(pb, f_double=float("inf"))),
    ("double -Infinity", {"fDouble": "-Infinity"}, lambda pb: _everything(pb, f_double=float("-inf"))),
    ("double -0", {"fDouble": -0.0}, lambda pb: _everything(pb, f_double=-0.0)),
    ("double tiny", {"fDouble": 5e-324}, lambda pb: _everything(pb, f_double=5e-324)),
    ("repeated double forms", {"rDouble": [1, "2", 3.5, "NaN"]},
     lambda pb: _everything(pb, r_double=[1.0, 2.0, 3.5, float("nan")])),  # fmt: skip
    # bytes: standard or URL-safe alphabet, with or without padding
    ("bytes std", {"fBytes": "+/+/"}, lambda pb: _everything(pb, f_bytes=b"\xfb\xff\xbf")),
    ("bytes url", {"fBytes": "-_-_"}, lambda pb: _everything(pb, f_bytes=b"\xfb\xff\xbf")),
    ("bytes std padded", {"fBytes": "/w=="}, lambda pb: _everything(pb, f_bytes=b"\xff")),
    ("bytes std unpadded", {"fBytes": "/w"}, lambda pb: _everything(pb, f_bytes=b"\xff")),
    ("bytes url padded", {"fBytes": "_w=="}, lambda pb: _everything(pb, f_bytes=b"\xff")),
    ("bytes url unpadded", {"fBytes": "_w"}, lambda pb: _everything(pb, f_bytes=b"\xff")),
    ("bytes one pad", {"fBytes": "--8="}, lambda pb: _everything(pb, f_bytes=b"\xfb\xef")),
    ("bytes one pad dropped", {"fBytes": "++8"}, lambda pb: _everything(pb, f_bytes=b"\xfb\xef")),
    ("bytes empty", {"fBytes": ""}, lambda pb: _everything(pb)),
    ("repeated bytes mixed", {"rBytes": ["YQ", "YQ==", "_w", "+/8="]},
     lambda pb: _everything(pb, r_bytes=[b"a", b"a", b"\xff", b"\xfb\xff"])),  # fmt: skip
    ("map bytes value", {"mBoolBytes": {"true": "-_8", "false": ""}},
     lambda pb: _everything(pb, m_bool_bytes={True: b"\xfb\xff", False: b""})),  # fmt: skip
    # enums: names, known and unknown numbers; unknown names are skipped like unknown fields
    ("enum name", {"fEnum": "COLOR_BLUE"}, lambda pb: _everything(pb, f_enum=3)),
    ("enum number", {"fEnum": 2}, lambda pb: _everything(pb, f_enum=2)),
    ("enum unknown number", {"fEnum": 99}, lambda pb: _everything(pb, f_enum=99)),
    ("enum negative number", {"fEnum": -(2**31)}, lambda pb: _everything(pb, f_enum=-(2**31))),
    ("enum unknown name", {"fEnum": "COLOR_PINK"}, lambda pb: _everything(pb)),
    ("enum unknown name in list", {"rEnum": ["COLOR_RED", "COLOR_PINK", 7]},
     lambda pb: _everything(pb, r_enum=[1, 7])),  # fmt: skip
    ("enum unknown name in map", {"mInt32Enum": {"1": "COLOR_PINK", "2": "COLOR_RED"}},
     lambda pb: _everything(pb, m_int32_enum={2: 1})),  # fmt: skip
    ("optional enum unknown name", {"oEnum": "COLOR_PINK"}, lambda pb: _everything(pb)),
    ("oneof enum unknown name", {"cEnum": "COLOR_PINK"}, lambda pb: _everything(pb)),
    ("enum name case matters", {"fEnum": "color_red"}, lambda pb: _everything(pb)),
    # null means the default, for every kind of field
    ("nulls", {k: None for k in ("fInt32", "fInt64", "fDouble", "fBool", "fString", "fBytes",
                                 "fEnum", "fLeaf", "rInt32", "rLeaf", "mStringString",
                                 "mStringLeaf", "oInt32", "oLeaf", "cString", "cLeaf", "fTree")},
     lambda pb: _everything(pb)),  # fmt: skip
    ("null in oneof next to a value", {"cString": "x", "cInt64": None, "cLeaf": None},
     lambda pb: _everything(pb, c_string="x")),  # fmt: skip
    # proto3 optional and oneof members set to their defaults are present
    ("optional defaults", {"oInt32": 0, "oString": "", "oBool": False, "oEnum": "COLOR_UNSPECIFIED",
                           "oBytes": "", "oDouble": 0, "oInt64": "0", "oUint64": 0},
     lambda pb: _everything(pb, o_int32=0, o_string="", o_bool=False, o_enum=0, o_bytes=b"",
                            o_double=0.0, o_int64=0, o_uint64=0)),  # fmt: skip
    ("oneof default", {"cInt64": "0"}, lambda pb: _everything(pb, c_int64=0)),
    ("empty message is present", {"oLeaf": {}}, _leaf_in("o_leaf")),
    ("empty oneof message", {"cLeaf": {}}, _leaf_in("c_leaf")),
    # names: JSON name or proto name, at any depth; unknown fields ignored whatever their value
    ("proto names", {"f_int32": 1, "f_leaf": {"id": 2}, "c_string": "x"},
     lambda pb: lambda: pb.Everything(f_int32=1, f_leaf=pb.Leaf(id=2), c_string="x")),  # fmt: skip
    ("unknown fields", {"nope": 1, "alsoNope": {"x": [1, None]}, "fLeaf": {"zz": [{}]}, "fInt32": 3},
     lambda pb: lambda: pb.Everything(f_int32=3, f_leaf=pb.Leaf())),  # fmt: skip
    ("json name is case sensitive", {"FInt32": 5, "fint32": 6, "F_INT32": 7}, lambda pb: _everything(pb)),
    # map keys of every kind, written as JSON strings
    ("map keys", {"mInt32Enum": {"-2147483648": 1, "2147483647": "COLOR_BLUE"},
                  "mUint64Double": {"18446744073709551615": "NaN", "0": 1},
                  "mSint32Bool": {"-1": True}, "mFixed64String": {"0": ""},
                  "mInt64Int64": {"-9223372036854775808": "9223372036854775807"},
                  "mUint32Uint32": {"4294967295": 4294967295.0}, "mStringString": {"": "", "ü": "😀"}},
     lambda pb: _everything(pb, m_int32_enum={-(2**31): 1, 2**31 - 1: 3},
                            m_uint64_double={2**64 - 1: float("nan"), 0: 1.0}, m_sint32_bool={-1: True},
                            m_fixed64_string={0: ""}, m_int64_int64={-(2**63): 2**63 - 1},
                            m_uint32_uint32={2**32 - 1: 2**32 - 1}, m_string_string={"": "", "ü": "😀"})),  # fmt: skip
    ("map message values", {"mStringLeaf": {"a": {}, "b": {"id": "7"}}, "mInt64Leaf": {"-1": {"label": "x"}}},
     lambda pb: lambda: pb.Everything(m_string_leaf={"a": pb.Leaf(), "b": pb.Leaf(id=7)},
                                      m_int64_leaf={-1: pb.Leaf(label="x")})),  # fmt: skip
    ("recursion", {"fTree": {"left": {"left": {"value": "1"}}, "children": [{}, {"named": {"k": {"value": 2}}}]}},
     lambda pb: lambda: pb.Everything(f_tree=pb.Tree(
         left=pb.Tree(left=pb.Tree(value=1)),
         children=[pb.Tree(), pb.Tree(named={"k": pb.Tree(value=2)})]))),  # fmt: skip
    ("strings", {"fString": "ü 日本 😀 \u0000 \u2028", "rString": ["", "\"\\"]},
     lambda pb: _everything(pb, f_string="ü 日本 😀 \u0000 \u2028", r_string=["", "\"\\"])),  # fmt: skip
    ("nesting up to json_format's limit", {"fTree": deep_tree_json(98)},
     lambda pb: lambda: pb.Everything(f_tree=deep_tree_message(pb, 98))),  # fmt: skip
]


@pytest.mark.parametrize(("obj", "expected"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_decoding_accepts_like_json_format(pb, obj, expected):
    want = expected(pb)()
    assert_same(theirs_decode(obj, pb.Everything), want)
    assert_same(ours_decode(obj, pb.Everything), want)


def test_decoding_presence(pb):
    m = ours_decode({"oInt32": 0, "cBool": False, "fLeaf": {}, "fInt32": 0}, pb.Everything)
    assert m.HasField("o_int32") and m.HasField("c_bool") and m.HasField("f_leaf")
    assert m.WhichOneof("choice") == "c_bool"
    m = ours_decode({"oInt32": None, "cEnum": "COLOR_PINK", "oLeaf": None}, pb.Everything)
    assert not m.HasField("o_int32") and not m.HasField("o_leaf")
    assert m.WhichOneof("choice") is None


# (message type name, JSON input): both implementations must reject each one.
REJECTED: list[tuple[str, str, Any]] = [
    # wrong JSON types
    ("bool from string", "Everything", {"fBool": "true"}),
    ("bool from number", "Everything", {"fBool": 1}),
    ("bool from list", "Everything", {"fBool": [True]}),
    ("string from number", "Everything", {"fString": 1}),
    ("string from bool", "Everything", {"fString": True}),
    ("string from list", "Everything", {"fString": ["a"]}),
    ("string from object", "Everything", {"fString": {}}),
    ("int from bool", "Everything", {"fInt32": True}),
    ("int64 from bool", "Everything", {"fInt64": False}),
    ("int from list", "Everything", {"fInt32": [1]}),
    ("int from object", "Everything", {"fInt64": {}}),
    ("double from list", "Everything", {"fDouble": [1.0]}),
    ("double from object", "Everything", {"fDouble": {}}),
    ("bytes from number", "Everything", {"fBytes": 1}),
    ("bytes from list", "Everything", {"fBytes": ["AA=="]}),
    ("enum from list", "Everything", {"fEnum": ["COLOR_RED"]}),
    ("enum from object", "Everything", {"fEnum": {}}),
    ("message from number", "Everything", {"fLeaf": 5}),
    ("message from bool", "Everything", {"fLeaf": True}),
    ("message from list of names", "Everything", {"fLeaf": ["id"]}),
    ("oneof message from number", "Everything", {"cLeaf": 1}),
    ("repeated from number", "Everything", {"rInt32": 1}),
    ("repeated from string", "Everything", {"rString": "abc"}),
    ("repeated from object", "Everything", {"rInt32": {"0": 1}}),
    ("repeated messages from object", "Everything", {"rLeaf": {}}),
    ("null in repeated scalars", "Everything", {"rInt32": [1, None]}),
    ("null in repeated messages", "Everything", {"rLeaf": [None]}),
    ("number in repeated messages", "Everything", {"rLeaf": [1]}),
    ("number in repeated strings", "Everything", {"rString": ["a", 1]}),
    ("list in repeated enums", "Everything", {"rEnum": [[]]}),
    ("map from list", "Everything", {"mStringString": []}),
    ("map from string", "Everything", {"mStringString": "x"}),
    ("map value wrong type", "Everything", {"mStringString": {"a": 1}}),
    ("map null scalar value", "Everything", {"mStringString": {"a": None}}),
    ("map null message value", "Everything", {"mStringLeaf": {"k": None}}),
    ("map number message value", "Everything", {"mStringLeaf": {"k": 1}}),
    ("map int64 value", "Everything", {"mInt64Int64": {"1": "x"}}),
    ("map int key not a number", "Everything", {"mInt32Enum": {"x": "COLOR_RED"}}),
    ("map int key out of range", "Everything", {"mInt32Enum": {"2147483648": 1}}),
    ("map uint64 key negative", "Everything", {"mUint64Double": {"-1": 1.0}}),
    ("map int key fractional", "Everything", {"mInt64Leaf": {"1.5": {}}}),
    ("map bool key capitalised", "Everything", {"mBoolBytes": {"True": ""}}),
    ("map bool key other", "Everything", {"mBoolBytes": {"1": ""}}),
    # integers out of range, for every integer type, as numbers, strings and floats
    ("int32 over", "Everything", {"fInt32": 2**31}),
    ("int32 under", "Everything", {"fInt32": -(2**31) - 1}),
    ("int32 over as float", "Everything", {"fInt32": 1e10}),
    ("sint32 over string", "Everything", {"fSint32": "2147483648"}),
    ("sfixed32 under", "Everything", {"fSfixed32": -2147483649}),
    ("uint32 negative", "Everything", {"fUint32": -1}),
    ("uint32 over", "Everything", {"fUint32": 2**32}),
    ("fixed32 over string", "Everything", {"fFixed32": "4294967296"}),
    ("int64 over", "Everything", {"fInt64": 2**63}),
    ("int64 over string", "Everything", {"fInt64": "9223372036854775808"}),
    ("int64 over as exp", "Everything", {"fInt64": "1e19"}),
    ("sint64 under string", "Everything", {"fSint64": "-9223372036854775809"}),
    ("sfixed64 over", "Everything", {"fSfixed64": 2**63}),
    ("uint64 negative", "Everything", {"fUint64": -1}),
    ("uint64 negative string", "Everything", {"fUint64": "-1"}),
    ("uint64 over string", "Everything", {"fUint64": "18446744073709551616"}),
    ("uint64 over as float", "Everything", {"fUint64": 1e20}),
    ("fixed64 over", "Everything", {"fFixed64": 2**64}),
    ("optional int over", "Everything", {"oInt32": 2**31}),
    ("repeated int over", "Everything", {"rInt32": [0, 2**31]}),
    ("repeated uint64 negative", "Everything", {"rUint64": ["-1"]}),
    ("map int value over", "Everything", {"mUint32Uint32": {"1": 2**32}}),
    ("nested int over", "Everything", {"fLeaf": {"id": 2**31}}),
    ("deep int over", "Everything", {"fTree": {"children": [{"named": {"a": {"value": "9223372036854775808"}}}]}}),
    # integers that are not integers
    ("int fractional", "Everything", {"fInt32": 1.5}),
    ("int fractional string", "Everything", {"fInt32": "1.5"}),
    ("int64 fractional string", "Everything", {"fInt64": "0.5"}),
    ("int garbage", "Everything", {"fInt64": "abc"}),
    ("int empty string", "Everything", {"fInt64": ""}),
    ("int hex", "Everything", {"fInt32": "0x10"}),
    ("int Infinity", "Everything", {"fInt32": "Infinity"}),
    ("int NaN", "Everything", {"fInt32": "NaN"}),
    ("int exp overflow", "Everything", {"fInt64": "1e400"}),
    ("uint64 fractional float", "Everything", {"fUint64": 0.5}),
    # doubles and bytes that do not parse
    ("double garbage", "Everything", {"fDouble": "abc"}),
    ("double empty string", "Everything", {"fDouble": ""}),
    ("double from null-ish", "Everything", {"fDouble": "null"}),
    ("bytes one char", "Everything", {"fBytes": "A"}),
    ("bytes one char padded", "Everything", {"fBytes": "A==="}),
    ("bytes five chars", "Everything", {"fBytes": "AAAAA"}),
    # strings Python's json module can produce but that are not valid Unicode
    ("lone surrogate", "Everything", {"fString": "\ud800"}),
    ("lone surrogate in list", "Everything", {"rString": ["ok", "\udfff"]}),
    # nested and recursive
    ("nested wrong type", "Everything", {"fLeaf": {"label": 5}}),
    ("recursive wrong type", "Everything", {"fTree": {"left": {"value": "x"}}}),
    ("recursive via map and list", "Tree", {"named": {"a": {"children": [5]}}}),
    # top level
    ("top level number", "Everything", 5),
    ("top level string of names", "Leaf", ["id"]),
]

# Inputs json_format rejects and we accept are known bugs: see the xfail tests at the end.


@pytest.mark.parametrize(("name", "obj"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_decoding_rejects_like_json_format(pb, name, obj):
    cls = getattr(pb, name)
    # json_format mostly raises ParseError; for a few shapes (a bare number where a message
    # belongs) it lets the TypeError of its own iteration escape. Either way it rejects.
    with pytest.raises((json_format.ParseError, TypeError)):
        theirs_decode(obj, cls)
    with pytest.raises(ValueError):
        ours_decode(obj, cls)


def test_decoding_rejects_closed_enum_unknown_number(p2):
    with pytest.raises(json_format.ParseError):
        theirs_decode({"closed": 5}, p2.Extendable)
    with pytest.raises(ValueError):
        ours_decode({"closed": 5}, p2.Extendable)
    assert ours_decode({"closed": "CLOSED_ONE", "id": "2"}, p2.Extendable) == p2.Extendable(
        closed=1, id=2
    )


# json_format accepts these, but only through quirks of its implementation: the proto3 JSON
# mapping does not allow them, so rejecting them is correct and we do not follow json_format.
STRICTER_THAN_JSON_FORMAT = [
    # It iterates over whatever it is given where an object belongs, so a string or a list
    # of unknown names reads as an object whose keys are all unknown fields.
    ("message from string", "Everything", {"fLeaf": "abc"}),
    ("message from empty list", "Everything", {"fLeaf": []}),
    ("top level empty list", "Everything", []),
    ("top level string", "Leaf", "abc"),
    # It decodes base64 without validation: characters outside the alphabet are dropped,
    # padding in the middle is skipped.
    ("bytes with spaces", "Everything", {"fBytes": "a b c d"}),
    ("bytes with non-ASCII", "Everything", {"fBytes": "é"}),
    ("bytes padding inside", "Everything", {"fBytes": "AA==AA=="}),
    ("bytes padding misplaced", "Everything", {"fBytes": "AA=A"}),
    # It calls float() on any non-float, and float(True) == 1.0.
    ("double from bool", "Everything", {"fDouble": True}),
    # It calls int() on any enum value that is not a known name.
    ("enum from bool", "Everything", {"fEnum": True}),
    ("enum from fractional number", "Everything", {"fEnum": 1.5}),
    # upb's values_by_number truncates to int32 (2**40 -> 0 -> COLOR_UNSPECIFIED), so
    # json_format silently stores 0; out of the int32 range is an error.
    ("enum number out of int32 range", "Everything", {"fEnum": 2**40}),
]


@pytest.mark.parametrize(
    ("name", "obj"), [s[1:] for s in STRICTER_THAN_JSON_FORMAT], ids=[s[0] for s in STRICTER_THAN_JSON_FORMAT]
)
def test_decoding_stricter_than_json_format_where_the_spec_allows(pb, name, obj):
    with pytest.raises(ValueError):
        ours_decode(obj, getattr(pb, name))


def test_decoding_fallback_types(pb, corpus):
    for message in corpus:
        if type(message).__name__ in FALLBACK:
            obj = json_format.MessageToDict(message)
            assert_same(ours_decode(obj, type(message)), message)
    # Fallback errors carry json_format's reason, as ValueError like the fast path's.
    with pytest.raises(ValueError, match="Float value too large"):
        ours_decode({"fFloat": 1e39}, pb.Floaty)
    with pytest.raises(ValueError):
        ours_decode({"at": "yesterday"}, pb.Timed)
    t = ours_decode({"at": "1970-01-01T00:00:05.5Z", "unknown": 1}, pb.Timed)
    assert (t.at.seconds, t.at.nanos) == (5, 500_000_000)


# --- 3. through the codec --------------------------------------------------------------------


def test_codec_round_trip(corpus):
    for message in corpus:
        data = JsonCodec.encode(message)
        assert isinstance(data, bytes)
        assert json.loads(data) == json_format.MessageToDict(message)
        assert_same(JsonCodec.decode(data, type(message)), message)


def test_codec_output_is_compact_utf8(pb):
    m = pb.Everything(f_string="ü😀", f_int64=5, r_int32=[1, 2])
    assert JsonCodec.encode(m) == '{"fInt64":"5","fString":"ü😀","rInt32":[1,2]}'.encode()
    assert JsonCodec.encode(pb.Everything()) == b"{}"


def test_codec_decode_accepts_loose_input(pb):
    data = b'{"f_int32": "7", "fBytes": "_w", "fEnum": "NOPE", "zz": {"a": [null]}, "fLeaf": null}'
    assert_same(JsonCodec.decode(data, pb.Everything), pb.Everything(f_int32=7, f_bytes=b"\xff"))
    assert_same(JsonCodec.decode(b"", pb.Everything), pb.Everything())
    assert_same(JsonCodec.decode(b"{}", pb.Everything), pb.Everything())


@pytest.mark.parametrize(
    "data",
    [
        b'{"fInt32": "x"}',
        b'{"fInt32": 2147483648}',
        b'{"fString": "\\ud800"}',
        b'{"rLeaf": {}}',
        b"[]",
        b"{",
        b"\xff\xfe",
        b'{"fFloat": 1e39}',
    ],
)
def test_codec_decode_errors_are_invalid_argument(pb, data):
    cls = pb.Floaty if b"fFloat" in data else pb.Everything
    with pytest.raises(ConnectError) as info:
        JsonCodec.decode(data, cls)
    assert info.value.code == Code.INVALID_ARGUMENT


# --- known bugs ------------------------------------------------------------------------------
# Each test states the correct behaviour (json_format's); see the reason for what we do today.


@pytest.mark.parametrize(
    ("obj", "fields"),
    [
        ({"fEnum": "2"}, {"f_enum": 2}),
        ({"fEnum": "99"}, {"f_enum": 99}),
        ({"rEnum": ["2", "COLOR_RED"]}, {"r_enum": [2, 1]}),
        ({"mInt32Enum": {"1": "3"}}, {"m_int32_enum": {1: 3}}),
    ],
)
def test_fixed_enum_number_as_string(pb, obj, fields):
    want = pb.Everything(**fields)
    assert_same(theirs_decode(obj, pb.Everything), want)
    assert_same(ours_decode(obj, pb.Everything), want)


def test_fixed_enum_number_as_integral_float(pb):
    assert_same(theirs_decode({"fEnum": 2.0}, pb.Everything), pb.Everything(f_enum=2))
    assert_same(ours_decode({"fEnum": 2.0}, pb.Everything), pb.Everything(f_enum=2))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_fixed_double_bare_non_finite(pb, value):
    with pytest.raises(json_format.ParseError):
        theirs_decode({"fDouble": value}, pb.Everything)
    with pytest.raises(ValueError):
        ours_decode({"fDouble": value}, pb.Everything)
    with pytest.raises(ConnectError):
        JsonCodec.decode(b'{"rDouble": [1e400]}', pb.Everything)


def test_fixed_double_lowercase_nan_string(pb):
    with pytest.raises(json_format.ParseError):
        theirs_decode({"fDouble": "nan"}, pb.Everything)
    with pytest.raises(ValueError):
        ours_decode({"fDouble": "nan"}, pb.Everything)


@pytest.mark.parametrize(
    "obj",
    [{"cString": "a", "cInt64": "5"}, {"cLeaf": {}, "cBool": False}, {"cString": "a", "c_string": "b"}],
)
def test_fixed_oneof_set_twice(pb, obj):
    with pytest.raises(json_format.ParseError):
        theirs_decode(obj, pb.Everything)
    with pytest.raises(ValueError):
        ours_decode(obj, pb.Everything)


@pytest.mark.parametrize(
    "obj", [{"fInt32": " 1"}, {"fInt64": "1 "}, {"rUint64": [" 2 "]}, {"mInt32Enum": {" 1": 1}}]
)
def test_fixed_integer_string_with_spaces(pb, obj):
    with pytest.raises(json_format.ParseError):
        theirs_decode(obj, pb.Everything)
    with pytest.raises(ValueError):
        ours_decode(obj, pb.Everything)


@pytest.mark.parametrize(
    ("obj", "fields"),
    [
        ({"rInt32": [1], "r_int32": [2]}, {"r_int32": [2]}),
        ({"r_leaf": [{"id": 1}], "rLeaf": [{"id": 2}]}, {"r_leaf": [{"id": 2}]}),
        ({"mStringString": {"a": "1"}, "m_string_string": {"b": "2"}}, {"m_string_string": {"b": "2"}}),
    ],
)
def test_fixed_repeated_field_given_twice(pb, obj, fields):
    want = pb.Everything(**fields)
    assert_same(theirs_decode(obj, pb.Everything), want)
    assert_same(ours_decode(obj, pb.Everything), want)


def test_singular_field_given_twice_last_wins(pb):
    obj = {"fInt32": 1, "f_int32": 2, "fLeaf": {"id": 1}, "f_leaf": {"label": "x"}}
    want = pb.Everything(f_int32=2, f_leaf=pb.Leaf(id=1, label="x"))  # messages merge
    assert_same(theirs_decode(obj, pb.Everything), want)
    assert_same(ours_decode(obj, pb.Everything), want)


def test_fixed_extensions_not_decoded(p2):
    obj = {"id": 1, "[jsontest.v1.note]": "hi", "[jsontest.v1.tags]": ["5"]}
    want = p2.Extendable(id=1)
    want.Extensions[p2.note] = "hi"
    want.Extensions[p2.tags].append(5)
    assert_same(theirs_decode(obj, p2.Extendable), want)
    holder = p2.HoldsExtendable()
    holder.inner.CopyFrom(want)
    assert_same(JsonCodec.decode(JsonCodec.encode(holder), p2.HoldsExtendable), holder)
    assert_same(ours_decode(obj, p2.Extendable), want)


def test_fixed_mutual_recursion_timestamp(pb):
    _json.to_dict(pb.MutualA())  # the order that triggers it: the outer type is seen first
    b = pb.MutualB()
    b.a.at.seconds = 5
    assert json_format.MessageToDict(b) == {"a": {"at": "1970-01-01T00:00:05Z"}}
    assert _json.to_dict(b) == {"a": {"at": "1970-01-01T00:00:05Z"}}
    assert_same(ours_decode({"a": {"at": "1970-01-01T00:00:05Z"}}, pb.MutualB), b)


def test_fixed_mutual_recursion_float(pb):
    _json.to_dict(pb.FloatA())
    b = pb.FloatB()
    b.a.f = 0.1
    assert json_format.MessageToDict(b) == {"a": {"f": 0.1}}
    assert _json.to_dict(b) == {"a": {"f": 0.1}}
    assert_same(ours_decode({"a": {"f": 0.1}}, pb.FloatB), b)


@pytest.mark.parametrize("levels", [100, 3000])
def test_fixed_no_nesting_limit(pb, levels):
    obj = deep_tree_json(levels)
    with pytest.raises(json_format.ParseError):
        theirs_decode(obj, pb.Tree)
    with pytest.raises(ValueError):
        ours_decode(obj, pb.Tree)


@pytest.mark.parametrize("message_type", ["Everything", "Floaty"])
def test_fixed_double_from_huge_integer(pb, message_type):
    data = b'{"fDouble": 1' + b"0" * 400 + b"}"
    with pytest.raises(ConnectError) as info:
        JsonCodec.decode(data, getattr(pb, message_type))
    assert info.value.code == Code.INVALID_ARGUMENT


def test_fixed_codec_deeply_nested_body(pb):
    data = b'{"left":' * 5000 + b"{}" + b"}" * 5000
    with pytest.raises(ConnectError) as info:
        JsonCodec.decode(data, pb.Tree)
    assert info.value.code == Code.INVALID_ARGUMENT
