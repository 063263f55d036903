"""The instrumented KV store served as a plugin with ``serve()``, as a real plugin would be."""

from instrumented import HANDSHAKE, PLUGINS, InstrumentedStore

from connectplugin import Health, ServeConfig, serve

if __name__ == "__main__":
    health = Health()
    serve(
        PLUGINS,
        {"kv": InstrumentedStore(health)},
        handshake=HANDSHAKE,
        config=ServeConfig(self_id="test-kv", self_version="9.9.9", grace_period=2.0),
        health=health,
    )
