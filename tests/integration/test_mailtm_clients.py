"""Two unmodified mail.tm client libraries from PyPI against the real service.

`mtasidecar dev` (private Postfix, ingester, gunicorn) with a public and a
private domain; mail is sent with smtplib through the real Postfix. Each
client only gets its base URL changed, through the class attribute it has
for that:

- pymailtm (``MailTm.api_address``): domains, account, token, list and read.
  It has no call for a message's source, seen flag or deletion: those steps
  use plain HTTP with the client's own ``auth_headers``.
- mailtm-python (``MailTMClient.BASE_URL``): the whole flow through its own
  calls, including its PATCH without a body (mark seen) and its
  ``/attachments`` calls, which mail.tm itself does not have.

Neither client subscribes to the Mercure hub, so the Server-Sent Events step
uses a plain HTTP reader with the token mailtm-python obtained.
"""

from __future__ import annotations

import http.client
import json
import smtplib
import time
from email.message import EmailMessage

import pytest
import requests
# Test dependencies (pyproject's [test] extra): a missing one fails, never skips.
from mailtm import MailTMClient
from pymailtm.pymailtm import CouldNotGetMessagesException, MailTm

from tests.conftest import running_service, wait_for

pytestmark = pytest.mark.timeout(300)

PUBLIC, PRIVATE = "pub.test", "priv.test"
PASSWORD = "s3cret-enough"


@pytest.fixture(scope="module")
def svc():
    with running_service([PUBLIC], private=[PRIVATE]) as service:
        yield service


@pytest.fixture
def pymailtm_client(svc, tmp_path, monkeypatch):
    monkeypatch.setattr(MailTm, "api_address", svc.base)
    monkeypatch.setattr(MailTm, "db_file", str(tmp_path / "pymailtm.json"))  # not ~/.pymailtm
    return MailTm()


@pytest.fixture
def mailtm_python(svc, monkeypatch):
    monkeypatch.setattr(MailTMClient, "BASE_URL", svc.base)
    return MailTMClient


def send(svc, to: str, subject: str, attachment: bytes | None = None) -> None:
    m = EmailMessage()
    m["From"] = "Signup Bot <bot@example.org>"
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    m.set_content(f"Your code for {subject} is 482913.\n")
    m.add_alternative(f"<p>Your code for <b>{subject}</b> is 482913.</p>", subtype="html")
    if attachment is not None:
        m.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="data.bin")
    with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30) as smtp:
        smtp.sendmail("bot@example.org", [to], m.as_bytes())


# -- pymailtm ---------------------------------------------------------------------------------

def test_pymailtm_whole_flow(svc, pymailtm_client):
    # Its own account creation: a random name on a domain it picks from /domains.
    account = pymailtm_client.get_account(password=PASSWORD)
    local, _, domain = account.address.partition("@")
    assert domain in (PUBLIC, PRIVATE) and local
    assert len(account.id_) == 24
    assert account.auth_headers["Authorization"].startswith("Bearer mts_")  # Account() got a token

    assert account.get_messages() == []
    send(svc, account.address, "pymailtm hello")
    messages = wait_for(lambda: account.get_messages(), 60, 0.5, "pymailtm to list the mail")
    [msg] = messages
    assert msg.subject == "pymailtm hello"
    assert msg.from_ == {"address": "bot@example.org", "name": "Signup Bot"}
    assert msg.to == [{"address": account.address, "name": ""}]
    assert "482913" in msg.text and "<b>pymailtm hello</b>" in msg.html[0]
    assert msg.data["seen"] is False

    # Steps pymailtm has no call for: plain HTTP with the client's own headers.
    headers, base = account.auth_headers, account.api_address
    source = requests.get(f"{base}/sources/{msg.id_}", headers=headers, timeout=30)
    assert source.status_code == 200 and "Subject: pymailtm hello" in source.json()["data"]
    seen = requests.patch(f"{base}/messages/{msg.id_}", data=json.dumps({"seen": True}),
                          headers={**headers, "Content-Type": "application/merge-patch+json"}, timeout=30)
    assert seen.status_code == 200 and seen.json()["seen"] is True
    assert requests.delete(f"{base}/messages/{msg.id_}", headers=headers, timeout=30).status_code == 204
    assert account.get_messages() == []

    assert account.delete_account() is True
    with pytest.raises(CouldNotGetMessagesException, match="401"):
        account.get_messages()


# -- mailtm-python ----------------------------------------------------------------------------

