"""Section ``client``: sequential latency of one unary Get from three Python HTTP clients.

The server (ours, in its own process) is the same for all; one call at a time over one
keep-alive connection, so the differences are the client stacks'. Every client builds and
serializes the request and parses the response, so the proto work is the same in each.
Calls are made in interleaved blocks (raw, requests, ours, raw, ...) to share any drift.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

import requests

from bench import fixtures, report
from bench.servers import ServerProcess, http_config, pinned, placement
from bench.settings import Settings
from connectplugin import Client, ClientConfig
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient

RAW = {"proto": "http.client (raw) proto", "json": "http.client (raw) json"}
TARGETS = {"connectplugin.Client proto": ("proto", 1.4), "connectplugin.Client json": ("json", 1.4)}
"""Largest acceptable p50 ratio to raw http.client of the same codec, per client."""
EXPECTED = {"requests.Session.post proto": 3.0}

Call = Callable[[], Any]


def _raw(host: str, port: int, codec: str) -> tuple[Call, Callable[[], None]]:
    """Hand-built POSTs; JSON as plain dicts through the json module (no protobuf at all)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = fixtures.request_headers(codec)

    def call() -> Any:
        if codec == "proto":
            body = kv_pb2.GetRequest(key="bench-key").SerializeToString()
        else:
            body = json.dumps({"key": "bench-key"}, separators=(",", ":")).encode()
        conn.request("POST", fixtures.PATH, body, headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"raw http.client: HTTP {response.status} {data[:200]!r}")
        return kv_pb2.GetResponse.FromString(data) if codec == "proto" else json.loads(data)

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


def _ours(url: str, codec: str) -> tuple[Call, Callable[[], None]]:
    client = Client(url, ClientConfig(codec=codec))
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
        f" requests.Session().post, KVServiceClient(connectplugin.Client(url)).get;\n"
        "          proto, and JSON for raw and ours\n"
        f"calls   : {settings.client_warmup} warm-up per client, then {blocks} interleaved blocks x"
        f" {per_block} calls per client ({blocks * per_block} measured); wall time per call\n"
        f"pinning : {pinning}"
    )
    report.load_warning()
    with ServerProcess("ours", settings.server_threads, server_cpu) as server, pinned(client_cpu):
        print(f"started : ours pid {server.pid} port {server.port}", flush=True)
        clients: dict[str, tuple[Call, Callable[[], None]]] = {}
        try:
            clients[RAW["proto"]] = _raw(server.host, server.port, "proto")
            clients["requests.Session.post proto"] = _requests(server.url)
            clients["connectplugin.Client proto"] = _ours(server.url, "proto")
            clients[RAW["json"]] = _raw(server.host, server.port, "json")
            clients["connectplugin.Client json"] = _ours(server.url, "json")
            json_answer = json.loads(fixtures.encode(fixtures.RESPONSE, "json"))
            for name, (call, _) in clients.items():
                expected = json_answer if name == RAW["json"] else fixtures.RESPONSE
                for _ in range(settings.client_warmup):
                    if call() != expected:
                        raise RuntimeError(f"{name} got a wrong answer")
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
    rows = []
    for name, (p50, p99) in stats.items():
        raw_p50, raw_p99 = stats[RAW["json" if name.endswith("json") else "proto"]]
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
        "p50/p99: wall time of one call, server time included; client CPU: this process's CPU per call.\n"
        "vs raw : against raw http.client of the same codec; raw JSON is json.dumps/json.loads of dicts."
    )
    for name, (codec, target) in TARGETS.items():
        ratio = stats[name][0] / stats[RAW[codec]][0]
        print(
            f"target  : {name} p50 <= {target:.1f} x raw http.client: {ratio:.2f} {report.verdict(ratio <= target)}"
        )
    for name, expected in EXPECTED.items():
        ratio = stats[name][0] / stats[RAW["proto"]][0]
        print(f"expected: {name} p50 about {expected:.1f} x raw http.client: {ratio:.2f}")
    return True
