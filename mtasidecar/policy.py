"""`mtasidecar policy`: Postfix's policy delegation server.

Postfix asks us at RCPT time (``check_policy_service`` in
``smtpd_recipient_restrictions``, see postfix/policy.cf.in) whether it may
accept one recipient. The protocol (Postfix's SMTPD_POLICY_README): the
client sends ``name=value`` lines and an empty line; we answer
``action=...`` and an empty line. Postfix keeps the connection open and asks
again, one request at a time.

Decisions, only at ``protocol_state=RCPT`` (every other state: DUNNO), in
this order:

1. the recipient is not in one of our domains → DUNNO (Postfix refuses relay
   itself, in ``smtpd_relay_restrictions``, before asking us);
2. private domain and no live mailbox (unknown, expired, or never made
   through the API) → ``550 5.1.1 no such mailbox``;
3. the size the client declared (``MAIL FROM ... SIZE=``) is over
   ``smtp.message_size_limit`` → ``552 5.3.4 message too large`` (Postfix
   refuses a SIZE over its own message_size_limit at MAIL FROM already; this
   matters when a system Postfix allows more than we do);
4. the client IP has started more than ``policy.rate_limit`` messages in the
   current window of ``policy.rate_window`` seconds →
   ``450 4.7.1 too many messages from IP, try again later``;
5. the message already has ``policy.max_recipients`` accepted recipients →
   ``452 4.5.3 too many recipients`` (the sender sends the rest in another
   transaction, RFC 5321 §4.5.3.1.10);

otherwise DUNNO, and Postfix goes on with its own checks.

Counting. A message is Postfix's ``instance`` attribute (one per MAIL FROM
transaction). It counts against the client's rate when its first recipient
passes checks 1-3; a refused attempt is not counted, so a client that was
told 450 is not kept out longer by retrying. The rate window is a fixed one
that opens at the client's first counted message: exact for "N per window",
one small record per client (a burst across a window edge can reach 2N in a
short time, which is fine for an abuse brake). Only recipients we passed count
towards ``max_recipients``. Both tables are bounded: a message is forgotten
10 minutes after its last recipient, a client once its window is over, and
each table holds at most ``MAX_ENTRIES`` (the least recently active go
first).

Fail-open. When Postfix cannot reach us it uses
``smtpd_policy_service_default_action``; we ship ``DUNNO`` (the
``policy.default_action`` setting), and answer the same action ourselves
when the database fails. A disposable inbox exists to receive the
verification mail *now*: with fail-closed (Postfix's default, 451) every
message, wanted ones included, would wait for the sender's retry, often
15-30 minutes, whenever this process restarts or hiccups. What fail-open
costs is bounded: Postfix still refuses foreign domains (relay) and
oversized mail itself; mail for unknown addresses on private domains is
stored for a mailbox nobody can open (it has no token), and the sweeper
drops it with the domain's retention. Such rows (no token, no password)
never make an address live on a private domain (check 2), so a fail-open
window does not open addresses for later. Operators who prefer "no mail for
unknown addresses, ever" set
``policy.default_action = "DEFER_IF_PERMIT 4.3.0 ..."``.

Speed. One check costs a primary-key-like point query on ``mailbox.address``
(unique index), ~30 µs with SQLite, plus the domain lookup in a map cached for
``DOMAINS_TTL`` seconds. It runs synchronously on the event-loop thread: a
hop to a worker thread cost more than the query itself (measured, see
docs/architecture.md), and in WAL mode readers do not wait for writers. The
connection's busy timeout is cut to ``BUSY_TIMEOUT_MS`` so that the rare
case where a reader must wait (WAL recovery after a crash) cannot stall
every connection for long; a failed lookup answers ``default_action``.
SQL is written out once rather than built by peewee per call (peewee's
query building costs ~10x the query).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import stat
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from .store.models import Domain, Mailbox, Token
from .store.store import domain_of

log = logging.getLogger("mtasidecar.policy")

MAX_LINE = 4096            # bytes in one name=value line (Postfix sends far less)
MAX_REQUEST = 64 * 1024    # bytes in one request
MAX_ENTRIES = 100_000      # per table: messages in flight, clients in a window
INSTANCE_TTL = 600.0       # forget a message this long after its last recipient
DOMAINS_TTL = 5.0          # seconds the domain map is cached
BUSY_TIMEOUT_MS = 250      # SQLite busy timeout of the policy's own connection

DUNNO = "DUNNO"
MALFORMED = "DEFER_IF_PERMIT 4.3.0 policy request malformed"
NO_MAILBOX = "550 5.1.1 no such mailbox"
TOO_LARGE = "552 5.3.4 message too large"
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients"


def _q(field) -> str:
    """A column name quoted for SQL (SQLite and PostgreSQL both take double quotes)."""
    return f'"{field.column_name}"'


def rate_refusal(client: str) -> str:
    return f"450 4.7.1 too many messages from {client}, try again later"


class Policy:
    """The decisions, without any networking: ``check(attributes) -> action``.

    ``clock`` (monotonic seconds) drives the rate window and the forgetting of
    state; ``wall`` (epoch seconds) is compared with mailbox expiry times.
    Both are injectable for tests.
    """

    def __init__(self, db, *, rate_limit: int = 120, rate_window: float = 60.0, max_recipients: int = 50,
                 message_size_limit: int = 25 * 1024 * 1024, error_action: str = DUNNO,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 max_entries: int = MAX_ENTRIES, instance_ttl: float = INSTANCE_TTL,
                 domains_ttl: float = DOMAINS_TTL):
        self.db = db
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.max_recipients = max_recipients
        self.message_size_limit = message_size_limit
        self.error_action = error_action
        self.clock = clock
        self.wall = wall
        self.max_entries = max_entries
        self.instance_ttl = instance_ttl
        self.domains_ttl = domains_ttl
        # instance -> [accepted recipients, last seen]; oldest activity first.
        self.instances: OrderedDict[str, list] = OrderedDict()
        # client IP -> [window start, messages in window, last counted]; oldest activity first.
        self.clients: OrderedDict[str, list] = OrderedDict()
        self._domains: dict[str, tuple[bool, str]] | None = None
        self._subdomains: dict[str, bool] = {}
        self._domains_at = float("-inf")
        self._last_error_log = float("-inf")
        self._sql = self._mailbox_sql(db)
        self._domains_sql = (f'SELECT {_q(Domain.name)}, {_q(Domain.subdomains)}, {_q(Domain.mode)} '
                             f'FROM "{Domain._meta.table_name}" WHERE {_q(Domain.active)} = {db.param}')

    @classmethod
    def from_settings(cls, db, settings, **kw) -> Policy:
        p = settings.policy
        return cls(db, rate_limit=p.rate_limit, rate_window=p.rate_window, max_recipients=p.max_recipients,
                   message_size_limit=settings.smtp.message_size_limit, error_action=p.default_action, **kw)

    @staticmethod
    def _mailbox_sql(db) -> str:
        # Owned: made through the API (it has a token) or as a mail.tm-style
        # account (it has a password). Rows the ingester made for mail that
        # arrived have neither.
        return (f'SELECT m.{_q(Mailbox.expires_at)}, (m.{_q(Mailbox.password_hash)} IS NOT NULL OR EXISTS '
                f'(SELECT 1 FROM "{Token._meta.table_name}" t WHERE t.{_q(Token.mailbox)} = m.{_q(Mailbox.id)})) '
                f'FROM "{Mailbox._meta.table_name}" m WHERE m.{_q(Mailbox.address)} = {db.param}')

    # -- the decision ----------------------------------------------------------

    def check(self, attrs: dict[str, str]) -> str:
        """The action for one request (without the ``action=`` prefix)."""
        if attrs.get("request") != "smtpd_access_policy":
            return MALFORMED
        if attrs.get("protocol_state", "").upper() != "RCPT":
            return DUNNO
        try:
            return self._check_rcpt(attrs)
        except Exception:  # the database, most likely: answer as if we were down
            now = self.clock()
            if now - self._last_error_log > 10:
                self._last_error_log = now
                log.exception("policy check failed; answering %r", self.error_action)
            return self.error_action

    def _check_rcpt(self, attrs: dict[str, str]) -> str:
        recipient = attrs.get("recipient", "").strip().lower()
        if "@" not in recipient:
            return DUNNO  # "postmaster" without a domain, or nothing: Postfix decides
        now = self.clock()
        domains = self._domain_map(now)
        name = domain_of(recipient, self._subdomains)
        if name is None:
            return DUNNO
        if domains[name][1] != "public" and not self._live(recipient):
            return NO_MAILBOX
        size = attrs.get("size", "")
        if size.isdigit() and int(size) > self.message_size_limit:
            return TOO_LARGE

        self._expire(now)
        instance = attrs.get("instance", "")
        state = self.instances.get(instance) if instance else None
        if state is None:
            client = attrs.get("client_address", "") or "unknown"
            if not self._count_message(client, now):
                return rate_refusal(client)
            state = [0, now]
            if instance:
                self.instances[instance] = state
                if len(self.instances) > self.max_entries:
                    self.instances.popitem(last=False)
        else:
            self.instances.move_to_end(instance)
        state[1] = now
        if state[0] >= self.max_recipients:
            return TOO_MANY_RECIPIENTS
        state[0] += 1
        return DUNNO

    def _live(self, address: str) -> bool:
        """A mailbox someone owns (a token or a password) that has not expired."""
        # fetchall, not fetchone: the statement runs to its end, so no read
        # transaction (WAL snapshot) stays open between requests.
        rows = self.db.execute_sql(self._sql, (address,)).fetchall()
        if not rows:
            return False
        expires_at, owned = rows[0]
        return bool(owned) and (expires_at is None or expires_at > self.wall())

    def _count_message(self, client: str, now: float) -> bool:
        """Count one new message for ``client``; False (not counted) when over the rate."""
        entry = self.clients.get(client)
        if entry is None or now - entry[0] >= self.rate_window:
            entry = [now, 0, now]
            self.clients[client] = entry
        if entry[1] >= self.rate_limit:
            return False
        entry[1] += 1
        entry[2] = now
        self.clients.move_to_end(client)
        if len(self.clients) > self.max_entries:
            self.clients.popitem(last=False)
        return True

    def _expire(self, now: float) -> None:
        # Both tables are ordered by last activity, so the expired ones are in front.
        instances = self.instances
        while instances:
            first = next(iter(instances.values()))
            if now - first[1] < self.instance_ttl:
                break
            instances.popitem(last=False)
        clients = self.clients
        while clients:
            first = next(iter(clients.values()))
            if now - first[2] < self.rate_window:
                break
            clients.popitem(last=False)

    def _domain_map(self, now: float) -> dict[str, tuple[bool, str]]:
        if self._domains is None or now - self._domains_at >= self.domains_ttl:
            try:
                fresh = {name: (bool(sub), mode) for name, sub, mode in
                         self.db.execute_sql(self._domains_sql, (True,)).fetchall()}
            except Exception:
                if self._domains is None:
                    raise
                log.exception("cannot refresh the domain list; keeping the previous one")
                fresh = self._domains
            self._domains = fresh
            self._subdomains = {n: sub for n, (sub, _mode) in fresh.items()}
            self._domains_at = now
        return self._domains


# -- the protocol ----------------------------------------------------------------


class PolicyProtocol(asyncio.Protocol):
    """One client connection: any number of requests, answered in order.

    A line that is not ``name=value`` makes its request malformed (answered
    with MALFORMED when its empty line comes, and the connection goes on). A
    line over MAX_LINE bytes or a request over MAX_REQUEST bytes closes the
    connection: no legitimate client sends those.
    """

    def __init__(self, policy: Policy, connections: set | None = None):
        self.policy = policy
        self.connections = connections
        self.transport = None
        self.buffer = b""
        self.attrs: dict[str, str] = {}
        self.size = 0
        self.bad = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.connections is not None:
            self.connections.add(self)

    def connection_lost(self, exc) -> None:
        if self.connections is not None:
            self.connections.discard(self)

    def pause_writing(self) -> None:  # the client does not read its answers
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        start = 0
        out = []
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 1
            if len(line) > MAX_LINE:
                return self._abort(out, "line over %d bytes" % MAX_LINE)
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                self.size += len(line) + 1
                if self.size > MAX_REQUEST:
                    return self._abort(out, "request over %d bytes" % MAX_REQUEST)
                name, sep, value = line.partition(b"=")
                if sep and name:
                    try:
                        self.attrs[name.decode("ascii")] = value.decode("utf-8", "replace")
                    except UnicodeDecodeError:
                        self.bad = True
                else:
                    self.bad = True
                continue
            action = MALFORMED if self.bad or not self.attrs else self.policy.check(self.attrs)
            out.append(b"action=" + action.encode("utf-8", "replace") + b"\n\n")
            self.attrs = {}
            self.size = 0
            self.bad = False
        self.buffer = buf[start:]
        if len(self.buffer) > MAX_LINE:
            return self._abort(out, "line over %d bytes" % MAX_LINE)
        if out:
            self.transport.write(b"".join(out))

    def _abort(self, out: list[bytes], why: str) -> None:
        peer = self.transport.get_extra_info("peername")
        log.warning("closing policy connection from %s: %s", peer or "unix socket", why)
        if out:
            self.transport.write(b"".join(out))
        self.buffer = b""
        self.transport.close()


# -- the server ------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, str, int]:
    """("unix", path, 0) or ("inet", host, port) for a policy.listen setting."""
    from .config import _parse_hostport
    if listen.startswith("unix:"):
        return "unix", listen[len("unix:"):], 0
    if listen.endswith(":0"):  # any free port (tests)
        host, _port = _parse_hostport("policy.listen", listen[:-1] + "1", default_port=10040)
        return "inet", host, 0
    host, port = _parse_hostport("policy.listen", listen, default_port=10040)
    return "inet", host, port


def postfix_endpoint(listen: str) -> str:
    """The ``check_policy_service`` argument for a policy.listen setting."""
    kind, host, port = parse_listen(listen)
    if kind == "unix":
        return f"unix:{host}"
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"


class PolicyServer:
    """Listens on ``listen`` ("host:port", port 0 for any, or "unix:/path")."""

    def __init__(self, policy: Policy, listen: str):
        self.policy = policy
        self.listen = listen
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[PolicyProtocol] = set()
        self.unix_path: Path | None = None

    @property
    def address(self) -> str:
        """What the server listens on, in the form of ``listen`` (the real port)."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: PolicyProtocol(self.policy, self.connections)  # noqa: E731
        kind, host, port = parse_listen(self.listen)
        if kind == "unix":
            path = Path(host)
            _remove_stale_socket(path)
            self.server = await loop.create_unix_server(factory, str(path))
            self.unix_path = path
            _share_with_postfix(path)
        else:
            self.server = await loop.create_server(factory, host, port, reuse_address=True,
                                                   family=socket.AF_INET6 if ":" in host else socket.AF_INET)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self.server.wait_closed()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a previous run; refuse if someone still listens on it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise OSError(f"another process listens on {path}")
    finally:
        probe.close()


