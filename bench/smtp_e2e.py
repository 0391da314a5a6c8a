"""`python -m bench smtp-e2e`: Postfix alone vs the whole service, same mails, same client.

(a) postfix: a private Postfix instance (mtasidecar.mta.instance, the
    configuration `mtasidecar dev` uses) delivers into a Maildir nothing
    reads; the clock stops when N files have appeared in new/ (inotify).
(b) service: `python -m mtasidecar dev` (Postfix + ingest + API, each a
    process, on free ports); the clock stops when all N messages are visible
    through the API: a poller GETs /api/v1/mailboxes/{addr}/messages?limit=100
    for every mailbox not yet complete, one sweep every --poll-interval
    seconds, over one keep-alive connection. The time at which the database
    held N rows is recorded too (read-only SQLite, every 20 ms).

Both send the same N corpus mails over --conns persistent SMTP connections
with bench.smtp (pipelined; `python -m bench sender` shows its ceiling is far
above Postfix's). Rounds alternate a, b, a, b, ...; reported: each rate, the
ratio b/a per round and of the medians (target ≥ 90 %).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

from . import common as C
from .inotify import DirWatcher
from .sender import mails_for
from .smtp import send_parallel

TARGET_RATIO = 0.90


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="a/b pairs (default 2: a, b, a, b)")
    p.add_argument("--poll-interval", type=float, default=0.1, help="seconds between API sweeps")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300, help="give up a phase after this many seconds")
    p.add_argument("--quiet-wait", type=float, default=120)
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    C.add_auth_argument(p)
    C.add_mode_argument(p)
    p.add_argument("--policy", choices=["on", "off"], default="on",
                   help="the policy service in Postfix's path in (b) (default on, as shipped; off: "
                        "policy.listen empty, to see what it costs)")


# --------------------------------------------------------------------------
# (a) Postfix alone


def run_postfix(mails, conns: int, timeout: float, keep: bool) -> dict:
    from mtasidecar.mta.instance import PostfixInstance
    base = Path(tempfile.mkdtemp(prefix="e2e-postfix-", dir="/tmp"))
    base.chmod(0o755)
    pf = PostfixInstance(base / "postfix", C.free_port(), [("bench.test", True)], base / "Maildir",
                         hostname="bench.localhost")
    watcher = None
    try:
        pf.start()
        watcher = DirWatcher(base / "Maildir" / "new", keep_names=False)
        cpu0 = _cpu_of(pf.processes())
        res = send_parallel("127.0.0.1", pf.smtp_port, mails, conns, timeout=timeout)
        if res.errors:
            raise C.BenchError(f"sending: {res.errors[:3]}")
        if not watcher.wait_for(len(mails), timeout):
            raise C.BenchError(f"only {watcher.count}/{len(mails)} files reached new/")
        t_done = watcher.last
        cpu = _cpu_of(pf.processes()) - cpu0
        n = len(mails)
        return {"rate": n / (t_done - res.t_start), "send_rate": res.rate, "secs": t_done - res.t_start,
                "postfix_cpu_s": cpu}
    finally:
        if watcher:
            watcher.close()
        pf.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _cpu_of(pids: list[int]) -> float:
    """CPU seconds of these processes (Postfix daemons come and go: a floor, not exact)."""
    import os
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        s = C._stat(pid)
        if s:
            total += s[2] / tick
    return total


# --------------------------------------------------------------------------
# (b) the service


class ApiPoller:
    """Every ``interval`` s, sweeps the list endpoint of each mailbox that is not yet
    complete but whose mails have all been accepted by SMTP (``accepted`` is called
    from the sender threads): what a client waiting for its mail would do, and it
    keeps the polling load near one request per mailbox per sweep at the end."""

    def __init__(self, port: int, expected: dict[str, int], interval: float, deadline: float,
                 tokens: dict[str, str] | None = None):
        self.port = port
        self.tokens = tokens or {}
        self.expected = dict(expected)
        self.sent = collections.Counter()
        self.eligible: set[str] = set()
        self.lock = threading.Lock()
        self.interval = interval
        self.deadline = deadline
        self.done_at: dict[str, float] = {}
        self.requests = 0
        self.sweeps = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="api-poller", daemon=True)

    def start(self) -> "ApiPoller":
        self.thread.start()
        return self

    def accepted(self, mail, t: float) -> None:
        with self.lock:
            self.sent[mail.recipient] += 1
            if self.sent[mail.recipient] >= self.expected[mail.recipient]:
                self.eligible.add(mail.recipient)

    def _count(self, conn, address: str, want: int) -> int:
        n, cursor = 0, None
        while True:
            path = f"/api/v1/mailboxes/{address}/messages?limit=100" + (f"&cursor={cursor}" if cursor else "")
            token = self.tokens.get(address)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            r = conn.getresponse()
            body = r.read()
            self.requests += 1
            if r.status == 404:
                return 0
            if r.status != 200:
                raise C.BenchError(f"GET {path}: {r.status} {body[:200]!r}")
            page = json.loads(body)
            n += len(page["items"])
            cursor = page.get("next_cursor")
            if not cursor or n >= want:
                return n

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            pending = set(self.expected)
            while pending and not self._stop.is_set():
                t_sweep = time.monotonic()
                if t_sweep > self.deadline:
                    self.error = f"timed out with {len(pending)} mailboxes incomplete"
                    return
                with self.lock:
                    ready = sorted(pending & self.eligible)
                for address in ready:
                    try:
                        got = self._count(conn, address, self.expected[address])
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                        got = 0
                    if got >= self.expected[address]:
                        self.done_at[address] = time.monotonic()
                        pending.discard(address)
                self.sweeps += 1
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - t_sweep)))
        except Exception as exc:  # noqa: BLE001
            self.error = str(exc)
        finally:
            conn.close()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        self._stop.set()


class DbRows:
    """Time at which a read-only SQLite connection first sees >= n rows (every ``interval`` s)."""

    def __init__(self, db: Path, n: int, interval: float, deadline: float):
        self.db, self.n, self.interval, self.deadline = db, n, interval, deadline
        self.t_all: float | None = None
        self.t_first: float | None = None
        self.thread = threading.Thread(target=self._run, name="db-rows", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        con = None
        while time.monotonic() < self.deadline:
            try:
                if con is None:
                    con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
                rows = con.execute("SELECT max(id) FROM message").fetchone()[0] or 0
            except sqlite3.Error:
                rows = 0
            if rows and self.t_first is None:
                self.t_first = time.monotonic()
            if rows >= self.n:
                self.t_all = time.monotonic()
                break
            time.sleep(self.interval)
        if con is not None:
            con.close()


def run_service(mails, conns: int, interval: float, timeout: float, keep: bool, dns: str, auth: bool,
                mode: str, policy: bool = True) -> dict:
    from .service import DevService
    sampler = None
    extra = {} if policy else {"policy": {"listen": ""}}
    with DevService(dns, auth, keep, prefix="e2e-service-", mode=mode, **extra) as svc:
        try:
            expected = collections.Counter(m.recipient for m in mails)
            tokens = svc.mailboxes(sorted(expected))  # private domain: made first, not timed
            sampler = C.TreeSampler(svc.proc.pid, 0.2).start()
            deadline = time.monotonic() + timeout
            db = DbRows(svc.db_path, len(mails), 0.02, deadline)
            poller = ApiPoller(svc.http_port, expected, interval, deadline, tokens)
            poller.start()
            res = send_parallel("127.0.0.1", svc.smtp_port, mails, conns, timeout=timeout,
                                on_reply=poller.accepted)
            if res.errors:
                raise C.BenchError(f"sending: {res.errors[:3]}")
            poller.join(timeout)
            db.thread.join(timeout=5)
            if poller.error or len(poller.done_at) < len(expected):
                raise C.BenchError(f"API poller: {poller.error or 'incomplete'} "
                                   f"({len(poller.done_at)}/{len(expected)} mailboxes)")
            sampler.stop()
        finally:
            if sampler is not None and not sampler._stop.is_set():
                sampler.stop()
    t_visible = max(poller.done_at.values())
    n = len(mails)
    return {"rate": n / (t_visible - res.t_start), "send_rate": res.rate, "secs": t_visible - res.t_start,
            "db_rate": n / (db.t_all - res.t_start) if db.t_all else float("nan"),
            "requests": poller.requests, "sweeps": poller.sweeps,
            "procs": sampler.rows(), "cpu_s": sampler.cpu_total()}


# --------------------------------------------------------------------------


def run(args, argv: list[str]) -> C.Report:
    report = C.Report("smtp-e2e", argv, C.machine_info())
    msgs = C.corpus(args.n, seed=args.seed)
    mails = mails_for(msgs)
    n_boxes = len({m.recipient for m in mails})
    busy: list[str] = []
    rounds = []
    from .dns import BenchDNS
    dns = BenchDNS().start()
    try:
        for r in range(args.rounds):
            busy += [f"before {r + 1}a: {b}" for b in C.wait_quiet(args.quiet_wait)]
            print(f"round {r + 1}a: Postfix alone...", flush=True)
            a = run_postfix(mails, args.conns, args.timeout, args.keep)
            print(f"  {a['rate']:.0f} msg/s", flush=True)
            busy += [f"before {r + 1}b: {b}" for b in C.wait_quiet(args.quiet_wait)]
            print(f"round {r + 1}b: the service (mtasidecar dev)...", flush=True)
            b = run_service(mails, args.conns, args.poll_interval, args.timeout, args.keep, dns.server,
                            args.auth == "on", args.mode, args.policy == "on")
            print(f"  {b['rate']:.0f} msg/s visible in the API ({b['db_rate']:.0f} msg/s into the DB)",
                  flush=True)
            rounds.append((a, b))
    finally:
        dns.stop()

    t = C.Table(["round", "Postfix alone msg/s", "service msg/s (API-visible)", "service msg/s (DB rows)",
                 "SMTP accept msg/s (a / b)", "ratio", f"target ≥ {TARGET_RATIO:.0%} met?"],
                title=f"{args.n} mails ({n_boxes} mailboxes) over {args.conns} SMTP connections")
    for i, (a, b) in enumerate(rounds):
        ratio = b["rate"] / a["rate"]
        t.add(i + 1, f"{a['rate']:.0f}", f"{b['rate']:.0f}", f"{b['db_rate']:.0f}",
              f"{a['send_rate']:.0f} / {b['send_rate']:.0f}", f"{ratio:.0%}", C.yes(ratio >= TARGET_RATIO))
    ma = statistics.median(a["rate"] for a, _ in rounds)
    mb = statistics.median(b["rate"] for _, b in rounds)
    t.add("median", f"{ma:.0f}", f"{mb:.0f}", f"{statistics.median(b['db_rate'] for _, b in rounds):.0f}", "",
          f"{mb / ma:.0%}", C.yes(mb / ma >= TARGET_RATIO))
    report.tables.append(t)
    last_b = rounds[-1][1]
    t2 = C.Table(C.PROC_COLUMNS, title="The service's processes in the last round (mtasidecar dev tree; "
                                       "Postfix runs detached and is not in it)")
    for row in last_b["procs"]:
        t2.add(*row)
    report.tables.append(t2)
    report.notes.append("Clock: from the moment all SMTP connections are open (a) to the last file in new/ "
                        "(inotify), (b) to the sweep in which the API showed the last mailbox complete.")
    report.notes.append(f"API polling: every {args.poll_interval} s, one sweep over the mailboxes whose mails "
                        "have all been accepted (250) but that the API did not yet show complete, "
                        f"GET …/messages?limit=100; last round: {last_b['requests']} requests in "
                        f"{last_b['sweeps']} sweeps (this load is part of what (b) pays). The sweep interval "
                        f"bounds the precision of (b): up to {args.poll_interval} s late.")
    report.notes.append("'SMTP accept' is the rate of final 250 replies: how fast Postfix took the mail "
                        "in, with and without mtasidecar using the same cores.")
    report.notes.append("Sender checks " + ("on (bench.dns on 127.0.0.1 answers)." if args.auth == "on"
                                            else "off.") + f" Domain mode: {args.mode}" + (
        " (the mailboxes are created through the API before the clock starts, the poller reads with the "
        "tokens)." if args.mode == "private" else " (catch-all).") + " Policy service in Postfix's path: "
        f"{args.policy}.")
    if busy:
        report.notes.append("Other processes busy on the machine (over 25 % CPU) when a phase started: "
                            + ", ".join(busy))
    return report
