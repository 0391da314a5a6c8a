"""mtasidecar.doctor: every check, passing and failing, against real things.

DNS answers come from a real DNS server on loopback (tests/dnsserver.py);
SMTP from a small STARTTLS-capable server on a loopback socket; the policy
service is mtasidecar's own PolicyServer over a real SQLite store; Postfix's
settings are read with the real postconf from a scratch configuration
directory; the API is an HTTP server on loopback. No network.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.reversename
import pytest

from mtasidecar import doctor as D
from mtasidecar import policy as P
from mtasidecar.config import load
from mtasidecar.mta.render import settle
from mtasidecar.store import Store
from mtasidecar.store.models import Domain
from tests.dnsserver import DNSTestServer

ROOT = Path(__file__).resolve().parents[2]
HOST4 = "198.51.100.25"     # "this host" in these tests (passed as local_addresses)
HOST6 = "2001:db8::25"
NAT4 = "10.0.0.5"           # an internal address of this host, as behind NAT
MX = "mx.good.test"


def _ptr(address: str) -> str:
    return dns.reversename.from_address(address).to_text(omit_final_dot=True)


ZONE = {
    "good.test": {"MX": [(10, MX)]},
    "*.good.test": {"MX": [(10, MX)]},
    MX: {"A": [HOST4], "AAAA": [HOST6]},
    _ptr(HOST4): {"PTR": [MX]},
    _ptr(HOST6): {"PTR": ["something.else.test"]},
    "nomx.test": {"A": [HOST4]},
    "elsewhere.test": {"MX": [(10, "mx.elsewhere.test")]},
    "mx.elsewhere.test": {"A": ["203.0.113.9"]},
    "half.test": {"MX": [(10, "mx.half.test")]},
    "mx.half.test": {"A": [HOST4], "AAAA": ["2001:db8::99"]},
    "loop.test": {"MX": [(10, "mx.loop.test")]},
    "mx.loop.test": {"A": ["127.0.0.1"]},
    "nat.test": {"MX": [(10, "mx.nat.test")]},
    "mx.nat.test": {"A": [NAT4]},
    "backup.test": {"MX": [(10, "mx.elsewhere.test"), (20, MX)]},
    "nullmx.test": {"MX": [(0, ".")]},
    "dangling.test": {"MX": [(10, "mx.dangling.test")]},
    "nowild.test": {"MX": [(10, MX)]},
}
DOMAINS = [
    {"name": "good.test", "subdomains": True},                      # private (the default)
    {"name": "pub.test", "subdomains": False, "mode": "public"},
    {"name": "nowild.test", "subdomains": True},
]


@pytest.fixture(scope="module")
def dns_server():
    server = DNSTestServer(ZONE).start()
    yield server
    server.stop()


def make_settings(tmp_path: Path, dns_server=None, **over):
    data = {"data_dir": str(tmp_path / "data"), "hostname": MX, "domains": DOMAINS,
            "dns": {"servers": [f"127.0.0.1:{dns_server.port}"] if dns_server else [], "timeout": 2.0},
            "policy": {"listen": ""}, "api": {"host": "127.0.0.1", "port": _free_port()}}
    for key, value in over.items():
        data[key] = dict(data.get(key) or {}, **value) if isinstance(value, dict) else value
    return load(None, environ={}, overrides=data)


def make_doctor(settings, **kw) -> D.Doctor:
    opts = dict(local_addresses={HOST4, HOST6, NAT4, "127.0.0.1", "::1"}, smtp=[], timeout=3.0)
    opts.update(kw)
    return D.Doctor(settings, [d.name for d in settings.domains], **opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_name(results, prefix: str) -> list[D.Result]:
    return [r for r in results if r.name.startswith(prefix)]


def one(results, name: str) -> D.Result:
    found = [r for r in results if r.name == name]
    assert len(found) == 1, f"{name!r} in {[r.name for r in results]}"
    return found[0]


# --- DNS ----------------------------------------------------------------------------------


@pytest.fixture
def dns_doctor(tmp_path, dns_server):
    return make_doctor(make_settings(tmp_path, dns_server))


def test_mx_pointing_here_passes_with_ptr_advice(dns_doctor):
    results = dns_doctor.check_mx("good.test")
    mx = one(results, "MX good.test")
    assert mx.status == D.OK, mx
    assert HOST4 in mx.detail and HOST6 in mx.detail and MX in mx.detail
    assert one(results, f"PTR {HOST4}").status == D.OK
    ptr6 = one(results, f"PTR {HOST6}")
    assert ptr6.status == D.WARN and "something.else.test" in ptr6.detail
    assert f"reverse DNS of {HOST6} to {MX}" in ptr6.fix


def test_wildcard_mx_is_checked_only_with_subdomains(dns_doctor):
    wild = dns_doctor.check_wildcard_mx("good.test")
    assert [r.status for r in wild] == [D.OK], wild
    assert wild[0].name == "wildcard MX *.good.test"
    skipped = dns_doctor.check_wildcard_mx("pub.test")
    assert [r.status for r in skipped] == [D.SKIP]
    missing = dns_doctor.check_wildcard_mx("nowild.test")
    assert missing[0].status == D.FAIL
    assert missing[0].fix == f'create "*.nowild.test. IN MX 10 {MX}." at your DNS provider'


@pytest.mark.parametrize("domain, detail, fix", [
    ("nomx.test", "nomx.test has no MX record", f'create "nomx.test. IN MX 10 {MX}."'),
    ("absent.test", "does not exist in DNS (NXDOMAIN)", 'create "absent.test. IN MX'),
    ("elsewhere.test", "203.0.113.9 is not an address of this host", "point mx.elsewhere.test's A/AAAA"),
    ("half.test", "2001:db8::99 is not an address of this host", "point mx.half.test's A/AAAA"),
    ("loop.test", "127.0.0.1 is a loopback address", "point mx.loop.test's A/AAAA"),
    ("backup.test", f"only {MX} (preference 20) points here", f"give {MX} the lowest MX preference"),
    ("nullmx.test", "null MX", "replace it"),
    ("dangling.test", "mx.dangling.test does not exist", f'create "mx.dangling.test. IN A {HOST4}"'),
])
def test_mx_failures_say_what_is_wrong_and_how_to_fix_it(dns_doctor, domain, detail, fix):
    results = dns_doctor.check_mx(domain)
    assert results[0].status == D.FAIL, results
    assert detail in results[0].detail, results[0]
    assert fix in results[0].fix, results[0]


def test_mx_to_an_internal_address_passes_with_a_warning(dns_doctor):
    results = dns_doctor.check_mx("nat.test")
    assert results[0].status == D.OK
    warning = one(results, "MX address nat.test")
    assert warning.status == D.WARN and NAT4 in warning.detail and "NAT" in warning.detail
    assert not by_name(results, "PTR"), "no PTR advice for an internal address"


def test_a_dns_server_that_does_not_answer_in_time(tmp_path):
    with DNSTestServer(ZONE, delay=2.0) as slow:
        doctor = make_doctor(make_settings(tmp_path, slow, dns={"timeout": 0.2}))
        started = time.monotonic()
        results = doctor.check_mx("good.test")
        assert time.monotonic() - started < 1.5
    assert results[0].status == D.FAIL
    assert "did not answer" in results[0].detail


def test_local_addresses_of_this_host():
    found = D.local_addresses_of_host()
    assert "127.0.0.1" in found
    assert all(D._norm(a) == a for a in found)


# --- SMTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={MX}", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


class SmtpServer:
    """Just enough SMTP on a loopback socket: a greeting, EHLO, STARTTLS, QUIT."""

    def __init__(self, certificate=None, greeting: int = 220, starttls: bool = True, broken_tls: bool = False):
        self.context = None
        if certificate:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*map(str, certificate))
        self.greeting, self.starttls, self.broken_tls = greeting, starttls, broken_tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        conn.settimeout(10)
        try:
            f = conn.makefile("rwb")
            f.write(f"{self.greeting} mx.good.test ESMTP test\r\n".encode())
            f.flush()
            while line := f.readline():
                verb = line.split()[0].upper() if line.split() else b""
                if verb in (b"EHLO", b"HELO"):
                    f.write(b"250-mx.good.test\r\n250-PIPELINING\r\n" +
                            (b"250-STARTTLS\r\n" if self.starttls and self.context else b"") + b"250 8BITMIME\r\n")
                elif verb == b"STARTTLS" and self.starttls:
                    f.write(b"220 2.0.0 Ready to start TLS\r\n")
                    f.flush()
                    if self.broken_tls:
                        conn.sendall(b"this is not a TLS record\r\n")
                        return
                    conn = self.context.wrap_socket(conn, server_side=True)
                    f = conn.makefile("rwb")
                    continue
                elif verb == b"QUIT":
                    f.write(b"221 2.0.0 Bye\r\n")
                    f.flush()
                    return
                else:
                    f.write(b"250 2.0.0 Ok\r\n")
                f.flush()
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def smtp_server(certificate):
    servers = []

    def start(**kw):
        server = SmtpServer(certificate, **kw)
        servers.append(server)
        return server
    yield start
    for s in servers:
        s.close()


def test_smtp_with_starttls_passes(tmp_path, smtp_server):
    server = smtp_server()
    result = make_doctor(make_settings(tmp_path)).check_smtp("127.0.0.1", server.port)
    assert result.status == D.OK, result
    assert result.detail.startswith("220 mx.good.test ESMTP test; STARTTLS works (TLS")


@pytest.mark.parametrize("kw, detail, fix", [
    ({"starttls": False}, "no STARTTLS offered", "smtpd_tls_cert_file"),
    ({"greeting": 554}, "greeted with 554", "why it refuses"),
    ({"broken_tls": True}, "handshake failed", "smtpd_tls_key_file"),
])
def test_smtp_failures(tmp_path, smtp_server, kw, detail, fix):
    server = smtp_server(**kw)
    result = make_doctor(make_settings(tmp_path)).check_smtp("127.0.0.1", server.port)
    assert result.status == D.FAIL, result
    assert detail in result.detail and fix in result.fix


def test_smtp_nothing_listening(tmp_path):
    result = make_doctor(make_settings(tmp_path)).check_smtp("127.0.0.1", _free_port())
    assert result.status == D.FAIL
    assert "nothing answers" in result.detail and "start Postfix" in result.fix


# --- Postfix ------------------------------------------------------------------------------------

needs_postconf = pytest.mark.skipif(D._program("postconf") is None, reason="Postfix is not installed")


@needs_postconf
def test_smtp_targets_come_from_postfix_master_cf(tmp_path):
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n")
    (tmp_path / "master.cf").write_text(
        "smtp      inet  n       -       y       -       -       smtpd\n"
        "127.0.0.1:2626 inet n   -       n       -       -       smtpd\n"
        "[::1]:2727 inet  n      -       n       -       -       smtpd\n"
        "submission inet n       -       y       -       -       smtpd\n"
        "  -o smtpd_tls_security_level=encrypt\n"
        "2828      inet  n       -       n       -       1       postscreen\n"
        "pickup    unix  n       -       y       60      1       pickup\n")
    settle(tmp_path)  # else postconf waits ~2 s for files changed within the last second
    assert D.postfix_smtp_targets(str(tmp_path)) == [
        ("127.0.0.1", 25), ("127.0.0.1", 2626), ("::1", 2727), ("127.0.0.1", 2828)]


def admin_postfix(tmp_path, main_cf: str):
    """A Postfix config dir as an administrator left it: this main.cf, a stock smtp line."""
    d = tmp_path / "postfix"
    d.mkdir()
    (d / "main.cf").write_text(main_cf)
    (d / "master.cf").write_text("smtp      inet  n       -       y       -       -       smtpd\n")
    settle(d)  # else postconf waits ~2 s for files changed within the last second
    return d


@pytest.fixture
def postfix_dir(tmp_path):
    from mtasidecar.mta.commands import rendered_for
    from mtasidecar.mta.render import apply_config
    d = admin_postfix(tmp_path, "# an administrator's\nsmtpd_banner = $myhostname ESMTP\n")
    settings = make_settings(tmp_path, policy={"listen": "127.0.0.1:10040"})
    apply_config(rendered_for(settings, create_user=False), d)
    return settings, d


@needs_postconf
def test_postfix_with_our_settings_passes(postfix_dir):
    settings, d = postfix_dir
    result = make_doctor(settings, postfix_dir=str(d)).check_postfix()
    assert result.status == D.OK, result


OURS = "check_policy_service { inet:127.0.0.1:10040, { default_action = DUNNO }, policy_context=mtasidecar }"


def test_our_policy_entry_carries_its_default_action_and_marker():
    from mtasidecar.mta.render import policy_entry
    assert policy_entry("127.0.0.1:10040", "DUNNO") == OURS
    assert policy_entry("unix:/run/p", "DEFER_IF_PERMIT 4.3.0 down, retry") == (
        "check_policy_service { unix:/run/p, { default_action = DEFER_IF_PERMIT 4.3.0 down, retry }, "
        "policy_context=mtasidecar }")
    with pytest.raises(ValueError, match="braces"):
        policy_entry("127.0.0.1:10040", "REJECT }")


def test_merge_list_puts_our_entry_in_front_once():
    from mtasidecar.mta.render import list_contains, merge_list
    theirs = "permit_sasl_authenticated,\n  reject_unauth_destination, check_policy_service unix:private/policyd-spf"
    merged = merge_list(theirs, OURS)
    assert merged.startswith(OURS + ", ") and merged.endswith("unix:private/policyd-spf")
    assert merge_list(merged, OURS) == merged
    assert merge_list("", OURS) == OURS
    assert list_contains("permit_mynetworks " + OURS.replace(", ", " ,  "), OURS), "spacing does not matter"
    assert not list_contains(OURS.replace("10040", "100400"), OURS), "whole words only"
    assert not list_contains(theirs, OURS)


def test_merge_list_replaces_an_older_entry_of_ours():
    from mtasidecar.mta.render import merge_list
    # Our entry for another endpoint (the setting changed), and the plain form
    # rendered before the marker: both give way, the administrator's stay.
    moved = OURS.replace("10040", "9999")
    assert merge_list(f"permit_mynetworks, {moved}, reject_rbl_client x.test", OURS) == (
        f"{OURS}, permit_mynetworks, reject_rbl_client x.test")
    assert merge_list("check_policy_service inet:127.0.0.1:10040 permit_mynetworks", OURS) == (
        f"{OURS}, permit_mynetworks")
    # Someone else's policy service on another port is not ours.
    assert merge_list("check_policy_service inet:127.0.0.1:10050", OURS) == (
        f"{OURS}, check_policy_service inet:127.0.0.1:10050")


def test_without_ours_keeps_everything_else():
    from mtasidecar.mta.render import without_ours
    theirs = "permit_mynetworks, check_policy_service { inet:127.0.0.1:12525, timeout=5s }, reject_rbl_client x.test"
    assert without_ours(f"{OURS}, {theirs}") == theirs
    assert without_ours(f"permit_mynetworks {OURS}") == "permit_mynetworks"
    assert without_ours(OURS) == ""
    assert without_ours(theirs) == theirs


@needs_postconf
def test_apply_refuses_a_postfix_too_old_for_our_policy_entry(tmp_path, monkeypatch):
    """Postfix < 3.1 cannot parse check_policy_service { ..., policy_context=... }:
    its smtpd would exit on every connection. Nothing is written then."""
    from mtasidecar.mta import render
    from mtasidecar.mta.commands import rendered_for
    d = admin_postfix(tmp_path, "smtpd_banner = $myhostname ESMTP\n")
    real = render.postconf
    monkeypatch.setattr(render, "postconf",
                        lambda cd, *args: "3.0.15\n" if args == ("-h", "mail_version") else real(cd, *args))
    settings = make_settings(tmp_path, policy={"listen": "127.0.0.1:10040"})
    with pytest.raises(render.PostfixError, match=r"3\.0\.15 is too old.*3\.1 or later"):
        render.apply_config(rendered_for(settings, create_user=False), d)
    assert (d / "main.cf").read_text() == "smtpd_banner = $myhostname ESMTP\n"
    assert not (d / render.DOMAINS_MAP).exists()


@needs_postconf
def test_apply_with_the_policy_service_off_takes_our_entry_out(tmp_path):
    from mtasidecar.mta.commands import rendered_for
    from mtasidecar.mta.render import apply_config, postconf
    d = admin_postfix(tmp_path, "smtpd_recipient_restrictions = permit_sasl_authenticated\n")
    on = make_settings(tmp_path, policy={"listen": "127.0.0.1:10040"})
    apply_config(rendered_for(on, create_user=False), d)
    assert postconf(d, "-nh", "smtpd_recipient_restrictions").startswith(OURS)
    off = make_settings(tmp_path, policy={"listen": ""})
    apply_config(rendered_for(off, create_user=False), d)
    assert postconf(d, "-nh", "smtpd_recipient_restrictions").strip() == "permit_sasl_authenticated"
    # Ours alone in the list: the setting goes (Postfix's default, empty).
    postconf(d, "-e", f"smtpd_recipient_restrictions={OURS}")
    apply_config(rendered_for(off, create_user=False), d)
    assert "smtpd_recipient_restrictions" not in postconf(d, "-n")


@needs_postconf
def test_apply_keeps_an_administrators_recipient_restrictions(tmp_path):
    from mtasidecar.mta.commands import rendered_for
    from mtasidecar.mta.render import apply_config, postconf
    d = admin_postfix(tmp_path, "smtpd_recipient_restrictions = permit_sasl_authenticated,\n"
                               "    check_policy_service unix:private/policyd-spf\n")
    settings = make_settings(tmp_path, policy={"listen": "127.0.0.1:10040"})
    apply_config(rendered_for(settings, create_user=False), d)
    want = f"{OURS}, permit_sasl_authenticated, check_policy_service unix:private/policyd-spf"
    assert " ".join(postconf(d, "-nh", "smtpd_recipient_restrictions").split()) == want
    apply_config(rendered_for(settings, create_user=False), d)  # again: no second entry
    assert " ".join(postconf(d, "-nh", "smtpd_recipient_restrictions").split()) == want
    result = make_doctor(settings, postfix_dir=str(d)).check_postfix()
    assert result.status == D.OK, result


@needs_postconf
def test_postfix_settings_changed_by_hand_fail(postfix_dir):
    settings, d = postfix_dir
    subprocess.run([D._program("postconf"), "-c", str(d), "-e", "virtual_mailbox_domains=example.org",
                    "smtpd_recipient_restrictions=permit_mynetworks"], check=True)
    settle(d)
    result = make_doctor(settings, postfix_dir=str(d)).check_postfix()
    assert result.status == D.FAIL
    assert "2 of our settings differ" in result.detail
    assert "virtual_mailbox_domains = example.org" in result.detail
    assert "smtpd_recipient_restrictions" in result.detail
    assert result.fix.startswith(f"mtasidecar postfix apply --config-dir {d}")


@needs_postconf
def test_postfix_maps_out_of_date_fail(postfix_dir, tmp_path):
    _, d = postfix_dir
    # One more domain configured since the last apply: the maps lack it.
    settings = make_settings(tmp_path, policy={"listen": "127.0.0.1:10040"},
                             domains=DOMAINS + [{"name": "new.test"}])
    result = make_doctor(settings, postfix_dir=str(d)).check_postfix()
    assert result.status == D.FAIL
    assert "mtasidecar-domains.pcre is out of date" in result.detail


@needs_postconf
def test_postfix_without_main_cf_fails(tmp_path):
    result = make_doctor(make_settings(tmp_path), postfix_dir=str(tmp_path / "none")).check_postfix()
    assert result.status == D.FAIL and "postconf -n failed" in result.detail


# --- policy service -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'data' / 'mtasidecar.db'}")
    s.setup()
    s.sync_domains([("good.test", True, "private"), ("pub.test", False, "public")])
    yield s
    s.close()


class PolicyThread:
    """mtasidecar's PolicyServer on its own event loop in a thread."""

    def __init__(self, store):
        self.server = P.PolicyServer(P.Policy(store.db), "127.0.0.1:0")
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.server.close())
            self.loop.close()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.listen = self.server.address

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def policy_server(store):
    server = PolicyThread(store)
    yield server
    server.stop()


