"""Webhooks, in process: the outbox written at ingest, the sender against a real
HTTP receiver on loopback (http.server in a thread), and the API routes
(falcon's TestClient) on a real SQLite file.

The sender's clock and jitter are injected, so the retry schedule is checked
to the second without waiting for it. No request may get a 500 (the autouse
fixture of test_api.py).

``Receiver`` and ``verify_snippet`` are shared with
tests/integration/test_webhooks_e2e.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import peewee as pw
import pytest

from mtasidecar import webhooks
from mtasidecar.config import ConfigError, load
from mtasidecar.store.models import Delivery, Webhook
from mtasidecar.webhooks import Sender, address_is_public, backoff, next_attempt, sign, url_problem
from tests.conftest import ROOT, free_port, wait_for
from tests.unit.test_api import assert_error, eml
from tests.unit.test_api import no_server_errors  # noqa: F401 (autouse: no request may get a 500)
from tests.unit.test_mailboxes import OPERATOR, bearer, box_env, create, deliver

PUBLIC_ADDRESS = "inbox@open.test"  # open.test is a public domain in box_env's DOMAINS
OPERATOR_SECRET = "operator-secret-" + "s" * 16
DOCS = ROOT / "docs" / "webhooks.md"


# -- a real receiver ---------------------------------------------------------------------------

class Receiver:
    """An HTTP server on 127.0.0.1 (a thread) that records every POST.

    ``statuses`` are answered first, in order, then ``default``; ``delay``
    holds each answer back. ``port`` may be given to take a reserved one.
    """

    def __init__(self, port: int = 0, default: int = 200):
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.default = default
        self.delay = 0.0
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.active += 1
                    receiver.max_active = max(receiver.max_active, receiver.active)
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                try:
                    if receiver.delay:
                        time.sleep(receiver.delay)
                    with receiver.lock:
                        receiver.requests.append({"path": self.path, "headers": dict(self.headers.items()),
                                                  "body": body, "status": status, "at": time.time()})
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                finally:
                    with receiver.lock:
                        receiver.active -= 1

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            request_queue_size = 1024  # the default 5 drops SYNs under a burst (1 s retransmit)

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if 200 <= r["status"] < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def verify_snippet():
    """The verification function docs/webhooks.md shows, exactly as shown."""
    match = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, "docs/webhooks.md has no python snippet"
    namespace: dict = {}
    exec(compile(match.group(1), str(DOCS), "exec"), namespace)
    return namespace["verify"]


class Clock:
    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- environment --------------------------------------------------------------------------------

def hook_env(tmp_path: Path, **extra: str):
    settings = {"MTASIDECAR_WEBHOOKS_ALLOW_PRIVATE": "true", **extra}
    return box_env(tmp_path, **settings)


@pytest.fixture
def env(tmp_path):
    return hook_env(tmp_path)


@pytest.fixture
def fake_dns(monkeypatch):
    """Host names for the URL checks, without a DNS server: literal IPs resolve to themselves."""
    table = {"public.example": ["93.184.216.34"], "internal.example": ["10.1.2.3"],
             "dual.example": ["93.184.216.34", "127.0.0.1"], "v6.example": ["2606:2800:220:1::1"],
             "mapped.example": ["::ffff:192.168.0.1"], "localhost": ["127.0.0.1", "::1"]}

    async def resolve(host, port):
        if _is_ip(host):
            found = [host]
        elif host in table:
            found = table[host]
        else:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, (a, port)) for a in found]

    monkeypatch.setattr(webhooks, "system_resolver", resolve)
    return table


def _is_ip(text: str) -> bool:
    try:
        import ipaddress
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def hooks_path(address: str) -> str:
    return f"/api/v1/mailboxes/{address}/webhooks"


def add_hook(env, address: str, token: str | None, url: str, status: int = 201, **extra) -> dict:
    headers = bearer(token) if token else {}
    r = env.request("POST", hooks_path(address), json={"url": url, **extra}, headers=headers)
    assert r.status_code == status, (r.status_code, r.text)
    return r.json


def deliveries(env) -> list[dict]:
    cur = env.store.db.execute_sql(
        "SELECT id, webhook_id, message_id, url, status, attempts, next_attempt_at, last_error, "
        "last_status_code, created_at, delivered_at FROM delivery ORDER BY id")
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def sender(env, clock=None, **kw) -> Sender:
    return Sender(env.store, env.settings, clock=clock or time.time, rand=lambda: 0.5, **kw)


def op_settings(env, url: str, **extra: str):
    """The env's settings plus the operator-wide webhook (and allow_private on)."""
    return load(environ={"MTASIDECAR_DATA_DIR": str(env.tmp / "data"), "MTASIDECAR_WEBHOOKS_URL": url,
                         "MTASIDECAR_WEBHOOKS_SECRET": OPERATOR_SECRET, "MTASIDECAR_WEBHOOKS_ALLOW_PRIVATE": "true",
                         **extra})


def run(coro):
    return asyncio.run(coro)


def run_once(s: Sender) -> int:
    return run(s.run_once())


# -- signing and the schedule -----------------------------------------------------------------

