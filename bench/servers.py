"""The servers under load, each in its own process, and the parent's handle on one.

``python -m bench.servers KIND --threads N`` serves one WSGI app through
``connectplugin.HTTPServer`` (so every kind runs on identical waitress settings) and prints
``PORT <n>`` once bound. It exits when its standard input closes, so a parent that dies,
even by SIGKILL, cannot leave it running.

Kinds:
  bare        a plain WSGI function: read the body, answer fixed bytes (the ceiling)
  ours        ``connectplugin.App`` with the fixed KV handler
  connectrpc  connectrpc's sync WSGI app, same handler, google.protobuf codecs
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from bench import fixtures
from connectplugin import App, HTTPConfig, HTTPServer

KINDS = ("bare", "ours", "connectrpc")
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


# --- the apps -------------------------------------------------------------------------------


def bare_app() -> WSGIApp:
    """The least a WSGI app can do and still answer Get correctly, in either codec."""
    answers = {}
    for codec, content_type in fixtures.CONTENT_TYPES.items():
        body = fixtures.encode(fixtures.RESPONSE, codec)
        answers[content_type] = (
            [("Content-Type", content_type), ("Content-Length", str(len(body)))],
            body,
        )
    proto = answers["application/proto"]

    def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH")
        environ["wsgi.input"].read(int(length) if length else -1)
        headers, body = answers.get(environ.get("CONTENT_TYPE", ""), proto)
        start_response("200 OK", headers)
        return [body]

    return app


def ours_app() -> WSGIApp:
    return App([fixtures.FixedKV()])


def connectrpc_app() -> WSGIApp:
    """connectrpc's WSGI app for kv.v1.KVService, its methods described from our KV_SERVICE."""
    from connectrpc.compat import google_protobuf_codecs
    from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
    from connectrpc.server import ConnectWSGIApplication, EndpointSync

    service = fixtures.KV_SERVICE
    handler = fixtures.FixedKV()
    endpoints: dict[str, Any] = {}
    for method in service.methods.values():
        info = MethodInfo(
            name=method.name,
            service_name=method.service,
            input=method.input,
            output=method.output,
            idempotency_level=(
                IdempotencyLevel.NO_SIDE_EFFECTS if method.idempotent else IdempotencyLevel.UNKNOWN
            ),
            stream_type=StreamType.SERVER_STREAM if method.server_streaming else StreamType.UNARY,
        )
        make = EndpointSync.server_stream if method.server_streaming else EndpointSync.unary
        # The very same bound method ours calls: both stacks run identical handler code.
        endpoints[method.path] = make(method=info, function=getattr(handler, method.attr))

    class KVServiceWSGIApplication(ConnectWSGIApplication):
        @property
        def path(self) -> str:
            return "/" + service.name

    return KVServiceWSGIApplication(endpoints=endpoints, codecs=google_protobuf_codecs())


APPS: dict[str, Callable[[], WSGIApp]] = {
    "bare": bare_app,
    "ours": ours_app,
    "connectrpc": connectrpc_app,
}


def http_config(threads: int) -> HTTPConfig:
    return HTTPConfig(host=HOST, port=0, threads=threads)


def placement(pin: bool) -> tuple[int | None, int | None]:
    """(server CPU, load CPU) when pinning is asked for and possible, else (None, None)."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return allowed[0], allowed[1]


def pin_to(cpu: int | None) -> None:
    """Pin the calling process (threads started later inherit it) to one CPU."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Pin this process to ``cpu`` for the block, then give it back the CPUs it had."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    pin_to(cpu)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- the child ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.servers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    args = parser.parse_args()
    # Before waitress starts its threads, which inherit the affinity of the one creating them.
    pin_to(args.cpu)
    # The parent stops us; Ctrl-C reaches the whole process group, and a traceback here helps no one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # With more connections than threads, waitress warns of queued tasks on every burst.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = HTTPServer(APPS[args.kind](), http_config(args.threads))
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()
    server.bind()
    print(f"PORT {server.port}", flush=True)
    server.serve_forever()


def _exit_when_orphaned() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


# --- the parent's handle --------------------------------------------------------------------


class ServerProcess:
    """One server kind running in a child process; ``with`` starts it and always stops it.

    Starting returns only once the server answers a correct Get in every codec.
    """

    def __init__(
        self, kind: str, threads: int, cpu: int | None = None, start_timeout: float = 30.0
    ) -> None:
        self.kind = kind
        self.threads = threads
        self.cpu = cpu
        self.host = HOST
        self.port = 0
        self._timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr = tempfile.TemporaryFile()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        cmd = [sys.executable, "-m", "bench.servers", self.kind, "--threads", str(self.threads)]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        self._proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        deadline = time.monotonic() + self._timeout
        self.port = self._read_port(deadline)
        self._wait_for_port(deadline)
        for codec in fixtures.CODECS:
            fixtures.check_get(self.host, self.port, codec)

    def _read_port(self, deadline: float) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while True:
                self._check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"{self.kind} server did not report its port in {self._timeout:.0f}s"
                    )
                if sel.select(timeout=min(left, 0.2)):
                    line = self._proc.stdout.readline().decode().strip()
                    if line.startswith("PORT "):
                        return int(line.split()[1])
                    self._check_alive()
                    raise RuntimeError(f"{self.kind} server printed {line!r} instead of its port")

    def _wait_for_port(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                socket.create_connection((self.host, self.port), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.kind} server never accepted on port {self.port}"
                    ) from None
                time.sleep(0.05)

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"{self.kind} server exited with {self._proc.returncode}:\n{self.stderr()}"
            )

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time of the server process (all its threads), or None off Linux."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return None
        # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        self._stderr.close()


if __name__ == "__main__":
    main()
