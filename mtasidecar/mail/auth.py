"""Sender authentication of one received message: SPF, DKIM, DMARC, and ARC.

Pure library code: bytes and envelope in, an `AuthResult` out. The verdict comes
only from our own checks; Authentication-Results and Received-SPF header fields
already in the message are never read, and ARC-* fields only as what ARC
verifies: their signatures (the results they claim are not taken over).

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

Speed with a warm cache (bench/auth_profile.py): a message is first checked in
the calling thread from cached answers only; only when an answer is missing is
it checked again, with DNS and the time budget (in a pool thread for
`check_many`). What is derived from DNS answers is cached too: parsed DKIM keys
and DMARC records (keyed on the record's bytes, so a changed record is a new
entry) and SPF results (bounded by the shortest remaining TTL of the answers
used; temperror never cached). RSA signatures are checked by OpenSSL
(`cryptography`) instead of dkimpy's pure-Python arithmetic, and a few of
dkimpy's helpers (canonicalization, tag parsing) are replaced by faster ones
with the same output.
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
import dkim.canonicalization
import dkim.util
import spf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from . import dmarc
from .dnscache import CachingResolver, DnsTempError

__all__ = ["Authenticator", "ArcResult", "AuthResult", "CheckItem", "DkimResult", "DmarcResult", "SpfResult"]

log = logging.getLogger(__name__)

# More signatures than this are reported as "neutral" without being verified:
# each costs a DNS look-up and a public-key operation, and a sender has no
# legitimate need for dozens (RFC 6376 6.1 lets verifiers limit them).
MAX_SIGNATURES = 10
# SPF results kept per Authenticator (each also bounded by its answers' TTLs).
SPF_CACHE_ENTRIES = 10_000
# A chain with more ARC sets than this fails unverified: RFC 8617 4.2.1 allows
# i=1..50, and each set costs two look-ups and two public-key operations.
MAX_ARC_SETS = 50
# Longer values are never kept by the per-process caches of pure functions
# below: senders choose them, and 4096 entries of 64 KB would be 256 MB.
MAX_CACHED_VALUE = 2048


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
class ArcResult:
    result: str  # none pass fail temperror (RFC 8617 5.2, plus our DNS trouble)
    sets: int  # ARC sets in the message (the highest i=)
    domain: str | None  # d= of the newest ARC-Seal: who sealed it for us
    reason: str | None  # why not pass, in dkimpy's words (None for pass and none)


NO_ARC = ArcResult("none", 0, None, None)


@dataclasses.dataclass(frozen=True)
class AuthResult:
    spf: SpfResult
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    authentication_results: str  # RFC 8601 header field value, authserv-id first
    arc: ArcResult = NO_ARC

    def to_dict(self) -> dict:
        # Spelled out: dataclasses.asdict deep-copies field by field, ~10x slower.
        spf_, dmarc_ = self.spf, self.dmarc
        return {
            "spf": {"result": spf_.result, "domain": spf_.domain, "ip": spf_.ip, "helo": spf_.helo},
            "dkim": [{"domain": d.domain, "selector": d.selector, "algorithm": d.algorithm,
                      "result": d.result} for d in self.dkim],
            "dmarc": {"result": dmarc_.result, "policy": dmarc_.policy,
                      "from_domain": dmarc_.from_domain},
            "arc": {"result": self.arc.result, "sets": self.arc.sets, "domain": self.arc.domain,
                    "reason": self.arc.reason},
            "authentication_results": self.authentication_results,
        }


class CheckItem(NamedTuple):
    raw: bytes
    sender: str | None = None
    client_ip: str | None = None
    helo: str | None = None


class _Message(NamedTuple):
    """What the checks need of the message, taken apart once."""
    signer: dkim.DKIM | None
    fields: list[tuple[bytes, bytes]]
    from_domains: list[str]
    arc: dkim.ARC | None  # only for a message with an ARC-Seal field


class _CacheMiss(BaseException):
    """The cache-only attempt needs an answer that is not cached.

    A BaseException so that the `except Exception` handlers on the way (ours,
    dmarc's, pyspf's) cannot turn it into a verdict; it only ever travels from
    `_Dns` to the caller that chose the cache-only attempt."""


class _Dns:
    """One check's access to the resolver.

    deadline: the time.monotonic() at which look-ups give up (→ temperror);
    None: answers from the cache only, and a missing one raises _CacheMiss.
    """

    __slots__ = ("resolver", "deadline")

    def __init__(self, resolver: CachingResolver, deadline: float | None):
        self.resolver = resolver
        self.deadline = deadline

    def lookup(self, name: str | bytes, rdtype: str) -> tuple[tuple, float]:
        """(records, expiry); raises DnsTempError or _CacheMiss."""
        if self.deadline is None:
            hit = self.resolver.peek(name, rdtype)
            if hit is None:
                raise _CacheMiss
            return hit
        return self.resolver.lookup_expiring(name, rdtype, self.deadline)

    def txt(self, name: str | bytes) -> list[bytes]:
        return [b"".join(strings) for strings in self.lookup(name, "TXT")[0]]


class _SpfTrace:
    """What an SPF evaluation read: may its result be cached, until when?"""

    __slots__ = ("expires", "macros")

    def __init__(self, expires: float):
        self.expires = expires
        self.macros = False


class _ExpiringCache:
    """key → (expiry, value), bounded; thread-safe."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._data: dict = {}
        self._lock = threading.Lock()

    def get(self, key):
        entry = self._data.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, key, value, expires: float) -> None:
        with self._lock:
            if len(self._data) >= self.max_entries:
                now = time.monotonic()
                for old in [k for k, (exp, _v) in self._data.items() if exp <= now]:
                    del self._data[old]
                # Still full: drop the oldest quarter (insertion order).
                for old in list(self._data)[:len(self._data) - self.max_entries * 3 // 4]:
                    del self._data[old]
            self._data[key] = (expires, value)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


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
        self._spf_results = _ExpiringCache(SPF_CACHE_ENTRIES)

    # -- public API --------------------------------------------------------

    def check(self, raw: bytes, sender: str | None = None, client_ip: str | None = None,
              helo: str | None = None) -> AuthResult:
        """Authenticate one message. Never raises; DNS trouble gives temperror."""
        try:
            msg = _prepare(raw)
            try:
                return self._evaluate(msg, sender, client_ip, helo, _Dns(self.dns, None))
            except _CacheMiss:
                return self._check_with_dns(msg, sender, client_ip, helo)
        except Exception:  # noqa: BLE001 - a bug here must not cost the ingester the message
            return self._failed(sender, client_ip, helo)

    def _check_with_dns(self, msg: _Message, sender, client_ip, helo) -> AuthResult:
        dns = _Dns(self.dns, time.monotonic() + self.budget)
        self._prefetch(_txt_names_needed(msg.fields, msg.from_domains), dns.deadline)
        return self._evaluate(msg, sender, client_ip, helo, dns)

    def _check_with_dns_guarded(self, msg: _Message, sender, client_ip, helo) -> AuthResult:
        try:
            return self._check_with_dns(msg, sender, client_ip, helo)
        except Exception:  # noqa: BLE001 - as in check()
            return self._failed(sender, client_ip, helo)

    def _failed(self, sender, client_ip, helo) -> AuthResult:
        log.exception("authentication checks failed")
        spf_result = SpfResult("permerror", None, _parse_ip(client_ip), _clean(helo) or None)
        dmarc_result = DmarcResult("permerror", None, None)
        return AuthResult(spf_result, (), dmarc_result, _authentication_results(
            self.hostname, sender, spf_result, (), dmarc_result))

    def _evaluate(self, msg: _Message, sender, client_ip, helo, dns: _Dns) -> AuthResult:
        spf_result = self._check_spf(sender, client_ip, helo, dns)
        dkim_results = self._check_dkim(msg.signer, msg.fields, dns)
        dmarc_result = self._check_dmarc(msg.from_domains, spf_result, dkim_results, dns)
        arc_result = self._check_arc(msg.arc, dns) if msg.arc is not None else NO_ARC
        header = _authentication_results(self.hostname, sender, spf_result, dkim_results,
                                         dmarc_result, arc_result)
        return AuthResult(spf_result, dkim_results, dmarc_result, header, arc_result)

    def check_spf(self, sender: str | None, client_ip: str | None, helo: str | None,
                  budget: float | None = None) -> SpfResult:
        """SPF alone, as the policy service asks at RCPT time; never raises.

        The same evaluation as in `check` (pyspf through our cached resolver),
        bounded by ``budget`` seconds (default: this Authenticator's budget).
        """
        dns = _Dns(self.dns, time.monotonic() + (self.budget if budget is None else budget))
        try:
            return self._check_spf(sender, client_ip, helo, dns)
        except Exception:  # noqa: BLE001 - a bug here must not refuse mail
            log.exception("SPF check failed for %s from %s", sender or helo, client_ip)
            return SpfResult("temperror", None, _parse_ip(client_ip), _clean(helo) or None)

    def check_many(self, items: Iterable[CheckItem | tuple]) -> list[AuthResult]:
        """`check` each (raw, sender, client_ip, helo); results in order.

        Messages whose answers are all cached are checked in this thread; the
        others go to a thread pool at once, so their DNS waits overlap with
        each other and with the rest of the batch.
        """
        items = [CheckItem(*item) for item in items]
        if len(items) <= 1:
            return [self.check(*item) for item in items]
        results: list = [None] * len(items)
        waiting = []
        for i, (raw, sender, client_ip, helo) in enumerate(items):
            try:
                msg = _prepare(raw)
                try:
                    results[i] = self._evaluate(msg, sender, client_ip, helo, _Dns(self.dns, None))
                except _CacheMiss:
                    waiting.append((i, self._pool("check").submit(
                        self._check_with_dns_guarded, msg, sender, client_ip, helo)))
            except Exception:  # noqa: BLE001 - as in check()
                results[i] = self._failed(sender, client_ip, helo)
        for i, future in waiting:
            results[i] = future.result()
        return results

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

    def _check_spf(self, sender, client_ip, helo, dns: _Dns) -> SpfResult:
        sender = _clean(sender).strip("<>")
        helo = _clean(helo) or None
        ip = _parse_ip(client_ip)
        # With a null sender the HELO identity is checked (RFC 7208 2.4).
        domain = (sender.rpartition("@")[2] if sender else helo or "").lower().rstrip(".")
        shown_ip = ip or (_clean(client_ip) or None)
        if ip is None or not domain:
            return SpfResult("none", domain or None, shown_ip, helo)
        result = self._run_spf(ip, sender, helo or "", dns)
        return SpfResult(result, domain, shown_ip, helo)

    def _run_spf(self, ip: str, sender: str, helo: str, dns: _Dns) -> str:
        # Without macros (RFC 7208 7) an SPF result depends only on the client
        # address, the domain pyspf checks, and DNS: cached on those, until the
        # first answer it used expires. Records with macros are not cached.
        key = (ip, spf.split_email(sender, helo)[1])
        cached = self._spf_results.get(key)
        if cached is not None:
            return cached
        if dns.deadline is not None and time.monotonic() >= dns.deadline:
            return "temperror"
        trace = _SpfTrace(time.monotonic() + self.dns.max_ttl)
        token = _SPF_LOOKUP.set(functools.partial(self._spf_records, dns=dns, trace=trace))
        try:
            # pyspf's own timeouts are moot: every look-up is bounded by our deadline.
            result, _code, _explanation = spf.query(i=ip, s=sender, h=helo).check()
        except Exception:  # noqa: BLE001 - a pyspf bug must not lose the message
            log.exception("SPF check failed for %s from %s", sender or helo, ip)
            return "permerror"
        finally:
            _SPF_LOOKUP.reset(token)
        # Never temperror: a DNS hiccup must not outlive itself.
        if result != "temperror" and not trace.macros:
            self._spf_results.put(key, result, trace.expires)
        return result

    def _spf_records(self, name: str, qtype: str, dns: _Dns, trace: _SpfTrace) -> list:
        """pyspf's DNSLookup contract: [((name, qtype), value), ...], TempError on failure."""
        try:
            values, expires = dns.lookup(name, qtype)
        except DnsTempError as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        trace.expires = min(trace.expires, expires)
        if qtype.upper() in ("TXT", "SPF") and any(b"%" in string for value in values
                                                   for string in value):
            trace.macros = True
        return [((name, qtype), value) for value in values]

    # -- DKIM --------------------------------------------------------------

    def _check_dkim(self, signer, fields, dns: _Dns) -> tuple[DkimResult, ...]:
        signatures = [value for name, value in fields if name == b"dkim-signature"]
        results = []
        for idx, value in enumerate(signatures):
            if signer is None or idx >= MAX_SIGNATURES:
                # dkimpy could not parse the header block, or one signature too many
                results.append(_unverified(value, "neutral"))
            else:
                results.append(self._verify_signature(signer, idx, value, dns))
        return tuple(results)

    def _verify_signature(self, signer: _Verifier, idx: int, value: bytes,
                          dns: _Dns) -> DkimResult:
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
            key = _usable_key(dns.txt(name))
        except DnsTempError:
            return found("temperror")
        if key is None:
            return found("permerror")
        try:
            # We hold the key already (dkimpy's own look-up would swallow DNS
            # errors into False): False means a real mismatch.
            ok = signer.verify_with_key(sig, include_headers, sig_headers[idx], key)
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
                     dns: _Dns) -> DmarcResult:
        if not domains:
            return DmarcResult("none", None, None)
        if len(domains) > 1:
            # Several From domains: whose policy would apply is undefined
            # (RFC 7489 6.6.1); never let that look authenticated.
            return DmarcResult("permerror", None, domains[0])
        try:
            result, policy = dmarc.evaluate(
                domains[0], dns.txt,
                spf_result.result, spf_result.domain,
                [(d.domain, d.result) for d in dkim_results])
        except Exception:  # noqa: BLE001
            log.exception("DMARC evaluation failed for %s", domains[0])
            return DmarcResult("permerror", None, domains[0])
        return DmarcResult(result, policy, domains[0])

    # -- ARC ---------------------------------------------------------------

    def _check_arc(self, arc: _ArcVerifier, dns: _Dns) -> ArcResult:
        """RFC 8617 chain validation (dkimpy's), keys through our resolver.

        Reported, not acted on: a pass says that the intermediaries who sealed
        the message vouch for what they recorded, and neither `authenticated`
        nor quarantine takes their recorded results over.
        """
        if arc.unparsable:
            return ArcResult("fail", 0, None, "the header block cannot be parsed")
        try:
            sets, headers = arc.sorted_arc_headers()
        except Exception:  # noqa: BLE001 - dkimpy's header parse on odd input
            return ArcResult("fail", 0, None, "ARC header fields cannot be parsed")
        sealer = next((_loose_tags(value).get("d") for i, (name, value) in headers
                       if i == sets and name.lower() == b"arc-seal"), None)
        sealer = sealer.lower() if sealer else None
        if sets > MAX_ARC_SETS:
            return ArcResult("fail", sets, sealer, f"more than {MAX_ARC_SETS} ARC sets")
        try:
            cv, _sets, reason = arc.verify(dnsfunc=dns)
        except DnsTempError as exc:
            return ArcResult("temperror", sets, sealer, f"DNS: {exc}")
        except Exception as exc:  # noqa: BLE001 - dkimpy raises more than DKIMException on odd input
            log.debug("ARC verification error", exc_info=True)
            return ArcResult("fail", sets, sealer, f"cannot be verified ({type(exc).__name__})")
        if cv == dkim.CV_Pass:
            return ArcResult("pass", sets, sealer, None)
        if cv == dkim.CV_None:  # ARC-Seal fields without a usable i=
            return NO_ARC
        # CV_Fail, or None: an earlier sealer recorded cv=fail, the chain ended there
        return ArcResult("fail", sets, sealer, str(reason))


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


