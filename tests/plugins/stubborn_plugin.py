"""A KV plugin that ignores SIGTERM and keeps its process alive after Shutdown.

It serves on a thread with :class:`PluginServer` rather than ``serve()`` (which installs a
SIGTERM handler) and then blocks in the main thread until stdin reaches end of file, so
only SIGKILL (or the host closing the pipe after killing it) ends it.
"""

import os
import signal
import sys
import threading

from instrumented import HANDSHAKE, PLUGINS, InstrumentedStore

from connectplugin import Health, PluginServer
from connectplugin.runtime.handshake import CORE_PROTOCOL_VERSION

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    health = Health()
    server = PluginServer(PLUGINS, {"kv": InstrumentedStore(health)}, HANDSHAKE, health=health)
    # The host's secret is the first line on stdin; the rest of the pipe only ever ends.
    server.link.expect_host(sys.stdin.readline().strip())
    url = server.listen()
    threading.Thread(target=server.run, daemon=True).start()
    print(f"{CORE_PROTOCOL_VERSION}|{max(HANDSHAKE.app_protocol_versions)}|{url}", flush=True)
    while os.read(0, 4096):
        pass
