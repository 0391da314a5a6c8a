"""`mtasidecar deliver`: the entry point for Postfix's pipe(8) transport.

Postfix starts one process per recipient, so this does the least it can:
copy standard input into the Maildir the ingester watches (tmp/ → new/,
fsynced, atomically) and exit. The ingester then takes the same path as for
virtual(8) delivery. It imports nothing heavy: no parser, no database.

The pipe entry in master.cf uses flags=DRO, so Postfix itself prepends the
same Return-Path / X-Original-To / Delivered-To lines virtual(8) writes: the
stored raw is identical whichever delivery mode is used. Should a transport
lack those flags, the envelope from argv is prepended instead.

Exit statuses follow sysexits.h, which pipe(8) understands: 0 delivered,
75 (EX_TEMPFAIL) try again later, 64 (EX_USAGE) a configuration mistake.
"""

from __future__ import annotations

import os
import socket
import sys
import time

EX_OK, EX_USAGE, EX_TEMPFAIL = 0, 64, 75

_counter = 0


def unique_name() -> str:
    """A Maildir file name unique across processes and hosts."""
    global _counter
    _counter += 1
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{sec}.M{usec}P{os.getpid()}Q{_counter}R{os.urandom(4).hex()}.{host}"


def _envelope_lines(sender: str, recipient: str) -> bytes:
    return (f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n").encode("utf-8", "surrogateescape")


def _has_postfix_envelope(data: bytes) -> bool:
    """True when pipe(8) flags D/R/O already prepended the envelope lines.

    They stand at the very top; a Delivered-To further down is the sender's
    and proves nothing.
    """
    first = data[:64].lower()
    return first.startswith((b"return-path:", b"delivered-to:", b"x-original-to:"))


def write_message(maildir: str, data: bytes, fsync: bool = True) -> str:
    """Write ``data`` as one new Maildir message; returns its path in new/."""
    name = unique_name()
    tmp = os.path.join(maildir, "tmp", name)
    final = os.path.join(maildir, "new", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    # Maildir's rule: a message appears in new/ only once complete.
    os.rename(tmp, final)
    if fsync:
        dfd = os.open(os.path.join(maildir, "new"), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return final


def main(argv: list[str], stdin=None) -> int:
    """argv: --maildir DIR SENDER RECIPIENT [CLIENT_IP [HELO]]"""
    if len(argv) < 4 or argv[0] != "--maildir":
        print("usage: mtasidecar deliver --maildir DIR SENDER RECIPIENT [CLIENT_IP [HELO]]", file=sys.stderr)
        return EX_USAGE
    maildir, sender, recipient = argv[1], argv[2], argv[3]
    stdin = stdin if stdin is not None else sys.stdin.buffer
    try:
        data = stdin.read()
        if not _has_postfix_envelope(data):
            data = _envelope_lines(sender, recipient.lower()) + data
        write_message(maildir, data)
    except OSError as exc:
        # Disk full, Maildir missing or not writable: Postfix keeps the
        # message queued and retries.
        print(f"mtasidecar deliver: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


if __name__ == "__main__":
    # Run as a plain script too: `mtasidecar dev` copies this file where the
    # unprivileged pipe user can read it, next to a system python3.
    sys.exit(main(sys.argv[1:]))
