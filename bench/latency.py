"""`python -m bench latency`: from Postfix's "250" to the message being visible.

With the service running (`python -m mtasidecar dev`), one persistent SMTP
connection sends at a steady --rate (one message per transaction, on a fixed
schedule; a late send goes at once, never in a burst), each message to a
fresh address, and the time of each final "250" reply is recorded. Then:

* file:  inotify on Maildir/new/ sees virtual(8)'s file (name = spool_name)
* DB:    a read-only SQLite connection runs ``PRAGMA data_version`` every
         --db-poll-ms and, when it changed, ``SELECT id, envelope_to,
         spool_name FROM message WHERE id > last``: the row is committed
* API:   for every --api-sample-th message, a thread GETs
         /api/v1/mailboxes/{addr}/messages?limit=10 every --api-poll-ms from
         the 250 on until the message is listed: the check that what the DB
         shows is what a client gets

Reported: p50 / p95 / p99 / max of 250 → file, file → row, 250 → row and
250 → API (sample), and the CPU the watchers cost. Targets (250 → visible):
p50 ≤ 25 ms, p99 ≤ 100 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import sqlite3
import threading
import time

from . import common as C
from .inotify import DirWatcher
from .smtp import Connection, Mail, send_parallel, to_wire

TARGET_P50_MS = 25
TARGET_P99_MS = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=50, help="messages per second")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--api-sample", type=int, default=5, help="verify every k-th message through the API")
    p.add_argument("--api-poll-ms", type=float, default=2)
    p.add_argument("--db-poll-ms", type=float, default=1)
    p.add_argument("--warmup", type=int, default=200,
                   help="messages sent in a burst (and awaited) before measuring")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet-wait", type=float, default=120)
    p.add_argument("--keep", action="store_true")
    C.add_auth_argument(p)
    C.add_mode_argument(p)


class DbWatcher:
    """Arrival time of every new row, keyed by envelope_to (each message has its own address)."""

    def __init__(self, db, interval: float):
        self.db, self.interval = db, interval
        self.seen: dict[str, tuple[float, str]] = {}   # envelope_to → (time, spool_name)
        self.polls = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self.last_id = 0
        self.thread = threading.Thread(target=self._run, name="db-watcher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t_cpu = time.thread_time()
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None,
                              check_same_thread=False, timeout=5)
        try:
            version = None
            while not self._stop.is_set():
                v = con.execute("PRAGMA data_version").fetchone()[0]
                self.polls += 1
                if v != version:
                    version = v
                    rows = con.execute("SELECT id, envelope_to, spool_name FROM message WHERE id > ? ORDER BY id",
                                       (self.last_id,)).fetchall()
                    now = time.monotonic()
                    for mid, to, spool in rows:
                        self.seen.setdefault(to, (now, spool))
                        self.last_id = max(self.last_id, mid)
                time.sleep(self.interval)
        finally:
            con.close()
            self.cpu_s = time.thread_time() - t_cpu

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


class ApiSampler:
    """Threads that poll a mailbox's list from its 250 on until the message shows."""

    def __init__(self, port: int, interval: float, threads: int = 3, timeout: float = 10,
                 tokens: dict[str, str] | None = None):
        self.port, self.interval, self.timeout = port, interval, timeout
        self.tokens = tokens or {}
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.visible: dict[str, float] = {}
        self.requests = 0
        self.cpu_s = 0.0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"api-{k}") for k in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, address: str) -> None:
        self.q.put(address)

    def _run(self) -> None:
        t_cpu = time.thread_time()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            while True:
                address = self.q.get()
                if address is None:
                    return
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline:
                    try:
                        token = self.tokens.get(address)
                        conn.request("GET", f"/api/v1/mailboxes/{address}/messages?limit=10",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
                        r = conn.getresponse()
                        body = r.read()
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                        continue
                    with self.lock:
                        self.requests += 1
                    if r.status == 200 and json.loads(body)["items"]:
                        with self.lock:
                            self.visible[address] = time.monotonic()
                        break
                    time.sleep(self.interval)
                else:
                    self.failures.append(address)
        finally:
            conn.close()
            with self.lock:
                self.cpu_s += time.thread_time() - t_cpu

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join(timeout=15)


def _stats(values_ms: list[float]) -> list[str]:
    if not values_ms:
        return ["-"] * 5
    return [str(len(values_ms))] + [f"{C.pct(values_ms, q):.1f}" for q in (50, 95, 99)] + [f"{max(values_ms):.1f}"]


def run(args, argv: list[str]) -> C.Report:
    from .dns import BenchDNS
    from .service import DevService

    report = C.Report("latency", argv, C.machine_info())
    n = int(args.rate * args.seconds)
    msgs = C.corpus(max(n + args.warmup, 100), seed=args.seed)
    tag = f"{int(time.time()) % 100000:05d}"
    mails = [Mail(C.sender_of(m), f"lat{tag}-{i:05d}@bench.test", to_wire(m), key=i)
             for i, m in enumerate(msgs[:n + args.warmup])]
    warm, mails = mails[:args.warmup], mails[args.warmup:]
    dns = BenchDNS().start()
    svc = None
    watcher = dbw = api = conn = sampler = None
    sent: dict[str, float] = {}
    late: list[float] = []
    try:
        svc = DevService(dns.server, args.auth == "on", args.keep, prefix="latency-", mode=args.mode).start()
        tokens = svc.mailboxes([m.recipient for m in warm + mails])  # private domain: made first
        busy = C.wait_quiet(args.quiet_wait)
        # Warm-up, in a burst over 4 connections: the ingester prepares a
        # backlog in its worker processes, which start on first use (a
        # trickle is prepared inline); caches fill, first-time costs are paid.
        dbw = DbWatcher(svc.db_path, args.db_poll_ms / 1000)
        res = send_parallel("127.0.0.1", svc.smtp_port, warm, 4, timeout=120)
        if res.errors:
            raise C.BenchError(f"warm-up: {res.errors[:3]}")
        conn = Connection("127.0.0.1", svc.smtp_port)
        C.wait_until(lambda: all(m.recipient in dbw.seen for m in warm), 60, 0.05, "the warm-up messages")
        watcher = DirWatcher(svc.maildir / "new")
        api = ApiSampler(svc.http_port, args.api_poll_ms / 1000, tokens=tokens)
        sampler = C.TreeSampler(svc.proc.pid, 0.5)
        sampler.sample()
        sampler.start()
        cpu_before = {p.pid: p.cpu_s for p in sampler.procs.values()}
        t0 = time.monotonic() + 0.05
        interval = 1 / args.rate
        for i, m in enumerate(mails):
            target = t0 + i * interval
            now = time.monotonic()
            if now < target:
                time.sleep(target - now)
            else:
                late.append((now - target) * 1000)
            sent[m.recipient] = conn.send(m)
            if args.api_sample and i % args.api_sample == 0:
                api.submit(m.recipient)
        t_sent = time.monotonic()
        C.wait_until(lambda: all(r in dbw.seen for r in sent), 30, 0.05, "every message in the DB")
        api.close()
        sampler.stop()
        cpu_after = {p.pid: p.cpu_s for p in sampler.procs.values()}
    finally:
        for closer in (lambda: conn and conn.close(), lambda: watcher and watcher.close(),
                       lambda: dbw and dbw.stop(), lambda: api and api.close(),
                       lambda: sampler and not sampler._stop.is_set() and sampler.stop(),
                       lambda: svc and svc.stop(), dns.stop):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"cleanup: {exc}")

    to_file, file_to_db, to_db, to_api = [], [], [], []
    for rcpt, t250 in sent.items():
        t_db, spool = dbw.seen[rcpt]
        to_db.append((t_db - t250) * 1000)
        t_file = watcher.times.get(spool)
        if t_file is not None:
            to_file.append((t_file - t250) * 1000)
            file_to_db.append((t_db - t_file) * 1000)
        if rcpt in api.visible:
            to_api.append((api.visible[rcpt] - t250) * 1000)
    achieved = len(sent) / (t_sent - t0)
    t = C.Table(["interval", "messages", "p50 ms", "p95 ms", "p99 ms", "max ms", "target"],
                title=f"{len(sent)} messages at {args.rate:g}/s (achieved {achieved:.1f}/s) over one SMTP "
                      "connection, each to a fresh address")
    t.add("250 → file in new/ (Postfix delivery)", *_stats(to_file), "")
    t.add("file in new/ → row committed (ingest)", *_stats(file_to_db), "")
    p50, p99 = C.pct(to_db, 50), C.pct(to_db, 99)
    t.add("**250 → row committed (visible)**", *_stats(to_db),
          f"p50 ≤ {TARGET_P50_MS}: {C.yes(p50 <= TARGET_P50_MS)}, p99 ≤ {TARGET_P99_MS}: "
          f"{C.yes(p99 <= TARGET_P99_MS)}")
    a50, a99 = C.pct(to_api, 50), C.pct(to_api, 99)
    t.add(f"250 → listed by the API (every {args.api_sample}th)", *_stats(to_api),
          f"p50 ≤ {TARGET_P50_MS}: {C.yes(a50 <= TARGET_P50_MS)}, p99 ≤ {TARGET_P99_MS}: "
          f"{C.yes(a99 <= TARGET_P99_MS)}")
    report.tables.append(t)
    t2 = C.Table(C.PROC_COLUMNS[:2] + ["CPU s during the run", "CPU % of one core"],
                 title="CPU of the service's processes during the measured run (Postfix not included)")
    dur = t_sent - t0
    for pid, cpu in sorted(cpu_after.items()):
        used = cpu - cpu_before.get(pid, 0.0)
        if used > 0.005:
            t2.add(pid, sampler.procs[pid].cmd, f"{used:.2f}", f"{used / dur * 100:.0f}")
    report.tables.append(t2)
    report.notes.append(
        f"Watchers (in the benchmark process): DB poll every {args.db_poll_ms:g} ms ({dbw.polls} polls, "
        f"{dbw.cpu_s:.2f} CPU s), API poll every {args.api_poll_ms:g} ms for the sampled messages "
        f"({api.requests} requests, {api.cpu_s:.2f} CPU s in the client; each request also costs the API). "
        f"Polling adds up to one interval to each figure.")
    if late:
        report.notes.append(f"The sender was behind schedule for {len(late)} of {len(sent)} messages "
                            f"(max {max(late):.1f} ms late).")
    if api.failures:
        report.notes.append(f"{len(api.failures)} sampled messages never showed in the API within 10 s.")
    report.notes.append("Sender checks " + ("on (bench.dns on 127.0.0.1 answers)." if args.auth == "on" else "off.")
                        + f" Domain mode: {args.mode}" + (" (mailboxes created through the API beforehand; the "
                        "policy service checks every RCPT; the API is read with the tokens)."
                        if args.mode == "private" else " (catch-all)."))
    if busy:
        report.notes.append("Other processes busy on the machine (over 25 % CPU) at the start: " + ", ".join(busy))
    return report
