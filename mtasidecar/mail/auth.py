"""Sender authentication of one received message: SPF, DKIM, DMARC.

Pure library code: bytes and envelope in, an `AuthResult` out. The verdict comes
only from our own checks; Authentication-Results, Received-SPF and ARC-* header
fields already in the message are never read.

    auth = Authenticator(servers=[("127.0.0.1", 5354)], hostname="mx.example.test")
    result = auth.check(raw, sender="a@example.test", client_ip="192.0.2.1",
                        helo="mail.example.test")
    result.to_dict()  # {"spf": {...}, "dkim": [...], "dmarc": {...},
                      #  "authentication_results": "mx.example.test; spf=pass ..."}

Every DNS look-up (pyspf's, dkimpy's and ours) goes through one
`CachingResolver`, bounded by a per-message time budget: a slow or dead DNS gives
`temperror` results, never an exception and never a stuck ingester. `check` is
thread-safe and holds no lock while waiting on DNS, so the ingester overlaps DNS
waits by calling it from several threads, or hands a batch to `check_many`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import getaddresses
from typing import NamedTuple

import dkim
import spf

from . import dmarc
from .dnscache import CachingResolver, DnsTempError

__all__ = ["Authenticator", "AuthResult", "CheckItem", "DkimResult", "DmarcResult", "SpfResult"]

log = logging.getLogger(__name__)

# More signatures than this are reported as "neutral" without being verified:
# each costs a DNS look-up and a public-key operation, and a sender has no
# legitimate need for dozens (RFC 6376 6.1 lets verifiers limit them).
MAX_SIGNATURES = 10


@dataclasses.dataclass(frozen=True)
class SpfResult:
    result: str  # pass fail softfail neutral none temperror permerror
    domain: str | None  # MAIL FROM domain, or the HELO name for a null sender
    ip: str | None
    helo: str | None


@dataclasses.dataclass(frozen=True)
class DkimResult:
    domain: str | None
    selector: str | None
    algorithm: str | None
    result: str  # pass fail temperror permerror neutral


@dataclasses.dataclass(frozen=True)
class DmarcResult:
    result: str  # pass fail none temperror; permerror: several From domains
    policy: str | None  # none quarantine reject (sp= for a subdomain); None: no record
    from_domain: str | None


@dataclasses.dataclass(frozen=True)
class AuthResult:
    spf: SpfResult
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    authentication_results: str  # RFC 8601 header field value, authserv-id first

    def to_dict(self) -> dict:
        return {
            "spf": dataclasses.asdict(self.spf),
            "dkim": [dataclasses.asdict(d) for d in self.dkim],
            "dmarc": dataclasses.asdict(self.dmarc),
            "authentication_results": self.authentication_results,
        }


class CheckItem(NamedTuple):
    raw: bytes
    sender: str | None = None
    client_ip: str | None = None
    helo: str | None = None


class Authenticator:
    """SPF, DKIM and DMARC checks sharing one cached resolver.

    servers: [(address, port)]; None or empty: the system resolver.
    timeout: the most one DNS look-up may take; budget: the most all look-ups of
    one message may take together. hostname: our authserv-id in
    Authentication-Results. cache_ttl / negative_ttl bound how long answers and
    non-existence are cached. max_workers: threads of `check_many`.
    resolver: pass one to share its cache with other users (e.g. the policy service).
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = 2.0,
        budget: float = 3.0,
        hostname: str | None = None,
        cache_ttl: float = 300.0,
        negative_ttl: float = 60.0,
        max_workers: int = 32,
        resolver: CachingResolver | None = None,
    ):
        self.dns = resolver or CachingResolver(
            servers, timeout=timeout, max_ttl=cache_ttl, negative_ttl=negative_ttl)
        self.budget = budget
        self.hostname = hostname or socket.gethostname()
        self.max_workers = max_workers
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pool_lock = threading.Lock()

    # -- public API --------------------------------------------------------

    def check(self, raw: bytes, sender: str | None = None, client_ip: str | None = None,
              helo: str | None = None) -> AuthResult:
        """Authenticate one message. Never raises; DNS trouble gives temperror."""
        try:
            return self._check(raw, sender, client_ip, helo)
        except Exception:  # noqa: BLE001 - a bug here must not cost the ingester the message
            log.exception("authentication checks failed")
            spf_result = SpfResult("permerror", None, _parse_ip(client_ip), _clean(helo) or None)
            dmarc_result = DmarcResult("permerror", None, None)
            return AuthResult(spf_result, (), dmarc_result, _authentication_results(
                self.hostname, sender, spf_result, (), dmarc_result))

    def _check(self, raw, sender, client_ip, helo) -> AuthResult:
        deadline = time.monotonic() + self.budget
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        signer, fields = _parse_message(raw)
        from_domains = _from_domains(fields)
        self._prefetch(_txt_names_needed(fields, from_domains), deadline)
        spf_result = self._check_spf(sender, client_ip, helo, deadline)
        dkim_results = self._check_dkim(signer, fields, deadline)
        dmarc_result = self._check_dmarc(from_domains, spf_result, dkim_results, deadline)
        header = _authentication_results(self.hostname, sender, spf_result, dkim_results,
                                         dmarc_result)
        return AuthResult(spf_result, dkim_results, dmarc_result, header)

    def check_spf(self, sender: str | None, client_ip: str | None, helo: str | None,
                  budget: float | None = None) -> SpfResult:
        """SPF alone, as the policy service asks at RCPT time; never raises.

        The same evaluation as in `check` (pyspf through our cached resolver),
        bounded by ``budget`` seconds (default: this Authenticator's budget).
        """
        deadline = time.monotonic() + (self.budget if budget is None else budget)
        try:
            return self._check_spf(sender, client_ip, helo, deadline)
        except Exception:  # noqa: BLE001 - a bug here must not refuse mail
            log.exception("SPF check failed for %s from %s", sender or helo, client_ip)
            return SpfResult("temperror", None, _parse_ip(client_ip), _clean(helo) or None)

    def check_many(self, items: Iterable[CheckItem | tuple]) -> list[AuthResult]:
        """`check` each (raw, sender, client_ip, helo) concurrently; results in order."""
        items = list(items)
        if len(items) <= 1:
            return [self.check(*item) for item in items]
        return list(self._pool("check").map(lambda item: self.check(*item), items))

    def close(self) -> None:
        """Stop the worker threads (they are also started again if needed)."""
        with self._pool_lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.shutdown(wait=True)

    def __enter__(self) -> Authenticator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pool(self, purpose: str) -> ThreadPoolExecutor:
        # Separate pools for checks and prefetches: a check waiting on its
        # prefetch can then never hold the thread that prefetch needs.
        with self._pool_lock:
            pool = self._pools.get(purpose)
            if pool is None:
                pool = self._pools[purpose] = ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix=f"mtasidecar-auth-{purpose}")
            return pool

    def _prefetch(self, names: list[str], deadline: float) -> None:
        """Start the DKIM key and DMARC look-ups while SPF runs in this thread.

        The checks then find the answers cached or in flight (single flight in
        CachingResolver), so a message with a cold cache waits about one round
        trip instead of one per look-up. Warm names cost no thread hand-off.
        Failures are left in the dropped Future: the check itself meets them.
        """
        for name in names:
            if not self.dns.cached(name, "TXT"):
                self._pool("prefetch").submit(self.dns.lookup, name, "TXT", deadline)

    # -- SPF ---------------------------------------------------------------

    def _check_spf(self, sender, client_ip, helo, deadline) -> SpfResult:
        sender = _clean(sender).strip("<>")
        helo = _clean(helo) or None
        ip = _parse_ip(client_ip)
        # With a null sender the HELO identity is checked (RFC 7208 2.4).
        domain = (sender.rpartition("@")[2] if sender else helo or "").lower().rstrip(".")
        shown_ip = ip or (_clean(client_ip) or None)
        if ip is None or not domain:
            return SpfResult("none", domain or None, shown_ip, helo)
        result = self._run_spf(ip, sender, helo or "", deadline)
        return SpfResult(result, domain, shown_ip, helo)

    def _run_spf(self, ip: str, sender: str, helo: str, deadline: float) -> str:
        if time.monotonic() >= deadline:
            return "temperror"
        token = _SPF_LOOKUP.set(functools.partial(self._spf_records, deadline=deadline))
        try:
            # pyspf's own timeouts are moot: every look-up is bounded by our deadline.
            result, _code, _explanation = spf.query(i=ip, s=sender, h=helo).check()
            return result
        except Exception:  # noqa: BLE001 - a pyspf bug must not lose the message
            log.exception("SPF check failed for %s from %s", sender or helo, ip)
            return "permerror"
        finally:
            _SPF_LOOKUP.reset(token)

    def _spf_records(self, name: str, qtype: str, deadline: float) -> list:
        """pyspf's DNSLookup contract: [((name, qtype), value), ...], TempError on failure."""
        try:
            values = self.dns.lookup(name, qtype, deadline)
        except DnsTempError as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        return [((name, qtype), value) for value in values]

    # -- DKIM --------------------------------------------------------------

    def _check_dkim(self, signer, fields, deadline) -> tuple[DkimResult, ...]:
        signatures = [value for name, value in fields if name == b"dkim-signature"]
        results = []
        for idx, value in enumerate(signatures):
            if signer is None or idx >= MAX_SIGNATURES:
                # dkimpy could not parse the header block, or one signature too many
                results.append(_unverified(value, "neutral"))
            else:
                results.append(self._verify_signature(signer, idx, value, deadline))
        return tuple(results)

    def _verify_signature(self, signer: dkim.DKIM, idx: int, value: bytes,
                          deadline: float) -> DkimResult:
        """Map dkimpy's outcome to RFC 8601: bad signature syntax → neutral, key
        absent or unusable → permerror, DNS trouble → temperror, hash or
        signature mismatch → fail."""
        try:
            prepared = signer.verify_headerprep(idx)
        except Exception:  # noqa: BLE001 - DKIMException, and dkimpy's IndexError on a short i=
            return _unverified(value, "neutral")
        sig, include_headers, sig_headers = prepared
        found = functools.partial(_signature_result, sig)
        name = sig[b"s"] + b"._domainkey." + sig[b"d"]
        try:
            key = _usable_key(name, self.dns.txt(name, deadline))
        except DnsTempError:
            return found("temperror")
        if key is None:
            return found("permerror")
        try:
            # dkimpy swallows DNS errors into False; we already hold the key, so
            # its look-up cannot fail and False means a real mismatch.
            ok = signer.verify_sig(sig, include_headers, sig_headers[idx],
                                   lambda *_args, **_kwargs: key)
        except dkim.ValidationError:  # body hash mismatch
            return found("fail")
        except dkim.KeyFormatError:  # e.g. key shorter than 1024 bits
            return found("permerror")
        except Exception:  # noqa: BLE001 - anything else dkimpy may raise on odd input
            log.debug("DKIM verification error", exc_info=True)
            return found("neutral")
        return found("pass" if ok else "fail")

    # -- DMARC -------------------------------------------------------------

    def _check_dmarc(self, domains: list[str], spf_result: SpfResult, dkim_results,
                     deadline) -> DmarcResult:
        if not domains:
            return DmarcResult("none", None, None)
        if len(domains) > 1:
            # Several From domains: whose policy would apply is undefined
            # (RFC 7489 6.6.1); never let that look authenticated.
            return DmarcResult("permerror", None, domains[0])
        try:
            result, policy = dmarc.evaluate(
                domains[0], lambda name: self.dns.txt(name, deadline),
                spf_result.result, spf_result.domain,
                [(d.domain, d.result) for d in dkim_results])
        except Exception:  # noqa: BLE001
            log.exception("DMARC evaluation failed for %s", domains[0])
            return DmarcResult("permerror", None, domains[0])
        return DmarcResult(result, policy, domains[0])


