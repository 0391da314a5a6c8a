"""`python -m bench compare`: mtasidecar side by side with maildev and maildump, and its scaling curve.

Same corpus (bench.corpus, ~10 KB mails), same machine, same client, runs
interleaved (each round runs every system once, the order rotating from round
to round). Four parts:

1. SMTP → API, end to end. N mails (--sizes, default 1k, 5k, 20k) over
   --conns persistent SMTP connections (bench.smtp) into
     postfix     Postfix alone delivering into a Maildir nothing reads (the
                 ceiling; "visible" = the file is in new/, seen by inotify);
     mtasidecar  `python -m mtasidecar dev` (Postfix + policy + ingester + API)
                 with bench.test in --mode (default public: a catch-all, as the
                 peers are), sender checks --auth (default on, bench.dns);
     maildev     3.0.0 (npm), in memory;
     maildump    1.0 (PyPI, its own python3.11 venv), in memory.
   Every system with an API is polled the same way: one request every
   --poll-interval s, each on a new connection, asking the API how many
   messages it shows (mtasidecar: GET /api/v1/admin/stats with the operator
   token; maildev: /api/email/summary?limit=1; maildump: /messages/, its only
   listing). The clock runs from the moment every SMTP connection is open to
   the answer showing all N. 250 → visible per message: the k-th 250 reply
   is matched with the first answer that shows k or more messages (first in,
   first out; the answer's arrival time, so each figure is up to one poll
   interval late, for every system alike). For Postfix, each file's arrival
   time (inotify) is matched with its own message. A run is cut after
   --limit s (rate over what was visible by then) and the cut is reported.
   After each run, untimed, every stored message is read back through the
   system's own API and its X-Bench-Id counted: nothing lost, nothing
   duplicated.
2. API at 5,000 stored: wrk (-t, -c, -d as --threads, --connections,
   --api-duration) on each system's list (page of 30; maildump has only its
   whole-store list), single message and raw source, right after the last
   5k end-to-end round, with the process that received the mail. maildump
   is loaded with `Connection: close` (a kept-alive connection waits ~44 ms
   per answer there).
3. Resources after 5,000 mails: resident memory of every process (ours: the
   `mtasidecar dev` tree; Postfix's processes shown apart), before and after
   the API load; database size per 1,000 messages against the raw size.
4. Scaling: bench.api_list's database builder fills public-mode databases of
   --api-sizes messages (100 per mailbox; kept in bench/results/ for reuse,
   same names as `api-list --mode public`), then (a) `mtasidecar api` under
   wrk, as in api-list, and (b) `mtasidecar ingest` draining a backlog of
   --ingest-n corpus mails into a copy of each database (and a fresh one).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from mtasidecar.ingest.maildir import ensure_maildir

from . import common as C
from . import peers as P
from .smtp import send_parallel

SYSTEMS = ("postfix", "mtasidecar", "maildev", "maildump")
OPERATOR_TOKEN = "bench-operator-token-0123456789abcdef"

TARGET_VS_PEER = 1.0      # end to end ≥ the faster peer
TARGET_VS_POSTFIX = 0.90  # end to end ≥ 90 % of Postfix alone
TARGET_FALL = 0.10        # 1k → 20k: the rate falls by ≤ 10 %
TARGET_LIST_X = 4.0       # list ≥ 4× maildev's
TARGET_ITEM_X = 2.0       # message and raw ≥ 2× maildev's
TARGET_P99_GROWTH = 2.0   # list p99 within 2× from 10k to 1M stored
TARGET_MEM_SHARE = 0.5    # our processes ≤ half of maildev's RSS

WRK_LUA = """\
-- bench.compare's wrk script: each request GETs a random line of the file
-- named after "--"; a line is PATH or PATH<TAB>TOKEN (Authorization: Bearer).
-- A second argument "close" sends Connection: close (a new connection each).
local paths = {}
function init(args)
  if args[2] == "close" then wrk.headers["Connection"] = "close" end
  for line in io.lines(args[1]) do
    if #line > 0 then
      local path, token = line:match("^([^\\t]+)\\t?(.*)$")
      local headers = nil
      if token ~= "" then headers = { ["Authorization"] = "Bearer " .. token } end
      paths[#paths + 1] = { path, headers }
    end
  end
  math.randomseed(os.time() * 1000 + math.random(1000))
end
function request()
  local p = paths[math.random(#paths)]
  return wrk.format("GET", p[1], p[2])
end
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="e2e,api,scaling",
                   help="what to run: e2e (end to end, with the 5k API, memory and size figures), "
                        "scaling (our API and ingest at --api-sizes); 'api' is part of e2e")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--sizes", default="1000,5000,20000", help="mails per end-to-end run")
    p.add_argument("--rounds", default="2,2,1", help="rounds per size (one number each, or one for all)")
    p.add_argument("--conns", type=int, default=4, help="parallel SMTP connections")
    p.add_argument("--poll-interval", type=float, default=0.1,
                   help="seconds between two API polls, for every system (default 0.1)")
    p.add_argument("--relaxed-poll", type=float, default=1.0,
                   help="after the rounds, one more 5,000-mail run of each system with an API polled this "
                        "often, to show what polling costs each (0: skip)")
    p.add_argument("--limit", type=float, default=240,
                   help="cut an end-to-end run after this many seconds (default 240)")
    p.add_argument("--drain-limit", type=float, default=180,
                   help="after a cut, wait up to this many seconds for the accepted mail before counting it")
    p.add_argument("--api-sizes", default="10000,100000,1000000", help="stored messages for the scaling curve")
    p.add_argument("--ingest-n", type=int, default=5000, help="backlog drained into each stored size")
    p.add_argument("--api-duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--threads", type=int, default=2, help="wrk -t")
    p.add_argument("--connections", type=int, default=32, help="wrk -c")
    p.add_argument("--no-reuse", action="store_true", help="fill the scaling databases again")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet-wait", type=float, default=30,
                   help="before each run, wait up to this many seconds for busy neighbours to calm down")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="before starting, wait for the 1-minute load average to drop below this")
    p.add_argument("--load-wait", type=float, default=0,
                   help="… for up to this many seconds (default 0: only record it; `all` waits)")
    p.add_argument("--timeout", type=float, default=900, help="give up an ingest or fill step after this")
    p.add_argument("--keep", action="store_true", help="keep temporary directories")
    p.add_argument("--json", default=str(C.RESULTS / "compare-latest.json"),
                   help="write every figure here too (bench.all draws its charts from it)")
    p.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: print (and --record) the report of the figures saved in PATH")
    C.add_auth_argument(p)
    p.add_argument("--mode", choices=["private", "public"], default="public",
                   help="bench.test's mode for mtasidecar (default public: a catch-all like the peers)")


# --------------------------------------------------------------------------
# Small pieces


def _percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"n": 0}
    return {"n": len(values_ms), "p50": C.pct(values_ms, 50), "p90": C.pct(values_ms, 90),
            "p95": C.pct(values_ms, 95), "p99": C.pct(values_ms, 99), "max": max(values_ms)}


