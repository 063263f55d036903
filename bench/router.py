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
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from bench import fixtures, report
from bench.hostproc import JOIN_TOKEN, HostProcess, cpu_seconds
from bench.provider import HANDSHAKE, SERVICE_TYPE
from bench.servers import pin_to, placement
from bench.settings import Settings
from connectplugin import Client, ClientConfig, ConnectError, Health, HostLink
from connectplugin.runtime.credentials import HOST_SECRET_HEADER
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient

TARGET = 2.3
"""Largest acceptable p50 latency ratio, routed to direct: a second hop costs roughly 2x."""
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
    with HostProcess(host_cpu) as proc, _pinned(caller_cpu):
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
    ratio = stats["routed"][0] / d50
    print(
        f"target  : routed p50 <= {TARGET:.1f} x direct: {ratio:.2f} {report.verdict(ratio <= TARGET)}"
    )
    errors = sum(load.errors for load in loads.values())
    if errors:
        print(f"WARNING : {errors} calls failed under load; their rounds' figures are suspect.")
    return errors == 0


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


@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Pin this process to ``cpu`` for the block, then give it back the CPUs it had."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    pin_to(cpu)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
