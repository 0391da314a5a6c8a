"""`mtasidecar ingest`: watch the Maildir and feed every file to the pipeline.

Postfix writes into tmp/ and links into new/, so watchdog reports a
*created* event in new/ (our own `deliver` renames, which is a *moved*
event; both are handled). Events can be missed (the watcher starts after
mail arrived, the inotify queue overflows), so new/ is rescanned at start and
every ``rescan_interval`` seconds as a safety net.

Parsing is the expensive part, so under a backlog files are prepared in a
pool of worker processes while this process commits the previous batch.
A single message arriving on a quiet system is prepared inline: no
inter-process hop on the latency path.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing
import os
import queue
import select
import threading
import time
from pathlib import Path
from typing import Callable

import peewee as pw
from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..mail.blocklist import Blocklist
from ..store import Store
from .pipeline import Pipeline, Prepared, prepare_many, spool_name

log = logging.getLogger(__name__)

# Below this many waiting files, prepare inline (lowest latency).
INLINE_MAX = 4
# While mail keeps coming, a file that starts a batch waits up to GATHER_S
# for the files right behind it. The same messages prepared and committed one
# by one, 4 ms apart, cost ~1.8-2.4 ms of CPU each against ~1.1-1.2 ms back to
# back (caches gone cold while the process slept; docs/benchmarks.md, finding
# 7); in batches of 5 the gap closes part of the way. Only when files have been
# arriving at GATHER_MIN_RATE or faster: slower mail would gain nothing from
# the wait and only be late.
GATHER_S = 0.02
GATHER_MIN_RATE = 2 / GATHER_S  # files/s: the window catches two more on average
# Files per task sent to a worker process, and per database transaction.
CHUNK = 64
# How long to wait before retrying a batch the database refused (locked, gone).
RETRY_DELAYS = (0.05, 0.2, 1.0, 5.0)
# What the forkserver imports once, before it forks the worker processes:
# each worker then starts with flanker (and, with sender checks on, dkimpy,
# pyspf, dnspython and the parsed public suffix list) already loaded, instead
# of paying ~0.3 s of CPU for flanker and ~0.4 s for the checks' imports and
# first use itself (docs/benchmarks.md, finding 10). Memory stays about the
# same: the workers share those pages with the forkserver, which now holds them.
PRELOAD = ["mtasidecar.ingest.pipeline"]
PRELOAD_AUTH = ["mtasidecar.mail.auth"]


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)


class _Events(FileSystemEventHandler):
    def __init__(self, push):
        self.push = push

    def on_created(self, event):
        if not event.is_directory:
            self.push(event.src_path)

    def on_moved(self, event):
        if not event.is_directory:
            self.push(event.dest_path)


def make_authenticator(auth: dict | None):
    """An Authenticator from plain settings (picklable, for worker processes)."""
    if auth is None:
        return None
    from ..mail.auth import Authenticator
    # Check threads mostly wait on DNS: one per file of a chunk, so a cold
    # cache costs one round of waits per chunk, not several (bench/auth.py).
    return Authenticator(auth["servers"] or None, timeout=auth["timeout"], budget=auth["budget"],
                         hostname=auth["hostname"], max_workers=2 * CHUNK)


# Each worker process has its own Authenticator (and DNS cache).
_worker_auth = None
_worker_blocked = None


def _exit_with(pid: int) -> None:
    """End this worker process as soon as the ingester ``pid`` is gone.

    A SIGKILLed ingester (OOM killer, a stop timeout) cannot shut its pool
    down: the workers would wait on the call queue forever, and with them
    the forkserver and the resource tracker. Linux >= 5.3 (pidfd_open).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):
        return  # no pidfd here: the service manager has to clean up

    def watch() -> None:
        select.select([fd], [], [])  # readable once the process has exited
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-ingester", daemon=True).start()


def _init_worker(parent: int, auth: dict | None, blocked: Blocklist | None) -> None:
    global _worker_auth, _worker_blocked
    _exit_with(parent)
    # Import flanker (and build its tables) before the first file arrives: a
    # no-op when the forkserver preloaded it (PRELOAD), needed when another
    # pool in this process had started the forkserver without that list.
    from ..mail import parse  # noqa: F401
    _worker_auth = make_authenticator(auth)
    _worker_blocked = blocked


