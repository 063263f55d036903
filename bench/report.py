"""Printing: the run's header, section titles, aligned tables, and the few statistics used."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata

from bench.settings import Settings


def header(settings: Settings) -> None:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    try:
        from google.protobuf.internal import api_implementation

        pb_impl = api_implementation.Type()
    except ImportError:
        pb_impl = "?"
    versions = ", ".join(
        f"{name} {_version(name)}" for name in ("waitress", "requests", "werkzeug", "connectrpc")
    )
    print("connectplugin benchmarks")
    print(f"  machine : {cores} cores ({usable} usable), {platform.machine()}, {_cpu_model()}")
    print(
        f"  python  : {platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    )
    print(f"  packages: protobuf {_version('protobuf')} ({pb_impl}), {versions}")
    print("  settings: " + ", ".join(f"{k}={v}" for k, v in asdict(settings).items()))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_warning(window: float = 1.0) -> None:
    """Say how busy other processes keep the machine right now: busy neighbours make noise."""
    before = _cpu_times()
    if before is None:
        return
    time.sleep(window)
    after = _cpu_times()
    if after is None:
        return
    total = after[0] - before[0]
    busy = 1 - (after[1] - before[1]) / total if total else 0.0
    note = "quiet" if busy < 0.10 else "OTHER PROCESSES ARE BUSY: expect noisy figures"
    print(f"machine : {busy:.0%} of all CPU time busy in the {window:.0f}s before loading ({note})")


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle incl. iowait) jiffies over all CPUs, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[3] + fields[4]


def title(text: str) -> None:
    print()
    print(text)
    print("=" * len(text))


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> None:
    """Print ``rows`` under ``columns``; the first ``left`` columns are left-aligned, the rest right."""
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        out = [
            str(c).ljust(w) if i < left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    print(line(columns))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"