def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"event":"message.received"}'
    expected = hmac.new(b"k" * 20, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k" * 20, 1_700_000_000, body) == f"v1={expected}"
    # A known vector, so that receivers in other languages can check themselves.
    assert sign("whsec_test", 1, b"{}") == "v1=" + hmac.new(b"whsec_test", b"1.{}", hashlib.sha256).hexdigest()
    headers = webhooks.request_headers("k" * 20, 1_700_000_000, "0" * 23 + "1", body)
    assert headers["X-Mtasidecar-Signature"] == f"v1={expected}"
    assert headers["X-Mtasidecar-Timestamp"] == "1700000000"
    assert headers["X-Mtasidecar-Event"] == "message.received"
    assert headers["Content-Type"] == "application/json"


def test_the_documented_verification_snippet():
    verify = verify_snippet()
    secret, body, now = "whsec_" + "x" * 30, b'{"a":1}', time.time()
    headers = webhooks.request_headers(secret, int(now), "1" * 24, body)
    assert verify(secret, headers, body)
    assert verify(secret, headers, body, now=now + 299)
    assert not verify(secret, headers, body, now=now + 301)      # older than 5 minutes: a replay
    assert not verify(secret, headers, body, now=now - 301)      # from the future
    assert not verify(secret, headers, body + b" ")              # body changed
    assert not verify("whsec_" + "y" * 30, headers, body)        # another secret
    assert not verify(secret, dict(headers, **{"X-Mtasidecar-Timestamp": str(int(now) + 1)}), body)
    assert not verify(secret, {k: v for k, v in headers.items() if k != "X-Mtasidecar-Signature"}, body)
    assert not verify(secret, dict(headers, **{"X-Mtasidecar-Timestamp": "soon"}), body)


def test_backoff_schedule():
    steps = [backoff(n, 5, 3600) for n in range(1, 11)]
    assert steps == [5, 15, 45, 135, 405, 1215, 3600, 3600, 3600, 3600]
    # Jitter: +-20 %, never above the cap.
    assert backoff(1, 5, 3600, rand=0.0) == pytest.approx(4.0)
    assert backoff(1, 5, 3600, rand=0.999999) == pytest.approx(6.0, rel=1e-5)
    assert backoff(3, 5, 3600, rand=0.0) == pytest.approx(36.0)
    assert 2880 <= backoff(9, 5, 3600, rand=0.0) <= backoff(9, 5, 3600, rand=0.99) == 3600
    assert backoff(10_000, 5, 3600) == 3600  # no overflow after many failures
    assert backoff(2, 0.2, 1.0) == pytest.approx(0.6)


def test_retries_cover_the_whole_window_then_give_up():
    cfg = load(environ={}).webhooks
    assert cfg.max_age == 26 * 3600 and cfg.backoff_base == 5 and cfg.backoff_max == 3600
    t, attempts_at = 0.0, [0.0]
    while (t := next_attempt(len(attempts_at), 0.0, t, cfg)) is not None:
        attempts_at.append(t)
    assert attempts_at[:7] == [0, 5, 20, 65, 200, 605, 1820]
    assert attempts_at[-1] == 26 * 3600            # the last attempt falls on the window's end
    assert attempts_at[-2] >= 24 * 3600            # retried for at least 24 h
    assert len(attempts_at) == 33
    assert all(b - a <= 3600 for a, b in zip(attempts_at, attempts_at[1:]))
    assert next_attempt(40, 0.0, 26 * 3600, cfg) is None


def test_settings_are_checked():
    ok = load(environ={"MTASIDECAR_WEBHOOKS_URL": "https://hooks.example/in", "MTASIDECAR_WEBHOOKS_SECRET": "s" * 16,
                       "MTASIDECAR_WEBHOOKS_BACKOFF_BASE": "0.2", "MTASIDECAR_WEBHOOKS_ALLOW_PRIVATE": "true"})
    assert ok.webhooks.url == "https://hooks.example/in" and ok.webhooks.backoff_base == 0.2
    assert ok.webhooks.allow_private is True
    for env, key in [({"MTASIDECAR_WEBHOOKS_URL": "https://x.example/"}, "webhooks.secret"),
                     ({"MTASIDECAR_WEBHOOKS_URL": "ftp://x.example/", "MTASIDECAR_WEBHOOKS_SECRET": "s" * 16},
                      "webhooks.url"),
                     ({"MTASIDECAR_WEBHOOKS_TIMEOUT": "0"}, "webhooks.timeout"),
                     ({"MTASIDECAR_WEBHOOKS_CONCURRENCY": "0"}, "webhooks.concurrency"),
                     ({"MTASIDECAR_WEBHOOKS_MAX_AGE": "-1"}, "webhooks.max_age"),
                     ({"MTASIDECAR_WEBHOOKS_BACKOFF_BASE": "7200"}, "webhooks.backoff_base"),
                     ({"MTASIDECAR_WEBHOOKS_HISTORY": "0"}, "webhooks.history"),
                     ({"MTASIDECAR_WEBHOOKS_NOPE": "1"}, "webhooks.nope")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load(environ=env)


# -- target checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "192.0.2.1", "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1",
    "fd12:3456::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "64:ff9b::a00:1", "ff02::1",
    "2001:db8::1", "not-an-ip",
])
def test_non_public_addresses(address):
    assert not address_is_public(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:2800:220:1::1",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses(address):
    assert address_is_public(address)


@pytest.mark.parametrize("url,problem", [
    (None, "non-empty string"), ("", "non-empty string"), (42, "non-empty string"),
    ("ftp://x.example/", "http:// or https://"), ("javascript:alert(1)", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"), ("http://", "name a host"), ("http:///path", "name a host"),
    ("https://:443/", "name a host"), ("http://x.example:99999/", "malformed"), ("http://x.example:0/", "port 0"),
    ("http://x.example/a b", "spaces"), ("http://x.example/\r\nX-Injected: 1", "control"),
    ("http://bücher.example/", "ASCII"), ("http://x.example/" + "a" * 2048, "2048"),
    ("http://[::1/", "malformed"),
])
def test_url_problems(url, problem):
    found = url_problem(url)
    assert found and problem in found, (url, found)


@pytest.mark.parametrize("url", ["http://x.example", "https://x.example:8443/in?a=1&b=2", "http://93.184.216.34/",
                                 "https://[2606:2800:220:1::1]/hook", "http://user:pa%40ss@x.example/",
                                 "HTTPS://X.EXAMPLE/" + "a" * 2000])
def test_url_fine(url):
    assert url_problem(url) is None


def test_check_host_refuses_any_non_public_address(fake_dns):
    check = lambda host: run(webhooks.check_host(host, 443, webhooks.system_resolver))  # noqa: E731
    assert check("public.example") == [(socket.AF_INET, ("93.184.216.34", 443))]
    for host, says in [("internal.example", "10.1.2.3"), ("dual.example", "127.0.0.1"),
                       ("mapped.example", "::ffff:192.168.0.1"), ("nowhere.example", "cannot resolve")]:
        with pytest.raises(webhooks.Refused, match=re.escape(says)):
            check(host)


# -- the outbox at ingest --------------------------------------------------------------------

def test_ingest_writes_one_delivery_per_webhook_and_one_for_the_operator(env, receiver):
    a = create(env, local_part="alice")
    b = create(env, local_part="bob")
    h1 = add_hook(env, a["address"], a["token"], receiver.url("/a1"))
    h2 = add_hook(env, a["address"], a["token"], receiver.url("/a2"))
    env.store.operator_webhook_url = receiver.url("/op")
    (am,) = deliver(env, eml(a["address"], subject="for alice"))
    (bm,) = deliver(env, eml(b["address"], subject="for bob"))
    rows = deliveries(env)
    key = lambda t: (t[0], t[2])  # noqa: E731
    got = sorted(((r["message_id"], r["webhook_id"], r["url"], r["status"], r["attempts"]) for r in rows), key=key)
    assert got == sorted([
        (int(am, 16), int(h1["id"], 16), receiver.url("/a1"), "pending", 0),
        (int(am, 16), int(h2["id"], 16), receiver.url("/a2"), "pending", 0),
        (int(am, 16), None, receiver.url("/op"), "pending", 0),
        (int(bm, 16), None, receiver.url("/op"), "pending", 0),
    ], key=key)
    assert all(r["next_attempt_at"] == r["created_at"] and r["created_at"] > time.time() - 60 for r in rows)


def test_no_webhooks_no_rows(env):
    a = create(env, local_part="alice")
    deliver(env, eml(a["address"]), eml(PUBLIC_ADDRESS))
    assert deliveries(env) == []


def test_outbox_rows_commit_or_roll_back_with_their_message(env, receiver, monkeypatch):
    """One transaction: a failing outbox insert leaves no message either (and the file stays)."""
    a = create(env, local_part="alice")
    add_hook(env, a["address"], a["token"], receiver.url())
    path = env.maildir / "new" / "1736762400.M1P1Q1.mx.example.test"
    path.write_bytes(eml(a["address"], subject="atomic"))
    from mtasidecar.ingest.pipeline import Pipeline, prepare

    def boom(*args, **kwargs):
        raise pw.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(Delivery, "insert_many", boom)
    with pytest.raises(pw.OperationalError):
        Pipeline(env.store, env.maildir).commit([prepare(str(path), 10**7)])
    assert env.store.db.execute_sql("SELECT COUNT(*) FROM message").fetchone()[0] == 0
    assert path.exists()
    monkeypatch.undo()
    Pipeline(env.store, env.maildir).commit([prepare(str(path), 10**7)])
    assert env.store.db.execute_sql("SELECT COUNT(*) FROM message").fetchone()[0] == 1
    assert len(deliveries(env)) == 1
    # A crash between commit and unlink: the file is ingested again, which is
    # a no-op for the message and for its events.
    path.write_bytes(eml(a["address"], subject="atomic"))
    Pipeline(env.store, env.maildir).commit([prepare(str(path), 10**7)])
    assert len(deliveries(env)) == 1


def test_deleting_a_mailbox_or_a_webhook_drops_their_deliveries(env, receiver):
    a = create(env, local_part="alice")
    b = create(env, local_part="bob")
    ha = add_hook(env, a["address"], a["token"], receiver.url("/a"))
    hb1 = add_hook(env, b["address"], b["token"], receiver.url("/b1"))
    add_hook(env, b["address"], b["token"], receiver.url("/b2"))
    deliver(env, eml(a["address"]), eml(b["address"]), eml(b["address"], subject="two"))
    assert len(deliveries(env)) == 5
    r = env.request("DELETE", f"{hooks_path(b['address'])}/{hb1['id']}", headers=bearer(b["token"]))
    assert r.status_code == 204
    assert sorted(d["url"] for d in deliveries(env)) == [receiver.url("/a")] + [receiver.url("/b2")] * 2
    assert env.request("DELETE", f"/api/v1/mailboxes/{b['address']}", headers=bearer(b["token"])).status_code == 204
    assert [d["webhook_id"] for d in deliveries(env)] == [int(ha["id"], 16)]
    assert Webhook.select().count() == 1


# -- claiming ------------------------------------------------------------------------------------

def test_claims_take_due_rows_once_until_their_lease_ends(env, receiver):
    a = create(env, local_part="alice")
    add_hook(env, a["address"], a["token"], receiver.url())
    deliver(env, *[eml(a["address"], subject=f"m{i}") for i in range(5)])
    store = env.store
    now = time.time() + 1
    assert store.next_delivery_due() <= now
    first = store.claim_deliveries(now, 3, now + 30, "one")
    second = store.claim_deliveries(now, 10, now + 30, "two")
    assert len(first) == 3 and len(second) == 2
    assert not {r["delivery_id"] for r in first} & {r["delivery_id"] for r in second}
    assert store.claim_deliveries(now, 10, now + 30, "three") == []
    assert store.next_delivery_due() == pytest.approx(now + 30)
    # What a POST needs comes along: the mailbox, the secret, the message's fields.
    row = first[0]
    assert row["address"] == a["address"] and row["secret"].startswith("whsec_")
    assert row["subject"] == "m0" and row["id"] == row["event_message_id"] and row["attempts"] == 0
    # Rows of a sender that died mid-attempt are due again when the lease ends.
    assert store.claim_deliveries(now + 29, 10, now + 60, "four") == []
    again = store.claim_deliveries(now + 30, 10, now + 60, "five")
    assert len(again) == 5
    # A failure is recorded only by the claim's current holder; a 2xx by anyone.
    did = first[0]["delivery_id"]
    assert not store.finish_delivery(did, "one", now, delivered=False, status_code=500, error="HTTP 500",
                                     next_attempt_at=now + 5)
    assert store.finish_delivery(did, "five", now, delivered=False, status_code=500, error="HTTP 500",
                                 next_attempt_at=now + 5)
    did2 = first[1]["delivery_id"]
    assert store.finish_delivery(did2, "one", now, delivered=True, status_code=200, error=None, next_attempt_at=None)
    assert not store.finish_delivery(did2, "five", now, delivered=True, status_code=200, error=None,
                                     next_attempt_at=None)
    by_id = {d["id"]: d for d in deliveries(env)}
    assert by_id[did]["attempts"] == 1 and by_id[did]["next_attempt_at"] == pytest.approx(now + 5)
    assert by_id[did2]["status"] == "delivered" and by_id[did2]["attempts"] == 1
    assert store.claim_deliveries(now + 100, 10, now + 200, "six")
    assert all(r["delivery_id"] != did2 for r in store.claim_deliveries(now + 300, 10, now + 400, "seven"))


# -- the sender against a real receiver -------------------------------------------------------

def _one_hook(env, receiver, path="/hook"):
    a = create(env, local_part="alice")
    hook = add_hook(env, a["address"], a["token"], receiver.url(path))
    return a, hook


def test_sender_posts_a_signed_event(env, receiver):
    a, hook = _one_hook(env, receiver)
    env.store.operator_webhook_url = receiver.url("/operator")
    (mid,) = deliver(env, eml(a["address"], subject="Your code is 123456", sender="noreply@origin.test"))
    s = Sender(env.store, op_settings(env, receiver.url("/operator")))
    started = time.time()
    assert run_once(s) == 2
    verify = verify_snippet()
    reqs = {r["path"]: r for r in receiver.requests}
    assert set(reqs) == {"/hook", "/operator"}
    for path, secret in (("/hook", hook["secret"]), ("/operator", OPERATOR_SECRET)):
        req = reqs[path]
        h = req["headers"]
        assert h["Content-Type"] == "application/json"
        assert h["X-Mtasidecar-Event"] == "message.received"
        assert re.fullmatch(r"[0-9a-f]{24}", h["X-Mtasidecar-Delivery"])
        assert abs(int(h["X-Mtasidecar-Timestamp"]) - started) <= 2
        assert verify(secret, h, req["body"])
        assert not verify(secret[:-1] + "!", h, req["body"])
        event = json.loads(req["body"])
        assert set(event) == {"event", "delivery_id", "webhook_id", "mailbox", "message"}
        assert event["event"] == "message.received" and event["delivery_id"] == h["X-Mtasidecar-Delivery"]
        assert event["mailbox"] == a["address"]
        assert event["webhook_id"] == (hook["id"] if path == "/hook" else None)
        msg = event["message"]
        assert msg["id"] == mid and msg["subject"] == "Your code is 123456"
        assert msg["from"]["address"] == "noreply@origin.test"
        assert msg["url"] == f"/api/v1/mailboxes/{a['address'].replace('@', '%40')}/messages/{mid}"
        # The very summary the message list gives.
        listed = env.get(f"/api/v1/mailboxes/{a['address']}/messages", headers=bearer(a["token"])).json["items"]
        assert msg == listed[0]
    rows = deliveries(env)
    assert all(r["status"] == "delivered" and r["attempts"] == 1 and r["last_status_code"] == 200
               and r["next_attempt_at"] is None and r["delivered_at"] for r in rows)
    assert run_once(s) == 0 and len(receiver.requests) == 2
    s.close()


def test_failures_are_retried_on_the_backoff_schedule(env, receiver):
    a, hook = _one_hook(env, receiver)
    deliver(env, eml(a["address"]))
    clock = Clock()
    (row,) = deliveries(env)
    clock.now = row["created_at"]
    s = sender(env, clock)
    receiver.statuses = [503, 500, 404]
    expected_next = row["created_at"]
    for n, (status, step) in enumerate([(503, 5), (500, 15), (404, 45)], start=1):
        clock.now = expected_next
        assert run_once(s) == 1
        (row,) = deliveries(env)
        expected_next = clock.now + step
        assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == \
            ("pending", n, status, f"HTTP {status}")
        assert row["next_attempt_at"] == pytest.approx(expected_next)
        clock.advance(step - 0.01)
        assert run_once(s) == 0  # not due yet
    clock.now = expected_next
    assert run_once(s) == 1
    (row,) = deliveries(env)
    assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == \
        ("delivered", 4, 200, None)
    # Four POSTs of one event: the same delivery id each time, each signed afresh.
    ids = {r["headers"]["X-Mtasidecar-Delivery"] for r in receiver.requests}
    assert len(receiver.requests) == 4 and len(ids) == 1
    r = env.get(f"{hooks_path(a['address'])}/{hook['id']}/deliveries", headers=bearer(a["token"]))
    (item,) = r.json["items"]
    assert item["status"] == "delivered" and item["attempts"] == 4 and item["next_attempt_at"] is None
    s.close()


def test_refused_connections_and_timeouts_are_failures(env, receiver):
    a = create(env, local_part="alice")
    closed = free_port()
    add_hook(env, a["address"], a["token"], f"http://127.0.0.1:{closed}/nobody")
    add_hook(env, a["address"], a["token"], receiver.url("/slow"))
    receiver.delay = 1.0
    deliver(env, eml(a["address"]))
    s = Sender(env.store, load(environ={"MTASIDECAR_DATA_DIR": str(env.tmp / "data"),
                                        "MTASIDECAR_WEBHOOKS_ALLOW_PRIVATE": "true",
                                        "MTASIDECAR_WEBHOOKS_TIMEOUT": "0.3"}), rand=lambda: 0.5)
    started = time.monotonic()
    assert run_once(s) == 2
    assert time.monotonic() - started < 0.9  # the timeout bounds the whole attempt
    by_url = {d["url"].rsplit("/", 1)[1]: d for d in deliveries(env)}
    assert by_url["nobody"]["status"] == "pending" and by_url["nobody"]["attempts"] == 1
    assert "ConnectionRefusedError" in by_url["nobody"]["last_error"]
    assert by_url["slow"]["last_error"] == "no answer within 0.3 s" and by_url["slow"]["last_status_code"] is None
    assert all(d["next_attempt_at"] > time.time() + 3 for d in by_url.values())
    s.close()


def test_given_up_after_max_age(env, receiver):
    a, _hook = _one_hook(env, receiver)
    receiver.default = 502
    deliver(env, eml(a["address"]))
    (row,) = deliveries(env)
    clock = Clock(row["created_at"] + 26 * 3600 - 2)
    s = sender(env, clock)
    assert run_once(s) == 1
    (row,) = deliveries(env)
    assert row["status"] == "pending" and row["next_attempt_at"] == pytest.approx(row["created_at"] + 26 * 3600)
    clock.now = row["next_attempt_at"]
    assert run_once(s) == 1
    (row,) = deliveries(env)
    assert (row["status"], row["attempts"], row["next_attempt_at"], row["last_error"]) == \
        ("failed", 2, None, "HTTP 502")
    clock.advance(10**6)
    assert run_once(s) == 0
    r = env.get("/api/v1/admin/deliveries?status=failed", headers=bearer(OPERATOR))
    assert [i["id"] for i in r.json["items"]] == [format(row["id"], "024x")]
    s.close()


def test_a_message_deleted_before_delivery_is_not_posted(env, receiver):
    a, _hook = _one_hook(env, receiver)
    (mid,) = deliver(env, eml(a["address"]))
    assert env.request("DELETE", f"/api/v1/mailboxes/{a['address']}/messages/{mid}",
                       headers=bearer(a["token"])).status_code == 204
    s = sender(env)
    assert run_once(s) == 1
    (row,) = deliveries(env)
    assert row["status"] == "failed" and row["attempts"] == 0 and "deleted" in row["last_error"]
    assert receiver.requests == []
    s.close()


def test_a_crashed_senders_claims_are_retried_after_the_lease(env, receiver):
    """Claimed by a sender that died before its POST: sent once, by the next, after the lease."""
    a, _hook = _one_hook(env, receiver)
    deliver(env, eml(a["address"]), eml(a["address"], subject="two"))
    clock = Clock()
    dead = sender(env, clock)
    assert len(run(dead.claim(10))) == 2  # ... and then it was killed
    dead.close()
    s = sender(env, clock)
    assert run_once(s) == 0
    clock.advance(s.lease - 0.1)
    assert run_once(s) == 0
    clock.advance(0.2)
    assert run_once(s) == 2
    assert len(receiver.requests) == 2 and all(d["status"] == "delivered" for d in deliveries(env))
    s.close()


def test_the_operator_webhook_only_with_its_secret(env, receiver):
    env.store.operator_webhook_url = receiver.url("/op")
    deliver(env, eml(PUBLIC_ADDRESS))
    s = sender(env)  # settings without webhooks.url/secret: removed since the event was queued
    assert run_once(s) == 1
    (row,) = deliveries(env)
    assert row["status"] == "failed" and "secret" in row["last_error"] and receiver.requests == []
    s.close()


def test_finished_deliveries_are_pruned_after_the_history(env, receiver):
    a, _hook = _one_hook(env, receiver)
    receiver.statuses = [500]
    deliver(env, eml(a["address"]), eml(a["address"], subject="two"))
    clock = Clock()
    s = sender(env, clock)
    run_once(s)  # one delivered, one pending
    assert sorted(d["status"] for d in deliveries(env)) == ["delivered", "pending"]
    clock.advance(7 * 86400 - 60)
    assert run(s.prune()) == 0
    clock.advance(120)
    assert run(s.prune()) == 1
    assert [d["status"] for d in deliveries(env)] == ["pending"]  # never pruned while pending
    s.close()


# -- SSRF: refused at creation and at every attempt ---------------------------------------------

@pytest.fixture
def strict(tmp_path, fake_dns):
    return box_env(tmp_path)  # webhooks.allow_private off, as by default


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost:8025/api/v1/admin/stats", "http://[::1]/", "http://10.0.0.1/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0:8025/",
    "http://internal.example/", "http://dual.example/", "http://mapped.example/", "http://[::ffff:127.0.0.1]/",
    "http://nowhere.example/",
])
def test_private_targets_are_refused_at_creation(strict, url):
    a = create(strict, local_part="alice")
    r = strict.request("POST", hooks_path(a["address"]), json={"url": url}, headers=bearer(a["token"]))
    assert_error(r, 422, "url_not_allowed")


