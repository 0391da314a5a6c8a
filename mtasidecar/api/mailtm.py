"""The mail.tm-compatible API, at the root of the API server.

A client written for mail.tm works against us by changing its base URL to
``http://host:port``. A mail.tm *account* is one of our mailboxes with a
password: both APIs see the same mailboxes and messages, and a token from
either opens the mailbox in both.

Routes (mail.tm's): ``GET /domains``, ``GET /domains/{id}``, ``POST /accounts``,
``POST /token``, ``GET /me``, ``GET|DELETE /accounts/{id}``, ``GET /messages``,
``GET|PATCH|DELETE /messages/{id}``, ``GET /messages/{id}/download``,
``GET /messages/{id}/attachment/{attachmentId}``, ``GET /sources/{id}`` and the
Mercure hub ``GET /.well-known/mercure?topic=/accounts/{id}`` (Server-Sent
Events). Leniencies for clients in the wild: ``PATCH /messages/{id}`` with no
body marks the message seen, and ``GET /messages/{id}/attachments`` (JSON
list) and ``/attachments/{attachmentId}`` (JSON description) exist.

Choices where mail.tm has no equivalent:
- An account is created with the lifetime its domain allows at most
  (``max_ttl``), like any mailbox here; mail.tm accounts do not expire.
- Passwords are hashed with scrypt (n=2**14, r=8, p=1, 16-byte salt).
- Tokens are our random bearer tokens (not JWTs), one more per ``POST /token``;
  deleting the account deletes them all.
- Another account's messages or account answer 404, never 403: nobody
  learns which ids exist.

Errors have mail.tm's shapes: 401 ``{"code": 401, "message": ...}`` for a bad
token or bad credentials; 422 with ``violations`` for a bad address, domain
or password; other 4xx as a hydra error (``hydra:description``), or as
problem JSON (``detail``) when the client asked for plain JSON.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
import secrets
import time

import falcon
from falcon.asgi import SSEvent

from .. import tokens
from ..config import Settings
from ..mail.parse import attachment_bytes
from ..store import MessageFilter, Store
from . import mailtm_views as shapes
from . import views
from .access import Access
from .inputs import MAX_BODY
from .ratelimit import Limiter, client_ip
from .waiting import Watcher

run = asyncio.to_thread

PER_PAGE = 30  # mail.tm's page size, for messages and domains
MAX_PAGE = 1_000_000
MIN_PASSWORD = 6  # mail.tm's minimum
MAX_PASSWORD = 1024
JSON_LIKE = ("application/json", "application/ld+json", "application/merge-patch+json")
HUB_PATH = "/.well-known/mercure"

_ID_RE = re.compile(r"[0-9a-f]{24}")
# RFC 5321 dot-atom, lower-cased (as the native API's mailbox creation checks it).
_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_HOST_RE = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


# -- passwords -------------------------------------------------------------------------------

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt_hex$hash_hex``: slow on purpose (about 16 MiB and tens of ms)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; a missing or unreadable hash never matches (but costs the same)."""
    try:
        scheme, n, r, p, salt, digest = (stored or "").split("$")
        n, r, p, salt, digest = int(n), int(r), int(p), bytes.fromhex(salt), bytes.fromhex(digest)
        if scheme != "scrypt" or not digest:
            raise ValueError(scheme)
        # hashlib refuses parameters that are not powers of two or need more than maxmem.
        got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM,
                             dklen=len(digest))
    except ValueError:
        # Same work as a real check: whether an address has an account does
        # not show in the answer's timing.
        hashlib.scrypt(password.encode(), salt=b"\0" * 16, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                       maxmem=_SCRYPT_MAXMEM, dklen=32)
        return False
    return hmac.compare_digest(got, digest)


# -- errors ----------------------------------------------------------------------------------

