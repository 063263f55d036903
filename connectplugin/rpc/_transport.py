"""Transports: every way request bytes leave the process, behind one small contract.

A :class:`Transport` reaches one base URL: ``send`` returns a :class:`Response` once its
headers are in, ``close`` drops idle connections. Foreign failures (urllib3, requests,
http.client, sockets) become :class:`TransportError` here and nowhere else, as requests'
``HTTPAdapter.send`` does with its except ladder.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import queue
import re
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from . import _protocol
from . import tls as _tls

# --- the contract ---------------------------------------------------------------------------


class TransportError(Exception):
    """Bytes could not be exchanged with the peer.

    ``reason`` is the innermost cause in its own words. ``refused`` is true when the peer
    refused the connection: nothing listens at its address, and nothing was sent.
    """

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused


class TransportTimeout(TransportError):
    """Connecting, or waiting for the peer's next bytes, took longer than its timeout."""


class TransportCanceled(TransportError):
    """The call was given up before the peer answered (its caller cancelled it, or left);
    its connection is closed, so the peer sees it go."""


CANCEL_CHECK_INTERVAL = 0.25
"""Seconds between looks at whether a call is still wanted, while its peer is quiet."""


class Abort:
    """How one call is given up from another thread: calling it shuts down the connection
    the call waits on, so that wait ends with a :class:`TransportError`.

    A transport hands it the socket of the connection it takes (``hold``) and takes it back
    before that connection may serve another call (``release``); a socket handed over after
    the abort is shut down at once. Where a transport has no socket (in process) the call's
    handler sees ``fired`` as its client having gone. Safe from any thread.
    """

    __slots__ = ("_lock", "_sock", "fired")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _sock and fired; shutdown() never blocks
        self._sock: socket.socket | None = None
        self.fired = False

    def __call__(self) -> None:
        with self._lock:
            self.fired = True
            _shut(self._sock)
            self._sock = None

    def hold(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.fired:
                _shut(sock)
            else:
                self._sock = sock

    def release(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self._sock is sock:
                self._sock = None

    def is_set(self) -> bool:
        return self.fired


class _Calling(threading.local):
    """The Abort of the call this thread is sending, for the pools and adapters below."""

    abort: Abort | None = None
    connect_timeout: float | None = None


_calling = _Calling()


class Response:
    """An HTTP response whose headers have arrived; its body is read on demand.

    ``headers`` are keyed by lower-cased name, a repeated field one entry with its values
    joined by ", "; ``header_items()`` gives the fields as received, for a proxy to pass on.
    ``read(n)`` returns up to ``n`` bytes of the body as sent (still compressed), fewer only at
    its end; ``read1(n)`` returns what has arrived, waiting only when nothing has. Reads raise
    :class:`TransportError`. ``close()`` returns the connection to its pool when the body was
    read to its end, and drops it otherwise. One thread at a time reads a response.
    """

    __slots__ = ("status", "reason")

    headers: Mapping[str, str]

    def __init__(self, status: int, reason: str | None) -> None:
        self.status = status
        self.reason = reason

    def header_items(self) -> list[tuple[str, str]]:
        return list(self.headers.items())

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def read1(self, n: int) -> bytes:
        return self.read(n)

    def wait(self, timeout: float) -> bool:
        """Whether body bytes (or its end) arrived within ``timeout`` seconds, so that
        ``read1`` returns without waiting on the peer. True when the transport cannot tell."""
        return True

    def abort(self) -> None:
        """Safe from any thread, unlike the rest: shut the connection down so that a read
        blocked on it returns (the reader then closes the response). Does nothing where the
        transport cannot."""

    def close(self) -> None:
        raise NotImplementedError


class Transport(Protocol):
    """Sends requests to one base URL. Implementations are safe from any thread."""

    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        connect_timeout: float,
        read_timeout: float | None,
        abort: Abort | None = None,
    ) -> Response:
        """Send ``method target`` (the path below the base URL, query included).

        ``read_timeout`` bounds each wait for the peer (None: wait indefinitely). ``abort``,
        once called, ends the exchange (see :class:`Abort`). Raises :class:`TransportError`.
        """
        ...

    def close(self) -> None:
        """Close idle connections; a later ``send`` opens new ones."""
        ...


def for_session(session: requests.Session, base_url: str) -> AdapterTransport | PoolTransport:
    """The transport through ``session``'s adapter for ``base_url``; its urllib3 pool itself
    when the adapter is requests' own, which sends a request the same way for less."""
    adapter = session.get_adapter(base_url + "/")
    parts = urlsplit(base_url)
    if _is_stock(adapter) and not (parts.query or parts.fragment):
        assert isinstance(adapter, HTTPAdapter)
        return PoolTransport(adapter, session, base_url, parts.path)
    return AdapterTransport(adapter, session, base_url)


# --- foreign exceptions, translated once ----------------------------------------------------


def _translate(e: BaseException) -> TransportError:
    """The TransportError for a failure of urllib3, requests, http.client or a socket."""
    if _timed_out(e):
        return TransportTimeout(_reason(e))
    return TransportError(_reason(e), refused=_refused(e))


_FOREIGN = (requests.exceptions.RequestException, Urllib3Error, http.client.HTTPException, OSError)
"""What a transport's collaborators raise when bytes cannot be exchanged."""


def _timed_out(e: BaseException) -> bool:
    """Whether a failure is a timeout, as requests' HTTPAdapter.send classifies it."""
    if isinstance(e, MaxRetryError):
        # urllib3 makes a refused connection (NewConnectionError) a ConnectTimeoutError too.
        return isinstance(e.reason, ConnectTimeoutError) and not isinstance(e.reason, NewConnectionError)
    return isinstance(e, (requests.exceptions.Timeout, ReadTimeoutError, TimeoutError))


def _refused(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 8:  # the chain is short; the bound guards against cycles
        if isinstance(e, ConnectionRefusedError):
            return True
        if isinstance(e, MaxRetryError) and e.reason is not None:
            e = e.reason
        elif e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        else:
            e = e.__cause__ or e.__context__
        seen += 1
    return False


def _reason(e: BaseException) -> str:
    while True:
        if isinstance(e, MaxRetryError) and e.reason is not None:
            e = e.reason
        elif e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        else:
            break
    return _tls.explain(e)


# --- requests' HTTPAdapter, its urllib3 pool called directly --------------------------------


_SEND_STEPS = (
    "send",
    "get_connection_with_tls_context",
    "build_connection_pool_key_attributes",
    "cert_verify",
    "request_url",
    "add_headers",
    "build_response",
)
"""The methods HTTPAdapter.send is made of; PoolTransport does what they do by default."""


def _is_stock(adapter: BaseAdapter) -> bool:
    """True for requests' HTTPAdapter and subclasses that change only its pool set-up
    (``init_poolmanager``, as TLS customisations do): calling their pool directly is the
    same as calling ``send``. A subclass that changes how a request is sent is called through
    ``send``, and so is any other adapter (the in-process WSGIAdapter)."""
    return isinstance(adapter, HTTPAdapter) and all(
        getattr(type(adapter), name) is getattr(HTTPAdapter, name) for name in _SEND_STEPS
    )


class _FileResponse(Response):
    """A response read through ``read(n)`` and let go of through ``close()``."""

    __slots__ = ("headers", "_read", "_close", "_raw")

    def __init__(
        self,
        status: int,
        reason: str | None,
        headers: Mapping[str, str],
        read: Callable[[int], bytes],
        close: Callable[[], None],
        raw: Any = None,
    ) -> None:
        super().__init__(status, reason)
        self.headers = headers
        self._read = read
        self._close = close
        self._raw = raw
        """The urllib3 response (or in-process body) underneath, for ``abort``."""

    def abort(self) -> None:
        abort = getattr(self._raw, "abort", None)  # the in-process body wakes its reader
        if abort is not None:
            abort()
            return
        _shut(_socket_of(self._raw))

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except _FOREIGN as e:
            raise _translate(e) from None

    def close(self) -> None:
        self._close()


class PoolTransport:
    """requests' HTTPAdapter, with its urllib3 pool for the base URL called directly.

    Does for our requests what ``HTTPAdapter.send`` does (no proxies, which calls never had),
    without building a ``requests.Response`` (its cookie jar and bookkeeping cost as much as
    the rest of a call): the pool and its TLS settings come from the adapter, with the
    session's ``verify`` and ``cert``, on the first call; the adapter's retry policy applies.
    """

    def __init__(self, adapter: HTTPAdapter, session: requests.Session, base_url: str, prefix: str) -> None:
        self._adapter = adapter
        self._session = session
        self._base_url = base_url
        self._prefix = prefix
        """The base URL's path, which every request target starts with."""
        self._retries: Any = adapter.max_retries
        # Set by one call or another; any thread may replace it with an equal pool.
        self._pool: urllib3.HTTPConnectionPool | None = None

    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        connect_timeout: float,
        read_timeout: float | None,
        abort: Abort | None = None,
    ) -> Response:
        # The arguments HTTPAdapter.send passes.
        arguments: dict[str, Any] = dict(
            body=body,
            headers=headers,
            retries=self._retries,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        )
        try:
            pool = self._pool or self._connect()
            with _sending(abort, connect_timeout):
                try:
                    response = pool.urlopen(method, self._prefix + target, **arguments)
                except ClosedPoolError:
                    # The session closed the pool (Session.close(), or it was the least recently
                    # used of too many); nothing was sent. Fetch the session's new pool and go again.
                    response = self._connect().urlopen(method, self._prefix + target, **arguments)
        except _FOREIGN as e:
            raise _translate(e) from None

        def close() -> None:
            response.close()  # drops the connection, unless fully read (then already back)
            response.release_conn()  # either way the pool gets its slot back, as with requests

        headers = {key.lower(): value for key, value in response.headers.itermerged()}
        return _FileResponse(response.status, response.reason, headers, response.read, close, response)

    def close(self) -> None:
        """Close the pool's idle connections; a later call takes a new pool from the session."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _connect(self) -> urllib3.HTTPConnectionPool:
        request = requests.PreparedRequest()
        request.url = self._base_url + "/"
        verify, cert = _tls_settings(self._session)
        pool = self._adapter.get_connection_with_tls_context(request, verify, cert=cert)
        self._adapter.cert_verify(pool, request.url, verify, cert)
        assert isinstance(pool, urllib3.HTTPConnectionPool)
        _let_abort_reach(pool)
        self._pool = pool
        return pool


@contextlib.contextmanager
def _sending(abort: Abort | None, connect_timeout: float) -> Iterator[None]:
    """Make ``abort`` this thread's current one while it sends through a pool."""
    if abort is None:
        yield
        return
    _calling.abort, _calling.connect_timeout = abort, connect_timeout
    try:
        yield
    finally:
        _calling.abort = _calling.connect_timeout = None


_ABORT_ATTRIBUTE = "_connectplugin_abort"
"""Set on a urllib3 connection while a cancellable call holds it: that call's Abort."""


def _let_abort_reach(pool: urllib3.HTTPConnectionPool) -> None:
    """Hand the socket of each connection a cancellable call takes from ``pool`` to its Abort.

    urllib3 offers no way to reach the connection a request waits on, so the pool's own two
    doors are watched (``_get_conn`` and ``_put_conn``, alike in urllib3 1.26 and 2): a
    connection taken for a call with an Abort is connected at once, so that its socket
    exists before the request waits, and handed to the Abort; it is taken back before the
    pool may lend it again. Calls without an Abort (the session's own requests too) pass as
    before. Idempotent.
    """
    if getattr(pool, _ABORT_ATTRIBUTE, False):
        return
    take, give_back = pool._get_conn, pool._put_conn

    def get_conn(timeout: float | None = None) -> Any:
        conn: Any = take(timeout)  # an HTTPConnection, with its socket (urllib3 types it less)
        abort = _calling.abort
        if abort is not None:
            if conn.sock is None:
                conn.timeout = _calling.connect_timeout
                conn.connect()
            abort.hold(conn.sock)
            setattr(conn, _ABORT_ATTRIBUTE, abort)
        return conn

    def put_conn(conn: Any) -> None:
        abort = conn.__dict__.pop(_ABORT_ATTRIBUTE, None) if conn is not None else None
        if abort is not None:
            abort.release(conn.sock)
        give_back(conn)

    pool._get_conn = get_conn  # type: ignore[method-assign]
    pool._put_conn = put_conn  # type: ignore[method-assign]
    setattr(pool, _ABORT_ATTRIBUTE, True)


def _tls_settings(session: requests.Session) -> tuple[bool | str, Any]:
    """The session's ``verify`` and ``cert``; a ``verify`` of None verifies, as by default."""
    verify = session.verify
    return (True if verify is None else verify), session.cert


# --- any requests transport adapter ---------------------------------------------------------


class AdapterTransport:
    """Any ``requests`` transport adapter (a customised HTTPAdapter, the in-process
    :class:`WSGIAdapter`), called through ``send`` with the session's TLS settings."""

    def __init__(self, adapter: BaseAdapter, session: requests.Session, base_url: str) -> None:
        self._adapter = adapter
        self._session = session
        self._base_url = base_url

    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        connect_timeout: float,
        read_timeout: float | None,
        abort: Abort | None = None,
    ) -> Response:
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = self._base_url + target
        prepared.headers = CaseInsensitiveDict(headers)
        prepared.body = body
        prepared.hooks = {"response": []}
        verify, cert = _tls_settings(self._session)
        try:
            if abort is not None and isinstance(self._adapter, HTTPAdapter):
                # The pool its send will take the connection from (the adapter's cached one).
                pool = self._adapter.get_connection_with_tls_context(prepared, verify, cert=cert)
                if isinstance(pool, urllib3.HTTPConnectionPool):
                    _let_abort_reach(pool)
            with _sending(abort, connect_timeout):  # in process, the WSGIAdapter reads it
                response = self._adapter.send(
                    prepared,
                    stream=True,
                    timeout=(connect_timeout, read_timeout),  # type: ignore[arg-type]  # read may be None
                    verify=verify,
                    cert=cert,
                )
        except _FOREIGN as e:
            raise _translate(e) from None
        headers = {key.lower(): value for key, value in response.headers.items()}
        return _FileResponse(
            response.status_code, response.reason, headers, response.raw.read, response.close, response.raw
        )

    def close(self) -> None:
        pass  # the session closes its adapters


