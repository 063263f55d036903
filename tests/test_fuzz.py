"""Fuzzing a host and a plugin from outside, over real sockets, with hypothesis.

Each target runs in its own process (``tests.fuzz_target``), so the test sees what an
operator would: the HTTP answers, the log on stderr and the resident memory. Every answer
must be a proper one (no 5xx without a Connect error body), nothing may be logged as an
error or traceback, the server must still serve correctly afterwards, and its RSS must come
back within ``RSS_SLACK`` of where it started.

``make test`` runs ``FUZZ_EXAMPLES`` cases per target with a fixed seed; ``make fuzz`` runs
20,000 or more with fresh randomness (``CONNECTPLUGIN_FUZZ_EXAMPLES``, ``CONNECTPLUGIN_FUZZ_SEED``).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from connectplugin import Client, ClientConfig
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from tests.helpers import ENV, ROOT

FUZZ_EXAMPLES = int(os.environ.get("CONNECTPLUGIN_FUZZ_EXAMPLES", "1000"))
FUZZ_SEED = os.environ.get("CONNECTPLUGIN_FUZZ_SEED", "20261130")
"""A number: the same cases every run (``make test``); ``random``: new ones (``make fuzz``)."""
RSS_SLACK = 20 * 1024 * 1024
"""How far above its warmed-up RSS a target may end, in bytes."""
ANSWER_TIMEOUT = 10.0
"""Seconds a target has to answer one fuzzed request: longer means it hung."""
STREAM_TIMEOUT_MS = 50
"""The deadline given to well-formed stream calls, which would otherwise stay open."""
WARMUP_CALLS = 200


@dataclass
class Target:
    """A ``tests.fuzz_target`` process: its facts (URL, credentials, paths), log and memory."""

    proc: subprocess.Popen[bytes]
    log: Any
    facts: dict[str, Any]
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        address = self.facts["url"].split("//", 1)[1]
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def logged(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one raw HTTP request on a fresh connection; the status, headers and body."""
        with socket.create_connection((self.host, self.port), timeout=ANSWER_TIMEOUT) as sock:
            # No half-close after it: waitress takes that for a client gone and answers nothing.
            sock.sendall(raw)
            response = http.client.HTTPResponse(sock)
            response.begin()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def _start(kind: str) -> Iterator[Target]:
    log = tempfile.NamedTemporaryFile(prefix=f"fuzz-{kind}-", suffix=".log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fuzz_target", kind],
        cwd=ROOT, env={**os.environ, **ENV}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the {kind} target did not start:\n{open(log.name).read()}"
        yield Target(proc, log, json.loads(line))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def plugin_target() -> Iterator[Target]:
    yield from _start("plugin")


@pytest.fixture(scope="module")
def host_target() -> Iterator[Target]:
    yield from _start("host")


# --- what a request is made of --------------------------------------------------------------

KV = "/kv.v1.KVService/"
PLUGIN_PATHS = [
    KV + "Get", KV + "Put", KV + "Delete", KV + "Watch",
    "/connectplugin.v1.PluginIdentity/GetPluginInfo", "/connectplugin.v1.PluginControl/GetHealth",
    "/connectplugin.health.v1.HealthService/Check", "/connectplugin.health.v1.HealthService/Watch",
    "/healthz", "/readyz",
]
"""Never Shutdown or SetRuntimeIdentity: the open plugin would obey a well-formed one."""
HOST_PATHS = [
    "/connectplugin.v1.HandshakeService/Handshake",
    "/connectplugin.v1.ServiceRegistry/RegisterService",
    "/connectplugin.v1.ServiceRegistry/UnregisterService",
    "/connectplugin.v1.ServiceRegistry/DiscoverService",
    "/connectplugin.v1.ServiceRegistry/WatchService",
    "/connectplugin.v1.PluginLifecycle/ReportHealth",
    "/connectplugin.v1.CapabilityBroker/RequestCapability",
    "/healthz", "/readyz", "/services/svc/nobody/Get", "/capabilities/logger/nothing/x/y",
]
CONTENT_TYPES = [
    "application/proto", "application/json", "application/connect+proto", "application/connect+json",
    "application/json; charset=utf-8", "application/json; charset=latin-1", "APPLICATION/PROTO",
    "text/plain", "application/grpc", "",
]
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
token = st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20)


