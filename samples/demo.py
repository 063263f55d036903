"""``make demo``: a host launches the KV plugin, uses it, watches it, and stops it.

``make demo AUTO_MTLS=1`` (``python -m samples.demo --auto-mtls``) launches every plugin with
automatic mTLS (``HostConfig.auto_mtls``): the same calls, over TLS pinned both ways."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from connectplugin import HostConfig, PluginHost, ProcessStrategy
from samples import platform_demo
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.plugin import HANDSHAKE, PLUGINS

_start = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - _start:6.3f}s] {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samples.demo", description=__doc__)
    parser.add_argument("--auto-mtls", action="store_true", help="launch the plugins with automatic mTLS")
    auto_mtls = parser.parse_args(argv).auto_mtls
    # The plugin's own log lines arrive through the host's logging, tagged with its name.
    logging.basicConfig(level=logging.WARNING, format="           %(name)s: %(message)s")
    # An entry point owns the process's signals: here Ctrl-C or SIGTERM unwinds the with
    # block, which stops the plugin (a library embedding a host would leave them alone).
    with PluginHost(HANDSHAKE, PLUGINS, HostConfig(handle_signals=True, auto_mtls=auto_mtls)) as host:
        say(f"host listening on {host.url}")
        client = host.launch(ProcessStrategy([sys.executable, "-m", "samples.kv"]), name="kv")
        say(f"launched kv plugin: pid {client.running.pid}, serving at {client.url}")

        hello = client.handshake()
        say(
            f"handshake: core protocol {hello.core_protocol_version}, app protocol "
            f"{hello.app_protocol_version} (host offers {list(HANDSHAKE.app_protocol_versions)}), "
            f"plugins {[f'{p.name} {p.version} at {p.service_path}' for p in hello.plugins]}"
        )
        say(f"runtime identity assigned by the host: {host.runtime_id(client)}")

        kv = client.dispense("kv")
        events: list[kv_pb2.WatchEvent] = []
        watch = kv.watch(kv_pb2.WatchRequest(prefix="fruit/"))
        watcher = threading.Thread(target=lambda: events.extend(e for _, e in zip(range(3), watch)))
        watcher.start()
        say('watching keys under "fruit/"')

        for key, value in [("fruit/apple", b"red"), ("veg/leek", b"green"), ("fruit/plum", b"purple")]:
            kv.put(kv_pb2.PutRequest(key=key, value=value))
            say(f"put {key} = {value.decode()}")
        got = kv.get(kv_pb2.GetRequest(key="fruit/apple"))
        say(f"get fruit/apple -> found={got.found} value={got.value.decode()!r}")
        gone = kv.delete(kv_pb2.DeleteRequest(key="fruit/apple"))
        say(f"delete fruit/apple -> found={gone.found}")
        missing = kv.get(kv_pb2.GetRequest(key="fruit/apple"))
        say(f"get fruit/apple -> found={missing.found}")

        watcher.join(timeout=5)
        watch.close()
        for event in events:
            say(f"watch event: {kv_pb2.EventType.Name(event.type)} {event.key}")

        status = client.check_health().name
        state = client.get_health().state.name
        say(f"health: HealthService.Check -> {status}, PluginControl.GetHealth -> {state}")

        pid = client.running.pid
        host.stop(client)
        say(f"stopped kv plugin (pid {pid}): exit status {client.exit_code}")
    say("host closed")
    ok = len(events) == 3 and client.exit_code == 0
    print()
    ok = platform_demo.run(say, auto_mtls=auto_mtls) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
