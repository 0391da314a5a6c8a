"""SPF, DKIM and DMARC checks against a real DNS server on loopback.

Keys are made here; the zone is served by tests/dnsserver.py. Domains use the
.test TLD, which the public suffix list does not know: example.test is its own
organisational domain.
"""

from __future__ import annotations

import base64
import random
import threading
import time

import dkim
import nacl.signing
import pytest
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mtasidecar.mail import auth as auth_module
from mtasidecar.mail import dmarc
from mtasidecar.mail.auth import Authenticator, CheckItem
from mtasidecar.mail.dnscache import CachingResolver, DnsTempError
from tests.dnsserver import DNSTestServer

HOST = "ourhost"
GOOD_IP = "192.0.2.10"  # inside the SPF records of example.test & co.
OTHER_IP = "198.51.100.7"  # inside other.test's SPF record only
BAD_IP = "203.0.113.9"  # in nobody's SPF record
SPF_OURS = "v=spf1 ip4:192.0.2.0/24 -all"
N_BULK = 20  # domains d0.test ... d19.test for the concurrency test


# -- keys, zone, messages ---------------------------------------------------------

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
        self.ed_private = base64.b64encode(bytes(ed))  # dkimpy wants the base64 seed
        self.ed_record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(ed.verify_key)).decode()


def make_zone(keys: Keys) -> dict:
    zone = {
        "example.test": {"TXT": [SPF_OURS], "A": ["192.0.2.1"]},
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.test"]},
        "rsa._domainkey.example.test": {"TXT": [keys.rsa_record]},
        "ed._domainkey.example.test": {"TXT": [keys.ed_record]},
        "sub.example.test": {"TXT": [SPF_OURS]},  # no _dmarc.sub: falls back to example.test
        "mx.example.test": {"TXT": ["v=spf1 a -all"], "A": ["192.0.2.25"]},
        "soft.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ~all"]},
        "neutral.test": {"TXT": ["v=spf1 ?all"]},
        "nospf.test": {"A": ["192.0.2.2"], "TXT": ["not an spf record"]},
        "nodmarc.test": {"TXT": [SPF_OURS]},
        "other.test": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]},
        "rsa._domainkey.other.test": {"TXT": [keys.rsa_record]},
        "strict.test": {"TXT": [SPF_OURS]},
        "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=quarantine; adkim=s; aspf=s"]},
        "mail.strict.test": {"TXT": [SPF_OURS]},
        "rsa._domainkey.mail.strict.test": {"TXT": [keys.rsa_record]},
        "badkey._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=bm90IGEga2V5"]},
        # ARC sealers (forwarders, mailing lists)
        "arc._domainkey.fwd.test": {"TXT": [keys.rsa_record]},
        "arc._domainkey.list.test": {"TXT": [keys.rsa_record]},
    }
    for i in range(N_BULK):
        zone[f"d{i}.test"] = {"TXT": [SPF_OURS]}
        zone[f"_dmarc.d{i}.test"] = {"TXT": ["v=DMARC1; p=reject"]}
        zone[f"rsa._domainkey.d{i}.test"] = {"TXT": [keys.rsa_record]}
    return zone


