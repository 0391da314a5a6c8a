"""Links and one-time codes from a message, for sign-up automation. Never raises.

Values in, values out: ``extract(subject, text, html)`` takes what
:func:`mtasidecar.mail.parse.parse` produced (``subject``, ``text``, ``html``)
and returns the message's links, with the likeliest verification link picked
out, and its likely one-time codes, best first. Standard library only.

How it is put together:

* **HTML to visible text** with a handful of regular-expression passes that
  run in C, not :mod:`html.parser` (which alone takes longer to tokenize a
  7 KB template than this whole module takes for that mail): comments and
  the contents of ``head``, ``script``, ``style``, ``title``, ``template`` and
  ``noscript`` go; ``<a>``, bold/heading/large-type and block tags (table
  cells too) become control-character markers; other tags vanish; entities
  are decoded; white space collapses as in a browser, block tags making the
  line breaks. One split over the markers then gives the text, the anchors
  (offsets and href) and the emphasised spans.
  Patterns are bounded by ``[^<>]``, fixed counts or literals, so no input
  makes them backtrack quadratically (1 MB of hostile HTML: well under a
  second).
* **Links**: ``<a href>`` targets (entities decoded) with their anchor text,
  bare http(s) URLs in the visible HTML text and in the text part (sentence
  punctuation trimmed). The HTML's links come first, in document order, then
  what only the text part has; one entry per URL, at its first place. Only
  http and https count, so ``mailto:``, ``javascript:``, ``data:`` and ``cid:``
  never show up, nor do ``<img>`` sources. Tracking links are kept as they are.
  Each link gets a ``kind`` ("verification", "unsubscribe" or "other") and
  ``best_link`` is the strongest verification link: one whose anchor text
  says so beats one whose address does, then document order.
* **Codes**: 4–8 digits, ``123 456``/``123-456``, or 6–10 uppercase letters and
  digits with at least one of each (``K7Q29XZ``, ``K7Q-2X9``, ``K7Q 2X9``;
  full-width digits read as ASCII), from the subject
  and the visible text only: never from attributes, URLs or e-mail
  addresses. A candidate scores for a keyword close by (English, Russian,
  Chinese; before it counts more than after), standing alone on its line,
  bold or large type, being in the subject and six digits; it loses points
  for looking like a year, a price, a quantity, a phone number, a postal
  code, a hex colour, part of a longer number, or for an "order"/"invoice"/
  "promo code"... word nearer than any code word. It needs a keyword within
  300 characters (or one in the subject) and MIN_SCORE points; one code seen
  in several parts is one entry, with a small bonus.
"""

from __future__ import annotations

import bisect
import functools
import html as _html
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Code", "Extracted", "Link", "extract"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Public data


@dataclass(slots=True)
class Link:
    url: str
    text: str = ""  # anchor text, white space collapsed; "" for a bare URL
    kind: str = "other"  # "verification" | "unsubscribe" | "other"

    def to_dict(self) -> dict:
        return {"url": self.url, "text": self.text, "kind": self.kind}


@dataclass(slots=True)
class Code:
    value: str  # as shown: "123 456", "K7Q-2X9"
    normalized: str  # without the separator: "123456", "K7Q2X9"
    context: str  # ~60 characters around the best occurrence, white space collapsed
    score: int  # higher is likelier; only candidates at or above MIN_SCORE are kept

    def to_dict(self) -> dict:
        return {"value": self.value, "normalized": self.normalized, "context": self.context, "score": self.score}


@dataclass(slots=True)
class Extracted:
    links: list[Link] = field(default_factory=list)  # document order, one per URL
    codes: list[Code] = field(default_factory=list)  # best first
    best_link: Link | None = None  # the strongest "verification" link, if any

    @property
    def best_code(self) -> Code | None:
        return self.codes[0] if self.codes else None

    def to_dict(self) -> dict:
        return {
            "links": [link.to_dict() for link in self.links],
            "codes": [code.to_dict() for code in self.codes],
            "best_link": self.best_link.to_dict() if self.best_link else None,
            "best_code": self.codes[0].to_dict() if self.codes else None,
        }


MIN_SCORE = 35
MAX_CANDIDATES = 2000  # per part: a 1 MB number table is not a verification mail
MAX_URL = 8192  # longer "URLs" are dropped


def extract(subject: str, text: str, html: list[str]) -> Extracted:
    """Links and likely one-time codes of one message. Never raises."""
    try:
        return _extract(subject, text, html)
    except Exception:  # a bug guard: every step is meant not to fail
        log.exception("extract: unexpected failure")
        return Extracted()


# --------------------------------------------------------------------------
# Keeping regular expressions fast
#
# CPython's re skips quickly to the places where a match can start only when
# the pattern starts with a literal or a character class; with a leading
# look-behind, \b or IGNORECASE it runs the pattern at every position, and an
# alternation of many words then costs one attempt per word there (the first
# keyword pattern here took 7 ms a message). So patterns start with a literal
# or a class, spell out case variants instead of re.I, group alternatives by
# their first character (_grouped), and leave rare checks to Python. The
# keyword pattern is the exception: its leading look-behind (not inside a
# word) rejects most positions before the alternation is tried.

_META = frozenset("\\[](){}.*+?|^$")
_QUANTIFIERS = frozenset("*+?{|")  # may not follow the first character


def _grouped(fragments: list[str]) -> str:
    """``a|b|c`` grouped by first character, for patterns that must stay fast.

    Every fragment must start with a literal character (not quantified): the
    matcher then rejects a position with one comparison per distinct first
    character, and inside a group with about one per fragment. Order within a
    group is kept (at one position the first fragment that matches wins); an
    empty rest goes last.
    """
    groups: dict[str, list[str]] = {}
    for fragment in fragments:
        if not fragment or fragment[0] in _META or fragment[1:2] in _QUANTIFIERS:
            raise ValueError(f"fragment must start with a literal character: {fragment!r}")
        groups.setdefault(fragment[0], []).append(fragment[1:])
    parts = []
    for first, rests in groups.items():
        rests = [r for r in rests if r] + [r for r in rests if not r]
        parts.append(re.escape(first) + ("(?:" + "|".join(rests) + ")" if rests != [""] else ""))
    return "|".join(parts)