def test_public_targets_are_accepted(strict):
    a = create(strict, local_part="alice")
    for url in ("https://public.example/hook", "http://93.184.216.34:8080/x", "https://v6.example/"):
        add_hook(strict, a["address"], a["token"], url)


def test_dns_rebinding_is_refused_at_send_time(strict, receiver, fake_dns):
    a = create(strict, local_part="alice")
    hook = add_hook(strict, a["address"], a["token"], f"http://public.example:{receiver.port}/hook")
    deliver(strict, eml(a["address"]))
    fake_dns["public.example"] = ["127.0.0.1"]  # the name now points inside
    s = sender(strict, resolver=webhooks.system_resolver)
    assert run_once(s) == 1
    (row,) = deliveries(strict)
    assert row["status"] == "pending" and row["attempts"] == 1
    assert "resolves to 127.0.0.1, not a public address" in row["last_error"]
    assert receiver.requests == []
    r = strict.get(f"{hooks_path(a['address'])}/{hook['id']}/deliveries", headers=bearer(a["token"]))
    assert "not a public address" in r.json["items"][0]["last_error"]
    s.close()


def test_the_operator_url_is_trusted(tmp_path, receiver):
    env = box_env(tmp_path)
    env.store.operator_webhook_url = receiver.url("/op")
    deliver(env, eml(PUBLIC_ADDRESS))
    s = Sender(env.store, load(environ={"MTASIDECAR_DATA_DIR": str(tmp_path / "data"),
                                        "MTASIDECAR_WEBHOOKS_URL": receiver.url("/op"),
                                        "MTASIDECAR_WEBHOOKS_SECRET": OPERATOR_SECRET}))
    assert run_once(s) == 1 and len(receiver.accepted()) == 1
    s.close()


