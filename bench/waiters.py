"""`python -m bench waiters`: a thousand open long-polls and event streams against the real service.

The whole service runs (`python -m mtasidecar dev`: Postfix, policy service,
ingester, gunicorn asgi workers, sweeper, webhook sender; bench.service),
and an asyncio client in this process (stdlib streams, one thread) holds
--waiters long-polls open, each on its own connection and mailbox:

    GET /api/v1/mailboxes/{addr}/messages?wait=60      (re-issued with &after=
                                                        the newest id when answered)

plus --sse event streams (GET .../events) on mailboxes of their own. In a
private domain (the default) the mailboxes are created through the API first,
from a few threads, and every request carries its mailbox's token.

Measured, each part with and without the waiters where that makes sense:

(a) plain list GETs (no wait) on mailboxes holding mail: a timed client
    (one connection, --rate requests/s, latency of each) and wrk
    (--wrk-connections, --duration s): p50/p99 without and with the waiters;
    the delay the waiters add: target ≤ 100 ms.
(b) wake-up: mail sent through SMTP (one connection, one message at a time)
    to a waited mailbox; from the SMTP 250 and from the row's commit (a
    read-only SQLite connection polls ``PRAGMA data_version`` every ms) to
    the long-poll's answer (or the SSE event): target ≤ 200 ms after the
    commit. And waiters with ``&from=`` are sent a message that does not
    match first: they must not answer (held --hold s after its commit), then
    one that does.
(c) CPU of every service process over --cpu-window s with the waiters
    idle (long enough to include one round of re-polls at --wait s), and
    without waiters.
(d) RSS (and RssAnon) per API worker without and with the waiters, per
    waiter held (waiters per worker: its open sockets).

File descriptors: this process raises its soft RLIMIT_NOFILE to the hard
limit (the service inherits it); the workers' own limit is read from
/proc/PID/limits and reported. Everything on 127.0.0.1, bounded in count
and time; every connection closed and every process stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from . import common as C
from .api_list import run_wrk, write_paths
from .smtp import Connection, Mail, send_parallel, to_wire

TARGET_ADDED_MS = 100     # (a) delay the waiters may add to a plain GET (p50 and p99)
TARGET_WAKE_MS = 200      # (b) commit → answer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--waiters", type=int, default=1000, help="long-polls held open, one mailbox each")
    p.add_argument("--sse", type=int, default=50, help="event streams held open, one mailbox each")
    p.add_argument("--wait", type=int, default=60, help="?wait= seconds of each long-poll")
    p.add_argument("--read-mailboxes", type=int, default=100, help="mailboxes the plain GETs read")
    p.add_argument("--read-messages", type=int, default=1000, help="corpus mails spread over them first")
    p.add_argument("--rate", type=float, default=50, help="(a) timed client: requests per second")
    p.add_argument("--duration", type=int, default=10, help="(a) seconds of the timed client and of wrk")
    p.add_argument("--wrk-connections", type=int, default=8)
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--wakes", type=int, default=50, help="(b) long-poll wake-ups measured")
    p.add_argument("--sse-wakes", type=int, default=20, help="(b) event-stream wake-ups measured")
    p.add_argument("--filtered", type=int, default=10, help="(b) waiters with &from=, sent a non-match first")
    p.add_argument("--hold", type=float, default=2.0,
                   help="(b) seconds after the non-matching rows' commit during which no answer may come")
    p.add_argument("--cpu-window", type=float, default=65, help="(c) seconds of idle waiters measured")
    p.add_argument("--base-window", type=float, default=10, help="(c) seconds measured without waiters")
    p.add_argument("--api-workers", type=int, default=None, help="gunicorn workers (default: the setting's)")
    p.add_argument("--seed", type=int, default=1, help="the pauses between wake-up samples")
    p.add_argument("--create-threads", type=int, default=4, help="threads creating the mailboxes")
    p.add_argument("--quiet-wait", type=float, default=60)
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    p.add_argument("--dump", type=Path, default=None, help="write the raw samples (JSON) to this file")
    C.add_auth_argument(p)
    C.add_mode_argument(p)


# --------------------------------------------------------------------------
# HTTP/1.1 over asyncio streams: just what a long-poll and an SSE stream need


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    return await reader.read()


@dataclass
class Answer:
    t_sent: float
    t_done: float
    status: int
    ids: list[str]


@dataclass
class Waiter:
    address: str
    token: str | None
    sender_filter: str | None = None
    after: str | None = None
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connects: int = 0
    requests: int = 0


@dataclass
class Stream:
    address: str
    token: str | None
    opened: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)   # (time, message id)
    comments: int = 0
    errors: list[str] = field(default_factory=list)


class Clients:
    """The long-polls and event streams, on an asyncio loop in a thread of their own."""

    def __init__(self, port: int, wait: int, connect_parallel: int = 50):
        self.port, self.wait = port, wait
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="waiters", daemon=True)
        self.thread.start()
        self.tasks: list[asyncio.Task] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.connect_parallel = connect_parallel
        self._sem: asyncio.Semaphore | None = None
        self.waiters: list[Waiter] = []
        self.streams: list[Stream] = []

    def _call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, waiters: list[Waiter], streams: list[Stream]) -> None:
        self.waiters, self.streams = waiters, streams

        async def go():
            self._sem = asyncio.Semaphore(self.connect_parallel)
            for s in streams:
                self.tasks.append(asyncio.create_task(self._stream(s)))
            for w in waiters:
                self.tasks.append(asyncio.create_task(self._longpoll(w)))
        self._call(go())

    async def _connect(self):
        async with self._sem:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 15)
        self.writers.add(writer)
        return reader, writer

    def _close(self, writer) -> None:
        if writer is not None:
            self.writers.discard(writer)
            writer.close()

    def _request(self, path: str, token: str | None) -> bytes:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()

    async def _longpoll(self, w: Waiter) -> None:
        reader = writer = None
        base = f"/api/v1/mailboxes/{quote(w.address, safe='@')}/messages?wait={self.wait}"
        if w.sender_filter:
            base += f"&from={quote(w.sender_filter, safe='@')}"
        try:
            while True:
                try:
                    if writer is None:
                        reader, writer = await self._connect()
                        w.connects += 1
                    path = base + (f"&after={w.after}" if w.after else "")
                    t_sent = time.monotonic()
                    writer.write(self._request(path, w.token))
                    w.requests += 1
                    status, headers = await asyncio.wait_for(_read_head(reader), self.wait + 60)
                    body = await asyncio.wait_for(_read_body(reader, headers), 30)
                    t_done = time.monotonic()
                    ids = []
                    if status == 200:
                        ids = [item["id"] for item in json.loads(body)["items"]]
                        if ids:
                            w.after = ids[0]  # newest first
                    w.answers.append(Answer(t_sent, t_done, status, ids))
                    if headers.get("connection", "").lower() == "close":
                        self._close(writer)
                        writer = None
                    if status != 200:
                        w.errors.append(f"HTTP {status}: {body[:120]!r}")
                        await asyncio.sleep(1)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError,
                        ValueError) as exc:
                    w.errors.append(f"{type(exc).__name__}: {exc}")
                    self._close(writer)
                    writer = None
                    await asyncio.sleep(0.5)
        finally:
            self._close(writer)

    async def _stream(self, s: Stream) -> None:
        writer = None
        path = f"/api/v1/mailboxes/{quote(s.address, safe='@')}/events"
        try:
            reader, writer = await self._connect()
            writer.write(self._request(path, s.token))
            status, headers = await asyncio.wait_for(_read_head(reader), 30)
            if status != 200:
                s.errors.append(f"HTTP {status}")
                return
            chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            buf = b""
            while True:
                if chunked:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        s.errors.append("stream ended")
                        return
                    data = await reader.readexactly(size)
                    await reader.readexactly(2)
                else:
                    data = await reader.read(65536)
                    if not data:
                        s.errors.append("stream ended")
                        return
                t = time.monotonic()
                buf += data.replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    if s.opened is None:
                        s.opened = t
                    fields = dict(line.split(": ", 1) for line in block.decode().split("\n")
                                  if ": " in line and not line.startswith(":"))
                    if fields.get("event") == "message":
                        s.events.append((t, fields.get("id", "")))
                    elif block.startswith(b":"):
                        s.comments += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError,
                ValueError) as exc:
            s.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._close(writer)

    def stop(self) -> None:
        async def cancel():
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for w in list(self.writers):
                self._close(w)
            await asyncio.sleep(0.1)
        try:
            self._call(cancel(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


# --------------------------------------------------------------------------
# The database: when each row became visible


class RowWatcher:
    """Every new message row with the time it was first seen: address → [(time, id)]."""

    def __init__(self, db: Path, interval: float = 0.001):
        self.db, self.interval = db, interval
        self.rows: dict[str, list[tuple[float, int]]] = {}
        self.count = 0
        self.cpu_s = 0.0
        self.polls = 0
        self.last_id = 0
        self._stop = threading.Event()
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            self.last_id = con.execute("SELECT coalesce(max(id), 0) FROM message").fetchone()[0]
        finally:
            con.close()
        self.thread = threading.Thread(target=self._run, name="row-watcher", daemon=True)
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
                    rows = con.execute("SELECT id, envelope_to FROM message WHERE id > ? ORDER BY id",
                                       (self.last_id,)).fetchall()
                    now = time.monotonic()
                    for mid, to in rows:
                        self.rows.setdefault(to, []).append((now, mid))
                        self.last_id = max(self.last_id, mid)
                        self.count += 1
                time.sleep(self.interval)
        finally:
            con.close()
            self.cpu_s = time.thread_time() - t_cpu

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------
# Processes: the gunicorn workers, CPU, memory, sockets, limits


def api_workers(root: int) -> tuple[int | None, list[int]]:
    """(gunicorn master, its workers) under the dev process."""
    pids = C.descendants(root)
    gun = [p for p in pids if "gunicorn" in C.cmdline(p)]
    gun_set = set(gun)
    masters = [p for p in gun if (C._stat(p) or ("", 0, 0))[1] not in gun_set]
    workers = [p for p in gun if (C._stat(p) or ("", 0, 0))[1] in gun_set]
    return (masters[0] if masters else None), sorted(workers)


def sockets(pid: int) -> int:
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
    return n


def fds(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


def nofile_limit(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    return "?"


def cpu_s(pid: int) -> float:
    s = C._stat(pid)
    return s[2] / os.sysconf("SC_CLK_TCK") if s else 0.0


def short_cmd(pid: int) -> str:
    cmd = C.cmdline(pid)
    if "multiprocessing.forkserver" in cmd:
        return "ingest pool (forkserver)"
    if "multiprocessing.resource_tracker" in cmd:
        return "ingest pool (resource tracker)"
    for key in ("gunicorn", "ingest", "policy", "sweep", "webhooks", " dev "):
        if key in cmd:
            return {"gunicorn": "gunicorn", " dev ": "mtasidecar dev"}.get(key, f"mtasidecar {key}")
    return cmd


def cpu_window(pids: list[int], seconds: float, on_tick=None) -> dict[int, list[float]]:
    """Per-process CPU % of one core, sampled every second over ``seconds``."""
    out = {p: [] for p in pids}
    prev = {p: cpu_s(p) for p in pids}
    t_prev = time.monotonic()
    end = t_prev + seconds
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.05, end - time.monotonic())))
        now = time.monotonic()
        for p in pids:
            c = cpu_s(p)
            out[p].append((c - prev[p]) / (now - t_prev) * 100)
            prev[p] = c
        t_prev = now
        if on_tick:
            on_tick()
    return out


def settle(pids: list[int], threshold: float, max_wait: float) -> float:
    """Wait (up to max_wait) for the summed CPU of ``pids`` over 1 s to drop below threshold %."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_wait:
        w = cpu_window(pids, 1.0)
        if sum(v[-1] for v in w.values() if v) < threshold:
            break
    return time.monotonic() - t0


