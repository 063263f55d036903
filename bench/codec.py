"""Section ``codec``: server throughput of one unary Get, ours against a bare WSGI ceiling and connectrpc.

All three apps run on ``connectplugin.HTTPServer`` with the same HTTPConfig, each in its own
process, loaded by wrk from another. Runs are interleaved (bare, ours, connectrpc, bare, ...)
so that drift of the machine touches every server alike; the median round is reported.
Each app is also timed alone, called in this process with a fake environ and no socket,
which shows how much of a call's cost is the app and how much is waitress and the kernel.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fixtures, report, wrk
from bench.servers import APPS, KINDS, ServerProcess, http_config, placement
from bench.settings import Settings

TARGETS = {"ours": 0.90}
"""Smallest acceptable req/s ratio to bare, per server."""
EXPECTED = {"connectrpc": 0.75}
"""Roughly where a server is expected to land; printed for comparison, not judged."""


@dataclass
class _Runs:
    """One (server, codec): a value per round, in round order."""

    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    """0.0 where the CPU time could not be read."""
    p99_us: list[int] = field(default_factory=list)
    errors: int = 0

    def vs(self, bare: _Runs) -> float:
        """Median of the per-round req/s ratios: each round's pair ran seconds apart, so slow
        drift in the machine's load cancels out of the ratio."""
        return report.median([a / b for a, b in zip(self.rps, bare.rps, strict=True) if b])

    def vs_cpu(self, bare: _Runs) -> float | None:
        ratios = [b / a for a, b in zip(self.cpu_us, bare.cpu_us, strict=True) if a and b]
        return report.median(ratios) if ratios else None


def run(settings: Settings) -> bool:
    report.title(
        "Server throughput: unary kv.v1.KVService/Get, three WSGI apps on identical waitress"
    )
    wrk_path = wrk.ensure_wrk()
    if wrk_path is None:
        print("SKIPPED: wrk is not installed and bench/ensure-wrk.sh could not install it.")
        print(
            "Install it (Debian/Ubuntu: apt-get install -y wrk), then run `python -m bench codec`."
        )
        return False
    server_cpu, load_cpu = placement(settings.pin_cpus)
    pinning = (
        f"every server process on CPU {server_cpu}, wrk on CPU {load_cpu}"
        if server_cpu is not None
        else "none (processes float over all cores)"
    )
    print(
        "servers : bare (a plain WSGI function answering fixed bytes: the ceiling) | ours (connectplugin.App)"
        " | connectrpc (ConnectWSGIApplication, google.protobuf codecs); each in its own process\n"
        f"waitress: connectplugin.HTTPServer, {http_config(settings.server_threads)}\n"
        "handler : Get returns GetResponse(value=b'x', found=True) and sets no headers;"
        " ours and connectrpc call the very same method\n"
        f"load    : {wrk.version(wrk_path)}, -t{settings.wrk_threads} -c{settings.wrk_connections},"
        f" keep-alive POST {fixtures.PATH}, Content-Type application/proto or application/json,"
        " Connect-Protocol-Version: 1\n"
        f"rounds  : {settings.warmup_seconds}s warm-up per server and codec, then {settings.rounds} rounds"
        f" x {settings.seconds}s per server and codec, interleaved; the median round is shown\n"
        f"pinning : {pinning}"
    )
    report.load_warning()
    app_us = {(k, c): _app_alone_us(k, c) for k in KINDS for c in fixtures.CODECS}
    results = _load_all(settings, wrk_path, server_cpu, load_cpu)

    print()
    rows = []
    clean = True
    for codec in fixtures.CODECS:
        bare = results["bare", codec]
        for kind in KINDS:
            runs = results[kind, codec]
            cpu = [c for c in runs.cpu_us if c]
            vs_cpu = runs.vs_cpu(bare)
            rows.append(
                [
                    kind,
                    codec,
                    f"{report.median(runs.rps):,.0f}",
                    f"{min(runs.rps):,.0f}-{max(runs.rps):,.0f}",
                    f"{report.median(runs.p99_us) / 1000:.1f}",
                    f"{report.median(cpu):.0f}" if cpu else "n/a",
                    f"{app_us[kind, codec]:.1f}",
                    f"{runs.vs(bare):.2f}",
                    f"{vs_cpu:.2f}" if vs_cpu else "n/a",
                    str(runs.errors),
                ]
            )
            clean = clean and runs.errors == 0
    columns = ["server", "codec", "req/s", "req/s range", "p99 ms", "CPU us/call", "app us/call"]
    report.table([*columns, "vs bare", "vs bare CPU", "errors"], rows, left=2)
    print(
        "\nreq/s, p99 ms, CPU us/call: median of the rounds; range: slowest and fastest round;"
        " p99 as wrk sees it at -c"
        f"{settings.wrk_connections}.\n"
        "CPU us/call: the server process's user+sys CPU time over the requests it completed.\n"
        "app us/call: the WSGI app alone, called in this process with a fake environ and no socket\n"
        "  (best of 5, warm caches); inside the server, with caches shared with waitress, the same\n"
        "  code measured 2-4x as much, so each us saved here saves several of CPU us/call.\n"
        "vs bare: median over rounds of req/s / bare's req/s in the same round and codec (the target);\n"
        "vs bare CPU: the same from CPU us/call (bare's / this one's), which busy neighbours disturb less."
    )
    for codec in fixtures.CODECS:
        bare = results["bare", codec]
        for kind, target in TARGETS.items():
            ratio = results[kind, codec].vs(bare)
            print(
                f"target  : {kind} >= {target:.2f} x bare req/s over {codec}: {ratio:.3f}"
                f" {report.verdict(ratio >= target)}"
            )
        for kind, expected in EXPECTED.items():
            ratio = results[kind, codec].vs(bare)
            print(f"expected: {kind} about {expected:.2f} x bare req/s over {codec}: {ratio:.3f}")
    spread = max(max(r.rps) / min(r.rps) - 1 for r in results.values() if min(r.rps) > 0)
    if spread > 0.15:
        print(
            f"NOISY   : one server's rounds differed by up to {spread:.0%} under an identical load: other"
            " processes\n          competed for the CPUs. Trust 'vs bare CPU' more, or rerun on a quiet machine."
        )
    if not clean:
        print(
            "WARNING: some requests failed (non-2xx or socket errors); their figures are suspect."
        )
    return clean


