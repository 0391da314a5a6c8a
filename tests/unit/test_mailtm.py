"""The mail.tm-compatible API, in process: falcon's TestClient on a real SQLite file.

Mail reaches the store as in production (Maildir files through the ingest
pipeline; helpers shared with test_api.py). Checked: the exact key sets of
every shape (clients build objects from them and fail on unknown keys),
Accept negotiation (hydra collection vs bare array), pagination, mail.tm's
error shapes, isolation between accounts, and the Mercure-style SSE hub.
No request may get a 500.
"""

from __future__ import annotations

import asyncio
import json
import time

import falcon
import falcon.testing
import pytest

from mtasidecar.api import mailtm
from mtasidecar.api.mailtm_views import strip_ld
from tests.dnsserver import DNSTestServer
from tests.unit.test_api import AUTH_ZONE, eml, make_env

PRIVATE = "priv.test"
DOMAINS = f"{PRIVATE},*.wild.test,public:example.test"
PASSWORD = "correct horse"

ACCOUNT_KEYS = {"@context", "@id", "@type", "id", "address", "quota", "used", "isDisabled", "isDeleted",
                "createdAt", "updatedAt"}
DOMAIN_KEYS = {"@context", "@id", "@type", "id", "domain", "isActive", "isPrivate", "createdAt", "updatedAt"}
INTRO_KEYS = {"@id", "@type", "id", "accountId", "msgid", "from", "to", "subject", "intro", "seen", "isDeleted",
              "hasAttachments", "size", "downloadUrl", "sourceUrl", "createdAt", "updatedAt"}
FULL_KEYS = INTRO_KEYS | {"@context", "cc", "bcc", "text", "html", "attachments", "verifications", "flagged",
                          "retention", "retentionDate"}
ATTACHMENT_KEYS = {"id", "filename", "contentType", "disposition", "transferEncoding", "related", "size",
                   "downloadUrl"}
HYDRA_ERROR_KEYS = {"@context", "@type", "hydra:title", "hydra:description"}


@pytest.fixture(autouse=True)
def no_server_errors(monkeypatch):
    statuses = []
    original = falcon.testing.TestClient.simulate_request

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        statuses.append((result.status_code, args[:2]))
        return result

    monkeypatch.setattr(falcon.testing.TestClient, "simulate_request", recording)
    yield
    assert not [s for s in statuses if s[0] >= 500], statuses


REAL_KDF = {"test_create_account", "test_password_hash_roundtrip"}


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch, request):
    """scrypt at 2**10 instead of 2**14 (0.5 s a hash on a slow machine), except in the
    tests that check the real parameters (REAL_KDF)."""
    if request.node.originalname not in REAL_KDF:
        monkeypatch.setattr(mailtm, "SCRYPT_N", 2**10)


@pytest.fixture
def env(tmp_path):
    # Failed authentications are throttled (8/s by default); these tests make many on purpose.
    return make_env(tmp_path, MTASIDECAR_DOMAINS=DOMAINS, MTASIDECAR_API_AUTH_FAILURE_RATE="1000")


def create(env, address: str, password: str = PASSWORD):
    return env.client.simulate_post("/accounts", json={"address": address, "password": password})


def login(env, address: str, password: str = PASSWORD) -> dict:
    r = env.client.simulate_post("/token", json={"address": address, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json['token']}"}


def account(env, address: str = f"alice@{PRIVATE}") -> tuple[str, dict]:
    """A new account: (its id, auth headers)."""
    r = create(env, address)
    assert r.status_code == 201, r.text
    return r.json["id"], login(env, address)


def assert_hydra_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/ld+json")
    assert set(r.json) == HYDRA_ERROR_KEYS, r.json
    assert r.json["@type"] == "hydra:Error" and r.json["hydra:description"]
    return r.json


def assert_401(r, message: str | None = None) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json) == {"code", "message"} and r.json["code"] == 401, r.json
    if message:
        assert r.json["message"] == message


def assert_violations(r, *paths: str) -> list[dict]:
    assert r.status_code == 422, (r.status_code, r.text)
    body = r.json
    assert body["@type"] == "ConstraintViolationList"
    assert set(body) == {"@context", "@type", "hydra:title", "hydra:description", "violations"}
    assert all(set(v) == {"propertyPath", "message"} and v["message"] for v in body["violations"])
    assert [v["propertyPath"] for v in body["violations"]] == list(paths)
    return body["violations"]


def is_time(text: str) -> bool:
    from datetime import datetime
    return datetime.fromisoformat(text).utcoffset() is not None


