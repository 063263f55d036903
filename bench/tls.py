"""Section ``tls``: what mTLS costs. Unary Get throughput and p50 over keep-alive connections,
plaintext (waitress) against mTLS (cheroot + pyOpenSSL, client certificate required), on the
same load; then one established mTLS client's latency while other clients make new
connections (full handshakes) as fast as they can; then plugin launch-to-ready with and
without automatic mTLS (key generation).

``python -m bench.tls serve`` is the server child: it reads one JSON line on stdin (``mode``
plain or mtls and the PEMs), serves ``connectplugin.App`` with the fixed KV handler, prints
``PORT <n>``, and exits when its stdin closes. ``python -m bench.tls flood`` is the flooding
child: one JSON line on stdin (address, PEMs, threads, seconds), at the lowest CPU priority;
it prints ``HANDSHAKES <n> <refused>`` when done.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

from bench import report
from bench.servers import HOST, ROOT, pin_to, pinned, placement
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
FLOODERS = (4, 16)
"""Threads of the flooding child, each making one new mTLS connection after another."""
FLOOD_SECONDS = 3.0
FLOOD_ROUNDS = 2
"""Rounds of (alone, each flood), interleaved."""
TARGET = 0.8
"""mTLS throughput / plaintext throughput the section asks for."""


def run(settings: Settings) -> bool:
    report.title(
        "TLS: unary Get, plaintext vs mTLS with keep-alive; an established client during a handshake flood;"
        " launch with and without auto-mTLS"
    )
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
    _flood_figures(pki, settings.server_threads, server_cpu, client_cpu)

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


def _flood_figures(pki: tls.DevPKI, threads: int, server_cpu: int | None, client_cpu: int | None) -> None:
    """One established keep-alive mTLS client calling Get, alone and while a child process's
    threads open new mTLS connections (TCP connect, full handshake with a client
    certificate, one request, close) as fast as they can, at the lowest CPU priority on the
    clients' CPU so that they take what the measured client leaves. Prints the measured
    client's p50/p99, the handshakes per second the server completed, and the server's
    CPU time per handshake (its CPU seconds beyond the alone rounds' rate)."""
    mtls = tls.TLSConfig(key_pair=pki.plugins["bench"], trust=tls.Trust(cas=(pki.ca.certificate,)))
    server = _Server("mtls", pki, threads, server_cpu)
    rounds: dict[int, list[tuple[list[float], float, int, int]]] = {n: [] for n in (0, *FLOODERS)}
    server.start()
    try:
        assert server.proc is not None
        with pinned(client_cpu):
            for _ in range(FLOOD_ROUNDS):
                for flooders in rounds:
                    rounds[flooders].append(_flooded(server.url, server.proc.pid, pki, mtls, flooders, client_cpu))
    finally:
        server.stop()
    print(
        f"new connections: {', '.join(map(str, FLOODERS))} threads of a child process (nice 19, clients' CPU), each\n"
        "          TCP connect + mTLS handshake (P-256, client certificate) + one request + close, in a loop;\n"
        f"          the measured client: one keep-alive connection, Get after Get, {FLOOD_ROUNDS} x {FLOOD_SECONDS:g} s per row"
    )
    alone_cpu = sum(cpu for _, cpu, _, _ in rounds[0]) / sum(len(lat) for lat, _, _, _ in rounds[0])
    rows = []
    for flooders, runs in rounds.items():
        every = sorted(x for lat, _, _, _ in runs for x in lat)
        done = sum(h for _, _, h, _ in runs)
        refused = sum(r for _, _, _, r in runs)
        calls = len(every)
        cpu = sum(c for _, c, _, _ in runs)
        per_handshake = (cpu - alone_cpu * calls) / done * 1000 if done else 0.0
        rows.append([
            "alone" if not flooders else f"{flooders} flooding threads",
            f"{calls / (FLOOD_ROUNDS * FLOOD_SECONDS):.0f}",
            f"{report.percentile(every, 50) * 1000:.2f}",
            f"{report.percentile(every, 99) * 1000:.2f}",
            f"{done / (FLOOD_ROUNDS * FLOOD_SECONDS):.0f}" if flooders else "-",
            f"{per_handshake:.2f}" if flooders else "-",
            str(refused) if flooders else "-",
        ])
    report.table(
        ["established client", "calls/s", "p50 ms", "p99 ms", "handshakes/s", "server CPU ms/handshake", "failed"],
        rows,
    )


def _flooded(
    url: str, server_pid: int, pki: tls.DevPKI, config: tls.TLSConfig, flooders: int, cpu: int | None
) -> tuple[list[float], float, int, int]:
    """(latencies of the measured client, server CPU seconds, handshakes done, failed) of one
    FLOOD_SECONDS round with ``flooders`` flooding threads (none: the client alone)."""
    flood = None
    if flooders:
        spec = {
            "url": url, "threads": flooders, "seconds": FLOOD_SECONDS, "cpu": cpu,
            "cert": pki.plugins["bench"].certificate_pem().decode(),
            "key": pki.plugins["bench"].private_key_pem().decode(),
            "ca": pki.ca.certificate_pem().decode(),
        }
        flood = subprocess.Popen(
            [sys.executable, "-m", "bench.tls", "flood"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert flood.stdin is not None and flood.stdout is not None
        flood.stdin.write(json.dumps(spec) + "\n")
        flood.stdin.close()
        if flood.stdout.readline().strip() != "FLOODING":
            raise RuntimeError("the flooding child did not start")
    latencies = []
    with Client(url, ClientConfig(tls=config, timeout=10)) as client:
        kv = KVServiceClient(client)
        request = kv_pb2.GetRequest(key="bench-key")
        kv.get(request)  # connected before the clock starts
        cpu_before = _cpu_seconds(server_pid)
        stop_at = time.perf_counter() + FLOOD_SECONDS
        while (began := time.perf_counter()) < stop_at:
            kv.get(request)
            latencies.append(time.perf_counter() - began)
        cpu = _cpu_seconds(server_pid) - cpu_before
    done = refused = 0
    if flood is not None:
        assert flood.stdout is not None
        _, done_text, refused_text = flood.stdout.readline().split()
        done, refused = int(done_text), int(refused_text)
        flood.wait(timeout=30)
    return latencies, cpu, done, refused


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _flood() -> None:
    """The flooding child: new mTLS connections, one after another on each thread, until
    ``seconds`` after it says FLOODING; then HANDSHAKES <completed> <failed>."""
    spec = json.loads(sys.stdin.readline())
    os.nice(19)
    pin_to(spec["cpu"])
    config = tls.TLSConfig(key_pair=tls.KeyPair.from_pem(spec["cert"], spec["key"]), trust=tls.Trust.from_pem(cas=spec["ca"]))
    context = tls.client_context(config)
    parts = urlsplit(spec["url"])
    address = (parts.hostname, parts.port)
    request = b"GET /nothing HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    counts = [[0, 0] for _ in range(spec["threads"])]
    stop_at = time.monotonic() + spec["seconds"]

    def connect_again_and_again(count: list[int]) -> None:
        while time.monotonic() < stop_at:
            try:
                with socket.create_connection(address, timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname=parts.hostname) as sock:
                        sock.sendall(request)
                        while sock.recv(4096):
                            pass
                count[0] += 1
            except (OSError, ssl.SSLError):
                count[1] += 1

    workers = [threading.Thread(target=connect_again_and_again, args=(c,)) for c in counts]
    print("FLOODING", flush=True)
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    print(f"HANDSHAKES {sum(c[0] for c in counts)} {sum(c[1] for c in counts)}", flush=True)


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
    elif sys.argv[1:] == ["flood"]:
        _flood()
    else:
        sys.exit("usage: python -m bench.tls serve|flood")
