"""The native HTTP API, in process: falcon's TestClient on a real SQLite file.

Mail gets into the store the way it does in production: .eml files with
Postfix's trace headers are written to a Maildir's new/ and go through
``pipeline.prepare`` and ``Pipeline.commit``. Every answer is checked for
its status and, for errors, for the JSON body {"error", "message"}; no
request may ever get a 500.

The helpers at the top (``Env``, ``make_env``, ``eml``) are shared with
test_openapi.py.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote

import falcon
import falcon.testing
import pytest

from mtasidecar.api.app import create_app
from mtasidecar.api.inputs import MAX_BODY
from mtasidecar.config import load
from mtasidecar.ingest.pipeline import UNROUTED, Pipeline, prepare
from mtasidecar.mail.auth import Authenticator
from mtasidecar.store import Store
from tests.dnsserver import DNSTestServer

DOMAINS = "public:example.test,public:*.sub.test"
ADDRESS = "inbox@example.test"
BASE_TIME = 1_736_762_400  # 2025-01-13T10:00:00Z: received_at of the first file delivered


# -- building mail and an environment ------------------------------------------------------

def trace(recipient: str, sender: str = "sender@origin.test", queue_id: str = "ABC123") -> bytes:
    """The lines Postfix's virtual(8) and smtpd(8) put on top of a delivered message."""
    return (f"Return-Path: <{sender}>\n"
            f"X-Original-To: {recipient}\n"
            f"Delivered-To: {recipient}\n"
            f"Received: from helo.origin.test (mail.origin.test [127.0.0.1])\n"
            f"\tby mx.example.test (Postfix) with ESMTP id {queue_id}\n"
            f"\tfor <{recipient}>; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)\n").encode()


def eml(recipient: str = ADDRESS, subject: str = "hello", text: str | None = "Hello there.", *,
        sender: str = "sender@origin.test", from_name: str = "Sam Sender", html: str | None = None,
        attachments: tuple = (), cc: str | None = None, reply_to: str | None = None,
        with_trace: bool = True, message_id: str | None = None) -> bytes:
    """A message as Postfix would leave it in the Maildir.

    ``attachments`` holds (filename, content_type, data) triples; a
    content_type starting with "inline:" makes an inline part with a
    Content-ID instead.
    """
    msg = EmailMessage()
    msg["From"] = f"{from_name} <{sender}>"
    msg["To"] = recipient
    if cc:
        msg["Cc"] = cc
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime(2025, 1, 13, 10, 0, tzinfo=timezone.utc))
    msg["Message-ID"] = f"<{message_id or subject.replace(' ', '.')}@origin.test>"
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    for filename, ctype, data in attachments:
        inline = ctype.startswith("inline:")
        maintype, subtype = ctype.removeprefix("inline:").split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename,
                           disposition="inline" if inline else "attachment",
                           cid=f"<{filename}@origin.test>" if inline else None)
    body = msg.as_bytes()
    return (trace(recipient, sender) if with_trace else b"") + body


@dataclass
class Env:
    tmp: Path
    settings: object
    store: Store
    client: falcon.testing.TestClient
    maildir: Path
    delivered: int = 0
    files: dict = field(default_factory=dict)  # message id (hex) → raw bytes written

    def deliver(self, *messages: bytes, max_size: int | None = None, authenticator=None) -> list[str]:
        """Write files to new/, prepare and commit them as one batch; the new ids, in order."""
        paths = []
        for raw in messages:
            n = self.delivered
            self.delivered += 1
            path = self.maildir / "new" / f"{BASE_TIME + n}.M{n}P4242Q{n}.mx.example.test"
            path.write_bytes(raw)
            os.utime(path, (BASE_TIME + n, BASE_TIME + n))
            paths.append(path)
        limit = max_size if max_size is not None else self.settings.maildir.max_message_size
        batch = [prepare(str(p), limit, authenticator) for p in paths]
        names = [b.record.spool_name for b in batch]
        Pipeline(self.store, self.maildir).commit(batch)
        out = []
        for name, raw in zip(names, messages):
            row = self.store.db.execute_sql("SELECT id FROM message WHERE spool_name = ?", (name,)).fetchone()
            mid = format(row[0], "024x")
            self.files[mid] = raw
            out.append(mid)
        assert not any((self.maildir / "new").iterdir()), "files must leave new/ after commit"
        return out

    # HTTP shortcuts ---------------------------------------------------------------------
    def get(self, path: str, **kw):
        return self.client.simulate_get(path, **kw)

    def request(self, method: str, path: str, **kw):
        return self.client.simulate_request(method, path, **kw)


