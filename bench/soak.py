"""Soak: routed callers for a minute while a supervised plugin is killed every few seconds.

``python -m bench.soak [--seconds 60] [--callers 16] [--kill-every 10]`` (``make soak``).
This process runs a ``PluginHost`` that launches a KV provider (``--provider``, the sample
store) with ``restart=RestartPolicy()``. Caller processes (``--caller``, 4 threads each,
joined with a join token) call it through the host's router: Get and Put, and every
twentieth call a Watch stream that sees its own Put. Every ``kill-every`` seconds the provider is
SIGKILLed (the host restarts it); one caller process is SIGKILLed and replaced at each
third of the run. At the end it prints calls, errors by code (and whether each fell inside
a restart window: it failed between the kill and the restart plus ``SLACK``), p50/p99 latency, and the
host's and the provider's RSS and thread counts at start and end.
Only loopback traffic; every loop ends by the deadline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from connectplugin import (
    Code,
    ConnectError,
    HandshakeConfig,
    Health,
    HostConfig,
    HostLink,
    HTTPConfig,
    JoinToken,
    PluginHost,
    ProcessStrategy,
    RestartPolicy,
    ServeConfig,
    ServiceDeclaration,
    SupervisionEvent,
    Transition,
    serve,
)
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from samples.kv.store import KVStore

HANDSHAKE = HandshakeConfig(
    magic_cookie_key="CONNECTPLUGIN_SOAK", magic_cookie_value="soak-7c1e", app_protocol_versions=(1,)
)
PLUGINS = {"kv": KV_PLUGIN}
SERVICE_TYPE = "kv"
THREADS_PER_CALLER = 4
SLACK = 1.0
"""Seconds after a restart in which errors still count as inside its window (calls that
left before the new instance was up)."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOIN_SECRET = "soak-join-token-" + "x" * 32


def provider() -> None:
    config = ServeConfig(
        self_id="soak-kv", self_version="1.0.0",
        # Every caller may hold a stream, and a closed one keeps its slot until the router and
        # then the provider notice (a quarter second each).
        http=HTTPConfig(max_streams=64),
        provides=[ServiceDeclaration(service_type=SERVICE_TYPE, version="1.0.0", path=KV_PLUGIN.service_path)],
    )
    serve(PLUGINS, {"kv": KVStore()}, handshake=HANDSHAKE, config=config)


# --- a caller process -------------------------------------------------------------------------


def caller(host_url: str, until: float, label: str) -> None:
    """Call through the router on THREADS_PER_CALLER threads until ``until`` (monotonic, which
    is system-wide on Linux); print one JSON line: latencies and errors with their times."""
    link = HostLink()
    link.attach(Health(), (), host_url)
    link.connect(HANDSHAKE, f"soak-{label}", "1.0.0", base_url="", join_token=JOIN_SECRET)
    latencies: list[float] = []
    errors: list[tuple[float, str]] = []
    lock = threading.Lock()
    pause = threading.Event()  # never set: a wait that ends by its timeout

    def work(n: int) -> None:
        i = 0
        kv = None
        while time.monotonic() < until:
            i += 1
            key = f"{label}-{n}-{i % 50}"
            started = time.monotonic()
            try:
                if kv is None:  # discovered once; again only after an error
                    kv = link.client(SERVICE_TYPE, KVServiceClient, timeout=10)
                if i % 20 == 0:
                    stream = kv.watch(kv_pb2.WatchRequest(prefix=key))
                    try:
                        kv.put(kv_pb2.PutRequest(key=key, value=b"w"))
                        next(iter(stream))
                    finally:
                        stream.close()
                elif i % 2:
                    kv.get(kv_pb2.GetRequest(key=key))
                else:
                    kv.put(kv_pb2.PutRequest(key=key, value=b"v"))
            except ConnectError as e:
                kv = None
                pause.wait(0.05)  # as a client backs off: no hot loop while no instance is up
                with lock:
                    errors.append((time.monotonic(), e.code.value, e.message[:100]))
                continue
            except StopIteration:
                kv = None
                with lock:
                    errors.append((time.monotonic(), "stream_ended", "a watch ended before its event"))
                continue
            with lock:
                latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS_PER_CALLER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    link.close()
    print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)


# --- the driver -------------------------------------------------------------------------------