class MailTmError(Exception):
    """An error answered in mail.tm's shape (see :func:`handle_error`)."""

    def __init__(self, status: int, description: str, *, violations: list[dict] | None = None,
                 jwt: bool = False, headers: dict | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.violations = violations
        self.jwt = jwt  # the authenticator's {"code", "message"} shape
        self.headers = headers or {}


def unauthorized(message: str) -> MailTmError:
    return MailTmError(401, message, jwt=True, headers={"WWW-Authenticate": "Bearer"})


def not_found() -> MailTmError:
    return MailTmError(404, "Not Found")


def invalid(*violations: tuple[str, str]) -> MailTmError:
    return MailTmError(422, "\n".join(f"{p}: {m}" for p, m in violations),
                       violations=[{"propertyPath": p, "message": m} for p, m in violations])


def _accept_score(accept: str, media: str) -> tuple[float, int]:
    """(q, specificity) of the Accept range that best matches ``media`` (RFC 9110 12.5.1)."""
    kind, _, sub = media.partition("/")
    best = (0.0, -1)
    for item in accept.split(","):
        rng, *params = (part.strip() for part in item.split(";"))
        rng = rng.lower()
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        r_kind, _, r_sub = rng.partition("/")
        if rng == media:
            spec = 2
        elif r_kind == kind and r_sub == "*":
            spec = 1
        elif rng == "*/*":
            spec = 0
        else:
            continue
        if spec > best[1]:
            best = (q, spec)
    return best


def wants_ld(req) -> bool:
    """JSON-LD unless the client prefers plain application/json.

    ``*/*``, no Accept, or a tie answer JSON-LD (mail.tm's default); an explicit
    ``application/json`` beats a wildcard (``application/json, */*``).
    """
    accept = req.get_header("Accept")
    if not accept:
        return True
    ld, plain = _accept_score(accept[:1000], "application/ld+json"), _accept_score(accept[:1000], "application/json")
    return not (plain[0] > 0 and plain > ld)


def error_body(ex: MailTmError, ld: bool) -> tuple[dict, str]:
    if ex.jwt:
        return {"code": ex.status, "message": ex.description}, "application/json"
    if ld:
        if ex.violations is not None:
            body = {"@context": "/contexts/ConstraintViolationList", "@type": "ConstraintViolationList"}
        else:
            body = {"@context": "/contexts/Error", "@type": "hydra:Error"}
        body.update({"hydra:title": "An error occurred", "hydra:description": ex.description})
        ctype = "application/ld+json"
    else:
        body = {"type": ("https://symfony.com/errors/validation" if ex.violations is not None
                         else "https://tools.ietf.org/html/rfc2616#section-10"),
                "title": "An error occurred", "detail": ex.description}
        ctype = "application/problem+json"
    if ex.violations is not None:
        body["violations"] = ex.violations
    return body, ctype


async def handle_error(req, resp, ex, params, ws=None) -> None:
    body, ctype = error_body(ex, wants_ld(req))
    resp.status = falcon.code_to_http_status(ex.status)
    resp.content_type = f"{ctype}; charset=utf-8"
    resp.data = json.dumps(body, ensure_ascii=False).encode()
    resp.append_header("Vary", "Accept")
    for name, value in ex.headers.items():
        resp.set_header(name, value)
    resp.sse = None


def mailtm_errors(responder):
    """Errors raised by shared helpers (native ApiErrors) leave in mail.tm's shape too."""

    @functools.wraps(responder)
    async def wrapper(self, req, resp, **params):
        try:
            return await responder(self, req, resp, **params)
        except MailTmError:
            raise
        except falcon.HTTPError as exc:
            status = int(exc.status_code)
            headers = dict(exc.headers or {})
            if status == 401:
                raise MailTmError(401, exc.description or "Invalid JWT Token", jwt=True, headers=headers) from None
            raise MailTmError(status, exc.description or exc.title or "An error occurred",
                              headers=headers) from None

    return wrapper


# -- requests and answers ------------------------------------------------------------------

def parse_id(text: str) -> int | None:
    """A 24-hex id as a row id; None for anything else (mail.tm: 404)."""
    if not _ID_RE.fullmatch(text or ""):
        return None
    n = int(text, 16)
    return n if n <= views.MAX_DB_ID else None


def page_number(req) -> int:
    text = req.get_param("page")
    if text is None or text == "":
        return 1
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise MailTmError(400, "Page must be a whole number.")
    page = int(text)
    if page < 1:
        raise MailTmError(400, "Page should not be less than 1")
    if page > MAX_PAGE:
        raise MailTmError(400, f"Page should not be more than {MAX_PAGE}")
    return page


async def read_json(req, *, empty_ok: bool = False) -> dict:
    """The request's JSON object. ``empty_ok``: no body at all means {}."""
    ctype = (req.content_type or "").split(";", 1)[0].strip().lower()
    if (req.content_length or 0) > MAX_BODY:
        raise MailTmError(413, f"The request body is larger than {MAX_BODY} bytes.")
    raw = await req.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise MailTmError(413, f"The request body is larger than {MAX_BODY} bytes.")
    if not raw.strip():
        if empty_ok:
            return {}
        raise MailTmError(400, "Syntax error: the request body is empty; send a JSON object.")
    # No Content-Type is taken as JSON; a declared non-JSON type is refused.
    if ctype and ctype not in JSON_LIKE and not ctype.endswith("+json"):
        raise MailTmError(415, f'The content-type "{ctype}" is not supported. Supported MIME types are '
                               '"application/ld+json", "application/json", "application/merge-patch+json".')
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MailTmError(400, "Syntax error: the request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise MailTmError(400, "The request body must be a JSON object.")
    return body


class Api:
    """What every mail.tm resource shares: settings, store, answers, authentication."""

    def __init__(self, store: Store, settings: Settings, access: Access, watcher: Watcher):
        self.store, self.settings, self.access, self.watcher = store, settings, access, watcher
        self.trusted = settings.api.trusted_proxies
        self.hub = settings.mailtm.mercure_url or HUB_PATH
        self.creations = Limiter(settings.api.create_rate)

    # answers

    def reply(self, req, resp, doc, status: int = 200) -> None:
        ld = wants_ld(req)
        if not ld:
            doc = shapes.strip_ld(doc)
        resp.status = falcon.code_to_http_status(status)
        resp.content_type = ("application/ld+json" if ld else "application/json") + "; charset=utf-8"
        resp.data = json.dumps(doc, ensure_ascii=False).encode()
        resp.append_header("Vary", "Accept")
        resp.append_header("Link", f'<{self.hub}>; rel="mercure"')

    def reply_collection(self, req, resp, path: str, context: str, members: list[dict], total: int,
                         page: int) -> None:
        if wants_ld(req):
            self.reply(req, resp, shapes.collection(path, context, members, total, page, PER_PAGE))
        else:
            self.reply(req, resp, members)  # a bare array, @ keys dropped

    # authentication

    def ip(self, req) -> str:
        return client_ip(req, self.trusted)

    def not_blocked(self, req) -> None:
        limiter = self.access.failures
        if limiter.blocked(self.ip(req)):
            raise MailTmError(429, "Too Many Requests: too many failed authentications from your address.",
                              headers={"Retry-After": str(max(1, round(1 / limiter.rate)))})

    def failed(self, req) -> None:
        self.access.failures.allow(self.ip(req))

    def quota(self, mailbox) -> int | None:
        domain = self.access.domains.cached.of(mailbox.address)
        return domain.max_bytes if domain else None

    def retention_until(self, mailbox, received_at: float) -> float | None:
        domain = self.access.domains.cached.of(mailbox.address)
        until = received_at + domain.retention if domain else None
        if mailbox.expires_at is not None:
            until = mailbox.expires_at if until is None else min(until, mailbox.expires_at)
        return until

    async def account(self, req, *, query_token: bool = False):
        """The mailbox the request's bearer token opens, or a 401/429 MailTmError."""
        self.not_blocked(req)
        header = req.get_header("Authorization")
        token = None
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                self.failed(req)
                raise unauthorized("Invalid JWT Token")
            token = value.strip()
        elif query_token:
            # Mercure lets browsers (whose EventSource cannot send headers)
            # pass the token as ?authorization=.
            token = req.get_param("authorization") or None
        if token is None:
            raise unauthorized("JWT Token not found")
        if not tokens.well_formed(token):
            self.failed(req)
            raise unauthorized("Invalid JWT Token")
        mailbox = await run(self.store.token_account, tokens.token_hash(token))
        if mailbox is None:
            self.failed(req)
            raise unauthorized("Invalid JWT Token")
        if mailbox.expires_at is not None and mailbox.expires_at <= time.time():
            raise unauthorized("Expired JWT Token")
        await self.access.domains.current()  # quota() and retention_until() read the snapshot
        return mailbox

    async def message_row(self, mailbox, message_id: str) -> dict:
        mid = parse_id(message_id)
        row = await run(self.store.get_message, mailbox.id, mid) if mid is not None else None
        if row is None:
            raise not_found()
        return row

    async def raw_of(self, mailbox, message_id: str) -> bytes:
        mid = parse_id(message_id)
        if mid is None:
            raise not_found()
        found, raw = await run(self.store.get_raw, mailbox.id, mid)
        if not found:
            raise not_found()
        if raw is None:
            raise MailTmError(410, "This message was too large to store; only its summary is kept.")
        return raw

    def full(self, mailbox, row: dict) -> dict:
        return shapes.message_full(row, mailbox.id, self.retention_until(mailbox, row["received_at"]))


# -- resources -------------------------------------------------------------------------------

class Domains:
    """GET /domains?page="""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp):
        page = page_number(req)
        rows = await run(self.api.store.list_domains)
        chunk = rows[(page - 1) * PER_PAGE:page * PER_PAGE]
        self.api.reply_collection(req, resp, "/domains", "/contexts/Domain",
                                  [shapes.domain(d, member=True) for d in chunk], len(rows), page)


class DomainItem:
    """GET /domains/{id}"""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp, domain_id):
        did = parse_id(domain_id)
        for row in await run(self.api.store.list_domains):
            if row.id == did:
                return self.api.reply(req, resp, shapes.domain(row))
        raise not_found()