# -- RSA through OpenSSL ----------------------------------------------------------
#
# dkimpy verifies RSA signatures in pure Python (~0.3 ms for a 2048-bit key,
# most of it byte/integer conversion) and has no hook for another backend. Its
# verify_sig_process calls the module-level dkim.RSASSA_PKCS1_v1_5_verify; we
# replace that once with a dispatcher that sends keys we parsed (_OpenSslRsaKey,
# only ever built by _parsed_key) to OpenSSL and everything else to dkimpy's own
# function, so other users of dkimpy in the process are unaffected.

class _OpenSslRsaKey(dict):
    """dkimpy's RSA public key ({'modulus', 'publicExponent'}), also loaded into OpenSSL."""

    __slots__ = ("openssl", "size")


def _with_openssl(pk: dict) -> dict:
    # Below dkimpy's minimum key size its own path stays in charge (and it
    # reports such keys as errors, as before).
    if pk["modulus"].bit_length() < 1024:
        return pk
    try:
        openssl = rsa_keys.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
    except Exception:  # noqa: BLE001 - a key OpenSSL refuses: dkimpy's own arithmetic decides
        return pk
    key = _OpenSslRsaKey(pk)
    key.openssl = openssl
    key.size = (pk["modulus"].bit_length() + 7) // 8
    return key