# -- domains ----------------------------------------------------------------------------------

def test_domains_hydra_collection(env):
    r = env.client.simulate_get("/domains")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/ld+json")
    body = r.json
    assert set(body) == {"@context", "@id", "@type", "hydra:member", "hydra:totalItems", "hydra:view"}
    assert (body["@context"], body["@id"], body["@type"]) == ("/contexts/Domain", "/domains", "hydra:Collection")
    assert sorted(d["domain"] for d in body["hydra:member"]) == ["example.test", PRIVATE, "wild.test"]
    assert body["hydra:totalItems"] == 3
    for d in body["hydra:member"]:
        assert set(d) == DOMAIN_KEYS - {"@context"}
        assert d["@id"] == f"/domains/{d['id']}" and d["@type"] == "Domain"
        assert len(d["id"]) == 24 and d["isActive"] is True and d["isPrivate"] is False
        assert is_time(d["createdAt"]) and is_time(d["updatedAt"])
    assert body["hydra:view"]["@id"] == "/domains?page=1"
    assert "hydra:next" not in body["hydra:view"]


@pytest.mark.parametrize("accept", [None, "*/*", "application/ld+json", "text/html, */*;q=0.8"])
def test_collections_are_hydra_for_ld_json_any_or_no_accept(env, accept):
    r = env.client.simulate_get("/domains", headers={"Accept": accept} if accept else {})
    assert isinstance(r.json, dict) and "hydra:member" in r.json


