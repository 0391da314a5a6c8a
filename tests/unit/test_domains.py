"""Domains added, changed and disabled at runtime.

The store (config rows vs. runtime rows), the registry every process reads
them through (snapshot, TTL, the check on a miss), the operator routes with
their bad input, the policy service's socketmap (protocol and look-ups) and
its refusal of a disabled domain, the rendered Postfix settings, and the
sweeper's use of a runtime domain's retention. Through the real Postfix:
tests/integration/test_runtime_domains.py.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from mtasidecar import policy as P
from mtasidecar.config import load
from mtasidecar.domains import DomainRegistry, settings_json
from mtasidecar.mta.render import DOMAINS_MAP, MAIN_CF, MAILBOXES_MAP, main_cf_settings, render
from mtasidecar.socketmap import SocketmapProtocol
from mtasidecar.store import Store
from mtasidecar.store.models import Domain
from mtasidecar.store.store import candidate_domains
from mtasidecar.sweep import sweep_once
from tests.unit.test_api import assert_error, eml
from tests.unit.test_api import no_server_errors  # noqa: F401 (autouse: no request may get a 500)
from tests.unit.test_mailboxes import OPERATOR, bearer, box_env, create, deliver
from tests.unit.test_policy import Clock, ServerThread, add_mailbox, attrs

ADMIN = "/api/v1/admin/domains"


def settings_for(tmp_path, **env):
    environ = {"MTASIDECAR_DATA_DIR": str(tmp_path / "data"), "MTASIDECAR_DOMAINS": "conf.test,*.wide.test", **env}
    return load(environ=environ)


def make_store(path, domains: list[tuple]) -> Store:
    s = Store(f"sqlite:///{path}")
    s.setup()
    s.sync_domains(domains)
    return s


@pytest.fixture
def store(tmp_path):
    s = make_store(tmp_path / "d.db", [("conf.test", False, "private"), ("wide.test", True, "private")])
    yield s
    s.close()


def add(store, settings, name: str, **fields):
    domain = settings.runtime_domain(dict(fields, name=name))
    return store.add_domain(domain.name, domain.subdomains, domain.mode, settings_json(domain))


# -- the store ---------------------------------------------------------------------


def test_candidate_domains_are_the_host_and_its_parents_but_the_tld():
    assert candidate_domains("a@x.y.example.test") == ["x.y.example.test", "y.example.test", "example.test"]
    assert candidate_domains("example.test") == ["example.test"]
    assert candidate_domains("a@localhost") == ["localhost"]


def test_a_restart_keeps_runtime_domains_and_the_configuration_wins_a_name(tmp_path, store):
    settings = settings_for(tmp_path)
    assert add(store, settings, "rt.test", mode="public") is not None
    assert add(store, settings, "rt.test") is None, "a name is added once"
    assert add(store, settings, "conf.test") is None, "a configured name is not added"
    store.sync_domains([("conf.test", False, "private"), ("wide.test", True, "private")])
    assert store.domain("rt.test").active, "sync_domains leaves runtime rows alone"
    # The configuration now names it: the configuration owns it from then on.
    store.sync_domains([("conf.test", False, "private"), ("rt.test", False, "private")])
    row = store.domain("rt.test")
    assert (row.source, row.mode, row.settings, row.active) == ("config", "private", None, True)
    assert not store.domain("wide.test").active
    # A configured domain removed from the configuration can be added at runtime (and keeps its row).
    wide_id = store.domain("wide.test").id
    again = add(store, settings, "wide.test", subdomains=True)
    assert (again.id, again.source, again.active) == (wide_id, "api", True)
    assert store.update_domain("conf.test", active=False) is None, "configured rows are not changed here"
    assert store.active_domain_names(["wide.test", "conf.test", "nope.test"]) == {"wide.test", "conf.test"}


# -- the registry --------------------------------------------------------------------


def test_registry_serves_configured_and_active_runtime_domains(tmp_path, store):
    settings = settings_for(tmp_path)
    clock = Clock()
    registry = DomainRegistry(settings, store, ttl=2.0, clock=clock)
    assert [d.name for d in registry.snapshot()] == ["conf.test", "wide.test"]
    add(store, settings, "rt.test", subdomains=True, max_ttl=7200, default_ttl=600)
    # Within the TTL the snapshot stays, but a miss on a name the table now has re-reads at once.
    assert registry.snapshot().get("rt.test") is None
    found = registry.of("k@q7.rt.test")
    assert (found.name, found.max_ttl, found.default_ttl) == ("rt.test", 7200, 600)
    assert registry.cached.default.name == "conf.test", "the first configured domain stays the default"
    # Disabled: gone once the TTL has passed (not before: a miss never re-reads for a known name).
    store.update_domain("rt.test", active=False)
    assert registry.get("rt.test") is not None
    clock.t += 2.0
    assert registry.get("rt.test") is None
    assert registry.of("a@rt.test") is None


def test_registry_skips_a_runtime_row_whose_settings_no_longer_validate(tmp_path, store, caplog):
    settings = settings_for(tmp_path)
    add(store, settings, "rt.test")
    Domain.update(settings=json.dumps({"mode": "open"})).where(Domain.name == "rt.test").execute()
    registry = DomainRegistry(settings, store)
    assert registry.get("rt.test") is None
    assert "rt.test is not served" in caplog.text


def test_registry_keeps_its_snapshot_when_the_database_fails(tmp_path, store):
    settings = settings_for(tmp_path)
    add(store, settings, "rt.test")
    clock = Clock()
    registry = DomainRegistry(settings, store, clock=clock)
    assert registry.get("rt.test") is not None
    store.runtime_domains = lambda: (_ for _ in ()).throw(RuntimeError("database down"))
    clock.t += 10
    assert registry.get("rt.test") is not None


# -- the operator routes ---------------------------------------------------------------


@pytest.fixture
def env(tmp_path):
    return box_env(tmp_path)


def admin(env, method: str, path: str = ADMIN, headers: dict | None = None, **kw):
    return env.request(method, path, headers={**bearer(OPERATOR), **(headers or {})}, **kw)


def test_add_a_domain_then_make_mailboxes_on_it_at_once(env):
    r = admin(env, "POST", json={"name": "RT.Test.", "subdomains": True, "random_subdomain": True, "max_ttl": 7200})
    assert r.status_code == 201, r.text
    doc = r.json
    assert (doc["name"], doc["source"], doc["active"], doc["mode"]) == ("rt.test", "api", True, "private")
    assert doc["settings"]["max_ttl"] == 7200 and doc["settings"]["default_ttl"] == 3600
    box = create(env, domain="rt.test")
    assert box["address"].endswith(".rt.test"), "random_subdomain applies"
    assert_error(env.request("POST", "/api/v1/mailboxes", json={"domain": "rt.test", "ttl": 7201}), 422,
                 "ttl_out_of_range")
    listed = [d["name"] for d in env.request("GET", "/api/v1/domains").json["items"]]
    assert "rt.test" in listed
    # Mail to it is routed to it: a public runtime domain makes the mailbox from the mail.
    admin(env, "POST", json={"name": "open-rt.test", "mode": "public"})
    deliver(env, eml("someone@open-rt.test"))
    r = env.request("GET", "/api/v1/mailboxes/someone@open-rt.test/messages")
    assert r.status_code == 200 and len(r.json["items"]) == 1


def test_disable_and_re_enable(env):
    admin(env, "POST", json={"name": "rt.test"})
    box = create(env, domain="rt.test")
    r = admin(env, "PATCH", f"{ADMIN}/rt.test", json={"active": False, "default_ttl": 900})
    assert r.status_code == 200, r.text
    assert (r.json["active"], r.json["settings"]["default_ttl"]) == (False, 900)
    assert_error(env.request("POST", "/api/v1/mailboxes", json={"domain": "rt.test"}), 422, "unknown_domain")
    assert "rt.test" not in [d["name"] for d in env.request("GET", "/api/v1/domains").json["items"]]
    assert admin(env, "GET", f"{ADMIN}/rt.test").json["active"] is False
    # Its mailboxes stay readable by their tokens until they expire.
    assert env.request("GET", f"/api/v1/mailboxes/{box['address']}", headers=bearer(box["token"])).status_code == 200
    assert admin(env, "PATCH", f"{ADMIN}/rt.test", json={"active": True}).json["active"] is True
    assert create(env, domain="rt.test")["expires_at"]


def test_operator_listing_has_every_domain(env):
    admin(env, "POST", json={"name": "rt.test", "mode": "public"})
    admin(env, "PATCH", f"{ADMIN}/rt.test", json={"active": False})
    items = {d["name"]: d for d in admin(env, "GET").json["items"]}
    assert items["rt.test"]["active"] is False and items["rt.test"]["source"] == "api"
    assert items["private.test"]["source"] == "config" and items["private.test"]["settings"]["max_ttl"] == 86400


@pytest.mark.parametrize("body, code", [
    ({}, "invalid_domain"),
    ({"name": "not a domain"}, "invalid_domain"),
    ({"name": 5}, "invalid_domain"),
    ({"name": "x.test", "mode": "open"}, "invalid_domain"),
    ({"name": "x.test", "colour": "red"}, "invalid_domain"),
    ({"name": "x.test", "default_ttl": 10}, "invalid_domain"),
    ({"name": "x.test", "max_ttl": 10**9}, "invalid_domain"),
    ({"name": "x.test", "random_subdomain": True}, "invalid_domain"),
    ({"name": "x.test", "auth_failure": "drop"}, "invalid_domain"),
    ({"name": "x.test", "max_messages": 0}, "invalid_domain"),
    ({"name": "x.test", "subdomains": "maybe"}, "invalid_domain"),
])
def test_bad_domains_get_422(env, body, code):
    r = admin(env, "POST", json=body)
    err = assert_error(r, 422, code)
    assert err["message"].startswith("domain")


def test_bad_requests_on_the_operator_routes(env):
    assert_error(env.request("POST", ADMIN, json={"name": "x.test"}), 401)
    assert_error(env.request("GET", ADMIN), 401)
    assert_error(env.request("PATCH", f"{ADMIN}/x.test", json={"active": False}, headers=bearer("mts_" + "a" * 32)),
                 401, "bad_token")
    assert_error(admin(env, "POST", json={"name": "private.test"}), 409, "domain_exists")
    assert_error(admin(env, "PATCH", f"{ADMIN}/private.test", json={"active": False}), 409, "configured_domain")
    assert_error(admin(env, "PATCH", f"{ADMIN}/nowhere.test", json={"active": False}), 404, "domain_not_found")
    assert_error(admin(env, "GET", f"{ADMIN}/nowhere.test"), 404, "domain_not_found")
    admin(env, "POST", json={"name": "rt.test"})
    assert_error(admin(env, "POST", json={"name": "rt.test"}), 409, "domain_exists")
    assert_error(admin(env, "PATCH", f"{ADMIN}/rt.test", json={"name": "other.test"}), 422, "invalid_domain")
    assert_error(admin(env, "PATCH", f"{ADMIN}/rt.test", json={"colour": 1}), 422, "unknown_field")
    assert_error(admin(env, "PATCH", f"{ADMIN}/rt.test", json={"active": "no"}), 422, "invalid_domain")
    assert_error(admin(env, "PATCH", f"{ADMIN}/rt.test", json={"max_ttl": 30}), 422, "invalid_domain")
    assert_error(admin(env, "PATCH", f"{ADMIN}/rt.test", body="{", headers={"Content-Type": "application/json"}),
                 400, "malformed_json")
    assert_error(admin(env, "POST", body="name=x", headers={"Content-Type": "text/plain"}), 415)


# -- the sweeper -------------------------------------------------------------------------


def test_the_sweeper_applies_a_runtime_domains_retention(env):
    admin(env, "POST", json={"name": "rt.test", "mode": "public", "retention": 60})
    deliver(env, eml("a@rt.test"), eml("b@open.test"))
    count = "SELECT count(*) FROM message"
    assert env.store.db.execute_sql(count).fetchone()[0] == 2
    # Two minutes on: over rt.test's retention, far within open.test's (a week).
    counts = sweep_once(env.store, env.settings, now=time.time() + 120)
    assert counts["messages"] == 1
    assert env.store.db.execute_sql(count).fetchone()[0] == 1


# -- the policy service: socketmap and the disabled-domain refusal ------------------------------


@pytest.fixture
def pstore(tmp_path):
    s = make_store(tmp_path / "p.db", [("priv.test", False, "private"), ("pub.test", True, "public")])
    yield s
    s.close()


def test_socketmap_look_ups(tmp_path, pstore):
    clock = Clock()
    policy = P.Policy(pstore.db, clock=clock)
    assert policy.socketmap("domain", "pub.test") == "OK ok"
    assert policy.socketmap("domain", "Deep.Sub.PUB.test") == "OK ok"
    assert policy.socketmap("domain", "x.priv.test") == "NOTFOUND ", "priv.test takes no subdomains"
    assert policy.socketmap("domain", ".pub.test") == "NOTFOUND ", "parent probes"
    assert policy.socketmap("domain", "pub.test.evil.example") == "NOTFOUND "
    assert policy.socketmap("mailbox", "a@pub.test").startswith("PERM")
    # Added a moment ago (the map is cached for seconds): served at the first look-up.
    settings = settings_for(tmp_path)
    add(pstore, settings, "rt.test", subdomains=True)
    assert policy.socketmap("domain", "q7.rt.test") == "OK ok"
    # Disabled: the map forgets it after its TTL; a recipient there is refused, not relayed.
    pstore.update_domain("rt.test", active=False)
    clock.t += P.DOMAINS_TTL
    assert policy.socketmap("domain", "q7.rt.test") == "NOTFOUND "
    assert policy.check(attrs(recipient="a@q7.rt.test")) == P.DOMAIN_DISABLED
    assert policy.check(attrs(recipient="a@elsewhere.example")) == P.DUNNO
    # A domain dropped from the configuration is left to Postfix (it may serve it otherwise now).
    pstore.sync_domains([("priv.test", False, "private")])
    clock.t += P.DOMAINS_TTL
    assert policy.check(attrs(recipient="a@pub.test")) == P.DUNNO


def test_socketmap_answers_temp_when_the_database_fails(pstore):
    policy = P.Policy(pstore.db)
    pstore.db.execute_sql("DROP TABLE domain")
    assert policy.socketmap("domain", "pub.test").startswith("TEMP")


def test_a_runtime_domain_can_refuse_spf_fail_and_is_private(tmp_path, pstore):
    settings = settings_for(tmp_path)
    add(pstore, settings, "strict.test", reject_spf_fail=True)
    add_mailbox("a@strict.test", "strict.test")
    verdicts = []

    def spf(ip, sender, helo):
        verdicts.append(ip)
        return "fail"

    policy = P.Policy(pstore.db, spf_factory=lambda: spf)
    assert policy.check(attrs(recipient="nobody@strict.test")) == P.NO_MAILBOX
    assert policy.check(attrs(recipient="a@strict.test")) == P.SPF_FAIL
    assert verdicts == ["192.0.2.1"]


def netstring(text: str) -> bytes:
    return b"%d:%s," % (len(text.encode()), text.encode())


def read_netstrings(sock, n: int) -> list[str]:
    buf, out = b"", []
    while len(out) < n:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {out}")
        buf += chunk
        while b":" in buf:
            length, _, rest = buf.partition(b":")
            if len(rest) < int(length) + 1:
                break
            assert rest[int(length):int(length) + 1] == b","
            out.append(rest[:int(length)].decode())
            buf = rest[int(length) + 1:]
    return out


def test_socketmap_protocol_over_a_socket(pstore):
    server = _Server(P.Policy(pstore.db))
    try:
        with socket.create_connection(server.address, timeout=5) as sock:
            # Two requests in one write, then one split across writes: answered in order.
            sock.sendall(netstring("domain pub.test") + netstring("domain nowhere.test"))
            assert read_netstrings(sock, 2) == ["OK ok", "NOTFOUND "]
            data = netstring("domain x.pub.test")
            sock.sendall(data[:3])
            time.sleep(0.05)
            sock.sendall(data[3:])
            assert read_netstrings(sock, 1) == ["OK ok"]
            sock.sendall(netstring("domainonly"))
            assert read_netstrings(sock, 1)[0].startswith("PERM")
        for garbage in (b"hello there,", b"99999999:x,", b"3:abcX"):
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(garbage)
                assert sock.recv(100) == b"", garbage  # closed
    finally:
        server.stop()


class _Server(ServerThread):
    """ServerThread with the socketmap protocol."""

    def __init__(self, policy):
        import asyncio
        import threading
        self.server = P.PolicyServer(policy, "127.0.0.1:0", socketmap=True)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)
        if self.error:
            raise self.error


def test_socketmap_protocol_unit():
    written = []

    class Transport:
        def write(self, data):
            written.append(data)

        def close(self):
            written.append(b"<closed>")

    proto = SocketmapProtocol(lambda name, key: f"OK {name}:{key}")
    proto.connection_made(Transport())
    for byte in netstring("domain a.test"):
        proto.data_received(bytes([byte]))
    assert written == [netstring("OK domain:a.test")]


# -- Postfix settings -------------------------------------------------------------------


def test_rendered_postfix_settings_with_and_without_the_socketmap(tmp_path):
    maildir = tmp_path / "Maildir"
    with_map = render([("conf.test", True)], maildir, uid=5000, gid=5000, message_size_limit=1000,
                      policy="127.0.0.1:10040", socketmap="127.0.0.1:10041")
    main = main_cf_settings(with_map[MAIN_CF])
    # The static map first: the configured domains never wait for (or depend on) the socketmap.
    assert main["virtual_mailbox_domains"] == ("pcre:$config_directory/mtasidecar-domains.pcre, "
                                               "socketmap:inet:127.0.0.1:10041:domain")
    assert "socketmap" not in main["virtual_mailbox_maps"], "virtual(8) refuses socketmap there"
    assert with_map[MAILBOXES_MAP].rstrip().endswith("/@/ Maildir/")
    without = render([("conf.test", True)], maildir, uid=5000, gid=5000, message_size_limit=1000)
    main = main_cf_settings(without[MAIN_CF])
    assert main["virtual_mailbox_domains"] == "pcre:$config_directory/mtasidecar-domains.pcre"
    assert "/@/ " not in without[MAILBOXES_MAP]
    assert without[DOMAINS_MAP] == with_map[DOMAINS_MAP]


# -- mtasidecar doctor ---------------------------------------------------------------------


def test_doctor_knows_runtime_domains(env):
    from mtasidecar.doctor import Doctor, runtime_domains_of
    admin(env, "POST", json={"name": "rt.test", "mode": "public", "subdomains": True})
    admin(env, "POST", json={"name": "off.test"})
    admin(env, "PATCH", f"{ADMIN}/off.test", json={"active": False})
    runtime = runtime_domains_of(env.settings)
    assert sorted(runtime) == ["rt.test"]
    doctor = Doctor(env.settings, ["rt.test", "off.test"], local_addresses=set(), runtime_domains=runtime)
    ok, off = doctor.check_configured("rt.test"), doctor.check_configured("off.test")
    assert ok.status == "ok" and "added at runtime" in ok.detail, ok
    assert off.status == "fail", off


def test_doctor_does_not_create_a_missing_database(tmp_path):
    from mtasidecar.doctor import runtime_domains_of
    settings = settings_for(tmp_path)
    assert runtime_domains_of(settings) == {}
    assert not (tmp_path / "data").exists()
