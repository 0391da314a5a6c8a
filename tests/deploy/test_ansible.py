"""The Ansible role, for real: static checks, then a run against this machine.

Static: ``ansible-playbook --syntax-check``, ``ansible-lint`` (production
profile). Real (root, Debian/Ubuntu, connection local): the role provisions
this machine with an administrator's main.cf already in place; the test
checks those settings survive, sends mail with swaks to the configured SMTP
port with and without STARTTLS, reads it over the API, and runs the role a
second time, which must report 0 changed. Teardown stops every process the
role started and puts /etc/postfix back as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, http, wait_for
from tests.deploy._ansible import ANSIBLE_DIR, ROOT, ansible_env, tool

pytestmark = pytest.mark.deploy

PLAYBOOK = ANSIBLE_DIR / "playbook.yml"
POSTFIX_DIR = Path("/etc/postfix")
DOMAIN = "deploy.test"
HOSTNAME = "mx.deploy.test"
# What an administrator had in main.cf before: none of it is ours to change.
ADMIN_MAIN_CF = """\
# An administrator's own settings, seeded by tests/deploy/test_ansible.py.
smtpd_banner = $myhostname ESMTP admin-banner
delay_warning_time = 4h
mynetworks = 127.0.0.0/8 [::1]/128
maximal_queue_lifetime = 3d
# a comment the merge keeps
header_size_limit = 204800
"""
ADMIN_SETTINGS = {
    "smtpd_banner": "$myhostname ESMTP admin-banner",
    "delay_warning_time": "4h",
    "mynetworks": "127.0.0.0/8 [::1]/128",
    "maximal_queue_lifetime": "3d",
    "header_size_limit": "204800",
}
# Everything the role creates outside /etc/postfix, removed at teardown when
# it was not there before.
ROLE_PATHS = [Path("/opt/mtasidecar"), Path("/etc/mtasidecar"), Path("/var/lib/mtasidecar"),
              Path("/var/log/mtasidecar"), Path("/run/mtasidecar"), Path("/etc/default/mtasidecar")]
SYSTEMD_UNITS = ["mtasidecar-ingest.service", "mtasidecar-api.service", "mtasidecar-policy.service",
                 "mtasidecar-sweep.service", "mtasidecar-sweep.timer"]


def _need(program: str) -> str:
    path = tool(program)
    if path is None:
        pytest.skip(f"{program} is not installed (pip install ansible-core ansible-lint)")
    return path


def _run(argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


# --- static checks ----------------------------------------------------------------


def test_syntax_check():
    playbook = _need("ansible-playbook")
    result = _run([playbook, "-i", str(ANSIBLE_DIR / "inventory.example.ini"), "--syntax-check", str(PLAYBOOK)],
                  env=ansible_env(), cwd=ANSIBLE_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_production_profile():
    lint = _need("ansible-lint")
    result = _run([lint, "--offline", "--profile", "production", "--nocolor", "playbook.yml", "roles/mtasidecar"],
                  timeout=300, env=ansible_env(), cwd=ANSIBLE_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


# --- the real run -------------------------------------------------------------------


@dataclasses.dataclass
class Deployment:
    workdir: Path
    inventory: Path
    extra_vars: Path
    smtp_port: int
    api_port: int
    first_run: subprocess.CompletedProcess
    systemd: bool

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def run_playbook(self) -> subprocess.CompletedProcess:
        return _playbook(self.inventory, self.extra_vars, self.workdir)


def _playbook(inventory: Path, extra_vars: Path, workdir: Path) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = _run([tool("ansible-playbook"), "-i", str(inventory), str(PLAYBOOK), "-e", f"@{extra_vars}"],
                  timeout=1800, env=ansible_env(), cwd=ANSIBLE_DIR)
    n = len(list(workdir.glob("run-*.log"))) + 1
    (workdir / f"run-{n}.log").write_text(result.stdout + result.stderr)
    print(f"ansible-playbook run {n}: {time.monotonic() - started:.1f} s, rc={result.returncode}")
    return result


def _recap(result: subprocess.CompletedProcess) -> dict[str, int]:
    match = re.search(r"^localhost\s+:\s+(.*)$", result.stdout, re.M)
    assert match, f"no PLAY RECAP in:\n{result.stdout[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def _systemd_is_pid1() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _source_snapshot(dest: Path) -> Path:
    """The files a wheel is built from, copied: later edits of the checkout
    (or a build dir in it) cannot change what the two runs install."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("mtasidecar", "postfix"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _domain_entry() -> dict:
    """Our test domain, readable by anyone who knows an address (a catch-all)."""
    entry = {"name": DOMAIN, "subdomains": True}
    from mtasidecar.config import DomainSettings
    if "mode" in {f.name for f in dataclasses.fields(DomainSettings)}:
        entry["mode"] = "public"
    return entry


