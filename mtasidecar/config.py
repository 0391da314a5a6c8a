"""One validated settings object for every mtasidecar process.

Settings come from a TOML file (optional) and then from ``MTASIDECAR_*``
environment variables, which win. Every key is checked here, at start:
an unknown key or a bad value raises :class:`ConfigError` naming the key, and
the CLI turns that into exit status 2. Nothing else in the package reads the
environment or a config file.

Environment names are ``MTASIDECAR_<SECTION>_<KEY>`` for keys of a section
(``MTASIDECAR_DATABASE_URL``, ``MTASIDECAR_DNS_SERVERS``) and
``MTASIDECAR_<KEY>`` for top-level keys (``MTASIDECAR_DATA_DIR``). Lists are
comma-separated. ``MTASIDECAR_DOMAINS`` takes ``name`` or ``*.name`` (the
second also accepts any subdomain), comma-separated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "MTASIDECAR_"

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$")


class ConfigError(Exception):
    """A setting is unknown or invalid; the message names it."""


@dataclass(frozen=True)
class DomainSettings:
    name: str
    # Accept mail for any subdomain too (k3x9@q7.mail.example.com): addresses
    # that blocklists have never seen.
    subdomains: bool = False
    # "private": only mailboxes made through the API receive, each readable
    # with its token; every other address is refused at RCPT (550).
    # "public": a catch-all anyone can read who knows the address.
    mode: str = "private"
    # New mailboxes get a random third-level label (x@q7f3k.example.com)
    # unless the request names one; needs subdomains = true.
    random_subdomain: bool = False
    # Mailbox lifetime in seconds: the default, and the most a request (or an
    # extension) may ask for.
    default_ttl: int = 3600
    max_ttl: int = 7 * 86400
    # Messages older than this are swept, whatever the mailbox's lifetime.
    retention: int = 7 * 86400
    # Per-mailbox caps; above them the sweeper drops the oldest messages
    # (temporary inboxes care about the newest mail).
    max_messages: int = 1000
    max_bytes: int = 100 * 1024 * 1024
    # Mail whose sender failed authentication (DMARC fail, or SPF fail, and
    # in both cases no DKIM pass for the From domain; see
    # docs/architecture.md): "keep" stores and flags it like any other
    # (authenticated = false), "quarantine" stores it hidden from lists,
    # events and webhooks (?quarantined=true lists it; GET by id shows it).
    auth_failure: str = "keep"
    # Refuse at RCPT (550 5.7.23) when SPF says "fail" for the client IP and
    # the envelope sender (the HELO name for a null sender); needs the
    # policy service in Postfix's path. temperror, softfail, none: accepted.
    reject_spf_fail: bool = False

    def validate(self, key: str) -> None:
        if not _DOMAIN_RE.match(self.name):
            raise ConfigError(f"{key}.name: {self.name!r} is not a valid domain name")
        if self.mode not in ("private", "public"):
            raise ConfigError(f"{key}.mode: must be 'private' or 'public', not {self.mode!r}")
        if self.auth_failure not in ("keep", "quarantine"):
            raise ConfigError(f"{key}.auth_failure: must be 'keep' or 'quarantine', not {self.auth_failure!r}")
        if self.random_subdomain and not self.subdomains:
            raise ConfigError(f"{key}.random_subdomain: needs subdomains = true")
        if not 60 <= self.default_ttl <= self.max_ttl:
            raise ConfigError(f"{key}.default_ttl: must be at least 60 and at most max_ttl ({self.max_ttl})")
        if self.max_ttl > 365 * 86400:
            raise ConfigError(f"{key}.max_ttl: at most a year (31536000)")
        for name in ("retention", "max_messages", "max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be at least 1")


@dataclass(frozen=True)
class MaildirSettings:
    # Empty means <data_dir>/Maildir.
    path: str = ""
    # Move ingested files to cur/ instead of deleting them.
    keep: bool = False
    # Seconds between safety-net rescans of new/ (watchdog events can be lost
    # if the watcher restarts or the inotify queue overflows).
    rescan_interval: float = 30.0
    # Largest file the ingester stores; larger ones are set aside with a reason.
    max_message_size: int = 50 * 1024 * 1024

    def validate(self, key: str) -> None:
        if self.rescan_interval <= 0:
            raise ConfigError(f"{key}.rescan_interval: must be > 0")
        if self.max_message_size < 1024:
            raise ConfigError(f"{key}.max_message_size: must be at least 1024 bytes")


@dataclass(frozen=True)
class DatabaseSettings:
    # Empty means sqlite:///<data_dir>/mtasidecar.db.
    url: str = ""

    def validate(self, key: str) -> None:
        if self.url and not re.match(r"^(sqlite|sqliteext|postgres|postgresql|postgresext)://", self.url):
            raise ConfigError(f"{key}.url: {self.url!r} must start with sqlite:// or postgresql://")


@dataclass(frozen=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8025
    workers: int = 2
    # Largest page a list request may ask for.
    max_page_size: int = 100
    access_log: bool = False
    # Opens the operator routes (/api/v1/admin/...); empty: they are off.
    operator_token: str = ""
    # Per client IP: mailbox creations and failed authentications per second
    # (burst: twice that). mail.tm allows about 8 requests/s.
    create_rate: float = 8.0
    auth_failure_rate: float = 8.0
    # Proxies whose X-Forwarded-For is believed (exact IPs).
    trusted_proxies: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        _check_port(f"{key}.port", self.port)
        if self.operator_token and len(self.operator_token) < 24:
            raise ConfigError(f"{key}.operator_token: use at least 24 random characters")
        for name in ("create_rate", "auth_failure_rate"):
            if not 0 < getattr(self, name) <= 1_000_000:
                raise ConfigError(f"{key}.{name}: must be > 0")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"{key}.workers: must be between 1 and 64")
        if not 1 <= self.max_page_size <= 1000:
            raise ConfigError(f"{key}.max_page_size: must be between 1 and 1000")


@dataclass(frozen=True)
class MailboxSettings:
    # Local parts nobody may create (on any domain).
    reserved: tuple[str, ...] = ("postmaster", "abuse", "hostmaster", "webmaster", "noreply",
                                 "no-reply", "mailer-daemon", "root", "admin", "administrator")
    # Length of random local parts (lowercase letters and digits: 36**12 ≈ 2**62).
    random_length: int = 12
    # Attachments served only as "blocked" (still in the raw message).
    blocked_extensions: tuple[str, ...] = ("exe", "bat", "cmd", "com", "scr", "js", "jse", "vbs", "vbe",
                                           "jar", "ps1", "msi", "msp", "hta", "cpl", "pif", "lnk", "wsf",
                                           "reg", "dll", "apk", "app", "iso", "docm", "xlsm")
    blocked_types: tuple[str, ...] = ("application/x-msdownload", "application/x-msdos-program",
                                      "application/x-ms-installer", "application/x-sh",
                                      "application/java-archive", "application/vnd.microsoft.portable-executable")

    def validate(self, key: str) -> None:
        if not 10 <= self.random_length <= 64:
            raise ConfigError(f"{key}.random_length: must be between 10 and 64")


@dataclass(frozen=True)
class PolicySettings:
    # The Postfix policy service (`mtasidecar policy`): "host:port" or
    # "unix:/path". Empty: no policy service in Postfix's path.
    listen: str = "127.0.0.1:10040"
    # Where the same process answers Postfix's socketmap look-ups
    # (virtual_mailbox_domains / virtual_mailbox_maps) for the domains an
    # operator adds or disables at runtime (POST/PATCH /api/v1/domains):
    # "host:port" or "unix:/path". Empty: only the configured domains, from
    # the static maps. Needs listen.
    socketmap: str = "127.0.0.1:10041"
    # Messages per client IP per window before 450 4.7.1.
    rate_limit: int = 120
    rate_window: float = 60.0
    # Recipients per message before 452 4.5.3.
    max_recipients: int = 50
    # When the policy service does not answer: "DUNNO" accepts (fail-open;
    # Postfix still refuses foreign domains and sizes itself), anything else
    # like "DEFER_IF_PERMIT ..." makes senders retry.
    default_action: str = "DUNNO"
    # Seconds for the SPF check of a domain with reject_spf_fail (all its DNS
    # look-ups together, each also bounded by dns.timeout); past it the
    # verdict is temperror and the recipient is accepted.
    spf_budget: float = 3.0

    @property
    def served_socketmap(self) -> str:
        """The socketmap address when the policy process serves one, else ""."""
        return self.socketmap if self.listen else ""

    def validate(self, key: str) -> None:
        if self.listen and not self.listen.startswith("unix:"):
            _parse_hostport(f"{key}.listen", self.listen, default_port=10040)
        if self.socketmap and not self.socketmap.startswith("unix:"):
            _parse_hostport(f"{key}.socketmap", self.socketmap, default_port=10041)
        if self.socketmap and self.socketmap == self.listen:
            raise ConfigError(f"{key}.socketmap: must differ from {key}.listen")
        if self.rate_limit < 1 or self.rate_window <= 0 or self.max_recipients < 1:
            raise ConfigError(f"{key}: rate_limit, rate_window and max_recipients must be positive")
        if not 0 < self.spf_budget <= 60:
            raise ConfigError(f"{key}.spf_budget: must be between 0 and 60 seconds")
        try:
            policy_action(self.default_action)
        except ValueError as exc:
            raise ConfigError(f"{key}.default_action: {exc}") from None


@dataclass(frozen=True)
class IngestSettings:
    # Worker processes that parse under a backlog; -1 means one per usable
    # core (the ingester itself only commits), 0 parses in the ingester only.
    workers: int = -1

    def validate(self, key: str) -> None:
        if not -1 <= self.workers <= 64:
            raise ConfigError(f"{key}.workers: must be -1 (one per core) or 0 to 64")


@dataclass(frozen=True)
class SmtpSettings:
    # Where Postfix listens when mtasidecar runs its own private instance
    # (`mtasidecar dev`); a system Postfix keeps its own master.cf.
    host: str = "127.0.0.1"
    port: int = 2525
    # Postfix's message_size_limit: refused at SMTP time (552) above it.
    message_size_limit: int = 25 * 1024 * 1024
    # "maildir": Postfix's virtual(8) writes the Maildir (fastest);
    # "pipe": Postfix runs `mtasidecar deliver` per recipient.
    delivery: str = "maildir"

    def validate(self, key: str) -> None:
        _check_port(f"{key}.port", self.port)
        if self.message_size_limit < 1024:
            raise ConfigError(f"{key}.message_size_limit: must be at least 1024 bytes")
        if self.delivery not in ("maildir", "pipe"):
            raise ConfigError(f"{key}.delivery: must be 'maildir' or 'pipe', not {self.delivery!r}")


@dataclass(frozen=True)
class DnsSettings:
    # "host:port" strings; empty means the system resolver.
    servers: tuple[str, ...] = ()
    # Limit for one lookup, and for all lookups of one message together: a
    # slow or dead DNS server yields "temperror", never a stalled ingester.
    timeout: float = 2.0
    budget: float = 5.0

    def validate(self, key: str) -> None:
        for server in self.servers:
            _parse_hostport(f"{key}.servers", server, default_port=53)
        if not 0 < self.timeout <= 60:
            raise ConfigError(f"{key}.timeout: must be between 0 and 60 seconds")
        if not 0 < self.budget <= 120:
            raise ConfigError(f"{key}.budget: must be between 0 and 120 seconds")

    def server_addresses(self) -> list[tuple[str, int]]:
        return [_parse_hostport("dns.servers", s, default_port=53) for s in self.servers]


@dataclass(frozen=True)
class AuthSettings:
    # SPF, DKIM and DMARC on every message at ingest.
    enabled: bool = True

    def validate(self, key: str) -> None:
        pass


@dataclass(frozen=True)
class MailTmSettings:
    # The Mercure hub URL that mail.tm clients are told to use (they take it
    # as a setting of its own, apart from the API's base URL). The API server
    # always serves the hub at /.well-known/mercure; set this when a proxy
    # publishes it elsewhere (https://mail.example.com/.well-known/mercure).
    # Empty: /.well-known/mercure on the API server itself. Advertised in a
    # `Link: <...>; rel="mercure"` header on mail.tm responses.
    mercure_url: str = ""

    def validate(self, key: str) -> None:
        if self.mercure_url and not re.match(r"^(https?://[^\s/]+|/)[^\s]*$", self.mercure_url):
            raise ConfigError(f"{key}.mercure_url: must be an http(s) URL or a path starting with /")


@dataclass(frozen=True)
class WebhookSettings:
    # The operator-wide webhook: every new message of every mailbox is POSTed
    # here (signed with ``secret``), besides the mailboxes' own webhooks.
    # Empty: none. Trusted: exempt from the private-address check below.
    url: str = ""
    secret: str = ""
    # Seconds for one delivery attempt (DNS, connect, send, status line).
    timeout: float = 10.0
    # Deliveries in flight at once, per sender process. No per-second cap.
    concurrency: int = 16
    # Mailbox webhooks may target loopback, private, link-local and other
    # non-public addresses. Off (default): refused at creation and, after a
    # fresh lookup (DNS rebinding), at every attempt.
    allow_private: bool = False
    # Retry window in seconds, from the event: failed after it (default 26 h).
    max_age: float = 26 * 3600.0
    # Retry delays: backoff_base * 3**n (5 s, 15 s, 45 s, ...) with +-20 %
    # jitter, at most backoff_max per step.
    backoff_base: float = 5.0
    backoff_max: float = 3600.0
    # Seconds that delivered and failed deliveries stay listed (the sender
    # prunes older ones); pending ones are never pruned.
    history: float = 7 * 86400.0

    def validate(self, key: str) -> None:
        if self.url:
            from .webhooks import url_problem  # the same rule as for mailbox webhooks
            problem = url_problem(self.url)
            if problem:
                raise ConfigError(f"{key}.url: {problem}")
            if len(self.secret) < 16:
                raise ConfigError(f"{key}.secret: needed with url, at least 16 characters")
        if not 0 < self.timeout <= 300:
            raise ConfigError(f"{key}.timeout: must be between 0 and 300 seconds")
        if not 1 <= self.concurrency <= 4096:
            raise ConfigError(f"{key}.concurrency: must be between 1 and 4096")
        if self.max_age <= 0:
            raise ConfigError(f"{key}.max_age: must be > 0 seconds")
        if not 0 < self.backoff_base <= self.backoff_max:
            raise ConfigError(f"{key}.backoff_base: must be > 0 and at most backoff_max")
        if self.history <= 0:
            raise ConfigError(f"{key}.history: must be > 0 seconds")


@dataclass(frozen=True)
class Settings:
    data_dir: str = "/var/lib/mtasidecar"
    # Our name in Authentication-Results and Postfix's myhostname.
    hostname: str = field(default_factory=socket.getfqdn)
    domains: tuple[DomainSettings, ...] = ()
    maildir: MaildirSettings = MaildirSettings()
    ingest: IngestSettings = IngestSettings()
    database: DatabaseSettings = DatabaseSettings()
    api: ApiSettings = ApiSettings()
    smtp: SmtpSettings = SmtpSettings()
    dns: DnsSettings = DnsSettings()
    auth: AuthSettings = AuthSettings()
    mailboxes: MailboxSettings = MailboxSettings()
    policy: PolicySettings = PolicySettings()
    mailtm: MailTmSettings = MailTmSettings()
    webhooks: WebhookSettings = WebhookSettings()

    # Derived paths: one place decides the defaults that hang off data_dir.
    @property
    def maildir_path(self) -> Path:
        return Path(self.maildir.path) if self.maildir.path else Path(self.data_dir) / "Maildir"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{Path(self.data_dir).resolve() / 'mtasidecar.db'}"

    def domain(self, name: str) -> DomainSettings | None:
        for d in self.domains:
            if d.name == name:
                return d
        return None

    def blocklist(self):
        from .mail.blocklist import Blocklist
        return Blocklist.of(self.mailboxes.blocked_extensions, self.mailboxes.blocked_types)

    def auth_config(self) -> dict | None:
        """What the ingester's Authenticator needs, as plain (picklable) data."""
        if not self.auth.enabled:
            return None
        return {"servers": self.dns.server_addresses(), "timeout": self.dns.timeout,
                "budget": self.dns.budget, "hostname": self.hostname}

    def check_domain(self, d: DomainSettings, key: str) -> None:
        """One domain's settings, and those that need other settings to work."""
        d.validate(key)
        # Settings that would silently do nothing are refused.
        if d.auth_failure == "quarantine" and not self.auth.enabled:
            raise ConfigError(f"{key}.auth_failure: 'quarantine' needs auth.enabled = true")
        if d.reject_spf_fail and not self.policy.listen:
            raise ConfigError(f"{key}.reject_spf_fail: needs the policy service (policy.listen)")

    def runtime_domain(self, data: dict, key: str = "domain") -> DomainSettings:
        """A domain an operator adds through the API, built and checked like a configured one."""
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: expected an object")
        if isinstance(data.get("name"), str):
            data = dict(data, name=data["name"].strip().rstrip(".").lower())
        if "name" not in data:
            raise ConfigError(f"{key}.name: required")
        domain = _build(DomainSettings, data, key)
        self.check_domain(domain, key)
        return domain

    def validate(self) -> None:
        seen = set()
        for i, d in enumerate(self.domains):
            self.check_domain(d, f"domains[{i}]")
            if d.name in seen:
                raise ConfigError(f"domains[{i}].name: {d.name!r} is listed twice")
            seen.add(d.name)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate") and f.name != "domains":
                value.validate(f.name)


