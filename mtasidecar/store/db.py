"""Open a database from a URL and set it up once.

SQLite gets WAL (readers never wait for the ingester's writes), NORMAL
synchronous (durable across process crashes; a power cut may lose the last
commits, which the Maildir still holds since files leave it only after a
commit) and a busy timeout so concurrent writers wait instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import peewee as pw
from playhouse import db_url
from playhouse.migrate import SchemaMigrator, migrate

from .models import MODELS, database

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    # Small page cache per connection: the file is memory-mapped anyway, and
    # every API thread has its own connection (32 MB each cost ~200 MB per worker).
    "cache_size": -4000,
    "temp_store": "memory",
    # Let SQLite map the file: list scans then cost no read() syscalls.
    "mmap_size": 1 << 30,
}
BUSY_TIMEOUT_S = 15


def open_database(url: str) -> pw.Database:
    """A peewee database for ``url``, bound to our models (not yet connected)."""
    scheme = urlparse(url).scheme
    if scheme in ("sqlite", "sqliteext"):
        # playhouse's convention: sqlite:///relative.db, sqlite:////abs/path.db
        path = url.split("://", 1)[1][1:]
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # IMMEDIATE: a transaction takes the write lock when it begins, waiting (busy timeout) for
        # other writers. A DEFERRED one that reads, then writes, fails at once with "database is
        # locked" (SQLITE_BUSY_SNAPSHOT) if another process committed in between.
        db = pw.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, timeout=BUSY_TIMEOUT_S, lock_type="IMMEDIATE")
    else:
        db = db_url.connect(url)
    database.initialize(db)
    return db


def create_schema(db: pw.Database) -> None:
    """Create missing tables and indexes, and add columns newer code expects.

    Safe to run again. create_tables(safe=True) leaves an existing table as
    it is, so a database made by an older release would lack new columns;
    every column added since has a default or is nullable, which lets
    playhouse.migrate add it in place.
    """
    with db.connection_context():
        db.create_tables(MODELS, safe=True)
        migrator = SchemaMigrator.from_database(db)
        for model in MODELS:
            table = model._meta.table_name
            present = {c.name for c in db.get_columns(table)}
            missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
            if missing:
                with db.atomic():
                    migrate(*(migrator.add_column(table, f.column_name, f) for f in missing))