# --- plain keep-alive connections, HTTP/1.1 spoken directly ---------------------------------

_MAX_HEAD = 65536
"""Most bytes of a response's status line and headers (http.client's line limit)."""
_MAX_HEADERS = 100
"""Most header fields in a response (http.client's limit)."""
_MAX_INTERIM = 10
"""Most interim (1xx) responses skipped before a final one; more is a peer stalling us."""
_RECV = 65536
_ILLEGAL_VALUE = re.compile(r"\n(?![ \t])|\r(?![ \t\n])").search
_ILLEGAL_TARGET = re.compile("[\x00-\x20\x7f]").search
# The same checks as http.client's putrequest/putheader: no header or line can be smuggled in.
_STATUS_LINE = re.compile(r"HTTP/\d\.\d (\d{3})(?: (.*))?").fullmatch
_PLAIN_FIELDS = re.compile(f"(?:{_protocol.HEADER_LINE.pattern})*").fullmatch
"""Header lines that are all well formed (none folded): the usual head, checked in one pass."""
_BODYLESS_STATUS = frozenset({204, 304})


class _Connection:
    """One keep-alive connection of a pool: its socket, and bytes received but not yet read."""

    __slots__ = ("sock", "buffer", "_timeout", "_abort", "timeout", "deadline", "cancelled", "_next_check")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self._timeout: float | None = sock.gettimeout()
        self._abort: Abort | None = None
        self.timeout: float | None = None
        """Longest wait for the peer's next bytes, in seconds."""
        self.deadline: float | None = None
        """``time.monotonic()`` past which no wait for the current response goes on, however
        steadily the peer trickles; None: only ``timeout`` bounds each wait."""
        self.cancelled: Callable[[], bool] | None = None
        """Asked every ``CANCEL_CHECK_INTERVAL`` seconds of waiting; once true the wait ends
        with :class:`TransportCanceled`, however steadily the peer trickles."""
        self._next_check = 0.0

    def hold(self, abort: Abort | None) -> None:
        """Lend the socket to a cancellable call's Abort until ``release()``."""
        if abort is not None:
            self._abort = abort
            abort.hold(self.sock)

    def release(self) -> bool:
        """Take the socket back from the call's Abort; whether the Abort fired (the socket is
        shut down then, and must not be used again)."""
        abort, self._abort = self._abort, None
        if abort is None:
            return False
        abort.release(self.sock)
        return abort.fired

    def settimeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:  # a system call each time it changes
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def start(self, timeout: float | None, deadline: float | None, cancelled: Callable[[], bool] | None) -> None:
        """Take a call's timeout, deadline and cancellation check."""
        self.timeout, self.deadline, self.cancelled = timeout, deadline, cancelled
        if cancelled is not None:
            self._next_check = time.monotonic() + CANCEL_CHECK_INTERVAL
        self.settimeout(timeout)

    def done(self) -> None:
        """Forget the finished call's deadline and cancellation check."""
        self.deadline = self.cancelled = None

    def fill(self) -> bool:
        """Receive what has arrived (waiting up to the timeout, deadline or cancellation);
        False at its end."""
        data = self.sock.recv(_RECV) if self.deadline is None and self.cancelled is None else self._recv_in_steps()
        self.buffer += data
        return bool(data)

    def _recv_in_steps(self) -> bytes:
        now = time.monotonic()
        limit = self.deadline
        if self.timeout is not None:
            limit = now + self.timeout if limit is None else min(limit, now + self.timeout)
        if self.cancelled is not None and now >= self._next_check:
            self._next_check = now + CANCEL_CHECK_INTERVAL
            if self.cancelled():
                raise TransportCanceled("the call was given up while waiting for the peer")
        while True:
            step = None if self.cancelled is None else CANCEL_CHECK_INTERVAL
            if limit is not None:
                left = limit - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the peer did not answer in time")
                step = left if step is None else min(step, left)
            self.settimeout(step)
            try:
                return self.sock.recv(_RECV)
            except TimeoutError:
                if self.cancelled is not None and self.cancelled():
                    raise TransportCanceled("the call was given up while waiting for the peer") from None

    def close(self) -> None:
        self.release()
        try:
            self.sock.close()
        except OSError:
            pass


