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
4. only for a domain with ``reject_spf_fail = true``: SPF for
   (``client_address``, ``sender``, ``helo_name``) says ``fail`` →
   ``550 5.7.23 SPF validation failed`` (RFC 7372); every other SPF result
   (pass, softfail, neutral, none, temperror, permerror) goes on;
5. the client IP has started more than ``policy.rate_limit`` messages in the
   current window of ``policy.rate_window`` seconds →
   ``450 4.7.1 too many messages from IP, try again later``;
6. the message already has ``policy.max_recipients`` accepted recipients →
   ``452 4.5.3 too many recipients`` (the sender sends the rest in another
   transaction, RFC 5321 §4.5.3.1.10);

otherwise DUNNO, and Postfix goes on with its own checks.

SPF. The check is the ingester's own SPF evaluation (mail/auth.py:
``Authenticator.check_spf``: pyspf, every look-up through a
``CachingResolver`` on ``dns.servers``, this process's own), bounded by
``policy.spf_budget`` seconds (each look-up also by ``dns.timeout``); past
it the result is temperror and the mail is accepted. It runs in a thread,
never on the event loop: other connections keep their fast path, and the
waiting connection's later requests (Postfix sends none before the answer)
are answered in order after it. Verdicts are kept per (client IP, sender,
HELO name) for ``SPF_CACHE_TTL`` seconds, so the other recipients of a
message, and the next messages of the same sender, cost nothing; temperror
is not kept. The key holds the whole sender, not only its domain: a record
may use the local part (the %{l} macro), and a verdict for one address must
not refuse another. Domains without ``reject_spf_fail`` never pay for SPF.

Counting. A message is Postfix's ``instance`` attribute (one per MAIL FROM
transaction). It counts against the client's rate when its first recipient
passes checks 1-4; a refused attempt is not counted, so a client that was
told 450 is not kept out longer by retrying. The rate window is a fixed one
that opens at the client's first counted message: exact for "N per window",
one small record per client (a burst across a window edge can reach 2N in a
short time, which is fine for an abuse brake). Only recipients we passed count
towards ``max_recipients``. Both tables are bounded: a message is forgotten
10 minutes after its last recipient, a client once its window is over, and
each table holds at most ``MAX_ENTRIES`` (the least recently active go
first).

Fail-open. When Postfix cannot reach us it uses the ``default_action`` our
``check_policy_service`` entry carries (mtasidecar/mta/render.py:
policy_entry); we ship ``DUNNO`` (the ``policy.default_action`` setting), and answer the same action ourselves
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
import collections
import contextlib
import grp
import json
import logging
import os
import signal
import socket
import stat
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .socketmap import SocketmapProtocol, TrackedProtocol
from .store.models import Domain, Mailbox, Token
from .store.store import candidate_domains, domain_of

log = logging.getLogger("mtasidecar.policy")

MAX_LINE = 4096            # bytes in one name=value line (Postfix sends far less)
MAX_REQUEST = 64 * 1024    # bytes in one request
MAX_ENTRIES = 100_000      # per table: messages in flight, clients in a window
INSTANCE_TTL = 600.0       # forget a message this long after its last recipient
DOMAINS_TTL = 5.0          # seconds the domain map is cached (a socketmap miss checks at once)
BUSY_TIMEOUT_MS = 250      # SQLite busy timeout of the policy's own connection
SPF_CACHE_TTL = 60.0       # seconds an SPF verdict is kept per (client IP, sender, HELO)
SPF_THREADS = 16           # SPF checks waiting on DNS at once (others queue)
MAX_BACKLOG = 64           # requests queued on one connection behind an SPF check

DUNNO = "DUNNO"
MALFORMED = "DEFER_IF_PERMIT 4.3.0 policy request malformed"
NO_MAILBOX = "550 5.1.1 no such mailbox"
TOO_LARGE = "552 5.3.4 message too large"
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients"
SPF_FAIL = "550 5.7.23 SPF validation failed"
DOMAIN_DISABLED = "550 5.1.2 domain not served here"


