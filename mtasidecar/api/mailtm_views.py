"""mail.tm's JSON shapes, built from our rows: nothing more, nothing less.

Some mail.tm clients build objects straight from the JSON (dataclasses with
``**data``) and fail on a key they do not know, so every shape here carries
exactly mail.tm's keys; what we know beyond them (links, codes, full
authentication results) stays in the native API.

JSON-LD (``application/ld+json``, ``*/*`` or no Accept): objects carry
``@context``, ``@id`` and ``@type``; collection members carry ``@id`` and
``@type``. Plain JSON (``application/json``): the same objects without the
``@`` keys, as API Platform (mail.tm's framework) gives them.
"""

from __future__ import annotations

import json
import math

from . import views

# What mail.tm answers for an account's quota when a domain has no cap of its own.
DEFAULT_QUOTA = 40_000_000


def account_iri(mailbox_id: int) -> str:
    return f"/accounts/{views.format_id(mailbox_id)}"


def strip_ld(value):
    """The plain-JSON form of a JSON-LD document: every ``@`` key dropped, at any depth."""
    if isinstance(value, dict):
        return {k: strip_ld(v) for k, v in value.items() if not k.startswith("@")}
    if isinstance(value, list):
        return [strip_ld(v) for v in value]
    return value


def collection(path: str, context: str, members: list[dict], total: int, page: int, per_page: int) -> dict:
    """A hydra collection page: ``members`` already in their member shape."""
    last = max(1, math.ceil(total / per_page))
    view = {"@id": f"{path}?page={page}", "@type": "hydra:PartialCollectionView",
            "hydra:first": f"{path}?page=1", "hydra:last": f"{path}?page={last}"}
    if page > 1:
        view["hydra:previous"] = f"{path}?page={min(page - 1, last)}"
    if page < last:
        view["hydra:next"] = f"{path}?page={page + 1}"
    return {"@context": context, "@id": path, "@type": "hydra:Collection",
            "hydra:member": members, "hydra:totalItems": total, "hydra:view": view}


# -- domains and accounts -------------------------------------------------------------------

def domain(row, *, member: bool = False) -> dict:
    did = views.format_id(row.id)
    created = views.format_time(row.created_at)
    doc = {} if member else {"@context": "/contexts/Domain"}
    doc.update({
        "@id": f"/domains/{did}", "@type": "Domain", "id": did, "domain": row.name,
        # mail.tm's isPrivate marks a domain that is not open for new accounts;
        # every domain we list is (our own "private"/"public" mode is a
        # different notion: see the native /api/v1/domains).
        "isActive": True, "isPrivate": False,
        "createdAt": created, "updatedAt": created,
    })
    return doc


def account(mailbox, quota: int | None) -> dict:
    aid = views.format_id(mailbox.id)
    created = views.format_time(mailbox.created_at)
    return {
        "@context": "/contexts/Account", "@id": f"/accounts/{aid}", "@type": "Account",
        "id": aid, "address": mailbox.address,
        "quota": quota if quota is not None else DEFAULT_QUOTA,
        "used": mailbox.bytes_used,
        "isDisabled": False, "isDeleted": False,
        "createdAt": created, "updatedAt": created,
    }


def token(mailbox_id: int, value: str) -> dict:
    return {"token": value, "@id": account_iri(mailbox_id), "id": views.format_id(mailbox_id)}


# -- messages -------------------------------------------------------------------------------

def _address(item: dict) -> dict:
    return {"address": item.get("address") or "", "name": item.get("name") or ""}


def _msgid(value: str | None) -> str | None:
    return f"<{value}>" if value else None


def message_intro(row: dict, mailbox_id: int, *, context: bool = False) -> dict:
    """A message as mail.tm lists it (and publishes it on the Mercure hub, with ``context``)."""
    mid, received = views.format_id(row["id"]), views.format_time(row["received_at"])
    doc = {"@context": "/contexts/Message"} if context else {}
    doc.update({
        "@id": f"/messages/{mid}", "@type": "Message",
        "id": mid,
        "accountId": account_iri(mailbox_id),
        "msgid": _msgid(row["message_id"]),
        "from": {"address": row["from_address"] or "", "name": row["from_name"] or ""},
        "to": [_address(a) for a in json.loads(row["to_json"] or "[]")],
        "subject": row["subject"] or "",
        "intro": row["intro"] or "",
        "seen": bool(row["seen"]),
        "isDeleted": False,
        "hasAttachments": bool(row["has_attachments"]),
        "size": row["size"],
        "downloadUrl": f"/messages/{mid}/download",
        "sourceUrl": f"/sources/{mid}",
        "createdAt": received,
        "updatedAt": received,
    })
    return doc


