"""A DNS server on 127.0.0.1 for the benchmarks (dnslib; UDP and TCP on one port).

The ingester checks SPF, DKIM and DMARC on every message. The benchmarks
never let those lookups leave the machine: the service is pointed at this
server, which answers from ``bench.corpus.dns_zone()`` (SPF, DMARC and DKIM
records for every sender domain of the corpus) and NXDOMAIN for everything
else, at once. So the checks do their real work (a valid Ed25519 signature
on most mails) with a DNS that costs nothing: the figures are the CPU cost
of checking, not of waiting for the network.
"""

from __future__ import annotations

import socket
import threading

from dnslib import MX, QTYPE, RCODE, RR, TXT, A
from dnslib.server import DNSServer

__all__ = ["BenchDNS"]


def _split_txt(value: str) -> list[bytes]:
    data = value.encode()
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


class _Quiet:
    def __getattr__(self, _name):
        return lambda *a, **k: None


class _Resolver:
    def __init__(self, zone: dict):
        self.zone = {k.rstrip(".").lower(): v for k, v in zone.items()}
        self.queries = 0
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        with self.lock:
            self.queries += 1
        reply = request.reply()
        qname = str(request.q.qname)
        name = qname.rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        entry = self.zone.get(name)
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for value in entry.get(qtype, []):
            if qtype == "TXT":
                rdata = TXT(_split_txt(value))
            elif qtype == "A":
                rdata = A(value)
            elif qtype == "MX":
                rdata = MX(value[1], value[0])
            else:
                continue
            reply.add_answer(RR(qname, getattr(QTYPE, qtype), rdata=rdata, ttl=300))
        return reply


class BenchDNS:
    def __init__(self, zone: dict | None = None):
        if zone is None:
            from .corpus import dns_zone
            zone = dns_zone()
        self.resolver = _Resolver(zone)
        self.port = _free_udp_tcp_port()
        self.udp = DNSServer(self.resolver, address="127.0.0.1", port=self.port, logger=_Quiet())
        self.tcp = DNSServer(self.resolver, address="127.0.0.1", port=self.port, tcp=True, logger=_Quiet())

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def queries(self) -> int:
        return self.resolver.queries

    def start(self) -> "BenchDNS":
        self.udp.start_thread()
        self.tcp.start_thread()
        return self

    def stop(self) -> None:
        for s in (self.udp, self.tcp):
            try:
                s.stop()
                s.server.server_close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    def __enter__(self) -> "BenchDNS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise OSError("no free port for DNS")