def _q(field) -> str:
    """A column name quoted for SQL (SQLite and PostgreSQL both take double quotes)."""
    return f'"{field.column_name}"'


def rate_refusal(client: str) -> str:
    return f"450 4.7.1 too many messages from {client}, try again later"


@dataclass(slots=True)
class SpfPending:
    """A decision that waits for an SPF verdict (see ``Policy.begin``)."""

    attrs: dict
    key: tuple[str, str, str]  # (client IP, sender, HELO name): what SPF is asked about


class SpfCheck:
    """(client IP, sender, HELO name) → SPF result, through a cached resolver.

    Thread-safe; never raises. ``budget``: seconds for all look-ups of one check.
    """

    def __init__(self, servers=None, *, timeout: float = 2.0, budget: float = 3.0, hostname: str | None = None):
        from .mail.auth import Authenticator  # dnspython, pyspf: only for domains that ask
        self.auth = Authenticator(servers or None, timeout=timeout, budget=budget, hostname=hostname)
        self.budget = budget

    def __call__(self, ip: str, sender: str, helo: str) -> str:
        return self.auth.check_spf(sender, ip, helo, self.budget).result

    def close(self) -> None:
        self.auth.close()


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
                 domains_ttl: float = DOMAINS_TTL, spf_reject: Iterable[str] = (),
                 spf_check: Callable[[str, str, str], str] | None = None, spf_cache_ttl: float = SPF_CACHE_TTL,
                 spf_factory: Callable[[], Callable[[str, str, str], str]] | None = None):
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
        self._disabled: dict[str, bool] = {}  # name → subdomains, of runtime domains switched off
        self._domains_at = float("-inf")
        self._last_error_log = float("-inf")
        self._sql = self._mailbox_sql(db)
        self._domains_sql = (f'SELECT {_q(Domain.name)}, {_q(Domain.subdomains)}, {_q(Domain.mode)}, '
                             f'{_q(Domain.source)}, {_q(Domain.settings)}, {_q(Domain.active)} '
                             f'FROM "{Domain._meta.table_name}"')
        # Domains whose recipients are refused when SPF fails (configured, and
        # runtime ones from the domain map), and the check, built on first use:
        # only those domains pay for DNS and pyspf.
        self.spf_reject = frozenset(d.lower() for d in spf_reject)
        self._spf_runtime: frozenset[str] = frozenset()
        self._spf_factory = spf_factory or SpfCheck
        self.spf_check = spf_check if spf_check is not None or not self.spf_reject else self._spf_factory()
        self.spf_cache_ttl = spf_cache_ttl
        # (client IP, sender, HELO) -> [result, expires]; oldest first.
        self.spf_results: OrderedDict[tuple, list] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_settings(cls, db, settings, **kw) -> Policy:
        p = settings.policy
        reject = [d.name for d in settings.domains if d.reject_spf_fail]

        def spf_factory() -> SpfCheck:
            return SpfCheck(settings.dns.server_addresses(), timeout=settings.dns.timeout,
                            budget=p.spf_budget, hostname=settings.hostname)

        if reject and "spf_check" not in kw:
            kw["spf_check"] = spf_factory()
        kw.setdefault("spf_factory", spf_factory)
        return cls(db, rate_limit=p.rate_limit, rate_window=p.rate_window, max_recipients=p.max_recipients,
                   message_size_limit=settings.smtp.message_size_limit, error_action=p.default_action,
                   spf_reject=reject, **kw)

    def executor(self) -> ThreadPoolExecutor:
        """Threads for SPF checks (DNS waits), never the event loop's."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(SPF_THREADS, thread_name_prefix="mtasidecar-policy-spf")
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        close = getattr(self.spf_check, "close", None)
        if close is not None:
            close()

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
        """The action for one request (without the ``action=`` prefix).

        Blocks for the SPF check when one is needed; the server uses
        ``begin``/``spf_verdict``/``finish`` to wait for it off the event loop.
        """
        step = self.begin(attrs)
        if isinstance(step, SpfPending):
            return self.finish(step, self.spf_verdict(step))
        return step

    def begin(self, attrs: dict[str, str]) -> str | SpfPending:
        """The action, or an SpfPending when the answer needs an SPF check first."""
        if attrs.get("request") != "smtpd_access_policy":
            return MALFORMED
        if attrs.get("protocol_state", "").upper() != "RCPT":
            return DUNNO
        try:
            return self._check_rcpt(attrs)
        except Exception:  # the database, most likely: answer as if we were down
            return self._failed()

    def spf_verdict(self, pending: SpfPending) -> str:
        """Run the SPF check (blocking, thread-safe); never raises."""
        try:
            return self.spf_check(*pending.key)
        except Exception:  # noqa: BLE001 - accept rather than refuse on a bug
            log.exception("SPF check failed for %s from %s", pending.key[1], pending.key[0])
            return "temperror"

    def finish(self, pending: SpfPending, result: str) -> str:
        """The action for a request that waited for the SPF ``result``."""
        try:
            now = self.clock()
            self._remember_spf(pending.key, result, now)
            if result == "fail":
                return SPF_FAIL
            self._expire(now)
            return self._count(pending.attrs, now)
        except Exception:
            return self._failed()

    def _failed(self) -> str:
        now = self.clock()
        if now - self._last_error_log > 10:
            self._last_error_log = now
            log.exception("policy check failed; answering %r", self.error_action)
        return self.error_action

    def _check_rcpt(self, attrs: dict[str, str]) -> str | SpfPending:
        recipient = attrs.get("recipient", "").strip().lower()
        if "@" not in recipient:
            return DUNNO  # "postmaster" without a domain, or nothing: Postfix decides
        now = self.clock()
        domains = self._domain_map(now)
        name = domain_of(recipient, self._subdomains)
        if name is None:
            # Postfix let it past its relay check, so it took the domain for ours: a domain
            # disabled a moment ago, still in an smtpd process's address cache.
            return DOMAIN_DISABLED if domain_of(recipient, self._disabled) else DUNNO
        if domains[name][1] != "public" and not self._live(recipient):
            return NO_MAILBOX
        size = attrs.get("size", "")
        if size.isdigit() and int(size) > self.message_size_limit:
            return TOO_LARGE
        if name in self.spf_reject or name in self._spf_runtime:
            if self.spf_check is None:
                self.spf_check = self._spf_factory()
            key = (attrs.get("client_address", "").strip(), attrs.get("sender", "").strip().lower(),
                   attrs.get("helo_name", "").strip().lower())
            verdict = self._spf_cached(key, now)
            if verdict is None:
                return SpfPending(attrs, key)
            if verdict == "fail":
                return SPF_FAIL
        self._expire(now)
        return self._count(attrs, now)

    def _spf_cached(self, key: tuple, now: float) -> str | None:
        entry = self.spf_results.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self.spf_results[key]
            return None
        return entry[0]

    def _remember_spf(self, key: tuple, result: str, now: float) -> None:
        if result == "temperror":
            return  # DNS trouble: ask again next time
        self.spf_results[key] = [result, now + self.spf_cache_ttl]
        self.spf_results.move_to_end(key)
        results = self.spf_results
        while results and (len(results) > self.max_entries or next(iter(results.values()))[1] <= now):
            results.popitem(last=False)

    def _count(self, attrs: dict[str, str], now: float) -> str:
        """Checks 5 and 6: the client's message rate and the recipients per message."""
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
                rows = self.db.execute_sql(self._domains_sql).fetchall()
            except Exception:
                if self._domains is None:
                    raise
                log.exception("cannot refresh the domain list; keeping the previous one")
            else:
                self._domains = {name: (bool(sub), mode) for name, sub, mode, _src, _settings, on in rows if on}
                self._subdomains = {n: sub for n, (sub, _mode) in self._domains.items()}
                # Only runtime domains: a domain dropped from the configuration may be served by
                # this Postfix for other mail now, which must not be refused in our name.
                self._disabled = {name: bool(sub) for name, sub, _mode, source, _settings, on in rows
                                  if not on and source == "api"}
                self._spf_runtime = frozenset(name for name, _sub, _mode, source, settings, on in rows
                                              if on and source == "api" and _wants_spf_reject(settings))
            self._domains_at = now
        return self._domains

    # -- the socketmap (mtasidecar/socketmap.py) --------------------------------

    def socketmap(self, name: str, key: str) -> str:
        """Postfix's table look-up (virtual_mailbox_domains): is the host ``key`` one of ours?"""
        key = key.strip().lower()
        if name != "domain":
            return f"PERM unknown map {name!r}: expected 'domain'"
        if key.startswith(".") or "@" in key or not key:
            return "NOTFOUND "  # parent-domain probes: the full name was answered already
        address = "@" + key
        try:
            self._domain_map(self.clock())
            found = domain_of(address, self._subdomains)
            if found is None and self._added_since(address):
                self._domains_at = float("-inf")
                self._domain_map(self.clock())
                found = domain_of(address, self._subdomains)
        except Exception:
            log.exception("socketmap: cannot read the domain list")
            return "TEMP domain list unavailable"
        return "NOTFOUND " if found is None else "OK ok"

    def _added_since(self, address: str) -> bool:
        """Whether a name ``address`` could belong to became active since the map was read:
        one indexed look-up, so a domain added a moment ago is served at once."""
        names = [n for n in candidate_domains(address) if n not in self._subdomains]
        if not names:
            return False
        marks = ", ".join([self.db.param] * len(names))
        sql = (f'SELECT 1 FROM "{Domain._meta.table_name}" WHERE {_q(Domain.active)} = {self.db.param} '
               f'AND {_q(Domain.name)} IN ({marks})')
        return bool(self.db.execute_sql(sql, (True, *names)).fetchall())