# -- pyspf DNS routing ------------------------------------------------------
#
# pyspf looks names up through the module-level function spf.DNSLookup and has
# no per-query hook. We replace it once with a dispatcher that uses the lookup
# bound to the current thread/context by Authenticator._run_spf, and pyspf's own
# function otherwise: no state is shared between Authenticators or threads, and
# other users of pyspf in the process are unaffected.

_SPF_LOOKUP: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "mtasidecar_spf_lookup", default=None)


def _install_spf_dns() -> None:
    if getattr(spf.DNSLookup, "_mtasidecar", False):
        return
    fallback = spf.DNSLookup

    def lookup(name, qtype, strict=True, timeout=30):
        ours = _SPF_LOOKUP.get()
        if ours is None:
            return fallback(name, qtype, strict, timeout)
        return ours(name, qtype)

    lookup._mtasidecar = True
    spf.DNSLookup = lookup


_install_spf_dns()


# -- message helpers ----------------------------------------------------------

def _parse_message(raw: bytes) -> tuple[dkim.DKIM | None, list[tuple[bytes, bytes]]]:
    """(dkimpy verifier or None, [(lower-case name, value)]).

    The verifier is built only for signed messages. dkimpy refuses a header
    block with a malformed line: the message is then still checked as far as
    the lenient parse allows (its signatures are reported "neutral").
    """
    fields = _lenient_fields(raw)
    if not any(name == b"dkim-signature" for name, _ in fields):
        return None, fields
    try:
        signer = _dkim_verifier(raw)
    except Exception:  # noqa: BLE001 - MessageFormatError and anything odder
        return None, fields
    # dkimpy's view decides which signature is index 0, 1, ... for verify.
    return signer, [(name.lower(), value) for name, value in signer.headers]


