"""Across machines, for real: a host in one network namespace and a self-registering plugin in
another, joined over mTLS by certificate identity (model B with a CA).

The test makes two namespaces joined by a veth pair with a /30 of 10.213.0.0/16, so traffic
runs only between them (neither has a route anywhere else), and removes both afterwards,
whatever happened. It needs root and ``ip``; elsewhere it skips, saying why.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from connectplugin.rpc import tls
from tests.helpers import ENV, ROOT

HOST_PORT = 8443
"""The host's port inside its own namespace (nothing else listens there), fixed so a restarted
host is found where the plugin knows it."""


@dataclass
class Namespaces:
    host: str
    plugin: str
    host_address: str
    plugin_address: str
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, namespace: str, name: str, *args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        """``python -m <args>`` inside ``namespace``, its output in ``logs/<name>.log``."""
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-m", *args],
                cwd=ROOT, env={**os.environ, **ENV}, stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
            )
        self.processes.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def namespaces(tmp_path) -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("creating network namespaces needs the ip command (iproute2)")
    tag = secrets.token_hex(3)
    subnet = random.randrange(256) * 256 + random.randrange(0, 256, 4)  # a /30 of 10.213.0.0/16
    host_address = f"10.213.{subnet // 256}.{subnet % 256 + 1}"
    plugin_address = f"10.213.{subnet // 256}.{subnet % 256 + 2}"
    made = Namespaces(f"cph{tag}", f"cpp{tag}", host_address, plugin_address, tmp_path)
    created: list[str] = []
    try:
        for namespace in (made.host, made.plugin):
            result = _ip("netns", "add", namespace)
            if result.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {result.stderr.strip()}")
            created.append(namespace)
        steps = [
            ("-n", made.host, "link", "add", made.host, "type", "veth", "peer", "name", made.plugin, "netns", made.plugin),
            ("-n", made.host, "addr", "add", f"{host_address}/30", "dev", made.host),
            ("-n", made.plugin, "addr", "add", f"{plugin_address}/30", "dev", made.plugin),
        ]
        for namespace in (made.host, made.plugin):
            steps += [("-n", namespace, "link", "set", namespace, "up"), ("-n", namespace, "link", "set", "lo", "up")]
        for step in steps:
            result = _ip(*step)
            assert result.returncode == 0, f"ip {' '.join(step)}: {result.stderr}"
        yield made
    finally:
        for proc in made.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for namespace in created:  # the veth pair goes with them
            _ip("netns", "del", namespace)


def test_a_plugin_in_another_namespace_joins_by_certificate_is_routed_to_and_rejoins_a_restarted_host(
    namespaces, tmp_path
):
    ns = namespaces
    pki_dir = tmp_path / "pki"
    tls.make_dev_pki(
        ["svc", "caller"], host_names=(), host_addresses=(ns.host_address, ns.plugin_address)
    ).write(pki_dir)
    host_url = f"https://{ns.host_address}:{HOST_PORT}"
    host_args = (
        "tests.platform_plugins.mtls", "host", "--listen", ns.host_address, "--port", str(HOST_PORT),
        "--pki", str(pki_dir), "--admit", "svc=svc", "--admit", "caller",
    )

    def call_through_the_host(run: str) -> dict:
        """The caller, in the plugin's namespace, joins by its certificate and calls ``svc``."""
        done = subprocess.run(
            ["ip", "netns", "exec", ns.plugin, sys.executable, "-m", "tests.platform_plugins.mtls", "call",
             "--host-url", host_url, "--pki", str(pki_dir), "--self-id", "caller", "--type", "svc"],
            cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, f"{run}: {done.stderr}\nhost: {ns.log('host')}\nprovider: {ns.log('provider')}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    host = ns.start(ns.host, "host", *host_args, stdin=subprocess.PIPE)
    provider = ns.start(
        ns.plugin, "provider", "tests.platform_plugins.provider", "--type", "svc", "--host-url", host_url,
        "--listen", ns.plugin_address, "--pki", str(pki_dir),
    )

    first = call_through_the_host("first host")

    assert first == {"value": "across namespaces", "whoami": str(provider.pid), "event": ["streamed/1", "one"]}

    assert host.stdin is not None
    host.stdin.close()  # the host stops: Shutdown of nothing launched, server closed
    host.wait(timeout=20)
    ns.start(ns.host, "host", *host_args, stdin=subprocess.PIPE)

    again = call_through_the_host("restarted host")

    assert again["whoami"] == str(provider.pid)  # the same process joined the new host
    assert again["event"] == ["streamed/1", "one"]
    assert provider.poll() is None
