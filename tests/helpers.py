"""Helpers shared by the tests: waiting with a deadline, and plugins for the host's tests.

:func:`wait_until` is the one way a test waits for something it cannot be told about.

Every host test runs a real :class:`PluginHost` on a real socket. Plugins are real too:

- subprocesses (``samples/platform/`` and ``tests/platform_plugins/provider.py``) where a
  process matters: a crash, a host restart, headers crossing HTTP, blue-green replacement;
- in-process launches (``InProcessStrategy``) for the platform manager's ordering logic;
- *peers*: plugins that join the host by hand (a ``PluginServer`` on waitress, a runtime
  identity from the host's handshake, host API calls with those credentials), so a test can
  register several providers of one type with chosen versions, weights and health.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from connectplugin import (
    Client,
    ClientConfig,
    ConnectError,
    HandshakeConfig,
    Health,
    HostLink,
    HTTPServer,
    InProcessStrategy,
    PluginClient,
    PluginHost,
    PluginServer,
    ProcessStrategy,
    ServeConfig,
)
from connectplugin.gen.connectplugin.v1 import lifecycle_pb2, registry_pb2
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.gen.connectplugin.v1.lifecycle_connect import PluginLifecycleClient
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.runtime import handshake as hs
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from samples.platform import HANDSHAKE
from samples.platform.capabilities import HostLogger
from tests.platform_plugins.provider import Recorder, declare

BOTH_SERVERS = pytest.mark.parametrize("server_kind", ["plain", "tls"], indirect=True)
"""Runs a test on waitress and on cheroot over TLS (the ``serve`` fixture and those built on it)."""

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}

GO_HANDSHAKE = HandshakeConfig("CONNECT_PLUGIN", "d3f40b3c2e1a5f8b9c4d7e6a1b2c3d4e")
"""The Go reference's default magic cookie (``connectplugin.DefaultMagicCookieKey/Value``)."""

HEALTHY = lifecycle_pb2.HEALTH_STATE_HEALTHY
DEGRADED = lifecycle_pb2.HEALTH_STATE_DEGRADED
UNHEALTHY = lifecycle_pb2.HEALTH_STATE_UNHEALTHY

STATE = registry_pb2.ServiceState.Name
AVAILABLE = "SERVICE_STATE_AVAILABLE"
UNAVAILABLE = "SERVICE_STATE_UNAVAILABLE"
SERVICE_DEGRADED = "SERVICE_STATE_DEGRADED"


T = TypeVar("T")

POLL_INTERVAL = 0.01
"""Seconds between looks in :func:`wait_until`: short next to any deadline a test sets."""


# --- waiting ----------------------------------------------------------------------------------


def wait_until(check: Callable[[], T], what: str | Callable[[], str], timeout: float = 5.0) -> T:
    """Poll ``check()`` until it is truthy and return that value; fail the test after ``timeout`` s.

    ``what`` names what is awaited, for the failure message; a callable is asked only then, so
    the message can show the state that never came right. For things nothing signals (another
    process, a server's internals); wait on an Event where there is one.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}"
            )
        time.sleep(POLL_INTERVAL)


def in_forked_child(check: Callable[[], dict]) -> dict:
    """Run ``check()`` (returning a JSON-able dict) in a forked child; its answer, once it exited."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(check()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        answer = report.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and answer, f"the forked child failed (status {status})"
    return json.loads(answer)


class Clock:
    """A monotonic clock that moves only when the test says: ``clock.advance(seconds)``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- plugins ----------------------------------------------------------------------------------


def module(name: str, *args: str) -> ProcessStrategy:
    """Launch ``python -m <name> <args>`` from the repository root."""
    return ProcessStrategy([sys.executable, "-m", name, *args], env=ENV, cwd=str(ROOT))


def provider_process(service_type: str, version: str = "1.0.0") -> ProcessStrategy:
    return module("tests.platform_plugins.provider", "--type", service_type, "--version", version)


def in_process(
    name: str, *provides: str, health: Health | None = None, link: HostLink | None = None
) -> InProcessStrategy:
    """A ``Recorder`` labelled ``name`` inside this process, declaring ``provides``."""
    config = ServeConfig(
        self_id=name, self_version="1.0.0", provides=[declare(t) for t in provides]
    )
    return InProcessStrategy({"kv": Recorder(name)}, config, health=health, link=link)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound: no server has taken it."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def host_secret(host: PluginHost, client: PluginClient) -> str:
    """The secret ``host`` presents to the plugin it launched as ``client``."""
    identity = host.identities.get(host.runtime_id(client))
    assert identity is not None, f"{client.name} has no identity"
    return identity.host_secret


def listening(port: int) -> bool:
    """Whether a server accepts connections on 127.0.0.1:``port`` (unlike :func:`port_is_free`,
    not fooled by the TIME_WAIT sockets a closed server leaves behind)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def provider_ids(host: PluginHost, service_type: str) -> list[str]:
    return [p.provider_id for p in host.registry.providers(service_type)]


