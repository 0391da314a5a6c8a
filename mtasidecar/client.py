"""A Python client for automation scripts. Standard library only; speaks HTTP.

    from mtasidecar.client import Client

    client = Client("http://127.0.0.1:8025")
    mb = client.create_mailbox()                 # private: a fresh address + its token
    sign_up(email=mb.address)                     # your code
    msg = mb.wait_for(sender="github.com", timeout=120)
    print(msg.codes[0]["value"] if msg.codes else msg.links[0]["url"])

Handler style, over Server-Sent Events, reconnecting as needed:

    inbox = client.inbox(mb)

    @inbox.message
    def handle(msg):                              # or: async def handle(msg)
        print(msg.subject)

    inbox.run()                                   # until inbox.stop() or Ctrl-C
"""

from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

LONG_POLL_MAX = 300


class ApiError(Exception):
    """The server answered with an error: ``status``, ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- HTTP ----------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, token: str | None = None,
                 timeout: float | None = None, raw: bool = False):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        token = token or self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())
            except ValueError:
                err = {}
            raise ApiError(exc.code, err.get("error", "http_error"), err.get("message", str(exc))) from None
        if raw:
            return payload
        return json.loads(payload) if payload else None

    # -- mailboxes -----------------------------------------------------------

    def create_mailbox(self, domain: str | None = None, local_part: str | None = None,
                       subdomain: str | None = None, ttl: int | None = None) -> Mailbox:
        body = {k: v for k, v in {"domain": domain, "local_part": local_part, "subdomain": subdomain,
                                  "ttl": ttl}.items() if v is not None}
        data = self._request("POST", "/api/v1/mailboxes", body)
        return Mailbox(self, data["address"], data["token"], data)

    def mailbox(self, address: str, token: str | None = None) -> Mailbox:
        """An existing mailbox: one you made earlier (with its token), or a public one."""
        return Mailbox(self, address.lower(), token, {})

    def inbox(self, mailbox: Mailbox, after: str | None = None) -> Inbox:
        """Handlers for new mail; ``after`` (a message id) also replays what came
        after it ("0" * 24: everything so far). Default: only mail from now on."""
        return Inbox(mailbox, after)


@dataclass
class Message:
    """One message, as the native API gives it; ``raw`` is fetched on first use."""

    mailbox: Mailbox
    data: dict
    _raw: bytes | None = field(default=None, repr=False)

    id = property(lambda self: self.data["id"])
    subject = property(lambda self: self.data.get("subject", ""))
    text = property(lambda self: self.detail.get("text", ""))
    html = property(lambda self: self.detail.get("html", []))
    links = property(lambda self: self.detail.get("links", []))
    codes = property(lambda self: self.detail.get("codes", []))
    auth = property(lambda self: self.detail.get("auth"))

    @property
    def sender(self) -> str:
        return self.data.get("from", {}).get("address", "")

    @property
    def recipients(self) -> list[str]:
        return [a["address"] for a in self.data.get("to", [])]

    @property
    def detail(self) -> dict:
        """The full message (text, html, links, codes, auth, ...), fetched once."""
        if "text" not in self.data:
            self.data = self.mailbox._get(f"/messages/{self.id}")
        return self.data

    @property
    def raw(self) -> bytes:
        """The exact bytes as received."""
        if self._raw is None:
            self._raw = self.mailbox._get(f"/messages/{self.id}/raw", raw=True)
        return self._raw


class Mailbox:
    def __init__(self, client: Client, address: str, token: str | None, data: dict):
        self.client, self.address, self.token, self.data = client, address, token, data
        self._path = "/api/v1/mailboxes/" + urllib.parse.quote(address, safe="@")

    def __repr__(self) -> str:
        return f"Mailbox({self.address!r})"

    def _get(self, sub: str, raw: bool = False, timeout: float | None = None, query: dict | None = None):
        path = self._path + sub + ("?" + urllib.parse.urlencode(query) if query else "")
        return self.client._request("GET", path, token=self.token, raw=raw, timeout=timeout)

    def messages(self, limit: int = 30) -> list[Message]:
        """The newest messages, newest first."""
        return [Message(self, m) for m in self._get("/messages", query={"limit": limit})["items"]]

    def wait_for(self, sender: str | None = None, subject: str | None = None, to: str | None = None,
                 has: str | None = None, timeout: float = 60.0, after: str | None = None) -> Message:
        """The first message matching all the given filters (substring, case-insensitive).

        Already-received mail counts unless ``after`` (a message id) is given.
        The server holds each request until a match arrives (no blind
        polling). TimeoutError when none comes within ``timeout`` seconds.
        """
        query = {k: v for k, v in {"from": sender, "subject": subject, "to": to, "has": has,
                                   "after": after}.items() if v is not None}
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching message in {self.address} within {timeout} s")
            wait = max(1, min(int(remaining), LONG_POLL_MAX))
            items = self._get("/messages", query=dict(query, wait=wait, limit=100),
                              timeout=wait + self.client.timeout)["items"]
            if items:
                return Message(self, items[-1])  # the oldest match: the first that came

    def delete(self) -> None:
        self.client._request("DELETE", self._path, token=self.token)


class Inbox:
    """Calls each registered handler once per new message, over SSE, reconnecting."""

    def __init__(self, mailbox: Mailbox, after: str | None = None):
        self.mailbox = mailbox
        self.handlers: list = []
        self.last_id: str | None = after
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None

    def message(self, fn):
        """Decorator: ``fn(message)`` (sync or async) for each new message."""
        self.handlers.append(fn)
        return fn

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            conn.sock.close()  # unblocks a read in run()

    def run(self, reconnect_delay: float = 1.0) -> None:
        """Serve until stop(). Reconnects after errors, resuming after the last
        message seen (Last-Event-ID), so no message is handled twice or lost."""
        loop = asyncio.new_event_loop()
        try:
            while not self._stop.is_set():
                try:
                    self._stream(loop)
                except (OSError, http.client.HTTPException, ApiError):
                    if self._stop.is_set():
                        break
                self._stop.wait(reconnect_delay)
        finally:
            loop.close()

    def _stream(self, loop) -> None:
        url = urllib.parse.urlsplit(self.mailbox.client.base_url)
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
        self._conn = conn
        headers = {"Accept": "text/event-stream"}
        if self.mailbox.token:
            headers["Authorization"] = f"Bearer {self.mailbox.token}"
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        try:
            conn.request("GET", url.path.rstrip("/") + self.mailbox._path + "/events", headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                body = resp.read()
                err = json.loads(body) if body.startswith(b"{") else {}
                raise ApiError(resp.status, err.get("error", "http_error"), err.get("message", ""))
            event: dict = {}
            for line in resp:
                if self._stop.is_set():
                    return
                line = line.decode("utf-8").rstrip("\r\n")
                if line:
                    name, _, value = line.partition(":")
                    event[name] = event.get(name, "") + value.removeprefix(" ")
                    continue
                if event.get("event") == "message" and "data" in event:
                    self._dispatch(loop, json.loads(event["data"]), event.get("id"))
                event = {}
        finally:
            self._conn = None
            conn.close()

    def _dispatch(self, loop, data: dict, event_id: str | None) -> None:
        msg = Message(self.mailbox, data)
        for handler in self.handlers:
            result = handler(msg)
            if inspect.isawaitable(result):
                loop.run_until_complete(result)
        # Advanced only after the handlers ran: a crash mid-way replays it.
        self.last_id = event_id or msg.id
