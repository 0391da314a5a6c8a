"""What the ingester stores, pinned for a fixed set of messages.

A guard for performance work on parse, extract, the document encoding and
Store.ingest: the stored row, the document served by the API (its decoded
JSON value) and the attachment rows must not change for the same mail. The
set: bench.corpus mails (with Postfix's trace headers), CPython's email test
messages, and seeded mutations of both (the parser's fallback paths).

The hashes in data/ingest_golden.json were recorded before that work.
Regenerate them (only for an intended change of what is stored) with
``MTASIDECAR_GOLDEN_WRITE=1 pytest tests/unit/test_ingest_golden.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import sqlite3
from pathlib import Path

import pytest

from mtasidecar.ingest.pipeline import Pipeline, prepare_many
from mtasidecar.mail.blocklist import Blocklist
from mtasidecar.store import Store, decompress

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "data" / "ingest_golden.json"
WRITE = os.environ.get("MTASIDECAR_GOLDEN_WRITE") == "1"
MTIME = 1_736_755_200.25


def _corpus_version() -> str:
    return hashlib.sha1((ROOT / "bench" / "corpus.py").read_bytes()).hexdigest()[:12]


def _cpython_messages() -> list[tuple[str, bytes]]:
    try:
        import test
    except ImportError:
        return []
    files = sorted((Path(test.__file__).parent / "test_email" / "data").glob("msg_*.txt"))
    return [(f"cpython/{p.name}", p.read_bytes()) for p in files]


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    tokens = [b"\n", b"\n\n", b"--", b":", b";", b"=", b"\"", b"=?", b"?=", b"\xff", b"<a href=", b"<b>",
              b"Content-Type: multipart/mixed; boundary=x\n", b"*0*=", b"=\n", b" 123456 ", b"code: ",
              b"https://example.org/verify?t=1", b"&amp;", b"\t"]
    for _ in range(rnd.randint(1, 6)):
        pos = rnd.randrange(len(out) + 1)
        op = rnd.randrange(3)
        if op == 0:
            out[pos:pos] = rnd.choice(tokens)
        elif op == 1:
            del out[pos:pos + rnd.randint(1, 40)]
        else:
            out[pos:pos] = out[rnd.randrange(len(out) + 1):][:rnd.randint(1, 80)]
    return bytes(out)


_NO_DKIM = re.compile(rb"^DKIM-Signature:.*\n(?:[ \t].*\n)*", re.M)


def _messages() -> list[tuple[str, bytes]]:
    from bench import common as C
    from bench.corpus import generate

    out = []
    for i, msg in enumerate(generate(120, seed=11, size=6000)):
        msg = _NO_DKIM.sub(b"", msg)  # signed with the current time: not reproducible
        out.append((f"corpus/{i}", C.postfix_trace(msg, i, MTIME)))
    out += _cpython_messages()
    rnd = random.Random(5)
    bases = [m for _, m in out]
    for i in range(80):
        out.append((f"mutated/{i}", _mutate(rnd, rnd.choice(bases))))
    return out


def _canonical(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def _record_view(record) -> dict:
    d = dataclasses.asdict(record)
    raw_z, doc_z = d.pop("raw_z"), d.pop("document_z")
    d["raw"] = hashlib.sha256(decompress(raw_z)).hexdigest() if raw_z is not None else None
    d["document"] = json.loads(decompress(doc_z))
    return d


def _rows(db: Path) -> list:
    con = sqlite3.connect(db)
    try:
        out = []
        for table, order in (("message", "id"), ("attachment", "message_id, \"index\""),
                             ("mailbox", "id")):
            cur = con.execute(f"SELECT * FROM {table} ORDER BY {order}")
            cols = [c[0] for c in cur.description]
            for row in cur:
                row = dict(zip(cols, row))
                row.pop("created_at", None)  # the mailbox's: time.time() at ingest
                out.append([table, row])
        for mid, raw, doc in con.execute("SELECT message_id, raw, document FROM message_body ORDER BY message_id"):
            out.append(["messagebody", mid, hashlib.sha256(decompress(raw)).hexdigest() if raw else None,
                        json.loads(decompress(doc))])
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    base = tmp_path_factory.mktemp("golden")
    new = base / "Maildir" / "new"
    for sub in ("tmp", "new", "cur"):
        (base / "Maildir" / sub).mkdir(parents=True)
    names, paths = [], []
    for i, (name, raw) in enumerate(_messages()):
        p = new / f"1736755200.V801I{i:x}M000000.golden"
        p.write_bytes(raw)
        os.utime(p, (MTIME, MTIME))
        names.append(name)
        paths.append(str(p))
    blocked = Blocklist.of(["exe", "pdf"], ["text/calendar"])
    prepared = []
    for i in range(0, len(paths), 64):
        prepared += prepare_many(paths[i:i + 64], 50 * 1024 * 1024, None, blocked, None)
    records = {name: _record_view(p.record) for name, p in zip(names, prepared)}
    store = Store(f"sqlite:///{base / 'db.sqlite'}")
    store.setup()
    store.sync_domains([("bench.test", True, "public"), ("example.com", False, "private")])
    pipeline = Pipeline(store, base / "Maildir")
    for i in range(0, len(prepared), 64):
        pipeline.commit(prepared[i:i + 64])
    store.close()
    return records, _rows(base / "db.sqlite")


def test_stored_documents_and_rows_unchanged(ingested):
    records, rows = ingested
    got = {"corpus_version": _corpus_version(),
           "records": {name: _canonical(view) for name, view in records.items()},
           "rows": _canonical(rows)}
    if WRITE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden file written")
    want = json.loads(GOLDEN.read_text())
    if want["corpus_version"] != got["corpus_version"]:
        pytest.skip("bench/corpus.py changed since the golden file was recorded: regenerate it first")
    if want["records"].keys() != got["records"].keys():
        pytest.skip("a different set of CPython test messages is installed")
    changed = [name for name in want["records"] if want["records"][name] != got["records"][name]]
    assert not changed, f"stored record changed for {len(changed)} messages: {changed[:20]}"
    assert want["rows"] == got["rows"], "database rows changed"