_PREHASHED = {"sha256": Prehashed(hashes.SHA256()), "sha1": Prehashed(hashes.SHA1())}


def _install_openssl_rsa() -> None:
    if getattr(dkim.RSASSA_PKCS1_v1_5_verify, "_mtasidecar", False):
        return
    dkimpy_verify = dkim.RSASSA_PKCS1_v1_5_verify

    def verify(hash, signature, public_key):  # noqa: A002 - dkimpy's parameter names
        algorithm = _PREHASHED.get(hash.name.lower())
        if not isinstance(public_key, _OpenSslRsaKey) or algorithm is None:
            return dkimpy_verify(hash, signature, public_key)
        # dkimpy reads the signature as a number of any length; OpenSSL wants
        # exactly the modulus' length and a number below it. Pad a short one;
        # one not below the modulus is left to dkimpy (same verdict as ever).
        value = int.from_bytes(signature, "big")
        if value >= public_key["modulus"]:
            return dkimpy_verify(hash, signature, public_key)
        if len(signature) != public_key.size:
            signature = value.to_bytes(public_key.size, "big")
        try:
            public_key.openssl.verify(signature, hash.digest(), padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            return False
        return True

    verify._mtasidecar = True
    dkim.RSASSA_PKCS1_v1_5_verify = verify


_install_openssl_rsa()


# -- dkimpy's canonicalization and tag parsing, with compiled patterns -----------
#
# After RSA, the dearest part of a DKIM check is dkimpy's canonicalization:
# strip_trailing_whitespace, compress_whitespace and unfold_header_value call the
# module-level re.sub (a compile-cache look-up per call, ~20 calls a message) and
# relaxed body canonicalization runs two regexes over the whole body even when
# neither can match. Relaxed/Simple look these functions up as module globals at
# call time, so we replace them once with versions that give byte-for-byte the
# same output: compiled patterns, and a substring test that skips a regex that
# cannot match. Likewise dkim.parse_tag_value (an re.match per tag) and
# dkim.select_headers (lower-cases the same names again for every h= entry).
# Signing and ARC use the same functions: identical output keeps them correct.
# tests/unit/test_dkim_canon.py compares each with dkimpy's own (kept in _DKIMPY).

# dkimpy's re.sub(b"[\t ]+", b" ") turns every run of spaces and tabs into one
# space; a lone space stays as it is, so only the other runs need matching (a
# quarter of the time on prose, where nearly every run is a lone space).
_WSP_RUN = re.compile(b" [\t ]+|\t[\t ]*")


def _strip_trailing_whitespace(content: bytes) -> bytes:
    # dkimpy's re.sub(b"[\t ]+\r\n", b"\r\n") changes only a space or tab
    # right before a CRLF. When there is one, splitting at the CRLFs and
    # stripping each line but the last (not followed by one) gives the same,
    # ~3x faster than the regex, which tries a match at every space.
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    lines = content.split(b"\r\n")
    last = lines.pop()
    lines = [line.rstrip(b" \t") for line in lines]
    lines.append(last)
    return b"\r\n".join(lines)


def _compress_whitespace(content: bytes) -> bytes:
    # Changes nothing unless there is a tab or two spaces in a row.
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP_RUN.sub(b" ", content)


def _unfold_header_value(content: bytes) -> bytes:
    # re.sub(b"\r?\n", b"") drops every LF and each CR right before one; so do
    # these replaces ("\r\n" occurrences cannot overlap, and the first pass
    # makes no new LF).
    if b"\n" not in content:
        return content
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


def _parse_tag_value(tag_list: bytes) -> dict:
    """dkim.util.parse_tag_value: same tags, same exceptions."""
    tags = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:
        tag_specs.pop()  # trailing semicolons are valid
    for tag_spec in tag_specs:
        key, eq, value = tag_spec.partition(b"=")
        if not eq:  # dkimpy: split(b"=", 1) gives one part, unpacking it fails
            raise dkim.util.InvalidTagSpec(tag_spec)
        key = key.strip()
        # re.match(br'^[a-zA-Z](\w)*', key): only the first byte matters, and
        # bytes.isalpha() is ASCII letters only.
        if not key[:1].isalpha():
            raise dkim.util.InvalidTagSpec(tag_spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value.strip()
    return tags


def _select_headers(headers, include_headers):
    """dkim.select_headers, lower-casing each header name once."""
    names = [field[0].lower() for field in headers]
    sign_headers = []
    lastindex = {}
    for h in include_headers:
        assert h == h.lower()
        i = lastindex.get(h, len(headers))
        while i > 0:
            i -= 1
            if h == names[i]:
                sign_headers.append(headers[i])
                break
        lastindex[h] = i
    return sign_headers


# dkimpy's RE_BTAG (empties b= of the signature field before hashing it) spells
# folding white space as (?:(?:\s*\r?\n)?\s+)?, which matches exactly the runs
# of \s* but makes the regex try several ways per base64 character: ~25 µs a
# signature. Every iteration of the starred group ends at a base64 character and
# nothing after it can fail, so this pattern matches the same spans with the
# same group 1 (the test fuzzes both), in ~3 µs.
_RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=]+)*(?:\r?\n\Z)?")