def _check_port(key: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: {port} is not a port number")


def policy_action(action: str) -> str:
    """``action`` as our check_policy_service { ..., { default_action = ... } }
    entry carries it (spaces collapsed); ValueError unless it fits there: one
    line, not empty, without braces (mta/render.py: policy_entry)."""
    if any(c in action for c in "{}\r\n"):
        raise ValueError(f"must be one line, without braces: {action!r}")
    action = " ".join(action.split())
    if not action:
        raise ValueError("must not be empty")
    return action


def _parse_hostport(key: str, text: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', 'v4:port', '[v6]', '[v6]:port' or a bare IPv6 address (no port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{key}: {text!r} is not host:port")
        port = rest[1:] if rest else str(default_port)
    elif text.count(":") > 1:  # a bare IPv6 address cannot carry a port
        host, port = text, str(default_port)
    else:
        host, sep, port = text.partition(":")
        if not sep:
            port = str(default_port)
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not host:port")
    return host, int(port)


# -- building dataclasses from untyped input ---------------------------------

def _convert(key: str, tp, value):
    """Coerce ``value`` (from TOML or an environment string) to type ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return _build(tp, value, key)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return tuple(_convert(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int or tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")  # pragma: no cover


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown setting")
    kwargs = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _convert(where, hints[k], v)
    return cls(**kwargs)


def _domains_from_env(name: str, value: str) -> list[dict]:
    if value.lstrip().startswith("["):
        try:
            domains = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{name}: not valid JSON: {exc}") from None
        if not isinstance(domains, list) or not all(isinstance(d, dict) for d in domains):
            raise ConfigError(f"{name}: expected a JSON list of tables")
        return domains
    return parse_domain_list(value)


def parse_domain_list(text: str) -> list[dict]:
    """'a.test,*.b.test,public:*.c.test' → domain tables.

    '*.' means subdomains are accepted too; 'public:' makes a catch-all
    anyone can read (the default is private).
    """
    out = []
    for item in (p.strip().lower() for p in text.split(",")):
        if item:
            mode, sep, item = item.partition(":") if item.startswith(("public:", "private:")) else ("private", "", item)
            sub = item.startswith("*.")
            out.append({"name": item[2:] if sub else item, "subdomains": sub, "mode": mode})
    return out


def _env_overrides(environ: typing.Mapping[str, str]) -> dict:
    """Turn MTASIDECAR_* variables into a nested dict shaped like the TOML."""
    hints = typing.get_type_hints(Settings)
    sections = {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}
    top = set(hints) - sections
    out: dict = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest == "config":
            continue  # the file path itself
        if rest == "domains":
            out["domains"] = _domains_from_env(name, value)
        elif rest in top:
            out[rest] = value
        else:
            section, _, key = rest.partition("_")
            if section not in sections or not key:
                raise ConfigError(f"{name}: unknown setting")
            out.setdefault(section, {})[key] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load(path: str | os.PathLike | None = None, environ: typing.Mapping[str, str] | None = None,
         overrides: dict | None = None) -> Settings:
    """Read the TOML file (if any), apply environment and explicit overrides, validate.

    ``path`` defaults to $MTASIDECAR_CONFIG; no file is fine (embedded defaults).
    ``overrides`` is what command-line options set; it wins over everything.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    data: dict = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    data = _merge(data, _env_overrides(environ))
    data = _merge(data, overrides or {})
    if isinstance(data.get("domains"), list):
        # Domain names compare case-insensitively everywhere.
        data["domains"] = [dict(d, name=str(d.get("name", "")).lower()) if isinstance(d, dict) else d
                           for d in data["domains"]]
    settings = _build(Settings, data)
    settings.validate()
    return settings


def to_environ(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process load exactly these settings."""
    env = {ENV_PREFIX + "DATA_DIR": settings.data_dir, ENV_PREFIX + "HOSTNAME": settings.hostname,
           # JSON keeps every per-domain setting (the short form has only three).
           ENV_PREFIX + "DOMAINS": json.dumps([dataclasses.asdict(d) for d in settings.domains])}
    for f in dataclasses.fields(settings):
        section = getattr(settings, f.name)
        if not dataclasses.is_dataclass(section) or isinstance(section, type):
            continue
        for sf in dataclasses.fields(section):
            value = getattr(section, sf.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"{ENV_PREFIX}{f.name.upper()}_{sf.name.upper()}"] = str(value)
    return env


__all__ = ["ConfigError", "Settings", "DomainSettings", "load", "to_environ"]
