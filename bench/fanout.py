"""Section ``fanout``: one change delivered to many watchers, and what each watcher costs.

A host (``bench.hostproc --streams``, its own process) has launched ``bench.provider``; both
serve up to ``STREAMS`` streams at once (``HTTPConfig.max_streams``) and the host admits that
many watchers of a type (``RegistryConfig.max_watchers_per_type``). This process opens
``WATCHERS`` streams, each read on a thread of its own, then makes one change at a time:

- registry: ``ServiceRegistry.WatchService("kv")`` streams to the host, from one joined
  caller; the change is the host turning its provider degraded or healthy again
  (``Registry.set_health``), timed by the host just before it;
- kv: ``kv.v1.KVService/Watch`` streams straight to the provider (presenting the host's
  credential); the change is one ``Put`` from this process, timed just before it is sent.

Change-to-receipt is each watcher's receipt time minus the change's: ``CLOCK_MONOTONIC``
(``time.monotonic_ns``) is one clock for every process of the machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from bench import report
from bench.hostproc import JOIN_TOKEN, HostProcess, usage
from bench.provider import HANDSHAKE, SERVICE_TYPE
from bench.servers import pinned, placement
from bench.settings import Settings
from connectplugin import Client, ClientConfig, ConnectError, Health, HostLink, ServerStream
from connectplugin.gen.connectplugin.v1 import registry_pb2
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.runtime.credentials import HOST_SECRET_HEADER
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient

WATCHERS = 100
STREAMS = WATCHERS + 8
"""Streams the host and provider serve at once: the watchers and a few to spare."""
CHANGES = 30
"""Changes per kind, one at a time: each waits until every watcher has it."""
TARGET_P99_MS = 20.0
RECEIPT_TIMEOUT = 10.0
"""Longest a change may take to reach every watcher before the section gives up."""
PREFIX = "fanout/"


Stream = ServerStream[Any]


class Watcher:
    """One stream, opened and read on a thread of its own, noting when each message arrives."""

    def __init__(self, open_stream: Callable[[], Stream], heard: threading.Condition) -> None:
        self.arrived: list[int] = []
        self.failed = ""
        self._open = open_stream
        self._heard = heard
        self._stream: Stream | None = None
        self._thread = threading.Thread(target=self._read, name="watcher", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._stream = self._open()
            for _ in self._stream:
                at = time.monotonic_ns()
                with self._heard:
                    self.arrived.append(at)
                    self._heard.notify_all()
        except ConnectError as e:
            with self._heard:
                self.failed = f"{e.code.value}: {e.message}"
                self._heard.notify_all()

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._thread.join(5)


def run(settings: Settings) -> bool:
    report.title(f"Watch fan-out: one change to {WATCHERS} watchers, change to receipt")
    host_cpu, caller_cpu = placement(settings.pin_cpus)
    print(
        f"host    : bench.hostproc --streams {STREAMS} (HTTPConfig.max_streams and RegistryConfig.\n"
        f"          max_watchers_per_type = {STREAMS}), its launched provider likewise\n"
        f"registry: {WATCHERS} ServiceRegistry.WatchService('kv') streams; change = the host flips its\n"
        "          provider healthy <-> degraded (timed by the host just before)\n"
        f"kv      : {WATCHERS} kv.v1.KVService/Watch streams straight to the provider; change = one Put\n"
        "          from this process (timed just before it is sent)\n"
        f"changes : {CHANGES} per kind, one at a time, each waiting until all {WATCHERS} watchers have it\n"
        f"pinning : host and provider on CPU {host_cpu}, this process on CPU {caller_cpu}"
        if host_cpu is not None
        else "pinning : none"
    )
    report.load_warning()
    rows = []
    costs = []
    ok = True
    with HostProcess(host_cpu, streams=STREAMS) as proc, pinned(caller_cpu):
        link = HostLink()
        try:
            link.attach(Health(), (), proc.host_url)
            link.connect(HANDSHAKE, "bench-watcher", "1.0.0", base_url="", join_token=JOIN_TOKEN)
            host_client = Client(proc.host_url, ClientConfig(headers=link.headers(), pool_size=STREAMS))
            kv_client = Client(
                proc.provider_url,
                ClientConfig(headers={HOST_SECRET_HEADER: proc.provider_secret}, pool_size=STREAMS),
            )
            try:
                registry = ServiceRegistryClient(host_client)
                kv = KVServiceClient(kv_client)

                def registry_stream() -> Stream:
                    return registry.watch_service(registry_pb2.WatchServiceRequest(service_type=SERVICE_TYPE))

                def kv_stream() -> Stream:
                    return kv.watch(kv_pb2.WatchRequest(prefix=PREFIX))

                def flip() -> int:
                    words = proc.command("flip")
                    return int(words[1])

                def put() -> int:
                    at = time.monotonic_ns()
                    kv.put(kv_pb2.PutRequest(key=PREFIX + "k", value=b"v"))
                    return at

                for name, pid, opener, change, first in (
                    ("registry", proc.host_pid, registry_stream, flip, 1),
                    ("kv", proc.provider_pid, kv_stream, put, 0),
                ):
                    before = usage(pid)
                    heard = threading.Condition()
                    watchers = [Watcher(opener, heard) for _ in range(WATCHERS)]
                    try:
                        if first:  # a registry watcher hears the current state first
                            _await(watchers, heard, [first] * WATCHERS)
                            base = [first] * WATCHERS
                        else:  # a KV watcher hears nothing until a change: put until all have one
                            base = settle(watchers, heard, change)
                        during = usage(pid)
                        latencies = [
                            us / 1000 for each in timed_changes(watchers, heard, change, CHANGES, base) for us in each
                        ]
                    except RuntimeError as e:
                        print(f"FAILED  : {name}: {e}")
                        ok = False
                        continue
                    finally:
                        for w in watchers:
                            w.stop()
                    latencies.sort()
                    p99 = report.percentile(latencies, 99)
                    rows.append(
                        [
                            name,
                            f"{report.percentile(latencies, 50):.1f}",
                            f"{p99:.1f}",
                            f"{latencies[-1]:.1f}",
                            f"{p99 <= TARGET_P99_MS}",
                        ]
                    )
                    costs.append((name, during[1], (during[0] - before[0]) / WATCHERS))
            finally:
                host_client.close()
                kv_client.close()
        finally:
            link.close()

    print()
    report.table(["watchers", "p50 ms", "p99 ms", "max ms", f"p99 <= {TARGET_P99_MS:.0f} ms"], rows)
    print()
    report.table(
        ["server", "threads", "RSS KiB per watcher", "1,000 watchers need"],
        [
            [
                name,
                str(threads),
                f"{rss:.0f}",
                f"max_streams >= 1,000: ~1,000 more threads, ~{rss * 1000 / 1024:,.0f} MiB more RSS",
            ]
            for name, threads, rss in costs
        ],
    )
    print(
        f"latency : change to receipt by each watcher, over {CHANGES} changes x {WATCHERS} watchers.\n"
        "threads : the server process's, watchers open. A stream holds one worker thread for its\n"
        "          life (waitress is thread-per-request), and HTTPServer starts threads + max_streams\n"
        f"          workers up front: one thread per watcher slot, {STREAMS} slots here.\n"
        "RSS     : the server's RSS with the watchers open minus before they opened, per watcher\n"
        "          (the touched part of a worker's stack, the stream's buffers and queue)."
    )
    for name, _, _, _, met in rows:
        print(f"target  : {name} p99 <= {TARGET_P99_MS:.0f} ms: {report.verdict(met == 'True')}")
    return ok


def _await(
    watchers: list[Watcher], heard: threading.Condition, counts: list[int], timeout: float = RECEIPT_TIMEOUT
) -> bool:
    """Wait until each watcher has its count of messages; False if ``timeout`` passed first
    (raises when one failed, or when ``timeout`` is the receipt timeout)."""
    with heard:
        done = heard.wait_for(
            lambda: all(len(w.arrived) >= n or w.failed for w, n in zip(watchers, counts)), timeout
        )
        failed = [w.failed for w in watchers if w.failed]
    if failed:
        raise RuntimeError(f"{len(failed)} watchers failed, e.g. {failed[0]}")
    if not done and timeout >= RECEIPT_TIMEOUT:
        behind = sum(len(w.arrived) < n for w, n in zip(watchers, counts))
        raise RuntimeError(f"{behind} watchers lacked a message after {timeout:.0f}s")
    return done


def timed_changes(
    watchers: list[Watcher], heard: threading.Condition, change: Callable[[], int], changes: int, base: list[int]
) -> list[list[float]]:
    """Make ``changes`` changes, each once every watcher has the one before; per watcher, the
    microseconds from each change to its receipt. ``base``: messages each had before."""
    for n in range(changes):
        at = change()
        _await(watchers, heard, [b + n + 1 for b in base])
        with heard:
            for w, b in zip(watchers, base):
                w.arrived[b + n] -= at
    with heard:
        return [[ns / 1000 for ns in w.arrived[b : b + changes]] for w, b in zip(watchers, base)]


def settle(watchers: list[Watcher], heard: threading.Condition, change: Callable[[], int]) -> list[int]:
    """Change until every watcher has heard a change, then once more so that each has heard
    all changes made so far; returns how many messages each has then."""
    deadline = time.monotonic() + RECEIPT_TIMEOUT
    while not _await(watchers, heard, [1] * len(watchers), timeout=0.05):
        if time.monotonic() > deadline:
            raise RuntimeError("the watchers did not all subscribe in time")
        change()
    # All are subscribed, so every one hears this change; whatever was in flight before it
    # has arrived once it has (a stream keeps order).
    with heard:
        counts = [len(w.arrived) for w in watchers]
    change()
    _await(watchers, heard, [n + 1 for n in counts])
    time.sleep(0.1)  # changes made before the last may still be in flight to a slow subscriber
    with heard:
        return [len(w.arrived) for w in watchers]
