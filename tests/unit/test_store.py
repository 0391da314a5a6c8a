"""The Store on a real SQLite file, fed by the real ingest pipeline.

Ingest in batches, idempotent re-ingest (a crash between commit and unlink
must not duplicate mail), mailboxes created on first mail with the right
domain, counters, cascading deletes, ``domain_of`` and the SQLite pragmas.
"""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from mtasidecar.ingest.pipeline import Pipeline, prepare, spool_name
from mtasidecar.store import Domain, Mailbox, Message, Store, domain_of
from tests.unit.test_api import eml

DOMAINS = [("example.test", False), ("sub.test", True), ("strict.test", False)]


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db' / 'mtasidecar.db'}")
    s.setup()
    s.sync_domains(DOMAINS)
    yield s
    s.close()


@pytest.fixture
def maildir(tmp_path):
    path = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


_counter = 0


def spool(maildir, raw: bytes, name: str | None = None) -> str:
    global _counter
    _counter += 1
    path = maildir / "new" / (name or f"1736762400.M{_counter}P7Q{_counter}.mx.example.test")
    path.write_bytes(raw)
    return str(path)


def prepared(maildir, *raws: bytes, max_size: int = 1 << 20):
    return [prepare(spool(maildir, raw), max_size) for raw in raws]


def count(store, table: str) -> int:
    return store.db.execute_sql(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# -- ingest ---------------------------------------------------------------------------------

def test_ingest_batch(store, maildir):
    raws = [eml("a@example.test", "one"), eml("a@example.test", "two", attachments=(("x.txt", "text/plain", b"x"),)),
            eml("b@example.test", "three")]
    batch = prepared(maildir, *raws)
    ids = store.ingest([p.record for p in batch])
    assert list(ids) == [p.record.spool_name for p in batch]
    assert list(ids.values()) == sorted(ids.values())  # ids follow batch order
    assert store.count_messages() == 3 == count(store, "message_body")
    assert count(store, "attachment") == 1
    assert store.max_message_id() == max(ids.values())
    a = store.mailbox("a@example.test")
    rows = store.list_messages(a.id, 10)
    assert [r["subject"] for r in rows] == ["two", "one"]
    assert (a.message_count, a.bytes_used) == (2, len(raws[0]) + len(raws[1]))
    found, raw = store.get_raw(a.id, ids[batch[1].record.spool_name])
    assert found and raw == raws[1]
    detail = store.get_message(a.id, ids[batch[1].record.spool_name])
    assert detail["document"]["attachments"][0]["filename"] == "x.txt"
    assert detail["envelope_to"] == "a@example.test"


def test_ingest_many_mailboxes_and_names_in_one_batch(store, maildir):
    """More spool names and recipients than one IN (...) list takes: counters stay exact."""
    import mtasidecar.store.hot as hot

    raws = [eml(f"box{i % 7}@example.test", f"m{i}") for i in range(30)]
    batch = prepared(maildir, *raws)
    old = hot._IN_CHUNK
    hot._IN_CHUNK = 4
    try:
        ids = store.ingest([p.record for p in batch[:20]])
        again = store.ingest([p.record for p in batch])  # 20 known, 10 new
    finally:
        hot._IN_CHUNK = old
    assert {k: again[k] for k in ids} == ids and len(again) == 30
    for i in range(7):
        box = store.mailbox(f"box{i}@example.test")
        mine = [raw for j, raw in enumerate(raws) if j % 7 == i]
        assert (box.message_count, box.bytes_used) == (len(mine), sum(map(len, mine)))


def test_ingest_errors_are_peewee_errors(store, maildir):
    """The ingester retries a batch on pw.PeeweeException: the raw-cursor writes raise those too."""
    import peewee as pw

    (p,) = prepared(maildir, eml("a@example.test", "x"))
    store.db.execute_sql('DROP TABLE "message_body"')
    with pytest.raises(pw.PeeweeException):
        store.ingest([p.record])
    assert store.count_messages() == 0  # rolled back


def test_empty_batch(store):
    assert store.ingest([]) == {}
    assert store.count_messages() == 0


def test_reingest_same_spool_names_is_a_no_op(store, maildir):
    raws = [eml("a@example.test", f"m{i}") for i in range(3)]
    batch = prepared(maildir, *raws)
    records = [p.record for p in batch]
    first = store.ingest(records)
    box = store.mailbox("a@example.test")
    before = (box.message_count, box.bytes_used)
    # The same files again (the ingester crashed after commit, before unlink)...
    again = store.ingest([dataclasses.replace(r) for r in records])
    assert again == first
    # ...also mixed with new ones, and with a name given twice in one batch.
    (extra,) = prepared(maildir, eml("a@example.test", "new one"))
    mixed = store.ingest([records[1], extra.record, extra.record, records[0]])
    old = [records[1].spool_name, records[0].spool_name]
    assert {k: mixed[k] for k in old} == {k: first[k] for k in old}
    assert mixed[extra.record.spool_name] > max(first.values())
    assert store.count_messages() == 4
    box = store.mailbox("a@example.test")
    assert (box.message_count, box.bytes_used) == (before[0] + 1, before[1] + extra.record.size)
    assert [r["subject"] for r in store.list_messages(box.id, 10)] == ["new one", "m2", "m1", "m0"]


def test_reingest_through_the_pipeline(store, maildir):
    """A file moved to cur/ with Maildir flags keeps its spool name: stored once."""
    raw = eml("a@example.test", "once")
    path = spool(maildir, raw, "1736762400.M1P1Q1.mx.example.test")
    pipeline = Pipeline(store, maildir, keep=True)
    assert pipeline.commit([prepare(path, 1 << 20)]) == 1
    kept = maildir / "cur" / "1736762400.M1P1Q1.mx.example.test:2,S"
    assert kept.read_bytes() == raw and not (maildir / "new").joinpath(kept.name).exists()
    assert spool_name(kept) == "1736762400.M1P1Q1.mx.example.test"
    pipeline.commit([prepare(str(kept), 1 << 20)])
    # And the same file dropped in new/ again.
    pipeline.commit([prepare(spool(maildir, raw, "1736762400.M1P1Q1.mx.example.test"), 1 << 20)])
    assert store.count_messages() == 1
    assert store.mailbox("a@example.test").message_count == 1


def test_commit_counts_only_new_files(store, maildir):
    pipeline = Pipeline(store, maildir)
    raw = eml("a@example.test", "once")
    assert pipeline.commit([prepare(spool(maildir, raw, "1.M1P1Q1.host"), 1 << 20)]) == 1
    assert pipeline.commit([prepare(spool(maildir, raw, "1.M1P1Q1.host"), 1 << 20)]) == 0


def test_pipeline_retires_files(store, maildir):
    pipeline = Pipeline(store, maildir)
    small, big = eml("a@example.test", "small"), eml("a@example.test", "big", text="x" * 5000)
    batch = [prepare(spool(maildir, small), 2048), prepare(spool(maildir, big, "2.M2P2Q2.host"), 2048)]
    assert [p.disposition for p in batch] == ["remove", "set_aside"]
    pipeline.commit(batch)
    assert list((maildir / "new").iterdir()) == []
    aside = maildir / "setaside" / "2.M2P2Q2.host"
    assert aside.read_bytes() == big
    assert "2048-byte limit" in aside.with_name(aside.name + ".reason").read_text()
    box = store.mailbox("a@example.test")  # the set-aside message is still routed by its trace
    rows = store.list_messages(box.id, 10)
    assert [(r["subject"], r["parse_error"] is not None) for r in rows] == [("", True), ("small", False)]
    assert store.get_raw(box.id, rows[0]["id"]) == (True, None)
    assert (box.message_count, box.bytes_used) == (2, len(small) + len(big))


# -- mailboxes and domains -------------------------------------------------------------------

@pytest.mark.parametrize("address, domain", [
    ("x@example.test", "example.test"),            # exact domain
    ("x@deep.er.sub.test", "sub.test"),            # subdomain of a subdomains=True domain
    ("x@sub.test", "sub.test"),
    ("x@a.example.test", None),                    # subdomain of a subdomains=False domain
    ("x@a.strict.test", None),
    ("x@example.test.evil.com", None),             # look-alikes
    ("x@evilexample.test", None),
    ("x@evilsub.test", None),
    ("x@unknown.test", None),
])
def test_mailbox_created_with_its_domain(store, maildir, address, domain):
    store.ingest([p.record for p in prepared(maildir, eml(address))])
    box = store.mailbox(address)
    assert box is not None
    assert (box.domain.name if box.domain else None) == domain
    # Made by mail: public domains keep it until retention; private ones make it expired at once.
    private = box.domain is not None and box.domain.mode == "private"
    assert box.created_at > 0 and box.expires_at == (box.created_at if private else None)


def test_addresses_are_stored_lower_case(store, maildir):
    store.ingest([p.record for p in prepared(maildir, eml("MiXed@Example.TEST"))])
    assert store.mailbox("mixed@example.test").domain.name == "example.test"
    assert store.mailbox("MiXed@Example.TEST") is None  # callers lower-case first (the API does)


def test_counters_after_delete(store, maildir):
    raws = [eml("a@example.test", f"m{i}", attachments=(("f.txt", "text/plain", b"data"),)) for i in range(3)]
    ids = list(store.ingest([p.record for p in prepared(maildir, *raws)]).values())
    box = store.mailbox("a@example.test")
    assert (box.message_count, box.bytes_used) == (3, sum(map(len, raws)))
    assert store.delete_message(box.id, ids[1]) is True
    assert store.delete_message(box.id, ids[1]) is False  # already gone: counters untouched
    box = store.mailbox("a@example.test")
    assert (box.message_count, box.bytes_used) == (2, len(raws[0]) + len(raws[2]))
    # Body and attachments went with it (foreign keys are on).
    assert count(store, "message_body") == 2 and count(store, "attachment") == 2
    assert store.get_message(box.id, ids[1]) is None and store.get_raw(box.id, ids[1]) == (False, None)
    for mid in (ids[0], ids[2]):
        store.delete_message(box.id, mid)
    box = store.mailbox("a@example.test")
    assert (box.message_count, box.bytes_used) == (0, 0)


def test_one_mailbox_cannot_touch_anothers_messages(store, maildir):
    ids = store.ingest([p.record for p in prepared(maildir, eml("a@example.test"), eml("b@example.test"))])
    a_msg, b_msg = ids.values()
    a, b = store.mailbox("a@example.test"), store.mailbox("b@example.test")
    assert store.get_message(a.id, b_msg) is None
    assert store.get_raw(a.id, b_msg) == (False, None)
    assert store.set_seen(a.id, b_msg, True) is False
    assert store.delete_message(a.id, b_msg) is False
    assert store.count_messages() == 2 and store.mailbox("b@example.test").message_count == 1
    assert store.set_seen(b.id, b_msg, True) is True
    assert Message.get_by_id(b_msg).seen is True


def test_keyset_listing(store, maildir):
    ids = list(store.ingest([p.record for p in prepared(maildir, *(eml("a@example.test", f"m{i}")
                                                                     for i in range(5)))]).values())
    box = store.mailbox("a@example.test")
    assert [r["id"] for r in store.list_messages(box.id, 2)] == ids[::-1][:2]
    assert [r["id"] for r in store.list_messages(box.id, 2, before_id=ids[3])] == [ids[2], ids[1]]
    assert store.list_messages(box.id, 10, before_id=ids[0]) == []


def test_sync_domains(store):
    assert [(d.name, d.subdomains) for d in store.list_domains()] == sorted(DOMAINS)
    store.sync_domains([("example.test", True), ("new.test", False)])
    assert [(d.name, d.subdomains) for d in store.list_domains()] == [("example.test", True), ("new.test", False)]
    assert Domain.get(Domain.name == "sub.test").active is False  # kept for its mailboxes, not listed
    store.sync_domains(DOMAINS)
    assert {d.name for d in store.list_domains()} == {"example.test", "sub.test", "strict.test"}
    assert Domain.select().count() == 4


# -- domain_of ------------------------------------------------------------------------------

DOMAIN_MAP = {"example.test": False, "sub.test": True, "a.sub.test": False, "co.uk.test": True}


@pytest.mark.parametrize("address, expected", [
    ("x@example.test", "example.test"),
    ("x@a.example.test", None),           # subdomains not accepted there
    ("x@sub.test", "sub.test"),
    ("x@b.sub.test", "sub.test"),
    ("x@c.b.sub.test", "sub.test"),
    ("x@a.sub.test", "a.sub.test"),       # configured itself: exact match first
    ("x@z.a.sub.test", "sub.test"),       # a.sub.test takes no subdomains, its parent does
    ("x@example.test.evil.com", None),
    ("x@evilexample.test", None),
    ("x@xsub.test", None),
    ("x@test", None),
    ("x@", None),
    ("x@.sub.test", "sub.test"),
    ("example.test", "example.test"),     # no @: the whole string is the host
    ("x@EXAMPLE.TEST", None),             # callers lower-case addresses before asking
    ("x@y@b.sub.test", "sub.test"),       # the host is what follows the last @
])
def test_domain_of(address, expected):
    assert domain_of(address, DOMAIN_MAP) == expected


def test_domain_of_nothing_configured():
    assert domain_of("x@example.test", {}) is None


# -- the database itself -------------------------------------------------------------------

def test_sqlite_pragmas(store, tmp_path):
    db_path = tmp_path / "db" / "mtasidecar.db"
    assert db_path.exists()
    assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.db.execute_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    # WAL is a property of the file: another connection sees it too.
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_setup_is_idempotent_and_data_survives_reopening(store, maildir, tmp_path):
    ids = store.ingest([p.record for p in prepared(maildir, eml("a@example.test", "kept"))])
    store.setup()
    store.close()
    again = Store(store.url)
    again.setup()
    box = again.mailbox("a@example.test")
    assert [r["id"] for r in again.list_messages(box.id, 10)] == list(ids.values())
    assert Mailbox.select().count() == 1
    again.close()


def test_setup_adds_columns_an_older_database_lacks(tmp_path):
    """A database made by an older release gets the newer columns in place, data kept."""
    import sqlite3
    path = tmp_path / "old.db"
    s = Store(f"sqlite:///{path}")
    s.setup()
    s.sync_domains(DOMAINS)
    con = sqlite3.connect(path)
    con.execute("INSERT INTO mailbox (address, created_at, message_count, bytes_used) VALUES ('a@example.test', 1, 0, 0)")
    con.execute("ALTER TABLE message DROP COLUMN quarantined")
    con.execute("ALTER TABLE message DROP COLUMN has_code")
    con.commit()
    s.setup()
    columns = {row[1] for row in con.execute("PRAGMA table_info(message)")}
    assert {"quarantined", "has_code"} <= columns
    assert con.execute("SELECT address FROM mailbox").fetchall() == [("a@example.test",)]
