"""A host that launches the KV plugin, prints the plugin's pid, and waits to be killed."""

import os
import sys
import time

from instrumented import HANDSHAKE, PLUGINS

from connectplugin import HostConfig, PluginHost, ProcessStrategy

if __name__ == "__main__":
    plugin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kv_plugin.py")
    host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(handle_signals=False)).start()
    client = host.launch(ProcessStrategy([sys.executable, plugin]), name="kv")
    print(client.running.pid, flush=True)
    time.sleep(60)
