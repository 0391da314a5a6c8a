"""Per-domain handling of sender-authentication failures: quarantine.

Mail goes the production way: .eml files with Postfix's trace headers (client
127.0.0.1) through ``pipeline.prepare_many`` with a real Authenticator asking a
real DNS server on loopback (tests/dnsserver.py), then ``Pipeline.commit``; the
API is the real falcon app on the same SQLite file. Checked: the rule (which
verdicts quarantine), that only domains with ``auth_failure = "quarantine"``
quarantine, that quarantined mail is hidden from the native list, long-polls,
events, mail.tm's list and webhooks, and shown with ``?quarantined=true`` and
by id; and that the ingester's worker processes get the per-domain settings.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from email.message import EmailMessage

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mtasidecar.api import mailtm
from mtasidecar.config import ConfigError, load
from mtasidecar.domains import DomainSet
from mtasidecar.ingest.maildir import Ingester
from mtasidecar.ingest.pipeline import Quarantine, prepare_many, sender_failed
from mtasidecar.mail.auth import Authenticator
from mtasidecar.store import MessageFilter
from mtasidecar.store.models import Delivery, Message
from tests.conftest import ingester_thread, wait_for
from tests.dnsserver import DNSTestServer
from tests.unit.test_api import BASE_TIME, make_env, trace

SPF_LOOPBACK = "v=spf1 ip4:127.0.0.1 -all"  # the trace headers name 127.0.0.1 as the client
SPF_ELSEWHERE = "v=spf1 ip4:192.0.2.0/24 -all"

DOMAINS = [
    {"name": "quar.test", "mode": "public", "auth_failure": "quarantine"},
    {"name": "keep.test", "mode": "public"},  # auth_failure = "keep", the default
    {"name": "priv.test", "mode": "private", "auth_failure": "quarantine"},
    {"name": "sub.test", "mode": "public", "subdomains": True, "auth_failure": "quarantine"},
    {"name": "open.sub.test", "mode": "public"},  # more specific than *.sub.test: keeps
]


@pytest.fixture(scope="module")
def rsa_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def dns_server(rsa_key):
    zone = {
        "origin.test": {"TXT": [SPF_LOOPBACK]},                 # SPF pass, DMARC pass
        "_dmarc.origin.test": {"TXT": ["v=DMARC1; p=reject"]},
        "spffail.test": {"TXT": [SPF_ELSEWHERE]},               # SPF fail, no DMARC
        "soft.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ~all"]},  # softfail
        "nospf.test": {"A": ["192.0.2.9"]},                     # none
        "spammer.test": {"TXT": [SPF_LOOPBACK]},                # SPF pass, but not aligned with:
        "_dmarc.victim.test": {"TXT": ["v=DMARC1; p=none"]},    # DMARC fail, even with p=none
        "signed.test": {"TXT": [SPF_ELSEWHERE]},                # SPF fail, DKIM pass for From
        "sel._domainkey.signed.test": {"TXT": [rsa_key[1]]},
        "badsig.test": {"TXT": [SPF_ELSEWHERE]},                # SPF fail, DKIM fail
        "sel._domainkey.badsig.test": {"TXT": [rsa_key[1]]},
    }
    server = DNSTestServer(zone).start()
    yield server
    server.stop()


@pytest.fixture
def auth(dns_server):
    with Authenticator([dns_server.address], timeout=2, budget=5, hostname="mx.example.test") as a:
        yield a


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path, MTASIDECAR_DOMAINS=json.dumps(DOMAINS), MTASIDECAR_API_AUTH_FAILURE_RATE="1000")


def mail(recipient: str, envelope: str, from_: str | None = None, subject: str = "hi",
         signed_by: tuple[str, bytes] | None = None, tamper: bool = False) -> bytes:
    """A delivered message: Postfix's trace (Return-Path = ``envelope``) on top."""
    m = EmailMessage()
    m["From"] = from_ or envelope
    m["To"] = recipient
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@x.test>"
    m.set_content("Your code is 123456.\n")
    body = m.as_bytes()
    if signed_by:
        domain, pem = signed_by
        body = dkim.sign(body, b"sel", domain.encode(), pem, include_headers=[b"from", b"to", b"subject"]) + body
        if tamper:
            body = body.replace(b"123456", b"999999")
    return trace(recipient, envelope) + body