def _cased(*names: str) -> str:
    """Tag names written in lower, upper or title case, as a fast alternation."""
    variants = dict.fromkeys(variant for name in names for variant in (name, name.upper(), name.capitalize()))
    return _grouped(list(variants))


def _lower(text: str) -> str:
    """``text.lower()`` with the same length (offsets stay valid)."""
    low = text.lower()
    if len(low) != len(text):  # "İ" lower-cases to two characters
        low = "".join(ch if len(ch.lower()) != 1 else ch.lower() for ch in text)
    return low


# --------------------------------------------------------------------------
# HTML to visible text

# Control characters standing for tags while the text is assembled (any in
# the input become spaces first). Being ASCII, they keep a Latin-1 document
# in CPython's one-byte string form, which the passes scan faster.
_A_OPEN, _A_CLOSE, _E_OPEN, _E_CLOSE, _BR = "\x01", "\x02", "\x03", "\x04", "\x05"
_MARKERS = (_A_OPEN, _A_CLOSE, _E_OPEN, _E_CLOSE, _BR)
_MARKER_CHARS = re.compile("[\x01-\x05]")
_MARK_SPLIT = re.compile("([\x01-\x04])")
_NEWLINES = re.compile("\n\n+")

_HIDDEN_OPEN = re.compile(rf"<(?:!--|({_cased('script', 'style', 'head', 'title', 'template', 'noscript')})\b)")
_HIDDEN_CLOSE = {
    name: re.compile(rf"</{name}\b[^<>]*>", re.I) for name in ("script", "style", "title", "template", "noscript")
}
_HIDDEN_CLOSE["head"] = re.compile(r"<(?:/head\b[^<>]*>|(?=body\b))", re.I)  # or where <body> starts

# Table cells count as blocks: a code in its own cell is then alone on its line.
_BLOCK_NAMES = frozenset(
    "p div br tr td th table li ul ol h1 h2 h3 h4 h5 h6 blockquote pre hr section article header footer nav "
    "center dl dt dd form fieldset address figure figcaption main aside tbody thead tfoot caption".split()
)
_TAG_A = re.compile(
    r"<[aA]\b(?:[^<>]*?\s[hH][rR][eE][fF]\s*=\s*(?:\"([^\"<>]*)\"|'([^'<>]*)'|([^\s\"'<>]+)))?[^<>]*>"
)
_TAG_A_END = re.compile(r"</[aA]\b[^<>]*>")
_TAG_HEADING = re.compile(r"<[hH][1-3]\b[^<>]*>")
_TAG_HEADING_END = re.compile(r"</[hH][1-3]\b[^<>]*>")
_EMPH_NAMES = _cased("b", "strong", "big", "code", "kbd", "samp", "tt", "mark")
_TAG_EMPH = re.compile(rf"<(?:{_EMPH_NAMES})\b[^<>]*>")
_TAG_EMPH_END = re.compile(rf"</(?:{_EMPH_NAMES})\b[^<>]*>")
_TAG_BLOCK = re.compile(rf"</?(?:{_cased(*_BLOCK_NAMES, 'body', 'html')})\b[^<>]*>")
_TAG_ANY = re.compile(r"<(?:/?[a-zA-Z]|[!?])[^<>]*>")
_TAG_NAME = re.compile(r"<([a-zA-Z][a-zA-Z0-9]*)")

# Style that makes text large (>= 20px, 16pt, 1.5em, x-large, 150%) or spaced
# out (letter-spacing >= 2px), and <font size=4..7>: how templates show codes.
_LARGE = (
    r"(?:(?:[2-9][0-9]|[1-9][0-9][0-9])(?:\.[0-9]+)?(?:px|PX)|(?:1[6-9]|[2-9][0-9])(?:\.[0-9]+)?(?:pt|PT)"
    r"|(?:1\.[5-9][0-9]*|[2-9](?:\.[0-9]+)?)(?:r?em|R?EM)|x{1,2}-large|1[5-9][0-9]%|[2-9][0-9][0-9]%)"
)
_BIG_STYLES = [
    (name, re.compile(rf"{name}\s*:\s*{_LARGE}"))
    for name in ("font-size", "FONT-SIZE")
] + [
    (name, re.compile(rf"{name}\s*:\s*(?:[2-9]|[1-9][0-9])(?:\.[0-9]+)?(?:px|pt|PX|PT)"))
    for name in ("letter-spacing", "LETTER-SPACING")
] + [
    (name, re.compile(rf"{name}\s*=\s*[\"']?\+?[4-7](?![0-9])")) for name in ("size", "SIZE")
]  # (literal, pattern): each starts with its literal, which re finds fastest
_MAX_TAG = 4000  # a style attribute further than this from its "<" is not looked at

# Entities worth replacing before html.unescape (which calls back per entity):
# layout spaces and the zero-width padding of "preheader" text. &amp; stays
# for html.unescape, so that "&amp;nbsp;" decodes once, to "&nbsp;".
_COMMON_ENTITIES = (
    ("&nbsp;", " "), ("&#160;", " "), ("&#xa0;", " "), ("&zwnj;", ""), ("&#8204;", ""),
    ("&#847;", ""), ("&#8203;", ""), ("&zwj;", ""), ("&shy;", ""), ("&#173;", ""),
)
_INVISIBLE_CHARS = "\u00ad\u034f\u200b\u200c\u200d\u200e\u200f\u2060\ufeff"
_INVISIBLE = re.compile(f"[{_INVISIBLE_CHARS}]")