def _dkim_verifier(raw: bytes) -> dkim.DKIM:
    """dkim.DKIM(raw), but ~0.12 ms faster on a 10 KB message.

    dkimpy's rfc822_parse splits the whole message into lines in Python to turn
    the body's line ends into CRLF; we give it only the header block and convert
    the body with bytes.replace. The result is the same `headers` / `body` pair
    (tests/unit/test_auth.py compares them with dkimpy's own on odd inputs).
    """
    head, body = _split_head(raw)
    signer = dkim.DKIM()
    signer.headers, _ = dkim.rfc822_parse(head)
    signer.body = _crlf(body)
    return signer


def _crlf(body: bytes) -> bytes:
    """Every LF or CRLF as CRLF, like dkimpy's parse (str.replace: ~5x faster
    than re.sub with hundreds of matches)."""
    if body.count(b"\n") == body.count(b"\r\n"):
        return body  # already CRLF throughout (SMTP's own line end)
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _split_head(raw: bytes) -> tuple[bytes, bytes]:
    """(header block without its last line end, body): split at the first empty line."""
    if raw.startswith((b"\n", b"\r\n")):
        return b"", raw.split(b"\n", 1)[1]
    end = _HEADER_END.search(raw)
    return (raw[:end.start()], raw[end.end():]) if end else (raw, b"")


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def _lenient_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    fields: list[list[bytes]] = []
    for line in _LINE_END.split(_split_head(raw)[0]):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += b"\r\n" + line
            continue
        name, sep, value = line.partition(b":")
        if sep and _FIELD_NAME.fullmatch(name):
            fields.append([name.lower(), value])
    return [(name, value) for name, value in fields]