@pytest.mark.parametrize("accept", ["application/json", "application/json, text/plain, */*"])
def test_collections_are_bare_arrays_for_plain_json(env, accept):
    r = env.client.simulate_get("/domains", headers={"Accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert isinstance(r.json, list) and len(r.json) == 3
    assert all(set(d) == {k for k in DOMAIN_KEYS if not k.startswith("@")} for d in r.json)


def test_domain_item_and_unknown_ids(env):
    member = env.client.simulate_get("/domains").json["hydra:member"][0]
    r = env.client.simulate_get(f"/domains/{member['id']}")
    assert r.status_code == 200 and set(r.json) == DOMAIN_KEYS
    assert r.json["@context"] == "/contexts/Domain" and r.json["domain"] == member["domain"]
    for bad in ("f" * 24, "0" * 24, "nope", "1", "f" * 30):
        assert_hydra_error(env.client.simulate_get(f"/domains/{bad}"), 404)


def test_domains_page_two_is_empty_and_bad_pages_are_400(env):
    r = env.client.simulate_get("/domains", params={"page": "2"})
    assert r.status_code == 200 and r.json["hydra:member"] == [] and r.json["hydra:totalItems"] == 3
    assert r.json["hydra:view"]["hydra:previous"] == "/domains?page=1"
    for bad in ("0", "-1", "x", "1.5", "9" * 12):
        assert_hydra_error(env.client.simulate_get("/domains", params={"page": bad}), 400)


# -- accounts ---------------------------------------------------------------------------------

def test_create_account(env):
    before = time.time()
    r = create(env, f"Alice@{PRIVATE.upper()}")
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/ld+json")
    body = r.json
    assert set(body) == ACCOUNT_KEYS
    assert body["@context"] == "/contexts/Account" and body["@type"] == "Account"
    assert body["@id"] == f"/accounts/{body['id']}" and len(body["id"]) == 24
    assert body["address"] == f"alice@{PRIVATE}"
    assert (body["used"], body["isDisabled"], body["isDeleted"]) == (0, False, False)
    assert body["quota"] == env.settings.domain(PRIVATE).max_bytes
    assert is_time(body["createdAt"]) and is_time(body["updatedAt"])
    # The account is a mailbox: it lives as long as its domain allows at most.
    mailbox = env.store.mailbox(f"alice@{PRIVATE}")
    assert mailbox.id == int(body["id"], 16)
    max_ttl = env.settings.domain(PRIVATE).max_ttl
    assert before + max_ttl - 5 <= mailbox.expires_at <= time.time() + max_ttl + 5
    # The password is stored as a salted scrypt hash, never as itself.
    assert mailbox.password_hash.startswith("scrypt$16384$8$1$")
    assert PASSWORD not in mailbox.password_hash


def test_accounts_on_public_domains_and_subdomains(env):
    assert create(env, "pub@example.test").status_code == 201
    assert create(env, "x@deep.wild.test").status_code == 201
    assert create(env, "x@wild.test").status_code == 201


def test_create_account_twice_is_422_already_used(env):
    account(env)
    violations = assert_violations(create(env, f"alice@{PRIVATE}", "another password"), "address")
    assert violations[0]["message"] == "This value is already used."


@pytest.mark.parametrize("body, paths", [
    ({"address": "not-an-address", "password": PASSWORD}, ["address"]),
    ({"address": "a@elsewhere.test", "password": PASSWORD}, ["address"]),
    ({"address": f"a@sub.{PRIVATE}", "password": PASSWORD}, ["address"]),  # no subdomains there
    ({"address": f"postmaster@{PRIVATE}", "password": PASSWORD}, ["address"]),
    ({"address": f"a..b@{PRIVATE}", "password": PASSWORD}, ["address"]),
    ({"address": f"{'a' * 65}@{PRIVATE}", "password": PASSWORD}, ["address"]),
    ({"address": "", "password": PASSWORD}, ["address"]),
    ({"address": 42, "password": PASSWORD}, ["address"]),
    ({"password": PASSWORD}, ["address"]),
    ({"address": f"a@{PRIVATE}", "password": "12345"}, ["password"]),
    ({"address": f"a@{PRIVATE}", "password": ""}, ["password"]),
    ({"address": f"a@{PRIVATE}", "password": 123456}, ["password"]),
    ({"address": f"a@{PRIVATE}", "password": "x" * 1025}, ["password"]),
    ({"address": f"a@{PRIVATE}"}, ["password"]),
    ({}, ["address", "password"]),
    ({"address": "bad", "password": "bad"}, ["address", "password"]),
])
def test_create_account_bad_input_is_422(env, body, paths):
    assert_violations(env.client.simulate_post("/accounts", json=body), *paths)
    assert env.store.mailbox(f"a@{PRIVATE}") is None


@pytest.mark.parametrize("body, ctype, status", [
    (b"{not json", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b"", "application/json", 400),
    (b'{"address": "a@priv.test", "password": "secret1"}', "text/plain", 415),
    (b"\xff\xfe", "application/json", 400),
    (b"x" * 70_000, "application/json", 413),
])
def test_create_account_malformed_body(env, body, ctype, status):
    r = env.client.simulate_post("/accounts", body=body, headers={"Content-Type": ctype})
    assert_hydra_error(r, status)


def test_create_account_without_content_type_is_read_as_json(env):
    r = env.client.simulate_post("/accounts", body=json.dumps({"address": f"a@{PRIVATE}", "password": PASSWORD}))
    assert r.status_code == 201, r.text


def test_account_creation_is_rate_limited_429(tmp_path):
    env = make_env(tmp_path, MTASIDECAR_DOMAINS=DOMAINS, MTASIDECAR_API_CREATE_RATE="0.01")
    assert create(env, f"a@{PRIVATE}").status_code == 201
    r = create(env, f"b@{PRIVATE}")
    assert_hydra_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1


# -- tokens -----------------------------------------------------------------------------------

def test_token_is_new_each_time_and_each_works(env):
    aid, _ = account(env)
    r1 = env.client.simulate_post("/token", json={"address": f"ALICE@{PRIVATE}", "password": PASSWORD})
    r2 = env.client.simulate_post("/token", json={"address": f"alice@{PRIVATE}", "password": PASSWORD})
    assert r1.status_code == r2.status_code == 200
    assert set(r1.json) == {"token", "@id", "id"}
    assert r1.json["id"] == aid and r1.json["@id"] == f"/accounts/{aid}"
    assert r1.json["token"] != r2.json["token"]
    for r in (r1, r2):
        me = env.client.simulate_get("/me", headers={"Authorization": f"Bearer {r.json['token']}"})
        assert me.status_code == 200 and me.json["id"] == aid
    plain = env.client.simulate_post("/token", json={"address": f"alice@{PRIVATE}", "password": PASSWORD},
                                     headers={"Accept": "application/json"})
    assert set(plain.json) == {"token", "id"}


@pytest.mark.parametrize("address, password", [
    (f"alice@{PRIVATE}", "wrong password"),
    (f"alice@{PRIVATE}", ""),
    (f"nobody@{PRIVATE}", PASSWORD),
    ("x" * 400, PASSWORD),
])
def test_bad_credentials_are_401(env, address, password):
    account(env)
    r = env.client.simulate_post("/token", json={"address": address, "password": password})
    assert_401(r, "Invalid credentials.")


def test_token_for_a_mailbox_without_password_is_401(env):
    r = env.client.simulate_post("/api/v1/mailboxes", json={"domain": PRIVATE, "local_part": "native"})
    assert r.status_code == 201
    assert_401(env.client.simulate_post("/token", json={"address": f"native@{PRIVATE}", "password": PASSWORD}))


@pytest.mark.parametrize("body", [{}, {"address": "a@b.test"}, {"password": "x"}, {"address": 1, "password": "x"}])
def test_token_missing_fields_are_400(env, body):
    assert_hydra_error(env.client.simulate_post("/token", json=body), 400)


def test_failed_logins_are_throttled_429(tmp_path):
    env = make_env(tmp_path, MTASIDECAR_DOMAINS=DOMAINS, MTASIDECAR_API_AUTH_FAILURE_RATE="0.01")
    account(env)
    assert_401(env.client.simulate_post("/token", json={"address": f"alice@{PRIVATE}", "password": "nope nope"}))
    r = env.client.simulate_post("/token", json={"address": f"alice@{PRIVATE}", "password": PASSWORD})
    assert_hydra_error(r, 429)
    assert "retry-after" in r.headers
    assert_hydra_error(env.client.simulate_get("/me", headers={"Authorization": "Bearer mts_x"}), 429)


# -- me, accounts/{id} --------------------------------------------------------------------------

def test_me_and_account_by_id(env):
    aid, auth = account(env)
    me = env.client.simulate_get("/me", headers=auth)
    assert me.status_code == 200 and set(me.json) == ACCOUNT_KEYS and me.json["id"] == aid
    by_id = env.client.simulate_get(f"/accounts/{aid}", headers=auth)
    assert by_id.status_code == 200 and by_id.json == me.json
    plain = env.client.simulate_get("/me", headers={**auth, "Accept": "application/json"})
    assert plain.json == strip_ld(me.json)


@pytest.mark.parametrize("headers, message", [
    ({}, "JWT Token not found"),
    ({"Authorization": "Bearer mts_" + "A" * 32}, "Invalid JWT Token"),
    ({"Authorization": "Bearer not-a-token"}, "Invalid JWT Token"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "Invalid JWT Token"),
    ({"Authorization": "Bearer"}, "Invalid JWT Token"),
])
def test_bad_or_missing_token_is_401_everywhere(env, headers, message):
    aid, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}"))[0]
    for method, path in [("GET", "/me"), ("GET", f"/accounts/{aid}"), ("DELETE", f"/accounts/{aid}"),
                         ("GET", "/messages"), ("GET", f"/messages/{mid}"), ("PATCH", f"/messages/{mid}"),
                         ("DELETE", f"/messages/{mid}"), ("GET", f"/sources/{mid}"),
                         ("GET", f"/messages/{mid}/download"),
                         ("GET", f"/messages/{mid}/attachment/ATTACH000001"),
                         ("GET", f"/.well-known/mercure?topic=/accounts/{aid}")]:
        r = env.client.simulate_request(method, path, headers=headers)
        assert_401(r, message)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert env.client.simulate_get(f"/messages/{mid}", headers=auth).status_code == 200


def test_expired_account_token_is_401(env):
    _, auth = account(env)
    env.store.set_expiry(env.store.mailbox(f"alice@{PRIVATE}").id, time.time() - 1)
    assert_401(env.client.simulate_get("/me", headers=auth), "Expired JWT Token")
    assert_401(env.client.simulate_post("/token", json={"address": f"alice@{PRIVATE}", "password": PASSWORD}))


def test_delete_account_then_token_is_401_and_address_free_again(env):
    aid, auth = account(env)
    env.deliver(eml(f"alice@{PRIVATE}"))
    r = env.client.simulate_delete(f"/accounts/{aid}", headers=auth)
    assert r.status_code == 204 and r.text == ""
    assert_401(env.client.simulate_get("/me", headers=auth), "Invalid JWT Token")
    assert_401(env.client.simulate_get("/messages", headers=auth))
    assert env.store.mailbox(f"alice@{PRIVATE}") is None
    assert env.store.count_messages() == 0
    assert create(env, f"alice@{PRIVATE}", "a new password").status_code == 201


# -- messages ---------------------------------------------------------------------------------

def test_message_list_shape_and_newest_first(env):
    aid, auth = account(env)
    ids = env.deliver(eml(f"alice@{PRIVATE}", subject="first"), eml(f"alice@{PRIVATE}", subject="second"))
    r = env.client.simulate_get("/messages", headers=auth)
    assert r.status_code == 200
    body = r.json
    assert (body["@context"], body["@id"], body["@type"]) == ("/contexts/Message", "/messages", "hydra:Collection")
    assert body["hydra:totalItems"] == 2
    members = body["hydra:member"]
    assert [m["id"] for m in members] == ids[::-1]
    m = members[0]
    assert set(m) == INTRO_KEYS
    assert m["@id"] == f"/messages/{m['id']}" and m["@type"] == "Message"
    assert m["accountId"] == f"/accounts/{aid}"
    assert m["msgid"] == "<second@origin.test>"
    assert m["from"] == {"address": "sender@origin.test", "name": "Sam Sender"}
    assert m["to"] == [{"address": f"alice@{PRIVATE}", "name": ""}]
    assert (m["subject"], m["intro"], m["seen"], m["isDeleted"], m["hasAttachments"]) == \
        ("second", "Hello there.", False, False, False)
    assert m["size"] == len(env.files[m["id"]])
    assert m["downloadUrl"] == f"/messages/{m['id']}/download" and m["sourceUrl"] == f"/sources/{m['id']}"
    assert is_time(m["createdAt"]) and m["createdAt"].endswith("+00:00")
    plain = env.client.simulate_get("/messages", headers={**auth, "Accept": "application/json"})
    assert plain.json == [strip_ld(x) for x in members]


def test_message_pagination_30_per_page(env):
    _, auth = account(env)
    ids = env.deliver(*[eml(f"alice@{PRIVATE}", subject=f"n{i}") for i in range(32)])
    page1 = env.client.simulate_get("/messages", headers=auth).json
    page2 = env.client.simulate_get("/messages", params={"page": 2}, headers=auth).json
    page3 = env.client.simulate_get("/messages", params={"page": 3}, headers=auth).json
    assert [m["id"] for m in page1["hydra:member"]] == ids[::-1][:30]
    assert [m["id"] for m in page2["hydra:member"]] == ids[::-1][30:]
    assert page3["hydra:member"] == []
    assert page1["hydra:totalItems"] == page2["hydra:totalItems"] == 32
    assert page1["hydra:view"] == {"@id": "/messages?page=1", "@type": "hydra:PartialCollectionView",
                                   "hydra:first": "/messages?page=1", "hydra:last": "/messages?page=2",
                                   "hydra:next": "/messages?page=2"}
    assert page2["hydra:view"]["hydra:previous"] == "/messages?page=1"
    assert "hydra:next" not in page2["hydra:view"]
    assert_hydra_error(env.client.simulate_get("/messages", params={"page": "0"}, headers=auth), 400)


def test_full_message_shape(env):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}", subject="full", html="<p>Hi <b>there</b></p>",
                          cc="Carol <carol@origin.test>",
                          attachments=(("report.pdf", "application/pdf", b"%PDF-1.4 data"),)))[0]
    r = env.client.simulate_get(f"/messages/{mid}", headers=auth)
    assert r.status_code == 200
    m = r.json
    assert set(m) == FULL_KEYS
    assert (m["@context"], m["@id"], m["@type"]) == ("/contexts/Message", f"/messages/{mid}", "Message")
    assert m["cc"] == [{"address": "carol@origin.test", "name": "Carol"}] and m["bcc"] == []
    assert m["text"] == "Hello there.\n"
    assert isinstance(m["html"], list) and "<b>there</b>" in m["html"][0]
    assert (m["flagged"], m["retention"], m["hasAttachments"]) == (False, True, True)
    assert is_time(m["retentionDate"]) and m["retentionDate"] > m["createdAt"]
    assert m["verifications"] == {"spf": False, "dkim": False}  # not checked here
    [a] = m["attachments"]
    assert set(a) == ATTACHMENT_KEYS
    assert a == {"id": "ATTACH000001", "filename": "report.pdf", "contentType": "application/pdf",
                 "disposition": "attachment", "transferEncoding": "base64", "related": False, "size": 13,
                 "downloadUrl": f"/messages/{mid}/attachment/ATTACH000001"}
    plain = env.client.simulate_get(f"/messages/{mid}", headers={**auth, "Accept": "application/json"})
    assert plain.json == strip_ld(m)


