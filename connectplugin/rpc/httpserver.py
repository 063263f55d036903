"""Running a WSGI app on waitress: on a thread for hosts and tests, or in the foreground."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from waitress.server import create_server
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger("connectplugin.httpserver")


@dataclass(frozen=True)
class HTTPConfig:
    """Where and how waitress listens, and how it stops. Port 0 picks a free ephemeral port."""

    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 8
    """Worker threads: the number of calls (streams included) served at once."""
    connection_limit: int = 1000
    """Open connections allowed at once. Near the limit the connections that hold a slot
    without a call in progress (idle keep-alives, requests still arriving) are closed,
    longest-unused first, so new callers are never locked out by ones that do nothing."""
    idle_timeout: float = 120.0
    """Seconds a kept-alive connection may wait for its next request before it is closed."""
    request_timeout: float = 15.0
    """Seconds a client has to send a whole request (head and body) once its first byte has
    arrived; a slower one (a "slowloris" feeding a header line every few seconds) is closed."""
    sweep_interval: float = 0.5
    """Seconds between looks for idle and slow connections."""
    max_request_body_size: int = 64 * 1024 * 1024
    """Waitress buffers whole bodies before the app runs; cap it well above the read limit."""
    close_grace: float = 5.0
    """Seconds calls in flight get to finish when ``close()`` names no grace of its own."""
    drain_interval: float = 0.05
    """While draining, the longest the loop waits on sockets before checking for idleness."""
    worker_stop_timeout: float = 1.0
    """After the grace, seconds the worker threads get to leave once pending calls are dropped."""
    close_margin: float = 2.0
    """Seconds beyond the grace ``close()`` waits for the serving thread to release its sockets."""


class HTTPServer:
    """A WSGI app on waitress. Constructing one binds nothing and starts nothing.

    ``bind()`` takes the port (so ``url`` is known before serving) and starts no thread;
    ``start()`` serves on a daemon thread named for the port, ``serve_forever()`` on the
    caller's thread; both bind first if needed, and start waitress's worker pool. Call those three from the thread that owns the server. ``close()`` is safe to
    call from any thread, more than once.
    """

    def __init__(self, app: Callable[..., Any], config: HTTPConfig | None = None) -> None:
        self.app = app
        self.config = config or HTTPConfig()
        # _lock guards _server, _address, _serving and _grace, and keeps close() from pulling the
        # trigger once the serving thread has closed its pipe.
        self._lock = threading.Lock()
        self._server: Any = None
        self._address: tuple[str, int] | None = None
        self._serving = False
        self._grace = self.config.close_grace
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()

    def bind(self) -> str:
        """Bind the listening socket without serving (once; later calls only answer); the URL."""
        if self._address is None:
            if self._stopping.is_set():
                raise RuntimeError("this HTTPServer is closed")
            cfg = self.config
            server = create_server(
                self.app,
                host=cfg.host,
                port=cfg.port,
                threads=cfg.threads,
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
            address = (host, int(port))
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
        """``http://host:port``; known once bound."""
        host, port = self._bound()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def _bound(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("this HTTPServer is not bound yet: call bind() or start() first")
        return self._address

    def start(self) -> HTTPServer:
        """Bind if needed, then serve on a daemon thread named for the port."""
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name=f"waitress:{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until ``close()``; then drain in-flight calls and release every socket."""
        self.bind()
        with self._lock:
            if self._stopping.is_set():  # closed before it ever served: close() released it
                return
            self._serving = True
        srv = self._server
        cfg = self.config
        srv.task_dispatcher.set_thread_count(cfg.threads)
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

    def _busy(self) -> bool:
        dispatcher = self._server.task_dispatcher
        if dispatcher.active_count or dispatcher.queue:
            return True
        return any(getattr(ch, "total_outbufs_len", 0) for ch in list(self._server._map.values()))

    def close(self, grace: float | None = None) -> None:
        """Stop serving: calls in flight get ``grace`` seconds (default ``config.close_grace``)."""
        grace = self.config.close_grace if grace is None else grace
        with self._lock:
            first = not self._stopping.is_set()
            if first:
                self._grace = grace
                self._stopping.set()
                if self._serving and not self._done.is_set():
                    # A one-byte write to waitress's own wake-up pipe, under the lock on
                    # purpose: the serving thread closes that pipe under the same lock.
                    self._server.pull_trigger()
            server, serving = self._server, self._serving
        wait = grace + self.config.close_margin
        if not first:
            self._done.wait(wait)
        elif not serving:  # never served: nothing to drain
            if server is not None:
                server.close()
            self._done.set()
        elif self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=wait)

    def __enter__(self) -> HTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


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