_DKIM_PATCHES = (
    (dkim.canonicalization, "strip_trailing_whitespace", _strip_trailing_whitespace),
    (dkim.canonicalization, "compress_whitespace", _compress_whitespace),
    (dkim.canonicalization, "unfold_header_value", _unfold_header_value),
    (dkim, "parse_tag_value", _parse_tag_value),
    (dkim, "select_headers", _select_headers),
    (dkim, "RE_BTAG", _RE_BTAG),
)
_DKIMPY: dict[str, object] = {}  # dkimpy's originals by name, for the tests


def _install_fast_dkim_helpers() -> None:
    for module, name, ours in _DKIM_PATCHES:
        current = getattr(module, name)
        if current is not ours:  # not installed yet
            _DKIMPY.setdefault(name, current)
            setattr(module, name, ours)


_install_fast_dkim_helpers()


# -- message helpers ----------------------------------------------------------

def _prepare(raw: bytes | str) -> _Message:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    signer, fields, arc = _parse_message(raw)
    return _Message(signer, fields, _from_domains(fields), arc)


def _parse_message(raw: bytes) -> tuple[_Verifier | None, list[tuple[bytes, bytes]], _ArcVerifier | None]:
    """(dkimpy verifier or None, [(lower-case name, value)], ARC verifier or None).

    The verifiers are built only for signed (sealed) messages. dkimpy refuses
    a header block with a malformed line: the message is then still checked as
    far as the lenient parse allows (its signatures are reported "neutral",
    its ARC chain "fail").
    """
    head, body = _split_head(raw)
    signer, fields = _dkim_parse(head, body)
    if not _ARC_FIELD.search(head):
        return signer, fields, None
    arc = _ArcVerifier(logger=_DKIMPY_LOG)
    if signer is not None:
        arc.headers, arc.body = list(signer.headers), signer.body
    else:
        try:
            arc.headers, arc.body = _rfc822_headers(head), _crlf(body)
        except Exception:  # noqa: BLE001 - as for DKIM: a header block dkimpy refuses
            arc.unparsable = True
    return signer, fields, arc


