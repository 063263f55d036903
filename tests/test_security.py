"""Security: what an attacker on the same machine can and cannot do to a host and its plugins."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from connectplugin import HTTPConfig, HTTPServer
from tests.helpers import in_process, wait_until

# --- resource bounds (sec-bounds) -------------------------------------------------------------


class Reached:
    """Stands in for an in-process provider's app: counts the calls the router let through."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ, start_response):
        self.calls += 1
        start_response("200 OK", [("Content-Type", "application/proto"), ("Content-Length", "0")])
        return [b""]


def _routed(host, peer, provider=None):
    """A caller's credentials and the URL of ``Get`` of an in-process provider, through the router."""
    client = host.launch(in_process("p", "svc"), name="p")
    if provider is not None:
        host.router.attach_local(host.runtime_id(client), provider)
    caller = peer(host, "caller")
    return caller.credentials(), host.url + caller.discover("svc").endpoint_url + "/Get"


UNARY = {"Content-Type": "application/proto"}
STREAM = {"Content-Type": "application/connect+proto"}


@pytest.mark.parametrize(
    "headers, code",
    [
        ({**UNARY, "Connect-Timeout-Ms": "1234567890123"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "99999999999999999999999999999"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "-1"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "1e3"}, "invalid_argument"),
        ({**UNARY, "Connect-Protocol-Version": "2"}, "invalid_argument"),
        ({**UNARY, "Content-Encoding": "br"}, "unimplemented"),
        ({**STREAM, "Connect-Timeout-Ms": "12345678901"}, "invalid_argument"),
        ({**STREAM, "Connect-Content-Encoding": "zstd"}, "unimplemented"),
    ],
)
def test_router_refuses_bad_connect_headers_as_the_server_would(host, peer, caplog, headers, code):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    with caplog.at_level(logging.ERROR):
        response = requests.post(url, headers={**credentials, **headers}, data=b"", timeout=10)

    if headers["Content-Type"] == STREAM["Content-Type"]:
        assert response.status_code == 200  # a stream's error is its end-of-stream message
        assert f'"code":"{code}"'.encode() in response.content
    else:
        assert response.json()["code"] == code
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert provider.calls == 0


def test_router_relays_a_well_formed_call(host, peer):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.post(url, headers={**credentials, **UNARY, "Connect-Timeout-Ms": "5000"}, timeout=10)

    assert (response.status_code, provider.calls) == (200, 1)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/connect+xml", ""])
def test_router_answers_415_for_a_content_type_connect_does_not_know(host, peer, content_type):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.post(url, headers={**credentials, "Content-Type": content_type}, data=b"", timeout=10)

    assert (response.status_code, provider.calls) == (415, 0)


def test_router_refuses_a_body_over_the_read_limit_before_reading_it(host, peer):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)
    too_big = host.router.read_limit + 1

    response = requests.post(url, headers={**credentials, **UNARY}, data=b"\0" * too_big, timeout=10)

    assert (response.json()["code"], provider.calls) == ("resource_exhausted", 0)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_router_answers_405_for_methods_connect_does_not_use(host, peer, method):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.request(method, url, headers={**credentials, **UNARY}, data=b"", timeout=10)

    assert (response.status_code, provider.calls) == (405, 0)


# Connection hygiene: slow and idle connections give their slot back.

HEAD = b"POST /slow HTTP/1.1\r\nHost: attacker\r\n"
"""The start of a request whose head never ends."""


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


@pytest.fixture
def hygienic() -> Iterator[HTTPServer]:
    """A server with a small connection limit and short timeouts, so the test runs fast."""
    config = HTTPConfig(
        threads=2, connection_limit=20, request_timeout=0.5, idle_timeout=0.5, sweep_interval=0.05
    )
    server = HTTPServer(hello, config).start()
    yield server
    server.close(grace=0)


def _connect(server: HTTPServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_half_open_connections_do_not_lock_out_a_normal_call(hygienic):
    slow = []
    try:
        for _ in range(3 * hygienic.config.connection_limit):
            sock = _connect(hygienic)
            sock.sendall(HEAD)
            slow.append(sock)

        response = requests.get(hygienic.url + "/", timeout=5)

        assert (response.status_code, response.text) == (200, "hello")
        wait_until(lambda: all(_closed_by_server(s) for s in slow), "every slow connection to be closed")
    finally:
        for sock in slow:
            sock.close()


def test_a_request_trickling_in_is_closed_after_request_timeout_however_busy_it_looks(hygienic):
    sock = _connect(hygienic)
    closed = threading.Event()
    try:
        sock.sendall(HEAD)
        lines = 0
        # The attacker's pace: a header line every 50 ms, each one activity for waitress.
        while not closed.wait(0.05):
            try:
                sock.sendall(b"X-Trickle-%d: x\r\n" % lines)
            except OSError:
                break
            lines += 1
            if _closed_by_server(sock):
                break
            sock.setblocking(True)
            assert lines < 200, "a trickling request was never closed"
    finally:
        sock.close()


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(hygienic):
    sock = _connect(hygienic)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"hello"):
            reply += sock.recv(4096)

        wait_until(lambda: _closed_by_server(sock), "the idle connection to be closed")
    finally:
        sock.close()


def test_a_connection_with_a_call_in_progress_is_never_closed_as_slow():
    release = threading.Event()

    def busy(environ, start_response):
        release.wait(2.0)  # the handler's work: longer than request_timeout
        return hello(environ, start_response)

    config = HTTPConfig(threads=2, request_timeout=0.1, idle_timeout=0.1, sweep_interval=0.02)
    with HTTPServer(busy, config) as server:
        response = requests.get(server.url + "/", timeout=5)

    assert response.status_code == 200
