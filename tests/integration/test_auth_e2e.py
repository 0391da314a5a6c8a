"""End to end: SPF, DKIM and DMARC verdicts of mail sent through the real Postfix.

SMTP into the private Postfix of `mtasidecar dev` → Maildir → ingester (its
Authenticator asks a real DNS server on loopback, tests/dnsserver.py) →
SQLite → gunicorn; every verdict is read back over HTTP.

* Postfix sees the client as 127.0.0.1, so zones that should give SPF "pass"
  list ip4:127.0.0.1, and those that should not list 192.0.2.0/24 only.
* Messages are DKIM-signed (keys made here, RSA and Ed25519) over the exact
  bytes handed to smtplib, with CRLF line ends. Postfix only prepends its
  trace headers and writes LF line ends; the checks must verify regardless.
* Every case has its own sender domain: the ingester caches DNS answers (per
  process), and a cached answer from an earlier case must not mask a later
  case (the slow and dead DNS cases above all).
* The slow/dead DNS cases run last and restore the server afterwards; the DNS
  server keeps its port across stop/start so the running ingester still
  reaches it.

Needs root, postfix (the master runs as root) and dnslib.
"""

from __future__ import annotations

import base64
import os
import smtplib
import time
from email.utils import formatdate, make_msgid
from pathlib import Path

import dkim
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dns import nameserver as dns_nameserver
from dns import resolver as dns_resolver

from tests.conftest import running_service
from tests.dnsserver import DNSTestServer, _free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

HOSTNAME = "mx.sidecar.test"  # our authserv-id (MTASIDECAR_HOSTNAME)
DOMAIN = "example.test"  # where the mail goes
ALL = f"all@{DOMAIN}"  # every "normal" case is also delivered here, for the list filters
SPF_LOOPBACK = "v=spf1 ip4:127.0.0.1 -all"  # Postfix's client address is 127.0.0.1
SPF_ELSEWHERE = "v=spf1 ip4:192.0.2.0/24 -all"
DNS_TIMEOUT, DNS_BUDGET = 0.5, 1.5


# -- keys and zone -------------------------------------------------------------------

class Keys:
    def __init__(self):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_private = key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.rsa_record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
        ed = nacl.signing.SigningKey.generate()
        self.ed_private = base64.b64encode(bytes(ed))  # dkimpy takes the base64 seed
        self.ed_record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(ed.verify_key)).decode()


def make_zone(keys: Keys) -> dict:
    zone: dict = {}

    def add(name: str, rtype: str, value) -> None:
        zone.setdefault(name, {}).setdefault(rtype, []).append(value)

    def rsa_key(domain: str) -> None:
        add(f"rsa._domainkey.{domain}", "TXT", keys.rsa_record)

    # DKIM
    add("rsa.test", "TXT", SPF_LOOPBACK)
    rsa_key("rsa.test")
    add("ed._domainkey.ed.test", "TXT", keys.ed_record)  # ed.test: no SPF, no DMARC
    add("ed.test", "A", "192.0.2.3")
    rsa_key("tampered.test")
    # SPF
    add("spfpass.test", "TXT", SPF_LOOPBACK)
    add("spffail.test", "TXT", SPF_ELSEWHERE)
    add("spfsoft.test", "TXT", "v=spf1 ip4:192.0.2.0/24 ~all")
    add("spfnone.test", "A", "192.0.2.4")
    add("spfnone.test", "TXT", "google-site-verification=not-an-spf-record")
    # DMARC: aligned (relaxed: SPF for a subdomain, DKIM for the From domain)
    add("aligned.test", "TXT", SPF_ELSEWHERE)
    add("bounces.aligned.test", "TXT", SPF_LOOPBACK)
    rsa_key("aligned.test")
    add("_dmarc.aligned.test", "TXT", "v=DMARC1; p=quarantine; rua=mailto:d@aligned.test")
    # DMARC: unaligned — SPF and DKIM both pass, but for spammer.test
    add("victim.test", "TXT", SPF_ELSEWHERE)
    add("_dmarc.victim.test", "TXT", "v=DMARC1; p=reject")
    add("spammer.test", "TXT", SPF_LOOPBACK)
    rsa_key("spammer.test")
    # DMARC: no record anywhere
    add("nodmarc.test", "TXT", SPF_LOOPBACK)
    # Forged Authentication-Results in a failing mail
    add("forged.test", "TXT", SPF_ELSEWHERE)
    add("_dmarc.forged.test", "TXT", "v=DMARC1; p=reject")
    rsa_key("forged.test")
    # ARC: a mailing list that rewrites the subject (breaking the author's
    # DKIM signature) and seals what it received
    rsa_key("author.test")
    add("author.test", "TXT", SPF_ELSEWHERE)
    add("_dmarc.author.test", "TXT", "v=DMARC1; p=reject")
    add("lists.test", "TXT", SPF_LOOPBACK)
    add("arc._domainkey.lists.test", "TXT", keys.rsa_record)
    # Slow and dead DNS: would pass everything if DNS answered in time
    for name in ("slow.test", "dead.test"):
        add(name, "TXT", SPF_LOOPBACK)
        add(f"_dmarc.{name}", "TXT", "v=DMARC1; p=reject")
        rsa_key(name)
    return zone


