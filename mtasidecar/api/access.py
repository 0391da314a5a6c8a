"""Who may touch which mailbox: the one place the API decides it.

- Public domains: anyone who knows the address reads its mailbox.
- Private domains: only the bearer of that mailbox's token. No token → 401;
  a token that does not open this mailbox → 404, the same answer as for a
  mailbox that does not exist, so nobody learns which addresses are taken.
- The operator token (settings) opens every mailbox and the admin routes.
Failed authentications are rate-limited per client address (429).
"""

from __future__ import annotations

import asyncio
import re
import time

from .. import tokens
from ..config import Settings
from ..domains import DomainRegistry
from ..store import Store
from .errors import ApiError, bad_request, not_found
from .ratelimit import Limiter, client_ip

_ADDRESS_RE = re.compile(r"^[^@\s]{1,64}@[a-z0-9.-]{1,253}$")


def unauthorized(message: str, code: str = "unauthorized") -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": 'Bearer realm="mtasidecar"'})


class Access:
    def __init__(self, store: Store, settings: Settings, domains: DomainRegistry | None = None):
        self.store = store
        self.settings = settings
        self.domains = domains or DomainRegistry(settings, store)
        self.trusted = settings.api.trusted_proxies
        self.failures = Limiter(settings.api.auth_failure_rate)
        self._operator_hash = tokens.token_hash(settings.api.operator_token) if settings.api.operator_token else None

    # -- credentials ---------------------------------------------------------

    def bearer(self, req) -> str | None:
        header = req.get_header("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Authorization must be 'Bearer <token>'", "malformed_token")
        return token

    def is_operator(self, req) -> bool:
        token = self.bearer(req)
        return bool(token and self._operator_hash and tokens.matches(token, self._operator_hash))

    def require_operator(self, req) -> None:
        self._not_blocked(req)
        token = self.bearer(req)
        if token is None:
            raise unauthorized("operator token required")
        if not self.is_operator(req):
            self._failed(req)
            raise unauthorized("not the operator token", "bad_token")

    def _not_blocked(self, req) -> None:
        if self.failures.blocked(client_ip(req, self.trusted)):
            raise ApiError(429, "rate_limited", "too many failed authentications from your address",
                           headers={"Retry-After": str(max(1, int(1 / self.failures.rate)))})

    def _failed(self, req) -> None:
        self.failures.allow(client_ip(req, self.trusted))

    # -- mailboxes -----------------------------------------------------------

    @staticmethod
    def normalize(address: str) -> str:
        address = address.lower()
        if len(address) > 320 or not _ADDRESS_RE.match(address):
            raise bad_request(f"malformed address {address!r}", "malformed_address")
        return address

    async def mailbox(self, req, address: str):
        """The mailbox this request may use, or a 401/404/429 ApiError."""
        address = self.normalize(address)
        self._not_blocked(req)
        mailbox, mode = await asyncio.to_thread(self.store.mailbox_with_mode, address)
        if self.is_operator(req):
            if mailbox is None:
                raise not_found(f"no mailbox {address}", "mailbox_not_found")
            return mailbox
        live = mailbox is not None and (mailbox.expires_at is None or mailbox.expires_at > time.time())
        if mailbox is None:
            domain = await self.domains.aof(address)
            mode = domain.mode if domain else None
        if mode == "public":
            if not live:
                raise not_found(f"no mailbox {address}", "mailbox_not_found")
            return mailbox
        token = self.bearer(req)
        if token is None:
            raise unauthorized("this mailbox needs its token: Authorization: Bearer <token>")
        if not tokens.well_formed(token):
            self._failed(req)
            raise unauthorized("malformed token", "malformed_token")
        owner = await asyncio.to_thread(self.store.token_mailbox, tokens.token_hash(token))
        if not live or owner != mailbox.id:
            self._failed(req)
            raise not_found(f"no mailbox {address}", "mailbox_not_found")
        return mailbox
