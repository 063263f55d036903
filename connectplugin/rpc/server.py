"""The Connect server: a plain WSGI application that routes calls to generated handlers.

Request flow: Werkzeug routing -> protocol checks -> decode -> handler -> encode -> response.
Unary and server-streaming calls over HTTP/1.1, per the Connect protocol specification.
The app holds no mutable state after construction, so any number of server threads may call it.
"""

from __future__ import annotations

import http
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from google.protobuf.message import Message
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from . import _protocol
from ._metadata import Value, environ_key, from_pairs
from ._metadata import to_wire as _strict_to_wire
from .errors import Code, ConnectError
from .service import Method, Service

log = logging.getLogger("connectplugin.server")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class ServerConfig:
    """Limits and tuning of the Connect server; the defaults suit most plugins."""

    read_limit: int = _protocol.DEFAULT_READ_LIMIT
    """Largest request message in bytes, compressed or not; larger is resource_exhausted."""
    compress_min_bytes: int = _protocol.COMPRESS_MIN_BYTES
    """Responses smaller than this are never compressed."""


class Context:
    """What a handler knows about its call, and what it may add to the response.

    ``request_headers`` are lower-cased; ``-bin`` values arrive decoded to bytes.
    Values set in ``response_headers`` / ``response_trailers`` may be bytes for ``-bin`` keys.
    """

    __slots__ = ("method", "environ", "deadline", "response_headers", "response_trailers", "_headers", "_stopping")

    def __init__(
        self, method: Method, environ: dict, deadline: float | None, stopping: threading.Event | None = None
    ) -> None:
        self.method = method
        self._stopping = stopping
        self.environ = environ
        self.deadline = deadline
        """Absolute ``time.monotonic()`` by which the call must end, or None."""
        self.response_headers: dict[str, Value] = {}
        self.response_trailers: dict[str, Value] = {}
        self._headers: dict[str, Value] | None = None

    @property
    def request_headers(self) -> Mapping[str, Value]:
        if self._headers is None:
            self._headers = from_pairs(_environ_headers(self.environ))
        return self._headers

    @property
    def peer(self) -> str:
        return self.environ.get("REMOTE_ADDR", "")

    def timeout_remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def is_active(self) -> bool:
        """False once the deadline has passed, the client has gone or the server is stopping.

        Long-running handlers (streams above all) poll this to end in time.
        """
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self._stopping is not None and self._stopping.is_set():
            return False
        gone = disconnection_check(self.environ)
        return not (gone and gone())


def disconnection_check(environ: Mapping[str, Any]) -> Callable[[], bool] | None:
    """The server's own check that a call's client has gone: waitress's, or ours (cheroot's
    gateway, the in-process transport); None where the server offers none."""
    return environ.get("waitress.client_disconnected") or environ.get("connectplugin.client_disconnected")