class _PooledResponse(Response):
    """A response on one pooled connection, which goes back to the pool if read to its end.

    The body is framed by Content-Length, by chunks, or by the end of the connection; the
    bytes of a chunked body are passed on without their framing, as http.client does.
    """

    __slots__ = ("_items", "_headers", "_conn", "_pool", "_left", "_chunk", "_ended", "_failed", "_will_close", "_trailers")

    # _chunk: where a chunked body is between its data sections.
    _NOT_CHUNKED, _SIZE, _DATA_END, _TRAILERS = 0, 1, 2, 3

    def __init__(self, conn: _Connection, pool: ConnectionPool, head_only: bool) -> None:
        status, reason, version, items = _read_head(conn)
        super().__init__(status, reason)
        self._items = items
        self._headers: dict[str, str] | None = None
        self._conn = conn
        self._pool = pool
        self._failed = False
        self._chunk = self._NOT_CHUNKED
        self._trailers = 0
        self._left: int | None = 0
        """Bytes left in the current data section; None: the body ends with the connection."""
        headers = self.headers
        connection = headers.get("connection")
        tokens = {t.strip().lower() for t in connection.split(",")} if connection else set()
        self._will_close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
        encoding = headers.get("transfer-encoding")
        if head_only or status in _BODYLESS_STATUS or status < 200:
            pass
        elif encoding is not None:
            if "content-length" in headers:
                # Framed by its chunks, not by its length: a relay passing the length on would
                # let the next response on the client's connection be read as this body.
                self._items = [(k, v) for k, v in items if k.lower() != "content-length"]
                self._headers = None
            if encoding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._chunk = self._SIZE
            else:
                self._left = None
        elif "content-length" in headers:
            lengths = {v.strip() for v in headers["content-length"].split(",")}
            length = lengths.pop() if len(lengths) == 1 else ""
            if not (length.isascii() and length.isdigit()):
                raise http.client.HTTPException(f"bad Content-Length {headers['content-length']!r}")
            self._left = int(length)
        else:
            self._left = None
        if self._left is None:
            self._will_close = True
        self._ended = self._left == 0 and not self._chunk

    @property
    def headers(self) -> Mapping[str, str]:  # type: ignore[override]  # built on first use: a proxy reads header_items()
        if self._headers is None:
            self._headers = {}
            for key, value in self._items:
                key = key.lower()
                previous = self._headers.get(key)
                self._headers[key] = value if previous is None else f"{previous}, {value}"
        return self._headers

    def header_items(self) -> list[tuple[str, str]]:
        return self._items

    def read(self, n: int) -> bytes:
        parts = []
        while n > 0:
            data = self.read1(n)
            if not data:
                break
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def read1(self, n: int) -> bytes:
        if n <= 0:
            return b""
        conn = self._conn
        try:
            while not self._ready():
                if not conn.fill():
                    if self._left is None:
                        self._ended = True
                    else:
                        raise http.client.IncompleteRead(b"", self._left)
        except _FOREIGN as e:
            self._failed = True
            raise _translate(e) from None
        if self._ended:
            return b""
        buffer = conn.buffer
        take = min(n, len(buffer)) if self._left is None else min(n, len(buffer), self._left)
        data = bytes(buffer[:take])
        del buffer[:take]
        if self._left is not None:
            self._left -= take
            if not self._left:
                if self._chunk:
                    self._chunk = self._DATA_END
                else:
                    self._ended = True
        return data

    def _ready(self) -> bool:
        """Parse the chunk framing the buffer holds; whether ``read1`` can now return
        without waiting on the peer (bytes to give, or the body's end)."""
        buffer = self._conn.buffer
        while not self._ended:
            if self._left or self._left is None:
                return bool(buffer)
            if not self._chunk:  # unreachable: a Content-Length body at 0 has ended
                self._ended = True
                break
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise http.client.LineTooLong("chunk size line")
                return False
            line = bytes(buffer[:end]).strip()
            del buffer[: end + 1]
            if self._chunk == self._DATA_END:
                if line:
                    raise http.client.HTTPException("a chunk's data is longer than its size")
                self._chunk = self._SIZE
            elif self._chunk == self._SIZE:
                size = line.split(b";", 1)[0].strip()
                if not _protocol.is_chunk_size(size):
                    raise http.client.HTTPException(f"bad chunk size {size[:20]!r}")
                self._left = int(size, 16)
                if not self._left:
                    self._chunk = self._TRAILERS
            elif not line:  # the blank line after the trailers (we keep none)
                self._ended = True
            else:
                self._trailers += 1
                if self._trailers > _MAX_HEADERS:
                    raise http.client.HTTPException(f"got more than {_MAX_HEADERS} trailers")
        return True

    def wait(self, timeout: float) -> bool:
        try:
            if self._ready():
                return True
        except _FOREIGN:
            return True  # read1 raises it
        return _readable(self._conn.sock, timeout)

    def abort(self) -> None:
        _shut(self._conn.sock)

    def close(self) -> None:
        conn = self._conn
        aborted = conn.release()
        if self._ended and not self._failed and not self._will_close and not conn.buffer and not aborted:
            self._pool.give_back(conn)
        else:
            conn.close()