class Delivered:
    """Files written to new/, prepared with the domain settings and committed."""

    def __init__(self, env, auth):
        self.env, self.auth, self.n = env, auth, 0

    def __call__(self, *raws: bytes, auth="default") -> list[int]:
        paths = []
        for raw in raws:
            path = self.env.maildir / "new" / f"{BASE_TIME + self.n}.M{self.n}P7Q{self.n}.mx.example.test"
            self.n += 1
            path.write_bytes(raw)
            paths.append(str(path))
        batch = prepare_many(paths, 10**7, self.auth if auth == "default" else auth, None,
                             configured(self.env.settings))
        self.env.store.ingest([p.record for p in batch])
        return [Message.get(Message.spool_name == p.record.spool_name).id for p in batch]


@pytest.fixture
def deliver(env, auth):
    return Delivered(env, auth)


def configured(settings) -> dict:
    """What the ingester hands prepare_many for the configured domains."""
    return DomainSet(settings.domains).auth_failure_map()


def hexid(n: int) -> str:
    return format(n, "024x")


# -- the rule ------------------------------------------------------------------------------

def _auth(spf="none", dmarc="none", dkim=(), from_domain="x.test") -> dict:
    return {"spf": {"result": spf}, "dmarc": {"result": dmarc, "from_domain": from_domain},
            "dkim": [{"domain": d, "result": r} for d, r in dkim]}


@pytest.mark.parametrize("verdict, failed", [
    (_auth(dmarc="fail"), True),
    (_auth(spf="fail"), True),
    (_auth(spf="fail", dmarc="fail"), True),
    (_auth(spf="fail", dkim=[("x.test", "pass")]), False),        # DKIM pass for the From domain
    (_auth(spf="fail", dkim=[("test", "pass")]), False),          # ... or a parent of it
    (_auth(spf="fail", dkim=[("other.test", "pass")]), True),     # someone else's signature
    (_auth(spf="fail", dkim=[("x.test", "fail")]), True),
    (_auth(spf="fail", dmarc="pass"), False),
    (_auth(spf="pass", dmarc="fail"), True),                      # unaligned SPF pass
    (_auth(spf="softfail"), False),
    (_auth(spf="neutral"), False),
    (_auth(spf="temperror", dmarc="temperror"), False),          # our DNS trouble hides nothing
    (_auth(spf="permerror", dmarc="permerror"), False),
    (_auth(), False),
])
def test_the_rule(verdict, failed):
    assert sender_failed(verdict) is failed


def test_quarantine_applies_to_the_recipients_configured_domain():
    q = Quarantine({n["name"]: (n.get("subdomains", False), n.get("auth_failure", "keep")) for n in DOMAINS})
    assert q.applies("a@quar.test") and q.applies("A@QUAR.TEST")
    assert not q.applies("a@keep.test")
    assert q.applies("a@x.sub.test") and q.applies("a@sub.test")
    assert not q.applies("a@open.sub.test")  # its own domain, which keeps
    assert not q.applies("a@x.quar.test")  # quar.test takes no subdomains
    assert not q.applies("a@elsewhere.test") and not q.applies(None) and not q.applies("")
    assert not Quarantine(None).applies("a@quar.test")


# -- the pipeline ---------------------------------------------------------------------------

