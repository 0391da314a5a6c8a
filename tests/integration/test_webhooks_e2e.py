"""Webhooks end to end: mail through a real Postfix, stored by the real
ingester, POSTed by the real sender, to a receiver on loopback.

1. `mtasidecar dev` (which starts the sender with the other processes): a
   webhook made through the API gets a signed event per message after its
   receiver answered 503 for a while, and the deliveries route shows it.
2. The promise of issue 5 ("with the receiver down for a while, each event
   arrives once after it comes back, with a signature that verifies; an
   ingester restart in the middle loses none"): Postfix, `mtasidecar ingest`
   and `mtasidecar webhooks` as separate processes, configured exactly as in
   production (the environment from ``to_environ(settings)``), the ingester
   and the sender SIGKILLed and restarted while mail arrives and the receiver
   is down (its port refuses connections, then it answers 503), then the
   receiver comes up: every event arrives exactly once, counted by
   X-Mtasidecar-Delivery and by message, each signature verifies.

Short retry steps come from the settings (webhooks.backoff_base = 0.2 s,
backoff_max = 1 s). Needs root, postfix and postfix-pcre.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from mtasidecar.config import load, to_environ
from mtasidecar.mta.instance import PostfixInstance
from mtasidecar.store import Store
from tests.conftest import ROOT, free_port, service_dir, start_service, stop_service, wait_for
from tests.integration._service import crlf
from tests.unit.test_webhooks import Receiver, verify_snippet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

OPERATOR_TOKEN = "op-" + "w" * 32
OPERATOR_SECRET = "operator-secret-" + "o" * 20
SENDER = "noreply@origin.test"
FAST_RETRIES = {"MTASIDECAR_WEBHOOKS_ALLOW_PRIVATE": "true", "MTASIDECAR_WEBHOOKS_BACKOFF_BASE": "0.2",
                "MTASIDECAR_WEBHOOKS_BACKOFF_MAX": "1", "MTASIDECAR_WEBHOOKS_TIMEOUT": "2"}


def wire(marker: str, recipient: str) -> bytes:
    return crlf((f"From: Sign-up <{SENDER}>\nTo: {recipient}\nSubject: {marker}\n"
                 f"Message-ID: <{marker}@origin.test>\nMIME-Version: 1.0\n"
                 f"Content-Type: text/plain; charset=us-ascii\n\nYour code is 424242 ({marker}).\n").encode())


def send(port: int, items: list[tuple[str, str]], pause: float = 0.0) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="origin.test", timeout=60) as smtp:
        for marker, recipient in items:
            assert smtp.sendmail(SENDER, [recipient], wire(marker, recipient)) == {}
            if pause:
                time.sleep(pause)


class ClosedPort:
    """A port bound but not listening: connections to it are refused until
    ``release()`` hands it to the receiver."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def release(self) -> int:
        self.sock.close()
        return self.port


# -- 1. the dev service -------------------------------------------------------------------------

