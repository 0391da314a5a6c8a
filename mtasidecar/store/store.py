"""The storage layer: every read and write the API and the ingester make.

Knows neither the spool nor HTTP. Methods are synchronous and take whole
transactions; callers on an event loop run them in a thread. Connections
are per thread (peewee's default), opened on first use and kept.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from dataclasses import dataclass, field

import peewee as pw
import zstandard

from .db import create_schema, open_database
from .hot import HotQueries
from .models import Attachment, Delivery, Domain, Mailbox, Message, MessageBody, Token, Webhook

def fn_exists(query):
    return pw.fn.EXISTS(query)


@dataclass(slots=True)
class NewMessage:
    """One spool file, prepared for storage by the ingest pipeline."""

    spool_name: str
    recipient: str
    received_at: float
    size: int
    raw_z: bytes | None           # zlib'd raw bytes; None when set aside
    document_z: bytes             # zlib'd JSON of the parsed view
    envelope_from: str | None = None
    from_name: str = ""
    from_address: str = ""
    to: list = field(default_factory=list)
    subject: str = ""
    intro: str = ""
    message_id: str | None = None
    parse_error: str | None = None
    spf: str | None = None
    dmarc: str | None = None
    authenticated: bool | None = None
    # Hidden from lists, events and webhooks (see Message.quarantined).
    quarantined: bool = False
    has_code: bool = False
    has_link: bool = False
    attachments: list = field(default_factory=list)  # dicts: index, filename, content_type, size, disposition, content_id


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_codecs = threading.local()


def _zstd():
    # Compressor objects are not safe to share between threads: one each.
    if not hasattr(_codecs, "c"):
        _codecs.c = zstandard.ZstdCompressor(level=3)
        _codecs.d = zstandard.ZstdDecompressor()
    return _codecs


def compress(data: bytes) -> bytes:
    # zstd: the same ratio as zlib on mail (~0.38 for 10 KB) at a sixth of
    # the CPU (measured 43 us against 217 us for zlib level 1).
    return _zstd().c.compress(data)


def decompress(data: bytes) -> bytes:
    if data[:4] == _ZSTD_MAGIC:
        return _zstd().d.decompress(data)
    return zlib.decompress(data)  # rows written before zstd


def candidate_domains(address: str) -> list[str]:
    """The names ``address`` (or a bare host) could belong to: its host, then each parent
    but the top-level label, the order domain_of tries them."""
    parts = address.rpartition("@")[2].split(".")
    return [".".join(parts[i:]) for i in range(max(1, len(parts) - 1))]


def domain_of(address: str, domains: dict[str, bool]) -> str | None:
    """The configured domain that ``address`` belongs to, if any.

    ``domains`` maps name → subdomains allowed. ``x@a.b.example.test`` belongs
    to ``example.test`` when that domain accepts subdomains.
    """
    host = address.rpartition("@")[2]
    if host in domains:
        return host
    parts = host.split(".")
    for i in range(1, len(parts) - 1):
        parent = ".".join(parts[i:])
        if domains.get(parent):
            return parent
    return None


@dataclass(slots=True)
class MessageFilter:
    """What a waiting client is waiting for. Substring matches are case-insensitive."""

    after_id: int | None = None
    sender: str | None = None      # in the From address or name
    subject: str | None = None
    recipient: str | None = None   # in the envelope recipient (public catch-alls)
    has_code: bool | None = None
    has_link: bool | None = None

    def apply(self, q):
        if self.after_id is not None:
            q = q.where(Message.id > self.after_id)
        if self.sender:
            q = q.where(Message.from_address.contains(self.sender) | Message.from_name.contains(self.sender))
        if self.subject:
            q = q.where(Message.subject.contains(self.subject))
        if self.recipient:
            q = q.where(Message.envelope_to.contains(self.recipient))
        if self.has_code is not None:
            q = q.where(Message.has_code == self.has_code)
        if self.has_link is not None:
            q = q.where(Message.has_link == self.has_link)
        return q


class Store:
    # The operator-wide webhook (settings.webhooks.url), set by the ingester:
    # every new message gets an outbox row for it. Empty: none.

    def __init__(self, url: str, operator_webhook_url: str = ""):
        self.url = url
        # Every new message also queues an event for this URL (webhooks.url).
        self.operator_webhook_url = operator_webhook_url
        self.db = open_database(url)
        self._sql = HotQueries(self.db, self.LIST_FIELDS)

    # -- lifecycle -----------------------------------------------------------

    def setup(self) -> None:
        """Create the schema. Run once before workers start, never in each."""
        create_schema(self.db)

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def sync_domains(self, domains: list[tuple]) -> None:
        """Make the Domain table match the configured domains.

        Items are (name, subdomains) or (name, subdomains, mode); mode
        defaults to "private". Domains added at runtime (source "api") are left alone, unless the
        configuration now names one: then the configuration owns it.
        """
        now = time.time()
        names = {d[0] for d in domains}
        with self.db.atomic():
            for name, sub, *rest in domains:
                mode = rest[0] if rest else "private"
                row = Domain.get_or_none(Domain.name == name)
                if row is None:
                    # Two processes starting at once may both get here: the
                    # unique name makes the second insert a no-op.
                    Domain.insert(name=name, subdomains=sub, mode=mode, active=True,
                                  created_at=now).on_conflict_ignore().execute()
                elif (row.subdomains, row.mode, row.active, row.source) != (sub, mode, True, "config"):
                    Domain.update(subdomains=sub, mode=mode, active=True, source="config",
                                  settings=None).where(Domain.id == row.id).execute()
            if names:
                Domain.update(active=False).where((Domain.source == "config")
                                                  & Domain.name.not_in(list(names))).execute()

    # -- domains added at runtime ---------------------------------------------

    def runtime_domains(self) -> list[Domain]:
        """Every domain an operator added (source "api"), disabled ones included."""
        return list(Domain.select().where(Domain.source == "api").order_by(Domain.name))

    def active_domain_names(self, names: list[str]) -> set[str]:
        """Which of ``names`` are active domains now (one indexed look-up: a just-added one?)."""
        return {n for (n,) in Domain.select(Domain.name).where(Domain.name.in_(names) & (Domain.active == True))  # noqa: E712
                .tuples()} if names else set()

    def domain(self, name: str) -> Domain | None:
        return Domain.get_or_none(Domain.name == name)

    def add_domain(self, name: str, subdomains: bool, mode: str, settings_json: str) -> Domain | None:
        """A new runtime domain, or None when the name is taken (configured or added before).

        A domain once configured and since removed from the configuration is
        free: its row (and its mailboxes) become the runtime domain's.
        """
        fields = dict(subdomains=subdomains, mode=mode, active=True, source="api", settings=settings_json)
        with self.db.atomic():
            row = Domain.get_or_none(Domain.name == name)
            if row is None:
                Domain.insert(name=name, created_at=time.time(), **fields).on_conflict_ignore().execute()
            elif row.source == "config" and not row.active:
                Domain.update(**fields).where(Domain.id == row.id).execute()
            else:
                return None
            return Domain.get_or_none(Domain.name == name)

    def update_domain(self, name: str, **fields) -> Domain | None:
        """Change a runtime domain (active, subdomains, mode, settings); None if there is none."""
        with self.db.atomic():
            updated = Domain.update(**fields).where((Domain.name == name) & (Domain.source == "api")).execute()
            return Domain.get_or_none(Domain.name == name) if updated else None

    # -- ingest --------------------------------------------------------------

    def ingest(self, items: list[NewMessage], new: set[str] | None = None) -> dict[str, int]:
        """Store a batch in ONE transaction; returns spool_name → message id.

        Files already stored (a crash between commit and unlink) are skipped
        and reported with their existing id, so the caller can remove them.
        ``new``, if given, receives the spool names this call inserted.
        """
        if not items:
            return {}
        # Statements go through precompiled SQL (store/hot.py): building them
        # with peewee cost more than SQLite takes to run them.
        sql = self._sql
        with self.db.atomic():
            done = sql.spool_ids([m.spool_name for m in items])
            fresh = [m for m in items if m.spool_name not in done]
            # Two files can carry the same spool name only if the caller
            # passed one twice; keep the first.
            seen: set[str] = set()
            fresh = [m for m in fresh if not (m.spool_name in seen or seen.add(m.spool_name))]
            mailbox_ids = self._mailboxes_for({m.recipient for m in fresh})
            ids = sql.insert_messages([sql.message_row(dict(
                mailbox=mailbox_ids[m.recipient], spool_name=m.spool_name, received_at=m.received_at,
                envelope_from=m.envelope_from, envelope_to=m.recipient,
                from_name=m.from_name, from_address=m.from_address,
                to_json=json.dumps(m.to, ensure_ascii=False), subject=m.subject, intro=m.intro,
                message_id=m.message_id, size=m.size, has_attachments=bool(m.attachments),
                seen=False, parse_error=m.parse_error, spf=m.spf, dmarc=m.dmarc,
                authenticated=m.authenticated, quarantined=m.quarantined,
                has_code=m.has_code, has_link=m.has_link,
            )) for m in fresh])
            counts: dict[int, list[int]] = {}
            stored: list[tuple[int, int]] = []  # (message id, mailbox id): webhook events
            bodies, attachments = [], []
            for m, msg_id in zip(fresh, ids):
                mb = mailbox_ids[m.recipient]
                bodies.append((msg_id, m.raw_z, m.document_z))
                attachments.extend(dict(a, message=msg_id) for a in m.attachments)
                done[m.spool_name] = msg_id
                if not m.quarantined:  # no webhook events for quarantined mail
                    stored.append((msg_id, mb))
                if new is not None:
                    new.add(m.spool_name)
                c = counts.setdefault(mb, [0, 0])
                c[0] += 1
                c[1] += m.size
            sql.insert_bodies(bodies)
            sql.insert_attachments(attachments)
            sql.bump_mailboxes([(n, size, mb) for mb, (n, size) in counts.items()])
            self._queue_webhook_events(stored)  # the outbox: same transaction as the messages
        return done

    def _mailboxes_for(self, addresses: set[str]) -> dict[str, int]:
        """Ids of the mailboxes for these addresses, creating missing ones."""
        found = self._sql.mailbox_ids(list(addresses))
        missing = addresses - set(found)
        if missing:
            domains = {d.name: (d.id, d.subdomains, d.mode) for d in Domain.select()}
            allowed = {name: sub for name, (_id, sub, _mode) in domains.items()}
            now = time.time()
            for address in sorted(missing):
                dom = domain_of(address, allowed)
                # On private domains only the API makes mailboxes. Mail that got in anyway (queued
                # before a DELETE or the expiry, or let through while the policy service was down)
                # lands in an already expired mailbox: the operator can read it until the sweeper
                # removes it, and the address stays refused at SMTP time and free to be created.
                private = dom is not None and domains[dom][2] == "private"
                found[address] = Mailbox.insert(
                    address=address, domain=domains[dom][0] if dom else None, created_at=now,
                    expires_at=now if private else None,
                ).execute()
        return found

    # -- reads ---------------------------------------------------------------

    def all_domains(self) -> list[Domain]:
        return list(Domain.select().order_by(Domain.name))

    def list_domains(self) -> list[Domain]:
        return list(Domain.select().where(Domain.active == True).order_by(Domain.name))  # noqa: E712

    def mailbox(self, address: str) -> Mailbox | None:
        return Mailbox.get_or_none(Mailbox.address == address)

    def mailbox_with_mode(self, address: str) -> tuple[Mailbox | None, str | None]:
        """The mailbox (or None) and the mode of its domain (None: unrouted)."""
        return self._sql.mailbox_with_mode(address)

    def domains_map(self) -> dict[str, tuple[bool, str]]:
        """Active domains: name → (subdomains, mode). For routing and the policy service."""
        return {name: (sub, mode) for name, sub, mode in
                Domain.select(Domain.name, Domain.subdomains, Domain.mode)
                .where(Domain.active == True).tuples()}  # noqa: E712

    # -- mailbox lifecycle ---------------------------------------------------

    def create_mailbox(self, address: str, domain_name: str, token_hash: str | None, expires_at: float | None,
                       password_hash: str | None = None) -> Mailbox | None:
        """A new mailbox, or None when the address is taken by a live one.

        An expired mailbox the sweeper has not reached yet frees its address
        (with its messages) here, in the same transaction.
        """
        now = time.time()
        with self.db.atomic():
            old = Mailbox.get_or_none(Mailbox.address == address)
            if old is not None:
                if old.expires_at is None or old.expires_at > now:
                    return None
                Mailbox.delete().where(Mailbox.id == old.id).execute()
            domain = Domain.get_or_none(Domain.name == domain_name)
            try:
                with self.db.atomic():
                    mid = Mailbox.insert(address=address, domain=domain.id if domain else None, created_at=now,
                                         expires_at=expires_at, password_hash=password_hash).execute()
                    if token_hash:
                        Token.insert(token_hash=token_hash, mailbox=mid, created_at=now).execute()
            except pw.IntegrityError:  # created by a racing request or by mail
                return None
        return Mailbox.get_by_id(mid)

    def add_token(self, mailbox_id: int, token_hash: str) -> None:
        Token.insert(token_hash=token_hash, mailbox=mailbox_id, created_at=time.time()).execute()

    def token_mailbox(self, token_hash: str) -> int | None:
        """The id of the mailbox a token opens, or None."""
        return self._sql.token_mailbox(token_hash)

    def set_expiry(self, mailbox_id: int, expires_at: float) -> None:
        Mailbox.update(expires_at=expires_at).where(Mailbox.id == mailbox_id).execute()

    def delete_mailbox(self, mailbox_id: int) -> bool:
        """The mailbox and its messages, at once (bodies and attachments cascade)."""
        with self.db.atomic():
            return Mailbox.delete().where(Mailbox.id == mailbox_id).execute() > 0

    def recipient_accepted(self, address: str, domains: dict[str, tuple[bool, str]], now: float) -> bool | None:
        """May mail to ``address`` be accepted? (The policy service's rule.)

        None: not one of our domains (Postfix refuses it as relay anyway).
        Public domains take anything; private ones only live, owned
        mailboxes: unexpired, with a token or a password. A row the ingester
        made for mail let through while the policy was down owns nothing and
        must not keep its address open.
        """
        name = domain_of(address, {n: sub for n, (sub, _mode) in domains.items()})
        if name is None:
            return None
        if domains[name][1] == "public":
            return True
        owned = Mailbox.password_hash.is_null(False) | fn_exists(Token.select().where(Token.mailbox == Mailbox.id))
        return (Mailbox.select().where((Mailbox.address == address) & owned
                                       & (Mailbox.expires_at.is_null() | (Mailbox.expires_at > now)))
                .exists())

    def list_mailboxes(self, limit: int, before_id: int | None = None) -> list[dict]:
        q = Mailbox.select(Mailbox.id, Mailbox.address, Mailbox.created_at, Mailbox.expires_at,
                           Mailbox.message_count, Mailbox.bytes_used,
                           fn_exists(Token.select().where(Token.mailbox == Mailbox.id)).alias("owned"))
        if before_id is not None:
            q = q.where(Mailbox.id < before_id)
        return list(q.order_by(Mailbox.id.desc()).limit(limit).dicts())

    def stats(self) -> dict:
        mailboxes, messages, size = (Mailbox.select(pw.fn.COUNT(Mailbox.id), pw.fn.SUM(Mailbox.message_count),
                                                    pw.fn.SUM(Mailbox.bytes_used)).tuples().first())
        return {"mailboxes": mailboxes or 0, "messages": messages or 0, "bytes": size or 0,
                "domains": Domain.select().where(Domain.active == True).count()}  # noqa: E712

    # -- sweeping ------------------------------------------------------------

    def sweep_expired(self, now: float, batch: int = 500) -> tuple[int, int]:
        """Delete one batch of messages of expired mailboxes, then empty expired
        mailboxes. Returns (messages, mailboxes) deleted; call until (0, 0).

        Small transactions: the ingester and API writers wait milliseconds,
        never the whole sweep.
        """
        with self.db.atomic():
            ids = [i for (i,) in Message.select(Message.id).join(Mailbox)
                   .where(Mailbox.expires_at < now).limit(batch).tuples()]
            if ids:
                Message.delete().where(Message.id.in_(ids)).execute()
                return len(ids), 0
            gone = (Mailbox.delete().where(Mailbox.id.in_(
                Mailbox.select(Mailbox.id).where(Mailbox.expires_at < now).limit(batch))).execute())
            return 0, gone

    def sweep_old_messages(self, domain_id: int | None, older_than: float, batch: int = 500) -> int:
        """Delete one batch of messages received before ``older_than`` in a domain."""
        with self.db.atomic():
            q = (Message.select(Message.id, Message.mailbox, Message.size).join(Mailbox)
                 .where((Message.received_at < older_than)
                        & (Mailbox.domain.is_null() if domain_id is None else Mailbox.domain == domain_id))
                 .limit(batch).tuples())
            return self._delete_rows(list(q))

    def sweep_over_cap(self, domain_id: int, max_messages: int, max_bytes: int, batch: int = 500) -> int:
        """Drop the oldest messages of mailboxes over their caps (one batch)."""
        with self.db.atomic():
            over = list(Mailbox.select(Mailbox.id, Mailbox.message_count, Mailbox.bytes_used)
                        .where((Mailbox.domain == domain_id)
                               & ((Mailbox.message_count > max_messages) | (Mailbox.bytes_used > max_bytes)))
                        .limit(50).tuples())
            rows = []
            for mailbox_id, count, size in over:
                for mid, msize in (Message.select(Message.id, Message.size).where(Message.mailbox == mailbox_id)
                                   .order_by(Message.id).limit(batch).tuples()):
                    if count <= max_messages and size <= max_bytes:
                        break
                    rows.append((mid, mailbox_id, msize))
                    count, size = count - 1, size - msize
            return self._delete_rows(rows)

    def _delete_rows(self, rows: list[tuple[int, int, int]]) -> int:
        """Delete (message id, mailbox id, size) rows and fix the counters."""
        if not rows:
            return 0
        Message.delete().where(Message.id.in_([r[0] for r in rows])).execute()
        per_mailbox: dict[int, list[int]] = {}
        for _mid, mailbox_id, size in rows:
            c = per_mailbox.setdefault(mailbox_id, [0, 0])
            c[0] += 1
            c[1] += size
        for mailbox_id, (n, size) in per_mailbox.items():
            Mailbox.update(message_count=Mailbox.message_count - n,
                           bytes_used=Mailbox.bytes_used - size).where(Mailbox.id == mailbox_id).execute()
        return len(rows)

    LIST_FIELDS = (Message.id, Message.received_at, Message.envelope_from, Message.from_name,
                   Message.from_address, Message.to_json, Message.subject, Message.intro,
                   Message.size, Message.has_attachments, Message.seen, Message.parse_error,
                   Message.message_id, Message.spf, Message.dmarc, Message.authenticated,
                   Message.quarantined)

    def list_messages(self, mailbox_id: int, limit: int, before_id: int | None = None,
                      authenticated: bool | None = None, filters: MessageFilter | None = None,
                      quarantined: bool | None = False) -> list[dict]:
        """Newest first; ``before_id`` continues a previous page (keyset pagination).

        ``authenticated`` keeps only messages whose sender was (or was not)
        authenticated: DMARC pass, or DKIM pass for the From domain.
        ``quarantined``: False (the default) leaves quarantined messages out,
        True lists only them, None both.
        """
        if filters is None and authenticated is None and quarantined is False:
            return self._sql.list_page(mailbox_id, limit, before_id)
        q = Message.select(*self.LIST_FIELDS).where(Message.mailbox == mailbox_id)
        if before_id is not None:
            q = q.where(Message.id < before_id)
        if quarantined is not None:
            q = q.where(Message.quarantined == quarantined)
        if authenticated is not None:
            q = q.where(Message.authenticated == authenticated)
        if filters is not None:
            q = filters.apply(q)
        return list(q.order_by(Message.id.desc()).limit(limit).dicts())

    def new_messages_since(self, last_id: int, limit: int = 5000) -> list[tuple[int, int]]:
        """(id, mailbox id) of messages stored after ``last_id``: what waiters wait for.

        Quarantined ones included: they wake waiters for ?quarantined=true, and
        a waiter whose query hides them just waits on."""
        return list(Message.select(Message.id, Message.mailbox).where(Message.id > last_id)
                    .order_by(Message.id).limit(limit).tuples())

    def get_message(self, mailbox_id: int, message_id: int) -> dict | None:
        row = self._sql.message(mailbox_id, message_id)
        if row is None:
            return None
        row["document"] = json.loads(decompress(row["document"]))
        return row

    def get_raw(self, mailbox_id: int, message_id: int) -> tuple[bool, bytes | None]:
        """(found, raw): found is False for no such message; raw None if set aside."""
        row = (MessageBody.select(MessageBody.raw).join(Message)
               .where((Message.id == message_id) & (Message.mailbox == mailbox_id)).tuples().first())
        if row is None:
            return False, None
        return True, (decompress(row[0]) if row[0] is not None else None)

    def attachment_blocked(self, mailbox_id: int, message_id: int, index: int) -> str | None:
        row = (Attachment.select(Attachment.blocked).join(Message)
               .where((Attachment.message == message_id) & (Attachment.index == index)
                      & (Message.mailbox == mailbox_id)).tuples().first())
        return row[0] if row else None

    def set_seen(self, mailbox_id: int, message_id: int, seen: bool) -> bool:
        n = (Message.update(seen=seen)
             .where((Message.id == message_id) & (Message.mailbox == mailbox_id)).execute())
        return n > 0

    def delete_message(self, mailbox_id: int, message_id: int) -> bool:
        with self.db.atomic():
            row = (Message.select(Message.size)
                   .where((Message.id == message_id) & (Message.mailbox == mailbox_id)).first())
            if row is None:
                return False
            Message.delete().where(Message.id == message_id).execute()
            Mailbox.update(message_count=Mailbox.message_count - 1,
                           bytes_used=Mailbox.bytes_used - row.size).where(Mailbox.id == mailbox_id).execute()
        return True

    def max_message_id(self) -> int:
        return Message.select(pw.fn.MAX(Message.id)).scalar() or 0

    def count_messages(self) -> int:
        return Message.select().count()

    # -- mail.tm accounts (api/mailtm.py) --------------------------------------

    def token_account(self, token_hash: str) -> Mailbox | None:
        """The mailbox a bearer token opens, in one query; None for an unknown token."""
        return (Mailbox.select().join(Token, on=(Token.mailbox == Mailbox.id))
                .where(Token.token_hash == token_hash).first())

    def account_messages(self, mailbox_id: int, limit: int, offset: int) -> tuple[list[dict], int]:
        """One page of a mailbox's messages, newest first, by offset (mail.tm's
        ``?page=``), and how many the mailbox holds. Quarantined ones are left out."""
        base = Message.select(*self.LIST_FIELDS).where((Message.mailbox == mailbox_id)
                                                       & (Message.quarantined == False))  # noqa: E712
        with self.db.atomic():
            total = base.count()
            rows = list(base.order_by(Message.id.desc()).limit(limit).offset(offset).dicts())
        return rows, total

    # -- webhooks: the outbox (ingest), the API (api/webhooks.py), the sender (webhooks.py)

    def _queue_webhook_events(self, stored: list[tuple[int, int]]) -> None:
        """Outbox rows for new messages: one per webhook of the message's mailbox,
        plus one for the operator-wide URL. Called inside the ingest transaction."""
        if not stored:
            return
        hooks: dict[int, list[tuple[int | None, str]]] = {}
        for wid, mb, url in self._sql.webhooks_of(list({mb for _msg, mb in stored})):
            hooks.setdefault(mb, []).append((wid, url))
        extra = [(None, self.operator_webhook_url)] if self.operator_webhook_url else []
        now = time.time()
        rows = [{"webhook": wid, "mailbox": mb, "message_id": msg, "url": url, "status": "pending",
                 "attempts": 0, "next_attempt_at": now, "created_at": now}
                for msg, mb in stored for wid, url in hooks.get(mb, []) + extra]
        for i in range(0, len(rows), 100):  # 8 variables a row: well below SQLite's cap
            Delivery.insert_many(rows[i:i + 100]).execute()

    def create_webhook(self, mailbox_id: int, url: str, secret: str, limit: int) -> Webhook | None:
        """A new webhook, or None when the mailbox has ``limit`` already."""
        with self.db.atomic():
            if Webhook.select().where(Webhook.mailbox == mailbox_id).count() >= limit:
                return None
            wid = Webhook.insert(mailbox=mailbox_id, url=url, secret=secret, created_at=time.time()).execute()
        return Webhook.get_by_id(wid)

    def list_webhooks(self, mailbox_id: int) -> list[Webhook]:
        return list(Webhook.select().where(Webhook.mailbox == mailbox_id).order_by(Webhook.id))

    def get_webhook(self, mailbox_id: int, webhook_id: int) -> Webhook | None:
        return Webhook.get_or_none((Webhook.id == webhook_id) & (Webhook.mailbox == mailbox_id))

    def delete_webhook(self, mailbox_id: int, webhook_id: int) -> bool:
        """The webhook and its deliveries (pending ones are dropped)."""
        with self.db.atomic():
            return Webhook.delete().where((Webhook.id == webhook_id) & (Webhook.mailbox == mailbox_id)).execute() > 0

    DELIVERY_FIELDS = (Delivery.id, Delivery.webhook, Delivery.message_id, Delivery.url, Delivery.status,
                       Delivery.attempts, Delivery.next_attempt_at, Delivery.last_error, Delivery.last_status_code,
                       Delivery.created_at, Delivery.delivered_at)

    def list_deliveries(self, limit: int, before_id: int | None = None, webhook_id: int | None = None,
                        status: str | None = None) -> list[dict]:
        """Newest first (keyset pagination), with the mailbox's address."""
        q = Delivery.select(*self.DELIVERY_FIELDS, Mailbox.address).join(Mailbox)
        if webhook_id is not None:
            q = q.where(Delivery.webhook == webhook_id)
        if status is not None:
            q = q.where(Delivery.status == status)
        if before_id is not None:
            q = q.where(Delivery.id < before_id)
        return list(q.order_by(Delivery.id.desc()).limit(limit).dicts())

    def next_delivery_due(self) -> float | None:
        """When the earliest pending delivery is due (None: nothing pending)."""
        return (Delivery.select(Delivery.next_attempt_at).where(Delivery.status == "pending")
                .order_by(Delivery.next_attempt_at).limit(1).scalar())

    def claim_deliveries(self, now: float, limit: int, lease_until: float, claim: str) -> list[dict]:
        """Take up to ``limit`` due deliveries for one attempt each.

        Stamps them with ``claim`` and moves them out of reach until
        ``lease_until`` (a sender that dies mid-attempt leaves them due again
        then), in one statement, so two senders never take the same row.
        Returns each with what its POST needs: the mailbox address, the
        webhook's secret (None: the operator's), and the message's list
        fields (``id`` None when the message is gone).
        """
        with self.db.atomic():
            due = (Delivery.select(Delivery.id)
                   .where((Delivery.status == "pending") & (Delivery.next_attempt_at <= now))
                   .order_by(Delivery.next_attempt_at).limit(limit))
            taken = (Delivery.update(claim=claim, next_attempt_at=lease_until)
                     .where(Delivery.id.in_(due) & (Delivery.status == "pending") & (Delivery.next_attempt_at <= now))
                     .execute())
            if not taken:
                return []
            return list(Delivery.select(Delivery.id.alias("delivery_id"), Delivery.webhook.alias("webhook_id"),
                                        Delivery.message_id.alias("event_message_id"), Delivery.url,
                                        Delivery.attempts, Delivery.created_at.alias("event_at"),
                                        Mailbox.address, Webhook.secret, *self.LIST_FIELDS)
                        .join(Mailbox, on=(Delivery.mailbox == Mailbox.id))
                        .switch(Delivery).join(Webhook, pw.JOIN.LEFT_OUTER, on=(Delivery.webhook == Webhook.id))
                        .switch(Delivery).join(Message, pw.JOIN.LEFT_OUTER, on=(Delivery.message_id == Message.id))
                        .where(Delivery.claim == claim).order_by(Delivery.id).dicts())

    def finish_delivery(self, delivery_id: int, claim: str, now: float, *, delivered: bool,
                        status_code: int | None, error: str | None, next_attempt_at: float | None,
                        attempted: bool = True) -> bool:
        """Record an attempt: delivered, due again at ``next_attempt_at``, or
        (``next_attempt_at`` None) failed for good.

        A 2xx is recorded whoever holds the claim now (the POST happened); a
        failure only by the claim's holder, so an attempt whose lease ran out
        does not reschedule a row another sender has taken since.
        """
        fields = {"last_status_code": status_code, "last_error": error, "claim": None}
        if attempted:
            fields["attempts"] = Delivery.attempts + 1
        where = (Delivery.id == delivery_id) & (Delivery.status == "pending")
        if delivered:
            fields.update(status="delivered", delivered_at=now, next_attempt_at=None)
        else:
            where &= Delivery.claim == claim
            if next_attempt_at is None:
                fields.update(status="failed", next_attempt_at=None)
            else:
                fields["next_attempt_at"] = next_attempt_at
        return Delivery.update(**fields).where(where).execute() > 0

    def finish_deliveries(self, attempts: list[dict]) -> int:
        """Several ``finish_delivery`` calls (keyword dicts) in one transaction; how many took."""
        with self.db.atomic():
            return sum(self.finish_delivery(**a) for a in attempts)

    def prune_deliveries(self, before: float, batch: int = 500) -> int:
        """Delete one batch of delivered or failed deliveries created before ``before``."""
        with self.db.atomic():
            ids = [i for (i,) in Delivery.select(Delivery.id)
                   .where(Delivery.status.in_(["delivered", "failed"]) & (Delivery.created_at < before))
                   .order_by(Delivery.id).limit(batch).tuples()]
            if ids:
                Delivery.delete().where(Delivery.id.in_(ids)).execute()
            return len(ids)
