"""Native REST resources for domains, mailboxes and messages.

Resources are thin: they check input, ask the Store (in a worker thread, so
the event loop never waits on SQLite) and shape the answer via ``views``.
Which mailbox a request may touch is decided in one place,
:meth:`access.Access.mailbox`.
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import quote

import falcon
from falcon.asgi import SSEvent

from ..mail.parse import attachment_bytes
from ..store import MessageFilter, Store
from . import views
from .access import Access
from .errors import ApiError, bad_request, not_found, unprocessable
from .inputs import json_body, page_limit
from .waiting import Watcher

run = asyncio.to_thread



def _auth_filter(req) -> bool | None:
    value = req.get_param("auth")
    if value is None:
        return None
    if value not in ("pass", "fail"):
        raise bad_request("auth must be 'pass' (DMARC pass or DKIM pass for the From domain) or 'fail'",
                          "bad_auth_filter")
    return value == "pass"


def _quarantined_filter(req) -> bool:
    """?quarantined=true lists only quarantined messages; false (the default) hides them."""
    value = req.get_param("quarantined")
    if value is None or value == "false":
        return False
    if value != "true":
        raise bad_request("quarantined must be 'true' (only quarantined messages) or 'false'",
                          "bad_quarantined")
    return True


class Health:
    def __init__(self, store: Store):
        self.store = store

    async def on_get(self, req, resp):
        await run(self.store.max_message_id)  # proves the database answers
        resp.media = {"status": "ok"}


MAX_WAIT = 300
_FILTER_TEXT_MAX = 320


def _text_param(req, name: str) -> str | None:
    value = req.get_param(name)
    if value is not None and (not value or len(value) > _FILTER_TEXT_MAX):
        raise bad_request(f"{name} must be 1 to {_FILTER_TEXT_MAX} characters", f"bad_{name}")
    return value


def message_filter(req) -> MessageFilter | None:
    """?after=ID&from=&subject=&to=&has=code|link, or None when none is given."""
    after, has = req.get_param("after"), req.get_param("has")
    if has not in (None, "code", "link"):
        raise bad_request("has must be 'code' or 'link'", "bad_has")
    f = MessageFilter(
        after_id=views.parse_id(after, "after id") if after is not None else None,
        sender=_text_param(req, "from"), subject=_text_param(req, "subject"),
        recipient=_text_param(req, "to"),
        has_code=True if has == "code" else None, has_link=True if has == "link" else None)
    return f if f != MessageFilter() else None


def _wait_seconds(req) -> float | None:
    text = req.get_param("wait")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 4 or int(text) > MAX_WAIT:
        raise bad_request(f"wait must be whole seconds from 0 to {MAX_WAIT}", "bad_wait")
    return float(text)


class MessageList:
    """The list, and long-polling: ?wait=S holds the answer until a matching message arrives."""

    def __init__(self, store: Store, access: Access, max_page: int, watcher: Watcher):
        self.store, self.access, self.max_page, self.watcher = store, access, max_page, watcher

    async def on_get(self, req, resp, address):
        mailbox = await self.access.mailbox(req, address)
        limit = page_limit(req, min(30, self.max_page), self.max_page)
        cursor = req.get_param("cursor")
        before = views.decode_cursor(cursor) if cursor else None
        auth, filters, wait = _auth_filter(req), message_filter(req), _wait_seconds(req)
        quarantined = _quarantined_filter(req)

        def query():
            return self.store.list_messages(mailbox.id, limit + 1, before, auth, filters, quarantined)

        if wait:
            rows = await self.watcher.rows_when_ready(mailbox.id, query, wait)
        else:
            rows = await run(query)
        more = len(rows) > limit
        rows = rows[:limit]
        base = f"/api/v1/mailboxes/{quote(mailbox.address)}/messages"
        resp.media = {
            "items": [views.message_summary(r, base) for r in rows],
            "next_cursor": views.encode_cursor(rows[-1]["id"]) if more else None,
        }


class MessageEvents:
    """GET .../events: Server-Sent Events, one ``message`` event per new message.

    Resumes after ``Last-Event-ID`` (or ?after=ID); without either, only mail
    arriving from now on is sent. A comment every ``HEARTBEAT`` seconds keeps
    proxies from closing the stream and tells us when the client is gone.
    """

    HEARTBEAT = 15.0

    def __init__(self, store: Store, access: Access, watcher: Watcher):
        self.store, self.access, self.watcher = store, access, watcher

    async def on_get(self, req, resp, address):
        mailbox = await self.access.mailbox(req, address)
        resume = req.get_header("Last-Event-ID") or req.get_param("after")
        after = views.parse_id(resume, "Last-Event-ID") if resume else None
        if after is None:
            after = await run(self.store.max_message_id)
        base = f"/api/v1/mailboxes/{quote(mailbox.address)}/messages"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")  # nginx: pass events through at once
        resp.sse = self._events(mailbox.id, after, base)

    async def _events(self, mailbox_id: int, after: int, base: str):
        # First bytes at once: the client knows the stream is open.
        yield SSEvent(comment="mtasidecar events", retry=3000)
        while True:
            rows = await self.watcher.rows_when_ready(
                mailbox_id, lambda: self.store.list_messages(mailbox_id, 100, filters=MessageFilter(after_id=after)),
                self.HEARTBEAT)
            if not rows:
                yield SSEvent(comment="keep-alive")
                continue
            for row in reversed(rows):  # oldest first
                after = row["id"]
                yield SSEvent(event="message", event_id=views.format_id(row["id"]),
                              json=views.message_summary(row, base))


class MessageItem:
    def __init__(self, store: Store, access: Access):
        self.store, self.access = store, access

    async def _target(self, req, address, message_id):
        mailbox = await self.access.mailbox(req, address)
        return mailbox, views.parse_id(message_id)

    async def on_get(self, req, resp, address, message_id):
        mailbox, mid = await self._target(req, address, message_id)
        row = await run(self.store.get_message, mailbox.id, mid)
        if row is None:
            raise not_found(f"no message {message_id} in {mailbox.address}", "message_not_found")
        resp.media = views.message_detail(row, f"/api/v1/mailboxes/{quote(mailbox.address)}/messages")

    async def on_patch(self, req, resp, address, message_id):
        mailbox, mid = await self._target(req, address, message_id)
        body = await json_body(req)
        unknown = set(body) - {"seen"}
        if unknown:
            raise unprocessable(f"unknown field(s): {', '.join(sorted(unknown))}; only 'seen' can change",
                                "unknown_field")
        if not isinstance(body.get("seen"), bool):
            raise unprocessable("'seen' must be true or false", "invalid_seen")
        if not await run(self.store.set_seen, mailbox.id, mid, body["seen"]):
            raise not_found(f"no message {message_id} in {mailbox.address}", "message_not_found")
        resp.media = {"id": message_id, "seen": body["seen"]}

    async def on_delete(self, req, resp, address, message_id):
        mailbox, mid = await self._target(req, address, message_id)
        if not await run(self.store.delete_message, mailbox.id, mid):
            raise not_found(f"no message {message_id} in {mailbox.address}", "message_not_found")
        resp.status = falcon.HTTP_204


class MessageExtract:
    """GET .../links and .../codes: what extraction found, best first for codes."""

    def __init__(self, store: Store, access: Access, key: str):
        self.store, self.access, self.key = store, access, key

    async def on_get(self, req, resp, address, message_id):
        mailbox = await self.access.mailbox(req, address)
        row = await run(self.store.get_message, mailbox.id, views.parse_id(message_id))
        if row is None:
            raise not_found(f"no message {message_id} in {mailbox.address}", "message_not_found")
        best = "best_link" if self.key == "links" else "best_code"
        resp.media = {"items": row["document"].get(self.key, []), best: row["document"].get(best)}


class MessageRaw:
    def __init__(self, store: Store, access: Access):
        self.store, self.access = store, access

    async def on_get(self, req, resp, address, message_id):
        mailbox = await self.access.mailbox(req, address)
        found, raw = await run(self.store.get_raw, mailbox.id, views.parse_id(message_id))
        if not found:
            raise not_found(f"no message {message_id} in {mailbox.address}", "message_not_found")
        if raw is None:
            raise ApiError(410, "raw_set_aside", "this message was too large to store; its file was set "
                           "aside on the server (see parse_error)")
        resp.content_type = "message/rfc822"
        resp.data = raw
        resp.set_header("Content-Disposition", f'attachment; filename="{message_id}.eml"')
        resp.set_header("X-Content-Type-Options", "nosniff")


class MessageAttachment:
    def __init__(self, store: Store, access: Access):
        self.store, self.access = store, access

    async def on_get(self, req, resp, address, message_id, index):
        mailbox = await self.access.mailbox(req, address)
        if not (index.isascii() and index.isdigit()) or len(index) > 6:
            raise bad_request(f"malformed attachment number {index!r}", "malformed_index")
        mid = views.parse_id(message_id)
        reason = await run(self.store.attachment_blocked, mailbox.id, mid, int(index))
        if reason:
            raise ApiError(403, "attachment_blocked", f"not served: {reason}; it is still in the raw message")
        found, raw = await run(self.store.get_raw, mailbox.id, mid)
        if not found or raw is None:
            raise not_found(f"no message {message_id} in {mailbox.address}", "message_not_found")
        hit = await run(attachment_bytes, raw, int(index))
        if hit is None:
            raise not_found(f"message {message_id} has no attachment {index}", "attachment_not_found")
        meta, data = hit
        resp.data = data
        resp.content_type = meta.content_type or "application/octet-stream"
        resp.set_header("Content-Disposition", _disposition(meta.filename or f"attachment-{index}"))
        # Mail content never runs in our origin: no sniffing, no scripts.
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Content-Security-Policy", "sandbox; default-src 'none'")


def _disposition(filename: str) -> str:
    ascii_name = re.sub(r'[^A-Za-z0-9._ -]', "_", filename)[:200] or "attachment"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
