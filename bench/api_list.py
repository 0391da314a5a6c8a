"""`python -m bench api-list`: API read rates on a big SQLite database, with wrk.

Fills bench/results/api-list-<messages>-<mailboxes>/mtasidecar.db (kept for
``--reuse``) with realistic rows: a few hundred corpus mails go through
``mtasidecar.ingest.pipeline.prepare`` once, and their records are written
again and again (new id, spool name, mailbox, time) in big transactions with
executemany, table and column names taken from the ``mtasidecar.store``
models. Messages are spread over the mailboxes unevenly (seeded).

Then ``python -m mtasidecar api`` (gunicorn, asgi workers) serves it and
``wrk --latency`` runs three loads, each spreading requests over many
mailboxes / messages (a Lua script picks a random path from a list):

* list:    GET /api/v1/mailboxes/{addr}/messages?limit=30
* message: GET /api/v1/mailboxes/{addr}/messages/{id}
* raw:     GET /api/v1/mailboxes/{addr}/messages/{id}/raw

Reported: req/s, latency p50/p90/p99, errors, and the RSS of every API process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from . import common as C

TARGET_RPS = 2000
TARGET_P99_MS = 25
TARGET_WORKER_MB = 100
LUA = Path(__file__).with_name("paths.lua")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--mailboxes", type=int, default=10_000)
    p.add_argument("--reuse", action="store_true", help="reuse the database of an earlier run if it exists")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--templates", type=int, default=300, help="distinct corpus mails the rows are made of")
    p.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    p.add_argument("--threads", type=int, default=2, help="wrk -t")
    p.add_argument("--connections", type=int, default=32, help="wrk -c")
    p.add_argument("--api-workers", type=int, default=None, help="gunicorn workers (default: the setting's)")
    p.add_argument("--quiet-wait", type=float, default=120,
                   help="wait up to this many seconds for other busy processes to calm down")
    C.add_mode_argument(p)


# --------------------------------------------------------------------------
# Filling the database


def _templates(k: int, seed: int) -> list:
    """k prepared records from the corpus, through the real pipeline."""
    import tempfile

    from mtasidecar.ingest.pipeline import prepare
    msgs = C.corpus(k, seed=seed)
    d = Path(tempfile.mkdtemp(prefix="api-list-tpl-", dir="/tmp"))
    try:
        out = []
        for i, msg in enumerate(msgs):
            path = d / C.maildir_name(i, time.time())
            path.write_bytes(C.postfix_trace(msg, i, time.time()))
            out.append(prepare(str(path), 50 * 1024 * 1024).record)
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _row_builder(model, fixed: dict):
    """(column names, function(record, overrides) → tuple of DB values) for ``model``."""
    fields = [f for f in model._meta.sorted_fields]
    cols = [f.column_name for f in fields]

    def build(record, overrides: dict) -> tuple:
        vals = []
        for f in fields:
            if f.name in overrides:
                v = overrides[f.name]
            elif f.name in fixed:
                v = fixed[f.name](record)
            elif hasattr(record, f.name):
                v = getattr(record, f.name)
            elif f.default is not None:
                v = f.default() if callable(f.default) else f.default
            else:
                v = None
            vals.append(f.db_value(v))
        return tuple(vals)
    return cols, build


def bench_token(seed: int, box: int) -> str:
    """A well-formed mailbox token, the same for a (seed, mailbox) on every run."""
    import base64
    import hashlib
    raw = hashlib.sha256(f"mtasidecar-bench-token:{seed}:{box}".encode()).digest()
    return "mts_" + base64.urlsafe_b64encode(raw).decode()[:32]


def fill(db_path: Path, n_messages: int, n_mailboxes: int, seed: int, k: int, mode: str) -> dict:
    import peewee as pw

    from bench import corpus as corpus_mod
    from mtasidecar.store import Attachment, Mailbox, Message, MessageBody, Store

    t0 = time.perf_counter()
    templates = _templates(k, seed)
    t_tpl = time.perf_counter() - t0
    url = f"sqlite:///{db_path}"
    store = Store(url)
    store.setup()
    store.sync_domains([("bench.test", True, mode)])
    domain_id = store.list_domains()[0].id
    store.close()

    db = pw.SqliteDatabase(str(db_path), pragmas={"journal_mode": "off", "synchronous": "off",
                                                   "cache_size": -200_000, "foreign_keys": 0})
    from mtasidecar.store.models import database
    database.initialize(db)
    db.connect()
    try:
        boxes = corpus_mod.assign_mailboxes(n_messages, n_mailboxes, seed)
        counts = [0] * n_mailboxes
        sizes = [0] * n_mailboxes
        now = time.time()
        start_time = now - 86400  # a day of mail, oldest first
        mcols, mbuild = _row_builder(Message, {
            "envelope_to": lambda r: r.recipient,
            "to_json": lambda r: json.dumps(r.to, ensure_ascii=False),
            "has_attachments": lambda r: bool(r.attachments),
            "seen": lambda r: False,
        })
        q = lambda name: f'"{name}"'  # noqa: E731
        msg_sql = (f"INSERT INTO {q(Message._meta.table_name)} ({', '.join(map(q, mcols))}) "
                   f"VALUES ({', '.join('?' * len(mcols))})")
        bcols = [f.column_name for f in MessageBody._meta.sorted_fields]
        body_sql = (f"INSERT INTO {q(MessageBody._meta.table_name)} ({', '.join(map(q, bcols))}) "
                    f"VALUES ({', '.join('?' * len(bcols))})")
        acols = [f.column_name for f in Attachment._meta.sorted_fields]
        att_sql = (f"INSERT INTO {q(Attachment._meta.table_name)} ({', '.join(map(q, acols))}) "
                   f"VALUES ({', '.join('?' * len(acols))})")
        bxcols, bxbuild = _row_builder(Mailbox, {})
        with db.atomic():
            db.cursor().executemany(
                f"INSERT INTO {q(Mailbox._meta.table_name)} ({', '.join(map(q, bxcols))}) "
                f"VALUES ({', '.join('?' * len(bxcols))})",
                [bxbuild(None, {"id": b + 1, "address": corpus_mod.mailbox_address(b), "domain": domain_id,
                                "created_at": start_time, "expires_at": None, "message_count": 0,
                                "bytes_used": 0})
                 for b in range(n_mailboxes)])
        try:
            from mtasidecar import tokens as tokens_mod
            from mtasidecar.store.models import Token
        except ImportError:  # a version without tokens: public mailboxes only
            Token = None
        if Token is not None and mode == "private":
            tcols, tbuild = _row_builder(Token, {})
            with db.atomic():
                db.cursor().executemany(
                    f"INSERT INTO {q(Token._meta.table_name)} ({', '.join(map(q, tcols))}) "
                    f"VALUES ({', '.join('?' * len(tcols))})",
                    [tbuild(None, {"token_hash": tokens_mod.token_hash(bench_token(seed, b)), "mailbox": b + 1,
                                   "created_at": start_time}) for b in range(n_mailboxes)])
        addresses = [corpus_mod.mailbox_address(b) for b in range(n_mailboxes)]
        batch = 20_000
        t_rows = time.perf_counter()
        for lo in range(0, n_messages, batch):
            mrows, brows, arows = [], [], []
            for i in range(lo, min(n_messages, lo + batch)):
                r = templates[i % k]
                b = boxes[i]
                mid = i + 1
                counts[b] += 1
                sizes[b] += r.size
                mrows.append(mbuild(r, {"id": mid, "mailbox": b + 1, "spool_name": f"bench.{mid:08d}.fill",
                                        "received_at": start_time + 86400 * i / n_messages,
                                        "envelope_to": addresses[b]}))
                brows.append((mid, r.raw_z, r.document_z))
                for a in r.attachments:
                    arows.append(tuple(a.get(c) if c != "message_id" else mid for c in acols))
            with db.atomic():
                cur = db.cursor()
                cur.executemany(msg_sql, mrows)
                cur.executemany(body_sql, brows)
                if arows:
                    cur.executemany(att_sql, arows)
            if (lo // batch) % 10 == 0:
                el = time.perf_counter() - t_rows
                print(f"  filled {lo + len(mrows)}/{n_messages} messages ({el:.0f} s)", flush=True)
        with db.atomic():
            db.cursor().executemany(
                f"UPDATE {q(Mailbox._meta.table_name)} SET message_count = ?, bytes_used = ? WHERE id = ?",
                [(counts[b], sizes[b], b + 1) for b in range(n_mailboxes)])
        db.execute_sql("ANALYZE")
        db.execute_sql("PRAGMA journal_mode=wal")
    finally:
        db.close()
    return {"templates_s": t_tpl, "fill_s": time.perf_counter() - t0,
            "template_bytes": sum(len(t.raw_z) + len(t.document_z) for t in templates) / k}


# --------------------------------------------------------------------------
# wrk


def write_paths(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def run_wrk(url: str, paths_file: Path, threads: int, conns: int, duration: int) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
            "-s", str(LUA), url, "--", str(paths_file)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    return parse_wrk(out) | {"argv": argv, "output": out}


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> dict:
    res: dict = {"errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        res[f"p{q}"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
    return res


def _get(base: str, line: str) -> tuple[int, bytes]:
    path, _, token = line.partition("\t")
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def schema_fingerprint() -> list:
    """Tables and columns of the current models: a reused database must match them."""
    from mtasidecar.store.models import MODELS
    return [[m._meta.table_name, [f.column_name for f in m._meta.sorted_fields]] for m in MODELS]


def _reusable(base: Path, db_path: Path) -> bool:
    try:
        info = json.loads((base / "complete").read_text())
    except (OSError, ValueError):
        return False
    if not db_path.exists():
        return False
    if info.get("schema") != schema_fingerprint():
        print("the saved database was made with another schema: filling a new one", flush=True)
        return False
    return True


def run(args, argv: list[str]) -> C.Report:
    if shutil.which("wrk") is None:
        raise C.BenchError("wrk is not installed (apt-get install wrk)")
    report = C.Report("api-list", argv, C.machine_info())
    base = C.RESULTS / f"api-list-{args.messages}-{args.mailboxes}-{args.mode}"
    db_path = base / "mtasidecar.db"
    fill_info = None
    if not (args.reuse and _reusable(base, db_path)):
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        print(f"filling {db_path} with {args.messages} messages in {args.mailboxes} mailboxes...", flush=True)
        fill_info = fill(db_path, args.messages, args.mailboxes, args.seed, args.templates, args.mode)
        (base / "complete").write_text(json.dumps(fill_info | {"schema": schema_fingerprint()}))
        print(f"filled in {fill_info['fill_s']:.0f} s", flush=True)
    db_mb = db_path.stat().st_size / 2**20

    import sqlite3
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    n_rows = con.execute("SELECT max(id) FROM message").fetchone()[0]
    rng = random.Random(args.seed)
    sample_ids = sorted(rng.sample(range(1, n_rows + 1), min(20_000, n_rows)))
    pairs = []
    for lo in range(0, len(sample_ids), 500):
        chunk = sample_ids[lo:lo + 500]
        pairs += con.execute(
            f"SELECT m.id, b.address, b.id FROM message m JOIN mailbox b ON b.id = m.mailbox_id "
            f"WHERE m.id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
    boxes = con.execute("SELECT address, id FROM mailbox WHERE message_count > 0").fetchall()
    con.close()
    rng.shuffle(pairs)

    def tok(box_id: int) -> str:
        return f"\t{bench_token(args.seed, box_id - 1)}" if args.mode == "private" else ""
    list_paths = [f"/api/v1/mailboxes/{a}/messages?limit=30{tok(b)}" for a, b in boxes]
    item_paths = [f"/api/v1/mailboxes/{a}/messages/{mid:024x}{tok(b)}" for mid, a, b in pairs]
    raw_paths = [p.replace("\t", "/raw\t") if "\t" in p else p + "/raw" for p in item_paths]
    for name, lines in (("list", list_paths), ("message", item_paths), ("raw", raw_paths)):
        write_paths(base / f"paths-{name}.txt", lines)

    port = C.free_port()
    api = {"port": port}
    if args.api_workers:
        api["workers"] = args.api_workers
    settings = C.settings_for(base, auth=False, mode=args.mode, api=api,
                              database={"url": f"sqlite:///{db_path}"})
    url = f"http://127.0.0.1:{port}"
    busy_before = C.wait_quiet(args.quiet_wait)
    proc = C.start_process([C.PY, "-m", "mtasidecar", "api"], env=C.child_env(settings), log=base / "api.log")
    sampler = None
    results = {}
    try:
        C.wait_http(f"{url}/healthz", 60, alive=lambda: proc.poll() is None)
        sampler = C.TreeSampler(proc.pid, 0.2).start()
        # Sanity: the pages have what we put in.
        st, body = _get(url, list_paths[0])
        page = json.loads(body)
        if st != 200 or not page["items"]:
            raise C.BenchError(f"list gave {st}: {body[:200]!r}")
        st, body = _get(url, item_paths[0])
        if st != 200 or "text" not in json.loads(body):
            raise C.BenchError(f"message gave {st}: {body[:200]!r}")
        st, raw = _get(url, raw_paths[0])
        if st != 200 or b"X-Bench-Id:" not in raw:
            raise C.BenchError(f"raw gave {st}")
        # Warm up the page cache and the workers (not reported).
        run_wrk(url, base / "paths-list.txt", args.threads, args.connections, 3)
        import resource
        for name in ("list", "message", "raw"):
            print(f"wrk {name} ({args.duration} s)...", flush=True)
            sampler.sample()
            cpu0, sys0 = sampler.cpu_total(), sampler.sys_total()
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            results[name] = run_wrk(url, base / f"paths-{name}.txt", args.threads, args.connections,
                                    args.duration)
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            sampler.sample()
            r = results[name]
            r["api_cpu_ms"] = (sampler.cpu_total() - cpu0) * 1000 / max(1, r["requests"])
            r["api_sys_share"] = (sampler.sys_total() - sys0) / max(1e-9, sampler.cpu_total() - cpu0)
            r["wrk_cpu_ms"] = ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) * 1000 / max(
                1, r["requests"])
            print(f"  {results[name]['rps']:.0f} req/s, p50 {results[name]['p50']:.1f} ms, "
                  f"p99 {results[name]['p99']:.1f} ms", flush=True)
        sampler.stop()
    finally:
        if sampler is not None and not sampler._stop.is_set():
            sampler.stop()
        C.stop_process(proc)

    ncpu = os.cpu_count() or 1
    t1 = C.Table(["endpoint", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors / non-2xx", "API CPU ms/req (kernel %)",
                  "wrk CPU ms/req", f"req/s the CPU allows on {ncpu} cores",
                  f"target ≥ {TARGET_RPS} req/s, p99 ≤ {TARGET_P99_MS} ms met?"],
                 title=f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency, "
                       f"{n_rows} messages in {args.mailboxes} mailboxes ({db_mb / 1024:.1f} GB)")
    for name, path in (("list", "GET …/messages?limit=30"), ("message", "GET …/messages/{id}"),
                       ("raw", "GET …/messages/{id}/raw")):
        r = results[name]
        met = C.yes(r["rps"] >= TARGET_RPS and r["p99"] <= TARGET_P99_MS) if name == "list" else "(no target)"
        t1.add(f"{name}: {path}", f"{r['rps']:.0f}", f"{r['p50']:.1f}", f"{r['p90']:.1f}", f"{r['p99']:.1f}",
               f"{r['errors']} / {r['non2xx']}", f"{r['api_cpu_ms']:.2f} ({r['api_sys_share']:.0%})",
               f"{r['wrk_cpu_ms']:.3f}",
               f"{ncpu * 1000 / (r['api_cpu_ms'] + r['wrk_cpu_ms']):.0f}", met)
    report.tables.append(t1)
    t2 = C.Table(C.PROC_COLUMNS + [f"worker ≤ {TARGET_WORKER_MB} MB met?"],
                 title="API processes after the runs (gunicorn master first)")
    procs = sorted(sampler.procs.values(), key=lambda p: p.pid)
    for i, p in enumerate(procs):
        if not p.hwm_kb:
            continue
        t2.add(p.pid, p.cmd, f"{p.rss_kb / 1024:.0f}", f"{p.hwm_kb / 1024:.0f}", f"{p.anon_kb / 1024:.0f}",
               f"{p.anon_hwm_kb / 1024:.0f}", f"{p.file_kb / 1024:.0f}", f"{p.pss_kb / 1024:.0f}",
               f"{p.cpu_s:.1f}", "(master)" if i == 0 else
               f"RSS {C.yes(p.hwm_kb / 1024 <= TARGET_WORKER_MB)}, anon {C.yes(p.anon_hwm_kb / 1024 <= TARGET_WORKER_MB)}")
    report.tables.append(t2)
    if fill_info:
        report.notes.append(f"Fill: {fill_info['fill_s']:.0f} s for {args.messages} messages "
                            f"({fill_info['templates_s']:.1f} s preparing {args.templates} corpus mails through "
                            f"the pipeline; body blobs average {fill_info['template_bytes'] / 1024:.1f} KB "
                            f"compressed).")
    else:
        report.notes.append("Database reused from an earlier run (--reuse).")
    report.notes.append(f"Requests spread over {len(list_paths)} mailboxes (list) and {len(item_paths)} "
                        "random messages (message, raw); wrk runs on the same 2 cores as the API. Domain mode: "
                        f"{args.mode}" + (" (every request carries its mailbox's bearer token)"
                                          if args.mode == "private" else "") + ".")
    report.notes.append("RSS counts the pages of the database file the worker has mmap'd (SQLITE_PRAGMAS "
                        "mmap_size = 1 GiB): those are page cache shared by every process, shown as 'file'; "
                        "'anon' (RssAnon) is the worker's own memory.")
    report.notes.append("API CPU ms/req: CPU seconds of the gunicorn processes during the run / requests "
                        "served; 'req/s the CPU allows' = cores × 1000 / (API + wrk CPU ms per request), the "
                        "rate these two cores would reach with nothing else running and perfect use of both "
                        "workers: the figure to compare when the machine is shared.")
    report.notes.append(f"API: `python -m mtasidecar api`, {settings.api.workers} gunicorn asgi workers; "
                        "3 s of warm-up before the measured runs.")
    if busy_before:
        report.notes.append("Other processes busy on the machine at the start: " + ", ".join(busy_before))
    return report
