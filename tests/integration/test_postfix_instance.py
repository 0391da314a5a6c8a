"""A real private Postfix: catch-all domains, no relay, raw bytes kept, pipe mode.

Needs root and the Debian packages postfix and postfix-pcre.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import socket
import socketserver
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mtasidecar.mta.instance import PostfixInstance, ensure_user
from mtasidecar.mta.render import PostfixError, postconf

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master must run as root"),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="postfix is not installed"),
]

DOMAINS = [("example.test", True), ("other.test", False)]
SENDER = "s@sender.test"
HELO = "client.test"
HOSTNAME = "mx.mtasidecar.test"

# A message Postfix would have changed with its default settings: a display
# name with a comma, an empty group, an empty list element, no Message-ID
# and no Date. Plus a leading dot (SMTP dot-stuffing) and trailing blanks.
RAW = textwrap.dedent("""\
    From: "A, B" <a@b.test>
    To: undisclosed-recipients:;
    Cc: c@d.test, , e@f.test
    Subject: raw bytes
    MIME-Version: 1.0
    Content-Type: text/plain; charset=utf-8

    First line.
    .a line with a leading dot
    trailing blanks   \t
    """).encode()
# On the wire lines end in CRLF; smtplib sends bytes as they are (a bare LF
# would even make it append an extra CRLF). Postfix stores lines with LF.
WIRE = RAW.replace(b"\n", b"\r\n")

# What Postfix prepends on delivery, in this order; the Received line is the
# one our ingester trusts for the client address and HELO.
PREPENDED = re.compile(
    rb"Return-Path: <(?P<return_path>[^>]*)>\n"
    rb"X-Original-To: (?P<original_to>\S+)\n"
    rb"Delivered-To: (?P<delivered_to>\S+)\n"
    rb"Received: from (?P<helo>\S+) \((?:\S+ )?\[(?P<ip>[0-9.]+)\]\)\n"
    rb"\tby (?P<by>\S+) \(Postfix\) with ESMTP id (?P<queue_id>[0-9A-Za-z]+)"
    rb"(?:\n\tfor <(?P<for>[^>]+)>)?;\s+[^\n]+\n"  # "; date" or ";\n\tdate"
)


# --- fixtures ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def passable_dir() -> Path:
    """A fresh directory that the postfix and delivery users can pass through.

    pytest's tmp_path lies under a 0700 directory, which neither the master
    (it opens its lock file as the postfix user) nor virtual(8) (it writes
    as the delivery user) can enter; the instance refuses such directories.
    Each instance's log is copied into tmp_path at the end for post-mortems.
    """
    path = Path(tempfile.mkdtemp(prefix="mtasidecar-test-"))
    path.chmod(0o755)
    return path


class Instances:
    """Starts instances and, at the end, stops them all and checks for leaks."""

    def __init__(self, workdir: Path, keep_logs: Path) -> None:
        self.workdir, self.keep_logs, self.started = workdir, keep_logs, []

    def start(self, **options) -> PostfixInstance:
        name = f"pf{len(self.started)}"
        options.setdefault("domains", DOMAINS)
        options.setdefault("maildir", self.workdir / name / "Maildir")
        instance = PostfixInstance(self.workdir / name / "postfix", free_port(), hostname=HOSTNAME, **options)
        self.started.append(instance)
        instance.start()
        return instance

    def stop_all(self) -> None:
        errors = []
        for instance in self.started:
            try:
                instance.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        for instance in self.started:
            if instance.log_path.exists():
                shutil.copy(instance.log_path, self.keep_logs / f"{instance.base_dir.parent.name}.log")
            assert _pgrep(instance.base_dir) == [], "processes naming the instance left behind"
            assert instance.processes() == [], "Postfix processes left behind"
        assert not errors, errors


@pytest.fixture
def workdir():
    path = passable_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_instance(tmp_path, workdir):
    """Factory: start an instance; every one is stopped (even on failure)."""
    instances = Instances(workdir, keep_logs=tmp_path)
    try:
        yield instances.start
    finally:
        instances.stop_all()


@pytest.fixture(scope="module")
def shared_instance(tmp_path_factory):
    """One instance for the many RCPT checks, which leave nothing behind."""
    workdir = passable_dir()
    instances = Instances(workdir, keep_logs=tmp_path_factory.mktemp("shared"))
    try:
        yield instances.start()
    finally:
        try:
            instances.stop_all()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _pgrep(base_dir: Path) -> list[str]:
    result = subprocess.run(["pgrep", "-f", str(base_dir)], capture_output=True, text=True)
    return result.stdout.split()


# --- helpers -----------------------------------------------------------------


def smtp(instance: PostfixInstance) -> smtplib.SMTP:
    client = smtplib.SMTP(*instance.address, local_hostname=HELO, timeout=10)
    client.ehlo()
    return client


def rcpt_reply(instance: PostfixInstance, recipient: str) -> tuple[int, bytes]:
    with smtp(instance) as client:
        assert client.mail(SENDER)[0] == 250
        return client.rcpt(recipient)


def wait_for_files(directory: Path, count: int, pattern: str = "*", timeout: float = 10) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(directory.glob(pattern))
        if len(files) >= count or time.monotonic() > deadline:
            return files
        time.sleep(0.05)


def split_delivered(data: bytes) -> tuple[re.Match[bytes], bytes]:
    """Postfix's prepended trace headers, and the rest: the message as sent."""
    match = PREPENDED.match(data)
    assert match, data[:400]
    return match, data[match.end():]


