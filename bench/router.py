"""Section ``router``: the cost of reaching a plugin through the host's router.

A host (``bench.hostproc``, its own process) launches ``bench.provider``, which serves
kv.v1.KVService as service type ``kv``. This process then calls Get two ways:

- routed: as a plugin with an identity of its own (``HostLink.connect``), through
  ``link.client("kv", ...)``: caller -> host ``/services/kv/<id>/...`` -> provider;
- direct: ``connectplugin.Client(provider_url)``, the same message straight to the provider.

Sequential latency runs in interleaved blocks (direct, routed, direct, ...); throughput runs
8 caller threads for a few seconds per round, rounds alternating between the two paths.
"""

from __future__ import annotations

import contextlib
import http.client
import lzma
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import fixtures, report
from bench.fanout import Watcher, settle, timed_changes
from bench.hostproc import JOIN_TOKEN, HostProcess, cpu_seconds
from bench.provider import GO_HANDSHAKE, HANDSHAKE, SERVICE_TYPE
from bench.servers import ROOT, pin_to, pinned, placement
from bench.settings import Settings
from connectplugin import Client, ClientConfig, ConnectError, Health, HostLink
from connectplugin.runtime.credentials import HOST_SECRET_HEADER
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient

TARGET = 2.2
"""Largest acceptable p50 latency ratio, routed to direct: a second hop costs roughly 2x."""
CPU_TARGET = 1.3
"""Largest host CPU per routed call, as a multiple of the provider's (which does the work)."""
LOAD_TARGET = 0.45
"""Smallest routed calls/s with THREADS callers, as a fraction of direct."""
GO_TARGET = 1.2
"""Largest p50 of a routed call through our host, as a multiple of the Go reference host's."""
STREAM_MESSAGES = 200
"""Puts whose Watch events are timed, per stream path."""
GOREF = ROOT.parent / "shared" / "goref" / "goref.xz"
"""The Go reference, runnable (its README says how): ``goref host`` is the peer of our host."""
THREADS = 8
ROUNDS = 3
"""Throughput rounds per path, each ``settings.seconds`` long."""
BLOCKS = 10

Call = Callable[[], kv_pb2.GetResponse]

PARTS = ("caller", "host", "provider")
"""Whose CPU time is metered: this process, the host process, the provider process."""

CPU = tuple[float | None, ...]
"""Seconds of CPU per part; None where it could not be read."""


@dataclass
class _Load:
    """One path's throughput rounds."""

    rate: list[float] = field(default_factory=list)
    cpu_us: list[CPU] = field(default_factory=list)
    """Per round, microseconds of CPU per call of each part."""
    errors: int = 0