def _from_domains(fields) -> list[str]:
    """Distinct domains of the addresses in the From header field(s)."""
    values = [value.decode("utf-8", "replace") for name, value in fields if name == b"from"]
    domains: list[str] = []
    for _display, address in getaddresses(values):
        local, at, domain = address.rpartition("@")
        domain = _clean_domain(domain) if at and local else None
        if domain and domain not in domains:
            domains.append(domain)
    return domains


_DOMAIN = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_-]{1,63})*")


def _clean_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")  # internationalised From domains
    except UnicodeError:
        return None
    return domain if len(domain) <= 253 and _DOMAIN.fullmatch(domain) else None


def _usable_key(name: bytes, records: list[bytes]) -> bytes | None:
    """The first TXT record at the key name that dkimpy can use as a key."""
    for record in records:
        if _key_parses(record):
            return record
    return None


@functools.lru_cache(maxsize=1024)
def _key_parses(record: bytes) -> bool:
    # Cached: parsing an RSA key is ~50 µs and the same few keys sign most mail.
    try:
        dkim.evaluate_pk(b"key", record)
    except Exception:  # noqa: BLE001 - KeyFormatError, binascii.Error, ...
        return False
    return True


def _signature_result(sig: dict, result: str) -> DkimResult:
    return DkimResult(
        domain=sig[b"d"].decode("ascii", "replace").lower(),
        selector=sig[b"s"].decode("ascii", "replace"),
        algorithm=sig[b"a"].decode("ascii", "replace"),
        result=result,
    )