def _envelope(flags: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BI", flags, len(payload) if length is None else length) + payload


messages = st.one_of(
    st.builds(lambda k: kv_pb2.GetRequest(key=k).SerializeToString(), st.text(max_size=20)),
    st.builds(lambda k, v: kv_pb2.PutRequest(key=k, value=v).SerializeToString(), st.text(max_size=20), st.binary(max_size=64)),
    st.builds(lambda k: json.dumps({"key": k}).encode(), st.text(max_size=20)),
    st.just(b"{}"),
)
bodies = st.one_of(
    st.binary(max_size=256),
    messages,
    st.builds(gzip.compress, messages | st.binary(max_size=256)),
    st.builds(_envelope, st.integers(0, 255), messages | st.binary(max_size=64)),
    st.builds(_envelope, st.integers(0, 3), st.binary(max_size=16), st.integers(0, 2**32 - 1)),
    st.builds(lambda m: _envelope(1, gzip.compress(m)), messages),
    st.builds(lambda a, b: _envelope(0, a) + _envelope(2, b), messages, st.binary(max_size=32)),
    st.just(gzip.compress(b"\0" * (8 * 1024 * 1024))),  # a bomb: 8 MiB from about 8 KiB
    st.just(_envelope(1, gzip.compress(b"\0" * (8 * 1024 * 1024)))),
    st.builds(lambda n: b"\0" * n, st.integers(0, 256 * 1024)),
)
timeouts = st.one_of(st.none(), st.text("0123456789", min_size=1, max_size=16), header_text)
encodings = st.one_of(st.none(), st.sampled_from(["gzip", "identity", "br", "GZIP", ""]), header_text)


@st.composite
def requests_to(draw: st.DrawFn, target: Target, paths: list[str]) -> bytes:
    """One raw HTTP/1.1 request: a real path or a mangled one, Connect headers right or wrong."""
    path = draw(st.sampled_from(paths) | st.builds(lambda p, s: p + s, st.sampled_from(paths), header_text))
    path = "/" + "".join(c if 0x21 <= ord(c) < 0x7F else f"%{ord(c):02X}" for c in path.lstrip("/"))
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "OPTIONS"]))
    if method == "GET" and draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["encoding=proto&message=", "encoding=json&message=%7B%7D", "connect=v2&"]))
        path += draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789%=&_-", max_size=40))
    headers: dict[str, str] = {"Host": "fuzz"}
    content_type = draw(st.sampled_from(CONTENT_TYPES) | header_text)
    if content_type:
        headers["Content-Type"] = content_type
    timeout = draw(timeouts)
    if timeout is not None:
        headers["Connect-Timeout-Ms"] = timeout
    if "Watch" in path or content_type.startswith("application/connect+"):
        # A well-formed stream would stay open: give it a short deadline, or a bad one.
        headers["Connect-Timeout-Ms"] = draw(st.sampled_from([str(STREAM_TIMEOUT_MS), "x", "12345678901"]))
    for name in ["Connect-Protocol-Version", "Content-Encoding", "Connect-Content-Encoding", "Accept-Encoding"]:
        value = draw(encodings if "Encoding" in name else st.one_of(st.none(), st.just("1"), header_text))
        if value is not None:
            headers[name] = value
    credentials = target.facts.get("credentials")
    who = draw(st.sampled_from(["none", "forged", "real"] if credentials else ["none", "forged"]))
    if who == "real":
        headers.update(credentials)
    elif who == "forged":
        headers["X-Plugin-Runtime-ID"] = draw(header_text)
        headers["Authorization"] = "Bearer " + draw(header_text)
    if draw(st.booleans()):
        headers["X-Plugin-Caller-ID"] = draw(header_text)
    for name, value in draw(st.dictionaries(token, header_text, max_size=3)).items():
        headers.setdefault("X-" + name, value)
    body = draw(bodies)
    length = draw(st.sampled_from(["exact", "exact", "exact", "short", "none", "junk"]))
    if length == "exact":
        headers["Content-Length"] = str(len(body))
    elif length == "short":
        headers["Content-Length"] = str(max(0, len(body) - draw(st.integers(1, 10))))
    elif length == "junk":
        headers["Content-Length"] = draw(st.sampled_from(["-1", "abc", "1e3", "99999999999999999999", "+0"]))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


def _check_answer(status: int, headers: dict[str, str], body: bytes) -> None:
    """A 5xx must carry a Connect error: JSON with a code."""
    if status >= 500:
        assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
        assert "code" in json.loads(body), (status, body[:300])


def _fuzz(target: Target, paths: list[str]) -> None:
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def one(data: st.DataObject) -> None:
        raw = data.draw(requests_to(target, paths))
        _check_answer(*target.send(raw))

    if FUZZ_SEED != "random":
        one = seed(int(FUZZ_SEED))(one)
    one()


def _clean(log: str) -> None:
    bad = [line for line in log.splitlines() if "Traceback" in line or line.startswith(("ERROR", "CRITICAL"))]
    assert not bad, "the target logged errors:\n" + log[-4000:]


