"""The little of the HTTP API the benchmarks need: make mailboxes, read lists.

In a private domain (the default) a mailbox must be created through the API
before mail for it is accepted, and it is read with the token the creation
returned; in a public one, mail creates the mailbox and no token is needed.
"""

from __future__ import annotations

import http.client
import json
import threading


class ApiError(RuntimeError):
    pass


class Client:
    """One keep-alive connection (not thread-safe: one per thread)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None, token: str | None = None
                ) -> tuple[int, bytes]:
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def create_mailboxes(port: int, addresses: list[str], ttl: int = 86400, threads: int = 1) -> dict[str, str]:
    """POST /api/v1/mailboxes for each address (on bench.test); address → token.

    One thread by default: concurrent creations currently fail with "database
    is locked" (a deferred SQLite transaction that reads, then writes; see
    docs/benchmarks.md), and a benchmark's set-up must not depend on that.
    """
    out: dict[str, str] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def work(chunk: list[str]) -> None:
        c = Client(port)
        try:
            for address in chunk:
                local, _, host = address.partition("@")
                body = {"domain": "bench.test", "local_part": local, "ttl": ttl}
                if host != "bench.test":
                    body["subdomain"] = host.removesuffix(".bench.test")
                status, data = c.request("POST", "/api/v1/mailboxes", body)
                if status != 201:
                    errors.append(f"{address}: {status} {data[:200]!r}")
                    return
                with lock:
                    out[address] = json.loads(data)["token"]
        finally:
            c.close()

    ts = [threading.Thread(target=work, args=(addresses[k::threads],), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    if errors:
        raise ApiError(f"creating mailboxes: {errors[:3]}")
    return out