def message(from_: str, to: str, subject: str, body: bytes = b"Hello.\r\nYour code is 123456.\r\n",
            extra: bytes = b"") -> bytes:
    """A CRLF message as it goes over SMTP."""
    head = (f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {formatdate()}\r\nMessage-ID: {make_msgid(domain='sender.test')}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    return extra + head.encode() + body


def sign(raw: bytes, keys: Keys, domain: str, selector: str = "rsa") -> bytes:
    if selector == "ed":
        algorithm, key = b"ed25519-sha256", keys.ed_private
    else:
        algorithm, key = b"rsa-sha256", keys.rsa_private
    header = dkim.sign(raw, selector.encode(), domain.encode(), key, signature_algorithm=algorithm,
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return header + raw


def through_list(raw: bytes, keys: Keys, subject_tag: bytes = b"[list] ") -> bytes:
    """``raw`` as the mailing list lists.test passes it on: subject tagged (the
    author's DKIM signature breaks), its own Authentication-Results, and its
    ARC set over what it received."""
    relayed = raw.replace(b"\r\nSubject: ", b"\r\nSubject: " + subject_tag, 1)
    ar = b"Authentication-Results: lists.test; dkim=pass header.d=author.test; dmarc=pass\r\n"
    arc_set = dkim.arc_sign(ar + relayed, b"arc", b"lists.test", keys.rsa_private, b"lists.test")
    assert arc_set, "dkimpy made no ARC set"
    return b"".join(arc_set) + ar + relayed


# -- the cases ------------------------------------------------------------------------

def _cases(keys: Keys) -> dict[str, tuple[str, bytes]]:
    """name -> (envelope sender, bytes to send). The mailbox is <name>@example.test."""

    def msg(name: str, from_: str, **kw) -> bytes:
        return message(from_, f"{name}@{DOMAIN}", f"case {name}", **kw)

    tampered = sign(msg("dkim-tampered", "Tom <tom@tampered.test>",
                        body=b"Your code is 123456.\r\n"), keys, "tampered.test")
    assert tampered.count(b"123456") == 1
    tampered = tampered.replace(b"123456", b"999999")  # a relay changed the body after signing
    forged_headers = (
        f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=forged.test header.s=rsa;\r\n"
        f" spf=pass smtp.mailfrom=ceo@forged.test; dmarc=pass (p=reject) header.from=forged.test\r\n"
        f"Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.1;\r\n"
        f" envelope-from=<ceo@forged.test>; receiver={HOSTNAME}\r\n"
        f"ARC-Authentication-Results: i=1; {HOSTNAME}; dkim=pass; spf=pass; dmarc=pass\r\n"
    ).encode()
    return {
        "dkim-rsa": ("alice@rsa.test", sign(msg("dkim-rsa", "Alice <alice@rsa.test>"), keys, "rsa.test")),
        "dkim-ed25519": ("ed@ed.test", sign(msg("dkim-ed25519", "Ed <ed@ed.test>"), keys, "ed.test", "ed")),
        "dkim-tampered": ("tom@tampered.test", tampered),
        "spf-pass": ("p@spfpass.test", msg("spf-pass", "p@spfpass.test")),
        "spf-fail": ("f@spffail.test", msg("spf-fail", "f@spffail.test")),
        "spf-softfail": ("s@spfsoft.test", msg("spf-softfail", "s@spfsoft.test")),
        "spf-none": ("n@spfnone.test", msg("spf-none", "n@spfnone.test")),
        "dmarc-aligned": ("bounce@bounces.aligned.test",
                          sign(msg("dmarc-aligned", "News <news@aligned.test>"), keys, "aligned.test")),
        "dmarc-unaligned": ("bounce@spammer.test",
                            sign(msg("dmarc-unaligned", "CEO <ceo@victim.test>"), keys, "spammer.test")),
        "dmarc-none": ("x@nodmarc.test", msg("dmarc-none", "x@nodmarc.test")),
        "forged-results": ("ceo@forged.test",
                           msg("forged-results", "CEO <ceo@forged.test>", extra=forged_headers)),
        "arc-list": ("bounces@lists.test",
                     through_list(sign(msg("arc-list", "Ann <ann@author.test>"), keys, "author.test"), keys)),
        # the same, changed by someone after the list sealed it
        "arc-broken": ("bounces@lists.test",
                       through_list(sign(msg("arc-broken", "Ann <ann@author.test>"), keys, "author.test"),
                                    keys).replace(b"123456", b"999999")),
    }


# Which of the normal cases count as "authenticated" (DMARC pass, or DKIM pass
# for the From domain): what ?auth=pass must list; the others are ?auth=fail.
AUTHENTICATED = {"dkim-rsa", "dkim-ed25519", "dmarc-aligned"}


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def dns_server(keys):
    # A fixed port, so that stop() / start() in the dead-DNS test keeps the
    # address the running ingester was configured with.
    server = DNSTestServer(make_zone(keys), port=_free_port("127.0.0.1")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(dns_server):
    with running_service([DOMAIN], {
        "MTASIDECAR_DNS_SERVERS": f"127.0.0.1:{dns_server.port}",
        "MTASIDECAR_DNS_TIMEOUT": str(DNS_TIMEOUT),
        "MTASIDECAR_DNS_BUDGET": str(DNS_BUDGET),
        "MTASIDECAR_HOSTNAME": HOSTNAME,
    }, prefix="mtasidecar-auth-e2e-") as svc:
        yield svc


def send(service, sender: str, recipients: list[str], wire: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", service.smtp_port, local_hostname="client.test", timeout=30) as smtp:
        refused = smtp.sendmail(sender, recipients, wire)
    assert refused == {}


def detail_of(service, address: str, timeout: float = 30) -> dict:
    """The one message in `address`, as the API's detail shows it."""
    [summary] = service.wait_messages(address, 1, timeout=timeout)
    r = service.get(summary["url"])
    assert r.status == 200, r.body
    detail = r.json()
    assert detail["authenticated"] == summary["authenticated"]
    return detail


@pytest.fixture(scope="module")
def delivered(service, dns_server, keys) -> dict[str, dict]:
    """Send every normal case (to its own mailbox and to ALL); name -> API detail."""
    dns_server.delay = 0
    cases = _cases(keys)
    for name, (sender, wire) in cases.items():
        send(service, sender, [f"{name}@{DOMAIN}", ALL], wire)
    return {name: detail_of(service, f"{name}@{DOMAIN}") for name in cases}


def dkim_of(detail: dict) -> list[tuple]:
    return [(d["domain"], d["selector"], d["algorithm"], d["result"]) for d in detail["auth"]["dkim"]]


# -- DKIM ---------------------------------------------------------------------------

def test_rsa_signature_passes(delivered):
    d = delivered["dkim-rsa"]
    assert dkim_of(d) == [("rsa.test", "rsa", "rsa-sha256", "pass")]
    assert d["auth"]["spf"] == {"result": "pass", "domain": "rsa.test", "ip": "127.0.0.1",
                                "helo": "client.test"}
    assert d["auth"]["dmarc"] == {"result": "none", "policy": None, "from_domain": "rsa.test"}
    assert d["authenticated"] is True  # DKIM pass by the From domain


def test_ed25519_signature_passes(delivered):
    d = delivered["dkim-ed25519"]
    assert dkim_of(d) == [("ed.test", "ed", "ed25519-sha256", "pass")]
    assert d["auth"]["spf"]["result"] == "none"  # ed.test publishes no SPF record
    assert d["authenticated"] is True


def test_body_changed_after_signing_fails(delivered):
    d = delivered["dkim-tampered"]
    assert dkim_of(d) == [("tampered.test", "rsa", "rsa-sha256", "fail")]
    assert "999999" in d["text"]
    assert d["authenticated"] is False


# -- SPF ----------------------------------------------------------------------------

@pytest.mark.parametrize("case, result, domain", [
    ("spf-pass", "pass", "spfpass.test"),
    ("spf-fail", "fail", "spffail.test"),  # -all, 127.0.0.1 not listed
    ("spf-softfail", "softfail", "spfsoft.test"),  # ~all
    ("spf-none", "none", "spfnone.test"),  # a TXT record, but no SPF one
])
def test_spf(delivered, case, result, domain):
    d = delivered[case]
    assert d["auth"]["spf"] == {"result": result, "domain": domain, "ip": "127.0.0.1",
                                "helo": "client.test"}
    assert d["auth"]["dkim"] == []
    assert f"; spf={result} smtp.mailfrom=" in d["auth"]["authentication_results"]
    assert d["envelope"]["client_ip"] == "127.0.0.1"
    # SPF alone authenticates nobody: no DMARC record, no DKIM signature.
    assert d["auth"]["dmarc"]["result"] == "none"
    assert d["authenticated"] is False


# -- DMARC ----------------------------------------------------------------------------

def test_dmarc_aligned_pass_reports_policy(delivered):
    d = delivered["dmarc-aligned"]
    auth = d["auth"]
    assert auth["spf"]["result"] == "pass" and auth["spf"]["domain"] == "bounces.aligned.test"
    assert dkim_of(d) == [("aligned.test", "rsa", "rsa-sha256", "pass")]
    assert auth["dmarc"] == {"result": "pass", "policy": "quarantine", "from_domain": "aligned.test"}
    assert "dmarc=pass (p=quarantine) header.from=aligned.test" in auth["authentication_results"]
    assert d["authenticated"] is True


def test_dmarc_unaligned_fails_with_reject_policy(delivered):
    """SPF and DKIM both pass, but for spammer.test; the From domain is victim.test."""
    d = delivered["dmarc-unaligned"]
    auth = d["auth"]
    assert auth["spf"]["result"] == "pass" and auth["spf"]["domain"] == "spammer.test"
    assert dkim_of(d) == [("spammer.test", "rsa", "rsa-sha256", "pass")]
    assert auth["dmarc"] == {"result": "fail", "policy": "reject", "from_domain": "victim.test"}
    assert d["from"]["address"] == "ceo@victim.test"
    assert d["authenticated"] is False


def test_dmarc_without_record_is_none(delivered):
    d = delivered["dmarc-none"]
    assert d["auth"]["spf"]["result"] == "pass"
    assert d["auth"]["dmarc"] == {"result": "none", "policy": None, "from_domain": "nodmarc.test"}
    assert d["authenticated"] is False


# -- forged headers ---------------------------------------------------------------------

def test_forged_authentication_headers_change_nothing(delivered):
    d = delivered["forged-results"]
    auth = d["auth"]
    # The forged fields arrived and are stored as sent...
    names = [h["name"].lower() for h in d["headers"]]
    assert {"authentication-results", "received-spf", "arc-authentication-results"} <= set(names)
    # ...but the verdict is our own.
    assert auth["spf"]["result"] == "fail"
    assert auth["dkim"] == []
    assert auth["dmarc"] == {"result": "fail", "policy": "reject", "from_domain": "forged.test"}
    assert auth["authentication_results"].startswith(f"{HOSTNAME}; spf=fail smtp.mailfrom=ceo@forged.test; "
                                                     "dkim=none; dmarc=fail (p=reject)")
    assert d["authenticated"] is False


# -- ARC ----------------------------------------------------------------------------------

def test_arc_sealed_by_a_mailing_list_passes(delivered):
    """The list broke the author's signature and sealed what it got: ARC pass,
    reported beside (not instead of) DKIM fail and DMARC fail."""
    d = delivered["arc-list"]
    auth = d["auth"]
    assert d["subject"] == "[list] case arc-list"
    assert auth["arc"] == {"result": "pass", "sets": 1, "domain": "lists.test", "reason": None}
    assert dkim_of(d) == [("author.test", "rsa", "rsa-sha256", "fail")]
    assert auth["spf"]["result"] == "pass" and auth["spf"]["domain"] == "lists.test"
    assert auth["dmarc"] == {"result": "fail", "policy": "reject", "from_domain": "author.test"}
    assert auth["authentication_results"].endswith("; arc=pass (i=1)")
    assert d["authenticated"] is False


def test_arc_changed_after_sealing_fails(delivered):
    d = delivered["arc-broken"]
    arc = d["auth"]["arc"]
    assert (arc["result"], arc["sets"], arc["domain"]) == ("fail", 1, "lists.test")
    assert "ARC-Message-Signature" in arc["reason"]
    assert "999999" in d["text"]


def test_unsealed_mail_has_no_arc(delivered):
    d = delivered["dkim-rsa"]
    assert d["auth"]["arc"] == {"result": "none", "sets": 0, "domain": None, "reason": None}
    assert "; arc=" not in d["auth"]["authentication_results"]


# -- list filters -----------------------------------------------------------------------

def case_of(subject: str) -> str:
    return subject.removeprefix("[list] ").removeprefix("case ")  # arc-*: tagged by the list


def test_auth_list_filters(service, delivered):
    everything = service.wait_messages(ALL, len(delivered))
    subjects = {case_of(m["subject"]) for m in everything}
    assert subjects == set(delivered)
    passed = service.messages(ALL, auth="pass", limit=100)
    failed = service.messages(ALL, auth="fail", limit=100)
    assert {case_of(m["subject"]) for m in passed} == AUTHENTICATED
    assert {case_of(m["subject"]) for m in failed} == set(delivered) - AUTHENTICATED
    assert all(m["authenticated"] is True for m in passed)
    assert all(m["authenticated"] is False for m in failed)
    # The list item agrees with the per-mailbox copy of the same message.
    for m in everything:
        assert m["authenticated"] == delivered[case_of(m["subject"])]["authenticated"]
    bad = service.get(f"/api/v1/mailboxes/{ALL}/messages?auth=maybe")
    assert bad.status == 400


# -- DNS trouble: run last, they change the DNS server -----------------------------------

def _assert_all_temperror(d: dict, domain: str) -> None:
    auth = d["auth"]
    assert auth["spf"]["result"] == "temperror" and auth["spf"]["domain"] == domain
    assert dkim_of(d) == [(domain, "rsa", "rsa-sha256", "temperror")]
    assert auth["dmarc"] == {"result": "temperror", "policy": None, "from_domain": domain}
    assert d["authenticated"] is False
    assert d["text"].startswith("Hello.")  # stored whole, parsed as usual


def test_slow_dns_gives_temperror_and_the_message_is_stored(service, dns_server, keys, delivered):
    dns_server.delay = 5.0  # far beyond the 1.5 s budget
    try:
        wire = sign(message("Sam <sam@slow.test>", f"slow@{DOMAIN}", "slow dns"), keys, "slow.test")
        send(service, "sam@slow.test", [f"slow@{DOMAIN}"], wire)
        t0 = time.monotonic()  # Postfix has it
        d = detail_of(service, f"slow@{DOMAIN}", timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        dns_server.delay = 0
    _assert_all_temperror(d, "slow.test")
    # Bounded by the budget (plus delivery), not by the server's 5 s per query.
    assert elapsed < 5.0, elapsed


def test_dns_server_down_gives_temperror_and_the_message_is_stored(service, dns_server, keys, delivered):
    dns_server.stop()
    try:
        wire = sign(message("Dee <dee@dead.test>", f"dead@{DOMAIN}", "dead dns"), keys, "dead.test")
        send(service, "dee@dead.test", [f"dead@{DOMAIN}"], wire)
        d = detail_of(service, f"dead@{DOMAIN}", timeout=20)
    finally:
        dns_server.start()  # same port (fixed in the fixture)
    _assert_all_temperror(d, "dead.test")
    # And the server answers again, on the port the ingester knows.
    assert _txt(dns_server.port, "spfpass.test") == [SPF_LOOPBACK]


def _txt(port: int, name: str) -> list[str]:
    resolver = dns_resolver.Resolver(configure=False)
    resolver.nameservers = [dns_nameserver.Do53Nameserver("127.0.0.1", port)]
    answer = resolver.resolve(name, "TXT", lifetime=2)
    return [b"".join(r.strings).decode() for r in answer]