# -- the loop: latency and concurrency ---------------------------------------------------------

class Running:
    """Sender.run on an event loop of its own (a thread), as `mtasidecar webhooks` runs it."""

    def __init__(self, s: Sender):
        self.sender = s
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _main(self):
        async def main():
            self.stop_event = asyncio.Event()
            self.ready.set()
            await self.sender.run(self.stop_event)
        self.loop.run_until_complete(main())

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.sender.close()


def test_the_loop_sends_new_events_within_milliseconds(env, receiver):
    a, _hook = _one_hook(env, receiver)
    running = Running(sender(env))
    try:
        latencies = []
        for i in range(10):
            t0 = time.time()
            deliver(env, eml(a["address"], subject=f"m{i}"))
            wait_for(lambda: len(receiver.requests) == i + 1, 5, 0.002, "the webhook")
            latencies.append(receiver.requests[-1]["at"] - t0)
            time.sleep(0.02)
    finally:
        running.stop()
    latencies.sort()
    assert latencies[-1] < 0.5, latencies  # poll interval 50 ms, plus the POST
    assert all(d["status"] == "delivered" for d in deliveries(env))


def test_the_loop_runs_concurrency_posts_at_once(tmp_path, receiver):
    env = hook_env(tmp_path, MTASIDECAR_WEBHOOKS_CONCURRENCY="8")
    a, _hook = _one_hook(env, receiver)
    receiver.delay = 0.1
    deliver(env, *[eml(a["address"], subject=f"m{i}") for i in range(48)])
    started = time.monotonic()
    running = Running(sender(env))
    try:
        wait_for(lambda: len(receiver.requests) == 48, 20, 0.01, "48 webhooks")
    finally:
        running.stop()
    elapsed = time.monotonic() - started
    assert receiver.max_active == 8
    assert elapsed < 48 / 8 * 0.1 * 3, elapsed  # 6 rounds of 0.1 s, with slack
    assert len({r["headers"]["X-Mtasidecar-Delivery"] for r in receiver.requests}) == 48


