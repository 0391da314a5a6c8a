"""The one path every message takes: spool file → NewMessage → database.

``prepare`` is pure (a file in, a record out) so it can run in worker
processes; ``Pipeline.run_batch`` commits a batch in one transaction and only
then removes the files. Maildir watching, the pipe entry point and tests all
end up here.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..mail.envelope import read_trace
from ..mail.extract import extract
from ..mail.blocklist import Blocklist
from ..mail.parse import attachment_data, parse
from ..mail.parse import intro as make_intro
from ..store import NewMessage, Store, compress
from ..store.store import domain_of

log = logging.getLogger(__name__)

# Mail whose file carries no Postfix trace headers (dropped into the Maildir
# by hand, or by another MDA) is still stored: here, for the operator to see.
UNROUTED = "unrouted@mtasidecar.invalid"


def spool_name(path: Path | str) -> str:
    """A Maildir file's stable name: the part before ``:2,flags``."""
    return os.path.basename(path).split(":", 1)[0]


@dataclass(slots=True)
class Prepared:
    path: str
    record: NewMessage
    # Where the file goes after commit: "remove" (or cur/ when keeping), or
    # "set_aside" for files we refused to store whole.
    disposition: str


def _document(parsed, envelope, routing_note: str | None) -> dict:
    doc = parsed.to_dict()
    doc["envelope"] = {
        "sender": envelope.sender, "recipient": envelope.recipient,
        "original_recipient": envelope.original_recipient, "client_ip": envelope.client_ip,
        "client_helo": envelope.client_helo, "client_rdns": envelope.client_rdns,
        "queue_id": envelope.queue_id,
    }
    if routing_note:
        doc["routing_note"] = routing_note
    return doc