# --- tests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipient, accepted",
    [
        ("a@example.test", True),
        ("b@deep.sub.example.test", True),  # subdomains allowed
        ("A.Mixed@Sub.EXAMPLE.test", True),  # domains match case-insensitively
        ("c@other.test", True),
        ("d@x.other.test", False),  # other.test takes no subdomains
        ("e@foreign.test", False),  # not ours: no relaying, even from loopback
        ("f@example.test.evil.com", False),  # look-alikes
        ("g@evilexample.test", False),
        ("h@example-test", False),  # the dot is escaped, not "any character"
        ("i@exampleXtest", False),
    ],
)
def test_rcpt_accepts_only_our_domains(shared_instance, recipient, accepted):
    code, message = rcpt_reply(shared_instance, recipient)
    if accepted:
        assert code == 250, message
    else:
        assert code == 554 and message.endswith(b"Relay access denied"), message


def test_maildir_delivery_keeps_the_message_as_sent(start_instance):
    instance = start_instance()
    recipients = ["a@example.test", "b@deep.sub.example.test", "c@other.test"]
    foreign = ["d@x.other.test", "e@foreign.test", "f@example.test.evil.com"]
    with smtp(instance) as client:
        refused = client.sendmail(SENDER, recipients + foreign, WIRE)
    assert sorted(refused) == sorted(foreign)
    assert {code for code, _ in refused.values()} == {554}

    # One copy per accepted recipient, each telling whom it was for.
    files = wait_for_files(instance.maildir / "new", len(recipients))
    time.sleep(0.3)  # a late extra copy would show up here
    files = sorted((instance.maildir / "new").iterdir())
    assert len(files) == len(recipients)
    delivered = {}
    for path in files:
        assert path.stat().st_uid == instance.uid
        trace, rest = split_delivered(path.read_bytes())
        assert trace["original_to"] == trace["delivered_to"]
        delivered[trace["delivered_to"].decode()] = (trace, rest)
    assert sorted(delivered) == sorted(recipients)

    for trace, rest in delivered.values():
        assert trace["return_path"] == SENDER.encode()
        assert (trace["helo"], trace["ip"], trace["by"]) == (HELO.encode(), b"127.0.0.1", HOSTNAME.encode())
        # Byte for byte but for line ends: no Message-ID or Date added, no
        # address rewritten, the leading dot unstuffed.
        assert rest == RAW


