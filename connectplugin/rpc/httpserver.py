"""Running a WSGI app over HTTP: on a thread for hosts and tests, or in the foreground.

Plaintext is served by waitress; TLS (waitress has none) by cheroot with its pyOpenSSL
adapter. Both behave the same to an app: limits, streams whose headers leave at once, a
client's disconnection visible to ``Context.is_active()``, and a graceful close.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import logging
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cheroot import connections as cheroot_connections
from cheroot import errors as cheroot_errors
from cheroot import wsgi as cheroot_wsgi
from cheroot.ssl.pyopenssl import pyOpenSSLAdapter
from OpenSSL import SSL
from waitress.server import create_server
from waitress.task import ThreadedTaskDispatcher

from . import _protocol
from . import tls as _tls
from .errors import Code, ConnectError
from .server import refusal

log = logging.getLogger("connectplugin.httpserver")


@dataclass(frozen=True)
class HTTPConfig:
    """Where and how waitress listens, and how it stops. Port 0 picks a free ephemeral port."""

    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 8
    """Worker threads for unary calls, probes and everything else that is not a stream."""
    max_streams: int = 8
    """Streams (Connect streaming calls, routed ones included) served at once. Each holds a
    worker thread of its own, on top of ``threads``, for its whole life, so open streams never
    starve unary calls; one more is answered ``resource_exhausted`` at once."""
    connection_limit: int = 1000
    """Open connections allowed at once. Near the limit the connections that hold a slot
    without a call in progress (idle keep-alives, requests still arriving) are closed,
    longest-unused first, so new callers are never locked out by ones that do nothing."""
    idle_timeout: float = 120.0
    """Seconds a kept-alive connection may wait for its next request before it is closed."""
    request_timeout: float = 15.0
    """Seconds a client has to send a whole request (head and body) once its first byte has
    arrived; a slower one (a "slowloris" feeding a header line every few seconds) is closed."""
    handshake_timeout: float = 10.0
    """TLS only: seconds a new connection has to finish its TLS handshake. Until it has, and
    until a request's head has arrived whole, the connection waits without a worker thread,
    so clients that connect and send nothing (or a ClientHello byte by byte) hold none."""
    sweep_interval: float = 0.5
    """Seconds between looks for idle and slow connections."""
    max_request_body_size: int = 64 * 1024 * 1024
    """Waitress buffers whole bodies before the app runs; cap it well above the read limit."""
    mmap_threshold: int | None = 128 * 1024
    """glibc only, process-wide, set when a server starts serving: blocks of at least this
    many bytes are mapped on their own and go back to the system when freed. glibc otherwise
    raises the threshold each time it frees a large block, and then keeps large request
    bodies in heaps it never shrinks (a plugin sent 4 MiB bodies from 8 threads stayed
    30 MB above its start). None leaves the allocator alone."""
    close_grace: float = 5.0
    """Seconds calls in flight get to finish when ``close()`` names no grace of its own."""
    drain_interval: float = 0.05
    """While draining, the longest the loop waits on sockets before checking for idleness."""
    worker_stop_timeout: float = 1.0
    """After the grace, seconds the worker threads get to leave once pending calls are dropped."""
    close_margin: float = 2.0
    """Seconds beyond the grace ``close()`` waits for the serving thread to release its sockets."""
    tls: _tls.TLSConfig | None = None
    """Serve HTTPS with this certificate (and, with its ``trust``, require client certificates)."""
    behind_tls_proxy: bool = False
    """Serve plaintext on a non-loopback address all the same: a TLS-terminating proxy is in
    front and the network behind it is trusted. Without it such a server refuses to bind."""

    @property
    def workers(self) -> int:
        """All worker threads: ``threads`` plus the ``max_streams`` reserved for streams."""
        return self.threads + self.max_streams


class PlaintextRefusedError(Exception):
    """A server was asked to listen without TLS where other machines can reach it.

    ``host`` is the address it was given. Configure ``HTTPConfig.tls``, listen on loopback,
    or set ``HTTPConfig.behind_tls_proxy`` when a TLS-terminating proxy is in front.
    """

    def __init__(self, host: str) -> None:
        super().__init__(
            f"refusing to serve plaintext HTTP on {host!r}, which is not a loopback address: "
            "configure HTTPConfig.tls, or set HTTPConfig.behind_tls_proxy=True behind a TLS-terminating proxy"
        )
        self.host = host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or the name ``localhost``) is only reachable from this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve anywhere


_proxy_warned = threading.Event()
"""Set once the behind-a-proxy warning has been logged: once per process is enough."""


def _check_plaintext(config: HTTPConfig) -> None:
    if config.tls is not None or is_loopback(config.host):
        return
    if not config.behind_tls_proxy:
        raise PlaintextRefusedError(config.host)
    if not _proxy_warned.is_set():
        _proxy_warned.set()
        log.warning(
            "serving plaintext HTTP on %s: calls, bearer tokens included, are protected only by the TLS proxy in "
            "front (HTTPConfig.behind_tls_proxy)",
            config.host,
        )


class HTTPServer:
    """A WSGI app on waitress (plaintext) or cheroot (``config.tls``). Constructing one binds
    nothing and starts nothing.

    ``bind()`` takes the port (so ``url`` is known before serving) and starts no thread;
    ``start()`` serves on a daemon thread named for the port, ``serve_forever()`` on the
    caller's thread; both bind first if needed, and start the worker pool. Call those three
    from the thread that owns the server. ``close()`` is safe to call from any thread, more
    than once.
    """

    def __init__(self, app: Callable[..., Any], config: HTTPConfig | None = None) -> None:
        self.app = app
        self.config = config or HTTPConfig()
        # _lock guards _server, _address, _serving, _prepared and _grace, and keeps close() from
        # pulling waitress's trigger once the serving thread has closed its pipe.
        self._lock = threading.Lock()
        self._server: Any = None
        self._address: tuple[str, int] | None = None
        self._serving = False
        self._prepared = False  # cheroot: its workers run, so stop() has something to stop
        self._grace = self.config.close_grace
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()

    def bind(self) -> str:
        """Bind the listening socket without serving (once; later calls only answer); the URL."""
        if self._address is None:
            if self._stopping.is_set():
                raise RuntimeError("this HTTPServer is closed")
            _check_plaintext(self.config)
            app = _StreamSlots(self.app, self.config.max_streams)
            server, address = _bind_waitress(app, self.config) if self.config.tls is None else _bind_cheroot(
                app, self.config
            )
            with self._lock:
                self._server, self._address = server, address
        return self.url

    @property
    def host(self) -> str:
        return self._bound()[0]

    @property
    def port(self) -> int:
        return self._bound()[1]

    @property
    def url(self) -> str:
        """``http://host:port`` (``https://`` with TLS); known once bound."""
        host, port = self._bound()
        host = f"[{host}]" if ":" in host else host
        scheme = "http" if self.config.tls is None else "https"
        return f"{scheme}://{host}:{port}"

    def _bound(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("this HTTPServer is not bound yet: call bind() or start() first")
        return self._address

    def start(self) -> HTTPServer:
        """Bind if needed, then serve on a daemon thread named for the port."""
        self.bind()
        name = f"{'waitress' if self.config.tls is None else 'cheroot'}:{self.port}"
        self._thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until ``close()``; then drain in-flight calls and release every socket."""
        self.bind()
        with self._lock:
            if self._stopping.is_set():  # closed before it ever served: close() released it
                return
            self._serving = True
        if self.config.mmap_threshold is not None:
            _fix_mmap_threshold(self.config.mmap_threshold)
        if self.config.tls is None:
            self._serve_waitress()
        else:
            self._serve_cheroot()

    def _serve_waitress(self) -> None:
        srv = self._server
        cfg = self.config
        srv.task_dispatcher.set_thread_count(cfg.workers)
        loop = srv.asyncore.loop
        sweeper = _Sweeper(srv, cfg)
        wait = min(srv.adj.asyncore_loop_timeout, cfg.sweep_interval)
        while not self._stopping.is_set():
            loop(timeout=wait, map=srv._map, use_poll=srv.adj.asyncore_use_poll, count=1)
            sweeper.sweep()
        # Stop accepting, give running calls the grace period, then drop everything.
        srv.del_channel()
        srv.socket.close()
        with self._lock:
            grace = self._grace
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._busy():
            loop(timeout=cfg.drain_interval, map=srv._map, use_poll=srv.adj.asyncore_use_poll, count=1)
        # Connections first; the trigger last, after the workers have stopped, since a
        # worker finishing a reply still pokes it.
        for channel in list(srv._map.values()):
            if channel is not srv.trigger:
                channel.close()
        srv.task_dispatcher.shutdown(cancel_pending=True, timeout=cfg.worker_stop_timeout)
        with self._lock:  # close() must not pull the trigger once its pipe is closed
            srv.trigger.close()
            self._done.set()

    def _serve_cheroot(self) -> None:
        srv = self._server
        srv.prepare(self.config)
        with self._lock:
            self._prepared = True
            stopping = self._stopping.is_set()
        if stopping:  # close() came before the workers ran, so it left the stopping to us
            self._stop_cheroot()
            return
        srv.serve()  # returns once _stop_cheroot has stopped the server
        cfg = self.config
        self._done.wait(self._grace + cfg.worker_stop_timeout + cfg.close_margin)

    def _stop_cheroot(self) -> None:
        """cheroot's stop: no new connections, idle ones closed, calls in flight get the grace
        (then their sockets are shut), workers joined."""
        srv = self._server
        with self._lock:
            srv.shutdown_timeout = self._grace
        try:
            srv.stop()
        finally:
            self._done.set()

    def _busy(self) -> bool:
        dispatcher = self._server.task_dispatcher
        if dispatcher.active_count or dispatcher.queue:
            return True
        return any(getattr(ch, "total_outbufs_len", 0) for ch in list(self._server._map.values()))

    def close(self, grace: float | None = None) -> None:
        """Stop serving: calls in flight get ``grace`` seconds (default ``config.close_grace``)."""
        grace = self.config.close_grace if grace is None else grace
        tls = self.config.tls is not None
        with self._lock:
            first = not self._stopping.is_set()
            if first:
                self._grace = grace
                self._stopping.set()
                if self._serving and not self._done.is_set() and not tls:
                    # A one-byte write to waitress's own wake-up pipe, under the lock on
                    # purpose: the serving thread closes that pipe under the same lock.
                    self._server.pull_trigger()
            server, serving, prepared = self._server, self._serving, self._prepared
        wait = grace + self.config.close_margin
        if not first:
            self._done.wait(wait)
            return
        if not serving:  # never served: nothing to drain
            if server is not None:
                server.socket.close() if tls else server.close()
            self._done.set()
            return
        if prepared:
            # From its own thread: stopping joins the workers, and close() may run on one.
            threading.Thread(target=self._stop_cheroot, name=f"cheroot-stop:{self.port}", daemon=True).start()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=wait)

    def __enter__(self) -> HTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc malloc.h)."""
_mmap_lock = threading.Lock()  # guards _mmap_threshold_set
_mmap_threshold_set: int | None = None


def _fix_mmap_threshold(nbytes: int) -> None:
    """Pin glibc's mmap threshold (which also stops it from moving); elsewhere do nothing."""
    global _mmap_threshold_set
    with _mmap_lock:
        if _mmap_threshold_set == nbytes:
            return
        _mmap_threshold_set = nbytes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not mallopt(_M_MMAP_THRESHOLD, nbytes):
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", nbytes)


class _Sweeper:
    """Closes connections that hold a slot without using it; runs on the serving thread only.

    waitress closes a connection only after ``channel_timeout`` without a single byte, so a
    client trickling a header line every few seconds keeps its slot forever, and enough of
    them lock everyone out. Here a request must arrive whole within ``request_timeout``, and
    near ``connection_limit`` unused connections make room for new ones. A connection with a
    call in progress, or a reply still being written, is never touched.
    """

    def __init__(self, server: Any, config: HTTPConfig) -> None:
        self._server = server
        self._config = config
        self._next = 0.0
        # Partly received requests by channel: the parser object and when it was first seen.
        self._arriving: dict[Any, tuple[Any, float]] = {}
        # Near the limit, close down to this many open connections: a 5% margin, so room is
        # made before waitress stops accepting.
        margin = max(1, config.connection_limit // 20)
        self._crowded = max(1, config.connection_limit - margin)
        self._roomy = max(1, config.connection_limit - 2 * margin)

    def sweep(self) -> None:
        server, cfg = self._server, self._config
        now = time.monotonic()
        crowded = len(server._map) >= self._crowded
        if now < self._next and not crowded:
            return
        self._next = now + cfg.sweep_interval
        wall = time.time()  # waitress stamps last_activity with time.time()
        arriving: dict[Any, tuple[Any, float]] = {}
        unused: list[tuple[float, Any]] = []  # (seconds unused, channel)
        closing = 0
        for channel in list(server.active_channels.values()):
            if channel.requests or channel.total_outbufs_len or channel.will_close or channel.close_when_flushed:
                continue
            request = channel.request
            if request is None:
                age = wall - channel.last_activity
                limit = cfg.idle_timeout
            else:
                seen = self._arriving.get(channel)
                started = seen[1] if seen is not None and seen[0] is request else now
                arriving[channel] = (request, started)
                age = now - started
                limit = cfg.request_timeout
            if age > limit:
                channel.will_close = True  # the loop closes it on its next pass
                closing += 1
            else:
                unused.append((age, channel))
        self._arriving = arriving
        if crowded:
            excess = len(server._map) - closing - self._roomy
            unused.sort(key=lambda item: item[0], reverse=True)
            for _, channel in unused[: max(0, excess)]:
                channel.will_close = True


# --- waitress: plaintext ----------------------------------------------------------------------


def _bind_waitress(app: Callable[..., Any], cfg: HTTPConfig) -> tuple[Any, tuple[str, int]]:
    server = create_server(
        app,
        host=cfg.host,
        port=cfg.port,
        threads=cfg.workers,
        connection_limit=cfg.connection_limit,
        channel_timeout=cfg.idle_timeout,
        # poll(), not select(): select cannot watch descriptors past 1023.
        asyncore_use_poll=True,
        max_request_body_size=cfg.max_request_body_size,
        # Lets a handler see a vanished client (Context.is_active) without writing to it.
        channel_request_lookahead=1,
        clear_untrusted_proxy_headers=True,
        ident="connectplugin",
        # An empty pool: the workers start when serving does, not at bind time.
        _dispatcher=ThreadedTaskDispatcher(),
    )
    host, port = server.getsockname()[:2]  # waitress gives the port as a string
    return server, (host, int(port))


# --- cheroot: TLS -----------------------------------------------------------------------------

CLIENT_DISCONNECTED_KEY = "connectplugin.client_disconnected"
"""WSGI environ key: a callable true once the client has gone (waitress has its own)."""
_TLS_ALERT = 0x15
"""The first byte of a TLS alert record: a client's close_notify before it hangs up."""


class _CherootServer(cheroot_wsgi.Server):
    """cheroot's WSGI server whose workers only ever get a connection whose TLS handshake is
    done and whose request head has arrived whole (see :class:`_Connections`)."""

    def prepare(self, config: HTTPConfig) -> None:  # type: ignore[override]  # ours takes the limits
        # cheroot's prepare() also binds; HTTPServer.bind() has, so this is the rest of it.
        self._interrupt = None
        self.software = self.software or f"{self.version} Server"
        self._connections = _Connections(self, config)
        self.requests.start()
        self.ready = True
        self._start_time = time.time()

    def process_conn(self, conn: Any) -> None:
        """From the selector thread (a new or readable connection) or a worker (a kept-alive
        one with bytes already buffered): to a worker once its request head is in."""
        if self._connections.ready_for_worker(conn):
            super().process_conn(conn)


class _Gateway(cheroot_wsgi.Gateway_10):
    """cheroot's WSGI 1.0 gateway, adding what waitress offers: a disconnection check, and
    the verified client certificate."""

    def get_environ(self) -> dict:  # type: ignore[override]  # cheroot's stub says None
        environ = super().get_environ()
        connection = self.req.conn
        fd = connection.socket.fileno()
        environ[CLIENT_DISCONNECTED_KEY] = lambda: _peer_gone(fd)
        environ[_tls.PEER_CERTIFICATE_KEY] = lambda: _peer_certificate(connection)
        return environ

    def write(self, chunk: bytes) -> None:
        req = self.req
        if not req.sent_headers and (self.remaining_bytes_out is None or len(chunk) <= self.remaining_bytes_out):
            hold = getattr(req.conn.wfile, "hold_next", None)
            if hold is not None:  # the head goes out with this first chunk
                hold()
        super().write(chunk)


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
_MAX_READ_AHEAD = 64 * 1024
"""A request head not ended within this many bytes goes to a worker anyway, for cheroot to refuse."""


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

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self.bytes_read += n
        return data

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

    def makefile(self, sock: Any, mode: str = "r", bufsize: int = -1) -> Any:
        return _TLSReader(sock, bufsize) if "r" in mode else _TLSWriter(sock)


class _Wait(enum.Enum):
    """What a connection without a worker waits for, each with its own time limit."""

    HANDSHAKE = "handshake"  # accepted; HTTPConfig.handshake_timeout
    IDLE = "idle"  # between requests; HTTPConfig.idle_timeout
    REQUEST = "request"  # a request's first bytes are in, not its whole head; request_timeout


class _Connections(cheroot_connections.ConnectionManager):
    """cheroot's selector loop with the bounds waitress gets from :class:`_Sweeper`.

    cheroot hands every new connection to a worker thread at once, and a worker reads the
    request with a timeout per read: a client that never sends its ClientHello, or feeds a
    header line every few seconds, holds a worker, and a few such clients hold them all.
    Here a connection gets a worker only once its handshake is done and its request head has
    arrived whole; until then the selector thread reads what comes without waiting, and
    closes connections past their limit: ``handshake_timeout`` from the accept,
    ``request_timeout`` from a request's first byte (the worker's reads of the body stop at
    the same deadline), ``idle_timeout`` between requests. Near ``connection_limit`` the
    waiting connections longest unused are closed to make room. Connections with a worker
    are never touched. Runs on the selector thread, but ``ready_for_worker`` and ``put``
    also on workers (a kept-alive connection); a connection is only ever in one place.
    """

    _selector: Any  # cheroot's, not in its type stubs

    def __init__(self, server: Any, config: HTTPConfig) -> None:
        super().__init__(server)
        self._config = config
        margin = max(1, config.connection_limit // 20)  # as _Sweeper's
        self._crowded = max(1, config.connection_limit - margin)
        self._roomy = max(1, config.connection_limit - 2 * margin)

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
        if conn.rfile.has_data():
            arrived: bool | None = True
        else:
            before = len(raw.pending)
            arrived = raw.read_ahead(_MAX_READ_AHEAD)
            if arrived is False and waiting[0] is not _Wait.REQUEST:
                if len(raw.pending) > before:
                    waiting = _set_waiting(conn, _Wait.REQUEST)
                elif waiting[0] is _Wait.HANDSHAKE and conn.socket.get_finished() is not None:
                    waiting = _set_waiting(conn, _Wait.IDLE)  # a handshake and no request yet
        if arrived is False:
            self._selector.register(conn.socket.fileno(), selectors.EVENT_READ, data=conn)
            return False
        started = waiting[1] if waiting[0] is _Wait.REQUEST else time.monotonic()
        raw.deadline = started + self._config.request_timeout
        return True

    def _expire(self, threshold: float) -> None:
        """Close connections past their own limit (cheroot's one ``threshold`` is ignored),
        and when crowded the longest unused beyond the limit's margin."""
        cfg = self._config
        limits = {_Wait.HANDSHAKE: cfg.handshake_timeout, _Wait.IDLE: cfg.idle_timeout, _Wait.REQUEST: cfg.request_timeout}
        now = time.monotonic()
        expired: list[tuple[float, int, Any]] = []
        unused: list[tuple[float, int, Any]] = []
        for fd, conn in self._selector.connections:
            if conn is self.server:
                continue
            waiting, since = getattr(conn, _WAITING, (_Wait.IDLE, now))
            age = now - since
            (expired if age > limits[waiting] else unused).append((age, fd, conn))
        excess = len(expired) + len(unused) - self._roomy if len(expired) + len(unused) >= self._crowded else 0
        if excess > len(expired):
            unused.sort(key=lambda item: item[0], reverse=True)
            expired += unused[: excess - len(expired)]
        for _, fd, conn in expired:
            self._selector.unregister(fd)
            conn.close()


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


def _bind_cheroot(app: Callable[..., Any], cfg: HTTPConfig) -> tuple[Any, tuple[str, int]]:
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
        accepted_queue_size=cfg.connection_limit,
    )
    server.gateway = _Gateway
    server.max_request_body_size = cfg.max_request_body_size
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


# --- streams ---------------------------------------------------------------------------------


class _StreamSlots:
    """A WSGI app admitting at most ``limit`` streams at once; one more is refused at once.

    A stream holds its slot until the server closes its response iterable, which waitress
    does on the worker thread that served it, however the stream ended. Safe from any
    thread; ``_lock`` guards ``_open``.
    """

    def __init__(self, app: Callable[..., Any], limit: int) -> None:
        self._app = app
        self._limit = limit
        self._open = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        content_type = environ.get("CONTENT_TYPE", "")
        if not _protocol.is_streaming(content_type):
            return self._app(environ, start_response)
        with self._lock:
            admitted = self._open < self._limit
            if admitted:
                self._open += 1
        if not admitted:
            error = ConnectError(Code.RESOURCE_EXHAUSTED, f"too many open streams ({self._limit}); try again later")
            return refusal(start_response, content_type, error)
        try:
            body = self._app(environ, start_response)
        except BaseException:
            self._release()
            raise
        return _Admitted(body, self._release)

    def _release(self) -> None:
        with self._lock:
            self._open -= 1


class _Admitted:
    """A stream's response iterable that gives its slot back when closed (once)."""

    def __init__(self, body: Iterable[bytes], release: Callable[[], None]) -> None:
        self._body = body
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        release, self._release = self._release, None
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if release is not None:
                release()
