"""The Connect client: calls over a pooled ``requests`` session.

Requests go straight to the transport for the session's adapter for the base URL (skipping
the per-call settings merge of ``Session.request``; see ``_transport.for_session``), so an
in-process adapter can stand in for the network without changing anything above it.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import requests
from google.protobuf.message import Message
from requests.adapters import HTTPAdapter

from . import _protocol, _transport
from ._metadata import Value, from_pairs, split_prefixed, to_wire
from ._transport import Abort, Response, TransportError, TransportTimeout
from .errors import Code, ConnectError
from .httpserver import is_loopback
from .service import Method
from .tls import TLSConfig

Res = TypeVar("Res", bound=Message)

log = logging.getLogger("connectplugin.client")

_USER_AGENT = "connectplugin-python/0.1"


class CancelToken:
    """Gives up calls from another thread, as a Go context's cancel function does.

    Pass one as ``cancel=`` to calls (generated client methods, ``call_unary``,
    ``call_server_stream``); ``cancel()`` then ends every one still under way: its caller gets
    ``ConnectError(canceled)`` at once, its connection is closed rather than kept for another
    call, and so the server sees its client go (``Context.is_active()`` turns false). A call
    made with a token already cancelled fails at once. One token may serve any number of
    calls, cancelled together; it cannot be reset. Safe from any thread.

    >>> token = CancelToken()
    >>> threading.Timer(1.0, token.cancel).start()
    >>> kv.get(GetRequest(key="slow"), cancel=token)  # ConnectError(canceled) after 1 s
    """

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self._lock = threading.Lock()  # guards _callbacks and _next
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Cancel the calls made with this token, now and from now on. Idempotent."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
            callbacks, self._callbacks = list(self._callbacks.values()), {}
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a cancellation callback failed")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until cancelled, at most ``timeout`` seconds; whether it was."""
        return self._cancelled.wait(timeout)

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Have ``cancel()`` call ``callback()`` (on its thread; at once if it came already).

        Returns a function that forgets the callback. The callback should be quick: it runs
        on the cancelling thread, one after the other with the token's other callbacks."""
        with self._lock:
            if not self._cancelled.is_set():
                key = self._next
                self._next += 1
                self._callbacks[key] = callback
                return lambda: self._forget(key)
        callback()
        return _nothing

    def _forget(self, key: int) -> None:
        with self._lock:
            self._callbacks.pop(key, None)


def _nothing() -> None:
    pass


def _call_if_alive(method: weakref.WeakMethod) -> None:
    bound = method()
    if bound is not None:
        bound()


@dataclass
class Call:
    """One outgoing call as interceptors see it; they may change headers and timeout."""

    method: Method
    request: Message
    headers: dict[str, Value]
    timeout: float | None
    response_headers: dict[str, Value] = field(default_factory=dict)
    response_trailers: dict[str, Value] = field(default_factory=dict)
    cancel: CancelToken | None = None
    """The token that cancels this call, if its caller gave one."""


Interceptor = Callable[[Call, Callable[[Call], Any]], Any]
"""``interceptor(call, proceed) -> result``: wraps every call a client makes.

``proceed(call)`` performs the call (or the next interceptor) and returns its result: the
response message for unary calls, a :class:`ServerStream` for streaming ones. Add headers
by changing ``call.headers``; retry by calling ``proceed`` again; fail by raising
:class:`ConnectError`. Interceptors run in the order given, the first outermost.
"""


DEFAULT_TIMEOUT = 30.0
"""Seconds a unary call may take when neither it nor its client says otherwise, so a hung
server costs a caller a bounded wait; the host's router caps routed calls the same way."""


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to one endpoint; the defaults suit most callers."""

    codec: str = "proto"
    """``proto`` or ``json``."""
    compression: str = _protocol.GZIP
    """Request compression (``gzip`` or ``identity``); gzip responses are always accepted."""
    compress_min_bytes: int = _protocol.COMPRESS_MIN_BYTES
    read_limit: int = _protocol.DEFAULT_READ_LIMIT
    timeout: float | None = DEFAULT_TIMEOUT
    """Deadline of each unary call that gives none of its own, in seconds; sent as
    Connect-Timeout-Ms and enforced here too. None: such calls may wait forever."""
    stream_timeout: float | None = None
    """Deadline of each server stream that gives none of its own. None, the default: streams
    (watches above all) stay open until closed, cancelled or the server ends them."""
    connect_timeout: float = 5.0
    use_get: bool = False
    """Call side-effect-free unary methods with GET (cacheable) instead of POST."""
    pool_size: int = 16
    """Keep-alive connections kept per host."""
    interceptors: Sequence[Interceptor] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    """Sent with every call (before per-call headers)."""
    service_url: bool = False
    """The base URL names one service (a router's ``endpoint_url``): calls go to
    ``base_url + "/" + method name`` instead of the full procedure path."""
    tls: TLSConfig | None = None
    """For an https:// URL: verify the server against exactly ``tls.trust`` (CAs or one pinned
    certificate) and present ``tls.key_pair``. Without it, the session's settings apply."""

    def __post_init__(self) -> None:
        if self.codec not in _protocol.CODECS:
            raise ValueError(f"codec must be one of {sorted(_protocol.CODECS)}, not {self.codec!r}")
        if self.compression not in _protocol.ENCODINGS:
            raise ValueError(f"compression must be one of {_protocol.ENCODINGS}, not {self.compression!r}")


