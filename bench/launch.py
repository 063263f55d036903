"""Section ``launch``: how long a host takes to start a plugin process and have it ready.

The host lives in this process; each launch is
``host.launch(ProcessStrategy([python, -m, samples.kv]))``, timed from the call to three
points: the plugin's handshake line read (the strategy returns), ``launch`` returning (runtime
identity given, declared services registered), and the first dispensed Get answered (the
plugin handshake runs on first use). Bare interpreters started and run to exit give the
floor: ``python -c pass``, ``python -c "import connectplugin"``, and the plugin's own imports.
Runs are interleaved (bare ones, then a launch, ...) so drift touches all alike. Then
``CONCURRENT`` plugins are launched at once from as many threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from bench import report
from bench.servers import ROOT
from bench.settings import Settings
from connectplugin import HostConfig, PluginClient, PluginHost, ProcessStrategy
from connectplugin.runtime.launcher import LaunchContext, Running, Strategy
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.plugin import HANDSHAKE, PLUGINS

RUNS = 10
CONCURRENT = 10
COMMAND = (sys.executable, "-m", "samples.kv")
BARE = {
    "python -c pass": "pass",
    "python -c 'import connectplugin'": "import connectplugin",
    "python -c 'import samples.kv.plugin'": "import samples.kv.plugin",
}
"""Label -> the ``-c`` code of a bare interpreter; the imports are timed twice: to the line
they print next (as a plugin prints its handshake line) and to exit."""
BASELINE = "python -c 'import connectplugin'"


@dataclass
class _Launch:
    """Milliseconds from the ``launch`` call to each point of one plugin's start."""

    address: float
    ready: float
    first_call: float = 0.0
    stop: float = 0.0


