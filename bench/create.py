"""`python -m bench create`: mailbox creation through the API (POST /api/v1/mailboxes).

`python -m mtasidecar api` (gunicorn, asgi workers) on a fresh SQLite
database, the per-client creation limit lifted (``api.create_rate`` =
1,000,000, i.e. MTASIDECAR_API_CREATE_RATE=1000000: every client here is
127.0.0.1), and wrk POSTing with several connections at once (a Lua script,
written to the data directory, makes the bodies):

* random: ``{"domain": "bench.test"}``: the server picks the local part
  (what most clients do)
* named:  ``{"domain": "bench.test", "local_part": "c<conn>-<n>-<run>"}``:
  every request a new address of the client's choosing

Each creation is one write transaction (the mailbox row and its token
hash; BEGIN IMMEDIATE) committed in WAL mode. Reported per run: creations
per second (201s), p50/p90/p99, non-201 answers and socket errors, the API's
CPU per creation, and the rows in the database afterwards (each 201 must be
one mailbox and one token). Target: ≥ 500 creations/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from . import common as C
from .api_list import parse_wrk

TARGET_RATE = 500
LUA_SCRIPT = """\
-- wrk script for bench.create: POST /api/v1/mailboxes with JSON bodies.
--   wrk ... -s create.lua http://127.0.0.1:PORT/api/v1/mailboxes -- random|named TAG
-- random: {"domain":"bench.test"} (the server picks the local part)
-- named:  {"domain":"bench.test","local_part":"c<thread>-<n>-<TAG>"}, new on every request
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

local kind, tag, n = "random", "x", 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  kind = args[1] or "random"
  tag = args[2] or "x"
end

function request()
  local body
  if kind == "named" then
    n = n + 1
    body = string.format('{"domain":"bench.test","local_part":"c%d-%d-%s"}', id, n, tag)
  else
    body = '{"domain":"bench.test"}'
  end
  return wrk.format("POST", nil, headers, body)
end
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connections", default="1,4,16", help="wrk -c values, comma-separated")
    p.add_argument("--bodies", default="random,named", help="random (server-chosen local part) and/or named")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--threads", type=int, default=2, help="wrk -t (at most the connections)")
    p.add_argument("--api-workers", type=int, default=None, help="gunicorn workers (default: the setting's)")
    p.add_argument("--quiet-wait", type=float, default=60)
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    C.add_mode_argument(p)


def run_wrk(url: str, lua: Path, threads: int, conns: int, duration: int, body: str, tag: str) -> dict:
    argv = ["wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "10s",
            "-s", str(lua), url + "/api/v1/mailboxes", "--", body, tag]
    out = subprocess_run(argv, duration + 60)
    return parse_wrk(out) | {"argv": argv, "output": out}


def subprocess_run(argv: list[str], timeout: float) -> str:
    import subprocess
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout


