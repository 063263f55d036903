"""Fixtures: real servers on port 0, clients, hosts, peers, and a guard against leaked threads."""

from __future__ import annotations

import dataclasses
import lzma
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from connectplugin import (
    App,
    Client,
    ClientConfig,
    HandshakeConfig,
    HostConfig,
    HTTPConfig,
    HTTPServer,
    PluginHost,
    PluginServer,
    ServeConfig,
)
from connectplugin.rpc import tls
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.platform import HANDSHAKE
from samples.platform.capabilities import HostLogger
from tests.helpers import ENV, ROOT, GoProcess, Peer, World, wait_until
from tests.platform_plugins.provider import PLUGINS, Recorder, declare
from tests.services import IdentityRecorder, ReadableKV, ScriptedKV
from tests.webapps import WebServer, serve_app

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every thread a test starts (server loops, workers) must be gone shortly after it."""
    before = set(threading.enumerate())
    yield

    def started_here() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    wait_until(
        lambda: not started_here(),
        lambda: f"the threads the test started to end: {started_here()}",
        timeout=3.0,
    )


@pytest.fixture(scope="session")
def pki() -> tls.DevPKI:
    """A development CA with a host certificate and plugin certificates ``kv`` and ``other``."""
    return tls.make_dev_pki(["kv", "other"])


@pytest.fixture(scope="session")
def ca_file(pki, tmp_path_factory) -> str:
    """The development CA as a PEM file, for ``requests``' ``verify``."""
    path = tmp_path_factory.mktemp("pki") / "ca.pem"
    path.write_bytes(pki.ca.certificate_pem())
    return str(path)


@pytest.fixture
def server_kind(request) -> str:
    """``plain`` (waitress) unless a test parametrizes it with ``BOTH_SERVERS``."""
    return getattr(request, "param", "plain")


@pytest.fixture
def http_config(server_kind, pki) -> HTTPConfig:
    """The HTTPConfig of ``server_kind``: TLS with the development host certificate, or none."""
    return HTTPConfig(tls=tls.TLSConfig(key_pair=pki.host) if server_kind == "tls" else None)