def _dkim_parse(head: bytes, body: bytes) -> tuple[_Verifier | None, list[tuple[bytes, bytes]]]:
    # Same test as "a lenient field is named dkim-signature", without the parse.
    if not _DKIM_FIELD.search(head):
        return None, _lenient_fields(head)
    try:
        signer = _verifier(head, body)
    except Exception:  # noqa: BLE001 - MessageFormatError and anything odder
        return None, _lenient_fields(head)
    # dkimpy's view decides which signature is index 0, 1, ... for verify.
    return signer, [(name.lower(), value) for name, value in signer.headers]


_DKIM_FIELD = re.compile(rb"^dkim-signature:", re.IGNORECASE | re.MULTILINE)
_ARC_FIELD = re.compile(rb"^arc-seal:", re.IGNORECASE | re.MULTILINE)


class _Verifier(dkim.DKIM):
    """dkim.DKIM that verifies with a key we looked up and parsed (cached)."""

    def verify_with_key(self, sig: dict, include_headers: list, sig_header: tuple,
                        key: tuple) -> bool:
        """dkimpy's verify_sig after its key look-up: key is evaluate_pk's tuple."""
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = key
        # dkimpy canonicalises every header field, the dearest part of a check,
        # then hashes only those named in h= (select_headers). Giving it those
        # alone (any whose canonical name could match, in order) hashes the same.
        everything = self.headers
        wanted = set(include_headers)
        self.headers = [field for field in everything if field[0].lower().rstrip() in wanted]
        try:
            return self.verify_sig_process(sig, include_headers, sig_header, None)
        finally:
            self.headers = everything


