"""`mtasidecar dev`: the whole service on loopback, with a private Postfix.

Starts, under ``data_dir``: a Postfix instance of our own (SMTP on
127.0.0.1:PORT, nothing touched in /etc/postfix), the ingester, the API, the
sweeper and the webhook sender as child processes, exactly as production runs
them. Prints where things are, then waits; Ctrl-C or SIGTERM stops
everything (Postfix included), as does any child dying on its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .config import Settings, to_environ
from .policy import postfix_endpoints

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = "mail.test"
STOP_GRACE_S = 10


def _wait_http(url: str, timeout: float, alive) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def _policy_listening(listen: str) -> bool:
    from .policy import parse_listen
    kind, host, port = parse_listen(listen)
    try:
        if kind == "unix":
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(host)
        else:
            socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait_policy(listen: str, timeout: float, alive) -> bool:
    """Wait until the policy service accepts connections on ``listen``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if _policy_listening(listen):
            return True
        time.sleep(0.05)
    return False


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _deliver_argv(data_dir: Path, maildir: Path) -> list[str]:
    """The pipe transport's command: a standalone copy of deliver.py.

    Postfix runs it as the unprivileged delivery user, who may not be able to
    enter this virtual environment (under /root, say). deliver.py needs only
    the standard library, so a copy beside the data and the system python3 do.
    """
    from .ingest import deliver
    target = data_dir / "bin" / "mtasidecar-deliver"
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(deliver.__file__, target)
    target.chmod(0o755)
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    return [python, str(target), "--maildir", str(maildir)]


def _try_hint(settings: Settings, api: str) -> str:
    """How to send a first mail: straight to a public domain, or via a new mailbox."""
    smtp = f"swaks --server 127.0.0.1:{settings.smtp.port}"
    public = next((d for d in settings.domains if d.mode == "public"), None)
    if public is not None:
        return (f"Try:\n  {smtp} --to hello@{public.name}\n"
                f"  curl {api}/api/v1/mailboxes/hello@{public.name}/messages")
    name = settings.domains[0].name
    return (f"Try (private domain: make a mailbox first, keep its token):\n"
            f"  curl -XPOST {api}/api/v1/mailboxes -H 'Content-Type: application/json' -d '{{\"domain\": \"{name}\"}}'\n"
            f"  {smtp} --to ADDRESS\n"
            f"  curl -H 'Authorization: Bearer TOKEN' {api}/api/v1/mailboxes/ADDRESS/messages")


def run(settings: Settings, prepare_store) -> int:
    from .cli import gunicorn_argv
    from .mta.instance import PostfixInstance

    data_dir = Path(settings.data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    prepare_store(settings).close()
    env = dict(os.environ, **to_environ(settings))
    maildir = settings.maildir_path.absolute()
    policy, socketmap = postfix_endpoints(settings.policy)
    postfix = PostfixInstance(
        data_dir / "postfix", settings.smtp.port, [(d.name, d.subdomains) for d in settings.domains],
        maildir, hostname=settings.hostname, message_size_limit=settings.smtp.message_size_limit,
        delivery=settings.smtp.delivery,
        deliver_argv=_deliver_argv(data_dir, maildir),
        policy=policy, policy_default_action=settings.policy.default_action, socketmap=socketmap,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    procs: list[subprocess.Popen] = []
    try:
        if settings.policy.listen:
            for key, where in (("listen", settings.policy.listen), ("socketmap", settings.policy.served_socketmap)):
                if where and _policy_listening(where):
                    log.error("something already listens on %s; set policy.%s (MTASIDECAR_POLICY_%s) to a free "
                              "address", where, key, key.upper())
                    return 1
            # Before Postfix, so that its first RCPT does not meet a closed port
            # (and the default action) instead of a decision.
            procs.append(subprocess.Popen([sys.executable, "-m", "mtasidecar", "policy"], env=env))
            for where in filter(None, (settings.policy.listen, settings.policy.served_socketmap)):
                if not _wait_policy(where, 30, lambda: all(p.poll() is None for p in procs)):
                    log.error("the policy service did not come up on %s; stopping", where)
                    return 1
        postfix.start()  # creates the Maildir with the delivery user's ownership
        procs.append(subprocess.Popen([sys.executable, "-m", "mtasidecar", "ingest"], env=env))
        procs.append(subprocess.Popen(gunicorn_argv(settings), env=env))
        procs.append(subprocess.Popen([sys.executable, "-m", "mtasidecar", "sweep"], env=env))
        procs.append(subprocess.Popen([sys.executable, "-m", "mtasidecar", "webhooks"], env=env))
        api = f"http://{settings.api.host}:{settings.api.port}"
        if not _wait_http(f"{api}/healthz", 30, lambda: all(p.poll() is None for p in procs)):
            log.error("the API did not come up; stopping")
            return 1
        domains = ", ".join(("*." if d.subdomains else "") + d.name for d in settings.domains)
        print(f"""
mtasidecar is running
  SMTP      {settings.smtp.host}:{settings.smtp.port}  (private Postfix, log: {postfix.log_path})
  API       {api}/api/v1/   (OpenAPI: {api}/api/v1/openapi.json)
  policy    {settings.policy.listen or "off (policy.listen is empty)"}
  domains   {domains}
  Maildir   {maildir}
  database  {settings.database_url}
{_try_hint(settings, api)}
Ctrl-C stops everything.
""", flush=True)
        while not stop.wait(0.5):
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                log.error("%s exited with status %s; stopping", dead[0].args[:4], dead[0].returncode)
                return 1
        return 0
    finally:
        _stop(procs)
        postfix.stop()
