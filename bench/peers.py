"""The tools users would otherwise pick, for side-by-side benchmarks: maildev (npm) and maildump (PyPI).

Both are installed outside the repository, under CACHE
(/var/cache/mtasidecar-bench, or $MTASIDECAR_BENCH_CACHE), once:

* maildev 3.0.0 into CACHE/maildev with npm and a package.json written
  here. A plain ``npm install maildev`` fails on this registry (maildev's
  mailparser pins a mailsplit version the registry lacks); the package.json
  carries an npm ``overrides`` entry pinning ``mailparser`` to 3.9.31, which
  installs: an older parser than a stock install would get.
* maildump 1.0 into its own virtualenv, CACHE/maildump-venv, made with
  python3.11: maildump imports ``smtpd``/``asyncore``, gone in Python 3.12.

Each peer runs as a child process on free ports on 127.0.0.1 (maildev needs
``--ip`` and ``--web-ip``: it listens on every interface otherwise), keeps
its mail in memory (the default of both), and is checked only through its
own HTTP API:

* maildev:  GET /api/email/summary?limit=1 (``storeTotal``) counts;
  /api/email?skip=&limit= pages the full messages (headers included);
  /api/email/:id, /api/email/:id/source.
* maildump: GET /messages/ lists the whole store (its only listing);
  /messages/<id>.json, /messages/<id>.source. maildump answers a second
  request on a kept-alive connection only after ~44 ms, so every request
  here opens a new connection (``get`` does so for every system alike).

``Peer.bench_ids()`` reads every stored message's ``X-Bench-Id`` header back
through the API: the benchmark's check that nothing was lost or duplicated.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from . import common as C

CACHE = Path(os.environ.get("MTASIDECAR_BENCH_CACHE", "/var/cache/mtasidecar-bench"))
MAILDEV_VERSION = "3.0.0"
MAILPARSER_PIN = "3.9.31"
MAILDUMP_VERSION = "1.0"
MAILDUMP_PYTHON = "python3.11"

_BENCH_ID = re.compile(rb"^X-Bench-Id:[ \t]*(\S+)", re.M | re.I)


# --------------------------------------------------------------------------
# HTTP, one new connection per request


def get(port: int, path: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """GET on a new connection, closed after the answer (see the module doc: maildump)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get_json(port: int, path: str, headers: dict | None = None, timeout: float = 30):
    status, body = get(port, path, headers, timeout)
    if status != 200:
        raise C.BenchError(f"GET {path} on :{port}: {status} {body[:200]!r}")
    return json.loads(body)


def bench_id_of(raw: bytes) -> str | None:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    m = _BENCH_ID.search(head)
    return m.group(1).decode() if m else None


def fetch_all(port: int, paths: list[str], threads: int = 4, headers: dict | None = None,
              timeout: float = 600) -> dict[str, bytes]:
    """GET every path (``threads`` at a time, new connection each); path → body. Bounded by ``timeout``."""
    out: dict[str, bytes] = {}
    errors: list[str] = []
    todo = collections.deque(paths)
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if not todo or errors:
                    return
                path = todo.popleft()
            try:
                status, body = get(port, path, headers)
            except OSError as exc:
                with lock:
                    errors.append(f"{path}: {exc}")
                return
            with lock:
                if status != 200:
                    errors.append(f"{path}: HTTP {status}")
                out[path] = body

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(1.0, deadline - time.monotonic() + 5))
    if errors:
        raise C.BenchError(f"reading messages back: {errors[:3]}")
    if len(out) < len(paths):
        raise C.BenchError(f"reading messages back: timed out after {len(out)}/{len(paths)}")
    return out


# --------------------------------------------------------------------------
# Installation


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 900) -> str:
    print("  $ " + " ".join(argv), flush=True)
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise C.BenchError(f"{' '.join(argv)} failed ({p.returncode}): {(p.stderr or p.stdout)[-1500:]}")
    return p.stdout


def maildev_dir() -> Path:
    return CACHE / "maildev"


def _maildev_entry() -> Path:
    return maildev_dir() / "node_modules" / "maildev" / "dist" / "bin" / "maildev.js"


