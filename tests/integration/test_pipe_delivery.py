"""Pipe delivery: Postfix's pipe(8) runs `mtasidecar deliver`, then the ingester takes over.

pipe(8) runs the command as the delivery user (never root), so that user
must be able to execute the interpreter and read the code. `mtasidecar dev`
therefore runs a standalone copy of deliver.py with the system python3; the
production configuration (`mtasidecar postfix`) runs ``python -m mtasidecar
deliver``: both are tested here, the second wired by hand.

Needs root, postfix and postfix-pcre.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

import mtasidecar
from mtasidecar.config import load, to_environ
from mtasidecar.mta.instance import PostfixInstance, ensure_user
from mtasidecar.mta.render import PostfixError
from tests.conftest import ROOT, free_port, http, wait_for
from tests.integration._service import crlf, lf, passable_dir, running_service, split_delivered

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

SENDER = "pipe@sender.test"
PACKAGE_PARENT = str(Path(mtasidecar.__file__).resolve().parent.parent)
WIRE = crlf(
    "From: Pipe Tester <pipe@sender.test>\n"
    "To: MiXeD@Example.TEST, other@example.test\n"
    "Subject: =?UTF-8?Q?=C3=BCber_pipe?=\n"
    "Message-ID: <pipe-1@sender.test>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Grüße über pipe(8).\n"
    ".leading dot\n".encode("utf-8"))


def runs_as_delivery_user(python: str) -> bool:
    """Can the delivery user start ``python`` and import the deliver module?"""
    uid, gid = ensure_user()
    try:
        result = subprocess.run([python, "-c", "import mtasidecar.ingest.deliver"], user=uid, group=gid,
                                extra_groups=[], env={"PYTHONPATH": PACKAGE_PARENT}, cwd="/",
                                capture_output=True, timeout=60)
    except OSError:
        return False
    return result.returncode == 0


def deliver_interpreter() -> str | None:
    """An interpreter the delivery user can run `deliver` with: ours, else the system one."""
    for python in (sys.executable, "/usr/bin/python3"):
        if Path(python).exists() and runs_as_delivery_user(python):
            return python
    return None


def send(port: int, recipients: list[str], wire: bytes = WIRE) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        assert smtp.sendmail(SENDER, recipients, wire, mail_options=["BODY=8BITMIME"]) == {}


def check_delivered(svc_get, recipient: str, maildir: Path) -> bytes:
    """The one message of ``recipient`` over HTTP; returns its raw."""
    address = recipient.lower()

    def listed():
        r = svc_get(f"/api/v1/mailboxes/{address}/messages")
        return r.json()["items"] if r.status == 200 and r.json()["items"] else None

    try:
        [summary] = wait_for(listed, 60, 0.1, f"the message for {address}")
    except AssertionError as exc:
        spool = {sub: sorted(os.listdir(maildir / sub)) for sub in ("tmp", "new", "cur")}
        raise AssertionError(f"{exc}; Maildir: {spool}") from None
    doc = svc_get(summary["url"]).json()
    assert doc["subject"] == "über pipe"
    assert doc["text"] == "Grüße über pipe(8).\n.leading dot\n"
    assert doc["envelope"]["recipient"] == address
    assert doc["envelope"]["sender"] == SENDER
    assert (doc["envelope"]["client_ip"], doc["envelope"]["client_helo"]) == ("127.0.0.1", "client.test")
    raw = svc_get(summary["url"] + "/raw").body
    trace, rest = split_delivered(raw)
    assert rest == lf(WIRE)
    assert trace["return_path"] == SENDER.encode()
    assert trace["delivered_to"].decode().lower() == address
    assert trace["original_to"].decode().lower() == address
    return raw


def trace_shape(raw: bytes) -> tuple:
    """What the trace says, without what differs between two deliveries (queue id, date)."""
    trace, _ = split_delivered(raw)
    return (trace["return_path"], trace["original_to"].lower(), trace["delivered_to"].lower(),
            trace["helo"], trace["ip"], raw[:trace.end()].count(b"\n"))


# --- `mtasidecar dev` in pipe mode ---------------------------------------------


def test_dev_service_in_pipe_mode(tmp_path):
    with running_service(["example.test"], {"MTASIDECAR_SMTP_DELIVERY": "pipe"}, keep_log_in=tmp_path) as svc:
        master_cf = (svc.data_dir / "postfix" / "etc" / "master.cf").read_text()
        assert "argv=" in master_cf and "--maildir" in master_cf and "${recipient}" in master_cf
        recipients = ["MiXeD@Example.TEST", "other@example.test"]
        send(svc.smtp_port, recipients)
        piped = {r.lower(): check_delivered(svc.get, r, svc.maildir) for r in recipients}
        log = (svc.data_dir / "postfix" / "postfix.log").read_text()
        assert "relay=mtasidecar" in log and "status=sent" in log
        wait_for(lambda: not os.listdir(svc.maildir / "new"), 30, 0.05, "new/ to empty")
        assert svc.proc.poll() is None
    assert_same_trace_as_virtual(piped, recipients, tmp_path)


def assert_same_trace_as_virtual(piped: dict[str, bytes], recipients: list[str], tmp_path: Path) -> None:
    """The same trace headers, in the same order, as virtual(8) writes for the same mail."""
    virtual = virtual_delivery_of(WIRE, recipients, tmp_path)
    assert sorted(virtual) == sorted(piped)
    for address in piped:
        assert trace_shape(piped[address]) == trace_shape(virtual[address])
        assert split_delivered(piped[address])[1] == split_delivered(virtual[address])[1]


# --- the same, wired by hand ----------------------------------------------------


class PipeRig:
    """PostfixInstance(delivery="pipe") + `mtasidecar ingest` + `mtasidecar api`, as `dev` wires
    them, but with the command `mtasidecar postfix` configures: ``python -m mtasidecar deliver``."""

    def __init__(self, base: Path, logs: Path, python: str):
        self.base, self.logs = base, logs
        self.settings = load(environ={}, overrides={
            "data_dir": str(base / "data"), "hostname": "mx.pipe.test",
            "domains": [{"name": "example.test", "subdomains": False, "mode": "public"}],
            "smtp": {"delivery": "pipe"}, "api": {"port": free_port(), "workers": 1},
        })
        maildir = self.settings.maildir_path.absolute()
        self.postfix = PostfixInstance(
            base / "postfix", free_port(), [("example.test", False)], maildir, hostname="mx.pipe.test",
            delivery="pipe",
            # pipe(8) gives the command a minimal environment: PYTHONPATH via env(1).
            deliver_argv=["/usr/bin/env", f"PYTHONPATH={PACKAGE_PARENT}", python, "-m", "mtasidecar",
                          "deliver", "--maildir", str(maildir)],
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
        self.env.update(to_environ(self.settings))
        self.procs: list[subprocess.Popen] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api.port}"

    def get(self, path: str):
        return http("GET", self.base_url + path)

    def _spawn(self, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{args[0]}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "mtasidecar", *args], env=self.env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def __enter__(self) -> PipeRig:
        try:
            self.postfix.start()
            self._spawn("ingest")
            self._spawn("api")

            def healthy():
                assert all(p.poll() is None for p in self.procs), "ingest or api exited"
                try:
                    return self.get("/healthz").status == 200
                except OSError:
                    return False

            wait_for(healthy, 60, 0.1, "the API to come up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in self.procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # helpers (gunicorn workers, parse pool)
                except ProcessLookupError:
                    pass
        finally:
            try:
                self.postfix.stop()
            finally:
                if self.postfix.log_path.exists():
                    shutil.copy(self.postfix.log_path, self.logs / "postfix.log")
                shutil.rmtree(self.base, ignore_errors=True)
        assert self.postfix.processes() == []


def virtual_delivery_of(wire: bytes, recipients: list[str], tmp_path: Path) -> dict[str, bytes]:
    """The same message through virtual(8) (Postfix only): recipient → file bytes."""
    base = passable_dir("mtasidecar-virtual-")
    instance = PostfixInstance(base / "postfix", free_port(), [("example.test", False)], base / "Maildir",
                               hostname="mx.pipe.test")
    try:
        instance.start()
        send(instance.smtp_port, recipients, wire)
        files = wait_for(lambda: (lambda f: f if len(f) == len(recipients) else None)(
            list((base / "Maildir" / "new").iterdir())), 30, 0.05, "virtual(8) deliveries")
        out = {}
        for path in files:
            data = path.read_bytes()
            out[split_delivered(data)[0]["delivered_to"].decode().lower()] = data
        return out
    finally:
        try:
            instance.stop()
        finally:
            if instance.log_path.exists():
                shutil.copy(instance.log_path, tmp_path / "virtual-postfix.log")
            shutil.rmtree(base, ignore_errors=True)


def test_pipe_transport_by_hand(tmp_path):
    python = deliver_interpreter()
    if python is None:
        pytest.skip("no Python the delivery user can run (neither ours nor /usr/bin/python3)")
    recipients = ["MiXeD@Example.TEST", "other@example.test"]
    with PipeRig(passable_dir("mtasidecar-pipe-"), tmp_path, python) as rig:
        send(rig.postfix.smtp_port, recipients)
        piped = {r.lower(): check_delivered(rig.get, r, rig.settings.maildir_path) for r in recipients}
        # pipe(8) wrote through `deliver` into the Maildir, which the ingester emptied.
        wait_for(lambda: not os.listdir(rig.settings.maildir_path / "new"), 30, 0.05, "new/ to empty")
        assert not os.listdir(rig.settings.maildir_path / "tmp")
        log = rig.postfix.log_path.read_text()
        assert "relay=mtasidecar" in log and "status=sent" in log
        assert all(p.poll() is None for p in rig.procs)

    assert_same_trace_as_virtual(piped, recipients, tmp_path)


# --- `mtasidecar deliver` on its own ------------------------------------------------


def run_deliver(args: list[str], stdin: bytes, python: str = sys.executable, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "mtasidecar", "deliver", *args], input=stdin, capture_output=True,
                          timeout=60, cwd=ROOT, **kw)


def test_deliver_tempfails_without_a_maildir():
    result = run_deliver(["--maildir", "/nonexistent", "a@sender.test", "b@example.test"], b"Subject: x\n\nx\n")
    assert result.returncode == 75, result  # EX_TEMPFAIL: Postfix keeps the message and retries
    assert b"/nonexistent" in result.stderr


def test_deliver_tempfails_on_a_maildir_it_cannot_write(tmp_path):
    python = deliver_interpreter()
    if python is None:
        pytest.skip("no Python the delivery user can run")
    uid, gid = ensure_user()
    base = passable_dir("mtasidecar-ro-")
    try:
        maildir = base / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, mode=0o755)  # root's: not writable for uid
        result = run_deliver(["--maildir", str(maildir), "a@sender.test", "b@example.test"], b"Subject: x\n\nx\n",
                             python=python, user=uid, group=gid, extra_groups=[],
                             env={"PYTHONPATH": PACKAGE_PARENT})
        assert result.returncode == 75, result
        assert b"Permission denied" in result.stderr
        assert not any(list((maildir / sub).iterdir()) for sub in ("tmp", "new", "cur"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_deliver_usage_and_success(tmp_path):
    assert run_deliver([], b"").returncode == 64  # EX_USAGE
    assert run_deliver(["--maildir", str(tmp_path)], b"").returncode == 64
    maildir = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    body = b"Subject: by hand\n\nno trace headers\n"
    result = run_deliver(["--maildir", str(maildir), "s@sender.test", "R@Example.Test", "127.0.0.1", "h"], body)
    assert result.returncode == 0, result
    [path] = list((maildir / "new").iterdir())
    assert not list((maildir / "tmp").iterdir())
    # Without pipe(8)'s flags the envelope from argv is prepended.
    assert path.read_bytes() == b"Return-Path: <s@sender.test>\nDelivered-To: r@example.test\n" + body
    # With them (the message starts with Postfix's trace), the bytes are kept as they are.
    traced = b"Return-Path: <s@sender.test>\nX-Original-To: x@example.test\nDelivered-To: x@example.test\n" + body
    assert run_deliver(["--maildir", str(maildir), "s@sender.test", "x@example.test"], traced).returncode == 0
    assert sorted(p.read_bytes() for p in (maildir / "new").iterdir()) == sorted([path.read_bytes(), traced])


def test_instance_refuses_a_deliver_command_the_user_cannot_run(tmp_path):
    # tmp_path's parents are 0700 root: the delivery user cannot reach this script.
    script = tmp_path / "deliver"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    base = passable_dir("mtasidecar-unrunnable-")
    instance = PostfixInstance(base / "postfix", free_port(), [("example.test", False)], base / "Maildir",
                               delivery="pipe", deliver_argv=[str(script)])
    try:
        with pytest.raises(PostfixError, match="deliver"):
            instance.start()
    finally:
        try:
            instance.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
    assert instance.processes() == []

