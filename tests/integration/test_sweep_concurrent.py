"""The issue's "Must show" for the sweeper: 100,000 messages in 1,000 expired
mailboxes are gone after one sweep, while ingest and API reads keep working
and no "database is locked" reaches anyone.

Real processes on one SQLite file, as production runs them:
* `python -m mtasidecar ingest` watching a Maildir into which a thread drops
  a steady stream of mail (written to tmp/, renamed into new/, as Postfix does);
* `python -m mtasidecar api` (gunicorn) read over HTTP by other threads, for a
  live private mailbox, with its token;
* `python -m mtasidecar sweep --once`, started while both are busy.
The expired rows are bulk-inserted through the peewee models first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


from mtasidecar import tokens
from mtasidecar.config import load, to_environ
from mtasidecar.store import Attachment, Domain, Mailbox, Message, MessageBody, Store, Token, compress
from tests.conftest import ROOT, free_port, http, service_dir, wait_for

EXPIRED_MAILBOXES = 1000
PER_MAILBOX = 100
DOMAIN = "sweep.test"
LIVE = f"live@{DOMAIN}"
LIVE_SEEDED = 50            # messages the live mailbox holds before the sweep (must survive)
DROP_INTERVAL = 0.01        # seconds between two dropped mails
MIN_DROPPED = 100           # at least this many mails arrive while the sweep runs
READERS = 3


def delivered_mail(n: int) -> bytes:
    """A small message as Postfix's virtual(8) leaves it (trace headers first)."""
    return (f"Return-Path: <sender@origin.test>\nX-Original-To: {LIVE}\nDelivered-To: {LIVE}\n"
            f"Received: from helo.origin.test (mail.origin.test [127.0.0.1])\n"
            f"\tby mx.sweep.test (Postfix) with ESMTP id Q{n:08d}\n"
            f"\tfor <{LIVE}>; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)\n"
            f"From: Sender <sender@origin.test>\nTo: {LIVE}\nSubject: stream {n}\n"
            f"Message-ID: <stream.{n}@origin.test>\nDate: Mon, 13 Jan 2025 10:00:00 +0000\n\n"
            f"Message number {n}.\n").encode()


def fast_insert(store: Store, model, fields: list, rows: list[tuple]) -> None:
    """Rows through one prepared INSERT named from the model's metadata (peewee's
    per-row SQL building takes a minute for 200,000 rows). Columns not in
    ``fields`` get the model's defaults, as peewee would give them."""
    given = {f.name for f in fields}  # (peewee fields overload ==: compare names)
    rest = [f for f in model._meta.sorted_fields if f.name not in given and not (f.primary_key and f.name == "id")]
    defaults = tuple(f.db_value(f.default() if callable(f.default) else f.default) for f in rest)
    columns = ", ".join(f'"{f.column_name}"' for f in [*fields, *rest])
    marks = ", ".join("?" for _ in [*fields, *rest])
    store.db.cursor().executemany(f'INSERT INTO "{model._meta.table_name}" ({columns}) VALUES ({marks})',
                                  (row + defaults for row in rows))


def bulk_insert(store: Store, now: float) -> tuple[list[int], int]:
    """1,000 expired mailboxes (each with a token) holding 100 messages each (a body
    each, an attachment row on every tenth), and the live mailbox with LIVE_SEEDED
    messages of its own. Returns (expired mailbox ids, live mailbox id)."""
    domain_id = Domain.get(Domain.name == DOMAIN).id
    live = store.create_mailbox(LIVE, DOMAIN, None, now + 3600)
    raw_z = compress(b"Subject: old\n\nold mail\n")
    doc_z = compress(json.dumps({"text": "old mail\n", "attachments": []}).encode())
    M = Mailbox
    with store.db.atomic():
        fast_insert(store, Mailbox, [M.address, M.domain, M.created_at, M.expires_at, M.message_count, M.bytes_used],
                    [(f"old{i:04d}@{DOMAIN}", domain_id, now - 7200, now - 60 - i, PER_MAILBOX, PER_MAILBOX * 24)
                     for i in range(EXPIRED_MAILBOXES)])
        expired = [i for (i,) in Mailbox.select(Mailbox.id).where(Mailbox.address.startswith("old"))
                   .order_by(Mailbox.id).tuples()]
        fast_insert(store, Token, [Token.token_hash, Token.mailbox, Token.created_at],
                    [(tokens.token_hash(tokens.new_token()), mb, now) for mb in expired])
        messages, next_id = [], 1
        for mailbox_id, address, tag, count in [(live.id, LIVE, "seed", LIVE_SEEDED)] + \
                [(mb, f"old{n:04d}@{DOMAIN}", "old", PER_MAILBOX) for n, mb in enumerate(expired)]:
            messages += [(next_id + k, mailbox_id, f"{tag}.{next_id + k}.mx", now - 3600, address, f"{tag} {k}", 24,
                          int(k % 10 == 0)) for k in range(count)]
            next_id += count
        fast_insert(store, Message, [Message.id, Message.mailbox, Message.spool_name, Message.received_at,
                                     Message.envelope_to, Message.subject, Message.size, Message.has_attachments],
                    messages)
        fast_insert(store, MessageBody, [MessageBody.message, MessageBody.raw, MessageBody.document],
                    [(m[0], raw_z, doc_z) for m in messages])
        A = Attachment
        fast_insert(store, Attachment, [A.message, A.index, A.filename, A.content_type, A.size, A.disposition],
                    [(m[0], 0, "a.txt", "text/plain", 1, "attachment") for m in messages if m[7]])
        Mailbox.update(message_count=LIVE_SEEDED, bytes_used=LIVE_SEEDED * 24).where(Mailbox.id == live.id).execute()
    assert len(expired) == EXPIRED_MAILBOXES
    return expired, live.id