@pytest.fixture
def authenticator():
    from mtasidecar.mail.auth import Authenticator
    server = DNSTestServer(AUTH_ZONE).start()
    try:
        yield Authenticator([server.address], timeout=2, budget=5, hostname="mx.example.test")
    finally:
        server.stop()


def test_verifications_come_from_sender_checks(env, authenticator):
    _, auth = account(env)
    good, forged = env.deliver(eml(f"alice@{PRIVATE}", sender="a@origin.test"),
                               eml(f"alice@{PRIVATE}", sender="a@forged.test"), authenticator=authenticator)
    assert env.client.simulate_get(f"/messages/{good}", headers=auth).json["verifications"] == \
        {"spf": True, "dkim": False}
    assert env.client.simulate_get(f"/messages/{forged}", headers=auth).json["verifications"] == \
        {"spf": False, "dkim": False}


@pytest.mark.parametrize("ctype", ["application/merge-patch+json", "application/json", "application/ld+json"])
def test_patch_seen_with_json_bodies(env, ctype):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}"))[0]
    r = env.client.simulate_patch(f"/messages/{mid}", body=json.dumps({"seen": True}),
                                  headers={**auth, "Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert set(r.json) == FULL_KEYS and r.json["seen"] is True
    assert env.client.simulate_get("/messages", headers=auth).json["hydra:member"][0]["seen"] is True
    r = env.client.simulate_patch(f"/messages/{mid}", body=json.dumps({"seen": False}),
                                  headers={**auth, "Content-Type": ctype})
    assert r.json["seen"] is False


def test_patch_without_body_marks_seen(env):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}"))[0]
    r = env.client.simulate_patch(f"/messages/{mid}", headers=auth)
    assert r.status_code == 200 and r.json["seen"] is True


@pytest.mark.parametrize("body, ctype, status", [
    (b'{"seen": "yes"}', "application/merge-patch+json", 422),
    (b'{"seen": 1}', "application/json", 422),
    (b"{bad", "application/merge-patch+json", 400),
    (b'"seen"', "application/json", 400),
    (b'{"seen": true}', "text/plain", 415),
])
def test_patch_bad_bodies(env, body, ctype, status):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}"))[0]
    r = env.client.simulate_patch(f"/messages/{mid}", body=body, headers={**auth, "Content-Type": ctype})
    if status == 422:
        assert_violations(r, "seen")
    else:
        assert_hydra_error(r, status)


