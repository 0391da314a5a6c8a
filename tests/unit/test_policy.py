"""mtasidecar.policy: the protocol, every decision, the rate window, state bounds.

Against a real SQLite store in tmp_path and a real server on 127.0.0.1:0 (in
a thread with its own event loop); time is an injectable clock.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mtasidecar import policy as P
from mtasidecar.store import Store
from mtasidecar.store.models import Domain, Mailbox, Token

ROOT = Path(__file__).resolve().parents[2]
LIVE = "live@priv.test"
EXPIRED = "gone@priv.test"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def add_mailbox(address: str, domain: str, expires_in: float | None = 3600, token: bool = True,
                password: bool = False) -> None:
    now = time.time()
    mid = Mailbox.insert(address=address, domain=Domain.get(Domain.name == domain).id, created_at=now,
                         expires_at=None if expires_in is None else now + expires_in,
                         password_hash="scrypt$..." if password else None).execute()
    if token:
        Token.insert(token_hash=secrets.token_hex(32), mailbox=mid, created_at=now).execute()


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'policy.db'}")
    s.setup()
    s.sync_domains([("priv.test", False, "private"), ("pub.test", True, "public"), ("sub.test", True, "private")])
    add_mailbox(LIVE, "priv.test")
    add_mailbox(EXPIRED, "priv.test", expires_in=-1)
    yield s
    s.close()


@pytest.fixture
def clock():
    return Clock()


def make_policy(store, clock, **kw) -> P.Policy:
    opts = dict(rate_limit=3, rate_window=10.0, max_recipients=3, message_size_limit=10_000, clock=clock)
    opts.update(kw)
    return P.Policy(store.db, **opts)


@pytest.fixture
def policy(store, clock):
    return make_policy(store, clock)


class ServerThread:
    """A PolicyServer on its own event loop in a thread."""

    def __init__(self, policy: P.Policy, listen: str = "127.0.0.1:0"):
        self.server = P.PolicyServer(policy, listen)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10), "server did not start"
        if self.error:
            raise self.error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # pragma: no cover - reported to the test
            self.error = exc
        self.started.set()
        if self.error is None:
            self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    @property
    def address(self):
        a = self.server.address
        if a.startswith("unix:"):
            return a[5:]
        host, _, port = a.rpartition(":")
        return host, int(port)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server(policy):
    st = ServerThread(policy)
    yield st
    st.stop()


class Client:
    def __init__(self, address):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(5)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=5)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> str:
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread: {self.buf!r}")
            self.buf += chunk
        answer, _, self.buf = self.buf.partition(b"\n\n")
        assert answer.startswith(b"action="), answer
        assert b"\n" not in answer, answer
        return answer[len(b"action="):].decode()

    def ask(self, **attrs) -> str:
        self.send(request(**attrs))
        return self.answer()

    def closed(self) -> bool:
        """True once the server has closed the connection (answers before that are skipped)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def attrs(**kw) -> dict[str, str]:
    a = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
         "client_address": "192.0.2.1", "client_name": "sender.example", "helo_name": "sender.example",
         "sender": "someone@sender.example", "recipient": LIVE, "instance": "i1", "size": "100",
         "queue_id": "", "recipient_count": "0", "sasl_method": "", "ccert_subject": "",
         "encryption_protocol": "", "policy_context": "", "server_address": "127.0.0.1", "server_port": "25"}
    a.update({k: str(v) for k, v in kw.items()})
    return a


def request(**kw) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in attrs(**kw).items()).encode() + b"\n"


@pytest.fixture
def client(server):
    c = Client(server.address)
    yield c
    c.close()


# -- the protocol ------------------------------------------------------------------


def test_many_requests_on_one_connection(client):
    for i in range(50):
        assert client.ask(instance=f"m{i}", client_address=f"192.0.2.{i}") == "DUNNO"
        assert client.ask(instance=f"m{i}", recipient="nobody@priv.test") == "550 5.1.1 no such mailbox"


