"""A small real DNS server on loopback for tests (UDP and TCP on one port).

The zone is a Python dict, name -> {type: [values]}:

    {"example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"], "A": ["192.0.2.1"],
                      "MX": [(10, "mx.example.test")]},
     "sel._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=..."]}}

Types: A, AAAA, TXT (str or bytes; split into 255-byte strings as DNS requires),
MX ((preference, exchange)), CNAME, PTR. Unknown names get NXDOMAIN; a known
name without the asked type gets an empty NOERROR answer. `delay` (seconds) is
waited before every answer and can be changed while the server runs; each query
is answered in its own thread, so a delay does not serialise queries.

    server = DNSTestServer(zone).start()
    resolver_config = [("127.0.0.1", server.port)]
    ...
    server.stop()
"""

from __future__ import annotations

import socket
import threading
import time

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A
from dnslib.server import DNSServer

__all__ = ["DNSTestServer"]

_RDATA = {
    "A": A,
    "AAAA": AAAA,
    "CNAME": CNAME,
    "PTR": PTR,
    "MX": lambda value: MX(value[1], value[0]),
    "TXT": lambda value: TXT(_split_txt(value)),
}


def _split_txt(value: str | bytes) -> list[bytes]:
    data = value.encode() if isinstance(value, str) else value
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class _QuietLogger:
    """dnslib prints every query by default; tests want silence."""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


class _ZoneResolver:
    def __init__(self, owner: DNSTestServer):
        self.owner = owner

    def resolve(self, request, handler):
        qname = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        self.owner.queries.append((_norm(qname), qtype))
        if self.owner.delay:
            time.sleep(self.owner.delay)
        reply = request.reply()
        if _norm(qname) not in self.owner.records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for owner, rtype, value in self._answers(qname, qtype):
            reply.add_answer(RR(owner, getattr(QTYPE, rtype), rdata=_RDATA[rtype](value),
                                ttl=self.owner.ttl))
        return reply

    def _answers(self, qname: str, qtype: str):
        """(owner, type, value) of the answer; CNAMEs inside the zone are followed
        as a real authoritative server does."""
        answers = []
        for _ in range(8):  # bounded: a CNAME loop in a test zone must not hang
            node = self.owner.records.get(_norm(qname), {})
            if qtype in node or "CNAME" not in node:
                return answers + [(qname, qtype, value) for value in node.get(qtype, [])]
            target = node["CNAME"][0]
            answers.append((qname, "CNAME", target))
            qname = target
        return answers


class DNSTestServer:
    """Serve `records` on host:port (port 0: any free port, see `.port`)."""

    def __init__(self, records: dict | None = None, host: str = "127.0.0.1",
                 port: int = 0, delay: float = 0.0, ttl: int = 300):
        self.host = host
        self._wanted_port = port
        self.port = port
        self.delay = delay
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []  # (name, type) of every query seen
        self.records: dict = {}
        self.set_records(records or {})
        self._servers: list[DNSServer] = []

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def set_records(self, records: dict) -> None:
        """Replace the whole zone (atomically: queries see the old or the new one)."""
        self.records = {_norm(name): dict(types) for name, types in records.items()}

    def add_record(self, name: str, rtype: str, value) -> None:
        records = {k: {t: list(v) for t, v in types.items()} for k, types in self.records.items()}
        records.setdefault(_norm(name), {}).setdefault(rtype, []).append(value)
        self.records = records

    def start(self) -> DNSTestServer:
        if self._servers:
            return self
        self.port = self._wanted_port or _free_port(self.host)
        resolver = _ZoneResolver(self)
        for tcp in (False, True):
            server = DNSServer(resolver, address=self.host, port=self.port, tcp=tcp,
                               logger=_QuietLogger())
            # A delayed answer to a client that gave up, or after stop(), fails
            # to send; that is expected here, not worth a traceback.
            server.server.handle_error = lambda *args: None
            # Our own thread rather than start_thread(): a short poll interval
            # makes stop() take ~50 ms instead of up to 0.5 s per socket.
            server.thread = threading.Thread(target=server.server.serve_forever,
                                             kwargs={"poll_interval": 0.05}, daemon=True)
            server.thread.start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        self._servers = []

    def __enter__(self) -> DNSTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP at the moment of asking."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for the test DNS server")


if __name__ == "__main__":  # manual poking: python tests/dnsserver.py, then dig -p PORT
    srv = DNSTestServer({"example.test": {"TXT": ["v=spf1 -all"], "A": ["192.0.2.1"]}}).start()
    print("serving on", srv.address)
    threading.Event().wait()