class Reader:
    """Reads a server stream on its own thread until it ends, or until ``limit`` messages or
    ``until(message)`` is true; then it hangs up itself."""

    def __init__(
        self,
        open_stream: Callable[[], Any],
        limit: int | None = None,
        until: Callable[[Any], bool] | None = None,
    ) -> None:
        self.messages: list[Any] = []
        self.error: ConnectError | None = None
        self.ended = threading.Event()
        self._open = open_stream
        self._limit = limit
        self._until = until
        self._thread = threading.Thread(target=self._read, name="test-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            stream = self._open()
            try:
                for message in stream:
                    self.messages.append(message)
                    if self._limit is not None and len(self.messages) >= self._limit:
                        break
                    if self._until is not None and self._until(message):
                        break
            finally:
                stream.close()
        except ConnectError as e:
            self.error = e
        finally:
            self.ended.set()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Any]:
        wait_until(
            lambda: len(self.messages) >= count or self.ended.is_set(), f"{count} messages", timeout
        )
        assert len(self.messages) >= count, f"stream ended after {self.messages} ({self.error})"
        return self.messages

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"

    @property
    def states(self) -> list[str]:
        return [STATE(e.state) for e in self.messages]


class Peer:
    """A plugin that joins the host by hand: its own server, a runtime identity, host API calls.

    Its server is a ``PluginServer`` (so the host's one check of its base URL, a handshake,
    is answered) serving a ``Recorder`` labelled with the peer's name. It joins with
    ``join_token`` when given, else with the cookie alone (the hosts of these tests turn the
    development switch on).
    """

    def __init__(
        self,
        host: PluginHost,
        name: str,
        version: str,
        server: PluginServer,
        base_url: str,
        join_token: str = "",
    ) -> None:
        self.host_url = host.url
        self.name = name
        self.server = server
        self.base_url = base_url
        self.http: HTTPServer | None = None
        """Its HTTP server, when a fixture started one (close it to make the peer unreachable)."""
        with Client(host.url, ClientConfig(timeout=5)) as client:
            request = hs.request_for(HANDSHAKE, (), self_id=name, self_version=version)
            if join_token:
                request.client_metadata[hs.JOIN_TOKEN_KEY] = join_token
            response = HandshakeServiceClient(client).handshake(request)
        self.handshake = response
        self.runtime_id, self.token = response.runtime_id, response.runtime_token
        self._clients: list[Client] = []
        self.api = self.client(host.url)
        self.registry = ServiceRegistryClient(self.api)

    def credentials(self) -> dict[str, str]:
        return {"X-Plugin-Runtime-ID": self.runtime_id, "Authorization": f"Bearer {self.token}"}

    def client(
        self, url: str, timeout: float | None = 5.0, extra: dict[str, str] | None = None
    ) -> Client:
        client = Client(
            url, ClientConfig(timeout=timeout, headers={**self.credentials(), **(extra or {})})
        )
        self._clients.append(client)
        return client

    def register(self, service_type: str, version: str = "1.0.0", **metadata: str) -> str:
        request = registry_pb2.RegisterServiceRequest(
            service_type=service_type,
            version=version,
            endpoint_path=KV_PLUGIN.service_path,
            metadata={"base_url": self.base_url, **metadata},
        )
        return self.registry.register_service(request).registration_id

    def unregister(self, registration_id: str) -> None:
        self.registry.unregister_service(
            registry_pb2.UnregisterServiceRequest(registration_id=registration_id)
        )

    def report(self, state: lifecycle_pb2.HealthState) -> None:
        PluginLifecycleClient(self.api).report_health(
            lifecycle_pb2.ReportHealthRequest(state=state, reason="test")
        )

    def discover(self, service_type: str, min_version: str = "") -> registry_pb2.ServiceEndpoint:
        request = registry_pb2.DiscoverServiceRequest(
            service_type=service_type, min_version=min_version
        )
        return self.registry.discover_service(request).endpoint

    def kv(
        self, endpoint: registry_pb2.ServiceEndpoint, extra: dict[str, str] | None = None
    ) -> KVServiceClient:
        """A KV client for a discovered endpoint, called through the host's router."""
        return KVServiceClient(self.client(self.host_url + endpoint.endpoint_url, extra=extra))

    def watch(self, service_type: str, limit: int | None = None) -> Reader:
        streams = self.client(self.host_url, timeout=None)
        request = registry_pb2.WatchServiceRequest(service_type=service_type)
        return Reader(lambda: ServiceRegistryClient(streams).watch_service(request), limit)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.link.close()


@dataclass
class World:
    """A host offering the ``logger`` capability; ``a`` provides ``svc``, ``b`` only calls."""

    host: PluginHost
    a: Peer
    b: Peer
    registration: str
    logger: HostLogger


# --- the Go reference -------------------------------------------------------------------------


class GoProcess:
    """A ``goref`` subcommand (or anything else) run as a subprocess, its output collected.

    A named thread reads its stdout and stderr (merged) until they close; :meth:`line`
    waits for a line with a prefix (the machine-readable lines goref prints).
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args,
            env={**os.environ, **ENV, "CONNECTPLUGIN_DISABLE_TLS_WARNING": "1", **(env or {})},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name="go-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))

    def line(self, prefix: str, timeout: float = 10.0) -> str:
        """The rest of the first output line starting with ``prefix``; waits for it."""

        def found() -> str | None:
            return next(
                (ln[len(prefix) :].strip() for ln in list(self.lines) if ln.startswith(prefix)),
                None,
            )

        wait_until(
            lambda: found() is not None or self.proc.poll() is not None,
            lambda: f"{prefix!r} from {self.args[1:2]}; its output: {self.lines[-20:]}",
            timeout,
        )
        if found() is None:
            self._reader.join(timeout=2)  # it exited: its last lines may still be in the pipe
        rest = found()
        if rest is None:
            pytest.fail(f"{self.args[1:2]} exited without printing {prefix!r}: {self.lines[-20:]}")
        return rest

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)


def http_ok(url: str) -> bool:
    """Whether ``GET url`` answers 200 (a server's readiness, for :func:`wait_until`)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False
