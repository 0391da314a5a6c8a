"""Parsing raw messages (mtasidecar.mail.parse): never raises, decodes right."""

import base64
import json
import os
import quopri
import random
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mtasidecar.mail import parse as parse_module
from mtasidecar.mail.parse import (
    Address,
    Attachment,
    ParsedMessage,
    attachment_bytes,
    attachment_data,
    decode_words,
    intro,
    parse,
)

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def msg(text: str) -> bytes:
    """A message from an indented literal; LF line endings, UTF-8."""
    return textwrap.dedent(text).lstrip("\n").encode("utf-8")


def single(content_type: bytes | None, body: bytes, cte: bytes | None = b"8bit") -> bytes:
    head = b"From: a@example.org\nSubject: t\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\n"
    if cte is not None:
        head += b"Content-Transfer-Encoding: " + cte + b"\n"
    return head + b"\n" + body


def assert_consistent(raw: bytes, parsed: ParsedMessage) -> None:
    """JSON-ready, storable as UTF-8, and attachment_bytes (and attachment_data) agree with parse."""
    encoded = json.dumps(parsed.to_dict(), ensure_ascii=False).encode("utf-8")
    assert b"\\u0000" not in encoded
    for attachment in parsed.attachments:
        got = attachment_bytes(raw, attachment.index)
        assert got is not None, attachment
        meta, data = got
        assert meta == attachment
        assert len(data) == attachment.size
        assert attachment_data(parsed, attachment.index) == data
    assert attachment_bytes(raw, len(parsed.attachments)) is None
    assert attachment_data(parsed, len(parsed.attachments)) is None
    assert attachment_data(parsed, -1) is None


# --------------------------------------------------------------------------
# Plain messages and headers

PLAIN = msg("""
    Return-Path: <sender@example.org>
    Delivered-To: user@example.test
    From: "Doe, Jane" <jane@example.org>
    To: User <user@example.test>, other@example.test
    Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>
    Reply-To: replies@example.org
    Subject: Your code
     is 123456
    Date: Mon, 13 Jan 2025 10:00:00 +0100
    Message-ID: <abc.123@example.org>
    X-Dup: one
    X-Dup: two

    Hello,

    your code is 123456.
""")


def test_plain_text_message():
    m = parse(PLAIN)
    assert m.parser == "flanker"
    assert m.parse_error is None
    assert m.subject == "Your code is 123456"  # unfolded
    assert m.from_ == [Address("Doe, Jane", "jane@example.org")]
    assert m.to == [Address("User", "user@example.test"), Address("", "other@example.test")]
    assert m.cc == [Address("Jörg", "joerg@example.org")]
    assert m.reply_to == [Address("", "replies@example.org")]
    assert m.bcc == [] and m.sender == []
    assert m.date == datetime(2025, 1, 13, 9, 0, tzinfo=timezone.utc)
    assert m.date.utcoffset() == timedelta(hours=1)
    assert m.message_id == "abc.123@example.org"
    assert m.text == "Hello,\n\nyour code is 123456.\n"
    assert m.html == [] and m.attachments == []
    assert m.headers[:3] == [
        ("Return-Path", "<sender@example.org>"),
        ("Delivered-To", "user@example.test"),
        ("From", '"Doe, Jane" <jane@example.org>'),
    ]
    assert ("Cc", "Jörg <joerg@example.org>") in m.headers
    assert [v for k, v in m.headers if k == "X-Dup"] == ["one", "two"]
    assert m.defects == []
    assert_consistent(PLAIN, m)


def test_to_dict_is_json_ready():
    d = parse(PLAIN).to_dict()
    assert d["from"] == [{"name": "Doe, Jane", "address": "jane@example.org"}]
    assert d["date"] == "2025-01-13T10:00:00+01:00"
    assert d["headers"][0] == ["Return-Path", "<sender@example.org>"]
    assert d["parser"] == "flanker"
    assert json.loads(json.dumps(d)) == d


def test_crlf_message_text_uses_lf():
    raw = PLAIN.replace(b"\n", b"\r\n")
    m = parse(raw)
    assert m.subject == "Your code is 123456"
    assert m.text == "Hello,\n\nyour code is 123456.\n"
    assert m.message_id == "abc.123@example.org"


