"""A host described by a TOML file, as ``connectplugin host CONFIG`` runs it.

Each table holds the fields of the config dataclass it names (``[host]`` a ``HostConfig``,
``[host.http]`` an ``HTTPConfig``, each ``[plugins.NAME]`` a ``ProcessStrategy`` plus its
``restart`` policy), so the file says what the Python API says, field for field,
and an unknown key is an error naming the known ones. README "Running a host from a file".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..host.admission import CertificateIdentity, JoinToken, OperatorToken
from ..host.metrics import MetricsConfig
from ..host.pluginhost import HostConfig, PluginHost
from ..host.supervisor import RestartPolicy
from ..rpc.httpserver import HTTPConfig
from ..rpc.tls import (
    KeyPair,
    RevocationList,
    TLSConfig,
    Trust,
    fingerprint,
    load_certificates,
    parse_fingerprint,
)
from ..runtime.handshake import HandshakeConfig
from ..runtime.launcher import ProcessStrategy

if TYPE_CHECKING:
    from cryptography import x509

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

log = logging.getLogger("connectplugin.cli")

SIGNAL_CHECK_INTERVAL = 0.5
"""Seconds the serving main thread waits at a time. CPython runs signal handlers on the main
thread only, and a signal the kernel hands to another thread does not interrupt a lock wait
there: without a timeout, a SIGTERM could go unnoticed until the next one."""


class HostFileError(Exception):
    """The file cannot describe a host as written; ``where`` is the table or key at fault."""

    def __init__(self, path: Path, where: str, problem: str) -> None:
        super().__init__(f"{path}: {where}: {problem}" if where else f"{path}: {problem}")
        self.path = path
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class LaunchEntry:
    """One ``[plugins.NAME]`` table: what to launch and how to keep it running."""

    name: str
    strategy: ProcessStrategy
    restart: RestartPolicy | None


@dataclass(frozen=True)
class HostFile:
    """A host file, read and checked; nothing started."""

    path: Path
    handshake: HandshakeConfig
    host: HostConfig
    plugins: tuple[LaunchEntry, ...]
    revoked: Path | None = None
    """``[host.http.tls] revoked``: the file of revoked client certificates, read again on SIGHUP."""


# Sequences of tables, by field name: the element type each table builds.
_ELEMENTS: dict[str, type] = {
    "join_tokens": JoinToken,
    "operator_tokens": OperatorToken,
    "certificate_identities": CertificateIdentity,
}
# Optional parts (None by default), by field name: the type a table of them builds.
_OPTIONAL: dict[str, type] = {"metrics": MetricsConfig}
# Fields a file cannot set: what the command decides, or what is no value (clocks, callables).
_NOT_IN_FILES = {"handle_signals"}


def load(path: Path) -> HostFile:
    """Read and check ``path``; relative paths in it (TLS files, a plugin's ``cwd``) start at
    its directory."""
    path = Path(path)
    if tomllib is None:
        raise HostFileError(path, "", "reading TOML needs Python 3.11 or later")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise HostFileError(path, "", e.strerror or str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise HostFileError(path, "", f"not TOML: {e}") from None
    return _Reader(path).host_file(data)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.revoked: Path | None = None

    def error(self, where: str, problem: str) -> HostFileError:
        return HostFileError(self.path, where, problem)

    def host_file(self, data: dict[str, Any]) -> HostFile:
        self.known(data, "", {"handshake", "host", "plugins"})
        handshake = self.build(HandshakeConfig, data.get("handshake", {}), "handshake")
        host = self.build(HostConfig, data.get("host", {}), "host")
        plugins = self.table(data.get("plugins", {}), "plugins")
        return HostFile(
            self.path, handshake, host, tuple(self.launch(name, table) for name, table in plugins.items()), self.revoked
        )

    def launch(self, name: str, table: Any) -> LaunchEntry:
        where = f"plugins.{name}"
        table = dict(self.table(table, where))
        restart_value = table.pop("restart", False)
        restart: RestartPolicy | None
        if restart_value is True:
            restart = RestartPolicy()
        elif restart_value is False:
            restart = None
        else:
            restart = self.build(RestartPolicy, restart_value, f"{where}.restart")
        table.setdefault("cwd", ".")
        strategy = self.build(ProcessStrategy, table, where)
        return LaunchEntry(name, strategy, restart)

    # -- tables to dataclasses ------------------------------------------------------------------

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, "must be a table")
        return value

    def known(self, table: Mapping[str, Any], where: str, keys: set[str]) -> None:
        unknown = sorted(set(table) - keys)
        if unknown:
            at = f"[{where}]" if where else "the top level"
            raise self.error(at, f"unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")

    def build(self, cls: type, value: Any, where: str) -> Any:
        table = dict(self.table(value, where))
        if "secret_env" in table and any(f.name == "secret" for f in dataclasses.fields(cls)):
            table["secret"] = self.secret(table.pop("secret_env"), f"{where}.secret_env")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _NOT_IN_FILES}
        self.known(table, where, set(fields))
        missing = [name for name, f in fields.items() if _default(f) is dataclasses.MISSING and name not in table]
        if missing:
            raise self.error(f"[{where}]", f"missing: {', '.join(missing)}")
        values: dict[str, Any] = {}
        for key, item in table.items():
            if cls is HTTPConfig and key == "tls":
                values[key] = self.tls(item, f"{where}.tls")
            elif key == "cwd":
                values[key] = str(self.base / self.scalar(item, str, f"{where}.cwd"))
            else:
                values[key] = self.value(fields[key], item, f"{where}.{key}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise self.error(f"[{where}]", str(e)) from None

    def value(self, field: dataclasses.Field[Any], value: Any, where: str) -> Any:
        default = _default(field)
        if field.name in _ELEMENTS:
            if not isinstance(value, list):
                raise self.error(where, "must be an array of tables")
            return tuple(self.build(_ELEMENTS[field.name], item, f"{where}[{n}]") for n, item in enumerate(value))
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            return self.build(type(default), value, where)
        if field.name in _OPTIONAL:
            return self.build(_OPTIONAL[field.name], value, where)
        if isinstance(default, tuple) or field.type in ("Sequence[str]", "Sequence[int]"):
            if not isinstance(value, list):
                raise self.error(where, "must be an array")
            return tuple(value)
        if isinstance(default, dict):
            table = self.table(value, where)
            return {str(k): self.scalar(v, str, f"{where}.{k}") for k, v in table.items()}
        kind = _SCALARS.get(field.type.split(" |")[0]) if isinstance(field.type, str) else None
        if kind is None:
            raise self.error(where, "cannot be set from a file")
        return self.scalar(value, kind, where)

    def scalar(self, value: Any, kind: type, where: str) -> Any:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise self.error(where, f"must be a {kind.__name__}, not {value!r}")
        return value

    def secret(self, name: Any, where: str) -> str:
        name = self.scalar(name, str, where)
        secret = os.environ.get(name)
        if not secret:
            raise self.error(where, f"the environment variable {name} is not set")
        return secret

    def tls(self, value: Any, where: str) -> TLSConfig:
        """``{cert, key, client_ca, revoked}``: serve TLS with this pair; with ``client_ca``
        require a client certificate issued by it (mTLS), and none that ``revoked`` lists."""
        table = self.table(value, where)
        self.known(table, where, {"cert", "key", "client_ca", "revoked"})
        if "cert" not in table or "key" not in table:
            raise self.error(f"[{where}]", "missing: cert and key (PEM files)")
        if "revoked" in table and "client_ca" not in table:
            raise self.error(f"[{where}]", "revoked needs client_ca: without client certificates nothing is revoked")
        files = {k: self.base / self.scalar(v, str, f"{where}.{k}") for k, v in table.items()}
        try:
            pair = KeyPair.from_files(files["cert"], files["key"])
            trust = Trust.from_files(cas=files["client_ca"]) if "client_ca" in files else None
        except (OSError, ValueError) as e:
            raise self.error(f"[{where}]", f"cannot load: {e}") from None
        if trust is not None and "revoked" in files:
            self.revoked = files["revoked"]
            try:
                revoked = read_revoked(self.revoked)
            except FileNotFoundError as e:
                raise self.error(f"{where}.revoked", f"cannot load: {e} (an empty file revokes nothing)") from None
            except (OSError, ValueError) as e:
                raise self.error(f"{where}.revoked", f"cannot load: {e}") from None
            trust = dataclasses.replace(trust, revoked=RevocationList(c or p for p, c in revoked.items()))
        return TLSConfig(key_pair=pair, trust=trust)


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)


def read_revoked(path: Path) -> dict[str, x509.Certificate | None]:
    """The revoked certificates a ``revoked`` file lists, by SHA-256 fingerprint: PEM
    certificates, and fingerprints one a line (hex, colons allowed, as ``openssl x509
    -fingerprint -sha256`` prints them, with or without its ``sha256 Fingerprint=``); ``#``
    starts a comment. The certificate itself where given (its holder is then told
    "certificate revoked"), None where only its fingerprint is. ValueError naming the line
    that is neither."""
    data = path.read_bytes()
    revoked: dict[str, x509.Certificate | None] = {}
    for block in _PEM_CERTIFICATE.findall(data):
        [certificate] = load_certificates(block)
        revoked[fingerprint(certificate)] = certificate
    rest = _PEM_CERTIFICATE.sub(lambda m: b"\n" * m.group().count(b"\n"), data)
    for number, line in enumerate(rest.decode("utf-8", "replace").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            print_ = parse_fingerprint(text)
        except ValueError:
            raise ValueError(f"line {number} is neither a PEM certificate nor a SHA-256 fingerprint: {text[:80]!r}") from None
        revoked.setdefault(print_, None)
    return revoked


_SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def run(host_file: HostFile, out: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """Start the host, launch the plugins in file order, say so on ``out``, and serve until
    SIGTERM or SIGINT (or ``stop``); then stop the plugins and the host. On SIGHUP the
    ``revoked`` file is read again (see :class:`_Reloader`)."""
    config = dataclasses.replace(host_file.host, handle_signals=True)
    # No plugin definitions: this host dispenses no clients; plugins register what they provide.
    with PluginHost(host_file.handshake, {}, config) as host, _reloading_on_sighup(_Reloader(host_file, host, out)):
        out(f"host listening on {host.url}")
        for entry in host_file.plugins:
            client = host.launch(entry.strategy, entry.name, restart=entry.restart)
            supervised = " (restarted when it crashes)" if entry.restart else ""
            pid = getattr(client.running, "pid", None)
            out(f"plugin {entry.name} launched at {client.url} (pid {pid}){supervised}")
        stopping = stop or threading.Event()
        while not stopping.wait(SIGNAL_CHECK_INTERVAL):
            pass


class _Reloader:
    """What SIGHUP does to a running host: read its ``revoked`` file again and apply the
    difference. A certificate newly listed is revoked (``PluginHost.revoke_certificate``:
    its identities lose their registrations, its connections their calls, new handshakes
    fail); one no longer listed is accepted again. A file that cannot be read changes
    nothing (the error is logged). Runs on one thread only."""

    def __init__(self, host_file: HostFile, host: PluginHost, out: Callable[[str], None]) -> None:
        self._path = host_file.revoked
        self._host = host
        self._out = out
        known = {fingerprint(c): c for c in host.revoked.certificates()[1]}
        self._listed: dict[str, x509.Certificate | None] = {p: known.get(p) for p in host.revoked}

    def reload(self) -> None:
        if self._path is None:
            log.warning("SIGHUP: nothing to read again ([host.http.tls] has no revoked file)")
            return
        try:
            listed = read_revoked(self._path)
        except (OSError, ValueError) as e:
            log.error("SIGHUP: %s not read again, the %d revocations read before stay: %s", self._path, len(self._listed), e)
            return
        removed = [p for p in self._listed if p not in listed]
        added = [c or p for p, c in listed.items() if p not in self._listed or (c and not self._listed[p])]
        self._listed = listed
        if removed:
            self._host.revoked.discard(*removed)
        if added:
            self._host.revoke_certificate(*added)
        self._out(f"revoked certificates read again from {self._path}: {len(listed)} ({len(added)} new, {len(removed)} no longer)")


@contextlib.contextmanager
def _reloading_on_sighup(reloader: _Reloader) -> Iterator[None]:
    """While inside, SIGHUP makes ``reloader.reload()`` run on a thread of its own: the
    handler only writes a byte to a pipe (the interrupted main thread may hold any lock).
    Only on the main thread (elsewhere signals cannot be handled); the previous handler is
    put back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    woken, wake = os.pipe()  # read end, write end
    os.set_blocking(wake, False)

    def on_sighup(signum: int, frame: Any) -> None:
        with contextlib.suppress(BlockingIOError):  # a reload is pending already
            os.write(wake, b"\0")

    def reload_when_woken() -> None:
        while os.read(woken, 64):
            try:
                reloader.reload()
            except Exception:  # one failed reload must not end the next ones (an unread file does not come here)
                log.exception("SIGHUP: reading the revoked file again failed; the next SIGHUP tries again")

    thread = threading.Thread(target=reload_when_woken, name="connectplugin-sighup", daemon=True)
    thread.start()
    previous = signal.signal(signal.SIGHUP, on_sighup)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)
        os.close(wake)  # the thread reads the end of the pipe and leaves
        thread.join()
        os.close(woken)