def _has_any(text: str, chars: str) -> bool:
    """Whether ``text`` holds one of ``chars``: one str.find (memchr) each is several
    times faster than a regex character class scanning the text."""
    for char in chars:
        if char in text:
            return True
    return False


@dataclass(slots=True)
class _View:
    """The visible text of one part, with what the scoring needs."""

    source: str  # "subject" | "html" | "text"
    text: str
    emphasis: list[tuple[int, int]] = field(default_factory=list)  # sorted, disjoint
    anchors: list[tuple[int, int, str | None]] = field(default_factory=list)  # start, end, raw href
    urls: list[tuple[int, int, str]] | None = None  # bare URLs: start, end, trimmed URL (see _bare_urls)


def _drop_hidden(html: str) -> str:
    """Remove comments and the contents of non-rendered elements, linearly."""
    if "<" not in html:
        return html
    out = []
    pos = 0
    size = len(html)
    unclosed: set[str] = set()  # a close tag not found once is not found later either
    while pos < size:
        match = _HIDDEN_OPEN.search(html, pos)
        if match is None:
            break
        out.append(html[pos : match.start()])
        name = match.group(1)
        if name is None:  # a comment; "<!-->" is an empty one
            end = html.find("-->", match.start() + 2)
            pos = size if end < 0 else end + 3
            continue
        name = name.lower()
        close = None
        if name not in unclosed:
            close = _HIDDEN_CLOSE[name].search(html, match.end())
            if close is None:
                unclosed.add(name)
        if close is not None:
            pos = close.start() if close.group() == "<" else close.end()  # keep "<body ...>" whole
        elif name == "head":  # never closed: only drop the tag itself
            pos = match.end()
        else:  # an unclosed <script> or <style> runs to the end
            pos = size
    out.append(html[pos:])
    return "".join(out)


def _mark_big(html: str) -> str:
    """Replace the start tags of large-text elements by an emphasis marker."""
    tags: dict[int, tuple[int, str]] = {}
    font = "<font" in html or "<FONT" in html
    matches = [
        m
        for literal, rx in _BIG_STYLES
        if literal in html and (font or literal[0] not in "sS")
        for m in rx.finditer(html)
    ]
    for match in matches:
        at = match.start()
        start = html.rfind("<", max(0, at - _MAX_TAG), at)
        if start < 0 or start in tags or html.find(">", start, at) >= 0:
            continue  # not inside a tag, or that tag is done
        end = html.find(">", match.end(), match.end() + _MAX_TAG)
        if end < 0 or html.find("<", match.end(), end) >= 0:
            continue
        found = _TAG_NAME.match(html, start)
        if found is None:
            continue
        name = found.group(1).lower()
        if name in ("a", "h1", "h2", "h3") or (match.group()[0] in "sS" and name != "font"):
            continue  # links and headings have their own markers
        marker = _BR + _E_OPEN if name in _BLOCK_NAMES else _E_OPEN
        tags[start] = (end + 1, marker)
    if not tags:
        return html
    out = []
    pos = 0
    for start in sorted(tags):
        end, marker = tags[start]
        out.append(html[pos:start])
        out.append(marker)
        pos = end
    out.append(html[pos:])
    return "".join(out)


def _html_view(html: str) -> _View:
    if any(marker in html for marker in _MARKERS):  # one memchr each: faster than a regex scan
        html = _MARKER_CHARS.sub(" ", html)
    s = _mark_big(_drop_hidden(html))
    hrefs: list[str | None] = []

    def anchor(match: re.Match) -> str:
        hrefs.append(match.group(1) or match.group(2) or match.group(3))
        return _A_OPEN

    if "<" in s:
        if "<a" in s or "<A" in s:  # a substring test is much cheaper than a pass
            s = _TAG_A.sub(anchor, s)
            s = _TAG_A_END.sub(_A_CLOSE, s)
        if "<h" in s or "<H" in s:
            s = _TAG_HEADING.sub(_BR + _E_OPEN, s)
            s = _TAG_HEADING_END.sub(_E_CLOSE + _BR, s)
        s = _TAG_EMPH.sub(_E_OPEN, s)
        s = _TAG_EMPH_END.sub(_E_CLOSE, s)
        s = _TAG_BLOCK.sub(_BR, s)
        s = _TAG_ANY.sub("", s)
    if "&" in s:
        for entity, replacement in _COMMON_ENTITIES:
            if entity in s:
                s = s.replace(entity, replacement)
        if "&" in s:
            s = _html.unescape(s)
    if not s.isascii() and _has_any(s, _INVISIBLE_CHARS):
        s = _INVISIBLE.sub("", s)
    # White space as a browser collapses it; block tags make the line breaks.
    s = " ".join(s.split())
    if _BR in s:
        s = s.replace(_BR, "\n").replace(" \n", "\n").replace("\n ", "\n")
        if "\n\n" in s:
            s = _NEWLINES.sub("\n", s)

    view = _View("html", "")
    pieces: list[str] = []
    pos = 0
    depth = 0
    anchor_index = 0
    open_anchor: tuple[int, str | None] | None = None
    for i, part in enumerate(_MARK_SPLIT.split(s)):
        if not i % 2:  # text
            if not part:
                continue
            pieces.append(part)
            if depth:
                newline = part.find("\n")
                if newline < 0:
                    view.emphasis.append((pos, pos + len(part)))
                else:  # emphasis never runs past a line break (unclosed tags)
                    if newline:
                        view.emphasis.append((pos, pos + newline))
                    depth = 0
            pos += len(part)
        elif part == _A_OPEN:
            if open_anchor is not None:  # <a> inside <a>: the first one ends here
                view.anchors.append((open_anchor[0], pos, open_anchor[1]))
            href = hrefs[anchor_index] if anchor_index < len(hrefs) else None
            anchor_index += 1
            open_anchor = (pos, href)
        elif part == _A_CLOSE:
            if open_anchor is not None:
                view.anchors.append((open_anchor[0], pos, open_anchor[1]))
                open_anchor = None
        elif part == _E_OPEN:
            depth = min(depth + 1, 64)
        elif depth:
            depth -= 1
    if open_anchor is not None:
        view.anchors.append((open_anchor[0], pos, open_anchor[1]))
    view.text = "".join(pieces)
    return view