def test_lenient_addresses():
    raw = msg("""
        From: =?utf-8?B?0JjQstCw0L0=?= <ivan@example.org>
        To: undisclosed-recipients:;
        Cc: broken <no-domain, "Quoted, Name" <q@example.org>, bare@example.org (comment)
        Bcc: =?iso-8859-1?q?Andr=E9?= <andre@example.org>
        Sender: sender-only
        Subject: x

        body
    """)
    m = parse(raw)
    assert m.from_ == [Address("Иван", "ivan@example.org")]
    assert m.to == []  # an empty group
    assert Address("Quoted, Name", "q@example.org") in m.cc
    assert Address("comment", "bare@example.org") in m.cc
    assert m.bcc == [Address("André", "andre@example.org")]
    assert m.sender == [Address("", "sender-only")]


@pytest.mark.parametrize(
    "header, expected",
    [
        ("Date: Mon, 13 Jan 2025 10:00:00 -0000", datetime(2025, 1, 13, 10, 0, tzinfo=timezone.utc)),
        ("Date: 13 Jan 2025 10:00 +0200", datetime(2025, 1, 13, 8, 0, tzinfo=timezone.utc)),
        ("Date: yesterday-ish", None),
        ("Date: Mon, 45 Foo 2025 99:99:99 +0000", None),
    ],
)
def test_dates_are_aware_or_none(header, expected):
    m = parse(msg(f"{header}\nSubject: x\n\nbody\n"))
    assert m.date == expected
    if expected is None:
        assert "unparsable Date header" in m.defects
    else:
        assert m.date.tzinfo is not None


@pytest.mark.parametrize(
    "value, expected",
    [
        ("<a@b>", "a@b"),
        ("  <a@b> (comment)", "a@b"),
        ("no-angles@b", "no-angles@b"),
        ("", None),
    ],
)
def test_message_id(value, expected):
    assert parse(msg(f"Message-ID: {value}\nSubject: x\n\nbody\n")).message_id == expected


# --------------------------------------------------------------------------
# RFC 2047 encoded words


@pytest.mark.parametrize(
    "encoded, decoded",
    [
        ("=?utf-8?B?VmVyaWZ5IHlvdXIgYWNjb3VudCDinJM=?=", "Verify your account ✓"),
        ("=?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_M=C3=BCnchen?=", "Grüße aus München"),
        # white space between encoded words disappears, literal text stays
        ("=?utf-8?q?Hello?= =?utf-8?q?_World?= and more", "Hello World and more"),
        ("Re: =?utf-8?q?caf=C3=A9?= =?iso-8859-1?q?_cr=E8me?=", "Re: café crème"),
        # a multi-byte character split across two encoded words
        ("=?utf-8?B?8J+Y?= =?utf-8?B?gA==?=", "😀"),
        ("=?koi8-r?B?8NLJ18XU?= =?koi8-r?Q?=2C_=CD=C9=D2?=", "Привет, мир"),
        ("=?KOI8-R?Q?=F0=D2=C9=D7=C5=D4?= world", "Привет world"),
        ("=?utf-8*en?q?language_tag?=", "language tag"),  # RFC 2231 language
        ("=?utf-8?x?not-an-encoding?=", "=?utf-8?x?not-an-encoding?="),
        ("=?bogus-charset?q?ok?=", "ok"),
        ("plain subject", "plain subject"),
    ],
)
def test_encoded_words(encoded, decoded):
    assert decode_words(encoded) == decoded
    assert parse(msg(f"Subject: {encoded}\n\nbody\n")).subject == decoded


def test_first_subject_wins_even_when_empty():
    m = parse(b"Subject:\nSubject: second\nDate: Mon, 13 Jan 2025 10:00:00 +0000\nDate: junk\n\nbody")
    assert m.subject == ""
    assert m.date == datetime(2025, 1, 13, 10, 0, tzinfo=timezone.utc)
    assert m.defects == []  # the second Date is not even looked at