_credential_warned: set[str] = set()
"""Base URLs already warned about (each once per process)."""


def _warn_plaintext_credentials(base_url: str, headers: Mapping[str, str]) -> None:
    """Warn once per URL when a bearer token would cross a network in clear."""
    if not any(k.lower() == "authorization" for k in headers):
        return
    parts = urlsplit(base_url)
    if parts.scheme != "http" or is_loopback(parts.hostname or "") or base_url in _credential_warned:
        return
    _credential_warned.add(base_url)
    log.warning("sending a bearer token to %s over plaintext HTTP: anyone on the path can read and reuse it", base_url)


class _Capture(threading.local):
    stack: list[ResponseMetadata]

    def __init__(self) -> None:
        self.stack = []


_capture = _Capture()


class ResponseMetadata:
    """Captures the headers and trailers of unary calls made inside a ``with`` block.

    >>> with ResponseMetadata() as md:
    ...     kv.get(GetRequest(key="a"))
    >>> md.headers, md.trailers
    """

    def __init__(self) -> None:
        self.headers: dict[str, Value] = {}
        self.trailers: dict[str, Value] = {}

    def __enter__(self) -> ResponseMetadata:
        _capture.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _capture.stack.remove(self)


class Client:
    """A Connect client for one base URL. Safe to share between threads.

    ``session`` may be supplied to share a connection pool or mount a custom adapter
    (TLS settings, an in-process transport); the client then does not close it. The
    adapter for the base URL is looked up once, here, and the session's ``verify`` and
    ``cert`` apply. With requests' own HTTPAdapter the client keeps the adapter's
    connection pool for the base URL from its first call on; its idle connections are
    closed with the client when the client owns the session, else when it is collected.
    Without a session of yours, an ``http://`` URL (or an ``https://`` one with
    ``ClientConfig.tls``) is reached through keep-alive connections of the client's own
    (HTTP/1.1 spoken directly, as the host's router does).
    """

    def __init__(
        self,
        base_url: str,
        config: ClientConfig | None = None,
        *,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.config.pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        _warn_plaintext_credentials(self.base_url, self.config.headers)
        self._transport: _transport.Transport
        parts = urlsplit(self.base_url)
        if self.config.tls is not None:
            if not self._owns_session:
                raise ValueError("ClientConfig.tls and a session of your own: give one or the other")
            if parts.scheme != "https":
                raise ValueError(f"TLS settings need an https:// URL, not {base_url!r}")
            self._transport = _transport.ConnectionPool(self.base_url, self.config.pool_size, self.config.tls)
        elif self._owns_session and parts.scheme == "http" and not (parts.query or parts.fragment):
            # Nothing of requests' to honour: the lean keep-alive pool the router uses, which
            # costs a fraction of urllib3's per call.
            self._transport = _transport.ConnectionPool(self.base_url, self.config.pool_size)
        else:
            self._transport = _transport.for_session(session, self.base_url)
        self._configure()

    def derive(self, config: ClientConfig) -> Client:
        """A client of the same base URL with other settings (timeouts, interceptors, headers,
        codec...) over this client's connections. Closing it closes nothing: this client owns
        them. ``tls`` and ``pool_size`` stay this client's."""
        other = copy.copy(self)
        other.config = replace(config, tls=self.config.tls, pool_size=self.config.pool_size)
        other._owns_session = False
        other._configure()
        return other

    def _configure(self) -> None:
        """What every call needs from ``config``, worked out once."""
        codec = self.config.codec
        self._codec = _protocol.CODECS[codec]
        self._unary_type = _protocol.UNARY_PREFIX + codec
        self._stream_type = _protocol.STREAM_PREFIX + codec
        # The request headers of each kind of call, but for the per-call ones (see _send).
        base = [
            ("User-Agent", _USER_AGENT),
            (_protocol.VERSION_HEADER, _protocol.PROTOCOL_VERSION),
            *self.config.headers.items(),
        ]
        unary_accept = (_protocol.UNARY_ACCEPT_ENCODING_HEADER, _protocol.GZIP)
        self._get_headers = _header_table([*base, unary_accept])
        self._post_headers = _header_table([*base, unary_accept, ("Content-Type", self._unary_type)])
        self._stream_headers = _header_table(
            [
                *base,
                ("Content-Type", self._stream_type),
                (_protocol.STREAM_ACCEPT_ENCODING_HEADER, _protocol.GZIP),
            ]
        )
        self._chain = self._build_chain()

    # --- public -------------------------------------------------------------------------------

    def call_unary(
        self,
        method: Method[Any, Res],
        request: Message,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Value] | None = None,
        cancel: CancelToken | None = None,
    ) -> Res:
        call = Call(
            method, request, dict(headers or {}), timeout if timeout is not None else self.config.timeout,
            cancel=cancel,
        )
        try:
            result: Res = self._chain(call)
        finally:
            for md in _capture.stack:
                md.headers.update(call.response_headers)
                md.trailers.update(call.response_trailers)
        return result

    def call_server_stream(
        self,
        method: Method[Any, Res],
        request: Message,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Value] | None = None,
        cancel: CancelToken | None = None,
    ) -> ServerStream[Res]:
        call = Call(
            method, request, dict(headers or {}), timeout if timeout is not None else self.config.stream_timeout,
            cancel=cancel,
        )
        stream: ServerStream[Res] = self._chain(call)
        return stream

    def close(self) -> None:
        if self._owns_session:
            self.session.close()
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the call itself ----------------------------------------------------------------------

    def _build_chain(self) -> Callable[[Call], Any]:
        chain: Callable[[Call], Any] = self._invoke
        for interceptor in reversed(self.config.interceptors):
            chain = _bind(interceptor, chain)
        return chain

    def _invoke(self, call: Call) -> Any:
        token = call.cancel
        if token is not None and token.cancelled:
            raise _cancelled()
        if call.method.server_streaming:
            return self._stream(call)
        abort, result = _cancellable(token, lambda abort: self._unary(call, abort))
        if abort is not None and abort.fired:  # in process, the handler saw its caller go and returned
            raise _cancelled()
        return result

    def _path(self, method: Method) -> str:
        return f"/{method.name}" if self.config.service_url else method.path

    def _send(
        self, call: Call, http_method: str, path: str, headers: _HeaderTable, body: bytes | None, abort: Abort | None
    ) -> tuple[Response, float | None]:
        """Send a request to ``base_url + path``; ``headers`` is a copy this call may change."""
        deadline = time.monotonic() + call.timeout if call.timeout is not None else None
        if call.timeout is not None:
            headers[_TIMEOUT_KEY] = (_protocol.TIMEOUT_HEADER, _protocol.format_timeout_ms(call.timeout))
        for key, value in to_wire(call.headers):
            headers[key.lower()] = (key, value)
        if body is not None:
            headers["content-length"] = ("Content-Length", str(len(body)))
        read_timeout = call.timeout
        connect_timeout = self.config.connect_timeout
        if read_timeout is not None:
            connect_timeout = min(connect_timeout, read_timeout)
        try:
            response = self._transport.send(
                http_method, path, dict(headers.values()), body, connect_timeout, read_timeout, abort
            )
        except TransportTimeout as e:
            raise _timeout_error(deadline, e) from None
        except TransportError as e:
            raise ConnectError(Code.UNAVAILABLE, f"cannot reach {self.base_url}: {e.reason}") from None
        return response, deadline

    def _unary(self, call: Call, abort: Abort | None) -> Message:
        method = call.method
        data = self._codec.encode(call.request)
        if self.config.use_get and method.idempotent:
            target = self._path(method) + "?" + _protocol.get_query(self.config.codec, data)
            response, deadline = self._send(call, "GET", target, self._get_headers.copy(), None, abort)
        else:
            headers = self._post_headers.copy()
            if self.config.compression != _protocol.IDENTITY and len(data) >= self.config.compress_min_bytes:
                data = _protocol.compress(self.config.compression, data)
                headers[_UNARY_ENCODING_KEY] = (_protocol.UNARY_ENCODING_HEADER, self.config.compression)
            response, deadline = self._send(call, "POST", self._path(method), headers, data, abort)
        try:
            body = self._read_all(response, deadline)
        finally:
            response.close()
        wire = from_pairs(response.headers.items())
        call.response_headers, call.response_trailers = split_prefixed(wire, _protocol.TRAILER_PREFIX)
        if response.status != 200:
            raise _protocol.read_error(response.status, response.reason, response.headers, body, _metadata(call))
        content_type = response.headers.get("content-type", "")
        if content_type != self._unary_type:  # the exact spelling is the common case, unparsed
            _protocol.check_response_type(content_type, self._unary_type, _metadata(call))
        encoding = response.headers.get(_UNARY_ENCODING_KEY, _protocol.IDENTITY)
        if encoding != _protocol.IDENTITY:
            try:
                body = _protocol.decompress(encoding, body, self.config.read_limit)
            except ConnectError as e:
                code = Code.RESOURCE_EXHAUSTED if e.code is Code.RESOURCE_EXHAUSTED else Code.INTERNAL
                raise ConnectError(code, e.message, metadata=_metadata(call)) from None
        return self._decode(body, method.output)

    def _read_all(self, response: Response, deadline: float | None) -> bytes:
        limit = self.config.read_limit
        try:
            body = response.read(limit + 1)
        except TransportTimeout as e:
            raise _timeout_error(deadline, e) from None
        except TransportError as e:
            raise _read_error(deadline, e) from None
        if len(body) > limit:
            raise _protocol.too_large(limit)
        return body

    def _decode(self, payload: bytes, message_type: type[Res]) -> Res:
        try:
            return self._codec.decode(payload, message_type)
        except ConnectError as e:
            raise ConnectError(Code.INTERNAL, f"cannot decode response: {e.message}") from None

    def _stream(self, call: Call) -> ServerStream[Any]:
        data = self._codec.encode(call.request)
        headers = self._stream_headers.copy()
        flags = 0
        if self.config.compression != _protocol.IDENTITY and len(data) >= self.config.compress_min_bytes:
            data = _protocol.compress(self.config.compression, data)
            headers[_STREAM_ENCODING_KEY] = (_protocol.STREAM_ENCODING_HEADER, self.config.compression)
            flags = _protocol.FLAG_COMPRESSED
        body = _protocol.envelope(flags, data)
        # Cancellable while it opens; once open, cancelling closes the stream.
        _, (response, deadline) = _cancellable(
            call.cancel, lambda abort: self._send(call, "POST", self._path(call.method), headers, body, abort)
        )
        meta = from_pairs(response.headers.items())
        call.response_headers = meta
        if response.status != 200:
            try:
                body = self._read_all(response, deadline)
            finally:
                response.close()
            raise _protocol.read_error(response.status, response.reason, response.headers, body, meta)
        try:
            _protocol.check_response_type(response.headers.get("content-type", ""), self._stream_type, meta)
        except ConnectError:
            response.close()
            raise
        return ServerStream(self, call, response, deadline)


