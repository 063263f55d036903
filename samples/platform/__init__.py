"""Plugins that share one host: a logger, a cache that logs through it, and a storage + API pair.

Each module runs as a plugin: ``python -m samples.platform.<name>``. The logger and cache
are launched by the host (platform-managed); storage and API join the host on their own
when given ``--host-url`` (self-registering, like containers or sidecars).
"""

from connectplugin import HandshakeConfig

HANDSHAKE = HandshakeConfig(
    magic_cookie_key="CONNECTPLUGIN_PLATFORM",
    magic_cookie_value="5e0b7d2c-platform-sample",
    app_protocol_versions=(1,),
)