# --------------------------------------------------------------------------
# Links

# What follows "http://" or "https://" in text: up to white space, brackets,
# quotes, or CJK text and punctuation (which often follows a URL unspaced).
_URL_TAIL = re.compile(r"[^\s<>\"'`\x00-\x08\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]+")
_WWW = re.compile(r"[wW][wW][wW]\.[^\s<>\"']+")
_URL_TRAILING = ".,;:!?'\"*>"
_PAIRS = {")": "(", "]": "[", "}": "{"}
_HTTP = re.compile(r"https?://[^/?#\s]", re.I)
_HREF_JUNK = re.compile(r"[\t\n\r]")

# Looked for in URLs and anchor texts lower-cased, with "-" and "_" as
# spaces ("Log-in", "sign_in"): plain substring tests, the fastest.
_UNSUBSCRIBE_WORDS = (
    "unsub", "optout", "opt out", "email preferences", "emailpreferences", "manage subscription",
    "manage preferences", "manage email", "manage your", "subscription center", "subscription preferences",
    "subscription settings", "отпис", "退订", "取消订阅",
)
_VERIFY_WORDS = (
    "verif", "confirm", "activat", "validat", "magic", "onetime", "one time", "reset", "подтвер", "актив",
    "войти", "вход", "验证", "驗證", "确认", "確認", "激活", "登录", "登入", "認証",
)
_VERIFY_AT_WORD_START = re.compile(r"(?<![a-z])(?:log ?in|sign ?in|otp(?![a-z]))")  # not "blog index"


def _squeezed(value: str) -> str:
    return value.lower().replace("-", " ").replace("_", " ")


def _says(value: str, words: tuple[str, ...]) -> bool:
    for word in words:
        if word in value:
            return True
    return False


def _clean_url(url: str) -> str:
    """Trim punctuation that ends the sentence around a URL (linear time)."""
    counts = {ch: url.count(ch) for ch in "()[]{}" if ch in url}
    end = len(url)
    while end:
        char = url[end - 1]
        if char in _URL_TRAILING:
            end -= 1
        elif char in _PAIRS and counts.get(char, 0) > counts.get(_PAIRS[char], 0):
            counts[char] -= 1  # an unbalanced closing bracket: "(see https://x/y)"
            end -= 1
        else:
            break
    return url[:end]


def _clean_href(href: str | None) -> str | None:
    if not href:
        return None
    if "&" in href:
        plain = href.replace("&amp;", "&")  # by far the most common entity in an href
        href = plain if "&" not in href.replace("&amp;", "") else _html.unescape(href)
    href = href.strip()
    if "\n" in href or "\t" in href or "\r" in href:
        href = _HREF_JUNK.sub("", href)  # as browsers do
    if len(href) > MAX_URL or not _HTTP.match(href):
        return None  # mailto:, javascript:, data:, cid:, relative, ...
    return href


def _bare_urls(view: _View) -> list[tuple[int, int, str]]:
    """http(s) URLs in a view's text (start, end of the raw match, trimmed URL); computed once."""
    if view.urls is None:
        view.urls = []
        text = view.text
        at = text.find("://")
        while at >= 0:  # "://" is rare in text; a regex for "http" would try every "h"
            start = at - 5 if text[max(0, at - 5) : at].lower() == "https" else at - 4
            tail = _URL_TAIL.match(text, at + 3)
            if (
                tail is not None
                and start >= 0
                and text[start : start + 4].lower() == "http"
                and not (start and text[start - 1].isascii() and text[start - 1].isalnum())
            ):
                if tail.end() - start <= MAX_URL:
                    url = _clean_url(text[start : tail.end()])
                    if _HTTP.match(url):
                        view.urls.append((start, tail.end(), url))
                at = text.find("://", tail.end())
            else:
                at = text.find("://", at + 3)
    return view.urls


def _link_rank(url: str, text: str) -> int:
    """-1 unsubscribe, 0 other, > 0 verification (higher is stronger)."""
    url, text = _squeezed(url), _squeezed(text)
    if _says(url, _UNSUBSCRIBE_WORDS) or _says(text, _UNSUBSCRIBE_WORDS):
        return -1
    by_text = 4 if _says(text, _VERIFY_WORDS) or _VERIFY_AT_WORD_START.search(text) else 0
    if _says(url, _VERIFY_WORDS) or _VERIFY_AT_WORD_START.search(url):
        by_url = 2
    elif "token" in url or "auth" in url.replace("author", ""):  # weaker hints
        by_url = 1
    else:
        by_url = 0
    if by_text and by_url:
        return by_text + 1
    return by_text or by_url


def _links(views: list[_View]) -> tuple[list[Link], Link | None]:
    texts: dict[str, str] = {}  # url -> anchor text, in first-seen order
    for view in views:
        if view.source != "html":
            continue
        found = []
        for start, end, href in view.anchors:
            url = _clean_href(href)
            if url is not None:
                found.append((start, 0, url, " ".join(view.text[start:end].split())))
        found.extend((start, 1, url, "") for start, _, url in _bare_urls(view))
        found.sort(key=lambda item: (item[0], item[1]))
        for _, _, url, anchor_text in found:
            if not texts.get(url):  # new, or seen so far without text
                texts[url] = anchor_text
    for view in views:
        if view.source == "text":
            for _, _, url in _bare_urls(view):
                texts.setdefault(url, "")
    links = []
    best, best_rank = None, 0
    for url, anchor_text in texts.items():
        rank = _link_rank(url, anchor_text)
        link = Link(url, anchor_text, "unsubscribe" if rank < 0 else "verification" if rank else "other")
        links.append(link)
        if rank > best_rank:
            best, best_rank = link, rank
    return links, best


