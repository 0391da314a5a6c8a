"""One caching DNS resolver for SPF, DKIM and DMARC.

Every lookup the authentication checks make goes through `CachingResolver.lookup`,
so that:

* answers (and negative answers: NXDOMAIN, no data) are kept in memory for their
  TTL, bounded by our own maximum, and a busy sender domain costs one query per TTL;
* concurrent look-ups of the same name share one query ("single flight") instead of
  sending N identical queries while the first is still waiting;
* no lock is held while waiting on the network, so many threads can wait at once;
* every failure that may go away (timeout, SERVFAIL, REFUSED, server unreachable,
  time budget spent) is one exception, `DnsTempError`, which the checks turn into
  `temperror`; nothing else escapes.

Values returned per record type (chosen to be what pyspf expects, see auth.py):
TXT -> tuple of bytes (the record's character-strings, not yet joined),
A/AAAA -> address string, MX -> (preference, exchange), PTR/CNAME -> target name.
Names are returned without the final dot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = ["CachingResolver", "DnsTempError"]


class DnsTempError(Exception):
    """A look-up failed in a way that may succeed later (→ temperror)."""

    def __init__(self, message: str, budget_limited: bool = False):
        super().__init__(message)
        # True when the query had less time than a full timeout because the
        # caller's budget was nearly spent: other callers sharing this query
        # (single flight) should retry with their own budget instead.
        self.budget_limited = budget_limited


class _Flight:
    """A query in progress, which other threads asking the same thing wait for."""

    __slots__ = ("done", "value", "expires", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: tuple = ()
        self.expires = 0.0
        self.error: DnsTempError | None = None


class CachingResolver:
    """Thread-safe DNS resolver with a TTL-bounded in-memory cache.

    servers: list of (address, port); empty or None means the system resolver
    (/etc/resolv.conf). timeout: the most one look-up may take. max_ttl and
    negative_ttl bound how long positive and negative answers are cached.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        timeout: float = 2.0,
        max_ttl: float = 300.0,
        negative_ttl: float = 60.0,
        max_entries: int = 10_000,
    ):
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._resolver = _make_resolver(servers, timeout)
        self._lock = threading.Lock()  # guards the two dicts below, never held during I/O
        self._cache: dict[tuple[str, str], tuple[float, tuple]] = {}
        self._inflight: dict[tuple[str, str], _Flight] = {}
        self.hits = 0
        self.misses = 0

    def lookup(self, name: str | bytes, rdtype: str, deadline: float | None = None) -> tuple:
        """Records of `rdtype` at `name` ((): none). Raises only DnsTempError.

        deadline is a time.monotonic() value: the look-up gives up then.
        """
        return self.lookup_expiring(name, rdtype, deadline)[0]

    def lookup_expiring(self, name: str | bytes, rdtype: str,
                        deadline: float | None = None) -> tuple[tuple, float]:
        """(records, time.monotonic() when they stop being valid): `lookup`, plus
        how long anything derived from the answer may be kept. An answer that
        was not cached (e.g. a TTL of 0) expires at once."""
        key = (_normalise(name), rdtype.upper())
        while True:
            state, found = self._cached_or_join(key)
            if state == "hit":
                return found
            if state == "lead":
                return self._resolve_as_leader(key, found, deadline)
            answer = self._wait_for(found, deadline)
            if answer is not None:
                return answer
            # The leader ran out of *its* budget; try again with ours.

    def peek(self, name: str | bytes, rdtype: str) -> tuple[tuple, float] | None:
        """(records, expiry) if an unexpired answer is cached, else None; never queries."""
        key = (_normalise(name), rdtype.upper())
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or entry[0] <= now:
                return None
            self.hits += 1
        return entry[1], entry[0]

    def txt(self, name: str | bytes, deadline: float | None = None) -> list[bytes]:
        """TXT records at `name`, each one's strings joined into one bytes value."""
        return [b"".join(strings) for strings in self.lookup(name, "TXT", deadline)]

    def cached(self, name: str | bytes, rdtype: str) -> bool:
        """Is an unexpired answer at hand (no query needed)?"""
        key = (_normalise(name), rdtype.upper())
        with self._lock:
            entry = self._cache.get(key)
        return entry is not None and entry[0] > time.monotonic()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- internals ---------------------------------------------------------

    def _cached_or_join(self, key):
        """("hit", value), or ("lead", flight) to query, or ("wait", flight) to wait."""
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry[0] > now:
                self.hits += 1
                return "hit", (entry[1], entry[0])
            flight = self._inflight.get(key)
            if flight is not None:
                return "wait", flight
            self.misses += 1
            flight = self._inflight[key] = _Flight()
            return "lead", flight

    def _resolve_as_leader(self, key, flight: _Flight,
                           deadline: float | None) -> tuple[tuple, float]:
        try:
            value, ttl = self._query(key, deadline)
            expires = self._store(key, value, ttl)
            flight.value, flight.expires = value, expires
            return value, expires
        except DnsTempError as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            flight.done.set()

    def _wait_for(self, flight: _Flight, deadline: float | None) -> tuple[tuple, float] | None:
        """The leader's (answer, expiry); None means 'retry'. Raises DnsTempError."""
        if deadline is None:
            flight.done.wait()  # the leader's own query is bounded by its timeout
        elif not flight.done.wait(max(deadline - time.monotonic(), 0)):
            raise DnsTempError("DNS time budget spent", budget_limited=True)
        if flight.error is None:
            return flight.value, flight.expires
        if flight.error.budget_limited:
            return None
        raise flight.error

    def _query(self, key, deadline: float | None) -> tuple[tuple, float]:
        """Ask the servers: (records, seconds to cache them)."""
        name, rdtype = key
        lifetime = self.timeout
        if deadline is not None:
            lifetime = min(lifetime, deadline - time.monotonic())
        budget_limited = lifetime < self.timeout
        if lifetime <= 0:
            raise DnsTempError("DNS time budget spent", budget_limited=True)
        try:
            qname = dns.name.from_text(name)
            qtype = dns.rdatatype.from_text(rdtype)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            # Names come from message data (d=, s=, From): a malformed one cannot
            # exist. No records, and nothing worth caching.
            return (), 0.0
        try:
            answer = self._resolver.resolve(
                qname, qtype, lifetime=lifetime, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN) as exc:
            return (), _soa_ttl(exc, self.negative_ttl)
        except dns.exception.Timeout as exc:
            raise DnsTempError(f"DNS timeout for {name}/{rdtype}", budget_limited) from exc
        except dns.exception.DNSException as exc:
            # NoNameservers (SERVFAIL, REFUSED, unreachable), NoResolverConfiguration, ...
            raise DnsTempError(f"DNS error for {name}/{rdtype}: {exc.__class__.__name__}") from exc
        if answer.rrset is None:
            ttl = min(answer.expiration - time.time(), self.negative_ttl)
            return (), ttl
        ttl = min(answer.expiration - time.time(), self.max_ttl)
        return tuple(_value(rdata) for rdata in answer.rrset), ttl

    def _store(self, key, value: tuple, ttl: float) -> float:
        """Cache the answer; its expiry (now when it is not cached)."""
        now = time.monotonic()
        if ttl <= 0:
            return now
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._evict(now)
            self._cache[key] = (now + ttl, value)
        return now + ttl

    def _evict(self, now: float) -> None:
        """Drop expired entries; if still full, the oldest quarter (insertion order)."""
        for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[key]
        excess = len(self._cache) - self.max_entries * 3 // 4
        for key in list(self._cache)[:max(excess, 0)]:
            del self._cache[key]


def _make_resolver(servers, timeout: float) -> dns.resolver.Resolver:
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    else:
        try:
            resolver = dns.resolver.Resolver()  # /etc/resolv.conf
        except dns.exception.DNSException:
            # No usable system configuration: every look-up will be a temperror
            # (NoNameservers) rather than the ingester failing to start.
            resolver = dns.resolver.Resolver(configure=False)
    resolver.timeout = timeout
    resolver.cache = None  # we cache ourselves, with negative answers and bounds
    return resolver


def _normalise(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()


def _value(rdata):
    rdtype = rdata.rdtype
    if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        return tuple(rdata.strings)
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address
    if rdtype == dns.rdatatype.MX:
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME):
        return rdata.target.to_text(omit_final_dot=True)
    return rdata.to_text()


def _soa_ttl(exc: dns.exception.DNSException, bound: float) -> float:
    """Negative-cache time of an NXDOMAIN: the SOA's (RFC 2308), at most `bound`."""
    try:
        responses = exc.responses().values()
    except Exception:  # noqa: BLE001 - only an optimisation; fall back to the bound
        return bound
    for response in responses:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return min(rrset.ttl, rrset[0].minimum, bound)
    return bound
