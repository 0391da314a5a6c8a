"""End to end: per-domain handling of sender-authentication failures.

The real Postfix of `mtasidecar dev`, its policy service, the ingester and the
API, all asking a real DNS server on loopback (tests/dnsserver.py). Per-domain
settings come in as a JSON MTASIDECAR_DOMAINS (no --domain flags, which would
replace it):

* reject.test: ``reject_spf_fail = true``: the policy service refuses a
  recipient at RCPT with 550 5.7.23 when SPF says fail for the client
  (127.0.0.1, as Postfix sees smtplib) and the envelope sender (the HELO name
  for a null sender); softfail, pass, none and temperror are accepted;
* quar.test: ``auth_failure = "quarantine"``: mail from a failing sender is
  stored but left out of the list; ``?quarantined=true`` and GET by id show it;
* keep.test: the defaults: everything accepted and listed, failures flagged.

Needs root (the Postfix master), postfix and dnslib.
"""

from __future__ import annotations

import json
import os
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import running_service, wait_for
from tests.dnsserver import DNSTestServer, _free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

DOMAINS = [
    {"name": "reject.test", "mode": "public", "reject_spf_fail": True},
    {"name": "quar.test", "mode": "public", "auth_failure": "quarantine"},
    {"name": "keep.test", "mode": "public"},
]
ZONE = {
    "spffail.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},  # 127.0.0.1 not listed: fail
    "spfpass.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "spfsoft.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ~all"]},
    "spfnone.test": {"A": ["192.0.2.7"]},
    "helofail.test": {"TXT": ["v=spf1 -all"]},  # the HELO name of a bounce
    "other.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},  # for the quarantine case only
    "late.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},  # asked first while DNS is down
}


def spf_refusal(reply: tuple[int, bytes]) -> bool:
    """Postfix's form of our 550 5.7.23: "5.7.23 <rcpt>: Recipient address rejected: SPF validation failed"."""
    code, text = reply
    return code == 550 and text.startswith(b"5.7.23 ") and text.endswith(b"SPF validation failed")


@pytest.fixture(scope="module")
def dns_server():
    # A fixed port: the DNS-down test stops and restarts it under the running service.
    server = DNSTestServer(ZONE, port=_free_port("127.0.0.1")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc(dns_server):
    with running_service([], {
        "MTASIDECAR_DOMAINS": json.dumps(DOMAINS),
        "MTASIDECAR_DNS_SERVERS": f"127.0.0.1:{dns_server.port}",
        "MTASIDECAR_DNS_TIMEOUT": "0.5",
        "MTASIDECAR_DNS_BUDGET": "1.5",
        "MTASIDECAR_POLICY_SPF_BUDGET": "1.0",
        "MTASIDECAR_HOSTNAME": "mx.sidecar.test",
    }, prefix="mtasidecar-auth-policy-e2e-") as service:
        yield service


def message(to: str, subject: str, from_: str) -> bytes:
    m = EmailMessage()
    m["From"] = from_
    m["To"] = to
    m["Subject"] = subject
    m.set_content(f"body of {subject}\n")
    return m.as_bytes()


def send(svc, sender: str, recipients: list[str], subject: str, helo: str = "client.test",
         from_: str | None = None) -> dict:
    """What Postfix refused: {recipient: (code, text)}; raises if it refused them all."""
    with smtplib.SMTP("127.0.0.1", svc.smtp_port, local_hostname=helo, timeout=30) as smtp:
        return smtp.sendmail(sender, recipients, message(recipients[0], subject, from_ or sender or "x@bounce.test"))


def refused(svc, sender: str, to: str, **kw) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        send(svc, sender, [to], "should be refused", **kw)
    return info.value.recipients[to]


def subjects(svc, address: str, **params) -> list[str]:
    return [m["subject"] for m in svc.messages(address, limit=100, **params)]


# -- refusal at RCPT ------------------------------------------------------------------

def test_spf_fail_is_refused_at_rcpt_on_a_reject_domain(svc):
    assert spf_refusal(refused(svc, "a@spffail.test", "x@reject.test"))
    # The same transaction to a domain that did not ask: that recipient is accepted.
    refusals = send(svc, "a@spffail.test", ["y@reject.test", "y@keep.test"], "mixed")
    assert list(refusals) == ["y@reject.test"] and spf_refusal(refusals["y@reject.test"])
    [kept] = svc.wait_messages("y@keep.test", 1)
    assert kept["subject"] == "mixed" and kept["authenticated"] is False and kept["quarantined"] is False
    # A bounce (null sender) is judged by its HELO name.
    assert spf_refusal(refused(svc, "", "z@reject.test", helo="helofail.test"))


@pytest.mark.parametrize("sender", ["a@spfpass.test", "a@spfsoft.test", "a@spfnone.test"])
def test_other_spf_results_are_accepted_on_a_reject_domain(svc, sender):
    domain = sender.partition("@")[2]
    to = f"ok-{domain.partition('.')[0]}@reject.test"
    assert send(svc, sender, [to], f"from {domain}") == {}
    assert [m["subject"] for m in svc.wait_messages(to, 1)] == [f"from {domain}"]
    # No such mail got into the mailbox refused in the test above.
    assert svc.messages("x@reject.test") == []


# -- quarantine ---------------------------------------------------------------------------

def test_quarantine_domain_stores_failing_mail_hidden(svc):
    address = "box@quar.test"
    assert send(svc, "a@other.test", [address], "phish", from_="Bank <a@other.test>") == {}
    assert send(svc, "a@spfpass.test", [address], "genuine") == {}
    quarantined = wait_for(lambda: svc.messages(address, quarantined="true"), 30, what="the quarantined message")
    assert [m["subject"] for m in quarantined] == ["phish"]
    assert quarantined[0]["quarantined"] is True and quarantined[0]["authenticated"] is False
    visible = svc.wait_messages(address, 1)
    time.sleep(0.5)  # both were sent before; nothing more is coming
    assert subjects(svc, address) == ["genuine"]
    assert visible[0]["quarantined"] is False
    # By id: shown, with the verdict that caused it.
    r = svc.get(quarantined[0]["url"])
    assert r.status == 200
    detail = r.json()
    assert detail["quarantined"] is True
    assert detail["auth"]["spf"] == {"result": "fail", "domain": "other.test", "ip": "127.0.0.1",
                                     "helo": "client.test"}
    assert svc.get(f"/api/v1/mailboxes/{address}/messages?quarantined=maybe").status == 400


def test_keep_domain_lists_failing_mail_flagged(svc):
    address = "box@keep.test"
    assert send(svc, "a@other.test", [address], "flagged") == {}
    [m] = svc.wait_messages(address, 1)
    assert (m["subject"], m["authenticated"], m["quarantined"]) == ("flagged", False, False)
    assert svc.messages(address, quarantined="true") == []


# -- DNS down: the policy accepts (temperror), within its budget ---------------------------

def test_dns_down_accepts_within_the_budget(svc, dns_server):
    dns_server.stop()
    try:
        t0 = time.monotonic()
        # A sender domain never looked up before (nothing cached): SPF would fail if DNS answered.
        assert send(svc, "a@late.test", ["late@reject.test"], "dns down") == {}
        elapsed = time.monotonic() - t0
    finally:
        dns_server.start()  # same port
    assert elapsed < 10, elapsed
    assert [m["subject"] for m in svc.wait_messages("late@reject.test", 1)] == ["dns down"]
    # DNS back: the verdict was not kept, so the next attempt is refused.
    assert spf_refusal(refused(svc, "a@late.test", "later@reject.test"))