def test_single_recipient_and_null_sender(start_instance):
    instance = start_instance()
    with smtp(instance) as client:
        client.sendmail(SENDER, ["solo@example.test"], WIRE)
        client.sendmail("", ["bounce@example.test"], WIRE)  # a bounce: MAIL FROM:<>
    files = wait_for_files(instance.maildir / "new", 2)
    traces = {}
    for path in files:
        trace, rest = split_delivered(path.read_bytes())
        assert rest == RAW
        traces[trace["delivered_to"]] = trace
    # With one recipient Postfix names it in the Received line.
    assert traces[b"solo@example.test"]["for"] == b"solo@example.test"
    assert traces[b"bounce@example.test"]["return_path"] == b""


STAND_IN_DELIVER = """\
#!/usr/bin/python3
# Stand-in for `mtasidecar deliver`: keep the arguments and stdin.
import json, os, sys
out = sys.argv[1]
base = os.path.join(out, str(os.getpid()))
with open(base + ".eml", "wb") as f:
    f.write(sys.stdin.buffer.read())
with open(base + ".tmp", "w") as f:
    json.dump({"argv": sys.argv[1:], "uid": os.getuid()}, f)
os.rename(base + ".tmp", base + ".json")  # written last: the test waits for it
"""


def piped_runs(out: Path, count: int) -> dict[str, dict]:
    """The stand-in's runs by recipient: its argv, uid and the message it read."""
    runs = {}
    for path in wait_for_files(out, count, "*.json"):
        run = json.loads(path.read_text())
        run["eml"] = path.with_suffix(".eml").read_bytes()
        runs[run["argv"][3]] = run
    return runs


def test_pipe_delivery_runs_deliver_once_per_recipient(start_instance, workdir):
    uid, gid = ensure_user("mtasidecar")
    out = workdir / "piped"
    out.mkdir()
    os.chown(out, uid, gid)
    script = workdir / "deliver-stand-in"
    script.write_text(STAND_IN_DELIVER)
    script.chmod(0o755)

    # deliver_argv is the whole command (like `mtasidecar deliver --opt X`);
    # the template appends the envelope.
    instance = start_instance(delivery="pipe", deliver_argv=[str(script), str(out), "deliver"])
    recipients = ["a@example.test", "b@deep.sub.example.test"]
    with smtp(instance) as client:
        assert client.sendmail(SENDER, recipients, WIRE) == {}
        # A bounce (MAIL FROM:<>): with null_sender= in master.cf its sender
        # arrives as an empty argument and "Return-Path: <>", as with
        # virtual(8), instead of "MAILER-DAEMON".
        assert client.sendmail("", ["bounce@example.test"], WIRE) == {}

    runs = piped_runs(out, 3)
    assert sorted(runs) == sorted([*recipients, "bounce@example.test"])
    for recipient, run in runs.items():
        sender = "" if recipient.startswith("bounce") else SENDER
        assert run["argv"] == [str(out), "deliver", sender, recipient, "127.0.0.1", HELO]
        assert run["uid"] == uid
        trace, rest = split_delivered(run["eml"])
        assert (trace["return_path"], trace["delivered_to"]) == (sender.encode(), recipient.encode())
        assert rest == RAW
    assert not list((instance.maildir / "new").iterdir()), "pipe mode must not use virtual(8)"


def test_instances_run_side_by_side_and_restart(start_instance):
    first = start_instance()
    second = start_instance()
    assert first.smtp_port != second.smtp_port
    for instance in (first, second):
        assert rcpt_reply(instance, "a@example.test")[0] == 250

    # stop() waits until everything is gone, so the same port and directory
    # can be used again at once.
    first.stop()
    assert first.processes() == []
    with pytest.raises(OSError):
        socket.create_connection(first.address, timeout=1).close()
    assert rcpt_reply(second, "a@example.test")[0] == 250
    first.start()
    assert rcpt_reply(first, "x@sub.example.test")[0] == 250