CASES = {
    # name: (envelope sender, From, DKIM signer or None, tampered, quarantined on a quarantine domain)
    "dmarc-pass": ("a@origin.test", None, None, False, False),
    "spf-fail": ("a@spffail.test", None, None, False, True),
    "softfail": ("a@soft.test", None, None, False, False),
    "no-spf": ("a@nospf.test", None, None, False, False),
    "dmarc-fail": ("bounce@spammer.test", "ceo@victim.test", None, False, True),
    "forwarded-signed": ("a@signed.test", None, "signed.test", False, False),
    "bad-signature": ("a@badsig.test", None, "badsig.test", True, True),
}


def _case_mail(name: str, recipient: str, rsa_key) -> bytes:
    envelope, from_, signer, tamper, _q = CASES[name]
    return mail(recipient, envelope, from_, subject=f"case {name}",
                signed_by=(signer, rsa_key[0]) if signer else None, tamper=tamper)


def test_pipeline_quarantines_failing_senders_on_quarantine_domains_only(env, deliver, rsa_key):
    ids = deliver(*[_case_mail(name, f"{name}@quar.test", rsa_key) for name in CASES],
                  *[_case_mail(name, f"{name}@keep.test", rsa_key) for name in CASES])
    rows = {(m.envelope_to, m.subject): m for m in Message.select().where(Message.id.in_(ids))}
    for name, (*_rest, expect) in CASES.items():
        quar, keep = rows[(f"{name}@quar.test", f"case {name}")], rows[(f"{name}@keep.test", f"case {name}")]
        assert quar.quarantined is expect, name
        assert keep.quarantined is False, name  # keep: stored and flagged as before
        assert quar.authenticated == keep.authenticated
        if expect:
            assert quar.authenticated is False
    assert rows[("spf-fail@quar.test", "case spf-fail")].spf == "fail"
    assert rows[("dmarc-fail@quar.test", "case dmarc-fail")].dmarc == "fail"
    # The mailbox's counters include quarantined mail: it is stored, swept and capped alike.
    mailbox = env.store.mailbox("spf-fail@quar.test")
    assert mailbox.message_count == 1


def test_subdomains_follow_their_configured_domain(deliver, rsa_key):
    ids = deliver(_case_mail("spf-fail", "x@q1.sub.test", rsa_key), _case_mail("spf-fail", "x@open.sub.test", rsa_key))
    assert [Message.get_by_id(i).quarantined for i in ids] == [True, False]


def test_dns_trouble_never_quarantines(env, deliver, rsa_key):
    slow = DNSTestServer({"spffail.test": {"TXT": [SPF_ELSEWHERE]}}, delay=1.0).start()
    try:
        with Authenticator([slow.address], timeout=0.2, budget=0.3, hostname="mx.example.test") as a:
            [mid] = deliver(_case_mail("spf-fail", "t@quar.test", rsa_key), auth=a)
    finally:
        slow.stop()
    row = Message.get_by_id(mid)
    assert (row.spf, row.quarantined) == ("temperror", False)


def test_checks_off_never_quarantine(deliver, rsa_key):
    [mid] = deliver(_case_mail("spf-fail", "off@quar.test", rsa_key), auth=None)
    row = Message.get_by_id(mid)
    assert (row.spf, row.authenticated, row.quarantined) == (None, None, False)


# -- reading: hidden from lists, shown on request and by id ---------------------------------

def _list(env, address: str, query: str = "", status: int = 200) -> dict:
    r = env.get(f"/api/v1/mailboxes/{address}/messages", query_string=query)
    assert r.status_code == status, r.text
    return r.json