T = TypeVar("T")


def _cancellable(token: CancelToken | None, work: Callable[[Abort | None], T]) -> tuple[Abort | None, T]:
    """``work(abort)``, ``abort`` called when ``token`` is cancelled meanwhile; the failure it
    causes is the call's ``canceled``. Returns the abort (None without a token) and the result."""
    if token is None:
        return None, work(None)
    abort = Abort()
    forget = token.on_cancel(abort)
    try:
        return abort, work(abort)
    except ConnectError:
        if abort.fired:
            raise _cancelled() from None
        raise
    finally:
        forget()


def _bind(interceptor: Interceptor, proceed: Callable[[Call], Any]) -> Callable[[Call], Any]:
    return lambda call: interceptor(call, proceed)


_HeaderTable = dict[str, tuple[str, str]]
"""Request headers by lower-cased name: (name as sent, value). Setting a name replaces any
spelling of it, as requests' CaseInsensitiveDict does, and keeps the first one's place."""


def _header_table(pairs: Sequence[tuple[str, str]]) -> _HeaderTable:
    table: _HeaderTable = {}
    for key, value in pairs:
        table[key.lower()] = (key, value)
    return table


_TIMEOUT_KEY = _protocol.TIMEOUT_HEADER.lower()
_UNARY_ENCODING_KEY = _protocol.UNARY_ENCODING_HEADER.lower()
_STREAM_ENCODING_KEY = _protocol.STREAM_ENCODING_HEADER.lower()


