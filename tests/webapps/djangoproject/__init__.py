"""A small Django project using the sample KV plugin through ``connectplugin.contrib.django``.

``WEBAPP_MOUNT``: ``urls`` serves the host's endpoints through ``include()``, ``wsgi`` by
wrapping the WSGI application, at ``WEBAPP_HOST_URL``; unset, the host has its own port.
"""
