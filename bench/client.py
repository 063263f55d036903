"""Section ``client``: sequential latency of one unary Get from three Python HTTP clients.

The server (ours, in its own process) is the same for all; one call at a time over one
keep-alive connection, so the differences are the client stacks'. Every client builds and
serializes the request and parses the response, so the proto work is the same in each.
Calls are made in interleaved blocks (raw, requests, ours, raw, ...) to share any drift.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable

import requests

from bench import fixtures, report
from bench.servers import ServerProcess, http_config, pinned, placement
from bench.settings import Settings
from connectplugin import Client
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient

TARGETS = {"connectplugin.Client": 1.5}
"""Largest acceptable p50 ratio to raw http.client, per client."""
EXPECTED = {"requests.Session.post": 3.0}

Call = Callable[[], kv_pb2.GetResponse]


def _raw(host: str, port: int) -> tuple[Call, Callable[[], None]]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = fixtures.request_headers("proto")

    def call() -> kv_pb2.GetResponse:
        conn.request(
            "POST", fixtures.PATH, kv_pb2.GetRequest(key="bench-key").SerializeToString(), headers
        )
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"raw http.client: HTTP {response.status} {body[:200]!r}")
        return kv_pb2.GetResponse.FromString(body)

    return call, conn.close


def _requests(url: str) -> tuple[Call, Callable[[], None]]:
    session = requests.Session()
    headers = fixtures.request_headers("proto")
    endpoint = url + fixtures.PATH

    def call() -> kv_pb2.GetResponse:
        response = session.post(
            endpoint, data=kv_pb2.GetRequest(key="bench-key").SerializeToString(), headers=headers
        )
        if response.status_code != 200:
            raise RuntimeError(f"requests: HTTP {response.status_code} {response.content[:200]!r}")
        return kv_pb2.GetResponse.FromString(response.content)

    return call, session.close


def _ours(url: str) -> tuple[Call, Callable[[], None]]:
    client = Client(url)
    kv = KVServiceClient(client)

    def call() -> kv_pb2.GetResponse:
        return kv.get(kv_pb2.GetRequest(key="bench-key"))

    return call, client.close


def run(settings: Settings) -> bool:
    report.title("Client latency: sequential unary Get (proto), one keep-alive connection")
    blocks = 10
    server_cpu, client_cpu = placement(settings.pin_cpus)
    pinning = (
        f"server process on CPU {server_cpu}, this process on CPU {client_cpu} while measuring"
        if server_cpu is not None
        else "none (processes float over all cores)"
    )
    per_block = max(1, settings.calls // blocks)
    print(
        f"server  : connectplugin.App in its own process on connectplugin.HTTPServer,"
        f" {http_config(settings.server_threads)}\n"
        f"clients : in this process: raw http.client.HTTPConnection (hand-built POST),"
        f" requests.Session().post, KVServiceClient(connectplugin.Client(url)).get\n"
        f"calls   : {settings.client_warmup} warm-up per client, then {blocks} interleaved blocks x"
        f" {per_block} calls per client ({blocks * per_block} measured); wall time per call\n"
        f"pinning : {pinning}"
    )
    report.load_warning()
    with ServerProcess("ours", settings.server_threads, server_cpu) as server, pinned(client_cpu):
        print(f"started : ours pid {server.pid} port {server.port}", flush=True)
        clients: dict[str, tuple[Call, Callable[[], None]]] = {}
        try:
            clients["http.client (raw)"] = _raw(server.host, server.port)
            clients["requests.Session.post"] = _requests(server.url)
            clients["connectplugin.Client"] = _ours(server.url)
            for call, _ in clients.values():
                for _ in range(settings.client_warmup):
                    if call() != fixtures.RESPONSE:
                        raise RuntimeError("a client got a wrong answer")
            latencies: dict[str, list[int]] = {name: [] for name in clients}
            cpu: dict[str, float] = dict.fromkeys(clients, 0.0)
            for _ in range(blocks):
                for name, (call, _close) in clients.items():
                    samples = latencies[name]
                    clock = time.perf_counter_ns
                    cpu_start = time.process_time()
                    for _ in range(per_block):
                        start = clock()
                        call()
                        samples.append(clock() - start)
                    cpu[name] += time.process_time() - cpu_start
        finally:
            for _call, close in clients.values():
                close()

    print()
    stats = {}
    for name, samples in latencies.items():
        ordered = sorted(samples)
        stats[name] = (report.percentile(ordered, 50) / 1000, report.percentile(ordered, 99) / 1000)
    raw_p50, raw_p99 = stats["http.client (raw)"]
    rows = []
    for name, (p50, p99) in stats.items():
        cpu_us = cpu[name] / len(latencies[name]) * 1e6
        rows.append(
            [
                name,
                f"{p50:.0f}",
                f"{p99:.0f}",
                f"{cpu_us:.0f}",
                f"{p50 / raw_p50:.2f}",
                f"{p99 / raw_p99:.2f}",
            ]
        )
    report.table(
        ["client", "p50 us", "p99 us", "client CPU us/call", "p50 vs raw", "p99 vs raw"], rows
    )
    print()
    print(
        "p50/p99: wall time of one call, server time included; client CPU: this process's CPU per call."
    )
    for name, target in TARGETS.items():
        ratio = stats[name][0] / raw_p50
        print(
            f"target  : {name} p50 <= {target:.1f} x raw http.client: {ratio:.2f} {report.verdict(ratio <= target)}"
        )
    for name, expected in EXPECTED.items():
        print(
            f"expected: {name} p50 about {expected:.1f} x raw http.client: {stats[name][0] / raw_p50:.2f}"
        )
    return True
