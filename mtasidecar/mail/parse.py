"""Raw message bytes → a JSON-friendly view of the message. Never raises.

How it is put together:

* **Structure.** flanker finds the MIME tree (``mime.from_string``: one regex
  pass over the whole message). We give it the bytes decoded as latin-1, so
  that its string offsets are byte offsets into ``raw`` and it never runs
  chardet over the whole message (it does when handed bytes that are not
  UTF-8, and guesses wrong on mixed content). If flanker raises, or its tree
  contradicts the headers (it missed a Content-Type folded right after the
  colon, or cut a text part at the "boundary" a non-multipart type declared),
  the stdlib ``email`` package builds the tree instead.
* **Everything else is ours**, the same code for both trees: header
  splitting, RFC 2047 and RFC 2231 decoding, transfer and charset decoding.
  flanker's own decoding guesses charsets with chardet and can mangle valid
  text, and its RFC 2231 handling percent-decodes as UTF-8 whatever the
  declared charset.
* **One walker** (:func:`_layout`) turns either tree into an ordered list of
  leaf parts, classified as text, html or attachment. :func:`parse` and
  :func:`attachment_bytes` both use it, so attachment numbers always agree.
  Every step after :func:`_layout` (decoding) is made not to fail, so the
  choice of tree only depends on the structure and both functions make the
  same choice.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import email.utils
import functools
import io
import logging
import email.header
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email import policy as email_policy
from email.generator import BytesGenerator
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Callable
from urllib.parse import unquote_to_bytes

from mtasidecar.mail.envelope import header_text, split_header_block

__all__ = [
    "Address",
    "Attachment",
    "ParsedMessage",
    "parse",
    "attachment_bytes",
    "attachment_data",
    "intro",
    "decode_words",
]

log = logging.getLogger(__name__)


def _import_flanker():
    """Import flanker once, quietly.

    Its first import may build ply parser tables and print them; it also
    triggers DeprecationWarnings (cgi, imghdr) on 3.11+. When it cannot be
    imported at all (3.13 without standard-imghdr) we run on the stdlib only.
    """
    sink = io.StringIO()
    # ply reports its table building through flanker's loggers, which reach
    # stderr through whatever handlers the application has configured.
    flanker_log = logging.getLogger("flanker")
    level = flanker_log.level
    flanker_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            from flanker import mime
    except Exception as exc:  # pragma: no cover - depends on the interpreter
        log.warning("flanker unavailable, parsing with the stdlib only: %s", exc)
        return None
    finally:
        flanker_log.setLevel(level)
    return mime


_flanker_mime = _import_flanker()


# --------------------------------------------------------------------------
# Public data


@dataclass(slots=True)
class Address:
    name: str
    address: str

    def to_dict(self) -> dict:
        return {"name": self.name, "address": self.address}


@dataclass(slots=True)
class Attachment:
    index: int  # 0-based, in walk order; the key for attachment_bytes()
    filename: str | None
    content_type: str
    size: int  # decoded bytes
    disposition: str  # "attachment" | "inline"
    content_id: str | None  # without <>
    transfer_encoding: str | None
    related: bool  # inside a multipart/related (an image the HTML refers to)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "filename": self.filename,
            "content_type": self.content_type,
            "size": self.size,
            "disposition": self.disposition,
            "content_id": self.content_id,
            "transfer_encoding": self.transfer_encoding,
            "related": self.related,
        }


@dataclass(slots=True)
class ParsedMessage:
    subject: str = ""
    from_: list[Address] = field(default_factory=list)
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    sender: list[Address] = field(default_factory=list)
    date: datetime | None = None  # always timezone-aware
    message_id: str | None = None  # without <>
    text: str = ""  # the text/plain body parts joined with "\n"
    html: list[str] = field(default_factory=list)  # each text/html body part
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)  # top level, decoded
    parse_error: str | None = None
    parser: str = "none"  # "flanker" | "email" | "none"
    defects: list[str] = field(default_factory=list)
    # The attachments' leaves, for attachment_data(): not part of the view.
    _leaves: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready: lists and strings only, the date as ISO 8601."""

        def addresses(items: list[Address]) -> list[dict]:
            return [a.to_dict() for a in items]

        return {
            "subject": self.subject,
            "from": addresses(self.from_),
            "to": addresses(self.to),
            "cc": addresses(self.cc),
            "bcc": addresses(self.bcc),
            "reply_to": addresses(self.reply_to),
            "sender": addresses(self.sender),
            "date": self.date.isoformat() if self.date else None,
            "message_id": self.message_id,
            "text": self.text,
            "html": list(self.html),
            "attachments": [a.to_dict() for a in self.attachments],
            "headers": [[name, value] for name, value in self.headers],
            "parse_error": self.parse_error,
            "parser": self.parser,
            "defects": list(self.defects),
        }