def _wants_spf_reject(settings_json: str | None) -> bool:
    try:
        return bool(json.loads(settings_json or "{}").get("reject_spf_fail"))
    except (ValueError, AttributeError):
        return False


# -- the protocol ----------------------------------------------------------------


class PolicyProtocol(TrackedProtocol):
    """One client connection: any number of requests, answered in order.

    A line that is not ``name=value`` makes its request malformed (answered
    with MALFORMED when its empty line comes, and the connection goes on). A
    line over MAX_LINE bytes or a request over MAX_REQUEST bytes closes the
    connection: no legitimate client sends those.

    A request that needs an SPF check is answered when the check (in a
    thread) is done; requests that arrive meanwhile wait in ``backlog`` (at
    most MAX_BACKLOG, else the connection is closed) and are answered after
    it, in order.
    """

    def __init__(self, policy: Policy, connections: set | None = None):
        super().__init__(connections)
        self.policy = policy
        self.buffer = b""
        self.attrs: dict[str, str] = {}
        self.size = 0
        self.bad = False
        self.waiting = False  # an SPF check is running for the oldest unanswered request
        self.backlog: collections.deque[dict | None] = collections.deque()  # None: malformed

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
            if not self._request(None if self.bad or not self.attrs else self.attrs, out):
                return self._abort(out, "over %d requests waiting behind an SPF check" % MAX_BACKLOG)
            self.attrs = {}
            self.size = 0
            self.bad = False
        self.buffer = buf[start:]
        if len(self.buffer) > MAX_LINE:
            return self._abort(out, "line over %d bytes" % MAX_LINE)
        if out:
            self.transport.write(b"".join(out))

    def _request(self, attrs: dict | None, out: list[bytes]) -> bool:
        """Answer one request into ``out``, start its SPF check, or queue it; False: backlog full."""
        if self.waiting:
            if len(self.backlog) >= MAX_BACKLOG:
                return False
            self.backlog.append(attrs)
            return True
        step = MALFORMED if attrs is None else self.policy.begin(attrs)
        if isinstance(step, SpfPending):
            self.waiting = True
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.policy.executor(), self.policy.spf_verdict, step)
            future.add_done_callback(lambda f: self._spf_done(step, f))
        else:
            out.append(_answer(step))
        return True

    def _spf_done(self, pending: SpfPending, future: asyncio.Future) -> None:
        if future.cancelled() or self.transport is None or self.transport.is_closing():
            return
        exc = future.exception()
        out = [_answer(self.policy.finish(pending, "temperror" if exc else future.result()))]
        self.waiting = False
        while self.backlog and not self.waiting:
            self._request(self.backlog.popleft(), out)
        self.transport.write(b"".join(out))

    def _abort(self, out: list[bytes], why: str) -> None:
        peer = self.transport.get_extra_info("peername")
        log.warning("closing policy connection from %s: %s", peer or "unix socket", why)
        if out:
            self.transport.write(b"".join(out))
        self.buffer = b""
        self.transport.close()