def test_delete_message(env):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}"))[0]
    assert env.client.simulate_get("/me", headers=auth).json["used"] > 0
    r = env.client.simulate_delete(f"/messages/{mid}", headers=auth)
    assert r.status_code == 204 and r.text == ""
    assert_hydra_error(env.client.simulate_get(f"/messages/{mid}", headers=auth), 404)
    assert_hydra_error(env.client.simulate_delete(f"/messages/{mid}", headers=auth), 404)
    assert env.client.simulate_get("/messages", headers=auth).json["hydra:totalItems"] == 0
    assert env.client.simulate_get("/me", headers=auth).json["used"] == 0


def test_source_download_and_attachment(env):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}", subject="src",
                          attachments=(("data.bin", "application/octet-stream", bytes(range(256))),)))[0]
    raw = env.files[mid]
    r = env.client.simulate_get(f"/sources/{mid}", headers=auth)
    assert r.status_code == 200
    assert r.json == {"@context": "/contexts/Source", "@id": f"/sources/{mid}", "@type": "Source", "id": mid,
                      "downloadUrl": f"/messages/{mid}/download", "data": raw.decode()}
    d = env.client.simulate_get(f"/messages/{mid}/download", headers=auth)
    assert d.status_code == 200 and d.content == raw
    assert d.headers["content-type"] == "message/rfc822"
    a = env.client.simulate_get(f"/messages/{mid}/attachment/ATTACH000001", headers=auth)
    assert a.status_code == 200 and a.content == bytes(range(256))
    assert a.headers["content-type"] == "application/octet-stream"
    assert 'filename="data.bin"' in a.headers["content-disposition"]
    for bad in ("ATTACH000002", "ATTACH000000", "nope", "ATTACH"):
        assert_hydra_error(env.client.simulate_get(f"/messages/{mid}/attachment/{bad}", headers=auth), 404)
    # Not mail.tm's, but clients call them: the attachments as JSON.
    listed = env.client.simulate_get(f"/messages/{mid}/attachments", headers=auth)
    assert listed.status_code == 200 and [x["id"] for x in listed.json] == ["ATTACH000001"]
    one = env.client.simulate_get(f"/messages/{mid}/attachments/ATTACH000001", headers=auth)
    assert one.status_code == 200 and set(one.json) == ATTACHMENT_KEYS
    assert_hydra_error(env.client.simulate_get(f"/messages/{mid}/attachments/ATTACH000009", headers=auth), 404)


