"""The host link from a plugin's side: calls on its host that must outlive ordinary timeouts."""

from __future__ import annotations

from connectplugin import Health, HostLink, HostLinkConfig
from samples.platform import HANDSHAKE
from tests.helpers import Reader

# --- watching ---------------------------------------------------------------------------------


def test_hostlink_watch_outlives_the_host_clients_call_timeout(host):
    # Long enough for the handshake on a loaded machine, short enough to outlive quickly.
    link = HostLink(HostLinkConfig(call_timeout=1.0))
    link.attach(Health(), (), host.url)
    try:
        link.connect(HANDSHAKE, "watcher", "1.0.0", base_url="")
        watcher = Reader(lambda: link.watch("svc"))
        watcher.wait_for(1)
        ended = watcher.ended.wait(1.5)  # well past one call timeout
        assert not ended, f"the watch ended: {watcher.error}"
    finally:
        host.registry.close_watchers()
        link.close()
