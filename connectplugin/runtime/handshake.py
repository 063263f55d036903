"""The handshake: magic cookie, core protocol version 1, and app protocol version negotiation.

Both sides may support several app protocol versions; they agree on the highest one in
common. The request's single ``app_protocol_version`` field carries the caller's highest
version (what a Go peer compares exactly); the full list travels in the metadata maps under
``app-protocol-versions`` so two connectplugin peers can negotiate. A Go peer speaks one
version and refuses any other by name (``version mismatch: client=C, server=S``): a caller
then asks once more for S when S is one of its own (:func:`exchange`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..gen.connectplugin.v1 import handshake_pb2
from ..gen.connectplugin.v1.handshake_connect import HandshakeServiceHandler
from ..rpc.errors import Code, ConnectError
from ..rpc.server import Context
from .plugin import Plugin

CORE_PROTOCOL_VERSION = 1
VERSIONS_KEY = "app-protocol-versions"
JOIN_TOKEN_KEY = "join-token"
"""``client_metadata`` key: the join token a self-registering plugin presents to its host."""
BASE_URL_KEY = "base-url"
"""``client_metadata`` key: where a self-registering plugin listens (fixed by the host once)."""
GO_VERSION_MISMATCH = re.compile(r"version mismatch: client=(-?\d+), server=(-?\d+)")
"""How a Go peer refuses a request for another app protocol version than its one."""
TOKEN_TTL_KEY = "runtime-token-ttl"
"""``server_metadata`` key: seconds the runtime token in the response stays valid."""


@dataclass(frozen=True)
class HandshakeConfig:
    """What host and plugin must agree on before anything else.

    The magic cookie guards against starting a plugin by accident (it is not a secret);
    the host puts it in the plugin's environment under ``magic_cookie_key``.
    """

    magic_cookie_key: str
    magic_cookie_value: str
    app_protocol_versions: Sequence[int] = (1,)

    def __post_init__(self) -> None:
        if not self.magic_cookie_key or not self.magic_cookie_value:
            raise ValueError("a handshake needs a magic cookie key and value")
        if not self.app_protocol_versions:
            raise ValueError("a handshake needs at least one app protocol version")


def format_versions(versions: Iterable[int]) -> str:
    return ",".join(str(v) for v in sorted(set(versions)))


def parse_versions(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConnectError(Code.INVALID_ARGUMENT, f"bad app protocol version list {text!r}") from None


def negotiate(ours: Sequence[int], theirs: Sequence[int], us: str = "host", them: str = "plugin") -> int:
    """The highest version both support; a mismatch names both sides' versions."""
    common = set(ours) & set(theirs)
    if not common:
        raise ConnectError(
            Code.FAILED_PRECONDITION,
            f"app protocol version mismatch: {us} supports {sorted(set(ours))}, "
            f"{them} supports {sorted(set(theirs))}",
        )
    return max(common)


def offered_versions(version: int, metadata: Mapping[str, str]) -> list[int]:
    """The versions a peer offers: its list when it sent one, else its single version."""
    listed = metadata.get(VERSIONS_KEY)
    return parse_versions(listed) if listed else [version]


def check_request(config: HandshakeConfig, request: handshake_pb2.HandshakeRequest, us: str) -> int:
    """Validate a handshake request against ``config``; returns the agreed app version."""
    if (request.magic_cookie_key, request.magic_cookie_value) != (
        config.magic_cookie_key,
        config.magic_cookie_value,
    ):
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"magic cookie mismatch: this {us} expects the cookie {config.magic_cookie_key!r} "
            "with its configured value",
        )
    if request.core_protocol_version != CORE_PROTOCOL_VERSION:
        raise ConnectError(  # the caller's error, as Go answers it
            Code.INVALID_ARGUMENT,
            f"core protocol version {request.core_protocol_version} is not supported "
            f"(this {us} speaks {CORE_PROTOCOL_VERSION})",
        )
    theirs = offered_versions(request.app_protocol_version, request.client_metadata)
    return negotiate(config.app_protocol_versions, theirs, us=us, them="caller")


def plugin_info(name: str, plugin: Plugin) -> handshake_pb2.PluginInfo:
    return handshake_pb2.PluginInfo(name=name, version=plugin.version, service_path=plugin.service_path)


