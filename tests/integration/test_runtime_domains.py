"""Domains added and disabled at runtime, through the real Postfix.

`mtasidecar dev` starts with one configured domain; the operator adds more
through the API. Postfix has never heard of them (its static maps list the
configured domain only) and learns about them from the policy process's
socketmap: mail for an added domain is accepted and stored, unknown
addresses on a private one get 550 from the policy service, and once the
domain is disabled Postfix refuses it like any foreign domain.
"""

from __future__ import annotations

import itertools
import json
import smtplib
from email.message import EmailMessage

import pytest

from tests.conftest import running_service, wait_for

pytestmark = pytest.mark.timeout(300)

CONFIGURED = "configured.test"
OPERATOR = "op-" + "k" * 40
_source_ips = (f"127.0.0.{i}" for i in itertools.count(40))


@pytest.fixture(scope="module")
def svc():
    with running_service([CONFIGURED], {"MTASIDECAR_API_OPERATOR_TOKEN": OPERATOR}) as service:
        yield service


def api(svc, method: str, path: str, body: dict | None = None, token: str | None = OPERATOR):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = svc.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
    return r.status, r.json()


def send(svc, to: str, subject: str) -> None:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "sender@example.org", to, subject
    m.set_content(f"body of {subject}\n")
    with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30, source_address=(next(_source_ips), 0)) as smtp:
        smtp.sendmail("sender@example.org", [to], m.as_bytes())


def rcpt_answer(svc, to: str) -> tuple[int, bytes]:
    """Postfix's answer to RCPT TO for ``to`` (nothing is sent)."""
    with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30, source_address=(next(_source_ips), 0)) as smtp:
        smtp.ehlo("client.example.org")
        smtp.mail("sender@example.org")
        return smtp.rcpt(to)


def subjects(svc, address: str, token: str | None = None) -> list[str]:
    status, body = api(svc, "GET", f"/api/v1/mailboxes/{address}/messages", token=token)
    return [m["subject"] for m in body["items"]] if status == 200 else []


def test_unknown_domain_is_refused_before_it_is_added(svc):
    code, text = rcpt_answer(svc, "a@later.test")
    assert code == 554 and b"Relay access denied" in text, (code, text)


def test_a_private_domain_added_at_runtime_receives_mail(svc):
    status, added = api(svc, "POST", "/api/v1/admin/domains", {"name": "rt-private.test", "subdomains": True})
    assert status == 201, added
    assert (added["source"], added["mode"], added["active"]) == ("api", "private", True)
    # A mailbox on it, right away, and its mail through Postfix → socketmap → ingester → API.
    status, box = api(svc, "POST", "/api/v1/mailboxes", {"domain": "rt-private.test", "subdomain": "q7"}, token=None)
    assert status == 201, box
    assert box["address"].endswith("@q7.rt-private.test")
    send(svc, box["address"], "runtime private")
    wait_for(lambda: subjects(svc, box["address"], box["token"]) == ["runtime private"], 60,
             what="the mail on the runtime domain")
    # The policy service knows the domain too: an address nobody made is refused at RCPT.
    code, text = rcpt_answer(svc, "nobody@rt-private.test")
    assert code == 550 and b"5.1.1" in text, (code, text)
    # Subdomains of a domain without them stay foreign.
    api(svc, "POST", "/api/v1/admin/domains", {"name": "rt-flat.test", "mode": "public"})
    assert rcpt_answer(svc, "x@deep.rt-flat.test")[0] == 554
    assert rcpt_answer(svc, "x@rt-flat.test")[0] == 250


def test_a_public_domain_added_at_runtime_is_a_catch_all(svc):
    status, _ = api(svc, "POST", "/api/v1/admin/domains", {"name": "rt-public.test", "mode": "public"})
    assert status == 201
    send(svc, "anyone@rt-public.test", "runtime public")
    wait_for(lambda: subjects(svc, "anyone@rt-public.test") == ["runtime public"], 60,
             what="the mail on the public runtime domain")


def test_a_disabled_domain_is_refused_again_and_can_come_back(svc):
    status, _ = api(svc, "POST", "/api/v1/admin/domains", {"name": "rt-off.test", "mode": "public"})
    assert status == 201
    assert rcpt_answer(svc, "a@rt-off.test")[0] == 250
    status, body = api(svc, "PATCH", "/api/v1/admin/domains/rt-off.test", {"active": False})
    assert (status, body["active"]) == (200, False)
    # The policy process re-reads its domain list every few seconds (policy.DOMAINS_TTL). Postfix
    # then refuses the domain like any foreign one; an address an smtpd process resolved
    # shortly before stays in its cache, and the policy service refuses that one.
    fresh = (f"x{i}@rt-off.test" for i in itertools.count())
    wait_for(lambda: rcpt_answer(svc, next(fresh))[0] == 554, 30, 0.5, "Postfix to refuse the disabled domain")
    code, text = rcpt_answer(svc, "a@rt-off.test")
    assert code in (550, 554) and (b"5.1.2" in text or b"Relay access denied" in text), (code, text)
    status, body = api(svc, "POST", "/api/v1/mailboxes", {"domain": "rt-off.test"}, token=None)
    assert (status, body["error"]) == (422, "unknown_domain")
    status, body = api(svc, "PATCH", "/api/v1/admin/domains/rt-off.test", {"active": True})
    assert status == 200
    wait_for(lambda: rcpt_answer(svc, next(fresh))[0] == 250, 30, 0.5, "Postfix to accept it again")


def test_a_configured_domain_is_not_changed_through_the_api(svc):
    status, body = api(svc, "PATCH", f"/api/v1/admin/domains/{CONFIGURED}", {"active": False})
    assert (status, body["error"]) == (409, "configured_domain")
    send(svc, f"someone@{CONFIGURED}", "configured")
    wait_for(lambda: subjects(svc, f"someone@{CONFIGURED}") == ["configured"], 60, what="the configured domain's mail")
