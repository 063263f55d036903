"""TLS serving on cheroot with its pyOpenSSL adapter, behind :class:`~.httpserver.HTTPServer`.

What waitress gives plaintext apps, given here too: limits on slow and idle connections
(:class:`_Connections`), a disconnection check for ``Context.is_active()``, and the client's
verified certificate in the environ. Imported only when a server is configured with TLS, so
plaintext plugins and hosts never load cheroot or pyOpenSSL.
"""

from __future__ import annotations

import enum
import errno
import logging
import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cheroot import connections as cheroot_connections
from cheroot import errors as cheroot_errors
from cheroot import server as cheroot_server
from cheroot import wsgi as cheroot_wsgi
from cheroot.ssl.pyopenssl import pyOpenSSLAdapter
from cheroot.workers import threadpool as cheroot_threadpool
from OpenSSL import SSL

from . import _protocol
from . import tls as _tls
from ._metadata import environ_key

if TYPE_CHECKING:
    from .httpserver import HTTPConfig

CLIENT_DISCONNECTED_KEY = "connectplugin.client_disconnected"
"""WSGI environ key: a callable true once the client has gone (waitress has its own)."""
_TLS_ALERT = 0x15
"""The first byte of a TLS alert record: a client's close_notify before it hangs up."""
_PEER_HUNG_UP = ("EPIPE", "ECONNRESET", "ECONNABORTED", "ESHUTDOWN")
"""What cheroot reports (as text) when a client left while it was being answered."""

log = logging.getLogger("connectplugin.httpserver")


class _StrictHeaderReader(cheroot_server.HeaderReader):
    """cheroot's request header reader, as strict as waitress's: a name that is no token, or
    a value holding a control character, is 400. (cheroot strips blanks and control
    characters around a name: ``X-Plugin-Caller-ID\\x0b`` would pass as the real header.)
    A name with an underscore is dropped, as waitress drops it: in the WSGI environ
    ``X_Plugin_Caller_ID`` and ``X-Plugin-Caller-ID`` would be one key. A folded line
    (obsolete line folding) is 400, as RFC 9112 lets a server answer it.

    The head's lines are gathered first, at once when our reader holds them all, and parsed
    here in one pass: cheroot's reader walks each line through its size check and our
    reader, the most of what reading a request cost.
    """

    def __call__(self, rfile: Any, hdict: Any = None) -> Any:
        head = _buffered_head(rfile) or _read_head(rfile)
        return _parse_head(head, {} if hdict is None else hdict)


