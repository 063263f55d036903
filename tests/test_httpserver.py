"""HTTPServer: construction is inert; bind, start and close do what their names say; waitress
(plaintext) and cheroot (TLS) behave alike: limits, streams, disconnections, graceful close."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import requests

from connectplugin import App, HTTPServer
from samples.kv.gen.kv.v1 import kv_pb2
from tests.helpers import BOTH_SERVERS, free_port, port_is_free, wait_until

pytestmark = BOTH_SERVERS


def hello(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def test_constructing_a_server_binds_no_port_and_starts_no_thread(http_config):
    port = free_port()
    before = set(threading.enumerate())

    server = HTTPServer(hello, dataclasses.replace(http_config, port=port))

    assert set(threading.enumerate()) == before
    assert port_is_free(port)
    with pytest.raises(RuntimeError):
        server.url  # noqa: B018 - the property raises until bound
    server.close()


def test_bind_takes_the_port_without_serving_and_returns_the_url(http_config, server_kind):
    server = HTTPServer(hello, http_config)
    before = set(threading.enumerate())
    try:
        url = server.bind()

        scheme = "https" if server_kind == "tls" else "http"
        assert url == server.url == f"{scheme}://127.0.0.1:{server.port}"
        assert server.bind() == url  # idempotent
        assert not port_is_free(server.port)
        assert set(threading.enumerate()) == before
    finally:
        server.close()


def test_start_serves_on_a_thread_named_for_its_port_at_the_bound_url(http_config, ca_file):
    server = HTTPServer(hello, http_config)
    url = server.bind()
    try:
        server.start()

        assert requests.get(url, timeout=5, verify=ca_file).text == "hello"
        assert server._thread is not None and server._thread.name.endswith(f":{server.port}")
    finally:
        server.close(grace=1.0)


def test_close_of_a_bound_server_that_never_served_releases_its_port(http_config):
    server = HTTPServer(hello, http_config)
    server.bind()
    port = server.port

    server.close()

    assert port_is_free(port)


def test_close_of_a_serving_server_releases_its_port_and_threads(http_config, ca_file):
    before = set(threading.enumerate())
    server = HTTPServer(hello, http_config).start()
    requests.get(server.url, timeout=5, verify=ca_file)
    port = server.port

    server.close(grace=1.0)

    assert port_is_free(port)
    wait_until(lambda: set(threading.enumerate()) <= before, "the server's threads to end", timeout=5)


def test_config_limits_reach_the_server(http_config, ca_file):
    server = HTTPServer(hello, dataclasses.replace(http_config, max_request_body_size=1024)).start()
    try:
        reply = requests.post(server.url, data=b"x" * 4096, timeout=5, verify=ca_file)

        assert reply.status_code == 413
    finally:
        server.close(grace=1.0)


def test_a_small_answer_arrives_whole_in_one_read(serve, server_kind, ca_file):
    # Head and body sent apart would be two segments, and the client woken for each.
    server = serve(hello)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    if server_kind == "tls":
        sock = ssl.create_default_context(cafile=ca_file).wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        for _ in range(20):  # a split shows on most tries: the client waits in recv before the answer
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")

            first = sock.recv(65536)

            assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\nhello")


def _ask(sock: socket.socket, requests: int = 1) -> list[bytes]:
    """Send ``requests`` GETs at once (pipelined) and read their answers (``hello``'s)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n" * requests)
    received = b""
    while received.count(b"hello") < requests:
        data = sock.recv(65536)
        assert data, "the server closed the connection"
        received += data
    return [b"HTTP/1.1" + answer for answer in received.split(b"HTTP/1.1")[1:]]


def test_keep_alive_calls_wake_the_serving_loop_only_when_it_has_work(serve, server_kind):
    if server_kind == "tls":
        pytest.skip("waitress's serving loop (cheroot has none such)")
    server = serve(hello)
    trigger = server._server.trigger
    pulls = []
    pull = trigger.pull_trigger
    trigger.pull_trigger = lambda *args: (pulls.append(args), pull(*args))  # counts, then wakes as before
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        assert len(_ask(sock)) == 1
        (channel,) = server._server.active_channels.values()
        pulls.clear()
        for _ in range(20):
            # Each call once the last is over: a request arriving before that queues behind
            # it, and the loop, no longer reading, must be woken to read again.
            wait_until(lambda: not channel.requests and channel.watched, "the last call to be over")
            assert len(_ask(sock)) == 1

        # Nothing to send or close after a call, and the loop waiting for the next one already.
        assert len(pulls) <= 2

        answers = _ask(sock, 3)  # pipelined: the loop stops reading while they queue
        assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
        assert len(_ask(sock)) == 1


# --- streams ------------------------------------------------------------------------------------


def test_stream_headers_arrive_before_the_first_message(connect, serve, kv):
    first_sent = threading.Event()

    def quiet(request, ctx):
        ctx.response_headers["x-early"] = "yes"

        def messages():
            kv.released.wait(5)  # says nothing until the test has seen the headers
            first_sent.set()
            yield kv_pb2.WatchEvent(key="late")

        return messages()

    kv.script("watch", quiet)
    client = connect(serve(App([kv])).url)

    with client.watch(kv_pb2.WatchRequest(), timeout=10) as stream:
        assert stream.headers["x-early"] == "yes"
        assert not first_sent.is_set()
        kv.released.set()
        assert next(stream).key == "late"


def test_a_handler_sees_its_client_leave(connect, serve, kv):
    entered, ended = threading.Event(), threading.Event()

    def waiting(request, ctx):
        entered.set()
        while ctx.is_active() and not kv.released.is_set():
            kv.pause(0.01)
        ended.set()
        yield from ()

    kv.script("watch", waiting)
    client = connect(serve(App([kv])).url)
    stream = client.watch(kv_pb2.WatchRequest())
    assert entered.wait(5)

    stream.close()

    assert ended.wait(5)


def test_close_lets_a_call_in_flight_finish_within_the_grace(http_config, connect, kv):
    entered = threading.Event()

    def slow_get(request, ctx):
        entered.set()
        kv.pause(0.3)
        return kv_pb2.GetResponse(found=True, value=b"done")

    kv.script("get", slow_get)
    server = HTTPServer(App([kv]), http_config).start()
    client = connect(server.url)
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.append(client.get(kv_pb2.GetRequest(key="a"), timeout=10)))
    caller.start()
    assert entered.wait(5)

    server.close(grace=5.0)
    caller.join(10)

    assert result and result[0].value == b"done"


