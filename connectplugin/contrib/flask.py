"""Plugins in a Flask application: ``ConnectPlugin(app)``, settings from ``app.config``.

Settings (``CONNECTPLUGIN_`` + a field of :class:`AppPluginsConfig`): ``HANDSHAKE``,
``PLUGINS``, ``LAUNCH`` (name -> strategy or command), optionally ``HOST`` (a HostConfig)
and ``URL`` (serve the host's endpoints inside the app, under that URL's path). Plugins start
on first use in the process that serves, never at import: not in a reloader's watcher, not
in a gunicorn master that forks its workers after ``--preload``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

from flask import Flask, current_app

from ..host.pluginhost import PluginHost
from ..rpc.client import ClientConfig, Interceptor
from ..runtime.plugin import ClientT, Plugin
from ..runtime.pluginclient import PluginClient
from .embedded import AppPlugins, AppPluginsConfig

EXTENSION = "connectplugin"
"""The key of the application's :class:`AppPlugins` in ``app.extensions``."""


class ConnectPlugin:
    """The Flask extension: ``ConnectPlugin(app)``, or ``ConnectPlugin()`` then ``init_app(app)``.

    Its methods act on the current application's plugins (``current_app``), so one
    extension object serves every app a factory makes.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read ``app.config`` and, with ``CONNECTPLUGIN_URL``, route its path to the host. Starts nothing."""
        plugins = AppPlugins(
            AppPluginsConfig.from_settings(app.config.get_namespace("CONNECTPLUGIN_"))
        )
        app.extensions[EXTENSION] = plugins
        app.wsgi_app = plugins.wsgi(app.wsgi_app)  # type: ignore[method-assign,assignment]

    @staticmethod
    def plugins(app: Flask | None = None) -> AppPlugins:
        """The plugins of ``app`` (by default the current one)."""
        app = app or current_app
        try:
            return app.extensions[EXTENSION]  # type: ignore[no-any-return]
        except KeyError:
            raise RuntimeError(
                f"ConnectPlugin is not initialised on app {app.name!r}: call init_app(app)"
            ) from None

    @overload
    def dispense(
        self, plugin: Plugin[ClientT], *, config: ClientConfig | None = None, interceptors: Sequence[Interceptor] = ()
    ) -> ClientT: ...

    @overload
    def dispense(
        self, plugin: str, *, config: ClientConfig | None = None, interceptors: Sequence[Interceptor] = ()
    ) -> Any: ...

    def dispense(
        self, plugin: Plugin[Any] | str, *, config: ClientConfig | None = None, interceptors: Sequence[Interceptor] = ()
    ) -> Any:
        """The typed client of a plugin (by definition, typed, or by name), launched in this
        process on first use; ``config`` and ``interceptors`` as for ``PluginClient.dispense``."""
        return self.plugins().dispense(plugin, config=config, interceptors=interceptors)

    def client(self, name: str) -> PluginClient:
        return self.plugins().client(name)

    def host(self) -> PluginHost:
        return self.plugins().host()
