"""AppPlugins, the core of the web integrations: one launch per plugin per process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from connectplugin import InProcessStrategy, LaunchContext, Running
from connectplugin.contrib import AppPlugins, AppPluginsConfig
from samples.kv.plugin import HANDSHAKE, PLUGINS
from samples.kv.store import KVStore


@dataclass
class CountingStrategy:
    """A real in-process launch that counts its starts."""

    inner: InProcessStrategy
    starts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, ctx: LaunchContext) -> Running:
        with self.lock:
            self.starts += 1
        return self.inner.start(ctx)


def test_threads_racing_on_the_first_use_share_one_launch():
    strategy = CountingStrategy(InProcessStrategy({"kv": KVStore()}))
    plugins = AppPlugins(AppPluginsConfig(HANDSHAKE, PLUGINS, {"kv": strategy}))
    gate = threading.Barrier(8)
    clients = []

    def first_use() -> None:
        gate.wait()
        clients.append(plugins.client("kv"))

    threads = [threading.Thread(target=first_use, name=f"first-use-{i}") for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert strategy.starts == 1
        assert len(clients) == 8 and len({id(c) for c in clients}) == 1
        assert plugins.launched() == {"kv": clients[0]}
    finally:
        plugins.close()


def test_constructing_app_plugins_starts_nothing():
    threads = set(threading.enumerate())

    plugins = AppPlugins(
        AppPluginsConfig(HANDSHAKE, PLUGINS, {"kv": InProcessStrategy({"kv": KVStore()})})
    )

    assert set(threading.enumerate()) == threads and plugins.launched() == {}