def test_blocked_attachment_is_403(env):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}", attachments=(("setup.exe", "application/octet-stream", b"MZ"),)))[0]
    env.store.db.execute_sql("UPDATE attachment SET blocked = 'executable' WHERE message_id = ?", (int(mid, 16),))
    assert_hydra_error(env.client.simulate_get(f"/messages/{mid}/attachment/ATTACH000001", headers=auth), 403)


def test_set_aside_message_source_is_410(env):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}", text="x" * 5000), max_size=1024)[0]
    assert env.client.simulate_get(f"/messages/{mid}", headers=auth).status_code == 200
    assert_hydra_error(env.client.simulate_get(f"/sources/{mid}", headers=auth), 410)
    assert_hydra_error(env.client.simulate_get(f"/messages/{mid}/download", headers=auth), 410)


@pytest.mark.parametrize("bad", ["nope", "f" * 24, "F" * 24, "0" * 23, "8" + "0" * 23])
def test_unknown_or_malformed_message_ids_are_404(env, bad):
    _, auth = account(env)
    for method, path in [("GET", f"/messages/{bad}"), ("PATCH", f"/messages/{bad}"),
                         ("DELETE", f"/messages/{bad}"), ("GET", f"/sources/{bad}"),
                         ("GET", f"/messages/{bad}/download"), ("GET", f"/messages/{bad}/attachment/ATTACH000001"),
                         ("GET", f"/messages/{bad}/attachments")]:
        assert_hydra_error(env.client.simulate_request(method, path, headers=auth), 404)


