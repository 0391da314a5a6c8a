"""End to end: SMTP into a real private Postfix → Maildir → ingester → SQLite → gunicorn → HTTP.

Every message is read back over HTTP and compared field by field, and its
``/raw`` byte for byte, with two references:

* the spool file itself. The service runs with ``MTASIDECAR_MAILDIR_KEEP=true``,
  so the ingester moves each file to ``cur/`` after its commit instead of
  deleting it; ``/raw`` must equal one of those files exactly.
* the bytes we sent. smtplib sends a ``bytes`` message as it is (it only
  dot-stuffs lines starting with ``.``, and appends CRLF if the message does
  not end with one). Postfix un-stuffs the dots, takes LF as the end of a line
  (dropping one CR before it) and writes every line with a bare LF. Then it
  prepends its trace lines ``Return-Path``, ``X-Original-To``, ``Delivered-To``
  and its ``Received``. So for a message sent with CRLF line ends (as SMTP
  wants) the stored raw is: trace + the sent bytes with CRLF → LF. Nothing
  else may change (the service sets ``local_header_rewrite_clients =`` so
  Postfix adds no Message-ID/Date and rewrites no address).

Needs root, postfix and postfix-pcre.
"""

from __future__ import annotations

import base64
import os
import smtplib
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from tests.integration._service import OPERATOR, crlf, lf, running_service, split_delivered

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

SENDER = "bounce@sender.test"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The whole service for this module: domains example.test and *.sub.test.

    As the ``service`` fixture of tests/conftest.py, plus ``maildir.keep``:
    ingested files are moved to cur/ instead of deleted, so /raw can be
    compared with the very spool file.
    """
    logs = tmp_path_factory.mktemp("smtp-to-api-logs")
    with running_service(["example.test", "*.sub.test"], {"MTASIDECAR_MAILDIR_KEEP": "true"},
                         keep_log_in=logs) as svc:
        yield svc


# --- helpers -----------------------------------------------------------------


def send(service, recipients: list[str], wire: bytes, mail_options=()) -> dict:
    with smtplib.SMTP("127.0.0.1", service.smtp_port, local_hostname="client.test", timeout=30) as smtp:
        return smtp.sendmail(SENDER, recipients, wire, mail_options=list(mail_options))


def only_message(service, address: str) -> tuple[dict, dict]:
    """(summary, detail) of the one message in ``address``; waits for it."""
    [summary] = service.wait_messages(address, 1)
    detail = service.get(summary["url"])
    assert detail.status == 200, detail.body
    assert detail.headers["content-type"].startswith("application/json")
    return summary, detail.json()


def spool_files(service) -> list[bytes]:
    cur = service.maildir / "cur"
    return [p.read_bytes() for p in cur.iterdir()]


def check_raw(service, summary: dict, sent_wire: bytes, recipient: str) -> bytes:
    """/raw is the spool file byte for byte, and that is trace + what was sent."""
    r = service.get(summary["url"] + "/raw")
    assert r.status == 200, r.body
    assert r.headers["content-type"] == "message/rfc822"
    raw = r.body
    assert int(r.headers["content-length"]) == len(raw) == summary["size"]
    # Exactly one kept spool file holds these bytes.
    assert spool_files(service).count(raw) == 1
    trace, rest = split_delivered(raw)
    assert rest == lf(sent_wire)
    assert trace["return_path"] == SENDER.encode()
    assert trace["delivered_to"].decode().lower() == recipient.lower()
    assert (trace["helo"], trace["ip"]) == (b"client.test", b"127.0.0.1")
    return raw


def message(headers: str, body: str | bytes) -> bytes:
    """Wire form (CRLF) of a header block (str, ASCII) and a body."""
    body = body.encode() if isinstance(body, str) else body
    return crlf(headers.strip("\n").encode() + b"\n\n" + body)


# --- plain text, HTML, attachments ------------------------------------------


def test_plain_text(service):
    wire = message("""