# --------------------------------------------------------------------------
# Codes

# Starts with a class (fast scanning); the look-behinds then check the
# character before the one just consumed: not glued to a word, an "&" (an
# entity), an "@", or a decimal/thousands separator. An "alnum" match needs a
# letter and a digit, checked in Python; its space-separated form checks in
# the pattern that each half has a digit, so that "CODE 4839" does not swallow
# the 4839.
_CANDIDATE = re.compile(
    r"[0-9A-Z](?<![0-9A-Za-z&@_].)(?<![0-9][.,].)(?:"
    r"(?<=[0-9])(?P<split>[0-9]{2,3}[ \-][0-9]{3,4})"
    r"|(?<=[0-9])(?P<digits>[0-9]{3,7})"
    r"|(?P<alnum>[A-Z0-9]{2,4}-[A-Z0-9]{3,5}|[A-Z0-9]{5,9}"
    r"|(?:(?<=[0-9])|(?=[A-Z]{0,3}[0-9]))[A-Z0-9]{2,4} (?=[A-Z]{0,4}[0-9])[A-Z0-9]{3,5})"
    r")(?![0-9A-Za-z@_]|[.,][0-9A-Za-z])"
)

# Keywords, in lower case, each starting with a literal character; at one
# position the first listed wins ("verification code" before "verif...").
_STRONG, _ANTI, _MEDIUM, _WEAK = "strong", "anti", "medium", "weak"
_WEIGHT = {_STRONG: 1.0, _MEDIUM: 0.85, _WEAK: 0.5}
_CODE_WORDS = r"(?:code|pin|passcode|password)\b"
_KEYWORD_SPECS: list[tuple[str, str]] = [
    *(
        (rf"{word}\s+{_CODE_WORDS}", _STRONG)
        for word in (
            "verification", "verify", "security", "confirmation", "confirm", "login", "log-in", r"log\s+in",
            "sign-in", r"sign\s+in", "signin", "access", "authentication", "auth", "temporary", "2fa", "mfa",
            "otp", "activation", "one-time", r"one\s+time", "onetime",
        )
    ),
    (r"one[\s-]?time\b", _STRONG),
    (r"otp\b", _STRONG),
    ("passcode", _STRONG),
    (r"2fa\b", _STRONG),
    (r"mfa\b", _STRONG),
    (r"two[\s-]?factor", _STRONG),
    (r"код\w{0,3}\s+(?:подтвержд|проверки|доступа|для\s+входа|безопасности|активации|верификации)\w{0,6}", _STRONG),
    (r"проверочн\w{0,3}\s+код\w{0,3}", _STRONG),
    (r"одноразов\w{0,4}", _STRONG),
    *((word, _STRONG) for word in ("验证码", "校验码", "动态码", "确认码", "动态密码", "安全码", "驗證碼", "認證碼", "驗證代碼")),
    *(
        (rf"{word}\s+(?:code|pin)s?\b", _ANTI)
        for word in ("promo", "promotional", "promotion", "discount", "coupon", "gift", "referral", "zip", "postal",
                     "post", "area", "country", "source", "qr", "bar", "product", "tracking", "voucher")
    ),
    (r"order(?:s|\s+(?:number|no\.?|id|#))?\b", _ANTI),
    (r"invoice\w{0,3}", _ANTI),
    (r"receipt\b", _ANTI),
    (r"transaction\b", _ANTI),
    (r"ticket\b", _ANTI),
    (r"reference\b", _ANTI),
    (r"ref\b", _ANTI),
    (r"tracking\b", _ANTI),
    (r"account\s+(?:number|no)\b", _ANTI),
    (r"customer\s+(?:id|number|no)\b", _ANTI),
    (r"member(?:ship)?\s+(?:id|number|no)\b", _ANTI),
    (r"booking\b", _ANTI),
    (r"reservation\b", _ANTI),
    (r"coupon\w{0,3}", _ANTI),
    (r"discount\b", _ANTI),
    (r"voucher\b", _ANTI),
    (r"gift\s*card\b", _ANTI),
    (r"referral\b", _ANTI),
    (r"zip\b", _ANTI),
    (r"postcode\b", _ANTI),
    (r"sku\b", _ANTI),
    (r"qty\b", _ANTI),
    (r"quantity\b", _ANTI),
    (r"case\s+(?:id|number)\b", _ANTI),
    (r"id\b", _ANTI),
    ("№", _ANTI),
    (r"заказ\w{0,3}", _ANTI),
    (r"сч[её]т\w{0,3}", _ANTI),
    (r"квитанц\w{0,3}", _ANTI),
    (r"индекс\w{0,2}", _ANTI),
    (r"промокод\w{0,3}", _ANTI),
    *((word, _ANTI) for word in ("订单", "發票", "发票", "单号", "單號", "编号", "邮编", "优惠码", "快递")),
    (r"codes?\b", _MEDIUM),
    (r"pin\b", _MEDIUM),
    (r"код\w{0,3}", _MEDIUM),
    (r"verif\w{0,10}", _MEDIUM),
    (r"confirm\w{0,8}", _MEDIUM),
    (r"проверочн\w{0,3}", _MEDIUM),
    (r"подтвер\w{0,8}", _MEDIUM),
    *((word, _MEDIUM) for word in ("验证", "驗證", "确认", "確認")),
    (r"password\b", _WEAK),
    (r"парол\w{0,3}", _WEAK),
    (r"token\b", _WEAK),
    (r"sign[\s-]?in\b", _WEAK),
    (r"log[\s-]?in\b", _WEAK),
    (r"security\b", _WEAK),
    *((word, _WEAK) for word in ("密码", "登录", "登入")),
]