def _has_sweep() -> bool:
    from mtasidecar.cli import build_parser
    try:
        build_parser().parse_args(["sweep", "--once"])
        return True
    except SystemExit:
        return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _postfix_running() -> bool:
    return _run(["postfix", "status"]).returncode == 0


def _stop_everything(systemd: bool, postfix_was_running: bool, smtp_port: int) -> list[str]:
    """Stop what the role started; return what could not be stopped."""
    problems = []
    if systemd:
        _run(["systemctl", "disable", "--now", *SYSTEMD_UNITS])
        for unit in SYSTEMD_UNITS:
            Path("/etc/systemd/system", unit).unlink(missing_ok=True)
        _run(["systemctl", "daemon-reload"])
    else:
        script = Path("/opt/mtasidecar/bin/mtasidecar-service")
        if script.exists():
            result = _run([str(script), "stop", "ingest", "api", "sweep"], timeout=120)
            if result.returncode != 0:
                problems.append(f"mtasidecar-service stop: {result.stdout}{result.stderr}")
    if not postfix_was_running:
        if systemd:
            _run(["systemctl", "stop", "postfix"])
        elif _postfix_running():
            _run(["postfix", "stop"])
        # `postfix stop` returns before the master has exited.
        deadline = time.monotonic() + 30
        while (_port_open(smtp_port) or _postfix_running()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _port_open(smtp_port):
            problems.append(f"Postfix still listens on {smtp_port}")
    return problems


@pytest.fixture(scope="module")
def deployed():
    if os.geteuid() != 0:
        pytest.skip("the real run needs root")
    if not Path("/usr/bin/apt-get").exists():
        pytest.skip("the role supports Debian and Ubuntu only")
    _need("ansible-playbook")
    systemd = _systemd_is_pid1()
    workdir = Path(f"/tmp/mtasidecar-deploy-{uuid.uuid4().hex[:8]}")
    workdir.mkdir(mode=0o700)
    saved = {name: (POSTFIX_DIR / name).read_bytes() if (POSTFIX_DIR / name).exists() else None
             for name in ("main.cf", "master.cf", "mtasidecar-domains.pcre", "mtasidecar-mailboxes.pcre")}
    existed = {p: p.exists() for p in ROLE_PATHS}
    postfix_was_running = (POSTFIX_DIR / "main.cf").exists() and _postfix_running()

    # The administrator's configuration, before the role ever ran.
    POSTFIX_DIR.mkdir(exist_ok=True)
    (POSTFIX_DIR / "main.cf").write_text(
        (saved["main.cf"].decode() + "\n" if saved["main.cf"] else "") + ADMIN_MAIN_CF)
    smtp_port, api_port = free_port(), free_port()
    inventory = workdir / "inventory.ini"
    inventory.write_text("[mtasidecar]\nlocalhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n")
    extra_vars = workdir / "vars.json"
    extra_vars.write_text(json.dumps({
        "mtasidecar_domains": [_domain_entry()],
        "mtasidecar_hostname": HOSTNAME,
        "mtasidecar_smtp_port": smtp_port,
        "mtasidecar_smtp_listen_address": "127.0.0.1",
        "mtasidecar_api_port": api_port,
        "mtasidecar_package_src": str(_source_snapshot(workdir / "src")),
        "mtasidecar_wheel_build_dir": str(workdir / "wheel"),
        "mtasidecar_public_ipv4": "192.0.2.25",
        "mtasidecar_public_ipv6": "2001:db8::25",
        "mtasidecar_sweep_enabled": _has_sweep(),
        # No DNS here: SPF/DKIM lookups would only wait for their timeouts.
        "mtasidecar_auth_enabled": False,
    }, indent=2))
    first = _playbook(inventory, extra_vars, workdir)
    try:
        yield Deployment(workdir, inventory, extra_vars, smtp_port, api_port, first, systemd)
    finally:
        problems = _stop_everything(systemd, postfix_was_running, smtp_port)
        for name, data in saved.items():
            path = POSTFIX_DIR / name
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        if postfix_was_running:
            _run(["postfix", "reload"])
        for path, was_there in existed.items():
            if not was_there:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if os.environ.get("MTASIDECAR_DEPLOY_KEEP_LOGS") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
        assert not problems, problems


def test_first_run_succeeds(deployed):
    result = deployed.first_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    recap = _recap(result)
    assert recap["failed"] == 0 and recap["unreachable"] == 0, recap
    assert recap["changed"] > 0, recap


def test_admin_settings_survive(deployed):
    """The merge changed only our names: the administrator's are as they were."""
    out = _run(["postconf", "-n"]).stdout
    current = dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                   for line in out.splitlines())
    for name, value in ADMIN_SETTINGS.items():
        assert current.get(name) == value, f"{name}: {current.get(name)!r} != {value!r}"
    # And ours are in: STARTTLS, the catch-all, the extra SMTP port.
    assert current["smtpd_tls_security_level"] == "may"
    assert current["virtual_mailbox_domains"].startswith("pcre:")
    assert current["myhostname"] == HOSTNAME
    master = _run(["postconf", "-M"]).stdout
    assert re.search(rf"^127\.0\.0\.1:{deployed.smtp_port}\s+inet\s.*smtpd$", master, re.M), master
    assert re.search(r"^smtp\s+inet\s.*smtpd$", master, re.M), "the stock smtp service must stay"


