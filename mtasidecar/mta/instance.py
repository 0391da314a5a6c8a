"""A private Postfix instance: tests, ``mtasidecar dev`` and the quick start.

Everything the instance writes lives under ``base_dir`` (configuration,
queue, data directory, log), so several instances run side by side, and
beside a system Postfix, without sharing anything in /var/spool/postfix. It
listens for SMTP on 127.0.0.1:PORT only.

Postfix's master must start as root, so ``start()`` needs root. Mail is
delivered as a dedicated unprivileged user (see ``ensure_user``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from mtasidecar.mta.render import (
    DEFAULT_POLICY_ACTION,
    Delivery,
    PostfixError,
    apply_config,
    default_deliver_argv,
    find_program,
    postconf,
    render,
    run_tool,
    settle,
)

DEFAULT_USER = "mtasidecar"
POSTFIX_USER = "postfix"  # Postfix's mail_owner, as the packages create it
# The stock master.cf: /etc/postfix/master.cf is a conffile on Debian, the
# .dist copy is there even when the admin has edited or removed it.
STOCK_MASTER_CF = (Path("/etc/postfix/master.cf"), Path("/usr/share/postfix/master.cf.dist"))


def ensure_user(name: str = DEFAULT_USER) -> tuple[int, int]:
    """(uid, gid) of system user ``name``, creating it (no home, no shell) if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True,
        )
        try:
            # A parallel caller may have created it first: useradd then fails
            # but the user exists, which is all we need.
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PostfixError(f"cannot create user {name!r}: {result.stderr.strip()}") from None
    return entry.pw_uid, entry.pw_gid


