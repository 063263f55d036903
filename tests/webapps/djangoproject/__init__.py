"""A small Django project using the sample KV plugin through ``connectplugin.contrib.django``.

``urls.py`` includes the host's endpoints under ``/_plugins/``; with ``WEBAPP_MOUNT=wsgi``
the WSGI application is wrapped instead. ``WEBAPP_HOST_URL`` set, plugins call the host
there; unset, the host also listens on a port of its own.
"""