def _connection(server: HTTPServer, ca_file: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    if server.config.tls is None:
        return sock
    return ssl.create_default_context(cafile=ca_file).wrap_socket(sock, server_hostname="127.0.0.1")


def test_close_drops_a_client_still_sending_its_next_request_head_at_once(http_config, ca_file):
    # No call is in flight: the grace is not for it (the TLS server failed here, leaking a worker).
    before = set(threading.enumerate())
    server = HTTPServer(hello, http_config).start()
    with _connection(server, ca_file) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        closer = threading.Thread(target=server.close, kwargs={"grace": 60.0})
        closer.start()

        closer.join(30)  # generous: it takes milliseconds

        assert not closer.is_alive()
        assert sock.recv(65536) == b""
    wait_until(lambda: set(threading.enumerate()) <= before, "the server's threads to end", timeout=5)


def test_close_ends_a_call_still_reading_its_body_after_the_grace(http_config, ca_file):
    before = set(threading.enumerate())
    reading = threading.Event()

    def app(environ, start_response):
        reading.set()
        environ["wsgi.input"].read()
        return hello(environ, start_response)

    server = HTTPServer(app, http_config).start()
    with _connection(server, ca_file) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        if http_config.tls is not None:  # waitress runs the app only once the body is in
            assert reading.wait(5)

        server.close(grace=0.2)

        wait_until(lambda: set(threading.enumerate()) <= before, "the server's threads to end", timeout=5)