class Accounts:
    """POST /accounts {address, password} → 201 Account"""

    def __init__(self, api: Api):
        self.api = api

    def _address(self, value, domains) -> tuple[str | None, str | None, tuple | None]:
        """(address, domain name, violation); ``domains``: a DomainSet"""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None, None, ("address", "This value should not be blank.")
        if not isinstance(value, str):
            return None, None, ("address", "This value should be of type string.")
        address = value.strip().lower()
        local, at, host = address.rpartition("@")
        if (not at or len(address) > 254 or not 1 <= len(local) <= 64 or not _LOCAL_RE.match(local)
                or not _HOST_RE.match(host)):
            return None, None, ("address", "This value is not a valid email address.")
        name = domains.name_of(address)
        if name is None:
            return None, None, ("address", f'The domain "{host}" is not one of ours; GET /domains lists them.')
        if local in self.api.settings.mailboxes.reserved:
            return None, None, ("address", f'The local part "{local}" is reserved.')
        return address, name, None

    @staticmethod
    def _password(value) -> tuple | None:
        if value is None or value == "":
            return "password", "This value should not be blank."
        if not isinstance(value, str):
            return "password", "This value should be of type string."
        if len(value) < MIN_PASSWORD:
            return "password", f"This value is too short. It should have {MIN_PASSWORD} characters or more."
        if len(value) > MAX_PASSWORD:
            return "password", f"This value is too long. It should have {MAX_PASSWORD} characters or less."
        return None

    @mailtm_errors
    async def on_post(self, req, resp):
        api = self.api
        wait = api.creations.allow(api.ip(req))
        if wait:
            raise MailTmError(429, "Too Many Requests: too many accounts created from your address.",
                              headers={"Retry-After": str(max(1, round(wait + 0.5)))})
        body = await read_json(req)
        domains = await api.access.domains.current()
        raw = body.get("address")
        address, domain_name, bad_address = self._address(raw, domains)
        if domain_name is None and isinstance(raw, str) and "@" in raw:  # a domain added a moment ago elsewhere?
            domains = await api.access.domains.arecheck(raw.strip().lower())
            address, domain_name, bad_address = self._address(raw, domains)
        password = body.get("password")
        bad_password = self._password(password)
        problems = [v for v in (bad_address, bad_password) if v]
        if problems:
            raise invalid(*problems)
        domain = domains.get(domain_name)
        password_hash = await run(hash_password, password)
        mailbox = await run(api.store.create_mailbox, address, domain_name, None, time.time() + domain.max_ttl,
                            password_hash=password_hash)
        if mailbox is None:
            raise invalid(("address", "This value is already used."))
        api.reply(req, resp, shapes.account(mailbox, domain.max_bytes), status=201)