def test_raw_utf8_headers():
    raw = "From: Jörg Müller <jm@example.org>\nSubject: Grüße ✓\n\nbody\n".encode()
    m = parse(raw)
    assert m.subject == "Grüße ✓"
    assert m.from_ == [Address("Jörg Müller", "jm@example.org")]


# --------------------------------------------------------------------------
# Bodies: transfer encodings and charsets

RUSSIAN = "Привет, мир! Ёлки-палки."
JAPANESE = "こんにちは、世界。日本語のテキストです。"
GERMAN = "Grüße aus Köln ✓ 日本"


@pytest.mark.parametrize(
    "content_type, body, expected",
    [
        (b"text/plain; charset=utf-8", GERMAN.encode(), GERMAN),
        (b"text/plain; charset=UTF-8", GERMAN.encode(), GERMAN),
        # unknown label: UTF-8, never chardet's guess
        (b"text/plain; charset=bogus-xyz", GERMAN.encode(), GERMAN),
        # no charset at all, 8-bit UTF-8 content
        (b"text/plain", GERMAN.encode(), GERMAN),
        (None, GERMAN.encode(), GERMAN),
        # us-ascii label on UTF-8 bytes: the label is wrong, the bytes are right
        (b"text/plain; charset=us-ascii", GERMAN.encode(), GERMAN),
        (b"text/plain; charset=koi8-r", RUSSIAN.encode("koi8-r"), RUSSIAN),
        (b'text/plain; charset="KOI8-R"', RUSSIAN.encode("koi8-r"), RUSSIAN),
        (b"text/plain; charset=windows-1251", RUSSIAN.encode("cp1251"), RUSSIAN),
        (b"text/plain; charset=iso-2022-jp", JAPANESE.encode("iso-2022-jp"), JAPANESE),
        (b"text/plain; charset=shift_jis", JAPANESE.encode("shift_jis"), JAPANESE),
        # latin-1 labels mean windows-1252 in practice (smart quotes)
        (b"text/plain; charset=iso-8859-1", "café \u201cquoted\u201d".encode("cp1252"), "café \u201cquoted\u201d"),
        # declared charset does not fit but the bytes are UTF-8
        (b"text/plain; charset=shift_jis", RUSSIAN.encode(), RUSSIAN),
    ],
)
def test_charsets(content_type, body, expected):
    raw = single(content_type, body)
    m = parse(raw)
    assert m.parser == "flanker"
    assert m.text == expected


def test_invalid_utf8_is_replaced_not_guessed():
    m = parse(single(b"text/plain; charset=utf-8", b"ok \xff\xfe ok"))
    assert m.text == "ok \ufffd\ufffd ok"
    assert "invalid utf-8 bytes replaced" in m.defects


def test_bogus_charset_with_invalid_bytes():
    m = parse(single(b"text/plain; charset=bogus-xyz", "Привет".encode("koi8-r")))
    assert set(m.text) == {"\ufffd"}
    assert "unknown charset 'bogus-xyz'" in m.defects


def test_quoted_printable_and_base64_bodies():
    qp = quopri.encodestring(("Ünïcödé line " * 10).encode()).replace(b"\n", b"\r\n")
    m = parse(single(b"text/plain; charset=utf-8", qp, b"quoted-printable"))
    assert m.text == "Ünïcödé line " * 10
    b64 = base64.encodebytes(RUSSIAN.encode("koi8-r"))
    m = parse(single(b"text/plain; charset=koi8-r", b64, b"Base64"))
    assert m.text == RUSSIAN


def test_broken_base64_is_repaired():
    m = parse(single(b"text/plain; charset=utf-8", b"SGVsbG8gd29ybGQ", b"base64"))  # no padding
    assert m.text == "Hello world"
    assert "base64 body repaired" in m.defects


def test_nul_bytes_never_reach_the_text():
    m = parse(single(b"text/plain", b"a\x00b\x00c"))
    assert m.text == "a\ufffdb\ufffdc"


def test_bom_is_dropped():
    assert parse(single(b"text/plain; charset=utf-8", "\ufeffhello".encode())).text == "hello"


# --------------------------------------------------------------------------
# Multipart structure

