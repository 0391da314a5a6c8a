"""Shared pieces of the benchmarks: machine facts, process sampling, tables,
the docs/benchmarks.md writer, settings for child processes, the corpus cache.

Everything here is bounded: every wait has a deadline, every process started
is stopped by whoever started it (see ``stop_process``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import shlex
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
PY = sys.executable


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_mb() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def machine_info() -> dict:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory": f"{mem_total_mb()} MB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": loadavg(),
    }


def busy_others(exclude: set[int] | None = None, threshold: float = 10.0, window: float = 1.0) -> list[str]:
    """Processes (not ours) that used more than ``threshold`` % CPU over ``window`` s.

    The machines are shared with other work: a figure measured next to a busy
    neighbour is not comparable, so the benchmarks say so in their notes.
    """
    exclude = exclude or set()
    me = os.getpid()

    def snap():
        out = {}
        for pid in _pids():
            s = _stat(pid)
            if s:
                out[pid] = (s[1], s[2])
        return out

    a = snap()
    time.sleep(window)
    b = snap()
    tick = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (_ppid, cpu) in b.items():
        if pid in exclude or pid == me or pid not in a:
            continue
        pct = (cpu - a[pid][1]) / tick / window * 100
        if pct >= threshold:
            busy.append(f"{_comm(pid)}[{pid}] {pct:.0f}%")
    return busy


# --------------------------------------------------------------------------
# Processes


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _stat(pid: int):
    """(comm, ppid, utime+stime ticks) or None."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    rest = data[data.rindex(")") + 2:].split()
    return comm, int(rest[1]), int(rest[11]) + int(rest[12])


def _stime(pid: int) -> int:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(data[data.rindex(")") + 2:].split()[12])


def _comm(pid: int) -> str:
    s = _stat(pid)
    return s[0] if s else "?"


def cmdline(pid: int) -> str:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(p.decode(errors="replace") for p in parts if p)
    text = text.replace(PY, "python")
    return text if len(text) <= 70 else text[:67] + "..."


def descendants(root: int) -> list[int]:
    """``root`` and all its descendants, by walking /proc's ppid links."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        s = _stat(pid)
        if s:
            children.setdefault(s[1], []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class ProcInfo:
    pid: int
    cmd: str
    rss_kb: int = 0        # last seen
    hwm_kb: int = 0        # peak RSS (VmHWM), last seen
    pss_kb: int = 0        # proportional share, sampled at the end
    anon_kb: int = 0       # RssAnon: private memory (heap), last seen
    file_kb: int = 0       # RssFile: mapped files (the mmap'd database, libraries), last seen
    anon_hwm_kb: int = 0   # peak RssAnon seen while sampling
    cpu_s: float = 0.0     # user+system, last seen
    sys_s: float = 0.0     # system (kernel) part of cpu_s


@dataclass
class TreeSampler:
    """Samples a process tree every ``interval`` s in a thread: per-process
    RSS, peak RSS and CPU time, and the peak of the summed RSS."""

    root: int
    interval: float = 0.1
    procs: dict[int, ProcInfo] = field(default_factory=dict)
    peak_sum_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "TreeSampler":
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def sample(self, with_pss: bool = False) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in descendants(self.root):
            s = _stat(pid)
            if s is None:
                continue
            info = self.procs.get(pid)
            if info is None:
                info = self.procs[pid] = ProcInfo(pid, cmdline(pid))
            rss = status_kb(pid, "VmRSS")
            if rss == 0:
                continue
            info.rss_kb = rss
            info.anon_kb = status_kb(pid, "RssAnon")
            info.file_kb = status_kb(pid, "RssFile")
            info.anon_hwm_kb = max(info.anon_hwm_kb, info.anon_kb)
            info.hwm_kb = max(info.hwm_kb, status_kb(pid, "VmHWM"), rss)
            info.cpu_s = s[2] / tick
            info.sys_s = _stime(pid) / tick
            if with_pss:
                info.pss_kb = pss_kb(pid)
            total += rss
        self.peak_sum_kb = max(self.peak_sum_kb, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """Stop sampling; one last sample with PSS (call before stopping the processes)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.sample(with_pss=True)

    def cpu_total(self) -> float:
        return sum(p.cpu_s for p in self.procs.values())

    def sys_total(self) -> float:
        return sum(p.sys_s for p in self.procs.values())

    def rows(self) -> list[list[str]]:
        return [[str(p.pid), p.cmd, f"{p.rss_kb / 1024:.0f}", f"{p.hwm_kb / 1024:.0f}",
                 f"{p.anon_kb / 1024:.0f}", f"{p.anon_hwm_kb / 1024:.0f}", f"{p.file_kb / 1024:.0f}",
                 f"{p.pss_kb / 1024:.0f}", f"{p.cpu_s:.1f}"]
                for p in sorted(self.procs.values(), key=lambda p: p.pid) if p.hwm_kb]


