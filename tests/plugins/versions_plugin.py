"""A KV plugin that speaks app protocol versions 2 and 3 only."""

import dataclasses

from instrumented import HANDSHAKE, PLUGINS, InstrumentedStore

from connectplugin import Health, serve

VERSIONS = (2, 3)

if __name__ == "__main__":
    health = Health()
    handshake = dataclasses.replace(HANDSHAKE, app_protocol_versions=VERSIONS)
    serve(PLUGINS, {"kv": InstrumentedStore(health)}, handshake=handshake, health=health)