def test_the_loop_stops_with_attempts_recorded(env, receiver):
    a, _hook = _one_hook(env, receiver)
    receiver.delay = 0.3
    deliver(env, eml(a["address"]))
    running = Running(sender(env))
    wait_for(lambda: receiver.active == 1, 5, 0.01, "the POST to start")
    running.stop()  # waits for the attempt under way
    assert [d["status"] for d in deliveries(env)] == ["delivered"]


# -- the API -------------------------------------------------------------------------------------

def test_create_list_get_delete(env, receiver):
    a = create(env, local_part="alice")
    r = env.request("POST", hooks_path(a["address"]), json={"url": receiver.url()}, headers=bearer(a["token"]))
    assert r.status_code == 201
    hook = r.json
    assert set(hook) == {"id", "url", "secret", "created_at", "deliveries_url"}
    assert re.fullmatch(r"[0-9a-f]{24}", hook["id"]) and hook["url"] == receiver.url()
    assert re.fullmatch(r"whsec_[A-Za-z0-9_-]{43}", hook["secret"])
    assert r.headers["location"] == f"/api/v1/mailboxes/alice%40private.test/webhooks/{hook['id']}"
    assert hook["deliveries_url"] == r.headers["location"] + "/deliveries"
    chosen = add_hook(env, a["address"], a["token"], receiver.url("/2"), secret="my-own-secret-0123456789")
    assert chosen["secret"] == "my-own-secret-0123456789"
    listed = env.get(hooks_path(a["address"]), headers=bearer(a["token"])).json["items"]
    assert [h["id"] for h in listed] == [hook["id"], chosen["id"]]
    assert all("secret" not in h for h in listed)  # shown once, at creation
    one = env.get(f"{hooks_path(a['address'])}/{hook['id']}", headers=bearer(a["token"]))
    assert one.status_code == 200 and one.json == listed[0]
    r = env.request("DELETE", f"{hooks_path(a['address'])}/{hook['id']}", headers=bearer(a["token"]))
    assert r.status_code == 204 and r.content == b""
    assert_error(env.request("DELETE", f"{hooks_path(a['address'])}/{hook['id']}", headers=bearer(a["token"])),
                 404, "webhook_not_found")
    assert [h["id"] for h in env.get(hooks_path(a["address"]), headers=bearer(a["token"])).json["items"]] == \
        [chosen["id"]]