def _answer(action: str) -> bytes:
    return b"action=" + action.encode("utf-8", "replace") + b"\n\n"


# -- the server ------------------------------------------------------------------


def parse_listen(listen: str, default_port: int = 10040) -> tuple[str, str, int]:
    """("unix", path, 0) or ("inet", host, port) for a policy.listen (or .socketmap) setting."""
    from .config import _parse_hostport
    if listen.startswith("unix:"):
        return "unix", listen[len("unix:"):], 0
    if listen.endswith(":0"):  # any free port (tests)
        host, _port = _parse_hostport("policy.listen", listen[:-1] + "1", default_port=default_port)
        return "inet", host, 0
    host, port = _parse_hostport("policy.listen", listen, default_port=default_port)
    return "inet", host, port


def postfix_endpoint(listen: str, default_port: int = 10040) -> str:
    """The ``check_policy_service`` argument for a policy.listen setting (or the socketmap's endpoint)."""
    kind, host, port = parse_listen(listen, default_port)
    if kind == "unix":
        return f"unix:{host}"
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"


def postfix_endpoints(policy_settings) -> tuple[str | None, str | None]:
    """What Postfix is told for a [policy] section: (check_policy_service endpoint,
    socketmap endpoint), each None when that listener is off."""
    listen, socketmap = policy_settings.listen, policy_settings.served_socketmap
    return (postfix_endpoint(listen) if listen else None,
            postfix_endpoint(socketmap, 10041) if socketmap else None)


