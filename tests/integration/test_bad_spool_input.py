"""Bad input must never crash anything: odd spool files, and bad HTTP requests.

Spool side: files that are no e-mail at all are dropped into the live
service's Maildir (tmp/ then rename into new/, as an MDA does). Each is stored
and its raw served byte for byte, or (too large) listed with a parse_error and
its file set aside; the ingester keeps working afterwards.

HTTP side: malformed requests against the live gunicorn get a 4xx JSON body
``{"error": ..., "message": ...}``, never a 500 nor an HTML page.

Needs root, postfix and postfix-pcre.
"""

from __future__ import annotations

import http.client
import json
import os
import random
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

MAX_SIZE = 100_000
UNROUTED = "unrouted@mtasidecar.invalid"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    logs = tmp_path_factory.mktemp("bad-input-logs")
    with running_service(["example.test"], {"MTASIDECAR_MAILDIR_MAX_MESSAGE_SIZE": str(MAX_SIZE)},
                         keep_log_in=logs) as svc:
        yield svc


def drop(maildir: Path, name: str, data: bytes) -> str:
    tmp = maildir / "tmp" / name
    tmp.write_bytes(data)
    os.rename(tmp, maildir / "new" / name)
    return name


def send_ok(svc, address: str, subject: str) -> dict:
    wire = f"From: ok@sender.test\r\nTo: {address}\r\nSubject: {subject}\r\n\r\nfine\r\n".encode()
    with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30) as smtp:
        assert smtp.sendmail("ok@sender.test", [address], wire) == {}
    [summary] = svc.wait_messages(address, 1)
    assert summary["subject"] == subject
    return summary


def nested_multipart(depth: int) -> bytes:
    head = b"From: deep@sender.test\nSubject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n"
    body = b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i - 1, i)
                    for i in range(1, depth))
    body += b"--b%d\nContent-Type: text/plain\n\ninner\n" % (depth - 1)
    body += b"".join(b"--b%d--\n" % i for i in reversed(range(depth)))
    return head + body


def garbage() -> bytes:
    rng = random.Random(20240601)
    data = bytearray(rng.randbytes(20_000))
    for i in range(0, len(data), 997):  # NULs throughout, and a run of them
        data[i] = 0
    data[5000:5100] = b"\0" * 100
    return bytes(data)


def summaries(svc, address: str) -> list[dict]:
    r = svc.get(f"/api/v1/mailboxes/{quote(address)}/messages?limit=100", headers=OPERATOR)
    return r.json()["items"] if r.status == 200 else []


def raw_of(svc, summary: dict):
    return svc.get(summary["url"] + "/raw", headers=OPERATOR)


