"""Crash safety of the ingester: SIGKILL at any moment, a locked database.

A private Postfix (virtual(8) into the Maildir) and ``python -m mtasidecar
ingest`` as a separate process, configured exactly as production: the
environment comes from ``mtasidecar.config.to_environ(settings)``. The
database is then read directly with sqlite3.

The promise under test (docs: "the Maildir is the durable queue"): a file
leaves new/ only after its row is committed, and a file stored before a crash
is not stored again after it, so every accepted message is in the database
exactly once, whatever happens to the ingester.

Needs root, postfix and postfix-pcre.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mtasidecar.config import load, to_environ
from mtasidecar.mta.instance import PostfixInstance
from mtasidecar.store import decompress
from tests.conftest import ROOT, free_port, wait_for
from tests.integration._service import crlf, lf, passable_dir, split_delivered

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

DOMAIN = "example.test"
SENDER = "load@sender.test"
MESSAGES = 2000
CONNECTIONS = 4
MIN_KILLS = 5


class IngesterProcess:
    """``python -m mtasidecar ingest`` in its own process group.

    The ingester parses in a pool of worker processes (forkserver). SIGKILL
    hits the ingester alone, like the OOM killer would; its orphaned helpers
    are then swept by process group, so that they neither pile up over the
    many kills nor outlive the test (see test_workers_exit_with_a_killed_ingester).
    """

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.groups: list[int] = []
        self.kills = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mtasidecar", "ingest"], env=self.env, cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sweep: bool = True) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.kills += 1
        if sweep:
            _killpg(self.proc.pid)

    def stop(self) -> int:
        """SIGTERM: the clean shutdown. Returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            _killpg(self.proc.pid)

    def cleanup(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        for pgid in self.groups:
            _killpg(pgid)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return out


class Rig:
    """A private Postfix, a Maildir, a database and an ingester (not started)."""

    def __init__(self, base: Path, logs: Path):
        self.base = base
        self.settings = load(environ={}, overrides={
            "data_dir": str(base / "data"),
            "hostname": "mx.crash.test",
            "domains": [{"name": DOMAIN, "subdomains": False, "mode": "public"}],
            # Sender checks (DNS) are beside the point here; off keeps the
            # test independent of the machine's resolver.
            "auth": {"enabled": False},
        })
        self.maildir = self.settings.maildir_path
        self.db_path = base / "data" / "mtasidecar.db"
        self.postfix = PostfixInstance(base / "postfix", free_port(), [(DOMAIN, False)], self.maildir,
                                       hostname="mx.crash.test")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
        env.update(to_environ(self.settings))
        self.ingester = IngesterProcess(env, logs / "ingest.log")
        self.logs = logs

    def __enter__(self) -> Rig:
        self.postfix.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ingester.cleanup()
        finally:
            try:
                self.postfix.stop()
            finally:
                if self.postfix.log_path.exists():
                    shutil.copy(self.postfix.log_path, self.logs / "postfix.log")
                # SIGKILLed members take a moment to be gone (and reaped by init).
                deadline = time.monotonic() + 15
                while (leftover := [pid for pgid in self.ingester.groups for pid in _group_members(pgid)]) \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                shutil.rmtree(self.base, ignore_errors=True)
        assert self.postfix.processes() == [], "Postfix processes left behind"
        assert not leftover, f"ingester processes left behind: {leftover}"

    # -- observing -------------------------------------------------------------

    def spool_waiting(self) -> int:
        return len(os.listdir(self.maildir / "new"))

    def stored_count(self) -> int:
        if not self.db_path.exists():
            return 0
        try:
            with sqlite3.connect(self.db_path, timeout=30) as db:
                return db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
        except sqlite3.OperationalError:  # schema not there yet
            return 0

    def postfix_queue_empty(self) -> bool:
        queue = self.postfix.queue_dir
        return not any(any(files) for sub in ("incoming", "active", "deferred", "hold")
                       for _, _, files in os.walk(queue / sub))

    def rows(self) -> list[tuple]:
        with sqlite3.connect(self.db_path, timeout=30) as db:
            return db.execute(
                "SELECT m.subject, m.spool_name, m.envelope_to, m.parse_error, b.raw "
                "FROM message m JOIN message_body b ON b.message_id = m.id").fetchall()

    def mailbox_counts(self) -> tuple[dict, dict]:
        """(message_count kept on each mailbox row, messages actually there)."""
        with sqlite3.connect(self.db_path, timeout=30) as db:
            kept = dict(db.execute("SELECT address, message_count FROM mailbox"))
            real = dict(db.execute("SELECT mb.address, COUNT(m.id) FROM mailbox mb "
                                   "LEFT JOIN message m ON m.mailbox_id = mb.id GROUP BY mb.id"))
        return kept, real


def make_messages(n: int, run: str) -> list[tuple[str, str, bytes]]:
    """(marker, recipient, wire bytes) for n distinct messages."""
    out = []
    for i in range(n):
        marker = f"crash-{run}-{i:05d}"
        recipient = f"r{i % 10}@{DOMAIN}"
        body = f"marker {marker}\n" + "".join(f"line {j} of message {i}\n" for j in range(i % 7))
        wire = crlf((f"From: Load <{SENDER}>\nTo: {recipient}\nSubject: {marker}\n"
                     f"Message-ID: <{marker}@sender.test>\nMIME-Version: 1.0\n"
                     f"Content-Type: text/plain; charset=us-ascii\n\n{body}").encode())
        out.append((marker, recipient, wire))
    return out


def send_all(port: int, messages: list[tuple[str, str, bytes]], connections: int = CONNECTIONS) -> None:
    """Send over ``connections`` parallel SMTP sessions; every message must get a 250."""

    def worker(share):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="load.test", timeout=60) as smtp:
            for _marker, recipient, wire in share:
                assert smtp.sendmail(SENDER, [recipient], wire) == {}

    shares = [messages[k::connections] for k in range(connections)]
    with ThreadPoolExecutor(connections) as pool:
        for fut in [pool.submit(worker, share) for share in shares]:
            fut.result()