# --------------------------------------------------------------------------
# Entry points


def parse(raw: bytes) -> ParsedMessage:
    """Parse one message. Never raises; see ``parse_error`` and ``parser``."""
    try:
        layout = _layout(raw)
    except Exception as exc:  # _layout already catches parser errors; this is a bug guard
        log.exception("parse: unexpected failure")
        return ParsedMessage(parse_error=f"internal: {_describe(exc)}")
    msg = ParsedMessage(parser=layout.parser, parse_error=layout.parse_error, defects=layout.defects)
    if layout.parser == "none":
        return msg
    try:
        _fill_headers(msg, layout.headers)
        _fill_body(msg, layout.leaves)
    except Exception as exc:  # pragma: no cover - every step is meant not to fail
        log.exception("parse: unexpected failure while decoding")
        msg.defects.append(f"internal: {_describe(exc)}")
    msg.defects = list(dict.fromkeys(msg.defects))  # one of each, in order
    return msg


def attachment_bytes(raw: bytes, index: int) -> tuple[Attachment, bytes] | None:
    """The decoded payload of attachment ``index`` (numbered as by :func:`parse`)."""
    try:
        layout = _layout(raw)
        attachments = [leaf for leaf in layout.leaves if leaf.role == "attachment"]
        if not 0 <= index < len(attachments):
            return None
        leaf = attachments[index]
        data = _decode_transfer(leaf.load(), leaf.cte, [])
        return _attachment(leaf, index, len(data)), data
    except Exception:  # pragma: no cover - bug guard, same as parse()
        log.exception("attachment_bytes: unexpected failure")
        return None


def attachment_data(msg: ParsedMessage, index: int) -> bytes | None:
    """``attachment_bytes(raw, index)[1]`` for the message ``msg`` was parsed from,
    without parsing it again."""
    if not 0 <= index < len(msg._leaves):
        return None
    leaf = msg._leaves[index]
    return _decode_transfer(leaf.load(), leaf.cte, [])


def intro(text: str, html: list[str], n: int = 120) -> str:
    """The first ``n`` characters of the message, white space collapsed.

    From the text part; when there is none, from the first HTML part with its
    tags stripped (script, style and head contents skipped).
    """
    source = _collapsed_start(text, n)
    if not source and html:
        source = _html_to_text(html[0], n)
    return source[:n]


# --------------------------------------------------------------------------
# The layout: one list of classified leaves from either parser


class _Garbage(Exception):
    """flanker returned a tree that does not match the message."""


@dataclass(slots=True)
class _Leaf:
    role: str  # "text" | "html" | "attachment"
    content_type: str
    params: dict[str, str]
    disposition: str | None  # the Content-Disposition value, lower-cased
    filename: str | None
    content_id: str | None
    cte: str | None
    related: bool
    load: Callable[[], bytes]  # the part's body, still transfer-encoded


@dataclass(slots=True)
class _Layout:
    parser: str
    headers: list[tuple[str, bytes]]  # top-level fields, raw unfolded values
    leaves: list[_Leaf]
    parse_error: str | None
    defects: list[str]


