"""The provider behind the router benchmark: ``python -m bench.provider``, launched by a host.

It serves ``kv.v1.KVService`` with the fixed handler every benchmark uses and declares it as
service type ``kv``, so a caller can reach it both through the host's router and directly.
It logs nothing per call: a measurement of the hop should not include a logger.
"""

from __future__ import annotations

from bench import fixtures
from connectplugin import HandshakeConfig, ServeConfig, ServiceDeclaration, serve
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN

HANDSHAKE = HandshakeConfig(
    magic_cookie_key="CONNECTPLUGIN_BENCH",
    magic_cookie_value="3f9d61b0-bench-provider",
    app_protocol_versions=(1,),
)
PLUGINS = {"kv": KV_PLUGIN}
SERVICE_TYPE = "kv"


def main() -> None:
    config = ServeConfig(
        self_id="bench-kv",
        self_version="1.0.0",
        provides=[
            ServiceDeclaration(service_type=SERVICE_TYPE, version="1.0.0", path=KV_PLUGIN.service_path)
        ],
    )
    serve(PLUGINS, {"kv": fixtures.FixedKV()}, handshake=HANDSHAKE, config=config)


if __name__ == "__main__":
    main()