def check_stored_exactly_once(rig: Rig, messages: list[tuple[str, str, bytes]]) -> None:
    rows = rig.rows()
    by_marker = {marker: (recipient, wire) for marker, recipient, wire in messages}
    counts = collections.Counter(subject for subject, *_ in rows)
    missing = sorted(set(by_marker) - set(counts))
    doubled = sorted(m for m, c in counts.items() if c > 1)
    strangers = sorted(set(counts) - set(by_marker))
    assert not missing, f"{len(missing)} lost, e.g. {missing[:5]}"
    assert not doubled, f"{len(doubled)} stored twice, e.g. {doubled[:5]}"
    assert not strangers, strangers[:5]
    assert len(rows) == len(messages)
    assert len({spool for _, spool, *_ in rows}) == len(rows)
    for subject, _spool, envelope_to, parse_error, raw_z in rows:
        recipient, wire = by_marker[subject]
        assert envelope_to == recipient
        assert parse_error is None, (subject, parse_error)
        raw = decompress(raw_z)
        # Well formed and complete: Postfix's trace, then exactly what was sent.
        trace, rest = split_delivered(raw)
        assert trace["delivered_to"].decode() == recipient
        assert rest == lf(wire), subject
    kept, real = rig.mailbox_counts()
    assert kept == real, "mailbox message_count disagrees with the rows"
    assert sum(real.values()) == len(messages)


@pytest.fixture
def rig(tmp_path):
    with Rig(passable_dir("mtasidecar-crash-"), tmp_path) as r:
        yield r