From: Alice Example <alice@sender.test>
To: Plain Reader <plain@example.test>
Cc: c1@other.test, "Last, First" <c2@other.test>
Subject: Plain text
Message-ID: <plain-1@sender.test>
Date: Mon, 02 Jan 2023 10:00:00 +0100
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
""", "Hello plain world.\n.a line with a leading dot\n..two dots\n\nLast line.\n")
    assert send(service, ["plain@example.test"], wire) == {}
    summary, doc = only_message(service, "plain@example.test")

    assert summary["from"] == {"name": "Alice Example", "address": "alice@sender.test"}
    assert summary["to"] == [{"name": "Plain Reader", "address": "plain@example.test"}]
    assert summary["subject"] == "Plain text"
    assert summary["intro"].startswith("Hello plain world.")
    assert summary["has_attachments"] is False and summary["parse_error"] is None
    assert doc["cc"] == [{"name": "", "address": "c1@other.test"},
                         {"name": "Last, First", "address": "c2@other.test"}]
    assert doc["message_id"] == "plain-1@sender.test"
    assert datetime.fromisoformat(doc["date"]) == datetime(2023, 1, 2, 9, 0, tzinfo=timezone.utc)
    # SMTP dot-stuffing is undone by Postfix: the text is as written.
    assert doc["text"] == "Hello plain world.\n.a line with a leading dot\n..two dots\n\nLast line.\n"
    assert doc["html"] == [] and doc["attachments"] == []
    assert doc["envelope"]["sender"] == SENDER
    assert doc["envelope"]["recipient"] == "plain@example.test"
    assert doc["envelope"]["client_ip"] == "127.0.0.1"
    assert doc["envelope"]["client_helo"] == "client.test"
    check_raw(service, summary, wire, "plain@example.test")


def test_lf_only_message_is_stored_with_lf(service):
    """Bare LF line ends are taken as line ends by Postfix (smtpd_forbid_bare_newline=no).

    smtplib appends CRLF to a message that does not end with CRLF, which the
    server sees as one more (empty) line: the stored body has an extra "\\n".
    """
    sent = b"From: lf@sender.test\nTo: lf@example.test\nSubject: LF only\n\nline 1\nline 2\n"
    assert send(service, ["lf@example.test"], sent) == {}
    summary, doc = only_message(service, "lf@example.test")
    assert doc["subject"] == "LF only"
    raw = service.get(summary["url"] + "/raw").body
    assert spool_files(service).count(raw) == 1
    _, rest = split_delivered(raw)
    assert rest == sent + b"\n"


HTML_QP = (
    '<html><body><p style=3D"color:#c00">Caf=C3=A9 cr=C3=A8me =E2=80=93 a line long enough to =\n'
    'need a soft break</p><a href=3D"https://example.test/verify?a=3D1&amp;b=3D2">verify</a></body></html>\n'
)
HTML_DECODED = ('<html><body><p style="color:#c00">Café crème – a line long enough to need a soft break</p>'
                '<a href="https://example.test/verify?a=1&amp;b=2">verify</a></body></html>')


def test_multipart_alternative_with_quoted_printable_html(service):
    wire = message("""
From: "Shop" <shop@sender.test>
To: alt@example.test
Subject: Your order
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="=_alt_boundary"
""", f"""This is a multi-part message in MIME format.

--=_alt_boundary
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 cr=C3=A8me: verify at https://example.test/verify?a=3D1&b=3D2

--=_alt_boundary
Content-Type: text/html; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

{HTML_QP}
--=_alt_boundary--
""")
    assert send(service, ["alt@example.test"], wire) == {}
    summary, doc = only_message(service, "alt@example.test")
    assert summary["from"] == {"name": "Shop", "address": "shop@sender.test"}
    assert doc["text"].strip() == "Café crème: verify at https://example.test/verify?a=1&b=2"
    assert len(doc["html"]) == 1
    assert doc["html"][0].strip() == HTML_DECODED
    assert doc["attachments"] == [] and summary["has_attachments"] is False
    check_raw(service, summary, wire, "alt@example.test")


PDF = b"%PDF-1.4\n" + bytes(range(256)) * 3 + b"\n%%EOF\n"
REPORT = "отчёт № 1, итог\n".encode("utf-8")
BLOB = os.urandom(3000)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"\r\n\x1a\n"
TEXT_ATTACHMENT = b"plain attachment, 7bit\n"


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode()


def test_attachments_with_rfc2231_names(service):
    # The plain filename parameter next to filename* is what old readers see;
    # the RFC 2231 one must win. Section 1 of the continuation is not
    # encoded (no *), section 2 is.
    wire = message("""
