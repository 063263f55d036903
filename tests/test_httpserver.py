"""HTTPServer: construction is inert; bind, start and close do what their names say."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import requests

from connectplugin import HTTPConfig, HTTPServer
from tests.helpers import free_port, port_is_free


def hello(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def test_constructing_a_server_binds_no_port_and_starts_no_thread():
    port = free_port()
    before = set(threading.enumerate())

    server = HTTPServer(hello, HTTPConfig(port=port))

    assert set(threading.enumerate()) == before
    assert port_is_free(port)
    with pytest.raises(RuntimeError):
        server.url  # noqa: B018 - the property raises until bound
    server.close()


def test_bind_takes_the_port_without_serving_and_returns_the_url():
    server = HTTPServer(hello)
    before = set(threading.enumerate())
    try:
        url = server.bind()

        assert url == server.url == f"http://127.0.0.1:{server.port}"
        assert server.bind() == url  # idempotent
        assert not port_is_free(server.port)
        assert set(threading.enumerate()) == before
    finally:
        server.close()


def test_start_serves_on_a_thread_named_for_its_port_at_the_bound_url():
    server = HTTPServer(hello)
    url = server.bind()
    try:
        server.start()

        assert requests.get(url, timeout=5).text == "hello"
        assert f"waitress:{server.port}" in {t.name for t in threading.enumerate()}
    finally:
        server.close(grace=1.0)


def test_close_of_a_bound_server_that_never_served_releases_its_port():
    server = HTTPServer(hello)
    server.bind()
    port = server.port

    server.close()

    assert port_is_free(port)


def test_config_limits_reach_waitress():
    server = HTTPServer(hello, HTTPConfig(max_request_body_size=1024)).start()
    try:
        reply = requests.post(server.url, data=b"x" * 4096, timeout=5)

        assert reply.status_code == 413
    finally:
        server.close(grace=1.0)
