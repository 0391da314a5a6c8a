"""The policy service through the real Postfix: `mtasidecar dev` with a private
and a public domain, mail sent with smtplib, mailboxes made through the API.

Every test sends from its own loopback address (127.0.0.x: Postfix listens on
127.0.0.1 and sees the source address as the client IP), so the per-client
message rate of one test never spends another's.
"""

from __future__ import annotations

import itertools
import json
import smtplib
import sqlite3
import time
from email.message import EmailMessage

import pytest

from tests.conftest import free_port, running_service, wait_for

pytestmark = pytest.mark.timeout(300)

PUBLIC, PRIVATE = "pub.test", "priv.test"
RATE_LIMIT, RATE_WINDOW = 5, 3.0
_source_ips = (f"127.0.0.{i}" for i in itertools.count(10))


@pytest.fixture(scope="module")
def svc():
    with running_service([PUBLIC], {
        "MTASIDECAR_POLICY_LISTEN": f"127.0.0.1:{free_port()}",
        "MTASIDECAR_POLICY_SOCKETMAP": f"127.0.0.1:{free_port()}",
        "MTASIDECAR_POLICY_RATE_LIMIT": str(RATE_LIMIT),
        "MTASIDECAR_POLICY_RATE_WINDOW": str(RATE_WINDOW),
    }, private=[PRIVATE]) as service:
        yield service


@pytest.fixture
def source_ip():
    """A client IP of this test's own."""
    return next(_source_ips)


def message(to: str, subject: str) -> bytes:
    m = EmailMessage()
    m["From"] = "sender@example.org"
    m["To"] = to
    m["Subject"] = subject
    m.set_content(f"body of {subject}\n")
    return m.as_bytes()


def send(svc, source_ip: str, to: str, subject: str = "hello", **kw) -> dict:
    with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30, source_address=(source_ip, 0)) as smtp:
        return smtp.sendmail("sender@example.org", [to], message(to, subject), **kw)


def refused(svc, source_ip: str, to: str, **kw) -> tuple[int, bytes]:
    """(code, text) of the refusal of ``to`` at RCPT."""
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        send(svc, source_ip, to, "should be refused", **kw)
    return info.value.recipients[to]


def create_mailbox(svc, **body) -> dict:
    r = svc.request("POST", "/api/v1/mailboxes", body=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"})
    assert r.status == 201, r.body
    return r.json()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wait_subjects(svc, address: str, token: str | None, subjects: set[str]) -> list[dict]:
    headers = bearer(token) if token else {}

    def arrived():
        r = svc.get(f"/api/v1/mailboxes/{address}/messages", headers=headers)
        items = r.json()["items"] if r.status == 200 else []
        return items if subjects <= {m["subject"] for m in items} else None

    return wait_for(arrived, 30, what=f"{subjects} in {address}")


def test_unknown_address_on_private_domain_is_refused_at_rcpt(svc, source_ip):
    code, text = refused(svc, source_ip, f"nobody@{PRIVATE}")
    assert code == 550
    assert b"5.1.1" in text and b"no such mailbox" in text


def test_created_mailbox_receives_then_is_refused_after_delete(svc, source_ip):
    box = create_mailbox(svc, domain=PRIVATE)
    address, token = box["address"], box["token"]
    assert address.endswith("@" + PRIVATE)
    assert send(svc, source_ip, address, "for the owner") == {}
    items = wait_subjects(svc, address, token, {"for the owner"})
    r = svc.get(f"/api/v1/mailboxes/{address}/messages/{items[0]['id']}", headers=bearer(token))
    assert r.status == 200 and "body of for the owner" in r.body.decode()
    assert svc.get(f"/api/v1/mailboxes/{address}/messages").status == 401  # no token

    assert svc.request("DELETE", f"/api/v1/mailboxes/{address}", headers=bearer(token)).status == 204
    code, _text = refused(svc, source_ip, address)
    assert code == 550


def test_expired_mailbox_is_refused(svc, source_ip):
    box = create_mailbox(svc, domain=PRIVATE, ttl=60)
    address = box["address"]
    assert send(svc, source_ip, address, "before expiry") == {}
    wait_subjects(svc, address, box["token"], {"before expiry"})
    # ttl=60 is the shortest lifetime: move the expiry into the past instead.
    with sqlite3.connect(svc.data_dir / "mtasidecar.db") as db:
        assert db.execute("UPDATE mailbox SET expires_at = ? WHERE address = ?",
                          (time.time() - 1, address)).rowcount == 1
    code, _text = refused(svc, source_ip, address)
    assert code == 550


def test_public_domain_takes_anything(svc, source_ip):
    addresses = [f"anything-{i}@{PUBLIC}" for i in range(3)]
    for a in addresses:
        assert send(svc, source_ip, a, f"public {a}") == {}
    for a in addresses:
        wait_subjects(svc, a, None, {f"public {a}"})


def test_foreign_domain_is_still_refused_by_postfix(svc, source_ip):
    code, text = refused(svc, source_ip, "someone@elsewhere.example")
    assert code == 554 and b"Relay access denied" in text


def test_rate_limit_gives_450_then_accepts_after_the_window(svc):
    to = f"rate@{PUBLIC}"
    for _attempt in range(3):
        ip = next(_source_ips)
        start = time.monotonic()
        # One SMTP session, one message per transaction: fast enough to stay
        # inside the window even on a busy machine.
        with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30, source_address=(ip, 0)) as smtp:
            for i in range(RATE_LIMIT):
                assert smtp.sendmail("sender@example.org", [to], message(to, f"rate {ip} {i}")) == {}
            try:
                smtp.sendmail("sender@example.org", [to], message(to, f"rate {ip} over"))
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients[to]
                break
        # Accepted: only possible if the window closed meanwhile (a very slow
        # machine); try again from a fresh address.
        assert time.monotonic() - start >= RATE_WINDOW, "the 6th message was accepted inside the window"
    else:
        pytest.fail("could not send 6 messages inside one rate window")
    assert code == 450
    assert b"4.7.1" in text and f"too many messages from {ip}".encode() in text

    def accepted_again():
        try:
            return send(svc, ip, to, f"rate {ip} after the window") == {}
        except smtplib.SMTPRecipientsRefused as exc:
            assert exc.recipients[to][0] == 450, exc.recipients
            return False

    wait_for(accepted_again, 30, 0.25, "mail to be accepted again after the rate window")
    wait_subjects(svc, to, None, {f"rate {ip} after the window"} | {f"rate {ip} {i}" for i in range(RATE_LIMIT)})


def test_declared_size_over_the_limit_gets_552(svc, source_ip):
    # Postfix checks SIZE= against message_size_limit itself, at MAIL FROM,
    # before any recipient: the policy's own 552 (for a declared size Postfix
    # let through) is covered in tests/unit/test_policy.py.
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        send(svc, source_ip, f"big@{PUBLIC}", "too big", mail_options=["SIZE=999999999"])
    assert info.value.smtp_code == 552
    assert b"5.3.4" in info.value.smtp_error
    # A declared size under the limit passes.
    assert send(svc, source_ip, f"small@{PUBLIC}", "small", mail_options=["SIZE=2000"]) == {}