def message(from_: str = "Alice <alice@example.test>", body: bytes = b"Hello Bob.\r\n",
            extra: bytes = b"") -> bytes:
    return (extra + b"From: " + from_.encode() + b"\r\nTo: bob@inbox.test\r\n"
            b"Subject: Your code is 123456\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"Message-ID: <1@example.test>\r\n\r\n" + body)


def sign(raw: bytes, keys: Keys, domain: str, selector: str = "rsa") -> bytes:
    if selector == "ed":
        algorithm, key = b"ed25519-sha256", keys.ed_private
    else:
        algorithm, key = b"rsa-sha256", keys.rsa_private
    header = dkim.sign(raw, selector.encode(), domain.encode(), key, signature_algorithm=algorithm,
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return header + raw


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def dns_server(keys):
    server = DNSTestServer(make_zone(keys)).start()
    yield server
    server.stop()


@pytest.fixture
def server(dns_server):
    """The module's server, reset: no delay, no recorded queries."""
    dns_server.delay = 0
    dns_server.queries.clear()
    yield dns_server
    dns_server.delay = 0


@pytest.fixture
def auth(server):
    with Authenticator([server.address], hostname=HOST, timeout=1.0, budget=2.0) as authenticator:
        yield authenticator


@pytest.fixture
def dead_server_address():
    """An address where a DNS server was and no longer answers."""
    server = DNSTestServer({}).start()
    server.stop()
    return server.address


# -- DKIM -------------------------------------------------------------------------------

def test_rsa_signature_passes(auth, keys):
    result = auth.check(sign(message(), keys, "example.test"), "alice@example.test", GOOD_IP, "h")
    assert [d.__dict__ for d in result.dkim] == [
        {"domain": "example.test", "selector": "rsa", "algorithm": "rsa-sha256", "result": "pass"}]


def test_ed25519_signature_passes(auth, keys):
    result = auth.check(sign(message(), keys, "example.test", "ed"), "alice@example.test", GOOD_IP, "h")
    assert [(d.selector, d.algorithm, d.result) for d in result.dkim] == [
        ("ed", "ed25519-sha256", "pass")]


def test_body_altered_after_signing_fails(auth, keys):
    raw = sign(message(body=b"Your code is 123456.\r\n"), keys, "example.test")
    raw = raw.replace(b"123456.", b"999999.")
    assert [d.result for d in auth.check(raw, None, None, None).dkim] == ["fail"]


def test_signed_header_altered_fails(auth, keys):
    raw = sign(message(), keys, "example.test", "ed").replace(b"Subject: Your", b"Subject: My")
    assert [d.result for d in auth.check(raw).dkim] == ["fail"]


def test_lf_line_endings_still_verify(auth, keys):
    """Postfix writes the Maildir file with LF line ends; the signature was made over CRLF."""
    raw = sign(message(body=b"line 1\r\nline 2\r\n\r\n"), keys, "example.test")
    assert [d.result for d in auth.check(raw.replace(b"\r\n", b"\n")).dkim] == ["pass"]


def test_two_signatures_give_two_entries(auth, keys):
    raw = sign(sign(message(), keys, "other.test"), keys, "example.test", "ed")
    result = auth.check(raw)
    assert [(d.domain, d.selector, d.algorithm, d.result) for d in result.dkim] == [
        ("example.test", "ed", "ed25519-sha256", "pass"),
        ("other.test", "rsa", "rsa-sha256", "pass"),
    ]
    assert result.authentication_results.count("dkim=pass") == 2


def test_key_missing_or_unusable_is_permerror(auth, keys):
    missing = sign(message(), keys, "example.test", "nokey")
    unusable = sign(message(), keys, "example.test", "badkey")
    assert [d.result for d in auth.check(missing).dkim] == ["permerror"]
    assert [d.result for d in auth.check(unusable).dkim] == ["permerror"]


def test_malformed_signature_is_neutral(auth):
    raw = message(extra=b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; garbage\r\n")
    assert [(d.domain, d.selector, d.result) for d in auth.check(raw).dkim] == [
        ("example.test", "rsa", "neutral")]


def test_unsigned_message_has_no_dkim_entries(auth):
    result = auth.check(message(), "alice@example.test", GOOD_IP, "h")
    assert result.dkim == ()
    assert "; dkim=none; " in result.authentication_results


@pytest.mark.parametrize("raw", [
    b"From: a@example.test\r\nSubject: x\r\n\r\nbody\r\nmore\r\n",
    b"From: a@example.test\nSubject: x\n\nbody\nmore\n",
    b"From: a@example.test\r\nSubject: x\n\r\nmixed\r\nends\nhere\r\r\n",
    b"From: a@example.test\r\nSubject: folded\r\n\tcontinued\r\n\r\n",
    b"From: a@example.test\r\nSubject: no body",
    b"\r\nno headers\r\n",
])
def test_fast_parse_matches_dkimpy(raw):
    ours = auth_module._dkim_verifier(raw)
    theirs = dkim.DKIM(raw)
    assert (ours.headers, ours.body) == (theirs.headers, theirs.body)


# -- SPF ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sender, ip, expected", [
    ("alice@example.test", GOOD_IP, "pass"),
    ("alice@example.test", BAD_IP, "fail"),
    ("alice@soft.test", BAD_IP, "softfail"),
    ("alice@neutral.test", BAD_IP, "neutral"),
    ("alice@nospf.test", GOOD_IP, "none"),
    ("alice@nowhere.test", GOOD_IP, "none"),  # NXDOMAIN
    ("alice@example.test", None, "none"),  # no client address: nothing to check
    ("alice@example.test", "list", "none"),  # not an address (pyspf would take it as a keyword)
])
def test_spf_results(auth, sender, ip, expected):
    result = auth.check(message(), sender, ip, "mail.example.test")
    assert result.spf.result == expected
    assert result.spf.domain == sender.split("@")[1]


def test_spf_helo_check_for_null_sender(auth):
    result = auth.check(message(), "", "192.0.2.25", "mx.example.test")
    assert result.spf.__dict__ == {"result": "pass", "domain": "mx.example.test",
                                   "ip": "192.0.2.25", "helo": "mx.example.test"}
    assert "spf=pass smtp.helo=mx.example.test" in result.authentication_results
    assert auth.check(message(), "<>", BAD_IP, "mx.example.test").spf.result == "fail"


def test_spf_ipv6_client(auth):
    result = auth.check(message(), "alice@example.test", "2001:DB8::1", "h")
    assert (result.spf.result, result.spf.ip) == ("fail", "2001:db8::1")


# -- DMARC --------------------------------------------------------------------------------

def test_dmarc_pass_via_aligned_spf(auth):
    result = auth.check(message(), "bounce@example.test", GOOD_IP, "h")
    assert result.dmarc.__dict__ == {"result": "pass", "policy": "reject", "from_domain": "example.test"}


def test_dmarc_pass_via_aligned_dkim_only(auth, keys):
    raw = sign(message(), keys, "example.test")
    result = auth.check(raw, "bounce@other.test", OTHER_IP, "h")
    assert result.spf.result == "pass"  # but other.test is not aligned with example.test
    assert result.dmarc.result == "pass"


def test_dmarc_unaligned_fails_with_policy(auth, keys):
    raw = sign(message(), keys, "other.test")
    result = auth.check(raw, "bounce@other.test", OTHER_IP, "h")
    assert (result.spf.result, result.dkim[0].result) == ("pass", "pass")
    assert result.dmarc.__dict__ == {"result": "fail", "policy": "reject", "from_domain": "example.test"}
    assert "dmarc=fail (p=reject) header.from=example.test" in result.authentication_results


def test_dmarc_no_record_is_none(auth):
    result = auth.check(message("x@nodmarc.test"), "x@nodmarc.test", GOOD_IP, "h")
    assert result.spf.result == "pass"
    assert result.dmarc.__dict__ == {"result": "none", "policy": None, "from_domain": "nodmarc.test"}


def test_dmarc_org_domain_fallback_uses_sp(auth, server):
    result = auth.check(message("x@sub.example.test"), "x@other.test", OTHER_IP, "h")
    assert result.dmarc.__dict__ == {"result": "fail", "policy": "quarantine",
                                     "from_domain": "sub.example.test"}
    assert ("_dmarc.sub.example.test", "TXT") in server.queries
    assert ("_dmarc.example.test", "TXT") in server.queries


def test_dmarc_relaxed_alignment_across_subdomain(auth, keys):
    raw = sign(message("x@sub.example.test"), keys, "example.test")
    result = auth.check(raw, "x@other.test", OTHER_IP, "h")
    assert (result.dmarc.result, result.dmarc.policy) == ("pass", "quarantine")


def test_dmarc_strict_alignment(auth, keys):
    raw = sign(message("x@strict.test"), keys, "mail.strict.test")
    result = auth.check(raw, "x@mail.strict.test", GOOD_IP, "h")
    assert result.spf.result == "pass" and result.dkim[0].result == "pass"
    assert (result.dmarc.result, result.dmarc.policy) == ("fail", "quarantine")


def test_dmarc_several_from_domains_is_permerror(auth):
    result = auth.check(message("a@example.test, b@other.test"), "a@example.test", GOOD_IP, "h")
    assert (result.dmarc.result, result.dmarc.from_domain) == ("permerror", "example.test")


def test_dmarc_without_from_is_none(auth):
    raw = b"To: bob@inbox.test\r\nSubject: no from\r\n\r\nbody\r\n"
    assert auth.check(raw, "a@example.test", GOOD_IP, "h").dmarc.__dict__ == {
        "result": "none", "policy": None, "from_domain": None}


@pytest.mark.parametrize("domain, org", [
    ("example.test", "example.test"),
    ("a.sub.example.test", "example.test"),
    ("Mail.Example.Test.", "example.test"),
    ("mail.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),
    ("test", "test"),
])
def test_org_domain(domain, org):
    assert dmarc.org_domain(domain) == org


@pytest.mark.parametrize("txt, expected", [
    (b"v=DMARC1; p=reject", dmarc.DmarcRecord("reject", "reject")),
    (b"v=DMARC1;p=Quarantine;sp=none;adkim=s;aspf=s", dmarc.DmarcRecord("quarantine", "none", "s", "s")),
    (b"v=DMARC1; p=bogus; rua=mailto:x@example.test", dmarc.DmarcRecord("none", "none")),
    (b"v=DMARC1; p=reject; sp=bogus; adkim=x", dmarc.DmarcRecord("reject", "reject")),
    (b"v=DMARC1; rua=mailto:x@example.test", dmarc.DmarcRecord("none", "none")),
    (b"v=DMARC1; p=bogus", None),
    (b"v=DMARC1", None),
    (b"p=reject; v=DMARC1", None),
    (b"v=spf1 -all", None),
])
def test_parse_record(txt, expected):
    assert dmarc.parse_record(txt) == expected


def test_discover_rules():
    zone = {"_dmarc.two.test": [b"v=DMARC1; p=reject", b"v=DMARC1; p=none"],
            "_dmarc.a.org.test": [b"some other text"],
            "_dmarc.org.test": [b"v=DMARC1; p=none; sp=reject"]}
    lookup = lambda name: zone.get(name, [])  # noqa: E731
    assert dmarc.discover("two.test", lookup) == (None, False)  # two records: no policy
    assert dmarc.discover("a.org.test", lookup) == (dmarc.DmarcRecord("none", "reject"), True)
    assert dmarc.discover("org.test", lookup) == (dmarc.DmarcRecord("none", "reject"), False)


def test_dmarc_temperror_only_for_aligned_identifiers():
    lookup = lambda name: [b"v=DMARC1; p=reject"]  # noqa: E731
    assert dmarc.evaluate("example.test", lookup, "temperror", "example.test", []) == (
        "temperror", "reject")
    assert dmarc.evaluate("example.test", lookup, "temperror", "other.test", []) == ("fail", "reject")
    assert dmarc.evaluate("example.test", lookup, "fail", "x", [("example.test", "temperror")]) == (
        "temperror", "reject")


# -- output -------------------------------------------------------------------------------

def test_to_dict_shape(auth, keys):
    result = auth.check(sign(message(), keys, "example.test"), "alice@example.test", GOOD_IP,
                        "mail.example.test")
    assert result.to_dict() == {
        "spf": {"result": "pass", "domain": "example.test", "ip": GOOD_IP, "helo": "mail.example.test"},
        "dkim": [{"domain": "example.test", "selector": "rsa", "algorithm": "rsa-sha256",
                  "result": "pass"}],
        "dmarc": {"result": "pass", "policy": "reject", "from_domain": "example.test"},
        "arc": {"result": "none", "sets": 0, "domain": None, "reason": None},
        "authentication_results": (
            "ourhost; spf=pass smtp.mailfrom=alice@example.test; "
            "dkim=pass header.d=example.test header.s=rsa header.a=rsa-sha256; "
            "dmarc=pass (p=reject) header.from=example.test"),
    }


def test_header_values_cannot_inject(auth):
    result = auth.check(message(), 'we"ird\r\nX-Evil: 1@example.test', GOOD_IP,
                        "evil\r\nX-Injected: yes")
    header = result.authentication_results
    assert "\r" not in header and "\n" not in header
    assert 'smtp.mailfrom="we\\"irdX-Evil: 1@example.test"' in header
    assert result.spf.helo == "evilX-Injected: yes"
    undecodable = auth.check(message(), "a\udcff@example.test", GOOD_IP, "h\udcfe")
    undecodable.authentication_results.encode("utf-8")  # no lone surrogates left


def test_forged_results_in_message_are_ignored(auth):
    forged = (b"Authentication-Results: ourhost; dkim=pass spf=pass dmarc=pass\r\n"
              b"Received-SPF: pass (ourhost: domain of example.test designates it) client-ip=203.0.113.9\r\n"
              b"ARC-Authentication-Results: i=1; ourhost; dkim=pass spf=pass dmarc=pass\r\n"
              b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.test; s=rsa; b=AAAA\r\n")
    result = auth.check(message(extra=forged), "alice@example.test", BAD_IP, "h")
    assert result.spf.result == "fail"
    assert result.dkim == ()
    assert (result.dmarc.result, result.dmarc.policy) == ("fail", "reject")
    assert (result.arc.result, result.arc.sets) == ("fail", 1)  # claims are not a chain
    assert "=pass" not in result.authentication_results


@pytest.mark.parametrize("raw", [
    b"", b"\x00\xff\xfe garbage", b"no header at all", b" continuation first\r\n\r\n",
    b"From: a@example.test\r\nbad header line\r\nDKIM-Signature: v=1; d=example.test; s=rsa\r\n\r\nx",
    b"From: \xff\xfe@\xff.test\r\n\r\n", b"From: <>\r\n\r\n", b"From: a@[192.0.2.1]\r\n\r\n",
    b"From: a@" + b"x" * 300 + b".test\r\n\r\n",
])
def test_odd_input_never_raises(auth, raw):
    result = auth.check(raw, "a@example.test", GOOD_IP, "h")
    assert result.spf.result == "pass"
    assert result.to_dict()["authentication_results"].startswith("ourhost; ")


def test_mangled_messages_never_raise(auth, keys):
    """Random damage to a signed message: a verdict every time, never an exception."""
    rng = random.Random(8601)
    signed = sign(sign(message(), keys, "example.test"), keys, "other.test", "ed")
    alphabet = b"\r\n\t :;=@<>\"\\,.\x00\xff" + bytes(range(0x20, 0x7f))
    for _ in range(300):
        raw = bytearray(signed)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(raw))
            if rng.random() < 0.5:
                raw[at:at + rng.randint(0, 20)] = b""
            else:
                raw[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        result = auth.check(bytes(raw), "alice@example.test", GOOD_IP, "h")
        assert result.spf.result == "pass"
        assert all(d.result in {"pass", "fail", "neutral", "permerror", "temperror"}
                   for d in result.dkim)
        assert result.dmarc.result in {"pass", "fail", "none", "permerror", "temperror"}


def test_odd_input_signature_on_unparseable_headers_is_neutral(auth):
    raw = b"From: a@example.test\r\nbad header line\r\nDKIM-Signature: v=1; d=example.test; s=rsa\r\n\r\nx"
    assert [(d.domain, d.result) for d in auth.check(raw).dkim] == [("example.test", "neutral")]


# -- ARC -------------------------------------------------------------------------------

def seal(raw: bytes, keys: Keys, domain: str, selector: str = "arc", results: bytes = b"dkim=pass") -> bytes:
    """``raw`` as a forwarder ``domain`` passes it on: its Authentication-Results,
    then the ARC set dkimpy makes over them (the next instance; cv= is the
    arc= result in ``results``, what this hop found the chain to be;
    rsa-sha256, the one algorithm RFC 8617 defines)."""
    ar = b"Authentication-Results: " + domain.encode() + b"; " + results + b"\r\n"
    arc_set = dkim.arc_sign(ar + raw, selector.encode(), domain.encode(), keys.rsa_private, domain.encode())
    assert arc_set, "dkimpy made no ARC set"
    return b"".join(arc_set) + ar + raw


def test_arc_chain_of_one_forwarder_passes(auth, keys):
    raw = seal(sign(message(), keys, "example.test"), keys, "fwd.test")
    result = auth.check(raw, "alice@example.test", GOOD_IP, "h")
    assert result.arc == auth_module.ArcResult("pass", 1, "fwd.test", None)
    assert result.authentication_results.endswith("; arc=pass (i=1)")
    assert result.to_dict()["arc"] == {"result": "pass", "sets": 1, "domain": "fwd.test", "reason": None}


def test_arc_chain_of_two_passes(auth, keys):
    """A mailing list seals what a forwarder sealed: i=2, cv=pass."""
    raw = seal(seal(sign(message(), keys, "example.test"), keys, "fwd.test"), keys, "list.test",
               results=b"dkim=pass; arc=pass")
    assert b"i=2; cv=pass" in raw
    result = auth.check(raw)
    assert result.arc == auth_module.ArcResult("pass", 2, "list.test", None)


def test_arc_changed_after_sealing_fails_and_dkim_is_judged_alone(auth, keys):
    """A list changed the subject (breaking DKIM) and then sealed: ARC passes; a
    change after the seal fails ARC. Neither changes the DKIM or DMARC verdicts."""
    original = sign(message(), keys, "example.test")
    relayed = seal(original.replace(b"Subject: Your code", b"Subject: [list] Your code"), keys, "fwd.test")
    result = auth.check(relayed)
    assert (result.arc.result, [d.result for d in result.dkim]) == ("pass", ["fail"])
    assert result.dmarc.result == "fail"  # an ARC pass vouches; it authenticates nobody
    broken = auth.check(relayed.replace(b"Hello Bob", b"Hello Eve"))
    assert (broken.arc.result, broken.arc.sets, broken.arc.domain) == ("fail", 1, "fwd.test")
    assert "ARC-Message-Signature" in broken.arc.reason
    assert broken.authentication_results.endswith("; arc=fail (i=1)")


def test_arc_seal_by_unknown_key_or_cv_fail_fails(auth, keys):
    unknown = seal(sign(message(), keys, "example.test"), keys, "fwd.test", selector="nokey")
    assert auth.check(unknown).arc.result == "fail"
    # cv=fail recorded by the last hop ends the chain (RFC 8617 5.2): fail, whatever verifies
    broken = seal(sign(message(), keys, "example.test"), keys, "fwd.test").replace(b"Hello Bob", b"Hello Eve")
    resealed = seal(broken, keys, "list.test", results=b"dkim=fail; arc=fail")
    assert b"i=2; cv=fail" in resealed
    assert auth.check(resealed).arc.result == "fail"


def test_arc_seal_in_a_header_block_dkimpy_refuses_fails(auth):
    raw = message(extra=b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=fwd.test; s=arc; b=AAAA\r\n"
                        b"not a header line\r\n")
    result = auth.check(raw)
    assert result.arc == auth_module.ArcResult("fail", 0, None, "the header block cannot be parsed")
    assert result.authentication_results.endswith("; arc=fail")


def test_mangled_arc_chains_never_raise(auth, keys):
    """Random damage to a sealed message: an ARC verdict every time, never an exception."""
    rng = random.Random(8617)
    sealed = seal(seal(sign(message(), keys, "example.test"), keys, "fwd.test"), keys, "list.test",
                  results=b"dkim=pass; arc=pass")
    head_end = sealed.index(b"\r\n\r\n")
    alphabet = b"\r\n\t :;=@<>\"\\,.\x00\xff" + bytes(range(0x20, 0x7f))
    seen = set()
    for _ in range(300):
        raw = bytearray(sealed)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(head_end)  # the ARC fields are in the header block
            if rng.random() < 0.5:
                raw[at:at + rng.randint(0, 20)] = b""
            else:
                raw[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        result = auth.check(bytes(raw), "alice@example.test", GOOD_IP, "h")
        assert result.arc.result in {"pass", "fail", "none"}
        assert result.spf.result == "pass"
        seen.add(result.arc.result)
    assert {"pass", "fail"} <= seen  # some damage misses what the seals cover


def test_arc_with_too_many_sets_fails_unverified(auth, server, keys):
    fake_sets = b"".join(
        b"ARC-Seal: i=%d; a=rsa-sha256; cv=pass; d=fwd.test; s=arc%d; b=AAAA\r\n"
        b"ARC-Message-Signature: i=%d; a=rsa-sha256; d=fwd.test; s=arc%d; h=from; bh=AAAA; b=AAAA\r\n"
        b"ARC-Authentication-Results: i=%d; fwd.test; dkim=pass\r\n" % (i, i, i, i, i)
        for i in range(1, auth_module.MAX_ARC_SETS + 2))
    result = auth.check(message(extra=fake_sets))
    assert result.arc == auth_module.ArcResult("fail", auth_module.MAX_ARC_SETS + 1, "fwd.test",
                                               f"more than {auth_module.MAX_ARC_SETS} ARC sets")
    assert not any("_domainkey.fwd.test" in name for name, _type in server.queries)


def test_arc_key_lookup_failing_is_temperror(keys, dead_server_address):
    raw = seal(message(), keys, "fwd.test")
    with Authenticator([dead_server_address], hostname=HOST, timeout=0.3, budget=0.5) as auth:
        result = auth.check(raw)
    assert (result.arc.result, result.arc.sets, result.arc.domain) == ("temperror", 1, "fwd.test")
    assert result.authentication_results.endswith("; arc=temperror (i=1)")


def test_arc_seals_of_a_batch_are_looked_up_concurrently(server, keys):
    """check_many: a sealed message with a cold cache takes its keys through the
    same DNS path as DKIM's, and a later one is answered from the cache."""
    raw = seal(sign(message(), keys, "example.test"), keys, "fwd.test")
    with Authenticator([server.address], hostname=HOST, timeout=1.0, budget=2.0) as auth:
        first = auth.check_many([(raw, "alice@example.test", GOOD_IP, "h")] * 3)
        server.queries.clear()
        again = auth.check(raw, "alice@example.test", GOOD_IP, "h")
    assert [r.arc.result for r in first] == ["pass"] * 3
    assert again.arc.result == "pass" and server.queries == []


# -- DNS trouble, time budget ---------------------------------------------------------------

def test_dns_server_stopped_gives_temperror_within_budget(keys, dead_server_address):
    raw = sign(message(), keys, "example.test")
    with Authenticator([dead_server_address], hostname=HOST, timeout=1.0, budget=1.0) as auth:
        started = time.monotonic()
        result = auth.check(raw, "alice@example.test", GOOD_IP, "h")
        elapsed = time.monotonic() - started
    assert result.spf.result == "temperror"
    assert [d.result for d in result.dkim] == ["temperror"]
    assert result.dmarc.result == "temperror"
    assert elapsed < 1.0 + 0.5


def test_slow_dns_gives_temperror_within_budget(server, keys):
    raw = sign(message(), keys, "example.test")
    server.delay = 5.0
    with Authenticator([server.address], hostname=HOST, timeout=3.0, budget=1.0) as auth:
        started = time.monotonic()
        result = auth.check(raw, "alice@example.test", GOOD_IP, "h")
        elapsed = time.monotonic() - started
    assert (result.spf.result, result.dkim[0].result, result.dmarc.result) == (
        "temperror", "temperror", "temperror")
    assert "spf=temperror" in result.authentication_results
    assert elapsed < 1.0 + 0.5


def test_check_many_overlaps_dns_waits(server, keys):
    """Each message needs 3 sequential look-ups (SPF, DKIM key, DMARC) of 0.2 s
    each, on its own domain: 12 s one after the other."""
    items = [CheckItem(sign(message(f"u@d{i}.test"), keys, f"d{i}.test"), f"u@d{i}.test", GOOD_IP, "h")
             for i in range(N_BULK)]
    server.delay = 0.2
    with Authenticator([server.address], hostname=HOST, timeout=2.0, budget=5.0) as auth:
        started = time.monotonic()
        results = auth.check_many(items)
        elapsed = time.monotonic() - started
    assert [(r.spf.result, r.dkim[0].result, r.dmarc.result) for r in results] == [
        ("pass", "pass", "pass")] * N_BULK
    assert [r.dmarc.from_domain for r in results] == [f"d{i}.test" for i in range(N_BULK)]
    assert elapsed < 2.0


def test_one_cold_message_waits_about_one_round_trip(server, keys):
    """The DKIM key and DMARC record are fetched while SPF runs: 3 look-ups of
    0.3 s each take ~0.3 s, not 0.9 s."""
    raw = sign(message(), keys, "example.test")
    server.delay = 0.3
    with Authenticator([server.address], hostname=HOST, timeout=2.0, budget=5.0) as auth:
        started = time.monotonic()
        result = auth.check(raw, "alice@example.test", GOOD_IP, "h")
        elapsed = time.monotonic() - started
    assert (result.spf.result, result.dkim[0].result, result.dmarc.result) == ("pass", "pass", "pass")
    assert elapsed < 0.75


def test_authenticators_do_not_share_dns(server, keys, dead_server_address):
    """pyspf's DNS hook is per call: a dead server of one Authenticator must not
    leak into another's checks running at the same time."""
    raw = sign(message(), keys, "example.test")
    good = Authenticator([server.address], hostname=HOST, budget=2.0)
    bad = Authenticator([dead_server_address], hostname=HOST, timeout=0.5, budget=0.5)
    results = {}

    def run(name, authenticator):
        results[name] = authenticator.check(raw, "alice@example.test", GOOD_IP, "h")

    threads = [threading.Thread(target=run, args=("bad", bad)),
               threading.Thread(target=run, args=("good", good))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["good"].spf.result == "pass" and results["good"].dmarc.result == "pass"
    assert results["bad"].spf.result == "temperror"
    # Outside a check, pyspf's own resolver is used again.
    assert auth_module._SPF_LOOKUP.get() is None
    assert getattr(spf.DNSLookup, "_mtasidecar", False)


# -- the resolver ---------------------------------------------------------------------------

def test_cache_serves_positive_and_negative_answers(auth, server, keys):
    raw = sign(message(), keys, "example.test")
    auth.check(raw, "alice@example.test", GOOD_IP, "h")
    auth.check(message("x@nowhere.test"), "x@nowhere.test", GOOD_IP, "h")
    seen = len(server.queries)
    assert ("_dmarc.nowhere.test", "TXT") in server.queries  # NXDOMAIN
    auth.check(raw, "alice@example.test", GOOD_IP, "h")
    auth.check(message("x@nowhere.test"), "x@nowhere.test", GOOD_IP, "h")
    assert len(server.queries) == seen


def test_cache_entries_expire(server):
    resolver = CachingResolver([server.address], max_ttl=0.2, negative_ttl=0.2)
    for _ in range(2):
        assert resolver.txt("example.test") == [SPF_OURS.encode()]
        assert resolver.txt("nowhere.test") == []
    time.sleep(0.3)
    resolver.txt("example.test")
    resolver.txt("nowhere.test")
    assert server.queries == [("example.test", "TXT"), ("nowhere.test", "TXT")] * 2


def test_concurrent_lookups_share_one_query(server):
    resolver = CachingResolver([server.address])
    server.delay = 0.3
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(resolver.txt("Example.Test.")))
               for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [[SPF_OURS.encode()]] * 10
    assert server.queries == [("example.test", "TXT")]


def test_long_txt_records_are_joined(server):
    server.add_record("long.test", "TXT", "x" * 600)
    resolver = CachingResolver([server.address])
    assert [len(strings) for strings in resolver.lookup("long.test", "TXT")] == [3]
    assert resolver.txt("long.test") == [b"x" * 600]


def test_resolver_raises_only_dns_temp_error(dead_server_address):
    resolver = CachingResolver([dead_server_address], timeout=0.3)
    with pytest.raises(DnsTempError):
        resolver.lookup("example.test", "A")
    with pytest.raises(DnsTempError):  # budget already spent: no query at all
        resolver.lookup("example.test", "A", deadline=time.monotonic() - 1)
    # Not valid names (from message data): no records, no query, no error.
    assert resolver.lookup("a" * 70 + ".test", "A") == ()
    assert resolver.lookup("s\ufffd._domainkey.example.test", "TXT") == ()


def test_system_resolver_is_the_default():
    resolver = CachingResolver(None)
    assert resolver._resolver.nameservers  # read from /etc/resolv.conf, nothing sent


def test_cache_size_is_bounded(server):
    resolver = CachingResolver([server.address], max_entries=4)
    for name in ["example.test", "soft.test", "neutral.test", "nospf.test", "other.test", "strict.test"]:
        resolver.txt(name)
    assert len(resolver._cache) <= 4
    assert resolver.txt("strict.test") == [SPF_OURS.encode()]  # the newest survived
    assert resolver.cached("strict.test", "TXT")
