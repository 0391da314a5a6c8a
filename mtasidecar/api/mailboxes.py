"""Mailbox lifecycle: create (token shown once), read, extend, delete; operator views."""

from __future__ import annotations

import asyncio
import re
import secrets
import string
import time
from urllib.parse import quote

import falcon

from .. import tokens
from ..config import DomainSettings, Settings
from ..store import Store
from . import views
from .access import Access
from .errors import ApiError, unprocessable
from .inputs import json_body, page_limit
from .ratelimit import Limiter, client_ip

run = asyncio.to_thread

# RFC 5321 dot-atom, lower-cased (we compare addresses case-insensitively), without "/": the
# address is a path segment of every mailbox route, and servers decode %2F before routing.
_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ALPHABET = string.ascii_lowercase + string.digits
RANDOM_LABEL_LENGTH = 6
CREATE_FIELDS = {"domain", "local_part", "subdomain", "ttl"}


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def mailbox_view(mailbox) -> dict:
    return {
        "id": views.format_id(mailbox.id),
        "address": mailbox.address,
        "created_at": views.format_time(mailbox.created_at),
        "expires_at": views.format_time(mailbox.expires_at),
        "message_count": mailbox.message_count,
        "bytes_used": mailbox.bytes_used,
        "messages_url": f"/api/v1/mailboxes/{quote(mailbox.address, safe='@')}/messages",
    }


def _ttl(body: dict, domain: DomainSettings) -> int:
    ttl = body.get("ttl", domain.default_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 60 <= ttl <= domain.max_ttl:
        raise unprocessable(f"ttl must be whole seconds from 60 to {domain.max_ttl} on {domain.name}",
                            "ttl_out_of_range")
    return ttl


class Mailboxes:
    """POST /api/v1/mailboxes"""

    def __init__(self, store: Store, settings: Settings, access: Access):
        self.store, self.settings, self.access = store, settings, access
        self.limiter = Limiter(settings.api.create_rate)

    async def _domain(self, body: dict) -> DomainSettings:
        name = body.get("domain")
        if name is None:
            domain = (await self.access.domains.current()).default
            if domain is None:
                raise unprocessable("no domains are configured", "unknown_domain")
            return domain
        domain = await self.access.domains.aget(name.lower()) if isinstance(name, str) else None
        if domain is None:
            raise unprocessable(f"unknown domain {name!r}; GET /api/v1/domains lists them", "unknown_domain")
        return domain

    def _local_part(self, body: dict) -> str:
        local = body.get("local_part")
        if local is None:
            return _random(self.settings.mailboxes.random_length)
        if not isinstance(local, str) or not 1 <= len(local) <= 64 or not _LOCAL_RE.match(local.lower()):
            raise unprocessable("local_part must be 1-64 characters of an RFC 5321 dot-atom "
                                "(letters, digits, !#$%&'*+/=?^_`{|}~- and single dots inside)",
                                "invalid_local_part")
        local = local.lower()
        if local in self.settings.mailboxes.reserved:
            raise unprocessable(f"{local!r} is reserved", "reserved_local_part")
        return local

    def _host(self, body: dict, domain: DomainSettings) -> str:
        sub = body.get("subdomain")
        if sub is None and domain.random_subdomain:
            sub = "random"
        if sub is None:
            return domain.name
        if not domain.subdomains:
            raise unprocessable(f"{domain.name} does not accept subdomains", "subdomains_not_allowed")
        if sub == "random":
            sub = _random(RANDOM_LABEL_LENGTH)
        if not isinstance(sub, str) or not _LABEL_RE.match(sub.lower()):
            raise unprocessable("subdomain must be one DNS label (letters, digits, inner hyphens; "
                                "up to 63) or \"random\"", "invalid_subdomain")
        return f"{sub.lower()}.{domain.name}"

    async def on_post(self, req, resp):
        self.limiter.check(client_ip(req, self.settings.api.trusted_proxies), "mailbox creations")
        body = await json_body(req, allow_empty=True)
        unknown = set(body) - CREATE_FIELDS
        if unknown:
            raise unprocessable(f"unknown field(s): {', '.join(sorted(unknown))}", "unknown_field")
        domain = await self._domain(body)
        local, host, ttl = self._local_part(body), self._host(body, domain), _ttl(body, domain)
        address = f"{local}@{host}"
        if len(address) > 254:
            raise unprocessable("the address would be longer than 254 characters", "address_too_long")
        token = tokens.new_token()
        mailbox = await run(self.store.create_mailbox, address, domain.name, tokens.token_hash(token),
                            time.time() + ttl)
        if mailbox is None:
            raise ApiError(409, "address_taken", f"{address} is already taken")
        resp.status = falcon.HTTP_201
        resp.media = dict(mailbox_view(mailbox), token=token)


class MailboxItem:
    """GET / PATCH / DELETE /api/v1/mailboxes/{address}"""

    def __init__(self, store: Store, settings: Settings, access: Access):
        self.store, self.settings, self.access = store, settings, access

    async def on_get(self, req, resp, address):
        resp.media = mailbox_view(await self.access.mailbox(req, address))

    async def on_patch(self, req, resp, address):
        mailbox = await self.access.mailbox(req, address)
        body = await json_body(req)
        if set(body) != {"ttl"}:
            raise unprocessable("send {\"ttl\": seconds}: the mailbox then lives that long from now",
                                "invalid_body")
        domain = await self.access.domains.aof(mailbox.address)
        if domain is None:
            raise unprocessable("this mailbox's domain is no longer configured", "unknown_domain")
        expires_at = time.time() + _ttl(body, domain)
        await run(self.store.set_expiry, mailbox.id, expires_at)
        mailbox.expires_at = expires_at
        resp.media = mailbox_view(mailbox)

    async def on_delete(self, req, resp, address):
        mailbox = await self.access.mailbox(req, address)
        await run(self.store.delete_mailbox, mailbox.id)
        resp.status = falcon.HTTP_204


class AdminMailboxes:
    """GET /api/v1/admin/mailboxes (operator)"""

    def __init__(self, store: Store, access: Access, max_page: int):
        self.store, self.access, self.max_page = store, access, max_page

    async def on_get(self, req, resp):
        self.access.require_operator(req)
        limit = page_limit(req, min(30, self.max_page), self.max_page)
        cursor = req.get_param("cursor")
        before = views.decode_cursor(cursor) if cursor else None
        rows = await run(self.store.list_mailboxes, limit + 1, before)
        more = len(rows) > limit
        rows = rows[:limit]
        resp.media = {
            "items": [{"id": views.format_id(r["id"]), "address": r["address"],
                       "created_at": views.format_time(r["created_at"]),
                       "expires_at": views.format_time(r["expires_at"]),
                       "message_count": r["message_count"], "bytes_used": r["bytes_used"],
                       "has_token": bool(r["owned"])} for r in rows],
            "next_cursor": views.encode_cursor(rows[-1]["id"]) if more else None,
        }


class AdminStats:
    """GET /api/v1/admin/stats (operator)"""

    def __init__(self, store: Store, access: Access):
        self.store, self.access = store, access

    async def on_get(self, req, resp):
        self.access.require_operator(req)
        resp.media = await run(self.store.stats)