From: files@sender.test
To: files@example.test
Subject: Attachments
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="mixed-b"
""", f"""--mixed-b
Content-Type: text/plain; charset=utf-8

See the files.

--mixed-b
Content-Type: application/pdf
Content-Disposition: attachment; filename="fallback.pdf";
 filename*=utf-8''%E6%97%A5%E6%9C%AC.pdf
Content-Transfer-Encoding: base64

{b64(PDF)}
--mixed-b
Content-Type: text/plain; charset=utf-8
Content-Disposition: attachment;
 filename*0*=utf-8''%D0%BE%D1%82%D1%87%D1%91%D1%82;
 filename*1=" No";
 filename*2*=%20%E2%84%96%201.txt
Content-Transfer-Encoding: base64

{b64(REPORT)}
--mixed-b
Content-Type: application/octet-stream
Content-Disposition: attachment; filename*0="a-long-file-name-";
 filename*1="in-two-sections.bin"
Content-Transfer-Encoding: base64

{b64(BLOB)}
--mixed-b
Content-Type: image/png; name="=?UTF-8?B?0LrQsNGA0YLQuNC90LrQsC5wbmc=?="
Content-Disposition: inline
Content-ID: <img1@sender.test>
Content-Transfer-Encoding: base64

{b64(PNG)}
--mixed-b
Content-Type: text/plain
Content-Disposition: attachment; filename=notes.txt

{TEXT_ATTACHMENT.decode()}
--mixed-b--
""")
    assert send(service, ["files@example.test"], wire) == {}
    summary, doc = only_message(service, "files@example.test")
    assert summary["has_attachments"] is True
    assert doc["text"].strip() == "See the files."

    expected = [
        # filename, content type, disposition, content id, bytes
        ("日本.pdf", "application/pdf", "attachment", None, PDF),
        ("отчёт No № 1.txt", "text/plain", "attachment", None, REPORT),
        ("a-long-file-name-in-two-sections.bin", "application/octet-stream", "attachment", None, BLOB),
        ("картинка.png", "image/png", "inline", "img1@sender.test", PNG),
        ("notes.txt", "text/plain", "attachment", None, TEXT_ATTACHMENT),
    ]
    got = doc["attachments"]
    assert [(a["index"], a["filename"], a["content_type"], a["disposition"], a["content_id"], a["size"])
            for a in got] == [(i, name, ctype, disp, cid, len(data))
                              for i, (name, ctype, disp, cid, data) in enumerate(expected)]
    for meta, (name, ctype, _disp, _cid, data) in zip(got, expected):
        r = service.get(meta["url"])
        assert r.status == 200, r.body
        assert r.body == data, name
        assert r.headers["content-type"].split(";")[0] == ctype
        assert r.headers["x-content-type-options"] == "nosniff"
        cd = r.headers["content-disposition"]
        assert cd.startswith("attachment;")
        # RFC 6266 / 5987: the exact name in filename*, an ASCII stand-in in filename.
        star = cd.split("filename*=", 1)[1].split(";", 1)[0].strip()
        assert star.lower().startswith("utf-8''")
        assert unquote(star[7:], encoding="utf-8", errors="strict") == name
        plain = cd.split('filename="', 1)[1].split('"', 1)[0]
        assert plain.isascii() and len(plain) > 0
        if name.isascii():
            assert plain == name
    # No attachment beyond the last one.
    r = service.get(summary["url"] + f"/attachments/{len(expected)}")
    assert r.status == 404 and r.json()["error"] == "attachment_not_found"
    check_raw(service, summary, wire, "files@example.test")


# --- RFC 2047 subjects and 8-bit bodies --------------------------------------


@pytest.mark.parametrize("mailbox, encoded, decoded", [
    ("subj-b@example.test", "=?UTF-8?B?0J/RgNC40LLQtdGCLCDQvNC40YAg4pyT?=", "Привет, мир ✓"),
    ("subj-q@example.test", "=?utf-8?Q?Caf=C3=A9_=E2=82=AC_5_=3D_price?=", "Café € 5 = price"),
    ("subj-koi8@example.test", "=?koi8-r?B?8NLJ18XULCDNydI=?=", "Привет, мир"),
    ("subj-cp1251@example.test", "=?windows-1251?Q?=CF=F0=E8=E2=E5=F2?=", "Привет"),
    # Adjacent encoded words: the white space between them disappears;
    # folding (CRLF + space) is unfolded; plain words keep their spaces.
    ("subj-multi@example.test",
     "Re: =?UTF-8?B?0JrQvtC0?=\n =?UTF-8?Q?_=D0=BF=D0=BE=D0=B4=D1=82=D0=B2=D0=B5=D1=80=D0=B6?=\n"
     " =?UTF-8?B?0LTQtdC90LjRjw==?= 123456",
     "Re: Код подтверждения 123456"),
])
def test_rfc2047_subjects(service, mailbox, encoded, decoded):
    wire = message(f"""
