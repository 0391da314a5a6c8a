"""Peewee models: domains, mailboxes, messages, message bodies, attachments,
webhooks and their delivery outbox.

The database is bound late through a proxy so the same models serve SQLite
(one box) and PostgreSQL (several hosts sharing one store).

Layout choices, for speed:
- Message rows hold only what list views need; the bytes live in
  MessageBody, so a list scan reads small, dense rows.
- Times are epoch seconds (floats): cheap to index and compare; the API
  formats them.
- (mailbox, id) is the index every list query walks, newest first.
"""

from __future__ import annotations

import peewee as pw

database = pw.DatabaseProxy()


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class Domain(BaseModel):
    name = pw.CharField(max_length=253, unique=True)
    subdomains = pw.BooleanField(default=False)
    # "private" (token per mailbox, unknown addresses refused) or "public".
    mode = pw.CharField(max_length=16, default="private")
    active = pw.BooleanField(default=True)
    created_at = pw.DoubleField()
    # "config": mirrored from the configuration at start (store.sync_domains);
    # "api": added by an operator at runtime, with its DomainSettings fields
    # as JSON in ``settings`` (the configuration wins on a name in both).
    source = pw.CharField(max_length=16, default="config")
    settings = pw.TextField(null=True)


class IdField(pw.AutoField):
    """A row id never handed out twice: clients resume after ids (SSE Last-Event-ID, ?after=) and the
    new-mail watcher waits for ids above the newest. SQLite reuses the largest rowid once that row is
    deleted, unless the table is AUTOINCREMENT; PostgreSQL sequences never reuse."""

    def ddl(self, ctx):
        node = super().ddl(ctx)
        if isinstance(database.obj, pw.SqliteDatabase):
            return pw.NodeList((node, pw.SQL("AUTOINCREMENT")))
        return node


class Mailbox(BaseModel):
    id = IdField()
    address = pw.CharField(max_length=320, unique=True)
    # Null when mail arrived for a domain no longer configured: kept, not lost.
    domain = pw.ForeignKeyField(Domain, null=True, backref="mailboxes", on_delete="CASCADE")
    created_at = pw.DoubleField()
    # Null for mailboxes made by mail on a public domain: they live until swept
    # by message retention.
    expires_at = pw.DoubleField(null=True, index=True)
    # scrypt hash for mail.tm-style accounts (address + password); null for
    # mailboxes made with POST /api/v1/mailboxes or by mail.
    password_hash = pw.TextField(null=True)
    # Kept up to date in the same transaction as the messages they count.
    message_count = pw.IntegerField(default=0)
    bytes_used = pw.BigIntegerField(default=0)


class Token(BaseModel):
    """A bearer token, by its SHA-256: a mailbox may have several (mail.tm's
    POST /token issues one per login). Tokens carry 192 random bits, so a fast
    hash suffices and the lookup by hash leaks nothing usable."""

    token_hash = pw.CharField(max_length=64, primary_key=True)
    mailbox = pw.ForeignKeyField(Mailbox, backref="tokens", on_delete="CASCADE")
    created_at = pw.DoubleField()


class Message(BaseModel):
    id = IdField()
    mailbox = pw.ForeignKeyField(Mailbox, backref="messages", on_delete="CASCADE", index=False)
    # The Maildir file name without its ":2,..." info part: the key that makes
    # re-ingesting a file after a crash a no-op instead of a duplicate.
    spool_name = pw.CharField(max_length=255, unique=True)
    received_at = pw.DoubleField()
    envelope_from = pw.CharField(max_length=320, null=True)
    envelope_to = pw.CharField(max_length=320)
    from_name = pw.TextField(default="")
    from_address = pw.CharField(max_length=320, default="")
    to_json = pw.TextField(default="[]")
    subject = pw.TextField(default="")
    intro = pw.TextField(default="")
    message_id = pw.TextField(null=True)
    size = pw.IntegerField()
    has_attachments = pw.BooleanField(default=False)
    seen = pw.BooleanField(default=False)
    parse_error = pw.TextField(null=True)
    # Sender-authentication verdicts (null when checks were off): the full
    # results live in the body document; these serve list filters.
    spf = pw.CharField(max_length=16, null=True)
    dmarc = pw.CharField(max_length=16, null=True)
    authenticated = pw.BooleanField(null=True)
    # Stored but kept out of lists, events and webhooks: the sender failed
    # authentication on a domain with auth_failure = "quarantine".
    quarantined = pw.BooleanField(default=False)
    # What extraction found (links, one-time codes): for ?has= filters.
    has_code = pw.BooleanField(default=False)
    has_link = pw.BooleanField(default=False)

    class Meta:
        indexes = ((("mailbox", "id"), False),)


class MessageBody(BaseModel):
    message = pw.ForeignKeyField(Message, primary_key=True, on_delete="CASCADE")
    # The spool file's bytes exactly, compressed (zstd); null only when the file
    # was set aside (too large), in which case Message.parse_error says so.
    raw = pw.BlobField(null=True)
    # The parsed view (headers, text, html, attachments, ...) as compressed JSON.
    document = pw.BlobField()


class Attachment(BaseModel):
    message = pw.ForeignKeyField(Message, backref="attachments", on_delete="CASCADE")
    index = pw.IntegerField()
    filename = pw.TextField(null=True)
    content_type = pw.CharField(max_length=255)
    size = pw.IntegerField()
    disposition = pw.CharField(max_length=32)
    content_id = pw.TextField(null=True)
    # Why the attachment route refuses it (dangerous type); null: served.
    blocked = pw.TextField(null=True)

    class Meta:
        primary_key = pw.CompositeKey("message", "index")


class Webhook(BaseModel):
    """A mailbox's webhook: each new message of the mailbox is POSTed to ``url``,
    signed with ``secret``. (The operator-wide webhook lives in the settings.)"""

    mailbox = pw.ForeignKeyField(Mailbox, backref="webhooks", on_delete="CASCADE")
    url = pw.TextField()
    secret = pw.TextField()
    created_at = pw.DoubleField()


class Delivery(BaseModel):
    """The outbox: one row per (new message, webhook), written in the ingest
    transaction that stores the message, so no event is lost to a crash.

    ``webhook`` is null for the operator-wide webhook. ``message_id`` is no
    foreign key: the record of an attempt outlives the message. A sender
    claims a due row by stamping ``claim`` and pushing ``next_attempt_at``
    past its attempt (a lease): a sender that dies mid-attempt leaves the row
    due again once the lease is over.
    """

    webhook = pw.ForeignKeyField(Webhook, null=True, backref="deliveries", on_delete="CASCADE", index=False)
    mailbox = pw.ForeignKeyField(Mailbox, backref="deliveries", on_delete="CASCADE")
    message_id = pw.BigIntegerField()
    url = pw.TextField()
    status = pw.CharField(max_length=16, default="pending")  # pending | delivered | failed
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.DoubleField(null=True)  # null once delivered or failed
    claim = pw.CharField(max_length=32, null=True)
    last_error = pw.TextField(null=True)
    last_status_code = pw.IntegerField(null=True)
    created_at = pw.DoubleField()
    delivered_at = pw.DoubleField(null=True)

    class Meta:
        indexes = (
            (("status", "next_attempt_at"), False),  # the sender: what is due
            (("webhook", "id"), False),              # a webhook's deliveries, newest first
            (("status", "id"), False),               # the operator's view by status
        )


MODELS = (Domain, Mailbox, Token, Message, MessageBody, Attachment, Webhook, Delivery)
