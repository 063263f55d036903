"""The platform half of ``make demo``: several plugins sharing one host."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from connectplugin import (
    ConnectError,
    Health,
    HostConfig,
    HostLink,
    JoinToken,
    Platform,
    PluginHost,
    PluginSpec,
    ProcessStrategy,
    Requirement,
)
from connectplugin.gen.capability.logger.v1 import logger_pb2
from connectplugin.gen.capability.logger.v1.logger_connect import LoggerClient
from connectplugin.gen.connectplugin.v1 import registry_pb2
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.platform import HANDSHAKE
from samples.platform.capabilities import HostLogger

State = registry_pb2.ServiceState


def _plugin(module: str) -> ProcessStrategy:
    return ProcessStrategy([sys.executable, "-m", f"samples.platform.{module}"])


def _wait(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run(say: Callable[[str], None], auto_mtls: bool = False) -> bool:
    host_logger = HostLogger()
    # Self-registering plugins need a join token: one for the sidecars that provide storage
    # and api, one (allowed to provide nothing) for this script acting as a plugin.
    sidecar_token = JoinToken(secrets.token_urlsafe(24), ("storage", "api"), name="demo sidecars")
    client_token = JoinToken(secrets.token_urlsafe(24), name="demo client")
    config = HostConfig(handle_signals=True, join_tokens=[sidecar_token, client_token], auto_mtls=auto_mtls)
    with PluginHost(HANDSHAKE, {}, config) as host:
        host.broker.add("logger", "1.0.0", host_logger)
        platform = Platform(host)
        say(f"platform host at {host.url}, offering capability 'logger' 1.0.0")

        # Given dependents first on purpose: the platform orders them by what they require.
        started = platform.add(
            PluginSpec("cache", _plugin("cache"), provides=["cache"], requires=[Requirement("logger", "1.0.0")]),
            PluginSpec("logger", _plugin("logger"), provides=["logger"]),
        )
        say(f"dependency-ordered start: {' -> '.join(f'{name} at {platform.client(name).url}' for name in started)}")
        say(f"removing logger would affect: {platform.impact('logger')}")

        # Model B: storage and api start on their own and join the host.
        sidecars = [
            subprocess.Popen(
                [sys.executable, "-m", f"samples.platform.{m}", "--host-url", host.url],
                env={**os.environ, "CONNECTPLUGIN_JOIN_TOKEN": sidecar_token.secret},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for m in ("storage", "api")
        ]
        try:
            _wait("storage and api to register", lambda: {"storage", "api"} <= {p.service_type for p in host.registry.providers()})
            say("storage and api joined on their own (self-registered) and registered their services")

            # This script acts as one more plugin: it handshakes for an identity of its own.
            me = HostLink()
            me.attach(Health(), (), host.url)
            me.connect(HANDSHAKE, "demo-client", "1.0.0", base_url="", join_token=client_token.secret)
            say(f"demo client handshook with the host: runtime id {me.runtime_id}")

            api = me.client("api", KVServiceClient, timeout=5)
            api.put(kv_pb2.PutRequest(key="users/42", value=b"Ada"))
            got = api.get(kv_pb2.GetRequest(key="users/42"))
            say(f"via router: demo -> api -> storage: users/42 = {got.value.decode()!r}")
            try:
                api.put(kv_pb2.PutRequest(key="no-collection", value=b"x"))
            except ConnectError as e:
                say(f"via router: api refused a bad key: {e.code.value}: {e.message}")

            cache = me.client("cache", KVServiceClient, timeout=5)
            cache.put(kv_pb2.PutRequest(key="greeting", value=b"hello"))
            say("via router: demo -> cache, and cache -> logger (cache logs each write through the logger plugin)")

            logger = me.capability("logger", LoggerClient, reason="demo")
            logger.log(logger_pb2.LogRequest(level="info", message="hello from a capability grant", fields={"by": "demo"}))
            say(f"capability grant used: the host logged {host_logger.entries[-1].message!r}")

            events: list[registry_pb2.WatchServiceEvent] = []
            watch = me.watch("logger")
            watcher = threading.Thread(target=lambda: events.extend(e for _, e in zip(range(3), watch)), daemon=True)
            watcher.start()
            _wait("the watcher's first event", lambda: len(events) >= 1)
            logger_pid = platform.client("logger").running.pid
            os.kill(logger_pid, signal.SIGKILL)  # a crash, as far as the host can tell
            _wait("the watcher to see the logger go", lambda: len(events) >= 2)
            platform.remove("logger")
            platform.add(PluginSpec("logger", _plugin("logger"), provides=["logger"]))
            _wait("the watcher to see the logger return", lambda: len(events) >= 3)
            watch.close()
            for e in events:
                say(f"watcher saw logger {State.Name(e.state)}" + (f" at {e.endpoint.endpoint_url}" if e.endpoint.provider_id else ""))
            say(f"(the first logger, pid {logger_pid}, was killed; a new one took its place)")

            failures, calls = [], [0]
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    try:
                        cache.get(kv_pb2.GetRequest(key="greeting"))
                        calls[0] += 1
                    except ConnectError as e:
                        failures.append(e)

            loaders = [threading.Thread(target=load) for _ in range(4)]
            for t in loaders:
                t.start()
            time.sleep(0.3)
            old_id = host.runtime_id(platform.client("cache"))
            new = platform.replace("cache", _plugin("cache"))
            time.sleep(0.3)
            stop.set()
            for t in loaders:
                t.join()
            say(f"blue-green replace of cache: {old_id} -> {host.runtime_id(new)} under load: "
                f"{calls[0]} calls, {len(failures)} failed")
            me.close()
        finally:
            for p in sidecars:
                p.terminate()
            for p in sidecars:
                p.wait(timeout=10)
        platform.close()
        say("platform closed: every plugin stopped")
    return not failures and len(events) == 3
