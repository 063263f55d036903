"""Section ``many``: fifty plugins at once on one host.

``python -m bench.many serve`` is the host child: a ``PluginHost`` that first launches
``bench.provider`` alone ``SINGLE`` times (each stopped before the next), noting the wall time
to ready and the CPU it took (the plugin's own, and the host's); then launches ``COUNT`` at
once from as many threads released together, and prints::

    READY <host url> <ms single median> <CPU ms per launch> <ms all ready> <RSS KiB> <threads> <ids...>

with the host's RSS and threads once all ``COUNT`` run (and its RSS before any). It stops
them when its standard input closes. This process then joins, and ``THREADS`` threads call
Get through the router on every provider in turn for ``LOAD_SECONDS``.
"""

from __future__ import annotations

import http.client
import os
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

from bench import fixtures, report
from bench.hostproc import JOIN_TOKEN, ChildProcess, child_setup, cpu_seconds, usage
from bench.provider import HANDSHAKE, PLUGINS, SERVICE_TYPE
from bench.servers import ROOT, pinned, placement
from bench.settings import Settings
from connectplugin import Health, HostConfig, HostLink, JoinToken, PluginHost, ProcessStrategy

COUNT = 50
SINGLE = 3
"""Launches made alone (each stopped before the next) for the one-launch figures."""
THREADS = 8
LOAD_SECONDS = 4.0
LAUNCH_TIMEOUT = 180.0
"""How long the host waits for each launch: fifty at once on two cores take a while."""


def serve() -> None:
    child_setup("python -m bench.many")
    config = HostConfig(join_tokens=(JoinToken(JOIN_TOKEN, name="bench"),), register_timeout=LAUNCH_TIMEOUT)
    strategy = ProcessStrategy([sys.executable, "-m", "bench.provider"], cwd=str(ROOT), start_timeout=LAUNCH_TIMEOUT)
    with PluginHost(HANDSHAKE, PLUGINS, config) as host:
        me = os.getpid()
        single_ms, cpu_ms = [], []
        for i in range(SINGLE):
            host_cpu = cpu_seconds(me) or 0.0
            started = time.perf_counter()
            client = host.launch(strategy, name=f"one-{i}")
            single_ms.append((time.perf_counter() - started) * 1000)
            pid = client.running.pid if client.running is not None else 0
            cpu_ms.append(((cpu_seconds(pid) or 0.0) + (cpu_seconds(me) or 0.0) - host_cpu) * 1000)
            host.stop(client)
        rss_before, _ = usage()
        gate = threading.Barrier(COUNT + 1)
        ids: list[str] = []
        failures: list[BaseException] = []
        lock = threading.Lock()

        def launch(i: int) -> None:
            gate.wait()
            try:
                client = host.launch(strategy, name=f"kv-{i}")
            except Exception as e:  # reported in the READY line's place
                failures.append(e)
                return
            with lock:
                ids.append(host.runtime_id(client))

        threads = [threading.Thread(target=launch, args=(i,), daemon=True) for i in range(COUNT)]
        for t in threads:
            t.start()
        gate.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        together_ms = (time.perf_counter() - started) * 1000
        if failures:
            print(f"FAILED {len(failures)} of {COUNT} launches failed: {failures[0]}", flush=True)
            return
        rss, threads_now = usage()
        print(
            f"READY {host.url} {statistics.median(single_ms):.0f} {statistics.median(cpu_ms):.0f}"
            f" {together_ms:.0f} {rss_before} {rss} {threads_now} {' '.join(ids)}",
            flush=True,
        )
        sys.stdin.buffer.read()