def test_sigkill_during_delivery_loses_and_doubles_nothing(rig):
    messages = make_messages(MESSAGES, uuid.uuid4().hex[:8])
    rng = random.Random(7)
    sending_done = threading.Event()
    stop_killing = threading.Event()
    killer_error: list[BaseException] = []
    kill_log: list[tuple[int, int]] = []  # (stored by the killed ingester, files left in new/)

    def killer():
        try:
            while not stop_killing.is_set():
                # Until all is sent and there were at least MIN_KILLS.
                if sending_done.is_set() and rig.ingester.kills >= MIN_KILLS:
                    return
                started_with = rig.stored_count()
                stop_killing.wait(rng.uniform(0.3, 1.0))
                # Kill an ingester that is at work: it has stored something
                # since its start (unless there is nothing left to store).
                while not stop_killing.is_set() and rig.stored_count() == started_with \
                        and (rig.spool_waiting() or not sending_done.is_set()):
                    time.sleep(0.02)
                if stop_killing.is_set():
                    return
                rig.ingester.kill()
                kill_log.append((rig.stored_count() - started_with, rig.spool_waiting()))
                rig.ingester.start()
        except BaseException as exc:  # reported by the test thread
            killer_error.append(exc)

    rig.ingester.start()
    thread = threading.Thread(target=killer, name="ingester-killer")
    thread.start()
    try:
        send_all(rig.postfix.smtp_port, messages)
        sending_done.set()
        # The killer goes on until there were MIN_KILLS.
        thread.join(timeout=300)
        assert not thread.is_alive(), "the killer did not finish"
    finally:
        stop_killing.set()
        thread.join(timeout=30)
    assert not killer_error, killer_error
    assert rig.ingester.kills >= MIN_KILLS

    # A clean start must finish the job: Postfix has delivered everything,
    # new/ empties, and every message is there once.
    if not rig.ingester.alive():
        rig.ingester.start()
    wait_for(rig.postfix_queue_empty, 120, 0.2, "Postfix to deliver everything")
    wait_for(lambda: rig.spool_waiting() == 0 and rig.stored_count() >= MESSAGES, 180, 0.2,
             "the ingester to store the backlog")
    assert rig.ingester.alive()
    assert rig.ingester.stop() == 0, "a clean SIGTERM shutdown exits 0"
    assert rig.spool_waiting() == 0
    assert not (rig.maildir / "setaside").exists()
    check_stored_exactly_once(rig, messages)
    print(f"{MESSAGES} messages, {rig.ingester.kills} SIGKILLs of the ingester; "
          f"(stored by it, left in new/) at each kill: {kill_log}")


def test_locked_database_loses_and_doubles_nothing(rig):
    messages = make_messages(420, uuid.uuid4().hex[:8])
    before, during, after = messages[:20], messages[20:400], messages[400:]
    rig.ingester.start()
    send_all(rig.postfix.smtp_port, before, connections=1)
    wait_for(lambda: rig.stored_count() == len(before) and rig.spool_waiting() == 0, 60, 0.1,
             "the first messages to be stored")

    # Another writer takes the database and keeps it while mail arrives. It
    # writes too, so the ingester's read snapshot goes stale (SQLITE_BUSY_SNAPSHOT).
    locker = sqlite3.connect(rig.db_path, timeout=30, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        locker.execute("CREATE TABLE IF NOT EXISTS lock_probe (x INTEGER)")
        locker.execute("INSERT INTO lock_probe VALUES (1)")
        send_all(rig.postfix.smtp_port, during, connections=2)
        # Everything has reached new/ and nothing more was committed.
        wait_for(lambda: rig.spool_waiting() == len(during), 60, 0.1, "the mail to reach new/")
        time.sleep(3)  # the lock is held "for a few seconds" while the ingester tries
        assert locker.execute("SELECT COUNT(*) FROM message").fetchone()[0] == len(before)
        assert rig.spool_waiting() == len(during), "files must stay in the spool while uncommitted"
        assert rig.ingester.alive()
        locker.execute("COMMIT")
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()

    wait_for(lambda: rig.stored_count() == len(before) + len(during) and rig.spool_waiting() == 0, 120, 0.1,
             "the ingester to catch up after the lock")
    assert rig.ingester.alive(), "the ingester survived the locked database"
    send_all(rig.postfix.smtp_port, after, connections=1)
    wait_for(lambda: rig.stored_count() == 420 and rig.spool_waiting() == 0, 60, 0.1,
             "mail after the lock to be stored")
    assert rig.ingester.stop() == 0
    check_stored_exactly_once(rig, before + during + after)


def test_workers_exit_with_a_killed_ingester(rig):
    ingester = rig.ingester
    ingester.start()
    # A backlog larger than the inline limit makes the ingester use its pool.
    send_all(rig.postfix.smtp_port, make_messages(200, uuid.uuid4().hex[:8]), connections=2)
    wait_for(lambda: rig.spool_waiting() == 0 and rig.stored_count() == 200, 60, 0.1, "the backlog")
    pgid = ingester.proc.pid
    assert len(_group_members(pgid)) > 1, "the ingester runs worker processes"
    ingester.kill(sweep=False)
    wait_for(lambda: not _group_members(pgid), 8, 0.2, "the ingester's helpers to exit on their own")