def run(settings: Settings) -> bool:
    report.title("Router hop: unary Get through the host's router vs straight to the provider")
    host_cpu, caller_cpu = placement(settings.pin_cpus)
    pinning = (
        f"host process and the provider it launches on CPU {host_cpu},"
        f" this process (the caller) on CPU {caller_cpu} while measuring"
        if host_cpu is not None
        else "none (processes float over all cores)"
    )
    per_block = max(1, settings.calls // BLOCKS)
    print(
        "host    : connectplugin.PluginHost in its own process (python -m bench.hostproc), which\n"
        "          launched the provider with ProcessStrategy([python, -m, bench.provider])\n"
        "provider: kv.v1.KVService as service type 'kv'; Get answers a fixed 1-byte value\n"
        "routed  : HostLink identity (connect()), link.client('kv', KVServiceClient).get:"
        " caller -> host router -> provider\n"
        "direct  : KVServiceClient(connectplugin.Client(provider_url)).get: caller -> provider\n"
        f"latency : {settings.client_warmup} warm-up calls per path, then {BLOCKS} interleaved blocks"
        f" x {per_block} sequential calls per path ({BLOCKS * per_block} measured)\n"
        f"load    : {THREADS} caller threads sharing one client, {ROUNDS} rounds x {settings.seconds}s"
        " per path, alternating\n"
        f"pinning : {pinning}"
    )
    report.load_warning()
    with HostProcess(host_cpu) as proc, pinned(caller_cpu):
        print(
            f"started : host pid {proc.host_pid} at {proc.host_url}; provider {proc.provider_id}"
            f" pid {proc.provider_pid} at {proc.provider_url}",
            flush=True,
        )
        link = HostLink()
        direct_client = Client(proc.provider_url, ClientConfig(headers={HOST_SECRET_HEADER: proc.provider_secret}))
        try:
            link.attach(Health(), (), proc.host_url)
            link.connect(HANDSHAKE, "bench-caller", "1.0.0", base_url="", join_token=JOIN_TOKEN)
            endpoint = link.discover(SERVICE_TYPE).endpoint
            if endpoint.provider_id != proc.provider_id:
                raise RuntimeError(f"the registry offered {endpoint.provider_id}, not the provider")
            routed = link.client(SERVICE_TYPE, KVServiceClient)
            direct = KVServiceClient(direct_client)
            calls: dict[str, Call] = {
                "direct": lambda: direct.get(fixtures.REQUEST),
                "routed": lambda: routed.get(fixtures.REQUEST),
            }
            print(f"routed  : {proc.host_url}{endpoint.endpoint_url}/{fixtures.PATH.lstrip('/')}")
            for call in calls.values():
                for _ in range(settings.client_warmup):
                    if call() != fixtures.RESPONSE:
                        raise RuntimeError("a call got a wrong answer")
            meter = _Meter(proc)
            latencies, sequential_cpu = _sequential(calls, per_block, meter)
            loads = _throughput(calls, settings.seconds, meter)
            streams = _stream_latency(link, direct)
            raw = _raw_paths(proc, link, endpoint.endpoint_url, host_cpu, per_block, settings.client_warmup)
        finally:
            link.close()
            direct_client.close()

    print()
    stats = {}
    for name, samples in latencies.items():
        ordered = sorted(samples)
        stats[name] = (report.percentile(ordered, 50) / 1000, report.percentile(ordered, 99) / 1000)
    d50, d99 = stats["direct"]
    rows = [
        [
            name,
            f"{p50:.0f}",
            f"{p99:.0f}",
            *(_us(us) for us in sequential_cpu[name]),
            f"{p50 / d50:.2f}",
            f"{p99 / d99:.2f}",
        ]
        for name, (p50, p99) in stats.items()
    ]
    cpu_columns = [f"{part} CPU us" for part in PARTS]
    report.table(["path", "p50 us", "p99 us", *cpu_columns, "p50 vs direct", "p99 vs direct"], rows)
    print()
    direct_rate = report.median(loads["direct"].rate)
    rows = []
    for name, load in loads.items():
        rate = report.median(load.rate)
        rows.append(
            [
                name,
                f"{rate:,.0f}",
                f"{min(load.rate):,.0f}-{max(load.rate):,.0f}",
                *(_us(_median_known(r[i] for r in load.cpu_us)) for i in range(len(PARTS))),
                f"{rate / direct_rate:.2f}",
                str(load.errors),
            ]
        )
    report.table(["path", "calls/s", "range", *cpu_columns, "vs direct", "errors"], rows)
    print()
    print(
        "p50/p99: wall time of one sequential call. CPU us: user+sys CPU time per call of this\n"
        "  process (caller), the host process (waitress + the router) and the provider (waitress +\n"
        "  the Get), over all the calls of a path (sequential) or its median round (load).\n"
        f"calls/s: median round with {THREADS} threads; range: slowest and fastest round."
    )
    if host_cpu is not None:
        print(_ceilings(loads, host_cpu))
    print()
    stream_rows = []
    for name, samples in streams.items():
        ordered = sorted(samples)
        stream_rows.append([name, f"{report.percentile(ordered, 50):.0f}", f"{report.percentile(ordered, 99):.0f}"])
    report.table(["stream path", "p50 us", "p99 us"], stream_rows)
    print(
        f"stream  : one kv Watch stream per path open at once; {STREAM_MESSAGES} Puts, one at a time, each\n"
        "          timed from just before it is sent to each stream's receipt of its event."
    )
    print()
    raw_stats = {name: _percentiles(samples) for name, samples in raw.items()}
    direct50 = raw_stats["direct (ours)"][0]
    report.table(
        ["raw http.client", "p50 us", "p99 us", "p50 vs direct (ours)"],
        [[name, f"{p50:.0f}", f"{p99:.0f}", f"{p50 / direct50:.2f}"] for name, (p50, p99) in raw_stats.items()],
    )
    print(
        "raw     : hand-built POSTs on one keep-alive http.client connection per path, sequential,\n"
        "          interleaved blocks: the Go peer's way of calling (issue 13)."
    )
    ratio = stats["routed"][0] / d50
    print(f"target  : routed p50 <= {TARGET:.1f} x direct: {ratio:.2f} {report.verdict(ratio <= TARGET)}")
    host, provider = sequential_cpu["routed"][1:]
    if host is not None and provider:
        cpu_ratio = host / provider
        print(
            f"target  : host CPU per routed call <= {CPU_TARGET} x the provider's: {cpu_ratio:.2f}"
            f" {report.verdict(cpu_ratio <= CPU_TARGET)}"
        )
    load_ratio = report.median(loads["routed"].rate) / direct_rate
    print(
        f"target  : routed calls/s with {THREADS} callers >= {LOAD_TARGET} x direct: {load_ratio:.2f}"
        f" {report.verdict(load_ratio >= LOAD_TARGET)}"
    )
    if "routed (Go host)" in raw_stats:
        go_ratio = raw_stats["routed (ours)"][0] / raw_stats["routed (Go host)"][0]
        print(
            f"target  : routed p50 (raw) <= {GO_TARGET} x the Go host's: {go_ratio:.2f}"
            f" {report.verdict(go_ratio <= GO_TARGET)}"
        )
    errors = sum(load.errors for load in loads.values())
    if errors:
        print(f"WARNING : {errors} calls failed under load; their rounds' figures are suspect.")
    return errors == 0


def _percentiles(samples: list[int]) -> tuple[float, float]:
    """(p50, p99) in microseconds of samples in nanoseconds."""
    ordered = sorted(samples)
    return report.percentile(ordered, 50) / 1000, report.percentile(ordered, 99) / 1000


def _stream_latency(link: HostLink, direct: KVServiceClient) -> dict[str, list[float]]:
    """Microseconds from a Put to its Watch event's receipt, on a routed and a direct stream."""

    routed = link.client(SERVICE_TYPE, KVServiceClient)
    request = kv_pb2.WatchRequest(prefix="relay/")
    heard = threading.Condition()
    watchers = {
        "direct Watch": Watcher(lambda: direct.watch(request), heard),
        "routed Watch": Watcher(lambda: routed.watch(request), heard),
    }

    def put() -> int:
        at = time.monotonic_ns()
        direct.put(kv_pb2.PutRequest(key="relay/k", value=b"v"))
        return at

    try:
        both = list(watchers.values())
        timed = timed_changes(both, heard, put, STREAM_MESSAGES, settle(both, heard, put))
        return dict(zip(watchers, timed))
    finally:
        for w in watchers.values():
            w.stop()


def _raw_paths(
    proc: HostProcess, link: HostLink, endpoint_url: str, host_cpu: int | None, per_block: int, warmup: int
) -> dict[str, list[int]]:
    """Nanoseconds per Get made with raw http.client, direct and routed, through our host and
    (when the Go reference is here) through the Go host to a provider registered with it."""
    body = fixtures.encode(fixtures.REQUEST, "proto")
    base = fixtures.request_headers("proto")
    paths = {
        "direct (ours)": _raw(proc.provider_url, fixtures.PATH, {**base, HOST_SECRET_HEADER: proc.provider_secret}, body),
        "routed (ours)": _raw(proc.host_url, f"{endpoint_url}/Get", {**base, **link.headers()}, body),
    }
    with contextlib.ExitStack() as stack:
        go = _go_peer(stack, host_cpu)
        if go is not None:
            go_provider, go_host, go_path, go_headers = go
            paths["direct (Go-registered)"] = _raw(go_provider, fixtures.PATH, base, body)
            paths["routed (Go host)"] = _raw(go_host, go_path, {**base, **go_headers}, body)
        for call, _ in paths.values():
            for _ in range(warmup):
                call()
        samples: dict[str, list[int]] = {name: [] for name in paths}
        clock = time.perf_counter_ns
        for _ in range(BLOCKS):
            for name, (call, _) in paths.items():
                for _ in range(per_block):
                    start = clock()
                    call()
                    samples[name].append(clock() - start)
        for _, close in paths.values():
            close()
    return samples


def _raw(url: str, path: str, headers: dict[str, str], body: bytes) -> tuple[Callable[[], None], Callable[[], None]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)

    def call() -> None:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or kv_pb2.GetResponse.FromString(data) != fixtures.RESPONSE:
            raise RuntimeError(f"raw Get to {url}{path}: HTTP {response.status} {data[:200]!r}")

    return call, conn.close


def _go_peer(stack: contextlib.ExitStack, cpu: int | None) -> tuple[str, str, str, dict[str, str]] | None:
    """``goref host`` and a ``bench.provider`` registered with it (both pinned like our host):
    (provider URL, Go host URL, routed path of Get, the caller's headers); None, saying why,
    without the Go reference."""
    if not GOREF.exists():
        print(f"go peer : skipped: {GOREF} is missing (the Go reference host, 'goref host')")
        return None
    program = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "goref"
    program.write_bytes(lzma.decompress(GOREF.read_bytes()))
    program.chmod(0o700)
    host_port, provider_port = _free_port(), _free_port()
    go_url = f"http://127.0.0.1:{host_port}"
    provider_url = f"http://127.0.0.1:{provider_port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    preexec = (lambda: pin_to(cpu)) if cpu is not None else None
    for cmd in (
        [str(program), "host", "-addr", f"127.0.0.1:{host_port}"],
        [sys.executable, "-m", "bench.provider", "--host-url", go_url, "--port", str(provider_port)],
    ):
        child = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=preexec,
        )
        stack.callback(_stop, child)
        if cmd[0] == str(program):
            _wait(lambda: _answers(go_url + "/health"), "the Go host to answer /health")
    link = HostLink()
    stack.callback(link.close)
    link.attach(Health(), (), go_url)
    link.connect(GO_HANDSHAKE, "bench-caller", "1.0.0", base_url="")
    endpoint = _wait(lambda: _discovered(link), "the provider to register with the Go host")
    print(f"go peer : goref host at {go_url}; provider {endpoint.provider_id} at {provider_url}")
    return provider_url, go_url, f"{endpoint.endpoint_url}/Get", link.headers()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _discovered(link: HostLink) -> Any:
    try:
        return link.discover(SERVICE_TYPE).endpoint
    except ConnectError:
        return None


