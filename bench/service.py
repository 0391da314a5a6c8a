"""The whole service for a benchmark: `python -m mtasidecar dev` as a child process.

Free ports, a fresh data directory, sender checks answered by a bench.dns
server on 127.0.0.1 (or off), everything stopped at the end: the dev process
stops its Postfix, ingester and API; should it die first, the Postfix
instance it left is stopped here.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from . import common as C


class DevService:
    def __init__(self, dns: str | None, auth: bool, keep: bool = False, prefix: str = "bench-dev-",
                 mode: str = "private", **sections):
        self.base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.base.chmod(0o755)  # Postfix's delivery user must reach the Maildir
        self.smtp_port = C.free_port()
        self.http_port = C.free_port()
        self.settings = C.settings_for(self.base, dns=dns, auth=auth, mode=mode, **sections)
        self.mode = C.domain_mode(self.settings)
        self.keep = keep
        self.proc = None

    @property
    def maildir(self) -> Path:
        return self.base / "Maildir"

    @property
    def db_path(self) -> Path:
        return self.base / "mtasidecar.db"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "DevService":
        try:
            self.proc = C.start_process(
                [C.PY, "-m", "mtasidecar", "dev", "--data-dir", str(self.base), "--smtp-port", str(self.smtp_port),
                 "--http-port", str(self.http_port)],
                env=C.child_env(self.settings), log=self.base / "dev.log")
            alive = lambda: self.proc.poll() is None  # noqa: E731
            C.wait_http(f"{self.api}/healthz", 60, alive=alive)
            C.wait_until(lambda: _smtp_up(self.smtp_port), 30, 0.1, "SMTP", alive=alive)
        except BaseException:
            self.stop()
            raise
        return self

    def mailboxes(self, addresses: list[str]) -> dict[str, str]:
        """Make the mailboxes a private domain needs before mail is accepted: address → token.
        In a public domain there is nothing to do (mail creates them) and no token."""
        if self.mode != "private":
            return {}
        from .apiclient import create_mailboxes
        return create_mailboxes(self.http_port, addresses)

    def stop(self) -> None:
        try:
            C.stop_process(self.proc, grace=30)
            _stop_leftover_postfix(self.base / "postfix", self.maildir)
        finally:
            if not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "DevService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _smtp_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False


def _stop_leftover_postfix(base: Path, maildir: Path) -> None:
    from mtasidecar.mta.instance import PostfixInstance
    if not (base / "spool").is_dir():
        return
    pf = PostfixInstance(base, 1, [("bench.test", True)], maildir)
    if pf.processes():
        print(f"stopping a Postfix left behind under {base}", flush=True)
        pf.stop()