def _fifo_latency(t250: list[float], events: list[tuple[float, int]]) -> list[float]:
    """ms from the k-th 250 (sorted) to the first poll answer showing > k messages."""
    out = []
    k = 0
    accepted = sorted(t250)
    for t, count in events:
        while k < min(count, len(accepted)):
            out.append(max(0.0, (t - accepted[k]) * 1000))
            k += 1
    return out


class CountPoller:
    """Every ``interval`` s asks ``count()`` (one HTTP request, a new connection) and keeps
    (answer time, count). Stops when the count reaches ``target`` or at ``deadline``."""

    def __init__(self, count, target: int, interval: float, deadline: float):
        import threading
        self.count, self.target, self.interval, self.deadline = count, target, interval, deadline
        self.events: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.requests = 0
        self.busy_s = 0.0   # time spent waiting for answers
        self.t_done: float | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="count-poller", daemon=True)

    def start(self) -> "CountPoller":
        self.thread.start()
        return self

    def _run(self) -> None:
        last = -1
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            t0 = time.monotonic()
            try:
                n = self.count()
            except Exception as exc:  # noqa: BLE001 - a busy peer may time out: counted, retried
                if len(self.errors) < 50:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                n = None
            t1 = time.monotonic()
            self.requests += 1
            self.busy_s += t1 - t0
            if n is not None:
                if n != last:
                    self.events.append((t1, n))
                    last = n
                if n >= self.target:
                    self.t_done = t1
                    return
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    @property
    def last_count(self) -> int:
        return self.events[-1][1] if self.events else 0

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self.thread.join(timeout)


def _cpu_by_pid(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    tick = os.sysconf("SC_CLK_TCK")
    return {g: {p: (C._stat(p) or ("", 0, 0))[2] / tick for p in pids} for g, pids in groups.items()}


def _tree_pids(root: int) -> list[int]:
    return [p for p in C.descendants(root) if C._stat(p)]


def _mem(pids: list[int]) -> dict:
    rss, pss = C.rss_kb_of(pids)
    hwm = sum(C.status_kb(p, "VmHWM") for p in pids)
    anon = sum(C.status_kb(p, "RssAnon") for p in pids)
    detail = [{"pid": p, "cmd": C.cmdline(p), "rss_mb": C.status_kb(p, "VmRSS") / 1024,
               "anon_mb": C.status_kb(p, "RssAnon") / 1024, "pss_mb": C.pss_kb(p) / 1024} for p in pids]
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024, "hwm_mb": hwm / 1024, "anon_mb": anon / 1024,
            "file_mb": (rss - anon) / 1024, "procs": len(pids), "detail": detail}


def _dir_bytes(path: Path, names: list[str]) -> int:
    return sum((path / n).stat().st_size for n in names if (path / n).exists())


# --------------------------------------------------------------------------
# The systems, behind one interface: start(), smtp_port, count(), bench_ids(), pids, stop()


class PostfixAlone:
    name = "postfix"
    count_how = "inotify on Maildir/new/ (each file's own arrival time)"

    def __init__(self, keep: bool):
        from mtasidecar.mta.instance import PostfixInstance

        from .inotify import DirWatcher
        self._watcher_cls = DirWatcher
        self.base = Path(tempfile.mkdtemp(prefix="compare-postfix-", dir="/tmp"))
        self.base.chmod(0o755)
        self.pf = PostfixInstance(self.base / "postfix", C.free_port(), [("bench.test", True)],
                                  self.base / "Maildir", hostname="bench.localhost")
        self.keep = keep
        self.watcher = None

    @property
    def smtp_port(self) -> int:
        return self.pf.smtp_port

    def start(self) -> "PostfixAlone":
        self.pf.start()
        self.watcher = self._watcher_cls(self.base / "Maildir" / "new", keep_names=True)
        return self

    def pids(self) -> dict[str, list[int]]:
        return {"Postfix": self.pf.processes()}

    def files(self) -> dict[str, str]:
        """file name → X-Bench-Id."""
        out = {}
        new = self.base / "Maildir" / "new"
        for entry in os.scandir(new):
            with open(entry.path, "rb") as fh:
                out[entry.name] = P.bench_id_of(fh.read(65536))
        return out

    def stop(self) -> None:
        try:
            if self.watcher:
                self.watcher.close()
        finally:
            try:
                self.pf.stop()
            finally:
                if not self.keep:
                    shutil.rmtree(self.base, ignore_errors=True)


class Ours:
    name = "mtasidecar"
    count_how = "GET /api/v1/admin/stats (messages; operator token)"

    def __init__(self, dns: str, auth: bool, mode: str, keep: bool):
        from .service import DevService
        self.svc = DevService(dns, auth, keep, prefix="compare-ours-", mode=mode,
                              api={"operator_token": OPERATOR_TOKEN})
        self.auth_header = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        self._listing: list[tuple[str, str]] | None = None

    @property
    def smtp_port(self) -> int:
        return self.svc.smtp_port

    @property
    def http_port(self) -> int:
        return self.svc.http_port

    def start(self) -> "Ours":
        self.svc.start()
        return self

    def mailboxes(self, recipients: list[str]) -> dict[str, str]:
        return self.svc.mailboxes(recipients)

    def count(self) -> int:
        return int(P.get_json(self.http_port, "/api/v1/admin/stats", self.auth_header)["messages"])

    def listing(self) -> list[tuple[str, str]]:
        """(address, message id) of every stored message: every mailbox's list, every page."""
        out = []
        boxes, cursor = [], None
        for _ in range(100_000):
            page = P.get_json(self.http_port, "/api/v1/admin/mailboxes?limit=100"
                              + (f"&cursor={cursor}" if cursor else ""), self.auth_header)
            boxes += [b["address"] for b in page["items"] if b["message_count"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        for address in boxes:
            cursor = None
            for _ in range(100_000):
                page = P.get_json(self.http_port, f"/api/v1/mailboxes/{address}/messages?limit=100"
                                  + (f"&cursor={cursor}" if cursor else ""), self.auth_header)
                out += [(address, m["id"]) for m in page["items"]]
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        self._listing = out
        return out

    def bench_ids(self) -> collections.Counter:
        paths = [f"/api/v1/mailboxes/{a}/messages/{i}/raw" for a, i in self.listing()]
        bodies = P.fetch_all(self.http_port, paths, threads=4, headers=self.auth_header)
        return collections.Counter(P.bench_id_of(b) for b in bodies.values())

    def api_paths(self, rng, n_items: int = 2000, tokens: dict[str, str] | None = None) -> dict[str, list[str]]:
        listing = self._listing or self.listing()
        tokens = tokens or {}

        def tok(a: str) -> str:
            return f"\t{tokens[a]}" if a in tokens else ""
        boxes = sorted({a for a, _ in listing})
        sample = rng.sample(listing, min(n_items, len(listing)))
        return {
            "list": [f"/api/v1/mailboxes/{a}/messages?limit=30{tok(a)}" for a in boxes],
            "message": [f"/api/v1/mailboxes/{a}/messages/{i}{tok(a)}" for a, i in sample],
            "raw": [f"/api/v1/mailboxes/{a}/messages/{i}/raw{tok(a)}" for a, i in sample],
        }

    def pids(self) -> dict[str, list[int]]:
        from mtasidecar.mta.instance import PostfixInstance
        pf = PostfixInstance(self.svc.base / "postfix", 1, [("bench.test", True)], self.svc.maildir)
        return {"mtasidecar": _tree_pids(self.svc.proc.pid), "Postfix": pf.processes()}

    def db_bytes(self) -> int:
        return _dir_bytes(self.svc.base, ["mtasidecar.db", "mtasidecar.db-wal"])

    def stop(self) -> None:
        self.svc.stop()


class PeerSystem:
    def __init__(self, peer: P.Peer):
        self.peer = peer
        self.name = peer.name
        self.count_how = peer.count_how()

    @property
    def smtp_port(self) -> int:
        return self.peer.smtp_port

    @property
    def http_port(self) -> int:
        return self.peer.http_port

    def start(self) -> "PeerSystem":
        self.peer.start()
        return self

    def count(self) -> int:
        return self.peer.count()

    def bench_ids(self) -> collections.Counter:
        return self.peer.bench_ids()

    def api_paths(self, rng, n_items: int = 2000, tokens=None) -> dict[str, list[str]]:
        return self.peer.api_paths(rng, n_items)

    def pids(self) -> dict[str, list[int]]:
        return {self.name: _tree_pids(self.peer.proc.pid)}

    def stop(self) -> None:
        self.peer.stop()


def make_system(name: str, dns, args):
    if name == "postfix":
        return PostfixAlone(args.keep)
    if name == "mtasidecar":
        return Ours(dns.server if dns else None, args.auth == "on", args.mode, args.keep)
    return PeerSystem(P.PEERS[name]())


# --------------------------------------------------------------------------
# wrk


def run_wrk(port: int, paths: list[str], work: Path, tag: str, threads: int, conns: int, duration: int,
            close: bool = False) -> dict:
    from .api_list import parse_wrk
    lua = work / "compare-wrk.lua"
    lua.write_text(WRK_LUA)
    pf = work / f"paths-{tag}.txt"
    pf.write_text("\n".join(paths) + "\n")
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
            "-s", str(lua), f"http://127.0.0.1:{port}", "--", str(pf)] + (["close"] if close else [])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 90).stdout
    (work / f"wrk-{tag}.out").write_text(out)
    res = parse_wrk(out)
    if close:
        # wrk counts the server closing the connection after each answer as a
        # "read" error; with Connection: close that is every request, not a failure.
        import re
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if m:
            c, rd, w, to = (int(x) for x in m.groups())
            res["errors"], res["closed_reads"] = c + w + to, rd
    res["argv"] = " ".join(argv[:-3 if not close else -4])
    return res


