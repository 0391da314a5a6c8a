"""Webhooks of a mailbox, their deliveries, and the operator's view of all deliveries.

Who may touch a mailbox's webhooks is who may touch the mailbox
(:meth:`access.Access.mailbox`): its token, the operator, or anyone on a
public domain. The secret is shown once, in the answer to the creation.
The sender itself is ``mtasidecar webhooks`` (mtasidecar/webhooks.py).
"""

from __future__ import annotations

import asyncio
import secrets
from urllib.parse import quote

import falcon

from .. import webhooks
from ..config import Settings
from ..store import Store
from . import views
from .access import Access
from .errors import ApiError, bad_request, not_found, unprocessable
from .inputs import json_body, page_limit

run = asyncio.to_thread

MAX_WEBHOOKS_PER_MAILBOX = 10
CREATE_FIELDS = {"url", "secret"}
SECRET_MIN, SECRET_MAX = 16, 256
STATUSES = ("pending", "delivered", "failed")
# A lookup that hangs must not hold the request: the URL is refused instead.
RESOLVE_TIMEOUT = 5.0


def webhook_path(address: str, webhook_id: int | None = None) -> str:
    path = f"/api/v1/mailboxes/{quote(address)}/webhooks"
    return path if webhook_id is None else f"{path}/{views.format_id(webhook_id)}"


def webhook_view(hook, address: str) -> dict:
    return {
        "id": views.format_id(hook.id),
        "url": hook.url,
        "created_at": views.format_time(hook.created_at),
        "deliveries_url": webhook_path(address, hook.id) + "/deliveries",
    }


def delivery_view(row: dict, admin: bool = False) -> dict:
    out = {
        "id": views.format_id(row["id"]),
        "message_id": views.format_id(row["message_id"]),
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "next_attempt_at": views.format_time(row["next_attempt_at"]) if row["status"] == "pending" else None,
        "created_at": views.format_time(row["created_at"]),
        "delivered_at": views.format_time(row["delivered_at"]),
    }
    if admin:
        out.update(mailbox=row["address"], url=row["url"],
                   webhook_id=views.format_id(row["webhook"]) if row["webhook"] is not None else None)
    return out


def _webhook_id(text: str) -> int:
    try:
        return views.parse_id(text, "webhook id")
    except ApiError as exc:
        if exc.code == "message_not_found":  # well formed, but too large for any row
            raise not_found(f"no webhook {text}", "webhook_not_found") from None
        raise


async def _page(req, store_call, max_page: int, admin: bool = False, **filters) -> dict:
    limit = page_limit(req, min(30, max_page), max_page)
    cursor = req.get_param("cursor")
    before = views.decode_cursor(cursor) if cursor else None
    rows = await run(store_call, limit + 1, before, **filters)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": [delivery_view(r, admin) for r in rows],
            "next_cursor": views.encode_cursor(rows[-1]["id"]) if more else None}