class _Timed:
    """A strategy that notes when the one it wraps has read the plugin's handshake line."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.address_at = 0.0

    def start(self, ctx: LaunchContext) -> Running:
        running = self.inner.start(ctx)
        self.address_at = time.perf_counter()
        return running


def run(settings: Settings) -> bool:
    report.title(
        "Plugin launch: host.launch(ProcessStrategy([python, -m, samples.kv])) until ready"
    )
    print(
        f"host    : connectplugin.PluginHost in this process; plugin: {' '.join(COMMAND)}"
        f" (cwd {ROOT})\n"
        "points  : address = handshake line read; ready = launch() returned (identity given);\n"
        "          first call = the first dispensed Get answered (plugin handshake + Get)\n"
        f"floor   : bare interpreters ({', '.join(BARE)}), timed from spawn to exit and,\n"
        "          for the imports, to the line each prints once imported\n"
        f"runs    : 1 warm-up each, then {RUNS} interleaved runs each; then {CONCURRENT} launches"
        " at once from as many threads\n"
        "pinning : none (a launch is two processes starting up; both may use every core)"
    )
    report.load_warning()
    to_exit: dict[str, list[float]] = {label: [] for label in BARE}
    to_line: dict[str, list[float]] = {label: [] for label in BARE if BARE[label] != "pass"}
    launches: list[_Launch] = []
    with PluginHost(HANDSHAKE, PLUGINS, HostConfig(handle_signals=False)) as host:
        for n in range(RUNS + 1):
            for label, code in BARE.items():
                line, done = _bare_ms(code, label in to_line)
                if n:
                    to_exit[label].append(done)
                    if label in to_line:
                        to_line[label].append(line)
            timing = _launch_and_stop(host)
            if n:
                launches.append(timing)
        print(f"{RUNS} sequential launches done", flush=True)
        together, wall, stop_wall = _launch_together(host)

    print()
    floor = report.median(to_exit[BASELINE])
    rows = [_row(f"{label}, to exit", values, floor) for label, values in to_exit.items()]
    rows += [_row(f"{label}, to its line", values, floor) for label, values in to_line.items()]
    for label, attr in (
        ("launch: handshake line read", "address"),
        ("launch: launch() returned (ready)", "ready"),
        ("launch: first dispensed Get answered", "first_call"),
        ("host.stop() of a ready plugin", "stop"),
    ):
        rows.append(_row(label, [getattr(t, attr) for t in launches], floor))
    report.table(["one at a time", "median ms", "min ms", "max ms", "vs bare import"], rows)

    print()
    single = report.median([t.ready for t in launches])
    ready = [t.ready for t in together]
    report.table(
        ["at once", "all ready ms", "median ms", "min ms", "max ms", "all ready vs 1 launch"],
        [
            [
                "1 plugin (the runs above)",
                f"{single:.0f}",
                f"{single:.0f}",
                f"{min(t.ready for t in launches):.0f}",
                f"{max(t.ready for t in launches):.0f}",
                "1.00",
            ],
            [
                f"{CONCURRENT} plugins, {CONCURRENT} threads",
                f"{wall:.0f}",
                f"{report.median(ready):.0f}",
                f"{min(ready):.0f}",
                f"{max(ready):.0f}",
                f"{wall / single:.2f}",
            ],
        ],
    )
    print(
        f"then all {CONCURRENT} stopped at once (host.stop from {CONCURRENT} threads) in {stop_wall:.0f} ms"
    )
    print()
    plugin_imports = to_line["python -c 'import samples.kv.plugin'"]
    # Paired per run (the two ran back to back), so drift in the machine's load cancels out.
    serve_ms = report.median([t.ready - ms for t, ms in zip(launches, plugin_imports, strict=True)])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        "vs bare import: median / the median of python -c 'import connectplugin' run to exit.\n"
        "to its line: spawn until the line printed right after the imports is read (exit not"
        " waited for),\n  the like of a plugin's handshake line.\n"
        f"ready - the plugin's imports to its line = {serve_ms:.0f} ms (median of per-run"
        " differences): serve()\n  binding its port, the handshake line, GetPluginInfo,"
        " SetRuntimeIdentity.\n"
        f"at once : {CONCURRENT} launches on {cores} usable cores cannot beat about"
        f" {CONCURRENT / (cores or 1):.1f} x one launch.\n"
        f"ratio   : launch ready / bare import = {single / floor:.2f};"
        f" first call / bare import = {report.median([t.first_call for t in launches]) / floor:.2f}"
    )
    return True


def _row(label: str, values: list[float], floor: float) -> list[str]:
    median = report.median(values)
    return [
        label,
        f"{median:.0f}",
        f"{min(values):.0f}",
        f"{max(values):.0f}",
        f"{median / floor:.2f}",
    ]


def _bare_ms(code: str, line: bool) -> tuple[float, float]:
    """Milliseconds from spawning ``python -c code`` to the line it prints (0.0 without
    ``line``) and to its exit."""
    if not line:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        return 0.0, (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-c", code + "; print('up', flush=True)"], cwd=ROOT, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        printed = time.perf_counter()
        proc.stdout.read()
        if proc.wait() != 0:
            raise RuntimeError(f"python -c {code!r} exited with {proc.returncode}")
    return (printed - start) * 1000, (time.perf_counter() - start) * 1000


def _launch(host: PluginHost) -> tuple[PluginClient, _Launch]:
    strategy = _Timed(ProcessStrategy(COMMAND, cwd=str(ROOT)))
    start = time.perf_counter()
    client = host.launch(strategy)
    ready = time.perf_counter()
    return client, _Launch((strategy.address_at - start) * 1000, (ready - start) * 1000)


def _launch_and_stop(host: PluginHost) -> _Launch:
    start = time.perf_counter()
    client, timing = _launch(host)
    try:
        client.dispense("kv").get(kv_pb2.GetRequest(key="bench-key"), timeout=10)
        timing.first_call = (time.perf_counter() - start) * 1000
    finally:
        stopping = time.perf_counter()
        host.stop(client)
        timing.stop = (time.perf_counter() - stopping) * 1000
    return timing


def _launch_together(host: PluginHost) -> tuple[list[_Launch], float, float]:
    """Launch CONCURRENT plugins from as many threads released at once; check, then stop all.

    Returns each launch's timing, the wall time until the last was ready, and the wall time
    of stopping them all at once.
    """
    gate = threading.Barrier(CONCURRENT + 1)
    abandoned = threading.Event()
    lock = threading.Lock()
    launched: list[tuple[PluginClient, _Launch]] = []
    failures: list[BaseException] = []

    def launch() -> None:
        gate.wait()
        try:
            client, timing = _launch(host)
        except Exception as e:  # reported below; the other launches go on
            failures.append(e)
            return
        if abandoned.is_set():  # the bench was interrupted while this one started
            host.stop(client, grace=1)
            return
        with lock:
            launched.append((client, timing))

    threads = [threading.Thread(target=launch, daemon=True) for _ in range(CONCURRENT)]
    for t in threads:
        t.start()
    try:
        gate.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = (time.perf_counter() - start) * 1000
        if failures:
            raise RuntimeError(
                f"{len(failures)} of {CONCURRENT} concurrent launches failed: {failures[0]}"
            )
        for client, _ in launched:
            client.dispense("kv").get(kv_pb2.GetRequest(key="bench-key"), timeout=10)
    finally:
        abandoned.set()
        with lock:
            started = [client for client, _ in launched]
        stopping = time.perf_counter()
        stoppers = [threading.Thread(target=host.stop, args=(c,)) for c in started]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        stop_wall = (time.perf_counter() - stopping) * 1000
    return [timing for _, timing in launched], wall, stop_wall
