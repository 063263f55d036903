"""Runtime identities: the id and bearer token a host gives each plugin, and their check."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..rpc.errors import Code, ConnectError
from ..rpc.tls import TLSConfig
from ..runtime.credentials import RUNTIME_ID_HEADER, bearer_matches, new_secret


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


class Identities:
    """Issued identities by runtime id. Safe from any thread; tokens compare in constant time.

    ``_lock`` guards both tables. Each identity remembers when it was last used (issued, or
    verified on a call, read on ``clock``), so the host can drop ones nobody uses.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Identity] = {}
        self._used: dict[str, float] = {}  # runtime id -> last use

    def issue(
        self, self_id: str, self_version: str = "", host_secret: str = "", limit: int | None = None,
        limit_name: str = "", tls: TLSConfig | None = None,
    ) -> Identity:
        """A new identity; ``host_secret`` is the one a launched plugin was given (else a new
        one), ``tls`` how to reach it when it serves TLS.

        With ``limit``, ``resource_exhausted`` once that many are held (``limit_name``, the
        config field, is named in the refusal).
        """
        # Opaque and unique: the plugin's own name plus randomness, never reused.
        runtime_id = f"{self_id or 'plugin'}-{secrets.token_hex(4)}"
        identity = Identity(runtime_id, new_secret(), self_id, self_version, host_secret or new_secret(), tls)
        now = self._clock()
        with self._lock:
            full = limit is not None and len(self._by_id) >= limit
            if not full:
                while identity.runtime_id in self._by_id:
                    identity = replace(identity, runtime_id=f"{self_id}-{secrets.token_hex(4)}")
                self._by_id[identity.runtime_id] = identity
                self._used[identity.runtime_id] = now
        if full:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED, f"the host holds its limit of {limit} identities ({limit_name}); try again later"
            )
        return identity

    def unused_since(self, cutoff: float) -> list[str]:
        """Runtime ids neither issued nor verified since ``cutoff`` (a ``clock`` reading)."""
        with self._lock:
            return [rid for rid, used in self._used.items() if used < cutoff]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def revoke(self, runtime_id: str) -> None:
        with self._lock:
            self._by_id.pop(runtime_id, None)
            self._used.pop(runtime_id, None)

    def get(self, runtime_id: str) -> Identity | None:
        with self._lock:
            return self._by_id.get(runtime_id)

    def is_current(self, runtime_id: str) -> bool:
        """Whether ``runtime_id`` was issued and not revoked since (what a grant's holder needs)."""
        with self._lock:
            return runtime_id in self._by_id

    def verify(self, headers: Mapping[str, Any]) -> Identity:
        """The caller's identity from ``X-Plugin-Runtime-ID`` and ``Authorization: Bearer``.

        Missing or wrong pairs are ``unauthenticated``; the message never says which half failed.
        """
        runtime_id = headers.get(RUNTIME_ID_HEADER.lower(), "")
        auth = headers.get("authorization", "")
        if not isinstance(runtime_id, str) or not isinstance(auth, str) or not runtime_id:
            raise ConnectError(Code.UNAUTHENTICATED, f"{RUNTIME_ID_HEADER} and a bearer token are required")
        identity = self.get(runtime_id)
        if not bearer_matches(auth, identity.token if identity is not None else None) or identity is None:
            raise ConnectError(Code.UNAUTHENTICATED, "invalid runtime identity or token")
        now = self._clock()
        with self._lock:
            if runtime_id in self._used:
                self._used[runtime_id] = now
        return identity
