"""The plugin runtime: definitions, handshake, health, serving, launching, the host link.

Built on :mod:`connectplugin.rpc`; it knows nothing of the host platform's registry,
router or broker beyond the services a plugin calls on its host.
"""