class PostfixInstance:
    """A Postfix of our own under ``base_dir``, receiving on 127.0.0.1:``smtp_port``.

    ``domains``, ``maildir``, ``policy``, ``delivery`` and ``deliver_argv``
    are as for ``render()``. Mail is delivered as ``user`` (created if
    missing), or as ``uid``/``gid`` when given. Use as a context manager, or
    call ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        base_dir: Path,
        smtp_port: int,
        domains: list[tuple[str, bool]],
        maildir: Path,
        *,
        user: str = DEFAULT_USER,
        uid: int | None = None,
        gid: int | None = None,
        hostname: str = "mtasidecar.localhost",
        message_size_limit: int = 10_240_000,
        policy: str | None = None,
        policy_default_action: str = DEFAULT_POLICY_ACTION,
        socketmap: str | None = None,
        delivery: Delivery = "maildir",
        deliver_argv: list[str] | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.smtp_port = smtp_port
        self.domains = domains
        self.maildir = Path(maildir).absolute()
        self.user = user
        self.uid = uid
        self.gid = gid
        self.hostname = hostname
        self.message_size_limit = message_size_limit
        self.policy = policy
        self.policy_default_action = policy_default_action
        self.socketmap = socketmap
        self.delivery = delivery
        self.deliver_argv = deliver_argv
        self.timeout = timeout

    # --- layout ------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.base_dir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.base_dir / "spool"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postfix.log"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.smtp_port)

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start Postfix, return once SMTP accepts."""
        if os.geteuid() != 0:
            raise PostfixError("a Postfix instance must be started as root (its master needs it)")
        _require_postfix()
        if self.uid is None or self.gid is None:
            self.uid, self.gid = ensure_user(self.user)
        if _port_open(self.smtp_port):
            raise PostfixError(f"port {self.smtp_port} is already in use")
        self._make_dirs()
        if self.delivery == "pipe":
            self._check_deliver_command()
        self._write_main_cf()
        self._write_master_cf()
        apply_config(self._render(), self.config_dir)
        try:
            # `postfix check` creates the queue subdirectories and the data
            # directory with the owners Postfix expects.
            self._postfix("check")
            self._postfix("start")
            self._wait(lambda: _port_open(self.smtp_port), "SMTP port to accept connections")
        except BaseException:
            # Never leave a half-started master behind; report the first error.
            with contextlib.suppress(PostfixError):
                self.stop()
            raise

    def stop(self) -> None:
        """Stop Postfix and wait until every one of its processes is gone.

        ``postfix stop`` waits (in 1 s steps) for the master only; its
        daemons exit a little later and share the listening socket, so the
        port can still accept. Waiting for all processes and the port is what
        makes an immediate restart (or a test's leak check) safe. Leftovers
        after the timeout are killed, then reported.
        """
        if not self.queue_dir.is_dir():
            return
        if self._master_pid() is not None:
            subprocess.run(self._postfix_command("stop"), capture_output=True)
        try:
            self._wait(self._stopped, "Postfix processes to exit")
        except PostfixError:
            for pid in self.processes():
                _kill(pid)
            raise

    def reload(self) -> None:
        """Re-render the configuration and return once Postfix uses it.

        ``postfix reload`` only signals the master; the running daemons keep
        the old maps until they exit, and a daemon that has loaded the new
        domains map can meet one that still has the old mailbox map (a 550
        "user unknown" seen here). So wait until every process from before
        the reload has gone; their successors read the new configuration.
        """
        apply_config(self._render(), self.config_dir)
        master = self._master_pid()
        old = set(self.processes()) - {master}
        self._postfix("reload")
        self._wait(lambda: not old.intersection(self.processes()), "the reload to take effect")

    def processes(self) -> list[int]:
        """PIDs of this instance's processes.

        Every Postfix daemon (and pipe(8)'s children) runs with the queue
        directory as its working directory, so this finds them all, whereas
        their command lines do not name the instance.
        """
        return _pids_with_cwd_under(self.queue_dir)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- configuration -----------------------------------------------------

    def _render(self) -> dict[str, str]:
        return render(
            self.domains,
            self.maildir,
            uid=self.uid,
            gid=self.gid,
            message_size_limit=self.message_size_limit,
            policy=self.policy,
            policy_default_action=self.policy_default_action,
            socketmap=self.socketmap,
            delivery=self.delivery,
            deliver_argv=self.deliver_argv,
        )

    def _make_dirs(self) -> None:
        # postfix check wants the queue directory to exist (it creates what is
        # inside, and the data directory) and complains about group- or
        # other-writable directories.
        for path in (self.base_dir, self.config_dir, self.queue_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o755)
        # The master opens data_directory/master.lock as the postfix user.
        postfix = pwd.getpwnam(POSTFIX_USER)
        _require_passable(self.base_dir, postfix.pw_uid, postfix.pw_gid, "the postfix user")
        # virtual(8) and pipe(8)'s command write the Maildir as uid. A 0700
        # parent (pytest's tmp_path, a home directory) would fail only at
        # delivery time, with a vague line in the log.
        for sub in ("", "tmp", "new", "cur"):
            path = self.maildir / sub
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(path, self.uid, self.gid)
        _require_passable(self.maildir, self.uid, self.gid, f"uid {self.uid}")

    def _check_deliver_command(self) -> None:
        """PostfixError unless the delivery user can run the pipe command.

        pipe(8) runs it as that user; a program (or script) it cannot reach,
        e.g. a Python under /root (0700), makes Postfix defer every message
        with nothing but an "execvp: Permission denied" line in its log.
        """
        argv = self.deliver_argv or default_deliver_argv(self.maildir)
        program = Path(shutil.which(argv[0]) or argv[0])
        files = [program] + [Path(a) for a in argv[1:] if a.startswith("/") and Path(a).is_file()]
        who = f"uid {self.uid}, which runs the pipe command {' '.join(argv)}"
        for path in files:
            real = Path(os.path.realpath(path))
            _require_passable(real.parent, self.uid, self.gid, who)
            st = real.stat()
            if st.st_uid == self.uid:
                read, run = stat.S_IRUSR, stat.S_IXUSR
            elif st.st_gid == self.gid:
                read, run = stat.S_IRGRP, stat.S_IXGRP
            else:
                read, run = stat.S_IROTH, stat.S_IXOTH
            needed = read | run if path is program else read
            if st.st_mode & needed != needed:
                raise PostfixError(f"{real} cannot be {'run' if path is program else 'read'} by {who}")

    def _write_main_cf(self) -> None:
        # Start from an empty main.cf: with "No configuration" Debian has no
        # /etc/postfix/main.cf to copy, and the compiled-in defaults plus
        # these settings are all an instance needs.
        main_cf = self.config_dir / "main.cf"
        main_cf.write_text("")
        postconf(self.config_dir, "-e", *(f"{k}={v}" for k, v in self._instance_settings().items()))

    def _instance_settings(self) -> dict[str, str]:
        base = str(self.base_dir)
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # There is no syslog here; postlogd refuses a maillog_file
            # outside maillog_file_prefixes and the reason goes to syslog.
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": base,
            "myhostname": self.hostname,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # No local(8) delivery: no /etc/aliases needed.
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
        }

    def _write_master_cf(self) -> None:
        stock = next((p for p in STOCK_MASTER_CF if p.is_file()), None)
        if stock is None:
            raise PostfixError("no stock master.cf found: install postfix postfix-pcre")
        shutil.copyfile(stock, self.config_dir / "master.cf")
        settle(self.config_dir)
        # Only our SMTP listener: drop every inet service of the stock file.
        for line in postconf(self.config_dir, "-M").splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == "inet":
                postconf(self.config_dir, "-MX", f"{fields[0]}/inet")
        listen = f"127.0.0.1:{self.smtp_port}"
        postconf(self.config_dir, "-M", f"{listen}/inet={listen} inet n - n - - smtpd")
        # Debian's stock entries chroot into the queue directory, which
        # would need copies of /etc files there.
        postconf(self.config_dir, "-F", "*/*/chroot = n")

    # --- processes ---------------------------------------------------------

    def _postfix_command(self, *args: str) -> list[str]:
        return [find_program("postfix"), "-c", str(self.config_dir), *args]

    def _postfix(self, *args: str) -> None:
        # The postfix command reports most problems only to the log file.
        try:
            run_tool("postfix", "-c", str(self.config_dir), *args)
        except PostfixError as exc:
            raise PostfixError(f"{exc}\n{self._log_tail()}") from None

    def _master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def _stopped(self) -> bool:
        return not self.processes() and not _port_open(self.smtp_port)

    def _wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not condition():
            if time.monotonic() > deadline:
                raise PostfixError(f"timed out after {self.timeout} s waiting for {what}\n{self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)


# --- helpers -----------------------------------------------------------------


def _require_postfix() -> None:
    """PostfixError naming the packages unless Postfix is fully installed."""
    for program in ("postfix", "postconf"):
        find_program(program)
    try:
        pwd.getpwnam(POSTFIX_USER)
    except KeyError:
        raise PostfixError(f"no {POSTFIX_USER!r} user: install postfix postfix-pcre") from None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) is gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _pids_with_cwd_under(directory: Path) -> list[int]:
    directory = directory.resolve()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if (cwd == directory or directory in cwd.parents) and _alive(int(entry)):
            pids.append(int(entry))
    return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _require_passable(directory: Path, uid: int, gid: int, who: str) -> None:
    """PostfixError unless uid:gid can enter every directory from / down to ``directory``.

    Checks the permission bits only (no ACLs), which is what the usual
    mistake, a 0700 parent, needs.
    """
    for path in [*reversed(directory.parents), directory]:
        st = path.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise PostfixError(
                f"{directory} is not reachable by {who}: {path} has mode "
                f"{stat.filemode(st.st_mode)} (allow o+x, or choose another directory)"
            )