def _parse_head(head: bytes, headers: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """``head``'s header lines (through the blank line ending them) into ``headers``, keyed
    as cheroot keys them (title case), repeats of a list-valued header joined by commas;
    ValueError (cheroot answers 400) for anything malformed."""
    if head == b"\r\n":
        return headers
    if not head.endswith(b"\r\n\r\n"):
        raise ValueError("Illegal end of headers.")
    for line in head[:-4].split(b"\r\n"):
        if b"\n" in line or b"\r" in line:
            raise ValueError("HTTP requires CRLF terminators")
        name, colon, value = line.partition(b":")
        if not colon or line[:1] in (b" ", b"\t"):
            raise ValueError("Illegal header line.")
        key = _HEADER_KEYS.get(name)
        if key is None:
            key = _header_key(name)
        value = value.strip()
        if _protocol.has_illegal_text(value.decode("latin-1")):
            raise ValueError("Illegal header value.")
        if not key:  # a name with an underscore
            continue
        if key in _LIST_HEADERS and headers.get(key):
            value = headers[key] + b", " + value
        headers[key] = value
    return headers


_LIST_HEADERS = frozenset(cheroot_server.comma_separated_headers)  # type: ignore[attr-defined]  # not in its stubs
"""Headers whose repeats are joined with commas (cheroot's list)."""
_HEADER_KEYS: dict[bytes, bytes] = {}
"""Valid request header names as sent -> as cheroot keys them (b"" to drop the header)."""
_HEADER_KEYS_KEPT = 256
"""Names remembered at most; all are forgotten when full (clients choose the names)."""


def _header_key(name: bytes) -> bytes:
    """The key of a valid header name, remembered; ValueError for a name that is no token."""
    if not _protocol.is_header_name(name.decode("latin-1")):
        raise ValueError("Illegal header name.")
    key = b"" if b"_" in name else name.title()
    if len(_HEADER_KEYS) >= _HEADER_KEYS_KEPT:
        _HEADER_KEYS.clear()
    _HEADER_KEYS[name] = key
    return key


def _buffered_head(rfile: Any) -> bytes | None:
    """The rest of a request's head, through its blank line, taken from ``rfile`` (cheroot's
    size-checking wrapper of a :class:`_TLSReader`) when it is all buffered and within the
    size limit; else None, and nothing is taken."""
    reader = getattr(rfile, "rfile", None)
    if not isinstance(reader, _TLSReader):
        return None
    head = reader.buffered_head()
    if head is None or (rfile.maxlen and rfile.bytes_read + len(head) > rfile.maxlen):
        return None
    reader.skip(len(head))
    rfile.bytes_read += len(head)
    return head


def _read_head(rfile: Any) -> bytes:
    """The rest of a request's head read line by line, up to its blank line or the first
    line that cannot belong to it (for cheroot's parsing to refuse)."""
    lines = []
    while True:
        line = rfile.readline()
        lines.append(line)
        if line == b"\r\n" or not line.endswith(b"\r\n"):
            return b"".join(lines)


class _Request(cheroot_server.HTTPRequest):
    header_reader = _StrictHeaderReader()

    def parse_request(self) -> None:
        """cheroot's, but a head longer than ``max_request_header_size`` (its request line
        counted) is answered 431 and its connection closed, as waitress answers it (cheroot:
        414 or 413, the latter without closing)."""
        self.rfile = cheroot_server.SizeCheckWrapper(self.conn.rfile, self.server.max_request_header_size)
        setattr(self.conn, _READING_HEAD, True)
        try:
            self.ready = bool(self.read_request_line() and self.read_request_headers())
        except cheroot_errors.MaxSizeExceeded:
            self.ready = False
            self.close_connection = True
            try:
                self.conn.wfile.write(_HEAD_TOO_LARGE)
            except OSError:  # the client left meanwhile (or stopped reading)
                pass
        finally:
            setattr(self.conn, _READING_HEAD, False)


    def respond(self) -> None:
        """cheroot's, with a chunked body read by :class:`_ChunkedBody`, and a body over
        ``max_request_body_size`` or a malformed chunk size that the app let the error of
        through answered 413 or 400 and closed, as waitress answers them (cheroot: 500)."""
        if not self.chunked_read:
            super().respond()
            return
        server = self.server
        self.rfile = _ChunkedBody(self.conn.rfile, server.max_request_body_size, server.max_request_header_size)
        try:
            server.gateway(self).respond()
        except cheroot_errors.MaxSizeExceeded:
            if self.sent_headers:
                raise
            self.simple_response("413 Request Entity Too Large", "The request's body exceeds the limit.\n")
            return
        except _BadChunkSize as e:
            if self.sent_headers:
                raise
            self.simple_response("400 Bad Request", f"{e}\n")  # closes: the framing is lost
            return
        if self.ready:
            self.ensure_headers_sent()
        if self.chunked_write:
            self.conn.wfile.write(b"0\r\n\r\n")


class _ChunkedBody(cheroot_server.ChunkedRFile):
    """cheroot's reader of a chunked request body, whose chunk size lines are held to
    :class:`_ChunkSizeLines` (cheroot read each whole however long, an endless chunk extension
    buffered until ``request_timeout``, and took whatever ``int(x, 16)`` takes)."""

    def __init__(self, rfile: Any, maxlen: int, line_limit: int) -> None:
        super().__init__(_ChunkSizeLines(rfile, line_limit), maxlen)

    def _fetch(self) -> None:
        try:
            super()._fetch()  # type: ignore[misc]  # cheroot's, not in its type stubs
        except OSError as e:  # cheroot's words for a chunk past the limit, as a plain OSError
            if e.args != ("Request Entity Too Large",):
                raise
            raise cheroot_errors.MaxSizeExceeded("Request Entity Too Large", self.maxlen) from None


class _BadChunkSize(ValueError):
    """A chunked request body's size line is not hex digits (with an extension) and CRLF."""


class _ChunkSizeLines:
    """``rfile`` as cheroot's chunked reader sees it: the lines it reads are chunk size lines,
    no longer than ``limit`` bytes (a longer one is MaxSizeExceeded) and well formed (hex
    digits, an optional extension, CRLF: ``_BadChunkSize`` otherwise), as waitress holds them."""

    def __init__(self, rfile: Any, limit: int) -> None:
        self._rfile = rfile
        self._limit = limit

    def readline(self, size: int | None = -1) -> bytes:
        line = self._rfile.readline(self._limit + 1)
        if len(line) > self._limit:
            raise cheroot_errors.MaxSizeExceeded("Request Entity Too Large", self._limit)
        chunk_size = line.removesuffix(b"\r\n").partition(b";")[0]
        if not line.endswith(b"\r\n") or not _protocol.is_chunk_size(chunk_size):
            raise _BadChunkSize(f"bad chunk size line {line[:20]!r}")
        return line

    def read(self, size: int | None = -1) -> bytes:
        return self._rfile.read(size)


_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 38\r\n"
    b"Connection: close\r\n\r\nThe request's head exceeds the limit.\n"
)
"""The answer to a request head over ``HTTPConfig.max_request_header_size``."""