def _layout(raw: bytes) -> _Layout:
    """flanker first, then the stdlib (policy.default, then compat32)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return _Layout("none", [], [], f"not bytes: {type(raw).__name__}", [])
    raw = bytes(raw)
    errors = []
    if _flanker_mime is not None:
        try:
            root = _flanker_mime.from_string(raw.decode("latin-1"))
            headers, leaves = _walk(_FlankerTree(raw), root)
            return _Layout("flanker", headers, leaves, None, [])
        except Exception as exc:  # DecodingError, _Garbage, or a flanker bug
            errors.append(f"flanker: {_describe(exc)}")
            if isinstance(exc.__cause__, RecursionError):
                # ~1000 nested multiparts: the stdlib needs seconds (quadratic)
                # only to hit its own recursion limit.
                errors.append("email: not tried (nesting too deep)")
                return _Layout("none", [], [], "; ".join(errors), [])
    for policy in (email_policy.default, email_policy.compat32):
        try:
            tree = _EmailTree()
            root = BytesParser(policy=policy).parsebytes(raw)
            headers, leaves = _walk(tree, root)
            error = "; ".join(errors) or None
            return _Layout("email", headers, leaves, error, tree.defects)
        except Exception as exc:
            errors.append(f"email ({'default' if policy is email_policy.default else 'compat32'}): "
                          f"{_describe(exc)}")
            if isinstance(exc, RecursionError):  # deep nesting: compat32 would fail alike, slowly
                break
    return _Layout("none", [], [], "; ".join(errors), [])


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:199] + "…"


def _walk(tree, root) -> tuple[list[tuple[str, bytes]], list[_Leaf]]:
    """Depth-first, document order. message/rfc822 parts are leaves (attachments)."""
    root_fields = None
    leaves: list[_Leaf] = []
    # (node, inside multipart/related, parent multipart subtype)
    stack = [(root, False, None)]
    while stack:
        node, related, parent_subtype = stack.pop()
        fields, load = tree.open(node)
        if root_fields is None:
            root_fields = fields
        declared = _first(fields, "content-type")
        ctype, params = _content_type(declared, parent_subtype)
        subtype = tree.multipart_subtype(node, ctype, params)
        if subtype is not None:
            inner = related or subtype == "related"
            stack.extend((child, inner, subtype) for child in reversed(tree.children(node)))
        else:
            if ctype.startswith("multipart/"):
                # Declared multipart but no usable boundary: it is text (RFC 2046 5.1.1 / stdlib).
                ctype, params = "text/plain", {}
            leaves.append(_make_leaf(fields, ctype, params, related, load))
    return root_fields or [], leaves


class _FlankerTree:
    """Adapter over flanker's MimePart tree; offsets index ``raw`` directly."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def open(self, node):
        if node is None or not hasattr(node, "_container"):
            raise _Garbage("flanker returned no part")
        # flanker keeps a part as a span [start, end] of the scanned string (a
        # private attribute, but the only way to get at the original bytes).
        stream = node._container
        start, end = stream.start, stream.end
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= len(self.raw)):
            raise _Garbage(f"flanker span {start!r}..{end!r} outside the message")
        # Its spans are off by one at the edges: an empty part ends before it
        # starts, and a final boundary without a newline ends past the end.
        stop = min(max(end + 1, start), len(self.raw))
        fields, body_start = split_header_block(self.raw, start, stop)
        raw = self.raw
        return fields, lambda: raw[body_start:stop]

    def multipart_subtype(self, node, declared: str, params: dict) -> str | None:
        content_type = node.content_type
        is_multipart = content_type.is_multipart()
        if is_multipart != declared.startswith("multipart/"):
            # e.g. a Content-Type value folded right after the colon, which
            # flanker's tokenizer does not see (it then assumes text/plain)
            raise _Garbage(f"headers say {declared}, flanker saw {content_type}")
        if not is_multipart and "boundary" in params:
            # flanker takes any declared boundary for a real one and cuts
            # bodies at it, even in a text/html part (CPython's msg_40.txt).
            raise _Garbage(f"boundary parameter on {declared}")
        return content_type.sub if is_multipart else None

    def children(self, node) -> list:
        return list(node.parts)


# Regenerating a nested message in the stdlib path: keep header lines as
# they came and 8-bit bodies as bytes.
_REGEN_POLICY = email_policy.default.clone(refold_source="none", cte_type="8bit", linesep="\n")


