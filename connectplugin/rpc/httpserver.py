"""Running a WSGI app over HTTP: on a thread for hosts and tests, or in the foreground.

Plaintext is served by waitress; TLS (waitress has none) by cheroot with its pyOpenSSL
adapter. Both behave the same to an app: limits, streams whose headers leave at once, a
client's disconnection visible to ``Context.is_active()``, and a graceful close.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ThreadedTaskDispatcher, WSGITask

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
    max_request_header_size: int = 64 * 1024
    """Bytes a request's head (its request line and header lines) may take; a longer one is
    answered 431 Request Header Fields Too Large and its connection closed. Each connection
    still sending its head may hold this much, so ``connection_limit`` of them hold at most
    their product (64 MiB by default; waitress's own default, 256 KiB, would allow 256 MiB).
    A Connect call's head is a few hundred bytes, a bearer token's a few kilobytes."""
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
            if self.config.tls is None:
                server, address = _bind_waitress(app, self.config)
            else:
                # cheroot and pyOpenSSL: loaded only by servers that speak TLS.
                from . import _cheroot

                server, address = _cheroot.bind(app, self.config)
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
        max_request_header_size=cfg.max_request_header_size,
        max_request_body_size=cfg.max_request_body_size,
        # Lets a handler see a vanished client (Context.is_active) without writing to it.
        channel_request_lookahead=1,
        clear_untrusted_proxy_headers=True,
        ident="connectplugin",
        # An empty pool: the workers start when serving does, not at bind time.
        _dispatcher=ThreadedTaskDispatcher(),
    )
    server.channel_class = _Channel
    _wake_only_when_needed(server)
    host, port = server.getsockname()[:2]  # waitress gives the port as a string
    return server, (host, int(port))


class _OneSendTask(WSGITask):
    """waitress's task, sending a response's head with its first body bytes.

    waitress flushes every write at once (its ``send_bytes`` is 1), so a head and a body
    written one after the other leave as two TCP segments, and the client wakes for each.
    Together they are one send and one read; an empty write (a stream's headers, sent at
    once) still sends the head alone.
    """

    channel: _Channel

    def write(self, data: bytes) -> None:
        if self.wrote_header or not data:
            super().write(data)
            return
        channel = self.channel
        channel.corked = []
        try:
            super().write(data)  # the head and the body as waitress frames it, held
        finally:
            held, channel.corked = channel.corked, None
        channel.write_soon(b"".join(held))


_serving = threading.local()
"""``channel``: the connection whose request a waitress worker thread is serving, if any."""


class _Channel(HTTPChannel):
    """waitress's connection: its writes a task may hold back to send them as one, and the
    serving loop woken after a request only when it has something to do for it."""

    task_class = _OneSendTask
    corked: list[bytes] | None = None
    """While not None, writes are collected here instead of being sent."""
    watched = False
    """Whether the serving loop, when it last looked, waited for this connection's next request."""

    def write_soon(self, data: Any) -> int:
        if self.corked is not None:
            self.corked.append(data)
            return len(data)
        return super().write_soon(data)

    def readable(self) -> bool:
        self.watched = bool(super().readable())
        return self.watched

    def service(self) -> None:
        _serving.channel = self
        try:
            super().service()
        finally:
            _serving.channel = None

    def settled(self) -> bool:
        """Whether the serving loop has nothing to do for this connection but to wait for its
        next request, as it does already: nothing left to send, to close, or queued."""
        return self.watched and self.connected and not (
            self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed
        )


def _wake_only_when_needed(server: Any) -> None:
    """waitress wakes its serving loop (a byte down a pipe) whenever a worker ends a request,
    so that the loop looks at the connection again. A settled connection needs no look: a
    pipe write, a pass of the loop and a context switch saved per call."""
    pull = server.pull_trigger

    def pull_trigger() -> None:
        channel = getattr(_serving, "channel", None)
        if channel is None or not channel.settled():
            pull()

    server.pull_trigger = pull_trigger


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