def test_policy_answers_as_the_domain_mode_says(tmp_path, policy_server):
    doctor = make_doctor(make_settings(tmp_path, policy={"listen": policy_server.listen}))
    private = doctor.check_policy("good.test")
    assert private.status == D.OK and "550 5.1.1" in private.detail, private
    public = doctor.check_policy("pub.test")
    assert public.status == D.OK and "DUNNO" in public.detail, public


def test_policy_that_does_not_know_a_private_domain_fails(tmp_path, policy_server):
    # Configured, but the policy service's database has never heard of it
    # (init-db not run, or the service not restarted): it answers DUNNO.
    doctor = make_doctor(make_settings(tmp_path, policy={"listen": policy_server.listen}))
    result = doctor.check_policy("nowild.test")
    assert result.status == D.FAIL
    assert "'DUNNO'" in result.detail and "want 550" in result.detail
    assert "restart the policy service" in result.fix


def test_policy_not_running_fails(tmp_path):
    doctor = make_doctor(make_settings(tmp_path, policy={"listen": f"127.0.0.1:{_free_port()}"}))
    result = doctor.check_policy("good.test")
    assert result.status == D.FAIL and "no answer from" in result.detail
    assert "mtasidecar-policy" in result.fix


def test_no_policy_service_matters_only_for_private_domains(tmp_path):
    doctor = make_doctor(make_settings(tmp_path))
    assert doctor.check_policy("good.test").status == D.FAIL
    assert doctor.check_policy("pub.test").status == D.SKIP