def test_pipelined_requests_are_answered_in_order(client):
    client.send(request(instance="a", recipient=LIVE) + request(instance="b", recipient="x@priv.test")
                + request(instance="c", protocol_state="DATA") + request(instance="d", size=10**9))
    assert [client.answer() for _ in range(4)] == [
        "DUNNO", "550 5.1.1 no such mailbox", "DUNNO", "552 5.3.4 message too large"]


def test_partial_reads_byte_by_byte(client):
    data = request(recipient="x@priv.test") + request(recipient=LIVE)
    for i in range(len(data)):
        client.send(data[i:i + 1])
        if i % 97 == 0:
            time.sleep(0.001)  # let the server see the fragments separately
    assert client.answer() == "550 5.1.1 no such mailbox"
    assert client.answer() == "DUNNO"


def test_crlf_line_ends_are_accepted(client):
    client.send(request(recipient="x@priv.test").replace(b"\n", b"\r\n"))
    assert client.answer() == "550 5.1.1 no such mailbox"


@pytest.mark.parametrize("garbage", [
    b"this is not a policy request\n\n",
    b"\n",                                                  # an empty request
    b"=value\nrequest=smtpd_access_policy\n\n",            # no name
    b"protocol_state=RCPT\nrecipient=x@priv.test\n\n",     # no request=smtpd_access_policy
    b"request=junosp\nprotocol_state=RCPT\n\n",
    b"request=smtpd_access_policy\n\xff\xfe=1\n\n",        # a name that is not ASCII
    b"\x00\x01\x02\x03\n\n",
])
def test_garbage_gets_malformed_and_the_connection_goes_on(client, garbage):
    client.send(garbage)
    assert client.answer() == P.MALFORMED
    assert client.ask(recipient="x@priv.test") == "550 5.1.1 no such mailbox"


def test_values_are_decoded_leniently(client):
    client.send(request(recipient="x@priv.test").replace(b"sender=someone", b"sender=\xc3\xa9t\xff\xfe"))
    assert client.answer() == "550 5.1.1 no such mailbox"
    assert client.ask(recipient="ünïcode@priv.test") == "550 5.1.1 no such mailbox"


def test_a_line_of_exactly_the_limit_is_accepted(client):
    pad = b"x" * (P.MAX_LINE - len(b"padding="))
    client.send(b"padding=" + pad + b"\n" + request(recipient="x@priv.test"))
    assert client.answer() == "550 5.1.1 no such mailbox"


@pytest.mark.parametrize("payload", [
    b"padding=" + b"x" * P.MAX_LINE + b"\n\n",            # a whole line over the limit
    b"padding=" + b"x" * (2 * P.MAX_LINE),                 # a line that never ends
])
def test_oversized_lines_close_the_connection(server, payload):
    c = Client(server.address)
    c.send(request() + payload)
    assert c.answer() == "DUNNO"  # what came before is still answered
    assert c.closed()
    c.close()
    fresh = Client(server.address)
    assert fresh.ask(recipient="x@priv.test") == "550 5.1.1 no such mailbox"
    fresh.close()