_READING_HEAD = "_connectplugin_reading_head"
"""Set on a cheroot connection while its worker reads a request's head: no call in flight yet."""


class _Workers(cheroot_threadpool.ThreadPool):
    """cheroot's worker threads. Stopping them first ends the connections whose worker still
    reads a request's head (a kept-alive client sent part of its next one): no call is in
    flight there, and waitress drops such a connection at once too. The others get the grace,
    then their sockets are shut, which wakes a worker waiting for its client (cheroot shuts
    only the TLS stream, a close_notify that wakes no read, and failed on our reader)."""

    _threads: list[Any]  # cheroot's, not in its type stubs

    def stop(self, timeout: float | None = 5) -> None:  # type: ignore[override]  # any number
        for worker in list(self._threads):
            conn = worker.conn
            if conn is not None and getattr(conn, _READING_HEAD, False):
                self._force_close(conn)
        super().stop(timeout)  # type: ignore[arg-type]

    @staticmethod
    def _force_close(conn: Any) -> None:
        if conn is None or conn.rfile.closed:
            return
        try:
            sock = socket.socket(fileno=conn.socket.fileno())
        except (OSError, ValueError):  # closed meanwhile
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()


class _CherootConnection(cheroot_server.HTTPConnection):
    RequestHandlerClass = _Request


class _CherootServer(cheroot_wsgi.Server):
    """cheroot's WSGI server whose workers only ever get a connection whose TLS handshake is
    done and whose request head has arrived whole (see :class:`_Connections`)."""

    ConnectionClass = _CherootConnection

    def prepare(self, config: HTTPConfig) -> None:  # type: ignore[override]  # ours takes the limits
        # cheroot's prepare() also binds; HTTPServer.bind() has, so this is the rest of it.
        self._interrupt = None
        self.software = self.software or f"{self.version} Server"
        self._connections = _Connections(self, config)
        self.requests.start()
        self.ready = True
        self._start_time = time.time()

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        """cheroot's own messages, to our logger instead of straight to stderr. A client that
        hung up while it was being answered is no server error (cheroot's pyOpenSSL writer
        reports its EPIPE in a form cheroot does not recognise as one to ignore): DEBUG."""
        if any(name in msg for name in _PEER_HUNG_UP):
            level = logging.DEBUG
        log.log(level, "%s", msg, exc_info=traceback)

    def process_conn(self, conn: Any) -> None:
        """From the selector thread (a new or readable connection) or a worker (a kept-alive
        one with bytes already buffered): to a worker once its request head is in."""
        if self._connections.ready_for_worker(conn):
            super().process_conn(conn)


_ENVIRON_KEYS: dict[bytes, str] = {}
"""Request header names (as cheroot gives them) -> their WSGI environ keys."""
_ENVIRON_KEYS_KEPT = 256
"""Names remembered at most; all are forgotten when full (clients choose the names)."""


def _wsgi_key(name: str) -> str:
    """Where WSGI puts a header: ``environ_key``, but Content-Type and Content-Length
    go without the ``HTTP_`` prefix."""
    key = environ_key(name)
    return key[5:] if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH") else key