ALTERNATIVE = msg("""
    From: shop@example.org
    To: user@example.test
    Subject: Confirm
    MIME-Version: 1.0
    Content-Type: multipart/alternative; boundary="==alt=="

    This is a multi-part message in MIME format.

    --==alt==
    Content-Type: text/plain; charset=utf-8
    Content-Transfer-Encoding: quoted-printable

    Confirm here: https://example.org/c?token=3Dabc
    Gr=C3=BC=C3=9Fe

    --==alt==
    Content-Type: text/html; charset="utf-8"
    Content-Transfer-Encoding: quoted-printable

    <html><head><style>p {color: red}</style><title>Title</title></head><body>=
    <p>Confirm <a href=3D"https://example.org/c?token=3Dabc">here</a></p><p>Gr=
    =C3=BC=C3=9Fe</p></body></html>
    --==alt==--

    epilogue
""")


def test_multipart_alternative_with_quoted_printable_html():
    m = parse(ALTERNATIVE)
    assert m.parser == "flanker"
    assert m.text == "Confirm here: https://example.org/c?token=abc\nGrüße\n"
    assert m.html == [
        '<html><head><style>p {color: red}</style><title>Title</title></head><body>'
        '<p>Confirm <a href="https://example.org/c?token=abc">here</a></p><p>Grüße</p></body></html>'
    ]
    assert m.attachments == []
    assert_consistent(ALTERNATIVE, m)


def test_intro():
    m = parse(ALTERNATIVE)
    assert intro(m.text, m.html) == "Confirm here: https://example.org/c?token=abc Grüße"
    assert intro(m.text, m.html, n=7) == "Confirm"
    # no text part: from the HTML, without style/title, blocks separated
    assert intro("", m.html) == "Confirm here Grüße"
    assert intro("  \n\t ", ["<script>var x = 1;</script><div>a&amp;b</div><div>c<br>d</div>"]) == "a&b c d"
    assert intro("", []) == ""
    assert intro("", ["<html><head><title>unclosed<body><p>shown</p>"]) == "shown"
    long_html = ["<p>" + "word " * 10000 + "</p>"]
    assert intro("", long_html, n=20) == "word word word word "[:20]


def test_intro_from_html_does_not_depend_on_how_it_is_fed():
    """The HTML goes to HTMLParser in growing chunks: any cut gives the same intro."""
    rnd = random.Random(3)
    tokens = ["&amp;", "&nbsp;", "&#8203;", "&#x41;", "&", "&am", "<", ">", "<b>", "</b>", "<p>", "<!-- c -->",
              "<script>x<y</script>", "<style>a{}</style>", "<head><title>t</title></head>", "<body>", " ", "\n",
              "word", "Grüße", "<br/>", "<a href='x'>", "&lt;", "</", "<!", "<?x?>", "&copy", "&#", "&#12",
              "<![CDATA[x]]>"]
    for _ in range(200):
        html = "".join(rnd.choice(tokens) for _ in range(rnd.randint(5, 400)))
        whole = parse_module._html_to_text(html, 120, chunk=10**9)[:120]
        for chunk in (1, 7, 64):
            assert parse_module._html_to_text(html, 120, chunk=chunk, max_chunk=chunk)[:120] == whole, html
        assert intro("", [html]) == whole


def test_cached_addresses_are_not_shared():
    raw = single(b"text/plain", b"hi").replace(b"From: a@example.org", b"From: A <a@example.org>")
    one, two = parse(raw), parse(raw)
    assert one.from_ == two.from_ == [Address("A", "a@example.org")]
    one.from_[0].name = "changed"
    assert two.from_[0].name == "A" and parse(raw).from_[0].name == "A"