def wrk_endpoints(port: int, paths: dict[str, list[str]], pids_fn, work: Path, args, close: bool = False,
                  prefix: str = "") -> dict:
    """wrk on each path list (after a short warm-up); req/s, latency and the server's CPU ms/request."""
    import resource
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        return sum((C._stat(p) or ("", 0, 0))[2] for p in pids_fn()) / tick
    # Single messages first (also the warm-up), lists last: a list that takes a
    # peer seconds leaves a queue of answers behind that must not slow the next run.
    order = [k for k in paths if not k.startswith("list")] + [k for k in paths if k.startswith("list")]
    run_wrk(port, paths[order[0]], work, f"{prefix}warm", args.threads, args.connections, 2, close)
    settle(port, paths[order[0]][0].split("\t")[0])
    out = {}
    for name in order:
        lines = paths[name]
        print(f"    wrk {prefix}{name} ({args.api_duration} s, {len(lines)} paths)...", flush=True)
        c0 = cpu()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = run_wrk(port, lines, work, f"{prefix}{name}".replace(" ", "_").replace("(", "").replace(")", ""),
                    args.threads, args.connections, args.api_duration, close)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r["server_cpu_ms"] = (cpu() - c0) * 1000 / max(1, r["requests"])
        r["wrk_cpu_ms"] = ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) * 1000 / max(
            1, r["requests"])
        print(f"      {r['rps']:.0f} req/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, "
              f"errors {r['errors']} / non-2xx {r['non2xx']}", flush=True)
        out[name] = r
        r["settle_s"] = settle(port, paths[order[0]][0].split("\t")[0])
    return {k: out[k] for k in paths}