def test_instance_is_private_and_loopback_only(start_instance):
    instance = start_instance()
    for name in ("queue_directory", "data_directory", "maillog_file"):
        value = postconf(instance.config_dir, "-h", name).strip()
        assert Path(value).is_relative_to(instance.base_dir), name
    services = postconf(instance.config_dir, "-M").splitlines()
    inet = [line.split()[0] for line in services if line.split()[1] == "inet"]
    assert inet == [f"127.0.0.1:{instance.smtp_port}"]
    # Every process of the instance works in its own queue directory.
    cwds = {os.readlink(f"/proc/{pid}/cwd") for pid in instance.processes()}
    assert cwds == {str(instance.queue_dir)}


def test_refuses_directories_postfix_cannot_reach(tmp_path, workdir):
    # tmp_path's parents are 0700 root: the master could not open its lock
    # file, and virtual(8) would fail at delivery time.
    instance = PostfixInstance(tmp_path / "pf", free_port(), DOMAINS, workdir / "Maildir")
    with pytest.raises(PostfixError, match="not reachable by the postfix user"):
        instance.start()
    instance = PostfixInstance(workdir / "pf", free_port(), DOMAINS, tmp_path / "Maildir")
    with pytest.raises(PostfixError, match="not reachable by uid"):
        instance.start()
    assert instance.processes() == []


class PolicyHandler(socketserver.StreamRequestHandler):
    """Postfix policy delegation: name=value lines and a blank line, per request."""

    def handle(self) -> None:
        request: dict[str, str] = {}
        for line in self.rfile:
            line = line.decode().strip()
            if line:
                name, _, value = line.partition("=")
                request[name] = value
                continue
            if self.server.down:
                return  # hang up, as a dying server would
            self.server.seen.append(request["recipient"])
            self.server.contexts.add(request.get("policy_context"))
            refuse = request["recipient"].startswith("nobody@")
            action = "550 5.1.1 no such mailbox" if refuse else "DUNNO"
            self.wfile.write(f"action={action}\n\n".encode())
            request = {}


@pytest.fixture
def policy_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), PolicyHandler)
    server.daemon_threads = True
    server.seen, server.down, server.contexts = [], False, set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_policy_service_decides_at_rcpt(start_instance, policy_server):
    port = policy_server.server_address[1]
    instance = start_instance(policy=f"127.0.0.1:{port}")
    code, message = rcpt_reply(instance, "nobody@example.test")
    assert code == 550 and b"no such mailbox" in message
    assert rcpt_reply(instance, "a@example.test")[0] == 250
    # Relay protection comes first: the policy never hears of foreign domains.
    assert rcpt_reply(instance, "e@foreign.test")[0] == 554
    assert policy_server.seen == ["nobody@example.test", "a@example.test"]
    assert policy_server.contexts == {"mtasidecar"}  # the marker `postfix apply` finds our entry by

    # Policy server down: the default action DUNNO accepts (after a timeout).
    policy_server.down = True
    policy_server.shutdown()
    policy_server.server_close()
    started = time.monotonic()
    assert rcpt_reply(instance, "nobody@example.test")[0] == 250
    print(f"RCPT with the policy server down took {time.monotonic() - started:.2f} s")


def test_a_deferring_default_action_applies_to_our_entry_only(start_instance):
    """policy.default_action rides on our check_policy_service entry; the global
    smtpd_policy_service_default_action (an administrator's, for their own
    policy services) does not decide for ours."""
    dead = free_port()
    instance = start_instance(policy=f"127.0.0.1:{dead}",
                              policy_default_action="DEFER_IF_PERMIT 4.3.0 policy down, try later")
    postconf(instance.config_dir, "-e", "smtpd_policy_service_default_action=DUNNO")
    instance.reload()
    code, message = rcpt_reply(instance, "a@example.test")
    assert (code, message.rsplit(b": ", 1)[-1]) == (450, b"policy down, try later")


def test_reload_picks_up_new_domains(start_instance):
    instance = start_instance()
    assert rcpt_reply(instance, "x@new.test")[0] == 554
    instance.domains = [*DOMAINS, ("new.test", False)]
    instance.reload()
    assert rcpt_reply(instance, "x@new.test")[0] == 250
    assert rcpt_reply(instance, "x@sub.new.test")[0] == 554
