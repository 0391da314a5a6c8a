"""CPython's own e-mail test corpus (test/test_email/data/msg_*.txt) through the live service.

The files are dropped into the Maildir the way an MDA does it (written in
tmp/, renamed into new/), while the service runs: the ingester must store
every one (none lost, none doubled), serve each one's raw bytes exactly,
list them, and keep working afterwards.

Where each lands: the ingester routes by the trace headers above the first
``Received:`` (what Postfix prepends). Most corpus files have none and land
in ``unrouted@mtasidecar.invalid``; some were saved from real mailboxes and
carry a ``Delivered-To:`` line there (msg_01: ``bbb@zzz.org``, msg_32:
``freebsd-isp@freebsd.org``, ...), so they land in that mailbox.

Needs root, postfix and postfix-pcre.
"""

from __future__ import annotations

import collections
import os
import re
import smtplib
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import wait_for
from tests.integration._service import OPERATOR, running_service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

UNROUTED = "unrouted@mtasidecar.invalid"


def corpus_files() -> list[Path]:
    try:
        import test  # CPython's own test package; some distributions leave it out
    except ImportError:
        return []
    data = Path(test.__file__).parent / "test_email" / "data"
    return sorted(data.glob("msg_*.txt")) if data.is_dir() else []


CORPUS = corpus_files()


def expected_mailbox(raw: bytes) -> str:
    """Independent of the package: the first Delivered-To (else X-Original-To)
    among the header lines above the first Received line; else UNROUTED."""
    header_block = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    found: dict[bytes, bytes] = {}
    for line in re.split(rb"\r?\n(?![ \t])", header_block):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower()
        if key == b"received":
            break
        if key in (b"delivered-to", b"x-original-to") and key not in found:
            found[key] = value.strip().strip(b"<>").strip()
    value = found.get(b"delivered-to") or found.get(b"x-original-to")
    return value.decode().lower() if value else UNROUTED


def drop_into_maildir(maildir: Path, name: str, data: bytes) -> None:
    """As Maildir requires: write completely in tmp/, then rename into new/."""
    tmp = maildir / "tmp" / name
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, maildir / "new" / name)


def all_messages(svc, address: str, page: int = 10) -> list[dict]:
    """Every message of a mailbox, following next_cursor page by page."""
    items, cursor = [], None
    while True:
        query = f"?limit={page}" + (f"&cursor={cursor}" if cursor else "")
        r = svc.get(f"/api/v1/mailboxes/{quote(address)}/messages{query}", headers=OPERATOR)
        if r.status == 404 and cursor is None:
            return []  # not created yet
        assert r.status == 200, r.body
        body = r.json()
        assert len(body["items"]) <= page
        items += body["items"]
        cursor = body["next_cursor"]
        if not cursor:
            return items


@pytest.mark.skipif(not CORPUS, reason="CPython's test package (test/test_email/data) is not installed")
def test_stdlib_corpus_is_stored_exactly(tmp_path):
    files = {p.name: p.read_bytes() for p in CORPUS}
    assert len(files) >= 40
    expected = collections.Counter(expected_mailbox(data) for data in files.values())
    assert expected[UNROUTED] >= 1

    # Sender checks off: the corpus names real domains (python.org, ...), and
    # this test must not depend on the Internet's DNS.
    with running_service(["example.test"], {"MTASIDECAR_AUTH_ENABLED": "false"}, keep_log_in=tmp_path) as svc:
        stamp = int(time.time())
        for i, (name, data) in enumerate(files.items()):
            drop_into_maildir(svc.maildir, f"{stamp}.M{i}P{os.getpid()}.corpus-{name}", data)

        # All stored: every file has left new/ and each mailbox has its count.
        wait_for(lambda: not os.listdir(svc.maildir / "new"), 60, what="new/ to be emptied")
        for address, count in expected.items():
            wait_for(lambda: len(all_messages(svc, address)) >= count, 30, what=f"{count} in {address}")

        by_raw: dict[bytes, str] = {data: name for name, data in files.items()}
        assert len(by_raw) == len(files), "corpus files are distinct"
        stored: list[str] = []
        with_errors = []
        for address, count in expected.items():
            listed = all_messages(svc, address)
            assert len(listed) == count, address  # none lost, none doubled
            for summary in listed:
                r = svc.get(summary["url"] + "/raw", headers=OPERATOR)
                assert r.status == 200, (summary, r.body)
                assert r.headers["content-type"] == "message/rfc822"
                name = by_raw.get(r.body)
                assert name is not None, f"raw of {summary['id']} is no corpus file byte for byte"
                assert expected_mailbox(files[name]) == address
                assert summary["size"] == len(files[name])
                stored.append(name)
                detail = svc.get(summary["url"], headers=OPERATOR)
                assert detail.status == 200, (name, detail.body)
                assert detail.json()["parse_error"] == summary["parse_error"]
                if summary["parse_error"]:
                    with_errors.append(name)
        assert sorted(stored) == sorted(files), "each file stored exactly once"
        # Nothing was set aside (all are far below the size limit).
        assert not (svc.maildir / "setaside").exists()
        if UNROUTED in expected:
            detail = svc.get(all_messages(svc, UNROUTED)[0]["url"], headers=OPERATOR).json()
            assert "no Delivered-To" in detail["routing_note"]

        # The ingester survived all of it: a normal mail still arrives.
        wire = b"From: after@sender.test\r\nTo: after@example.test\r\nSubject: after the corpus\r\n\r\nok\r\n"
        with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30) as smtp:
            assert smtp.sendmail("after@sender.test", ["after@example.test"], wire) == {}
        [after] = svc.wait_messages("after@example.test", 1)
        assert after["subject"] == "after the corpus"
        assert svc.proc.poll() is None

    # For the record (shown with -rA): which corpus files the parser refused.
    print(f"{len(files)} corpus files stored; parse_error on: {', '.join(sorted(with_errors)) or 'none'}")