class _EmailTree:
    """Adapter over an ``email.message.Message`` tree."""

    def __init__(self):
        self.defects: list[str] = []

    def open(self, node):
        for defect in node.defects:
            name = type(defect).__name__
            if name not in self.defects:
                self.defects.append(name)
        # "Name :" (obsolete syntax) keeps its space in the stdlib's names
        fields = [(name.strip(), _unfold(_to_bytes(value))) for name, value in node.raw_items()]
        return fields, lambda: _email_payload(node)

    def multipart_subtype(self, node, declared: str, params: dict) -> str | None:
        if node.is_multipart() and node.get_content_maintype() == "multipart":
            return node.get_content_subtype()
        return None

    def children(self, node) -> list:
        return list(node.get_payload())


def _to_bytes(value) -> bytes:
    # BytesParser keeps non-ASCII bytes as surrogate escapes; this restores them.
    return str(value).encode("utf-8", "surrogateescape")


def _unfold(value: bytes) -> bytes:
    return value.replace(b"\r", b"").replace(b"\n", b"").strip()


def _email_payload(node) -> bytes:
    payload = node.get_payload()
    if isinstance(payload, list):  # message/rfc822, message/delivery-status
        return b"".join(_regenerate(part) for part in payload)
    if payload is None:
        return b""
    return _to_bytes(payload)


def _regenerate(message) -> bytes:
    """Serialise a nested message again (the stdlib keeps no byte offsets)."""
    out = io.BytesIO()
    try:
        BytesGenerator(out, mangle_from_=False, policy=_REGEN_POLICY).flatten(message)
    except Exception:  # a header the generator cannot fold; the part stays listed
        log.debug("cannot regenerate a nested message", exc_info=True)
        return b""
    return out.getvalue()


# --------------------------------------------------------------------------
# Classifying a leaf


def _make_leaf(fields, ctype: str, params: dict, related: bool, load) -> _Leaf:
    disposition, disp_params = _parse_params(_field_text(fields, "content-disposition"))
    filename = _filename(disp_params.get("filename") or params.get("name"))
    content_id = _angle_stripped(_field_text(fields, "content-id"))
    cte = _field_text(fields, "content-transfer-encoding").strip().strip('"').lower() or None
    if disposition == "attachment" or filename:
        role = "attachment"
    elif ctype == "text/plain":
        role = "text"
    elif ctype == "text/html":
        role = "html"
    else:  # images, PDFs, text/calendar, message/rfc822, ...
        role = "attachment"
    return _Leaf(role, ctype, params, disposition or None, filename, content_id, cte, related, load)


def _attachment(leaf: _Leaf, index: int, size: int) -> Attachment:
    if leaf.disposition in ("attachment", "inline"):
        disposition = leaf.disposition
    else:  # absent or bogus: an image referenced by Content-ID is shown inline
        disposition = "inline" if leaf.content_id else "attachment"
    return Attachment(
        index=index,
        filename=leaf.filename,
        content_type=leaf.content_type,
        size=size,
        disposition=disposition,
        content_id=leaf.content_id,
        transfer_encoding=leaf.cte,
        related=leaf.related,
    )


def _first(fields: list[tuple[str, bytes]], name: str) -> bytes | None:
    for key, value in fields:
        if key.lower() == name:
            return value
    return None


def _field_text(fields, name: str) -> str:
    value = _first(fields, name)
    return "" if value is None else _clean_text(header_text(value))


