"""Shared fixtures. Integration fixtures start real processes and always stop them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Http:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> Http:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Http(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Http(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; the test fails (not hangs) after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def ingester_thread(ingester):
    """Run an ``Ingester`` in a thread from the moment it watches new/; stop and join it after."""
    thread = threading.Thread(target=ingester.run, daemon=True)
    thread.start()
    try:
        assert ingester.watching.wait(30), "the ingester did not start watching"
        yield ingester
    finally:
        ingester.stop()
        thread.join(30)
        assert not thread.is_alive(), "the ingester did not stop"


@dataclass
class Service:
    data_dir: Path
    smtp_port: int
    http_port: int
    proc: subprocess.Popen

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def maildir(self) -> Path:
        return self.data_dir / "Maildir"

    def get(self, path: str, **kw) -> Http:
        return http("GET", self.base + path, **kw)

    def request(self, method: str, path: str, **kw) -> Http:
        return http(method, self.base + path, **kw)

    def send(self, sender: str, recipients: list[str], message: bytes):
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as smtp:
            return smtp.sendmail(sender, recipients, message)

    def messages(self, address: str, **params) -> list[dict]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        r = self.get(f"/api/v1/mailboxes/{address}/messages" + (f"?{query}" if query else ""))
        return r.json()["items"] if r.status == 200 else []

    def wait_messages(self, address: str, count: int, timeout: float = 30) -> list[dict]:
        return wait_for(lambda: (lambda m: m if len(m) >= count else None)(self.messages(address, limit=100)),
                        timeout, what=f"{count} message(s) for {address}")


def start_service(data_dir: Path, domains: list[str], extra_env: dict | None = None,
                  private: list[str] = ()) -> Service:
    """`mtasidecar dev` on free ports: ``domains`` public (catch-all), ``private`` private."""
    smtp_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "mtasidecar", "dev", "--data-dir", str(data_dir),
            "--smtp-port", str(smtp_port), "--http-port", str(http_port)]
    for d in domains:
        argv += ["--public-domain", d]
    for d in private:
        argv += ["--domain", d]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
    # Each service its own policy port (the default, 10040, is shared by all).
    env["MTASIDECAR_POLICY_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["MTASIDECAR_POLICY_SOCKETMAP"] = f"127.0.0.1:{free_port()}"
    env.update(extra_env or {})
    log = open(data_dir.parent / f"{data_dir.name}-dev.log", "wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    svc = Service(data_dir, smtp_port, http_port, proc)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"mtasidecar dev exited early:\n{Path(log.name).read_text()[-3000:]}")
        try:
            return svc.get("/healthz", timeout=2).status == 200 and _smtp_up(smtp_port)
        except OSError:
            return False

    try:
        wait_for(ready, 60, 0.1, "mtasidecar dev to start")
    except BaseException:
        with contextlib.suppress(AssertionError):
            stop_service(svc)
        raise
    return svc


def _smtp_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop_service(svc: Service) -> None:
    if svc.proc.poll() is None:
        svc.proc.send_signal(signal.SIGTERM)
        try:
            svc.proc.wait(60)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()
    # No Postfix master of this instance may outlive the test.
    leftover = subprocess.run(["pgrep", "-f", str(svc.data_dir)], capture_output=True, text=True).stdout.split()
    for pid in leftover:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftover, f"processes outlived mtasidecar dev: {leftover}"


def service_dir(prefix: str = "mtasidecar-test-") -> Path:
    """A fresh directory Postfix's own users can enter.

    pytest's tmp_path lives under a root-only (0700) directory, where the
    postfix and delivery users cannot reach their queue and Maildir.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def running_service(domains: list[str], extra_env: dict | None = None, private: list[str] = (), *,
                    prefix: str = "mtasidecar-test-", keep_log_in: Path | None = None):
    """start_service in a fresh service_dir: always stopped (Postfix included) and removed.

    ``keep_log_in``: a directory where the service's and Postfix's logs are
    copied first, for post-mortems.
    """
    base = service_dir(prefix)
    data_dir = base / "data"
    try:
        svc = start_service(data_dir, domains, extra_env, private)
    except BaseException:  # start_service has stopped what it started
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        yield svc
    finally:
        try:
            stop_service(svc)
        finally:
            if keep_log_in is not None:
                for log in [base / "data-dev.log", data_dir / "postfix" / "postfix.log"]:
                    if log.exists():
                        shutil.copy(log, keep_log_in / log.name)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def service():
    """The whole service (private Postfix, ingester, gunicorn) for a module's tests."""
    with running_service(["example.test", "*.sub.test"]) as svc:
        yield svc