class PolicyServer:
    """Listens on ``listen`` ("host:port", port 0 for any, or "unix:/path").

    ``socketmap=True``: serves the policy's socketmap look-ups instead of
    policy requests (the same listener code, another protocol).
    """

    def __init__(self, policy: Policy, listen: str, *, socketmap: bool = False):
        self.policy = policy
        self.listen = listen
        self.socketmap = socketmap
        self.server: asyncio.AbstractServer | None = None
        self.connections: set = set()
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
        if self.socketmap:
            factory = lambda: SocketmapProtocol(self.policy.socketmap, self.connections)  # noqa: E731
        else:
            factory = lambda: PolicyProtocol(self.policy, self.connections)  # noqa: E731
        kind, host, port = parse_listen(self.listen, 10041 if self.socketmap else 10040)
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
    socketmap = PolicyServer(policy, settings.policy.socketmap, socketmap=True) if settings.policy.socketmap else None
    await server.start()
    log.info("policy service listening on %s (rate %d per %g s, %d recipients, default action %s)",
             server.address, policy.rate_limit, policy.rate_window, policy.max_recipients, policy.error_action)
    if socketmap is not None:
        await socketmap.start()
        log.info("socketmap (domains added at runtime) on %s", socketmap.address)
    if policy.spf_reject:
        log.info("refusing SPF fail (550 5.7.23) for %s", ", ".join(sorted(policy.spf_reject)))
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.close()
        if socketmap is not None:
            await socketmap.close()
        policy.close()
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