def test_odd_spool_files_are_stored_and_the_ingester_survives(service):
    maildir = service.maildir
    stamp = f"{int(time.time())}.M1P{os.getpid()}"
    files = {
        "garbage": garbage(),
        "empty": b"",
        "only-headers": b"From: hdr@sender.test\nSubject: only headers\n",
        "only-headers-crlf-nul": b"Subject: with \x00 a NUL\r\nX-Bin: \xff\xfe\x00\r\n",
        "no-header-block": b"just a line of text, no header, no blank line",
        "deep-multipart": nested_multipart(1000),
    }
    for key, data in files.items():
        drop(maildir, f"{stamp}.{key}", data)
    # Over the ingester's limit (Postfix's own limit is higher): routed by its
    # trace header, stored as a row with a reason, the file set aside.
    big = (b"Return-Path: <s@sender.test>\nX-Original-To: big@example.test\nDelivered-To: big@example.test\n"
           b"Subject: too big\n\n" + (b"y" * 99 + b"\n") * (MAX_SIZE // 100 + 500))
    assert len(big) > MAX_SIZE
    big_name = drop(maildir, f"{stamp}.too-big", big)

    wait_for(lambda: not os.listdir(maildir / "new"), 60, what="new/ to be emptied")
    wait_for(lambda: len(summaries(service, UNROUTED)) >= len(files), 30, what="the odd files to be listed")

    listed = summaries(service, UNROUTED)
    assert len(listed) == len(files)
    by_raw = {}
    for summary in listed:
        r = raw_of(service, summary)
        assert r.status == 200, r.body
        by_raw[r.body] = summary
        detail = service.get(summary["url"], headers=OPERATOR)
        assert detail.status == 200, detail.body
        assert detail.headers["content-type"].startswith("application/json")
        json.loads(detail.body)  # NULs and control bytes came out as valid JSON
    # Every file's bytes are served back exactly, each once.
    assert set(by_raw) == set(files.values())
    assert by_raw[files["empty"]]["size"] == 0
    assert by_raw[files["only-headers"]]["subject"] == "only headers"
    # Those the parser could not make sense of say why, and still serve raw.
    assert by_raw[files["deep-multipart"]]["parse_error"]

    # The over-limit file: listed with its reason, raw gone (410), file set aside.
    [big_summary] = summaries(service, "big@example.test")
    assert str(MAX_SIZE) in big_summary["parse_error"]
    assert big_summary["size"] == len(big)
    r = raw_of(service, big_summary)
    assert r.status == 410
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == "raw_set_aside" and r.json()["message"]
    detail = service.get(big_summary["url"])
    assert detail.status == 200 and detail.json()["parse_error"] == big_summary["parse_error"]
    set_aside = maildir / "setaside" / big_name
    assert set_aside.read_bytes() == big
    reason = (maildir / "setaside" / (big_name + ".reason")).read_text()
    assert str(MAX_SIZE) in reason and str(len(big)) in reason

    # Still alive and working.
    assert service.proc.poll() is None
    send_ok(service, "after-odd@example.test", "after the odd files")


def test_symlink_in_new_is_not_followed(service, tmp_path):
    secret = b"root-only secret 7f1c0e\n"
    target = tmp_path / "secret"
    target.write_bytes(secret)
    target.chmod(0o600)
    maildir = service.maildir
    name = f"{int(time.time())}.M2P{os.getpid()}.symlink"
    os.symlink(target, maildir / "tmp" / name)
    os.rename(maildir / "tmp" / name, maildir / "new" / name)
    # A normal mail after it: once it is stored, the link has been handled.
    send_ok(service, "after-link@example.test", "after the symlink")
    wait_for(lambda: not (maildir / "new" / name).is_symlink() or None, 30, what="the link to be handled")
    for address in (UNROUTED, "after-link@example.test"):
        for summary in summaries(service, address):
            r = raw_of(service, summary)
            assert secret not in r.body, "a symlink's target was stored and served"
    assert target.read_bytes() == secret, "the link target must not be touched"


# --- bad HTTP input ----------------------------------------------------------

ADDRESS = "http-bad@example.test"


@pytest.fixture(scope="module")
def known(service):
    """A mailbox with one message (with one attachment), for the requests to aim at."""
    wire = (b"From: h@sender.test\r\nTo: http-bad@example.test\r\nSubject: target\r\n"
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--B\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.bin\r\n"
            b"\r\nabc\r\n--B--\r\n")
    with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=30) as smtp:
        smtp.sendmail("h@sender.test", [ADDRESS], wire)
    [summary] = service.wait_messages(ADDRESS, 1)
    return summary


def raw_request(svc, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
    """http.client, so that the path goes out exactly as given (no re-quoting)."""
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_json_error(status, headers, body, expected_status, expected_code=None):
    assert status == expected_status, (status, body)
    assert 400 <= status < 500
    assert headers.get("content-type", "").startswith("application/json"), (headers, body)
    doc = json.loads(body)
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    assert isinstance(doc.get("message"), str) and doc["message"], doc
    if expected_code:
        assert doc["error"] == expected_code, doc


MSGS = f"/api/v1/mailboxes/{ADDRESS}/messages"


@pytest.mark.parametrize("method, target, status, code", [
    # ids
    ("GET", MSGS + "/0000000000000000000fffff", 404, "message_not_found"),
    ("GET", MSGS + "/0000000000000000000fffff/raw", 404, "message_not_found"),
    ("GET", MSGS + "/0000000000000000000fffff/attachments/0", 404, "message_not_found"),
    ("GET", MSGS + "/zzz", 400, "malformed_id"),
    ("GET", MSGS + "/123", 400, "malformed_id"),
    ("GET", MSGS + "/" + "0" * 25, 400, "malformed_id"),
    ("GET", MSGS + "/%00%00", 400, "malformed_id"),
    ("GET", MSGS + "/..%2F..%2Fetc", 404, "not_found"),  # %2F is decoded before routing
    ("GET", MSGS + "/ZZZZZZZZZZZZZZZZZZZZZZZZ/raw", 400, "malformed_id"),
    ("DELETE", MSGS + "/not-an-id", 400, "malformed_id"),
    # listing: cursor and limit
    ("GET", MSGS + "?cursor=!!!", 400, "bad_cursor"),
    ("GET", MSGS + "?cursor=djE6YWJj", 400, "bad_cursor"),  # base64("v1:abc")
    ("GET", MSGS + "?cursor=%FF%FE", 400, "bad_cursor"),
    ("GET", MSGS + "?cursor=" + "A" * 3000, 400, "bad_cursor"),  # gunicorn caps the request line at 4094
    ("GET", MSGS + "?limit=0", 400, "bad_limit"),
    ("GET", MSGS + "?limit=-1", 400, "bad_limit"),
    ("GET", MSGS + "?limit=100000", 400, "bad_limit"),
    ("GET", MSGS + "?limit=ten", 400, "bad_limit"),
    # mailbox addresses
    ("GET", "/api/v1/mailboxes/no-at-sign/messages", 400, "malformed_address"),
    ("GET", "/api/v1/mailboxes/a@b@example.test/messages", 400, "malformed_address"),
    ("GET", "/api/v1/mailboxes/a%20b@example.test/messages", 400, "malformed_address"),
    ("GET", "/api/v1/mailboxes/" + "a" * 400 + "@example.test/messages", 400, "malformed_address"),
    ("GET", "/api/v1/mailboxes/%FF%FE@example.test/messages", None, None),
    ("GET", "/api/v1/mailboxes/nobody-here@example.test/messages", 404, "mailbox_not_found"),
    # attachments
    ("GET", "{url}/attachments/abc", 400, "malformed_index"),
    ("GET", "{url}/attachments/-1", 400, "malformed_index"),
    ("GET", "{url}/attachments/99999999", 400, "malformed_index"),
    ("GET", "{url}/attachments/1", 404, "attachment_not_found"),
    # routes and methods
    ("GET", "/api/v1/nope", 404, None),
    ("GET", "/nope.php", 404, None),
    ("POST", MSGS, 405, None),
    ("PUT", "{url}", 405, None),
    ("POST", "{url}/raw", 405, None),
    ("DELETE", "/api/v1/domains", 405, None),
    ("PATCH", "/healthz", 405, None),
])
def test_bad_requests_get_4xx_json(service, known, method, target, status, code):
    target = target.replace("{url}", known["url"])
    got_status, headers, body = raw_request(service, method, target)
    if status is None:  # undecodable bytes in the path: any 4xx, as JSON
        status = got_status if 400 <= got_status < 500 else 400
    assert_json_error(got_status, headers, body, status, code)


@pytest.mark.parametrize("body, content_type, status, code", [
    (b"{not json", "application/json", 400, "malformed_json"),
    (b"\xff\xfe{}", "application/json", 400, "malformed_json"),
    (b"", "application/json", 422, "invalid_body"),  # null is no object
    (b"[true]", "application/json", 422, "invalid_body"),
    (b'"seen"', "application/json", 422, "invalid_body"),
    (b'{"seen": "yes"}', "application/json", 422, "invalid_seen"),
    (b'{"seen": true, "subject": "x"}', "application/json", 422, "unknown_field"),
    (b'{"seen": true}', "text/plain", 415, "unsupported_media_type"),
    (b'{"seen": true}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"seen": true}', None, 415, "unsupported_media_type"),
    (b'{"seen": true, "pad": "' + b"x" * (70 * 1024) + b'"}', "application/json", 413, "body_too_large"),
])
def test_bad_patch_bodies_get_4xx_json(service, known, body, content_type, status, code):
    headers = {"Content-Type": content_type} if content_type else {}
    got = raw_request(service, "PATCH", known["url"], body, headers)
    assert_json_error(*got, status, code)


def test_good_requests_still_work_after_the_bad_ones(service, known):
    got_status, _, body = raw_request(service, "PATCH", known["url"], b'{"seen": true}',
                                      {"Content-Type": "application/json"})
    assert got_status == 200, body
    assert json.loads(body) == {"id": known["id"], "seen": True}
    r = service.get(known["url"] + "/attachments/0")
    assert (r.status, r.body) == (200, b"abc")
    assert service.get("/healthz").status == 200
    assert service.proc.poll() is None
