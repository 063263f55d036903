"""The knobs of a benchmark run, one frozen dataclass so the report can print them all."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    server_threads: int = 4
    """Waitress worker threads, the same for every server under test."""
    rounds: int = 6
    """Load runs per (server, codec), interleaved across servers so drift hits all alike."""
    seconds: int = 2
    """Length of one wrk run."""
    warmup_seconds: int = 1
    """An unmeasured wrk run per (server, codec) before the first round."""
    pin_cpus: bool = True
    """With 2+ cores: server process on CPU 0, load generator or client on CPU 1, so the
    scheduler cannot move them onto one core mid-run (the main source of run-to-run noise)."""
    wrk_threads: int = 1
    wrk_connections: int = 8
    calls: int = 3000
    """Measured sequential calls per client in the client-latency section."""
    client_warmup: int = 300
    """Unmeasured calls per client before the first measured one."""