def test_errors_for_plain_json_clients_are_problem_json(env):
    _, auth = account(env)
    r = env.client.simulate_get(f"/messages/{'f' * 24}", headers={**auth, "Accept": "application/json"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert set(r.json) == {"type", "title", "detail"}
    r = env.client.simulate_post("/accounts", json={"address": "x", "password": "y"},
                                 headers={"Accept": "application/json"})
    assert r.status_code == 422 and set(r.json) == {"type", "title", "detail", "violations"}
    assert [v["propertyPath"] for v in r.json["violations"]] == ["address", "password"]


# -- isolation --------------------------------------------------------------------------------

def test_one_account_cannot_reach_another(env):
    alice_id, alice = account(env, f"alice@{PRIVATE}")
    bob_id, bob = account(env, f"bob@{PRIVATE}")
    mid = env.deliver(eml(f"alice@{PRIVATE}"))[0]
    assert env.client.simulate_get("/messages", headers=bob).json["hydra:totalItems"] == 0
    for method, path in [("GET", f"/messages/{mid}"), ("PATCH", f"/messages/{mid}"),
                         ("DELETE", f"/messages/{mid}"), ("GET", f"/sources/{mid}"),
                         ("GET", f"/messages/{mid}/download"), ("GET", f"/messages/{mid}/attachment/ATTACH000001"),
                         ("GET", f"/accounts/{alice_id}"), ("DELETE", f"/accounts/{alice_id}")]:
        assert_hydra_error(env.client.simulate_request(method, path, headers=bob), 404)
    # Nothing changed for Alice.
    r = env.client.simulate_get(f"/messages/{mid}", headers=alice)
    assert r.status_code == 200 and r.json["seen"] is False
    assert env.client.simulate_get(f"/accounts/{bob_id}", headers=bob).status_code == 200


def test_native_and_mailtm_see_the_same_mailbox(env):
    _, auth = account(env)
    mid = env.deliver(eml(f"alice@{PRIVATE}"))[0]
    # A mail.tm token opens the mailbox in the native API...
    native = env.client.simulate_get(f"/api/v1/mailboxes/alice@{PRIVATE}/messages", headers=auth)
    assert native.status_code == 200 and [m["id"] for m in native.json["items"]] == [mid]
    # ...and a native mailbox's token works as a mail.tm token.
    r = env.client.simulate_post("/api/v1/mailboxes", json={"domain": PRIVATE, "local_part": "native"})
    token = r.json["token"]
    me = env.client.simulate_get("/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json["address"] == f"native@{PRIVATE}"


# -- Mercure hub (SSE) ------------------------------------------------------------------------

async def _frames(stream, count: int, timeout: float = 10) -> list[str]:
    """Read SSE frames (blank-line separated) until ``count`` of them carry data."""
    buf = b""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        frames = [f for f in buf.decode().split("\n\n") if "data:" in f]
        if len(frames) >= count:
            return frames
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"timed out; got {buf!r}"
        chunk = await asyncio.wait_for(stream.read(), remaining)
        if not chunk:
            await asyncio.sleep(0.01)
        buf += chunk


def _data(frame: str) -> dict:
    return json.loads("".join(line[5:].strip() for line in frame.splitlines() if line.startswith("data:")))


def test_hub_ends_the_stream_when_the_account_is_deleted(env, quick_heartbeat):
    aid, auth = account(env)

    async def scenario():
        async with falcon.testing.ASGIConductor(env.client.app) as conductor:
            async with conductor.simulate_get_stream(
                    "/.well-known/mercure", params={"topic": f"/accounts/{aid}"}, headers=auth) as sr:
                await asyncio.wait_for(sr.stream.read(), 5)
                r = await conductor.simulate_delete(f"/accounts/{aid}", headers=auth)
                assert r.status_code == 204
                await asyncio.sleep(0.6)  # two heartbeats: the stream notices
                await sr.stream.read()
                await asyncio.sleep(1.0)  # a live stream would send three keep-alives meanwhile
                return await sr.stream.read()

    assert asyncio.run(scenario()) == b""


@pytest.fixture
def quick_heartbeat(monkeypatch):
    # A stream notices its client left at its next frame: keep the tests short.
    monkeypatch.setattr(mailtm.Hub, "HEARTBEAT", 0.3)


def test_hub_streams_new_messages_and_account_updates(env, quick_heartbeat):
    aid, auth = account(env)
    old = env.deliver(eml(f"alice@{PRIVATE}", subject="before"))[0]

    async def scenario():
        async with falcon.testing.ASGIConductor(env.client.app) as conductor:
            async with conductor.simulate_get_stream(
                    "/.well-known/mercure", params={"topic": f"/accounts/{aid}"}, headers=auth) as sr:
                assert sr.status == "200 OK"
                assert sr.headers["content-type"].startswith("text/event-stream")
                assert await asyncio.wait_for(sr.stream.read(), 5)  # the opening comment
                await asyncio.to_thread(env.deliver, eml(f"alice@{PRIVATE}", subject="live"))
                return await _frames(sr.stream, 2)

    message, acct = asyncio.run(scenario())
    m = _data(message)
    assert set(m) == INTRO_KEYS | {"@context"}
    assert m["@type"] == "Message" and m["subject"] == "live" and m["id"] != old
    assert m["accountId"] == f"/accounts/{aid}"
    assert f"id: {m['id']}" in message
    a = _data(acct)
    assert set(a) == ACCOUNT_KEYS and a["@type"] == "Account"
    assert a["used"] == env.store.mailbox(f"alice@{PRIVATE}").bytes_used > 0


def test_hub_resumes_after_last_event_id_and_takes_token_in_query(env, quick_heartbeat):
    aid, auth = account(env)
    first, second = env.deliver(eml(f"alice@{PRIVATE}", subject="one"), eml(f"alice@{PRIVATE}", subject="two"))
    token = auth["Authorization"].split()[1]

    async def scenario():
        async with falcon.testing.ASGIConductor(env.client.app) as conductor:
            async with conductor.simulate_get_stream(
                    "/.well-known/mercure",
                    params={"topic": f"http://localhost/accounts/{aid}", "authorization": token},
                    headers={"Last-Event-ID": first}) as sr:
                return await _frames(sr.stream, 2)

    message, acct = asyncio.run(scenario())
    assert _data(message)["id"] == second and _data(acct)["@type"] == "Account"


def test_hub_bad_requests(env):
    aid, auth = account(env)
    bob_id, _ = account(env, f"bob@{PRIVATE}")
    assert_hydra_error(env.client.simulate_get("/.well-known/mercure", headers=auth), 400)
    assert_hydra_error(env.client.simulate_get("/.well-known/mercure", params={"topic": "/elsewhere"},
                                               headers=auth), 400)
    assert_hydra_error(env.client.simulate_get("/.well-known/mercure", params={"topic": f"/accounts/{bob_id}"},
                                               headers=auth), 404)
    assert_401(env.client.simulate_get("/.well-known/mercure", params={"topic": f"/accounts/{aid}"}))


# -- passwords --------------------------------------------------------------------------------

def test_password_hash_roundtrip():
    stored = mailtm.hash_password("pässwörd")
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1") and len(salt) == 32 and len(digest) == 64
    assert mailtm.verify_password("pässwörd", stored)
    assert not mailtm.verify_password("passwörd", stored)
    assert mailtm.hash_password("pässwörd") != stored  # salted
    for broken in (None, "", "scrypt$1$2", "bcrypt$16384$8$1$00$00", "scrypt$16384$8$1$zz$00",
                   "scrypt$16384$8$1$00$", "scrypt$1000$8$1$00$00", "scrypt$1048576$32$1$00$00",
                   "scrypt$x$8$1$00$00"):
        assert not mailtm.verify_password("x", broken)
