"""Who may join the host by itself (model B), what it may provide, and where it is reached;
and who may observe it (operators: metrics, the dashboard).

A self-registering plugin presents a join token in its handshake (``client_metadata``
under ``handshake.JOIN_TOKEN_KEY``), or, to a host serving mTLS, a client certificate naming
its self id; the token's or the self id's policy says which service types it may register. Where it
listens is fixed once (handshake ``client_metadata`` under ``BASE_URL_KEY``, or its first registration's
``metadata["base_url"]``) after a check that no other plugin (nor the host) is there and that
a plugin with our magic cookie answers; the router never reaches anything else through it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from ..gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from ..rpc import tls
from ..rpc.client import Client, ClientConfig
from ..rpc.errors import Code, ConnectError
from ..runtime import handshake as hs
from ..runtime.credentials import HOST_SECRET_HEADER
from . import validation
from .identities import Identities, Identity
from .registry import Declared

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("connectplugin.host")

MIN_JOIN_TOKEN_LEN = 16


@dataclass(frozen=True)
class JoinToken:
    """A secret that admits self-registering plugins, and the service types they may provide.

    ``service_types`` lists what a plugin joining with it may register (at any service path);
    with none it may only call others. Launched providers of a type are still discovered first.
    """

    secret: str
    service_types: Sequence[str] = ()
    name: str = ""
    """For logs: which token a plugin joined with (the secret is never logged)."""

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_JOIN_TOKEN_LEN:
            raise ValueError(f"a join token secret needs at least {MIN_JOIN_TOKEN_LEN} characters")
        for service_type in self.service_types:
            validation.check_name(service_type, "service type")


@dataclass(frozen=True)
class CertificateIdentity:
    """A self id whose client certificate admits a self-registering plugin, and the service
    types it may provide (as a :class:`JoinToken`'s; with none it may only call others).

    The certificate must chain to the host's ``HTTPConfig.tls.trust`` (the TLS handshake
    checks that, and its validity and revocation) and name ``self_id`` and no other id: one
    SAN URI ``connectplugin://plugin/<self_id>`` (the common name is never read, see
    :func:`connectplugin.rpc.tls.certificate_ids`). The plugin's identity is then bound to
    that certificate: every later call must come with it.
    """

    self_id: str
    service_types: Sequence[str] = ()

    def __post_init__(self) -> None:
        validation.check_name(self.self_id, "self_id")
        for service_type in self.service_types:
            validation.check_name(service_type, "service type")


@dataclass(frozen=True)
class OperatorToken:
    """A secret that lets a person or a tool observe the host: ``/metrics``, the dashboard
    and the registry-wide watch behind it. It admits no plugin and reaches no plugin.

    Presented as ``Authorization: Bearer <secret>``.
    """

    secret: str
    name: str = ""
    """For logs: which token was used (the secret is never logged)."""

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_JOIN_TOKEN_LEN:
            raise ValueError(f"an operator token secret needs at least {MIN_JOIN_TOKEN_LEN} characters")


class Operators:
    """Checks operator credentials. Safe from any thread (configuration only)."""

    def __init__(self, tokens: Sequence[OperatorToken]) -> None:
        self._tokens = list(tokens)

    def token(self, authorization: str) -> OperatorToken | None:
        """The operator token an ``Authorization`` header value presents, None for any other."""
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None
        # Compare with every token, so the time taken does not say which one nearly matched.
        matches = [t for t in self._tokens if hmac.compare_digest(t.secret.encode(), secret.strip().encode())]
        return matches[0] if matches else None

    def check(self, authorization: str) -> OperatorToken:
        """The operator token presented; raises ``unauthenticated`` without a valid one."""
        token = self.token(authorization)
        if token is not None:
            return token
        if not self._tokens:
            raise ConnectError(
                Code.UNAUTHENTICATED, "this host has no operator tokens (HostConfig.operator_tokens)"
            )
        raise ConnectError(Code.UNAUTHENTICATED, "an operator token (Authorization: Bearer ...) is required")


class HostAddress(Protocol):
    @property
    def url(self) -> str: ...


class Admission:
    """Admits self-registering plugins and pins their base URLs. Safe from any thread (no state
    of its own beyond its configuration; identities hold the pinned URLs)."""

    def __init__(
        self,
        tokens: Sequence[JoinToken],
        certificates: Sequence[CertificateIdentity],
        dev_cookie_joins: bool,
        handshake: hs.HandshakeConfig,
        identities: Identities,
        host: HostAddress,
        verify_timeout: float,
    ) -> None:
        self._tokens = list(tokens)
        self._certificates = {c.self_id: c for c in certificates}
        self._dev = dev_cookie_joins
        self._handshake = handshake
        self._identities = identities
        self._host = host
        self._timeout = verify_timeout

    @property
    def open(self) -> bool:
        """Whether any plugin can join by itself at all."""
        return bool(self._tokens) or bool(self._certificates) or self._dev

    def admit(
        self, self_id: str, metadata: Mapping[str, str], peer: str, certificate: x509.Certificate | None
    ) -> tuple[Declared, str]:
        """What a joining plugin may provide, and a label for logs; raises when it may not join.

        ``certificate`` is the client certificate of the connection the handshake came on,
        already verified by the TLS server. One that names a listed self id admits the plugin
        as that id (and no other); otherwise a join token (or the development switch) must.
        """
        secret = metadata.get(hs.JOIN_TOKEN_KEY, "")
        if not self.open:
            raise ConnectError(
                Code.PERMISSION_DENIED, "this host does not accept self-registering plugins"
            )
        named = tls.certificate_ids(certificate) if certificate is not None and self._certificates else []
        listed = [i for i in named if i in self._certificates]
        if listed and len(named) > 1:
            raise ConnectError(
                Code.PERMISSION_DENIED,
                f"the client certificate names several plugins ({', '.join(map(repr, named))}); "
                "a certificate identity names exactly one",
            )
        if listed:
            if self_id not in listed:
                raise ConnectError(
                    Code.PERMISSION_DENIED,
                    f"the client certificate is for {', '.join(map(repr, listed))}, not {self_id!r}",
                )
            policy = self._certificates[self_id]
            return Declared(
                launched=False, paths={t: "" for t in policy.service_types}
            ), f"its client certificate ({self_id})"
        if secret:
            # Compare with every token, so the time taken does not say which one nearly matched.
            matches = [
                t for t in self._tokens if hmac.compare_digest(t.secret.encode(), secret.encode())
            ]
            if matches:
                token = matches[0]
                return Declared(
                    launched=False, paths={t: "" for t in token.service_types}
                ), token.name or "a join token"
            raise ConnectError(Code.UNAUTHENTICATED, "the join token is not accepted here")
        if self._dev and _is_loopback(peer):
            log.warning(
                "admitting a plugin from %s with the magic cookie only (development switch)", peer
            )
            return Declared(launched=False, any_type=True), "the development switch"
        if named:
            raise ConnectError(
                Code.UNAUTHENTICATED,
                f"the client certificate names {', '.join(map(repr, named))}, which this host does not admit "
                "(HostConfig.certificate_identities), and no join token was given",
            )
        raise ConnectError(
            Code.UNAUTHENTICATED,
            f"a join token (client_metadata[{hs.JOIN_TOKEN_KEY!r}]) or a client certificate is required",
        )

    def pin(self, identity: Identity, base_url: str) -> Identity:
        """Fix ``base_url`` as where ``identity``'s plugin listens: never where the host or
        another plugin does, and never changed once fixed. Calls nobody."""
        url = validation.check_base_url(base_url)
        if not identity.base_url:
            taken = _addresses(self._host.url)
            for other in self._identities.base_urls(excluding=identity.runtime_id):
                taken |= _addresses(other)
            if _addresses(url) & taken:
                raise ConnectError(Code.PERMISSION_DENIED, f"{url} is where the host or another plugin listens")
        return self._identities.pin_base_url(identity.runtime_id, url)

    def reachable(self, identity: Identity, requested: str) -> str:
        """Where the router reaches ``identity``'s plugin: its fixed base URL (fixed now to
        ``requested`` if it had none), checked once. ``identity`` is authenticated."""
        if not identity.base_url and not requested:
            raise ConnectError(
                Code.INVALID_ARGUMENT, 'metadata["base_url"] is required for a plugin the host did not launch'
            )
        if requested:
            identity = self.pin(identity, requested)
        if not identity.verified:
            self._verify(identity)
            self._identities.mark_verified(identity.runtime_id)
        return identity.base_url

    def _verify(self, identity: Identity) -> None:
        """A connectplugin server that knows our magic cookie must answer at the plugin's URL
        (asked with the secret it expects from us, which no other plugin would accept)."""
        url = identity.base_url
        config = ClientConfig(
            timeout=self._timeout, headers={HOST_SECRET_HEADER: identity.host_secret}, tls=identity.client_tls
        )
        try:
            with Client(url, config) as client:
                HandshakeServiceClient(client).handshake(hs.request_for(self._handshake, ()))
        except ConnectError as e:
            # A version mismatch still proves a plugin that checked our cookie (both hosts
            # check the cookie first); anything else is not one of ours.
            if e.code != Code.FAILED_PRECONDITION:
                raise ConnectError(
                    Code.FAILED_PRECONDITION, f"no plugin with this host's magic cookie answers at {url}: {e.message}"
                ) from None


def _is_loopback(peer: str) -> bool:
    try:
        return ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except ValueError:
        return False


def _addresses(url: str) -> set[tuple[str, int]]:
    """The (address, port) pairs ``url`` reaches; every local address counts as one, "local"."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos: Iterable[tuple] = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return {(parts.hostname or "", port)}
    found = set()
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        found.add(("local" if ip.is_loopback or ip.is_unspecified else str(ip), port))
    return found