class _Gateway(cheroot_wsgi.Gateway_10):
    """cheroot's WSGI 1.0 gateway, adding what waitress offers: a disconnection check, the
    verified client certificate, and its strictness. An app's status or header holding a
    control character is refused in ``start_response`` (nothing can be split into the
    response); a response shorter than its Content-Length closes the connection, so the
    client's next response is never read as its rest."""

    def get_environ(self) -> dict:  # type: ignore[override]  # cheroot's stub says None
        # cheroot formats each header's environ key anew on every request; the names repeat,
        # so here the keys are looked up (cheroot sees no headers, and adds the rest).
        req = self.req
        headers, req.inheaders = req.inheaders, {}
        try:
            environ = super().get_environ()
        finally:
            req.inheaders = headers
        for name, value in headers.items():
            key = _ENVIRON_KEYS.get(name)
            if key is None:
                if len(_ENVIRON_KEYS) >= _ENVIRON_KEYS_KEPT:
                    _ENVIRON_KEYS.clear()
                key = _ENVIRON_KEYS[name] = _wsgi_key(name.decode("latin-1"))
            environ[key] = value.decode("latin-1")
        connection = self.req.conn
        fd = connection.socket.fileno()
        environ[CLIENT_DISCONNECTED_KEY] = lambda: _peer_gone(fd)
        environ[_tls.PEER_CERTIFICATE_KEY] = lambda: _peer_certificate(connection)
        return environ

    def respond(self) -> None:
        self._sent = 0
        super().respond()
        declared = self.remaining_bytes_out
        if declared is not None and self._sent < declared and self.req.method != b"HEAD":
            self.req.close_connection = True

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        illegal = _protocol.has_illegal_text
        if illegal(status) or any(illegal(k) or illegal(v) for k, v in headers):
            raise ValueError(f"control character in a response status or header: {status!r}")
        if exc_info and not self.req.sent_headers:
            self.req.outheaders = []  # cheroot would keep the first call's headers
        return super().start_response(status, headers, exc_info)

    def write(self, chunk: bytes) -> None:
        req = self.req
        if not req.sent_headers and (self.remaining_bytes_out is None or len(chunk) <= self.remaining_bytes_out):
            hold = getattr(req.conn.wfile, "hold_next", None)
            if hold is not None:  # the head goes out with this first chunk
                hold()
        super().write(chunk)
        self._sent += len(chunk)


class _TLSSocketIO(socket.SocketIO):
    """A pyOpenSSL connection read and written as a socket with a timeout would be.

    pyOpenSSL raises WantRead/WantWrite where such a socket waits (cheroot's own reader
    retries whole buffered reads, losing the bytes already taken, and polls with sleeps);
    here the raw calls wait on the descriptor, up to the socket's timeout, and the TLS
    errors become the socket errors cheroot knows. Reads first return what the selector
    thread read ahead (``pending``, or the error it met), and wait no later than
    ``deadline`` (a ``time.monotonic()`` reading: the end of the request's time).
    """

    _sock: Any
    pending: bytearray
    failure: BaseException | None = None
    deadline: float | None = None

    def readinto(self, b: Any) -> int:
        pending = self.pending
        if pending:
            n = min(len(b), len(pending))
            b[:n] = pending[:n]
            del pending[:n]
            return n
        if self.failure is not None:
            raise self.failure
        return self._retry(lambda: self._sock.recv_into(b), reading=True)

    def read_ahead(self, limit: int) -> bool | None:
        """Without waiting, take what has arrived into ``pending`` (the TLS handshake runs
        here too). True once a request head is in (or ``limit`` bytes, for cheroot to
        refuse), None when the connection ended or failed (left for a worker to find out),
        False while more is to come."""
        while True:
            try:
                data = self._sock.recv(_READ_AHEAD)
            except (SSL.WantReadError, SSL.WantWriteError):
                return False
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return None
            except SSL.Error as e:
                self.failure = _tls_failure(e)
                return None
            if not data:
                return None
            self.pending += data
            if b"\r\n\r\n" in self.pending or len(self.pending) >= limit:
                return True

    def write(self, b: Any) -> int:
        return self._retry(lambda: self._sock.send(bytes(b)), reading=False)

    def _retry(self, call: Callable[[], int], reading: bool) -> int:
        sock = self._sock
        while True:
            timeout = sock.gettimeout()
            if reading and self.deadline is not None:
                timeout = max(0.0, min(timeout, self.deadline - time.monotonic()))
            try:
                return call()
            except SSL.WantReadError:
                ready = _wait(sock.fileno(), select.POLLIN, timeout)
            except SSL.WantWriteError:
                ready = _wait(sock.fileno(), select.POLLOUT, timeout)
            except SSL.ZeroReturnError:  # the client's close_notify
                return 0
            except SSL.SysCallError as e:
                if reading and e.args[0] in (-1, 0):  # end of file without close_notify
                    return 0
                raise ConnectionResetError(str(e)) from None
            except SSL.Error as e:
                raise _tls_failure(e) from None
            if not ready:
                raise TimeoutError("timed out")  # cheroot's words for a timeout (408 mid-request)