def make_env(tmp_path: Path, **extra_env: str) -> Env:
    data = tmp_path / "data"
    environ = {"MTASIDECAR_DATA_DIR": str(data), "MTASIDECAR_DOMAINS": DOMAINS,
               "MTASIDECAR_HOSTNAME": "mx.example.test", **extra_env}
    settings = load(environ=environ)
    store = Store(settings.database_url)
    store.setup()
    store.sync_domains([(d.name, d.subdomains, d.mode) for d in settings.domains])
    maildir = settings.maildir_path
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    client = falcon.testing.TestClient(create_app(settings, store))
    return Env(tmp_path, settings, store, client, maildir)


def messages_path(address: str = ADDRESS) -> str:
    return f"/api/v1/mailboxes/{address}/messages"


def message_path(mid: str, address: str = ADDRESS) -> str:
    return f"{messages_path(address)}/{mid}"


def assert_error(resp, status: int, code: str | None = None) -> dict:
    """A JSON error answer: the status, {"error": str, "message": str}, and the code if given."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = json.loads(resp.text) if resp.text else None
    assert isinstance(body, dict), resp.text
    assert set(body) == {"error", "message"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    return body


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


# SPF and DMARC records that make mail from origin.test via 127.0.0.1 pass and
# mail from forged.test fail.
AUTH_ZONE = {
    "origin.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "_dmarc.origin.test": {"TXT": ["v=DMARC1; p=reject"]},
    "forged.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.forged.test": {"TXT": ["v=DMARC1; p=quarantine"]},
}


@pytest.fixture
def authenticator():
    """Sender checks against a real DNS server on loopback serving AUTH_ZONE."""
    server = DNSTestServer(AUTH_ZONE).start()
    try:
        yield Authenticator([server.address], timeout=2, budget=5, hostname="mx.example.test")
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_server_errors(monkeypatch, request):
    """Fail any test in which the API answered 500, whatever the test asserts itself.

    (Not for tests marked xfail: those already fail on the known bug, once.)
    """
    statuses = []
    original = falcon.testing.TestClient.simulate_request

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        statuses.append((result.status_code, args[:2]))
        return result

    monkeypatch.setattr(falcon.testing.TestClient, "simulate_request", recording)
    yield
    if request.node.get_closest_marker("xfail"):
        return
    errors = [s for s in statuses if s[0] >= 500]
    assert not errors, f"server errors: {errors}"


# -- service endpoints ------------------------------------------------------------------------

def test_healthz(env):
    r = env.get("/healthz")
    assert r.status_code == 200
    assert r.json == {"status": "ok"}


def test_domains_lists_configured_domains(env):
    r = env.get("/api/v1/domains")
    assert r.status_code == 200
    items = r.json["items"]
    assert [(d["name"], d["subdomains"]) for d in items] == [("example.test", False), ("sub.test", True)]
    assert all(len(d["id"]) == 24 and int(d["id"], 16) > 0 for d in items)


def test_openapi_document_is_served(env):
    r = env.get("/api/v1/openapi.json")
    assert r.status_code == 200
    assert r.json["openapi"].startswith("3.")


# -- listing ----------------------------------------------------------------------------------

def test_list_newest_first(env):
    ids = env.deliver(*(eml(subject=f"number {i}") for i in range(3)))
    r = env.get(messages_path())
    assert r.status_code == 200
    items = r.json["items"]
    assert [m["subject"] for m in items] == ["number 2", "number 1", "number 0"]
    assert [m["id"] for m in items] == ids[::-1]
    received = [m["received_at"] for m in items]
    assert received == sorted(received, reverse=True)
    assert received[-1] == "2025-01-13T10:00:00+00:00"  # the file's mtime, in UTC
    assert r.json["next_cursor"] is None
    first = items[0]
    assert first["from"] == {"name": "Sam Sender", "address": "sender@origin.test"}
    assert first["to"] == [{"name": "", "address": ADDRESS}]
    assert first["intro"] == "Hello there."
    assert first["seen"] is False and first["has_attachments"] is False and first["parse_error"] is None
    assert first["size"] == len(env.files[first["id"]])
    # The url a summary gives leads to the message.
    assert env.get(first["url"]).json["id"] == first["id"]


def test_list_of_a_mailbox_shows_only_its_own_mail(env):
    mine = env.deliver(eml(subject="mine"))
    env.deliver(eml("other@example.test", subject="theirs"))
    items = env.get(messages_path()).json["items"]
    assert [m["id"] for m in items] == mine


def test_pagination_over_75_messages(env):
    ids = env.deliver(*(eml(subject=f"page test {i}") for i in range(75)))
    expected = ids[::-1]
    for limit in (1, 7, 20, 25, 74, 75, 100):
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": str(limit)}
            if cursor:
                params["cursor"] = cursor
            r = env.get(messages_path(), params=params)
            assert r.status_code == 200, r.text
            page = [m["id"] for m in r.json["items"]]
            assert 0 < len(page) <= limit
            seen += page
            pages += 1
            cursor = r.json["next_cursor"]
            if cursor is None:
                break
            assert pages < 100, "pagination does not end"
        assert seen == expected, f"limit {limit}: duplicates or gaps"
        assert pages == -(-75 // limit), f"limit {limit}: {pages} pages (an empty last page?)"


def test_default_page_size_is_30(env):
    env.deliver(*(eml(subject=f"m{i}") for i in range(31)))
    r = env.get(messages_path())
    assert len(r.json["items"]) == 30
    assert r.json["next_cursor"] is not None


def test_default_page_size_respects_max_page_size(tmp_path):
    env = make_env(tmp_path, MTASIDECAR_API_MAX_PAGE_SIZE="10")
    env.deliver(*(eml(subject=f"m{i}") for i in range(12)))
    r = env.get(messages_path())
    assert r.status_code == 200
    assert len(r.json["items"]) == 10


def test_max_page_size_is_configurable(tmp_path):
    env = make_env(tmp_path, MTASIDECAR_API_MAX_PAGE_SIZE="5")
    env.deliver(*(eml(subject=f"m{i}") for i in range(6)))
    assert len(env.get(messages_path(), params={"limit": "5"}).json["items"]) == 5
    assert_error(env.get(messages_path(), params={"limit": "6"}), 400, "bad_limit")


def test_address_is_case_insensitive_and_trailing_slash_is_ignored(env):
    (mid,) = env.deliver(eml())
    for path in (messages_path("InBox@Example.TEST"), messages_path() + "/", message_path(mid) + "/",
                 "/api/v1/domains/", "/healthz/"):
        r = env.get(path)
        assert r.status_code == 200, (path, r.text)


def test_auth_results_and_filter(env, authenticator):
    good, bad = env.deliver(eml(subject="good"), eml(subject="forged", sender="ceo@forged.test"),
                            authenticator=authenticator)
    (unchecked,) = env.deliver(eml(subject="unchecked"))
    listed = {m["id"]: m["authenticated"] for m in env.get(messages_path()).json["items"]}
    assert listed == {good: True, bad: False, unchecked: None}
    assert [m["id"] for m in env.get(messages_path(), params={"auth": "pass"}).json["items"]] == [good]
    assert [m["id"] for m in env.get(messages_path(), params={"auth": "fail"}).json["items"]] == [bad]
    auth = env.get(message_path(good)).json["auth"]
    assert auth["spf"]["result"] == "pass" and auth["dmarc"]["result"] == "pass"
    assert auth["authentication_results"].startswith("mx.example.test;")
    auth = env.get(message_path(bad)).json["auth"]
    assert auth["spf"]["result"] == "fail" and auth["dmarc"]["result"] == "fail"
    assert env.get(message_path(unchecked)).json["auth"] is None


def test_auth_filter_pages_with_cursor(env, authenticator):
    ids = env.deliver(*(eml(subject=f"m{i}", sender="a@origin.test" if i % 2 else "b@forged.test")
                        for i in range(9)), authenticator=authenticator)
    passing = [mid for i, mid in enumerate(ids) if i % 2][::-1]
    seen, cursor = [], None
    while True:
        params = {"auth": "pass", "limit": "2", **({"cursor": cursor} if cursor else {})}
        r = env.get(messages_path(), params=params)
        seen += [m["id"] for m in r.json["items"]]
        cursor = r.json["next_cursor"]
        if cursor is None:
            break
    assert seen == passing


def test_percent_encoded_address_in_urls_works(env):
    (mid,) = env.deliver(eml())
    assert env.get(message_path(mid, quote(ADDRESS, safe=""))).status_code == 200


# -- one message ------------------------------------------------------------------------------

def test_get_message_in_full(env):
    html = '<p>Hello <b>there</b></p><img src="cid:logo.png@origin.test">'
    (mid,) = env.deliver(eml(
        subject="Grüße – full", message_id="full.1", text="Plain body.\nSecond line.", html=html,
        cc="Carol <carol@origin.test>", reply_to="reply@origin.test",
        attachments=(("résumé.pdf", "application/pdf", b"%PDF-1.4 fake"),
                     ("logo.png", "inline:image/png", b"\x89PNG\r\n\x1a\nfake"))))
    r = env.get(message_path(mid))
    assert r.status_code == 200
    m = r.json
    assert m["id"] == mid
    assert m["subject"] == "Grüße – full"
    assert m["text"] == "Plain body.\nSecond line.\n"
    assert isinstance(m["html"], list) and len(m["html"]) == 1 and "<b>there</b>" in m["html"][0]
    assert m["cc"] == [{"name": "Carol", "address": "carol@origin.test"}]
    assert m["reply_to"] == [{"name": "", "address": "reply@origin.test"}]
    assert m["bcc"] == []
    assert m["date"] == "2025-01-13T10:00:00+00:00"
    assert m["message_id"] == "full.1@origin.test"
    assert m["has_attachments"] is True
    assert m["envelope"] == {"sender": "sender@origin.test", "recipient": ADDRESS, "original_recipient": ADDRESS,
                             "client_ip": "127.0.0.1", "client_helo": "helo.origin.test",
                             "client_rdns": "mail.origin.test", "queue_id": "ABC123"}
    assert m["parser"] in ("flanker", "email") and m["parse_error"] is None
    assert m["headers"][:3] == [{"name": "Return-Path", "value": "<sender@origin.test>"},
                                {"name": "X-Original-To", "value": ADDRESS},
                                {"name": "Delivered-To", "value": ADDRESS}]
    base = m["url"]
    assert unquote(base) == message_path(mid)
    assert m["raw_url"] == f"{base}/raw"
    atts = m["attachments"]
    assert [(a["index"], a["filename"], a["content_type"], a["disposition"]) for a in atts] == [
        (0, "résumé.pdf", "application/pdf", "attachment"),
        (1, "logo.png", "image/png", "inline")]
    assert atts[0]["size"] == len(b"%PDF-1.4 fake")
    assert atts[1]["content_id"] == "logo.png@origin.test"
    for a in atts:
        assert a["url"] == f"{base}/attachments/{a['index']}"
    assert "routing_note" not in m


def test_message_of_another_mailbox_is_not_found(env):
    (mid,) = env.deliver(eml("other@example.test"))
    env.deliver(eml())  # ADDRESS exists too
    for method in ("GET", "DELETE"):
        assert_error(env.request(method, message_path(mid)), 404, "message_not_found")
    assert_error(env.request("PATCH", message_path(mid), json={"seen": True}), 404, "message_not_found")
    assert_error(env.get(message_path(mid) + "/raw"), 404, "message_not_found")
    assert_error(env.get(message_path(mid) + "/attachments/0"), 404, "message_not_found")
    assert env.get(message_path(mid, "other@example.test")).status_code == 200


def test_raw_is_the_file_byte_for_byte(env):
    raw = eml(subject="raw test", attachments=(("a.bin", "application/octet-stream", bytes(range(256))),))
    raw = raw.replace(b"raw test", b"raw test \xe9\xff 8bit")  # bytes that are not UTF-8 survive too
    (mid,) = env.deliver(raw)
    r = env.get(message_path(mid) + "/raw")
    assert r.status_code == 200
    assert r.content == raw
    assert r.headers["content-type"] == "message/rfc822"
    assert r.headers["content-disposition"] == f'attachment; filename="{mid}.eml"'
    assert r.headers["x-content-type-options"] == "nosniff"


def test_attachment_download(env):
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 10
    (mid,) = env.deliver(eml(attachments=(("résumé.pdf", "application/pdf", pdf),
                                          ('evil"; x=.html', "text/html", b"<script>alert(1)</script>"))))
    r = env.get(message_path(mid) + "/attachments/0")
    assert r.status_code == 200
    assert r.content == pdf
    assert r.headers["content-type"] == "application/pdf"
    disposition = r.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9.pdf" in disposition  # RFC 6266 / RFC 5987
    assert 'filename="r_sum_.pdf"' in disposition  # an ASCII fallback for old clients
    assert r.headers["x-content-type-options"] == "nosniff"
    csp = r.headers["content-security-policy"]
    assert "sandbox" in csp and "default-src 'none'" in csp

    # A hostile file name cannot break out of the quoted filename parameter.
    r = env.get(message_path(mid) + "/attachments/1")
    assert r.status_code == 200
    assert r.content == b"<script>alert(1)</script>"
    disposition = r.headers["content-disposition"]
    quoted = disposition.split('filename="', 1)[1].split('"', 1)[0]
    assert '"' not in quoted and ";" not in quoted
    assert disposition.endswith("filename*=UTF-8''evil%22%3B%20x%3D.html")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in r.headers["content-security-policy"]


def test_attachment_without_filename_gets_one(env):
    raw = trace(ADDRESS) + (b"From: a@origin.test\nTo: inbox@example.test\nSubject: cal\nMIME-Version: 1.0\n"
                            b"Content-Type: multipart/mixed; boundary=BB\n\n--BB\nContent-Type: text/plain\n\nhi\n"
                            b"--BB\nContent-Type: text/calendar\n\nBEGIN:VCALENDAR\nEND:VCALENDAR\n\n--BB--\n")
    (mid,) = env.deliver(raw)
    r = env.get(message_path(mid) + "/attachments/0")
    assert r.status_code == 200
    assert r.content.startswith(b"BEGIN:VCALENDAR")
    assert 'filename="attachment-0"' in r.headers["content-disposition"]


def test_patch_seen_then_get(env):
    (mid, other) = env.deliver(eml(subject="a"), eml(subject="b"))
    r = env.request("PATCH", message_path(mid), json={"seen": True})
    assert r.status_code == 200
    assert r.json == {"id": mid, "seen": True}
    assert env.get(message_path(mid)).json["seen"] is True
    assert env.get(message_path(other)).json["seen"] is False
    listed = {m["id"]: m["seen"] for m in env.get(messages_path()).json["items"]}
    assert listed == {mid: True, other: False}
    # merge-patch+json (with a charset) is accepted too, and seen can be unset.
    r = env.request("PATCH", message_path(mid), body=b'{"seen": false}',
                    headers={"Content-Type": "application/merge-patch+json; charset=utf-8"})
    assert r.status_code == 200 and r.json == {"id": mid, "seen": False}
    assert env.get(message_path(mid)).json["seen"] is False


def test_delete_then_not_found_and_counters(env):
    raws = [eml(subject="keep"), eml(subject="drop", attachments=(("x.txt", "text/plain", b"x"),))]
    keep, drop = env.deliver(*raws)
    box = env.store.mailbox(ADDRESS)
    assert (box.message_count, box.bytes_used) == (2, sum(len(r) for r in raws))

    r = env.request("DELETE", message_path(drop))
    assert r.status_code == 204
    assert r.content == b""
    for path in (message_path(drop), message_path(drop) + "/raw", message_path(drop) + "/attachments/0"):
        assert_error(env.get(path), 404, "message_not_found")
    assert_error(env.request("DELETE", message_path(drop)), 404, "message_not_found")
    assert [m["id"] for m in env.get(messages_path()).json["items"]] == [keep]
    box = env.store.mailbox(ADDRESS)
    assert (box.message_count, box.bytes_used) == (1, len(raws[0]))
    # The body and attachment rows went with the message.
    db = env.store.db
    assert db.execute_sql("SELECT COUNT(*) FROM message_body").fetchone()[0] == 1
    assert db.execute_sql("SELECT COUNT(*) FROM attachment").fetchone()[0] == 0


def test_message_set_aside_as_too_large(env):
    big = eml(subject="huge", text="x" * 5000)
    (mid,) = env.deliver(big, max_size=1024)
    items = env.get(messages_path()).json["items"]
    assert [m["id"] for m in items] == [mid]
    summary = items[0]
    assert "exceeds the 1024-byte limit" in summary["parse_error"]
    assert summary["size"] == len(big)
    detail = env.get(message_path(mid))
    assert detail.status_code == 200
    assert detail.json["parse_error"] == summary["parse_error"]
    assert detail.json["envelope"]["recipient"] == ADDRESS
    assert detail.json["attachments"] == []
    body = assert_error(env.get(message_path(mid) + "/raw"), 410, "raw_set_aside")
    assert "parse_error" in body["message"]
    assert_error(env.get(message_path(mid) + "/attachments/0"), 404)
    # The file itself was kept on the server, with its reason.
    aside = list((env.maildir / "setaside").iterdir())
    assert sorted(p.name.endswith(".reason") for p in aside) == [False, True]
    # It can still be marked seen and deleted.
    assert env.request("PATCH", message_path(mid), json={"seen": True}).status_code == 200
    assert env.request("DELETE", message_path(mid)).status_code == 204


def test_mail_without_trace_headers_lands_in_the_unrouted_mailbox(tmp_path):
    operator = "op-" + "x" * 30
    env = make_env(tmp_path, MTASIDECAR_API_OPERATOR_TOKEN=operator)
    (mid,) = env.deliver(eml(with_trace=False, subject="dropped by hand"))
    # It belongs to no domain: only the operator reads it.
    assert_error(env.get(message_path(mid, UNROUTED)), 401)
    r = env.get(message_path(mid, UNROUTED), headers={"Authorization": f"Bearer {operator}"})
    assert r.status_code == 200
    assert "routing_note" in r.json and "Postfix" in r.json["routing_note"]
    assert_error(env.get(messages_path()), 404, "mailbox_not_found")


# -- bad input: every one answers 4xx with a JSON error ---------------------------------------

ID1 = "000000000000000000000001"
NO_SUCH_ID = "0000000000000000000f4240"  # well-formed, nothing has it


@dataclass(frozen=True)
class Bad:
    method: str
    path: str  # {mid}: the id of the message that exists; {mb}: its mailbox's path prefix
    status: int
    code: str | None
    params: dict | None = None
    body: bytes | None = None
    headers: dict | None = None


def _json(body) -> dict:
    return {"body": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


MB = "/api/v1/mailboxes/inbox@example.test/messages"
BAD_REQUESTS = {
    # ids
    "id letters": Bad("GET", MB + "/xyz", 400, "malformed_id"),
    "id 25 hex digits": Bad("GET", MB + "/" + "0" * 24 + "1", 400, "malformed_id"),
    "id 23 hex digits": Bad("GET", MB + "/" + "0" * 22 + "1", 400, "malformed_id"),
    "id negative": Bad("GET", MB + "/-1", 400, "malformed_id"),
    "id negative 24": Bad("GET", MB + "/-00000000000000000000001", 400, "malformed_id"),
    "id upper case": Bad("GET", MB + "/00000000000000000000000A", 400, "malformed_id"),
    "id malformed on raw": Bad("GET", MB + "/xyz/raw", 400, "malformed_id"),
    "id malformed on delete": Bad("DELETE", MB + "/xyz", 400, "malformed_id"),
    "id malformed on patch": Bad("PATCH", MB + "/xyz", 400, "malformed_id", **_json({"seen": True})),
    "id malformed on attachment": Bad("GET", MB + "/xyz/attachments/0", 400, "malformed_id"),
    "id unknown": Bad("GET", MB + "/" + NO_SUCH_ID, 404, "message_not_found"),
    "id unknown raw": Bad("GET", MB + "/" + NO_SUCH_ID + "/raw", 404, "message_not_found"),
    "id unknown delete": Bad("DELETE", MB + "/" + NO_SUCH_ID, 404, "message_not_found"),
    "id unknown patch": Bad("PATCH", MB + "/" + NO_SUCH_ID, 404, "message_not_found", **_json({"seen": True})),
    "id unknown attachment": Bad("GET", MB + "/" + NO_SUCH_ID + "/attachments/0", 404, "message_not_found"),
    # mailboxes and addresses
    "mailbox unknown": Bad("GET", "/api/v1/mailboxes/nobody@example.test/messages", 404, "mailbox_not_found"),
    "mailbox unknown item": Bad("GET", "/api/v1/mailboxes/nobody@example.test/messages/" + ID1, 404,
                                "mailbox_not_found"),
    "address without @": Bad("GET", "/api/v1/mailboxes/not-an-address/messages", 400, "malformed_address"),
    "address two @": Bad("GET", "/api/v1/mailboxes/a@b@example.test/messages", 400, "malformed_address"),
    "address space": Bad("GET", "/api/v1/mailboxes/a b@example.test/messages", 400, "malformed_address"),
    "address bad domain": Bad("GET", "/api/v1/mailboxes/a@exa_mple.test/messages", 400, "malformed_address"),
    "address long local": Bad("GET", f"/api/v1/mailboxes/{'a' * 65}@example.test/messages", 400,
                              "malformed_address"),
    "address too long": Bad("GET", f"/api/v1/mailboxes/a@{'b' * 330}.test/messages", 400, "malformed_address"),
    "address malformed item": Bad("GET", "/api/v1/mailboxes/nope/messages/" + ID1, 400, "malformed_address"),
    # list parameters
    "cursor junk": Bad("GET", MB, 400, "bad_cursor", params={"cursor": "!!!"}),
    "cursor base64 junk": Bad("GET", MB, 400, "bad_cursor",
                              params={"cursor": base64.urlsafe_b64encode(b"\xff\xfe junk").decode()}),
    "cursor wrong version": Bad("GET", MB, 400, "bad_cursor",
                                params={"cursor": base64.urlsafe_b64encode(b"v2:5").decode()}),
    "cursor not a number": Bad("GET", MB, 400, "bad_cursor",
                               params={"cursor": base64.urlsafe_b64encode(b"v1:abc").decode()}),
    "limit 0": Bad("GET", MB, 400, "bad_limit", params={"limit": "0"}),
    "limit 1000000": Bad("GET", MB, 400, "bad_limit", params={"limit": "1000000"}),
    "limit above max": Bad("GET", MB, 400, "bad_limit", params={"limit": "101"}),
    "limit abc": Bad("GET", MB, 400, "bad_limit", params={"limit": "abc"}),
    "limit negative": Bad("GET", MB, 400, "bad_limit", params={"limit": "-5"}),
    "limit fraction": Bad("GET", MB, 400, "bad_limit", params={"limit": "2.5"}),
    "auth filter junk": Bad("GET", MB, 400, "bad_auth_filter", params={"auth": "yes"}),
    "auth filter case": Bad("GET", MB, 400, "bad_auth_filter", params={"auth": "PASS"}),
    # PATCH bodies
    "patch bad json": Bad("PATCH", MB + "/{mid}", 400, "malformed_json", body=b'{"seen": tru',
                          headers={"Content-Type": "application/json"}),
    "patch not utf-8": Bad("PATCH", MB + "/{mid}", 400, "malformed_json", body=b"\xff\xfe{",
                           headers={"Content-Type": "application/json"}),
    "patch json array": Bad("PATCH", MB + "/{mid}", 422, "invalid_body", **_json([{"seen": True}])),
    "patch json string": Bad("PATCH", MB + "/{mid}", 422, "invalid_body", **_json("seen")),
    "patch empty body": Bad("PATCH", MB + "/{mid}", 422, "invalid_body", body=b"",
                            headers={"Content-Type": "application/json"}),
    "patch text/plain": Bad("PATCH", MB + "/{mid}", 415, "unsupported_media_type", body=b'{"seen": true}',
                            headers={"Content-Type": "text/plain"}),
    "patch no content type": Bad("PATCH", MB + "/{mid}", 415, "unsupported_media_type", body=b'{"seen": true}'),
    "patch form": Bad("PATCH", MB + "/{mid}", 415, "unsupported_media_type", body=b"seen=true",
                      headers={"Content-Type": "application/x-www-form-urlencoded"}),
    "patch seen yes": Bad("PATCH", MB + "/{mid}", 422, "invalid_seen", **_json({"seen": "yes"})),
    "patch seen 1": Bad("PATCH", MB + "/{mid}", 422, "invalid_seen", **_json({"seen": 1})),
    "patch seen null": Bad("PATCH", MB + "/{mid}", 422, "invalid_seen", **_json({"seen": None})),
    "patch seen missing": Bad("PATCH", MB + "/{mid}", 422, "invalid_seen", **_json({})),
    "patch unknown field": Bad("PATCH", MB + "/{mid}", 422, "unknown_field", **_json({"seen": True, "subject": "x"})),
    "patch huge body": Bad("PATCH", MB + "/{mid}", 413, "body_too_large",
                           body=b'{"seen": true, "pad": "' + b"x" * MAX_BODY + b'"}',
                           headers={"Content-Type": "application/json"}),
    # methods and routes
    "put message": Bad("PUT", MB + "/{mid}", 405, "method_not_allowed", **_json({"seen": True})),
    "post message": Bad("POST", MB + "/{mid}", 405, "method_not_allowed"),
    "post domains": Bad("POST", "/api/v1/domains", 405, "method_not_allowed", **_json({"name": "x.test"})),
    "delete domains": Bad("DELETE", "/api/v1/domains", 405, "method_not_allowed"),
    "post messages": Bad("POST", MB, 405, "method_not_allowed"),
    "delete messages": Bad("DELETE", MB, 405, "method_not_allowed"),
    "patch raw": Bad("PATCH", MB + "/{mid}/raw", 405, "method_not_allowed"),
    "delete attachment": Bad("DELETE", MB + "/{mid}/attachments/0", 405, "method_not_allowed"),
    "put healthz": Bad("PUT", "/healthz", 405, "method_not_allowed"),
    "unknown route": Bad("GET", "/api/v1/nothing-here", 404, "not_found"),
    "unknown route deep": Bad("GET", MB + "/{mid}/raw/more", 404, "not_found"),
    "unknown api version": Bad("GET", "/api/v2/domains", 404, "not_found"),
    "root": Bad("GET", "/", 404, "not_found"),
    "mailbox subroute unknown": Bad("GET", "/api/v1/mailboxes/inbox@example.test/nothing", 404, "not_found"),
    # attachments
    "attachment out of range": Bad("GET", MB + "/{mid}/attachments/1", 404, "attachment_not_found"),
    "attachment far out of range": Bad("GET", MB + "/{mid}/attachments/999999", 404, "attachment_not_found"),
    "attachment abc": Bad("GET", MB + "/{mid}/attachments/abc", 400, "malformed_index"),
    "attachment negative": Bad("GET", MB + "/{mid}/attachments/-1", 400, "malformed_index"),
    "attachment too many digits": Bad("GET", MB + "/{mid}/attachments/1234567", 400, "malformed_index"),
}

# Regressions: each of these once reached the database or a header (500s,
# header injection) before the input checks were tightened.
REGRESSION_REQUESTS = {
    # A mail.tm-style ObjectId: 24 hex digits, well-formed, over 2**63.
    "id above 2**63": Bad("GET", MB + "/65a1b2c3d4e5f60718293a4b", 404, "message_not_found"),
    "id all f": Bad("DELETE", MB + "/ffffffffffffffffffffffff", 404, "message_not_found"),
    "cursor above 2**63": Bad("GET", MB, 400, "bad_cursor",
                              params={"cursor": base64.urlsafe_b64encode(b"v1:" + b"9" * 30).decode()}),
    "limit superscript two": Bad("GET", MB, 400, "bad_limit", params={"limit": "²"}),
    "limit 5000 digits": Bad("GET", MB, 400, "bad_limit", params={"limit": "1" * 5000}),
    "attachment superscript two": Bad("GET", MB + "/{mid}/attachments/²", 400, "malformed_index"),
    "patch deeply nested json": Bad("PATCH", MB + "/{mid}", 400, "malformed_json", body=b"[" * 50_000,
                                    headers={"Content-Type": "application/json"}),
    "id with trailing newline": Bad("GET", MB + "/{mid}%0A", 400, "malformed_id"),
    "id with trailing newline on raw": Bad("GET", MB + "/{mid}%0A/raw", 400, "malformed_id"),
}


def _cases():
    for name, bad in {**BAD_REQUESTS, **REGRESSION_REQUESTS}.items():
        yield pytest.param(bad, id=name)


def send(env: Env, bad: Bad, mid: str):
    return env.request(bad.method, bad.path.replace("{mid}", mid), params=bad.params, body=bad.body,
                       headers=bad.headers)


@pytest.fixture
def env_with_mail(env):
    """A mailbox with one message that has exactly one attachment."""
    (mid,) = env.deliver(eml(attachments=(("one.txt", "text/plain", b"one"),)))
    env.mid = mid
    return env


@pytest.mark.parametrize("bad", list(_cases()))
def test_bad_request_answers_json_error(env_with_mail, bad):
    r = send(env_with_mail, bad, env_with_mail.mid)
    assert_error(r, bad.status, bad.code)
    if bad.status == 405:
        allowed = {m.strip() for m in r.headers["allow"].split(",")}
        assert bad.method not in allowed and "GET" in allowed
    # Nothing bad input does may change the message.
    m = env_with_mail.get(message_path(env_with_mail.mid))
    assert m.status_code == 200 and m.json["seen"] is False


def test_error_answers_are_json_whatever_the_client_accepts(env):
    for accept in ("text/html", "application/xml", "*/*"):
        assert_error(env.get("/nope", headers={"Accept": accept}), 404, "not_found")
        assert_error(env.get(messages_path(), headers={"Accept": accept}), 404, "mailbox_not_found")


def test_head_is_not_allowed(env):
    r = env.request("HEAD", "/api/v1/domains")
    assert r.status_code == 405