def test_access_rules(env, receiver):
    a = create(env, local_part="alice")
    b = create(env, local_part="bob")
    hook = add_hook(env, a["address"], a["token"], receiver.url())
    base = hooks_path(a["address"])
    routes = [("GET", base, {}), ("POST", base, {"json": {"url": receiver.url()}}),
              ("GET", f"{base}/{hook['id']}", {}), ("GET", f"{base}/{hook['id']}/deliveries", {}),
              ("DELETE", f"{base}/{hook['id']}", {})]
    for method, path, kw in routes:
        # Another mailbox's token: the same 404 as for a mailbox that does not exist.
        assert_error(env.request(method, path, headers=bearer(b["token"]), **kw), 404, "mailbox_not_found")
        assert_error(env.request(method, path, **kw), 401)
        assert_error(env.request(method, path, headers=bearer("mts_" + "x" * 32), **kw), 404, "mailbox_not_found")
    # B's token does not reach A's webhook through B's own mailbox either.
    assert_error(env.get(f"{hooks_path(b['address'])}/{hook['id']}", headers=bearer(b["token"])),
                 404, "webhook_not_found")
    assert_error(env.request("DELETE", f"{hooks_path(b['address'])}/{hook['id']}", headers=bearer(b["token"])),
                 404, "webhook_not_found")
    assert env.get(f"{base}/{hook['id']}", headers=bearer(a["token"])).status_code == 200
    # The operator reaches every mailbox's webhooks.
    assert env.get(base, headers=bearer(OPERATOR)).json["items"][0]["id"] == hook["id"]
    # On a public domain, whoever knows the address (like its messages).
    deliver(env, eml(PUBLIC_ADDRESS))
    pub = add_hook(env, PUBLIC_ADDRESS, None, receiver.url("/pub"))
    assert env.get(f"{hooks_path(PUBLIC_ADDRESS)}/{pub['id']}").status_code == 200