def _tls_failure(e: SSL.Error) -> Exception:
    """A TLS error as cheroot knows it: plaintext HTTP at a TLS port gets a plaintext 400
    telling it so; anything else (a refused handshake) drops the connection."""
    if "http request" in str(e):
        return cheroot_errors.NoSSLError()
    return cheroot_errors.FatalSSLAlert(str(e))


_READ_AHEAD = 16 * 1024
"""Bytes the selector thread reads from a connection at a time while its request head arrives."""


class _TLSReader:
    """cheroot's request reader on a TLS connection, with a buffer of its own: a line is found
    with one search (cheroot's reader, _pyio's, walks each line in Python, the most of what a
    TLS request cost). What cheroot asks of it: ``read``, ``readline``, ``has_data``, ``close``;
    ``raw`` is the connection, where the selector thread reads a request head ahead.
    """

    def __init__(self, sock: Any, size: int) -> None:
        self.raw = _TLSSocketIO(sock, "rb")
        self.raw.pending = bytearray()
        self._size = max(size, _READ_AHEAD)
        self._buffer = bytearray()
        self.bytes_read = 0

    def has_data(self) -> bool:
        """Whether bytes were received and not yet read (a request sent without waiting),
        here or read ahead by the selector thread."""
        return bool(self._buffer or self.raw.pending)

    def _fill(self) -> bool:
        data = self.raw.read(self._size)
        if not data:
            return False
        self._buffer += data
        return True

    def readline(self, size: int | None = -1) -> bytes:
        buffer = self._buffer
        limit = -1 if size is None else size
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end >= 0:
                take = end + 1
                break
            if 0 <= limit <= len(buffer):
                take = limit
                break
            start = len(buffer)
            if not self._fill():
                take = len(buffer)
                break
        if 0 <= limit < take:
            take = limit
        return self._take(take)

    def read(self, size: int | None = -1) -> bytes:
        buffer = self._buffer
        if size is None or size < 0:
            while self._fill():
                pass
            size = len(buffer)
        while len(buffer) < size and self._fill():
            pass
        return self._take(min(size, len(buffer)))

    def buffered_head(self) -> bytes | None:
        """The header lines and blank line at the front of the buffer (the request line
        already read), without taking them; None unless all of them are there."""
        buffer = self._buffer
        if buffer.startswith(b"\r\n"):
            return b"\r\n"
        end = buffer.find(b"\r\n\r\n")
        return None if end < 0 else bytes(buffer[: end + 4])

    def skip(self, n: int) -> None:
        del self._buffer[:n]
        self.bytes_read += n

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self.bytes_read += n
        return data

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:
        self.raw.close()


class _TLSWriter:
    """cheroot's response writer on a TLS connection. ``hold_next()`` keeps the next write to
    go out with the one after it: the gateway has a response's head sent with its body, one
    TLS record and one system call instead of two."""

    def __init__(self, sock: Any) -> None:
        self._raw = _TLSSocketIO(sock, "wb")
        self._held = b""
        self._holding = False
        self.bytes_written = 0

    def hold_next(self) -> None:
        self._holding = True

    def write(self, data: bytes) -> int:
        if self._holding:
            self._holding = False
            self._held += data
            return len(data)
        out = memoryview(self._held + data if self._held else data)
        self._held = b""
        while out:
            out = out[self._raw.write(out) :]
        self.bytes_written += len(data)
        return len(data)

    def flush(self) -> None:
        self._holding = False
        if self._held:
            self.write(b"")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._raw.close()