class _ArcVerifier(dkim.ARC):
    """dkim.ARC whose key look-ups go through our resolver and parsed-key cache.

    dkimpy's own look-up would turn DNS trouble into a failed seal; ours raises
    DnsTempError (→ temperror), and RSA goes to OpenSSL as for DKIM.
    """

    unparsable = False

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):
        # dnsfunc: the _Dns that _check_arc handed to verify()
        key = _usable_key(dnsfunc.txt(sig[b"s"] + b"._domainkey." + sig[b"d"]))
        if key is None:
            return False  # no usable key: the signature does not verify (dkimpy's answer too)
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = key
        return self.verify_sig_process(sig, include_headers, sig_header, None)


class _DkimpyLog:
    """dkimpy's logger for ARC: it logs a seal that does not verify as an error,
    which for us is a verdict, not a fault (and errors fill the ingest log)."""

    def debug(self, msg, *args, **_kwargs):
        log.debug("dkimpy: " + str(msg), *args)  # without args, logging leaves a "%" alone

    info = warning = error = debug


_DKIMPY_LOG = _DkimpyLog()


def _dkim_verifier(raw: bytes) -> _Verifier:
    return _verifier(*_split_head(raw))


def _verifier(head: bytes, body: bytes) -> _Verifier:
    """dkim.DKIM(raw), but ~0.12 ms faster on a 10 KB message.

    dkimpy's rfc822_parse splits the whole message into lines in Python to turn
    the body's line ends into CRLF; we give it only the header block and convert
    the body with bytes.replace. The result is the same `headers` / `body` pair
    (tests/unit/test_auth.py compares them with dkimpy's own on odd inputs).
    """
    signer = _Verifier()
    signer.headers = _rfc822_headers(head)
    signer.body = _crlf(body)
    return signer