# --- spool ------------------------------------------------------------------------------------------------


def _spool(tmp_path, files: int = 0, age: float = 0.0) -> Path:
    new = tmp_path / "data" / "Maildir" / "new"
    new.mkdir(parents=True, exist_ok=True)
    then = time.time() - age
    for i in range(files):
        path = new / f"{i}.test"
        path.write_bytes(b"Subject: x\r\n\r\nx\r\n")
        os.utime(path, (then, then))
    return new


def test_spool_empty_and_fresh_files_pass(tmp_path):
    doctor = make_doctor(make_settings(tmp_path))
    _spool(tmp_path)
    assert doctor.check_spool().status == D.OK
    _spool(tmp_path, files=3, age=5)
    result = doctor.check_spool()
    assert result.status == D.OK and result.detail.startswith("3 file(s) waiting, oldest")


def test_spool_with_an_old_file_fails(tmp_path):
    _spool(tmp_path, files=1, age=3600)
    result = make_doctor(make_settings(tmp_path), spool_max_age=300).check_spool()
    assert result.status == D.FAIL and "older than 300 s" in result.detail
    assert "mtasidecar-ingest" in result.fix


def test_spool_with_too_many_files_fails(tmp_path):
    _spool(tmp_path, files=6)
    result = make_doctor(make_settings(tmp_path), spool_max_files=5).check_spool()
    assert result.status == D.FAIL and "over 5" in result.detail