def test_oversized_request_closes_the_connection(server):
    c = Client(server.address)
    line = b"x=" + b"y" * 1000 + b"\n"
    c.send(b"request=smtpd_access_policy\n" + line * (P.MAX_REQUEST // len(line) + 2))
    assert c.closed()
    c.close()


def test_a_request_just_under_the_size_limit_is_answered(client):
    line = b"x=" + b"y" * 1000 + b"\n"
    filler = line * ((P.MAX_REQUEST - 2000) // len(line))
    client.send(filler + request(recipient="x@priv.test"))
    assert client.answer() == "550 5.1.1 no such mailbox"


def test_unix_socket_and_a_stale_socket_file(policy, tmp_path):
    path = tmp_path / "run" / "policy.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a file left by a dead process: nobody listens
    st = ServerThread(policy, f"unix:{path}")
    try:
        assert st.server.address == f"unix:{path}"
        assert path.stat().st_mode & 0o660 == 0o660
        c = Client(str(path))
        assert c.ask(recipient="x@priv.test") == "550 5.1.1 no such mailbox"
        c.close()
        with pytest.raises(OSError, match="another process listens"):
            asyncio.run(P.PolicyServer(policy, f"unix:{path}").start())
    finally:
        st.stop()
    assert not path.exists()


def test_parse_listen_and_postfix_endpoint():
    assert P.parse_listen("127.0.0.1:10040") == ("inet", "127.0.0.1", 10040)
    assert P.parse_listen("unix:/run/p.sock") == ("unix", "/run/p.sock", 0)
    assert P.postfix_endpoint("127.0.0.1:10041") == "inet:127.0.0.1:10041"
    assert P.postfix_endpoint("[::1]:10041") == "inet:[::1]:10041"
    assert P.postfix_endpoint("unix:/run/p.sock") == "unix:/run/p.sock"


# -- decisions -----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN", ""])
def test_only_rcpt_is_judged(policy, state):
    assert policy.check(attrs(protocol_state=state, recipient="x@priv.test", size=10**9)) == "DUNNO"


@pytest.mark.parametrize("recipient", [
    "x@elsewhere.test", "x@priv.test.evil.com", "x@xpriv.test", "x@a.priv.test",  # priv.test: no subdomains
    "postmaster", "", "x@",
])
def test_foreign_or_domainless_recipients_are_left_to_postfix(policy, recipient):
    assert policy.check(attrs(recipient=recipient)) == "DUNNO"


def test_private_domain_takes_only_live_mailboxes(policy):
    assert policy.check(attrs(recipient=LIVE)) == "DUNNO"
    assert policy.check(attrs(recipient="LIVE@Priv.TEST", instance="i2")) == "DUNNO"  # lowercased
    assert policy.check(attrs(recipient="unknown@priv.test")) == "550 5.1.1 no such mailbox"
    assert policy.check(attrs(recipient=EXPIRED)) == "550 5.1.1 no such mailbox"


def test_expiry_is_seen_at_once(store, policy):
    add_mailbox("soon@priv.test", "priv.test", expires_in=3600)
    assert policy.check(attrs(recipient="soon@priv.test")) == "DUNNO"
    Mailbox.update(expires_at=time.time() - 1).where(Mailbox.address == "soon@priv.test").execute()
    assert policy.check(attrs(recipient="soon@priv.test")) == "550 5.1.1 no such mailbox"
    Mailbox.delete().where(Mailbox.address == LIVE).execute()
    assert policy.check(attrs(recipient=LIVE)) == "550 5.1.1 no such mailbox"


def test_mailbox_without_expiry_lives(store, policy):
    add_mailbox("forever@priv.test", "priv.test", expires_in=None)
    assert policy.check(attrs(recipient="forever@priv.test")) == "DUNNO"


def test_a_row_made_by_mail_does_not_open_a_private_address(store, policy):
    # What the ingester stores if mail got through while the policy service was
    # down (fail-open): no token, nobody can read it, and it must not make the
    # address live afterwards.
    add_mailbox("leaked@priv.test", "priv.test", expires_in=None, token=False)
    assert policy.check(attrs(recipient="leaked@priv.test")) == "550 5.1.1 no such mailbox"


def test_an_account_with_a_password_and_no_token_yet_receives(store, policy):
    add_mailbox("account@priv.test", "priv.test", token=False, password=True)
    assert policy.check(attrs(recipient="account@priv.test")) == "DUNNO"


def test_public_domain_takes_anything(policy):
    assert policy.check(attrs(recipient="anything@pub.test")) == "DUNNO"
    assert policy.check(attrs(recipient="Any.Thing@deep.sub.pub.test", instance="i2")) == "DUNNO"


def test_private_domain_with_subdomains(store, policy):
    add_mailbox("a@q7.sub.test", "sub.test")
    assert policy.check(attrs(recipient="a@q7.sub.test")) == "DUNNO"
    assert policy.check(attrs(recipient="b@q7.sub.test")) == "550 5.1.1 no such mailbox"
    assert policy.check(attrs(recipient="a@sub.test")) == "550 5.1.1 no such mailbox"


def test_declared_size(policy):
    assert policy.check(attrs(size=10_000)) == "DUNNO"
    assert policy.check(attrs(size=10_001, instance="i2")) == "552 5.3.4 message too large"
    assert policy.check(attrs(size="", instance="i3")) == "DUNNO"
    assert policy.check(attrs(size="garbage", instance="i4")) == "DUNNO"
    # An unknown mailbox is the first reason given.
    assert policy.check(attrs(size=10**9, recipient="x@priv.test")) == "550 5.1.1 no such mailbox"
    assert policy.check(attrs(size=10**9, recipient="x@pub.test")) == "552 5.3.4 message too large"


def test_recipients_per_message(policy):
    for i in range(3):
        assert policy.check(attrs(instance="m", recipient=f"r{i}@pub.test")) == "DUNNO"
    assert policy.check(attrs(instance="m", recipient="r3@pub.test")) == "452 4.5.3 too many recipients"
    assert policy.check(attrs(instance="m", recipient="r4@pub.test")) == "452 4.5.3 too many recipients"
    # Refused recipients do not count.
    assert policy.check(attrs(instance="n", recipient="nobody@priv.test")) == "550 5.1.1 no such mailbox"
    for i in range(3):
        assert policy.check(attrs(instance="n", recipient=f"r{i}@pub.test")) == "DUNNO"
    assert policy.check(attrs(instance="n", recipient=LIVE)) == "452 4.5.3 too many recipients"


def test_rate_per_client_and_window(policy, clock):
    refusal = "450 4.7.1 too many messages from 192.0.2.1, try again later"
    for i in range(3):
        assert policy.check(attrs(instance=f"m{i}")) == "DUNNO"
        clock.t += 1
    assert policy.check(attrs(instance="m3")) == refusal
    # More recipients of a message already counted are not new messages.
    assert policy.check(attrs(instance="m2", recipient="x@pub.test")) == "DUNNO"
    # Another client has its own count.
    assert policy.check(attrs(instance="other", client_address="198.51.100.7")) == "DUNNO"
    # Retrying while refused does not extend the penalty.
    for i in range(20):
        assert policy.check(attrs(instance=f"retry{i}")) == refusal
    clock.t = 1000.0 + 9.999
    assert policy.check(attrs(instance="m4")) == refusal
    clock.t = 1000.0 + 10.0  # the window opened at the first message is over
    for i in range(3):
        assert policy.check(attrs(instance=f"w2-{i}")) == "DUNNO"
    assert policy.check(attrs(instance="w2-3")) == refusal


def test_refused_recipients_do_not_use_up_the_rate(policy):
    for i in range(10):
        assert policy.check(attrs(instance=f"u{i}", recipient="nobody@priv.test")) == "550 5.1.1 no such mailbox"
        assert policy.check(attrs(instance=f"s{i}", size=10**9)) == "552 5.3.4 message too large"
    for i in range(3):
        assert policy.check(attrs(instance=f"m{i}")) == "DUNNO"


def test_requests_without_instance_or_client(policy):
    assert policy.check(attrs(instance="", client_address="")) == "DUNNO"
    assert policy.check(attrs(instance="", client_address="")) == "DUNNO"
    assert policy.check(attrs(instance="", client_address="")) == "DUNNO"
    assert policy.check(attrs(instance="", client_address="")).startswith("450 4.7.1 too many messages from unknown")


def test_state_is_bounded(store, clock):
    policy = make_policy(store, clock, rate_limit=1000, max_entries=5, instance_ttl=60.0)
    for i in range(50):
        assert policy.check(attrs(instance=f"m{i}", client_address=f"10.0.0.{i}")) == "DUNNO"
        assert len(policy.instances) <= 5 and len(policy.clients) <= 5
    # Kept: the most recent ones.
    assert list(policy.instances) == [f"m{i}" for i in range(45, 50)]


def test_state_expires(store, clock):
    policy = make_policy(store, clock, rate_limit=2, rate_window=10.0, instance_ttl=60.0)
    for i in range(20):
        policy.check(attrs(instance=f"m{i}", client_address=f"10.0.0.{i}"))
    assert len(policy.instances) == 20 and len(policy.clients) == 20
    clock.t += 10
    policy.check(attrs(instance="late", client_address="10.1.1.1"))
    assert list(policy.clients) == ["10.1.1.1"]  # windows over: forgotten
    assert len(policy.instances) == 21
    clock.t += 60
    policy.check(attrs(instance="later", client_address="10.1.1.2"))
    assert list(policy.instances) == ["later"]
    # A message forgotten after its TTL starts its count again (and counts as new).
    assert policy.check(attrs(instance="m0", client_address="10.0.0.0")) == "DUNNO"


def test_domain_map_is_cached_for_a_few_seconds(store, clock):
    policy = make_policy(store, clock, domains_ttl=5.0)
    assert policy.check(attrs(recipient="x@new.test")) == "DUNNO"  # not ours (yet)
    store.sync_domains([("priv.test", False, "private"), ("pub.test", True, "public"),
                        ("sub.test", True, "private"), ("new.test", False, "private")])
    assert policy.check(attrs(recipient="x@new.test", instance="i2")) == "DUNNO"  # cached
    clock.t += 5
    assert policy.check(attrs(recipient="x@new.test", instance="i3")) == "550 5.1.1 no such mailbox"


def test_a_database_failure_answers_the_default_action(store, clock, caplog):
    policy = make_policy(store, clock, error_action="DEFER_IF_PERMIT 4.3.0 try again")
    policy._sql = "SELECT nothing FROM no_such_table WHERE x = ?"
    assert policy.check(attrs(recipient="x@priv.test")) == "DEFER_IF_PERMIT 4.3.0 try again"
    assert policy.check(attrs(recipient="x@priv.test")) == "DEFER_IF_PERMIT 4.3.0 try again"
    assert sum("policy check failed" in r.message for r in caplog.records) == 1  # not once per request
    # Public domains need no lookup.
    assert policy.check(attrs(recipient="x@pub.test")) == "DUNNO"


def test_from_settings(store):
    from mtasidecar.config import load
    settings = load(environ={"MTASIDECAR_POLICY_RATE_LIMIT": "7", "MTASIDECAR_POLICY_RATE_WINDOW": "3",
                             "MTASIDECAR_POLICY_MAX_RECIPIENTS": "9", "MTASIDECAR_SMTP_MESSAGE_SIZE_LIMIT": "2048",
                             "MTASIDECAR_POLICY_DEFAULT_ACTION": "DEFER_IF_PERMIT 4.3.0 later"})
    p = P.Policy.from_settings(store.db, settings)
    assert (p.rate_limit, p.rate_window, p.max_recipients, p.message_size_limit, p.error_action) == (
        7, 3.0, 9, 2048, "DEFER_IF_PERMIT 4.3.0 later")


# -- SPF at RCPT: domains with reject_spf_fail ----------------------------------------------

SPF_FAIL = "550 5.7.23 SPF validation failed"


class FakeSpf:
    """SPF verdicts by the sender's domain (the HELO name for a null sender); records calls.

    ``gate``: when set, each call waits for it (a slow DNS server)."""

    def __init__(self, verdicts: dict[str, str], gate: threading.Event | None = None):
        self.verdicts, self.gate = verdicts, gate
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, ip: str, sender: str, helo: str) -> str:
        self.calls.append((ip, sender, helo))
        if self.gate is not None:
            assert self.gate.wait(10)
        return self.verdicts.get(sender.rpartition("@")[2] if sender else helo, "none")


VERDICTS = {"fail.example": "fail", "soft.example": "softfail", "pass.example": "pass",
            "temp.example": "temperror", "perm.example": "permerror", "neutral.example": "neutral",
            "bad-helo.example": "fail"}


def spf_policy(store, clock, spf=None, **kw) -> P.Policy:
    # pub.test and sub.test ask for SPF refusals; priv.test does not.
    return make_policy(store, clock, spf_reject=["pub.test", "SUB.test"], spf_check=spf or FakeSpf(VERDICTS), **kw)


def test_spf_fail_is_refused_where_the_domain_asks(store, clock):
    policy = spf_policy(store, clock)
    assert policy.check(attrs(recipient="x@pub.test", sender="a@fail.example")) == SPF_FAIL
    assert policy.check(attrs(recipient="x@y.sub.test", sender="a@fail.example")) == "550 5.1.1 no such mailbox"
    add_mailbox("box@sub.test", "sub.test")
    assert policy.check(attrs(recipient="box@sub.test", sender="a@fail.example")) == SPF_FAIL
    # priv.test did not ask: SPF is not even evaluated.
    calls = len(policy.spf_check.calls)
    assert policy.check(attrs(recipient=LIVE, sender="a@fail.example", instance="i9")) == "DUNNO"
    assert len(policy.spf_check.calls) == calls


@pytest.mark.parametrize("domain", ["soft.example", "pass.example", "temp.example", "perm.example",
                                    "neutral.example", "none.example"])
def test_every_other_spf_result_goes_on(store, clock, domain):
    policy = spf_policy(store, clock)
    assert policy.check(attrs(recipient="x@pub.test", sender=f"a@{domain}")) == "DUNNO"


def test_null_sender_is_judged_by_its_helo_name(store, clock):
    policy = spf_policy(store, clock)
    assert policy.check(attrs(recipient="x@pub.test", sender="", helo_name="bad-helo.example")) == SPF_FAIL
    assert policy.check(attrs(recipient="x@pub.test", sender="", helo_name="pass.example",
                              instance="i2")) == "DUNNO"


def test_unknown_mailboxes_and_sizes_are_refused_before_spf_is_asked(store, clock):
    policy = spf_policy(store, clock)
    assert policy.check(attrs(recipient="x@y.sub.test", sender="a@fail.example")) == "550 5.1.1 no such mailbox"
    assert policy.check(attrs(recipient="x@pub.test", sender="a@fail.example", size=10**9)) == \
        "552 5.3.4 message too large"
    assert policy.spf_check.calls == []


def test_spf_verdicts_are_cached_per_client_sender_and_helo(store, clock):
    spf = FakeSpf(VERDICTS)
    policy = spf_policy(store, clock, spf)
    for rcpt in ("a@pub.test", "b@pub.test", "c@pub.test"):  # one message, three recipients
        assert policy.check(attrs(recipient=rcpt, sender="a@fail.example")) == SPF_FAIL
    for i in range(3):  # and the next messages of the same sender
        assert policy.check(attrs(recipient="a@pub.test", sender="A@Fail.Example", instance=f"n{i}")) == SPF_FAIL
    assert spf.calls == [("192.0.2.1", "a@fail.example", "sender.example")]
    # Another client, another address of the domain (macros may use it), another HELO: asked again.
    policy.check(attrs(recipient="a@pub.test", sender="a@fail.example", client_address="192.0.2.2"))
    policy.check(attrs(recipient="a@pub.test", sender="b@fail.example"))
    policy.check(attrs(recipient="a@pub.test", sender="a@fail.example", helo_name="other.example"))
    assert len(spf.calls) == 4
    # temperror is never kept: the next recipient asks again.
    for _ in range(2):
        assert policy.check(attrs(recipient="a@pub.test", sender="a@temp.example", instance="t")) == "DUNNO"
    assert len(spf.calls) == 6
    # A kept verdict lasts SPF_CACHE_TTL seconds.
    clock.t += P.SPF_CACHE_TTL
    assert policy.check(attrs(recipient="a@pub.test", sender="a@fail.example")) == SPF_FAIL
    assert len(spf.calls) == 7


def test_spf_cache_is_bounded(store, clock):
    policy = spf_policy(store, clock, max_entries=5, rate_limit=1000)
    for i in range(50):
        policy.check(attrs(recipient="a@pub.test", sender=f"u{i}@pass.example", instance=f"m{i}"))
    assert len(policy.spf_results) == 5


def test_spf_refusals_do_not_use_up_the_rate(store, clock):
    policy = spf_policy(store, clock)  # rate_limit=3
    for i in range(10):
        assert policy.check(attrs(recipient="a@pub.test", sender="a@fail.example", instance=f"f{i}")) == SPF_FAIL
    for i in range(3):
        assert policy.check(attrs(recipient="a@pub.test", sender="a@pass.example", instance=f"p{i}")) == "DUNNO"
    assert policy.check(attrs(recipient="a@pub.test", sender="a@pass.example", instance="p3")).startswith("450 4.7.1")


def test_a_failing_spf_check_accepts(store, clock, caplog):
    def broken(ip, sender, helo):
        raise RuntimeError("bug")

    policy = spf_policy(store, clock, broken)
    assert policy.check(attrs(recipient="a@pub.test", sender="a@fail.example")) == "DUNNO"
    assert "SPF check failed" in caplog.text


def test_no_spf_work_without_reject_domains(store, clock):
    policy = make_policy(store, clock)
    assert policy.spf_reject == frozenset() and policy.spf_check is None
    assert policy.check(attrs(recipient="a@pub.test", sender="a@fail.example")) == "DUNNO"


def test_from_settings_builds_the_spf_check_only_when_a_domain_asks(store):
    import json

    from mtasidecar.config import load
    plain = load(environ={"MTASIDECAR_DOMAINS": "pub.test"})
    assert P.Policy.from_settings(store.db, plain).spf_check is None
    settings = load(environ={
        "MTASIDECAR_DOMAINS": json.dumps([{"name": "pub.test", "mode": "public", "reject_spf_fail": True},
                                          {"name": "priv.test"}]),
        "MTASIDECAR_DNS_SERVERS": "127.0.0.1:5399", "MTASIDECAR_DNS_TIMEOUT": "0.5",
        "MTASIDECAR_POLICY_SPF_BUDGET": "1.5"})
    p = P.Policy.from_settings(store.db, settings)
    try:
        assert p.spf_reject == frozenset({"pub.test"})
        assert isinstance(p.spf_check, P.SpfCheck) and p.spf_check.budget == 1.5
        assert p.spf_check.auth.dns.timeout == 0.5
    finally:
        p.close()


# Through the server: the SPF check runs off the event loop, answers stay in order.

def test_a_slow_spf_check_holds_up_no_other_connection(store, clock):
    gate = threading.Event()
    spf = FakeSpf(VERDICTS, gate)
    st = ServerThread(spf_policy(store, clock, spf))
    slow, fast = Client(st.address), Client(st.address)
    try:
        slow.send(request(recipient="a@pub.test", sender="a@fail.example"))
        deadline = time.monotonic() + 5
        while not spf.calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        assert fast.ask(recipient=LIVE, instance="other") == "DUNNO"
        assert fast.ask(recipient="nobody@priv.test", instance="i3") == "550 5.1.1 no such mailbox"
        assert time.monotonic() - t0 < 5
        gate.set()
        assert slow.answer() == SPF_FAIL
    finally:
        gate.set()
        slow.close()
        fast.close()
        st.stop()


def test_requests_behind_an_spf_check_are_answered_in_order(store, clock):
    spf = FakeSpf(VERDICTS, threading.Event())
    st = ServerThread(spf_policy(store, clock, spf))
    c = Client(st.address)
    try:
        c.send(request(instance="a", recipient="x@pub.test", sender="a@fail.example")
               + request(instance="b", recipient="nobody@priv.test")
               + request(instance="c", recipient="x@pub.test", sender="a@soft.example")
               + b"garbage\n\n"
               + request(instance="d", recipient=LIVE))
        time.sleep(0.2)
        spf.gate.set()
        assert [c.answer() for _ in range(5)] == [
            SPF_FAIL, "550 5.1.1 no such mailbox", "DUNNO", P.MALFORMED, "DUNNO"]
        assert [call[1] for call in spf.calls] == ["a@fail.example", "a@soft.example"]
        # The connection goes on as before.
        assert c.ask(instance="e", recipient="y@pub.test", sender="a@fail.example") == SPF_FAIL
    finally:
        spf.gate.set()
        c.close()
        st.stop()


def test_too_many_requests_behind_an_spf_check_close_the_connection(store, clock):
    gate = threading.Event()
    st = ServerThread(spf_policy(store, clock, FakeSpf(VERDICTS, gate)))
    c = Client(st.address)
    try:
        c.send(request(recipient="x@pub.test", sender="a@fail.example")
               + request(recipient=LIVE) * (P.MAX_BACKLOG + 1))
        assert c.closed()
    finally:
        gate.set()
        c.close()
        st.stop()


# With pyspf and a real DNS server on loopback.

SPF_ZONE = {
    "fail.example": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]},
    "soft.example": {"TXT": ["v=spf1 ip4:198.51.100.0/24 ~all"]},
    "pass.example": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "inc.example": {"TXT": ["v=spf1 include:pass.example -all"]},
    "helo.example": {"TXT": ["v=spf1 -all"]},
    "nospf.example": {"A": ["192.0.2.1"]},
}


