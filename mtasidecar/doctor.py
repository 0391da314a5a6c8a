"""`mtasidecar doctor`: is this box ready to receive mail for a domain?

Checks what can be checked from the machine itself and prints a checklist,
each failure with a one-line fix:

- the domain is configured (``[[domains]]``);
- DNS: the domain's MX points at a name whose A/AAAA records are addresses of
  this host (a wildcard MX ``*.NAME`` too when the domain takes subdomains),
  with a warning when the address has no matching PTR;
- SMTP: something listens on each port Postfix receives on (its ``inet``
  smtpd services in master.cf, else 25), greets with 220 and offers a
  working STARTTLS;
- Postfix: ``postconf -n`` holds the settings ``mtasidecar postfix apply``
  merges, and the maps beside main.cf are current;
- the policy service answers a test request as the domain's mode says;
- the Maildir's ``new/`` is not backing up (file count, oldest file's age);
- the database is writable (a row written in a transaction rolled back);
- the API answers ``/healthz``.

Every check catches its own errors: one broken check never hides the others.
Status ``fail`` makes the exit status 1; ``warn`` (advice) and ``skip`` (not
applicable) do not. Run it as root or as the service user (it reads the
Maildir, which is 0700).

This module imports only the standard library at the top: the CLI builds its
parser from here, and ``deliver`` must start fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

DEFAULT_POSTFIX_DIR = "/etc/postfix"
DEFAULT_SPOOL_MAX_FILES = 1000
DEFAULT_SPOOL_MAX_AGE = 300.0
# Services that receive mail from clients, not from other MTAs: not checked.
_SUBMISSION = {"submission", "submissions", "smtps", "465", "587"}
# Addresses other machines on the internet cannot reach (RFC 1918, CGNAT,
# link-local, ULA). Documentation ranges are left out on purpose: they stand
# for public addresses in examples and tests.
_INTERNAL = [ipaddress.ip_network(n) for n in
             ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
              "fc00::/7", "fe80::/10")]


@dataclasses.dataclass
class Result:
    name: str
    status: str
    detail: str
    fix: str = ""


class Doctor:
    """The checks, with everything they look at injectable for tests.

    ``local_addresses``: the addresses that count as "this host" (default:
    the interfaces' addresses). ``smtp``: ``(host, port)`` pairs to check
    (default: from Postfix's master.cf). ``resolver``: a dnspython resolver
    (default: ``[dns] servers`` of the settings, else the system's).
    """

    def __init__(self, settings, domains: list[str], *, local_addresses=None, smtp=None,
                 postfix_dir: str = DEFAULT_POSTFIX_DIR, spool_max_files: int = DEFAULT_SPOOL_MAX_FILES,
                 spool_max_age: float = DEFAULT_SPOOL_MAX_AGE, resolver=None, timeout: float = 5.0,
                 db_busy_timeout: float = 5.0, runtime_domains: dict | None = None):
        self.settings = settings
        # name → DomainSettings of the domains added through the API (runtime_domains_of)
        self.runtime_domains = runtime_domains or {}
        self.domains = [d.strip().rstrip(".").lower() for d in domains]
        self.local = set(local_addresses) if local_addresses is not None else local_addresses_of_host()
        self.local = {str(ipaddress.ip_address(a)) for a in self.local}
        self.smtp = smtp
        self.postfix_dir = postfix_dir
        self.spool_max_files = spool_max_files
        self.spool_max_age = spool_max_age
        self._resolver = resolver
        self.timeout = timeout
        self.db_busy_timeout = db_busy_timeout

    # -- running -----------------------------------------------------------------

    def run(self) -> list[Result]:
        results: list[Result] = []
        for domain in self.domains:
            for check in (self.check_configured, self.check_mx, self.check_wildcard_mx):
                results.extend(self._safely(check, domain))
        for target in self.smtp_targets():
            results.extend(self._safely(self.check_smtp, *target))
        results.extend(self._safely(self.check_postfix))
        for domain in self.domains:
            results.extend(self._safely(self.check_policy, domain))
        results.extend(self._safely(self.check_spool))
        results.extend(self._safely(self.check_database))
        results.extend(self._safely(self.check_api))
        return results

    @staticmethod
    def _safely(check, *args) -> list[Result]:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        if args:
            name += " " + ":".join(str(a) for a in args)
        try:
            out = check(*args)
        except Exception as exc:  # a bug or a surprise in one check: report it, go on
            return [Result(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                           "report this (mtasidecar doctor --json shows the details)")]
        return out if isinstance(out, list) else [out]

    # -- configuration ------------------------------------------------------------

    def domain(self, name: str):
        """A configured domain, or one added at runtime."""
        return self.settings.domain(name) or self.runtime_domains.get(name)

    def check_configured(self, domain: str) -> Result:
        d = self.domain(domain)
        name = f"configured {domain}"
        if d is None:
            known = ", ".join(x.name for x in self.settings.domains) or "none"
            return Result(name, FAIL, f"{domain} is not in the [[domains]] of the settings (configured: {known})",
                          f"add [[domains]] name = \"{domain}\" to config.toml (or to mtasidecar_domains) "
                          "and restart the services")
        return Result(name, OK, f"{domain}: {d.mode}" + (", subdomains too" if d.subdomains else "")
                      + (" (added at runtime)" if self.settings.domain(domain) is None else ""))

    # -- DNS -------------------------------------------------------------------------

    @property
    def resolver(self):
        if self._resolver is None:
            self._resolver = make_resolver(self.settings.dns.server_addresses(), self.settings.dns.timeout)
        return self._resolver

    def _query(self, name: str, rdtype: str):
        """(records, error): records is a list of rdata (possibly empty); error a
        sentence when the look-up failed (the name does not exist, no answer)."""
        import dns.exception
        import dns.resolver
        try:
            answer = self.resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False,
                                           lifetime=self.resolver.timeout * 2)
        except dns.resolver.NXDOMAIN:
            return [], f"{name} does not exist in DNS (NXDOMAIN)"
        except dns.exception.Timeout:
            return [], f"DNS did not answer for {name} {rdtype} in time"
        except dns.resolver.NoNameservers as exc:
            return [], f"no DNS server could answer for {name} {rdtype} ({_short(exc)})"
        except dns.exception.DNSException as exc:
            return [], f"DNS look-up of {name} {rdtype} failed: {_short(exc)}"
        records = list(answer.rrset) if answer.rrset is not None else []
        return records, None

    def _addresses(self, host: str) -> tuple[list[str], list[str]]:
        """(addresses, problems) of an MX target."""
        addresses, problems = [], []
        for rdtype in ("A", "AAAA"):
            records, error = self._query(host, rdtype)
            if error and "NXDOMAIN" in error:
                return [], [error]
            if error:
                problems.append(error)
            addresses += [r.address for r in records]
        return addresses, problems

    def check_mx(self, domain: str, owner: str | None = None) -> list[Result]:
        owner = owner or domain
        label = "wildcard MX" if owner.startswith("*.") else "MX"
        name = f"{label} {owner}"
        hostname = self.settings.hostname
        create = f"create \"{owner}. IN MX 10 {hostname}.\" at your DNS provider"
        records, error = self._query(owner, "MX")
        if error:
            return [Result(name, FAIL, error, create)]
        if not records:
            return [Result(name, FAIL, f"{owner} has no MX record" +
                           ("" if label == "MX" else " (mail to any.sub." + domain + " has nowhere to go)"),
                           create)]
        mx = sorted((r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in records)
        if mx == [(0, "")] or any(host in ("", ".") for _, host in mx):
            return [Result(name, FAIL, f"{owner} has a null MX (\"0 .\"): it says the domain takes no mail",
                           f"replace it: {create.removeprefix('create ')}")]
        best = mx[0][0]
        here, elsewhere, warnings = [], [], []
        for pref, host in mx:
            addresses, problems = self._addresses(host)
            if not addresses:
                elsewhere.append((pref, host, "; ".join(problems) or "no A/AAAA record"))
                continue
            mine = [a for a in addresses if _norm(a) in self.local]
            foreign = [a for a in addresses if _norm(a) not in self.local]
            loopback = [a for a in addresses if ipaddress.ip_address(a).is_loopback]
            if loopback:
                elsewhere.append((pref, host, f"{', '.join(loopback)} is a loopback address, "
                                              "no other machine can reach it"))
            elif foreign:
                elsewhere.append((pref, host, f"{', '.join(foreign)} "
                                              f"{'is' if len(foreign) == 1 else 'are'} not "
                                              "an address of this host"))
            else:
                here.append((pref, host, mine))
                internal = [a for a in mine if _internal(a)]
                if internal:
                    warnings.append(f"{host} resolves to {', '.join(internal)}, which the internet cannot "
                                    "reach (behind NAT the record needs the public address)")
        this_host = ", ".join(sorted(self.local, key=_sort_key)) or "none found"
        if not here or here[0][0] != best:
            why = "; ".join(f"{h} ({p}): {reason}" for p, h, reason in elsewhere)
            target = elsewhere[0][1] if elsewhere else hostname
            public = _public_choice(self.local)
            if elsewhere and ("no A/AAAA" in elsewhere[0][2] or "does not exist" in elsewhere[0][2]):
                fix = f"create \"{target}. IN A {public}\" (and AAAA if this host has IPv6)"
            elif here:
                fix = f"give {here[0][1]} the lowest MX preference, or point {target} here"
            else:
                fix = (f"point {target}'s A/AAAA at this host ({public}); behind 1:1 NAT pass the public "
                       "address with --address")
            detail = f"{owner} MX → {why}" + (f" (this host: {this_host})" if elsewhere else "")
            if here:
                detail += f"; only {here[0][1]} (preference {here[0][0]}) points here, senders try the others first"
            return [Result(name, FAIL, detail, fix)]
        pref, host, mine = here[0]
        detail = f"{owner} MX {pref} {host} → {', '.join(mine)} (this host)"
        if elsewhere:
            detail += "; backup MX elsewhere: " + ", ".join(h for _, h, _ in elsewhere)
        out = [Result(name, OK, detail)]
        for w in warnings:
            out.append(Result(f"{label} address {owner}", WARN, w,
                              "publish the public address in the A/AAAA record"))
        if label == "MX":
            out.extend(self._ptr(host, mine))
        return out

    def _ptr(self, host: str, addresses: list[str]) -> list[Result]:
        """Advice: each address should resolve back to the MX name (PTR)."""
        import dns.reversename
        out = []
        for address in addresses:
            if ipaddress.ip_address(address).is_loopback or _internal(address):
                continue
            records, error = self._query(dns.reversename.from_address(address).to_text(), "PTR")
            names = [r.target.to_text(omit_final_dot=True).lower() for r in records]
            if host in names:
                out.append(Result(f"PTR {address}", OK, f"{address} → {host}"))
            else:
                seen = ", ".join(names) or ("none" if not error else error)
                out.append(Result(f"PTR {address}", WARN, f"{address} has PTR {seen}, not {host}: many senders "
                                  "distrust a server whose address does not resolve back to its name",
                                  f"ask your provider to set the reverse DNS of {address} to {host}"))
        return out

    def check_wildcard_mx(self, domain: str) -> list[Result]:
        d = self.domain(domain)
        name = f"wildcard MX *.{domain}"
        if d is None:
            return [Result(name, SKIP, f"{domain} is not configured")]
        if not d.subdomains:
            return [Result(name, SKIP, f"{domain} takes no subdomains (subdomains = false)")]
        return self.check_mx(domain, owner=f"*.{domain}")

    # -- SMTP ----------------------------------------------------------------------------

    def smtp_targets(self) -> list[tuple[str, int]]:
        if self.smtp:
            return list(self.smtp)
        return postfix_smtp_targets(self.postfix_dir) or [("127.0.0.1", 25)]

    def check_smtp(self, host: str, port: int) -> Result:
        import smtplib
        import ssl
        name = f"SMTP {host}:{port}"
        hint = "systemctl status postfix; postconf -M | grep inet; tail /var/log/postfix.log"
        class Client(smtplib.SMTP):
            greeting = b""

            def connect(self, *args, **kw):
                code, self.greeting = super().connect(*args, **kw)
                return code, self.greeting

        try:
            # smtplib reads the greeting and raises SMTPConnectError unless it is 220.
            client = Client(host, port, local_hostname="doctor.mtasidecar.invalid", timeout=self.timeout)
        except smtplib.SMTPConnectError as exc:
            text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
            return Result(name, FAIL, f"greeted with {exc.smtp_code} {text} instead of 220",
                          f"look at why it refuses (smtpd_banner, postscreen, load): {hint}")
        except (OSError, smtplib.SMTPException) as exc:
            return Result(name, FAIL, f"nothing answers on {host}:{port} ({_short(exc)})",
                          f"start Postfix (systemctl start postfix) and check its inet services: {hint}")
        try:
            banner_text = client.greeting.decode("utf-8", "replace")
            client.ehlo("doctor.mtasidecar.invalid")
            if not client.has_extn("starttls"):
                return Result(name, FAIL, f"220 {banner_text}, but no STARTTLS offered after EHLO",
                              "set smtpd_tls_cert_file, smtpd_tls_key_file and smtpd_tls_security_level = may "
                              "(the role does), then postfix reload; check its log for TLS errors")
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # an MX's certificate is not verified by senders either
            try:
                client.starttls(context=context)
            except (ssl.SSLError, smtplib.SMTPException, OSError) as exc:
                return Result(name, FAIL, f"STARTTLS offered but the handshake failed: {_short(exc)}",
                              "check smtpd_tls_cert_file / smtpd_tls_key_file (readable, matching) and "
                              "Postfix's log")
            tls = client.sock.version() if hasattr(client.sock, "version") else "TLS"
            return Result(name, OK, f"220 {banner_text}; STARTTLS works ({tls})")
        except (OSError, smtplib.SMTPException) as exc:
            return Result(name, FAIL, f"the SMTP conversation failed: {_short(exc)}", hint)
        finally:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()

    # -- Postfix -------------------------------------------------------------------------

    def check_postfix(self) -> Result:
        from .mta.commands import rendered_for
        from .mta.render import MAIN_CF, MAP_FILES, MASTER_CF, MERGED_LISTS, list_contains, main_cf_settings, \
            master_cf_entries
        name = "Postfix settings"
        fix = (f"mtasidecar postfix apply --config-dir {self.postfix_dir} && postfix reload "
               "(or run the playbook again)")
        postconf = _program("postconf")
        if postconf is None:
            return Result(name, FAIL, "postconf not found: Postfix is not installed",
                          "apt-get install postfix postfix-pcre, then mtasidecar postfix apply")
        result = subprocess.run([postconf, "-c", self.postfix_dir, "-n"], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            return Result(name, FAIL, f"postconf -n failed: {_short(result.stderr or result.stdout)}",
                          f"check {self.postfix_dir}/main.cf (postfix check)")
        current = parse_postconf(result.stdout)
        rendered = rendered_for(self.settings, create_user=False)
        wanted = main_cf_settings(rendered[MAIN_CF])
        wrong = []
        for key, value in wanted.items():
            have = current.get(key)
            if key in MERGED_LISTS and have is not None and list_contains(have, value):
                continue  # our entry is in the administrator's list
            if have is None or _words(have) != _words(value):
                wrong.append(f"{key} = {have if have is not None else '(unset)'} (want {value})")
        entries = master_cf_entries(rendered[MASTER_CF])
        if entries:
            master = subprocess.run([postconf, "-c", self.postfix_dir, "-M"], capture_output=True, text=True,
                                    timeout=30).stdout
            have_entries = {f"{line.split()[0]}/{line.split()[1]}": _words(line)
                            for line in master.splitlines() if len(line.split()) >= 8}
            for key, entry in entries.items():
                if have_entries.get(key) != _words(entry):
                    wrong.append(f"master.cf {key} is {'different' if key in have_entries else 'missing'}")
        for map_name in MAP_FILES:
            path = Path(self.postfix_dir, map_name)
            try:
                text = path.read_text()
            except OSError:
                wrong.append(f"{map_name} is missing")
                continue
            if text != rendered[map_name]:
                wrong.append(f"{map_name} is out of date (the domains changed since the last apply?)")
        if wrong:
            shown = "; ".join(wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
            return Result(name, FAIL, f"{len(wrong)} of our settings differ: {shown}", fix)
        return Result(name, OK, f"main.cf has our {len(wanted)} settings; maps current")

    # -- policy service ----------------------------------------------------------------------

    def check_policy(self, domain: str) -> Result:
        listen = self.settings.policy.listen
        name = f"policy service {domain}"
        d = self.domain(domain)
        if not listen:
            status = FAIL if d is not None and d.mode == "private" else SKIP
            return Result(name, status, "no policy service configured ([policy] listen is empty)" +
                          (": unknown addresses on this private domain are not refused" if status == FAIL else ""),
                          "set [policy] listen = \"127.0.0.1:10040\", run mtasidecar postfix apply and start "
                          "mtasidecar-policy" if status == FAIL else "")
        if d is None:
            return Result(name, SKIP, f"{domain} is not configured")
        recipient = f"doctor-{secrets.token_hex(6)}@{domain}"
        request = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
                   "client_address": "192.0.2.1", "client_name": "doctor.mtasidecar.invalid",
                   "helo_name": "doctor.mtasidecar.invalid", "sender": "doctor@mtasidecar.invalid",
                   "recipient": recipient, "instance": f"doctor.{secrets.token_hex(4)}", "size": "0"}
        try:
            action = policy_request(listen, request, self.timeout)
        except OSError as exc:
            return Result(name, FAIL, f"no answer from {listen}: {_short(exc)}",
                          "systemctl status mtasidecar-policy (or mtasidecar-service status policy); "
                          "Postfix accepts every address while it is down")
        if d.mode == "private":
            if action.startswith("550"):
                return Result(name, OK, f"{listen} refuses an unknown address on {domain}: {action}")
            return Result(name, FAIL, f"{listen} answered {action!r} for an unknown address on private "
                          f"{domain} (want 550): it cannot read the database or does not know the domain",
                          "restart the policy service (it reads the domains at start); see its log")
        if action.upper().startswith(("DUNNO", "OK")):
            return Result(name, OK, f"{listen} accepts any address on public {domain}: {action}")
        return Result(name, FAIL, f"{listen} answered {action!r} for an address on public {domain}",
                      "see the policy service's log (a rate limit for 192.0.2.1 would say 450)")

    # -- spool -------------------------------------------------------------------------------

    def check_spool(self) -> Result:
        new = self.settings.maildir_path / "new"
        name = "Maildir new/"
        count, oldest = 0, None
        now = time.time()
        try:
            with os.scandir(new) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    count += 1
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:  # the ingester took it meanwhile
                        count -= 1
                        continue
                    oldest = mtime if oldest is None else min(oldest, mtime)
        except FileNotFoundError:
            return Result(name, FAIL, f"{new} does not exist: Postfix has nowhere to deliver",
                          f"create it (install -d -o mtasidecar -g mtasidecar -m 0700 {new}) or run the "
                          "playbook again")
        except PermissionError:
            return Result(name, FAIL, f"cannot read {new} as uid {os.geteuid()}",
                          "run doctor as root or as the mtasidecar user (runuser -u mtasidecar -- ...)")
        age = 0.0 if oldest is None else max(0.0, now - oldest)
        detail = f"{count} file(s) waiting" + (f", oldest {age:.0f} s" if count else "")
        fix = ("the ingester is not keeping up or not running: systemctl status mtasidecar-ingest; "
               "journalctl -u mtasidecar-ingest (or /var/log/mtasidecar/ingest.log)")
        if count > self.spool_max_files:
            return Result(name, FAIL, f"{detail}: over {self.spool_max_files}", fix)
        if count and age > self.spool_max_age:
            return Result(name, FAIL, f"{detail}: older than {self.spool_max_age:.0f} s", fix)
        return Result(name, OK, f"{detail} in {new}")

    # -- database ---------------------------------------------------------------------------------

    def check_database(self) -> Result:
        import peewee as pw

        from .store.db import open_database
        from .store.models import Domain
        url = self.settings.database_url
        name = "database"
        shown = _hide_password(url)
        fix_init = "mtasidecar init-db (as the mtasidecar user), or run the playbook again"
        if url.startswith(("sqlite://", "sqliteext://")):
            path = Path(url.split("://", 1)[1][1:])
            if not path.exists():
                return Result(name, FAIL, f"{path} does not exist", fix_init)
        from .store.models import database as proxy
        previous = proxy.obj  # open_database rebinds the models: put them back after
        db = open_database(url)
        try:
            db.connect()
            if isinstance(db, pw.SqliteDatabase):
                db.execute_sql(f"PRAGMA busy_timeout = {int(self.db_busy_timeout * 1000)}")
            started = time.monotonic()
            with db.atomic() as txn:
                Domain.insert(name=f"doctor-{secrets.token_hex(6)}.invalid", subdomains=False, mode="private",
                              active=False, created_at=time.time()).execute()
                txn.rollback()
            took = time.monotonic() - started
        except pw.OperationalError as exc:
            text = str(exc)
            if "no such table" in text or "does not exist" in text:
                return Result(name, FAIL, f"{shown}: no schema ({text})", fix_init)
            if "locked" in text or "busy" in text:
                return Result(name, FAIL, f"{shown}: busy for over {self.db_busy_timeout:g} s ({text})",
                              "a process holds a write transaction: look for a stuck mtasidecar process")
            return Result(name, FAIL, f"{shown}: cannot write ({text})",
                          "the database and its directory must be writable by the mtasidecar user "
                          "(chown -R mtasidecar: /var/lib/mtasidecar), with free disk space")
        except pw.DatabaseError as exc:
            return Result(name, FAIL, f"{shown}: {_short(exc)}", "check [database] url and the server's log")
        finally:
            db.close()
            if previous is not None:
                proxy.initialize(previous)
        return Result(name, OK, f"{shown}: writable (a test row, rolled back, in {took * 1000:.0f} ms)")

    # -- API ------------------------------------------------------------------------------------------

    def check_api(self) -> Result:
        import urllib.error
        import urllib.request
        host = self.settings.api.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{self.settings.api.port}/healthz"
        name = "API"
        fix = "systemctl status mtasidecar-api; journalctl -u mtasidecar-api (or /var/log/mtasidecar/api.log)"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return Result(name, FAIL, f"{url}: {_short(reason)}", fix)
        if status != 200:
            return Result(name, FAIL, f"{url} answered {status}", fix)
        return Result(name, OK, f"{url} answered 200")


# --- helpers ------------------------------------------------------------------------------


def make_resolver(servers: list[tuple[str, int]], timeout: float):
    import dns.nameserver
    import dns.resolver
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = timeout
    resolver.cache = None
    return resolver


def local_addresses_of_host() -> set[str]:
    """The addresses of this host's interfaces (IPv4 from /proc/net/fib_trie,
    IPv6 from /proc/net/if_inet6), else whatever the host name resolves to."""
    found: set[str] = set()
    try:
        last = None
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif "host LOCAL" in text and last:
                found.add(last)
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    return {_norm(a) for a in found}


def postfix_smtp_targets(postfix_dir: str) -> list[tuple[str, int]]:
    """(host, port) of each inet service in master.cf that receives mail (smtpd
    or postscreen), submission ports left out. [] without Postfix."""
    postconf = _program("postconf")
    if postconf is None:
        return []
    try:
        out = subprocess.run([postconf, "-c", postfix_dir, "-M"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    targets = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[1] != "inet" or fields[7] not in ("smtpd", "postscreen"):
            continue
        service = fields[0]
        host, sep, port = service.rpartition(":")
        if not sep:
            host, port = "", service
        host = host.strip("[]")
        if port in _SUBMISSION:
            continue
        if not port.isdigit():
            try:
                port = str(socket.getservbyname(port, "tcp"))
            except OSError:
                continue
        if not host or host in ("0.0.0.0", "*"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        target = (host, int(port))
        if target not in targets:
            targets.append(target)
    return targets


def parse_postconf(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            out[name.strip()] = value.strip()
    return out


def policy_request(listen: str, attributes: dict[str, str], timeout: float) -> str:
    """Send one policy request to ``listen`` ("host:port" or "unix:/path"); the action."""
    if listen.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(listen[5:])
        except OSError:
            sock.close()
            raise
    else:
        from .config import _parse_hostport
        host, port = _parse_hostport("policy.listen", listen.removeprefix("inet:"), default_port=10040)
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.sendall("".join(f"{k}={v}\n" for k, v in attributes.items()).encode() + b"\n")
        data = b""
        while b"\n\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the connection closed before an answer")
            data += chunk
            if len(data) > 65536:
                raise ConnectionError("no answer in the first 64 KB")
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("action="):
            return line[len("action="):]
    raise ConnectionError(f"an answer without action=: {data[:200]!r}")


def _program(name: str) -> str | None:
    import shutil
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _norm(address: str) -> str:
    return str(ipaddress.ip_address(address.split("%", 1)[0]))


def _internal(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in net for net in _INTERNAL if net.version == ip.version)


def _sort_key(address: str):
    ip = ipaddress.ip_address(address)
    return (ip.is_loopback, ip.version, ip)


def _public_choice(addresses: set[str]) -> str:
    """The address most likely to be the public one, for a fix line."""
    candidates = sorted((a for a in addresses if not ipaddress.ip_address(a).is_loopback
                         and not ipaddress.ip_address(a).is_link_local),
                        key=lambda a: (_internal(a), ipaddress.ip_address(a).version, ipaddress.ip_address(a)))
    return candidates[0] if candidates else "<this host's public address>"


def _words(value: str) -> str:
    return " ".join(value.split())


def _short(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _hide_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# --- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", action="append", default=[], metavar="NAME",
                        help="the domain to check (repeatable; default: every configured domain)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--address", action="append", default=[], metavar="IP",
                        help="an address of this host besides its interfaces' (the public one behind 1:1 NAT)")
    parser.add_argument("--smtp", action="append", default=[], metavar="HOST:PORT",
                        help="where to check SMTP (repeatable; default: Postfix's inet smtpd services, else "
                             "127.0.0.1:25)")
    parser.add_argument("--postfix-dir", default=DEFAULT_POSTFIX_DIR, help="Postfix configuration directory")
    parser.add_argument("--spool-max-files", type=int, default=DEFAULT_SPOOL_MAX_FILES,
                        help=f"files in Maildir new/ above which it is backing up (default {DEFAULT_SPOOL_MAX_FILES})")
    parser.add_argument("--spool-max-age", type=float, default=DEFAULT_SPOOL_MAX_AGE,
                        help=f"seconds the oldest file in new/ may wait (default {DEFAULT_SPOOL_MAX_AGE:g})")


def format_results(results: list[Result]) -> str:
    width = max((len(r.name) for r in results), default=0)
    marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}
    lines = []
    for r in results:
        lines.append(f"[{marks[r.status]}] {r.name:<{width}}  {r.detail}")
        if r.fix and r.status in (FAIL, WARN):
            lines.append(f"       {'':<{width}}  fix: {r.fix}")
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    lines.append(f"{len(results)} checks: {failed} failed, {warned} warning(s)" if failed or warned
                 else f"{len(results)} checks: all passed")
    return "\n".join(lines)


def runtime_domains_of(settings) -> dict:
    """The active domains added through the API, by name; {} when the database cannot say
    (check_database reports why)."""
    from .domains import from_row
    from .store import Store
    from .store.models import database as proxy
    url = settings.database_url
    if url.startswith(("sqlite://", "sqliteext://")) and not Path(url.split("://", 1)[1][1:]).exists():
        return {}  # opening it would create it
    previous = proxy.obj  # Store rebinds the models: put them back after
    try:
        store = Store(url)
        try:
            rows = [r for r in store.runtime_domains() if r.active]
            return {r.name: d for r in rows if (d := from_row(settings, r)) is not None}
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - a missing or broken database is check_database's to report
        return {}
    finally:
        proxy.initialize(previous)


def command(settings, args) -> int:
    from .config import ConfigError, _parse_hostport
    runtime = runtime_domains_of(settings)
    domains = args.domain or [d.name for d in settings.domains] + sorted(runtime)
    if not domains:
        print("mtasidecar doctor: no domain to check: give --domain NAME or configure [[domains]]",
              file=sys.stderr)
        return 2
    try:
        extra = {_norm(a) for a in args.address}
    except ValueError as exc:
        print(f"mtasidecar doctor: --address: {exc}", file=sys.stderr)
        return 2
    try:
        smtp = [_parse_hostport("--smtp", s, default_port=25) for s in args.smtp] or None
    except ConfigError as exc:
        print(f"mtasidecar doctor: {exc}", file=sys.stderr)
        return 2
    doctor = Doctor(settings, domains, local_addresses=local_addresses_of_host() | extra, smtp=smtp,
                    postfix_dir=args.postfix_dir, spool_max_files=args.spool_max_files,
                    spool_max_age=args.spool_max_age, runtime_domains=runtime)
    results = doctor.run()
    ok = not any(r.status == FAIL for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "domains": doctor.domains,
                          "checks": [dataclasses.asdict(r) for r in results]}, indent=2))
    else:
        print(format_results(results))
    return 0 if ok else 1