class _TLSAdapter(pyOpenSSLAdapter):
    """cheroot's pyOpenSSL adapter with a context built in memory and our socket files."""

    def __init__(self, context: Any) -> None:
        super().__init__(None, None)
        self.context = context
        self._listening: Any = None

    def bind(self, sock: Any) -> Any:
        self._listening = super().bind(sock)
        return self._listening

    def before_accept(self) -> None:
        """Revocations made since the last connection apply to the next: a context whose CRLs
        say them (``tls.current_context``), which the listening socket gives the connections
        it accepts (pyOpenSSL's ``accept`` uses its context)."""
        current = _tls.current_context(self.context)
        if current is not self.context:
            self.context = current
            self._listening._ssl_conn.set_context(current)  # cheroot's proxy holds the pyOpenSSL one

    def makefile(self, sock: Any, mode: str = "r", bufsize: int = -1) -> Any:
        return _TLSReader(sock, bufsize) if "r" in mode else _TLSWriter(sock)


class _Wait(enum.Enum):
    """What a connection without a worker waits for, each with its own time limit."""

    HANDSHAKE = "handshake"  # accepted; HTTPConfig.handshake_timeout
    IDLE = "idle"  # between requests; HTTPConfig.idle_timeout
    REQUEST = "request"  # a request's first bytes are in, not its whole head; request_timeout


