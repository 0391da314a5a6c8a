"""The Ansible role, for real: static checks, then a run against this machine.

Static: ``ansible-playbook --syntax-check``, ``ansible-lint`` (production
profile). Real (root, Debian/Ubuntu, connection local): the role provisions
this machine with an administrator's main.cf already in place; the test
checks those settings survive, sends mail with swaks to the configured SMTP
port with and without STARTTLS to a public domain and reads it over the API;
on a private domain it makes a mailbox over the API, mail to it is readable
with the mailbox's token, and an unknown address is refused at RCPT (550, by
the policy service); `mtasidecar doctor` passes against a DNS server on
loopback; and the role runs a second time, which must report 0 changed.
Teardown stops every process the role started and puts /etc/postfix back as
it was.
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
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, http, wait_for
from tests.deploy._ansible import ANSIBLE_DIR, ROOT, ansible_env, tool

pytestmark = pytest.mark.deploy

PLAYBOOK = ANSIBLE_DIR / "playbook.yml"
POSTFIX_DIR = Path("/etc/postfix")
DOMAIN = "deploy.test"                    # public: a catch-all, subdomains too
PRIVATE_DOMAIN = "private-deploy.test"    # private: only mailboxes made over the API
HOSTNAME = "mx.deploy.test"
PUBLIC_IPV4, PUBLIC_IPV6 = "192.0.2.25", "2001:db8::25"
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
                 "mtasidecar-webhooks.service", "mtasidecar-sweep.service", "mtasidecar-sweep.timer"]
PROCESSES = ["ingest", "api", "policy", "webhooks", "sweep"]   # what mtasidecar-service runs without systemd


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
    policy_port: int
    dns: object
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
    """The role's test: systemd runs this machine (not merely installed)."""
    return Path("/run/systemd/system").is_dir()


