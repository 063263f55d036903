"""Runtime identities: the id and bearer token a host gives each plugin, and their check.

An identity is created with everything the host trusts about the plugin: whether the host
launched it, and where it listens (launched: the URL from its handshake line; self-registered:
pinned once, on its handshake or its first registration, and never changed after). Tokens
live ``ttl`` seconds and can be rotated without changing the runtime id.
"""

from __future__ import annotations

import datetime
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..rpc import tls
from ..rpc.errors import Code, ConnectError
from ..rpc.server import Context
from ..rpc.tls import TLSConfig
from ..runtime.credentials import RUNTIME_ID_HEADER, bearer_matches, new_secret

DEFAULT_TOKEN_TTL = 24 * 3600.0
"""Seconds a runtime token stays valid unless rotated (the Go reference's 24 h)."""
DEFAULT_ROTATION_GRACE = 60.0
"""Seconds a rotated-out token still opens the host API, for calls already on their way."""

if TYPE_CHECKING:
    from cryptography import x509


def utc_now() -> datetime.datetime:
    """The wall clock certificates are checked against (an aware UTC datetime)."""
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Identity:
    """A plugin's runtime identity: ``token`` proves the plugin to the host, ``host_secret``
    proves the host (and its router) to the plugin."""

    runtime_id: str
    token: str
    self_id: str
    self_version: str = ""
    host_secret: str = ""
    tls: TLSConfig | None = None
    """How the host (and its router) reach the plugin over TLS: a launch's automatic mTLS."""
    launched: bool = False
    """The host started this plugin (model A); otherwise it joined by itself (model B)."""
    base_url: str = ""
    """Where the router reaches the plugin; "" until a self-registered plugin pins it."""
    expires_at: float = math.inf
    """The ``clock()`` reading after which ``token`` no longer authenticates."""
    previous_token: str = ""
    """The token before the last rotation, valid until ``previous_expires_at``."""
    previous_expires_at: float = 0.0
    verified: bool = False
    """Its base URL was checked (a connectplugin server knowing our cookie answered there)."""
    certificate: str = ""
    """The SHA-256 fingerprint of the client certificate it joined with: every call made with
    this identity must come on a TLS connection presenting that certificate. "" when it
    joined without one (launched plugins, join tokens over plaintext)."""
    revoked_as: frozenset[str] = frozenset()
    """The fingerprints a revocation of that certificate may name: its own and its twins'
    (``tls.revocation_prints``); revoking any of them revokes this identity."""

    @property
    def client_tls(self) -> TLSConfig | None:
        """How to reach ``base_url``: ``tls`` for an https:// URL, else nothing."""
        return self.tls if self.base_url.startswith("https://") else None


