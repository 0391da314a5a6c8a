"""`mtasidecar webhooks`: POST each new message to its webhooks, from the outbox.

The ingester writes one ``delivery`` row per (new message, webhook) in the
transaction that stores the message (see ``Store.ingest``), so an event
exists exactly when its message does. This process sends them:

- It looks for due rows every ``POLL_INTERVAL`` (a point query on the
  (status, next_attempt_at) index) and claims up to ``concurrency`` at once:
  a claim stamps the rows and moves them out of reach for the attempt's
  duration plus a margin (a lease), so a sender killed mid-attempt leaves
  them due again, and two senders never take the same row.
- Each attempt is one signed POST, bounded as a whole by ``timeout``. A 2xx
  marks the row delivered right away; anything else (status, refusal,
  timeout, TLS or DNS error) reschedules it with exponential backoff and
  jitter until ``max_age`` after the event, then marks it failed.
- All state is in the database: a restart resumes where the rows say. The
  window between a 2xx and its record (a crash there) is the one way an
  event is sent twice, so receivers dedupe on X-Mtasidecar-Delivery.

Mailbox webhooks may not target loopback, private, link-local or other
non-public addresses unless ``webhooks.allow_private``: the API refuses such
URLs at creation, and every attempt resolves the host afresh, checks every
address it got (DNS rebinding) and connects to a checked address itself
(no second lookup). The operator's URL (settings) is trusted.

The HTTP client is a small asyncio one: we need the status line only, a
total deadline per attempt and control over which address is dialled.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import re
import signal
import socket
import ssl
import time
import uuid
from urllib.parse import quote, unquote, urlsplit

log = logging.getLogger(__name__)

EVENT = "message.received"
USER_AGENT = "mtasidecar-webhooks/1"
MAX_URL = 2048
# How often an idle sender looks for due rows: the bound on added latency.
POLL_INTERVAL = 0.05
# A claim lasts the attempt's timeout plus this: after that, another sender
# (or this one, restarted) may take the row again.
LEASE_MARGIN = 5.0
JITTER = 0.2  # each delay is scaled by a random factor in [1 - JITTER, 1 + JITTER]
# How often finished deliveries older than ``webhooks.history`` are deleted.
PRUNE_INTERVAL = 300.0
_STATUS_RE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """The target is not allowed (a non-public address)."""


class ProtocolError(Exception):
    """The receiver's answer was not HTTP."""


# -- signing and the schedule ---------------------------------------------------------------

