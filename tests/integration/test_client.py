"""The Python client against the real service: create, wait_for, inbox handlers over SSE."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from mtasidecar.client import ApiError, Client

from ..conftest import service_dir, start_service, stop_service, wait_for

VERIFY = (b"From: GitHub <noreply@github.com>\r\nTo: {to}\r\nSubject: Confirm your email\r\n"
          b"Content-Type: text/html; charset=utf-8\r\n\r\n"
          b"<p>Your verification code is <b>482913</b>.</p>"
          b'<p><a href="https://github.com/confirm?token=abc123&amp;x=1">Verify email address</a></p>'
          b'<p><a href="https://github.com/settings/unsubscribe">Unsubscribe</a></p>\r\n')


def plain(sender: str, to: str, subject: str) -> bytes:
    return f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


@pytest.fixture(scope="module")
def svc():
    base = service_dir()
    service = start_service(base / "data", ["pub.test"], private=["*.priv.test"])
    try:
        yield service
    finally:
        stop_service(service)
        shutil.rmtree(base, ignore_errors=True)


def later(delay: float, fn, *args):
    t = threading.Timer(delay, fn, args)
    t.start()
    return t


def test_sign_up_and_confirm(svc):
    client = Client(svc.base)
    mb = client.create_mailbox(domain="priv.test", subdomain="random")
    assert mb.address.endswith(".priv.test") and mb.token.startswith("mts_")
    # The sign-up "sends" its mail a little later; an unrelated mail first.
    later(0.3, svc.send, "news@example.org", [mb.address], plain("news@example.org", mb.address, "Weekly news"))
    later(0.6, svc.send, "noreply@github.com", [mb.address], VERIFY.replace(b"{to}", mb.address.encode()))
    msg = mb.wait_for(sender="github.com", timeout=60)
    assert msg.subject == "Confirm your email"
    assert msg.sender == "noreply@github.com"
    assert msg.recipients == [mb.address]
    assert msg.codes[0]["value"] == "482913"
    assert msg.detail["best_link"]["url"] == "https://github.com/confirm?token=abc123&x=1"
    assert b"Subject: Confirm your email" in msg.raw
    assert msg.raw.startswith(b"Return-Path: <noreply@github.com>")
    # The filter did skip the first mail, which is there too.
    assert {m.subject for m in mb.messages()} == {"Confirm your email", "Weekly news"}


def test_wait_for_times_out_and_honours_after(svc):
    client = Client(svc.base)
    mb = client.create_mailbox(domain="priv.test")
    with pytest.raises(TimeoutError):
        mb.wait_for(subject="never", timeout=1.5)
    svc.send("a@example.org", [mb.address], plain("a@example.org", mb.address, "first"))
    first = mb.wait_for(timeout=30)
    later(0.3, svc.send, "a@example.org", [mb.address], plain("a@example.org", mb.address, "second"))
    second = mb.wait_for(after=first.id, timeout=30)
    assert (first.subject, second.subject) == ("first", "second")


def test_bad_token_is_an_api_error(svc):
    client = Client(svc.base)
    mb = client.create_mailbox(domain="priv.test")
    stranger = client.mailbox(mb.address, token="mts_" + "A" * 32)
    with pytest.raises(ApiError) as err:
        stranger.messages()
    assert err.value.status == 404 and err.value.code == "mailbox_not_found"


def test_inbox_handlers_once_each_across_reconnects(svc):
    client = Client(svc.base)
    mb = client.create_mailbox(domain="priv.test")
    inbox = client.inbox(mb, after="0" * 24)  # everything: no race with the stream opening
    seen_sync, seen_async = [], []

    @inbox.message
    def on_message(msg):
        seen_sync.append(msg.subject)

    @inbox.message
    async def on_message_async(msg):
        seen_async.append(msg.id)

    runner = threading.Thread(target=inbox.run, kwargs={"reconnect_delay": 0.2}, daemon=True)
    runner.start()
    try:
        for i in range(3):
            svc.send("a@example.org", [mb.address], plain("a@example.org", mb.address, f"m{i}"))
        wait_for(lambda: len(seen_sync) >= 3, 30, what="three messages over SSE")
        # Drop the connection under the inbox: it must resume after m2, not replay.
        inbox._conn.sock.shutdown(2)
        for i in range(3, 5):
            svc.send("a@example.org", [mb.address], plain("a@example.org", mb.address, f"m{i}"))
        wait_for(lambda: len(seen_sync) >= 5, 30, what="two more after a reconnect")
        time.sleep(0.5)
    finally:
        inbox.stop()
        runner.join(10)
    assert seen_sync == ["m0", "m1", "m2", "m3", "m4"]
    assert len(seen_async) == 5 and len(set(seen_async)) == 5
