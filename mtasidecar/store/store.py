"""The storage layer: every read and write the API and the ingester make.

Knows neither the spool nor HTTP. Methods are synchronous and take whole
transactions; callers on an event loop run them in a thread. Connections
are per thread (peewee's default), opened on first use and kept.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field

import peewee as pw

from .db import create_schema, open_database
from .models import Attachment, Domain, Mailbox, Message, MessageBody

# SQLite caps bound variables per statement; stay well below.
_IN_CHUNK = 500


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
    attachments: list = field(default_factory=list)  # dicts: index, filename, content_type, size, disposition, content_id


def compress(data: bytes) -> bytes:
    # Level 1: most of the gain for text mail at a fraction of the CPU.
    return zlib.compress(data, 1)


def decompress(data: bytes) -> bytes:
    return zlib.decompress(data)


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


class Store:
    def __init__(self, url: str):
        self.url = url
        self.db = open_database(url)

    # -- lifecycle -----------------------------------------------------------

    def setup(self) -> None:
        """Create the schema. Run once before workers start, never in each."""
        create_schema(self.db)

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def sync_domains(self, domains: list[tuple[str, bool]]) -> None:
        """Make the Domain table match the configured domains."""
        now = time.time()
        names = {name for name, _ in domains}
        with self.db.atomic():
            for name, sub in domains:
                row = Domain.get_or_none(Domain.name == name)
                if row is None:
                    Domain.create(name=name, subdomains=sub, active=True, created_at=now)
                elif row.subdomains != sub or not row.active:
                    Domain.update(subdomains=sub, active=True).where(Domain.id == row.id).execute()
            if names:
                Domain.update(active=False).where(Domain.name.not_in(list(names))).execute()

    # -- ingest --------------------------------------------------------------

    def ingest(self, items: list[NewMessage], new: set[str] | None = None) -> dict[str, int]:
        """Store a batch in ONE transaction; returns spool_name → message id.

        Files already stored (a crash between commit and unlink) are skipped
        and reported with their existing id, so the caller can remove them.
        ``new``, if given, receives the spool names this call inserted.
        """
        if not items:
            return {}
        with self.db.atomic():
            done = self._existing_ids([m.spool_name for m in items])
            fresh = [m for m in items if m.spool_name not in done]
            # Two files can carry the same spool name only if the caller
            # passed one twice; keep the first.
            seen: set[str] = set()
            fresh = [m for m in fresh if not (m.spool_name in seen or seen.add(m.spool_name))]
            mailbox_ids = self._mailboxes_for({m.recipient for m in fresh})
            counts: dict[int, list[int]] = {}
            for m in fresh:
                mb = mailbox_ids[m.recipient]
                msg_id = Message.insert(
                    mailbox=mb, spool_name=m.spool_name, received_at=m.received_at,
                    envelope_from=m.envelope_from, envelope_to=m.recipient,
                    from_name=m.from_name, from_address=m.from_address,
                    to_json=json.dumps(m.to, ensure_ascii=False), subject=m.subject, intro=m.intro,
                    message_id=m.message_id, size=m.size, has_attachments=bool(m.attachments),
                    parse_error=m.parse_error, spf=m.spf, dmarc=m.dmarc, authenticated=m.authenticated,
                ).execute()
                MessageBody.insert(message=msg_id, raw=m.raw_z, document=m.document_z).execute()
                if m.attachments:
                    Attachment.insert_many([dict(a, message=msg_id) for a in m.attachments]).execute()
                done[m.spool_name] = msg_id
                if new is not None:
                    new.add(m.spool_name)
                c = counts.setdefault(mb, [0, 0])
                c[0] += 1
                c[1] += m.size
            for mb, (n, size) in counts.items():
                Mailbox.update(message_count=Mailbox.message_count + n,
                               bytes_used=Mailbox.bytes_used + size).where(Mailbox.id == mb).execute()
        return done

    def _existing_ids(self, names: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(names), _IN_CHUNK):
            q = (Message.select(Message.spool_name, Message.id)
                 .where(Message.spool_name.in_(names[i:i + _IN_CHUNK])).tuples())
            out.update(q)
        return out

    def _mailboxes_for(self, addresses: set[str]) -> dict[str, int]:
        """Ids of the mailboxes for these addresses, creating missing ones."""
        found = dict(Mailbox.select(Mailbox.address, Mailbox.id)
                     .where(Mailbox.address.in_(list(addresses))).tuples()) if addresses else {}
        missing = addresses - set(found)
        if missing:
            domains = {d.name: (d.id, d.subdomains) for d in Domain.select()}
            allowed = {name: sub for name, (_id, sub) in domains.items()}
            now = time.time()
            for address in sorted(missing):
                dom = domain_of(address, allowed)
                found[address] = Mailbox.insert(
                    address=address, domain=domains[dom][0] if dom else None, created_at=now,
                ).execute()
        return found

    # -- reads ---------------------------------------------------------------

    def list_domains(self) -> list[Domain]:
        return list(Domain.select().where(Domain.active == True).order_by(Domain.name))  # noqa: E712

    def mailbox(self, address: str) -> Mailbox | None:
        return Mailbox.get_or_none(Mailbox.address == address)

    LIST_FIELDS = (Message.id, Message.received_at, Message.envelope_from, Message.from_name,
                   Message.from_address, Message.to_json, Message.subject, Message.intro,
                   Message.size, Message.has_attachments, Message.seen, Message.parse_error,
                   Message.message_id, Message.spf, Message.dmarc, Message.authenticated)

    def list_messages(self, mailbox_id: int, limit: int, before_id: int | None = None,
                      authenticated: bool | None = None) -> list[dict]:
        """Newest first; ``before_id`` continues a previous page (keyset pagination).

        ``authenticated`` keeps only messages whose sender was (or was not)
        authenticated: DMARC pass, or DKIM pass for the From domain.
        """
        q = Message.select(*self.LIST_FIELDS).where(Message.mailbox == mailbox_id)
        if before_id is not None:
            q = q.where(Message.id < before_id)
        if authenticated is not None:
            q = q.where(Message.authenticated == authenticated)
        return list(q.order_by(Message.id.desc()).limit(limit).dicts())

    def get_message(self, mailbox_id: int, message_id: int) -> dict | None:
        row = (Message.select(*self.LIST_FIELDS, Message.envelope_to, MessageBody.document)
               .join(MessageBody)
               .where((Message.id == message_id) & (Message.mailbox == mailbox_id))
               .dicts().first())
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