def test_native_list_hides_quarantined_and_shows_them_on_request(env, deliver, rsa_key):
    address = "box@quar.test"
    good1, bad1, good2, bad2 = deliver(mail(address, "a@origin.test", subject="good one"),
                                       mail(address, "a@spffail.test", subject="bad one"),
                                       mail(address, "a@origin.test", subject="good two"),
                                       mail(address, "a@spffail.test", subject="bad two"))
    listed = _list(env, address)["items"]
    assert [m["subject"] for m in listed] == ["good two", "good one"]
    assert all(m["quarantined"] is False for m in listed)
    assert [m["subject"] for m in _list(env, address, "quarantined=false")["items"]] == ["good two", "good one"]
    shown = _list(env, address, "quarantined=true")["items"]
    assert [m["subject"] for m in shown] == ["bad two", "bad one"]
    assert all(m["quarantined"] is True and m["authenticated"] is False for m in shown)
    # Combined with other filters, and paged (the cursor goes with the same filter).
    page = _list(env, address, "quarantined=true&auth=fail&limit=1")
    assert [m["subject"] for m in page["items"]] == ["bad two"]
    rest = _list(env, address, f"quarantined=true&auth=fail&limit=1&cursor={page['next_cursor']}")
    assert [m["subject"] for m in rest["items"]] == ["bad one"] and rest["next_cursor"] is None
    assert _list(env, address, "quarantined=true&auth=pass")["items"] == []
    assert [m["subject"] for m in _list(env, address, "has=code")["items"]] == ["good two", "good one"]
    assert [m["subject"] for m in _list(env, address, f"after={hexid(good1)}")["items"]] == ["good two"]
    # By id: always, with the flag and the verdict that caused it.
    r = env.get(f"/api/v1/mailboxes/{address}/messages/{hexid(bad1)}")
    assert r.status_code == 200, r.text
    assert r.json["quarantined"] is True and r.json["auth"]["spf"]["result"] == "fail"
    assert env.get(f"/api/v1/mailboxes/{address}/messages/{hexid(bad1)}/raw").status_code == 200
    assert env.get(f"/api/v1/mailboxes/{address}/messages/{hexid(good2)}").json["quarantined"] is False
    for bad in ("yes", "1", "", "TRUE"):
        assert _list(env, address, f"quarantined={bad}", status=400)["error"] == "bad_quarantined"
    assert bad2


def test_long_poll_waits_past_quarantined_mail(env, deliver):
    """?wait= answers with the next visible message, not with a quarantined one."""
    address = "poll@quar.test"
    deliver(mail(address, "a@origin.test", subject="first"))
    result = {}

    def poll():
        result["r"] = env.get(f"/api/v1/mailboxes/{address}/messages",
                              query_string="wait=10&after=" + hexid(Message.select().count()))

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)
    deliver(mail(address, "a@spffail.test", subject="quarantined"))
    time.sleep(0.5)
    assert t.is_alive()  # the quarantined message did not answer it
    deliver(mail(address, "a@origin.test", subject="visible"))
    t.join(15)
    assert [m["subject"] for m in result["r"].json["items"]] == ["visible"]
    # And one waiting for quarantined mail is woken by it.
    r = env.get(f"/api/v1/mailboxes/{address}/messages", query_string="wait=1&quarantined=true")
    assert [m["subject"] for m in r.json["items"]] == ["quarantined"]


def test_event_queries_skip_quarantined(env, deliver):
    """The native event stream and the mail.tm hub both read list_messages(filters=after)."""
    address = "events@quar.test"
    ids = deliver(mail(address, "a@origin.test", subject="ok"), mail(address, "a@spffail.test", subject="no"))
    mailbox = env.store.mailbox(address)
    rows = env.store.list_messages(mailbox.id, 100, filters=MessageFilter(after_id=ids[0] - 1))
    assert [r["subject"] for r in rows] == ["ok"]
    assert [r["subject"] for r in env.store.list_messages(mailbox.id, 100, quarantined=None)] == ["no", "ok"]
    # The watcher still hears of it (a waiter for ?quarantined=true needs that).
    assert (ids[1], mailbox.id) in env.store.new_messages_since(ids[0] - 1)