PROC_COLUMNS = ["pid", "process", "RSS MB", "peak RSS MB", "anon MB", "peak anon MB", "file MB", "PSS MB",
                "CPU s"]


def start_process(argv: list[str], env: dict | None = None, log: Path | None = None,
                  cwd: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)
    finally:
        if log:
            out.close()


def stop_process(p: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM, wait ``grace`` s, then SIGKILL this process and what is left of its group."""
    if p is None:
        return
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    # Children that outlived their parent (a worker pool, gunicorn workers)
    # share its process group: start_process made the child a group leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, 0)
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition", alive=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise BenchError(f"a process died while waiting for {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_http(url: str, timeout: float, alive=None) -> None:
    import urllib.request

    def ok():
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    wait_until(ok, timeout, 0.1, f"HTTP {url}", alive)


# --------------------------------------------------------------------------
# Settings for child processes


def settings_for(data_dir: Path, dns: str | None = None, auth: bool | None = None, mode: str = "private",
                 **sections) -> "object":
    """Settings for a data dir, ignoring this process's MTASIDECAR_* variables.

    One domain, ``*.bench.test``, in ``mode`` ("private": mailboxes are made
    through the API and read with their token, other addresses are refused
    at RCPT by the policy service; "public": a catch-all). ``dns``:
    "127.0.0.1:PORT" of a bench.dns server: sender checks must never query a
    resolver outside the machine. ``auth``: sender checks on or off (None:
    the default setting). The policy service listens on a free port, and the
    per-client limits meant for the Internet (messages per IP, mailbox
    creations per second) are lifted: every benchmark client is 127.0.0.1.
    Settings a version of mtasidecar does not have are left out.
    """
    import dataclasses

    from mtasidecar.config import DomainSettings, Settings, load

    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    top = fields(Settings)
    domain = {"name": "bench.test", "subdomains": True}
    if "mode" in fields(DomainSettings):
        domain["mode"] = mode
    overrides: dict = {"data_dir": str(data_dir), "hostname": "bench.localhost", "domains": [domain]}
    if dns is not None:
        overrides["dns"] = {"servers": [dns], "timeout": 2.0}
    if auth is not None and "auth" in top:
        overrides["auth"] = {"enabled": auth}
    if "policy" in top:
        overrides["policy"] = {"listen": f"127.0.0.1:{free_port()}", "socketmap": f"127.0.0.1:{free_port()}"}
        if "rate_limit" in fields(_section_type("policy")):
            overrides["policy"]["rate_limit"] = 1_000_000_000
    api: dict = {}
    for name in ("create_rate", "auth_failure_rate"):
        if name in fields(_section_type("api")):
            api[name] = 1_000_000
    if api:
        overrides["api"] = api
    for k, v in sections.items():
        overrides[k] = {**overrides.get(k, {}), **v} if isinstance(v, dict) and isinstance(overrides.get(k), dict) \
            else v
    settings = load(environ={}, overrides=overrides)
    if getattr(getattr(settings, "auth", None), "enabled", False) and not settings.dns.servers:
        raise BenchError("sender checks are on but no local DNS server is set: they would query "
                         "a resolver outside 127.0.0.1")
    return settings


def _section_type(name: str):
    import typing

    from mtasidecar.config import Settings
    return typing.get_type_hints(Settings)[name]


def domain_mode(settings) -> str:
    return getattr(settings.domains[0], "mode", "public")


def add_mode_argument(p) -> None:
    p.add_argument("--mode", choices=["private", "public"], default="private",
                   help="the bench.test domain's mode (default private, the product's default: mailboxes "
                        "are created through the API first and read with their tokens)")


def auth_enabled(settings) -> bool:
    return bool(getattr(getattr(settings, "auth", None), "enabled", False))


def add_auth_argument(p) -> None:
    p.add_argument("--auth", choices=["on", "off"], default="on",
                   help="SPF/DKIM/DMARC checks at ingest (default on, answered by a DNS server on "
                        "127.0.0.1 serving the corpus's records: bench.dns)")


def child_env(settings) -> dict:
    from mtasidecar.config import ENV_PREFIX, to_environ
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(to_environ(settings))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------
# Corpus cache and Maildir files


def corpus(n: int, seed: int = 1, size: int = 10_000, mailboxes: int | None = None) -> list[bytes]:
    """bench.corpus.generate, cached under bench/results (generation costs ~1 ms a message)."""
    from . import corpus as corpus_mod
    m = mailboxes or corpus_mod.default_mailboxes(n)
    RESULTS.mkdir(parents=True, exist_ok=True)
    import hashlib
    # The generator's own source is part of the key: an edited corpus.py never reuses old mail.
    version = hashlib.sha1(Path(corpus_mod.__file__).read_bytes()).hexdigest()[:8]
    path = RESULTS / f"corpus-n{n}-s{seed}-z{size}-m{m}-{version}.bin"
    if path.exists():
        data = path.read_bytes()
        out, off = [], 0
        while off < len(data):
            (ln,) = struct.unpack_from(">I", data, off)
            out.append(data[off + 4:off + 4 + ln])
            off += 4 + ln
        if len(out) == n:
            return out
    msgs = corpus_mod.generate(n, seed=seed, size=size, mailboxes=m)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for msg in msgs:
            fh.write(struct.pack(">I", len(msg)))
            fh.write(msg)
    os.replace(tmp, path)
    return msgs


_TO_RE = re.compile(rb"^To: .*<([^>]+)>$", re.MULTILINE)


def recipient_of(msg: bytes) -> str:
    """The mailbox a corpus message is meant for (its To: address)."""
    head = msg[:msg.find(b"\n\n")]
    m = _TO_RE.search(head)
    if not m:
        raise BenchError("corpus message without To:")
    return m.group(1).decode()


def sender_of(msg: bytes) -> str:
    head = msg[:msg.find(b"\n\n")]
    m = re.search(rb"^From: .*<([^>]+)>$", head, re.MULTILINE)
    return m.group(1).decode() if m else "sender@example.org"


def postfix_trace(msg: bytes, n: int, when: float) -> bytes:
    """The lines Postfix's smtpd and virtual(8) put on top of a delivered message."""
    to = recipient_of(msg)
    sender = sender_of(msg)
    qid = f"4Z{n:08X}"[:12]
    date = dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000 (UTC)")
    return (f"Return-Path: <{sender}>\nX-Original-To: {to}\nDelivered-To: {to}\n"
            f"Received: from mta-{n % 40}.example.org (mta-{n % 40}.example.org [198.51.100.{n % 250 + 1}])\n"
            f"\tby bench.localhost (Postfix) with ESMTPS id {qid}\n\tfor <{to}>; {date}\n").encode() + msg


def maildir_name(n: int, when: float) -> str:
    """A name shaped like virtual(8)'s: <sec>.V<dev>I<inode>M<usec>.<host>."""
    sec, usec = int(when), int((when % 1) * 1e6)
    return f"{sec}.V801I{0x100000 + n:x}M{usec:06d}.bench"


def write_backlog(msgs: list[bytes], new_dir: Path) -> None:
    """The messages as Postfix leaves them: trace lines on top, written in tmp/, renamed into new/."""
    tmp_dir = new_dir.parent / "tmp"
    now = time.time()
    for i, msg in enumerate(msgs):
        name = maildir_name(i, now + i * 1e-4)
        tmp = tmp_dir / name
        tmp.write_bytes(postfix_trace(msg, i, now))
        os.rename(tmp, new_dir / name)


def max_message_id(db: Path) -> int:
    """The newest stored message's id (0: none yet, or the database is not there or busy)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT max(id) FROM message").fetchone()[0] or 0
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def count_files(directory: Path) -> int:
    with os.scandir(directory) as it:
        return sum(1 for _ in it)


def wait_ingested(db: Path, new_dir: Path, n: int, proc: subprocess.Popen, deadline: float, *,
                  after: int = 0, log: Path | None = None, what: str = "ingest") -> tuple[float, float, float]:
    """Wait until the database holds ``n`` rows with an id above ``after``, then
    until ``new_dir`` is empty (the ingester removes a file only after its commit).

    Returns the monotonic times at which the first of those rows was seen, all
    ``n`` were, and ``new_dir`` was empty. BenchError if ``proc`` exits or
    ``deadline`` passes first.
    """
    t_first = None
    while True:
        rows = max_message_id(db) - after
        now = time.monotonic()
        if rows > 0 and t_first is None:
            t_first = now
        if rows >= n:
            break
        if proc.poll() is not None:
            raise BenchError(f"{what}: the ingester exited with {proc.returncode}" + (f"; see {log}" if log else ""))
        if now > deadline:
            raise BenchError(f"{what}: timed out with {rows}/{n} rows stored")
        time.sleep(0.02)
    t_rows = time.monotonic()
    wait_until(lambda: count_files(new_dir) == 0, max(5.0, deadline - time.monotonic()), 0.02, "new/ to empty")
    return (t_first if t_first is not None else t_rows), t_rows, time.monotonic()


# --------------------------------------------------------------------------
# Tables and the docs file


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str = ""

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in self.rows]
        return "\n".join(lines)

    def markdown(self) -> str:
        def esc(s: str) -> str:
            return s.replace("|", "\\|")
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(esc(c) for c in self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in self.rows]
        return "\n".join(lines)


@dataclass
class Report:
    name: str
    argv: list[str]
    machine: dict
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def command(self) -> str:
        return "python -m bench " + " ".join(shlex.quote(a) for a in self.argv if a != "--record")

    def text(self) -> str:
        out = [f"== {self.name}: {self.command()}",
               "machine: " + ", ".join(f"{k} {v}" for k, v in self.machine.items())]
        for t in self.tables:
            out += ["", t.text()]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        m = self.machine
        out = [f"## {self.name}", "",
               f"`{self.command()}`", "",
               f"Machine: {m['nproc']} × {m['cpu']}, {m['memory']}, Linux {m['kernel']}, Python {m['python']}; "
               f"run {m['date']}, load average before the run {m['load']}.", ""]
        for t in self.tables:
            out += [t.markdown(), ""]
        if self.notes:
            out += [f"- {n}" for n in self.notes] + [""]
        return "\n".join(out)


DOC_HEADER = """# Benchmarks

Figures measured with `python -m bench <name>` (see `bench/__main__.py`; every
benchmark only loads 127.0.0.1, bounds its loops in count and time, and stops
every process it started, its private Postfix instances included).
Each section below is rewritten by `python -m bench <name> ... --record`;
the text between the markers belongs to the tool, the rest of the file is
free for commentary.

"""


SECTIONS_END = "<!-- bench:sections-end -->"


def record(report: Report, path: Path = DOCS) -> None:
    """Insert or replace this benchmark's section in docs/benchmarks.md."""
    start, end = f"<!-- bench:{report.name} -->", f"<!-- /bench:{report.name} -->"
    block = f"{start}\n{report.markdown().rstrip()}\n{end}"
    text = path.read_text() if path.exists() else DOC_HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _old, after = rest.split(end, 1)
        text = before + block + after
    elif SECTIONS_END in text:
        # New sections go above the free text that follows the results.
        before, after = text.split(SECTIONS_END, 1)
        text = before.rstrip() + "\n\n" + block + "\n\n" + SECTIONS_END + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def wait_quiet(max_wait: float, threshold: float = 25.0) -> list[str]:
    """Wait up to ``max_wait`` s for no other process to use more than ``threshold`` % CPU.

    Returns what was still busy (empty when the machine went quiet), for the notes.
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy = busy_others(threshold=threshold, window=1.0)
        if not busy or time.monotonic() > deadline:
            return busy
        print("waiting for a quiet machine: " + ", ".join(busy), flush=True)
        time.sleep(4)


# --------------------------------------------------------------------------
# Machine load (appended for bench.compare / bench.all)


def load1() -> float:
    """The 1-minute load average."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return float("nan")


def wait_load(max_load: float, max_wait: float, interval: float = 15.0) -> tuple[float, float]:
    """Wait up to ``max_wait`` s for the 1-minute load average to drop below ``max_load``.

    The machines are shared: figures measured under another job's load are
    not comparable. Returns (1-minute load when done waiting, seconds waited);
    the caller records both.
    """
    t0 = time.monotonic()
    deadline = t0 + max(0.0, max_wait)
    while True:
        load = load1()
        if load < max_load or time.monotonic() >= deadline:
            return load, time.monotonic() - t0
        print(f"waiting for the 1-minute load ({load:.2f}) to drop below {max_load} "
              f"({deadline - time.monotonic():.0f} s left)", flush=True)
        time.sleep(min(interval, max(0.5, deadline - time.monotonic())))


def rss_kb_of(pids) -> tuple[int, int]:
    """(sum of VmRSS, sum of PSS) in kB of these processes (those that still exist)."""
    rss = pss = 0
    for pid in pids:
        rss += status_kb(pid, "VmRSS")
        pss += pss_kb(pid)
    return rss, pss