def _unverified(value: bytes, result: str) -> DkimResult:
    """A result for a signature dkimpy could not take apart: best-effort tags."""
    tags = _loose_tags(value)
    domain = tags.get("d")
    return DkimResult(domain.lower() if domain else None, tags.get("s"), tags.get("a"), result)


def _loose_tags(value: bytes) -> dict[str, str]:
    """tag=value pairs of a DKIM-Signature, without dkimpy's validation."""
    tags: dict[str, str] = {}
    for part in value.decode("ascii", "replace").split(";"):
        name, sep, val = part.partition("=")
        if sep:
            tags.setdefault(name.strip(), _SPACE.sub("", val))
    return tags


_SPACE = re.compile(r"\s+")


def _txt_names_needed(fields, from_domains: list[str]) -> list[str]:
    """TXT names the DKIM and DMARC checks will (likely) ask for: the signatures'
    keys and the From domain's DMARC record, plus its organisational domain's
    (needed when the From domain has none)."""
    names = []
    signatures = [value for name, value in fields if name == b"dkim-signature"]
    for value in signatures[:MAX_SIGNATURES]:
        tags = _loose_tags(value)
        if tags.get("d") and tags.get("s"):
            names.append(f"{tags['s']}._domainkey.{tags['d']}")
    if len(from_domains) == 1:
        names.append("_dmarc." + from_domains[0])
        org = dmarc.org_domain(from_domains[0])
        if org != from_domains[0]:
            names.append("_dmarc." + org)
    return names


def _parse_ip(value: str | None) -> str | None:
    """The address in canonical form; None when absent or invalid (pyspf would
    otherwise accept magic words like "list")."""
    try:
        return str(ipaddress.ip_address(_clean(value)))
    except ValueError:
        return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str | None) -> str:
    """Envelope values come from the SMTP client: drop control characters so
    none can reach a header we write, and lone surrogates (undecodable bytes
    from argv) so the header can be encoded."""
    value = (value or "").encode("utf-8", "replace").decode("utf-8")
    return _CONTROL.sub("", value).strip()


# -- Authentication-Results (RFC 8601) ----------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")  # RFC 2045 token
_DOT_ATOM = re.compile(r"[!#$%&'*+\-/=?^_`{|}~.0-9A-Za-z]+")
_DOMAIN_NAME = re.compile(r"[0-9A-Za-z._-]+")


def _quoted(value: str) -> str:
    return '"' + _clean(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(value: str) -> str:
    value = _clean(value)
    return value if _TOKEN.fullmatch(value) else _quoted(value)


def _address(value: str) -> str:
    local, at, domain = _clean(value).rpartition("@")
    if at and _DOT_ATOM.fullmatch(local) and _DOMAIN_NAME.fullmatch(domain):
        return f"{local}@{domain}"
    return _value(value)


def _authentication_results(hostname: str, sender: str | None, spf_result: SpfResult,
                            dkim_results, dmarc_result: DmarcResult) -> str:
    parts = [_value(hostname), _spf_resinfo(sender, spf_result)]
    parts += [_dkim_resinfo(d) for d in dkim_results] or ["dkim=none"]
    parts.append(_dmarc_resinfo(dmarc_result))
    return "; ".join(parts)


def _spf_resinfo(sender: str | None, result: SpfResult) -> str:
    sender = _clean(sender).strip("<>")
    if sender:
        return f"spf={result.result} smtp.mailfrom={_address(sender)}"
    if result.helo:
        return f"spf={result.result} smtp.helo={_value(result.helo)}"
    return f"spf={result.result}"


def _dkim_resinfo(result: DkimResult) -> str:
    text = f"dkim={result.result}"
    for ptype, value in (("header.d", result.domain), ("header.s", result.selector),
                         ("header.a", result.algorithm)):
        if value:
            text += f" {ptype}={_value(value)}"
    return text


def _dmarc_resinfo(result: DmarcResult) -> str:
    text = f"dmarc={result.result}"
    if result.policy:
        text += f" (p={result.policy})"
    if result.from_domain:
        text += f" header.from={_value(result.from_domain)}"
    return text