class Stream(threading.Thread):
    """Drops mail into the Maildir at a steady pace until told to stop."""

    def __init__(self, maildir: Path):
        super().__init__(daemon=True)
        self.maildir = maildir
        self.stop = threading.Event()
        self.dropped: list[str] = []   # Message-ID local parts
        self.errors: list[str] = []

    def run(self):
        n = 0
        while not self.stop.is_set():
            name = f"{int(time.time())}.M{n}P{os.getpid()}Q{n}.mx.sweep.test"
            try:
                tmp = self.maildir / "tmp" / name
                tmp.write_bytes(delivered_mail(n))
                os.rename(tmp, self.maildir / "new" / name)
                self.dropped.append(f"stream.{n}")
            except OSError as exc:  # pragma: no cover - reported by the test
                self.errors.append(repr(exc))
            n += 1
            self.stop.wait(DROP_INTERVAL)


class Reader(threading.Thread):
    """Reads the live mailbox over HTTP (list, then the newest message) until told to stop."""

    def __init__(self, base: str, token: str):
        super().__init__(daemon=True)
        self.base, self.headers = base, {"Authorization": f"Bearer {token}"}
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.slowest = 0.0
        self.items: list = []

    def run(self):
        while not self.stop.is_set():
            for path in self._paths():
                started = time.monotonic()
                try:
                    r = http("GET", self.base + path, headers=self.headers, timeout=30)
                except OSError as exc:
                    self.failures.append(f"{path}: {exc!r}")
                    continue
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.statuses.append(r.status)
                if r.status != 200:
                    self.failures.append(f"{path}: {r.status} {r.body[:300]!r}")
                elif path.endswith("limit=5"):
                    self.items = r.json()["items"]

    def _paths(self):
        yield f"/api/v1/mailboxes/{LIVE}/messages?limit=5"
        for item in self.items[:1]:
            yield item["url"]
        yield f"/api/v1/mailboxes/{LIVE}"


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process in its own session (so that stop() can end its children too), stderr to ``log``."""
    with open(log.with_suffix(".out"), "wb") as out, open(log, "wb") as err:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and its children only
            proc.wait()


def test_sweep_of_100000_messages_while_ingest_and_reads_go_on():
    base = service_dir("mtasidecar-sweep-")
    procs: list[subprocess.Popen] = []
    stream: Stream | None = None
    readers: list[Reader] = []
    try:
        settings = load(environ={
            "MTASIDECAR_DATA_DIR": str(base / "data"), "MTASIDECAR_HOSTNAME": "mx.sweep.test",
            "MTASIDECAR_DOMAINS": DOMAIN, "MTASIDECAR_API_PORT": str(free_port()),
            "MTASIDECAR_API_WORKERS": "2", "MTASIDECAR_AUTH_ENABLED": "false",
            "MTASIDECAR_INGEST_WORKERS": "0", "MTASIDECAR_MAILDIR_RESCAN_INTERVAL": "1"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
        env.update(to_environ(settings))
        maildir = settings.maildir_path
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)

        store = Store(settings.database_url)
        store.setup()
        store.sync_domains([(d.name, d.subdomains, d.mode) for d in settings.domains])
        now = time.time()
        started = time.monotonic()
        expired, live_id = bulk_insert(store, now)
        token = tokens.new_token()
        store.add_token(live_id, tokens.token_hash(token))
        insert_s = time.monotonic() - started
        assert Message.select().count() == EXPIRED_MAILBOXES * PER_MAILBOX + LIVE_SEEDED
        store.close()

        logs = base / "logs"
        logs.mkdir()
        procs.append(start([sys.executable, "-m", "mtasidecar", "ingest"], env, logs / "ingest.err"))
        procs.append(start([sys.executable, "-m", "mtasidecar", "api"], env, logs / "api.err"))
        api = f"http://{settings.api.host}:{settings.api.port}"

        def api_up():
            assert all(p.poll() is None for p in procs), [p.args for p in procs if p.poll() is not None]
            try:
                return http("GET", api + "/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(api_up, 30, 0.1, "the API")

        stream = Stream(maildir)
        stream.start()
        readers = [Reader(api, token) for _ in range(READERS)]
        for r in readers:
            r.start()
        # Ingest and reads are under way before the sweep starts.
        wait_for(lambda: len(stream.dropped) >= 20 and all(r.statuses for r in readers), 30, 0.05,
                 "the stream and the readers to get going")

        dropped_before = len(stream.dropped)
        sweep_started = time.monotonic()
        sweep = subprocess.run([sys.executable, "-m", "mtasidecar", "sweep", "--once"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        sweep_s = time.monotonic() - sweep_started
        # Keep both going a little after the sweep, then stop them.
        wait_for(lambda: len(stream.dropped) - dropped_before >= MIN_DROPPED, 30, 0.05, "mail during the sweep")
        time.sleep(0.5)
        stream.stop.set()
        stream.join(10)
        for r in readers:
            r.stop.set()
        for r in readers:
            r.join(60)

        # Every dropped mail is stored, exactly once.
        store = Store(settings.database_url)
        expected = set(stream.dropped)

        def all_stored():
            return not any((maildir / "new").iterdir()) and \
                Message.select().where(Message.message_id.startswith("stream.")).count() >= len(expected)

        wait_for(all_stored, 60, 0.2, "the ingester to store every dropped mail")
        stored = [m for (m,) in Message.select(Message.message_id)
                  .where(Message.message_id.startswith("stream.")).tuples()]
        assert len(stored) == len(set(stored)), "a mail was stored twice"
        assert {m.split("@")[0] for m in stored} == expected
        assert not stream.errors

        # The sweep removed exactly the expired rows, and said so.
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        assert f"swept {EXPIRED_MAILBOXES} mailboxes and {EXPIRED_MAILBOXES * PER_MAILBOX} messages" \
            in sweep.stdout, (sweep.stdout, sweep.stderr[-3000:])
        assert Mailbox.select().where(Mailbox.id.in_(expired)).count() == 0
        assert Message.select().where(Message.mailbox.in_(expired)).count() == 0
        assert Token.select().where(Token.mailbox.in_(expired)).count() == 0
        db = store.db
        for table in ("message_body", "attachment"):
            orphans = db.execute_sql(f"SELECT COUNT(*) FROM {table} WHERE message_id NOT IN "
                                     "(SELECT id FROM message)").fetchone()[0]
            assert orphans == 0, table
        assert [a for (a,) in Mailbox.select(Mailbox.address).tuples()] == [LIVE]
        live = Mailbox.get_by_id(live_id)
        total = LIVE_SEEDED + len(expected)
        assert Message.select().count() == total
        assert Message.select().where(Message.spool_name.startswith("seed.")).count() == LIVE_SEEDED
        assert live.message_count == total
        store.close()

        # Every API read was answered, and answered 200.
        statuses = [s for r in readers for s in r.statuses]
        failures = [f for r in readers for f in r.failures]
        assert not failures, failures[:10]
        assert statuses and set(statuses) == {200}

        # Nobody saw the database locked.
        for p in procs:
            stop(p)
        outputs = {"sweep": sweep.stdout + sweep.stderr}
        for name in ("ingest", "api"):
            outputs[name] = (logs / f"{name}.err").read_text(errors="replace") + \
                (logs / f"{name}.out").read_text(errors="replace")
        for name, text in outputs.items():
            assert "database is locked" not in text.lower(), f"{name}:\n{text[-3000:]}"
            assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"

        print(f"\nbulk insert {insert_s:.1f} s; sweep {sweep_s:.1f} s; {len(expected)} mails ingested, "
              f"{len(statuses)} reads (slowest {max(r.slowest for r in readers) * 1000:.0f} ms)")
    finally:
        if stream is not None:
            stream.stop.set()
        for r in readers:
            r.stop.set()
        for p in procs:
            stop(p)
        shutil.rmtree(base, ignore_errors=True)