def attachments_message() -> bytes:
    pdf = base64.encodebytes(b"%PDF-1.4 fake").decode()
    return msg(f"""
        From: a@example.org
        Subject: files
        MIME-Version: 1.0
        Content-Type: multipart/mixed; boundary=mixed

        --mixed
        Content-Type: text/plain; charset=utf-8

        See attached.
        --mixed
        Content-Type: application/pdf
        Content-Disposition: attachment;
         filename*0*=utf-8''%E2%82%AC%20rates%20;
         filename*1*=%C3%BCber;
         filename*2=".pdf"
        Content-Transfer-Encoding: base64

        {pdf}
        --mixed
        Content-Type: text/plain; charset=iso-8859-1
        Content-Disposition: attachment; filename*=iso-8859-1'fr'%E9t%E9.txt

        plain text attachment
        --mixed
        Content-Type: application/octet-stream; name="=?utf-8?B?0YTQsNC50LsuYmlu?="
        Content-Transfer-Encoding: base64

        AAECAw==
        --mixed
        Content-Type: application/zip
        Content-Disposition: attachment; filename="fallback.zip"; filename*=UTF-8''%F0%9F%93%A6.zip

        PK
        --mixed
        Content-Type: text/calendar; method=REQUEST

        BEGIN:VCALENDAR
        --mixed
        Content-Type: image/png
        Content-Disposition: inline; filename="C:\\Users\\me\\shot.png"
        Content-Transfer-Encoding: base64

        {base64.b64encode(PNG).decode()}
        --mixed
        Content-Type: application/octet-stream
        Content-Disposition: attachment; filename*1="b.txt"; filename*0="a-"

        x
        --mixed--
    """)


def test_attachments_with_rfc2231_and_rfc2047_names():
    raw = attachments_message()
    m = parse(raw)
    assert m.parser == "flanker"
    assert m.text == "See attached."
    names = [(a.index, a.filename, a.content_type, a.disposition) for a in m.attachments]
    assert names == [
        (0, "€ rates über.pdf", "application/pdf", "attachment"),  # continuations, utf-8, %-encoding
        (1, "été.txt", "text/plain", "attachment"),  # iso-8859-1 percent-encoding
        (2, "файл.bin", "application/octet-stream", "attachment"),  # RFC 2047 in a parameter
        (3, "📦.zip", "application/zip", "attachment"),  # filename* wins over filename
        (4, None, "text/calendar", "attachment"),  # non-body text part
        (5, "shot.png", "image/png", "inline"),  # path components dropped
        (6, "a-b.txt", "application/octet-stream", "attachment"),  # sections put in order
    ]
    assert [a.size for a in m.attachments] == [13, 21, 4, 2, 15, len(PNG), 1]
    assert m.attachments[0].transfer_encoding == "base64"
    assert m.attachments[1].transfer_encoding is None
    assert attachment_bytes(raw, 0)[1] == b"%PDF-1.4 fake"
    assert attachment_bytes(raw, 2)[1] == b"\x00\x01\x02\x03"
    assert attachment_bytes(raw, 5)[1] == PNG
    assert_consistent(raw, m)


def test_attachment_bytes_out_of_range():
    raw = attachments_message()
    assert attachment_bytes(raw, 7) is None
    assert attachment_bytes(raw, -1) is None
    assert attachment_bytes(PLAIN, 0) is None
    assert attachment_bytes(b"", 0) is None


RELATED = msg(f"""
    From: news@example.org
    Subject: newsletter
    Content-Type: multipart/mixed; boundary="m"

    --m
    Content-Type: multipart/related; boundary="r"; type="multipart/alternative"

    --r
    Content-Type: multipart/alternative; boundary="a"

    --a
    Content-Type: text/plain

    Plain version
    --a
    Content-Type: text/html; charset=utf-8

    <p><img src="cid:logo@example.org"> News</p>
    --a--
    --r
    Content-Type: image/png
    Content-ID: <logo@example.org>
    Content-Transfer-Encoding: base64

    {base64.b64encode(PNG).decode()}
    --r
    Content-Type: image/gif; name="spacer.gif"
    Content-Disposition: inline; filename="spacer.gif"
    Content-ID: <spacer>
    Content-Transfer-Encoding: base64

    R0lGODlhAQABAAAAACw=
    --r--
    --m
    Content-Type: image/jpeg
    Content-Transfer-Encoding: base64

    /9j/
    --m--
""")