def _wait(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(0.05)


def _stop(child: subprocess.Popen[bytes]) -> None:
    child.terminate()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


class _Meter:
    """Reads the CPU time, in seconds, that each of PARTS has used so far."""

    def __init__(self, proc: HostProcess) -> None:
        self._pids = (proc.host_pid, proc.provider_pid)

    def read(self) -> CPU:
        return (time.process_time(), *(cpu_seconds(pid) for pid in self._pids))


def _used(before: CPU, after: CPU) -> CPU:
    return tuple(None if a is None or b is None else b - a for a, b in zip(before, after))


def _sequential(
    calls: dict[str, Call], per_block: int, meter: _Meter
) -> tuple[dict[str, list[int]], dict[str, CPU]]:
    """Nanoseconds per call, and microseconds of CPU per call of each part, per path."""
    latencies: dict[str, list[int]] = {name: [] for name in calls}
    used: dict[str, CPU] = {name: (0.0,) * len(PARTS) for name in calls}
    clock = time.perf_counter_ns
    for _ in range(BLOCKS):
        for name, call in calls.items():
            samples = latencies[name]
            before = meter.read()
            for _ in range(per_block):
                start = clock()
                call()
                samples.append(clock() - start)
            block = _used(before, meter.read())
            used[name] = tuple(
                None if a is None or b is None else a + b for a, b in zip(used[name], block)
            )
    per_call = {
        name: tuple(None if s is None else s / len(latencies[name]) * 1e6 for s in seconds)
        for name, seconds in used.items()
    }
    return latencies, per_call


def _throughput(calls: dict[str, Call], seconds: float, meter: _Meter) -> dict[str, _Load]:
    loads = {name: _Load() for name in calls}
    for call in calls.values():
        _round(call, min(1.0, seconds))  # warm every thread's connection, unmeasured
    for n in range(ROUNDS):
        order = list(calls) if n % 2 == 0 else list(calls)[::-1]
        for name in order:
            load = loads[name]
            before = meter.read()
            done, errors, elapsed = _round(calls[name], seconds)
            used = _used(before, meter.read())
            load.rate.append(done / elapsed)
            load.errors += errors
            load.cpu_us.append(
                tuple(None if u is None or not done else u / done * 1e6 for u in used)
            )
        print(f"round {n + 1}/{ROUNDS} done", flush=True)
    return loads


def _round(call: Call, seconds: float) -> tuple[int, int, float]:
    """(calls completed, calls failed, seconds) for THREADS threads calling until time is up."""
    stop = threading.Event()
    start = threading.Barrier(THREADS + 1)
    done = [0] * THREADS
    failed = [0] * THREADS

    def worker(i: int) -> None:
        start.wait()
        while not stop.is_set():
            try:
                call()
            except ConnectError:
                failed[i] += 1
                continue
            if not stop.is_set():
                done[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    try:
        start.wait()
        began = time.perf_counter()
        time.sleep(seconds)
    finally:
        stop.set()
    elapsed = time.perf_counter() - began
    for t in threads:
        t.join()
    return sum(done), sum(failed), elapsed


def _ceilings(loads: dict[str, _Load], server_cpu: int) -> str:
    """What the pinned CPUs allow each path under load, from the CPU each part used per call."""
    parts = []
    for name, load in loads.items():
        caller, host, provider = (
            _median_known(r[i] for r in load.cpu_us) for i in range(len(PARTS))
        )
        if caller is None or host is None or provider is None:
            return "ceiling : n/a (CPU times could not be read)"
        parts.append(
            f"{name} {1e6 / (host + provider):,.0f} (CPU {server_cpu}) / {1e6 / caller:,.0f} (caller)"
        )
    return (
        f"ceiling : calls/s the CPU per call allows, with host and provider sharing CPU {server_cpu}"
        f" and the caller alone:\n          {'; '.join(parts)}"
    )


def _median_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return report.median(known) if known else None


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