def _installed_version(package_json: Path) -> str | None:
    try:
        return json.loads(package_json.read_text()).get("version")
    except (OSError, ValueError):
        return None


def install_maildev() -> dict:
    """npm install maildev (pinned, with the mailparser override) into CACHE/maildev, once."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise C.BenchError("node and npm are needed for maildev")
    d = maildev_dir()
    d.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "mtasidecar-bench-maildev", "private": True, "version": "0.0.0",
        "description": "Written by mtasidecar's bench/peers.py: maildev for side-by-side benchmarks.",
        "dependencies": {"maildev": MAILDEV_VERSION},
        # A stock install fails on this registry (mailparser pins a mailsplit
        # version it lacks); this older mailparser installs.
        "overrides": {"mailparser": MAILPARSER_PIN},
    }
    pj = d / "package.json"
    text = json.dumps(manifest, indent=2) + "\n"
    mods = d / "node_modules"
    if not pj.exists() or pj.read_text() != text:
        pj.write_text(text)
    if (_installed_version(mods / "maildev" / "package.json") != MAILDEV_VERSION
            or _installed_version(mods / "mailparser" / "package.json") != MAILPARSER_PIN
            or not _maildev_entry().exists()):
        print(f"installing maildev {MAILDEV_VERSION} into {d} (mailparser overridden to {MAILPARSER_PIN})...",
              flush=True)
        _run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=d)
    if not _maildev_entry().exists():
        raise C.BenchError(f"maildev did not install: {_maildev_entry()} is missing")
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return {"maildev": _installed_version(mods / "maildev" / "package.json"),
            "mailparser": _installed_version(mods / "mailparser" / "package.json"), "node": node, "dir": str(d)}


def maildump_venv() -> Path:
    return CACHE / "maildump-venv"


def install_maildump() -> dict:
    """maildump into its own python3.11 virtualenv under CACHE, once."""
    venv = maildump_venv()
    exe = venv / "bin" / "maildump"
    py = venv / "bin" / "python"

    def version() -> str | None:
        if not py.exists():
            return None
        p = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('maildump'))"],
                           capture_output=True, text=True, timeout=60)
        return p.stdout.strip() if p.returncode == 0 else None

    if version() != MAILDUMP_VERSION or not exe.exists():
        base = shutil.which(MAILDUMP_PYTHON)
        if base is None:
            raise C.BenchError(f"{MAILDUMP_PYTHON} is needed for maildump (it imports smtpd/asyncore, "
                               "removed in Python 3.12)")
        print(f"installing maildump {MAILDUMP_VERSION} into {venv}...", flush=True)
        if not py.exists():
            _run([base, "-m", "venv", str(venv)])
        _run([str(py), "-m", "pip", "install", "--quiet", f"maildump=={MAILDUMP_VERSION}"])
    got = version()
    if got != MAILDUMP_VERSION:
        raise C.BenchError(f"maildump did not install in {venv} (found {got})")
    pyv = subprocess.run([str(py), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return {"maildump": got, "python": pyv, "dir": str(venv)}


# --------------------------------------------------------------------------
# Running them


class Peer:
    """A peer as a child process on free 127.0.0.1 ports; ``with Peer() as p: ...`` stops it."""

    name = "peer"

    def __init__(self):
        self.smtp_port = C.free_port()
        self.http_port = C.free_port()
        self.base = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-", dir="/tmp"))
        self.proc = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def health_path(self) -> str:
        raise NotImplementedError

    def start(self) -> "Peer":
        try:
            self.proc = C.start_process(self.argv(), log=self.base / f"{self.name}.log", cwd=self.base)
            alive = lambda: self.proc.poll() is None  # noqa: E731
            C.wait_http(f"http://127.0.0.1:{self.http_port}{self.health_path()}", 60, alive=alive)
            C.wait_until(lambda: _smtp_banner(self.smtp_port), 30, 0.1, f"{self.name} SMTP", alive=alive)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            C.stop_process(self.proc, grace=10)
        finally:
            self.proc = None
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Peer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.base / f"{self.name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # What the benchmark asks of every system
    def count(self) -> int:
        """How many messages the API shows (the cheapest way this API has to tell)."""
        raise NotImplementedError

    def count_how(self) -> str:
        raise NotImplementedError

    def message_ids(self) -> list[str]:
        """The API's ids of every stored message."""
        raise NotImplementedError

    def bench_ids(self) -> collections.Counter:
        """X-Bench-Id of every stored message, read back through the API."""
        raise NotImplementedError

    def api_paths(self, rng, n_items: int = 2000) -> dict[str, list[str]]:
        """wrk path lists: {'list…': [...], 'message': [...], 'raw': [...]}."""
        raise NotImplementedError