def test_inline_images_with_content_id():
    m = parse(RELATED)
    assert m.text == "Plain version"
    assert m.html == ['<p><img src="cid:logo@example.org"> News</p>']
    assert m.attachments == [
        Attachment(0, None, "image/png", len(PNG), "inline", "logo@example.org", "base64", True),
        Attachment(1, "spacer.gif", "image/gif", 14, "inline", "spacer", "base64", True),
        Attachment(2, None, "image/jpeg", 3, "attachment", None, "base64", False),
    ]
    assert attachment_bytes(RELATED, 0) == (m.attachments[0], PNG)
    assert_consistent(RELATED, m)


INNER = msg("""
    From: inner@example.org
    Subject: the inner message
    Content-Type: multipart/mixed; boundary=inner

    --inner
    Content-Type: text/plain

    inner text
    --inner
    Content-Type: application/octet-stream
    Content-Disposition: attachment; filename=inner.bin

    inner attachment
    --inner--
""")

NESTED = msg("""
    From: outer@example.org
    Subject: Fwd: the inner message
    Content-Type: multipart/mixed; boundary=outer

    --outer
    Content-Type: text/plain

    see below
    --outer
    Content-Type: message/rfc822
    Content-Disposition: inline

""") + INNER + b"\n--outer--\n"


def test_nested_message_is_one_attachment():
    m = parse(NESTED)
    assert m.subject == "Fwd: the inner message"
    assert m.text == "see below"  # the inner text is not mixed in
    assert len(m.attachments) == 1
    attachment = m.attachments[0]
    assert attachment.content_type == "message/rfc822"
    assert attachment.disposition == "inline"
    _, data = attachment_bytes(NESTED, 0)
    assert data == INNER  # byte for byte (the newline before the boundary is the boundary's)
    inner = parse(data)
    assert inner.subject == "the inner message"
    assert inner.text == "inner text"
    assert [a.filename for a in inner.attachments] == ["inner.bin"]
    assert_consistent(NESTED, m)


def test_digest_parts_default_to_message_rfc822():
    raw = msg("""
        Subject: digest
        Content-Type: multipart/digest; boundary=d

        --d

        Subject: one

        first
        --d

        Subject: two

        second
        --d--
    """)
    m = parse(raw)
    assert [a.content_type for a in m.attachments] == ["message/rfc822", "message/rfc822"]
    assert parse(attachment_bytes(raw, 1)[1]).subject == "two"


# --------------------------------------------------------------------------
# The stdlib fallback


ATTACHMENT_PAIR = msg("""
    Subject: pair
    Content-Type: multipart/mixed; boundary=b

    --b
    Content-Type: text/plain

    hello
    --b
    Content-Type: application/octet-stream; name=x.bin
    Content-Transfer-Encoding: base64

    aGVsbG8=
    --b--
""")


def test_fallback_when_flanker_rejects_the_structure():
    raw = msg("""
        Subject: no start boundary
        Content-Type: multipart/mixed; boundary=missing

        just some text, no boundary anywhere
    """)
    m = parse(raw)
    assert m.parser == "email"
    assert m.parse_error.startswith("flanker: DecodingError: ")
    assert m.subject == "no start boundary"
    assert "just some text" in m.text
    assert "StartBoundaryNotFoundDefect" in m.defects
    assert_consistent(raw, m)


def test_fallback_multipart_without_boundary_is_text():
    raw = msg("""
        Subject: no boundary
        Content-Type: multipart/mixed

        body text
    """)
    m = parse(raw)
    assert m.parser == "email"
    assert m.text == "body text\n"
    assert m.attachments == []


def test_8bit_parameters():
    # flanker's tokenizer reads Content-Type lines up to the first 8-bit
    # byte; the parameters themselves are decoded by our own parser.
    raw = """Subject: 8-bit parameter
Content-Type: multipart/mixed; boundary=b; x-note="Grüße"

--b
Content-Type: text/plain

hello
--b
Content-Type: application/pdf; name="résumé.pdf"
Content-Transfer-Encoding: base64

aGVsbG8=
--b--
""".encode()
    m = parse(raw)
    assert m.parser == "flanker"
    assert m.text == "hello"
    assert [(a.filename, a.size) for a in m.attachments] == [("résumé.pdf", 5)]
    assert attachment_bytes(raw, 0)[1] == b"hello"
    assert_consistent(raw, m)