def _prepare_chunk(paths: list[str], max_size: int, domains: dict | None) -> list[Prepared]:
    return prepare_many(paths, max_size, _worker_auth, _worker_blocked, domains)


class Ingester:
    def __init__(self, store: Store, maildir: Path, *, keep: bool = False,
                 max_size: int = 50 * 1024 * 1024, rescan_interval: float = 30.0, workers: int = 0,
                 auth: dict | None = None, blocked: Blocklist | None = None,
                 domains: dict[str, tuple[bool, str]] | Callable[[], dict] | None = None):
        self.store = store
        self.maildir = Path(maildir)
        self.new_dir = self.maildir / "new"
        self.pipeline = Pipeline(store, self.maildir, keep=keep)
        self.max_size = max_size
        self.rescan_interval = rescan_interval
        self.workers = workers
        # Sender checks: settings for make_authenticator, or None for off.
        self.auth = auth
        self.authenticator = make_authenticator(auth)
        self.blocked = blocked
        # name → (subdomains, auth_failure): which recipients get quarantine; a
        # callable is asked per batch (domains added at runtime, mtasidecar/domains.py).
        self._domains = domains
        self.queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Names queued or in flight: a rescan must not queue them twice.
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        # Set once watchdog watches new/ and the files already there are queued.
        self.watching = threading.Event()
        self.stored = 0
        # When the last files arrived: is mail flowing fast enough to gather (GATHER_S)?
        self._arrivals: collections.deque[float] = collections.deque(maxlen=16)

    # -- input ---------------------------------------------------------------

    def push(self, path: str) -> None:
        name = os.path.basename(path)
        if name.startswith("."):
            return
        with self._lock:
            if name in self._pending:
                return
            self._pending.add(name)
            self._arrivals.append(time.monotonic())
        self.queue.put(path)

    def rescan(self) -> int:
        n = 0
        with os.scandir(self.new_dir) as it:
            for entry in it:
                if not entry.is_dir(follow_symlinks=False):  # symlinks too: prepare sets them aside
                    self.push(entry.path)
                    n += 1
        return n

    def _release(self, paths) -> None:
        with self._lock:
            for p in paths:
                self._pending.discard(os.path.basename(p))

    # -- main loop -----------------------------------------------------------

    def run(self) -> None:
        ensure_maildir(self.maildir)
        observer = Observer()
        # Only creations and moves: watchdog then asks inotify for nothing else.
        # Unfiltered, a message came back as eight events (our own open, read
        # and unlink of the file, a directory-modified event after each), each
        # through watchdog's three threads: 0.36 instead of 0.15 ms of CPU per
        # message at 250 msg/s (docs/benchmarks.md, finding 7).
        observer.schedule(_Events(self.push), str(self.new_dir), recursive=False,
                          event_filter=[FileCreatedEvent, FileMovedEvent])
        observer.start()
        pool = None
        if self.workers > 0:
            ctx = multiprocessing.get_context("forkserver")
            # Takes effect when the forkserver starts (the first pool of this process).
            ctx.set_forkserver_preload(PRELOAD + (PRELOAD_AUTH if self.auth is not None else []))
            pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx,
                                          initializer=_init_worker,
                                          initargs=(os.getpid(), self.auth, self.blocked))
            # Start the workers now: the first burst of mail must not wait
            # for them to boot and import the parser (measured p99 ~700 ms).
            for _ in range(self.workers):
                pool.submit(int)
        try:
            backlog = self.rescan()
            self.watching.set()
            log.info("watching %s (%d files waiting, %d worker processes)", self.new_dir, backlog, self.workers)
            self._loop(pool)
        finally:
            observer.stop()
            observer.join(timeout=5)
            if self.authenticator is not None:
                self.authenticator.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        self.stopping.set()
        self.queue.put("")  # wake the loop

    def _drain(self, block_for: float) -> list[str]:
        paths = []
        try:
            first = self.queue.get(timeout=block_for) if block_for > 0 else self.queue.get_nowait()
            if first:
                paths.append(first)
            while len(paths) < 4096:
                p = self.queue.get_nowait()
                if p:
                    paths.append(p)
        except queue.Empty:
            pass
        return paths

    def _flowing(self, now: float) -> bool:
        """Have the last files been arriving at GATHER_MIN_RATE or faster, until just now?"""
        with self._lock:
            times = list(self._arrivals)
        if len(times) < 4 or now - times[-1] > 1.0:
            return False
        return (len(times) - 1) / max(times[-1] - times[0], 1e-6) >= GATHER_MIN_RATE

    def _gather(self, paths: list[str], until: float) -> None:
        """Add to ``paths`` what arrives before ``until`` (monotonic), up to CHUNK files."""
        while len(paths) < CHUNK:
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                p = self.queue.get(timeout=left)
            except queue.Empty:
                return
            if not p:  # stop() woke us
                return
            paths.append(p)

    def _loop(self, pool) -> None:
        inflight: collections.deque[tuple[list[str], cf.Future]] = collections.deque()
        next_rescan = time.monotonic() + self.rescan_interval
        while not self.stopping.is_set():
            idle = not inflight
            paths = self._drain(min(1.0, max(0.0, next_rescan - time.monotonic())) if idle else 0)
            if time.monotonic() >= next_rescan:
                self.rescan()
                next_rescan = time.monotonic() + self.rescan_interval
            if paths and idle and self._flowing(time.monotonic()):
                self._gather(paths, time.monotonic() + GATHER_S)
            if paths and (pool is None or (idle and len(paths) <= INLINE_MAX)):
                self._commit_inline(paths)
                continue
            for i in range(0, len(paths), CHUNK):
                chunk = paths[i:i + CHUNK]
                inflight.append((chunk, pool.submit(_prepare_chunk, chunk, self.max_size, self.domains)))
            if inflight:
                chunk, fut = inflight.popleft()
                self._commit_future(chunk, fut)
        for chunk, fut in inflight:
            fut.cancel()
            self._release(chunk)

    @property
    def domains(self) -> dict | None:
        return self._domains() if callable(self._domains) else self._domains

    def _commit_inline(self, paths: list[str]) -> None:
        for i in range(0, len(paths), CHUNK):
            chunk = paths[i:i + CHUNK]
            try:
                prepared = prepare_many(chunk, self.max_size, self.authenticator, self.blocked, self.domains)
            except OSError:
                prepared = self._prepare_one_by_one(chunk)
            self._commit(chunk, prepared)

    def _prepare_one_by_one(self, chunk: list[str]) -> list[Prepared]:
        """Isolate the file that cannot be read; the rest go on."""
        prepared = []
        for p in chunk:
            try:
                prepared += prepare_many([p], self.max_size, self.authenticator, self.blocked, self.domains)
            except OSError as exc:
                log.error("cannot read %s: %s; will retry on rescan", p, exc)
        return prepared

    def _commit_future(self, chunk: list[str], fut: cf.Future) -> None:
        try:
            prepared = fut.result()
        except Exception as exc:  # a worker died or a file could not be read
            log.error("preparing %d files failed (%s); retrying them inline", len(chunk), exc)
            self._commit_inline(chunk)
            return
        self._commit(chunk, prepared)

    def _commit(self, chunk: list[str], prepared: list[Prepared]) -> None:
        try:
            for delay in RETRY_DELAYS + (None,):
                try:
                    self.stored += self.pipeline.commit(prepared)
                    return
                except pw.PeeweeException as exc:
                    # Locked or unreachable database: the files stay in the
                    # spool, so waiting loses nothing.
                    if delay is None or self.stopping.is_set():
                        log.error("database refused %d messages (%s); left in the spool", len(prepared), exc)
                        return
                    log.warning("database busy (%s); retrying in %.2fs", exc, delay)
                    self.store.close()
                    time.sleep(delay)
        finally:
            self._release(chunk)



def pending_names(maildir: Path) -> set[str]:
    """Spool names still waiting in new/ (for tests and `doctor`)."""
    return {spool_name(n) for n in os.listdir(Path(maildir) / "new")}
