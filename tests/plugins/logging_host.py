"""A host with Python's default logging (nothing configured) that launches logging_plugin.py,
makes one call fail unexpectedly and logs from the plugin at INFO and WARNING, then stops.
It prints what the caller got on stdout; its log goes to stderr as Python's default sends it."""

import os
import sys

from instrumented import HANDSHAKE, PLUGINS

from connectplugin import ConnectError, HostConfig, PluginHost, ProcessStrategy
from samples.kv.gen.kv.v1 import kv_pb2

if __name__ == "__main__":
    plugin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logging_plugin.py")
    host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(handle_signals=False)).start()
    try:
        kv = host.launch(ProcessStrategy([sys.executable, plugin]), name="kv").dispense("kv")
        try:
            kv.get(kv_pb2.GetRequest(key="raise/the handler broke"))
        except ConnectError as e:
            print(f"caller got: {e.code.value}: {e.message}", flush=True)
        kv.put(kv_pb2.PutRequest(key="log/info", value=b"an info line"))
        kv.put(kv_pb2.PutRequest(key="log/warning", value=b"a warning line"))
        kv.put(kv_pb2.PutRequest(key="print/done", value=b"done"))
        kv.get(kv_pb2.GetRequest(key="sleep/0"))
    finally:
        host.close()