def _environ_headers(environ: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            yield key[5:].replace("_", "-"), value
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            yield key.replace("_", "-"), value


_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
_REASONS[499] = "Client Closed Request"


def _status(code: int) -> str:
    return f"{code} {_REASONS.get(code, '')}"


class _Route:
    """One procedure, with what every call of it needs looked up once."""

    __slots__ = ("method", "call", "allow", "streaming", "input", "output")

    def __init__(self, method: Method, call: Callable[..., Any]) -> None:
        self.method = method
        self.call = call
        self.allow = "GET, POST" if method.idempotent and not method.server_streaming else "POST"
        self.streaming = method.server_streaming
        self.input = method.input
        self.output = method.output


_UNARY_TYPES = _protocol.UNARY_TYPES
_STREAM_TYPES = _protocol.STREAM_TYPES
_UNARY_CONTENT_TYPE = {name: ("Content-Type", type_) for type_, name in _UNARY_TYPES.items()}
_STREAM_CONTENT_TYPE = {name: ("Content-Type", type_) for type_, name in _STREAM_TYPES.items()}
# The Connect request headers as WSGI environ keys, read in place on every call.
_TIMEOUT = environ_key(_protocol.TIMEOUT_HEADER)
_VERSION = environ_key(_protocol.VERSION_HEADER)
_UNARY_ENCODING = environ_key(_protocol.UNARY_ENCODING_HEADER)
_UNARY_ACCEPT_ENCODING = environ_key(_protocol.UNARY_ACCEPT_ENCODING_HEADER)
_STREAM_ENCODING = environ_key(_protocol.STREAM_ENCODING_HEADER)
_STREAM_ACCEPT_ENCODING = environ_key(_protocol.STREAM_ACCEPT_ENCODING_HEADER)


_MATCHES_KEPT = 256
"""Paths whose route match an App remembers; all are forgotten when it is full."""


class App:
    """A WSGI application serving the given handler objects over Connect.

    Each handler carries a ``service`` attribute (a :class:`Service`, set by the
    generated base class) and one Python method per RPC.
    """

    def __init__(
        self,
        handlers: Iterable[Any],
        config: ServerConfig | None = None,
        routes: Mapping[str, WSGIApp] | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self.stopping = threading.Event()
        """Set when the server is shutting down; handlers see it through ``Context.is_active``."""
        rules = []
        self.services: dict[str, Service] = {}
        for handler in handlers:
            service: Service = handler.service
            if service.name in self.services:
                raise ValueError(f"service {service.name} is served twice")
            self.services[service.name] = service
            for method in service.methods.values():
                route = _Route(method, getattr(handler, method.attr))
                rules.append(Rule(method.path, endpoint=route))
        # Plain WSGI endpoints beside the procedures (probes, the router); Werkzeug rule
        # syntax, with the matched arguments in environ["connectplugin.route_args"].
        for rule, app in (routes or {}).items():
            rules.append(Rule(rule, endpoint=app))
        # Bound once: matching is then read-only and safe from any thread.
        self._routes = Map(rules, strict_slashes=False, merge_slashes=False).bind("connect")
        # Procedure paths are static, so the hot path is one dict lookup; the matcher
        # stays the authority for everything else.
        self._static = {r.rule: r.endpoint for r in rules if isinstance(r.endpoint, _Route)}
        # Werkzeug's matcher takes tens of microseconds, and a routed call's path repeats
        # (one provider's method, call after call): matches are remembered, a bounded few.
        self._matched: dict[str, tuple[Any, Mapping[str, Any]]] = {}

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        route: _Route | None = self._static.get(path)
        if route is None:
            matched = self._matched.get(path)
            if matched is None:
                try:
                    matched = self._routes.match(path)
                except HTTPException:
                    return error_response(
                        start_response,
                        ConnectError(Code.UNIMPLEMENTED, f"no procedure at {path}"),
                        status=404,
                    )
                if len(self._matched) >= _MATCHES_KEPT:
                    self._matched.clear()
                self._matched[path] = matched
            endpoint, args = matched
            if not isinstance(endpoint, _Route):
                environ["connectplugin.route_args"] = dict(args)
                return endpoint(environ, start_response)
            route = endpoint
        http_method = environ["REQUEST_METHOD"]
        if http_method != "POST" and not (http_method == "GET" and route.allow != "POST"):
            start_response(_status(405), [("Allow", route.allow), ("Content-Length", "0")])
            return [b""]
        if route.streaming:
            return self._stream(route, environ, start_response)
        return self._unary(route, environ, start_response, http_method == "GET")

    # --- unary --------------------------------------------------------------------------------

    def _unary(
        self, route: _Route, environ: dict, start_response: StartResponse, is_get: bool
    ) -> Iterable[bytes]:
        query: dict[str, list[str]] | None = None
        if is_get:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            codec_name = _protocol.get_codec(query)
        else:
            content_type = environ.get("CONTENT_TYPE", "")
            # The exact spelling first: it is what clients send, and needs no parsing.
            codec_name = _UNARY_TYPES.get(content_type) or _protocol.codec_for(content_type, _UNARY_TYPES)
        codec = _protocol.CODECS.get(codec_name)
        if codec is None:
            return unsupported_media(start_response, _UNARY_TYPES)
        ctx: Context | None = None
        try:
            timeout = environ.get(_TIMEOUT)
            deadline = None if timeout is None else _deadline(timeout)
            ctx = Context(route.method, environ, deadline, self.stopping)
            if query is not None:
                payload = _protocol.get_payload(query, self.config.read_limit)
            else:
                _protocol.check_version(environ.get(_VERSION))
                encoding = environ.get(_UNARY_ENCODING)  # seldom sent, so vetted only when it is
                if encoding:
                    encoding = _protocol.check_encoding(encoding)
                payload = read_body(environ, self.config.read_limit)
                if encoding and encoding != _protocol.IDENTITY:
                    payload = _protocol.decompress(encoding, payload, self.config.read_limit)
            request = codec.decode(payload, route.input)
            response = route.call(request, ctx)
            if deadline is not None and time.monotonic() > deadline:
                raise ConnectError(Code.DEADLINE_EXCEEDED, "the call outlived its timeout")
            if not isinstance(response, route.output):
                log.error(
                    "%s returned %s, not %s",
                    route.method.path,
                    type(response).__name__,
                    route.output.__name__,
                )
                raise ConnectError(Code.INTERNAL, "internal error")
            body = codec.encode(response)
        except ConnectError as e:
            return error_response(start_response, e, ctx=ctx)
        except Exception:
            log.exception("unhandled error in %s", route.method.path)
            return error_response(start_response, ConnectError(Code.INTERNAL, "internal error"), ctx=ctx)

        headers = [_UNARY_CONTENT_TYPE[codec_name]]
        if len(body) >= self.config.compress_min_bytes:
            if _protocol.negotiate(environ.get(_UNARY_ACCEPT_ENCODING)) == _protocol.GZIP:
                body = _protocol.compress(_protocol.GZIP, body)
                headers.append((_protocol.UNARY_ENCODING_HEADER, _protocol.GZIP))
        headers.append(("Content-Length", str(len(body))))
        if ctx.response_headers:
            headers += to_wire(ctx.response_headers)
        if ctx.response_trailers:
            headers += to_wire(ctx.response_trailers, _protocol.TRAILER_PREFIX)
        start_response("200 OK", headers)
        return [body]

    def _read_body(self, environ: dict, slack: int = 0) -> bytes:
        return read_body(environ, self.config.read_limit, slack)

    # --- server streaming ---------------------------------------------------------------------

    def _stream(self, route: _Route, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        codec_name = _protocol.codec_for(environ.get("CONTENT_TYPE", ""), _STREAM_TYPES)
        if codec_name not in _protocol.CODECS:
            return unsupported_media(start_response, _STREAM_TYPES)
        codec = _protocol.CODECS[codec_name]
        headers = [_STREAM_CONTENT_TYPE[codec_name]]
        ctx: Context | None = None
        # Past this point every failure is reported in the end-stream message of a 200.
        try:
            timeout = environ.get(_TIMEOUT)
            deadline = None if timeout is None else _deadline(timeout)
            ctx = Context(route.method, environ, deadline, self.stopping)
            _protocol.check_version(environ.get(_VERSION))
            encoding = _protocol.check_encoding(environ.get(_STREAM_ENCODING))
            request = codec.decode(self._read_stream_request(environ, encoding), route.input)
            messages = iter(route.call(request, ctx))
        except ConnectError as e:
            return _end_only(start_response, headers, e, ctx)
        except Exception:
            log.exception("unhandled error in %s", route.method.path)
            return _end_only(start_response, headers, ConnectError(Code.INTERNAL, "internal error"), ctx)

        send_encoding = _protocol.negotiate(environ.get(_STREAM_ACCEPT_ENCODING))
        if send_encoding != _protocol.IDENTITY:
            headers.append((_protocol.STREAM_ENCODING_HEADER, send_encoding))
        return self._stream_body(route, ctx, messages, codec, send_encoding, start_response, headers)

    def _read_stream_request(self, environ: dict, encoding: str) -> bytes:
        body = self._read_body(environ, slack=_protocol.ENVELOPE_HEADER_SIZE)
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            chunk = body[pos : pos + n]
            pos += len(chunk)
            return chunk

        # Zero or several messages are unimplemented, as gRPC's status table and connect-go
        # have it; a malformed envelope (truncated, end-stream flag) is invalid_argument.
        first = _protocol.read_envelope(read, encoding, self.config.read_limit)
        if first is None:
            raise ConnectError(Code.UNIMPLEMENTED, "a server-streaming request carries one message, not none")
        if first[0]:
            raise ConnectError(Code.INVALID_ARGUMENT, "a request carries no end-stream message")
        if pos != len(body) and _protocol.read_envelope(read, encoding, self.config.read_limit) is not None:
            raise ConnectError(Code.UNIMPLEMENTED, "a server-streaming request carries one message, not several")
        return first[1]

    def _stream_body(
        self,
        route: _Route,
        ctx: Context,
        messages: Iterator[Message],
        codec: _protocol.Codec,
        encoding: str,
        start_response: StartResponse,
        headers: list[tuple[str, str]],
    ) -> Iterator[bytes]:
        # Headers go out at once, so a caller waiting for a quiet stream is not left hanging;
        # what the handler sets while streaming belongs in response_trailers.
        # (PEP 3333 servers send headers with the first non-empty chunk; write(b"") sends them now.)
        error: ConnectError | None = None
        try:
            write = start_response("200 OK", headers + to_wire(ctx.response_headers))
            write(b"")
            yield b""  # lets a caller driving the iterator (an in-process transport) return now too
            for message in messages:
                if ctx.deadline is not None and time.monotonic() > ctx.deadline:
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "the stream outlived its timeout")
                data = codec.encode(message)
                flags = 0
                if encoding != _protocol.IDENTITY and len(data) >= self.config.compress_min_bytes:
                    data, flags = _protocol.compress(encoding, data), _protocol.FLAG_COMPRESSED
                yield _protocol.envelope(flags, data)
        except ConnectError as e:
            error = e
        except GeneratorExit:
            raise
        except Exception:
            log.exception("unhandled error in %s", route.method.path)
            error = ConnectError(Code.INTERNAL, "internal error")
        finally:
            close = getattr(messages, "close", None)
            if close is not None:
                close()
        if error is None and ctx.deadline is not None and time.monotonic() > ctx.deadline:
            # A handler that stopped because its time was up still failed to finish in time.
            error = ConnectError(Code.DEADLINE_EXCEEDED, "the stream outlived its timeout")
        yield _end_stream(error, ctx)


# --- helpers --------------------------------------------------------------------------------


def to_wire(items: Mapping[str, Value], prefix: str = "") -> list[tuple[str, str]]:
    """Metadata a handler set, as headers; a value that cannot be sent is logged and dropped,
    so a handler's mistake never turns into a broken response."""
    try:
        return _strict_to_wire(items, prefix)
    except ValueError:
        pairs = []
        for key, value in items.items():
            try:
                pairs += _strict_to_wire({key: value}, prefix)
            except ValueError as e:
                log.error("dropped response metadata %r: %s", key, e)
        return pairs


def read_body(environ: dict, limit: int, slack: int = 0) -> bytes:
    """The whole request body; more than ``limit + slack`` bytes is refused before reading
    (``slack``: framing around the message, such as an envelope header)."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            n = int(length)
        except ValueError:
            raise ConnectError(Code.INVALID_ARGUMENT, "bad Content-Length") from None
        if n < 0:
            raise ConnectError(Code.INVALID_ARGUMENT, "bad Content-Length")
        if n > limit + slack:
            raise _protocol.too_large(limit)
        return environ["wsgi.input"].read(n) if n else b""
    data = environ["wsgi.input"].read(limit + slack + 1)
    if len(data) > limit + slack:
        raise _protocol.too_large(limit)
    return data


def _deadline(timeout_ms: str) -> float:
    """The absolute deadline of a call from its ``Connect-Timeout-Ms``.

    Callers read that header from the environ in place and call this only when it is there:
    most calls carry no timeout, and a call to learn that would cost more than the lookup.
    """
    return time.monotonic() + _protocol.parse_timeout_ms(timeout_ms)


def unsupported_media(start_response: StartResponse, table: Mapping[str, str]) -> list[bytes]:
    """415 for a content type none of ``table`` (UNARY_TYPES or STREAM_TYPES) names (spec)."""
    start_response(
        _status(415), [("Accept-Post", ", ".join(table)), ("Content-Length", "0")]
    )
    return [b""]


def text_response(start_response: StartResponse, status: int, text: str) -> list[bytes]:
    """A plain-text answer, for probes such as ``/healthz`` beside the procedures."""
    body = (text + "\n").encode()
    start_response(_status(status), [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def error_response(
    start_response: StartResponse,
    error: ConnectError,
    ctx: Context | None = None,
    status: int | None = None,
) -> list[bytes]:
    body = _protocol.error_body(error)
    headers = [("Content-Type", _protocol.ERROR_CONTENT_TYPE), ("Content-Length", str(len(body)))]
    if ctx is not None:
        headers += to_wire(ctx.response_headers)
        headers += to_wire(ctx.response_trailers, _protocol.TRAILER_PREFIX)
    headers += to_wire(error.metadata)
    start_response(_status(status or error.code.http_status), headers)
    return [body]


def refusal(start_response: StartResponse, content_type: str, error: ConnectError) -> list[bytes]:
    """A call refused before any handler ran, answered the Connect way for its kind: an
    error status and JSON body for a unary call, a 200 carrying only the end-of-stream
    message for a stream (a streaming client reads its error nowhere else)."""
    if not _protocol.is_streaming(content_type):
        return error_response(start_response, error)
    body = _protocol.end_stream(error)
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _end_stream(error: ConnectError | None, ctx: Context | None) -> bytes:
    """The end-stream message: the handler's trailers, then the error's metadata."""
    metadata = to_wire(ctx.response_trailers if ctx else {}) + to_wire(error.metadata if error else {})
    return _protocol.end_stream(error, metadata)


def _end_only(
    start_response: StartResponse,
    headers: list[tuple[str, str]],
    error: ConnectError,
    ctx: Context | None,
) -> list[bytes]:
    body = _end_stream(error, ctx)
    start_response("200 OK", headers + [("Content-Length", str(len(body)))] + to_wire(ctx.response_headers if ctx else {}))
    return [body]
