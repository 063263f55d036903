"""A plugin host in a process of its own, and the parent's handle on it.

``python -m bench.hostproc [--cpu N]`` starts a ``PluginHost``, launches ``bench.provider``
through it (the provider inherits the host's CPU pinning), and prints one line::

    READY <host url> <provider url> <provider runtime id> <provider pid> <provider's host secret>

then answers commands, one a line on its standard input: ``flip`` turns the provider's
health from healthy to degraded or back (a registry change its watchers hear of) and answers
``FLIPPED <time.monotonic_ns() just before the change>``. ``--streams N`` lets the host and
the provider serve N streams at once, and N watchers of a service type.

It stops the provider and exits when its standard input closes, so a parent that dies, even
by SIGKILL, cannot leave it running (and the provider follows its host the same way).
Keeping the host out of the benchmark's process keeps its GIL away from the caller's.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from bench.provider import HANDSHAKE, PLUGINS
from bench.servers import ROOT, pin_to
from connectplugin import HostConfig, JoinToken, PluginHost, ProcessStrategy, RegistryConfig
from connectplugin.host.registry import DEGRADED, HEALTHY

JOIN_TOKEN = "bench-caller-join-token"
"""Admits the benchmark's caller, a plugin that only calls others (self-registration needs a token)."""

# --- the child ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostproc", description=__doc__)
    parser.add_argument("--cpu", type=int, default=None, help="pin host and provider to this CPU")
    parser.add_argument("--streams", type=int, default=0, help="streams and watchers of a type served at once")
    args = parser.parse_args()
    pin_to(args.cpu)
    # The parent stops us by closing stdin; Ctrl-C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    config = HostConfig(handle_signals=False, join_tokens=(JoinToken(JOIN_TOKEN, name="bench"),))
    command = [sys.executable, "-m", "bench.provider"]
    if args.streams:
        config = replace(
            config,
            http=replace(config.http, max_streams=args.streams),
            registry=RegistryConfig(max_watchers_per_type=args.streams),
        )
        command += ["--max-streams", str(args.streams)]
    with PluginHost(HANDSHAKE, PLUGINS, config) as host:
        strategy = ProcessStrategy(command, cwd=str(ROOT))
        client = host.launch(strategy, name="kv")
        pid = client.running.pid if client.running is not None else 0
        identity = host.identities.get(host.runtime_id(client))
        secret = identity.host_secret if identity is not None else ""
        print(f"READY {host.url} {client.url} {host.runtime_id(client)} {pid} {secret}", flush=True)
        degraded = False
        for line in sys.stdin:
            if line.strip() == "flip":
                degraded = not degraded
                changed_at = time.monotonic_ns()
                host.registry.set_health(host.runtime_id(client), DEGRADED if degraded else HEALTHY)
                print(f"FLIPPED {changed_at}", flush=True)


# --- the parent's handle --------------------------------------------------------------------


class ChildProcess:
    """A benchmark child (``python -m MODULE ARGS``) that prints one ready line, then answers
    command lines on its standard input and exits when it closes; ``with`` starts it (until
    the ready line) and always stops it.
    """

    def __init__(self, args: list[str], ready: str, start_timeout: float = 30.0) -> None:
        self._args = args
        self._ready = ready
        self._timeout = start_timeout
        self.words: list[str] = []
        """The ready line's words after the first."""
        self.pid = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr = tempfile.TemporaryFile()

    def __enter__(self) -> ChildProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", *self._args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.pid = self._proc.pid
        self.words = self._read_ready()

    def _read_ready(self) -> list[str]:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self._timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while True:
                self._check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self._args[0]} was not ready in {self._timeout:.0f}s")
                if sel.select(timeout=min(left, 0.2)):
                    words = self._proc.stdout.readline().decode().split()
                    if words and words[0] == self._ready:
                        return words[1:]
                    self._check_alive()
                    raise RuntimeError(f"{self._args[0]} printed {words!r} instead of {self._ready}")

    def command(self, line: str) -> list[str]:
        """Send one command line; the words of the child's answer."""
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline().decode().split()

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"{self._args[0]} exited with {self._proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """Close its stdin (it then stops what it started itself); signals only if it hangs."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stderr.close()


class HostProcess(ChildProcess):
    """``bench.hostproc`` in a child process; ``with`` starts it and always stops it.

    Starting returns once the host has launched the provider and the provider has
    registered its service type.
    """

    def __init__(self, cpu: int | None = None, start_timeout: float = 30.0, streams: int = 0) -> None:
        args = ["bench.hostproc"]
        if cpu is not None:
            args += ["--cpu", str(cpu)]
        if streams:
            args += ["--streams", str(streams)]
        super().__init__(args, "READY", start_timeout)
        self.host_url = ""
        self.host_pid = 0
        self.provider_url = ""
        self.provider_id = ""
        self.provider_secret = ""
        """What the host presents to its plugin: direct calls need it too (plugins answer only their host)."""
        self.provider_pid = 0

    def __enter__(self) -> HostProcess:
        super().__enter__()
        return self

    def start(self) -> None:
        super().start()
        if len(self.words) != 5:
            raise RuntimeError(f"the host process printed READY {self.words!r}")
        self.host_url, self.provider_url, self.provider_id, pid, self.provider_secret = self.words
        self.host_pid = self.pid
        self.provider_pid = int(pid)


def usage(pid: int | str = "self") -> tuple[int, int]:
    """(RSS in KiB, threads) of a process, from /proc (zeros off Linux)."""
    rss = threads = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except OSError:
        pass
    return rss, threads


def child_setup(prog: str) -> None:
    """What a benchmark's host child does first: ``prog serve [--cpu N]``, pinned, quiet logs."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args()
    pin_to(args.cpu)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process (all its threads), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