def test_mailtm_python_whole_flow(svc, mailtm_python):
    domains = mailtm_python.get_domains()
    assert {d.domain for d in domains} == {PUBLIC, PRIVATE}
    private = next(d for d in domains if d.domain == PRIVATE)
    assert mailtm_python.get_domain_by_id(private.id).domain == PRIVATE

    address = f"signup-{int(time.time() * 1000)}@{PRIVATE}"
    created = mailtm_python.create_account(address, PASSWORD)
    assert created.address == address and created.used == 0 and created.a_type == "Account"
    with pytest.raises(requests.HTTPError) as taken:
        mailtm_python.create_account(address, PASSWORD)
    assert taken.value.response.status_code == 422

    client = mailtm_python(account=address, password=PASSWORD)  # POST /token, then GET /me
    assert client.token.startswith("mts_") and client.account.id == created.id
    assert client.get_account_by_id(created.id).address == address

    payload = bytes(range(256)) * 4
    send(svc, address, "mailtm-python hello", attachment=payload)
    [intro] = wait_for(lambda: client.get_messages(), 60, 0.2, "mailtm-python to list the mail")
    assert intro.subject == "mailtm-python hello" and intro.hasAttachments is True
    assert intro.accountId == f"/accounts/{created.id}" and intro.seen is False
    assert intro.from_.address == "bot@example.org"

    detail = client.get_message_by_id(intro.id)
    assert "482913" in detail.text and "<b>mailtm-python hello</b>" in detail.html[0]
    assert detail.msgid == "<mailtm-python-hello@example.org>"
    [att] = detail.attachments
    assert (att.filename, att.contentType, att.size) == ("data.bin", "application/octet-stream", len(payload))
    downloaded = client.session.get(f"{svc.base}{att.downloadUrl}", timeout=30)
    assert downloaded.status_code == 200 and downloaded.content == payload
    # mailtm-python's attachment calls (not mail.tm routes; we answer them anyway).
    assert [a.id for a in client.get_message_attachments(intro.id)] == [att.id]
    assert client.get_attachment(intro.id, att.id).filename == "data.bin"

    source = client.get_message_source(intro.id)
    assert source.id == intro.id and "Subject: mailtm-python hello" in source.data
    raw = client.session.get(f"{svc.base}{source.downloadUrl}", timeout=30)
    assert raw.headers["content-type"] == "message/rfc822" and raw.text == source.data

    assert client.mark_message_as_read(intro.id).seen is True  # a PATCH with no body
    assert client.get_messages()[0].seen is True
    assert client.get_account().used > 0

    # Both APIs see the same mailbox: the native one, with the same token.
    native = requests.get(f"{svc.base}/api/v1/mailboxes/{address}/messages",
                          headers={"Authorization": f"Bearer {client.token}"}, timeout=30)
    assert [m["id"] for m in native.json()["items"]] == [intro.id]

    assert client.delete_message(intro.id) is True
    assert client.get_messages() == []
    assert client.delete_account(created.id) is True
    with pytest.raises(requests.HTTPError) as gone:
        client.get_account()
    assert gone.value.response.status_code == 401


# -- the Mercure hub ----------------------------------------------------------------------------

class SseReader:
    """A minimal Server-Sent Events reader over http.client (neither client has one)."""

    def __init__(self, base: str, path: str, token: str, timeout: float = 30):
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}",
                                                "Accept": "text/event-stream"})
        self.response = self.conn.getresponse()

    def frame(self) -> dict:
        """The next frame that carries data: its fields (``data`` joined)."""
        fields: dict = {}
        while True:
            line = self.response.fp.readline()
            if not line:
                raise EOFError("the stream ended")
            line = line.decode().rstrip("\r\n")
            if not line:
                if "data" in fields:
                    return fields
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value

    def close(self) -> None:
        self.conn.close()


def test_new_message_arrives_over_the_hub(svc, mailtm_python):
    address = f"live-{int(time.time() * 1000)}@{PRIVATE}"
    created = mailtm_python.create_account(address, PASSWORD)
    client = mailtm_python(account=address, password=PASSWORD)
    link = client.session.get(f"{svc.base}/me", timeout=30).headers["link"]
    assert link == '</.well-known/mercure>; rel="mercure"'

    stream = SseReader(svc.base, f"/.well-known/mercure?topic=/accounts/{created.id}", client.token)
    try:
        assert stream.response.status == 200
        assert stream.response.getheader("content-type").startswith("text/event-stream")
        started = time.monotonic()
        send(svc, address, "over the hub")
        message = stream.frame()
        account = stream.frame()
        elapsed = time.monotonic() - started
    finally:
        stream.close()
    data = json.loads(message["data"])
    assert data["@type"] == "Message" and data["subject"] == "over the hub"
    assert data["accountId"] == f"/accounts/{created.id}" and message["id"] == data["id"]
    # The frame is the same message the client then reads.
    assert client.get_message_by_id(data["id"]).subject == "over the hub"
    acct = json.loads(account["data"])
    assert acct["@type"] == "Account" and acct["id"] == created.id and acct["used"] == data["size"]
    assert elapsed < 30
    client.delete_account(created.id)