def _counts(db: Path) -> tuple[int, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return (con.execute("SELECT count(*) FROM mailbox").fetchone()[0],
                con.execute("SELECT count(*) FROM token").fetchone()[0])
    finally:
        con.close()


def _settled_counts(db: Path, timeout: float = 30) -> tuple[int, int]:
    """The counts once they stop moving: requests wrk left in flight still complete on the server."""
    prev = _counts(db)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(1.0)
        cur = _counts(db)
        if cur == prev:
            return cur
        prev = cur
    return prev


def run(args, argv: list[str]) -> C.Report:
    if shutil.which("wrk") is None:
        raise C.BenchError("wrk is not installed (apt-get install wrk)")
    conns = [int(c) for c in args.connections.split(",") if c.strip()]
    bodies = [b.strip() for b in args.bodies.split(",") if b.strip()]
    if not conns or any(c < 1 for c in conns) or not set(bodies) <= {"random", "named"} or not bodies:
        raise C.BenchError("--connections: positive numbers; --bodies: random and/or named")
    report = C.Report("create", argv, C.machine_info())
    base = Path(tempfile.mkdtemp(prefix="bench-create-", dir="/tmp"))
    port = C.free_port()
    api = {"port": port}
    if args.api_workers:
        api["workers"] = args.api_workers
    settings = C.settings_for(base, auth=False, mode=args.mode, api=api)
    env = C.child_env(settings)
    if float(env.get("MTASIDECAR_API_CREATE_RATE", "0")) < 1_000_000:
        raise C.BenchError("the API's create_rate could not be raised (MTASIDECAR_API_CREATE_RATE)")
    db = Path(settings.database_url.split("://", 1)[1][1:])
    url = f"http://127.0.0.1:{port}"
    lua = base / "create.lua"
    lua.write_text(LUA_SCRIPT)
    busy = C.wait_quiet(args.quiet_wait)
    load = C.loadavg()
    proc = C.start_process([C.PY, "-m", "mtasidecar", "api"], env=env, log=base / "api.log")
    sampler = None
    results = []
    try:
        C.wait_http(f"{url}/healthz", 60, alive=lambda: proc.poll() is None)
        sampler = C.TreeSampler(proc.pid, 0.5).start()
        tag = f"{int(time.time()) % 100000:05d}"
        # Warm-up (not reported): the workers' first requests, the database's first pages.
        run_wrk(url, lua, 2, 4, 2, "random", tag + "w")
        for i, body in enumerate(bodies):
            for c in conns:
                before = _settled_counts(db)
                sampler.sample()
                cpu0 = sampler.cpu_total()
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                print(f"wrk {body}, {c} connections ({args.duration} s)...", flush=True)
                r = run_wrk(url, lua, args.threads, c, args.duration, body, f"{tag}{i}{c}")
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                sampler.sample()
                after = _settled_counts(db)
                r.update(body=body, conns=c, created=after[0] - before[0], tokens=after[1] - before[1],
                         api_cpu_ms=(sampler.cpu_total() - cpu0) * 1000 / max(1, r["requests"]),
                         wrk_cpu_ms=((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) * 1000
                         / max(1, r["requests"]))
                results.append(r)
                print(f"  {r['rps']:.0f}/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, "
                      f"{r['non2xx']} non-2xx, {r['errors']} socket errors", flush=True)
        sampler.stop()
        db_mb = sum(f.stat().st_size for f in base.glob("mtasidecar.db*")) / 2**20
        api_log = (base / "api.log").read_text(errors="replace")
    finally:
        if sampler is not None and not sampler._stop.is_set():
            sampler.stop()
        C.stop_process(proc)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    ncpu = os.cpu_count() or 1
    t = C.Table(["body", "connections", "requests", "creations/s", "p50 ms", "p90 ms", "p99 ms",
                 "non-201 / socket errors", "mailboxes + tokens written", "API CPU ms / creation",
                 f"creations/s the CPU allows on {ncpu} cores", f"≥ {TARGET_RATE}/s?"],
                title=f"POST /api/v1/mailboxes, wrk -d{args.duration}s --latency, "
                      f"{settings.api.workers} gunicorn asgi workers, fresh SQLite database (WAL)")
    for r in results:
        good = r["requests"] - r["non2xx"]
        rate = good / max(1e-9, r["requests"] / r["rps"]) if r["rps"] else 0.0
        t.add(r["body"], r["conns"], r["requests"], f"{rate:.0f}", f"{r['p50']:.1f}", f"{r['p90']:.1f}",
              f"{r['p99']:.1f}", f"{r['non2xx']} / {r['errors']}", f"{r['created']} + {r['tokens']}",
              f"{r['api_cpu_ms']:.2f}", f"{ncpu * 1000 / max(1e-9, r['api_cpu_ms'] + r['wrk_cpu_ms']):.0f}",
              C.yes(rate >= TARGET_RATE))
    report.tables.append(t)
    # wrk stops with up to one request per connection in flight: created, not counted.
    mismatched = [r for r in results if not (r["created"] == r["tokens"]
                                             and 0 <= r["created"] - (r["requests"] - r["non2xx"]) <= r["conns"])]
    report.notes.append(
        "Every 201 is one mailbox row and one token row (up to one more per connection: the request in flight "
        "when wrk stops is created but not counted): "
        + (C.yes(not mismatched) if not mismatched else
           "**no**: " + "; ".join(f"{r['body']} c{r['conns']}: {r['requests'] - r['non2xx']} answered 201, "
                                  f"{r['created']} mailboxes, {r['tokens']} tokens" for r in mismatched))
        + f". Database after the runs: {db_mb:.1f} MB (with its WAL).")
    report.notes.append("With more than one connection, creations contend for SQLite's write lock (each is a "
                        "BEGIN IMMEDIATE transaction) across the API's threads (one connection each) and workers; "
                        "a writer that finds it taken sleeps in SQLite's busy handler (1, 2, 5, 10, … up to 100 ms "
                        "a try) and may miss several releases: that, not the CPU, is where p90/p99 grow.")
    errors_logged = api_log.count("database is locked")
    report.notes.append(f"\"database is locked\" in the API's log: {errors_logged}. Per-client creation limit: "
                        f"{settings.api.create_rate:g}/s (MTASIDECAR_API_CREATE_RATE); domain mode {args.mode}.")
    report.notes.append("wrk runs on the same cores as the API; 'creations/s the CPU allows' = cores × 1000 / "
                        "(API + wrk CPU ms per request): the figure to compare when the machine is shared. "
                        f"Load average before the runs: {load}.")
    if busy:
        report.notes.append("Other processes busy on the machine (over 25 % CPU) at the start: " + ", ".join(busy))
    return report
