"""`sweep_once` on a real SQLite file: what goes, what stays, and the counters.

Mail is stored with ``Store.ingest`` (the call the ingester makes), with a
body and an attachment row per message, so "gone" can be checked in every
table. The clock is passed in (``now``), never waited for.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from mtasidecar import sweep, tokens
from mtasidecar.config import load
from mtasidecar.ingest.pipeline import UNROUTED
from mtasidecar.store import Message, NewMessage, Store, compress

NOW = 1_800_000_000.0
HOUR, DAY = 3600, 86400

DOMAINS = [
    {"name": "short.test", "retention": HOUR},  # private, messages live an hour
    {"name": "long.test", "retention": 30 * DAY, "subdomains": True},
    {"name": "capped.test", "mode": "public", "max_messages": 3, "max_bytes": 10_000},
    {"name": "open.test", "mode": "public"},
]


def settings_for(tmp_path, domains=DOMAINS):
    return load(environ={"MTASIDECAR_DATA_DIR": str(tmp_path / "data"), "MTASIDECAR_HOSTNAME": "mx.example.test",
                         "MTASIDECAR_DOMAINS": json.dumps(domains)})


@pytest.fixture
def env(tmp_path):
    settings = settings_for(tmp_path)
    store = Store(settings.database_url)
    store.setup()
    store.sync_domains([(d.name, d.subdomains, d.mode) for d in settings.domains])
    yield settings, store
    store.close()


_seq = 0


def put(store: Store, recipient: str, count: int = 1, received_at: float = NOW, size: int = 100,
        attachments: int = 1) -> list[int]:
    """Store ``count`` messages for ``recipient`` the way the ingester does; their ids, oldest first."""
    global _seq
    items = []
    for _ in range(count):
        _seq += 1
        items.append(NewMessage(
            spool_name=f"{int(received_at)}.M{_seq}P1Q{_seq}.mx.example.test", recipient=recipient,
            received_at=received_at, size=size, raw_z=compress(b"x" * size),
            document_z=compress(json.dumps({"text": "x"}).encode()), subject=f"m{_seq}",
            attachments=[{"index": i, "filename": f"a{i}.txt", "content_type": "text/plain", "size": 1,
                          "disposition": "attachment", "content_id": None, "blocked": None}
                         for i in range(attachments)]))
    done = store.ingest(items)
    return [done[m.spool_name] for m in items]


def make_mailbox(store: Store, address: str, expires_at: float | None) -> int:
    domain = address.rpartition("@")[2]
    mailbox = store.create_mailbox(address, domain, tokens.token_hash(tokens.new_token()), expires_at)
    assert mailbox is not None, address
    return mailbox.id


def rows(store: Store, sql: str, *args):
    return store.db.execute_sql(sql, args).fetchall()


def count(store: Store, table: str, where: str = "1", *args) -> int:
    return rows(store, f"SELECT COUNT(*) FROM {table} WHERE {where}", *args)[0][0]


def message_ids(store: Store, address: str) -> list[int]:
    return [r[0] for r in rows(store, "SELECT m.id FROM message m JOIN mailbox b ON b.id = m.mailbox_id "
                                      "WHERE b.address = ? ORDER BY m.id", address)]


def assert_counters_right(store: Store) -> None:
    """message_count and bytes_used match the rows, for every mailbox."""
    wrong = rows(store, "SELECT b.address, b.message_count, b.bytes_used, COUNT(m.id), COALESCE(SUM(m.size), 0) "
                        "FROM mailbox b LEFT JOIN message m ON m.mailbox_id = b.id GROUP BY b.id "
                        "HAVING b.message_count != COUNT(m.id) OR b.bytes_used != COALESCE(SUM(m.size), 0)")
    assert not wrong, wrong


def assert_no_orphans(store: Store) -> None:
    assert count(store, "message_body", "message_id NOT IN (SELECT id FROM message)") == 0
    assert count(store, "attachment", "message_id NOT IN (SELECT id FROM message)") == 0
    assert count(store, "message", "mailbox_id NOT IN (SELECT id FROM mailbox)") == 0
    assert count(store, "token", "mailbox_id NOT IN (SELECT id FROM mailbox)") == 0


# -- expiry ----------------------------------------------------------------------------------

def test_expired_mailboxes_go_with_all_their_rows_live_ones_stay(env):
    settings, store = env
    expired = make_mailbox(store, "old@long.test", NOW - 1)
    expired_sub = make_mailbox(store, "old@q7.long.test", NOW - DAY)
    live = make_mailbox(store, "new@long.test", NOW + HOUR)
    put(store, "old@long.test", 5)
    put(store, "old@q7.long.test", 2, attachments=3)
    kept = put(store, "new@long.test", 4)
    kept_public = put(store, "anyone@open.test", 2)  # made by mail: no expiry
    before = {t: count(store, t) for t in ("message", "message_body", "attachment", "token")}

    counts = sweep.sweep_once(store, settings, NOW)

    assert counts == {"mailboxes": 2, "messages": 7}
    assert count(store, "mailbox", "id IN (?, ?)", expired, expired_sub) == 0
    assert message_ids(store, "old@long.test") == [] and message_ids(store, "old@q7.long.test") == []
    assert message_ids(store, "new@long.test") == kept
    assert message_ids(store, "anyone@open.test") == kept_public
    assert store.mailbox("new@long.test").id == live
    assert {t: count(store, t) for t in ("message", "message_body", "attachment", "token")} == {
        "message": before["message"] - 7, "message_body": before["message_body"] - 7,
        "attachment": before["attachment"] - 5 - 6, "token": before["token"] - 2}
    assert_no_orphans(store)
    assert_counters_right(store)
    # A second pass finds nothing.
    assert sweep.sweep_once(store, settings, NOW) == {"mailboxes": 0, "messages": 0}


def test_expiry_is_by_the_clock_passed_in(env):
    settings, store = env
    make_mailbox(store, "soon@long.test", NOW + 10)
    put(store, "soon@long.test", 3)
    assert sweep.sweep_once(store, settings, NOW) == {"mailboxes": 0, "messages": 0}
    assert sweep.sweep_once(store, settings, NOW + 11) == {"mailboxes": 1, "messages": 3}
    assert store.mailbox("soon@long.test") is None


def test_an_empty_expired_mailbox_goes_too(env):
    settings, store = env
    make_mailbox(store, "empty@short.test", NOW - 1)
    assert sweep.sweep_once(store, settings, NOW) == {"mailboxes": 1, "messages": 0}


def test_small_batches_still_remove_everything(env):
    settings, store = env
    for i in range(12):
        make_mailbox(store, f"box{i}@long.test", NOW - 1)
        put(store, f"box{i}@long.test", 9)
    make_mailbox(store, "live@long.test", NOW + HOUR)
    kept = put(store, "live@long.test", 9)
    counts = sweep.sweep_once(store, settings, NOW, batch=7)
    assert counts == {"mailboxes": 12, "messages": 108}
    assert count(store, "mailbox") == 1 and message_ids(store, "live@long.test") == kept
    assert_no_orphans(store)


def test_each_sweep_transaction_is_small(env):
    """The issue: small batches, so the ingester and the API are never blocked for long."""
    settings, store = env
    for i in range(3):
        make_mailbox(store, f"box{i}@long.test", NOW - 1)
        put(store, f"box{i}@long.test", 20)
    deleted_per_call = []
    original = store.sweep_expired

    def spy(now, batch=500):
        out = original(now, batch)
        deleted_per_call.append(out)
        return out

    store.sweep_expired = spy
    sweep.sweep_once(store, settings, NOW, batch=8)
    assert sum(m for m, _ in deleted_per_call) == 60
    assert all(m <= 8 and b <= 8 for m, b in deleted_per_call), deleted_per_call


# -- retention -------------------------------------------------------------------------------

def test_retention_is_per_domain(env):
    settings, store = env
    make_mailbox(store, "a@short.test", NOW + 2 * DAY)
    make_mailbox(store, "b@long.test", NOW + 2 * DAY)
    old_short = put(store, "a@short.test", 2, received_at=NOW - 2 * HOUR, size=300)
    new_short = put(store, "a@short.test", 1, received_at=NOW - HOUR + 60, size=50)
    old_long = put(store, "b@long.test", 2, received_at=NOW - 2 * HOUR)
    older_long = put(store, "b@long.test", 1, received_at=NOW - 31 * DAY)
    counts = sweep.sweep_once(store, settings, NOW)
    assert counts == {"mailboxes": 0, "messages": 3}
    assert message_ids(store, "a@short.test") == new_short
    assert message_ids(store, "b@long.test") == old_long
    assert not set(old_short + older_long) & set(r[0] for r in rows(store, "SELECT id FROM message"))
    box = store.mailbox("a@short.test")
    assert (box.message_count, box.bytes_used) == (1, 50)
    # The mailboxes themselves live on until they expire.
    assert store.mailbox("b@long.test") is not None
    assert_counters_right(store)
    assert_no_orphans(store)


def test_retention_in_subdomain_mailboxes_and_public_mailboxes(env):
    settings, store = env
    put(store, "x@deep.long.test", 1, received_at=NOW - 31 * DAY)
    put(store, "y@open.test", 1, received_at=NOW - 8 * DAY)  # open.test: the default week
    keep = put(store, "y@open.test", 1, received_at=NOW - 6 * DAY)
    assert sweep.sweep_once(store, settings, NOW)["messages"] == 2
    assert message_ids(store, "x@deep.long.test") == []
    assert message_ids(store, "y@open.test") == keep
    assert_counters_right(store)


def test_unrouted_mail_is_kept_a_week(env):
    settings, store = env
    put(store, UNROUTED, 2, received_at=NOW - sweep.UNROUTED_RETENTION - 1)
    keep = put(store, UNROUTED, 1, received_at=NOW - sweep.UNROUTED_RETENTION + 60)
    # A short-retention domain does not touch unrouted mail.
    assert sweep.sweep_once(store, settings, NOW) == {"mailboxes": 0, "messages": 2}
    assert message_ids(store, UNROUTED) == keep
    assert_counters_right(store)
    assert_no_orphans(store)


def test_mail_of_a_domain_no_longer_configured_is_swept_like_unrouted_mail(tmp_path):
    first = settings_for(tmp_path, DOMAINS + [{"name": "gone.test", "mode": "public"}])
    store = Store(first.database_url)
    store.setup()
    store.sync_domains([(d.name, d.subdomains, d.mode) for d in first.domains])
    put(store, "a@gone.test", 2, received_at=NOW - 30 * DAY)
    later = settings_for(tmp_path)  # gone.test removed
    store.sync_domains([(d.name, d.subdomains, d.mode) for d in later.domains])
    try:
        sweep.sweep_once(store, later, NOW)
        assert message_ids(store, "a@gone.test") == []
    finally:
        store.close()


# -- caps ------------------------------------------------------------------------------------

def test_count_cap_drops_the_oldest(env):
    settings, store = env
    ids = put(store, "many@capped.test", 5, size=100)
    other = put(store, "few@capped.test", 3, size=100)
    counts = sweep.sweep_once(store, settings, NOW)
    assert counts == {"mailboxes": 0, "messages": 2}
    assert message_ids(store, "many@capped.test") == ids[2:]
    assert message_ids(store, "few@capped.test") == other
    box = store.mailbox("many@capped.test")
    assert (box.message_count, box.bytes_used) == (3, 300)
    assert_counters_right(store)
    assert_no_orphans(store)


def test_byte_cap_drops_the_oldest_until_under(env):
    settings, store = env
    big = put(store, "big@capped.test", 1, size=6000)
    small = put(store, "big@capped.test", 1, size=3000)
    newest = put(store, "big@capped.test", 1, size=4000)
    # 13,000 bytes > 10,000: the oldest (6,000) goes; 7,000 stays.
    assert sweep.sweep_once(store, settings, NOW) == {"mailboxes": 0, "messages": 1}
    assert message_ids(store, "big@capped.test") == small + newest
    assert not set(big) & set(message_ids(store, "big@capped.test"))
    box = store.mailbox("big@capped.test")
    assert (box.message_count, box.bytes_used) == (2, 7000)
    assert_counters_right(store)


def test_cap_over_many_batches(env):
    settings, store = env
    ids = put(store, "flood@capped.test", 40, size=10)
    assert sweep.sweep_once(store, settings, NOW, batch=6) == {"mailboxes": 0, "messages": 37}
    assert message_ids(store, "flood@capped.test") == ids[-3:]
    assert_counters_right(store)


def test_caps_leave_other_domains_alone(env):
    settings, store = env
    kept = put(store, "lots@open.test", 8, size=5000)  # open.test: default caps (1000, 100 MB)
    assert sweep.sweep_once(store, settings, NOW)["messages"] == 0
    assert message_ids(store, "lots@open.test") == kept


def test_everything_at_once_keeps_counters_right(env):
    settings, store = env
    make_mailbox(store, "x@short.test", NOW - 1)
    put(store, "x@short.test", 3)
    make_mailbox(store, "y@short.test", NOW + DAY)
    put(store, "y@short.test", 2, received_at=NOW - 2 * HOUR)
    put(store, "y@short.test", 2)
    put(store, "z@capped.test", 6, received_at=NOW - 8 * DAY)  # past the default week too
    put(store, "z@capped.test", 5)
    counts = sweep.sweep_once(store, settings, NOW)
    assert counts == {"mailboxes": 1, "messages": 3 + 2 + 6 + 2}
    assert [len(message_ids(store, a)) for a in ("y@short.test", "z@capped.test")] == [2, 3]
    assert_counters_right(store)
    assert_no_orphans(store)


# -- the loop ----------------------------------------------------------------------------------

def test_run_loop_sweeps_survives_a_failed_pass_and_stops(env, monkeypatch):
    settings, store = env
    make_mailbox(store, "x@long.test", time.time() - 1)
    put(store, "x@long.test", 2)
    calls = []
    real = sweep.sweep_once

    def flaky(store_, settings_, now=None, batch=sweep.BATCH):
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(store_, settings_, now, batch)

    monkeypatch.setattr(sweep, "sweep_once", flaky)

    class QuickStop(threading.Event):
        """The pause between passes (at least a second) cut to 10 ms."""

        def wait(self, timeout=None):
            return super().wait(0.01)

    stop = QuickStop()
    worker = threading.Thread(target=sweep.run, args=(store, settings, 60.0, stop))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive()
    assert len(calls) >= 3
    assert store.mailbox("x@long.test") is None


# -- another process commits in the middle of a sweep transaction ----------------------------

def _commit_from_elsewhere(store: Store) -> None:
    """What the ingester does all the time: commit a write, from another connection.

    If the sweep holds the write lock already (BEGIN IMMEDIATE), this waits and
    gives up, as a concurrent ingester would wait (then go on) in real life.
    """
    path = store.db.database
    other = sqlite3.connect(path, timeout=0.2)
    try:
        with other:
            other.execute("UPDATE domain SET created_at = created_at + 1")  # a real change: a new snapshot
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
    finally:
        other.close()


@pytest.mark.parametrize("what", ["expired", "retention", "cap"])
def test_a_commit_between_the_sweeps_read_and_delete_does_not_fail_it(env, monkeypatch, what):
    settings, store = env
    if what == "expired":
        make_mailbox(store, "x@long.test", NOW - 1)
        put(store, "x@long.test", 3)
    elif what == "retention":
        put(store, "x@short.test", 3, received_at=NOW - 2 * HOUR)
    else:
        put(store, "x@capped.test", 5)
    real_delete = Message.delete  # bound to the class already

    def delete_after_a_commit_elsewhere(*args, **kwargs):
        _commit_from_elsewhere(store)
        return real_delete(*args, **kwargs)

    monkeypatch.setattr(Message, "delete", delete_after_a_commit_elsewhere)
    counts = sweep.sweep_once(store, settings, NOW)
    assert counts["messages"] in (2, 3)


def test_ids_are_never_reused_after_a_sweep(env):
    settings, store = env
    put(store, "keep@open.test", 1)
    make_mailbox(store, "x@long.test", NOW - 1)
    newest = put(store, "x@long.test", 3)[-1]
    sweep.sweep_once(store, settings, NOW)
    (later,) = put(store, "keep@open.test", 1)
    assert later > newest