@dataclass
class Mem:
    rss_kb: int
    anon_kb: int
    sockets: int
    fds: int


def mem(pid: int) -> Mem:
    return Mem(C.status_kb(pid, "VmRSS"), C.status_kb(pid, "RssAnon"), sockets(pid), fds(pid))


# --------------------------------------------------------------------------
# Plain GETs: a timed client


def timed_gets(port: int, paths: list[tuple[str, str | None]], rate: float, seconds: float) -> dict:
    """One keep-alive connection, one request every 1/rate s (a late one goes at once)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    lat, errors, late = [], 0, 0
    n = int(rate * seconds)
    t0 = time.monotonic() + 0.05
    try:
        for i in range(n):
            target = t0 + i / rate
            now = time.monotonic()
            if now < target:
                time.sleep(target - now)
            elif now - target > 0.001:
                late += 1
            path, token = paths[i % len(paths)]
            t = time.perf_counter()
            try:
                conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
                r = conn.getresponse()
                body = r.read()
                ok = r.status == 200 and json.loads(body)["items"]
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                ok = False
            lat.append((time.perf_counter() - t) * 1000)
            if not ok:
                errors += 1
    finally:
        conn.close()
    return {"n": n, "lat": lat, "errors": errors, "late": late}


def wrk_measured(url: str, paths_file: Path, threads: int, conns: int, duration: int, workers: list[int]) -> dict:
    """run_wrk, plus the workers' CPU per request and how wrk's connections fell on the workers."""
    import concurrent.futures as cf
    before = {p: sockets(p) for p in workers}
    cpu0 = sum(cpu_s(p) for p in workers)
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(run_wrk, url, paths_file, threads, conns, duration)
        time.sleep(min(2.0, duration / 2))
        split = [sockets(p) - before[p] for p in workers]
        r = fut.result()
    r["api_cpu_ms"] = (sum(cpu_s(p) for p in workers) - cpu0) * 1000 / max(1, r["requests"])
    r["split"] = split
    return r


# --------------------------------------------------------------------------


def _mail(sender: str, rcpt: str, subject: str) -> Mail:
    msg = (f"From: Bench sender <{sender}>\nTo: <{rcpt}>\nSubject: {subject}\n"
           f"Message-ID: <{uuid.uuid4().hex}@bench.localhost>\n"
           f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\n"
           f"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
           f"{subject}: your code is 123456.\n").encode()
    return Mail(sender, rcpt, to_wire(msg))


def _stats(values: list[float]) -> list[str]:
    if not values:
        return ["0", "-", "-", "-", "-"]
    return [str(len(values))] + [f"{C.pct(values, q):.1f}" for q in (50, 90, 99)] + [f"{max(values):.1f}"]


def _wait_for(pred, timeout: float, interval: float = 0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return None


def run(args, argv: list[str]) -> C.Report:
    from .apiclient import create_mailboxes
    from .dns import BenchDNS
    from .service import DevService

    if shutil.which("wrk") is None:
        raise C.BenchError("wrk is not installed (apt-get install wrk)")
    report = C.Report("waiters", argv, C.machine_info())
    notes = report.notes

    # File descriptors: every waiter is a socket here and one in a worker.
    need = args.waiters + args.sse + 256
    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft0 < need:
        new_soft = hard0 if hard0 == resource.RLIM_INFINITY else min(hard0, max(need, soft0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard0))
    soft1, hard1 = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft1 != resource.RLIM_INFINITY and soft1 < need:
        raise C.BenchError(f"RLIMIT_NOFILE is {soft1}/{hard1}, {need} needed: raise the hard limit (ulimit -Hn)")
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()

    tag = f"{int(time.time()) % 100000:05d}"
    n_w, n_s, n_r = args.waiters, args.sse, args.read_mailboxes
    wait_addrs = [f"w{tag}-{i:05d}@bench.test" for i in range(n_w)]
    sse_addrs = [f"s{tag}-{i:04d}@bench.test" for i in range(n_s)]
    read_addrs = [f"r{tag}-{i:04d}@bench.test" for i in range(n_r)]
    msgs = C.corpus(args.read_messages, seed=1) if args.read_messages else []
    fill = [Mail(C.sender_of(m), read_addrs[i % n_r], to_wire(m)) for i, m in enumerate(msgs)]
    if args.filtered + args.wakes > n_w:
        raise C.BenchError("--filtered + --wakes must not exceed --waiters")

    dns = BenchDNS().start() if args.auth == "on" else None
    api_section = {"workers": args.api_workers} if args.api_workers else {}
    svc = clients = rows = None
    res: dict = {}
    try:
        svc = DevService(dns.server if dns else None, args.auth == "on", args.keep, prefix="waiters-",
                         mode=args.mode, **({"api": api_section} if api_section else {})).start()
        port = svc.http_port
        tokens: dict[str, str] = {}
        if svc.mode == "private":
            t = time.monotonic()
            tokens = create_mailboxes(port, wait_addrs + sse_addrs + read_addrs, threads=args.create_threads)
            res["create_s"] = time.monotonic() - t
        print(f"{len(tokens)} mailboxes created; filling {n_r} mailboxes with {len(fill)} mails...", flush=True)
        rows = RowWatcher(svc.db_path)
        if fill:
            sent = send_parallel("127.0.0.1", svc.smtp_port, fill, 4, timeout=300)
            if sent.errors:
                raise C.BenchError(f"filling: {sent.errors[:3]}")
            C.wait_until(lambda: rows.count >= len(fill), 120, 0.1, "the fill mails in the database")
        master, workers = api_workers(svc.proc.pid)
        if not workers:
            raise C.BenchError("no gunicorn workers found")
        # Ours, not Postfix's: the Python processes under `mtasidecar dev` (itself included).
        service_pids = sorted(p for p in C.descendants(svc.proc.pid) if C.cmdline(p).startswith("python"))
        labels = {p: short_cmd(p) + (" worker" if p in workers else " master" if p == master else "")
                  for p in service_pids}
        res["limits"] = {p: nofile_limit(p) for p in [master] + workers if p}
        paths_file = svc.base / "paths-list.txt"
        get_paths = [(f"/api/v1/mailboxes/{a}/messages", tokens.get(a)) for a in read_addrs]
        write_paths(paths_file, [p + (f"\t{t}" if t else "") for p, t in get_paths])
        url = svc.api

        # Warm-up (not reported), then the baseline without waiters.
        run_wrk(url, paths_file, args.wrk_threads, args.wrk_connections, 3)
        busy = C.wait_quiet(args.quiet_wait)
        res["load_base"] = C.loadavg()
        print(f"baseline: idle CPU {args.base_window:g} s, timed GETs, wrk...", flush=True)
        res["cpu_base"] = cpu_window(service_pids, args.base_window)
        res["timed_base"] = timed_gets(port, get_paths, args.rate, args.duration)
        res["wrk_base"] = wrk_measured(url, paths_file, args.wrk_threads, args.wrk_connections, args.duration,
                                       workers)
        time.sleep(2.5)  # wrk's connections: past the keep-alive timeout
        res["mem_base"] = {p: mem(p) for p in workers}

        # The waiters.
        waiters = [Waiter(a, tokens.get(a)) for a in wait_addrs]
        for i in range(args.filtered):
            waiters[i].sender_filter = f"wanted-{tag}-{i}@example.org"
        streams = [Stream(a, tokens.get(a)) for a in sse_addrs]
        print(f"opening {n_w} long-polls and {n_s} event streams...", flush=True)
        clients = Clients(port, args.wait)
        t_open = time.monotonic()
        clients.start(waiters, streams)
        base_socks = sum(res["mem_base"][p].sockets for p in workers)
        opened = _wait_for(lambda: sum(sockets(p) for p in workers) - base_socks >= n_w + n_s
                           and all(s.opened for s in streams), 120, 0.05)
        res["open_s"] = time.monotonic() - t_open
        if not opened:
            raise C.BenchError(f"only {sum(sockets(p) for p in workers) - base_socks} of {n_w + n_s} "
                               f"connections reached the workers in 120 s")
        res["settle_s"] = settle(workers, 25.0, 20)
        res["t_ready"] = time.monotonic() - t_open
        res["mem_waiters"] = {p: mem(p) for p in workers}
        early = [w for w in waiters if w.answers]
        if early:
            raise C.BenchError(f"{len(early)} long-polls answered before any mail: "
                               f"{early[0].answers[0]} {early[0].errors[:2]}")

        # (b) wake-ups, first: the whole of it before the first re-polls at --wait s.
        print("wake-ups...", flush=True)
        conn = Connection("127.0.0.1", svc.smtp_port)
        # A random pause between samples: the API's watcher ticks every 50 ms, and a fixed
        # cadence would land every mail at the same phase of its tick (phase-locked figures).
        rng = random.Random(args.seed)
        wakes: list[tuple[float, float, float | None]] = []   # (250→answer, commit→answer, t since open)
        missed: list[str] = []
        try:
            def one_wake(addr: str, sender: str, answered) -> None:
                before = len(rows.rows.get(addr, []))
                t250 = conn.send(_mail(sender, addr, f"wake {addr}"))
                t_ans = _wait_for(answered, 10)
                row = _wait_for(lambda: len(rows.rows.get(addr, [])) > before and rows.rows[addr][before], 5)
                if t_ans is None:
                    missed.append(addr)
                    return
                t_commit = row[0] if row else None
                wakes.append((t_ans - t250, (t_ans - t_commit) if t_commit else None, t250 - t_open))

            def poll_answer(w: Waiter, since: float):
                def f():
                    for a in w.answers:
                        if a.t_done > since and a.ids:
                            return a.t_done
                    return None
                return f

            def sse_event(s: Stream, n_before: int):
                return lambda: s.events[n_before][0] if len(s.events) > n_before else None

            for w in waiters[args.filtered:args.filtered + args.wakes]:
                one_wake(w.address, f"sender-{tag}@example.org", poll_answer(w, time.monotonic()))
                time.sleep(rng.uniform(0.1, 0.2))
            res["wakes"], wakes = wakes, []
            for s in streams[:args.sse_wakes]:
                one_wake(s.address, f"sender-{tag}@example.org", sse_event(s, len(s.events)))
                time.sleep(rng.uniform(0.1, 0.2))
            res["sse_wakes"], wakes = wakes, []
            # Filters: a message that does not match must not answer.
            filtered = waiters[:args.filtered]
            t_nonmatch = time.monotonic()
            for w in filtered:
                conn.send(_mail(f"other-{tag}@example.org", w.address, f"not for the filter {w.address}"))
            ok = _wait_for(lambda: all(rows.rows.get(w.address) for w in filtered), 10, 0.01)
            t_visible = max(rows.rows[w.address][0][0] for w in filtered) if ok else time.monotonic()
            time.sleep(max(0.0, t_visible + args.hold - time.monotonic()))
            res["filter_early"] = [w.address for w in filtered if any(a.t_done > t_nonmatch for a in w.answers)]
            res["filter_hold_s"] = time.monotonic() - t_visible
            for w in filtered:
                one_wake(w.address, w.sender_filter, poll_answer(w, time.monotonic()))
                time.sleep(rng.uniform(0.1, 0.2))
            res["filter_wakes"] = wakes
            res["missed"] = missed
        finally:
            conn.close()

        # (a) plain GETs with the waiters held.
        print("timed GETs and wrk with the waiters...", flush=True)
        res["load_wait"] = C.loadavg()
        t_a = time.monotonic() - t_open
        res["timed_wait"] = timed_gets(port, get_paths, args.rate, args.duration)
        res["wrk_wait"] = wrk_measured(url, paths_file, args.wrk_threads, args.wrk_connections, args.duration,
                                       workers)
        res["t_a"] = (t_a, time.monotonic() - t_open)
        time.sleep(2.5)
        res["mem_after_a"] = {p: mem(p) for p in workers}

        # (c) idle waiters: CPU over a window that includes the first re-polls.
        print(f"idle waiters: CPU over {args.cpu_window:g} s...", flush=True)
        answers_before = sum(len(w.answers) for w in waiters)
        t_c = time.monotonic() - t_open
        res["cpu_wait"] = cpu_window(service_pids, args.cpu_window)
        res["t_c"] = (t_c, time.monotonic() - t_open)
        res["repolls"] = sum(len(w.answers) for w in waiters) - answers_before
        res["mem_end"] = {p: mem(p) for p in workers}
        res["worker_pids_end"] = api_workers(svc.proc.pid)[1]
        res["sse_comments"] = sum(s.comments for s in streams)
        res["sse_errors"] = [e for s in streams for e in s.errors]
        res["waiter_errors"] = [e for w in waiters for e in w.errors]
        res["reconnects"] = sum(max(0, w.connects - 1) for w in waiters)
        res["early_empty"] = [a for w in waiters for a in w.answers
                              if not a.ids and a.status == 200 and a.t_done - a.t_sent < args.wait - 0.5]
        res["spurious"] = [w.address for w in waiters[args.filtered + args.wakes:] if any(a.ids for a in w.answers)]
        res["answered_timeouts"] = sum(1 for w in waiters for a in w.answers if not a.ids and a.status == 200)
        res["client_fds"] = fds(os.getpid())

        # The baseline again, the waiters gone (A, B, A: the machine's load drifts).
        clients.stop()
        clients = None
        time.sleep(3)
        res["mem_closed"] = {p: mem(p) for p in workers}
        print("baseline again, without the waiters...", flush=True)
        res["load_base2"] = C.loadavg()
        res["timed_base2"] = timed_gets(port, get_paths, args.rate, args.duration)
        res["wrk_base2"] = wrk_measured(url, paths_file, args.wrk_threads, args.wrk_connections, args.duration,
                                        workers)
    finally:
        for closer in (lambda: clients and clients.stop(), lambda: rows and rows.stop(),
                       lambda: svc and svc.stop(), lambda: dns and dns.stop()):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"cleanup: {exc}", flush=True)

    if args.dump:
        keys = ("wakes", "sse_wakes", "filter_wakes", "cpu_base", "cpu_wait", "t_a", "t_c", "open_s", "settle_s")
        raw = {k: res.get(k) for k in keys}
        raw |= {k: res[k]["lat"] for k in ("timed_base", "timed_wait", "timed_base2")}
        raw |= {k: {x: v for x, v in res[k].items() if x not in ("argv", "output")}
                for k in ("wrk_base", "wrk_wait", "wrk_base2")}
        args.dump.write_text(json.dumps(raw, default=str, indent=1))
    _tables(report, args, res, workers, master, service_pids, labels)
    notes.append(f"Client: this process, one asyncio thread (stdlib streams), one connection per long-poll and "
                 f"per stream; RLIMIT_NOFILE {soft0}/{hard0} at the start"
                 + (f", raised to {soft1}/{hard1}" if (soft1, hard1) != (soft0, hard0) else " (enough)")
                 + f"; {res['client_fds']} descriptors open at the end. net.core.somaxconn {somaxconn}.")
    notes.append("Service: `python -m mtasidecar dev` (Postfix, policy service, ingester, gunicorn asgi workers, "
                 "sweeper, webhook sender). Sender checks "
                 + ("on (bench.dns on 127.0.0.1)." if args.auth == "on" else "off.")
                 + f" Domain mode: {args.mode}"
                 + (f" (the {len(wait_addrs) + len(sse_addrs) + len(read_addrs)} mailboxes created through the "
                    f"API from {args.create_threads} threads in {res.get('create_s', 0):.1f} s; every request "
                    "carries its token)." if args.mode == "private" else " (catch-all; no tokens)."))
    if busy:
        notes.append("Other processes busy on the machine (over 25 % CPU) before the baseline: " + ", ".join(busy))
    return report


def _tables(report: C.Report, args, res: dict, workers: list[int], master, service_pids, labels) -> None:
    notes = report.notes
    # (a): added delay against the better of the two baselines (the conservative reading)
    tb, tw, tb2 = res["timed_base"], res["timed_wait"], res["timed_base2"]
    wb, ww, wb2 = res["wrk_base"], res["wrk_wait"], res["wrk_base2"]
    b50 = min(C.pct(tb["lat"], 50), C.pct(tb2["lat"], 50))
    b99 = min(C.pct(tb["lat"], 99), C.pct(tb2["lat"], 99))
    w50, w99 = C.pct(tw["lat"], 50), C.pct(tw["lat"], 99)
    wrk50, wrk99 = min(wb["p50"], wb2["p50"]), min(wb["p99"], wb2["p99"])
    ok_timed = (w50 - b50) <= TARGET_ADDED_MS and (w99 - b99) <= TARGET_ADDED_MS
    ok_wrk = (ww["p50"] - wrk50) <= TARGET_ADDED_MS and (ww["p99"] - wrk99) <= TARGET_ADDED_MS
    t = C.Table(["client", "waiters held", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
                 "API CPU ms/req (connections per worker)", f"added p50 / p99 ms (target ≤ {TARGET_ADDED_MS})"],
                title=f"(a) Plain GET /api/v1/mailboxes/{{addr}}/messages (no wait; {args.read_mailboxes} mailboxes "
                      f"of ~{args.read_messages // max(1, args.read_mailboxes)} messages): before, with "
                      f"{args.waiters} long-polls + {args.sse} event streams open, and after they closed")
    held = f"{args.waiters} + {args.sse}"
    for r, h in ((tb, "0 (before)"), (tw, held), (tb2, "0 (after)")):
        lat = r["lat"]
        t.add(f"timed, 1 connection, {args.rate:g}/s", h, r["n"], f"{r['n'] / args.duration:.0f}",
              f"{C.pct(lat, 50):.1f}", f"{C.pct(lat, 90):.1f}", f"{C.pct(lat, 99):.1f}", f"{max(lat):.1f}",
              r["errors"], "", f"{w50 - b50:+.1f} / {w99 - b99:+.1f}: {C.yes(ok_timed)}" if r is tw else "")
    for r, h in ((wb, "0 (before)"), (ww, held), (wb2, "0 (after)")):
        t.add(f"wrk -t{args.wrk_threads} -c{args.wrk_connections} -d{args.duration}s", h, r["requests"],
              f"{r['rps']:.0f}", f"{r['p50']:.1f}", f"{r['p90']:.1f}", f"{r['p99']:.1f}", "-",
              f"{r['errors']} / {r['non2xx']} non-2xx",
              f"{r['api_cpu_ms']:.2f} ({' + '.join(str(s) for s in r['split'])})",
              f"{ww['p50'] - wrk50:+.1f} / {ww['p99'] - wrk99:+.1f}: {C.yes(ok_wrk)}" if r is ww else "")
    report.tables.append(t)
    t0a, t1a = res["t_a"]
    notes.append(f"(a) Added = with the waiters − the better of the two baselines. Load average before each: "
                 f"{res['load_base']} / {res['load_wait']} / {res['load_base2']}. The run with waiters was "
                 f"{t0a:.0f}–{t1a:.0f} s after they opened ("
                 + ("before their first re-poll at " if t1a < args.wait else "overlapping their first re-polls at ")
                 + f"{args.wait} s). The timed client was late on {tb['late']} / {tw['late']} / {tb2['late']} of "
                 "its requests (a late request goes at once; latency is measured from its send). wrk's req/s "
                 "swing with the shared machine and with how its connections fall on the two workers (one worker "
                 "is one core at most): compare the API CPU per request, and the timed client's latencies.")

    # (b)
    t = C.Table(["wake-up", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms",
                 f"commit → answer p99 ≤ {TARGET_WAKE_MS} ms?"],
                title=f"(b) Mail through SMTP to a waited mailbox, one at a time, with {args.waiters} long-polls "
                      f"and {args.sse} event streams open")
    for key, label in (("wakes", "long-poll"), ("sse_wakes", "event stream (SSE)"),
                       ("filter_wakes", "long-poll with &from=, matching mail")):
        ws = res.get(key, [])
        from250 = [w[0] * 1000 for w in ws]
        fromcommit = [w[1] * 1000 for w in ws if w[1] is not None]
        t.add(f"{label}: 250 → answer", *_stats(from250), "")
        ok = bool(fromcommit) and C.pct(fromcommit, 99) <= TARGET_WAKE_MS
        t.add(f"{label}: row committed → answer", *_stats(fromcommit), C.yes(ok))
    report.tables.append(t)
    fe = res.get("filter_early", [])
    notes.append(f"(b) Filters: {args.filtered} waiters with `&from=wanted-…` were each sent a message from "
                 f"another sender first; {len(fe)} answered during the {res.get('filter_hold_s', 0):.1f} s after "
                 f"the last of those rows was committed ({'none: correct' if not fe else 'WRONG: ' + ', '.join(fe[:3])})"
                 f"; then the matching message (row above). Missed wake-ups (no answer in 10 s): "
                 f"{len(res.get('missed', []))}. Spurious answers (items for a mailbox that got no mail): "
                 f"{len(res.get('spurious', []))}; empty answers before the wait ran out: "
                 f"{len(res.get('early_empty', []))}.")
    notes.append("(b) Samples one at a time, 0.1–0.2 s apart at random. Commit time: a read-only SQLite connection "
                 "in this process polls `PRAGMA data_version` every 1 ms (adds up to ~1 ms; its thread and the "
                 "client's share this process's GIL). The API's watcher looks for new rows every 50 ms (plus the "
                 "query) while anyone waits (mtasidecar/api/waiting.py): 0–50 ms of every figure is that tick, "
                 "by design; the rest is the query in a worker thread and the answer.")

    # (c)
    t = C.Table(["pid", "process", "no waiters: CPU % (mean)",
                 f"{args.waiters} + {args.sse} idle: CPU % (mean)", "median of 1-s samples", "max 1-s"],
                title=f"(c) CPU of the service's processes (% of one core), {args.base_window:g} s without waiters "
                      f"and {args.cpu_window:g} s with them idle (a window that includes their re-polls at "
                      f"{args.wait} s)")
    base, wait = res["cpu_base"], res["cpu_wait"]
    tot_b = tot_w = 0.0
    for p in service_pids:
        b = sum(base.get(p, [])) / max(1, len(base.get(p, [])))
        w_s = wait.get(p, [])
        w = sum(w_s) / max(1, len(w_s))
        tot_b += b
        tot_w += w
        t.add(p, labels.get(p, "?"), f"{b:.1f}", f"{w:.1f}", f"{C.pct(w_s, 50):.1f}" if w_s else "-",
              f"{max(w_s):.1f}" if w_s else "-")
    t.add("", "**all**", f"{tot_b:.1f}", f"{tot_w:.1f}", "", "")
    report.tables.append(t)
    notes.append(f"(c) Window {res['t_c'][0]:.0f}–{res['t_c'][1]:.0f} s after the waiters opened: "
                 f"{res['repolls']} long-polls answered in it (their wait ran out; each re-polled at once with "
                 f"`&after=`), {res['sse_comments']} SSE comments received in all (keep-alives every 15 s). "
                 f"Errors: long-polls {len(res['waiter_errors'])}"
                 + (f" ({res['waiter_errors'][:2]})" if res["waiter_errors"] else "")
                 + f", streams {len(res['sse_errors'])}"
                 + (f" ({res['sse_errors'][:2]})" if res["sse_errors"] else "")
                 + f"; reconnects {res['reconnects']}.")

    # (d)
    t = C.Table(["worker", "RLIMIT_NOFILE soft/hard", "sockets: none / held", "fds held",
                 "RSS MB: none / held / end / closed", "anon MB: none / held / end / closed",
                 "anon KB per connection held"],
                title=f"(d) API workers: memory and descriptors without and with the waiters "
                      f"(opened in {res['open_s']:.1f} s, CPU settled {res['settle_s']:.1f} s later)")
    mb, mw, me, mc = res["mem_base"], res["mem_waiters"], res["mem_end"], res["mem_closed"]
    for p in workers:
        held = mw[p].sockets - mb[p].sockets
        per = (me[p].anon_kb - mb[p].anon_kb) / held if held > 0 else float("nan")
        t.add(p, res["limits"].get(p, "?"), f"{mb[p].sockets} / {mw[p].sockets}", mw[p].fds,
              f"{mb[p].rss_kb / 1024:.0f} / {mw[p].rss_kb / 1024:.0f} / {me[p].rss_kb / 1024:.0f} / "
              f"{mc[p].rss_kb / 1024:.0f}",
              f"{mb[p].anon_kb / 1024:.0f} / {mw[p].anon_kb / 1024:.0f} / {me[p].anon_kb / 1024:.0f} / "
              f"{mc[p].anon_kb / 1024:.0f}",
              f"{per:.0f}")
    report.tables.append(t)
    notes.append(f"(d) 'held' = right after the waiters opened and the CPU settled; 'end' = after (a), (b) and the "
                 f"(c) window; 'closed' = 3 s after the client closed them all; per connection = (anon at the end − anon without) / sockets held on that worker. "
                 f"gunicorn master {master}: RLIMIT_NOFILE {res['limits'].get(master, '?')} (inherited from this "
                 f"process). Workers unchanged through the run: {C.yes(res['worker_pids_end'] == workers)}.")