class TokenResource:
    """POST /token {address, password} → {token, id}: a new bearer token each time."""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_post(self, req, resp):
        api = self.api
        api.not_blocked(req)
        body = await read_json(req)
        address, password = body.get("address"), body.get("password")
        for key, value in (("address", address), ("password", password)):
            if not isinstance(value, str):
                raise MailTmError(400, f'The key "{key}" must be provided, as a string.')
        mailbox = None
        if 0 < len(password) <= MAX_PASSWORD and len(address) <= 320:
            mailbox = await run(api.store.mailbox, address.strip().lower())
        ok = await run(verify_password, password[:MAX_PASSWORD], mailbox.password_hash if mailbox else None)
        if not ok or (mailbox.expires_at is not None and mailbox.expires_at <= time.time()):
            api.failed(req)
            raise unauthorized("Invalid credentials.")
        token = tokens.new_token()
        await run(api.store.add_token, mailbox.id, tokens.token_hash(token))
        api.reply(req, resp, shapes.token(mailbox.id, token))


class Me:
    """GET /me"""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp):
        mailbox = await self.api.account(req)
        self.api.reply(req, resp, shapes.account(mailbox, self.api.quota(mailbox)))


class AccountItem:
    """GET / DELETE /accounts/{id}: only one's own (another's: 404)."""

    def __init__(self, api: Api):
        self.api = api

    async def _own(self, req, account_id):
        mailbox = await self.api.account(req)
        if parse_id(account_id) != mailbox.id:
            raise not_found()
        return mailbox

    @mailtm_errors
    async def on_get(self, req, resp, account_id):
        mailbox = await self._own(req, account_id)
        self.api.reply(req, resp, shapes.account(mailbox, self.api.quota(mailbox)))

    @mailtm_errors
    async def on_delete(self, req, resp, account_id):
        mailbox = await self._own(req, account_id)
        await run(self.api.store.delete_mailbox, mailbox.id)  # its tokens go with it
        resp.status = falcon.HTTP_204


