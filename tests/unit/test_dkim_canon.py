"""mail/auth.py's replacements of dkimpy helpers (_install_fast_dkim_helpers):
canonicalization, tag parsing, header selection and RE_BTAG. Each must give
exactly what dkimpy's own gives, on fuzzed input and end to end (dkimpy signing
and verifying with and without them)."""

from __future__ import annotations

import base64
import contextlib
import random

import dkim
import dkim.canonicalization as canon
import dkim.util
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mtasidecar.mail import auth as auth_module

PATCHES = auth_module._DKIM_PATCHES
ORIGINAL = auth_module._DKIMPY  # dkimpy's own, saved by the install function


@contextlib.contextmanager
def dkimpy_only():
    """dkimpy as shipped, for the duration of the block."""
    for module, name, _ours in PATCHES:
        setattr(module, name, ORIGINAL[name])
    try:
        yield
    finally:
        for module, name, ours in PATCHES:
            setattr(module, name, ours)


def test_installed_once_and_originals_are_dkimpys():
    auth_module._install_fast_dkim_helpers()  # again: idempotent
    for module, name, ours in PATCHES:
        assert getattr(module, name) is ours
        original = ORIGINAL[name]
        assert original is not ours
        if callable(original):
            assert original.__module__ in ("dkim", "dkim.canonicalization", "dkim.util"), name
    # dkimpy's RE_BTAG is built from its FWS (obs-FWS) pattern; ours is not.
    assert dkim.FWS in ORIGINAL["RE_BTAG"].pattern
    assert dkim.FWS not in dkim.RE_BTAG.pattern


# -- fuzzed comparisons ----------------------------------------------------------

WSP_HEAVY = [b" ", b" ", b"  ", b"\t", b"\t ", b" \t", b"\r", b"\n", b"\r\n", b"\r\n",
             b" \r\n", b"\t\r\n", b"\r\r\n", b"\n\r", b"a", b"Z", b"x y", b":", b";",
             b"=", b"\x0b", b"\x0c", b"\x00", b"\xff", b"\xc3\xa9"]


