"""How a plugin proves who it is to its host: the runtime id header and bearer tokens.

Both sides use these: the host to check callers, a plugin to check that a request comes
from the host that gave it its identity.
"""

from __future__ import annotations

import hmac

RUNTIME_ID_HEADER = "X-Plugin-Runtime-ID"


def bearer_matches(authorization: object, expected: str | None) -> bool:
    """Whether ``authorization`` is ``Bearer <expected>``, compared in constant time.

    With no ``expected`` token the comparison still runs (against a dummy), so the time
    taken does not tell an unknown id from a wrong token.
    """
    scheme, _, given = str(authorization).partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), (expected or "-" * 43).encode())
    return ok and bool(expected) and scheme.lower() == "bearer"
