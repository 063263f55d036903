"""_transport.py on its own: every transport keeps the one contract (send, read, close) and
turns its collaborators' failures into TransportError."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import requests
from requests.adapters import HTTPAdapter

from connectplugin.rpc import _transport
from connectplugin.rpc._transport import (
    AdapterTransport,
    ConnectionPool,
    PoolTransport,
    Transport,
    TransportError,
    TransportTimeout,
    WSGIAdapter,
)


def echo(environ, start_response):
    """Answers with what it received, and where from, as JSON."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    reply = {
        "method": environ["REQUEST_METHOD"],
        "path": environ["PATH_INFO"],
        "query": environ.get("QUERY_STRING", ""),
        "x-test": environ.get("HTTP_X_TEST"),
        "body": body.decode(),
        "peer": f"port {environ.get('REMOTE_PORT')}",
    }
    data = json.dumps(reply).encode()
    start_response(
        "201 Made",
        [("Content-Type", "application/json"), ("X-Twice", "a"), ("X-Twice", "b"), ("Content-Length", str(len(data)))],
    )
    return [data]


class _SendingAdapter(HTTPAdapter):
    """Changes how a request is sent, so the client may not skip its ``send``."""

    def send(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().send(*args, **kwargs)


def _session(adapter: requests.adapters.BaseAdapter) -> requests.Session:
    session = requests.Session()
    session.mount("http://", adapter)
    return session


def pool_transport(url: str) -> Transport:
    return _transport.for_session(_session(HTTPAdapter(max_retries=0)), url)


def adapter_transport(url: str) -> Transport:
    return _transport.for_session(_session(_SendingAdapter(max_retries=0)), url)


def connection_pool(url: str) -> Transport:
    return ConnectionPool(url, 4)


SOCKET_TRANSPORTS = [pool_transport, adapter_transport, connection_pool]


@pytest.fixture(params=SOCKET_TRANSPORTS, ids=lambda f: f.__name__)
def make(request) -> Iterator[Callable[[str], Transport]]:
    made: list[Transport] = []

    def build(url: str) -> Transport:
        transport = request.param(url)
        made.append(transport)
        return transport

    yield build
    for transport in made:
        transport.close()


def call(transport: Transport, target: str = "/p?q=1", read_timeout: float | None = 5.0) -> tuple[_transport.Response, dict]:
    response = transport.send("POST", target, {"X-Test": "t", "Content-Length": "2"}, b"hi", 5.0, read_timeout)
    try:
        return response, json.loads(response.read(1 << 20))
    finally:
        response.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the contract ---------------------------------------------------------------------------


def test_send_delivers_method_target_headers_and_body(serve, make):
    transport = make(serve(echo).url)

    response, got = call(transport)

    assert (got["method"], got["path"], got["query"], got["x-test"], got["body"]) == ("POST", "/p", "q=1", "t", "hi")
    assert (response.status, response.reason) == (201, "Made")


def test_response_headers_are_lower_cased_with_repeats_joined(serve, make):
    response, _ = call(make(serve(echo).url))

    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-twice"] == "a, b"


def test_a_base_url_path_prefixes_every_target(serve, make):
    response, got = call(make(serve(echo).url + "/base"))

    assert got["path"] == "/base/p"


def test_a_connection_read_to_its_end_is_used_again(serve, make):
    transport = make(serve(echo).url)

    _, first = call(transport)
    _, second = call(transport)

    assert first["peer"] == second["peer"]


def test_a_connection_closed_before_its_end_is_not_used_again(serve, make):
    transport = make(serve(echo).url)
    response = transport.send("GET", "/", {}, None, 5.0, 5.0)
    partial = response.read(int(response.headers["content-length"]) - 1)
    response.close()

    _, got = call(transport)

    assert got["peer"] not in partial.decode()


def test_header_items_keep_repeated_fields(serve):
    pool = ConnectionPool(serve(echo).url, 4)
    try:
        response = pool.send("GET", "/", {}, None, 5.0, 5.0)
        response.close()
    finally:
        pool.close()

    assert [v for k, v in response.header_items() if k == "X-Twice"] == ["a", "b"]


# --- foreign failures, translated -----------------------------------------------------------


def test_a_refused_connection_is_a_transport_error_saying_so(make):
    transport = make(f"http://127.0.0.1:{closed_port()}")

    with pytest.raises(TransportError) as e:
        call(transport)

    assert e.value.refused
    assert not isinstance(e.value, TransportTimeout)


def test_a_peer_slower_than_the_read_timeout_is_a_transport_timeout(serve, make):
    release = threading.Event()

    def slow(environ, start_response):
        release.wait(5)
        return echo(environ, start_response)

    transport = make(serve(slow).url)
    try:
        with pytest.raises(TransportTimeout) as e:
            call(transport, read_timeout=0.05)
    finally:
        release.set()

    assert not e.value.refused


@pytest.mark.parametrize("make_transport", [pool_transport, adapter_transport])
def test_a_body_cut_short_is_a_transport_error_on_read(make_transport):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")

        thread = threading.Thread(target=answer, name="short-body")
        thread.start()
        transport = make_transport(f"http://127.0.0.1:{listener.getsockname()[1]}")
        response = transport.send("GET", "/", {}, None, 5.0, 5.0)
        thread.join()
        try:
            with pytest.raises(TransportError):
                while response.read(100):
                    pass
        finally:
            response.close()
            transport.close()


# --- which transport a session gets ---------------------------------------------------------


@pytest.mark.parametrize(
    "adapter, kind",
    [
        (HTTPAdapter(), PoolTransport),
        (_SendingAdapter(), AdapterTransport),
        (WSGIAdapter(echo), AdapterTransport),
    ],
)
def test_for_session_calls_the_pool_only_of_requests_own_adapter(adapter, kind):
    assert type(_transport.for_session(_session(adapter), "http://x")) is kind


# --- in process -----------------------------------------------------------------------------


def test_the_wsgi_adapter_keeps_the_contract_without_a_socket():
    transport = _transport.for_session(_session(WSGIAdapter(echo)), "http://plugin.invalid")

    response, got = call(transport)

    assert (response.status, response.headers["x-twice"]) == (201, "a, b")
    assert (got["method"], got["path"], got["query"], got["body"]) == ("POST", "/p", "q=1", "hi")


def test_an_app_failing_before_it_answers_is_a_500_in_process():
    def broken(environ, start_response):
        return iter(())

    transport = _transport.for_session(_session(WSGIAdapter(broken)), "http://plugin.invalid")
    response = transport.send("GET", "/", {}, None, 5.0, None)

    assert (response.status, response.read(10)) == (500, b"")