def _metadata(call: Call) -> dict[str, Value]:
    """What an error carries: the response headers and trailers together."""
    return {**call.response_headers, **call.response_trailers}


# --- streams --------------------------------------------------------------------------------


class ServerStream(Generic[Res]):
    """The responses of a server-streaming call, as an iterator.

    ``close()`` (or leaving a ``with`` block) ends the call early and releases its
    connection; it alone is safe from any thread. ``headers`` are known at once; ``trailers`` once the stream has ended.
    """

    def __init__(self, client: Client, call: Call, response: Response, deadline: float | None) -> None:
        self._client = client
        self._call = call
        self._response = response
        self._deadline = deadline
        self._encoding = response.headers.get(_STREAM_ENCODING_KEY, _protocol.IDENTITY)
        self._lock = threading.Lock()  # guards _done, _reading, _canceled and _revoked
        self._done = False
        self._reading = False  # a thread is inside next()
        self._canceled = False  # close() came while it was
        self._revoked = False  # the call's CancelToken closed it
        self._forget: Callable[[], None] = _nothing
        if self._encoding not in _protocol.ENCODINGS:
            self.close()
            raise ConnectError(Code.INTERNAL, f"server used unknown compression {self._encoding!r}")
        if call.cancel is not None:
            # Weakly: a stream its caller dropped is still closed when collected.
            revoke = weakref.WeakMethod(self._revoke)
            self._forget = call.cancel.on_cancel(lambda: _call_if_alive(revoke))

    @property
    def headers(self) -> Mapping[str, Value]:
        return self._call.response_headers

    @property
    def trailers(self) -> Mapping[str, Value]:
        return self._call.response_trailers

    def __iter__(self) -> ServerStream[Res]:
        return self

    def __next__(self) -> Res:
        with self._lock:
            if self._done:
                if self._revoked:
                    raise _cancelled()
                raise StopIteration
            self._reading = True
        try:
            envelope = self._next_envelope()
        except BaseException:
            if self._end_read():
                raise _closed() from None
            self.close()
            raise
        if self._end_read():
            raise _closed()
        if envelope is None:
            self.close()
            raise ConnectError(Code.INTERNAL, "stream ended without an end-of-stream message")
        flags, data = envelope
        if flags & _protocol.FLAG_END_STREAM:
            self.close()
            self._finish(data)
            raise StopIteration
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.close()
            raise ConnectError(Code.DEADLINE_EXCEEDED, "the stream outlived its timeout")
        return self._client._decode(data, self._call.method.output)

    def _next_envelope(self) -> tuple[int, bytes] | None:
        try:
            return _protocol.read_envelope(self._response.read, self._encoding, self._client.config.read_limit)
        except ConnectError as e:
            if e.code is Code.RESOURCE_EXHAUSTED:
                raise
            raise ConnectError(Code.INTERNAL, f"malformed stream: {e.message}") from None
        except TransportTimeout as e:
            raise _timeout_error(self._deadline, e) from None
        except TransportError as e:
            raise _read_error(self._deadline, e) from None

    def _finish(self, data: bytes) -> None:
        self._call.response_trailers, error = _protocol.read_end_stream(data, self._call.response_headers)
        if error is not None:
            raise error

    def _end_read(self) -> bool:
        """Leave ``next()``; True if the stream was closed meanwhile (its response then closes)."""
        with self._lock:
            self._reading = False
            canceled = self._canceled
        if canceled:
            self._response.close()
        return canceled

    def _revoke(self) -> None:
        """The call's token was cancelled: close, and say so to every later ``next()``."""
        with self._lock:
            self._revoked = not self._done
        self.close()

    def close(self) -> None:
        """End the call early and release its connection. Safe from any thread: a reader
        waiting in ``next()`` meanwhile gets ``ConnectError(canceled)``."""
        with self._lock:
            if self._done:
                return
            self._done = True
            self._canceled = reading = self._reading
        self._forget()
        if reading:
            self._response.abort()  # the reader wakes and closes the response itself
        else:
            self._response.close()

    def __enter__(self) -> ServerStream[Res]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# --- errors ---------------------------------------------------------------------------------


def _closed() -> ConnectError:
    return ConnectError(Code.CANCELED, "the stream was closed while this call waited for it")


def _cancelled() -> ConnectError:
    return ConnectError(Code.CANCELED, "the call was cancelled")


def _timeout_error(deadline: float | None, cause: TransportError) -> ConnectError:
    if deadline is not None:
        return ConnectError(Code.DEADLINE_EXCEEDED, "the call outlived its timeout")
    return ConnectError(Code.UNAVAILABLE, f"timed out: {cause.reason}")


def _read_error(deadline: float | None, cause: TransportError) -> ConnectError:
    if deadline is not None and time.monotonic() >= deadline:
        return ConnectError(Code.DEADLINE_EXCEEDED, "the call outlived its timeout")
    return ConnectError(Code.UNAVAILABLE, f"connection lost: {cause.reason}")
