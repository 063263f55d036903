"""Fixtures: real waitress servers on port 0, clients, and a guard against leaked threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from connectplugin import App, Client, ClientConfig, HTTPConfig, HTTPServer
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from tests.services import IdentityRecorder, ScriptedKV

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every thread a test starts (server loops, workers) must be gone shortly after it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not extra, f"threads still running after the test: {extra}"


@pytest.fixture
def serve():
    """``serve(app, threads=4)`` runs a WSGI app on waitress at 127.0.0.1:0 until the test ends."""
    servers: list[HTTPServer] = []

    def start(app: WSGIApp, threads: int = 4) -> HTTPServer:
        server = HTTPServer(app, HTTPConfig(threads=threads)).start()
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
    """The scripted KV store and the identity recorder, with the default server config."""
    return serve(App([kv, identity]))


@pytest.fixture
def url(server) -> str:
    return server.url


@pytest.fixture
def connect():
    """``connect(url, **ClientConfig fields)`` -> KVServiceClient, closed after the test."""
    clients: list[Client] = []

    def make(base_url: str, **config: Any) -> KVServiceClient:
        client = Client(base_url, ClientConfig(**config))
        clients.append(client)
        return KVServiceClient(client)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def kv_client(connect, url) -> KVServiceClient:
    return connect(url)