def _smtp_banner(port: int) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(3) == b"220"
    except OSError:
        return False


class Maildev(Peer):
    name = "maildev"
    list_page = 30

    def argv(self) -> list[str]:
        return ["node", str(_maildev_entry()), "--smtp", str(self.smtp_port), "--ip", "127.0.0.1",
                "--web", str(self.http_port), "--web-ip", "127.0.0.1", "--silent"]

    def health_path(self) -> str:
        return "/api/healthz"

    def count(self) -> int:
        return int(get_json(self.http_port, "/api/email/summary?limit=1")["storeTotal"])

    def count_how(self) -> str:
        return "GET /api/email/summary?limit=1 (storeTotal)"

    def _pages(self, page: int = 500):
        total = self.count()
        for skip in range(0, total + page, page):
            items = get_json(self.http_port, f"/api/email?skip={skip}&limit={page}", timeout=120)
            if not items:
                return
            yield from items

    def message_ids(self) -> list[str]:
        return [e["id"] for e in self._pages()]

    def bench_ids(self) -> collections.Counter:
        out = collections.Counter()
        for e in self._pages():
            out[(e.get("headers") or {}).get("x-bench-id")] += 1
        return out

    def api_paths(self, rng, n_items: int = 2000) -> dict[str, list[str]]:
        emails = list(self._pages())
        ids = [e["id"] for e in emails]
        rcpts = sorted({a["address"] for e in emails for a in (e.get("to") or [])})
        sample = rng.sample(ids, min(n_items, len(ids)))
        return {
            # Its paged list (what its UI reads): the newest page, summaries only.
            "list (paged summary)": [f"/api/email/summary?limit={self.list_page}"],
            # The list of one recipient's mail (full messages), as ours is per mailbox.
            "list (one recipient)": [f"/api/email?to.address={a}&limit={self.list_page}" for a in rcpts],
            "message": [f"/api/email/{i}" for i in sample],
            "raw": [f"/api/email/{i}/source" for i in sample],
        }


class Maildump(Peer):
    name = "maildump"

    def argv(self) -> list[str]:
        return [str(maildump_venv() / "bin" / "maildump"), "--smtp-ip", "127.0.0.1", "--smtp-port",
                str(self.smtp_port), "--http-ip", "127.0.0.1", "--http-port", str(self.http_port), "-f", "-n"]

    def health_path(self) -> str:
        return "/messages/"

    def count(self) -> int:
        return len(get_json(self.http_port, "/messages/", timeout=120)["messages"])

    def count_how(self) -> str:
        return "GET /messages/ (the whole store: its only listing)"

    def message_ids(self) -> list[str]:
        return [str(m["id"]) for m in get_json(self.http_port, "/messages/", timeout=120)["messages"]]

    def bench_ids(self) -> collections.Counter:
        paths = [f"/messages/{i}.source" for i in self.message_ids()]
        bodies = fetch_all(self.http_port, paths, threads=4)
        return collections.Counter(bench_id_of(b) for b in bodies.values())

    def api_paths(self, rng, n_items: int = 2000) -> dict[str, list[str]]:
        ids = self.message_ids()
        sample = rng.sample(ids, min(n_items, len(ids)))
        return {
            "list (whole store)": ["/messages/"],
            "message": [f"/messages/{i}.json" for i in sample],
            "raw": [f"/messages/{i}.source" for i in sample],
        }


PEERS = {"maildev": Maildev, "maildump": Maildump}


def install(names) -> dict:
    """Install the named peers; {name: version facts}."""
    out = {}
    for name in names:
        out[name] = install_maildev() if name == "maildev" else install_maildump()
    return out
