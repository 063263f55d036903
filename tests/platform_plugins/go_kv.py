"""The sample KV store as a plugin under the Go reference's magic cookie (tests/test_go_interop.py).

Served with ``serve()`` as any plugin is: ``--host-url URL`` joins that host by itself;
started by the Go launcher (``PORT`` and ``HOST_URL`` in its environment) it serves in the
Go launch model; with the cookie in its environment it is a plugin our host launched.
"""

import argparse

from connectplugin import HandshakeConfig, ServeConfig, ServiceDeclaration, serve
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN
from samples.kv.store import KVStore

GO_HANDSHAKE = HandshakeConfig("CONNECT_PLUGIN", "d3f40b3c2e1a5f8b9c4d7e6a1b2c3d4e")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host-url", default="", help="join this host on its own")
    args = parser.parse_args()
    config = ServeConfig(
        self_id="py-kv",
        self_version="1.0.0",
        host_url=args.host_url,
        provides=[ServiceDeclaration("kv", "1.0.0", KV_PLUGIN.service_path)],
        grace_period=2.0,
        # The Go reference host presents no credential when it calls or routes to a plugin.
        allow_unauthenticated=bool(args.host_url),
    )
    serve({"kv": KV_PLUGIN}, {"kv": KVStore()}, handshake=GO_HANDSHAKE, config=config)