def test_fallback_when_flanker_misses_the_content_type():
    # A value folded right after the colon is invisible to flanker's
    # tokenizer, which then takes the multipart for one text part.
    raw = ATTACHMENT_PAIR.replace(b"Content-Type: multipart", b"Content-Type:\n multipart")
    m = parse(raw)
    assert m.parser == "email"
    assert m.parse_error.startswith("flanker: _Garbage: headers say multipart/mixed")
    assert m.text == "hello"
    assert [(a.filename, a.size) for a in m.attachments] == [("x.bin", 5)]
    assert attachment_bytes(raw, 0)[1] == b"hello"
    assert_consistent(raw, m)


def test_boundary_parameter_on_a_leaf_does_not_cut_the_body():
    # CPython's msg_40.txt: flanker would cut the HTML at the "boundary".
    raw = msg("""
        Content-Type: text/html; boundary="--X"

        ----X
        <p>kept</p>
        ----X--
    """)
    m = parse(raw)
    assert m.parser == "email"
    assert "<p>kept</p>" in m.html[0]


def test_fallback_nested_message_bytes():
    raw = NESTED.replace(b"Content-Type: multipart/mixed; boundary=outer", b"Content-Type:\n\tmultipart/mixed; boundary=outer")
    m = parse(raw)
    assert m.parser == "email"
    _, data = attachment_bytes(raw, 0)
    assert parse(data).subject == "the inner message"
    assert_consistent(raw, m)


def test_when_both_parsers_fail(monkeypatch):
    class Broken:
        def __init__(self, *args, **kwargs):
            pass

        def from_string(self, raw):
            raise ValueError("flanker broke")

        def parsebytes(self, raw):
            raise RuntimeError("email broke")

    monkeypatch.setattr(parse_module, "_flanker_mime", Broken())
    monkeypatch.setattr(parse_module, "BytesParser", Broken)
    m = parse(PLAIN)
    assert m.parser == "none"
    assert m.parse_error == (
        "flanker: ValueError: flanker broke; email (default): RuntimeError: email broke; "
        "email (compat32): RuntimeError: email broke"
    )
    assert (m.subject, m.text, m.html, m.attachments, m.headers) == ("", "", [], [], [])
    assert attachment_bytes(PLAIN, 0) is None


def test_without_flanker_the_stdlib_parses(monkeypatch):
    monkeypatch.setattr(parse_module, "_flanker_mime", None)
    m = parse(ALTERNATIVE)
    assert m.parser == "email"
    assert m.parse_error is None
    assert m.text.startswith("Confirm here")


# --------------------------------------------------------------------------
# Junk never raises


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\xff" * 1000,
        b"",
        b"Subject: only headers",
        b"Subject: headers and separator\n\n",
        b"\x00" * 300 + b"Subject: x\n\n\x00\x00body\x00",
        bytes(range(256)) * 20,
        b"Content-Type: multipart/mixed; boundary=x\n\n--x\n--x\n--x--",
        b"Content-Type: multipart/mixed; boundary=\"\"\n\n--\n--",
        b"Content-Type: message/rfc822\n\n",
        b"Content-Type: message/partial; id=1\n\nSubject: x\n\nbody",
        b"Content-Type: multipart/mixed; boundary=a\n\n" + b"--a\nContent-Type: multipart/mixed; boundary=a\n\n" * 300,
        b"Content-Transfer-Encoding: base64\n\n!!!!",
        b"Content-Type: text/plain; charset=utf-7\n\n+2D3-",
        b"Content-Type: text/plain; charset=unicode_escape\n\n\\ud800",
        b"Content-Type: text/plain; charset=base64\n\nabc",
        b"Subject: =?utf-8?B?####?= =?unicode_escape?Q?\\ud800?=\n\n",
        b"\n\n\n",
        b"From nobody Mon Jan 1 00:00:00 2024\n",
    ],
)
def test_junk_never_raises(raw):
    m = parse(raw)
    assert isinstance(m, ParsedMessage)
    assert m.parser in ("flanker", "email")
    assert "\x00" not in m.text
    assert_consistent(raw, m)