class Messages:
    """GET /messages?page=: 30 a page, newest first."""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp):
        mailbox = await self.api.account(req)
        page = page_number(req)
        rows, total = await run(self.api.store.account_messages, mailbox.id, PER_PAGE, (page - 1) * PER_PAGE)
        self.api.reply_collection(req, resp, "/messages", "/contexts/Message",
                                  [shapes.message_intro(r, mailbox.id) for r in rows], total, page)


class MessageItem:
    """GET / PATCH / DELETE /messages/{id}"""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp, message_id):
        mailbox = await self.api.account(req)
        row = await self.api.message_row(mailbox, message_id)
        self.api.reply(req, resp, self.api.full(mailbox, row))

    @mailtm_errors
    async def on_patch(self, req, resp, message_id):
        mailbox = await self.api.account(req)
        mid = parse_id(message_id)
        if mid is None:
            raise not_found()
        # mail.tm takes {"seen": true}; some clients send no body at all to
        # mean the same. Other keys are ignored, as API Platform does.
        body = await read_json(req, empty_ok=True)
        seen = body.get("seen", True)
        if not isinstance(seen, bool):
            raise invalid(("seen", "This value should be of type bool."))
        if not await run(self.api.store.set_seen, mailbox.id, mid, seen):
            raise not_found()
        row = await self.api.message_row(mailbox, message_id)
        self.api.reply(req, resp, self.api.full(mailbox, row))

    @mailtm_errors
    async def on_delete(self, req, resp, message_id):
        mailbox = await self.api.account(req)
        mid = parse_id(message_id)
        if mid is None or not await run(self.api.store.delete_message, mailbox.id, mid):
            raise not_found()
        resp.status = falcon.HTTP_204