class Identities:
    """Issued identities by runtime id. Safe from any thread; tokens compare in constant time.

    ``_lock`` guards both tables. Expired identities stop authenticating at once; the host
    collects them with ``take_expired`` and revokes everything they held. Each identity
    remembers when it was last used (issued, or verified on a call, read on ``clock``), so
    the host can drop ones nobody uses. An identity bound to a client certificate is refused
    once that certificate is in ``revoked`` or past its validity on ``wall_clock``.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_TOKEN_TTL,
        clock: Callable[[], float] = time.monotonic,
        rotation_grace: float = DEFAULT_ROTATION_GRACE,
        revoked: tls.RevocationList | None = None,
        wall_clock: Callable[[], datetime.datetime] = utc_now,
    ) -> None:
        self.ttl = ttl
        self.rotation_grace = rotation_grace
        self.revoked = revoked if revoked is not None else tls.RevocationList()
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Identity] = {}
        self._used: dict[str, float] = {}  # runtime id -> last use

    def issue(
        self,
        self_id: str,
        self_version: str = "",
        *,
        launched: bool = False,
        base_url: str = "",
        host_secret: str = "",
        limit: int | None = None,
        limit_name: str = "",
        tls: TLSConfig | None = None,
        certificate: x509.Certificate | None = None,
    ) -> Identity:
        """A new identity; ``host_secret`` is the one a launched plugin was given (else a new
        one), ``tls`` how to reach it when it serves TLS, ``certificate`` the client
        certificate its every call must come with.

        A launched plugin's ``base_url`` is where its handshake line said it listens. With
        ``limit``, ``resource_exhausted`` once that many are held (``limit_name``, the config
        field, is named in the refusal).
        """
        # Opaque and unique: the plugin's own name plus randomness, never reused.
        now = self._clock()
        expires_at = now + self.ttl
        with self._lock:
            if limit is not None and len(self._by_id) >= limit:
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED,
                    f"the host holds its limit of {limit} identities ({limit_name}); try again later",
                )
            while True:
                runtime_id = f"{self_id or 'plugin'}-{secrets.token_hex(4)}"
                if runtime_id not in self._by_id:
                    break
            identity = Identity(
                runtime_id,
                new_secret(),
                self_id,
                self_version,
                host_secret=host_secret or new_secret(),
                tls=tls,
                launched=launched,
                base_url=base_url.rstrip("/"),
                expires_at=expires_at,
                verified=launched,
                certificate=_fingerprint(certificate),
                revoked_as=_revoked_as(certificate),
            )
            self._by_id[runtime_id] = identity
            self._used[runtime_id] = now
        return identity

    def touch(self, runtime_id: str) -> None:
        """Count a sign of life that was no call (its answer to the host's health check) as use."""
        now = self._clock()
        with self._lock:
            if runtime_id in self._used:
                self._used[runtime_id] = now

    def unused_since(self, cutoff: float) -> list[str]:
        """Runtime ids neither issued nor verified since ``cutoff`` (a ``clock`` reading)."""
        with self._lock:
            return [rid for rid, used in self._used.items() if used < cutoff]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def rotate(self, runtime_id: str) -> Identity:
        """A new token and lifetime for the same identity; the old token lasts ``rotation_grace``."""
        now = self._clock()
        with self._lock:
            current = self._by_id.get(runtime_id)
            if current is None or now >= current.expires_at:
                raise ConnectError(Code.UNAUTHENTICATED, "invalid runtime identity or token")
            rotated = replace(
                current,
                token=new_secret(),
                expires_at=now + self.ttl,
                previous_token=current.token,
                previous_expires_at=min(current.expires_at, now + self.rotation_grace),
            )
            self._by_id[runtime_id] = rotated
        return rotated

    def pin_base_url(self, runtime_id: str, base_url: str) -> Identity:
        """Fix where a self-registered plugin listens; a second, different URL is refused."""
        base_url = base_url.rstrip("/")
        with self._lock:
            current = self._by_id.get(runtime_id)
            if current is None:
                raise ConnectError(Code.UNAUTHENTICATED, "invalid runtime identity or token")
            if current.base_url and current.base_url != base_url:
                raise ConnectError(
                    Code.PERMISSION_DENIED,
                    f"{runtime_id} listens at {current.base_url}; its base URL cannot change",
                )
            pinned = replace(current, base_url=base_url)
            self._by_id[runtime_id] = pinned
        return pinned

    def mark_verified(self, runtime_id: str) -> None:
        with self._lock:
            current = self._by_id.get(runtime_id)
            if current is not None:
                self._by_id[runtime_id] = replace(current, verified=True)

    def base_urls(self, excluding: str = "") -> list[str]:
        """Where every identity's plugin listens, except ``excluding``'s."""
        with self._lock:
            return [
                i.base_url for i in self._by_id.values() if i.base_url and i.runtime_id != excluding
            ]

    def due_for_rotation(self, runtime_ids: set[str]) -> set[str]:
        """Those of ``runtime_ids`` whose token is past half its lifetime."""
        now = self._clock()
        with self._lock:
            return {
                rid
                for rid in runtime_ids
                if (i := self._by_id.get(rid)) is not None and i.expires_at - now < self.ttl / 2
            }

    def revoke(self, runtime_id: str) -> None:
        with self._lock:
            self._by_id.pop(runtime_id, None)
            self._used.pop(runtime_id, None)

    def take_expired(self) -> list[Identity]:
        """Identities whose token has expired; forgets them (the caller revokes what they held)."""
        now = self._clock()
        with self._lock:
            expired = [i for i in self._by_id.values() if now >= i.expires_at]
            for identity in expired:
                del self._by_id[identity.runtime_id]
                self._used.pop(identity.runtime_id, None)
        return expired

    def get(self, runtime_id: str) -> Identity | None:
        with self._lock:
            return self._by_id.get(runtime_id)

    def is_current(self, runtime_id: str) -> bool:
        """Whether ``runtime_id`` was issued, has not expired, and was not revoked since."""
        identity = self.get(runtime_id)
        return identity is not None and self._clock() < identity.expires_at

    def caller(self, ctx: Context) -> Identity:
        """The identity a call to the host's API is made with (see :meth:`verify`); without
        ``X-Plugin-Runtime-ID`` the call is ``invalid_argument``, as the Go host answers."""
        return self.verify(ctx.request_headers, tls.peer_certificate(ctx.environ), missing=Code.INVALID_ARGUMENT)

    def bound_to(self, fingerprints: set[str]) -> list[str]:
        """Runtime ids of the identities bound to a certificate revoked under one of these
        fingerprints (its own or a twin's: see ``tls.revocation_prints``)."""
        with self._lock:
            return [i.runtime_id for i in self._by_id.values() if not i.revoked_as.isdisjoint(fingerprints)]

    def check_certificate(self, certificate: x509.Certificate, revoked_as: frozenset[str] | None = None) -> None:
        """Refuse (``unauthenticated``) a client certificate that is revoked, or not valid now;
        ``revoked_as`` its ``tls.revocation_prints`` when known already (a bound identity's).

        The TLS handshake checked both already; a connection kept open outlives that check.
        """
        prints = tls.revocation_prints(certificate) if revoked_as is None else revoked_as
        if any(print_ in self.revoked for print_ in prints):
            raise ConnectError(Code.UNAUTHENTICATED, "the client certificate is revoked")
        now = self._wall_clock()
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise ConnectError(Code.UNAUTHENTICATED, "the client certificate is not valid now (expired?)")

    def verify(
        self, headers: Mapping[str, Any], peer: x509.Certificate | None, missing: Code = Code.UNAUTHENTICATED
    ) -> Identity:
        """The caller's identity from ``X-Plugin-Runtime-ID`` and ``Authorization: Bearer``,
        and ``peer``, the client certificate of the connection the call came on (from the TLS
        server, :func:`connectplugin.rpc.tls.peer_certificate`; never from a header).

        A call without ``X-Plugin-Runtime-ID`` is ``missing`` (the router's default,
        ``unauthenticated``, as the Go router's 401; :meth:`caller` passes ``invalid_argument``).
        Wrong or missing tokens, and expired ones, are ``unauthenticated``; the message
        never says which half failed. So is an identity bound to a certificate called
        without it (another certificate, or none), or with it revoked or expired.
        """
        runtime_id = headers.get(RUNTIME_ID_HEADER.lower(), "")
        auth = headers.get("authorization", "")
        if not isinstance(runtime_id, str) or not runtime_id:
            raise ConnectError(missing, f"{RUNTIME_ID_HEADER} header required")
        if not isinstance(auth, str):
            raise ConnectError(Code.UNAUTHENTICATED, "invalid runtime identity or token")
        identity = self.get(runtime_id)
        now = self._clock()
        current = bearer_matches(auth, identity.token if identity is not None else None)
        previous = bearer_matches(auth, identity.previous_token if identity is not None else None)
        if identity is None or not (
            (current and now < identity.expires_at)
            or (previous and now < identity.previous_expires_at)
        ):
            raise ConnectError(Code.UNAUTHENTICATED, "invalid runtime identity or token")
        if identity.certificate:
            if peer is None or not secrets.compare_digest(tls.fingerprint(peer), identity.certificate):
                raise ConnectError(
                    Code.UNAUTHENTICATED, f"{runtime_id} calls only with the client certificate it joined with"
                )
            self.check_certificate(peer, identity.revoked_as)  # the peer is that certificate
        with self._lock:
            if runtime_id in self._used:
                self._used[runtime_id] = now
        return identity


def _fingerprint(certificate: x509.Certificate | None) -> str:
    return tls.fingerprint(certificate) if certificate is not None else ""


def _revoked_as(certificate: x509.Certificate | None) -> frozenset[str]:
    return tls.revocation_prints(certificate) if certificate is not None else frozenset()