@pytest.fixture
def spf_dns():
    from tests.dnsserver import DNSTestServer
    server = DNSTestServer(SPF_ZONE).start()
    yield server
    server.stop()


@pytest.mark.parametrize("sender, helo, action", [
    ("a@fail.example", "sender.example", SPF_FAIL),
    ("a@soft.example", "sender.example", "DUNNO"),
    ("a@pass.example", "sender.example", "DUNNO"),
    ("a@inc.example", "sender.example", "DUNNO"),
    ("a@nospf.example", "sender.example", "DUNNO"),
    ("a@nxdomain.example", "sender.example", "DUNNO"),
    ("", "helo.example", SPF_FAIL),  # a bounce: the HELO identity
])
def test_real_spf(store, clock, spf_dns, sender, helo, action):
    check = P.SpfCheck([spf_dns.address], timeout=1.0, budget=2.0, hostname="mx.test")
    try:
        policy = spf_policy(store, clock, check)
        assert policy.check(attrs(recipient="x@pub.test", sender=sender, helo_name=helo,
                                  client_address="192.0.2.1")) == action
    finally:
        check.close()


def test_real_spf_over_the_server_with_slow_dns_accepts_within_the_budget(store, clock, spf_dns):
    spf_dns.delay = 3.0
    check = P.SpfCheck([spf_dns.address], timeout=0.3, budget=0.5, hostname="mx.test")
    st = ServerThread(spf_policy(store, clock, check))
    c = Client(st.address)
    try:
        t0 = time.monotonic()
        assert c.ask(recipient="x@pub.test", sender="a@fail.example", client_address="192.0.2.1") == "DUNNO"
        assert time.monotonic() - t0 < 2.0
        assert st.server.policy.spf_results == {}  # temperror is not kept
    finally:
        spf_dns.delay = 0
        c.close()
        st.stop()
        check.close()


# -- the process ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_policy_command_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
    env.update(MTASIDECAR_DATA_DIR=str(tmp_path), MTASIDECAR_DOMAINS="priv.test,public:pub.test",
               MTASIDECAR_POLICY_LISTEN=f"127.0.0.1:{port}", MTASIDECAR_POLICY_SOCKETMAP=f"127.0.0.1:{_free_port()}")
    proc = subprocess.Popen([sys.executable, "-m", "mtasidecar", "policy"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                c = Client(("127.0.0.1", port))
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "policy service did not start"
                time.sleep(0.05)
        assert c.ask(recipient="x@priv.test") == "550 5.1.1 no such mailbox"
        assert c.ask(recipient="x@pub.test") == "DUNNO"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert b"policy service listening on 127.0.0.1:" in err
        assert b"policy service stopped" in err
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