def _warm_up(target: Target, kv: KVServiceClient) -> int:
    """Exercise the ordinary paths once so lazy imports and caches are in; the RSS then."""
    for n in range(WARMUP_CALLS):
        kv.put(kv_pb2.PutRequest(key=f"k{n % 10}", value=b"v" * n))
        kv.get(kv_pb2.GetRequest(key=f"k{n % 10}"))
    return target.rss()


# --- the tests ------------------------------------------------------------------------------


def test_fuzzed_requests_to_a_plugin_get_proper_answers_and_leave_it_well(plugin_target):
    with Client(plugin_target.facts["url"], ClientConfig(timeout=5)) as client:
        kv = KVServiceClient(client)
        before = _warm_up(plugin_target, kv)

        _fuzz(plugin_target, PLUGIN_PATHS)

        kv.put(kv_pb2.PutRequest(key="after", value=b"fuzzing"))
        assert kv.get(kv_pb2.GetRequest(key="after")).value == b"fuzzing"
    _clean(plugin_target.logged())
    after = plugin_target.rss()
    print(f"plugin RSS: {before / 2**20:.1f} MiB warmed up, {after / 2**20:.1f} MiB after {FUZZ_EXAMPLES} cases")
    assert after - before < RSS_SLACK, f"RSS grew from {before >> 20} MiB to {after >> 20} MiB"


def test_fuzzed_requests_to_a_host_get_proper_answers_and_leave_it_well(host_target):
    facts = host_target.facts
    routed = facts["routed"]
    paths = [*HOST_PATHS, routed + "/Get", routed + "/Put", routed + "/Watch", routed + "/kv.v1.KVService/Get",
             facts["grant"]["path"] + "/capability.logger.v1.Logger/Log"]
    config = ClientConfig(timeout=5, headers=facts["credentials"])
    with Client(facts["url"] + routed, config) as client:
        kv = KVServiceClient(client)
        before = _warm_up(host_target, kv)

        _fuzz(host_target, paths)

        kv.put(kv_pb2.PutRequest(key="after", value=b"fuzzing"))
        assert kv.get(kv_pb2.GetRequest(key="after")).value == b"fuzzing"
    _clean(host_target.logged())
    after = host_target.rss()
    print(f"host RSS: {before / 2**20:.1f} MiB warmed up, {after / 2**20:.1f} MiB after {FUZZ_EXAMPLES} cases")
    assert after - before < RSS_SLACK, f"RSS grew from {before >> 20} MiB to {after >> 20} MiB"


BIG_BODIES = [
    b"\0" * (4 << 20),  # at the read limit
    b"\n" * (3 << 20),  # under it, malformed
    os.urandom(1 << 20),
    b"x" * (5 << 20),  # over it: refused before it is read
]
BOMB = gzip.compress(b"\0" * (8 << 20))
"""8 MiB of zeros in about 8 KiB: inflated only up to the read limit."""
BIG_SENDERS = 8
BIG_REQUESTS = 12
"""Per sender: enough for glibc's growing mmap threshold to strand 50+ MB without the fix."""


@pytest.mark.parametrize("kind", ["plugin", "host"])
def test_large_bodies_from_many_threads_give_their_memory_back(request, kind):
    target: Target = request.getfixturevalue(f"{kind}_target")
    facts = target.facts
    path = facts["routed"] + "/Get" if kind == "host" else KV + "Get"
    credentials = "".join(f"{k}: {v}\r\n" for k, v in facts.get("credentials", {}).items())
    before = target.rss()
    failures: list[BaseException] = []

    def send(body: bytes, gzipped: bool) -> None:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Type: application/proto\r\n"
            f"Content-Length: {len(body)}\r\n{'Content-Encoding: gzip' + chr(13) + chr(10) if gzipped else ''}"
            f"{credentials}\r\n"
        )
        status, headers, answer = target.send(head.encode() + body)
        _check_answer(status, headers, answer)

    def sender(n: int) -> None:
        try:
            for i in range(BIG_REQUESTS):
                if (n + i) % 5 == 4:
                    send(BOMB, True)
                else:
                    send(BIG_BODIES[(n + i) % len(BIG_BODIES)], False)
        except BaseException as e:  # reported on the test's thread
            failures.append(e)

    threads = [threading.Thread(target=sender, args=(n,), name=f"big-sender-{n}") for n in range(BIG_SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not failures, failures
    _clean(target.logged())
    after = target.rss()
    print(f"{kind} RSS: {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after large bodies")
    assert after - before < RSS_SLACK, f"RSS grew from {before >> 20} MiB to {after >> 20} MiB"
