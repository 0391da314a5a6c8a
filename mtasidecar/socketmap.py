"""Postfix's socketmap protocol (socketmap_table(5)), served by `mtasidecar policy`.

Postfix reads the domains it accepts (virtual_mailbox_domains) from a static
map we write at deployment. Domains an operator adds at runtime
(POST /api/v1/admin/domains) are not in it; main.cf therefore lists this
table after the static one:

    virtual_mailbox_domains = pcre:.../mtasidecar-domains.pcre, socketmap:inet:127.0.0.1:10041:domain

(virtual_mailbox_maps cannot use it: virtual(8) refuses socketmap tables
there; mtasidecar/mta/render.py explains the rule that takes its place.)

A request is a netstring ``<len>:<name> <key>,``; the reply a netstring
``OK <value>``, ``NOTFOUND `` or ``TEMP <reason>`` (Postfix then answers the
client 451 and the sender retries: nothing is accepted for a domain we
cannot vouch for, nothing is refused for good). Connections are persistent;
requests are answered in order. The configured domains answer from the
static map first, so they keep working when this process is down.

The look-up, ``domain <host>`` (mtasidecar.policy.Policy.socketmap): OK when
the host is one of our active domains, or a subdomain of one that accepts
subdomains. Postfix also asks for parent domains as ``.parent`` keys; those
are NOTFOUND, because the full name was answered already with the subdomain
rule applied.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

log = logging.getLogger("mtasidecar.socketmap")

MAX_REQUEST = 4096  # bytes in one request; a key is at most an address (~320)


def netstring(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"%d:%s," % (len(data), data)


class TrackedProtocol(asyncio.Protocol):
    """A connection that keeps itself in its server's ``connections`` set while open
    (the server closes them all when it stops)."""

    def __init__(self, connections: set | None = None):
        self.connections = connections
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.connections is not None:
            self.connections.add(self)

    def connection_lost(self, exc) -> None:
        if self.connections is not None:
            self.connections.discard(self)


class SocketmapProtocol(TrackedProtocol):
    """One Postfix client; ``lookup(name, key) -> reply`` ("OK value", "NOTFOUND ", "TEMP why")."""

    def __init__(self, lookup: Callable[[str, str], str], connections: set | None = None):
        super().__init__(connections)
        self.lookup = lookup
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        out = []
        while buf:
            colon = buf.find(b":", 0, 8)
            if colon < 0:
                if len(buf) >= 8 or not buf.isdigit():
                    return self._abort(out, "not a netstring")
                break
            length_text = buf[:colon]
            if not length_text.isdigit() or int(length_text) > MAX_REQUEST:
                return self._abort(out, "bad or oversized netstring length")
            end = colon + 1 + int(length_text)
            if len(buf) < end + 1:
                break
            if buf[end:end + 1] != b",":
                return self._abort(out, "netstring without its comma")
            request = buf[colon + 1:end]
            buf = buf[end + 1:]
            out.append(netstring(self._answer(request)))
        self.buffer = buf
        if out:
            self.transport.write(b"".join(out))

    def _answer(self, request: bytes) -> str:
        try:
            name, sep, key = request.decode("utf-8").partition(" ")
        except UnicodeDecodeError:
            return "PERM request is not UTF-8"
        if not sep or not name or not key:
            return "PERM expected '<map name> <key>'"
        try:
            return self.lookup(name, key)
        except Exception:  # noqa: BLE001 - the database, most likely: let Postfix defer
            log.exception("socketmap look-up %s %r failed", name, key)
            return "TEMP look-up failed"

    def _abort(self, out: list[bytes], why: str) -> None:
        log.warning("closing socketmap connection: %s", why)
        if out:
            self.transport.write(b"".join(out))
        self.buffer = b""
        self.transport.close()