def test_no_webhook_events_for_quarantined_mail(tmp_path, rsa_key, auth):
    env = make_env(tmp_path, MTASIDECAR_DOMAINS=json.dumps(DOMAINS))
    env.store.operator_webhook_url = "https://ops.example.com/hook"
    address = "hooked@quar.test"
    deliver = Delivered(env, auth)
    ok = deliver(mail(address, "a@origin.test", subject="create the mailbox"))
    mailbox = env.store.mailbox(address)
    env.store.create_webhook(mailbox.id, "https://hooks.example.com/x", "s" * 32, 10)
    good, bad = deliver(mail(address, "a@origin.test", subject="good"), mail(address, "a@spffail.test", subject="bad"))
    events = sorted((d.message_id, d.url) for d in Delivery.select())
    assert events == [(ok[0], "https://ops.example.com/hook"), (good, "https://hooks.example.com/x"),
                      (good, "https://ops.example.com/hook")]
    assert Message.get_by_id(bad).quarantined is True


def test_mailtm_lists_hide_quarantined_but_the_message_opens(env, deliver, monkeypatch):
    monkeypatch.setattr(mailtm, "SCRYPT_N", 2**10)
    address = "alice@priv.test"
    r = env.client.simulate_post("/accounts", json={"address": address, "password": "correct horse"})
    assert r.status_code == 201, r.text
    token = env.client.simulate_post("/token", json={"address": address, "password": "correct horse"}).json["token"]
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/ld+json"}
    good, bad = deliver(mail(address, "a@origin.test", subject="good"), mail(address, "a@spffail.test", subject="bad"))
    listed = env.client.simulate_get("/messages", headers=headers).json
    assert [m["subject"] for m in listed["hydra:member"]] == ["good"]
    assert listed["hydra:totalItems"] == 1
    opened = env.client.simulate_get(f"/messages/{hexid(bad)}", headers=headers)
    assert opened.status_code == 200 and opened.json["subject"] == "bad"
    # The native API with the same token: hidden from the list, shown by id.
    native = {"Authorization": f"Bearer {token}"}
    r = env.get(f"/api/v1/mailboxes/{address}/messages", headers=native)
    assert [m["subject"] for m in r.json["items"]] == ["good"]
    r = env.get(f"/api/v1/mailboxes/{address}/messages", headers=native, query_string="quarantined=true")
    assert [m["subject"] for m in r.json["items"]] == ["bad"]
    assert env.get(f"/api/v1/mailboxes/{address}/messages/{hexid(bad)}", headers=native).json["quarantined"] is True
    # Nobody else sees it, quarantined or not.
    assert env.get(f"/api/v1/mailboxes/{address}/messages", query_string="quarantined=true").status_code in (401, 404)
    assert good


# -- the ingester's worker processes get the per-domain settings ------------------------------

@contextlib.contextmanager
def running_ingester(env, dns_server, domains):
    """The real Ingester (one worker process, sender checks against ``dns_server``) in a thread."""
    auth_config = {"servers": [dns_server.address], "timeout": 2.0, "budget": 5.0, "hostname": "mx.example.test"}
    ingester = Ingester(env.store, env.maildir, workers=1, rescan_interval=60, auth=auth_config, domains=domains)
    with ingester_thread(ingester):
        yield ingester


def half_failing(domain: str, i: int) -> bytes:
    """Message m<i> to w<i>@domain: odd ones from a sender whose SPF fails."""
    return mail(f"w{i}@{domain}", "a@spffail.test" if i % 2 else "a@origin.test", subject=f"m{i}")


def stored(n: int) -> bool:
    return Message.select().count() >= n


def assert_odd_ones_quarantined(n: int) -> None:
    flags = {m.subject: m.quarantined for m in Message.select()}
    assert flags == {f"m{i}": bool(i % 2) for i in range(n)}


def test_ingester_workers_quarantine(tmp_path, dns_server):
    env = make_env(tmp_path, MTASIDECAR_DOMAINS=json.dumps(DOMAINS))
    n = 12  # more than INLINE_MAX: prepared in the worker process
    for i in range(n):
        (env.maildir / "new" / f"{BASE_TIME + i}.M{i}P9Q{i}.mx.example.test").write_bytes(half_failing("quar.test", i))
    with running_ingester(env, dns_server, configured(env.settings)):
        wait_for(lambda: stored(n), 60, 0.1, "the ingester to store the files")
    assert_odd_ones_quarantined(n)


