"""Temporary mailboxes through the native API, in process: falcon's TestClient
on a real SQLite file, mail put in by the real ingest pipeline (with the
configured attachment blocklist, as the ingester runs it).

Creation (defaults, choices, bounds, 409), tokens (format, stored hashed),
isolation between mailboxes on every route, 401/404 without an existence
oracle, the operator token and admin routes, lifetime (PATCH, DELETE, expiry),
rate limits and X-Forwarded-For, blocked attachments, and bad input on every
new route. No request may get a 500 (the autouse fixture of test_api.py).

``MAILBOX_BAD_REQUESTS``, ``box_env``, ``create``, ``deliver``, ``owner_setup``
and ``send_bad`` are shared with test_openapi.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sqlite3
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import falcon.testing
import pytest

from mtasidecar import tokens
from mtasidecar.api.inputs import MAX_BODY
from mtasidecar.ingest.pipeline import Pipeline, prepare
from mtasidecar.store import Mailbox, Token
from tests.unit.test_api import BASE_TIME, Env, assert_error, eml, make_env
from tests.unit.test_api import no_server_errors  # noqa: F401 (autouse: no request may get a 500)

OPERATOR = "operator-" + "k" * 30
PRIVATE = "private.test"       # the first domain: where a mailbox goes by default
LONG = "a" * 63 + "." + "b" * 63 + "." + "c" * 60 + ".test"
DOMAINS = [
    {"name": PRIVATE, "default_ttl": 3600, "max_ttl": 86400},
    {"name": "sub.test", "subdomains": True},
    {"name": "rnd.test", "subdomains": True, "random_subdomain": True},
    {"name": "open.test", "mode": "public"},
    {"name": LONG},  # 64 + 1 + 193 > 254: the longest local part makes too long an address here
]
MAX_TTL = 86400
TOKEN_RE = re.compile(r"^mts_[A-Za-z0-9_-]{32}$")
VIEW_KEYS = {"id", "address", "created_at", "expires_at", "message_count", "bytes_used", "messages_url"}


def box_env(tmp_path: Path, **extra: str) -> Env:
    """make_env with private and public domains, an operator token, and rate limits out of the way."""
    settings = {"MTASIDECAR_DOMAINS": json.dumps(DOMAINS), "MTASIDECAR_API_OPERATOR_TOKEN": OPERATOR,
                "MTASIDECAR_API_CREATE_RATE": "100000", "MTASIDECAR_API_AUTH_FAILURE_RATE": "100000", **extra}
    return make_env(tmp_path, **settings)


@pytest.fixture
def env(tmp_path):
    return box_env(tmp_path)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def create(env: Env, status: int = 201, **body) -> dict:
    r = env.request("POST", "/api/v1/mailboxes", json=body)
    assert r.status_code == status, (body, r.status_code, r.text)
    return r.json


def box_path(address: str) -> str:
    return f"/api/v1/mailboxes/{address}"


def deliver(env: Env, *raws: bytes) -> list[str]:
    """Like Env.deliver, with the configured blocklist (as `mtasidecar ingest` runs)."""
    paths = []
    for raw in raws:
        n = env.delivered
        env.delivered += 1
        path = env.maildir / "new" / f"{BASE_TIME + n}.M{n}P5151Q{n}.mx.example.test"
        path.write_bytes(raw)
        paths.append(path)
    batch = [prepare(str(p), env.settings.maildir.max_message_size, None, env.settings.blocklist()) for p in paths]
    Pipeline(env.store, env.maildir).commit(batch)
    out = []
    for b, raw in zip(batch, raws):
        (mid,) = env.store.db.execute_sql("SELECT id FROM message WHERE spool_name = ?",
                                          (b.record.spool_name,)).fetchone()
        out.append(format(mid, "024x"))
        env.files[out[-1]] = raw
    return out


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def rows(env: Env, sql: str, *args) -> list:
    return env.store.db.execute_sql(sql, args).fetchall()


def message_rows(env: Env, address: str) -> int:
    return rows(env, "SELECT COUNT(*) FROM message m JOIN mailbox b ON b.id = m.mailbox_id WHERE b.address = ?",
                address)[0][0]


# -- creation ---------------------------------------------------------------------------------

def test_create_with_defaults(env):
    before = time.time()
    r = env.request("POST", "/api/v1/mailboxes")  # no body at all: every default
    after = time.time()
    assert r.status_code == 201, r.text
    box = r.json
    assert set(box) == VIEW_KEYS | {"token"}
    local, _, host = box["address"].partition("@")
    assert host == PRIVATE  # the first configured domain
    assert re.fullmatch(r"[a-z0-9]{10,}", local), local
    assert len(box["id"]) == 24
    assert TOKEN_RE.match(box["token"]), box["token"]
    # 32 base64url characters: 192 random bits (the issue asks for at least 128).
    assert len(base64.urlsafe_b64decode(box["token"][4:] + "==")) * 8 >= 128
    assert before - 1 <= epoch(box["created_at"]) <= after
    assert before + 3600 - 1 <= epoch(box["expires_at"]) <= after + 3600
    assert (box["message_count"], box["bytes_used"]) == (0, 0)
    assert box["messages_url"] == f"/api/v1/mailboxes/{box['address']}/messages"
    # The token opens it; the view is the same without the token.
    got = env.get(box_path(box["address"]), headers=bearer(box["token"]))
    assert got.status_code == 200 and got.json == {k: v for k, v in box.items() if k != "token"}
    assert env.get(box["messages_url"], headers=bearer(box["token"])).json == {"items": [], "next_cursor": None}


def test_create_with_an_empty_json_object_too(env):
    box = create(env)
    assert box["address"].endswith("@" + PRIVATE)


def test_random_parts_and_tokens_do_not_repeat(env):
    boxes = [create(env) for _ in range(30)]
    assert len({b["address"] for b in boxes}) == 30
    assert len({b["token"] for b in boxes}) == 30
    assert len({b["id"] for b in boxes}) == 30


def test_chosen_local_part_is_lower_cased(env):
    box = create(env, local_part="Alice.Smith+Tag")
    assert box["address"] == "alice.smith+tag@private.test"
    assert box["messages_url"] == "/api/v1/mailboxes/alice.smith%2Btag@private.test/messages"
    assert env.get(box["messages_url"], headers=bearer(box["token"])).status_code == 200
    assert env.store.mailbox("alice.smith+tag@private.test") is not None


def test_local_part_edges_that_are_fine(env):
    assert create(env, local_part="a" * 64)["address"] == "a" * 64 + "@private.test"
    assert create(env, local_part="x")["address"] == "x@private.test"
    assert create(env, local_part="o'neil-2_x")["address"] == "o'neil-2_x@private.test"


def test_domain_is_chosen_case_insensitively(env):
    box = create(env, domain="OPEN.test", local_part="hello")
    assert box["address"] == "hello@open.test"


def test_subdomain_label(env):
    box = create(env, domain="sub.test", subdomain="Team-1", local_part="me")
    assert box["address"] == "me@team-1.sub.test"
    (mid,) = deliver(env, eml("me@team-1.sub.test", subject="to a subdomain"))
    items = env.get(box["messages_url"], headers=bearer(box["token"])).json["items"]
    assert [m["id"] for m in items] == [mid]
    # The parent domain's address is another mailbox.
    create(env, domain="sub.test", local_part="me")


def test_random_subdomain(env):
    labels = set()
    for _ in range(5):
        box = create(env, domain="sub.test", subdomain="random")
        local, _, host = box["address"].partition("@")
        label, _, parent = host.partition(".")
        assert parent == "sub.test" and label != "random"
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", label) and len(label) <= 63, label
        labels.add(label)
    assert len(labels) == 5


def test_domain_with_random_subdomains_by_default(env):
    box = create(env, domain="rnd.test")
    host = box["address"].partition("@")[2]
    assert host.endswith(".rnd.test") and host.count(".") == 2
    assert create(env, domain="rnd.test", subdomain="mine", local_part="a")["address"] == "a@mine.rnd.test"


@pytest.mark.parametrize("ttl", [60, 61, 7200, MAX_TTL])
def test_ttl_within_bounds(env, ttl):
    before = time.time()
    box = create(env, ttl=ttl)
    assert before + ttl - 1 <= epoch(box["expires_at"]) <= time.time() + ttl


def test_taken_address_is_409(env):
    create(env, local_part="dup")
    for local in ("dup", "DUP", "Dup"):
        r = env.request("POST", "/api/v1/mailboxes", json={"local_part": local})
        assert_error(r, 409, "address_taken")
    # A mailbox made by mail on a public domain is taken too.
    deliver(env, eml("early@open.test"))
    assert_error(env.request("POST", "/api/v1/mailboxes", json={"domain": "open.test", "local_part": "early"}),
                 409, "address_taken")


def test_expired_but_unswept_address_can_be_created_again(env):
    old = create(env, local_part="again")
    deliver(env, eml("again@private.test", subject="for the first owner"),
            eml("again@private.test", subject="for the first owner too"))
    assert message_rows(env, "again@private.test") == 2
    env.store.set_expiry(env.store.mailbox("again@private.test").id, time.time() - 1)
    # Expired: the old token no longer opens it, and nobody learns more.
    assert_error(env.get(box_path("again@private.test"), headers=bearer(old["token"])), 404, "mailbox_not_found")

    new = create(env, local_part="again")
    assert new["token"] != old["token"]
    assert env.get(new["messages_url"], headers=bearer(new["token"])).json["items"] == []
    assert message_rows(env, "again@private.test") == 0  # the first owner's mail went with the old mailbox
    assert_error(env.get(new["messages_url"], headers=bearer(old["token"])), 404, "mailbox_not_found")


def test_tokens_are_stored_hashed(env):
    box = create(env, local_part="secret")
    mailbox = env.store.mailbox("secret@private.test")
    stored = [h for (h,) in Token.select(Token.token_hash).where(Token.mailbox == mailbox.id).tuples()]
    assert stored == [hashlib.sha256(box["token"].encode()).hexdigest()]
    row = rows(env, "SELECT * FROM mailbox WHERE id = ?", mailbox.id)[0]
    assert box["token"] not in json.dumps(row, default=str)
    # Nowhere in the database files either.
    env.store.close()
    db = Path(env.settings.database_url.split("://", 1)[1][1:])
    for path in db.parent.glob(db.name + "*"):
        data = path.read_bytes()
        assert box["token"].encode() not in data and box["token"][4:].encode() not in data, path


def test_tokens_module():
    token = tokens.new_token()
    assert TOKEN_RE.match(token) and tokens.well_formed(token)
    assert tokens.matches(token, tokens.token_hash(token))
    assert not tokens.matches(token, tokens.token_hash(tokens.new_token()))
    assert not tokens.matches(token, None) and not tokens.matches(token, "")
    for bad in ("", "mts_", token + "x", token[:-1], "MTS_" + token[4:], token.replace("mts_", "mts-"),
                token[:-1] + "=", token[:-1] + "\n"):
        assert not tokens.well_formed(bad), bad


# -- isolation ----------------------------------------------------------------------------------

@pytest.fixture
def two(env):
    """Mailboxes A and B on a private domain, one message (with an attachment) each."""
    a = create(env, local_part="alice")
    b = create(env, local_part="bob")
    (amid,) = deliver(env, eml(a["address"], subject="for alice", attachments=(("a.txt", "text/plain", b"A"),)))
    (bmid,) = deliver(env, eml(b["address"], subject="for bob", attachments=(("b.txt", "text/plain", b"B"),)))
    return SimpleNamespace(env=env, a=a, b=b, amid=amid, bmid=bmid)


def mailbox_routes(address: str, mid: str) -> list[tuple[str, str, dict]]:
    """Every route of one mailbox: (method, path, request kwargs)."""
    mb = box_path(address)
    msg = f"{mb}/messages/{mid}"
    return [
        ("GET", f"{mb}/messages", {}),
        ("GET", f"{mb}/events", {}),
        ("GET", msg, {}),
        ("PATCH", msg, {"json": {"seen": True}}),
        ("GET", f"{msg}/raw", {}),
        ("GET", f"{msg}/attachments/0", {}),
        ("DELETE", msg, {}),
        ("GET", mb, {}),
        ("PATCH", mb, {"json": {"ttl": 7200}}),
        ("DELETE", mb, {}),
    ]


def assert_intact(t) -> None:
    """B's mailbox, message and attachment are exactly as they were."""
    env, b = t.env, t.b
    r = env.get(box_path(b["address"]), headers=bearer(b["token"]))
    assert r.status_code == 200
    assert r.json["expires_at"] == b["expires_at"] and r.json["message_count"] == 1
    items = env.get(b["messages_url"], headers=bearer(b["token"])).json["items"]
    assert [(m["id"], m["seen"]) for m in items] == [(t.bmid, False)]
    att = env.get(f"{box_path(b['address'])}/messages/{t.bmid}/attachments/0", headers=bearer(b["token"]))
    assert att.status_code == 200 and att.content == b"B"


