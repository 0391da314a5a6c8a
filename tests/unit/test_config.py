"""mtasidecar.config: defaults, TOML, MTASIDECAR_* variables, validation, and the CLI's exit status 2.

Every test passes ``environ=`` explicitly, so the developer's own
MTASIDECAR_* variables never leak in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtasidecar.config import ConfigError, DomainSettings, Settings, load, parse_domain_list, to_environ

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the interpreter (and so the venv) running the tests


def write(tmp_path: Path, text: str, name: str = "mtasidecar.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FULL_TOML = """
data_dir = "/srv/mail"
hostname = "mx.example.test"
domains = [
  { name = "example.test" },
  { name = "Sub.Example.Org", subdomains = true },
]

[maildir]
path = "/srv/spool"
keep = true
rescan_interval = 5
max_message_size = 2048

[ingest]
workers = 0

[database]
url = "postgresql://mail@db/mail"

[api]
host = "0.0.0.0"
port = 9000
workers = 4
max_page_size = 50
access_log = true

[smtp]
port = 2600
delivery = "pipe"
message_size_limit = 4096

[dns]
servers = ["127.0.0.1:5354", "[::1]:53"]
timeout = 1.5
"""


# -- defaults and sources ---------------------------------------------------------------------

def test_defaults():
    s = load(environ={})
    assert s.data_dir == "/var/lib/mtasidecar"
    assert s.hostname  # the machine's FQDN
    assert s.domains == ()
    assert (s.api.host, s.api.port, s.api.workers, s.api.max_page_size, s.api.access_log) == (
        "127.0.0.1", 8025, 2, 100, False)
    assert (s.smtp.host, s.smtp.port, s.smtp.delivery) == ("127.0.0.1", 2525, "maildir")
    assert s.smtp.message_size_limit == 25 * 1024 * 1024
    assert s.maildir.path == "" and s.maildir.keep is False
    assert s.maildir.max_message_size == 50 * 1024 * 1024 and s.maildir.rescan_interval == 30.0
    assert s.ingest.workers == -1
    assert s.database.url == ""
    assert s.dns.servers == () and s.dns.server_addresses() == []
    # The paths that hang off data_dir.
    assert s.maildir_path == Path("/var/lib/mtasidecar/Maildir")
    assert s.database_url == "sqlite:////var/lib/mtasidecar/mtasidecar.db"
    assert s == Settings(hostname=s.hostname)


def test_toml_file(tmp_path):
    s = load(write(tmp_path, FULL_TOML), environ={})
    assert s.data_dir == "/srv/mail" and s.hostname == "mx.example.test"
    # Domain names are lower-cased wherever they come from.
    assert s.domains == (DomainSettings("example.test", False), DomainSettings("sub.example.org", True))
    assert s.domain("sub.example.org").subdomains is True and s.domain("nope.test") is None
    assert s.maildir.keep is True and s.maildir.rescan_interval == 5.0 and s.maildir.max_message_size == 2048
    assert isinstance(s.maildir.rescan_interval, float)
    assert s.maildir_path == Path("/srv/spool")
    assert s.ingest.workers == 0
    assert s.database_url == "postgresql://mail@db/mail"
    assert (s.api.host, s.api.port, s.api.workers, s.api.max_page_size, s.api.access_log) == (
        "0.0.0.0", 9000, 4, 50, True)
    assert (s.smtp.port, s.smtp.delivery, s.smtp.message_size_limit) == (2600, "pipe", 4096)
    assert s.dns.servers == ("127.0.0.1:5354", "[::1]:53") and s.dns.timeout == 1.5


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, "[api]\nport = 9001\n")
    assert load(environ={"MTASIDECAR_CONFIG": str(path)}).api.port == 9001
    # An explicit path wins over $MTASIDECAR_CONFIG.
    other = write(tmp_path, "[api]\nport = 9002\n", "other.toml")
    assert load(other, environ={"MTASIDECAR_CONFIG": str(path)}).api.port == 9002


def test_environment_overrides_toml(tmp_path):
    path = write(tmp_path, FULL_TOML)
    s = load(path, environ={"MTASIDECAR_API_PORT": "9100", "MTASIDECAR_API_ACCESS_LOG": "off",
                            "MTASIDECAR_DATA_DIR": "/elsewhere", "MTASIDECAR_DOMAINS": "only.test",
                            "MTASIDECAR_MAILDIR_MAX_MESSAGE_SIZE": "4096",
                            "MTASIDECAR_DNS_SERVERS": "192.0.2.53"})
    assert s.api.port == 9100 and s.api.access_log is False
    assert s.api.host == "0.0.0.0" and s.api.workers == 4  # the rest of [api] is kept
    assert s.data_dir == "/elsewhere"
    assert s.domains == (DomainSettings("only.test"),)  # the list is replaced, not merged
    assert s.maildir.max_message_size == 4096 and s.maildir.keep is True
    assert s.dns.server_addresses() == [("192.0.2.53", 53)]
    # Variables without our prefix are no business of ours.
    assert load(path, environ={"API_PORT": "1", "MTASIDECARAPI_PORT": "1", "HOME": "/x"}).api.port == 9000


def test_explicit_overrides_win_over_everything(tmp_path):
    path = write(tmp_path, FULL_TOML)
    s = load(path, environ={"MTASIDECAR_API_PORT": "9100"}, overrides={"api": {"port": 9200}})
    assert s.api.port == 9200 and s.api.host == "0.0.0.0"


def test_domains_from_environment():
    s = load(environ={"MTASIDECAR_DOMAINS": "a.test,*.b.test"})
    assert s.domains == (DomainSettings("a.test", False), DomainSettings("b.test", True))
    s = load(environ={"MTASIDECAR_DOMAINS": " A.Test , ,*.B.TEST,"})
    assert s.domains == (DomainSettings("a.test", False), DomainSettings("b.test", True))
    assert load(environ={"MTASIDECAR_DOMAINS": ""}).domains == ()
    assert parse_domain_list("a.test,*.b.test,public:*.c.test") == [
        {"name": "a.test", "subdomains": False, "mode": "private"},
        {"name": "b.test", "subdomains": True, "mode": "private"},
        {"name": "c.test", "subdomains": True, "mode": "public"}]
    # The JSON form carries every per-domain setting (to_environ uses it).
    s = load(environ={"MTASIDECAR_DOMAINS": '[{"name": "a.test", "mode": "public", "max_ttl": 7200}]'})
    assert s.domains == (DomainSettings("a.test", mode="public", max_ttl=7200),)
    with pytest.raises(ConfigError, match="MTASIDECAR_DOMAINS"):
        load(environ={"MTASIDECAR_DOMAINS": "[{bad json"})
    with pytest.raises(ConfigError, match=r"domains\[0\].mode"):
        load(environ={"MTASIDECAR_DOMAINS": '[{"name": "a.test", "mode": "secret"}]'})


def test_dns_servers_from_environment():
    s = load(environ={"MTASIDECAR_DNS_SERVERS": "127.0.0.1:5354,[::1]:53"})
    assert s.dns.servers == ("127.0.0.1:5354", "[::1]:53")
    assert s.dns.server_addresses() == [("127.0.0.1", 5354), ("::1", 53)]
    s = load(environ={"MTASIDECAR_DNS_SERVERS": " 192.0.2.1 , resolver.test:5300 "})
    assert s.dns.server_addresses() == [("192.0.2.1", 53), ("resolver.test", 5300)]


@pytest.mark.parametrize("text, expected", [("[::1]", ("::1", 53)), ("2001:db8::1", ("2001:db8::1", 53))])
def test_dns_server_ipv6_without_port(text, expected):
    assert load(environ={"MTASIDECAR_DNS_SERVERS": text}).dns.server_addresses() == [expected]


def test_booleans_and_numbers_from_strings():
    for text, value in (("1", True), ("true", True), ("YES", True), (" on ", True),
                        ("0", False), ("false", False), ("No", False), ("off", False)):
        assert load(environ={"MTASIDECAR_MAILDIR_KEEP": text}).maildir.keep is value, text
    assert load(environ={"MTASIDECAR_MAILDIR_RESCAN_INTERVAL": "0.5"}).maildir.rescan_interval == 0.5
    assert load(environ={"MTASIDECAR_INGEST_WORKERS": "-1"}).ingest.workers == -1


@pytest.mark.parametrize("action", ["", "  ", "REJECT {x}", "DEFER_IF_PERMIT 4.3.0 a\nb"])
def test_policy_default_action_must_fit_our_postfix_entry(action):
    # It is rendered inside check_policy_service { ..., { default_action = ... } }.
    with pytest.raises(ConfigError, match="policy.default_action"):
        load(environ={"MTASIDECAR_POLICY_DEFAULT_ACTION": action})
    assert load(environ={"MTASIDECAR_POLICY_DEFAULT_ACTION": "DEFER_IF_PERMIT 4.3.0 down, retry"}) \
        .policy.default_action == "DEFER_IF_PERMIT 4.3.0 down, retry"


# -- unknown keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("toml, named", [
    ("nope = 1\n", "nope"),
    ("[api]\nnope = 1\n", "api.nope"),
    ("[nope]\nx = 1\n", "nope"),
    ("[dns]\nserver = ['127.0.0.1']\n", "dns.server"),
    ("domains = [{ name = 'a.test', wildcard = true }]\n", "domains[0].wildcard"),
])
def test_unknown_key_in_toml(tmp_path, toml, named):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, toml), environ={})
    assert named in str(info.value)
    assert "unknown" in str(info.value)


@pytest.mark.parametrize("name, named", [
    ("MTASIDECAR_API_NOPE", "nope"),
    ("MTASIDECAR_NOPE", "MTASIDECAR_NOPE"),
    ("MTASIDECAR_NOPE_PORT", "MTASIDECAR_NOPE_PORT"),
    ("MTASIDECAR_API", "MTASIDECAR_API"),
    ("MTASIDECAR_API_", "MTASIDECAR_API_"),
])
def test_unknown_environment_variable(name, named):
    with pytest.raises(ConfigError) as info:
        load(environ={name: "1"})
    assert named.lower() in str(info.value).lower()


# -- bad values --------------------------------------------------------------------------------

@pytest.mark.parametrize("environ, named", [
    ({"MTASIDECAR_API_PORT": "abc"}, "api.port"),
    ({"MTASIDECAR_API_PORT": "70000"}, "api.port"),
    ({"MTASIDECAR_API_PORT": "-1"}, "api.port"),
    ({"MTASIDECAR_API_PORT": "80.5"}, "api.port"),
    ({"MTASIDECAR_SMTP_PORT": "65536"}, "smtp.port"),
    ({"MTASIDECAR_API_WORKERS": "0"}, "api.workers"),
    ({"MTASIDECAR_API_WORKERS": "65"}, "api.workers"),
    ({"MTASIDECAR_API_MAX_PAGE_SIZE": "0"}, "api.max_page_size"),
    ({"MTASIDECAR_INGEST_WORKERS": "-2"}, "ingest.workers"),
    ({"MTASIDECAR_API_ACCESS_LOG": "maybe"}, "api.access_log"),
    ({"MTASIDECAR_MAILDIR_KEEP": ""}, "maildir.keep"),
    ({"MTASIDECAR_MAILDIR_RESCAN_INTERVAL": "0"}, "maildir.rescan_interval"),
    ({"MTASIDECAR_MAILDIR_MAX_MESSAGE_SIZE": "100"}, "maildir.max_message_size"),
    ({"MTASIDECAR_SMTP_MESSAGE_SIZE_LIMIT": "10"}, "smtp.message_size_limit"),
    ({"MTASIDECAR_SMTP_DELIVERY": "lmtp"}, "smtp.delivery"),
    ({"MTASIDECAR_DOMAINS": "bad_domain!"}, "domains[0]"),
    ({"MTASIDECAR_DOMAINS": "ok.test,-bad.test"}, "domains[1]"),
    ({"MTASIDECAR_DOMAINS": "nodot"}, "domains[0]"),
    ({"MTASIDECAR_DOMAINS": "*."}, "domains[0]"),
    ({"MTASIDECAR_DOMAINS": "a.test,A.test"}, "listed twice"),
    ({"MTASIDECAR_DOMAINS": "a.test,*.a.test"}, "listed twice"),
    ({"MTASIDECAR_DATABASE_URL": "mysql://db/mail"}, "database.url"),
    ({"MTASIDECAR_DATABASE_URL": "/var/lib/mail.db"}, "database.url"),
    ({"MTASIDECAR_DNS_SERVERS": "127.0.0.1:99999"}, "dns.servers"),
    ({"MTASIDECAR_DNS_SERVERS": "127.0.0.1:abc"}, "dns.servers"),
    ({"MTASIDECAR_DNS_SERVERS": ":53"}, "dns.servers"),
    ({"MTASIDECAR_DNS_TIMEOUT": "0"}, "dns.timeout"),
    ({"MTASIDECAR_DNS_TIMEOUT": "soon"}, "dns.timeout"),
])
def test_bad_value_from_environment(environ, named):
    with pytest.raises(ConfigError) as info:
        load(environ=environ)
    assert named in str(info.value)


@pytest.mark.parametrize("toml, named", [
    ("[api]\nport = true\n", "api.port"),
    ("[api]\nport = 8025.5\n", "api.port"),
    ("[api]\nport = [1]\n", "api.port"),
    ("[api]\nhost = 1\n", "api.host"),
    ("[maildir]\nkeep = 'maybe'\n", "maildir.keep"),
    ("api = 5\n", "api"),
    ("domains = ['a.test']\n", "domains[0]"),
    ("domains = 'a.test'\n", "domains"),
    ("domains = [{ subdomains = true }]\n", "domains[0]"),
    ("[dns]\nservers = '127.0.0.1'\ntimeout = 61\n", "dns.timeout"),
    ("[database]\nurl = 'mongodb://x'\n", "database.url"),
])
def test_bad_value_in_toml(tmp_path, toml, named):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, toml), environ={})
    assert named in str(info.value)


def test_toml_number_strings_are_accepted(tmp_path):
    # Values read as strings are converted as environment values are.
    assert load(write(tmp_path, "[api]\nport = '9000'\n"), environ={}).api.port == 9000


def test_bad_toml_syntax(tmp_path):
    path = write(tmp_path, "[api\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(path) in str(info.value) and "not found" in str(info.value)
    with pytest.raises(ConfigError):
        load(environ={"MTASIDECAR_CONFIG": str(path)})


# -- to_environ -----------------------------------------------------------------------------------

def test_to_environ_round_trips(tmp_path):
    for settings in (load(environ={}),
                     load(write(tmp_path, FULL_TOML), environ={}),
                     load(environ={"MTASIDECAR_DOMAINS": "a.test,*.b.test", "MTASIDECAR_DATA_DIR": str(tmp_path),
                                   "MTASIDECAR_DNS_SERVERS": "127.0.0.1:5354,[::1]:53"})):
        env = to_environ(settings)
        assert all(k.startswith("MTASIDECAR_") and isinstance(v, str) for k, v in env.items())
        assert load(environ=env) == settings
        # Every setting of every section is carried.
        for f in dataclasses.fields(settings):
            section = getattr(settings, f.name)
            if dataclasses.is_dataclass(section):
                for sf in dataclasses.fields(section):
                    assert f"MTASIDECAR_{f.name.upper()}_{sf.name.upper()}" in env


def test_to_environ_wins_over_a_config_file(tmp_path):
    """A child process started with to_environ() gets the parent's settings even if it reads a file."""
    settings = load(write(tmp_path, FULL_TOML), environ={}, overrides={"api": {"port": 9999}})
    path = write(tmp_path, "[api]\nport = 1234\nworkers = 8\n", "child.toml")
    assert load(path, environ=to_environ(settings)) == settings


# -- the CLI -------------------------------------------------------------------------------------

def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
    env.update(env_extra or {})
    return subprocess.run([PYTHON, "-m", "mtasidecar", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_cli_exits_2_naming_the_bad_key(tmp_path):
    path = write(tmp_path, "[api]\nport = 8025\nnope = 1\n", "bad.toml")
    r = run_cli("--config", str(path), "config")
    assert r.returncode == 2, r
    assert "api.nope" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_exits_2_on_bad_environment(tmp_path):
    r = run_cli("config", env_extra={"MTASIDECAR_API_PORT": "abc"})
    assert r.returncode == 2, r
    assert "api.port" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--config", str(tmp_path / "absent.toml"), "config")
    assert r.returncode == 2 and "absent.toml" in r.stderr


def test_cli_prints_validated_settings(tmp_path):
    path = write(tmp_path, FULL_TOML)
    r = run_cli("--config", str(path), "config", env_extra={"MTASIDECAR_API_PORT": "9100"})
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["api"]["port"] == 9100
    assert [(d["name"], d["subdomains"], d["mode"]) for d in printed["domains"]] == [
        ("example.test", False, "private"), ("sub.example.org", True, "private")]