def test_a_runtime_domain_added_while_the_ingester_runs_quarantines(tmp_path, dns_server):
    """The ingester asks the DomainRegistry per batch (as `mtasidecar ingest` wires it), inline and in workers."""
    from mtasidecar.domains import DomainRegistry, settings_json
    env = make_env(tmp_path, MTASIDECAR_DOMAINS=json.dumps(DOMAINS))
    registry = DomainRegistry(env.settings, env.store)
    with running_ingester(env, dns_server, lambda: registry.snapshot().auth_failure_map()):
        domain = env.settings.runtime_domain({"name": "rtq.test", "mode": "public", "auth_failure": "quarantine"})
        env.store.add_domain(domain.name, domain.subdomains, domain.mode, settings_json(domain))
        n = 12  # one file first (inline), then more than INLINE_MAX at once (the worker)
        for i in range(n):
            (env.maildir / "tmp" / "x").write_bytes(half_failing("rtq.test", i))
            (env.maildir / "tmp" / "x").rename(env.maildir / "new" / f"{BASE_TIME + i}.M{i}P8Q{i}.mx.example.test")
            if i == 0:
                wait_for(lambda: stored(1), 60, 0.05, "the ingester to store the first file")
        wait_for(lambda: stored(n), 60, 0.1, "the ingester to store the files")
    assert_odd_ones_quarantined(n)


# -- settings ----------------------------------------------------------------------------

def _load(**env) -> object:
    return load(environ={"MTASIDECAR_DATA_DIR": "/tmp/x", **env})


def test_settings():
    s = _load(MTASIDECAR_DOMAINS=json.dumps(DOMAINS + [{"name": "rej.test", "reject_spf_fail": True}]))
    assert s.domain("keep.test").auth_failure == "keep" and s.domain("keep.test").reject_spf_fail is False
    assert s.domain("quar.test").auth_failure == "quarantine"
    assert s.domain("rej.test").reject_spf_fail is True
    assert configured(s)["sub.test"] == (True, "quarantine")
    # The short form keeps the defaults.
    short = _load(MTASIDECAR_DOMAINS="a.test,public:*.b.test")
    assert {d.auth_failure for d in short.domains} == {"keep"}
    with pytest.raises(ConfigError, match=r"domains\[0\]\.auth_failure"):
        _load(MTASIDECAR_DOMAINS=json.dumps([{"name": "a.test", "auth_failure": "reject"}]))
    with pytest.raises(ConfigError, match=r"domains\[0\]\.auth_failure: 'quarantine' needs auth.enabled"):
        _load(MTASIDECAR_DOMAINS=json.dumps([{"name": "a.test", "auth_failure": "quarantine"}]),
              MTASIDECAR_AUTH_ENABLED="false")
    with pytest.raises(ConfigError, match=r"domains\[0\]\.reject_spf_fail: needs the policy service"):
        _load(MTASIDECAR_DOMAINS=json.dumps([{"name": "a.test", "reject_spf_fail": True}]),
              MTASIDECAR_POLICY_LISTEN="")
    with pytest.raises(ConfigError, match=r"domains\[0\]\.reject_spf_fail: expected true or false"):
        _load(MTASIDECAR_DOMAINS=json.dumps([{"name": "a.test", "reject_spf_fail": "maybe"}]))
    with pytest.raises(ConfigError, match=r"policy\.spf_budget"):
        _load(MTASIDECAR_POLICY_SPF_BUDGET="0")


def test_settings_reach_child_processes():
    from mtasidecar.config import to_environ
    s = _load(MTASIDECAR_DOMAINS=json.dumps(DOMAINS + [{"name": "rej.test", "reject_spf_fail": True}]))
    again = load(environ=to_environ(s))
    assert again.domains == s.domains
    assert again.policy.spf_budget == s.policy.spf_budget

