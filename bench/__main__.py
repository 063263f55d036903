"""Run the benchmarks: ``python -m bench [SECTION ...]`` (all sections when none is named).

A section is a module with ``run(settings) -> bool`` (False when it could not run cleanly),
listed in SECTIONS; add new benchmarks (plugin launch time, router hop, ...) the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from bench import client, codec, discovery, fanout, launch, many, report, router, tls
from bench.settings import Settings

SECTIONS: dict[str, tuple[Callable[[Settings], bool], str]] = {
    "codec": (
        codec.run,
        "server throughput under wrk: bare WSGI vs ours vs connectrpc, proto and JSON",
    ),
    "client": (client.run, "sequential client latency: raw http.client vs requests vs ours"),
    "launch": (launch.run, "plugin launch time vs a bare interpreter; 10 plugins at once"),
    "router": (router.run, "plugin-to-plugin Get through the host's router vs direct"),
    "tls": (tls.run, "unary Get plaintext vs mTLS (keep-alive); handshake flood; launch with/without auto-mTLS"),
    "fanout": (fanout.run, "one change to 100 registry watchers and to 100 KV watchers: change to receipt"),
    "discovery": (discovery.run, "DiscoverService with 1, 100 and 10,000 providers of a type (1,000 types)"),
    "many": (many.run, "50 plugins launched at once: time to ready, host RSS and threads, calls to all"),
}


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="connectplugin benchmarks.",
        epilog="sections:\n"
        + "\n".join(f"  {name:8} {doc}" for name, (_, doc) in SECTIONS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "sections", nargs="*", metavar="SECTION", help="sections to run (default: all)"
    )
    parser.add_argument(
        "--rounds", type=int, default=defaults.rounds, help="wrk rounds per server and codec"
    )
    parser.add_argument(
        "--seconds", type=int, default=defaults.seconds, help="length of one wrk round"
    )
    parser.add_argument(
        "--calls", type=int, default=defaults.calls, help="measured calls per client"
    )
    parser.add_argument(
        "--threads", type=int, default=defaults.server_threads, help="waitress threads"
    )
    parser.add_argument("--no-pin", action="store_true", help="let processes float over all cores")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    settings = Settings(
        server_threads=args.threads,
        rounds=args.rounds,
        seconds=args.seconds,
        calls=args.calls,
        pin_cpus=not args.no_pin,
    )

    report.header(settings)
    started = time.monotonic()
    failed = []
    try:
        for name in args.sections or list(SECTIONS):
            if not SECTIONS[name][0](settings):
                failed.append(name)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    print()
    print(
        f"done in {time.monotonic() - started:.0f}s"
        + (f"; not clean: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
