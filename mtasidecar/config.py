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

    def validate(self, key: str) -> None:
        if not _DOMAIN_RE.match(self.name):
            raise ConfigError(f"{key}.name: {self.name!r} is not a valid domain name")


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

    def validate(self, key: str) -> None:
        _check_port(f"{key}.port", self.port)
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"{key}.workers: must be between 1 and 64")
        if not 1 <= self.max_page_size <= 1000:
            raise ConfigError(f"{key}.max_page_size: must be between 1 and 1000")


@dataclass(frozen=True)
class IngestSettings:
    # Worker processes that parse under a backlog; -1 means one per core,
    # 0 parses in the ingester process only.
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

    def auth_config(self) -> dict | None:
        """What the ingester's Authenticator needs, as plain (picklable) data."""
        if not self.auth.enabled:
            return None
        return {"servers": self.dns.server_addresses(), "timeout": self.dns.timeout,
                "budget": self.dns.budget, "hostname": self.hostname}

    def validate(self) -> None:
        seen = set()
        for i, d in enumerate(self.domains):
            d.validate(f"domains[{i}]")
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


def parse_domain_list(text: str) -> list[dict]:
    """'a.test,*.b.test' → domain tables; '*.' means subdomains are accepted too."""
    out = []
    for item in (p.strip().lower() for p in text.split(",")):
        if item:
            sub = item.startswith("*.")
            out.append({"name": item[2:] if sub else item, "subdomains": sub})
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
            out["domains"] = parse_domain_list(value)
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
           ENV_PREFIX + "DOMAINS": ",".join(("*." if d.subdomains else "") + d.name for d in settings.domains)}
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
