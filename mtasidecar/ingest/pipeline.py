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
from dataclasses import dataclass
from pathlib import Path

from ..mail.envelope import read_trace
from ..mail.parse import intro as make_intro
from ..mail.parse import parse
from ..store import NewMessage, Store, compress

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


def prepare(path: str, max_size: int) -> Prepared:
    """Read and parse one spool file. Never raises for bad mail; may raise OSError."""
    name = spool_name(path)
    st = os.stat(path)
    received_at = st.st_mtime
    if st.st_size > max_size:
        # Too large to store: keep the file aside and store a visible row.
        reason = f"message of {st.st_size} bytes exceeds the {max_size}-byte limit; file set aside"
        record = NewMessage(spool_name=name, recipient=UNROUTED, received_at=received_at,
                            size=st.st_size, raw_z=None, parse_error=reason,
                            document_z=compress(json.dumps({"parse_error": reason}).encode()))
        with open(path, "rb") as fh:  # the trace headers still route it
            env = read_trace(fh.read(64 * 1024))
        record.recipient = (env.recipient or env.original_recipient or UNROUTED)
        record.envelope_from = env.sender
        return Prepared(path, record, "set_aside")
    with open(path, "rb") as fh:
        raw = fh.read()
    env = read_trace(raw)
    recipient = env.recipient or env.original_recipient
    note = None if recipient else "no Delivered-To or X-Original-To header: not delivered by Postfix"
    parsed = parse(raw)
    first_from = parsed.from_[0] if parsed.from_ else None
    record = NewMessage(
        spool_name=name,
        recipient=(recipient or UNROUTED).lower(),
        received_at=received_at,
        size=len(raw),
        raw_z=compress(raw),
        document_z=compress(json.dumps(_document(parsed, env, note), ensure_ascii=False,
                                       default=str).encode()),
        envelope_from=env.sender,
        from_name=first_from.name if first_from else "",
        from_address=first_from.address if first_from else "",
        to=[a.to_dict() for a in parsed.to],
        subject=parsed.subject,
        intro=make_intro(parsed.text, parsed.html),
        message_id=parsed.message_id,
        parse_error=parsed.parse_error,
        attachments=[{"index": a.index, "filename": a.filename, "content_type": a.content_type,
                      "size": a.size, "disposition": a.disposition, "content_id": a.content_id}
                     for a in parsed.attachments],
    )
    return Prepared(path, record, "remove")


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
        ids = self.store.ingest([p.record for p in batch])
        new = sum(1 for p in batch if ids.get(p.record.spool_name))
        for p in batch:
            self._retire(p)
        return new

    def _retire(self, p: Prepared) -> None:
        try:
            if p.disposition == "set_aside":
                self.set_aside_dir.mkdir(exist_ok=True)
                target = self.set_aside_dir / os.path.basename(p.path)
                os.replace(p.path, target)
                target.with_name(target.name + ".reason").write_text(p.record.parse_error + "\n")
            elif self.keep:
                base = os.path.basename(p.path)
                if ":2," not in base:
                    base += ":2,S"
                os.replace(p.path, self.maildir / "cur" / base)
            else:
                os.unlink(p.path)
        except FileNotFoundError:
            pass  # another ingester (or a rescan) retired it already


def ingest_files(pipeline: Pipeline, paths: list[str], max_size: int) -> int:
    """Prepare and commit ``paths`` in this process (tests, small batches)."""
    batch = []
    for path in paths:
        try:
            batch.append(prepare(path, max_size))
        except FileNotFoundError:
            continue
    return pipeline.commit(batch)