def test_a_token_opens_nothing_of_another_mailbox(two):
    env, a, b = two.env, two.a, two.b
    for method, path, kw in mailbox_routes(b["address"], two.bmid):
        r = env.request(method, path, headers=bearer(a["token"]), **kw)
        assert_error(r, 404, "mailbox_not_found")
    # Nor B's message through A's own mailbox.
    for method, path, kw in mailbox_routes(a["address"], two.bmid)[2:7]:
        r = env.request(method, path, headers=bearer(a["token"]), **kw)
        assert_error(r, 404, "message_not_found")
    # A's list shows A's mail only.
    assert [m["id"] for m in env.get(a["messages_url"], headers=bearer(a["token"])).json["items"]] == [two.amid]
    assert_intact(two)


def test_the_404_for_a_wrong_token_is_the_404_for_no_mailbox(two):
    """Nobody learns which addresses exist: a wrong token gets what a missing mailbox gets."""
    env, a = two.env, two.a
    taken = env.get(box_path(two.b["address"]) + "/messages", headers=bearer(a["token"]))
    free = env.get(box_path("nobody@private.test") + "/messages", headers=bearer(a["token"]))
    assert (taken.status_code, taken.json["error"]) == (free.status_code, free.json["error"]) == \
        (404, "mailbox_not_found")