class Source:
    """GET /sources/{id} → {id, downloadUrl, data}"""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp, message_id):
        mailbox = await self.api.account(req)
        raw = await self.api.raw_of(mailbox, message_id)
        self.api.reply(req, resp, shapes.source(message_id, raw))


class Download:
    """GET /messages/{id}/download: the stored bytes, message/rfc822."""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp, message_id):
        mailbox = await self.api.account(req)
        raw = await self.api.raw_of(mailbox, message_id)
        resp.content_type = "message/rfc822"
        resp.data = raw
        resp.set_header("Content-Disposition", f'attachment; filename="{message_id}.eml"')
        resp.set_header("X-Content-Type-Options", "nosniff")


class AttachmentFile:
    """GET /messages/{id}/attachment/{attachmentId}: the attachment's bytes."""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp, message_id, attachment_id):
        mailbox = await self.api.account(req)
        mid, index = parse_id(message_id), shapes.parse_attachment_id(attachment_id)
        if mid is None or index is None:
            raise not_found()
        reason = await run(self.api.store.attachment_blocked, mailbox.id, mid, index)
        if reason:
            raise MailTmError(403, f"This attachment is not served ({reason}); it is still in the message source.")
        raw = await self.api.raw_of(mailbox, message_id)
        hit = await run(attachment_bytes, raw, index)
        if hit is None:
            raise not_found()
        meta, data = hit
        resp.data = data
        resp.content_type = meta.content_type or "application/octet-stream"
        filename = meta.filename or f"attachment-{index + 1}"
        ascii_name = re.sub(r'[^A-Za-z0-9._ -]', "_", filename)[:200] or "attachment"
        resp.set_header("Content-Disposition", f'attachment; filename="{ascii_name}"')
        # Mail content never runs in our origin: no sniffing, no scripts.
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Content-Security-Policy", "sandbox; default-src 'none'")


class AttachmentList:
    """GET /messages/{id}/attachments: not mail.tm's, but some clients call it (a JSON array)."""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp, message_id):
        mailbox = await self.api.account(req)
        row = await self.api.message_row(mailbox, message_id)
        self.api.reply(req, resp, self.api.full(mailbox, row)["attachments"])


class AttachmentInfo:
    """GET /messages/{id}/attachments/{attachmentId}: one attachment's description (JSON)."""

    def __init__(self, api: Api):
        self.api = api

    @mailtm_errors
    async def on_get(self, req, resp, message_id, attachment_id):
        mailbox = await self.api.account(req)
        row = await self.api.message_row(mailbox, message_id)
        index = shapes.parse_attachment_id(attachment_id)
        for item in self.api.full(mailbox, row)["attachments"]:
            if index is not None and item["id"] == shapes.attachment_id(index):
                return self.api.reply(req, resp, item)
        raise not_found()