def _source_snapshot(dest: Path) -> Path:
    """The files a wheel is built from, copied: later edits of the checkout
    (or a build dir in it) cannot change what the two runs install."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("mtasidecar", "postfix"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _dns_zone() -> dict:
    """What the DNS records the role prints would make public: doctor reads them."""
    import dns.reversename
    mx = {"MX": [(10, HOSTNAME)]}
    return {DOMAIN: mx, f"*.{DOMAIN}": mx, PRIVATE_DOMAIN: mx,
            HOSTNAME: {"A": [PUBLIC_IPV4], "AAAA": [PUBLIC_IPV6]},
            **{dns.reversename.from_address(a).to_text(omit_final_dot=True): {"PTR": [HOSTNAME]}
               for a in (PUBLIC_IPV4, PUBLIC_IPV6)}}


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
            result = _run([str(script), "stop", *PROCESSES], timeout=120)
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
    from tests.dnsserver import DNSTestServer
    systemd = _systemd_is_pid1()
    workdir = Path(f"/tmp/mtasidecar-deploy-{uuid.uuid4().hex[:8]}")
    workdir.mkdir(mode=0o700)
    saved = {name: (POSTFIX_DIR / name).read_bytes() if (POSTFIX_DIR / name).exists() else None
             for name in ("main.cf", "master.cf", "mtasidecar-domains.pcre", "mtasidecar-mailboxes.pcre")}
    existed = {p: p.exists() for p in ROLE_PATHS}
    postfix_was_running = (POSTFIX_DIR / "main.cf").exists() and _postfix_running()

    smtp_port = free_port()
    dns_server = None
    try:
        # The administrator's configuration, before the role ever ran.
        POSTFIX_DIR.mkdir(exist_ok=True)
        (POSTFIX_DIR / "main.cf").write_text(
            (saved["main.cf"].decode() + "\n" if saved["main.cf"] else "") + ADMIN_MAIN_CF)
        api_port, policy_port, socketmap_port = free_port(), free_port(), free_port()
        dns_server = DNSTestServer(_dns_zone()).start()
        inventory = workdir / "inventory.ini"
        inventory.write_text("[mtasidecar]\n"
                             "localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n")
        extra_vars = workdir / "vars.json"
        extra_vars.write_text(json.dumps({
            "mtasidecar_domains": [{"name": DOMAIN, "subdomains": True, "mode": "public"},
                                   {"name": PRIVATE_DOMAIN, "mode": "private", "default_ttl": 600}],
            "mtasidecar_hostname": HOSTNAME,
            "mtasidecar_smtp_port": smtp_port,
            "mtasidecar_smtp_listen_address": "127.0.0.1",
            "mtasidecar_api_port": api_port,
            # Not the default 10040: other things on a CI machine may use it.
            "mtasidecar_policy_listen": f"127.0.0.1:{policy_port}",
            "mtasidecar_policy_socketmap": f"127.0.0.1:{socketmap_port}",
            "mtasidecar_package_src": str(_source_snapshot(workdir / "src")),
            "mtasidecar_wheel_build_dir": str(workdir / "wheel"),
            "mtasidecar_public_ipv4": PUBLIC_IPV4,
            "mtasidecar_public_ipv6": PUBLIC_IPV6,
            # The DNS server of this test, for `mtasidecar doctor`; SPF/DKIM at
            # ingest are off (the senders' domains are not in it).
            "mtasidecar_dns_servers": [f"127.0.0.1:{dns_server.port}"],
            "mtasidecar_auth_enabled": False,
        }, indent=2))
        # Still inside the try: a run that times out gets the teardown too.
        first = _playbook(inventory, extra_vars, workdir)
        yield Deployment(workdir, inventory, extra_vars, smtp_port, api_port, policy_port, dns_server,
                         first, systemd)
    finally:
        if dns_server is not None:
            dns_server.stop()
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
        for unit in ("mtasidecar-ingest.service", "mtasidecar-api.service", "mtasidecar-policy.service",
                     "mtasidecar-webhooks.service", "mtasidecar-sweep.timer"):
            assert _run(["systemctl", "is-active", unit]).stdout.strip() == "active", unit
        return
    for name in PROCESSES:
        pid = int(Path(f"/run/mtasidecar/{name}.pid").read_text())
        status = Path(f"/proc/{pid}/status").read_text()
        real_uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        assert real_uid == uid, f"{name} runs as uid {real_uid}"


def _swaks(port: int, to: str, subject: str, tls: bool, expect_ok: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    argv = ["swaks", "--server", f"127.0.0.1:{port}", "--from", "sender@example.org", "--to", to,
            "--helo", "client.example.org", "--header", f"Subject: {subject}", "--body", "Your code is 424242"]
    if tls:
        argv.append("--tls")  # STARTTLS, required: swaks fails if it is not offered
    result = _run(argv, timeout=60)
    if expect_ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _wait_message(api: str, address: str, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def found():
        r = http("GET", f"{api}/api/v1/mailboxes/{address}/messages", headers=headers, timeout=10)
        return r.status == 200 and r.json()["items"] and r.json()["items"][0]
    return wait_for(found, 60, 0.2, f"a message for {address} over the API")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_mail_arrives_over_smtp_and_is_read_over_the_api(deployed, tls):
    address = f"{'tls' if tls else 'plain'}-{uuid.uuid4().hex[:8]}@q7.{DOMAIN}"
    subject = f"deploy test {address}"
    out = _swaks(deployed.smtp_port, address, subject, tls).stdout
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


def test_private_domain_mailbox_made_over_the_api_receives(deployed):
    """A private domain: the mailbox is made with POST /api/v1/mailboxes, mail to
    it arrives (the policy service knows it) and only its token reads it."""
    local = f"box-{uuid.uuid4().hex[:8]}"
    r = http("POST", f"{deployed.api}/api/v1/mailboxes", timeout=10,
             body=json.dumps({"domain": PRIVATE_DOMAIN, "local_part": local}).encode(),
             headers={"Content-Type": "application/json"})
    assert r.status == 201, r.body
    created = r.json()
    address, token = created["address"], created["token"]
    assert address == f"{local}@{PRIVATE_DOMAIN}"
    subject = f"private deploy test {address}"
    out = _swaks(deployed.smtp_port, address, subject, tls=True).stdout
    assert "250 2.0.0 Ok: queued" in out, out
    item = _wait_message(deployed.api, address, token)
    assert item["subject"] == subject
    anonymous = http("GET", f"{deployed.api}/api/v1/mailboxes/{address}/messages", timeout=10)
    assert anonymous.status == 401, anonymous.body


def test_private_domain_unknown_address_is_refused_at_rcpt(deployed):
    address = f"nobody-{uuid.uuid4().hex[:8]}@{PRIVATE_DOMAIN}"
    result = _swaks(deployed.smtp_port, address, "to nobody", tls=False, expect_ok=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    # swaks marks a server refusal "<**"; it comes right after our RCPT TO.
    rcpt = out.index(f" -> RCPT TO:<{address}>")
    refusal = re.search(r"^<\*\* (\d{3}) (\d\.\d\.\d) (.*)$", out[rcpt:], re.M)
    assert refusal, out
    assert refusal.group(1, 2) == ("550", "5.1.1"), out
    assert "no such mailbox" in refusal.group(3), out
    assert " -> DATA" not in out[rcpt:], "nothing may be sent after a refused RCPT"


def test_doctor_passes_on_the_deployment(deployed):
    """`mtasidecar doctor` on the provisioned box, as the service user: MX and
    wildcard MX (served by the test's DNS server, pointing at the public
    addresses given with --address), SMTP with STARTTLS on every port Postfix
    receives on, Postfix's settings, the policy service, the spool, the
    database and the API."""
    argv = ["runuser", "-u", "mtasidecar", "--", "/opt/mtasidecar/venv/bin/mtasidecar",
            "--config", "/etc/mtasidecar/config.toml", "doctor", "--json",
            "--address", PUBLIC_IPV4, "--address", PUBLIC_IPV6]
    result = _run(argv, timeout=120, env=ansible_env(), cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    expected = [f"configured {DOMAIN}", f"MX {DOMAIN}", f"wildcard MX *.{DOMAIN}", f"configured {PRIVATE_DOMAIN}",
                f"MX {PRIVATE_DOMAIN}", f"SMTP 127.0.0.1:{deployed.smtp_port}", "Postfix settings",
                f"policy service {DOMAIN}", f"policy service {PRIVATE_DOMAIN}", "Maildir new/", "database", "API",
                f"PTR {PUBLIC_IPV4}", f"PTR {PUBLIC_IPV6}"]
    for name in expected:
        assert statuses.get(name) == "ok", (name, json.dumps(report["checks"], indent=1))
    assert statuses[f"wildcard MX *.{PRIVATE_DOMAIN}"] == "skip"
    private = next(c for c in report["checks"] if c["name"] == f"policy service {PRIVATE_DOMAIN}")
    assert "550 5.1.1" in private["detail"]


def test_doctor_names_what_is_broken(deployed):
    """With the ingester stopped and a file waiting too long, doctor fails
    (exit 1) on the spool and says what to do."""
    maildir_new = Path("/var/lib/mtasidecar/Maildir/new")
    service = Path("/opt/mtasidecar/bin/mtasidecar-service")
    if deployed.systemd:
        _run(["systemctl", "stop", "mtasidecar-ingest.service"])
    else:
        _run([str(service), "stop", "ingest"], timeout=120)
    stale = maildir_new / f"{int(time.time())}.doctor-test.{HOSTNAME}"
    try:
        stale.write_bytes(f"Delivered-To: stale@{DOMAIN}\r\nSubject: stale\r\n\r\nstale\r\n".encode())
        shutil.chown(stale, "mtasidecar", "mtasidecar")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        argv = ["runuser", "-u", "mtasidecar", "--", "/opt/mtasidecar/venv/bin/mtasidecar",
                "--config", "/etc/mtasidecar/config.toml", "doctor", "--domain", DOMAIN,
                "--address", PUBLIC_IPV4, "--address", PUBLIC_IPV6]
        result = _run(argv, timeout=120, env=ansible_env(), cwd="/")
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        spool = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] Maildir new/"))
        assert "older than 300 s" in lines[spool]
        assert "fix: the ingester is not keeping up or not running" in lines[spool + 1]
    finally:
        if deployed.systemd:
            _run(["systemctl", "start", "mtasidecar-ingest.service"])
        else:
            _run([str(service), "start", "ingest"], timeout=120)
    # The ingester takes the file once it runs again.
    wait_for(lambda: not stale.exists(), 60, 0.2, "the ingester to take the waiting file")


def test_dns_records_are_written(deployed):
    text = Path("/etc/mtasidecar/dns-records.txt").read_text()
    assert f"{DOMAIN}.\tIN\tMX\t10 {HOSTNAME}." in text
    assert f"*.{DOMAIN}.\tIN\tMX\t10 {HOSTNAME}." in text
    assert f"{HOSTNAME}.\tIN\tA\t{PUBLIC_IPV4}" in text
    assert f"{HOSTNAME}.\tIN\tAAAA\t{PUBLIC_IPV6}" in text
    assert f"{PRIVATE_DOMAIN}.\tIN\tMX\t10 {HOSTNAME}." in text
    assert f"*.{PRIVATE_DOMAIN}." not in text  # no subdomains: no wildcard
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
