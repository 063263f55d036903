"""Printing: the run's header, section titles, aligned tables, and the few statistics used."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
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


def load_warning() -> None:
    """Say so when other processes keep the machine busy: every figure is then noisier."""
    if not hasattr(os, "getloadavg"):
        return
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    note = "quiet enough" if load < 0.5 else "OTHER PROCESSES ARE BUSY: expect noisy figures"
    print(f"machine : 1-minute load average {load:.2f} on {cores} cores before loading ({note})")


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