def run(settings: Settings) -> bool:
    report.title(f"Many plugins: {COUNT} launched at once on one host, then routed calls to all")
    host_cpu, caller_cpu = placement(settings.pin_cpus)
    print(
        "host    : PluginHost in its own process (python -m bench.many serve), unpinned (plugins\n"
        "          use both cores); ProcessStrategy([python, -m, bench.provider])\n"
        f"single  : {SINGLE} launches alone, each stopped before the next: wall time to ready (launch()\n"
        "          returned: handshake, identity, services registered) and CPU (plugin + host)\n"
        f"together: {COUNT} launch() calls from as many threads released at once, to the last ready\n"
        f"calls   : {THREADS} threads in this process, raw http.client keep-alive, routed Get to each of\n"
        f"          the {COUNT} providers in turn, {LOAD_SECONDS:g}s"
        + (f"; this process on CPU {caller_cpu}" if caller_cpu is not None else "")
    )
    report.load_warning()
    with ChildProcess(["bench.many", "serve"], "READY", start_timeout=LAUNCH_TIMEOUT + 60) as proc:
        url, single, cpu_ms, together, rss_before, rss, threads_now, *ids = proc.words
        counts, errors, elapsed = _load(url, ids, caller_cpu)
    one, cpu, all_ready = float(single), float(cpu_ms), float(together)
    floor = COUNT * cpu / (os.cpu_count() or 1)
    print()
    report.table(
        ["launch", "ms", "vs 50 x one", "vs 2-core floor"],
        [
            ["one alone (median)", f"{one:,.0f}", "", ""],
            [f"{COUNT} x one, in turn", f"{COUNT * one:,.0f}", "1.00", f"{COUNT * one / floor:.2f}"],
            [f"{COUNT} at once, to the last ready", f"{all_ready:,.0f}", f"{all_ready / (COUNT * one):.2f}",
             f"{all_ready / floor:.2f}"],
            [f"2-core floor ({COUNT} x {cpu:.0f} ms CPU / {os.cpu_count()})", f"{floor:,.0f}", "", "1.00"],
        ],
    )
    print()
    rate = sum(counts.values()) / elapsed
    report.table(
        ["with all running", "value"],
        [
            ["host RSS", f"{int(rss) / 1024:.0f} MiB ({(int(rss) - int(rss_before)) / COUNT:.0f} KiB per plugin)"],
            ["host threads", threads_now],
            ["routed calls/s (all providers)", f"{rate:,.0f}"],
            ["calls per provider (min-max)", f"{min(counts.values()):,}-{max(counts.values()):,}"],
            ["errors", str(errors)],
        ],
    )
    print(
        "floor   : the CPU one launch costs (plugin process + host), times fifty, over the cores:\n"
        "          no scheduling can make fifty launches ready sooner."
    )
    return errors == 0 and min(counts.values()) > 0


def _load(url: str, ids: list[str], cpu: int | None) -> tuple[dict[str, int], int, float]:
    """Routed Gets from THREADS threads, each walking over every provider; calls per provider."""
    link = HostLink()
    counts = dict.fromkeys(ids, 0)
    errors = [0]
    lock = threading.Lock()
    stop = threading.Event()
    try:
        link.attach(Health(), (), url)
        link.connect(HANDSHAKE, "bench-many", "1.0.0", base_url="", join_token=JOIN_TOKEN)
        headers = {**fixtures.request_headers("proto"), **link.headers()}
        body = fixtures.encode(fixtures.REQUEST, "proto")
        parts = urlsplit(url)

        def worker(offset: int) -> None:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
            mine = dict.fromkeys(ids, 0)
            failed = 0
            i = offset
            while not stop.is_set():
                provider = ids[i % len(ids)]
                i += 1
                try:
                    conn.request("POST", f"/services/{SERVICE_TYPE}/{provider}{fixtures.PATH}", body, headers)
                    response = conn.getresponse()
                    response.read()
                    if response.status == 200:
                        mine[provider] += 1
                    else:
                        failed += 1
                except (OSError, http.client.HTTPException):
                    failed += 1
                    conn.close()
            conn.close()
            with lock:
                for provider, n in mine.items():
                    counts[provider] += n
                errors[0] += failed

        with pinned(cpu):
            workers = [threading.Thread(target=worker, args=(n * len(ids) // THREADS,)) for n in range(THREADS)]
            started = time.perf_counter()
            for t in workers:
                t.start()
            time.sleep(LOAD_SECONDS)
            stop.set()
            for t in workers:
                t.join()
            elapsed = time.perf_counter() - started
    finally:
        link.close()
    return counts, errors[0], elapsed


if __name__ == "__main__":
    serve()