def _rfc822_headers(head: bytes) -> list[list[bytes]]:
    """dkim.rfc822_parse(head)[0], line for line the same logic, with compiled
    regexes (dkimpy's goes through re's compile cache on every line).
    tests/unit/test_auth_caches.py checks it against dkimpy's on odd inputs."""
    headers: list[list[bytes]] = []
    for line in _LINE_END.split(head):
        if not line:
            break  # end of the header block
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"  # IndexError on a leading continuation, as in dkimpy
            continue
        m = _RFC822_NAME.match(line)
        if m is not None:
            headers.append([m.group(1), line[m.end(0):] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError("Unexpected characters in RFC822 header: %s" % line)
    return headers


_RFC822_NAME = re.compile(rb"([\x21-\x7e]+?):")  # dkimpy's rfc822_parse


def _crlf(body: bytes) -> bytes:
    """Every LF or CRLF as CRLF, like dkimpy's parse (str.replace: ~5x faster
    than re.sub with hundreds of matches)."""
    if b"\r" not in body:
        return body.replace(b"\n", b"\r\n")  # LF throughout, as Postfix writes Maildir files
    if body.count(b"\n") == body.count(b"\r\n"):
        return body  # already CRLF throughout (SMTP's own line end)
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _split_head(raw: bytes) -> tuple[bytes, bytes]:
    """(header block without its last line end, body): split at the first empty line,
    i.e. the first match of \\r?\\n\\r?\\n (found with bytes.find: that regex
    takes ~20 µs to cross a typical header block)."""
    if raw.startswith((b"\n", b"\r\n")):
        return b"", raw.split(b"\n", 1)[1]
    # The first LF followed by [CR]LF; a CR before it belongs to the match.
    at = raw.find(b"\n\n")
    crlf = raw.find(b"\n\r\n", 0, None if at < 0 else at + 2)
    if crlf >= 0:
        at = crlf
    if at < 0:
        return raw, b""
    start = at - 1 if at and raw[at - 1] == 0x0D else at
    return raw[:start], raw[at + (2 if raw[at + 1] == 0x0A else 3):]


_LINE_END = re.compile(rb"\r?\n")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def _lenient_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """[(lower-case name, value)] of a header block, skipping malformed lines."""
    fields: list[list[bytes]] = []
    for line in _LINE_END.split(head):
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
    values = tuple(value for name, value in fields if name == b"from")
    if sum(map(len, values)) > MAX_CACHED_VALUE:
        return list(_from_domains_of.__wrapped__(values))
    return list(_from_domains_of(values))


@functools.lru_cache(maxsize=4096)
def _from_domains_of(raw_values: tuple[bytes, ...]) -> tuple[str, ...]:
    # Cached: a pure function of the field values, and senders repeat them.
    values = [value.decode("utf-8", "replace") for value in raw_values]
    domains: list[str] = []
    for _display, address in getaddresses(values):
        local, at, domain = address.rpartition("@")
        domain = _clean_domain(domain) if at and local else None
        if domain and domain not in domains:
            domains.append(domain)
    return tuple(domains)


_DOMAIN = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_-]{1,63})*")


