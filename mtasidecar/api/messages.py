"""Native REST resources for domains, mailboxes and messages.

Resources are thin: they check input, ask the Store (in a worker thread, so
the event loop never waits on SQLite) and shape the answer via ``views``.
Which mailbox a request may touch is decided in one place,
:meth:`Access.mailbox`.
"""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import quote

import falcon

from ..mail.parse import attachment_bytes
from ..store import Store
from . import views
from .errors import ApiError, bad_request, not_found, unprocessable

run = asyncio.to_thread

_ADDRESS_RE = re.compile(r"^[^@\s]{1,64}@[a-z0-9.-]{1,253}$")
JSON_TYPES = ("application/json", "application/merge-patch+json")
MAX_BODY = 64 * 1024


class Access:
    """Resolves the mailbox a request names. The single place access is decided."""

    def __init__(self, store: Store):
        self.store = store

    async def mailbox(self, req, address: str):
        address = address.lower()
        if len(address) > 320 or not _ADDRESS_RE.match(address):
            raise bad_request(f"malformed address {address!r}", "malformed_address")
        mailbox = await run(self.store.mailbox, address)
        if mailbox is None:
            raise not_found(f"no mailbox {address}", "mailbox_not_found")
        return mailbox


def _limit(req, default: int, maximum: int) -> int:
    text = req.get_param("limit")
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or not 1 <= int(text) <= maximum:
        raise bad_request(f"limit must be a whole number from 1 to {maximum}", "bad_limit")
    return int(text)


def _auth_filter(req) -> bool | None:
    value = req.get_param("auth")
    if value is None:
        return None
    if value not in ("pass", "fail"):
        raise bad_request("auth must be 'pass' (DMARC pass or DKIM pass for the From domain) or 'fail'",
                          "bad_auth_filter")
    return value == "pass"


class Health:
    def __init__(self, store: Store):
        self.store = store

    async def on_get(self, req, resp):
        await run(self.store.max_message_id)  # proves the database answers
        resp.media = {"status": "ok"}


class Domains:
    def __init__(self, store: Store):
        self.store = store

    async def on_get(self, req, resp):
        rows = await run(self.store.list_domains)
        resp.media = {"items": [{"id": views.format_id(d.id), "name": d.name, "subdomains": d.subdomains}
                                for d in rows]}


class MessageList:
    def __init__(self, store: Store, access: Access, max_page: int):
        self.store, self.access, self.max_page = store, access, max_page

    async def on_get(self, req, resp, address):
        mailbox = await self.access.mailbox(req, address)
        limit = _limit(req, min(30, self.max_page), self.max_page)
        cursor = req.get_param("cursor")
        before = views.decode_cursor(cursor) if cursor else None
        rows = await run(self.store.list_messages, mailbox.id, limit + 1, before, _auth_filter(req))
        more = len(rows) > limit
        rows = rows[:limit]
        base = f"/api/v1/mailboxes/{quote(mailbox.address)}/messages"
        resp.media = {
            "items": [views.message_summary(r, base) for r in rows],
            "next_cursor": views.encode_cursor(rows[-1]["id"]) if more else None,
        }


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
        body = await _json_body(req)
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
        found, raw = await run(self.store.get_raw, mailbox.id, views.parse_id(message_id))
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


async def _json_body(req) -> dict:
    ctype = (req.content_type or "").split(";", 1)[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"send JSON (Content-Type: application/json), not {ctype or 'nothing'}")
    if (req.content_length or 0) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"request body over {MAX_BODY} bytes")
    raw = await req.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "malformed_json") from None
    if not isinstance(body, dict):
        raise unprocessable("request body must be a JSON object", "invalid_body")
    return body
