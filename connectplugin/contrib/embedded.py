"""The plugins of a web application: one host per serving process, plugins launched on first use.

A web server may import the application in a process that never serves (a reloader's
watcher, a ``manage.py migrate``) and may fork after importing it (gunicorn ``--preload``).
So nothing starts at import: the first ``dispense()`` in a process starts that process's
host and launches the plugin there; a fork gets a fresh host of its own on first use, and
the host's atexit hook stops the plugins of the process that launched them.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload
from urllib.parse import urlsplit

from werkzeug.utils import import_string

from ..host.pluginhost import HostConfig, PluginHost
from ..rpc.client import ClientConfig, Interceptor
from ..rpc.httpserver import HTTPConfig
from ..runtime.handshake import HandshakeConfig
from ..runtime.launcher import ProcessStrategy, Strategy
from ..runtime.plugin import ClientT, Plugin
from ..runtime.pluginclient import PluginClient

EMBEDDED_HOST = HostConfig(http=HTTPConfig(threads=4, max_streams=4))
"""The host of an application that names none: a small pool on a loopback port (8 threads
with its streams), since each serving process of the application runs one, accepting only
the plugins it launched (a mounted host answers on the application's public port)."""

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class AppPluginsConfig:
    """What an application's plugins are and how to start them.

    Built from framework settings by :meth:`from_settings`; every value there may also be
    an import string (``"myapp.plugins:HANDSHAKE"``).
    """

    handshake: HandshakeConfig
    plugins: Mapping[str, Plugin]
    """The plugin definitions, by name (``{"kv": KV_PLUGIN}``)."""
    launch: Mapping[str, Strategy] = field(default_factory=dict)
    """How to start each plugin, by name: ``dispense(name)`` launches ``launch[name]``."""
    host: HostConfig = EMBEDDED_HOST
    url: str = ""
    """Empty: the host listens on a port of its own (``host.http``), one per serving process.
    Set: the application serves the host's endpoints itself, and this is where plugins reach
    them (``http://127.0.0.1:8000/_plugins``; its path is the prefix). Only for a server
    with one serving process: a plugin's calls to its host must reach the process that
    launched it."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.launch) - set(self.plugins))
        if unknown:
            raise ValueError(f"launch names plugins that are not defined: {', '.join(unknown)}")
        if self.url and not (self.url.startswith(("http://", "https://")) and self.mount_path):
            raise ValueError(
                f"the host's url must be an absolute http(s) URL with a path, not {self.url!r}"
            )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> AppPluginsConfig:
        """From framework settings: keys ``handshake``, ``plugins``, ``launch``, ``host``, ``url``
        (any case). A launch value may be a :class:`Strategy` or a command (a list of strings)."""
        given = {
            key.lower(): value if key.lower() == "url" else _resolve(value)
            for key, value in settings.items()
        }
        unknown = sorted(set(given) - {"handshake", "plugins", "launch", "host", "url"})
        if unknown:
            raise ValueError(f"unknown connectplugin settings: {', '.join(unknown)}")
        missing = [key for key in ("handshake", "plugins") if not given.get(key)]
        if missing:
            raise ValueError(f"connectplugin settings need {' and '.join(missing)}")
        launch = {
            name: _strategy(_resolve(how)) for name, how in (given.get("launch") or {}).items()
        }
        return cls(
            handshake=given["handshake"],
            plugins={name: _resolve(p) for name, p in given["plugins"].items()},
            launch=launch,
            host=given.get("host") or EMBEDDED_HOST,
            url=(given.get("url") or "").rstrip("/"),
        )

    @property
    def mount_path(self) -> str:
        """The path under which the application serves the host's endpoints; "" when it does not."""
        return urlsplit(self.url).path.rstrip("/") if self.url else ""


def _resolve(value: Any) -> Any:
    return import_string(value) if isinstance(value, str) and ":" in value else value


def _strategy(how: Strategy | Sequence[str]) -> Strategy:
    if hasattr(how, "start"):
        return how  # type: ignore[return-value]
    if (
        isinstance(how, Sequence)
        and not isinstance(how, str)
        and all(isinstance(a, str) for a in how)
    ):
        return ProcessStrategy(list(how))
    raise TypeError(
        f"a plugin's launch setting must be a Strategy or a command (list of strings), not {how!r}"
    )


class AppPlugins:
    """An application's plugins in the current process; safe from any thread.

    Constructing one starts nothing. ``dispense(name)`` (or ``client(name)``) starts this
    process's host and launches the plugin on first use; callers racing on a first use
    wait for the one launch. In a forked child the first use starts a new host and new
    plugins; the parent's are left to the parent. ``_lock`` guards ``_host``, ``_clients``
    and ``_launching``; ``_launched`` is notified when a launch ends.
    """

    def __init__(self, config: AppPluginsConfig) -> None:
        self.config = config
        self._forget()
        self._fork_hook = False

    def _forget(self) -> None:
        """Drop every per-process thing: at construction, and in a forked child."""
        # New locks too: another thread of the parent may have held the old ones at the fork.
        self._lock = threading.Lock()
        self._launched = threading.Condition(self._lock)
        self._host: PluginHost | None = None
        self._clients: dict[str, PluginClient] = {}
        self._launching: set[str] = set()

    def _current_host(self) -> PluginHost:
        """This process's host, constructed (not started) if it has none yet."""
        with self._lock:
            hook, self._fork_hook = not self._fork_hook, True
            if self._host is None:
                self._host = PluginHost(
                    self.config.handshake, self.config.plugins, self.config.host
                )
            host = self._host
        if hook:  # registered on first use, not at construction; holds no reference to self
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget_in_child(ref))
        return host

    def host(self) -> PluginHost:
        """This process's host, started (or mounted at ``config.url``) on first use."""
        host = self._current_host()
        return host.mount(self.config.url) if self.config.url else host.start()

    def client(self, name: str) -> PluginClient:
        """The client of plugin ``name`` in this process, launched on first use."""
        strategy = self.config.launch.get(name)
        if strategy is None:
            raise KeyError(
                f"no launch setting for plugin {name!r}; launchable: {', '.join(sorted(self.config.launch))}"
            )
        host = self.host()
        with self._launched:
            while name in self._launching:
                self._launched.wait()
            client = self._clients.get(name)
            if client is not None:
                return client
            self._launching.add(name)
        launched: PluginClient | None = None
        try:
            launched = host.launch(strategy, name)
        finally:
            with self._launched:
                self._launching.discard(name)
                if launched is not None:
                    self._clients[name] = launched
                self._launched.notify_all()
        return launched

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
        """The typed client of a plugin (its generated ``<Service>Client``), launched on first
        use; by definition (``KV_PLUGIN``, typed) or name, ``config`` and ``interceptors`` as
        for ``PluginClient.dispense``."""
        name = plugin if isinstance(plugin, str) else plugin.name
        return self.client(name).dispense(plugin, config=config, interceptors=interceptors)

    def launched(self) -> dict[str, PluginClient]:
        """The plugins this process has launched, by name."""
        with self._lock:
            return dict(self._clients)

    def wsgi(self, app: WSGIApp) -> WSGIApp:
        """``app`` with the host's endpoints served under ``config.url``'s path (when set)."""
        return _Mounted(self, app) if self.config.url else app

    def close(self) -> None:
        """Stop this process's plugins and host (the atexit hook does it otherwise)."""
        with self._lock:
            host, self._host, self._clients = self._host, None, {}
        if host is not None:
            host.close()


def _forget_in_child(ref: weakref.ref[AppPlugins]) -> None:
    plugins = ref()
    if plugins is not None:
        plugins._forget()


class _Mounted:
    """A WSGI app that passes requests under the mount path to the current process's host."""

    def __init__(self, plugins: AppPlugins, app: WSGIApp) -> None:
        self._plugins = plugins
        self._app = app
        self._prefix = plugins.config.mount_path

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        prefix = self._prefix
        if path != prefix and not path.startswith(prefix + "/"):
            return self._app(environ, start_response)
        environ = {
            **environ,
            "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + prefix,
            "PATH_INFO": path[len(prefix) :],
        }
        return self._plugins.host().app(environ, start_response)