class PluginHandshake(HandshakeServiceHandler):
    """The plugin's side: answers a host's handshake with the plugins it serves.

    A requested plugin it does not serve is left out of the answer, as a Go plugin leaves it
    out: the caller names what it misses (``PluginClient`` raises ``PluginNotServedError``).
    """

    def __init__(self, config: HandshakeConfig, plugins: Mapping[str, Plugin]) -> None:
        self._config = config
        self._plugins = dict(plugins)

    def handshake(self, request: handshake_pb2.HandshakeRequest, ctx: Context) -> handshake_pb2.HandshakeResponse:
        version = check_request(self._config, request, "plugin")
        return handshake_pb2.HandshakeResponse(
            core_protocol_version=CORE_PROTOCOL_VERSION,
            app_protocol_version=version,
            plugins=[plugin_info(name, p) for name, p in sorted(self._plugins.items())],
            server_metadata={VERSIONS_KEY: format_versions(self._config.app_protocol_versions)},
        )


def request_for(config: HandshakeConfig, requested: Iterable[str], **fields: str) -> handshake_pb2.HandshakeRequest:
    """The request a caller with ``config`` sends; ``fields`` adds self_id / self_version."""
    return handshake_pb2.HandshakeRequest(
        core_protocol_version=CORE_PROTOCOL_VERSION,
        app_protocol_version=max(config.app_protocol_versions),
        magic_cookie_key=config.magic_cookie_key,
        magic_cookie_value=config.magic_cookie_value,
        requested_plugins=list(requested),
        client_metadata={VERSIONS_KEY: format_versions(config.app_protocol_versions)},
        **fields,
    )


def check_response(config: HandshakeConfig, response: handshake_pb2.HandshakeResponse, them: str) -> int:
    """The app version the peer chose, verified to be one we support."""
    if response.core_protocol_version != CORE_PROTOCOL_VERSION:
        raise ConnectError(
            Code.FAILED_PRECONDITION,
            f"{them} speaks core protocol version {response.core_protocol_version}, not {CORE_PROTOCOL_VERSION}",
        )
    theirs = offered_versions(response.app_protocol_version, response.server_metadata)
    version = response.app_protocol_version
    if version not in config.app_protocol_versions:
        negotiate(config.app_protocol_versions, theirs, us="host", them=them)  # raises, naming both
        raise ConnectError(Code.FAILED_PRECONDITION, f"{them} chose app protocol version {version}, which we do not support")
    return version


def go_fallback(
    config: HandshakeConfig, request: handshake_pb2.HandshakeRequest, error: ConnectError, them: str
) -> handshake_pb2.HandshakeRequest | None:
    """The request to send again after a Go peer refused ``request``'s app version; None
    when ``error`` is not that refusal.

    A Go peer serves one app protocol version S and takes a handshake only for exactly S,
    refusing any other with ``failed_precondition`` "version mismatch: client=C, server=S"
    (ignoring our version list). The peer decides, as between Go peers: when S is another
    of our versions, the same request for S alone (field and list); when it is none of
    ours, a mismatch naming both sides.
    """
    found = GO_VERSION_MISMATCH.search(error.message) if error.code is Code.FAILED_PRECONDITION else None
    if found is None or int(found[1]) != request.app_protocol_version:
        return None
    theirs = int(found[2])
    if theirs == request.app_protocol_version:
        return None
    if theirs not in config.app_protocol_versions:
        raise ConnectError(
            Code.FAILED_PRECONDITION,
            f"app protocol version mismatch: {them} supports [{theirs}], "
            f"this side supports {sorted(set(config.app_protocol_versions))}",
        )
    retry = handshake_pb2.HandshakeRequest()
    retry.CopyFrom(request)
    retry.app_protocol_version = theirs
    retry.client_metadata[VERSIONS_KEY] = str(theirs)
    return retry


def exchange(
    config: HandshakeConfig,
    request: handshake_pb2.HandshakeRequest,
    send: Callable[[handshake_pb2.HandshakeRequest], handshake_pb2.HandshakeResponse],
    them: str,
) -> handshake_pb2.HandshakeResponse:
    """Send a handshake ``request`` (``send`` makes the call) and check the answer; when a Go
    peer refuses the version for another of ours, once more for that one (:func:`go_fallback`).
    """
    try:
        response = send(request)
    except ConnectError as e:
        retry = go_fallback(config, request, e, them)
        if retry is None:
            raise
        response = send(retry)
    check_response(config, response, them)
    return response