def test_admin_deliveries(env, receiver):
    a, hook = _one_hook(env, receiver)
    env.store.operator_webhook_url = receiver.url("/op")
    receiver.statuses = [500]
    deliver(env, eml(a["address"]))
    s = Sender(env.store, op_settings(env, receiver.url("/op")), rand=lambda: 0.5)
    run_once(s)
    s.close()
    path = "/api/v1/admin/deliveries"
    assert_error(env.get(path), 401)
    assert_error(env.get(path, headers=bearer(a["token"])), 401, "bad_token")
    items = env.get(path, headers=bearer(OPERATOR)).json["items"]
    assert len(items) == 2
    assert set(items[0]) == {"id", "message_id", "status", "attempts", "last_status_code", "last_error",
                             "next_attempt_at", "created_at", "delivered_at", "mailbox", "url", "webhook_id"}
    assert {(i["webhook_id"], i["url"], i["mailbox"]) for i in items} == {
        (hook["id"], receiver.url(), a["address"]), (None, receiver.url("/op"), a["address"])}
    assert sorted(i["status"] for i in items) == ["delivered", "pending"]
    (pending,) = env.get(f"{path}?status=pending", headers=bearer(OPERATOR)).json["items"]
    assert pending["last_status_code"] == 500 and pending["last_error"] == "HTTP 500" and pending["next_attempt_at"]
    assert env.get(f"{path}?status=failed", headers=bearer(OPERATOR)).json["items"] == []
    assert_error(env.get(f"{path}?status=lost", headers=bearer(OPERATOR)), 400, "bad_status")