def read_spool_file(path: str, limit: int = -1) -> bytes:
    """A spool file's bytes, never through a symlink (nor from a FIFO or device).

    The Maildir is writable by the delivery user and the ingester may run as
    root: a link in new/ to /etc/shadow must not end up served by the API.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # ELOOP for a symlink
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return fh.read(limit)


def _not_a_file(path: str, name: str, st: os.stat_result) -> Prepared:
    """A symlink (FIFO, device, ...) in new/: set aside unread; a visible row says why."""
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a special file"
    reason = f"not a regular file ({kind}); set aside unread"
    record = NewMessage(spool_name=name, recipient=UNROUTED, received_at=st.st_mtime, size=0, raw_z=None,
                        parse_error=reason, document_z=compress(json.dumps({"parse_error": reason}).encode()))
    return Prepared(path, record, "set_aside")


def _set_aside(path: str, name: str, size: int, received_at: float, max_size: int) -> Prepared:
    """Too large to store: the file goes aside, a visible row says why."""
    reason = f"message of {size} bytes exceeds the {max_size}-byte limit; file set aside"
    env = read_trace(read_spool_file(path, 64 * 1024))  # the trace headers still route it
    record = NewMessage(spool_name=name, recipient=(env.recipient or env.original_recipient or UNROUTED).lower(),
                        received_at=received_at, size=size, raw_z=None, parse_error=reason,
                        envelope_from=env.sender,
                        document_z=compress(json.dumps({"parse_error": reason}).encode()))
    return Prepared(path, record, "set_aside")


def _authenticated(auth: dict) -> bool:
    """DMARC pass, or a DKIM pass by the From domain (or a parent of it)."""
    if auth["dmarc"]["result"] == "pass":
        return True
    from_domain = (auth["dmarc"].get("from_domain") or "").lower()
    return bool(from_domain) and any(
        d["result"] == "pass" and (from_domain == d["domain"] or from_domain.endswith("." + d["domain"]))
        for d in auth["dkim"])


def sender_failed(auth: dict) -> bool:
    """Did the sender fail authentication? The rule for quarantine.

    DMARC fail, or SPF fail; and in both cases not authenticated (no DMARC
    pass, no DKIM pass for the From domain or a parent of it). So a message
    the API shows as ``authenticated`` is never quarantined, a DKIM-signed
    message relayed through a host its envelope domain does not list is
    kept, and temperror, permerror, softfail, neutral and none (DNS trouble,
    broken or weak records, no records) never hide mail. DMARC's own policy
    (p=none/quarantine/reject) is reported, not consulted: quarantining is
    the operator's choice per domain.
    """
    if _authenticated(auth):
        return False
    return auth["dmarc"]["result"] == "fail" or auth["spf"]["result"] == "fail"


class Quarantine:
    """Which recipients are on a domain with ``auth_failure = "quarantine"``.

    Built per batch from ``DomainSet.auth_failure_map()`` (name →
    (subdomains, auth_failure)), the plain dict the ingester hands its worker
    processes; every served domain is in it, so a recipient maps to the
    same domain as in the store (the most specific one).
    """

    __slots__ = ("subdomains", "names")

    def __init__(self, domains: dict[str, tuple[bool, str]] | None):
        domains = domains or {}
        self.subdomains = {name: sub for name, (sub, _handling) in domains.items()}
        self.names = {name for name, (_sub, handling) in domains.items() if handling == "quarantine"}

    def applies(self, recipient: str | None) -> bool:
        if not self.names or not recipient:
            return False
        return domain_of(recipient.lower(), self.subdomains) in self.names


def _mark_blocked(parsed, blocked: Blocklist | None) -> dict[int, str]:
    """index → reason for each attachment the blocklist refuses."""
    if blocked is None:
        return {}
    out = {}
    for a in parsed.attachments:
        # A zip's bytes come from the parse already done, not a second one.
        reason = blocked.reason(a.filename, a.content_type, lambda i=a.index: attachment_data(parsed, i))
        if reason:
            out[a.index] = reason
    return out


# Named stages (not inlined) so that bench.ingest_profile can time each one.
def _encode_document(doc: dict) -> bytes:
    return compress(json.dumps(doc, ensure_ascii=False, default=str).encode())


def _compress_raw(raw: bytes) -> bytes:
    return compress(raw)


def _record(path: str, name: str, raw: bytes, received_at: float, env, auth: dict | None,
            blocked: Blocklist | None, quarantine: Quarantine | None = None) -> NewMessage:
    recipient = env.recipient or env.original_recipient
    note = None if recipient else "no Delivered-To or X-Original-To header: not delivered by Postfix"
    parsed = parse(raw)
    doc = _document(parsed, env, note)
    found = extract(parsed.subject, parsed.text, parsed.html)
    doc.update(found.to_dict())
    refused = _mark_blocked(parsed, blocked)
    for a in doc.get("attachments", []):
        a["blocked"] = refused.get(a["index"])
    quarantined = False
    if auth is not None:
        doc["auth"] = auth
        quarantined = quarantine is not None and quarantine.applies(recipient) and sender_failed(auth)
    first_from = parsed.from_[0] if parsed.from_ else None
    return NewMessage(
        spool_name=name,
        recipient=(recipient or UNROUTED).lower(),
        received_at=received_at,
        size=len(raw),
        raw_z=_compress_raw(raw),
        document_z=_encode_document(doc),
        envelope_from=env.sender,
        from_name=first_from.name if first_from else "",
        from_address=first_from.address if first_from else "",
        to=[a.to_dict() for a in parsed.to],
        subject=parsed.subject,
        intro=make_intro(parsed.text, parsed.html),
        message_id=parsed.message_id,
        parse_error=parsed.parse_error,
        spf=auth["spf"]["result"] if auth else None,
        dmarc=auth["dmarc"]["result"] if auth else None,
        authenticated=_authenticated(auth) if auth else None,
        quarantined=quarantined,
        has_code=bool(found.codes),
        has_link=bool(found.links),
        attachments=[{"index": a.index, "filename": a.filename, "content_type": a.content_type,
                      "size": a.size, "disposition": a.disposition, "content_id": a.content_id,
                      "blocked": refused.get(a.index)}
                     for a in parsed.attachments],
    )


def prepare_many(paths: list[str], max_size: int, authenticator=None,
                 blocked: Blocklist | None = None,
                 domains: dict[str, tuple[bool, str]] | None = None) -> list[Prepared]:
    """Read, authenticate and parse spool files; vanished files are skipped.

    Sender checks for the whole batch run concurrently (their DNS waits
    overlap) before parsing. Bad mail never raises; an unreadable file raises
    OSError and stays in the spool. ``domains`` (``DomainSet.auth_failure_map()``)
    says which recipients' domains quarantine mail whose sender failed.
    """
    out: list[Prepared] = []
    loaded = []  # (path, name, raw, mtime, envelope)
    for path in paths:
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                out.append(_not_a_file(path, spool_name(path), st))
                continue
            if st.st_size > max_size:
                out.append(_set_aside(path, spool_name(path), st.st_size, st.st_mtime, max_size))
                continue
            raw = read_spool_file(path)
        except FileNotFoundError:
            continue  # retired by another pass already
        loaded.append((path, spool_name(path), raw, st.st_mtime, read_trace(raw)))
    auths = [None] * len(loaded)
    if authenticator is not None and loaded:
        results = authenticator.check_many(
            [(raw, env.sender, env.client_ip, env.client_helo) for _p, _n, raw, _t, env in loaded])
        auths = [r.to_dict() for r in results]
    quarantine = Quarantine(domains) if domains else None
    for (path, name, raw, mtime, env), auth in zip(loaded, auths):
        out.append(Prepared(path, _record(path, name, raw, mtime, env, auth, blocked, quarantine), "remove"))
    return out


def prepare(path: str, max_size: int, authenticator=None, blocked: Blocklist | None = None,
            domains: dict[str, tuple[bool, str]] | None = None) -> Prepared:
    """One file through ``prepare_many``; FileNotFoundError if it is gone."""
    done = prepare_many([path], max_size, authenticator, blocked, domains)
    if not done:
        raise FileNotFoundError(path)
    return done[0]


class Pipeline:
    """Commit prepared files, then retire them from the spool."""

    def __init__(self, store: Store, maildir: Path, keep: bool = False):
        self.store = store
        self.maildir = Path(maildir)
        self.keep = keep
        self.set_aside_dir = self.maildir / "setaside"

    def commit(self, batch: list[Prepared]) -> int:
        """Store ``batch`` in one transaction; then remove/move its files.

        Returns how many were new. A file already stored (a crash came between
        commit and removal last time) is retired without a second row.
        """
        if not batch:
            return 0
        new: set[str] = set()
        self.store.ingest([p.record for p in batch], new=new)
        for p in batch:
            self._retire(p)
        return len(new)

    def _set_aside(self, p: Prepared) -> None:
        # The Maildir is writable by the delivery user: never follow a link
        # planted as setaside/ or as a .reason file (we may run as root).
        self.set_aside_dir.mkdir(mode=0o700, exist_ok=True)
        if self.set_aside_dir.is_symlink() or not self.set_aside_dir.is_dir():
            raise OSError(f"{self.set_aside_dir} is not a plain directory; not setting files aside there")
        target = self.set_aside_dir / os.path.basename(p.path)
        os.replace(p.path, target)  # rename(2) replaces a link, never writes through it
        fd = os.open(f"{target}.reason", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(p.record.parse_error + "\n")

    def _retire(self, p: Prepared) -> None:
        try:
            if p.disposition == "set_aside":
                self._set_aside(p)
            elif self.keep:
                base = os.path.basename(p.path)
                if ":2," not in base:
                    base += ":2,S"
                os.replace(p.path, self.maildir / "cur" / base)
            else:
                os.unlink(p.path)
        except FileNotFoundError:
            pass  # another ingester (or a rescan) retired it already
        except OSError as exc:
            # Stored already; the file stays and the next rescan retries.
            log.error("stored %s but could not retire its file: %s", p.path, exc)


def ingest_files(pipeline: Pipeline, paths: list[str], max_size: int, authenticator=None,
                 blocked: Blocklist | None = None, domains: dict[str, tuple[bool, str]] | None = None) -> int:
    """Prepare and commit ``paths`` in this process (tests, small batches)."""
    return pipeline.commit(prepare_many(paths, max_size, authenticator, blocked, domains))