def test_deep_nesting_gives_up_without_raising():
    depth = 1200
    raw = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth))
    raw += b"\nhi\n" + b"".join(b"--b%d--\n" % i for i in reversed(range(depth)))
    m = parse(raw)
    assert m.parser == "none"
    assert m.parse_error.endswith("email: not tried (nesting too deep)")
    assert attachment_bytes(raw, 0) is None


def test_headers_only_and_no_body():
    m = parse(b"Subject: only headers\nFrom: a@example.org")
    assert (m.subject, m.text, m.from_) == ("only headers", "", [Address("", "a@example.org")])
    m = parse(b"Subject: no body\n\n")
    assert (m.subject, m.text, m.attachments) == ("no body", "", [])


def test_not_bytes():
    m = parse("a str is not a message")  # type: ignore[arg-type]
    assert m.parser == "none" and m.parse_error == "not bytes: str"


# --------------------------------------------------------------------------
# CPython's own test messages


def _cpython_email_data() -> list:
    try:
        import test  # the CPython test package; some distributions drop it
    except ImportError:
        return [pytest.param(None, marks=pytest.mark.skip(reason="CPython test package not installed"))]
    files = sorted((Path(test.__file__).parent / "test_email" / "data").glob("msg_*.txt"))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason="test/test_email/data not installed"))]
    return [pytest.param(path, id=path.name) for path in files]


@pytest.mark.parametrize("path", _cpython_email_data())
def test_cpython_email_test_messages(path):
    raw = path.read_bytes()
    m = parse(raw)
    assert m.parser in ("flanker", "email"), m.parse_error
    assert_consistent(raw, m)


# --------------------------------------------------------------------------
# Fuzzing


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    tokens = [b"\n", b"\r\n", b"\n\n", b"--", b"--mixed", b"--r--", b":", b";", b"=", b"\"", b"=?",
              b"?=", b"\x00", b"\xff", b"Content-Type: multipart/mixed; boundary=mixed\n", b"*0*=",
              b"%", b"=\n", b" ", b"\t"]
    for _ in range(rnd.randint(1, 8)):
        op = rnd.randrange(5)
        pos = rnd.randrange(len(out) + 1)
        if op == 0:
            out[pos:pos] = rnd.choice(tokens)
        elif op == 1 and out:
            del out[pos : pos + rnd.randint(1, 40)]
        elif op == 2 and out:
            out[min(pos, len(out) - 1)] = rnd.randrange(256)
        elif op == 3:
            start = rnd.randrange(len(out) + 1)
            out[pos:pos] = out[start : start + rnd.randint(1, 200)]
        else:
            out = out[:pos]
    return bytes(out)


def test_fuzz_mutations_never_raise():
    rnd = random.Random(1)
    samples = [attachments_message(), RELATED, NESTED, ALTERNATIVE, PLAIN]
    parsers = set()
    for _ in range(2000):
        raw = _mutate(rnd, rnd.choice(samples))
        m = parse(raw)
        parsers.add(m.parser)
        assert m.parser in ("flanker", "email")
        assert_consistent(raw, m)
    assert parsers == {"flanker", "email"}  # the fallback got exercised too


# --------------------------------------------------------------------------
# Import hygiene


def _import_quietly(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_importing_makes_no_noise():
    result = _import_quietly("import mtasidecar.mail.parse as p; assert p._flanker_mime is not None")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_first_flanker_import_noise_is_suppressed(tmp_path):
    # A copy of flanker without its ply tables rebuilds them on import and
    # logs a screenful about it, even to an application's logging handlers.
    import flanker

    shutil.copytree(Path(flanker.__file__).parent, tmp_path / "flanker",
                    ignore=shutil.ignore_patterns("*parsetab*", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    noisy = _import_quietly("import logging; logging.basicConfig(); import warnings; "
                            "warnings.simplefilter('ignore'); import flanker.mime", env)
    assert "unreachable" in noisy.stderr  # the noise is real...
    for table in (tmp_path / "flanker").rglob("*parsetab*"):
        table.unlink()
    quiet = _import_quietly("import logging; logging.basicConfig(); import mtasidecar.mail.parse as p; "
                            f"assert p._flanker_mime.__file__.startswith({str(tmp_path)!r})", env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""  # ...and gone