def test_services_run_as_the_mtasidecar_user(deployed):
    uid = pwd.getpwnam("mtasidecar").pw_uid
    if deployed.systemd:
        for unit in ("mtasidecar-ingest.service", "mtasidecar-api.service"):
            assert _run(["systemctl", "is-active", unit]).stdout.strip() == "active"
        return
    names = ["ingest", "api"] + (["sweep"] if json.loads(deployed.extra_vars.read_text())["mtasidecar_sweep_enabled"] else [])
    for name in names:
        pid = int(Path(f"/run/mtasidecar/{name}.pid").read_text())
        status = Path(f"/proc/{pid}/status").read_text()
        real_uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        assert real_uid == uid, f"{name} runs as uid {real_uid}"


def _swaks(port: int, to: str, subject: str, tls: bool) -> str:
    argv = ["swaks", "--server", f"127.0.0.1:{port}", "--from", "sender@example.org", "--to", to,
            "--helo", "client.example.org", "--header", f"Subject: {subject}", "--body", "Your code is 424242"]
    if tls:
        argv.append("--tls")  # STARTTLS, required: swaks fails if it is not offered
    result = _run(argv, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _wait_message(api: str, address: str) -> dict:
    def found():
        r = http("GET", f"{api}/api/v1/mailboxes/{address}/messages", timeout=10)
        return r.status == 200 and r.json()["items"] and r.json()["items"][0]
    return wait_for(found, 60, 0.2, f"a message for {address} over the API")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_mail_arrives_over_smtp_and_is_read_over_the_api(deployed, tls):
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    address = f"{'tls' if tls else 'plain'}-{uuid.uuid4().hex[:8]}@q7.{DOMAIN}"
    subject = f"deploy test {address}"
    out = _swaks(deployed.smtp_port, address, subject, tls)
    assert "250 2.0.0 Ok: queued" in out, out
    if tls:
        assert "TLS started with cipher" in out, out
    item = _wait_message(deployed.api, address)
    assert item["subject"] == subject
    raw = http("GET", f"{deployed.api}{item['url']}/raw", timeout=10)
    assert raw.status == 200
    received = re.search(rb"^Received: from .*?(?=^\S)", raw.body, re.M | re.S).group(0)
    # Postfix says "with ESMTPS" for a session under TLS.
    assert (b"with ESMTPS" in received) == tls, received.decode(errors="replace")


def test_dns_records_are_written(deployed):
    text = Path("/etc/mtasidecar/dns-records.txt").read_text()
    assert f"{DOMAIN}.\tIN\tMX\t10 {HOSTNAME}." in text
    assert f"*.{DOMAIN}.\tIN\tMX\t10 {HOSTNAME}." in text
    assert f"{HOSTNAME}.\tIN\tA\t192.0.2.25" in text
    assert f"{HOSTNAME}.\tIN\tAAAA\t2001:db8::25" in text
    assert "PTR" in text and '"v=spf1 -all"' in text
    assert "DNS records for mtasidecar" in deployed.first_run.stdout  # printed too


def test_second_run_changes_nothing(deployed):
    """Idempotence: the same playbook again reports changed=0 (and mail still flows)."""
    result = deployed.run_playbook()
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    recap = _recap(result)
    changed, task = [], None
    for line in result.stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.split("[", 1)[1].split("]", 1)[0]
        elif line.startswith("changed:") and task not in changed:
            changed.append(task)
    assert recap["changed"] == 0, f"{recap}; changed tasks: {changed}\n{result.stdout[-4000:]}"
    assert recap["failed"] == 0
    r = http("GET", f"{deployed.api}/healthz", timeout=10)
    assert r.status == 200