@pytest.fixture
def serve(http_config):
    """``serve(app, threads=4)`` runs a WSGI app at 127.0.0.1:0 until the test ends (on
    waitress, or cheroot over TLS for tests parametrized with ``BOTH_SERVERS``)."""
    servers: list[HTTPServer] = []

    def start(app: WSGIApp, threads: int = 4) -> HTTPServer:
        server = HTTPServer(app, dataclasses.replace(http_config, threads=threads)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close(grace=2.0)


@pytest.fixture
def kv(serve) -> Iterable[ScriptedKV]:
    # Depends on ``serve`` so that it is torn down first: paused handlers are released
    # before their servers close.
    handler = ScriptedKV()
    yield handler
    handler.released.set()


@pytest.fixture
def identity() -> IdentityRecorder:
    return IdentityRecorder()


@pytest.fixture
def server(serve, kv, identity) -> HTTPServer:
    """The scripted KV store (also as the side-effect-free ``ReadableKV``) and the identity
    recorder, with the default server config."""
    return serve(App([kv, ReadableKV(kv), identity]))


@pytest.fixture
def url(server) -> str:
    return server.url


@pytest.fixture
def connect(pki):
    """``connect(url, **ClientConfig fields)`` -> KVServiceClient, closed after the test; an
    https URL is verified against the development CA."""
    clients: list[Client] = []

    def make(base_url: str, **config: Any) -> KVServiceClient:
        if base_url.startswith("https:"):
            config.setdefault("tls", tls.TLSConfig(trust=tls.Trust(cas=(pki.ca.certificate,))))
        client = Client(base_url, ClientConfig(**config))
        clients.append(client)
        return KVServiceClient(client)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def kv_client(connect, url) -> KVServiceClient:
    return connect(url)


# --- the host platform ------------------------------------------------------------------------


@pytest.fixture
def make_host() -> Iterator[Callable[..., PluginHost]]:
    """``make_host(**HostConfig fields)``: a host on a real socket, closed after the test.

    ``handshake=`` and ``plugins=`` replace the platform samples' (the Go tests use Go's)."""
    hosts: list[PluginHost] = []

    def make(handshake: HandshakeConfig = HANDSHAKE, plugins: Any = PLUGINS, **fields: Any) -> PluginHost:
        fields.setdefault("handle_signals", False)
        fields.setdefault("stop_grace", 1.0)
        fields.setdefault("http", HTTPConfig(threads=8, max_streams=8))
        # Peers in these tests join with the magic cookie alone (test_security runs strict hosts).
        fields.setdefault("dev_cookie_joins", True)
        host = PluginHost(handshake, plugins, HostConfig(**fields)).start()
        hosts.append(host)
        return host

    yield make
    for host in reversed(hosts):
        host.close()


@pytest.fixture
def host(make_host) -> PluginHost:
    return make_host()


@pytest.fixture
def peer(serve, make_host) -> Iterator[Callable[..., Peer]]:
    """``peer(host, name, provides=(), version, join_token="")``: a plugin joined by hand
    (see :class:`Peer`)."""
    peers: list[Peer] = []

    def make(
        host: PluginHost,
        name: str,
        provides: tuple[str, ...] = (),
        version: str = "1.0.0",
        join_token: str = "",
    ) -> Peer:
        config = ServeConfig(
            self_id=name, self_version=version, provides=[declare(t, version) for t in provides]
        )
        server = PluginServer(PLUGINS, {"kv": Recorder(name)}, HANDSHAKE, config)
        try:
            http = serve(server.app, threads=4)
            made = Peer(host, name, version, server, http.url, join_token)
            made.http = http
        except BaseException:
            server.link.close()
            raise
        peers.append(made)
        return made

    yield make
    for p in peers:
        p.close()


@pytest.fixture
def sidecar(tmp_path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``sidecar(module, *args)``: a plugin process started by the test itself (not by a host)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}-{len(procs)}.log", "wb")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", name, *args],
                cwd=ROOT,
                env={**os.environ, **ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def world(make_host, peer) -> World:
    host = make_host()
    logger = HostLogger()
    host.broker.add("logger", "1.0.0", logger)
    a = peer(host, "a", provides=("svc",))
    b = peer(host, "b")
    return World(host, a, b, a.register("svc"), logger)


# --- the Go reference -------------------------------------------------------------------------

GOREF = ROOT.parent / "shared" / "goref" / "goref.xz"
"""The Go reference (masegraye/connect-plugin-go at 6f150b6) as one program; CI has
``../shared`` beside the checkout."""


@pytest.fixture(scope="session")
def goref(tmp_path_factory) -> str:
    """The unpacked ``goref`` program; the tests that need it skip on a checkout without it."""
    if not GOREF.exists():
        pytest.skip(
            f"the Go reference is missing: {GOREF} (../shared/goref/goref.xz beside the checkout)"
        )
    program = tmp_path_factory.mktemp("goref") / "goref"
    program.write_bytes(lzma.decompress(GOREF.read_bytes()))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return str(program)


@pytest.fixture
def go(goref) -> Iterator[Callable[..., GoProcess]]:
    """``go("kv", "-addr", ...)``: a goref subcommand as a subprocess, stopped after the test."""
    procs: list[GoProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> GoProcess:
        proc = GoProcess([goref, *args], env)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()


@pytest.fixture
def hang_up() -> Iterator[str]:
    """The URL of a live listener that reads each request and closes without an answer."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was shut down: the test is over
                return
            with conn:
                conn.recv(65536)

    thread = threading.Thread(target=serve, name="hang-up", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux), unlike close()
    listener.close()
    thread.join()


# --- web applications embedding hosts ---------------------------------------------------------


@pytest.fixture
def webserver(tmp_path) -> Iterator[Callable[..., WebServer]]:
    """``webserver(argv, env=None, port=None)``: a test web app served for real (see
    ``tests.webapps.serve_app``); its session and every plugin it ran are killed after the test."""
    servers: list[WebServer] = []

    def start(argv: list[str], env: dict[str, str] | None = None, port: int | None = None) -> WebServer:
        server = serve_app(tmp_path, argv, env, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
