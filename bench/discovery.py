"""Section ``discovery``: DiscoverService with 1, 100 and 10,000 providers of a type.

``python -m bench.discovery serve`` is the host child: a ``PluginHost`` whose caps (issue 8's
``HostConfig.max_identities``, ``RegistryConfig.max_service_types``) are raised for the
run. It fills its registry the way launches do (``Identities.issue`` then
``Registry.declare`` and ``register``, without processes behind them: discovery never calls
a provider): ``BACKGROUND`` other types with one provider each, then types ``scale-1``,
``scale-100`` and ``scale-10000`` with that many providers. It prints
``READY <url> <RSS KiB before> <RSS KiB after> <providers> <seconds to register>`` and exits
when its standard input closes.

This process joins with a join token and calls ``DiscoverService`` for the three types in
interleaved blocks, sequentially, through ``connectplugin.Client``.
"""

from __future__ import annotations

import sys
import time

from bench import report
from bench.hostproc import JOIN_TOKEN, ChildProcess, child_setup, usage
from bench.provider import HANDSHAKE, PLUGINS
from bench.servers import pinned, placement
from bench.settings import Settings
from connectplugin import (
    Client,
    ClientConfig,
    Health,
    HostConfig,
    HostLink,
    JoinToken,
    PluginHost,
    RegistryConfig,
)
from connectplugin.gen.connectplugin.v1 import registry_pb2
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.host.registry import Declared

SIZES = (1, 100, 10_000)
BACKGROUND = 1_000
"""Other service types, one provider each, registered before the measured ones."""
BLOCKS = 10
CALLS = 2_000
"""Measured discoveries per type, in BLOCKS interleaved blocks."""
WARMUP = 200
TARGET = 2.0
"""Largest p50 ratio, 10,000 providers of a type to one."""
PATH = "/kv.v1.KVService/"


def serve() -> None:
    child_setup("python -m bench.discovery")
    providers = BACKGROUND + sum(SIZES)
    config = HostConfig(
        join_tokens=(JoinToken(JOIN_TOKEN, name="bench"),),
        max_identities=providers + 16,
        registry=RegistryConfig(max_service_types=BACKGROUND + len(SIZES) + 16),
    )
    with PluginHost(HANDSHAKE, PLUGINS, config) as host:
        before = usage()[0]
        started = time.perf_counter()
        types = [f"other-{i}" for i in range(BACKGROUND)]
        for size in SIZES:
            types += [f"scale-{size}"] * size
        for i, service_type in enumerate(types):
            base_url = f"http://127.0.0.1:{20000 + i % 40000}"
            identity = host.identities.issue(f"p{i}", "1.0.0", launched=True, base_url=base_url)
            host.registry.declare(identity.runtime_id, Declared(launched=True, paths={service_type: PATH}))
            host.registry.register(identity.runtime_id, service_type, "1.0.0", PATH, base_url)
        elapsed = time.perf_counter() - started
        print(f"READY {host.url} {before} {usage()[0]} {len(types)} {elapsed:.1f}", flush=True)
        sys.stdin.buffer.read()


def run(settings: Settings) -> bool:
    report.title("Discovery at scale: DiscoverService with 1, 100 and 10,000 providers of a type")
    host_cpu, caller_cpu = placement(settings.pin_cpus)
    print(
        f"host    : PluginHost in its own process (python -m bench.discovery serve), registry filled in\n"
        f"          process: {BACKGROUND:,} other types x 1 provider, then types with"
        f" {', '.join(f'{n:,}' for n in SIZES)} providers (one identity each;\n"
        "          HostConfig.max_identities and RegistryConfig.max_service_types raised to fit)\n"
        "caller  : a joined plugin in this process, ServiceRegistryClient(connectplugin.Client).discover_service\n"
        f"calls   : {WARMUP} warm-up per type, then {BLOCKS} interleaved blocks, {CALLS:,} sequential calls per type\n"
        f"pinning : host on CPU {host_cpu}, this process on CPU {caller_cpu}"
        if host_cpu is not None
        else "pinning : none"
    )
    report.load_warning()
    args = ["bench.discovery", "serve"]
    if host_cpu is not None:
        args += ["--cpu", str(host_cpu)]
    with ChildProcess(args, "READY", start_timeout=300) as proc, pinned(caller_cpu):
        url, before, after, count, seconds = proc.words
        print(
            f"started : host at {url}; {int(count):,} providers registered in {float(seconds):.1f}s; host RSS"
            f" {int(before) / 1024:.0f} -> {int(after) / 1024:.0f} MiB",
            flush=True,
        )
        link = HostLink()
        try:
            link.attach(Health(), (), url)
            link.connect(HANDSHAKE, "bench-discoverer", "1.0.0", base_url="", join_token=JOIN_TOKEN)
            with Client(url, ClientConfig(headers=link.headers())) as client:
                registry = ServiceRegistryClient(client)
                requests = {n: registry_pb2.DiscoverServiceRequest(service_type=f"scale-{n}") for n in SIZES}
                answers = {n: registry.discover_service(r) for n, r in requests.items()}
                for request in requests.values():
                    for _ in range(WARMUP):
                        registry.discover_service(request)
                samples: dict[int, list[int]] = {n: [] for n in SIZES}
                clock = time.perf_counter_ns
                for _ in range(BLOCKS):
                    for n, request in requests.items():
                        for _ in range(CALLS // BLOCKS):
                            start = clock()
                            registry.discover_service(request)
                            samples[n].append(clock() - start)
        finally:
            link.close()

    print()
    p50 = {n: report.percentile(sorted(s), 50) / 1000 for n, s in samples.items()}
    rows = [
        [
            f"{n:,}",
            f"{p50[n]:.0f}",
            f"{report.percentile(sorted(samples[n]), 99) / 1000:.0f}",
            f"{p50[n] / p50[SIZES[0]]:.2f}",
            str(len(answers[n].SerializeToString())),
            str(answers[n].single_provider),
        ]
        for n in SIZES
    ]
    report.table(["providers", "p50 us", "p99 us", "p50 vs 1", "answer bytes", "single_provider"], rows)
    per_provider = (int(after) - int(before)) * 1024 / int(count)
    ratio = p50[SIZES[-1]] / p50[SIZES[0]]
    print(
        f"RSS     : {per_provider / 1024:.1f} KiB of host RSS per provider (identity, declaration,\n"
        f"          registration and indexes), over all {int(count):,}.\n"
        "answer  : DiscoverService answers one picked endpoint (and whether it was the only one),\n"
        "          never the whole list, so its size does not grow with the providers."
    )
    print(f"target  : p50 10,000 providers <= {TARGET:.0f} x 1: {ratio:.2f} {report.verdict(ratio <= TARGET)}")
    return True


if __name__ == "__main__":
    serve()
