"""Integrations with web frameworks: ``connectplugin.contrib.flask`` and ``connectplugin.contrib.django``.

Both rest on :class:`AppPlugins`: one host per serving process, plugins launched on first
use in the process that serves, stopped when it exits, never touched by a fork or a reloader
that does not serve.
"""

from .embedded import EMBEDDED_HOST, AppPlugins, AppPluginsConfig

__all__ = ["EMBEDDED_HOST", "AppPlugins", "AppPluginsConfig"]