def _read_head(conn: _Connection) -> tuple[int, str, str, list[tuple[str, str]]]:
    """(status, reason, HTTP version, header fields) of the next final response on ``conn``;
    up to ``_MAX_INTERIM`` interim (1xx) responses are skipped.

    Strict, as the head may be passed on to another client: lines end in CRLF only, names are
    tokens, values and the reason phrase hold no control character but tab.
    """
    buffer = conn.buffer
    interim = 0
    while True:
        start = 0
        while True:
            end = buffer.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(buffer) > _MAX_HEAD:
                raise http.client.LineTooLong("response head")
            start = max(0, len(buffer) - 3)
            if not conn.fill():
                if buffer:
                    raise http.client.IncompleteRead(bytes(buffer[:100]))
                raise http.client.RemoteDisconnected("the peer closed the connection without a response")
        head = bytes(buffer[: end + 2]).decode("latin-1")  # each line with its CRLF
        del buffer[: end + 4]
        first = head.index("\r\n")
        status_line = _STATUS_LINE(head[:first])
        if status_line is None or _protocol.has_illegal_text(head[:first]):
            raise http.client.BadStatusLine(head[:first][:100])
        status, reason = int(status_line[1]), status_line[2] or ""
        if not 100 <= status < 600 or status == 101:  # we never ask to switch protocols
            raise http.client.BadStatusLine(head[:first][:100])
        version = head[:8]
        fields = head[first + 2 :]
        if _PLAIN_FIELDS(fields):
            items = [(name, value.strip(" \t")) for name, value in _protocol.HEADER_LINE.findall(fields)]
        else:
            items = _fields(fields.split("\r\n")[:-1])
        if len(items) > _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        if status >= 200:
            return status, reason.strip(" \t"), version, items
        interim += 1
        if interim > _MAX_INTERIM:
            raise http.client.HTTPException(f"more than {_MAX_INTERIM} interim (1xx) responses")


