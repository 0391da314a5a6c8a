"""The domains we serve: the configured ones and those an operator adds at runtime.

The configuration's ``[[domains]]`` are fixed for a process's life. An
operator can add, change and disable more through the API (``POST`` and
``PATCH /api/v1/domains``); those live in the Domain table (source "api")
with their settings as JSON, and every process (API workers, ingester,
policy service, sweeper) sees them through a `DomainRegistry`: a snapshot
re-read from the database at most every ``ttl`` seconds, and at once when
asked for a name it does not know that the table now has (one indexed
look-up per miss), so a domain just added through one API worker is usable
through the next request to another. A domain disabled at runtime may still
be served by a process for up to ``ttl`` seconds.

On a name in both, the configuration wins (store.sync_domains takes the row
over at start).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from typing import Callable

from .config import ConfigError, DomainSettings, Settings
from .store.store import candidate_domains, domain_of

log = logging.getLogger(__name__)

TTL = 2.0  # seconds a snapshot is used before it is re-read


class DomainSet:
    """An immutable snapshot: look-ups by name and by address."""

    def __init__(self, domains: list[DomainSettings]):
        self.domains = tuple(domains)
        self._by_name = {d.name: d for d in self.domains}
        self._subdomains = {d.name: d.subdomains for d in self.domains}
        self._auth_failure: dict[str, tuple[bool, str]] | None = None

    def __iter__(self):
        return iter(self.domains)

    def __len__(self) -> int:
        return len(self.domains)

    def get(self, name: str) -> DomainSettings | None:
        return self._by_name.get(name)

    def name_of(self, address: str) -> str | None:
        """The domain ``address`` (or a bare host name) belongs to, subdomains included."""
        return domain_of(address if "@" in address else "@" + address, self._subdomains)

    def of(self, address: str) -> DomainSettings | None:
        name = self.name_of(address)
        return self._by_name[name] if name else None

    @property
    def default(self) -> DomainSettings | None:
        """Where a mailbox goes when the request names no domain: the first configured one."""
        return self.domains[0] if self.domains else None

    def auth_failure_map(self) -> dict[str, tuple[bool, str]]:
        """name → (subdomains, auth_failure), as plain data for the ingester's workers
        (asked per batch: built once per snapshot)."""
        if self._auth_failure is None:
            self._auth_failure = {d.name: (d.subdomains, d.auth_failure) for d in self.domains}
        return self._auth_failure


def settings_json(domain: DomainSettings) -> str:
    """What a runtime domain's row keeps: every setting but the name."""
    fields = dataclasses.asdict(domain)
    del fields["name"]
    return json.dumps(fields, sort_keys=True)


def from_row(settings: Settings, row) -> DomainSettings | None:
    """A runtime domain's settings from its row; None (logged) if they no longer validate."""
    try:
        data = json.loads(row.settings or "{}")
        return settings.runtime_domain(dict(data, name=row.name), f"domain {row.name}")
    except (ValueError, ConfigError) as exc:
        # A row written by an older release, or settings that now need something switched
        # off (auth.enabled for quarantine): skip the domain, loudly, rather than stop.
        log.error("runtime domain %s is not served: %s", row.name, exc)
        return None


class DomainRegistry:
    """Configured domains plus the active runtime ones, re-read from the store now and then.

    Thread-safe: a snapshot is replaced whole. ``snapshot()`` may read the
    database (callers off the event loop); async code calls ``current()``.
    """

    def __init__(self, settings: Settings, store, *, ttl: float = TTL,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._configured = list(settings.domains)
        self._set = DomainSet(self._configured)
        self._at = float("-inf")
        self._lock = threading.Lock()

    def _stale(self, now: float) -> bool:
        return now - self._at >= self.ttl

    def snapshot(self) -> DomainSet:
        if self._stale(self.clock()):
            self.refresh()
        return self._set

    async def current(self) -> DomainSet:
        if self._stale(self.clock()):
            await asyncio.to_thread(self.refresh)
        return self._set

    def recheck(self, address: str) -> DomainSet:
        """After a miss on ``address`` (or a host): re-read now if the table has a name the snapshot lacks."""
        names = [n for n in candidate_domains(address) if self._set.get(n) is None]
        try:
            fresh = self.store.active_domain_names(names)
        except Exception:
            log.exception("cannot look up domains %s", names)
            return self._set
        if fresh:
            self.invalidate()
            self.refresh()
        return self._set

    def invalidate(self) -> None:
        """Re-read on next use (this process changed the table)."""
        self._at = float("-inf")

    @property
    def cached(self) -> DomainSet:
        """The last snapshot, without reading the database (sync code on the event loop,
        after an ``await current()`` in the same request)."""
        return self._set

    def refresh(self) -> None:
        with self._lock:
            now = self.clock()
            if not self._stale(now):  # another thread just did it
                return
            try:
                rows = self.store.runtime_domains()
            except Exception:  # keep serving the last snapshot; the next call retries
                log.exception("cannot read the runtime domains; keeping the previous list")
                self._at = now
                return
            configured = {d.name for d in self._configured}
            extra = [d for d in (from_row(self.settings, r) for r in rows if r.active and r.name not in configured)
                     if d is not None]
            self._set = DomainSet(self._configured + extra)
            self._at = now

    async def arecheck(self, address: str) -> DomainSet:
        return await asyncio.to_thread(self.recheck, address)

    # Look-ups that, on a miss, check whether the name was added meanwhile.

    def get(self, name: str) -> DomainSettings | None:
        found = self.snapshot().get(name)
        return found if found is not None else self.recheck(name).get(name)

    def of(self, address: str) -> DomainSettings | None:
        found = self.snapshot().of(address)
        return found if found is not None else self.recheck(address).of(address)

    async def aget(self, name: str) -> DomainSettings | None:
        found = (await self.current()).get(name)
        return found if found is not None else (await self.arecheck(name)).get(name)

    async def aof(self, address: str) -> DomainSettings | None:
        found = (await self.current()).of(address)
        return found if found is not None else (await self.arecheck(address)).of(address)