def _share_with_postfix(path: Path) -> None:
    """Postfix's smtpd (user postfix) must be able to connect to the socket."""
    try:
        os.chown(path, -1, grp.getgrnam("postfix").gr_gid)
        os.chmod(path, 0o660)
    except (KeyError, PermissionError):
        os.chmod(path, 0o666)


def _open_db(store):
    """The store's database with a short busy timeout on this process's connection."""
    db = store.db
    db.connect(reuse_if_open=True)
    if db.__class__.__name__.startswith("Sqlite"):
        db.execute_sql(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


async def serve(settings, store, stop: asyncio.Event, ready: Callable[[PolicyServer], None] | None = None) -> None:
    policy = Policy.from_settings(_open_db(store), settings)
    server = PolicyServer(policy, settings.policy.listen)
    await server.start()
    log.info("policy service listening on %s (rate %d per %g s, %d recipients, default action %s)",
             server.address, policy.rate_limit, policy.rate_window, policy.max_recipients, policy.error_action)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.close()
        log.info("policy service stopped")


def run(settings, store) -> int:
    """The `mtasidecar policy` process: serve until SIGTERM or SIGINT."""
    if not settings.policy.listen:
        log.error("policy.listen is empty: nothing to serve")
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, store, stop)

    try:
        asyncio.run(main())
    finally:
        store.close()
    return 0
