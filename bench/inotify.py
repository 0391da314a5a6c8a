"""A minimal inotify watcher (ctypes, Linux): which files appeared in a directory, and when.

Postfix's virtual(8) links each message from tmp/ into new/ (IN_CREATE);
Maildir writers that rename produce IN_MOVED_TO. Both are reported, with the
time.monotonic() at which this thread read the event. Cheaper and more precise
than listing a directory of thousands of files in a loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class DirWatcher:
    """Counts files created in ``path``; ``times`` maps file name → arrival time."""

    def __init__(self, path: str | os.PathLike, keep_names: bool = True):
        self.path = os.fspath(path)
        self.keep_names = keep_names
        self.count = 0
        self.times: dict[str, float] = {}
        self.last = 0.0
        self.overflow = False
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        wd = _libc.inotify_add_watch(self._fd, self.path.encode(), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {self.path}")
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            now = time.monotonic()
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            off = 0
            n = 0
            while off < len(data):
                _wd, mask, _cookie, length = _HEADER.unpack_from(data, off)
                name = data[off + 16:off + 16 + length].rstrip(b"\0").decode(errors="replace")
                off += 16 + length
                if mask & 0x4000:  # IN_Q_OVERFLOW
                    self.overflow = True
                    continue
                if mask & (IN_CREATE | IN_MOVED_TO):
                    n += 1
                    if self.keep_names:
                        self.times.setdefault(name, now)
            if n:
                with self._cond:
                    self.count += n
                    self.last = now
                    self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self._fd)

    def __enter__(self) -> "DirWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