def test_no_token_is_401_on_every_route(two):
    env = two.env
    for address, mid in ((two.b["address"], two.bmid), (two.a["address"], two.amid),
                         ("nobody@private.test", two.bmid)):  # the same for an address nobody has
        for method, path, kw in mailbox_routes(address, mid):
            r = env.request(method, path, **kw)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
    assert_intact(two)


MALFORMED_AUTH = {
    "short token": "Bearer abc",
    "prefix only": "Bearer mts_",
    "one character short": "Bearer mts_" + "a" * 31,
    "one character long": "Bearer mts_" + "a" * 33,
    "bad character": "Bearer mts_" + "a" * 31 + "!",
    "other scheme": "Basic YWxpY2U6cGFzcw==",
    "scheme only": "Bearer",
    "empty": "",
    "token without scheme": "mts_" + "a" * 32,
}


@pytest.mark.parametrize("header", list(MALFORMED_AUTH.values()), ids=list(MALFORMED_AUTH))
def test_malformed_token_is_401(two, header):
    env = two.env
    for method, path, kw in mailbox_routes(two.b["address"], two.bmid):
        r = env.request(method, path, headers={"Authorization": header}, **kw)
        assert_error(r, 401, "malformed_token")
        assert "www-authenticate" in r.headers
    assert_intact(two)


def test_operator_token_opens_every_mailbox(two):
    env, b = two.env, two.b
    op = bearer(OPERATOR)
    mb = box_path(b["address"])
    msg = f"{mb}/messages/{two.bmid}"
    assert env.get(f"{mb}/messages", headers=op).json["items"][0]["id"] == two.bmid
    assert env.get(msg, headers=op).json["subject"] == "for bob"
    assert env.get(f"{msg}/raw", headers=op).content == env.files[two.bmid]
    assert env.get(f"{msg}/attachments/0", headers=op).content == b"B"
    assert env.request("PATCH", msg, json={"seen": True}, headers=op).json == {"id": two.bmid, "seen": True}
    assert env.get(mb, headers=op).json["address"] == b["address"]
    assert env.request("PATCH", mb, json={"ttl": 600}, headers=op).status_code == 200
    assert env.request("DELETE", msg, headers=op).status_code == 204
    assert env.request("DELETE", mb, headers=op).status_code == 204
    assert_error(env.get(mb, headers=op), 404, "mailbox_not_found")
    # The operator reads unrouted and mail-made mailboxes too.
    deliver(env, eml(with_trace=False, subject="by hand"))
    assert env.get("/api/v1/mailboxes/unrouted@mtasidecar.invalid/messages", headers=op).status_code == 200


def test_admin_routes(two):
    env = two.env
    deliver(env, eml("walkin@open.test"), eml("walkin@open.test", subject="two"))
    op = bearer(OPERATOR)
    r = env.get("/api/v1/admin/mailboxes", headers=op)
    assert r.status_code == 200
    items = {m["address"]: m for m in r.json["items"]}
    assert set(items) == {two.a["address"], two.b["address"], "walkin@open.test"}
    assert r.json["next_cursor"] is None
    assert set(items["walkin@open.test"]) == {"id", "address", "created_at", "expires_at", "message_count",
                                              "bytes_used", "has_token"}
    walkin = env.store.mailbox("walkin@open.test")
    assert (items["walkin@open.test"]["message_count"], items["walkin@open.test"]["bytes_used"]) == \
        (2, walkin.bytes_used) and walkin.bytes_used > 0
    assert items["walkin@open.test"]["has_token"] is False and items["walkin@open.test"]["expires_at"] is None
    assert items[two.a["address"]]["has_token"] is True and items[two.a["address"]]["message_count"] == 1
    # Newest first.
    assert [m["address"] for m in r.json["items"]] == ["walkin@open.test", two.b["address"], two.a["address"]]
    # Pages.
    seen, cursor = [], None
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        r = env.get("/api/v1/admin/mailboxes", headers=op, params=params)
        seen += [m["address"] for m in r.json["items"]]
        cursor = r.json["next_cursor"]
        if cursor is None:
            break
    assert seen == ["walkin@open.test", two.b["address"], two.a["address"]]

    stats = env.get("/api/v1/admin/stats", headers=op)
    assert stats.status_code == 200
    total = rows(env, "SELECT COUNT(*), SUM(size) FROM message")[0]
    assert stats.json == {"mailboxes": 3, "messages": total[0], "bytes": total[1], "domains": len(DOMAINS)}


