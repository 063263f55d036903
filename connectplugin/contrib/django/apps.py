"""The Django app: reads ``settings.CONNECTPLUGIN`` when the project loads; launches nothing."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ..embedded import AppPlugins, AppPluginsConfig


class ConnectPluginConfig(AppConfig):
    name = "connectplugin.contrib.django"
    label = "connectplugin"
    verbose_name = "connectplugin"

    plugins: AppPlugins

    def ready(self) -> None:
        # Runs for every manage.py command and in the autoreloader's watcher: build, never start.
        try:
            config = AppPluginsConfig.from_settings(getattr(settings, "CONNECTPLUGIN", {}))
        except (ValueError, TypeError, ImportError) as e:
            raise ImproperlyConfigured(f"settings.CONNECTPLUGIN: {e}") from e
        self.plugins = AppPlugins(config)
