"""Turning stored rows into the native API's JSON, and parsing what clients send.

Kept apart from the resources so both API flavours (native, mail.tm) share
the same id, cursor and time formats.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime, timezone

from .errors import bad_request, not_found

_ID_RE = re.compile(r"[0-9a-f]{24}")
# Row ids are signed 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT).
MAX_DB_ID = 2**63 - 1


def format_id(n: int) -> str:
    # 24 hex digits: the shape mail.tm clients expect, and opaque enough.
    return format(n, "024x")


def parse_id(text: str, what: str = "message id") -> int:
    if not _ID_RE.fullmatch(text or ""):
        raise bad_request(f"malformed {what} {text!r}: expected 24 hexadecimal digits", "malformed_id")
    n = int(text, 16)
    if n > MAX_DB_ID:
        # Well-formed (mail.tm-style ids look like this) but no row can have it.
        raise not_found(f"no {what} {text}", "message_not_found")
    return n


def format_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        version, _, value = raw.partition(":")
        if version == "v1" and value.isascii() and value.isdigit() and len(value) <= 19 \
                and int(value) <= MAX_DB_ID:
            return int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise bad_request(f"bad cursor {text!r}: use the next_cursor of a previous page", "bad_cursor")


def message_summary(row: dict, base: str) -> dict:
    mid = format_id(row["id"])
    return {
        "id": mid,
        "from": {"name": row["from_name"], "address": row["from_address"]},
        "to": json.loads(row["to_json"]),
        "subject": row["subject"],
        "intro": row["intro"],
        "size": row["size"],
        "has_attachments": bool(row["has_attachments"]),
        "seen": bool(row["seen"]),
        "received_at": format_time(row["received_at"]),
        "parse_error": row["parse_error"],
        # DMARC pass, or DKIM pass for the From domain; null when not checked.
        "authenticated": row["authenticated"],
        # Hidden from lists (?quarantined=true shows them): the sender failed
        # authentication on a domain with auth_failure = "quarantine".
        "quarantined": bool(row.get("quarantined")),
        "url": f"{base}/{mid}",
    }


def message_detail(row: dict, base: str) -> dict:
    doc = row["document"]
    out = message_summary(row, base)
    url = out["url"]
    out.update({
        "envelope": doc.get("envelope") or {"sender": row["envelope_from"], "recipient": row["envelope_to"]},
        "cc": doc.get("cc", []),
        "bcc": doc.get("bcc", []),
        "reply_to": doc.get("reply_to", []),
        "date": doc.get("date"),
        "message_id": row["message_id"],
        "text": doc.get("text", ""),
        "html": doc.get("html", []),
        "attachments": [dict(a, url=f"{url}/attachments/{a['index']}") for a in doc.get("attachments", [])],
        "headers": [{"name": k, "value": v} for k, v in doc.get("headers", [])],
        "parser": doc.get("parser"),
        "auth": doc.get("auth"),
        "links": doc.get("links", []),
        "codes": doc.get("codes", []),
        "best_link": doc.get("best_link"),
        "best_code": doc.get("best_code"),
        "defects": doc.get("defects", []),
        "raw_url": f"{url}/raw",
    })
    if doc.get("routing_note"):
        out["routing_note"] = doc["routing_note"]
    return out
