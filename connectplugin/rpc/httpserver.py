"""Running a WSGI app on waitress: on a thread for hosts and tests, or in the foreground."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from waitress.server import create_server

log = logging.getLogger("connectplugin.httpserver")


@dataclass(frozen=True)
class HTTPConfig:
    """Where and how waitress listens. Port 0 picks a free ephemeral port."""

    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 8
    """Worker threads: the number of calls (streams included) served at once."""
    connection_limit: int = 1000
    max_request_body_size: int = 64 * 1024 * 1024
    """Waitress buffers whole bodies before the app runs; cap it well above the read limit."""


class HTTPServer:
    """A waitress server bound at construction (so ``url`` is known before it runs).

    ``start()`` serves on a daemon thread; ``serve_forever()`` serves on the caller's thread;
    ``close()`` is safe to call from any thread, more than once.
    """

    def __init__(self, app: Callable[..., Any], config: HTTPConfig | None = None) -> None:
        self.config = config or HTTPConfig()
        self._server = create_server(
            app,
            host=self.config.host,
            port=self.config.port,
            threads=self.config.threads,
            connection_limit=self.config.connection_limit,
            max_request_body_size=self.config.max_request_body_size,
            # Lets a handler see a vanished client (Context.is_active) without writing to it.
            channel_request_lookahead=1,
            clear_untrusted_proxy_headers=True,
            ident="connectplugin",
        )
        self.host, self.port = self._server.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._grace = 5.0
        self._serving = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HTTPServer:
        self._serving = True
        self._thread = threading.Thread(target=self.serve_forever, name=f"waitress:{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until ``close()``; then drain in-flight calls and release every socket."""
        srv = self._server
        loop = srv.asyncore.loop
        self._serving = True
        while not self._stopping.is_set():
            loop(timeout=srv.adj.asyncore_loop_timeout, map=srv._map, use_poll=srv.adj.asyncore_use_poll, count=1)
        # Stop accepting, give running calls the grace period, then drop everything.
        srv.del_channel()
        srv.socket.close()
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline and self._busy():
            loop(timeout=0.05, map=srv._map, use_poll=srv.adj.asyncore_use_poll, count=1)
        # Connections first; the trigger last, after the workers have stopped, since a
        # worker finishing a reply still pokes it.
        for channel in list(srv._map.values()):
            if channel is not srv.trigger:
                channel.close()
        srv.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        with self._lock:  # close() must not pull the trigger once its pipe is closed
            srv.trigger.close()
            self._done.set()

    def _busy(self) -> bool:
        dispatcher = self._server.task_dispatcher
        if dispatcher.active_count or dispatcher.queue:
            return True
        return any(getattr(ch, "total_outbufs_len", 0) for ch in list(self._server._map.values()))

    def close(self, grace: float = 5.0) -> None:
        """Stop serving: calls in flight get ``grace`` seconds to finish. Safe from any thread."""
        with self._lock:
            first = not self._stopping.is_set()
            if first:
                self._grace = grace
                self._stopping.set()
                if self._serving and not self._done.is_set():
                    self._server.pull_trigger()
        if not first:
            self._done.wait(grace + 2)
        elif not self._serving:  # never ran: nothing to drain
            self._server.close()
            self._done.set()
        elif self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=grace + 2)

    def __enter__(self) -> HTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
