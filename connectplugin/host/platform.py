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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..rpc.errors import ConnectError
from ..runtime.launcher import Strategy
from ..runtime.plugin import Requirement
from ..runtime.pluginclient import PluginClient
from .pluginhost import PluginHost
from .supervisor import RestartPolicy

log = logging.getLogger("connectplugin.platform")


@dataclass(frozen=True)
class PluginSpec:
    """A plugin the platform manages: a name, how to start it, what it offers and needs."""

    name: str
    strategy: Strategy
    provides: Sequence[str] = ()
    requires: Sequence[Requirement] = ()
    restart: RestartPolicy | None = None
    """Supervise it: restarted after a crash (``PluginHost.launch(..., restart=)``); None: not."""


class DependencyError(Exception):
    """A dependency cycle, or startup dependencies nobody provides.

    ``cycle`` lists the plugins around the cycle, the first repeated at the end (empty when
    the error is a missing dependency); ``plugin`` is the plugin that cannot start and
    ``missing`` the requirements of it that no running plugin provides.
    """

    def __init__(
        self, *, cycle: Sequence[str] = (), plugin: str = "", missing: Sequence[Requirement] = (), why: str = ""
    ) -> None:
        self.cycle = list(cycle)
        self.plugin = plugin
        self.missing = list(missing)
        if self.cycle:
            message = f"dependency cycle: {' -> '.join(self.cycle)}"
        else:
            needs = ", ".join(r.service_type + (f" >= {r.min_version}" if r.min_version else "") for r in self.missing)
            message = f"cannot start {plugin}: it requires {needs}, which no running plugin provides"
        super().__init__(message + (f" ({why})" if why else ""))


class Platform:
    """Manages plugins on a :class:`PluginHost`. Safe from any thread.

    Changes to one plugin run one at a time: a change waits on ``_settled`` while another is
    under way for the same name. ``_lock`` guards the specs, clients and busy names; launches
    and stops run with it released.
    """

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # signalled when a change ends
        self._specs: dict[str, PluginSpec] = {}
        self._clients: dict[str, PluginClient] = {}
        self._busy: set[str] = set()  # names with an add or replace under way

    def add(self, *specs: PluginSpec) -> list[str]:
        """Start ``specs`` providers-first; returns the names in the order they started."""
        by_name = {s.name: s for s in specs}
        names = set(by_name)
        with self._settled:
            self._settled.wait_for(lambda: not self._busy & names)
            for spec in specs:
                if spec.name in self._specs:
                    raise ValueError(f"a plugin named {spec.name!r} is already running")
            order = _order({**self._specs, **by_name}, by_name)
            self._busy |= names
        started = []
        try:
            coming: set[str] = set()
            for name in order:  # refuse the whole batch before anything starts
                self._check_startup(by_name[name], coming)
                coming |= set(by_name[name].provides)
            for name in order:
                client = self.host.launch(by_name[name].strategy, name=name, restart=by_name[name].restart)
                with self._lock:
                    self._clients[name] = client
                    self._specs[name] = by_name[name]
                started.append(name)
                log.info("started %s", name)
        finally:
            self._settle(names)
        return started

    def client(self, name: str) -> PluginClient:
        """The instance of ``name`` up now (a supervised plugin's latest after a restart)."""
        with self._lock:
            client = self._clients[name]
        return self.host.current(client)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._specs)

    def impact(self, name: str) -> list[str]:
        """Plugins that would lose a required service if ``name`` went away, transitively."""
        with self._lock:
            specs = dict(self._specs)
        return _impact(specs, name)

    def remove(self, name: str) -> list[str]:
        """Stop ``name``; returns the plugins now missing a dependency (see ``impact``)."""
        with self._settled:
            self._settled.wait_for(lambda: name not in self._busy)
            affected = _impact(self._specs, name)
            client = self._clients.pop(name)
            del self._specs[name]
        self.host.stop(self.host.current(client))
        if affected:
            log.warning("removed %s; now missing a dependency: %s", name, ", ".join(affected))
        return affected

    def replace(self, name: str, strategy: Strategy) -> PluginClient:
        """Blue-green: start the new instance, let it register, then drain and stop the old one.

        Calls addressed to the old instance's endpoint are routed to the new one from the
        moment it is registered, so callers see no failed call.
        """
        with self._settled:
            self._settled.wait_for(lambda: name not in self._busy)
            old_spec = self._specs[name]
            old = self._clients[name]
            self._busy.add(name)
        try:
            new = self.host.launch(strategy, name=name, restart=old_spec.restart)
            old = self.host.current(old)
            self.host.redirect(old, new)
            with self._lock:
                self._clients[name] = new
                self._specs[name] = PluginSpec(name, strategy, old_spec.provides, old_spec.requires, old_spec.restart)
        finally:
            self._settle({name})
        old_id, new_id = self.host.runtime_id(old), self.host.runtime_id(new)
        self.host.stop(old)
        log.info("replaced %s: %s -> %s", name, old_id, new_id)
        return new

    def close(self) -> None:
        """Stop every plugin, dependents before their providers."""
        with self._settled:
            self._settled.wait_for(lambda: not self._busy)
            order = _order(self._specs, self._specs)
            clients = [self._clients.pop(n) for n in reversed(order)]
            self._specs.clear()
        for client in clients:
            self.host.stop(self.host.current(client))

    def _settle(self, names: Iterable[str]) -> None:
        with self._settled:
            self._busy -= set(names)
            self._settled.notify_all()

    def _check_startup(self, spec: PluginSpec, coming: set[str]) -> None:
        """Each startup dependency must be registered now or provided earlier in this batch."""
        missing, why = [], []
        for req in spec.requires:
            if not req.required_for_startup or req.service_type in coming:
                continue
            try:
                self.host.discover(req.service_type, req.min_version)
            except ConnectError as e:
                missing.append(req)
                why.append(e.message)
        if missing:
            raise DependencyError(plugin=spec.name, missing=missing, why="; ".join(why))


# --- dependency logic (pure functions of the specs) ---------------------------------------------


def _order(specs: Mapping[str, PluginSpec], names: Iterable[str]) -> list[str]:
    """``names`` in start order, providers first; raises DependencyError on a cycle."""
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
        raise DependencyError(cycle=e.args[1]) from None
    wanted = set(names)
    return [n for n in order if n in wanted]


def _impact(specs: Mapping[str, PluginSpec], name: str) -> list[str]:
    lost = set(specs[name].provides) if name in specs else set()
    affected: list[str] = []
    changed = True
    while changed:
        changed = False
        for other in specs.values():
            if other.name == name or other.name in affected:
                continue
            if any(r.service_type in lost and not _other_provider(specs, r, {name, *affected}) for r in other.requires):
                affected.append(other.name)
                lost |= set(other.provides)
                changed = True
    return affected


def _other_provider(specs: Mapping[str, PluginSpec], req: Requirement, excluded: set[str]) -> bool:
    return any(req.service_type in s.provides and s.name not in excluded for s in specs.values())
