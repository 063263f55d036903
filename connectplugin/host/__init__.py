"""The host platform: plugin host, identities, registry, router, capability broker, platform.

Built on :mod:`connectplugin.runtime` and :mod:`connectplugin.rpc`.
"""