@pytest.mark.parametrize("path", ["/api/v1/admin/mailboxes", "/api/v1/admin/stats"])
def test_admin_routes_need_the_operator_token(two, path):
    env = two.env
    r = env.get(path)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_error(env.get(path, headers=bearer("operator-" + "x" * 30)), 401, "bad_token")
    assert_error(env.get(path, headers=bearer(two.a["token"])), 401, "bad_token")  # a mailbox token is not it
    assert_error(env.get(path, headers={"Authorization": "Basic b3A6b3A="}), 401, "malformed_token")


def test_admin_routes_are_off_without_an_operator_token(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_OPERATOR_TOKEN="")
    for path in ("/api/v1/admin/mailboxes", "/api/v1/admin/stats"):
        assert_error(env.get(path), 401)
        assert_error(env.get(path, headers=bearer(OPERATOR)), 401, "bad_token")


def test_public_domain_is_readable_without_a_token(env):
    (mid,) = deliver(env, eml("anyone@open.test", attachments=(("x.txt", "text/plain", b"x"),)))
    mb = box_path("anyone@open.test")
    assert env.get(f"{mb}/messages").json["items"][0]["id"] == mid
    assert env.get(f"{mb}/messages/{mid}").status_code == 200
    assert env.get(f"{mb}/messages/{mid}/raw").status_code == 200
    assert env.get(f"{mb}/messages/{mid}/attachments/0").content == b"x"
    assert env.get(mb).json["expires_at"] is None  # made by mail: lives until retention sweeps it
    # One made through the API on a public domain: readable without its token too.
    box = create(env, domain="open.test", local_part="made")
    (mid,) = deliver(env, eml("made@open.test"))
    assert env.get(box["messages_url"]).json["items"][0]["id"] == mid
    # A token for another mailbox does not hurt on a public one.
    assert env.get(box["messages_url"], headers=bearer(tokens.new_token())).status_code == 200
    # Unknown public addresses: 404, with or without a token.
    assert_error(env.get(box_path("nobody@open.test") + "/messages"), 404, "mailbox_not_found")


# -- lifetime -------------------------------------------------------------------------------------

def test_patch_ttl_extends_within_bounds(env):
    box = create(env, local_part="longer", ttl=120)
    mb, auth = box_path(box["address"]), bearer(box["token"])
    before = time.time()
    r = env.request("PATCH", mb, json={"ttl": 7200}, headers=auth)
    assert r.status_code == 200
    assert set(r.json) == VIEW_KEYS
    assert before + 7200 - 1 <= epoch(r.json["expires_at"]) <= time.time() + 7200
    assert env.get(mb, headers=auth).json["expires_at"] == r.json["expires_at"]
    r = env.request("PATCH", mb, json={"ttl": MAX_TTL}, headers=auth)
    assert r.status_code == 200
    # Over the domain's maximum: refused, the expiry stays.
    kept = r.json["expires_at"]
    assert_error(env.request("PATCH", mb, json={"ttl": MAX_TTL + 1}, headers=auth), 422, "ttl_out_of_range")
    assert env.get(mb, headers=auth).json["expires_at"] == kept


def test_patch_of_an_expired_mailbox_is_404(env):
    box = create(env, local_part="late")
    env.store.set_expiry(env.store.mailbox(box["address"]).id, time.time() - 1)
    assert_error(env.request("PATCH", box_path(box["address"]), json={"ttl": 600}, headers=bearer(box["token"])),
                 404, "mailbox_not_found")