def _fields(lines: list[str]) -> list[tuple[str, str]]:
    """The fields of header lines that are not all well formed: folded ones are joined, and
    the first malformed one is an error."""
    if len(lines) > _MAX_HEADERS:
        raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
    items: list[tuple[str, str]] = []
    for line in lines:
        if _protocol.has_illegal_text(line):
            raise http.client.HTTPException(f"control character in header line {line[:100]!r}")
        if line[:1] in (" ", "\t") and items:  # an obsolete folded continuation
            name, value = items[-1]
            items[-1] = (name, value + " " + line.strip(" \t"))
            continue
        name, colon, value = line.partition(":")
        if not colon or not _protocol.is_header_name(name):
            raise http.client.HTTPException(f"malformed header line {line[:100]!r}")
        items.append((name, value.strip(" \t")))
    return items


class ConnectionPool:
    """Idle keep-alive connections to one base URL, speaking HTTP/1.1 on the socket itself.

    Lighter than urllib3 and http.client on the router's hot path: one write per request
    (head and body together, with http.client's checks against smuggled lines), a response
    head parsed in one pass, and a buffer of its own, so a wait for more body bytes looks
    at the socket only when the buffer holds none. Safe from any thread; ``_lock`` guards
    ``_idle``.
    """

    def __init__(self, base_url: str, size: int, tls: _tls.TLSConfig | None = None) -> None:
        url = urlsplit(base_url)
        self._https = url.scheme == "https"
        # Built once: loading our key pair costs more than a call.
        self._context: ssl.SSLContext | None = None
        if self._https:
            self._context = _tls.client_context(tls) if tls is not None else ssl.create_default_context()
        self._pin = _tls.pin_fingerprint(tls.trust) if tls is not None else None
        self._plugin_id = tls.plugin_id if tls is not None else None
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if self._https else 80)
        # The name the server's certificate must carry: the configured one, else the URL's.
        self._server_name = (tls.server_name if tls is not None else None) or self._host
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._authority = host if self._port == (443 if self._https else 80) else f"{host}:{self._port}"
        self._prefix = url.path.rstrip("/")
        self._size = size
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        connect_timeout: float,
        read_timeout: float | None,
        abort: Abort | None = None,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> Response:
        """Send on an idle connection (or a new one).

        An idle connection the peer closed while we held it fails before any reply; that one
        case is retried once on a fresh connection. ``abort`` holds the connection's socket
        until the response is closed (see :class:`Abort`). ``read_timeout`` bounds each wait
        for the peer, ``deadline`` (a ``time.monotonic()``) all waits for this response
        together, head and body: a peer trickling bytes keeps a call no longer. While waiting,
        ``cancelled()`` is asked every ``CANCEL_CHECK_INTERVAL`` seconds; once it is true the
        connection is closed and :class:`TransportCanceled` raised. A header or target that
        would smuggle a line in is ``ValueError``, as in http.client.
        """
        request = self._request(method, self._prefix + target, headers, body)
        try:
            conn, reused = self._take(connect_timeout)
            try:
                conn.hold(abort)
                return self._exchange(conn, method, request, read_timeout, cancelled, deadline)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if not reused or (abort is not None and abort.fired):
                    raise
            except BaseException:
                conn.close()
                raise
            conn = self._connect(connect_timeout)
            try:
                conn.hold(abort)
                return self._exchange(conn, method, request, read_timeout, cancelled, deadline)
            except BaseException:
                conn.close()
                raise
        except _FOREIGN as e:
            raise _translate(e) from None

    def _request(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
        if _ILLEGAL_TARGET(method) or _ILLEGAL_TARGET(target):
            raise ValueError(f"method or target contains a control character or space: {method} {target!r}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._authority}"]
        sized = False
        for name, value in headers.items():
            if not _protocol.is_header_name(name):
                raise ValueError(f"invalid header name {name!r}")
            if ("\r" in value or "\n" in value) and _ILLEGAL_VALUE(value):
                raise ValueError(f"invalid header value {value!r}")
            lowered = name.lower()
            if lowered == "host":  # the caller's own Host replaces ours
                lines[1] = f"{name}: {value}"
                continue
            sized = sized or lowered == "content-length"
            lines.append(f"{name}: {value}")
        if not sized and (body or method in ("POST", "PUT", "PATCH")):
            lines.append(f"Content-Length: {len(body or b'')}")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode("latin-1")
        return head + body if body else head

    def _exchange(
        self,
        conn: _Connection,
        method: str,
        request: bytes,
        timeout: float | None,
        cancelled: Callable[[], bool] | None,
        deadline: float | None,
    ) -> _PooledResponse:
        if cancelled is not None and deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout  # waiting for the head: as long as one wait
        conn.start(timeout, deadline, cancelled)
        try:
            conn.sock.sendall(request)
        except ssl.SSLEOFError:
            alert = _alert_sent(conn.sock)
            if alert is None:
                raise
            raise alert from None
        return _PooledResponse(conn, self, method == "HEAD")

    def _take(self, connect_timeout: float) -> tuple[_Connection, bool]:
        # An idle connection the peer has closed is not looked for here: sending on it fails
        # before any reply, and send() retries that once on a fresh one.
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(connect_timeout), False

    def _connect(self, timeout: float) -> _Connection:
        sock = socket.create_connection((self._host, self._port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                try:
                    sock = self._context.wrap_socket(sock, server_hostname=self._server_name)
                except TimeoutError:
                    # A plaintext server waits for a request line the handshake never sends.
                    raise ssl.SSLError(
                        f"no answer to the TLS handshake within {timeout:g} s: is the server serving "
                        "plain HTTP (http://, not https://)?"
                    ) from None
                if self._pin is not None:
                    _check_pin(sock, self._pin)
                if self._plugin_id is not None:
                    _tls.check_names_plugin(sock.getpeercert(binary_form=True) or b"", self._plugin_id)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)

    def give_back(self, conn: _Connection) -> None:
        conn.done()
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _alert_sent(sock: socket.socket) -> ssl.SSLError | None:
    """Why a TLS server closed a connection a request could not be sent on: with TLS 1.3
    a server refuses a client certificate (revoked, say) after the client's handshake has
    ended, and its alert waits unread behind the failed send. That alert as an error, if
    there is one."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except ssl.SSLError as e:
        if "ALERT" in (e.reason or ""):
            return e
    except OSError:
        pass
    return None


def _check_pin(sock: ssl.SSLSocket, pin: str) -> None:
    """The server's certificate must be the pinned one (its chain was verified already)."""
    der = sock.getpeercert(binary_form=True) or b""
    if hashlib.sha256(der).hexdigest() != pin:
        raise ssl.SSLError("the server's certificate is not the pinned one")


def _socket_of(raw: Any) -> socket.socket | None:
    """The socket a urllib3 response is read from, if it can be found."""
    sock = getattr(getattr(raw, "_connection", None), "sock", None)  # kept while streaming
    if sock is None:
        # http.client lets go of the connection's socket when the reply says it will close;
        # the reply's file still reads from it.
        reader = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(reader, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _shut(sock: socket.socket | None) -> None:
    """Shut a socket down both ways: a read blocked on it returns, from any thread."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already, or never connected: nothing blocks on it


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has bytes (or its end) to read within ``timeout`` seconds.

    poll(), not select(): a busy host holds descriptors past select's limit of 1023.
    """
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted already, invisible to poll
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


# --- in process: a WSGI app called directly -------------------------------------------------


_CLIENT_GONE = "connectplugin.client_disconnected"


class WSGIAdapter(BaseAdapter):
    """A ``requests`` transport adapter that calls a WSGI app in this process instead of a socket.

    Unary calls run on the caller's thread; a stream runs on a thread of its own, as it would
    in a server. Safe from any thread if the app is.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        super().__init__()
        self.app = app

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        url = urlsplit(request.url or "")
        raw_body = request.body or b""
        body = raw_body.encode() if isinstance(raw_body, str) else bytes(raw_body)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method or "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": url.path or "/",
            "QUERY_STRING": url.query,
            "SERVER_NAME": url.hostname or "localhost",
            "SERVER_PORT": str(url.port or 80),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "in-process",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": url.scheme or "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        abort = _calling.abort
        if abort is not None:  # a cancellable call: its handler sees it cancelled as its client gone
            environ[_CLIENT_GONE] = abort.is_set
        for key, value in request.headers.items():
            name = key.upper().replace("-", "_")
            if name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[name] = value
            else:
                environ["HTTP_" + name] = value
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return lambda data: None

        if _protocol.is_streaming(environ.get("CONTENT_TYPE", "")):
            # A stream runs on its own thread, as it would in a server, so the handler
            # makes progress (and sees the caller leave) whether or not the caller reads.
            raw: io.RawIOBase = _PumpedBody(self.app, environ, start_response)
        else:
            app_iter = self.app(environ, start_response)
            chunks = iter(app_iter)
            first = next(chunks, b"")  # runs the app far enough to call start_response
            raw = _BodyReader(first, chunks, app_iter)
        if not started:  # the app failed before it could answer: what a server would send
            started[:] = ["500 Internal Server Error", [("Content-Length", "0")]]
            raw = _BodyReader(b"", iter(()), ())
        response = requests.Response()
        status, headers = started
        response.status_code = int(status.split(" ", 1)[0])
        response.reason = status.split(" ", 1)[1] if " " in status else ""
        merged: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        for key, value in headers:  # a repeated field is one, as requests' own adapter has it
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        response.headers = merged
        response.raw = raw
        response.url = request.url or ""
        response.request = request
        response.connection = self  # type: ignore[assignment]
        return response

    def close(self) -> None:
        pass


class _BodyReader(io.RawIOBase):
    """A file over a WSGI response iterable, read lazily so streams arrive as they are made."""

    def __init__(self, first: bytes, rest: Iterable[bytes], app_iter: Iterable[bytes]) -> None:
        super().__init__()
        self._buffer = bytearray(first)
        self._rest = iter(rest)
        self._app_iter = app_iter

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1, **_: Any) -> bytes:
        if n is None or n < 0:
            for chunk in self._rest:
                self._buffer += chunk
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        while len(self._buffer) < n:
            more = next(self._rest, None)
            if more is None:
                break
            self._buffer += more
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def release_conn(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        super().close()


class _PumpedBody(io.RawIOBase):
    """A WSGI response produced on a worker thread and read through a queue."""

    def __init__(self, app: Callable[..., Iterable[bytes]], environ: dict[str, Any], start_response: Any) -> None:
        super().__init__()
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._buffer = bytearray()
        self._eof = False
        self._gone = threading.Event()
        aborted = environ.get(_CLIENT_GONE)
        environ[_CLIENT_GONE] = self._gone.is_set if aborted is None else lambda: self._gone.is_set() or aborted()
        started = threading.Event()

        def marking_start_response(*args: Any) -> Any:
            write = start_response(*args)
            started.set()
            return write

        def pump() -> None:
            app_iter: Iterable[bytes] = ()
            try:
                app_iter = app(environ, marking_start_response)
                for chunk in app_iter:
                    started.set()
                    if self._gone.is_set():
                        break
                    if chunk:
                        self._chunks.put(chunk)
            finally:
                close = getattr(app_iter, "close", None)
                if close is not None:
                    close()
                started.set()
                self._chunks.put(None)

        threading.Thread(target=pump, name="inprocess-stream", daemon=True).start()
        started.wait()

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1, **_: Any) -> bytes:
        want = sys.maxsize if n is None or n < 0 else n
        while len(self._buffer) < want and not self._eof:
            chunk = self._chunks.get()
            if chunk is None:
                self._eof = True
            else:
                self._buffer += chunk
        data = bytes(self._buffer[:want])
        del self._buffer[:want]
        return data

    def release_conn(self) -> None:
        self.close()

    def abort(self) -> None:
        """Wake a reader waiting for the next chunk: the body ends there."""
        self._gone.set()
        self._chunks.put(None)

    def close(self) -> None:
        self._gone.set()
        super().close()