class Webhooks:
    """GET / POST /api/v1/mailboxes/{address}/webhooks"""

    def __init__(self, store: Store, settings: Settings, access: Access, resolver=None):
        self.store, self.access = store, access
        self.allow_private = settings.webhooks.allow_private
        self.resolver = resolver  # None: the system's (looked up late, so tests can replace it)

    async def _check_url(self, url) -> str:
        problem = webhooks.url_problem(url)
        if problem:
            raise unprocessable(problem, "invalid_url")
        if not self.allow_private:
            host, port, _tls = webhooks.target(url)
            try:
                await asyncio.wait_for(webhooks.check_host(host, port, self.resolver or webhooks.system_resolver), RESOLVE_TIMEOUT)
            except webhooks.Refused as exc:
                raise unprocessable(str(exc), "url_not_allowed") from None
            except TimeoutError:
                raise unprocessable(f"cannot resolve {host} (no answer within {RESOLVE_TIMEOUT:g} s)",
                                    "url_not_allowed") from None
        return url

    @staticmethod
    def _secret(body: dict) -> str:
        secret = body.get("secret")
        if secret is None:
            return "whsec_" + secrets.token_urlsafe(32)
        if not isinstance(secret, str) or not SECRET_MIN <= len(secret) <= SECRET_MAX \
                or not secret.isascii() or not secret.isprintable():
            raise unprocessable(f"secret must be {SECRET_MIN} to {SECRET_MAX} printable ASCII characters "
                                "(or left out: one is generated)", "invalid_secret")
        return secret

    async def on_post(self, req, resp, address):
        mailbox = await self.access.mailbox(req, address)
        body = await json_body(req)
        unknown = set(body) - CREATE_FIELDS
        if unknown:
            raise unprocessable(f"unknown field(s): {', '.join(sorted(unknown))}", "unknown_field")
        if "url" not in body:
            raise unprocessable("url is required", "invalid_url")
        secret = self._secret(body)
        url = await self._check_url(body["url"])
        hook = await run(self.store.create_webhook, mailbox.id, url, secret, MAX_WEBHOOKS_PER_MAILBOX)
        if hook is None:
            raise unprocessable(f"a mailbox has at most {MAX_WEBHOOKS_PER_MAILBOX} webhooks",
                                "too_many_webhooks")
        resp.status = falcon.HTTP_201
        resp.location = webhook_path(mailbox.address, hook.id)
        resp.media = dict(webhook_view(hook, mailbox.address), secret=secret)

    async def on_get(self, req, resp, address):
        mailbox = await self.access.mailbox(req, address)
        hooks = await run(self.store.list_webhooks, mailbox.id)
        resp.media = {"items": [webhook_view(h, mailbox.address) for h in hooks]}


class WebhookItem:
    """GET / DELETE /api/v1/mailboxes/{address}/webhooks/{webhook_id}"""

    def __init__(self, store: Store, access: Access):
        self.store, self.access = store, access

    async def _get(self, req, address, webhook_id):
        mailbox = await self.access.mailbox(req, address)
        wid = _webhook_id(webhook_id)
        hook = await run(self.store.get_webhook, mailbox.id, wid)
        if hook is None:
            raise not_found(f"no webhook {webhook_id}", "webhook_not_found")
        return mailbox, hook

    async def on_get(self, req, resp, address, webhook_id):
        mailbox, hook = await self._get(req, address, webhook_id)
        resp.media = webhook_view(hook, mailbox.address)

    async def on_delete(self, req, resp, address, webhook_id):
        mailbox = await self.access.mailbox(req, address)
        if not await run(self.store.delete_webhook, mailbox.id, _webhook_id(webhook_id)):
            raise not_found(f"no webhook {webhook_id}", "webhook_not_found")
        resp.status = falcon.HTTP_204


class WebhookDeliveries:
    """GET /api/v1/mailboxes/{address}/webhooks/{webhook_id}/deliveries (newest first)"""

    def __init__(self, store: Store, access: Access, max_page: int):
        self.item = WebhookItem(store, access)
        self.store, self.max_page = store, max_page

    async def on_get(self, req, resp, address, webhook_id):
        _mailbox, hook = await self.item._get(req, address, webhook_id)
        resp.media = await _page(req, self.store.list_deliveries, self.max_page, webhook_id=hook.id,
                                 status=_status(req))


class AdminDeliveries:
    """GET /api/v1/admin/deliveries?status=pending|delivered|failed (operator; every webhook)"""

    def __init__(self, store: Store, access: Access, max_page: int):
        self.store, self.access, self.max_page = store, access, max_page

    async def on_get(self, req, resp):
        self.access.require_operator(req)
        resp.media = await _page(req, self.store.list_deliveries, self.max_page, admin=True, status=_status(req))


def _status(req) -> str | None:
    status = req.get_param("status")
    if status is not None and status not in STATUSES:
        raise bad_request(f"status must be one of {', '.join(STATUSES)}", "bad_status")
    return status


def register(app, store: Store, settings: Settings, access: Access) -> None:
    mb = "/api/v1/mailboxes/{address}/webhooks"
    max_page = settings.api.max_page_size
    app.add_route(mb, Webhooks(store, settings, access))
    app.add_route(f"{mb}/{{webhook_id}}", WebhookItem(store, access))
    app.add_route(f"{mb}/{{webhook_id}}/deliveries", WebhookDeliveries(store, access, max_page))
    app.add_route("/api/v1/admin/deliveries", AdminDeliveries(store, access, max_page))