def attachment_id(index: int) -> str:
    return f"ATTACH{index + 1:06d}"


def parse_attachment_id(text: str) -> int | None:
    """``ATTACH000001`` (mail.tm's form) or a bare ``1`` → our 0-based index; None: no such form."""
    digits = text[6:] if text[:6].upper() == "ATTACH" else text
    if not (digits.isascii() and digits.isdigit()) or not 1 <= len(digits) <= 6 or int(digits) < 1:
        return None
    return int(digits) - 1


def attachment(message_id: str, item: dict) -> dict:
    aid = attachment_id(item["index"])
    return {
        "id": aid,
        "filename": item.get("filename") or f"attachment-{item['index'] + 1}",
        "contentType": item.get("content_type") or "application/octet-stream",
        "disposition": item.get("disposition") or "attachment",
        # No Content-Transfer-Encoding means 7bit (RFC 2045 6.1).
        "transferEncoding": item.get("transfer_encoding") or "7bit",
        "related": bool(item.get("related")),
        "size": item.get("size") or 0,
        "downloadUrl": f"/messages/{message_id}/attachment/{aid}",
    }


def verifications(auth: dict | None) -> dict:
    """mail.tm's {spf, dkim} booleans from our sender checks (false when not checked).

    mail.tm adds ``tls`` (the cipher of the incoming connection); Postfix does
    not tell us that, so it is left out rather than made up.
    """
    if not auth:
        return {"spf": False, "dkim": False}
    spf = (auth.get("spf") or {}).get("result") == "pass"
    dkim = any((d or {}).get("result") == "pass" for d in auth.get("dkim") or [])
    return {"spf": spf, "dkim": dkim}


def message_full(row: dict, mailbox_id: int, retention_until: float | None) -> dict:
    """GET /messages/{id}: the intro's keys plus cc, bcc, text, html, attachments,
    verifications, flagged, retention and retentionDate, in mail.tm's order."""
    doc = row.get("document") or {}
    intro = message_intro(row, mailbox_id)
    mid = intro["id"]
    return {
        "@context": "/contexts/Message",
        "@id": intro["@id"], "@type": "Message",
        "id": mid,
        "accountId": intro["accountId"],
        "msgid": intro["msgid"],
        "from": intro["from"],
        "to": intro["to"],
        "cc": [_address(a) for a in doc.get("cc") or []],
        "bcc": [_address(a) for a in doc.get("bcc") or []],
        "subject": intro["subject"],
        "intro": intro["intro"],
        "seen": intro["seen"],
        "flagged": False,
        "isDeleted": False,
        "verifications": verifications(doc.get("auth")),
        "retention": True,
        "retentionDate": views.format_time(retention_until) if retention_until is not None else None,
        "text": doc.get("text") or "",
        "html": list(doc.get("html") or []),
        "hasAttachments": intro["hasAttachments"],
        "attachments": [attachment(mid, a) for a in doc.get("attachments") or []],
        "size": intro["size"],
        "downloadUrl": intro["downloadUrl"],
        "sourceUrl": intro["sourceUrl"],
        "createdAt": intro["createdAt"],
        "updatedAt": intro["updatedAt"],
    }


def source(message_id: str, raw: bytes) -> dict:
    return {
        "@context": "/contexts/Source", "@id": f"/sources/{message_id}", "@type": "Source",
        "id": message_id,
        "downloadUrl": f"/messages/{message_id}/download",
        # JSON holds text: bytes that are not UTF-8 (rare 8-bit mail) become
        # U+FFFD here; downloadUrl serves the exact bytes.
        "data": raw.decode("utf-8", "replace"),
    }
