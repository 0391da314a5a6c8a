"""The speed-ups of mail/auth.py: per-process caches of what is derived from DNS
answers (parsed DKIM keys, DMARC records, SPF results), the cache-only first
attempt, RSA through OpenSSL, and the faster header parsing. Each must give the
verdict the plain path gives, and must see a changed DNS record once its TTL
(here the resolver's short cache_ttl) has passed.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import time

import dkim
import dkim.crypto
import pytest
import spf
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mtasidecar.mail import auth as auth_module
from mtasidecar.mail import dmarc
from mtasidecar.mail.auth import Authenticator, CheckItem
from mtasidecar.mail.dnscache import CachingResolver
from tests.dnsserver import DNSTestServer
from tests.unit.test_auth import GOOD_IP, HOST, SPF_OURS, Keys, make_zone, message, sign

TTL = 0.3  # the resolver's cache_ttl in these tests: answers (and what is derived) live this long


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def other_keys() -> Keys:
    return Keys()


@pytest.fixture
def server(keys):
    """A server of its own per test: tests here change its records."""
    with DNSTestServer(make_zone(keys)) as srv:
        yield srv


@pytest.fixture
def auth(server):
    with Authenticator([server.address], hostname=HOST, timeout=1.0, budget=2.0,
                       cache_ttl=TTL, negative_ttl=TTL) as authenticator:
        yield authenticator


def replace_record(server: DNSTestServer, name: str, rtype: str, *values) -> None:
    records = {k: {t: list(v) for t, v in types.items()} for k, types in server.records.items()}
    records.setdefault(name, {})[rtype] = list(values)
    server.set_records(records)


def after_ttl() -> None:
    time.sleep(TTL + 0.15)


def verdict(result):
    return result.spf.result, [d.result for d in result.dkim], result.dmarc.result


# -- DKIM keys ------------------------------------------------------------------------------

def test_revoked_dkim_key_is_seen_after_ttl(auth, server, keys):
    raw = sign(message(), keys, "example.test")
    assert [d.result for d in auth.check(raw).dkim] == ["pass"]
    replace_record(server, "rsa._domainkey.example.test", "TXT", "v=DKIM1; k=rsa; p=")  # RFC 6376 3.6.1
    assert [d.result for d in auth.check(raw).dkim] == ["pass"]  # cached answer, within its TTL
    after_ttl()
    assert [d.result for d in auth.check(raw).dkim] == ["permerror"]


def test_replaced_dkim_key_is_seen_after_ttl(auth, server, keys, other_keys):
    raw = sign(message(), keys, "example.test")
    assert [d.result for d in auth.check(raw).dkim] == ["pass"]
    replace_record(server, "rsa._domainkey.example.test", "TXT", other_keys.rsa_record)
    after_ttl()
    assert [d.result for d in auth.check(raw).dkim] == ["fail"]
    replace_record(server, "rsa._domainkey.example.test", "TXT", keys.rsa_record)
    after_ttl()
    assert [d.result for d in auth.check(raw).dkim] == ["pass"]


def test_parsed_key_cache_is_keyed_on_the_record(keys, other_keys):
    one = auth_module._parsed_key(keys.rsa_record.encode())
    assert auth_module._parsed_key(keys.rsa_record.encode()) is one
    assert auth_module._parsed_key(other_keys.rsa_record.encode()) is not one
    assert auth_module._parsed_key(b"v=DKIM1; k=rsa; p=") is None
    assert auth_module._parsed_key(b"v=DKIM1; k=rsa; p=bm90IGEga2V5") is None
    assert auth_module._parsed_key(keys.ed_record.encode())[2] == b"ed25519"


# -- DMARC ----------------------------------------------------------------------------------

def test_changed_dmarc_record_is_seen_after_ttl(auth, server, keys):
    raw = message("Alice <alice@d3.test>")  # unsigned, SPF aligned
    first = auth.check(raw, "alice@d3.test", GOOD_IP, "h").dmarc
    assert (first.result, first.policy) == ("pass", "reject")
    replace_record(server, "_dmarc.d3.test", "TXT", "v=DMARC1; p=none")
    after_ttl()
    second = auth.check(raw, "alice@d3.test", GOOD_IP, "h").dmarc
    assert (second.result, second.policy) == ("pass", "none")
    replace_record(server, "_dmarc.d3.test", "TXT", "not dmarc")
    after_ttl()
    assert auth.check(raw, "alice@d3.test", GOOD_IP, "h").dmarc.result == "none"


def test_long_values_are_not_kept(keys):
    """Senders choose these values: a huge one must not be pinned in memory."""
    def size(function):
        return function.cache_info().currsize

    huge_key = keys.rsa_record.encode() + b"; n=" + b"x" * 5000
    before = size(auth_module._parsed_key)
    assert auth_module._usable_key([huge_key])[2] == b"rsa"
    assert size(auth_module._parsed_key) == before
    huge_dmarc = b"v=DMARC1; p=reject; rua=mailto:" + b"a" * 5000 + b"@x.test"
    before = size(dmarc._parse_record_cached)
    assert dmarc.parse_record(huge_dmarc).p == "reject"
    assert size(dmarc._parse_record_cached) == before
    before = size(auth_module._from_domains_of)
    assert auth_module._from_domains([(b"from", b" " * 5000 + b"a@big.test")]) == ["big.test"]
    assert size(auth_module._from_domains_of) == before


def test_parse_record_cache_returns_equal_records():
    txt = b"v=DMARC1; p=quarantine; sp=reject; adkim=s"
    assert dmarc.parse_record(txt) is dmarc.parse_record(txt)
    assert dmarc.parse_record(txt) == dmarc.DmarcRecord("quarantine", "reject", "s", "r")


# -- SPF results ----------------------------------------------------------------------------

@pytest.fixture
def spf_evaluations(monkeypatch):
    """How many times pyspf really evaluated."""
    count = []
    real = spf.query.check

    def check(self, *args, **kwargs):
        count.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(spf.query, "check", check)
    return count


def test_spf_result_is_reused_for_the_same_address_and_domain(auth, spf_evaluations):
    assert auth.check_spf("alice@example.test", GOOD_IP, "h1").result == "pass"
    # Another local part and HELO: the record has no macros, so the result is the same.
    assert auth.check_spf("bob@example.test", GOOD_IP, "h2").result == "pass"
    assert auth.check_spf("bob@example.test", "203.0.113.9", "h2").result == "fail"
    assert len(spf_evaluations) == 2


def test_changed_spf_record_is_seen_after_ttl(auth, server):
    assert auth.check_spf("alice@example.test", GOOD_IP, "h").result == "pass"
    replace_record(server, "example.test", "TXT", "v=spf1 -all")
    assert auth.check_spf("alice@example.test", GOOD_IP, "h").result == "pass"  # within the TTL
    after_ttl()
    assert auth.check_spf("alice@example.test", GOOD_IP, "h").result == "fail"


def test_spf_result_lives_only_as_long_as_its_shortest_lived_answer(server):
    """The included record was cached 0.6 s before the top one: the result
    expires with it, not a whole TTL after the evaluation."""
    replace_record(server, "inc.test", "TXT", "v=spf1 include:_spf.inc.test -all")
    replace_record(server, "_spf.inc.test", "TXT", SPF_OURS)
    with Authenticator([server.address], hostname=HOST, cache_ttl=1.0) as auth:
        started = time.monotonic()
        auth.dns.txt("_spf.inc.test")  # cached until started + 1.0
        time.sleep(0.6)
        assert auth.check_spf("a@inc.test", GOOD_IP, "h").result == "pass"  # inc.test: until +1.6
        replace_record(server, "_spf.inc.test", "TXT", "v=spf1 -all")
        time.sleep(max(started + 1.15 - time.monotonic(), 0))
        assert auth.check_spf("a@inc.test", GOOD_IP, "h").result == "fail"


def test_spf_temperror_is_never_cached(server):
    with Authenticator([server.address], hostname=HOST, timeout=0.3, budget=0.3,
                       cache_ttl=60, negative_ttl=60) as auth:
        server.delay = 1.0
        assert auth.check_spf("alice@example.test", GOOD_IP, "h").result == "temperror"
        server.delay = 0
        time.sleep(1.1)  # the late answer is dropped; nothing of the failure may stay
        assert auth.check_spf("alice@example.test", GOOD_IP, "h").result == "pass"
        assert len(auth._spf_results) == 1


def test_spf_results_with_macros_are_not_cached(auth, server, spf_evaluations):
    """%{l} makes the result depend on the local part, which is not in the cache key."""
    replace_record(server, "macro.test", "TXT", "v=spf1 exists:%{l}.allow.macro.test -all")
    replace_record(server, "alice.allow.macro.test", "A", "127.0.0.2")
    assert auth.check_spf("alice@macro.test", GOOD_IP, "h").result == "pass"
    assert auth.check_spf("bob@macro.test", GOOD_IP, "h").result == "fail"
    assert auth.check_spf("alice@macro.test", GOOD_IP, "h").result == "pass"
    assert len(spf_evaluations) == 3
    assert len(auth._spf_results) == 0


def test_spf_result_cache_is_bounded(auth, monkeypatch):
    monkeypatch.setattr(auth._spf_results, "max_entries", 8)
    for i in range(40):
        auth.check_spf("alice@example.test", f"192.0.2.{i + 1}", "h")
    assert len(auth._spf_results) <= 8
    assert auth.check_spf("alice@example.test", "192.0.2.40", "h").result == "pass"


# -- the cache-only first attempt -------------------------------------------------------------

def test_warm_check_many_needs_no_thread_and_no_query(auth, server, keys):
    items = [CheckItem(sign(message(f"u@d{i}.test"), keys, f"d{i}.test"), f"u@d{i}.test", GOOD_IP, "h")
             for i in range(5)]
    first = auth.check_many(items)
    assert auth._pools  # the cold batch went to the pool
    auth.close()
    seen = len(server.queries)
    again = auth.check_many(items)
    assert not auth._pools and len(server.queries) == seen
    assert [verdict(r) for r in again] == [verdict(r) for r in first] == [
        ("pass", ["pass"], "pass")] * 5


def test_partly_cached_message_gets_the_full_check(auth, server, keys):
    """SPF and DMARC cached, the DKIM key not: the message is checked again with DNS."""
    auth.check(message("a@example.test"), "a@example.test", GOOD_IP, "h")
    raw = sign(message("a@example.test"), keys, "example.test", "ed")
    items = [CheckItem(raw, "a@example.test", GOOD_IP, "h"), CheckItem(message(), None, None, None)]
    results = auth.check_many(items)
    assert verdict(results[0]) == ("pass", ["pass"], "pass")
    assert ("ed._domainkey.example.test", "TXT") in server.queries


def test_dns_trouble_during_the_full_check_is_temperror(server, keys):
    with Authenticator([server.address], hostname=HOST, timeout=0.3, budget=0.3) as auth:
        server.delay = 1.0
        results = auth.check_many([CheckItem(sign(message(), keys, "example.test"), "alice@example.test",
                                             GOOD_IP, "h")] * 2)
    assert [verdict(r) for r in results] == [("temperror", ["temperror"], "temperror")] * 2


# -- RSA through OpenSSL ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_key():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = private.public_key().public_numbers()
    plain = {"modulus": numbers.n, "publicExponent": numbers.e}
    return private, plain, auth_module._with_openssl(plain)


def _digest(name: str, data: bytes) -> dkim.HashThrough:
    h = dkim.HashThrough(getattr(__import__("hashlib"), name)())
    h.update(data)
    return h


@pytest.mark.parametrize("name, algorithm", [("sha256", hashes.SHA256()), ("sha1", hashes.SHA1())])
def test_openssl_rsa_gives_dkimpys_verdicts(rsa_key, name, algorithm):
    private, plain, ours = rsa_key
    assert isinstance(ours, auth_module._OpenSslRsaKey)
    size = (plain["modulus"].bit_length() + 7) // 8
    rng = random.Random(5)
    signatures, short = [], None
    for i in range(600):  # until one signature starts with a zero byte (p = 1/256 each)
        data = f"message {i}".encode()
        sig = private.sign(data, padding.PKCS1v15(), algorithm)
        signatures.append((data, sig))
        if sig[0] == 0:
            short = (data, sig.lstrip(b"\0"))
            break
    cases = [(data, sig) for data, sig in signatures[:5]]
    data, sig = signatures[0]
    value = int.from_bytes(sig, "big")
    cases += [
        (data + b"x", sig),  # another message
        (data, sig[:-1] + bytes([sig[-1] ^ 1])),  # a flipped bit
        (data, b"\0" + sig),  # longer, same number
        (data, (value + plain["modulus"]).to_bytes(size + 1, "big")),  # not below the modulus
        (data, b""),
        (data, bytes(rng.randrange(256) for _ in range(size))),
    ]
    if short is not None:
        cases.append(short)  # shorter than the modulus: dkimpy reads it as the same number
    for data, sig in cases:
        theirs = dkim.crypto.RSASSA_PKCS1_v1_5_verify(_digest(name, data), sig, plain)
        assert dkim.RSASSA_PKCS1_v1_5_verify(_digest(name, data), sig, ours) == theirs
    assert dkim.RSASSA_PKCS1_v1_5_verify(_digest(name, signatures[0][0]), signatures[0][1], ours)


def test_dkimpys_own_keys_still_take_its_own_path(rsa_key):
    private, plain, _ours = rsa_key
    sig = private.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    assert dkim.RSASSA_PKCS1_v1_5_verify(_digest("sha256", b"m"), sig, plain) is True
    assert getattr(dkim.RSASSA_PKCS1_v1_5_verify, "_mtasidecar", False)


# -- same verdicts as plain dkimpy ---------------------------------------------------------------

def _dkimpy_passes(raw: bytes, zone: dict) -> list[bool]:
    """Plain dkimpy, its own parse and key handling, for every signature."""
    def dnsfunc(name, timeout=5):
        values = zone.get(name.decode().rstrip(".").lower(), {}).get("TXT", [])
        return values[0].encode() if values else None

    try:
        d = dkim.DKIM(raw)
        count = len([1 for name, _ in d.headers if name.lower() == b"dkim-signature"])
    except Exception:  # noqa: BLE001
        return []
    out = []
    for idx in range(count):
        try:
            out.append(bool(d.verify(idx, dnsfunc=dnsfunc)))
        except Exception:  # noqa: BLE001
            out.append(False)
    return out


def test_dkim_verdicts_match_plain_dkimpy(auth, keys):
    """Damaged, re-ordered and odd header blocks: "pass" exactly when dkimpy says True."""
    zone = make_zone(keys)
    base = message(extra=b"Received: from x\r\nSubject: an older subject\r\n",
                   body=b"Hello  Bob.\r\n\r\n\r\n")
    relaxed = dkim.sign(base, b"rsa", b"example.test", keys.rsa_private, canonicalize=(b"relaxed", b"relaxed"),
                        include_headers=[b"from", b"subject", b"subject", b"to", b"date"])
    simple = dkim.sign(base, b"ed", b"example.test", keys.ed_private, signature_algorithm=b"ed25519-sha256",
                       canonicalize=(b"simple", b"simple"),
                       include_headers=[b"from", b"to", b"subject", b"message-id", b"x-absent"])
    signed = simple + relaxed + base
    rng = random.Random(6376)
    edits = [b"\r\n", b" ", b"\t", b"From: x@example.test\r\n", b"Subject: added\r\n", b"SUBJECT :y\r\n",
             b"X-Other: z\r\n", b"\r\n ", b"a", b";", b"="]
    tried = {"pass": 0, "not": 0}
    for _ in range(250):
        raw = bytearray(signed)
        head_end = raw.find(b"\r\n\r\n")
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(head_end + 40)
            if rng.random() < 0.4:
                del raw[at:at + rng.randint(1, 3)]
            else:
                raw[at:at] = rng.choice(edits)
        raw = bytes(raw)
        if rng.random() < 0.3:
            raw = raw.replace(b"\r\n", b"\n")
        ours = [d.result == "pass" for d in auth.check(raw).dkim]
        theirs = _dkimpy_passes(raw, zone)
        if theirs:
            assert ours == theirs, raw
        else:
            assert not any(ours), raw
        tried["pass" if any(ours) else "not"] += 1
    assert tried["pass"] > 20 and tried["not"] > 20


# -- faster parsing, same results ---------------------------------------------------------------

def test_split_head_matches_the_regex():
    pattern = re.compile(rb"\r?\n\r?\n")

    def reference(raw):
        if raw.startswith((b"\n", b"\r\n")):
            return b"", raw.split(b"\n", 1)[1]
        end = pattern.search(raw)
        return (raw[:end.start()], raw[end.end():]) if end else (raw, b"")

    for length in range(8):
        for parts in itertools.product([b"a", b"\r", b"\n"], repeat=length):
            raw = b"".join(parts)
            assert auth_module._split_head(raw) == reference(raw), raw


def test_header_parse_matches_dkimpy():
    rng = random.Random(822)
    pieces = [b"From: a@example.test", b"From a@x", b"Subject:x", b" folded", b"\tfolded", b"bad line",
              b"X-\xff: v", b"N:", b":empty name", b"", b"\r", b"a b: c"]
    for _ in range(2000):
        head = rng.choice([b"\n", b"\r\n"]).join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        try:
            theirs = dkim.rfc822_parse(head)[0]
        except Exception as exc:  # noqa: BLE001
            theirs = type(exc)
        try:
            ours = auth_module._rfc822_headers(head)
        except Exception as exc:  # noqa: BLE001
            ours = type(exc)
        assert ours == theirs, head


def test_clean_fast_path_matches_the_slow_one():
    for value in ["", "  a@b.test ", "mail.example.test", "a\tb", "x\x00y\x7f", "Ünïcode ", "\udcff x",
                  "a\u2028b", " ~!#$%&'*+-/=?^_`{|}\" "]:
        slow = auth_module._CONTROL.sub("", value.encode("utf-8", "replace").decode("utf-8")).strip()
        assert auth_module._clean(value) == slow
    assert auth_module._clean(None) == ""


def test_to_dict_matches_asdict(auth, keys):
    result = auth.check(sign(message(), keys, "example.test"), "alice@example.test", GOOD_IP, "h")
    assert result.to_dict() == {
        "spf": dataclasses.asdict(result.spf), "dkim": [dataclasses.asdict(d) for d in result.dkim],
        "dmarc": dataclasses.asdict(result.dmarc), "arc": dataclasses.asdict(result.arc),
        "authentication_results": result.authentication_results}


# -- the resolver's expiry and cache-only reads ---------------------------------------------------

def test_resolver_reports_expiry_and_peeks_without_querying(server):
    resolver = CachingResolver([server.address], max_ttl=TTL, negative_ttl=TTL)
    assert resolver.peek("example.test", "TXT") is None
    assert server.queries == []
    before = time.monotonic()
    values, expires = resolver.lookup_expiring("example.test", "TXT")
    assert values == ((SPF_OURS.encode(),),)
    assert before + TTL - 0.05 <= expires <= time.monotonic() + TTL
    assert resolver.peek("Example.Test.", "TXT") == (values, expires)
    assert resolver.lookup_expiring("nowhere.test", "TXT")[0] == ()
    assert resolver.peek("nowhere.test", "TXT")[0] == ()  # negative answers too
    after_ttl()
    assert resolver.peek("example.test", "TXT") is None
    assert len(server.queries) == 2
