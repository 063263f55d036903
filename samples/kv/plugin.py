"""The KV store as a launched plugin: what a host starts with ``python -m samples.kv``."""

from __future__ import annotations

import logging

from connectplugin import HandshakeConfig, ServeConfig, serve
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN
from samples.kv.store import KVStore

HANDSHAKE = HandshakeConfig(
    magic_cookie_key="CONNECTPLUGIN_KV",
    magic_cookie_value="8c1f2a4e-kv-sample",
    app_protocol_versions=(1,),
)
PLUGINS = {"kv": KV_PLUGIN}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")  # [LEVEL]: the host keeps the level
    serve(PLUGINS, {"kv": KVStore()}, handshake=HANDSHAKE, config=ServeConfig(self_id="kv-store"))