From: =?UTF-8?B?0JjQstCw0L0g0J/QtdGC0YDQvtCy?= <ivan@sender.test>
To: {mailbox}
Subject: {encoded}
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
""", "body\n")
    assert send(service, [mailbox], wire) == {}
    summary, doc = only_message(service, mailbox)
    assert summary["subject"] == decoded
    assert summary["from"] == {"name": "Иван Петров", "address": "ivan@sender.test"}
    check_raw(service, summary, wire, mailbox)


EIGHT_BIT_TEXT = "Съешь же ещё этих мягких французских булок, да выпей чаю. 日本語 ✓ ü\n"


def test_8bit_utf8_body(service):
    wire = message("""
From: eight@sender.test
To: eight@example.test
Subject: 8bit
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit
""", EIGHT_BIT_TEXT.encode("utf-8"))
    assert send(service, ["eight@example.test"], wire, mail_options=["BODY=8BITMIME"]) == {}
    summary, doc = only_message(service, "eight@example.test")
    assert doc["text"] == EIGHT_BIT_TEXT
    assert summary["intro"] == EIGHT_BIT_TEXT.strip()
    check_raw(service, summary, wire, "eight@example.test")


def test_smtputf8_headers_and_address(service):
    """Raw UTF-8 in headers and in the recipient's local part (RFC 6531)."""
    recipient = "Юзер@example.test"
    wire = crlf(
        "From: Jürgen Groß <jürgen@sender.test>\n"
        f"To: {recipient}\n"
        "Subject: Grüße aus Köln – 日本\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "Tschüß!\n".encode("utf-8"))
    with smtplib.SMTP("127.0.0.1", service.smtp_port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("smtputf8")
        assert smtp.sendmail(SENDER, [recipient], wire, mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    # The mailbox name is the lower-cased address; it is reachable percent-encoded.
    address = recipient.lower()
    [summary] = service.wait_messages(quote(address), 1)
    assert summary["url"] == f"/api/v1/mailboxes/{quote(address)}/messages/{summary['id']}"
    detail = service.get(summary["url"])
    assert detail.status == 200, detail.body
    doc = detail.json()
    assert doc["subject"] == "Grüße aus Köln – 日本"
    assert doc["from"] == {"name": "Jürgen Groß", "address": "jürgen@sender.test"}
    assert doc["text"] == "Tschüß!\n"
    assert doc["envelope"]["recipient"] == address
    raw = service.get(summary["url"] + "/raw").body
    assert spool_files(service).count(raw) == 1
    trace, rest = split_delivered(raw)
    assert rest == lf(wire)
    assert trace["delivered_to"].decode("utf-8").lower() == address


# --- routing: recipients, domains, case ---------------------------------------


def test_one_copy_per_recipient_each_in_its_own_mailbox(service):
    recipients = ["multi-a@example.test", "x@a.b.sub.test", "apex@sub.test", "multi-b@example.test"]
    wire = message(f"""
From: many@sender.test
To: {", ".join(recipients[:2])}
Cc: {", ".join(recipients[2:])}
Subject: For several
Message-ID: <multi@sender.test>
""", "One message, four recipients.\n")
    assert send(service, recipients, wire) == {}
    seen_ids = set()
    for rcpt in recipients:
        summary, doc = only_message(service, rcpt)
        assert doc["subject"] == "For several"
        assert doc["envelope"]["recipient"] == rcpt
        assert doc["message_id"] == "multi@sender.test"
        raw = check_raw(service, summary, wire, rcpt)
        trace, _ = split_delivered(raw)
        assert trace["original_to"].decode() == rcpt
        seen_ids.add(summary["id"])
        # Exactly one: no other recipient's copy landed here.
        assert len(service.messages(rcpt, limit=100)) == 1
    assert len(seen_ids) == len(recipients)
    # The mailboxes know their domain: the subdomain one belongs to sub.test.
    domains = service.get("/api/v1/domains").json()["items"]
    assert {(d["name"], d["subdomains"]) for d in domains} == {("example.test", False), ("sub.test", True)}


@pytest.mark.parametrize("recipient", [
    "nobody@foreign.test",          # not ours at all
    "x@sub.test.evil.com",          # look-alike: our domain as a prefix
    "x@evilsub.test",               # look-alike: our domain as a suffix without a dot
    "x@deep.example.test",          # example.test takes no subdomains
    "x@a.b.example.test",
])
def test_foreign_and_lookalike_domains_are_refused_at_rcpt(service, recipient):
    wire = message(f"From: r@sender.test\nTo: {recipient}\nSubject: refused", "no\n")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        send(service, [recipient], wire)
    [(code, text)] = info.value.recipients.values()
    assert code == 554, text
    assert b"5.7.1" in text and text.endswith(b"Relay access denied"), text
    # Nothing was stored for it (asked as the operator: none of these is in a public domain).
    r = service.get(f"/api/v1/mailboxes/{quote(recipient)}/messages", headers=OPERATOR)
    assert (r.status, r.json()["error"]) == (404, "mailbox_not_found")


def test_refused_recipient_does_not_stop_the_others(service):
    wire = message("From: mix@sender.test\nTo: ok-mix@example.test, nobody@foreign.test\nSubject: mixed",
                   "half\n")
    refused = send(service, ["ok-mix@example.test", "nobody@foreign.test", "y@deep.example.test"], wire)
    assert {k: v[0] for k, v in refused.items()} == {"nobody@foreign.test": 554, "y@deep.example.test": 554}
    summary, doc = only_message(service, "ok-mix@example.test")
    check_raw(service, summary, wire, "ok-mix@example.test")


def test_mailbox_addresses_are_case_insensitive(service):
    wire = message("From: case@sender.test\nTo: MiXeD@Example.TEST\nSubject: case", "case\n")
    assert send(service, ["MiXeD@Example.TEST"], wire) == {}
    summary, doc = only_message(service, "mixed@example.test")
    assert doc["envelope"]["recipient"] == "mixed@example.test"
    # The header keeps the sender's spelling; the API route takes any case.
    assert doc["to"] == [{"name": "", "address": "MiXeD@Example.TEST"}]
    for spelling in ("MIXED@EXAMPLE.TEST", "MiXeD@Example.TEST", "mixed@Example.Test"):
        items = service.messages(spelling)
        assert [m["id"] for m in items] == [summary["id"]]
        assert service.get(f"/api/v1/mailboxes/{spelling}/messages/{summary['id']}").status == 200
    check_raw(service, summary, wire, "mixed@example.test")
    # A second mail in another spelling lands in the same mailbox.
    assert send(service, ["MIXED@example.test"], wire) == {}
    assert len(service.wait_messages("mixed@example.test", 2)) == 2