def test_delete_removes_the_mailbox_and_its_mail(env):
    box = create(env, local_part="bye")
    keep = create(env, local_part="stay")
    deliver(env, eml("bye@private.test", attachments=(("a.txt", "text/plain", b"a"),)), eml("bye@private.test"))
    (kept,) = deliver(env, eml("stay@private.test"))
    counts = {t: rows(env, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("message", "message_body", "attachment")}
    mb, auth = box_path(box["address"]), bearer(box["token"])
    r = env.request("DELETE", mb, headers=auth)
    assert r.status_code == 204 and r.content == b""
    for method, path, kw in mailbox_routes(box["address"], kept):
        assert_error(env.request(method, path, headers=auth, **kw), 404, "mailbox_not_found")
    assert env.store.mailbox("bye@private.test") is None
    assert {t: rows(env, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("message", "message_body", "attachment")} == \
        {"message": counts["message"] - 2, "message_body": counts["message_body"] - 2,
         "attachment": counts["attachment"] - 1}
    assert Token.select().where(Token.mailbox.not_in(Mailbox.select(Mailbox.id))).count() == 0
    # The other mailbox is untouched; the address is free again.
    assert [m["id"] for m in env.get(keep["messages_url"], headers=bearer(keep["token"])).json["items"]] == [kept]
    again = create(env, local_part="bye")
    assert env.get(again["messages_url"], headers=bearer(again["token"])).json["items"] == []


def test_patch_when_the_domain_is_no_longer_configured(tmp_path):
    env = box_env(tmp_path)
    box = create(env, domain="sub.test", local_part="orphan")
    later = box_env(tmp_path, MTASIDECAR_DOMAINS=json.dumps([d for d in DOMAINS if d["name"] != "sub.test"]))
    auth = bearer(box["token"])
    # Still readable with its token, but its lifetime can no longer be set.
    assert later.get(box_path(box["address"]), headers=auth).status_code == 200
    assert_error(later.request("PATCH", box_path(box["address"]), json={"ttl": 600}, headers=auth),
                 422, "unknown_domain")
    assert later.request("DELETE", box_path(box["address"]), headers=auth).status_code == 204


def test_create_without_any_domain(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_DOMAINS="[]")
    assert_error(env.request("POST", "/api/v1/mailboxes", json={}), 422, "unknown_domain")


# -- rate limits ------------------------------------------------------------------------------------

def test_limiter_forgets_only_full_buckets(monkeypatch):
    from mtasidecar.api import ratelimit
    now = [0.0]
    limiter = ratelimit.Limiter(1.0, clock=lambda: now[0])  # burst 2
    monkeypatch.setattr(ratelimit, "MAX_KEYS", 3)
    assert limiter.allow("a") == 0 and limiter.allow("a") == 0 and limiter.allow("a") > 0  # a: empty
    limiter.allow("b")
    limiter.allow("c")
    now[0] = 1.5  # b and c have refilled; a has not
    limiter.allow("d")  # the table is full: full buckets go, a's stays
    assert set(limiter._buckets) == {"a", "d"}
    assert limiter._level("a", now[0]) == pytest.approx(1.5)  # a's spending is remembered

def test_creation_rate_limit(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_CREATE_RATE="1")
    create(env)
    create(env)
    r = env.request("POST", "/api/v1/mailboxes", json={})
    assert_error(r, 429, "rate_limited")
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 2
    # Bad input counts too: the limit comes first.
    assert_error(env.request("POST", "/api/v1/mailboxes", json={"ttl": 0}), 429, "rate_limited")
    # Reads are not limited.
    assert env.get("/api/v1/domains").status_code == 200
    time.sleep(retry + 0.1)
    create(env)


def test_failed_authentication_limit(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_AUTH_FAILURE_RATE="1")
    box = create(env, local_part="target")
    mb = box_path(box["address"]) + "/messages"
    # No token at all is no failed attempt: a client may ask first and get 401, many times.
    for _ in range(5):
        assert_error(env.get(mb), 401, "unauthorized")
    assert env.get(mb, headers=bearer(box["token"])).status_code == 200
    # Wrong tokens are: two are allowed (burst), then 429 for everything from this address...
    for _ in range(2):
        assert_error(env.get(mb, headers=bearer(tokens.new_token())), 404, "mailbox_not_found")
    r = env.get(mb, headers=bearer(tokens.new_token()))
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1
    assert_error(env.get(mb, headers=bearer(box["token"])), 429, "rate_limited")
    assert_error(env.get("/api/v1/admin/stats", headers=bearer(OPERATOR)), 429, "rate_limited")
    # ...but not for another client.
    assert env.request("GET", mb, headers=bearer(box["token"]), remote_addr="192.0.2.7").status_code == 200
    time.sleep(1.1)
    assert env.get(mb, headers=bearer(box["token"])).status_code == 200


def test_wrong_operator_tokens_count_as_failures(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_AUTH_FAILURE_RATE="1")
    for _ in range(2):
        assert_error(env.get("/api/v1/admin/stats", headers=bearer("nope-" + "x" * 30)), 401, "bad_token")
    assert_error(env.get("/api/v1/admin/stats", headers=bearer(OPERATOR)), 429, "rate_limited")


def test_the_test_clients_address_is_loopback():
    """The premise of the X-Forwarded-For tests: falcon's TestClient is 127.0.0.1."""
    assert falcon.testing.create_asgi_req().remote_addr == "127.0.0.1"


def creations(env: Env, n: int, **kw) -> list[int]:
    return [env.request("POST", "/api/v1/mailboxes", json={}, **kw).status_code for _ in range(n)]


def test_forwarded_for_is_believed_from_a_trusted_proxy(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_CREATE_RATE="1", MTASIDECAR_API_TRUSTED_PROXIES="127.0.0.1")
    client = {"X-Forwarded-For": "198.51.100.1"}
    assert creations(env, 3, headers=client) == [201, 201, 429]
    # Another client behind the same proxy has its own allowance.
    assert creations(env, 2, headers={"X-Forwarded-For": "198.51.100.2"}) == [201, 201]
    # The rightmost address our proxies did not add is the client: the left part is the client's to forge.
    assert creations(env, 1, headers={"X-Forwarded-For": "203.0.113.5, 198.51.100.1"}) == [429]
    assert creations(env, 2, headers={"X-Forwarded-For": "198.51.100.1, 198.51.100.3, 127.0.0.1"}) == [201, 201]
    # Without the header, the proxy itself is the client.
    assert creations(env, 3) == [201, 201, 429]


def test_forwarded_for_is_ignored_from_anyone_else(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_CREATE_RATE="1")  # no trusted proxies
    statuses = [env.request("POST", "/api/v1/mailboxes", json={},
                            headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(3)]
    assert statuses == [201, 201, 429]
    env = box_env(tmp_path / "2", MTASIDECAR_API_CREATE_RATE="1", MTASIDECAR_API_TRUSTED_PROXIES="10.0.0.1")
    statuses = [env.request("POST", "/api/v1/mailboxes", json={}, remote_addr="192.0.2.50",
                            headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(3)]
    assert statuses == [201, 201, 429]
    # A peer that is a trusted proxy is believed.
    assert env.request("POST", "/api/v1/mailboxes", json={}, remote_addr="10.0.0.1",
                       headers={"X-Forwarded-For": "198.51.100.9"}).status_code == 201


def test_failed_auth_limit_follows_the_forwarded_client(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_AUTH_FAILURE_RATE="1", MTASIDECAR_API_TRUSTED_PROXIES="127.0.0.1")
    box = create(env, local_part="t")
    mb = box_path(box["address"])
    bad = {"X-Forwarded-For": "198.51.100.66", **bearer(tokens.new_token())}
    assert [env.get(mb, headers=bad).status_code for _ in range(3)] == [404, 404, 429]
    good = {"X-Forwarded-For": "198.51.100.67", **bearer(box["token"])}
    assert env.get(mb, headers=good).status_code == 200


# -- dangerous attachments --------------------------------------------------------------------------

def zip_of(*names: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            z.writestr(name, b"content of " + name.encode())
    return buf.getvalue()


def test_blocked_attachments_are_listed_and_refused(env):
    box = create(env, local_part="files")
    pdf = b"%PDF-1.4 harmless"
    harmless_zip = zip_of("notes.txt", "photos/cat.jpg")
    (mid,) = deliver(env, eml(box["address"], attachments=(
        ("report.pdf", "application/pdf", pdf),
        ("setup.exe", "application/octet-stream", b"MZ\x90\x00 exe"),
        ("bundle.zip", "application/zip", zip_of("readme.txt", "bin/run.exe")),
        ("tool.dat", "application/x-msdownload", b"MZ\x90\x00 dll"),
        ("invoice.pdf.exe", "application/pdf", b"MZ\x90\x00 double"),
        ("notes.zip", "application/zip", harmless_zip),
        ("SCRIPT.JS", "text/plain", b"alert(1)"),
    )))
    auth = bearer(box["token"])
    msg = f"{box_path(box['address'])}/messages/{mid}"
    detail = env.get(msg, headers=auth).json
    blocked = {a["filename"]: a["blocked"] for a in detail["attachments"]}
    assert blocked["report.pdf"] is None and blocked["notes.zip"] is None
    for name in ("setup.exe", "bundle.zip", "tool.dat", "invoice.pdf.exe", "SCRIPT.JS"):
        assert isinstance(blocked[name], str) and blocked[name], (name, blocked)
    assert ".exe" in blocked["setup.exe"] and "run.exe" in blocked["bundle.zip"]
    assert "application/x-msdownload" in blocked["tool.dat"]
    for a in detail["attachments"]:
        r = env.get(a["url"], headers=auth)
        if a["blocked"]:
            body = assert_error(r, 403, "attachment_blocked")
            assert a["blocked"] in body["message"]
        else:
            assert r.status_code == 200, (a["filename"], r.text)
    assert env.get(f"{msg}/attachments/0", headers=auth).content == pdf
    assert env.get(f"{msg}/attachments/5", headers=auth).content == harmless_zip
    # The operator does not get them either; the raw message keeps them whole.
    assert_error(env.get(f"{msg}/attachments/1", headers=bearer(OPERATOR)), 403, "attachment_blocked")
    assert env.get(f"{msg}/raw", headers=auth).content == env.files[mid]


def test_attachments_that_only_look_like_archives_are_served(env):
    (mid,) = deliver(env, eml("z@open.test", attachments=(("broken.zip", "application/zip", b"PK\x03\x04 not a zip"),
                                                           ("README", "application/octet-stream", b"plain"),
                                                           ("trailing.exe. ", "text/plain", b"MZ"))))
    atts = env.get(f"/api/v1/mailboxes/z@open.test/messages/{mid}").json["attachments"]
    assert [a["blocked"] is None for a in atts] == [True, True, False]  # Windows ignores trailing dots
    assert env.get(atts[0]["url"]).content == b"PK\x03\x04 not a zip"


def test_blocklist_is_configurable(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_MAILBOXES_BLOCKED_EXTENSIONS="pdf", MTASIDECAR_MAILBOXES_BLOCKED_TYPES="")
    (mid,) = deliver(env, eml("x@open.test", attachments=(("a.pdf", "application/pdf", b"%PDF"),
                                                           ("b.exe", "application/x-msdownload", b"MZ"))))
    atts = env.get(f"/api/v1/mailboxes/x@open.test/messages/{mid}").json["attachments"]
    assert [bool(a["blocked"]) for a in atts] == [True, False]


# -- bad input on every new route ---------------------------------------------------------------------

@dataclass(frozen=True)
class MBad:
    method: str
    path: str              # {box}: the owner's mailbox path, /api/v1/mailboxes/<address>
    status: int
    code: str
    body: object = None    # bytes as they are; anything else as JSON; None: no body
    headers: dict | None = None
    auth: str | None = None  # "owner": the owner's token; "operator"; None: no Authorization; else the header


POST = "/api/v1/mailboxes"
JSON = {"Content-Type": "application/json"}


def _post(body, status, code, headers=None) -> MBad:
    return MBad("POST", POST, status, code, body, headers)


def _patch(body, status, code, headers=None) -> MBad:
    return MBad("PATCH", "{box}", status, code, body, headers, auth="owner")


MAILBOX_BAD_REQUESTS = {
    # POST /api/v1/mailboxes: local parts
    "local part a..b": _post({"local_part": "a..b"}, 422, "invalid_local_part"),
    "local part .a": _post({"local_part": ".a"}, 422, "invalid_local_part"),
    "local part a.": _post({"local_part": "a."}, 422, "invalid_local_part"),
    "local part 65 characters": _post({"local_part": "a" * 65}, 422, "invalid_local_part"),
    "local part with a space": _post({"local_part": "a b"}, 422, "invalid_local_part"),
    "local part empty": _post({"local_part": ""}, 422, "invalid_local_part"),
    "local part a number": _post({"local_part": 5}, 422, "invalid_local_part"),
    "local part a list": _post({"local_part": ["a"]}, 422, "invalid_local_part"),
    "local part with @": _post({"local_part": "a@b"}, 422, "invalid_local_part"),
    "local part quoted": _post({"local_part": '"a b"'}, 422, "invalid_local_part"),
    "local part non-ascii": _post({"local_part": "jürgen"}, 422, "invalid_local_part"),
    "local part with a newline": _post({"local_part": "a\nb"}, 422, "invalid_local_part"),
    "local part postmaster": _post({"local_part": "postmaster"}, 422, "reserved_local_part"),
    "local part Abuse": _post({"local_part": "Abuse"}, 422, "reserved_local_part"),
    "local part noreply": _post({"local_part": "noreply"}, 422, "reserved_local_part"),
    # domains and subdomains
    "unknown domain": _post({"domain": "nope.test"}, 422, "unknown_domain"),
    "domain a number": _post({"domain": 7}, 422, "unknown_domain"),
    "domain empty": _post({"domain": ""}, 422, "unknown_domain"),
    "domain given as a subdomain": _post({"domain": "x.sub.test"}, 422, "unknown_domain"),
    "subdomain where none are taken": _post({"domain": PRIVATE, "subdomain": "team"}, 422, "subdomains_not_allowed"),
    "random subdomain where none are taken": _post({"subdomain": "random"}, 422, "subdomains_not_allowed"),
    "subdomain leading hyphen": _post({"domain": "sub.test", "subdomain": "-x"}, 422, "invalid_subdomain"),
    "subdomain trailing hyphen": _post({"domain": "sub.test", "subdomain": "x-"}, 422, "invalid_subdomain"),
    "subdomain underscore": _post({"domain": "sub.test", "subdomain": "a_b"}, 422, "invalid_subdomain"),
    "subdomain two labels": _post({"domain": "sub.test", "subdomain": "a.b"}, 422, "invalid_subdomain"),
    "subdomain 64 characters": _post({"domain": "sub.test", "subdomain": "a" * 64}, 422, "invalid_subdomain"),
    "subdomain empty": _post({"domain": "sub.test", "subdomain": ""}, 422, "invalid_subdomain"),
    "subdomain a number": _post({"domain": "sub.test", "subdomain": 5}, 422, "invalid_subdomain"),
    # ttl
    "ttl 0": _post({"ttl": 0}, 422, "ttl_out_of_range"),
    "ttl 59": _post({"ttl": 59}, 422, "ttl_out_of_range"),
    "ttl negative": _post({"ttl": -60}, 422, "ttl_out_of_range"),
    "ttl over the maximum": _post({"ttl": MAX_TTL + 1}, 422, "ttl_out_of_range"),
    "ttl huge": _post({"ttl": 10 ** 30}, 422, "ttl_out_of_range"),
    "ttl a string": _post({"ttl": "60"}, 422, "ttl_out_of_range"),
    "ttl true": _post({"ttl": True}, 422, "ttl_out_of_range"),
    "ttl a fraction": _post({"ttl": 60.5}, 422, "ttl_out_of_range"),
    "ttl null": _post({"ttl": None}, 422, "ttl_out_of_range"),
    # the body itself
    "address too long": _post({"domain": LONG, "local_part": "x" * 64}, 422, "address_too_long"),
    "unknown field": _post({"local_part": "ok", "password": "x"}, 422, "unknown_field"),
    "not JSON": _post(b'{"ttl": ', 400, "malformed_json", JSON),
    "not UTF-8": _post(b"\xff\xfe{", 400, "malformed_json", JSON),
    "JSON array": _post([{"ttl": 60}], 422, "invalid_body"),
    "JSON string": _post("ttl", 422, "invalid_body"),
    "empty body with a JSON type": _post(b"", 422, "invalid_body", JSON),
    "text/plain": _post(b'{"ttl": 60}', 415, "unsupported_media_type", {"Content-Type": "text/plain"}),
    "form": _post(b"ttl=60", 415, "unsupported_media_type", {"Content-Type": "application/x-www-form-urlencoded"}),
    "body without a type": _post(b'{"ttl": 60}', 415, "unsupported_media_type", {}),
    "huge body": _post(b'{"local_part": "' + b"x" * MAX_BODY + b'"}', 413, "body_too_large", JSON),
    "deeply nested": _post(b"[" * 50_000, 400, "malformed_json", JSON),
    # PATCH /api/v1/mailboxes/{address}
    "patch ttl 0": _patch({"ttl": 0}, 422, "ttl_out_of_range"),
    "patch ttl over the maximum": _patch({"ttl": MAX_TTL + 1}, 422, "ttl_out_of_range"),
    "patch ttl a string": _patch({"ttl": "3600"}, 422, "ttl_out_of_range"),
    "patch ttl false": _patch({"ttl": False}, 422, "ttl_out_of_range"),
    "patch empty object": _patch({}, 422, "invalid_body"),
    "patch another field": _patch({"expires_at": "2030-01-01T00:00:00Z"}, 422, "invalid_body"),
    "patch ttl and more": _patch({"ttl": 600, "address": "x@private.test"}, 422, "invalid_body"),
    "patch not JSON": _patch(b"{", 400, "malformed_json", JSON),
    "patch text/plain": _patch(b'{"ttl": 600}', 415, "unsupported_media_type", {"Content-Type": "text/plain"}),
    "patch no body": _patch(None, 415, "unsupported_media_type"),
    "patch huge body": _patch(b'{"ttl": 600, "x": "' + b"x" * MAX_BODY + b'"}', 413, "body_too_large", JSON),
    # addresses and tokens on the mailbox routes
    "get malformed address": MBad("GET", "/api/v1/mailboxes/not-an-address", 400, "malformed_address", auth="owner"),
    "patch malformed address": MBad("PATCH", "/api/v1/mailboxes/a@b@c.test", 400, "malformed_address",
                                    {"ttl": 600}, auth="owner"),
    "delete malformed address": MBad("DELETE", "/api/v1/mailboxes/a%20b@private.test", 400, "malformed_address",
                                     auth="owner"),
    "get malformed token": MBad("GET", "{box}", 401, "malformed_token", auth="Bearer abc"),
    "patch malformed token": MBad("PATCH", "{box}", 401, "malformed_token", {"ttl": 600}, auth="Token x"),
    "delete malformed token": MBad("DELETE", "{box}", 401, "malformed_token", auth="Bearer mts_short"),
    "get no token": MBad("GET", "{box}", 401, "unauthorized"),
    "patch no token": MBad("PATCH", "{box}", 401, "unauthorized", {"ttl": 600}),
    "delete no token": MBad("DELETE", "{box}", 401, "unauthorized"),
    "get another token": MBad("GET", "{box}", 404, "mailbox_not_found", auth="Bearer mts_" + "A" * 32),
    "get unknown mailbox": MBad("GET", "/api/v1/mailboxes/nobody@private.test", 404, "mailbox_not_found",
                                auth="operator"),
    "messages malformed token": MBad("GET", "{box}/messages", 401, "malformed_token", auth="Bearer x"),
    "messages no token": MBad("GET", "{box}/messages", 401, "unauthorized"),
    "events no token": MBad("GET", "{box}/events", 401, "unauthorized"),
    "attachment no token": MBad("GET", "{box}/messages/000000000000000000000001/attachments/0", 401,
                                "unauthorized"),
    # admin routes
    "admin list no token": MBad("GET", "/api/v1/admin/mailboxes", 401, "unauthorized"),
    "admin list wrong token": MBad("GET", "/api/v1/admin/mailboxes", 401, "bad_token", auth="Bearer " + "w" * 40),
    "admin list malformed": MBad("GET", "/api/v1/admin/mailboxes", 401, "malformed_token", auth="Basic eDp5"),
    "admin list limit 0": MBad("GET", "/api/v1/admin/mailboxes?limit=0", 400, "bad_limit", auth="operator"),
    "admin list limit junk": MBad("GET", "/api/v1/admin/mailboxes?limit=abc", 400, "bad_limit", auth="operator"),
    "admin list bad cursor": MBad("GET", "/api/v1/admin/mailboxes?cursor=!!!", 400, "bad_cursor", auth="operator"),
    "admin stats no token": MBad("GET", "/api/v1/admin/stats", 401, "unauthorized"),
    "admin stats wrong token": MBad("GET", "/api/v1/admin/stats", 401, "bad_token", auth="Bearer " + "w" * 40),
    # methods
    "put mailboxes": MBad("PUT", POST, 405, "method_not_allowed", {}),
    "get mailboxes": MBad("GET", POST, 405, "method_not_allowed"),
    "post mailbox": MBad("POST", "{box}", 405, "method_not_allowed", {}, auth="owner"),
    "post admin stats": MBad("POST", "/api/v1/admin/stats", 405, "method_not_allowed", {}, auth="operator"),
}


def owner_setup(env: Env) -> dict:
    """The mailbox the bad requests aim at: private, with one message."""
    box = create(env, local_part="owner")
    deliver(env, eml(box["address"], attachments=(("a.txt", "text/plain", b"a"),)))
    return box


def send_bad(env: Env, owner: dict, bad: MBad):
    path = bad.path.replace("{box}", box_path(owner["address"]))
    path, _, query = path.partition("?")
    headers = dict(bad.headers if bad.headers is not None else ({} if bad.body is None else JSON))
    if bad.auth == "owner":
        headers.update(bearer(owner["token"]))
    elif bad.auth == "operator":
        headers.update(bearer(OPERATOR))
    elif bad.auth is not None:
        headers["Authorization"] = bad.auth
    body = bad.body if isinstance(bad.body, bytes) or bad.body is None else json.dumps(bad.body).encode()
    return env.request(bad.method, path, body=body, headers=headers, query_string=query or None)


@pytest.mark.parametrize("name", list(MAILBOX_BAD_REQUESTS))
def test_bad_input_answers_json_error(env, name):
    bad = MAILBOX_BAD_REQUESTS[name]
    owner = owner_setup(env)
    before = env.store.mailbox(owner["address"])
    count = rows(env, "SELECT COUNT(*) FROM mailbox")[0][0]
    r = send_bad(env, owner, bad)
    assert_error(r, bad.status, bad.code)
    if bad.status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    # Nothing bad input does changes anything.
    assert rows(env, "SELECT COUNT(*) FROM mailbox")[0][0] == count
    after = env.store.mailbox(owner["address"])
    assert (after.expires_at, after.message_count) == (before.expires_at, before.message_count)


# -- bugs --------------------------------------------------------------------------------------------

def test_a_created_mailbox_is_always_reachable(env):
    r = env.request("POST", "/api/v1/mailboxes", json={"local_part": "a/b"})
    if r.status_code == 422:  # refusing such local parts is fine too
        return
    assert r.status_code == 201
    got = env.get(r.json["messages_url"], headers=bearer(r.json["token"]))
    assert got.status_code == 200, got.text


def test_mail_after_delete_does_not_keep_a_private_address(env):
    box = create(env, local_part="gone")
    assert env.request("DELETE", box_path(box["address"]), headers=bearer(box["token"])).status_code == 204
    deliver(env, eml("gone@private.test", subject="was in the queue"))
    assert not env.store.recipient_accepted("gone@private.test", env.store.domains_map(), time.time())
    again = create(env, local_part="gone")
    assert env.get(again["messages_url"], headers=bearer(again["token"])).json["items"] == []


def _commit_from_elsewhere(env: Env) -> None:
    """Another process (the ingester, the sweeper) commits; gives up if we hold the write lock."""
    other = sqlite3.connect(env.store.db.database, timeout=0.2)
    try:
        with other:
            other.execute("UPDATE domain SET created_at = created_at + 1")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
    finally:
        other.close()


@pytest.mark.parametrize("what", ["create", "delete message"])
def test_a_concurrent_commit_does_not_fail_a_request(env, monkeypatch, what):
    from mtasidecar.store import Domain, Message
    box = create(env, local_part="busy")
    (mid,) = deliver(env, eml("busy@private.test"))
    model, name = (Domain, "get_or_none") if what == "create" else (Message, "delete")
    real = getattr(model, name)

    def after_a_commit_elsewhere(*args, **kwargs):
        _commit_from_elsewhere(env)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, name, after_a_commit_elsewhere)
    if what == "create":
        r = env.request("POST", "/api/v1/mailboxes", json={"local_part": "fresh"})
        assert r.status_code == 201, r.text
    else:
        r = env.request("DELETE", f"{box_path(box['address'])}/messages/{mid}", headers=bearer(box["token"]))
        assert r.status_code == 204, r.text


def test_quote_in_messages_url_round_trips(env):
    box = create(env, local_part="a+b=c&d")
    assert box["messages_url"] == f"/api/v1/mailboxes/{quote(box['address'], safe='@')}/messages"
    assert env.get(box["messages_url"], headers=bearer(box["token"])).status_code == 200
