"""What every benchmark sends and expects: one kv.v1.KVService/Get of a fixed key.

The handler answers a fixed value, so a measurement shows the cost of the server or client
stack around it, not of the handler.
"""

from __future__ import annotations

import http.client
import io
import json
import sys
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from connectplugin import Context
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_SERVICE
from samples.kv.store import KVStore

M = TypeVar("M", bound=Message)

GET = KV_SERVICE.methods["Get"]
PATH = GET.path
CODECS = ("proto", "json")
CONTENT_TYPES = {"proto": "application/proto", "json": "application/json"}
REQUEST = kv_pb2.GetRequest(key="bench-key")
RESPONSE = kv_pb2.GetResponse(value=b"x", found=True)


class FixedKV(KVStore):
    """Get answers ``found=true`` with a 1-byte value and sets no headers; Put, Delete and
    Watch are the sample store's (the stream benchmarks put and watch)."""

    def get(self, request: kv_pb2.GetRequest, ctx: Context) -> kv_pb2.GetResponse:
        return kv_pb2.GetResponse(value=b"x", found=True)


def encode(message: Message, codec: str) -> bytes:
    """The Connect unary body of ``message`` (proto3 JSON with camelCase names for ``json``)."""
    if codec == "proto":
        return message.SerializeToString()
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()


def decode(data: bytes, message_type: type[M], codec: str) -> M:
    message = message_type()
    if codec == "proto":
        message.ParseFromString(data)
    else:
        json_format.Parse(data, message)
    return message


def request_headers(codec: str) -> dict[str, str]:
    return {"Content-Type": CONTENT_TYPES[codec], "Connect-Protocol-Version": "1"}


def wsgi_environ(codec: str) -> dict:
    """A fresh environ for the Get that wrk sends, with the keys waitress sets."""
    body = encode(REQUEST, codec)
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": PATH,
        "REQUEST_URI": PATH,
        "QUERY_STRING": "",
        "SERVER_NAME": "waitress.invalid",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SOFTWARE": "connectplugin",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_HOST": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "CONTENT_TYPE": CONTENT_TYPES[codec],
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_CONNECT_PROTOCOL_VERSION": "1",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def check_get(host: str, port: int, codec: str, timeout: float = 5.0) -> None:
    """One Get over a fresh connection; raises unless the answer is exactly RESPONSE."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", PATH, encode(REQUEST, codec), request_headers(codec))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    content_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
    if response.status != 200 or content_type != CONTENT_TYPES[codec]:
        raise RuntimeError(
            f"Get over {codec} on port {port}: HTTP {response.status} {content_type!r} {body[:200]!r}"
        )
    got = decode(body, kv_pb2.GetResponse, codec)
    if got != RESPONSE:
        raise RuntimeError(f"Get over {codec} on port {port} answered {got!r}")
