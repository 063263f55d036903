"""A caller that opens routed streams and then waits to be killed, for the router's tests.

``python -m tests.platform_plugins.stream_caller URL COUNT`` opens COUNT ``Watch`` streams
at URL (a routed endpoint) with the credentials in ``CALLER_RUNTIME_ID`` and ``CALLER_TOKEN``,
prints ``ready`` once each stream's headers are in, and then blocks until it is killed.
"""

from __future__ import annotations

import os
import sys
import threading

from connectplugin import Client, ClientConfig
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    credentials = {
        "X-Plugin-Runtime-ID": os.environ["CALLER_RUNTIME_ID"],
        "Authorization": f"Bearer {os.environ['CALLER_TOKEN']}",
    }
    kv = KVServiceClient(Client(url, ClientConfig(headers=credentials)))
    streams = [kv.watch(kv_pb2.WatchRequest(prefix="held")) for _ in range(count)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    threading.Event().wait()  # until killed
    del streams


if __name__ == "__main__":
    main()