# type/subtype made of RFC 2045 token characters: safe to hand on in an
# HTTP Content-Type header.
_MIME_TYPE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+/[a-z0-9!#$%&'*+.^_`|~-]+")


def _content_type(value: bytes | None, parent_subtype: str | None) -> tuple[str, dict[str, str]]:
    """("main/sub", params); defaults per RFC 2045/2046 (message/rfc822 in a digest)."""
    main, params = _parse_params(_clean_text(header_text(value)) if value else "")
    if "/" not in main and main in ("text", "html"):  # seen in the wild
        main = "text/" + ("plain" if main == "text" else "html")
    if not _MIME_TYPE.fullmatch(main):  # absent or invalid: the RFC default
        main = "message/rfc822" if parent_subtype == "digest" else "text/plain"
    return main, params


def _angle_stripped(value: str) -> str | None:
    value = value.strip().strip("<>").strip()
    return value or None


_PATH_SEPARATORS = re.compile(r"[/\\]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _filename(value: str | None) -> str | None:
    """Keep the last path component and drop control characters."""
    if not value:
        return None
    name = _CONTROL_CHARS.sub("", _PATH_SEPARATORS.split(value)[-1]).strip()
    return name or None


# --------------------------------------------------------------------------
# Parameters (RFC 2045 / RFC 2231) and encoded words (RFC 2047)

_PARAM = re.compile(
    r"""\s*(?P<name>[^\s=;"]+)\s*=\s*
        (?P<value>"(?:[^"\\]|\\.)*(?:"|$)|[^;]*)""",
    re.VERBOSE | re.DOTALL,
)
_SECTION = re.compile(r"^(?P<base>[^*]+)(?:\*(?P<num>\d+))?(?P<star>\*)?$")


def _parse_params(value: str) -> tuple[str, dict[str, str]]:
    """``'text/plain; charset="utf-8"'`` → ``('text/plain', {'charset': 'utf-8'})``.

    Lenient: junk between parameters is skipped. RFC 2231 continuations
    (``name*0*=``, ``name*1=``) are put back together in order and their
    percent-encoded bytes decoded with the declared charset; a RFC 2231 value
    wins over a plain one of the same name (senders give both for old
    readers); plain values may hold RFC 2047 encoded words (Outlook does that).
    """
    if "=" not in value:  # fast path: "inline", "7bit", "" (most calls)
        return value.partition(";")[0].strip().strip('"').lower(), {}
    head, _, rest = value.partition(";")
    # "text/plain charset=utf-8" (no semicolon) happens: the rest is a parameter.
    main, _, more = head.strip().partition(" ")
    main = main.strip('"').lower()
    if more.strip():
        rest = more + ";" + rest
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    plain: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if not match:
            next_semicolon = rest.find(";", pos)
            if next_semicolon < 0:
                break
            pos = next_semicolon + 1
            continue
        pos = match.end()
        if pos < len(rest) and rest[pos] == ";":
            pos += 1
        name = match.group("name").lower()
        raw_value = match.group("value").strip()
        section = _SECTION.match(name)
        if section and (section.group("num") is not None or section.group("star")):
            number = int(section.group("num") or 0)
            # name*=... is charset'lang'%xx even when a sender quotes it.
            sections.setdefault(section.group("base"), {}).setdefault(
                number, (bool(section.group("star")), _unquote(raw_value))
            )
        elif name not in plain:
            plain[name] = _unquote(raw_value)
    params = {name: decode_words(text) if "=?" in text else text for name, text in plain.items()}
    for name, parts in sections.items():
        params[name] = _join_sections(parts)
    return main, params


def _unquote(value: str) -> str:
    if value.startswith('"'):
        value = value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:]
        # Only \\ and \" (like email.utils.unquote): Windows paths keep their backslashes.
        return value.replace("\\\\", "\\").replace('\\"', '"')
    return value


def _join_sections(parts: dict[int, tuple[bool, str]]) -> str:
    """RFC 2231: charset'language'pct-encoded in the first encoded section."""
    charset = None
    chunks = []
    for number in sorted(parts):
        encoded, text = parts[number]
        if encoded:
            if charset is None and number == min(parts) and text.count("'") >= 2:
                charset, _, text = text.split("'", 2)
            chunks.append(unquote_to_bytes(text))
        else:
            chunks.append(text.encode("utf-8", "surrogateescape"))
    return _decode_text(b"".join(chunks), charset or None, [])


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words in an (unfolded) header value.

    The standard library splits the value and joins adjacent words of one
    charset (senders split multi-byte characters across words); we decode
    each chunk ourselves so a bogus charset degrades instead of raising.
    """
    if "=?" not in value:
        return value
    try:
        chunks = email.header.decode_header(value)
    except (ValueError, LookupError, AssertionError):
        return value
    out = []
    for data, charset in chunks:
        if isinstance(data, str):
            out.append(data)
        else:
            out.append(_decode_text(data, charset.partition("*")[0] if charset else None, []))
    return "".join(out)


# --------------------------------------------------------------------------
# Transfer encodings and charsets


def _decode_transfer(data: bytes, cte: str | None, defects: list[str]) -> bytes:
    """Undo Content-Transfer-Encoding; never fails (returns the input instead)."""
    if cte == "base64":
        return _base64(data, defects)
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(data)
        except (binascii.Error, ValueError) as exc:  # pragma: no cover - a2b_qp is lenient
            defects.append(f"quoted-printable: {exc}")
            return data
    if cte and cte not in ("7bit", "8bit", "binary"):
        defects.append(f"unknown transfer encoding {cte!r}")
    return data


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def _base64(data: bytes, defects: list[str]) -> bytes:
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        pass
    # Bad padding or a truncated part: keep the alphabet, re-pad, decode.
    clean = _NOT_BASE64.sub(b"", data)
    if len(clean) % 4 == 1:  # one lone sextet carries no whole byte
        clean = clean[:-1]
    defects.append("base64 body repaired")
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - clean input decodes
        return b""


# Labels whose real-world meaning is a superset codec (as browsers do, WHATWG).
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso-8859-9": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "windows-874": "cp874",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "big5": "big5hkscs",
    "iso-8859-8-i": "iso-8859-8",
    "unicode-1-1-utf-7": "utf-7",
    "x-mac-roman": "mac_roman",
    "ansi_x3.4-1968": "ascii",
    "us-ascii": "ascii",
}


@functools.lru_cache(maxsize=256)
def _codec(charset: str) -> str | None:
    """A Python text codec name for a MIME charset label, or None if unknown."""
    label = charset.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):
        return None
    # codecs also has bytes-to-bytes ("base64", "zlib", "rot13") transforms.
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decode_text(data: bytes, charset: str | None, defects: list[str]) -> str:
    """Bytes of a text part to str. Never fails, never guesses with chardet.

    * declared, known charset: use it; if the bytes are not valid in it but
      are valid UTF-8 (a common mislabelling), UTF-8; else the charset with
      U+FFFD replacements;
    * no charset, us-ascii or an unknown label: UTF-8, with replacements if
      the bytes are not valid UTF-8.
    """
    codec = _codec(charset) if charset else None
    if charset and codec is None:
        defects.append(f"unknown charset {charset!r}")
    if codec is None or codec == "ascii":
        if data.isascii():
            return data.decode("ascii")
        codec = "utf-8"
    try:
        return _no_surrogates(data.decode(codec), codec)
    except (UnicodeError, LookupError):
        pass
    if codec != "utf-8":
        try:
            text = data.decode("utf-8")
            defects.append(f"text labelled {charset} is UTF-8")
            return text
        except UnicodeError:
            pass
    defects.append(f"invalid {codec} bytes replaced")
    try:
        return _no_surrogates(data.decode(codec, "replace"), codec)
    except (UnicodeError, LookupError):  # codecs without "replace" support
        return data.decode("utf-8", "replace")


_SURROGATE = re.compile("[\ud800-\udfff]")
# Codecs that can decode to lone surrogates, which cannot be stored or sent
# as UTF-8. The others (UTF-8/16/32 included) refuse or replace them.
_SURROGATE_CODECS = frozenset({"utf-7", "unicode-escape", "raw-unicode-escape"})


def _no_surrogates(text: str, codec: str) -> str:
    if codec in _SURROGATE_CODECS:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _clean_text(text: str) -> str:
    """Line endings to \\n; NUL (PostgreSQL text cannot hold it) to U+FFFD."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text


# --------------------------------------------------------------------------
# Filling the ParsedMessage

_ADDRESS_FIELDS = {
    "from": "from_",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "sender": "sender",
}


def _fill_headers(msg: ParsedMessage, fields: list[tuple[str, bytes]]) -> None:
    addresses: dict[str, list[str]] = {}  # every occurrence counts
    seen: set[str] = set()  # for the others, the first one does
    for name, raw_value in fields:
        key = name.lower()
        text = _clean_text(header_text(raw_value))
        decoded = decode_words(text)
        if "\x00" in decoded:  # an encoded word can hide one too
            decoded = _clean_text(decoded)
        msg.headers.append((name, decoded))
        if key in _ADDRESS_FIELDS:
            addresses.setdefault(key, []).append(text)  # names are decoded after splitting
        elif key in seen:
            continue
        elif key == "subject":
            msg.subject = decoded
        elif key == "date":
            msg.date = _date(text, msg.defects)
        elif key == "message-id":
            msg.message_id = _message_id(text)
        seen.add(key)
    for key, values in addresses.items():
        setattr(msg, _ADDRESS_FIELDS[key], _addresses(values))


def _addresses(values: list[str]) -> list[Address]:
    """Lenient address lists: getaddresses, names RFC 2047-decoded afterwards.

    flanker's address parser is strict (drops what it cannot validate) and
    ~5x slower; a disposable inbox wants to show whatever the sender wrote.
    """
    return [Address(name, address) for name, address in _address_pairs(tuple(values))]


@functools.lru_cache(maxsize=1024)
def _address_pairs(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    # Cached: the same To and From headers come again and again (a mailbox
    # polled by a test suite, a service's sender), and getaddresses is slow.
    result = []
    for name, address in email.utils.getaddresses(values):
        if name or address:
            result.append((_clean_text(decode_words(name)).strip(), address.strip()))
    return tuple(result)


def _date(value: str, defects: list[str]) -> datetime | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except Exception:  # ValueError mostly; TypeError/IndexError/OverflowError seen too
        defects.append("unparsable Date header")
        return None
    if parsed.tzinfo is None:  # "-0000": UTC, origin unknown (RFC 5322 3.3)
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


_MESSAGE_ID = re.compile(r"<([^<>\s]*)>")


def _message_id(value: str) -> str | None:
    match = _MESSAGE_ID.search(value)
    text = match.group(1) if match else value.strip().strip("<>")
    return text or None


def _fill_body(msg: ParsedMessage, leaves: list[_Leaf]) -> None:
    texts = []
    for leaf in leaves:
        if leaf.role == "attachment":
            size = len(_decode_transfer(leaf.load(), leaf.cte, msg.defects))
            msg.attachments.append(_attachment(leaf, len(msg.attachments), size))
            msg._leaves.append(leaf)
            continue
        data = _decode_transfer(leaf.load(), leaf.cte, msg.defects)
        body = _clean_text(_decode_text(data, leaf.params.get("charset"), msg.defects))
        if body.startswith("\ufeff"):
            body = body[1:]
        if leaf.role == "text":
            if body:  # empty parts (two boundaries in a row) add no blank lines
                texts.append(body)
        else:
            msg.html.append(body)
    msg.text = "\n".join(texts)


# --------------------------------------------------------------------------
# Intro

def _collapse(text: str) -> str:
    return " ".join(text.split())


def _collapsed_start(text: str, n: int) -> str:
    """``_collapse(text)[:n]`` without collapsing all of a long text.

    Collapsing a prefix gives a prefix of the full result (a word cut at the
    end of the slice is a prefix of that word), so widen until it is long enough.
    """
    size = n * 2
    while True:
        start = _collapse(text[:size])
        if len(start) >= n or size >= len(text):
            return start[:n]
        size *= 4


class _TextExtractor(HTMLParser):
    """Visible text of an HTML document, with spaces where blocks break."""

    SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
    BREAKS = frozenset({
        "br", "p", "div", "li", "tr", "td", "th", "table", "h1", "h2", "h3",
        "h4", "h5", "h6", "blockquote", "pre", "hr", "section", "article",
    })

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag == "body":  # whatever was left open in the head ends here
            self.skipping = 0
        elif tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BREAKS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BREAKS:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)
            self.size += len(data)


def _html_to_text(html: str, n: int, chunk: int = 512, max_chunk: int = 8192) -> str:
    """Feed the HTML in chunks and stop once there is enough text.

    HTMLParser is incremental, so the text is the same however the input is
    cut; chunks start small (the visible text often starts early, and
    HTMLParser costs ~40 µs per KB) and double up to ``max_chunk``.
    """
    parser = _TextExtractor()
    try:
        start = 0
        while start < len(html):
            parser.feed(html[start : start + chunk])
            start += chunk
            chunk = min(chunk * 2, max_chunk)
            if parser.size >= n * 2 and len(_collapse("".join(parser.parts))) >= n:
                break
        else:
            parser.close()
    except Exception:  # HTMLParser is lenient, but never let intro() fail
        pass
    return _collapse("".join(parser.parts))
