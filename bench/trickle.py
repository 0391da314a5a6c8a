"""`python -m bench trickle`: the ingester's CPU per message when mail trickles in.

A backlog is the cheap case: files are prepared and committed in chunks of
64. Postfix delivers one file at a time, so end to end the ingester mostly
sees a file every few milliseconds. Here `python -m mtasidecar ingest` runs
on a fresh data directory while corpus mails (with Postfix's trace headers)
are written into Maildir/tmp/ and linked into new/ at a steady rate, as
virtual(8) does; the clock and the CPU counters run from the first file to
the last row. Reported per rate: CPU of the whole ingester tree per message,
split into its main thread (prepare inline, commit, unlink), its other
threads (watchdog's) and the worker processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from mtasidecar.ingest.maildir import ensure_maildir

from . import common as C


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default="50,250", help="files per second to feed, comma-separated")
    p.add_argument("--n", type=int, default=3000, help="messages per rate (default 3000)")
    p.add_argument("--workers", type=int, default=-1, help="MTASIDECAR_INGEST_WORKERS (default -1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="before each run, wait up to this many seconds for other busy processes to calm down")
    C.add_auth_argument(p)


def _threads_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            data = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2:].split()
        out[int(tid)] = (int(rest[11]) + int(rest[12])) / tick
    return out


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and every process below it."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {p: C._stat(p) for p in C.descendants(pid)}
    return {p: s[2] / tick for p, s in stats.items() if s}


def run_one(msgs: list[bytes], rate: float, workers: int, timeout: float, dns: str | None, auth: bool) -> dict:
    n = len(msgs)
    base = Path(tempfile.mkdtemp(prefix="trickle-", dir="/tmp"))
    proc = None
    try:
        settings = C.settings_for(base, dns=dns, auth=auth, ingest={"workers": workers})
        maildir = settings.maildir_path
        ensure_maildir(maildir)
        db = base / "mtasidecar.db"
        log = base / "ingest.log"
        proc = C.start_process([C.PY, "-m", "mtasidecar", "ingest"], env=C.child_env(settings), log=log)
        C.wait_until(lambda: "watching" in log.read_text(errors="replace"), 60, 0.05, "the ingester to start")
        time.sleep(1.0)  # the worker pool finishes booting
        now = time.time()
        files = [(C.maildir_name(i, now + i * 1e-4), C.postfix_trace(m, i, now)) for i, m in enumerate(msgs)]
        threads0, tree0 = _threads_cpu(proc.pid), _tree_cpu(proc.pid)
        t0 = time.monotonic()
        for i, (name, data) in enumerate(files):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tmp = maildir / "tmp" / name
            tmp.write_bytes(data)
            os.link(tmp, maildir / "new" / name)  # what virtual(8) does
            tmp.unlink()
        feed_s = time.monotonic() - t0
        deadline = time.monotonic() + timeout
        C.wait_until(lambda: C.max_message_id(db) >= n and C.count_files(maildir / "new") == 0,
                     max(1.0, deadline - time.monotonic()), 0.02, "every file to be stored")
        done_s = time.monotonic() - t0
        threads1, tree1 = _threads_cpu(proc.pid), _tree_cpu(proc.pid)
        main = threads1.get(proc.pid, 0) - threads0.get(proc.pid, 0)
        own = sum(threads1.values()) - sum(threads0.values())
        tree = sum(tree1.values()) - sum(tree0.get(p, 0) for p in tree1)
        return {"rate": rate, "n": n, "feed_s": feed_s, "done_s": done_s,
                "cpu_ms": tree / n * 1000, "main_ms": main / n * 1000, "threads_ms": (own - main) / n * 1000,
                "workers_ms": (tree - own) / n * 1000, "workers": workers}
    finally:
        C.stop_process(proc)
        shutil.rmtree(base, ignore_errors=True)


def run(args, argv: list[str]) -> C.Report:
    report = C.Report("trickle", argv, C.machine_info())
    msgs = C.corpus(args.n, seed=args.seed)
    from .dns import BenchDNS
    dns = BenchDNS().start()
    rows, busy = [], []
    try:
        for rate in [float(r) for r in args.rates.split(",")]:
            busy += [f"before {rate:g}/s: {b}" for b in C.wait_quiet(args.quiet_wait)]
            print(f"rate {rate:g}/s: feeding {len(msgs)} files...", flush=True)
            r = run_one(msgs, rate, args.workers, args.timeout, dns.server, args.auth == "on")
            print(f"rate {rate:g}/s: {r['cpu_ms']:.2f} ms of CPU per message", flush=True)
            rows.append(r)
    finally:
        dns.stop()
    t = C.Table(["files/s fed", "messages", "fed in s", "stored after s", "CPU ms/msg (ingester tree)",
                 "main thread", "other threads (watchdog)", "worker processes"],
                title=f"`mtasidecar ingest` fed one file at a time (workers {args.workers}, "
                      f"sender checks {args.auth})")
    for r in rows:
        t.add(f"{r['rate']:g}", r["n"], f"{r['feed_s']:.1f}", f"{r['done_s']:.1f}", f"{r['cpu_ms']:.2f}",
               f"{r['main_ms']:.2f}", f"{r['threads_ms']:.2f}", f"{r['workers_ms']:.2f}")
    report.tables.append(t)
    report.notes.append("Files are written into Maildir/tmp/ and linked into new/ at the given rate (virtual(8)'s "
                        "way); CPU is user+system time from the first file to the last row, from /proc, for the "
                        "ingester's threads and every process below it. Compare with `ingest-backlog` "
                        "(the same work in chunks of 64).")
    report.notes += busy
    return report