class Hub:
    """GET /.well-known/mercure?topic=/accounts/{id}: mail.tm's Mercure hub, for one's own account.

    Server-Sent Events: a ``data:`` frame with the message (intro shape,
    ``@type`` Message) for each new message, then one with the Account and its
    updated ``used``. Frames carry the message id as their SSE id, so a client
    that reconnects with ``Last-Event-ID`` (or ``?lastEventID=``) misses
    nothing; without it only mail arriving from now on is sent.
    """

    HEARTBEAT = 15.0
    BATCH = 100

    def __init__(self, api: Api):
        self.api = api

    def _topic_matches(self, req, account_iri: str) -> bool:
        topics = req.params.get("topic")
        if topics is None or topics == "" or topics == []:
            raise MailTmError(400, 'Missing "topic" parameter.')
        if isinstance(topics, str):
            topics = [topics]
        for topic in topics:
            path = re.sub(r"^https?://[^/]+", "", topic)
            if topic == "*" or path == account_iri or path == f"{account_iri}/":
                return True
        if any("/accounts/" in t for t in topics):
            raise not_found()  # another account's topic: as if it did not exist
        raise MailTmError(400, f'Subscribe to your account\'s topic, "{account_iri}".')

    @mailtm_errors
    async def on_get(self, req, resp):
        api = self.api
        mailbox = await api.account(req, query_token=True)
        iri = shapes.account_iri(mailbox.id)
        self._topic_matches(req, iri)
        resume = req.get_header("Last-Event-ID") or req.get_param("lastEventID")
        after = parse_id(resume.strip()) if resume else None
        if after is None:
            after = await run(api.store.max_message_id)
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")  # nginx: pass frames through at once
        resp.append_header("Link", f'<{api.hub}>; rel="mercure"')
        resp.sse = self._frames(mailbox, after)

    async def _frames(self, mailbox, after: int):
        api, mailbox_id, address = self.api, mailbox.id, mailbox.address
        yield SSEvent(comment="mercure", retry=3000)  # the client knows at once that it is subscribed

        def newer():
            return api.store.list_messages(mailbox_id, self.BATCH, filters=MessageFilter(after_id=after))

        while True:
            rows = await api.watcher.rows_when_ready(mailbox_id, newer, self.HEARTBEAT)
            current = await run(api.store.mailbox, address)
            if current is None or current.id != mailbox_id or (
                    current.expires_at is not None and current.expires_at <= time.time()):
                return  # the account is gone: so is its stream
            if not rows:
                yield SSEvent(comment="keep-alive")
                continue
            for row in reversed(rows):  # oldest first
                after = row["id"]
                yield SSEvent(event_id=views.format_id(row["id"]),
                              text=json.dumps(shapes.message_intro(row, mailbox_id, context=True),
                                              ensure_ascii=False))
            yield SSEvent(text=json.dumps(shapes.account(current, api.quota(current)), ensure_ascii=False))


def register(app, store: Store, settings: Settings, access: Access, watcher: Watcher) -> None:
    """Add the mail.tm routes (at the root) and their error shape to ``app``."""
    api = Api(store, settings, access, watcher)
    app.add_error_handler(MailTmError, handle_error)
    app.add_route("/domains", Domains(api))
    app.add_route("/domains/{domain_id}", DomainItem(api))
    app.add_route("/accounts", Accounts(api))
    app.add_route("/accounts/{account_id}", AccountItem(api))
    app.add_route("/token", TokenResource(api))
    app.add_route("/me", Me(api))
    app.add_route("/messages", Messages(api))
    app.add_route("/messages/{message_id}", MessageItem(api))
    app.add_route("/messages/{message_id}/download", Download(api))
    app.add_route("/messages/{message_id}/attachment/{attachment_id}", AttachmentFile(api))
    app.add_route("/messages/{message_id}/attachments", AttachmentList(api))
    app.add_route("/messages/{message_id}/attachments/{attachment_id}", AttachmentInfo(api))
    app.add_route("/sources/{message_id}", Source(api))
    app.add_route(HUB_PATH, Hub(api))
