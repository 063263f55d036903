"""Section ``tls``: what mTLS costs. Unary Get throughput and p50 over keep-alive connections,
plaintext (waitress) against mTLS (cheroot + pyOpenSSL, client certificate required), on the
same load; then plugin launch-to-ready with and without automatic mTLS (key generation).

``python -m bench.tls serve`` is the server child: it reads one JSON line on stdin (``mode``
plain or mtls and the PEMs), serves ``connectplugin.App`` with the fixed KV handler, prints
``PORT <n>``, and exits when its stdin closes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from bench import report
from bench.servers import HOST, ROOT, pin_to, placement
from bench.settings import Settings
from connectplugin import (
    Client,
    ClientConfig,
    HostConfig,
    HTTPConfig,
    HTTPServer,
    PluginHost,
    ProcessStrategy,
)
from connectplugin.rpc import tls
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.kv.plugin import HANDSHAKE, PLUGINS

CLIENTS = 4
"""Client threads of the rounds the target is judged on."""
SATURATING = 8
"""Client threads of extra rounds that keep both servers busy (4 leave cheroot waiting on
its own hand-offs between requests, so those rounds measure latency as much as capacity)."""
"""Client threads, each with its own keep-alive connection, calling one Get after another."""
ROUND_SECONDS = 3.0
ROUNDS = 3
"""Rounds per server, interleaved (plain, mtls, plain, ...) so drift touches both alike."""
LAUNCHES = 5
"""Launches per setting (after one warm-up each), interleaved."""
KEYGENS = 50
TARGET = 0.8
"""mTLS throughput / plaintext throughput the section asks for."""


def run(settings: Settings) -> bool:
    report.title("TLS: unary Get, plaintext vs mTLS with keep-alive; launch with and without auto-mTLS")
    server_cpu, client_cpu = placement(settings.pin_cpus)
    pinning = f"server CPU {server_cpu}, clients CPU {client_cpu}" if server_cpu is not None else "none"
    print(
        f"server  : connectplugin.App (fixed KV) in its own process, HTTPServer threads={settings.server_threads};\n"
        "          plain = waitress; mtls = cheroot + pyOpenSSL, P-256 certificates from a dev CA,\n"
        "          client certificate required\n"
        f"load    : {CLIENTS} (then {SATURATING}) client threads in this process, each its own connectplugin.Client"
        f" (keep-alive), {ROUNDS} x {ROUND_SECONDS:g} s rounds per server, interleaved\n"
        f"pinning : {pinning}"
    )
    report.load_warning()
    pki = tls.make_dev_pki(["bench"])
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "mtls": []}
    saturated: dict[str, list[tuple[float, float]]] = {"plain": [], "mtls": []}
    servers = {mode: _Server(mode, pki, settings.server_threads, server_cpu) for mode in results}
    try:
        for server in servers.values():
            server.start()
        before = os.sched_getaffinity(0) if client_cpu is not None else None
        if client_cpu is not None:
            pin_to(client_cpu)
        try:
            mtls = tls.TLSConfig(key_pair=pki.plugins["bench"], trust=tls.Trust(cas=(pki.ca.certificate,)))
            for clients, outcome in ((CLIENTS, results), (SATURATING, saturated)):
                for _ in range(ROUNDS):
                    for mode, server in servers.items():
                        outcome[mode].append(_load(server.url, mtls if mode == "mtls" else None, clients))
        finally:
            if before is not None:
                os.sched_setaffinity(0, before)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    rate = {}
    for clients, outcome in ((CLIENTS, results), (SATURATING, saturated)):
        for mode, runs in outcome.items():
            rate[f"{mode}{clients}"] = report.median([r for r, _ in runs])
            rows.append([mode, str(clients), f"{rate[f'{mode}{clients}']:.0f}", f"{report.median([p for _, p in runs]):.2f}"])
    report.table(["server", "clients", "calls/s (median round)", "p50 ms"], rows)
    print(
        f"mTLS / plaintext throughput with {SATURATING} clients = {rate[f'mtls{SATURATING}'] / rate[f'plain{SATURATING}']:.2f}"
    )
    ratio = rate[f"mtls{CLIENTS}"] / rate[f"plain{CLIENTS}"]
    print(f"mTLS / plaintext throughput with {CLIENTS} clients = {ratio:.2f} (target >= {TARGET}) {report.verdict(ratio >= TARGET)}")

    print()
    keygen = _keygen_ms()
    plain, auto = _launches()
    report.table(
        ["launch of python -m samples.kv", "ready median ms", "min ms", "max ms"],
        [
            ["plain (auto_mtls=False)", f"{report.median(plain):.0f}", f"{min(plain):.0f}", f"{max(plain):.0f}"],
            ["auto-mTLS (auto_mtls=True)", f"{report.median(auto):.0f}", f"{min(auto):.0f}", f"{max(auto):.0f}"],
        ],
    )
    print(
        f"key pair + self-signed certificate (tls.auto_key_pair): {keygen:.2f} ms each"
        f" (median of {KEYGENS}); a launch makes two, one per side"
    )
    return ratio >= TARGET


class _Server:
    def __init__(self, mode: str, pki: tls.DevPKI, threads: int, cpu: int | None) -> None:
        self.mode, self.pki, self.threads, self.cpu = mode, pki, threads, cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.tls", "serve"], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        spec = {
            "mode": self.mode,
            "threads": self.threads,
            "cpu": self.cpu,
            "cert": self.pki.host.certificate_pem().decode(),
            "key": self.pki.host.private_key_pem().decode(),
            "ca": self.pki.ca.certificate_pem().decode(),
        }
        self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().decode().split()
        if line[:1] != ["PORT"]:
            raise RuntimeError(f"the {self.mode} server did not start: {line}")
        self.url = f"{'https' if self.mode == 'mtls' else 'http'}://{HOST}:{line[1]}"

    def stop(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _load(url: str, config: tls.TLSConfig | None, clients: int) -> tuple[float, float]:
    """(calls per second, p50 ms) of ``clients`` threads calling Get for ROUND_SECONDS."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start_line = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(mine: list[float]) -> None:
        with Client(url, ClientConfig(tls=config, timeout=10)) as client:
            kv = KVServiceClient(client)
            request = kv_pb2.GetRequest(key="bench-key")
            kv.get(request)  # connect (and handshake) before the clock starts
            start_line.wait()
            while True:
                began = time.perf_counter()
                if began >= stop_at[0]:
                    break
                kv.get(request)
                mine.append(time.perf_counter() - began)

    threads = [threading.Thread(target=worker, args=(lat,), name=f"bench-tls-{i}") for i, lat in enumerate(latencies)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + ROUND_SECONDS + 60  # set for real once all are connected
    start_line.wait()
    began = time.perf_counter()
    stop_at[0] = began + ROUND_SECONDS
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    every = sorted(x for lat in latencies for x in lat)
    return len(every) / elapsed, report.percentile(every, 50) * 1000


def _keygen_ms() -> float:
    times = []
    for _ in range(KEYGENS):
        began = time.perf_counter()
        tls.auto_key_pair()
        times.append((time.perf_counter() - began) * 1000)
    return report.median(times)


def _launches() -> tuple[list[float], list[float]]:
    """Launch-to-ready milliseconds of LAUNCHES launches each, plain and auto-mTLS, interleaved."""
    hosts = {
        mode: PluginHost(HANDSHAKE, PLUGINS, HostConfig(handle_signals=False, auto_mtls=mode)).start()
        for mode in (False, True)
    }
    out: dict[bool, list[float]] = {False: [], True: []}
    try:
        for n in range(LAUNCHES + 1):
            for mode, host in hosts.items():
                began = time.perf_counter()
                client = host.launch(ProcessStrategy([sys.executable, "-m", "samples.kv"], cwd=str(ROOT)))
                ready = (time.perf_counter() - began) * 1000
                client.dispense("kv").get(kv_pb2.GetRequest(key="x"))
                host.stop(client)
                if n:
                    out[mode].append(ready)
    finally:
        for host in hosts.values():
            host.close()
    return out[False], out[True]


def _serve() -> None:
    spec = json.loads(sys.stdin.readline())
    if spec["cpu"] is not None:
        pin_to(spec["cpu"])
    config = HTTPConfig(host=HOST, threads=spec["threads"])
    if spec["mode"] == "mtls":
        pair = tls.KeyPair.from_pem(spec["cert"], spec["key"])
        config = HTTPConfig(
            host=HOST, threads=spec["threads"], tls=tls.TLSConfig(key_pair=pair, trust=tls.Trust.from_pem(cas=spec["ca"]))
        )
    from bench.servers import ours_app

    server = HTTPServer(ours_app(), config)
    server.bind()
    print(f"PORT {server.port}", flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), server.close(grace=1.0)), name="stdin-watch", daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        _serve()
    else:
        sys.exit("usage: python -m bench.tls serve")