def test_deliveries_pages_newest_first(env, receiver):
    a, hook = _one_hook(env, receiver)
    deliver(env, *[eml(a["address"], subject=f"m{i}") for i in range(7)])
    path = f"{hooks_path(a['address'])}/{hook['id']}/deliveries"
    seen, cursor = [], None
    while True:
        r = env.get(path, params={"limit": 3, **({"cursor": cursor} if cursor else {})}, headers=bearer(a["token"]))
        assert r.status_code == 200
        seen += r.json["items"]
        cursor = r.json["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7
    ids = [int(i["id"], 16) for i in seen]
    assert ids == sorted(ids, reverse=True)
    assert set(seen[0]) == {"id", "message_id", "status", "attempts", "last_status_code", "last_error",
                            "next_attempt_at", "created_at", "delivered_at"}
    assert all(i["status"] == "pending" and i["attempts"] == 0 and i["next_attempt_at"] for i in seen)
    assert env.get(path, params={"status": "delivered"}, headers=bearer(a["token"])).json["items"] == []


BAD_REQUESTS = [
    # (method, path suffix, request kwargs, status, error code)
    ("POST", "", {"body": "{", "headers": {"Content-Type": "application/json"}}, 400, "malformed_json"),
    ("POST", "", {"body": "url=http://x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     415, "unsupported_media_type"),
    ("POST", "", {"body": "", "headers": {}}, 415, "unsupported_media_type"),
    ("POST", "", {"json": ["http://x.example/"]}, 422, "invalid_body"),
    ("POST", "", {"json": {}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": "http://x.example/", "events": ["all"]}}, 422, "unknown_field"),
    ("POST", "", {"json": {"url": None}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": 7}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": ["http://x.example/"]}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": "ftp://x.example/"}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": "http:///nohost"}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": "http://x.example:70000/"}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": "http://x.example/" + "a" * 2100}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": "http://x.example/\nHost: evil"}}, 422, "invalid_url"),
    ("POST", "", {"json": {"url": "http://x.example/", "secret": "short"}}, 422, "invalid_secret"),
    ("POST", "", {"json": {"url": "http://x.example/", "secret": 1234567890123456789}}, 422, "invalid_secret"),
    ("POST", "", {"json": {"url": "http://x.example/", "secret": "s" * 257}}, 422, "invalid_secret"),
    ("POST", "", {"json": {"url": "http://x.example/", "secret": "tab\there-0123456789"}}, 422, "invalid_secret"),
    ("POST", "", {"json": {"url": "http://x.example/", "secret": "ünïcödé-0123456789"}}, 422, "invalid_secret"),
    ("PUT", "", {"json": {"url": "http://x.example/"}}, 405, None),
    ("GET", "/xyz", {}, 400, "malformed_id"),
    ("GET", "/" + "0" * 23 + "9", {}, 404, "webhook_not_found"),
    ("GET", "/" + "f" * 24, {}, 404, "webhook_not_found"),
    ("DELETE", "/nothex", {}, 400, "malformed_id"),
    ("DELETE", "/" + "0" * 23 + "9", {}, 404, "webhook_not_found"),
    ("PATCH", "/" + "0" * 23 + "9", {"json": {}}, 405, None),
    ("GET", "/xyz/deliveries", {}, 400, "malformed_id"),
    ("GET", "/" + "0" * 23 + "9/deliveries", {}, 404, "webhook_not_found"),
    ("GET", "/{hook}/deliveries?limit=0", {}, 400, "bad_limit"),
    ("GET", "/{hook}/deliveries?limit=abc", {}, 400, "bad_limit"),
    ("GET", "/{hook}/deliveries?cursor=%%%", {}, 400, "bad_cursor"),
    ("GET", "/{hook}/deliveries?status=ok", {}, 400, "bad_status"),
    ("POST", "/{hook}/deliveries", {"json": {}}, 405, None),
]


@pytest.mark.parametrize("method,suffix,kw,status,code", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_json_answer(env, receiver, method, suffix, kw, status, code):
    a, hook = _one_hook(env, receiver)
    path = hooks_path(a["address"]) + suffix.replace("{hook}", hook["id"])
    kw = dict(kw)  # the table is shared: do not consume its entries
    assert_error(env.request(method, path, headers={**bearer(a["token"]), **kw.pop("headers", {})}, **kw),
                 status, code)


def test_bad_addresses_and_admin_input(env):
    assert_error(env.get("/api/v1/mailboxes/not-an-address/webhooks", headers=bearer(OPERATOR)), 400,
                 "malformed_address")
    assert_error(env.get(hooks_path("nobody@private.test"), headers=bearer(OPERATOR)), 404, "mailbox_not_found")
    for query, code in (("limit=0", "bad_limit"), ("limit=100000", "bad_limit"), ("cursor=zz", "bad_cursor"),
                        ("status=", "bad_status")):
        assert_error(env.get(f"/api/v1/admin/deliveries?{query}", headers=bearer(OPERATOR)), 400, code)
    assert_error(env.request("POST", "/api/v1/admin/deliveries", json={}, headers=bearer(OPERATOR)), 405)


def test_at_most_ten_webhooks_per_mailbox(env, receiver):
    a = create(env, local_part="alice")
    for i in range(10):
        add_hook(env, a["address"], a["token"], receiver.url(f"/{i}"))
    r = env.request("POST", hooks_path(a["address"]), json={"url": receiver.url("/11")}, headers=bearer(a["token"]))
    assert_error(r, 422, "too_many_webhooks")