def test_spool_missing_fails(tmp_path):
    result = make_doctor(make_settings(tmp_path)).check_spool()
    assert result.status == D.FAIL and "does not exist" in result.detail and "install -d" in result.fix


# --- database ------------------------------------------------------------------------------------------------


def test_database_writable_and_left_unchanged(tmp_path, store):
    before = Domain.select().count()
    result = make_doctor(make_settings(tmp_path)).check_database()
    assert result.status == D.OK, result
    assert "rolled back" in result.detail
    with sqlite3.connect(tmp_path / "data" / "mtasidecar.db") as conn:
        assert conn.execute('SELECT count(*) FROM "domain"').fetchone()[0] == before


def test_database_missing_or_without_schema_fails(tmp_path):
    doctor = make_doctor(make_settings(tmp_path))
    missing = doctor.check_database()
    assert missing.status == D.FAIL and "does not exist" in missing.detail and "init-db" in missing.fix
    (tmp_path / "data").mkdir()
    sqlite3.connect(tmp_path / "data" / "mtasidecar.db").close()
    empty = doctor.check_database()
    assert empty.status == D.FAIL and "no schema" in empty.detail and "init-db" in empty.fix


def test_database_held_by_a_writer_fails(tmp_path, store):
    holder = sqlite3.connect(tmp_path / "data" / "mtasidecar.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = make_doctor(make_settings(tmp_path), db_busy_timeout=0.2).check_database()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.status == D.FAIL and "busy" in result.detail, result


# --- API ---------------------------------------------------------------------------------------------------------


class ApiServer:
    def __init__(self, status: int = 200):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                code = status if self.path == "/healthz" else 404
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status, expected", [(200, D.OK), (503, D.FAIL)])
def test_api_healthz(tmp_path, status, expected):
    api = ApiServer(status)
    try:
        result = make_doctor(make_settings(tmp_path, api={"port": api.port})).check_api()
    finally:
        api.close()
    assert result.status == expected, result
    assert f"127.0.0.1:{api.port}/healthz" in result.detail


def test_api_not_running(tmp_path):
    result = make_doctor(make_settings(tmp_path)).check_api()
    assert result.status == D.FAIL and "mtasidecar-api" in result.fix


def test_a_check_that_breaks_is_reported_not_raised(tmp_path):
    def check_boom():
        raise RuntimeError("surprise")
    results = D.Doctor._safely(check_boom)
    assert results[0].status == D.FAIL and "RuntimeError: surprise" in results[0].detail


# --- the command, end to end ---------------------------------------------------------------------------------------


@needs_postconf
def test_command_exit_status_and_output(tmp_path, dns_server, smtp_server, policy_server):
    """`mtasidecar doctor` in a subprocess against all of the above: 0 when every
    check passes (warnings allowed), 1 with a fix line when one fails."""
    from mtasidecar.mta.commands import rendered_for
    from mtasidecar.mta.render import apply_config
    smtp = smtp_server()
    api = ApiServer()
    _spool(tmp_path, files=1)
    config = tmp_path / "config.toml"
    config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
hostname = "{MX}"

[[domains]]
name = "good.test"
subdomains = true

[dns]
servers = ["127.0.0.1:{dns_server.port}"]

[policy]
listen = "{policy_server.listen}"

[api]
port = {api.port}
""")
    pdir = tmp_path / "postfix"
    pdir.mkdir()
    (pdir / "main.cf").write_text("smtpd_banner = $myhostname ESMTP\n")
    settle(pdir)
    apply_config(rendered_for(load(config, environ={}), create_user=False), pdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
    argv = [sys.executable, "-m", "mtasidecar", "--config", str(config), "doctor", "--domain", "good.test",
            "--address", HOST4, "--address", HOST6, "--smtp", f"127.0.0.1:{smtp.port}", "--postfix-dir", str(pdir)]
    try:
        passing = subprocess.run(argv + ["--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        report = json.loads(passing.stdout)
        assert passing.returncode == 0, passing.stdout + passing.stderr
        assert report["ok"] is True and report["domains"] == ["good.test"]
        statuses = {c["name"]: c["status"] for c in report["checks"]}
        for name in ("configured good.test", "MX good.test", "wildcard MX *.good.test", f"SMTP 127.0.0.1:{smtp.port}",
                     "Postfix settings", "policy service good.test", "Maildir new/", "database", "API"):
            assert statuses.get(name) == "ok", (name, report["checks"])
        assert statuses[f"PTR {HOST6}"] == "warn"
    finally:
        api.close()

    failing = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    lines = failing.stdout.splitlines()
    api_line = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] API"))
    assert lines[api_line + 1].strip().startswith("fix: systemctl status mtasidecar-api")
    assert lines[-1] == f"{len(report['checks'])} checks: 1 failed, 1 warning(s)"


def test_command_without_a_domain(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
    env["MTASIDECAR_DATA_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "mtasidecar", "doctor"], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "give --domain NAME" in result.stderr