def fuzz_inputs(seed: int, count: int, alphabet=WSP_HEAVY) -> list[bytes]:
    rng = random.Random(seed)
    cases = [b"", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" \r\n", b"\t\r\n",
             b"  \t \r\n", b"a \r\n", b"a\t\r\nb  \r\n\r\n", b"\r\r\n", b"\n\n",
             b" " * 500, b"\t" * 300 + b"\r\n", b"a" * 1000, b"x \r\n" * 200]
    for _ in range(count):
        n = rng.choice((1, 2, 3, 5, 10, 30, 100, 1000))
        cases.append(b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, n))))
    # Only whitespace and line ends, and long runs of one token.
    for _ in range(count // 10):
        cases.append(b"".join(rng.choice([b" ", b"\t", b"\r", b"\n", b"\r\n"])
                              for _ in range(rng.randint(1, 50))))
        cases.append(rng.choice(WSP_HEAVY) * rng.randint(1, 400) + rng.choice(WSP_HEAVY))
    return cases


CANON_CASES = fuzz_inputs(seed=6376, count=4000)


@pytest.mark.parametrize("name", ["strip_trailing_whitespace", "compress_whitespace",
                                  "unfold_header_value"])
def test_canonicalization_functions_match_dkimpy(name):
    ours, theirs = getattr(canon, name), ORIGINAL[name]
    assert ours is not theirs
    changed = 0
    for case in CANON_CASES:
        expected = theirs(case)
        assert ours(case) == expected, (name, case)
        changed += expected != case
    # The fuzz reaches the slow paths as well as the fast ones.
    assert 100 < changed < len(CANON_CASES) - 100


def test_canonicalize_body_and_headers_match_dkimpy():
    rng = random.Random(8601)
    headers = [[(rng.choice([b"Subject", b"FROM ", b"x-a\t", b"To"]), case)
                for case in rng.sample(CANON_CASES, rng.randint(0, 6))] for _ in range(400)]

    def everything():
        return ([canon.Relaxed.canonicalize_body(c) for c in CANON_CASES],
                [canon.Simple.canonicalize_body(c) for c in CANON_CASES],
                [canon.Relaxed.canonicalize_headers(h) for h in headers],
                [canon.Simple.canonicalize_headers(h) for h in headers])

    with dkimpy_only():
        expected = everything()
    assert everything() == expected


def _outcome(func, *args):
    try:
        return "ok", func(*args)
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return type(exc), exc.args


def test_parse_tag_value_matches_dkimpy():
    alphabet = [b"a", b"B", b"v", b"1", b"_", b"=", b"=", b";", b";", b" ", b"\t", b"\r\n",
                b"\n", b"\xc3\xa9", b"-", b"h", b"bh", b"z9"]
    cases = fuzz_inputs(seed=6, count=4000, alphabet=alphabet) + [
        b"v=1; a=rsa-sha256; d=example.com; s=sel; b=abc;",
        b" v = 1 ;; ", b"v=1;v=2", b"=x", b"1a=b", b"_a=b", b"a", b";", b"a=b;;",
        b"\xc3\xa9=1", b"a=b=c", b"k=rsa; p=MIGf", b" ;", b"\x0bk=v\x0c"]
    # Tag lists as signers write them, with odd names and white space, and repeats.
    rng = random.Random(7)
    ws = [b"", b"", b" ", b"\t", b"\r\n ", b"\x0c"]
    names = [b"v", b"a", b"bh", b"b", b"x_1", b"1x", b"_x", b"", b"\xc3\xa9", b"k v"]
    for _ in range(2000):
        specs = [rng.choice(ws) + rng.choice(names) + rng.choice(ws) + rng.choice([b"=", b"=", b""])
                 + rng.choice(ws) + rng.choice([b"", b"1", b"a b", b"x=y"]) + rng.choice(ws)
                 for _ in range(rng.randint(0, 5))]
        cases.append(b";".join(specs) + rng.choice([b"", b";", b"; ", b";;"]))
    outcomes = {"ok": 0, dkim.util.InvalidTagSpec: 0, dkim.util.DuplicateTag: 0}
    for case in cases:
        expected = _outcome(ORIGINAL["parse_tag_value"], case)
        assert _outcome(dkim.parse_tag_value, case) == expected, case
        outcomes[expected[0]] += 1
    assert all(n > 20 for n in outcomes.values()), outcomes


def test_select_headers_matches_dkimpy():
    rng = random.Random(5322)
    names = [b"From", b"from", b"FROM", b"To", b"subject", b"Subject", b"x", b"Date"]
    for _ in range(3000):
        headers = [(rng.choice(names), b"v%d" % i) for i in range(rng.randint(0, 10))]
        include = [rng.choice(names).lower() for _ in range(rng.randint(0, 10))]
        expected = ORIGINAL["select_headers"](headers, include)
        got = dkim.select_headers(headers, include)
        assert got == expected
        assert [id(x) for x in got] == [id(x) for x in expected]


BTAG_TOKENS = [b"b=", b"b =", b";b=", b"; b=", b" b\r\n =", b"\tb=\r\n ", b"bh=", b"b",
               b"=", b";", b" ", b"\t", b"\r\n ", b"\r\n", b"\n", b"\r", b"\r\n\t ",
               b"abc", b"Q", b"+/", b"==", b"0", b"-", b".", b"\xff", b"x=y"]


def test_re_btag_matches_dkimpy():
    rng = random.Random(4871)
    cases = [b" v=1; a=rsa-sha256; b=abc\r\n def=\r\n", b"b=x", b" b=", b";b=\r\n",
             b" h=from : to; bh=AAAA; b=AB\r\n CD \r\n\tEF==\r\n"]
    for _ in range(6000):
        n = rng.randint(0, rng.choice((4, 10, 40)))
        cases.append(b"".join(rng.choice(BTAG_TOKENS) for _ in range(n)))
    theirs, ours = ORIGINAL["RE_BTAG"], dkim.RE_BTAG
    matched = 0
    for case in cases:
        assert ours.sub(b"\\1", case) == theirs.sub(b"\\1", case), case
        expected = [(m.span(), m.group(1)) for m in theirs.finditer(case)]
        assert [(m.span(), m.group(1)) for m in ours.finditer(case)] == expected, case
        matched += bool(expected)
    assert 500 < matched < len(cases) - 500


# -- end to end: dkimpy signs and verifies the same with and without them -------

@pytest.fixture(scope="module")
def key():
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return pem, record


BODIES = [
    b"",
    b"\r\n\r\n",
    b"plain line\r\n",
    b"trailing spaces   \r\ntabs\there\t\r\ndouble  spaces  inside\r\n\r\n\r\n",
    b" \t leading\r\n\t\r\n  \r\nmixed \t \t run\r\nno final line end",
    b"".join(b"line %d with  two spaces and a tab\t \r\n" % i for i in range(300)),
]
HEADERS = (b"From: Alice  <alice@example.test>\r\n"
           b"To: bob@example.test \r\n"
           b"Subject: folded\r\n\t subject  with\ttabs \r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n")
CANONICALIZE = [(b"relaxed", b"relaxed"), (b"simple", b"simple"),
                (b"relaxed", b"simple"), (b"simple", b"relaxed")]


def _sign(message, pem, canonicalize, length=False):
    return dkim.sign(message, b"sel", b"example.test", pem, canonicalize=canonicalize,
                     include_headers=[b"from", b"to", b"subject", b"date"], length=length)


def _verify(message, record) -> bool:
    def dnsfunc(name, timeout=5):
        assert name == b"sel._domainkey.example.test."
        return record
    return dkim.verify(message, dnsfunc=dnsfunc)


@pytest.mark.parametrize("canonicalize", CANONICALIZE, ids=lambda c: b"/".join(c).decode())
def test_sign_and_verify_same_as_dkimpy(key, canonicalize, monkeypatch):
    pem, record = key
    monkeypatch.setattr(dkim.time, "time", lambda: 1_700_000_000.0)  # same t= in every signature
    relaxed_head, relaxed_body = (c == b"relaxed" for c in canonicalize)
    checked = 0
    for body in BODIES:
        message = HEADERS + b"\r\n" + body
        # l= over an empty canonical body would let anything be appended.
        for length in (False, True) if body.strip() else (False,):
            with dkimpy_only():
                theirs = _sign(message, pem, canonicalize, length)
            ours = _sign(message, pem, canonicalize, length)
            assert ours == theirs  # RSA PKCS#1 v1.5 is deterministic: same bytes signed
            signed = ours + message
            head, sep, signed_body = signed.partition(b"\r\n\r\n")
            tampered = head + sep + b"X" + signed_body
            # White space added at the end of the first body line / inside a
            # header field: only relaxed canonicalization ignores it.
            spaced = head + sep + signed_body.replace(b"\r\n", b" \t\r\n", 1)
            refolded = signed.replace(b"Subject: folded", b"Subject:  folded \t", 1)
            assert refolded != signed
            for state in (dkimpy_only, contextlib.nullcontext):
                with state():
                    assert _verify(signed, record) is True
                    assert _verify(tampered, record) is False
                    if b"\r\n" in signed_body:
                        assert _verify(spaced, record) is relaxed_body
                    assert _verify(refolded, record) is relaxed_head
                    checked += 1
    assert checked == 2 * (len(BODIES) + sum(1 for b in BODIES if b.strip()))
