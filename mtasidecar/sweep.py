"""`mtasidecar sweep`: expiry of mailboxes and messages.

Deletes in small transactions (a few hundred rows each) so the ingester and
the API's writers wait milliseconds at most, never for a whole sweep; SQLite's
busy timeout covers those waits, so "database is locked" reaches nobody.

What goes:
- expired mailboxes (private domains: their lifetime; API-made mailboxes on
  public domains too) with all their messages;
- messages older than their domain's ``retention``;
- the oldest messages of mailboxes over ``max_messages`` / ``max_bytes``.
"""

from __future__ import annotations

import logging
import threading
import time

from .config import Settings
from .domains import DomainRegistry
from .store import Store
from .store.models import Domain

log = logging.getLogger(__name__)

BATCH = 500
# Without a configured domain (mail that arrived unrouted), keep a week.
UNROUTED_RETENTION = 7 * 86400


def _drain(step) -> int:
    total = 0
    while True:
        n = step()
        if not n:
            return total
        total += n


def sweep_once(store: Store, settings: Settings, now: float | None = None, batch: int = BATCH) -> dict:
    now = time.time() if now is None else now
    counts = {"messages": 0, "mailboxes": 0}

    def expired_step():
        messages, mailboxes = store.sweep_expired(now, batch)
        counts["messages"] += messages
        counts["mailboxes"] += mailboxes
        return messages + mailboxes

    _drain(expired_step)
    ids = dict(Domain.select(Domain.name, Domain.id).tuples())
    served = DomainRegistry(settings, store).snapshot()  # configured + active runtime domains
    for domain in served:
        domain_id = ids.get(domain.name)
        if domain_id is None:
            continue
        counts["messages"] += _drain(lambda: store.sweep_old_messages(domain_id, now - domain.retention, batch))
        counts["messages"] += _drain(lambda: store.sweep_over_cap(domain_id, domain.max_messages,
                                                                  domain.max_bytes, batch))
    for name, domain_id in ids.items():
        if served.get(name) is None:  # removed from the configuration or disabled: its mail is unrouted now
            counts["messages"] += _drain(lambda: store.sweep_old_messages(domain_id, now - UNROUTED_RETENTION, batch))
    counts["messages"] += _drain(lambda: store.sweep_old_messages(None, now - UNROUTED_RETENTION, batch))
    return counts


def run(store: Store, settings: Settings, interval: float, stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            counts = sweep_once(store, settings)
            if counts["messages"] or counts["mailboxes"]:
                log.info("swept %(mailboxes)d mailboxes and %(messages)d messages", counts)
        except Exception:  # a bad pass must not end the loop; the next one retries
            log.exception("sweep failed")
        stop.wait(max(1.0, interval - (time.monotonic() - started)))