class _Connections(cheroot_connections.ConnectionManager):
    """cheroot's selector loop with the bounds waitress gets from ``httpserver._Sweeper``.

    cheroot hands every new connection to a worker thread at once, and a worker reads the
    request with a timeout per read: a client that never sends its ClientHello, or feeds a
    header line every few seconds, holds a worker, and a few such clients hold them all.
    Here a connection gets a worker only once its handshake is done and its request head has
    arrived whole; until then the selector thread reads what comes without waiting, and
    closes connections past their limit: ``handshake_timeout`` from the accept,
    ``request_timeout`` from a request's first byte (the worker's reads of the body stop at
    the same deadline), ``idle_timeout`` between requests. Connections with a worker are
    never touched.

    Room, under a flood of connections that never finish their handshake (or never start
    it, or never send a request after it, or never finish one): the connections waiting
    never number more than ``connection_limit``, each accept beyond it closing one first,
    and near the limit every sweep closes some down to its margin; either way the
    unproven go first, oldest first (those in their handshake, through it without a
    request yet, or with a request still arriving), then the kept-alive ones longest
    unused. So a flood makes room from itself: the kept-alive connections of clients that
    were served stay, and a new client is closed only if a whole limit's worth of
    connections arrive during its own handshake. A process out of file descriptors
    (``ulimit -n`` below the limit) closes one the same way instead of failing its accepts
    until the flood ends. Each pass of the loop serves kept-alive connections before the
    unproven and before new ones: established clients' requests do not wait behind a batch
    of handshakes (each ~1 ms of CPU).

    Runs on the selector thread, but ``ready_for_worker`` and ``put`` also on workers (a
    kept-alive connection); a connection is only ever in one place.
    """

    # cheroot's, not in its type stubs
    _selector: Any
    _stop_requested: bool
    _remove_invalid_sockets: Callable[[], None]
    _from_server_socket: Callable[[Any], Any]

    def __init__(self, server: Any, config: HTTPConfig) -> None:
        super().__init__(server)
        self._config = config
        margin = max(1, config.connection_limit // 20)  # as _Sweeper's
        self._crowded = max(1, config.connection_limit - margin)
        self._roomy = max(1, config.connection_limit - 2 * margin)
        self._unproven: dict[Any, None] = {}
        """Waiting connections in their handshake, through it without a request yet, or
        with a request arriving, by the start of that wait, oldest first. Changed on the
        selector thread only (a worker's connections were served: never in it)."""
        self._next_sweep = 0.0
        self._accepting = True  # False while out of descriptors with nothing to close
        self._told_out_of_files = False

    def put(self, conn: Any) -> None:
        """A worker is done with ``conn``'s request and keeps it open: wait for the next."""
        _set_waiting(conn, _Wait.IDLE)
        conn.rfile.raw.deadline = None
        super().put(conn)  # to a worker at once if the next request is buffered already

    def ready_for_worker(self, conn: Any) -> bool:
        """Whether ``conn`` should go to a worker now; if not, it waits in the selector."""
        raw = conn.rfile.raw
        waiting = getattr(conn, _WAITING, None)
        if waiting is None:  # just accepted
            waiting = _set_waiting(conn, _Wait.HANDSHAKE)
            self._unproven[conn] = None
        if conn.rfile.has_data():
            arrived: bool | None = True
        else:
            before = len(raw.pending)
            # A head not ended within the limit goes to a worker to be refused there.
            arrived = raw.read_ahead(self._config.max_request_header_size + 1)
            if arrived is False and waiting[0] is not _Wait.REQUEST:
                if len(raw.pending) > before:
                    waiting = _set_waiting(conn, _Wait.REQUEST)
                    self._unproven.pop(conn, None)
                    self._unproven[conn] = None  # the youngest again
                elif waiting[0] is _Wait.HANDSHAKE and conn.socket.get_finished() is not None:
                    waiting = _set_waiting(conn, _Wait.IDLE)  # a handshake and no request yet
        if arrived is not False and conn in self._unproven:  # to a worker: served from now on
            del self._unproven[conn]
        if arrived is False:
            self._selector.register(conn.socket.fileno(), selectors.EVENT_READ, data=conn)
            return False
        started = waiting[1] if waiting[0] is _Wait.REQUEST else time.monotonic()
        raw.deadline = started + self._config.request_timeout
        return True

    def _run(self, expiration_interval: float) -> None:
        """cheroot's selector loop, with the order and the room the class describes; sweeps
        keep their pace even when a pass raises (cheroot's ``serve`` logs it and calls again).
        Connections are closed only after the pass has served those ready (the accept and
        the sweep come last), so none in ``ready`` is closed under it."""
        while not self._stop_requested:
            try:
                ready = list(self._selector.select(timeout=expiration_interval))
            except OSError:
                self._remove_invalid_sockets()
                continue
            accept = False
            later = []
            for fd, conn in ready:
                if conn is self.server:
                    accept = True
                elif conn in self._unproven:
                    later.append((fd, conn))
                else:
                    self._serve(fd, conn)
            for fd, conn in later:
                self._serve(fd, conn)
            if accept:
                self._accept()
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + expiration_interval
                self._sweep(now)
                if not self._accepting:
                    self._accepting = True
                    self._selector.register(self.server.socket.fileno(), selectors.EVENT_READ, data=self.server)

    def _serve(self, fd: int, conn: Any) -> None:
        self._selector.unregister(fd)
        self.server.process_conn(conn)

    def _accept(self) -> None:
        if len(self._selector) > self._config.connection_limit:  # (the listening socket is one)
            self._make_room()
        self.server.ssl_adapter.before_accept()
        try:
            conn = self._from_server_socket(self.server.socket)
        except OSError as e:
            if e.errno not in _OUT_OF_FILES:
                raise
            if not self._told_out_of_files:
                self._told_out_of_files = True
                log.warning(
                    "out of file descriptors with %d connections waiting (%s): closing the oldest to accept new "
                    "ones; raise the process's limit (ulimit -n) or lower HTTPConfig.connection_limit (%d)",
                    len(self._selector) - 1, e.strerror, self._config.connection_limit,
                )
            if not self._make_room():
                # Nothing of ours to close (the descriptors are held elsewhere): no accepts
                # until the next sweep, rather than failing them in a loop.
                self._accepting = False
                self._selector.unregister(self.server.socket.fileno())
            return
        if conn is not None:
            self.server.process_conn(conn)

    def _make_room(self) -> bool:
        """Close the waiting connection that matters least: the oldest unproven, else the
        kept-alive one longest unused. False when none is waiting."""
        if self._unproven:
            conn = next(iter(self._unproven))
        else:
            waiting = [c for _, c in self._selector.connections if c is not self.server]
            if not waiting:
                return False
            conn = min(waiting, key=lambda c: getattr(c, _WAITING, (_Wait.IDLE, 0.0))[1])
        self._close(conn)
        return True

    def _close(self, conn: Any) -> None:
        self._unproven.pop(conn, None)
        self._selector.unregister(conn.socket.fileno())
        conn.close()

    def _sweep(self, now: float) -> None:
        """Close connections past their own limit, and when crowded, beyond the limit's
        margin, the unproven (oldest first), then the kept-alive ones longest unused."""
        cfg = self._config
        limits = {_Wait.HANDSHAKE: cfg.handshake_timeout, _Wait.IDLE: cfg.idle_timeout, _Wait.REQUEST: cfg.request_timeout}
        expired: list[Any] = []
        unused: list[tuple[bool, float, Any]] = []
        for _, conn in self._selector.connections:
            if conn is self.server:
                continue
            waiting, since = getattr(conn, _WAITING, (_Wait.IDLE, now))
            if now - since > limits[waiting]:
                expired.append(conn)
            else:
                unused.append((conn not in self._unproven, since, conn))
        excess = len(expired) + len(unused) - self._roomy if len(expired) + len(unused) >= self._crowded else 0
        if excess > len(expired):
            unused.sort(key=lambda item: item[:2])
            expired += [conn for _, _, conn in unused[: excess - len(expired)]]
        for conn in expired:
            self._close(conn)


_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
"""What ``accept`` fails with when the process or the system has no descriptor or memory left."""
_WAITING = "_connectplugin_waiting"
"""A cheroot connection's (_Wait, since) while no worker has it; ``since`` is monotonic."""


def _set_waiting(conn: Any, waiting: _Wait) -> tuple[_Wait, float]:
    state = (waiting, time.monotonic())
    setattr(conn, _WAITING, state)
    return state


def _wait(fd: int, event: int, timeout: float | None) -> bool:
    """Whether ``fd`` became ready for ``event`` within ``timeout`` seconds (poll: select
    cannot watch descriptors past 1023)."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _peer_gone(fd: int) -> bool:
    """Whether the client hung up: its socket reads as end of file (or a TLS alert) without
    touching the TLS stream, which a worker may be writing to."""
    try:
        if not _wait(fd, select.POLLIN, 0):
            return False
        probe = socket.socket(fileno=fd)
        try:
            data = probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        finally:
            probe.detach()
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True
    return not data or data[0] == _TLS_ALERT


_PEER_ATTRIBUTE = "_connectplugin_peer"
"""Where a cheroot connection keeps its client certificate once read: one per connection,
fixed by its handshake (renegotiation is off), so each call need not convert it again."""


def _peer_certificate(connection: Any) -> Any:
    """The verified client certificate of a cheroot connection, as a cryptography object."""
    try:
        return getattr(connection, _PEER_ATTRIBUTE)
    except AttributeError:
        pass
    certificate = connection.socket.get_peer_certificate()
    found = None if certificate is None else certificate.to_cryptography()
    setattr(connection, _PEER_ATTRIBUTE, found)
    return found


def bind(app: Callable[..., Any], cfg: HTTPConfig) -> tuple[Any, tuple[str, int]]:
    """A cheroot server for ``app`` bound (not serving) as ``cfg`` says, and its address."""
    assert cfg.tls is not None
    server = _CherootServer(
        (cfg.host, cfg.port),
        app,
        numthreads=cfg.workers,
        max=cfg.workers,
        server_name="connectplugin",
        request_queue_size=cfg.connection_limit,
        # Each blocking read or write of a worker; _Connections bounds the waits without one.
        timeout=cfg.request_timeout,  # type: ignore[arg-type]  # any number
        shutdown_timeout=cfg.close_grace,  # type: ignore[arg-type]
    )
    server.requests = _Workers(server, min=cfg.workers, max=cfg.workers, accepted_queue_size=cfg.connection_limit)
    server.gateway = _Gateway
    server.max_request_body_size = cfg.max_request_body_size
    server.max_request_header_size = cfg.max_request_header_size  # cheroot's default: no limit
    server.keep_alive_conn_limit = cfg.connection_limit  # cheroot's default keeps only 10
    # How often the selector loop wakes: to notice close(), and to close connections past their limits.
    server.expiration_interval = min(cfg.tls.stop_poll_interval, cfg.sweep_interval)
    server.ssl_adapter = _TLSAdapter(_tls.server_context(cfg.tls))
    family, kind, proto, _, _ = socket.getaddrinfo(
        cfg.host, cfg.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0]
    server.bind(family, kind, proto)
    server.socket.settimeout(1)  # as cheroot's prepare(): its accept loop wakes to check for stop
    server.socket.listen(server.request_queue_size)
    host, port = server.bind_addr[:2]
    return server, (host, int(port))
