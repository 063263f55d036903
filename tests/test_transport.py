"""_transport.py on its own: every transport keeps the one contract (send, read, close) and
turns its collaborators' failures into TransportError."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
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


@contextlib.contextmanager
def raw_peer(*replies: bytes, make: Callable[[str], Transport] = connection_pool) -> Iterator[tuple[Transport, list[bytes]]]:
    """A transport to a peer that answers each request on one connection with the next of
    ``replies`` as is, then closes; yields the transport and the requests as received."""
    received: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                for reply in replies:
                    received.append(conn.recv(65536))
                    conn.sendall(reply)

        thread = threading.Thread(target=answer, name="raw-peer")
        thread.start()
        transport = make(f"http://127.0.0.1:{listener.getsockname()[1]}")
        try:
            yield transport, received
        finally:
            transport.close()
            thread.join(5)


@pytest.mark.parametrize("make_transport", SOCKET_TRANSPORTS)
def test_a_body_cut_short_is_a_transport_error_on_read(make_transport):
    with raw_peer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", make=make_transport) as (transport, _):
        response = transport.send("GET", "/", {}, None, 5.0, 5.0)
        try:
            with pytest.raises(TransportError):
                while response.read(100):
                    pass
        finally:
            response.close()


# --- ConnectionPool: HTTP/1.1 spoken on the socket itself -----------------------------------


def read_all(response: _transport.Response) -> bytes:
    try:
        return response.read(1 << 20)
    finally:
        response.close()


def test_the_pool_sends_head_and_body_in_one_write_with_its_host():
    with raw_peer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as (pool, received):
        assert read_all(pool.send("POST", "/p", {"X-Test": "t"}, b"hi", 5.0, 5.0)) == b"ok"

    head, _, body = received[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /p HTTP/1.1" and lines[1].startswith(b"Host: 127.0.0.1:")
    assert b"X-Test: t" in lines and b"Content-Length: 2" in lines and body == b"hi"


def test_a_host_header_of_the_callers_replaces_the_pools_own():
    with raw_peer(b"HTTP/1.1 204 No Content\r\n\r\n") as (pool, received):
        read_all(pool.send("GET", "/", {"Host": "plugin.example"}, None, 5.0, 5.0))

    lines = received[0].split(b"\r\n")
    assert [line for line in lines if line.lower().startswith(b"host:")] == [b"Host: plugin.example"]


@pytest.mark.parametrize(
    "headers, target",
    [({"X-Test": "t\r\nX-Smuggled: 1"}, "/p"), ({"X-Test\r\nX-Smuggled": "1"}, "/p"), ({}, "/p HTTP/1.1\r\nX: 1")],
)
def test_the_pool_refuses_a_header_or_target_that_would_smuggle_a_line(serve, headers, target):
    pool = ConnectionPool(serve(echo).url, 4)
    try:
        with pytest.raises(ValueError):
            pool.send("GET", target, headers, None, 5.0, 5.0)
    finally:
        pool.close()


def test_a_chunked_body_is_read_without_its_framing_and_the_connection_kept():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nf"
    with raw_peer(chunked, plain) as (pool, received):
        first = read_all(pool.send("GET", "/", {}, None, 5.0, 5.0))
        second = read_all(pool.send("GET", "/", {}, None, 5.0, 5.0))

    assert (first, second, len(received)) == (b"abcde", b"f", 2)  # one connection for both


def test_an_interim_response_is_skipped():
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok"
    with raw_peer(reply) as (pool, _):
        response = pool.send("POST", "/", {}, b"x", 5.0, 5.0)
        assert (response.status, response.headers["x-a"], read_all(response)) == (200, "1", b"ok")


@pytest.mark.parametrize("folded", [False, True], ids=["plain", "folded"])
def test_header_values_lose_the_blanks_around_them_and_folded_lines_are_joined(folded):
    fold = b"X-C: one\r\n \t two\r\n" if folded else b"X-C: one two\r\n"
    reply = b"HTTP/1.1 200 OK\r\nX-A: \t v  w \t\r\nX-B:\r\n" + fold + b"Content-Length: 0\r\n\r\n"
    with raw_peer(reply) as (pool, _):
        response = pool.send("GET", "/", {}, None, 5.0, 5.0)
        assert response.header_items() == [("X-A", "v  w"), ("X-B", ""), ("X-C", "one two"), ("Content-Length", "0")]


def test_a_body_ending_with_the_connection_is_read_to_its_end_and_not_kept():
    with raw_peer(b"HTTP/1.0 200 OK\r\n\r\nall of it") as (pool, _):
        assert read_all(pool.send("GET", "/", {}, None, 5.0, 5.0)) == b"all of it"
        assert isinstance(pool, ConnectionPool) and not pool._idle


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: v\nSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: v\rSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX Evil: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX\x0bA: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T: 1\r\n" * 101 + b"\r\n",
    ],
    ids=[
        "version", "status", "header", "length", "chunk-size", "too-many-headers",
        "lone-LF-in-value", "lone-CR-in-value", "LF-in-reason", "NUL-in-value", "space-in-name",
        "VT-in-name", "status-101", "status-000", "interim-flood", "non-ASCII-digit-length",
        "0x-chunk-size", "signed-chunk-size", "trailer-flood",
    ],
)
def test_a_malformed_response_is_a_transport_error(reply):
    with raw_peer(reply) as (pool, _):
        with pytest.raises(TransportError):
            read_all(pool.send("GET", "/", {}, None, 5.0, 5.0))


def test_wait_looks_at_the_socket_only_when_the_buffer_holds_nothing():
    """Between two chunks a quiet peer makes wait() time out rather than claim bytes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        pool = ConnectionPool(f"http://127.0.0.1:{listener.getsockname()[1]}", 4)
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        try:
            pooled = _transport._Connection(client)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
            response = _transport._PooledResponse(pooled, pool, head_only=False)
            assert response.wait(1.0) and response.read1(10) == b"ab"
            assert not response.wait(0.05)  # the chunk's CRLF is in, the next size is not
            conn.sendall(b"1\r\nc\r\n0\r\n\r\n")
            assert response.wait(5.0) and response.read(10) == b"c"
        finally:
            conn.close()
            client.close()
            pool.close()


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


def test_content_length_beside_chunked_framing_is_dropped_not_passed_on():
    # A relay passing on the length of a chunked body lets the client read past its end.
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    with raw_peer(reply) as (pool, _):
        response = pool.send("GET", "/", {}, None, 5.0, 5.0)
        items = [name.lower() for name, _ in response.header_items()]
        assert ("content-length" in response.headers, "content-length" in items, read_all(response)) == (False, False, b"{}")


def test_a_peer_trickling_its_body_is_cut_off_at_the_deadline_not_each_waits_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        closed = threading.Event()

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                conn.settimeout(0.05)
                # A byte every 50 ms, well inside the 5 s timeout of each wait, for up to 30 s.
                for _ in range(600):
                    try:
                        conn.sendall(b" ")
                        if not conn.recv(1):
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                closed.set()

        thread = threading.Thread(target=trickle, name="trickle")
        thread.start()
        pool = ConnectionPool(f"http://127.0.0.1:{listener.getsockname()[1]}", 4)
        try:
            deadline = time.monotonic() + 0.5
            with pytest.raises(TransportTimeout):
                read_all(pool.send("GET", "/", {}, None, 5.0, 5.0, deadline=deadline))
            assert closed.wait(10), "the pool kept reading past its deadline"
        finally:
            pool.close()
            thread.join(35)