def _load_all(
    settings: Settings, wrk_path: str, server_cpu: int | None, load_cpu: int | None
) -> dict[tuple[str, str], _Runs]:
    results = {(k, c): _Runs() for k in KINDS for c in fixtures.CODECS}
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp, contextlib.ExitStack() as stack:
        scripts = {}
        for codec in fixtures.CODECS:
            scripts[codec] = Path(tmp) / f"get-{codec}.lua"
            scripts[codec].write_text(wrk.lua_script(codec))
        servers = {
            k: stack.enter_context(ServerProcess(k, settings.server_threads, server_cpu))
            for k in KINDS
        }
        print(
            "started : " + ", ".join(f"{k} pid {s.pid} port {s.port}" for k, s in servers.items()),
            flush=True,
        )

        def load(kind: str, codec: str, seconds: int) -> tuple[wrk.WrkResult, float | None]:
            server = servers[kind]
            before = server.cpu_seconds()
            result = wrk.run(
                wrk_path,
                server.url + fixtures.PATH,
                scripts[codec],
                seconds,
                settings.wrk_threads,
                settings.wrk_connections,
                load_cpu,
            )
            after = server.cpu_seconds()
            return result, None if before is None or after is None else after - before

        for codec in fixtures.CODECS:
            for kind in KINDS:
                load(kind, codec, settings.warmup_seconds)
        for n in range(settings.rounds):
            # Every other round runs backwards, so no server always follows the same one.
            order = KINDS if n % 2 == 0 else KINDS[::-1]
            for codec in fixtures.CODECS:
                for kind in order:
                    result, cpu = load(kind, codec, settings.seconds)
                    runs = results[kind, codec]
                    runs.rps.append(result.rps)
                    runs.p99_us.append(result.p99_us)
                    runs.errors += result.status_errors + result.socket_errors
                    runs.cpu_us.append(
                        cpu / result.requests * 1e6 if cpu is not None and result.requests else 0.0
                    )
            print(f"round {n + 1}/{settings.rounds} done", flush=True)
    return results


def _app_alone_us(kind: str, codec: str, calls: int = 5000, repeat: int = 5) -> float:
    """Microseconds per call of the app itself, less the cost of making its environ."""
    app = APPS[kind]()
    template = fixtures.wsgi_environ(codec)
    body = template["wsgi.input"].getvalue()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        if status != "200 OK":
            raise RuntimeError(f"{kind} app answered {status} over {codec}")

    def timed(call: Callable[[dict], Any]) -> float:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(calls):
                environ = template.copy()
                environ["wsgi.input"] = io.BytesIO(body)
                call(environ)
            best = min(best, time.perf_counter() - start)
        return best / calls * 1e6

    setup = timed(lambda environ: None)
    return max(0.0, timed(lambda environ: b"".join(app(environ, start_response))) - setup)
