"""`python -m bench ingest-backlog`: how fast `mtasidecar ingest` drains a full Maildir.

N corpus mails are written into Maildir/new/ with the trace headers Postfix's
virtual(8) writes (Return-Path, X-Original-To, Delivered-To to ~N/20
addresses, Received), then `python -m mtasidecar ingest` starts with a fresh
data directory, and the clock runs until the database holds N rows and new/
is empty. Each value of MTASIDECAR_INGEST_WORKERS is a separate run.

Reported: msg/s over the whole run (process start included) and over the
drain alone (first row → last row), the startup time, CPU seconds per
message, and the ingester's memory: peak of the summed RSS of all its
processes, and per process RSS / peak RSS / PSS / CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from mtasidecar.ingest.maildir import ensure_maildir

from . import common as C

TARGET_MSG_S = 1500


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=20000, help="messages in the backlog (default 20000)")
    p.add_argument("--workers", default="0,1,2", help="MTASIDECAR_INGEST_WORKERS values to try, comma-separated")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=10_000, help="mean message size in bytes")
    p.add_argument("--timeout", type=float, default=600, help="give up a run after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    p.add_argument("--quiet-wait", type=float, default=120,
                   help="before each run, wait up to this many seconds for other busy processes to calm down")
    C.add_auth_argument(p)


def run_one(msgs: list[bytes], workers: int, timeout: float, keep: bool, dns: str, auth: bool) -> dict:
    n = len(msgs)
    base = Path(tempfile.mkdtemp(prefix=f"ingest-w{workers}-", dir="/tmp"))
    proc = None
    sampler = None
    try:
        settings = C.settings_for(base, dns=dns, auth=auth, ingest={"workers": workers})
        maildir = settings.maildir_path
        ensure_maildir(maildir)
        t_w = time.perf_counter()
        C.write_backlog(msgs, maildir / "new")
        write_s = time.perf_counter() - t_w
        os.sync()  # the files are on disk before the clock starts, as Postfix's are
        db = base / "mtasidecar.db"
        log = base / "ingest.log"
        t0 = time.monotonic()
        proc = C.start_process([C.PY, "-m", "mtasidecar", "ingest"], env=C.child_env(settings), log=log)
        sampler = C.TreeSampler(proc.pid, 0.1).start()
        t_first, t_rows, t_done = C.wait_ingested(db, maildir / "new", n, proc, t0 + timeout, log=log)
        sampler.stop()
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        count, boxes, errors = con.execute(
            "SELECT (SELECT count(*) FROM message), (SELECT count(*) FROM mailbox), "
            "(SELECT count(*) FROM message WHERE parse_error IS NOT NULL)").fetchone()
        con.close()
        total_s = t_done - t0
        drain_s = t_done - t_first
        return {
            "workers": workers, "n": n, "count": count, "mailboxes": boxes, "parse_errors": errors,
            "write_s": write_s, "startup_s": t_first - t0, "total_s": total_s, "drain_s": drain_s,
            "rows_s": t_rows - t0, "rate_total": n / total_s, "rate_drain": n / drain_s,
            "cpu_s": sampler.cpu_total(), "peak_sum_mb": sampler.peak_sum_kb / 1024,
            "parent_cpu_s": sampler.procs[proc.pid].cpu_s if proc.pid in sampler.procs else float("nan"),
            "procs": sampler.rows(), "db_mb": db.stat().st_size / 2**20 + (
                Path(str(db) + "-wal").stat().st_size / 2**20 if Path(str(db) + "-wal").exists() else 0),
        }
    finally:
        if sampler is not None and proc is not None and proc.poll() is None and not sampler._stop.is_set():
            sampler.stop()
        C.stop_process(proc)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def run(args, argv: list[str]) -> C.Report:
    report = C.Report("ingest-backlog", argv, C.machine_info())
    busy: list[str] = []
    t = time.perf_counter()
    msgs = C.corpus(args.n, seed=args.seed, size=args.size)
    corpus_s = time.perf_counter() - t
    mean = sum(map(len, msgs)) / len(msgs)
    print(f"corpus: {len(msgs)} messages, mean {mean:.0f} bytes ({corpus_s:.1f} s)", flush=True)
    results = []
    from .dns import BenchDNS
    dns = BenchDNS().start()
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            busy += [f"before workers={w}: {b}" for b in C.wait_quiet(args.quiet_wait)]
            print(f"workers={w}: running...", flush=True)
            r = run_one(msgs, w, args.timeout, args.keep, dns.server, args.auth == "on")
            results.append(r)
            print(f"workers={w}: {r['rate_total']:.0f} msg/s overall, {r['rate_drain']:.0f} drain, "
                  f"peak RSS {r['peak_sum_mb']:.0f} MB", flush=True)
    finally:
        dns.stop()

    ncpu = os.cpu_count() or 1
    t1 = C.Table(["workers", "messages", "startup s", "total s", "msg/s (total)", "msg/s (drain)",
                  "CPU ms/msg (all)", "CPU ms/msg (main process)", f"msg/s the CPU allows on {ncpu} cores",
                  "peak RSS sum MB", "target ≥ 1500 msg/s met?"],
                 title=f"Drain of a {args.n}-message backlog (mean {mean:.0f} bytes)")
    for r in results:
        all_ms = r["cpu_s"] / r["n"] * 1000
        main_ms = r["parent_cpu_s"] / r["n"] * 1000
        ceiling = min(min(ncpu, 1 + r["workers"]) * 1000 / all_ms, 1000 / main_ms)
        t1.add(r["workers"], r["count"], f"{r['startup_s']:.2f}", f"{r['total_s']:.1f}", f"{r['rate_total']:.0f}",
               f"{r['rate_drain']:.0f}", f"{all_ms:.2f}", f"{main_ms:.2f}", f"{ceiling:.0f}",
               f"{r['peak_sum_mb']:.0f}", C.yes(r["rate_total"] >= TARGET_MSG_S))
    report.tables.append(t1)
    for r in results:
        t2 = C.Table(C.PROC_COLUMNS, title=f"Ingester processes, workers={r['workers']} (at the end of the run)")
        for row in r["procs"]:
            t2.add(*row)
        report.tables.append(t2)
    report.notes.append(
        f"Each run: fresh data directory, the same {args.n} files in new/ (written and synced before the "
        f"clock starts), {results[0]['mailboxes']} mailboxes; the clock starts when the ingest process is "
        "spawned (interpreter start, schema, flanker import included) and stops when the DB holds N rows "
        "and new/ is empty. 'drain' starts at the first committed row.")
    report.notes.append("'msg/s the CPU allows': min(usable cores × 1000 / CPU ms per message, 1000 / CPU ms "
                        "per message of the main process, which commits every batch alone): what these "
                        "cores would reach with nothing else running. The figure to compare when the machine "
                        "is shared; usable cores = min(cores, 1 + workers).")
    report.notes.append("Peak RSS sum: the highest sum of the RSS of every process of the ingester's tree, "
                        "sampled every 100 ms (RSS counts shared pages in each process; PSS does not).")
    report.notes.append(f"Database after the run: {results[-1]['db_mb']:.0f} MB for {args.n} messages; "
                        f"parse errors: {', '.join(str(r['parse_errors']) for r in results)}.")
    report.notes.append(
        "Sender checks (SPF, DKIM, DMARC) " + ("on, answered by bench.dns on 127.0.0.1 (the corpus's "
        f"records; {dns.queries} queries in all, the ingester caches): ~75 % of the mails carry a valid "
        "Ed25519 DKIM signature." if args.auth == "on" else "off (MTASIDECAR_AUTH_ENABLED=false)."))
    if busy:
        report.notes.append("Other processes busy on the machine (over 25 % CPU) when a run started: "
                            + ", ".join(busy))
    return report
