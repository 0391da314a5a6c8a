"""Per-client rate limits (token buckets) and the client's address.

Buckets live in each API worker's memory: with N workers a client may get
up to N times the rate when its connections land on different workers.
That is the usual trade for no shared state on the hot path.
"""

from __future__ import annotations

import math
import time

from .errors import ApiError

MAX_KEYS = 100_000


class Limiter:
    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 2)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, last time)

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def allow(self, key: str) -> float:
        """Take one token; 0.0 if allowed, else the seconds until one is free."""
        now = self.clock()
        tokens = self._level(key, now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        if len(self._buckets) >= MAX_KEYS:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def check(self, key: str, what: str) -> None:
        """Take one token or raise 429 with Retry-After."""
        wait = self.allow(key)
        if wait:
            retry = max(1, math.ceil(wait))
            raise ApiError(429, "rate_limited", f"too many {what} from your address; retry in {retry} s",
                           headers={"Retry-After": str(retry)})

    def blocked(self, key: str) -> bool:
        """True while ``key`` has no token left (without taking one)."""
        return self._level(key, self.clock()) < 1

    def _forget_full(self, now: float) -> None:
        # Buckets that refilled completely carry no information.
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]


def client_ip(req, trusted_proxies: tuple[str, ...]) -> str:
    """The client's address; X-Forwarded-For only when the peer is a trusted proxy."""
    peer = req.remote_addr or ""
    if peer not in trusted_proxies:
        return peer
    forwarded = [a.strip() for a in (req.get_header("X-Forwarded-For") or "").split(",") if a.strip()]
    # The rightmost address a trusted proxy did not add is the client.
    for addr in reversed(forwarded):
        if addr not in trusted_proxies:
            return addr
    return peer