def sign(secret: str, timestamp: int, body: bytes) -> str:
    """X-Mtasidecar-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def request_headers(secret: str, timestamp: int, delivery_id: str, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Mtasidecar-Event": EVENT,
        "X-Mtasidecar-Delivery": delivery_id,
        "X-Mtasidecar-Timestamp": str(timestamp),
        "X-Mtasidecar-Signature": sign(secret, timestamp, body),
    }


def backoff(failures: int, base: float, cap: float, rand: float = 0.5) -> float:
    """Delay after the ``failures``-th failed attempt: base·3^(n-1) (5, 15, 45 s, ...),
    scaled by a jitter factor from ``rand`` in [0, 1), at most ``cap``."""
    delay = min(cap, base * 3.0 ** min(max(failures, 1) - 1, 64))
    return min(cap, delay * (1 - JITTER + 2 * JITTER * rand))


def next_attempt(failures: int, event_at: float, now: float, settings, rand: float = 0.5) -> float | None:
    """When to try again after a failure, or None: the retry window is over.

    The last attempt falls on the window's end itself (``event_at + max_age``),
    so an event is tried for the whole window, however the steps fall.
    """
    deadline = event_at + settings.max_age
    if now >= deadline:
        return None
    return min(now + backoff(failures, settings.backoff_base, settings.backoff_max, rand), deadline)


# -- targets ------------------------------------------------------------------------------------

def url_problem(url) -> str | None:
    """Why ``url`` cannot be a webhook target (syntax only), or None."""
    if not isinstance(url, str) or not url:
        return "url must be a non-empty string"
    if len(url) > MAX_URL:
        return f"url must be at most {MAX_URL} characters"
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        return "url must be ASCII without spaces or control characters (use punycode and %-escapes)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"url is malformed: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return "url must be http:// or https://"
    if not parts.hostname:
        return "url must name a host"
    if port == 0:
        return "url has port 0"
    return None


def address_is_public(address: str) -> bool:
    """Is this IP address one a mailbox's webhook may reach? Not loopback,
    private, link-local, shared (CGN), multicast, reserved, unspecified, nor an
    IPv6 form that embeds such an IPv4 address (mapped, 6to4, Teredo, NAT64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not address_is_public(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


def target(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an http(s) URL."""
    parts = urlsplit(url)
    tls = parts.scheme.lower() == "https"
    return parts.hostname, parts.port or (443 if tls else 80), tls


async def system_resolver(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) for each address of ``host``, as the system resolves it."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _type, _proto, _name, sockaddr in infos]


async def check_host(host: str, port: int, resolver=system_resolver) -> list[tuple[int, tuple]]:
    """Resolve ``host``; Refused if any of its addresses is not public."""
    try:
        addresses = await resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise Refused(f"cannot resolve {host}: {exc}") from None
    if not addresses:
        raise Refused(f"{host} has no address")
    for _family, sockaddr in addresses:
        if not address_is_public(sockaddr[0]):
            raise Refused(f"{host} resolves to {sockaddr[0]}, not a public address "
                          "(webhooks.allow_private is off)")
    return addresses


# -- one POST ---------------------------------------------------------------------------------

def _request_bytes(url: str, headers: dict[str, str], body: bytes) -> bytes:
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close"]
    if parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        lines.append("Authorization: Basic " + base64.b64encode(userinfo.encode()).decode())
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def post(url: str, headers: dict[str, str], body: bytes, *, public_only: bool,
               resolver=system_resolver, ssl_context: ssl.SSLContext | None = None) -> int:
    """POST ``body`` to ``url``; the response's status code.

    With ``public_only``, every address of the host must be public, and the
    connection goes to one of the addresses checked (no second lookup).
    No timeout here: the caller bounds the whole attempt.
    """
    host, port, tls = target(url)
    if public_only:
        addresses = await check_host(host, port, resolver)
    else:
        addresses = await resolver(host, port)
    error: OSError | None = None
    for _family, sockaddr in addresses:
        try:
            reader, writer = await asyncio.open_connection(
                sockaddr[0], port, ssl=(ssl_context or ssl.create_default_context()) if tls else None,
                server_hostname=host if tls else None)
            break
        except OSError as exc:
            error = exc
    else:
        raise error or OSError(f"no address for {host}")
    try:
        writer.write(_request_bytes(url, headers, body))
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise ProtocolError("connection closed without a response")
        match = _STATUS_RE.match(line)
        if not match:
            raise ProtocolError(f"not an HTTP status line: {line[:80]!r}")
        return int(match.group(1))
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


# -- the event ---------------------------------------------------------------------------------

def event_body(row: dict) -> bytes:
    """The POST body for a claimed delivery row (see ``Store.claim_deliveries``)."""
    from .api import views
    base = f"/api/v1/mailboxes/{quote(row['address'])}/messages"
    event = {
        "event": EVENT,
        "delivery_id": views.format_id(row["delivery_id"]),
        "webhook_id": views.format_id(row["webhook_id"]) if row["webhook_id"] is not None else None,
        "mailbox": row["address"],
        "message": views.message_summary(row, base),
    }
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


# -- the sender ---------------------------------------------------------------------------------

class Sender:
    """Claims due deliveries and POSTs them, ``concurrency`` at a time.

    ``clock``, ``rand`` and ``resolver`` are injectable for tests. All
    database calls run on one thread of their own (one connection, writes
    serialized), so the event loop never waits on SQLite.
    """

    def __init__(self, store, settings, *, clock=time.time, rand=random.random, resolver=system_resolver,
                 poll: float = POLL_INTERVAL):
        self.store = store
        self.cfg = settings.webhooks
        self.clock, self.rand, self.resolver, self.poll = clock, rand, resolver, poll
        self.lease = self.cfg.timeout + LEASE_MARGIN
        self.inflight: dict[int, asyncio.Task] = {}
        self._db = cf.ThreadPoolExecutor(1, thread_name_prefix="webhooks-db")
        self._ssl: ssl.SSLContext | None = None
        self._records: list[tuple[dict, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self.sent = 0  # attempts made, for logs and tests

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._db, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._db.submit(self.store.close).result()
        self._db.shutdown()

    # -- claiming ------------------------------------------------------------

    async def claim(self, limit: int) -> list[tuple[str, dict]]:
        """Up to ``limit`` due rows as (claim, row); rows already in flight here are left alone."""
        now = self.clock()
        token = uuid.uuid4().hex
        rows = await self._call(self.store.claim_deliveries, now, limit, now + self.lease, token)
        return [(token, r) for r in rows if r["delivery_id"] not in self.inflight]

    def start(self, token: str, row: dict) -> asyncio.Task:
        task = asyncio.create_task(self.attempt(token, row))
        did = row["delivery_id"]
        self.inflight[did] = task
        task.add_done_callback(lambda _t: self.inflight.pop(did, None))
        return task

    async def run_once(self) -> int:
        """Claim what is due (up to ``concurrency``), attempt it all, wait. For tests and tools."""
        claimed = await self.claim(self.cfg.concurrency)
        await asyncio.gather(*(self.start(token, row) for token, row in claimed))
        return len(claimed)

    # -- one attempt ---------------------------------------------------------

    async def attempt(self, token: str, row: dict) -> None:
        did = row["delivery_id"]
        operator = row["webhook_id"] is None
        secret = self.cfg.secret if operator else row["secret"]
        give_up = None
        if row["id"] is None:
            give_up = "the message was deleted before it could be delivered"
        elif not secret:
            give_up = "the operator webhook's secret is no longer configured"
        if give_up:
            await self._record(did, token, delivered=False, code=None, error=give_up, retry_at=None, attempted=False)
            return
        body = event_body(row)
        from .api.views import format_id
        headers = request_headers(secret, int(self.clock()), format_id(did), body)
        code, error = None, None
        try:
            if self._ssl is None and row["url"][:6].lower() == "https:":
                self._ssl = ssl.create_default_context()
            code = await asyncio.wait_for(
                post(row["url"], headers, body, public_only=not (operator or self.cfg.allow_private),
                     resolver=self.resolver, ssl_context=self._ssl),
                self.cfg.timeout)
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except TimeoutError:
            error = f"no answer within {self.cfg.timeout:g} s"
        except (Refused, ProtocolError) as exc:
            error = str(exc)
        except (OSError, ValueError, UnicodeError) as exc:  # refused, reset, TLS, DNS, bad URL
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # never let one row stop the sender; the row is retried
            log.exception("delivery %d: unexpected error", did)
            error = f"internal error: {type(exc).__name__}"
        self.sent += 1
        now = self.clock()
        retry_at = None if error is None else next_attempt(row["attempts"] + 1, row["event_at"], now, self.cfg,
                                                           self.rand())
        if error is not None:
            log.info("delivery %d to %s: %s; %s", did, row["url"], error,
                     f"retry in {retry_at - now:.1f} s" if retry_at is not None else "giving up")
        await self._record(did, token, delivered=error is None, code=code, error=error and error[:500],
                           retry_at=retry_at)

    async def _record(self, did: int, token: str, *, delivered: bool, code, error, retry_at, attempted=True):
        """Queue the attempt's outcome for the next write and wait for it.

        Outcomes that finish while a write is under way go together in the
        next one (one transaction): under a backlog, one commit per batch
        instead of one per POST.
        """
        done = asyncio.get_running_loop().create_future()
        self._records.append(({"delivery_id": did, "claim": token, "now": self.clock(), "delivered": delivered,
                               "status_code": code, "error": error, "next_attempt_at": retry_at,
                               "attempted": attempted}, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_records())
        await done

    async def _write_records(self) -> None:
        while self._records:
            batch, self._records = self._records, []
            try:
                await self._call(self.store.finish_deliveries, [record for record, _ in batch])
            except Exception:  # the leases run out and the rows are tried again
                log.exception("could not record %d attempts", len(batch))
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    # -- the loop --------------------------------------------------------------

    async def prune(self) -> int:
        """Delete finished deliveries older than ``webhooks.history``, a batch per transaction."""
        total = 0
        while n := await self._call(self.store.prune_deliveries, self.clock() - self.cfg.history):
            total += n
        return total

    async def run(self, stop: asyncio.Event) -> None:
        stopping = asyncio.create_task(stop.wait())
        pruned_at: float | None = None
        try:
            while not stop.is_set():
                if pruned_at is None or time.monotonic() - pruned_at > PRUNE_INTERVAL:
                    pruned_at = time.monotonic()
                    try:
                        if n := await self.prune():
                            log.info("pruned %d finished deliveries", n)
                    except Exception:
                        log.exception("pruning deliveries failed")
                wait = self.poll
                free = self.cfg.concurrency - len(self.inflight)
                if free > 0:
                    try:
                        due = await self._call(self.store.next_delivery_due)
                        now = self.clock()
                        if due is not None and due <= now:
                            claimed = await self.claim(free)
                            for token, row in claimed:
                                self.start(token, row)
                            if len(claimed) == free:
                                continue  # maybe more due: claim again once a slot frees
                        elif due is not None:
                            wait = min(self.poll, max(0.0, due - now))
                    except Exception:  # database locked or gone: try again shortly
                        log.exception("looking for due deliveries failed")
                        wait = 1.0
                    waiters = {stopping}
                else:
                    waiters = {stopping, *self.inflight.values()}
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if self.inflight:  # let attempts under way finish (and be recorded)
                await asyncio.wait(list(self.inflight.values()), timeout=self.cfg.timeout + 1)
            for task in list(self.inflight.values()):
                task.cancel()


def run(store, settings) -> int:
    """`mtasidecar webhooks`: send until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sender = Sender(store, settings)
        log.info("webhook sender: %d at a time, %g s per attempt, retried for %g s",
                 settings.webhooks.concurrency, settings.webhooks.timeout, settings.webhooks.max_age)
        try:
            await sender.run(stop)
        finally:
            sender.close()

    asyncio.run(main())
    return 0
