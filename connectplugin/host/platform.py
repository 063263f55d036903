"""The platform manager: plugins added, removed and replaced at runtime, in dependency order.

Each :class:`PluginSpec` says what a plugin provides and requires. ``add`` starts plugins
providers-first (``graphlib``), refusing cycles and missing startup dependencies before
anything starts; ``impact`` says who depends on a plugin; ``replace`` is blue-green: the
new instance registers before the old one stops taking calls.
"""

from __future__ import annotations

import graphlib
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..runtime.launcher import Strategy
from ..runtime.plugin import Requirement
from ..runtime.pluginclient import PluginClient
from .pluginhost import PluginHost

log = logging.getLogger("connectplugin.platform")


@dataclass(frozen=True)
class PluginSpec:
    """A plugin the platform manages: a name, how to start it, what it offers and needs."""

    name: str
    strategy: Strategy
    provides: Sequence[str] = ()
    requires: Sequence[Requirement] = ()


class DependencyError(Exception):
    """A cycle, or a startup dependency nobody provides."""


class Platform:
    """Manages plugins on a :class:`PluginHost`. Safe from any thread; changes run one at a time."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self._lock = threading.RLock()
        self._specs: dict[str, PluginSpec] = {}
        self._clients: dict[str, PluginClient] = {}

    def add(self, *specs: PluginSpec) -> list[str]:
        """Start ``specs`` providers-first; returns the names in the order they started."""
        with self._lock:
            for spec in specs:
                if spec.name in self._specs:
                    raise ValueError(f"a plugin named {spec.name!r} is already running")
            order = self._order({**self._specs, **{s.name: s for s in specs}}, {s.name for s in specs})
            by_name = {s.name: s for s in specs}
            coming: set[str] = set()
            for name in order:  # refuse the whole batch before anything starts
                self._check_startup(by_name[name], coming)
                coming |= set(by_name[name].provides)
            started = []
            for name in order:
                spec = by_name[name]
                self._clients[name] = self.host.launch(spec.strategy, name=name)
                self._specs[name] = spec
                started.append(name)
                log.info("started %s", name)
            return started

    def client(self, name: str) -> PluginClient:
        with self._lock:
            return self._clients[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._specs)

    def impact(self, name: str) -> list[str]:
        """Plugins that would lose a required service if ``name`` went away, transitively."""
        with self._lock:
            specs = dict(self._specs)
        lost = set(specs[name].provides) if name in specs else set()
        affected: list[str] = []
        changed = True
        while changed:
            changed = False
            for other in specs.values():
                if other.name == name or other.name in affected:
                    continue
                if any(r.service_type in lost and not self._other_provider(specs, r, {name, *affected}) for r in other.requires):
                    affected.append(other.name)
                    lost |= set(other.provides)
                    changed = True
        return affected

    def remove(self, name: str) -> list[str]:
        """Stop ``name``; returns the plugins now missing a dependency (see ``impact``)."""
        with self._lock:
            affected = self.impact(name)
            client = self._clients.pop(name)
            del self._specs[name]
        self.host.stop(client)
        if affected:
            log.warning("removed %s; now missing a dependency: %s", name, ", ".join(affected))
        return affected

    def replace(self, name: str, strategy: Strategy) -> PluginClient:
        """Blue-green: start the new instance, let it register, then drain and stop the old one.

        Calls addressed to the old instance's endpoint are routed to the new one from the
        moment it is registered, so callers see no failed call.
        """
        with self._lock:
            old_spec = self._specs[name]
            old = self._clients[name]
            new = self.host.launch(strategy, name=name)
            old_id, new_id = self.host.runtime_id(old), self.host.runtime_id(new)
            self.host.router.alias(old_id, new_id)
            self._clients[name] = new
            self._specs[name] = PluginSpec(name, strategy, old_spec.provides, old_spec.requires)
        self.host.stop(old)
        log.info("replaced %s: %s -> %s", name, old_id, new_id)
        return new

    def close(self) -> None:
        """Stop every plugin, dependents before their providers."""
        with self._lock:
            order = self._order(self._specs, set(self._specs))
            clients = [self._clients.pop(n) for n in reversed(order)]
            self._specs.clear()
        for client in clients:
            self.host.stop(client)

    # --- dependency logic ---------------------------------------------------------------------

    def _order(self, specs: dict[str, PluginSpec], names: Iterable[str]) -> list[str]:
        providers: dict[str, list[str]] = {}
        for spec in specs.values():
            for service_type in spec.provides:
                providers.setdefault(service_type, []).append(spec.name)
        graph = {
            spec.name: {p for r in spec.requires for p in providers.get(r.service_type, ()) if p != spec.name}
            for spec in specs.values()
        }
        try:
            order = list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as e:
            cycle = e.args[1]
            raise DependencyError(f"dependency cycle: {' -> '.join(cycle)}") from None
        wanted = set(names)
        return [n for n in order if n in wanted]

    def _check_startup(self, spec: PluginSpec, coming: set[str]) -> None:
        """Each startup dependency must be registered now or provided earlier in this batch."""
        for req in spec.requires:
            if not req.required_for_startup or req.service_type in coming:
                continue
            try:
                self.host.registry.discover(req.service_type, req.min_version)
            except Exception as e:
                raise DependencyError(
                    f"cannot start {spec.name}: it requires {req.service_type}"
                    + (f" >= {req.min_version}" if req.min_version else "")
                    + f", which no running plugin provides ({e})"
                ) from None

    @staticmethod
    def _other_provider(specs: dict[str, PluginSpec], req: Requirement, excluded: set[str]) -> bool:
        return any(req.service_type in s.provides and s.name not in excluded for s in specs.values())