def _clean_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")  # internationalised From domains
    except UnicodeError:
        return None
    return domain if len(domain) <= 253 and _DOMAIN.fullmatch(domain) else None


def _usable_key(records: list[bytes]) -> tuple | None:
    """dkimpy's parse (evaluate_pk) of the first TXT record at the key name
    that it can use as a key."""
    for record in records:
        if len(record) > MAX_CACHED_VALUE:
            key = _parsed_key.__wrapped__(record)
        else:
            key = _parsed_key(record)
        if key is not None:
            return key
    return None


@functools.lru_cache(maxsize=1024)
def _parsed_key(record: bytes) -> tuple | None:
    # Cached on the record's bytes: parsing an RSA key in dkimpy's pure Python
    # is ~60 µs and the same few keys sign most mail. A changed or revoked key
    # is different bytes, and the resolver cache bounds how long we see old ones.
    try:
        pk, keysize, ktag, seqtlsrpt = dkim.evaluate_pk(b"key", record)
    except Exception:  # noqa: BLE001 - KeyFormatError, binascii.Error, ...
        return None
    if ktag == b"rsa":
        pk = _with_openssl(pk)
    return pk, keysize, ktag, seqtlsrpt


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
    """TXT names the DKIM, ARC and DMARC checks will (likely) ask for: the
    signatures' and seals' keys and the From domain's DMARC record, plus its
    organisational domain's (needed when the From domain has none)."""
    names = []
    signatures = [value for name, value in fields if name == b"dkim-signature"]
    seals = [value for name, value in fields if name in (b"arc-seal", b"arc-message-signature")]
    if sum(name == b"arc-seal" for name, _value in fields) > MAX_ARC_SETS:
        seals = []  # such a chain fails unverified (_check_arc)
    for value in signatures[:MAX_SIGNATURES] + seals:
        tags = _loose_tags(value)
        if tags.get("d") and tags.get("s"):
            name = f"{tags['s']}._domainkey.{tags['d']}"
            if name not in names:
                names.append(name)
    if len(from_domains) == 1:
        names.append("_dmarc." + from_domains[0])
        org = dmarc.org_domain(from_domains[0])
        if org != from_domains[0]:
            names.append("_dmarc." + org)
    return names


def _parse_ip(value: str | None) -> str | None:
    """The address in canonical form; None when absent or invalid (pyspf would
    otherwise accept magic words like "list")."""
    if value is not None and len(value) > 64:
        return _parse_ip_uncached(value)
    return _parse_ip_cached(value)


def _parse_ip_uncached(value: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address(_clean(value)))
    except ValueError:
        return None


_parse_ip_cached = functools.lru_cache(maxsize=4096)(_parse_ip_uncached)  # client addresses repeat


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str | None) -> str:
    """Envelope values come from the SMTP client: drop control characters so
    none can reach a header we write, and lone surrogates (undecodable bytes
    from argv) so the header can be encoded."""
    if not value:
        return ""
    if value.isascii() and value.isprintable():
        return value.strip()  # the usual case, and what the lines below would give
    value = value.encode("utf-8", "replace").decode("utf-8")
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
                            dkim_results, dmarc_result: DmarcResult, arc_result: ArcResult = NO_ARC) -> str:
    parts = [_value(hostname), _spf_resinfo(sender, spf_result)]
    parts += [_dkim_resinfo(d) for d in dkim_results] or ["dkim=none"]
    parts.append(_dmarc_resinfo(dmarc_result))
    if arc_result.result != "none":  # only for sealed mail, as most receivers write it
        parts.append(f"arc={arc_result.result}" + (f" (i={arc_result.sets})" if arc_result.sets else ""))
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
