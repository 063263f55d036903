"""Plugins in a Django project: add ``"connectplugin.contrib.django"`` to ``INSTALLED_APPS``.

The ``CONNECTPLUGIN`` setting is a dict with the fields of :class:`AppPluginsConfig` in
capitals (``HANDSHAKE``, ``PLUGINS``, ``LAUNCH``, optionally ``HOST`` and ``URL``). Nothing
starts in ``AppConfig.ready()``: a plugin is launched by the first ``dispense()`` in a
process, so ``migrate``, ``check``, ``shell`` and the autoreloader's watcher launch nothing.
With ``URL`` set the project serves the host's endpoints itself, either through
``path("_plugins/", include("connectplugin.contrib.django.urls"))`` or by wrapping the WSGI
application with :func:`wrap`; ``manage.py plugins`` lists, health-checks and calls plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

from django.apps import apps as registry  # not "apps": that is also our submodule's name

from ...host.pluginhost import PluginHost
from ...rpc.client import ClientConfig, Interceptor
from ...runtime.plugin import ClientT, Plugin
from ...runtime.pluginclient import PluginClient
from ..embedded import AppPlugins, WSGIApp

APP_LABEL = "connectplugin"


def plugins() -> AppPlugins:
    """The project's plugins (built from ``settings.CONNECTPLUGIN`` when the app registry loaded)."""
    return registry.get_app_config(APP_LABEL).plugins  # type: ignore[attr-defined,no-any-return]


@overload
def dispense(
    plugin: Plugin[ClientT], *, config: ClientConfig | None = None, interceptors: Sequence[Interceptor] = ()
) -> ClientT: ...


@overload
def dispense(plugin: str, *, config: ClientConfig | None = None, interceptors: Sequence[Interceptor] = ()) -> Any: ...


def dispense(
    plugin: Plugin[Any] | str, *, config: ClientConfig | None = None, interceptors: Sequence[Interceptor] = ()
) -> Any:
    """The typed client of a plugin (by definition, typed, or by name), launched in this
    process on first use; ``config`` and ``interceptors`` as for ``PluginClient.dispense``."""
    return plugins().dispense(plugin, config=config, interceptors=interceptors)


def client(name: str) -> PluginClient:
    return plugins().client(name)


def host() -> PluginHost:
    return plugins().host()


def wrap(application: WSGIApp) -> WSGIApp:
    """The project's WSGI ``application`` with the host's endpoints under ``URL``'s path
    (``application = wrap(get_wsgi_application())`` in ``wsgi.py``); unchanged without ``URL``."""
    return plugins().wsgi(application)