def test_dev_runs_the_sender_and_a_webhook_gets_each_message(tmp_path):
    base = service_dir("mtasidecar-hooks-")
    receiver = Receiver(default=503)
    env = {"MTASIDECAR_API_OPERATOR_TOKEN": OPERATOR_TOKEN, **FAST_RETRIES}
    svc = start_service(base / "data", [], env, private=["hooks.test"])
    try:
        r = svc.request("POST", "/api/v1/mailboxes", body=json.dumps({"domain": "hooks.test", "local_part": "alice"})
                        .encode(), headers={"Content-Type": "application/json"})
        assert r.status == 201, r.body
        box = r.json()
        auth = {"Authorization": f"Bearer {box['token']}"}
        r = svc.request("POST", f"/api/v1/mailboxes/{box['address']}/webhooks",
                        body=json.dumps({"url": receiver.url("/alice")}).encode(),
                        headers={**auth, "Content-Type": "application/json"})
        assert r.status == 201, r.body
        hook = r.json()

        svc.send(SENDER, [box["address"]], wire("first", box["address"]))
        wait_for(lambda: len(receiver.requests) >= 3, 30, what="three attempts against a 503")
        receiver.default = 200
        (got,) = wait_for(lambda: receiver.accepted(), 15, what="the event once the receiver is up")
        assert verify_snippet()(hook["secret"], got["headers"], got["body"])
        event = json.loads(got["body"])
        assert event["mailbox"] == box["address"] and event["message"]["subject"] == "first"
        assert {r["headers"]["X-Mtasidecar-Delivery"] for r in receiver.requests} == {event["delivery_id"]}
        deliveries = svc.get(f"/api/v1/mailboxes/{box['address']}/webhooks/{hook['id']}/deliveries",
                             headers=auth).json()["items"]
        wait_for(lambda: svc.get(f"/api/v1/mailboxes/{box['address']}/webhooks/{hook['id']}/deliveries",
                                 headers=auth).json()["items"][0]["status"] == "delivered", 5, what="the record")
        deliveries = svc.get(f"/api/v1/mailboxes/{box['address']}/webhooks/{hook['id']}/deliveries",
                             headers=auth).json()["items"]
        assert [(d["id"], d["status"], d["last_status_code"]) for d in deliveries] == \
            [(event["delivery_id"], "delivered", 200)]
        assert deliveries[0]["attempts"] == len(receiver.requests) >= 4

        # With the receiver up: from the SMTP 250 to the POST, Postfix's
        # delivery and the ingester included.
        latencies = []
        for i in range(5):
            before = len(receiver.requests)
            t0 = time.time()
            svc.send(SENDER, [box["address"]], wire(f"quick-{i}", box["address"]))
            wait_for(lambda: len(receiver.requests) > before, 10, 0.005, what="the webhook")
            latencies.append(receiver.requests[-1]["at"] - t0)
        print(f"\nSMTP 250 -> webhook POST: {', '.join(f'{x * 1000:.0f} ms' for x in sorted(latencies))}")
        assert max(latencies) < 3
        op = svc.get("/api/v1/admin/deliveries?status=delivered", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert op.status == 200 and len(op.json()["items"]) == 6
    finally:
        receiver.close()
        try:
            stop_service(svc)
        finally:
            for log in [base / "data-dev.log", base / "data" / "postfix" / "postfix.log"]:
                if log.exists():
                    shutil.copy(log, tmp_path / log.name)
            shutil.rmtree(base, ignore_errors=True)


# -- 2. receiver down, processes killed: each event once ---------------------------------------------

class Process:
    """``python -m mtasidecar <command>`` in its own process group (the
    ingester's parser workers go with it when it is SIGKILLed)."""

    def __init__(self, command: str, env: dict, log_path: Path):
        self.command, self.env, self.log_path = command, env, log_path
        self.proc: subprocess.Popen | None = None
        self.groups: list[int] = []
        self.kills = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mtasidecar", self.command], env=self.env, cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(self.proc.pid)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.kills += 1
        _killpg(self.proc.pid)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pgid in self.groups:
            _killpg(pgid)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_receiver_down_and_restarts_every_event_arrives_once(tmp_path):
    domain = "hooks.test"
    base = service_dir("mtasidecar-hooks-rig-")
    port = ClosedPort()
    settings = load(environ={}, overrides={
        "data_dir": str(base / "data"), "hostname": "mx.hooks.test",
        "domains": [{"name": domain, "mode": "public"}],
        "auth": {"enabled": False},  # sender checks (DNS) are beside the point
        "webhooks": {"url": port.url("/operator"), "secret": OPERATOR_SECRET, "allow_private": True,
                     "backoff_base": 0.2, "backoff_max": 1.0, "timeout": 2.0},
    })
    db_path = base / "data" / "mtasidecar.db"
    # Mailbox webhooks: r0 has one, r1 two, r2 and r3 none (the operator's URL gets everything).
    store = Store(settings.database_url)
    store.setup()
    store.sync_domains([(domain, False, "public")])
    secrets = {"/operator": OPERATOR_SECRET}
    for address, paths in ((f"r0@{domain}", ["/r0"]), (f"r1@{domain}", ["/r1a", "/r1b"])):
        mailbox = store.create_mailbox(address, domain, None, None)
        for path in paths:
            secrets[path] = f"secret-for-{path}-0123456789"
            assert store.create_webhook(mailbox.id, port.url(path), secrets[path], 10)
    store.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
    env.update(to_environ(settings))
    ingester = Process("ingest", env, tmp_path / "ingest.log")
    sender = Process("webhooks", env, tmp_path / "webhooks.log")
    postfix = PostfixInstance(base / "postfix", free_port(), [(domain, False)], settings.maildir_path,
                              hostname="mx.hooks.test")
    receiver = None
    run = uuid.uuid4().hex[:6]
    batches = [[(f"hook-{run}-{b}-{i:02d}", f"r{i % 4}@{domain}") for i in range(20)] for b in range(2)]
    markers = {m: rcpt for batch in batches for m, rcpt in batch}

    def db(sql: str, *args):
        try:
            with sqlite3.connect(db_path, timeout=30) as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []

    def stored() -> int:
        return db("SELECT COUNT(*) FROM message")[0][0]

    try:
        postfix.start()
        ingester.start()
        sender.start()
        t0 = time.monotonic()

        # Batch 1, the ingester SIGKILLed after the first few messages are stored.
        mailer = threading.Thread(target=send, args=(postfix.smtp_port, batches[0], 0.05))
        mailer.start()
        wait_for(lambda: stored() >= 3, 30, 0.01, what="the first messages stored")
        ingester.kill()
        # The sender tries the first events against the closed port, then dies too.
        wait_for(lambda: db("SELECT COUNT(*) FROM delivery WHERE attempts > 0")[0][0] >= 3, 30, 0.02,
                 what="attempts against the closed port")
        sender.kill()
        mailer.join()
        ingester.start()
        sender.start()

        # Batch 2, the ingester killed once more while it arrives.
        mailer = threading.Thread(target=send, args=(postfix.smtp_port, batches[1], 0.05))
        mailer.start()
        first = stored()
        wait_for(lambda: stored() >= first + 3, 30, 0.01, what="batch 2 arriving")
        ingester.kill()
        mailer.join()
        ingester.start()

        expected = 40 + 10 * 1 + 10 * 2
        wait_for(lambda: stored() == 40, 30, 0.05, what="all 40 messages stored")
        wait_for(lambda: db("SELECT COUNT(*) FROM delivery")[0][0] == expected, 10, what="all outbox rows")
        # Everything tried at least once while the receiver was down, nothing delivered.
        wait_for(lambda: db("SELECT COUNT(*) FROM delivery WHERE attempts = 0")[0][0] == 0, 30, 0.05,
                 what="every event attempted")
        assert db("SELECT COUNT(*) FROM delivery WHERE status != 'pending'")[0][0] == 0
        down_for = time.monotonic() - t0

        # The receiver comes back: 503 for a second, then 200.
        receiver = Receiver(port=port.release(), default=503)
        time.sleep(1.0)
        receiver.default = 200
        up_at = time.monotonic()
        wait_for(lambda: len(receiver.accepted()) >= expected, 30, 0.05, what=f"{expected} events accepted")
        drained = time.monotonic() - up_at
        wait_for(lambda: db("SELECT COUNT(*) FROM delivery WHERE status = 'delivered'")[0][0] == expected, 10,
                 what="every delivery recorded")
        time.sleep(1.5)  # anything sent twice would arrive now

        accepted = receiver.accepted()
        by_delivery = collections.Counter(r["headers"]["X-Mtasidecar-Delivery"] for r in accepted)
        assert len(accepted) == expected, f"{len(accepted)} accepted, {expected} expected"
        assert max(by_delivery.values()) == 1, [d for d, n in by_delivery.items() if n > 1]
        rows = db("SELECT id, url, status, attempts, message_id FROM delivery")
        assert set(by_delivery) == {format(r[0], "024x") for r in rows}
        verify = verify_snippet()
        by_message = collections.Counter()
        for r in accepted:
            path = r["path"]
            assert verify(secrets[path], r["headers"], r["body"]), path
            event = json.loads(r["body"])
            marker = event["message"]["subject"]
            assert event["mailbox"] == markers[marker]
            assert event["delivery_id"] == r["headers"]["X-Mtasidecar-Delivery"]
            by_message[(path, marker)] += 1
        want = collections.Counter({("/operator", m): 1 for m in markers})
        want.update({("/r0", m): 1 for m, rcpt in markers.items() if rcpt.startswith("r0@")})
        want.update({(p, m): 1 for m, rcpt in markers.items() if rcpt.startswith("r1@") for p in ("/r1a", "/r1b")})
        assert by_message == want
        assert all(status == "delivered" and attempts >= 2 for _id, _url, status, attempts, _m in rows)
        assert ingester.kills == 2 and sender.kills == 1
        print(f"\n{expected} events: receiver down {down_for:.1f} s (ingester killed twice, sender once); "
              f"all delivered {drained:.2f} s after it answered 200; "
              f"{sum(r[3] for r in rows)} attempts in all")
    finally:
        try:
            ingester.cleanup()
            sender.cleanup()
        finally:
            if receiver is not None:
                receiver.close()
            else:
                port.release()
            try:
                postfix.stop()
            finally:
                if postfix.log_path.exists():
                    shutil.copy(postfix.log_path, tmp_path / "postfix.log")
                shutil.rmtree(base, ignore_errors=True)
