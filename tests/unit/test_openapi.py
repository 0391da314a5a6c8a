"""mtasidecar/api/openapi.json against the app it describes.

* The document is well-formed OpenAPI 3.0.3 as far as we can check without
  a validator package: every $ref resolves, every path parameter is
  declared, every object schema is closed (additionalProperties: false)
  and lists its required fields, so the schemas pin the exact field lists.
* Its paths and methods are exactly the app's native routes: read from
  falcon's router, and probed over HTTP (documented → never 405, others →
  405). The mail.tm-compatible routes at the root (api/mailtm.py) follow
  mail.tm's contract, not this document; test_mailtm.py checks them.
* Every documented 2xx answer validates real answers (jsonschema), for
  mail put into a real SQLite store by the real ingest pipeline, on public
  and private domains (with tokens) and through the operator routes, and
  for webhook deliveries in every state, made by the real sender against
  receivers on loopback (webhooks.allow_private on); each
  documented error status and code is one the app really gives, and the
  app's error answers (with the headers documented for them:
  WWW-Authenticate, Retry-After) are documented and validate against Error.
* Each operation's security requirement is what the app enforces.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import re
import time
from datetime import datetime
from importlib import resources

import falcon
import falcon.testing
import jsonschema
import pytest

from mtasidecar import tokens
from mtasidecar.api import messages as message_resources
from mtasidecar.api.app import create_app
from mtasidecar.webhooks import Sender
from tests.unit.test_api import (ADDRESS, BAD_REQUESTS, NO_SUCH_ID, UNROUTED, assert_error, eml,
                                 make_env, message_path, messages_path, send)
from tests.unit.test_api import authenticator  # noqa: F401 (a fixture)
from tests.unit.test_api import no_server_errors  # noqa: F401 (autouse: no request may get a 500)
from tests.unit.test_mailboxes import (MAILBOX_BAD_REQUESTS, OPERATOR, box_env, create, deliver, owner_setup,
                                       send_bad, zip_of)
from tests.unit.test_webhooks import Receiver
from tests.unit.test_webhooks import fake_dns  # noqa: F401 (a fixture: host names for the URL checks, no DNS)

DOC = json.loads(resources.files("mtasidecar.api").joinpath("openapi.json").read_text())
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Methods falcon answers on every route by itself: OPTIONS with its default
# responder (200 + Allow). They are not part of the API and not documented.
FALCON_DEFAULTS = {"OPTIONS"}


def operations():
    for path, item in DOC["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def resolve(node):
    """Follow a local $ref (any depth)."""
    while isinstance(node, dict) and "$ref" in node:
        target = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def walk(node, where="#"):
    """Every (location, dict) in the document."""
    if isinstance(node, dict):
        yield where, node
        for k, v in node.items():
            yield from walk(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{where}/{i}")


# -- OpenAPI 3.0 schema objects → JSON Schema -------------------------------------------------

def to_json_schema(node):
    """OpenAPI 3.0's ``nullable``: the schema, or null; the rest is JSON Schema already.

    (``nullable`` needs a ``type`` beside it in OpenAPI 3.0.3; the document writes a nullable
    reference as {"type": "object", "nullable": true, "allOf": [{"$ref": ...}]}.)
    """
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable"):
        assert "type" in node, f"nullable without a type has no effect in OpenAPI 3.0.3: {node}"
        return {"anyOf": [out, {"type": "null"}]}
    return out


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        raise ValueError(f"not RFC 3339: {value!r}")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


COMPONENTS = to_json_schema(DOC["components"])


def validate(instance, schema) -> None:
    """Validate against an OpenAPI schema object; its $refs resolve inside the document."""
    root = dict(to_json_schema(schema), components=COMPONENTS)
    validator = jsonschema.Draft202012Validator(root, format_checker=FORMATS)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def response_schema(path: str, method: str, status: int, ctype: str = "application/json"):
    response = resolve(DOC["paths"][path][method]["responses"][str(status)])
    return response["content"][ctype]["schema"]


# -- the document itself ------------------------------------------------------------------------

def test_document_is_served_as_is(tmp_path):
    env = make_env(tmp_path)
    r = env.get("/api/v1/openapi.json")
    assert r.status_code == 200
    assert r.json == DOC


def test_document_basics():
    assert DOC["openapi"] == "3.0.3"
    assert DOC["info"]["title"] and DOC["info"]["version"]
    ids = [op["operationId"] for _, _, op in operations()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"


def test_every_ref_resolves():
    refs = [(where, node["$ref"]) for where, node in walk(DOC) if "$ref" in node]
    assert refs
    for where, ref in refs:
        assert ref.startswith("#/components/"), (where, ref)
        assert resolve({"$ref": ref}) is not None, (where, ref)
        assert set(resolve({"$ref": ref})) != set(), (where, ref)


def test_every_component_is_used():
    text = json.dumps(DOC["paths"]) + json.dumps(DOC["components"])
    schemes = {name for _, _, op in operations() for requirement in op.get("security", []) for name in requirement}
    for kind, items in DOC["components"].items():
        for name in items:
            if kind == "securitySchemes":  # named in security requirements, never $ref'd
                assert name in schemes, f"{kind}/{name} is never used"
                continue
            assert f'"#/components/{kind}/{name}"' in text, f"{kind}/{name} is never used"
    assert schemes <= set(DOC["components"]["securitySchemes"]), schemes


def test_path_parameters_are_declared():
    for path, item in DOC["paths"].items():
        in_template = set(re.findall(r"{(\w+)}", path))
        for method in METHODS:
            if method not in item:
                continue
            params = [resolve(p) for p in item.get("parameters", []) + item[method].get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == in_template, (path, method, declared)
            assert all(p["required"] for p in params if p["in"] == "path")


def test_object_schemas_are_closed_and_list_required_fields():
    for where, node in walk(DOC):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{where}: open object"
            assert set(node.get("required", [])) <= set(node["properties"]), where


def test_every_operation_documents_its_errors():
    for path, method, op in operations():
        responses = op["responses"]
        assert any(code.startswith("2") for code in responses), (path, method)
        assert "405" in responses and "500" in responses, (path, method)
        for code, response in responses.items():
            response = resolve(response)
            assert response["description"], (path, method, code)
            if not code.startswith("2"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, code)
        if "{address}" in path:
            assert {"400", "401", "404", "429"} <= set(responses), (path, method)
        # Every operation says who may call it; 401s say how to authenticate, 429s when to come back.
        assert "security" in op, (path, method)
        if op["security"]:
            assert {"401", "429"} <= set(responses), (path, method)
        for code, headers in (("401", {"WWW-Authenticate"}), ("429", {"Retry-After"})):
            if code in responses:
                assert headers <= set(resolve(responses[code]).get("headers", {})), (path, method, code)


SCHEMES = {"mailbox": [{}, {"mailboxToken": []}, {"operatorToken": []}], "operator": [{"operatorToken": []}],
           "none": []}


def test_security_requirements():
    """Open routes need nothing; mailbox routes a mailbox's token (optional: public domains); admin the operator's."""
    for path, method, op in operations():
        if path.startswith("/api/v1/admin/"):
            kind = "operator"
        elif "{address}" in path:
            kind = "mailbox"
        else:
            kind = "none"
        assert op["security"] == SCHEMES[kind], (path, method, op["security"])
    for scheme in DOC["components"]["securitySchemes"].values():
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def documented_codes(path: str, method: str, status: int) -> set[str]:
    response = resolve(DOC["paths"][path][method]["responses"][str(status)])
    examples = response["content"]["application/json"].get("examples", {})
    return {e["value"]["error"] for e in examples.values()}


HOOKS = "/api/v1/mailboxes/{address}/webhooks"
HOOK = HOOKS + "/{webhook_id}"
HOOK_DELIVERIES = HOOK + "/deliveries"
ADMIN_DELIVERIES = "/api/v1/admin/deliveries"


def hooks_path(address: str) -> str:
    return f"/api/v1/mailboxes/{address}/webhooks"


def test_documented_error_codes():
    """The statuses and codes the task (and the code) define are all in the document."""
    item = "/api/v1/mailboxes/{address}/messages/{message_id}"
    box = "/api/v1/mailboxes/{address}"
    expected = {
        ("/api/v1/mailboxes/{address}/messages", "get", 400): {"malformed_address", "bad_limit", "bad_cursor",
                                                                     "bad_auth_filter", "bad_wait", "bad_has", "bad_quarantined",
                                                                     "bad_from", "bad_subject", "bad_to",
                                                                     "malformed_id"},
        # message_not_found: ?after= an id no row can have
        ("/api/v1/mailboxes/{address}/messages", "get", 404): {"mailbox_not_found", "message_not_found"},
        (item, "get", 400): {"malformed_address", "malformed_id"},
        (item, "get", 404): {"mailbox_not_found", "message_not_found"},
        (item, "patch", 400): {"malformed_address", "malformed_id", "malformed_json"},
        (item, "patch", 413): {"body_too_large"},
        (item, "patch", 415): {"unsupported_media_type"},
        (item, "patch", 422): {"invalid_body", "unknown_field", "invalid_seen"},
        (item, "delete", 404): {"mailbox_not_found", "message_not_found"},
        (item + "/raw", "get", 410): {"raw_set_aside"},
        (item + "/attachments/{index}", "get", 400): {"malformed_address", "malformed_id", "malformed_index"},
        (item + "/attachments/{index}", "get", 404): {"mailbox_not_found", "message_not_found",
                                                      "attachment_not_found"},
        ("/api/v1/domains", "get", 405): {"method_not_allowed"},
        # temporary mailboxes
        ("/api/v1/mailboxes/{address}/messages", "get", 401): {"unauthorized", "malformed_token"},
        ("/api/v1/mailboxes/{address}/messages", "get", 429): {"rate_limited"},
        (item, "delete", 401): {"unauthorized", "malformed_token"},
        (item + "/attachments/{index}", "get", 403): {"attachment_blocked"},
        ("/api/v1/mailboxes", "post", 400): {"malformed_json"},
        ("/api/v1/mailboxes", "post", 409): {"address_taken"},
        ("/api/v1/mailboxes", "post", 413): {"body_too_large"},
        ("/api/v1/mailboxes", "post", 415): {"unsupported_media_type"},
        ("/api/v1/mailboxes", "post", 422): {"invalid_local_part", "reserved_local_part", "unknown_domain",
                                             "subdomains_not_allowed", "invalid_subdomain", "ttl_out_of_range",
                                             "address_too_long", "unknown_field", "invalid_body"},
        ("/api/v1/mailboxes", "post", 429): {"rate_limited"},
        (box, "get", 400): {"malformed_address"},
        (box, "get", 401): {"unauthorized", "malformed_token"},
        (box, "get", 404): {"mailbox_not_found"},
        (box, "patch", 400): {"malformed_address", "malformed_json"},
        (box, "patch", 422): {"invalid_body", "ttl_out_of_range", "unknown_domain"},
        (box, "delete", 404): {"mailbox_not_found"},
        (box, "delete", 429): {"rate_limited"},
        ("/api/v1/admin/mailboxes", "get", 400): {"bad_limit", "bad_cursor"},
        ("/api/v1/admin/mailboxes", "get", 401): {"unauthorized", "bad_token", "malformed_token"},
        ("/api/v1/admin/stats", "get", 401): {"unauthorized", "bad_token", "malformed_token"},
        ("/api/v1/admin/stats", "get", 429): {"rate_limited"},
        # webhooks
        (HOOKS, "get", 400): {"malformed_address"},
        (HOOKS, "get", 404): {"mailbox_not_found"},
        (HOOKS, "post", 400): {"malformed_address", "malformed_json"},
        (HOOKS, "post", 401): {"unauthorized", "malformed_token"},
        (HOOKS, "post", 404): {"mailbox_not_found"},
        (HOOKS, "post", 413): {"body_too_large"},
        (HOOKS, "post", 415): {"unsupported_media_type"},
        (HOOKS, "post", 422): {"invalid_body", "unknown_field", "invalid_url", "url_not_allowed", "invalid_secret",
                               "too_many_webhooks"},
        (HOOKS, "post", 429): {"rate_limited"},
        (HOOK, "get", 400): {"malformed_address", "malformed_id"},
        (HOOK, "get", 404): {"mailbox_not_found", "webhook_not_found"},
        (HOOK, "delete", 400): {"malformed_address", "malformed_id"},
        (HOOK, "delete", 404): {"mailbox_not_found", "webhook_not_found"},
        (HOOK_DELIVERIES, "get", 400): {"malformed_address", "malformed_id", "bad_limit", "bad_cursor", "bad_status"},
        (HOOK_DELIVERIES, "get", 404): {"mailbox_not_found", "webhook_not_found"},
        (ADMIN_DELIVERIES, "get", 400): {"bad_limit", "bad_cursor", "bad_status"},
        (ADMIN_DELIVERIES, "get", 401): {"unauthorized", "bad_token", "malformed_token"},
        (ADMIN_DELIVERIES, "get", 429): {"rate_limited"},
    }
    for (path, method, status), codes in expected.items():
        assert documented_codes(path, method, status) == codes, (path, method, status)
    error = DOC["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"] and set(error["properties"]) == {"error", "message"}


# -- routes: the document and the app agree exactly -----------------------------------------------

MAILTM = "mtasidecar.api.mailtm"  # the mail.tm-compatible API: its own contract, not this document


def app_routes(app, native: bool | None = None) -> set[tuple[str, str]]:
    """(uri template, METHOD) for every responder a resource defines, read from falcon's router.

    ``native``: True for the native API's routes only, False for the mail.tm ones only.
    """
    routes = set()

    def visit(nodes):
        for node in nodes:
            if node.resource is not None:
                is_native = type(node.resource).__module__ != MAILTM
                for method, responder in node.method_map.items():
                    own = getattr(responder, "__self__", None) is node.resource
                    if own and getattr(responder, "__name__", "").startswith("on_") \
                            and native in (None, is_native):
                        routes.add((node.uri_template, method))
            visit(node.children)

    visit(app._router._roots)
    return routes


def test_document_paths_and_methods_are_the_routes(tmp_path):
    env = make_env(tmp_path)
    app = create_app(env.settings, env.store)
    routes = app_routes(app, native=True)
    assert ("/healthz", "GET") in routes  # the router walk found something real
    # What is left out is mail.tm's, at the root, never under the native prefix.
    assert all(not path.startswith("/api/v1") for path, _ in app_routes(app, native=False))
    documented = {(path, method.upper()) for path, method, _ in operations()}
    assert documented == routes, {"undocumented": routes - documented, "not served": documented - routes}


def test_probing_every_path_with_every_method(tmp_path):
    """The same, seen from outside: documented methods never 405, all others always do."""
    env = make_env(tmp_path)
    env.deliver(eml(attachments=(("a.txt", "text/plain", b"a"),)))
    # An address nobody has: nothing gets deleted, and the event stream answers 404 instead of streaming.
    values = {"address": "nobody@example.test", "message_id": NO_SUCH_ID, "index": "0", "webhook_id": NO_SUCH_ID,
              "name": "nowhere.test"}
    for path, item in DOC["paths"].items():
        url = path.format(**{k: v for k, v in values.items() if "{" + k + "}" in path})
        documented = {m.upper() for m in METHODS if m in item}
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT"):
            r = env.request(method, url)
            assert r.status_code != 500, (method, url, r.text)
            if method in documented:
                assert r.status_code != 405, (method, url)
                if r.status_code == 404:  # a resource's own 404, never an unknown route
                    assert r.json["error"] != "not_found", (method, url)
            else:
                assert r.status_code == 405, (method, url, r.status_code)
                if method != "HEAD":
                    assert_error(r, 405, "method_not_allowed")
                allowed = {m.strip() for m in r.headers["allow"].split(",")}
                assert allowed - FALCON_DEFAULTS == documented, (url, allowed)


# -- real answers validate against the documented schemas ----------------------------------------

PRIVATE_BOX = "secret@private.test"
DOC_DOMAINS = [{"name": "example.test", "mode": "public"}, {"name": "sub.test", "subdomains": True, "mode": "public"},
               {"name": "private.test"}, {"name": "rnd.test", "subdomains": True, "random_subdomain": True}]


OPERATOR_HOOK_SECRET = "operator-webhook-secret-0123456789"


@pytest.fixture
def filled(tmp_path, authenticator):  # noqa: F811
    """Mail of every shape, delivered through the real pipeline, on public and private domains.

    Webhooks may reach loopback here: two receivers, one that takes every event ("ok", also the
    operator-wide webhook's) and one that never does ("down"). The private mailbox has a webhook
    to "ok" (``env.hook``) from before its message came.
    """
    receivers = {"ok": Receiver(), "down": Receiver(default=503)}
    try:
        yield _filled(tmp_path, authenticator, receivers)
    finally:
        for receiver in receivers.values():
            receiver.close()


def _filled(tmp_path, authenticator, receivers):  # noqa: F811
    env = make_env(tmp_path, MTASIDECAR_DOMAINS=json.dumps(DOC_DOMAINS), MTASIDECAR_API_OPERATOR_TOKEN=OPERATOR,
                   MTASIDECAR_WEBHOOKS_ALLOW_PRIVATE="true", MTASIDECAR_WEBHOOKS_URL=receivers["ok"].url("/operator"),
                   MTASIDECAR_WEBHOOKS_SECRET=OPERATOR_HOOK_SECRET)
    env.store.operator_webhook_url = env.settings.webhooks.url  # as the commands' store does (cli.py)
    env.receivers = receivers
    ids = {}
    ids["plain"], ids["rich"], ids["html_only"], ids["weird"] = env.deliver(
        eml(subject="plain"),
        eml(subject="rich", html="<p>hi</p>", cc="C <c@origin.test>, d@origin.test", reply_to="r@origin.test",
            attachments=(("r\u00e9sum\u00e9.pdf", "application/pdf", b"%PDF"),
                         ("logo.png", "inline:image/png", b"\x89PNG"))),
        eml(subject="html only", text=None, html="<html><head><title>t</title></head><body>Hi</body></html>"),
        # Headers a parser chokes on: no date, junk message-id, an empty From.
        b"Return-Path: <>\nDelivered-To: inbox@example.test\nReceived: from x (unknown [IPv6:::1])\n"
        b"\tby mx.example.test (Postfix) with ESMTP id Q1\n\tfor <inbox@example.test>; now\n"
        b"From:\nSubject: =?bogus?Q?x?=\nDate: yesterday\nMessage-ID: \nContent-Type: text/plain; charset=nope\n"
        b"\n\xff\xfe body\n",
    )
    (ids["set_aside"],) = env.deliver(eml(subject="big", text="x" * 4000), max_size=1024)
    (ids["unrouted"],) = env.deliver(eml(subject="by hand", with_trace=False))
    ids["sub"], = env.deliver(eml("x@deep.sub.test", subject="subdomain"))
    ids["auth_pass"], ids["auth_fail"] = env.deliver(
        eml(subject="checked, passes"), eml(subject="checked, fails", sender="ceo@forged.test"),
        authenticator=authenticator)
    # What extraction finds: a one-time code and links (verification, unsubscribe, other).
    ids["verify"], = env.deliver(eml(
        subject="Your verification code", text="Your verification code is 739104.\n",
        html='<p>Code: <b>739104</b></p><a href="https://origin.test/verify?t=abc">Verify your e-mail</a> '
             '<a href="https://origin.test/unsubscribe">Unsubscribe</a> <a href="https://origin.test/">Home</a>'))
    # A private mailbox, made through the API, with attachments the blocklist refuses (and one it does not).
    env.box = create(env, domain="private.test", local_part="secret")
    r = env.request("POST", hooks_path(PRIVATE_BOX), json={"url": receivers["ok"].url()},
                    headers={"Authorization": f"Bearer {env.box['token']}"})
    assert r.status_code == 201, r.text
    env.hook = r.json
    ids["private"], = deliver(env, eml(PRIVATE_BOX, subject="private", attachments=(
        ("ok.pdf", "application/pdf", b"%PDF"), ("run.exe", "application/octet-stream", b"MZ"),
        ("pack.zip", "application/zip", zip_of("a/b.exe")))))
    env.ids = ids
    return env


def auth_for(env, address: str) -> dict:
    """What it takes to read ``address``: its token (private), the operator's (unrouted), nothing (public)."""
    if address == PRIVATE_BOX:
        return {"Authorization": f"Bearer {env.box['token']}"}
    if address == UNROUTED:
        return {"Authorization": f"Bearer {OPERATOR}"}
    return {}


async def sse_frames(app, url: str, headers: dict, count: int, timeout: float = 10) -> tuple[object, list[str]]:
    """Open an event stream, read until ``count`` frames carry data, hang up. (The StreamedResult, the frames.)"""
    async with falcon.testing.ASGIConductor(app) as conductor:
        async with conductor.simulate_get_stream(url, headers=headers) as sr:
            buf = b""
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                frames = [f for f in buf.decode().split("\n\n") if "data:" in f]
                if len(frames) >= count:
                    return sr, frames
                assert asyncio.get_running_loop().time() < deadline, f"timed out; got {buf!r}"
                chunk = await sr.stream.read()
                if not chunk:
                    await asyncio.sleep(0.01)
                buf += chunk


def sse_data(frame: str) -> dict:
    return json.loads("".join(line[5:].strip() for line in frame.splitlines() if line.startswith("data:")))


@pytest.fixture
def quick_heartbeat(monkeypatch):
    # A stream notices its client left at its next frame: keep the tests short.
    monkeypatch.setattr(message_resources.MessageEvents, "HEARTBEAT", 0.2)


def test_2xx_answers_validate(filled, quick_heartbeat):
    env = filled
    exercised = set()
    operator = {"Authorization": f"Bearer {OPERATOR}"}

    def check(path, method, status, url, **kw):
        r = env.request(method.upper(), url, **kw)
        assert r.status_code == status, (url, r.status_code, r.text)
        response = resolve(DOC["paths"][path][method]["responses"][str(status)])
        content = response.get("content")
        if content is None:
            assert r.content == b""
        elif "application/json" in content:
            assert r.headers["content-type"].startswith("application/json")
            validate(r.json, content["application/json"]["schema"])
        else:
            (ctype,) = content
            if ctype != "*/*":
                assert r.headers["content-type"] == ctype
        for name in response.get("headers", {}):
            assert name.lower() in r.headers, (url, name)
        exercised.add((path, method, status))
        return r

    check("/healthz", "get", 200, "/healthz")
    check("/api/v1/openapi.json", "get", 200, "/api/v1/openapi.json")
    check("/api/v1/domains", "get", 200, "/api/v1/domains")

    # Domains at runtime (operator).
    doms = "/api/v1/admin/domains"
    added = check(doms, "post", 201, doms, headers=operator,
                  json={"name": "Runtime.Test.", "mode": "public", "subdomains": True, "max_ttl": 7200}).json
    assert (added["name"], added["source"], added["settings"]["max_ttl"]) == ("runtime.test", "api", 7200)
    listed = check(doms, "get", 200, doms, headers=operator).json["items"]
    assert {d["name"]: d["source"] for d in listed}["example.test"] == "config"
    check(doms + "/{name}", "get", 200, f"{doms}/example.test", headers=operator)
    patched = check(doms + "/{name}", "patch", 200, f"{doms}/runtime.test", headers=operator,
                    json={"active": False}).json
    assert (patched["active"], patched["settings"]["max_ttl"]) == (False, 7200)

    # Mailboxes: created every way, read, extended, deleted.
    boxes = "/api/v1/mailboxes"
    box = boxes + "/{address}"
    made = [check(boxes, "post", 201, boxes).json,
            check(boxes, "post", 201, boxes, json={"domain": "rnd.test"}).json,
            check(boxes, "post", 201, boxes, json={"domain": "sub.test", "subdomain": "random", "ttl": 60}).json,
            check(boxes, "post", 201, boxes, json={"domain": "example.test", "local_part": "Made.Here",
                                                   "ttl": 3600}).json]
    for m in made:
        token = {"Authorization": f"Bearer {m['token']}"}
        check(box, "get", 200, f"{boxes}/{m['address']}", headers=token)
        check(box, "patch", 200, f"{boxes}/{m['address']}", json={"ttl": 7200}, headers=token)
    check(box, "get", 200, f"{boxes}/{ADDRESS}")  # made by mail on a public domain: expires_at null
    check(box, "get", 200, f"{boxes}/{UNROUTED}", headers=operator)
    check(box, "delete", 204, f"{boxes}/{made[0]['address']}", headers={"Authorization": f"Bearer {made[0]['token']}"})

    lst = "/api/v1/mailboxes/{address}/messages"
    item = lst + "/{message_id}"
    pages = 0
    for address, params in ((ADDRESS, {}), (ADDRESS, {"auth": "pass"}), (ADDRESS, {"auth": "fail"}),
                            (UNROUTED, {}), ("x@deep.sub.test", {}), (PRIVATE_BOX, {}),
                            (ADDRESS, {"from": "origin", "subject": "i", "to": "inbox", "wait": "1"}),
                            (ADDRESS, {"after": env.ids["plain"]}), (ADDRESS, {"has": "link"})):
        cursor = None
        while True:
            query = {"limit": "2", **({"cursor": cursor} if cursor else {}), **params}
            r = check(lst, "get", 200, messages_path(address), params=query, headers=auth_for(env, address))
            pages += 1
            for summary in r.json["items"]:
                check(item, "get", 200, summary["url"], headers=auth_for(env, address))
            cursor = r.json["next_cursor"]
            if not cursor:
                break
    assert pages >= 10

    for name, mid in env.ids.items():
        address = {"unrouted": UNROUTED, "sub": "x@deep.sub.test", "private": PRIVATE_BOX}.get(name, ADDRESS)
        auth = auth_for(env, address)
        detail = check(item, "get", 200, message_path(mid, address), headers=auth).json
        if name != "set_aside":
            check(item + "/raw", "get", 200, detail["raw_url"], headers=auth)
        for att in detail["attachments"]:
            if att["blocked"] is None:
                check(item + "/attachments/{index}", "get", 200, att["url"], headers=auth)
        for what in ("links", "codes"):
            found = check(f"{item}/{what}", "get", 200, f"{detail['url']}/{what}", headers=auth).json
            assert found["items"] == detail[what]
        check(item, "patch", 200, detail["url"], json={"seen": True}, headers=auth)
    assert [a["blocked"] is None for a in env.get(message_path(env.ids["private"], PRIVATE_BOX),
                                                   headers=auth_for(env, PRIVATE_BOX)).json["attachments"]] == \
        [True, False, False]
    check(item, "delete", 204, message_path(env.ids["plain"]))
    verify = env.get(message_path(env.ids["verify"])).json
    assert verify["best_code"]["normalized"] == "739104" and verify["best_link"]["kind"] == "verification"

    # The event stream: existing mail after ?after=, each event's data a MessageSummary.
    events = "/api/v1/mailboxes/{address}/events"
    for address in (ADDRESS, PRIVATE_BOX):
        url = f"/api/v1/mailboxes/{address}/events?after={'0' * 24}"
        sr, frames = asyncio.run(sse_frames(env.client.app, url, auth_for(env, address), 1))
        assert sr.status == "200 OK"
        response = resolve(DOC["paths"][events]["get"]["responses"]["200"])
        (ctype,) = response["content"]
        assert sr.headers["content-type"].startswith(ctype)
        for name in response.get("headers", {}):
            assert name.lower() in sr.headers, name
        assert "event: message" in frames[0]
        validate(sse_data(frames[0]), DOC["components"]["schemas"]["MessageSummary"])
    exercised.add((events, "get", 200))

    # Operator routes.
    admin = "/api/v1/admin/mailboxes"
    cursor, listed = None, 0
    while True:
        r = check(admin, "get", 200, admin, params={"limit": "2", **({"cursor": cursor} if cursor else {})},
                  headers=operator)
        listed += len(r.json["items"])
        cursor = r.json["next_cursor"]
        if not cursor:
            break
    assert listed == env.get("/api/v1/admin/stats", headers=operator).json["mailboxes"] >= 7
    check("/api/v1/admin/stats", "get", 200, "/api/v1/admin/stats", headers=operator)

    # Webhooks: made on private, public and unrouted mailboxes (a secret chosen or generated), listed, read.
    private = auth_for(env, PRIVATE_BOX)
    ok, down = env.receivers["ok"], env.receivers["down"]
    made = {"down": check(HOOKS, "post", 201, hooks_path(PRIVATE_BOX), json={"url": down.url(), "secret": "s" * 16},
                          headers=private).json,
            "public": check(HOOKS, "post", 201, hooks_path(ADDRESS), json={"url": ok.url("/public")}).json,
            "unrouted": check(HOOKS, "post", 201, hooks_path(UNROUTED),
                              json={"url": "https://user:pass@hooks.example.test:8443/in?x=1"}, headers=operator).json}
    assert made["down"]["secret"] == "s" * 16 and made["public"]["secret"].startswith("whsec_")
    for address in (PRIVATE_BOX, ADDRESS, UNROUTED):
        listed = check(HOOKS, "get", 200, hooks_path(address), headers=auth_for(env, address)).json["items"]
        assert listed
        for hook in listed:
            check(HOOK, "get", 200, hook["deliveries_url"].removesuffix("/deliveries"), headers=auth_for(env, address))

    # Deliveries in every state, through the real sender: delivered ("ok"), pending after a 503 ("down"), failed
    # (the message deleted before it could be sent); the operator-wide webhook's have no webhook_id.
    _kept, gone = deliver(env, eml(PRIVATE_BOX, subject="hooked"), eml(PRIVATE_BOX, subject="deleted at once"))
    deliver(env, eml(ADDRESS, subject="hooked too"))
    assert env.request("DELETE", message_path(gone, PRIVATE_BOX), headers=private).status_code == 204
    now = time.time()  # the sender's clock stands still: a retry (5 s on) never comes due during the test
    sender = Sender(env.store, env.settings, clock=lambda: now, rand=lambda: 0.5)
    try:
        while asyncio.run(sender.run_once()):
            pass
    finally:
        sender.close()
    assert {r["path"] for r in ok.accepted()} == {"/hook", "/public", "/operator"}
    assert [r["path"] for r in down.requests] == ["/hook"]

    def pages(path, url, headers, **params):
        items, cursor = [], None
        while True:
            query = {"limit": "2", **params, **({"cursor": cursor} if cursor else {})}
            r = check(path, "get", 200, url, params=query, headers=headers)
            items += r.json["items"]
            cursor = r.json["next_cursor"]
            if not cursor:
                return items

    seen = {}
    for address, hook in ((PRIVATE_BOX, env.hook), (PRIVATE_BOX, made["down"]), (ADDRESS, made["public"]),
                          (UNROUTED, made["unrouted"])):
        items = pages(HOOK_DELIVERIES, hook["deliveries_url"], auth_for(env, address))
        seen[hook["id"]] = sorted((i["status"], i["last_status_code"]) for i in items)
        for status in ("pending", "delivered", "failed"):
            only = pages(HOOK_DELIVERIES, hook["deliveries_url"], auth_for(env, address), status=status)
            assert only == [i for i in items if i["status"] == status]
    assert seen == {env.hook["id"]: [("delivered", 200), ("delivered", 200), ("failed", None)],
                    made["down"]["id"]: [("failed", None), ("pending", 503)],
                    made["public"]["id"]: [("delivered", 200)],
                    made["unrouted"]["id"]: []}
    everything = pages(ADMIN_DELIVERIES, ADMIN_DELIVERIES, operator)
    assert {i["status"] for i in everything} == {"pending", "delivered", "failed"}
    assert None in {i["webhook_id"] for i in everything}
    for status in ("pending", "delivered", "failed"):
        only = pages(ADMIN_DELIVERIES, ADMIN_DELIVERIES, operator, status=status)
        assert only == [i for i in everything if i["status"] == status]

    check(HOOK, "delete", 204, made["down"]["deliveries_url"].removesuffix("/deliveries"), headers=private)

    documented = {(path, method, int(code)) for path, method, op in operations()
                  for code in op["responses"] if code.startswith("2")}
    assert exercised == documented, {"never checked": documented - exercised}


def test_detail_has_every_summary_field():
    schemas = DOC["components"]["schemas"]
    summary, detail = schemas["MessageSummary"], schemas["MessageDetail"]
    for name, prop in summary["properties"].items():
        assert detail["properties"][name] == prop, name
    assert set(summary["required"]) <= set(detail["required"])


def test_schemas_reject_wrong_shapes(filled):
    """The schemas are strict enough to notice a missing, an extra or a mistyped field."""
    env = filled
    detail = env.get(message_path(env.ids["rich"])).json
    schema = response_schema("/api/v1/mailboxes/{address}/messages/{message_id}", "get", 200)
    validate(detail, schema)
    for mutate in (lambda d: d.pop("text"), lambda d: d.update(extra=1), lambda d: d.update(seen="no"),
                   lambda d: d["attachments"][0].pop("url"), lambda d: d.update(received_at="yesterday"),
                   lambda d: d.update(id="xyz"), lambda d: d["from"].update(name=None),
                   lambda d: d.pop("codes"), lambda d: d.update(best_code={"value": "1"}),
                   lambda d: d.update(links=[{"url": "https://x.test/", "text": "", "kind": "phishing"}])):
        broken = copy.deepcopy(detail)
        mutate(broken)
        with pytest.raises(AssertionError):
            validate(broken, schema)
    # The blocked field is pinned too, and so is the shape of a new mailbox.
    private = env.get(message_path(env.ids["private"], PRIVATE_BOX), headers=auth_for(env, PRIVATE_BOX)).json
    validate(private, schema)
    for mutate in (lambda d: d["attachments"][1].pop("blocked"), lambda d: d["attachments"][1].update(blocked=1)):
        broken = copy.deepcopy(private)
        mutate(broken)
        with pytest.raises(AssertionError):
            validate(broken, schema)
    # Webhooks: the secret only at creation; deliveries and the operator's view of them pinned as well.
    private = auth_for(env, PRIVATE_BOX)
    created = env.request("POST", hooks_path(PRIVATE_BOX), json={"url": env.receivers["ok"].url("/x")},
                          headers=private).json
    shown = env.get(created["deliveries_url"].removesuffix("/deliveries"), headers=private).json
    delivery = env.get(env.hook["deliveries_url"], headers=private).json["items"][0]
    admin = env.get(ADMIN_DELIVERIES, headers={"Authorization": f"Bearer {OPERATOR}"}).json["items"][0]
    assert admin["webhook_id"] is None  # the operator-wide webhook's (queued last for each message)
    for value, schema, mutations in (
            (created, response_schema(HOOKS, "post", 201),
             (lambda d: d.pop("secret"), lambda d: d.update(secret="short"), lambda d: d.update(id="1"),
              lambda d: d.pop("deliveries_url"), lambda d: d.update(created_at=None))),
            (shown, response_schema(HOOK, "get", 200),
             (lambda d: d.update(secret="s" * 16), lambda d: d.pop("url"), lambda d: d.update(events=[]))),
            ({"items": [delivery], "next_cursor": None}, response_schema(HOOK_DELIVERIES, "get", 200),
             (lambda d: d["items"][0].update(status="sent"), lambda d: d["items"][0].update(attempts=-1),
              lambda d: d["items"][0].pop("next_attempt_at"), lambda d: d["items"][0].update(mailbox=PRIVATE_BOX),
              lambda d: d.pop("next_cursor"), lambda d: d["items"][0].update(last_status_code="503"))),
            ({"items": [admin], "next_cursor": None}, response_schema(ADMIN_DELIVERIES, "get", 200),
             (lambda d: d["items"][0].update(webhook_id="3"), lambda d: d["items"][0].pop("webhook_id"),
              lambda d: d["items"][0].pop("url"), lambda d: d["items"][0].update(delivered_at="today")))):
        validate(value, schema)
        for mutate in mutations:
            broken = copy.deepcopy(value)
            mutate(broken)
            with pytest.raises(AssertionError):
                validate(broken, schema)
    new = create(env)
    schema = response_schema("/api/v1/mailboxes", "post", 201)
    validate(new, schema)
    for mutate in (lambda d: d.pop("token"), lambda d: d.update(token="secret"), lambda d: d.update(expires_at=5),
                   lambda d: d.update(password="x")):
        broken = copy.deepcopy(new)
        mutate(broken)
        with pytest.raises(AssertionError):
            validate(broken, schema)


# -- error answers are documented ---------------------------------------------------------------

TEMPLATES = [(re.compile("^" + re.sub(r"{\w+}", "[^/]+", path) + "$"), path) for path in DOC["paths"]]


def template_for(url: str) -> str | None:
    url = url.split("?")[0]
    for pattern, path in TEMPLATES:
        if pattern.match(url):
            return path
    return None


def assert_documented(r, method: str, url: str) -> dict:
    """An error answer: Error-shaped, and its status, code and headers documented for its operation."""
    body = assert_error(r, r.status_code)
    validate(body, DOC["components"]["schemas"]["Error"])
    path = template_for(url)
    method = method.lower()
    if path is None or method not in DOC["paths"][path]:
        # Unknown routes and methods: documented globally (info.description) as 404 / 405.
        assert (r.status_code, body["error"]) in {(404, "not_found"), (405, "method_not_allowed")}
        assert f"{r.status_code} (error: {body['error']})" in DOC["info"]["description"]
        return body
    responses = DOC["paths"][path][method]["responses"]
    assert str(r.status_code) in responses, f"{method} {path} answers {r.status_code}, undocumented"
    assert body["error"] in documented_codes(path, method, r.status_code), (path, method, body)
    for name in resolve(responses[str(r.status_code)]).get("headers", {}):
        assert name.lower() in r.headers, (path, method, r.status_code, name)
    return body


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_error_answers_are_documented(tmp_path, name):
    bad = BAD_REQUESTS[name]
    env = make_env(tmp_path)
    (mid,) = env.deliver(eml(attachments=(("one.txt", "text/plain", b"one"),)))
    r = send(env, bad, mid)
    assert_error(r, bad.status, bad.code)
    assert_documented(r, bad.method, bad.path.replace("{mid}", mid))


@pytest.mark.parametrize("name", list(MAILBOX_BAD_REQUESTS))
def test_mailbox_error_answers_are_documented(tmp_path, name):
    bad = MAILBOX_BAD_REQUESTS[name]
    env = box_env(tmp_path)
    owner = owner_setup(env)
    r = send_bad(env, owner, bad)
    assert_error(r, bad.status, bad.code)
    assert_documented(r, bad.method, bad.path.replace("{box}", f"/api/v1/mailboxes/{owner['address']}"))


def webhook_bad_requests() -> dict[str, tuple]:
    """name → (method, url, request kwargs, credentials, status, code): every error the webhook routes give
    (but 405, 429 and 500). In the url, {box} is the owner's mailbox, {hook} its webhook; credentials are
    "owner", "other" (another mailbox's token), "operator", None, or an Authorization header."""
    new_hook = {"json": {"url": "http://public.example/hook"}}
    bad = {}
    routes = [("GET", "{box}/webhooks"), ("POST", "{box}/webhooks"), ("GET", "{box}/webhooks/{hook}"),
              ("DELETE", "{box}/webhooks/{hook}"), ("GET", "{box}/webhooks/{hook}/deliveries")]
    for method, url in routes:
        kw, name = new_hook if method == "POST" else {}, f"{method} {url}"
        bad[f"{name}: malformed address"] = (method, url.replace("{box}", "/api/v1/mailboxes/not-an-address"), kw,
                                             "operator", 400, "malformed_address")
        bad[f"{name}: no such mailbox"] = (method, url.replace("{box}", "/api/v1/mailboxes/nobody@private.test"), kw,
                                           "operator", 404, "mailbox_not_found")
        bad[f"{name}: no token"] = (method, url, kw, None, 401, "unauthorized")
        bad[f"{name}: not a bearer token"] = (method, url, kw, "Basic b3duZXI6cHc=", 401, "malformed_token")
        bad[f"{name}: a malformed token"] = (method, url, kw, "Bearer mts_short", 401, "malformed_token")
        bad[f"{name}: another mailbox's token"] = (method, url, kw, "other", 404, "mailbox_not_found")
        if "{hook}" in url:
            for wid, status, code in (("xyz", 400, "malformed_id"), (NO_SUCH_ID, 404, "webhook_not_found"),
                                      ("f" * 24, 404, "webhook_not_found")):
                bad[f"{name}: webhook id {wid}"] = (method, url.replace("{hook}", wid), kw, "owner", status, code)
    deliveries = "{box}/webhooks/{hook}/deliveries"
    admin = ADMIN_DELIVERIES
    for query, code in (("limit=0", "bad_limit"), ("limit=abc", "bad_limit"), ("cursor=%25%25", "bad_cursor"),
                        ("status=lost", "bad_status"), ("status=", "bad_status")):
        bad[f"deliveries ?{query}"] = ("GET", f"{deliveries}?{query}", {}, "owner", 400, code)
        bad[f"admin deliveries ?{query}"] = ("GET", f"{admin}?{query}", {}, "operator", 400, code)
    bad["admin deliveries: no token"] = ("GET", admin, {}, None, 401, "unauthorized")
    bad["admin deliveries: a mailbox's token"] = ("GET", admin, {}, "owner", 401, "bad_token")
    bad["admin deliveries: not a bearer token"] = ("GET", admin, {}, "Basic b3duZXI6cHc=", 401, "malformed_token")
    json_type = {"Content-Type": "application/json"}
    for name, kw, status, code in (
            ("not JSON", {"body": "{", "headers": json_type}, 400, "malformed_json"),
            ("over 64 KiB", {"json": {"url": "http://public.example/" + "a" * 70000}}, 413, "body_too_large"),
            ("a form", {"body": "url=http://x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
             415, "unsupported_media_type"),
            ("no body", {}, 415, "unsupported_media_type"),
            ("a list", {"json": ["http://public.example/"]}, 422, "invalid_body"),
            ("an unknown field", {"json": {"url": "http://public.example/", "events": ["all"]}}, 422, "unknown_field"),
            ("no url", {"json": {}}, 422, "invalid_url"),
            ("a number for url", {"json": {"url": 7}}, 422, "invalid_url"),
            ("ftp", {"json": {"url": "ftp://public.example/"}}, 422, "invalid_url"),
            ("no host", {"json": {"url": "http:///nohost"}}, 422, "invalid_url"),
            ("a short secret", {"json": {"url": "http://public.example/", "secret": "short"}}, 422, "invalid_secret"),
            ("a secret not a string", {"json": {"url": "http://public.example/", "secret": 10 ** 17}},
             422, "invalid_secret"),
            ("a private address", {"json": {"url": "http://internal.example/"}}, 422, "url_not_allowed"),
            ("loopback", {"json": {"url": "http://127.0.0.1:8025/api/v1/admin/stats"}}, 422, "url_not_allowed"),
            ("a name that does not resolve", {"json": {"url": "http://nowhere.example/"}}, 422, "url_not_allowed")):
        bad[f"POST {{box}}/webhooks: {name}"] = ("POST", "{box}/webhooks", kw, "owner", status, code)
    return bad


WEBHOOK_BAD_REQUESTS = webhook_bad_requests()


def test_webhook_error_answers_are_documented(tmp_path, fake_dns):  # noqa: F811
    """Every error the webhook routes give is documented, and every documented one is given (bar 405/429/500).

    webhooks.allow_private is off, as by default: targets are checked (with host names from fake_dns).
    """
    env = box_env(tmp_path)
    owner, other = create(env, local_part="owner"), create(env, local_part="other")
    tokens_of = {"owner": owner["token"], "other": other["token"], "operator": OPERATOR}
    hook = env.request("POST", hooks_path(owner["address"]), json={"url": "http://public.example/hook"},
                       headers={"Authorization": f"Bearer {owner['token']}"}).json
    given = set()

    def send_one(method, url, kw, auth):
        url = url.replace("{box}", f"/api/v1/mailboxes/{owner['address']}").replace("{hook}", hook["id"])
        kw = copy.deepcopy(kw)
        headers = kw.pop("headers", {})
        if auth in tokens_of:
            headers["Authorization"] = f"Bearer {tokens_of[auth]}"
        elif auth is not None:
            headers["Authorization"] = auth
        path, _, query = url.partition("?")
        return env.request(method, path, headers=headers, query_string=query or None, **kw), path

    for name, (method, url, kw, auth, status, code) in WEBHOOK_BAD_REQUESTS.items():
        r, path = send_one(method, url, kw, auth)
        assert (r.status_code, r.json.get("error")) == (status, code), (name, r.status_code, r.text)
        assert_documented(r, method, path)
        given.add((template_for(path), method.lower(), status, code))
    # The eleventh webhook of a mailbox.
    for i in range(9):
        r, _ = send_one("POST", "{box}/webhooks", {"json": {"url": f"http://public.example/{i}"}}, "owner")
        assert r.status_code == 201, r.text
    r, path = send_one("POST", "{box}/webhooks", {"json": {"url": "http://public.example/10"}}, "owner")
    assert_error(r, 422, "too_many_webhooks")
    assert_documented(r, "POST", path)
    given.add((HOOKS, "post", 422, "too_many_webhooks"))
    # Nothing bad input did changed the mailbox's webhooks.
    listed = env.get(hooks_path(owner["address"]), headers={"Authorization": f"Bearer {owner['token']}"}).json
    assert len(listed["items"]) == 10 and listed["items"][0] == {k: v for k, v in hook.items() if k != "secret"}

    documented = {(path, method, int(status), code)
                  for path, method, op in operations() if path in (HOOKS, HOOK, HOOK_DELIVERIES, ADMIN_DELIVERIES)
                  for status in op["responses"] if status[0] == "4" and status not in ("405", "429")
                  for code in documented_codes(path, method, int(status))}
    assert given == documented, {"never given": documented - given, "undocumented": given - documented}


def test_rate_limit_answers_are_documented(tmp_path):
    env = box_env(tmp_path, MTASIDECAR_API_CREATE_RATE="1", MTASIDECAR_API_AUTH_FAILURE_RATE="1")
    box = create(env)
    create(env)
    r = env.request("POST", "/api/v1/mailboxes", json={})
    assert_documented(r, "POST", "/api/v1/mailboxes")
    assert r.status_code == 429
    wrong = {"Authorization": f"Bearer {tokens.new_token()}"}
    url = f"/api/v1/mailboxes/{box['address']}"
    while env.get(url, headers=wrong).status_code != 429:
        pass
    for method, path in (("GET", url), ("PATCH", url), ("DELETE", url), ("GET", url + "/messages"),
                         ("GET", url + "/events"), ("GET", f"{url}/messages/{NO_SUCH_ID}/raw"),
                         ("GET", "/api/v1/admin/stats"), ("GET", "/api/v1/admin/mailboxes"),
                         ("GET", url + "/webhooks"), ("POST", url + "/webhooks"),
                         ("GET", f"{url}/webhooks/{NO_SUCH_ID}"), ("DELETE", f"{url}/webhooks/{NO_SUCH_ID}"),
                         ("GET", f"{url}/webhooks/{NO_SUCH_ID}/deliveries"), ("GET", ADMIN_DELIVERIES)):
        r = env.request(method, path, headers={"Authorization": f"Bearer {box['token']}"})
        assert r.status_code == 429, (method, path)
        assert_documented(r, method, path)


def test_blocked_attachment_403_is_documented(filled):
    env = filled
    url = message_path(env.ids["private"], PRIVATE_BOX) + "/attachments/1"
    r = env.get(url, headers=auth_for(env, PRIVATE_BOX))
    assert r.status_code == 403
    assert_documented(r, "GET", url)


def test_security_is_what_the_app_enforces(filled, quick_heartbeat):
    """Open operations answer without credentials; the others 401 without, and open with, theirs."""
    env = filled
    values = {"message_id": env.ids["private"], "index": "0", "webhook_id": env.hook["id"], "name": "security.test"}
    env.request("POST", "/api/v1/admin/domains", json={"name": "security.test"},
                headers={"Authorization": f"Bearer {OPERATOR}"})
    for path, method, op in operations():
        if method == "delete" or path.endswith("/events"):
            continue  # destructive / endless: their security is the same as their path's GET
        url = path.format(address=PRIVATE_BOX, **{k: v for k, v in values.items() if "{" + k + "}" in path})
        kw = {"json": {"seen": True} if "message_id" in path else {"ttl": 600}} if method == "patch" else {}
        if path.endswith("{name}") and method == "patch":
            kw = {"json": {"default_ttl": 900}}
        if method == "post":
            kw = {"json": {"url": env.receivers["ok"].url("/more")} if path == HOOKS else {}}
            if path == "/api/v1/admin/domains":
                kw = {"json": {"name": f"added-{secrets.token_hex(4)}.test"}}
        r = env.request(method.upper(), url, **kw)
        if not op["security"]:
            assert r.status_code < 400, (method, path, r.status_code)
            continue
        assert r.status_code == 401, (method, path, r.status_code)
        for requirement in op["security"]:
            if not requirement:
                continue  # optional: public domains (test_2xx_answers_validate reads them without a token)
            (scheme,) = requirement
            token = OPERATOR if scheme == "operatorToken" else env.box["token"]
            r = env.request(method.upper(), url, headers={"Authorization": f"Bearer {token}"}, **kw)
            assert r.status_code < 300, (method, path, scheme, r.status_code, r.text)


def test_set_aside_raw_410_is_documented(tmp_path):
    env = make_env(tmp_path)
    (mid,) = env.deliver(eml(text="x" * 4000), max_size=1024)
    body = assert_error(env.get(message_path(mid) + "/raw"), 410, "raw_set_aside")
    path = "/api/v1/mailboxes/{address}/messages/{message_id}/raw"
    assert body["error"] in documented_codes(path, "get", 410)


def test_no_route_is_left_to_falcon_defaults():
    """Every documented operation maps to a responder name falcon knows."""
    for path, method, _ in operations():
        assert method.upper() in falcon.constants.COMBINED_METHODS, (path, method)