def settle(port: int, path: str, limit: float = 120) -> float:
    """Wait (up to ``limit`` s) until the server answers ``path`` within 0.5 s: what a
    load left queued must not count against the next run. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        t = time.monotonic()
        try:
            P.get(port, path, timeout=limit)
        except OSError:
            pass
        if time.monotonic() - t < 0.5:
            break
    return time.monotonic() - t0


def quiet_tree(pids_fn, limit: float = 60, idle: float = 0.05) -> float:
    """Wait (up to ``limit`` s) until these processes use under ``idle`` of a core over 0.5 s
    (a service still starting its workers, a peer still compiling). Returns the seconds waited."""
    tick = os.sysconf("SC_CLK_TCK")
    t0 = time.monotonic()

    def cpu() -> float:
        return sum((C._stat(p) or ("", 0, 0))[2] for p in pids_fn()) / tick
    while time.monotonic() - t0 < limit:
        a = cpu()
        time.sleep(0.5)
        if (cpu() - a) / 0.5 < idle:
            break
    return time.monotonic() - t0


# --------------------------------------------------------------------------
# 1-3: one end-to-end run of one system


WARMUP_ID = "warmup"


def warmup_mail(mail):
    """A copy of ``mail`` whose X-Bench-Id says it is the warm-up (sent and awaited before the clock)."""
    import re

    from .smtp import Mail
    wire = re.sub(rb"(?mi)^(X-Bench-Id:[ \t]*)\S+", rb"\g<1>" + WARMUP_ID.encode(), mail.wire, count=1)
    return Mail(mail.sender, mail.recipient, wire, key=WARMUP_ID)


def run_e2e(name: str, mails, keys_by_bench: dict, dns, args, extras: bool, work: Path,
            interval: float | None = None) -> dict:
    """One system, one run: warm up, send, poll until visible, verify; with ``extras`` also memory and wrk."""
    n = len(mails)
    interval = args.poll_interval if interval is None else interval
    expected = collections.Counter(keys_by_bench)
    system = make_system(name, dns, args)
    out: dict = {"system": name, "n": n, "count_how": system.count_how, "poll_interval": interval}
    poller = None
    try:
        system.start()
        tokens = {}
        if name == "mtasidecar":
            tokens = system.mailboxes(sorted({m.recipient for m in mails}))  # private mode only

        def all_pids() -> list[int]:
            return [p for v in system.pids().values() for p in v]
        # One warm-up mail, awaited, then wait for the processes to go idle: every
        # system starts the clock ready (workers started, code paths loaded).
        warm = send_parallel("127.0.0.1", system.smtp_port, [warmup_mail(mails[0])], 1, timeout=60)
        if warm.errors:
            raise C.BenchError(f"{name}: warm-up mail: {warm.errors[:2]}")
        if name == "postfix":
            if not system.watcher.wait_for(1, 60):
                raise C.BenchError("postfix: the warm-up mail did not arrive")
        else:
            C.wait_until(lambda: system.count() >= 1, 60, 0.1, f"{name} to show the warm-up mail")
        out["settle_s"] = quiet_tree(all_pids)
        out["load"] = C.loadavg()
        mem_before = {k: _mem(v) for k, v in system.pids().items()}
        cpu_before = _cpu_by_pid(system.pids())
        if name != "postfix":
            # The count includes the warm-up mail: the target is n + 1.
            poller = CountPoller(system.count, n + 1, interval, time.monotonic() + args.limit + 90).start()
        res = send_parallel("127.0.0.1", system.smtp_port, mails, args.conns, timeout=args.limit)
        accepted = len(res.replies)
        out.update(accepted=accepted, send_rate=res.rate, send_errors=res.errors[:3])
        t0 = res.t_start
        cut = False
        if name == "postfix":
            ok = system.watcher.wait_for(n + 1, max(0.0, t0 + args.limit - time.monotonic()))
            t_done = system.watcher.last if ok else None
            visible_at_limit = system.watcher.count - 1
            if not ok:
                cut = True
                system.watcher.wait_for(accepted + 1, args.drain_limit)
            files = system.files()
            by_key = {keys_by_bench.get(b): system.watcher.times.get(f) for f, b in files.items()}
            lat = [(t - res.replies[k]) * 1000 for k, t in by_key.items()
                   if k is not None and t is not None and k in res.replies]
            seen = collections.Counter(files.values())
        else:
            poller.deadline = t0 + args.limit
            poller.thread.join(max(0.0, t0 + args.limit - time.monotonic()) + interval + 35)
            poller.stop()
            t_done = poller.t_done
            visible_at_limit = max(0, poller.last_count - 1)
            if t_done is None:
                cut = True
                # Let it finish what it accepted before counting (bounded).
                try:
                    C.wait_until(lambda: system.count() >= accepted + 1, args.drain_limit, 1.0,
                                 f"{name} to show the {accepted} accepted mails")
                except C.BenchError as exc:
                    out["drain_error"] = str(exc)
            events = [(t, c - 1) for t, c in poller.events if t <= (t_done or float("inf"))]
            lat = _fifo_latency(list(res.replies.values()), events)
            out.update(poll_requests=poller.requests, poll_errors=len(poller.errors),
                       poll_error_sample=poller.errors[:2], poll_busy_s=poller.busy_s)
            print(f"    verifying through the API ({name})...", flush=True)
            seen = system.bench_ids()
        warm_seen = seen.pop(WARMUP_ID, 0)
        if t_done is not None:
            out["rate"] = n / (t_done - t0)
            out["secs"] = t_done - t0
        else:
            out["rate"] = visible_at_limit / args.limit
            out["secs"] = args.limit
        out["cut"] = cut
        # CPU of the system's processes from the first mail to the end of the clock (processes that
        # exited meanwhile, a few short-lived Postfix daemons, are missed: a floor).
        cpu_after = _cpu_by_pid(system.pids())
        out["cpu_ms_per_msg"] = {g: sum(c - cpu_before.get(g, {}).get(p, 0.0) for p, c in pids.items())
                                 * 1000 / max(1, accepted) for g, pids in cpu_after.items()}
        out["visible_at_limit"] = visible_at_limit
        out["latency_ms"] = _percentiles(lat)
        accepted_ids = {b for b, k in keys_by_bench.items() if k in res.replies}
        out["verify"] = {
            "stored": sum(seen.values()),
            "distinct": len([b for b in seen if b in expected]),
            "lost": len([b for b in accepted_ids if b not in seen]),
            "duplicated": sum(c - 1 for b, c in seen.items() if c > 1),
            "unknown": sum(c for b, c in seen.items() if b not in expected),
            "warmup": warm_seen,
        }
        if extras:
            out["memory"] = {k: _mem(v) for k, v in system.pids().items()}
            out["memory_before"] = mem_before
            if name == "mtasidecar":
                out["db_bytes"] = system.db_bytes()
            if name != "postfix" and shutil.which("wrk"):
                rng = random.Random(args.seed)
                paths = system.api_paths(rng, tokens=tokens) if name == "mtasidecar" else system.api_paths(rng)
                print(f"    API under wrk ({name}, {n} stored)...", flush=True)
                flat = all_pids
                if name == "mtasidecar":
                    flat = lambda: system.pids()["mtasidecar"]  # noqa: E731
                out["api"] = wrk_endpoints(system.http_port, paths, flat, work, args,
                                           close=(name == "maildump"), prefix=f"{name}-")
                out["memory_after_api"] = {k: _mem(v) for k, v in system.pids().items()}
        v = out["verify"]
        print(f"  {name}: {out['rate']:.0f} msg/s{' (CUT at %.0f s)' % args.limit if cut else ''}, "
              f"accept {res.rate:.0f} msg/s, 250→visible p50 {out['latency_ms'].get('p50', float('nan')):.0f} ms "
              f"p99 {out['latency_ms'].get('p99', float('nan')):.0f} ms; stored {v['stored']}, lost {v['lost']}, "
              f"duplicated {v['duplicated']}", flush=True)
        return out
    finally:
        if poller is not None:
            poller.stop(5)
        system.stop()


# --------------------------------------------------------------------------
# 4: scaling


def _scaling_db(n: int, args) -> tuple[Path, Path, dict | None]:
    from . import api_list
    mailboxes = max(100, n // 100)
    base = C.RESULTS / f"api-list-{n}-{mailboxes}-public"
    db = base / "mtasidecar.db"
    info = None
    if args.no_reuse or not api_list._reusable(base, db):
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        print(f"  filling {db} with {n} messages in {mailboxes} mailboxes...", flush=True)
        info = api_list.fill(db, n, mailboxes, args.seed, 300, "public")
        (base / "complete").write_text(json.dumps(info | {"schema": api_list.schema_fingerprint()}))
    return base, db, info


def our_api_at(n: int, args, work: Path) -> dict:
    base, db, info = _scaling_db(n, args)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT max(id) FROM message").fetchone()[0]
        rng = random.Random(args.seed)
        ids = sorted(rng.sample(range(1, rows + 1), min(20_000, rows)))
        pairs = []
        for lo in range(0, len(ids), 500):
            chunk = ids[lo:lo + 500]
            pairs += con.execute(f"SELECT m.id, b.address FROM message m JOIN mailbox b ON b.id = m.mailbox_id "
                                 f"WHERE m.id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        boxes = [r[0] for r in con.execute("SELECT address FROM mailbox WHERE message_count > 0")]
    finally:
        con.close()
    rng.shuffle(pairs)
    paths = {"list": [f"/api/v1/mailboxes/{a}/messages?limit=30" for a in boxes],
             "message": [f"/api/v1/mailboxes/{a}/messages/{mid:024x}" for mid, a in pairs],
             "raw": [f"/api/v1/mailboxes/{a}/messages/{mid:024x}/raw" for mid, a in pairs]}
    port = C.free_port()
    settings = C.settings_for(base, auth=False, mode="public", api={"port": port},
                              database={"url": f"sqlite:///{db}"})
    C.wait_quiet(args.quiet_wait)
    load = C.loadavg()
    proc = C.start_process([C.PY, "-m", "mtasidecar", "api"], env=C.child_env(settings), log=base / "api.log")
    try:
        C.wait_http(f"http://127.0.0.1:{port}/healthz", 60, alive=lambda: proc.poll() is None)
        st, body = P.get(port, paths["list"][0])
        if st != 200 or not json.loads(body)["items"]:
            raise C.BenchError(f"list at {n} stored gave {st}: {body[:200]!r}")
        res = wrk_endpoints(port, paths, lambda: _tree_pids(proc.pid), work, args, prefix=f"ours-{n}-")
        mem = _mem(_tree_pids(proc.pid))
    finally:
        C.stop_process(proc)
    size = _dir_bytes(db.parent, ["mtasidecar.db", "mtasidecar.db-wal"])
    return {"stored": rows, "mailboxes": len(boxes), "api": res, "memory": mem, "db_bytes": size,
            "filled_s": info["fill_s"] if info else None, "load": load}


def ingest_at(n_stored: int, msgs: list[bytes], dns, args) -> dict:
    """Drain a backlog of len(msgs) corpus mails into a copy of the n_stored database (0: a fresh one)."""
    base = Path(tempfile.mkdtemp(prefix=f"compare-ingest-{n_stored}-", dir="/tmp"))
    proc = None
    try:
        settings = C.settings_for(base, dns=dns.server, auth=args.auth == "on", mode="public")
        db = base / "mtasidecar.db"
        if n_stored:
            src_base, src, _ = _scaling_db(n_stored, args)
            print(f"  copying the {n_stored}-message database ({src.stat().st_size / 2**30:.1f} GB)...", flush=True)
            for suffix in ("", "-wal"):
                if Path(str(src) + suffix).exists():
                    shutil.copyfile(str(src) + suffix, str(db) + suffix)
        start_id = C.max_message_id(db)
        maildir = settings.maildir_path
        ensure_maildir(maildir)
        C.write_backlog(msgs, maildir / "new")
        os.sync()
        C.wait_quiet(args.quiet_wait)
        load = C.loadavg()
        n = len(msgs)
        t0 = time.monotonic()
        proc = C.start_process([C.PY, "-m", "mtasidecar", "ingest"], env=C.child_env(settings),
                               log=base / "ingest.log")
        sampler = C.TreeSampler(proc.pid, 0.2).start()
        t_first, _t_rows, t_done = C.wait_ingested(db, maildir / "new", n, proc, t0 + args.timeout,
                                                   after=start_id, log=base / "ingest.log",
                                                   what=f"ingest at {n_stored} stored")
        sampler.stop()
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        count = con.execute("SELECT count(*) FROM message WHERE id > ?", (start_id,)).fetchone()[0]
        con.close()
        if count != n:
            raise C.BenchError(f"ingest at {n_stored} stored: {count} new rows for {n} files")
        return {"stored": n_stored, "n": n, "total_s": t_done - t0, "rate_total": n / (t_done - t0),
                "rate_drain": n / (t_done - t_first), "cpu_ms": sampler.cpu_total() * 1000 / n,
                "peak_rss_mb": sampler.peak_sum_kb / 1024, "load": load}
    finally:
        C.stop_process(proc)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------
# Report


def _f(x, fmt="{:.0f}") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return fmt.format(x)


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def median_rate(runs: list[dict]) -> float | None:
    rates = [r["rate"] for r in runs if r.get("rate")]
    return statistics.median(rates) if rates else None


def build_tables(data: dict, report: C.Report) -> None:
    e2e = data.get("e2e", {})
    systems = data["systems"]
    if e2e:
        t = C.Table(["mails", "system", "msg/s per round (visible)", "median msg/s", "vs Postfix alone",
                     "SMTP accept msg/s", "250 → visible p50 / p95 / p99 ms (last round)",
                     "stored / lost / duplicated per round", "poll requests (errors)", "CPU ms/msg (last round)",
                     "1-min load per round"],
                    title=f"SMTP → API end to end, {data['conns']} SMTP connections, ~10 KB corpus mails, "
                          f"poll every {data['poll_interval'] * 1000:.0f} ms")
        for n, by_sys in e2e.items():
            pf = median_rate(by_sys.get("postfix", []))
            for s in systems:
                runs = by_sys.get(s, [])
                if not runs:
                    continue
                med = median_rate(runs)
                lat = runs[-1]["latency_ms"]
                rates = " / ".join(_f(r["rate"]) + (" (cut)" if r["cut"] else "") for r in runs)
                ver = " ; ".join(f"{r['verify']['stored']} / {r['verify']['lost']} / {r['verify']['duplicated']}"
                                 for r in runs)
                polls = " ; ".join(f"{r.get('poll_requests', '–')} ({r.get('poll_errors', 0)})" for r in runs) \
                    if s != "postfix" else "(inotify)"
                acc = statistics.median(r["send_rate"] for r in runs)
                loads = " / ".join(str(r.get("load", "?")).split()[0] for r in runs)
                cpu = runs[-1].get("cpu_ms_per_msg")
                cpu_text = " + ".join(f"{v:.2f} ({g})" if len(cpu) > 1 else f"{v:.2f}" for g, v in cpu.items()) \
                    if cpu else "–"
                t.add(n, f"**{s}**" if s == "mtasidecar" else s, rates, _f(med),
                      _f(_ratio(med, pf), "{:.0%}"), _f(acc),
                      f"{_f(lat.get('p50'))} / {_f(lat.get('p95'))} / {_f(lat.get('p99'))}", ver, polls, cpu_text,
                      loads)
        report.tables.append(t)

    relaxed = data.get("e2e_relaxed", {})
    if relaxed and "5000" in e2e:
        iv = next(iter(relaxed.values()))["poll_interval"]
        t = C.Table(["system", f"msg/s, poll every {data['poll_interval'] * 1000:.0f} ms (median)",
                     f"msg/s, poll every {iv * 1000:.0f} ms", "SMTP accept msg/s (both)",
                     f"250 → visible p50 / p99 ms at {iv * 1000:.0f} ms", "poll requests",
                     "stored / lost / duplicated"],
                    title="What polling costs: 5,000 mails, the same runs with the API polled less often")
        for s in systems:
            r = relaxed.get(s)
            if not r:
                continue
            runs = e2e["5000"].get(s, [])
            acc = statistics.median(x["send_rate"] for x in runs) if runs else None
            t.add(s, _f(median_rate(runs)), _f(r["rate"]) + (" (cut)" if r["cut"] else ""),
                  f"{_f(acc)} / {_f(r['send_rate'])}",
                  f"{_f(r['latency_ms'].get('p50'))} / {_f(r['latency_ms'].get('p99'))}", r.get("poll_requests", "–"),
                  f"{r['verify']['stored']} / {r['verify']['lost']} / {r['verify']['duplicated']}")
        report.tables.append(t)

    api = data.get("api_5k", {})
    if api:
        md = api.get("maildev", {})
        md_list = max((v["rps"] for k, v in md.items() if k.startswith("list")), default=None)
        t = C.Table(["system", "endpoint", "req/s", "p50 ms", "p99 ms", "errors / non-2xx", "server CPU ms/req",
                     "ours ÷ maildev"],
                    title=f"API with {data.get('api_stored', 5000)} messages stored (the mail of the last 5k run), "
                          f"wrk -t{data['wrk']['threads']} -c{data['wrk']['connections']} "
                          f"-d{data['wrk']['duration']}s")
        for s in systems:
            for ep, r in api.get(s, {}).items():
                ratio = ""
                if s == "mtasidecar":
                    base = md_list if ep == "list" else md.get(ep, {}).get("rps")
                    ratio = _f(_ratio(r["rps"], base), "{:.1f}×")
                t.add(s, ep, _f(r["rps"]), _f(r["p50"], "{:.1f}"), _f(r["p99"], "{:.1f}"),
                      f"{r['errors']} / {r['non2xx']}", _f(r.get("server_cpu_ms"), "{:.2f}"), ratio)
        report.tables.append(t)

    mem = data.get("memory", {})
    if mem:
        stored = f"{data.get('api_stored', 5000):,}"
        t = C.Table(["system", "processes", f"RSS MB after {stored} mails", "PSS MB", "anon MB",
                     "RSS MB after the API load", "peak RSS MB (VmHWM)"],
                    title=f"Resident memory after {stored} mails (sum over each system's processes)")
        for s, groups in mem.items():
            for g, m in groups["after_mail"].items():
                a = groups.get("after_api", {}).get(g, {})
                t.add(s, f"{g} ({m['procs']})", _f(m["rss_mb"]), _f(m["pss_mb"]), _f(m.get("anon_mb")),
                      _f(a.get("rss_mb")), _f(a.get("hwm_mb", m["hwm_mb"])))
        report.tables.append(t)
        ours = mem.get("mtasidecar", {})
        detail = ours.get("after_mail", {}).get("mtasidecar", {}).get("detail", [])
        if detail:
            after = {d["pid"]: d for d in ours.get("after_api", {}).get("mtasidecar", {}).get("detail", [])}
            t = C.Table(["pid", "process", "RSS MB", "anon MB", "PSS MB", "RSS MB after the API load",
                         "anon MB after the API load"],
                        title=f"Our processes after {stored} mails ('anon': the process's own memory; the rest of RSS "
                              "is mapped files: libraries, the mmap'd database)")
            for d in sorted(detail, key=lambda d: d["pid"]):
                a = after.get(d["pid"], {})
                t.add(d["pid"], d["cmd"], _f(d["rss_mb"]), _f(d["anon_mb"]), _f(d["pss_mb"]), _f(a.get("rss_mb")),
                      _f(a.get("anon_mb")))
            report.tables.append(t)

    sizes = data.get("db_size", [])
    if sizes:
        t = C.Table(["database", "messages", "DB MB", "DB MB per 1,000", "raw MB per 1,000", "DB ÷ raw"],
                    title="Database size against the raw mail (SQLite file + WAL)")
        for row in sizes:
            t.add(row["what"], row["messages"], _f(row["db_mb"]), _f(row["db_per_1000"], "{:.1f}"),
                  _f(row["raw_per_1000"], "{:.1f}"), _f(row["ratio"], "{:.2f}"))
        report.tables.append(t)

    sc = data.get("scaling", [])
    if sc:
        t = C.Table(["stored", "list req/s", "list p50 / p99 ms", "message req/s", "message p99 ms", "raw req/s",
                     "raw p99 ms", "ingest msg/s (drain)", "ingest CPU ms/msg", "API anon / PSS MB", "DB GB"],
                    title=f"Scaling: our API (wrk as above, public mode, 100 messages per mailbox) and ingest "
                          f"({data.get('ingest_n')} mails drained into a copy of each database, checks "
                          f"{data['auth']})")
        ing = {r["stored"]: r for r in data.get("ingest", [])}
        rows = {r["stored"]: r for r in sc}
        for n in sorted(set(rows) | set(ing)):
            r = rows.get(n, {})
            a = r.get("api", {})
            i = ing.get(n, {})
            t.add(f"{n:,}", _f(a.get("list", {}).get("rps")),
                  f"{_f(a.get('list', {}).get('p50'), '{:.1f}')} / {_f(a.get('list', {}).get('p99'), '{:.1f}')}",
                  _f(a.get("message", {}).get("rps")), _f(a.get("message", {}).get("p99"), "{:.1f}"),
                  _f(a.get("raw", {}).get("rps")), _f(a.get("raw", {}).get("p99"), "{:.1f}"),
                  f"{_f(i.get('rate_total'))} ({_f(i.get('rate_drain'))})", _f(i.get("cpu_ms"), "{:.2f}"),
                  f"{_f(r.get('memory', {}).get('anon_mb'))} / {_f(r.get('memory', {}).get('pss_mb'))}",
                  _f(r.get("db_bytes", 0) / 2**30 if r else None, "{:.2f}"))
        report.tables.append(t)

    targets = evaluate_targets(data)
    if targets:
        t = C.Table(["target (issue 7)", "measured", "met?"], title="Targets")
        for row in targets:
            t.add(*row)
        report.tables.append(t)


def evaluate_targets(data: dict) -> list[list[str]]:
    out = []
    e2e = data.get("e2e", {})
    for n, by_sys in e2e.items():
        ours = median_rate(by_sys.get("mtasidecar", []))
        peers = [median_rate(by_sys.get(p, [])) for p in ("maildev", "maildump")]
        peers = [p for p in peers if p]
        pf = median_rate(by_sys.get("postfix", []))
        if ours and peers:
            best = max(peers)
            out.append([f"end to end, {n} mails: ≥ the faster peer", f"{ours:.0f} vs {best:.0f} msg/s "
                        f"({ours / best:.0%})", C.yes(ours >= TARGET_VS_PEER * best)])
        if ours and pf:
            out.append([f"end to end, {n} mails: ≥ 90 % of Postfix alone", f"{ours:.0f} vs {pf:.0f} msg/s "
                        f"({ours / pf:.0%})", C.yes(ours >= TARGET_VS_POSTFIX * pf)])
    ns = sorted(int(n) for n in e2e)
    if len(ns) >= 2:
        lo, hi = median_rate(e2e[str(ns[0])].get("mtasidecar", [])), median_rate(e2e[str(ns[-1])].get("mtasidecar", []))
        if lo and hi:
            fall = 1 - hi / lo
            out.append([f"our end-to-end rate falls ≤ 10 % from {ns[0]:,} to {ns[-1]:,} mails",
                        f"{lo:.0f} → {hi:.0f} msg/s ({-fall:+.0%})", C.yes(fall <= TARGET_FALL)])
        for peer in ("maildev", "maildump"):
            plo = median_rate(e2e[str(ns[0])].get(peer, []))
            phi = median_rate(e2e[str(ns[-1])].get(peer, []))
            if plo and phi:
                cut = any(r["cut"] for r in e2e[str(ns[-1])].get(peer, []))
                out.append([f"(for reference) {peer}, {ns[0]:,} → {ns[-1]:,} mails",
                            f"{plo:.0f} → {phi:.0f} msg/s ({phi / plo - 1:+.0%}){' (cut)' if cut else ''}", ""])
    api = data.get("api_5k", {})
    ours, md = api.get("mtasidecar", {}), api.get("maildev", {})
    if ours and md:
        md_list = max((v["rps"] for k, v in md.items() if k.startswith("list")), default=0)
        if "list" in ours and md_list:
            x = ours["list"]["rps"] / md_list
            out.append(["API list ≥ 4× maildev's (page of 30; maildev: the faster of its two lists)",
                        f"{ours['list']['rps']:.0f} vs {md_list:.0f} req/s ({x:.1f}×)", C.yes(x >= TARGET_LIST_X)])
        for ep in ("message", "raw"):
            if ep in ours and ep in md and md[ep]["rps"]:
                x = ours[ep]["rps"] / md[ep]["rps"]
                out.append([f"API {ep} ≥ 2× maildev's", f"{ours[ep]['rps']:.0f} vs {md[ep]['rps']:.0f} req/s "
                            f"({x:.1f}×)", C.yes(x >= TARGET_ITEM_X)])
    sc = sorted(data.get("scaling", []), key=lambda r: r["stored"])
    if len(sc) >= 2 and "list" in sc[0]["api"] and "list" in sc[-1]["api"]:
        a, b = sc[0]["api"]["list"]["p99"], sc[-1]["api"]["list"]["p99"]
        out.append([f"list p99 within 2× from {sc[0]['stored']:,} to {sc[-1]['stored']:,} stored",
                    f"{a:.1f} → {b:.1f} ms ({b / a:.2f}×)", C.yes(b <= TARGET_P99_GROWTH * a)])
    mem = data.get("memory", {})
    if "mtasidecar" in mem and "maildev" in mem:
        ours = mem["mtasidecar"]["after_mail"]["mtasidecar"]
        pf_mb = mem["mtasidecar"]["after_mail"].get("Postfix", {}).get("rss_mb", 0)
        md = mem["maildev"]["after_mail"]["maildev"]
        stored = f"{data.get('api_stored', 5000):,}"
        out.append([f"memory: our processes ≤ half of maildev's resident memory after {stored} mails (RSS sums)",
                    f"{ours['rss_mb']:.0f} MB ({ours['procs']} Python processes; {ours['rss_mb'] + pf_mb:.0f} MB "
                    f"with Postfix's daemons) vs {md['rss_mb']:.0f} MB ({ours['rss_mb'] / md['rss_mb']:.0%})",
                    C.yes(ours["rss_mb"] <= TARGET_MEM_SHARE * md["rss_mb"])])
        out.append(["… the same with shared pages counted once (PSS sums)",
                    f"{ours['pss_mb']:.0f} MB vs {md['pss_mb']:.0f} MB ({ours['pss_mb'] / md['pss_mb']:.0%})",
                    C.yes(ours["pss_mb"] <= TARGET_MEM_SHARE * md["pss_mb"])])
    return out


# --------------------------------------------------------------------------


def run(args, argv: list[str]) -> C.Report:
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        argv = data.get("argv") or argv
    else:
        data = measure(args, argv)
    return render(data, args, argv)


def measure(args, argv: list[str]) -> dict:
    """Run the parts asked for; every figure in one dict (also saved to --json as it grows)."""
    parts = set(args.parts.split(","))
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise C.BenchError(f"unknown systems {bad}; choose from {SYSTEMS}")
    if shutil.which("wrk") is None:
        raise C.BenchError("wrk is not installed (apt-get install wrk)")
    sizes = _ints(args.sizes)
    rounds = _ints(args.rounds)
    rounds = rounds * len(sizes) if len(rounds) == 1 else rounds
    if len(rounds) != len(sizes):
        raise C.BenchError("--rounds: one number, or one per --sizes entry")

    load, waited = C.wait_load(args.max_load, args.load_wait)
    data: dict = {"machine": C.machine_info(), "argv": argv, "systems": systems, "conns": args.conns,
                  "poll_interval": args.poll_interval, "limit": args.limit, "drain_limit": args.drain_limit,
                  "max_load": args.max_load, "mode": args.mode, "auth": args.auth,
                  "wrk": {"threads": args.threads, "connections": args.connections, "duration": args.api_duration},
                  "ingest_n": args.ingest_n, "start_load": load, "start_waited_s": waited, "e2e": {},
                  "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    data["versions"] = P.install([s for s in systems if s in P.PEERS]) if "e2e" in parts else {}
    work = C.RESULTS / "compare-work"
    work.mkdir(parents=True, exist_ok=True)
    busy: list[str] = []

    from .dns import BenchDNS
    dns = BenchDNS().start()
    try:
        if "e2e" in parts:
            for n, n_rounds in zip(sizes, rounds):
                msgs = C.corpus(n, seed=args.seed)
                from .sender import mails_for
                mails = mails_for(msgs)
                keys_by_bench = {P.bench_id_of(m): i for i, m in enumerate(msgs)}
                if len(keys_by_bench) != n:
                    raise C.BenchError("corpus messages without a distinct X-Bench-Id")
                by_sys: dict[str, list] = {s: [] for s in systems}
                data["e2e"][str(n)] = by_sys
                for r in range(n_rounds):
                    order = systems[r % len(systems):] + systems[:r % len(systems)]
                    for s in order:
                        busy += [f"before {n}/{r + 1}/{s}: {b}" for b in C.wait_quiet(args.quiet_wait)]
                        extras = (n == 5000 or (5000 not in sizes and n == sizes[-1])) and r == n_rounds - 1
                        print(f"[{n} mails, round {r + 1}/{n_rounds}] {s} (load {C.loadavg()})...", flush=True)
                        one = run_e2e(s, mails, keys_by_bench, dns, args, extras, work)
                        by_sys[s].append(one)
                        if extras:
                            data["api_stored"] = n
                            if "api" in one:
                                data.setdefault("api_5k", {})[s] = one.pop("api")
                            if "memory" in one:
                                data.setdefault("memory", {})[s] = {
                                    "after_mail": one.pop("memory"), "after_api": one.pop("memory_after_api", {}),
                                    "before_mail": one.pop("memory_before", {})}
                            if "db_bytes" in one:
                                raw = sum(len(m) for m in msgs)  # as generated (LF), before Postfix's trace
                                db_b = one["db_bytes"]
                                data.setdefault("db_size", []).append({
                                    "what": f"mtasidecar after the {n}-mail run", "messages": n,
                                    "db_mb": db_b / 2**20, "db_per_1000": db_b / 2**20 / n * 1000,
                                    "raw_per_1000": raw / 2**20 / n * 1000, "ratio": db_b / raw})
                        _save(data, args.json)
                if n == 5000 and args.relaxed_poll > 0:
                    data["e2e_relaxed"] = {}
                    for s in systems:
                        if s == "postfix":
                            continue
                        busy += [f"before relaxed/{s}: {b}" for b in C.wait_quiet(args.quiet_wait)]
                        print(f"[{n} mails, polled every {args.relaxed_poll:g} s] {s} (load {C.loadavg()})...",
                              flush=True)
                        data["e2e_relaxed"][s] = run_e2e(s, mails, keys_by_bench, dns, args, False, work,
                                                         interval=args.relaxed_poll)
                        _save(data, args.json)
        if "scaling" in parts:
            api_sizes = _ints(args.api_sizes)
            data["scaling"] = []
            data["ingest"] = []
            raw_mean = None
            for n in api_sizes:
                print(f"[scaling] our API at {n} stored...", flush=True)
                r = our_api_at(n, args, work)
                data["scaling"].append(r)
                if raw_mean is None:
                    raw_mean = statistics.mean(len(m) for m in C.corpus(300, seed=args.seed))
                data.setdefault("db_size", []).append({
                    "what": f"api-list builder, {n:,} messages", "messages": r["stored"],
                    "db_mb": r["db_bytes"] / 2**20, "db_per_1000": r["db_bytes"] / 2**20 / r["stored"] * 1000,
                    "raw_per_1000": raw_mean * 1000 / 2**20, "ratio": r["db_bytes"] / (raw_mean * r["stored"])})
                _save(data, args.json)
            backlog = C.corpus(args.ingest_n, seed=args.seed)
            for n in [0] + api_sizes:
                print(f"[scaling] ingest of {args.ingest_n} mails into {n} stored...", flush=True)
                r = ingest_at(n, backlog, dns, args)
                print(f"  {r['rate_total']:.0f} msg/s (drain {r['rate_drain']:.0f}), {r['cpu_ms']:.2f} CPU ms/msg",
                      flush=True)
                data["ingest"].append(r)
                _save(data, args.json)
    finally:
        dns.stop()
    data["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data["end_load"] = C.loadavg()
    data["busy"] = busy
    _save(data, args.json)
    return data


def render(data: dict, args, argv: list[str]) -> C.Report:
    """The report (tables and notes) from the figures ``measure`` gathered."""
    report = C.Report("compare", argv, data["machine"])
    poll, limit, mode, auth = data["poll_interval"], data["limit"], data["mode"], data["auth"]
    load, waited, busy = data["start_load"], data.get("start_waited_s", 0), data.get("busy", [])
    build_tables(data, report)
    v = data.get("versions", {})
    if "maildev" in v:
        report.notes.append(f"maildev {v['maildev']['maildev']} on Node {v['maildev']['node']}, installed by "
                            f"bench/peers.py with npm into {v['maildev']['dir']} (a package.json written there): a "
                            f"plain `npm install maildev` fails on this registry, so an npm `overrides` entry pins "
                            f"mailparser to {v['maildev']['mailparser']}, an older parser than a stock install "
                            "would have. In memory; `--ip 127.0.0.1 --web-ip 127.0.0.1`.")
    if "maildump" in v:
        report.notes.append(f"maildump {v['maildump']['maildump']} in its own virtualenv ({v['maildump']['python']}; "
                            f"{v['maildump']['dir']}): it imports smtpd/asyncore, gone in Python 3.12. In memory.")
    if data["e2e"]:
        how = {}
        for by_sys in data["e2e"].values():
            for s, runs in by_sys.items():
                if runs:
                    how[s] = runs[0]["count_how"]
        report.notes.append(
            f"Polling, the same for every system with an API: one request every {poll * 1000:.0f} ms "
            "(or back to back when an answer takes longer), each on a new connection, asking how many messages "
            "the API shows — " + "; ".join(f"{s}: {h}" for s, h in how.items() if s != "postfix") +
            ". The clock stops at the first answer showing all N; 250 → visible matches the k-th 250 reply "
            "with the first answer showing k messages (first in, first out), timed at the answer's arrival: "
            "each figure is up to one poll interval (plus the answer's own time) late. Postfix alone: inotify "
            "on new/, each file matched with its own message (exact).")
        report.notes.append(
            f"mtasidecar: `python -m mtasidecar dev` with bench.test in **{mode}** mode"
            + (" (a catch-all like the peers; mail creates the mailbox)" if mode == "public" else "")
            + f", sender checks (SPF/DKIM/DMARC) {auth}" + (" against bench.dns on 127.0.0.1" if
                                                                auth == "on" else "")
            + ", the policy service in Postfix's path, writing through Postfix's queue, a Maildir and SQLite. "
            "Its admin stats count is updated in the transaction that stores the messages, so a counted message "
            "is listed in its mailbox.")
        report.notes.append(
            f"Each run is cut after {limit:.0f} s (rate = what was visible by then ÷ {limit:.0f} s, "
            "marked 'cut'); the mail accepted by then is still counted afterwards (up to "
            f"{data.get('drain_limit', 180):.0f} s more). Verification, after the clock: every stored message "
            "read back through the system's own API (maildev: /api/email pages with headers; maildump and mtasidecar: "
            "each message's raw source; Postfix: the files) and its X-Bench-Id counted: 'lost' = accepted "
            "(250) but not stored, 'duplicated' = stored more than once.")
        report.notes.append("Rounds interleave the systems (the order rotates by one each round); the "
                            "5,000-mail figures of the API, memory and database size come from the last "
                            "5,000-mail round, with the process that received the mail.")
    if data.get("api_5k"):
        report.notes.append(
            "API endpoints. mtasidecar: GET /api/v1/mailboxes/{addr}/messages?limit=30 (one mailbox's page, "
            "random mailbox), …/messages/{id}, …/messages/{id}/raw. maildev: /api/email/summary?limit=30 (its "
            "paged list: the newest 30 summaries) and /api/email?to.address={addr}&limit=30 (one recipient's "
            "mail, full messages, as ours is per mailbox); /api/email/{id}; /api/email/{id}/source. maildump: "
            "/messages/ (the whole store, no paging: it has nothing smaller), /messages/{id}.json (headers and "
            "the list of parts; each body is a request of its own), "
            "/messages/{id}.source, with `Connection: close` (on a kept-alive connection it answers only "
            "every ~44 ms). Random paths from the stored mail; wrk and the server share the machine's cores. "
            "'server CPU ms/req': CPU seconds of the server's processes during the run ÷ requests.")
    if data.get("memory"):
        report.notes.append("Memory: RSS summed over each system's processes (ours: the `mtasidecar dev` tree "
                            "— dev, policy, ingester and its workers, gunicorn master and workers, sweep, webhooks "
                            "— with Postfix's daemons on their own line). RSS counts pages shared between "
                            "processes once per process; PSS splits them. The peers keep the mail in memory; "
                            "we keep it in SQLite (the file's pages show as RSS only where mmap'd).")
    if data.get("scaling"):
        report.notes.append(
            "Scaling databases: bench.api_list's builder (corpus mails prepared by the real pipeline, rows "
            "written in bulk), public mode, 100 messages per mailbox, kept in bench/results/ and reused (same "
            "names as `python -m bench api-list --mode public`). Ingest: a backlog of "
            f"{data['ingest_n']} corpus mails in Maildir/new/, `python -m mtasidecar ingest` with default workers, "
            "clock from spawn to the last row (drain: from the first row); 0 stored = a fresh database. API "
            "memory: 'anon' is the gunicorn master's and workers' own memory; PSS adds their share of the "
            "database pages they have mmap'd (page cache: shared, reclaimable; RSS would count them once per "
            "mapping, i.e. per thread's connection).")
    report.notes.append(f"1-minute load average at the start: {load:.2f}"
                        + (f" (after waiting {waited:.0f} s for < {data.get('max_load', 1.5)})" if waited >= 1 else "")
                        + f"; at the end: {data['end_load']} (each run's, at its start, in the end-to-end "
                        f"table; every figure in {args.from_json or args.json}).")
    if busy:
        report.notes.append("Busy neighbours (over 25 % CPU) when a run started: " + ", ".join(busy[:12])
                            + (f" … ({len(busy)} in all)" if len(busy) > 12 else ""))
    report.data = data  # for bench.all's charts
    return report


def _save(data: dict, path: str) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, p)
