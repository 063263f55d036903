"""The provider behind the router benchmark: ``python -m bench.provider``, launched by a host.

It serves ``kv.v1.KVService`` with the fixed handler every benchmark uses and declares it as
service type ``kv``, so a caller can reach it both through the host's router and directly.
It logs nothing per call: a measurement of the hop should not include a logger.
``--max-streams N`` raises how many Watch streams it serves at once; ``--host-url URL`` joins
that host by itself instead (the Go reference host, which presents no credential to plugins).
"""

from __future__ import annotations

import argparse

from bench import fixtures
from connectplugin import HandshakeConfig, HTTPConfig, ServeConfig, ServiceDeclaration, serve
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN

HANDSHAKE = HandshakeConfig(
    magic_cookie_key="CONNECTPLUGIN_BENCH",
    magic_cookie_value="3f9d61b0-bench-provider",
    app_protocol_versions=(1,),
)
GO_HANDSHAKE = HandshakeConfig("CONNECT_PLUGIN", "d3f40b3c2e1a5f8b9c4d7e6a1b2c3d4e")
"""The Go reference's default magic cookie, for joining ``goref host``."""
PLUGINS = {"kv": KV_PLUGIN}
SERVICE_TYPE = "kv"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.provider", description=__doc__)
    parser.add_argument("--max-streams", type=int, default=HTTPConfig.max_streams, help="streams served at once")
    parser.add_argument("--host-url", default="", help="join this host by itself (the Go reference host)")
    parser.add_argument("--port", type=int, default=0, help="listen here (default: any free port)")
    args = parser.parse_args()
    config = ServeConfig(
        http=HTTPConfig(port=args.port, max_streams=args.max_streams),
        self_id="bench-kv",
        self_version="1.0.0",
        host_url=args.host_url,
        provides=[
            ServiceDeclaration(service_type=SERVICE_TYPE, version="1.0.0", path=KV_PLUGIN.service_path)
        ],
        allow_unauthenticated=bool(args.host_url),
    )
    handshake = GO_HANDSHAKE if args.host_url else HANDSHAKE
    serve(PLUGINS, {"kv": fixtures.FixedKV()}, handshake=handshake, config=config)


if __name__ == "__main__":
    main()
