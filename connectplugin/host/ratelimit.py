"""Rate limits: a token bucket per peer, so no one caller can flood the host's endpoints."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..rpc.errors import Code, ConnectError

OVERFLOW_KEY = ""
"""The bucket every new key shares while ``max_keys`` buckets are in use."""


@dataclass(frozen=True)
class Rate:
    """A token bucket: ``burst`` calls at once, refilled at ``per_second`` calls a second."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_second < 0 or self.burst < 1:
            raise ValueError(f"a rate needs per_second >= 0 and burst >= 1, not {self}")


class RateLimiter:
    """Token buckets by key (a peer address, a runtime id). Safe from any thread.

    ``_lock`` guards the buckets. A bucket that has filled up again is the same as no bucket,
    so such buckets are dropped whenever ``max_keys`` are in use; if none can go, new keys
    share one overflow bucket: memory stays bounded whatever the number of callers.
    """

    def __init__(
        self, rate: Rate, name: str, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``name`` is the limit's config field, named in refusals so operators know what to tune."""
        self.rate = rate
        self.name = name
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, as of)

    def check(self, key: str) -> None:
        """Take one token for ``key``; ``resource_exhausted`` when its bucket is empty."""
        rate = self.rate
        now = self._clock()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._drop_full(now)
                if len(self._buckets) >= self.max_keys:
                    key = OVERFLOW_KEY
            tokens, since = self._buckets.get(key, (float(rate.burst), now))
            tokens = min(float(rate.burst), tokens + (now - since) * rate.per_second)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if not allowed:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"rate limit {self.name} exceeded ({rate.burst} at once, {rate.per_second:g} a second); "
                "try again later",
            )

    def forget(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def _drop_full(self, now: float) -> None:
        rate = self.rate
        full = [
            key for key, (tokens, since) in self._buckets.items()
            if tokens + (now - since) * rate.per_second >= rate.burst
        ]
        for key in full:
            del self._buckets[key]