def _keyword_pattern(specs: list[tuple[str, str]]) -> tuple[re.Pattern, list[str | None]]:
    """All keywords as one alternation grouped like _grouped(); an empty group
    ends each keyword, so that ``match.lastindex`` tells which one matched.
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for pattern, kind in specs:
        if pattern[0] in _META or pattern[1:2] in _QUANTIFIERS:
            raise ValueError(f"keyword must start with a literal character: {pattern!r}")
        groups.setdefault(pattern[0], []).append((pattern[1:], kind))
    parts = []
    kinds: list[str | None] = [None]  # group numbers start at 1
    for first, items in groups.items():
        parts.append(re.escape(first) + "(?:" + "|".join(f"{rest}()" for rest, _ in items) + ")")
        kinds.extend(kind for _, kind in items)
    # Not inside a word ("barcode", "paid"): checked first, which also spares
    # the alternation at most positions.
    return re.compile("(?<![0-9a-z_а-яё])(?:" + "|".join(parts) + ")"), kinds


_KEYWORDS, _KEYWORD_KINDS = _keyword_pattern(_KEYWORD_SPECS)
_NEAR_BEFORE = 120  # keywords searched first: this far before a candidate
_NEAR_AFTER = 60  # and this far after it (keywords after count no further)
_FAR_BEFORE = 300  # then this far before, for candidates with none near
_BEST_PROXIMITY = 60  # see _proximity()
_AGREEMENT = 5  # bonus when several parts show the code

# The context patterns run on a few dozen lower-cased characters around a
# candidate; a leading look-behind is affordable there.
_NOT_AFTER_LETTER = "(?<![a-zа-яё])"
_DATE_WORDS = re.compile(
    _NOT_AFTER_LETTER + "(?:" + _grouped([
        "january", "jan", "february", "feb", "march", "mar", "april", "apr", "may", "june", "jun", "july", "jul",
        "august", "aug", "september", "sept", "sep", "october", "oct", "november", "nov", "december", "dec",
        "monday", "mon", "tuesday", "tues", "tue", "wednesday", "wed", "thursday", "thurs", "thu", "friday", "fri",
        "saturday", "sat", "sunday", "sun", "years", "year", "copyright", "since", "est", "dated", "date",
        "январ", "феврал", "март", "апрел", "мая", "май", "июн", "июл", "август", "сентябр", "октябр", "ноябр",
        "декабр", "год",
    ]) + ")(?![a-z])|\\(c\\)|[0-9]\\s?г\\.|[©年月日]"
)
_CURRENCY_BEFORE = re.compile(r"(?:[$€£¥₽₹₴₩]|usd|eur|gbp|rub|cny|jpy|rmb|руб\.?|р\.|rs\.?)\s?$")  # lower-cased
_CURRENCY_AFTER = re.compile(
    r"\s?(?:[$€£¥₽₹₴₩元]|USD\b|EUR\b|GBP\b|RUB\b|CNY\b|руб|р\.|dollars?\b|euros?\b|рубл|块)", re.I
)
_UNIT_AFTER = re.compile(r"\s?(?:%|px\b|pt\b|ms\b|kb\b|mb\b|gb\b|mm\b|cm\b|km\b|kg\b|шт\b|мин|×|x\d)", re.I)
_NUMBER_BEFORE = re.compile(r"(?:[0-9][-./,:]|[0-9]{2,}\s|\+[0-9]{1,3}\s?|\([0-9]{2,5}\)\s?)$")
_NUMBER_AFTER = re.compile(r"(?:[-./,:][0-9]|\s[0-9]{2,})")
_PHONE_WORDS = re.compile(_grouped([
    "phone", r"tel\b", r"call\b", r"fax\b", "mobile", "whatsapp", "телефон", r"тел\b", "звон", "电话", "手机",
    "致电", "热线",
]))  # lower-cased
_ADDRESS_WORDS = re.compile(
    _NOT_AFTER_LETTER + "(?:" + _grouped([
        "street", r"st\.", r"str\.", "avenue", r"ave\b", "road", r"rd\.", "blvd", "boulevard", "parkway", "pkwy",
        "highway", "plaza", "suite", r"ste\.", "floor", "building", "bldg", "drive", "lane", r"po\s?box",
        r"p\.\s?o\.\s?box", "zip", "postal", r"ул\.", "улица", "проспект", r"просп\.", r"корп\.",
    ]) + r")|(?<![a-zа-яё])[дг]\.\s?[0-9а-яё]|stra(?:ß|ss)e\b|[路街号区市省楼]"
)  # lower-cased; not "address": "your email address" is in every other verification mail
_STATE_BEFORE = re.compile(r"(?<![A-Za-z])[A-Z]{2}\s$")
_HEX = re.compile(r"[0-9A-Fa-f]{3}(?:[0-9A-Fa-f]{3})?(?:[0-9A-Fa-f]{2})?")
_LINE_PUNCT = " \t.:;,!*-–—()\"'«»“”：。，！"


@dataclass(slots=True)
class _Hit:
    score: int
    value: str
    view: int  # index into the views
    start: int
    end: int
    keyword_start: int | None


def _find_keywords(low: str, spans: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    """Keyword and anti-keyword matches (start, end, kind) in lower-cased text, within spans."""
    return [
        (match.start(), match.end(), _KEYWORD_KINDS[match.lastindex])
        for start, end in spans
        for match in _KEYWORDS.finditer(low, start, end)
    ]


def _windows(candidates: list[tuple], size: int, before: int, after: int) -> list[tuple[int, int]]:
    """Merged spans around the candidates (start, end, ...) where keywords count.

    A keyword is matched whole only when it lies whole inside a span, so the
    spans reach a little further than the distances that score.
    """
    spans: list[tuple[int, int]] = []
    for start, end, *_ in candidates:
        low, high = max(0, start - before - 40), min(size, end + after + 40)
        if spans and low <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], high))
        else:
            spans.append((low, high))
    return spans


def _proximity(text: str, left: int, right: int, before: bool) -> float:
    """Points for a keyword ``right - left`` characters before (or after) the candidate."""
    distance = right - left
    if distance < 0:
        return 0.0
    if distance <= 40 and "\n" not in text[left:right]:
        return 60.0 if before else 40.0
    if distance <= _NEAR_AFTER:
        return 50.0 if before else 30.0
    if not before:
        return 0.0
    if distance <= _NEAR_BEFORE:
        return 35.0
    if distance <= _FAR_BEFORE:
        return 15.0
    return 0.0


class _Keywords:
    """Keyword hits of one text, ready for nearest-neighbour look-ups."""

    __slots__ = ("keywords", "starts", "ends", "anti", "anti_ends")

    def __init__(self, found: list[tuple[int, int, str]]):
        self.keywords = [(s, e, _WEIGHT[kind]) for s, e, kind in found if kind != _ANTI]
        self.starts = [k[0] for k in self.keywords]
        self.ends = [k[1] for k in self.keywords]
        self.anti = [(s, e) for s, e, kind in found if kind == _ANTI]
        self.anti_ends = [a[1] for a in self.anti]

    def near(self, text: str, start: int, end: int) -> tuple[float, int | None, float]:
        """(proximity points, start of the keyword before that gave them, anti-keyword penalty)."""
        keywords = self.keywords
        proximity = 0.0
        keyword_start = None
        keyword_end_before = -1
        i = bisect.bisect_right(self.ends, start)
        for k in range(i - 1, max(i - 4, -1), -1):  # the best of the nearest few
            k_start, k_end, weight = keywords[k]
            if keyword_end_before < 0:
                keyword_end_before = k_end
            points = _proximity(text, k_end, start, True) * weight
            if points > proximity:
                proximity, keyword_start = points, k_start
        j = bisect.bisect_left(self.starts, end)
        for k in range(j, min(j + 2, len(keywords))):
            k_start, k_end, weight = keywords[k]
            points = _proximity(text, end, k_start, False) * weight
            if points > proximity:
                proximity, keyword_start = points, None
        penalty = 0.0
        a = bisect.bisect_right(self.anti_ends, start) - 1
        if a >= 0:
            a_end = self.anti[a][1]
            if start - a_end <= 40 and a_end > keyword_end_before and "\n" not in text[a_end:start]:
                penalty = 70.0  # "Order number: 58213047", nearer than any code word
        return proximity, keyword_start, penalty


def _scan(view: _View, index: int, subject_has_keyword: Callable[[], bool], hits: dict[str, list[_Hit]]) -> None:
    """Score the candidates of one view into ``hits`` (normalized value -> occurrences)."""
    text = view.text
    # Every candidate the loop below keeps has an ASCII digit (full-width ones
    # are translated already): most texts have none, and the pattern is slow.
    if not text or not _has_any(text, "0123456789"):
        return
    candidates = []
    for count, match in enumerate(_CANDIDATE.finditer(text)):
        if count >= MAX_CANDIDATES:
            break
        value = match.group()
        kind = match.lastgroup
        if kind == "alnum":
            bare = value.replace("-", "").replace(" ", "")
            if bare.isdigit() or bare.isalpha():
                continue  # needs a letter and a digit
        candidates.append((match.start(), match.end(), kind, value))
    if not candidates:
        return
    excluded = [(start, end) for start, end, _ in _bare_urls(view)]
    if "www." in text or "WWW." in text:
        excluded = sorted(excluded + [m.span() for m in _WWW.finditer(text)])
    excluded_starts = [span[0] for span in excluded]
    low = _lower(text)
    size = len(text)

    # First what the candidate looks like: only the hopeful ones go on to the
    # keyword search around them, which is the costly part.
    hopeful = []
    for start, end, kind, value in candidates:
        at = bisect.bisect_right(excluded_starts, start) - 1
        if at >= 0 and excluded[at][1] > start:
            continue  # part of a URL
        score = _shape_score(view, low, start, end, kind, value)
        if score + _BEST_PROXIMITY + _AGREEMENT >= MIN_SCORE:
            hopeful.append((start, end, kind, value, score))
    if not hopeful:
        return

    # Keywords close by first; further only for candidates with none close.
    near = _Keywords(_find_keywords(low, _windows(hopeful, size, _NEAR_BEFORE, _NEAR_AFTER)))
    scored = []
    far = []
    for candidate in hopeful:
        found = near.near(text, candidate[0], candidate[1])
        (scored if found[0] > 0 else far).append((candidate, found))
    if far:
        wide = _Keywords(_find_keywords(low, _windows([c for c, _ in far], size, _FAR_BEFORE, _NEAR_AFTER)))
        scored.extend((candidate, wide.near(text, candidate[0], candidate[1])) for candidate, _ in far)
    for (start, end, kind, value, score), (proximity, keyword_start, penalty) in scored:
        if proximity <= 0 and not subject_has_keyword():
            continue  # no code word near it, none in the subject either
        score += proximity - penalty
        normalized = value.replace(" ", "").replace("-", "")
        hits.setdefault(normalized, []).append(_Hit(round(score), value, index, start, end, keyword_start))


def _shape_score(view: _View, low: str, start: int, end: int, kind: str, value: str) -> float:
    """Points for layout and shape, minus what the number more likely is.

    ``low`` is the view's text lower-cased (same offsets).
    """
    text = view.text
    size = len(text)
    score = 0.0
    line_start = text.rfind("\n", max(0, start - 200), start) + 1
    if line_start == 0 and start > 200:
        line_start = -1  # a very long line: not alone on it
    line_end = text.find("\n", end, end + 200)
    if line_end < 0:
        line_end = size if size - end <= 200 else -1
    if line_start >= 0 and line_end >= 0:
        if not text[line_start:start].strip(_LINE_PUNCT) and not text[end:line_end].strip(_LINE_PUNCT):
            score += 15  # alone on its line
    emphasis = view.emphasis
    if emphasis:
        at = bisect.bisect_right(emphasis, (start, size + 1)) - 1
        if (at >= 0 and emphasis[at][1] > start) or (at + 1 < len(emphasis) and emphasis[at + 1][0] < end):
            score += 25  # bold, a heading, large or spaced-out type
    if view.source == "subject":
        score += 15
    digits = len(value) - value.count(" ") - value.count("-")
    if kind == "digits":
        score += 10 if digits == 6 else 4
    else:
        score += 6

    # Penalties, cheapest first; stop once even the best keyword could not
    # lift the candidate to MIN_SCORE.
    hopeless = MIN_SCORE - _BEST_PROXIMITY - _AGREEMENT
    left = low[max(0, start - 40) : start]
    longer_number = _NUMBER_BEFORE.search(left[-9:]) or _NUMBER_AFTER.match(text, end)
    if longer_number:
        score -= 50  # one group of a longer number: phone, card, date, IP
    if kind == "digits" and len(value) == 4 and 1900 <= int(value) <= 2099:
        dated = longer_number or _DATE_WORDS.search(low, max(0, start - 40), min(size, end + 25))
        score -= 80 if dated else 25  # a year
    if start and text[start - 1] == "#":
        score -= 100 if _HEX.fullmatch(value) else 20  # a colour, or "#12345"
    if score < hopeless:
        return score
    if _CURRENCY_BEFORE.search(left[-6:]) or _CURRENCY_AFTER.match(text, end):
        score -= 80  # a price
    elif _UNIT_AFTER.match(text, end):
        score -= 40  # a quantity
    if score < hopeless:
        return score
    line_left = left[left.rfind("\n") + 1 :]
    if _PHONE_WORDS.search(line_left[-30:]):  # lower-cased
        score -= 60
    if kind != "alnum" and 4 <= digits <= 6 and score >= hopeless:
        line_right = low[end : end + 40].split("\n", 1)[0]
        if (
            _ADDRESS_WORDS.search(low[max(0, start - 80) : start].rsplit("\n", 1)[-1])
            or _ADDRESS_WORDS.search(line_right)
            or (digits == 5 and _STATE_BEFORE.search(text[max(0, start - 4) : start]))
        ):
            score -= 60  # a postal code
    return score


def _context(text: str, hit: _Hit) -> str:
    """About 60 characters around a code, from its keyword on if that is close, in whole words."""
    start = hit.start - 30
    if hit.keyword_start is not None and hit.start - 60 <= hit.keyword_start < start:
        start = hit.keyword_start
    end = hit.end + 30
    if start > 0 and not text[start - 1].isspace():  # widen to whole words, a little
        floor = max(0, start - 15)
        space = max(text.rfind(" ", floor, start), text.rfind("\n", floor, start))
        start = space + 1 if space >= 0 else 0 if floor == 0 else start
    if end < len(text) and not text[end].isspace():
        found = [i for i in (text.find(" ", end, end + 15), text.find("\n", end, end + 15)) if i >= 0]
        end = min(found) if found else len(text) if end + 15 >= len(text) else end
    return " ".join(text[max(0, start) : end].split())


def _codes(views: list[_View]) -> list[Code]:
    subject = views[0].text if views and views[0].source == "subject" else ""

    @functools.cache
    def subject_has_keyword() -> bool:  # only asked for a candidate with no keyword near it
        return bool(subject) and any(
            kind != _ANTI for _, _, kind in _find_keywords(_lower(subject), [(0, len(subject))])
        )

    hits: dict[str, list[_Hit]] = {}
    for index, view in enumerate(views):
        _scan(view, index, subject_has_keyword, hits)
    ranked = []
    for order, (normalized, found) in enumerate(hits.items()):
        best = max(found, key=lambda hit: hit.score)  # the first of equals
        score = best.score
        if score > 0 and len({views[hit.view].source for hit in found}) > 1:
            score += _AGREEMENT  # the subject and the body, or both bodies, agree
        if score >= MIN_SCORE:
            ranked.append((-score, order, normalized, best, score))
    ranked.sort(key=lambda item: (item[0], item[1]))
    codes = []
    for _, _, normalized, best, score in ranked:
        text = views[best.view].text
        codes.append(Code(best.value, normalized, _context(text, best), score))
    return codes


# --------------------------------------------------------------------------
# Entry point


def _as_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return ""


# Full-width digits, letters and hyphen (CJK mails) read as ASCII, one character for one.
_FULLWIDTH = {0xFF10 + i: 0x30 + i for i in range(10)} | {0xFF21 + i: 0x41 + i for i in range(26)} | {0xFF0D: 0x2D}
_FULLWIDTH_DIGITS = "".join(chr(0xFF10 + i) for i in range(10))


def _ascii_digits(view: _View) -> _View:
    if not view.text.isascii() and _has_any(view.text, _FULLWIDTH_DIGITS):
        view.text = view.text.translate(_FULLWIDTH)
    return view


def _extract(subject, text, html) -> Extracted:
    subject = _as_str(subject)
    text = _as_str(text)
    if isinstance(html, (str, bytes, bytearray)):
        html = [html]
    elif not isinstance(html, (list, tuple)):
        html = []
    views = [_View("subject", " ".join(subject.split()))]
    views.extend(_html_view(part) for part in map(_as_str, html) if part)
    if text:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.isascii() and _has_any(text, _INVISIBLE_CHARS):
            text = _INVISIBLE.sub("", text)
        views.append(_View("text", text))
    for view in views:
        _ascii_digits(view)
    links, best_link = _links(views)
    return Extracted(links, _codes(views), best_link)
