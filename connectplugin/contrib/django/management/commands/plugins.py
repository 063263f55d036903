"""``manage.py plugins``: list the project's plugins, check their health, call one.

``health`` and ``call`` launch the plugins in this command's process (on a loopback port,
whatever ``URL`` says: no web server runs here) and stop them before returning.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from google.protobuf import json_format

from .....rpc.errors import ConnectError
from .....runtime.health import ServingStatus
from .....runtime.launcher import LaunchError, ProcessStrategy
from ....embedded import AppPlugins
from ... import plugins as project_plugins


class Command(BaseCommand):
    help = "List the project's plugins, check their health, or call one (JSON in, JSON out)."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        actions.add_parser("list", help="the plugins the project defines and how each is launched")
        health = actions.add_parser("health", help="launch plugins and report their health")
        health.add_argument(
            "names", nargs="*", help="plugins to check (default: every launchable one)"
        )
        call = actions.add_parser("call", help="launch a plugin and call one of its methods")
        call.add_argument("name", help="the plugin, e.g. kv")
        call.add_argument("method", help="the method's proto name, e.g. Get")
        call.add_argument("json", nargs="?", default="{}", help="the request as proto3 JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        configured = project_plugins()
        if options["action"] == "list":
            self._list(configured)
            return
        # This process serves no requests: the host listens on a port of its own.
        local = AppPlugins(dataclasses.replace(configured.config, url=""))
        try:
            if options["action"] == "health":
                self._health(local, options["names"] or sorted(local.config.launch))
            else:
                self._call(local, options["name"], options["method"], options["json"])
        except (ConnectError, LaunchError, KeyError) as e:
            raise CommandError(str(e)) from e
        finally:
            local.close()

    def _list(self, plugins: AppPlugins) -> None:
        config = plugins.config
        for name, plugin in sorted(config.plugins.items()):
            strategy = config.launch.get(name)
            if strategy is None:
                how = "(not launched by this project)"
            elif isinstance(strategy, ProcessStrategy):
                how = " ".join(strategy.command)
            else:
                how = type(strategy).__name__
            self.stdout.write(f"{name}\t{plugin.service.name}\t{how}")

    def _health(self, plugins: AppPlugins, names: list[str]) -> None:
        failing = []
        for name in names:
            client = plugins.client(name)
            status = client.check_health()
            report = client.get_health()
            reason = f" ({report.reason})" if report.reason else ""
            self.stdout.write(f"{name}\t{status.name}\t{report.state.name}{reason}")
            if status is not ServingStatus.SERVING:
                failing.append(name)
        if failing:
            raise CommandError(f"not serving: {', '.join(failing)}")

    def _call(self, plugins: AppPlugins, name: str, method_name: str, text: str) -> None:
        plugin = plugins.config.plugins.get(name)
        if plugin is None:
            raise CommandError(
                f"no plugin {name!r}; defined: {', '.join(sorted(plugins.config.plugins))}"
            )
        method = plugin.service.methods.get(method_name)
        if method is None:
            raise CommandError(
                f"{plugin.service.name} has no method {method_name!r}; it has {', '.join(sorted(plugin.service.methods))}"
            )
        try:
            request = json_format.Parse(text, method.input())
        except json_format.ParseError as e:
            raise CommandError(
                f"the request is not a {method.input.DESCRIPTOR.full_name} in JSON: {e}"
            ) from e
        answer = getattr(plugins.dispense(name), method.attr)(request)
        for message in answer if method.server_streaming else [answer]:
            self.stdout.write(json_format.MessageToJson(message, indent=None))
