"""DMARC (RFC 7489): policy discovery, identifier alignment, the verdict.

Why not authheaders' DMARC code: its organisational-domain helper re-reads and
re-parses its bundled public suffix list on every call (~50 ms here), the list is
publicsuffix2's from 2019, it answers "test" as the organisational domain of
"a.sub.example.test" (unknown TLDs are mishandled), it uses the global dnspython
resolver directly, and a DNS timeout is an exception rather than temperror. What
DMARC needs is small, so it lives here, with the list from `publicsuffixlist`
(maintained, ships the list, works offline; unknown TLDs such as .test get the
PSL's default "*" rule, so example.test is its own organisational domain).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from .dnscache import DnsTempError

__all__ = ["DmarcRecord", "org_domain", "parse_record", "aligned", "discover", "evaluate"]

_POLICIES = ("none", "quarantine", "reject")
_RECORD_START = re.compile(rb"^v\s*=\s*DMARC1\s*(;|$)")


@dataclass(frozen=True)
class DmarcRecord:
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"


# Built at import (~30 ms, ~2 MB): the ingester's forkserver imports this
# module, so the list is parsed once and shared by every worker it forks,
# not built again on each worker's first message.
_PSL = PublicSuffixList()


@functools.lru_cache(maxsize=8192)
def org_domain(domain: str) -> str:
    """Organisational domain: one label below the public suffix.

    A domain that is itself a public suffix is its own organisational domain.
    """
    domain = domain.rstrip(".").lower()
    return _PSL.privatesuffix(domain) or domain


def aligned(domain: str | None, from_domain: str, mode: str) -> bool:
    """Is an authenticated `domain` aligned with the From domain? (s)trict / (r)elaxed."""
    if not domain:
        return False
    domain = domain.rstrip(".").lower()
    if mode == "s":
        return domain == from_domain
    return org_domain(domain) == org_domain(from_domain)


def parse_record(txt: bytes) -> DmarcRecord | None:
    """A DMARC1 TXT record, or None when it is not a usable one.

    Cached on the record's bytes (a changed record is a new entry; the DNS
    cache bounds how long the old one is seen): the same few domains send
    most mail. Long records (chosen by senders) are not kept.
    """
    return _parse_record_cached(txt) if len(txt) <= 2048 else _parse_record(txt)


def _parse_record(txt: bytes) -> DmarcRecord | None:
    if not _RECORD_START.match(txt):
        return None
    tags = _tags(txt.decode("ascii", "replace"))
    p = tags.get("p")
    if p not in _POLICIES:
        # RFC 7489 6.6.3 step 6: an invalid p with a reporting address is
        # treated as p=none; without one the record does not apply.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", p)
    if sp not in _POLICIES:
        sp = p
    return DmarcRecord(p=p, sp=sp,
                       adkim="s" if tags.get("adkim") == "s" else "r",
                       aspf="s" if tags.get("aspf") == "s" else "r")


_parse_record_cached = functools.lru_cache(maxsize=4096)(_parse_record)


def _tags(text: str) -> dict[str, str]:
    tags = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip().lower())
    return tags


TxtLookup = Callable[[str], list[bytes]]  # raises DnsTempError


def discover(from_domain: str, txt: TxtLookup) -> tuple[DmarcRecord | None, bool]:
    """(record, found_at_org_domain). Raises DnsTempError.

    _dmarc.<From domain> first; only if it holds no DMARC record at all, the
    organisational domain's (RFC 7489 6.6.3). Two or more records: none.
    """
    candidates = [t for t in txt("_dmarc." + from_domain) if _RECORD_START.match(t)]
    at_org = False
    if not candidates:
        org = org_domain(from_domain)
        if org == from_domain:
            return None, False
        candidates = [t for t in txt("_dmarc." + org) if _RECORD_START.match(t)]
        at_org = True
    if len(candidates) != 1:
        return None, False
    return parse_record(candidates[0]), at_org


def evaluate(from_domain: str, txt: TxtLookup, spf_result: str, spf_domain: str | None,
             dkim: Iterable[tuple[str | None, str]]) -> tuple[str, str | None]:
    """(result, policy) for a From domain, from our SPF result and DKIM
    (domain, result) pairs. result: pass / fail / none / temperror."""
    try:
        record, at_org = discover(from_domain, txt)
    except DnsTempError:
        return "temperror", None
    if record is None:
        return "none", None
    # sp applies to a From domain below the domain that published the record.
    policy = record.sp if at_org else record.p
    dkim = list(dkim)
    if spf_result == "pass" and aligned(spf_domain, from_domain, record.aspf):
        return "pass", policy
    if any(r == "pass" and aligned(d, from_domain, record.adkim) for d, r in dkim):
        return "pass", policy
    # An aligned identifier that could not be checked because of a DNS hiccup
    # may pass later: say so instead of "fail".
    if spf_result == "temperror" and aligned(spf_domain, from_domain, record.aspf):
        return "temperror", policy
    if any(r == "temperror" and aligned(d, from_domain, record.adkim) for d, r in dkim):
        return "temperror", policy
    return "fail", policy