def _proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) of ``pid`` from /proc."""
    rss, threads = 0.0, 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def _start_caller(host_url: str, until: float, label: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--caller", host_url, "--until", repr(until), "--label", label],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else float("nan")


def drive(seconds: float, callers: int, kill_every: float) -> bool:
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    config = HostConfig(
        http=HTTPConfig(threads=16, max_streams=64), join_tokens=[JoinToken(JOIN_SECRET, name="soak")]
    )
    events: queue.Queue[tuple[float, SupervisionEvent]] = queue.Queue()
    with PluginHost(HANDSHAKE, PLUGINS, config) as host:
        host.on_supervision(lambda e: events.put((time.monotonic(), e)))
        strategy = ProcessStrategy([sys.executable, "-m", "bench.soak", "--provider"], cwd=ROOT)
        first = host.launch(strategy, name="kv", restart=RestartPolicy(max_crashes=1000))
        plugin_pid = first.running.pid if first.running else 0
        host_start, plugin_start = _proc_status(os.getpid()), _proc_status(plugin_pid)
        start = time.monotonic()
        until = start + seconds
        procs = callers // THREADS_PER_CALLER
        running = [_start_caller(host.url, until, f"c{n}") for n in range(procs)]
        finished: list[subprocess.Popen[str]] = []
        killed_callers = 0
        windows: list[list[float]] = []
        next_kill, next_caller_kill = start + kill_every, start + seconds / 3
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= next_kill:
                current = host.current(first)
                if current.running is not None and current.running.alive():
                    windows.append([time.monotonic(), float("inf")])
                    os.kill(current.running.pid, signal.SIGKILL)
                next_kill += kill_every
            if now >= next_caller_kill and until - now > 5:
                victim = running.pop(0)
                victim.kill()
                victim.wait()
                killed_callers += 1
                running.append(_start_caller(host.url, until, f"r{killed_callers}"))
                next_caller_kill += seconds / 3
            try:
                at, event = events.get(timeout=max(0.0, min(next_kill, next_caller_kill, until) - time.monotonic()))
            except queue.Empty:
                continue
            if event.transition is Transition.RESTARTED and windows:
                windows[-1][1] = at
        finished = running
        outputs = [json.loads(p.communicate(timeout=60)[0] or "{}") for p in finished]
        # The callers are gone; their streams end as the host notices (within a second).
        current = host.current(first)
        plugin_pid_end = current.running.pid if current.running else 0
        settle = time.monotonic() + 5
        host_end = _proc_status(os.getpid())
        while host_end[1] > host_start[1] and time.monotonic() < settle:
            threading.Event().wait(0.2)  # bench only: threads end on their own schedule
            host_end = _proc_status(os.getpid())
        plugin_end = _proc_status(plugin_pid_end)
    latencies = sorted(x for o in outputs for x in o.get("latencies", ()))
    errors = [(at, code) for o in outputs for at, code, _ in o.get("errors", ())]
    messages = [m for o in outputs for at, _, m in o.get("errors", ()) if not any(lo <= at <= hi + SLACK for lo, hi in windows)]
    inside = [c for at, c in errors if any(lo <= at <= hi + SLACK for lo, hi in windows)]
    outside = [c for at, c in errors if not any(lo <= at <= hi + SLACK for lo, hi in windows)]
    restarts = [hi - lo for lo, hi in windows if hi != float("inf")]

    def by_code(codes: list[str]) -> str:
        return ", ".join(f"{c}={codes.count(c)}" for c in sorted(set(codes))) or "none"

    print(f"soak     : {seconds:g} s, {procs * THREADS_PER_CALLER} routed callers in {procs} processes"
          f" ({killed_callers} killed and replaced), provider SIGKILLed every {kill_every:g} s")
    print(f"calls    : {len(latencies)} ok from the surviving callers ({len(latencies) / seconds:.0f}/s)")
    print(f"restarts : {len(restarts)} of {len(windows)} kills, kill-to-restarted"
          f" {min(restarts, default=0):.2f}-{max(restarts, default=0):.2f} s")
    print(f"errors   : inside restart windows {len(inside)} ({by_code(inside)});"
          f" outside {len(outside)} ({by_code(outside)})")
    if messages:
        for common in sorted(set(messages), key=messages.count, reverse=True)[:3]:
            print(f"           outside: {messages.count(common)} x {common}")
    print(f"latency  : p50 {_percentile(latencies, 50) * 1000:.1f} ms, p99 {_percentile(latencies, 99) * 1000:.1f} ms")
    print(f"host     : RSS {host_start[0]:.1f} -> {host_end[0]:.1f} MB, threads {host_start[1]} -> {host_end[1]}")
    print(f"provider : RSS {plugin_start[0]:.1f} -> {plugin_end[0]:.1f} MB, threads {plugin_start[1]} -> {plugin_end[1]}"
          f" (pid {plugin_pid} -> {plugin_pid_end}: restarted instances)")
    flat = abs(host_end[0] - host_start[0]) <= 10 and host_end[1] - host_start[1] <= 0
    clean = not outside and all(c == Code.UNAVAILABLE.value for c in inside) and len(restarts) == len(windows)
    print(f"verdict  : {'flat' if flat else 'NOT flat'}; errors {'as expected' if clean else 'NOT only unavailable in restart windows'}")
    return flat and clean


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--callers", type=int, default=16, help="caller threads, 4 per process")
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--provider", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--caller", default="", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--label", default="c", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.provider:
        provider()
    elif args.caller:
        caller(args.caller, args.until, args.label)
    else:
        sys.exit(0 if drive(args.seconds, args.callers, args.kill_every) else 1)


if __name__ == "__main__":
    main()
