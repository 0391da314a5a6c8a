"""The delivery trace Postfix writes on top of every message.

virtual(8) and pipe(8) (flags ``DRO``) prepend ``Return-Path:``,
``X-Original-To:`` and ``Delivered-To:``; below them sits the ``Received:``
header smtpd(8) added when the message came in::

    Return-Path: <sender@example.org>
    X-Original-To: anything@example.test
    Delivered-To: anything@example.test
    Received: from mail.example.org (mail.example.org [203.0.113.5])
            by mx.example.test (Postfix) with ESMTP id 4ABCDEF123
            for <anything@example.test>; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)

Everything below that is written by the sender, who may well include their
own ``Delivered-To:`` or ``Received:`` lines. So only the topmost occurrence
of each header is read, the delivery headers only when they come before the
first ``Received:`` header, and only that first ``Received:`` header.

This module also holds the byte-level header splitter that ``parse.py``
shares: it looks at the header block only and never builds a MIME tree.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass

__all__ = [
    "Envelope",
    "read_trace",
    "header_block_end",
    "split_header_block",
    "header_text",
]


@dataclass(frozen=True, slots=True)
class Envelope:
    """What Postfix told us about the SMTP transaction of one delivered copy."""

    sender: str | None = None  # envelope sender; "" for the null sender <>
    recipient: str | None = None  # Delivered-To, lower-cased
    original_recipient: str | None = None  # X-Original-To, lower-cased
    client_ip: str | None = None
    client_helo: str | None = None
    client_rdns: str | None = None  # None when Postfix wrote "unknown"
    queue_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------
# Header block splitting (shared with parse.py)

# A header line: a field name of printable ASCII without ":" (RFC 5322
# ftext), optional obsolete white space before the colon.
_FIELD_LINE = re.compile(rb"([!-9;-~]+)[ \t]*:")


def header_block_end(raw: bytes, start: int = 0, stop: int | None = None) -> int:
    """Offset where the header block of ``raw[start:stop]`` ends.

    That is the index of the empty line separating headers from body (so
    ``raw[start:result]`` is the header lines, each with its line ending), or
    ``stop`` (default ``len(raw)``) when there is no empty line.
    """
    if stop is None:
        stop = len(raw)
    # A part may have no headers at all and start with the empty line.
    if raw.startswith(b"\n", start, stop) or raw.startswith(b"\r\n", start, stop):
        return start
    # Search the CRLF form only up to the LF form's hit: the body may be large.
    # (A CRLF hit at p ends at p + 3; it comes first if p < lf.)
    lf = raw.find(b"\n\n", start, stop)
    crlf = raw.find(b"\n\r\n", start, stop if lf < 0 else lf + 2)
    if crlf >= 0:
        return crlf + 1
    return lf + 1 if lf >= 0 else stop


def split_header_block(
    raw: bytes, start: int = 0, stop: int | None = None
) -> tuple[list[tuple[str, bytes]], int]:
    """Split the header block of ``raw[start:stop]`` into fields.

    Returns ``(fields, body_start)``: ``fields`` is a list of
    ``(name, value)`` in order, the name as written, the value as raw bytes,
    unfolded (line breaks removed, the folding white space kept) and
    stripped. ``body_start`` is the offset of the first body byte.

    Like flanker and the stdlib, a line that is neither a header nor a
    continuation ends the header block even without an empty line (the
    sender forgot it); that line then belongs to the body. An mbox ``From ``
    line at the very top is skipped.
    """
    if stop is None:
        stop = len(raw)
    end = header_block_end(raw, start, stop)
    fields: list[tuple[str, bytes]] = []
    name = None
    value_parts: list[bytes] = []
    offset = start
    first = True
    for line in raw[start:end].split(b"\n"):
        line_len = len(line) + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:  # only the empty tail after the block's last newline
            offset += line_len
            continue
        if line[0] in b" \t":
            if name is not None:  # a continuation with no header before it is dropped
                value_parts.append(line)
        else:
            match = _FIELD_LINE.match(line)
            if match is None:
                if first and line.startswith(b"From "):
                    offset += line_len
                    first = False
                    continue
                # Not a header: the body starts on this very line.
                _flush(fields, name, value_parts)
                return fields, offset
            _flush(fields, name, value_parts)
            name = match.group(1).decode("ascii")
            value_parts = [line[match.end():]]
        first = False
        offset += line_len
    _flush(fields, name, value_parts)
    return fields, _skip_empty_line(raw, end, stop)


def _flush(fields: list, name: str | None, value_parts: list[bytes]) -> None:
    if name is not None:
        fields.append((name, b"".join(value_parts).strip()))


def _skip_empty_line(raw: bytes, end: int, stop: int) -> int:
    """The body starts after the empty separator line (LF or CRLF)."""
    if raw.startswith(b"\r\n", end, stop):
        return end + 2
    if raw.startswith(b"\n", end, stop):
        return end + 1
    return min(end, stop)


def header_text(value: bytes) -> str:
    """Raw header bytes to text: ASCII, else UTF-8 (RFC 6532), else cp1252.

    No charset guessing: a header that is not UTF-8 is most likely a legacy
    Western one; cp1252 with replacement never fails and never mangles UTF-8.
    """
    if value.isascii():
        return value.decode("ascii")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("cp1252", "replace")


# --------------------------------------------------------------------------
# The trace

_DELIVERY_HEADERS = {"return-path", "x-original-to", "delivered-to"}

# "from HELO (RDNS [IP])" with an optional ":port" (smtpd_client_port_logging).
# The HELO is whatever the client said, so match it lazily up to " (".
_RECEIVED_FROM = re.compile(
    r"^\s*from\s+(?P<helo>\S.*?)\s+\((?P<rdns>[^\s()\[\]]+)\s+"
    r"\[(?P<ip>[^\]\s]+)\](?::\d+)?\)",
    re.IGNORECASE,
)
_RECEIVED_BY = re.compile(r"\bby\s", re.IGNORECASE)
_RECEIVED_ID = re.compile(r"\bid\s+([A-Za-z0-9]+)\b", re.IGNORECASE)
# Postfix's own Received header is a few hundred bytes; a longer one is not
# ours, and the regexes need not look at all of it.
_RECEIVED_MAX = 4096
_SPACES = re.compile(r"\s+")


_RECEIVED_LINE = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_UNFOLDED_LINE_END = re.compile(rb"\n(?![ \t])")


def read_trace(raw: bytes) -> Envelope:
    """Read the Postfix delivery trace from the top of a delivered message."""
    fields, _ = split_header_block(raw, 0, _trace_end(raw))
    seen: dict[str, str] = {}
    received = None
    for name, value in fields:
        key = name.lower()
        if key == "received":
            received = header_text(value)
            break  # the sender's own headers start below our Received
        if key in _DELIVERY_HEADERS and key not in seen:
            seen[key] = header_text(value)
    client_ip, helo, rdns, queue_id = _parse_received(received)
    return Envelope(
        sender=_sender(seen.get("return-path")),
        recipient=_recipient(seen.get("delivered-to")),
        original_recipient=_recipient(seen.get("x-original-to")),
        client_ip=client_ip,
        client_helo=helo,
        client_rdns=rdns,
        queue_id=queue_id,
    )


def _trace_end(raw: bytes) -> int:
    """Where the first Received header (folded lines included) ends.

    Nothing below it is read, so there is no need to split the (possibly
    long: DKIM, ARC, list headers) rest of the header block.
    """
    end = header_block_end(raw)
    received = _RECEIVED_LINE.search(raw, 0, end)
    if received is None:
        return end
    line_end = _UNFOLDED_LINE_END.search(raw, received.end(), end)
    return line_end.end() if line_end else end


def _sender(value: str | None) -> str | None:
    """``<a@b>`` → ``a@b``; the null sender ``<>`` → ``""``."""
    if value is None:
        return None
    return value.strip().strip("<>").strip()


def _recipient(value: str | None) -> str | None:
    if value is None:
        return None
    address = value.strip().strip("<>").strip().lower()
    return address or None


def _parse_received(value: str | None) -> tuple[str | None, str | None, str | None, str | None]:
    """(client_ip, helo, rdns, queue_id) from Postfix's smtpd Received header."""
    if not value:
        return None, None, None, None
    value = _SPACES.sub(" ", value[:_RECEIVED_MAX])
    ip = helo = rdns = None
    match = _RECEIVED_FROM.match(value)
    if match:
        ip = _client_ip(match.group("ip"))
        helo = match.group("helo")
        rdns = match.group("rdns")
        if rdns.lower() == "unknown":  # Postfix's word for "no verified rDNS"
            rdns = None
    by = _RECEIVED_BY.search(value)
    id_match = _RECEIVED_ID.search(value, by.end()) if by else None
    queue_id = id_match.group(1) if id_match else None
    return ip, helo, rdns, queue_id


def _client_ip(literal: str) -> str | None:
    """``203.0.113.5`` or ``IPv6:2001:db8::1``, normalised; None if invalid."""
    if literal[:5].lower() == "ipv6:":
        literal = literal[5:]
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        return None
