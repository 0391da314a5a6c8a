"""mtasidecar/api/openapi.json against the app it describes.

* The document is well-formed OpenAPI 3.0.3 as far as we can check without
  a validator package: every $ref resolves, every path parameter is
  declared, every object schema is closed (additionalProperties: false)
  and lists its required fields, so the schemas pin the exact field lists.
* Its paths and methods are exactly the app's routes: read from falcon's
  router, and probed over HTTP (documented → never 405, others → 405).
* Every documented 2xx answer validates real answers (jsonschema), for
  mail put into a real SQLite store by the real ingest pipeline; each
  documented error status and code is one the app really gives, and the
  app's error answers are documented and validate against Error.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from importlib import resources

import falcon
import jsonschema
import pytest

from mtasidecar.api.app import create_app
from tests.unit.test_api import (ADDRESS, BAD_REQUESTS, NO_SUCH_ID, UNROUTED, assert_error, eml,
                                 make_env, message_path, messages_path, send)
from tests.unit.test_api import authenticator  # noqa: F401 (a fixture)

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
    """OpenAPI 3.0's ``nullable`` becomes a "null" type; the rest is JSON Schema already."""
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
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
    for kind, items in DOC["components"].items():
        for name in items:
            assert f'"#/components/{kind}/{name}"' in text, f"{kind}/{name} is never used"


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
            assert {"400", "404"} <= set(responses), (path, method)


def documented_codes(path: str, method: str, status: int) -> set[str]:
    response = resolve(DOC["paths"][path][method]["responses"][str(status)])
    examples = response["content"]["application/json"].get("examples", {})
    return {e["value"]["error"] for e in examples.values()}


def test_documented_error_codes():
    """The statuses and codes the task (and the code) define are all in the document."""
    item = "/api/v1/mailboxes/{address}/messages/{message_id}"
    expected = {
        ("/api/v1/mailboxes/{address}/messages", "get", 400): {"malformed_address", "bad_limit", "bad_cursor",
                                                                     "bad_auth_filter"},
        ("/api/v1/mailboxes/{address}/messages", "get", 404): {"mailbox_not_found"},
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
    }
    for (path, method, status), codes in expected.items():
        assert documented_codes(path, method, status) == codes, (path, method, status)
    error = DOC["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"] and set(error["properties"]) == {"error", "message"}


# -- routes: the document and the app agree exactly -----------------------------------------------

def app_routes(app) -> set[tuple[str, str]]:
    """(uri template, METHOD) for every responder a resource defines, read from falcon's router."""
    routes = set()

    def visit(nodes):
        for node in nodes:
            if node.resource is not None:
                for method, responder in node.method_map.items():
                    own = getattr(responder, "__self__", None) is node.resource
                    if own and getattr(responder, "__name__", "").startswith("on_"):
                        routes.add((node.uri_template, method))
            visit(node.children)

    visit(app._router._roots)
    return routes


def test_document_paths_and_methods_are_the_routes(tmp_path):
    env = make_env(tmp_path)
    app = create_app(env.settings, env.store)
    routes = app_routes(app)
    assert ("/healthz", "GET") in routes  # the router walk found something real
    documented = {(path, method.upper()) for path, method, _ in operations()}
    assert documented == routes, {"undocumented": routes - documented, "not served": documented - routes}


def test_probing_every_path_with_every_method(tmp_path):
    """The same, seen from outside: documented methods never 405, all others always do."""
    env = make_env(tmp_path)
    (mid,) = env.deliver(eml(attachments=(("a.txt", "text/plain", b"a"),)))
    values = {"address": ADDRESS, "message_id": NO_SUCH_ID, "index": "0"}  # nothing gets deleted
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

@pytest.fixture
def filled(tmp_path, authenticator):  # noqa: F811
    """Mail of every shape, delivered through the real pipeline."""
    env = make_env(tmp_path)
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
    env.ids = ids
    return env


def test_2xx_answers_validate(filled):
    env = filled
    exercised = set()

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

    lst = "/api/v1/mailboxes/{address}/messages"
    item = lst + "/{message_id}"
    pages = 0
    for address, auth in ((ADDRESS, None), (ADDRESS, "pass"), (ADDRESS, "fail"), (UNROUTED, None),
                          ("x@deep.sub.test", None)):
        cursor = None
        while True:
            params = {"limit": "2", **({"cursor": cursor} if cursor else {}), **({"auth": auth} if auth else {})}
            r = check(lst, "get", 200, messages_path(address), params=params)
            pages += 1
            for summary in r.json["items"]:
                check(item, "get", 200, summary["url"])
            cursor = r.json["next_cursor"]
            if not cursor:
                break
    assert pages >= 6

    for name, mid in env.ids.items():
        address = {"unrouted": UNROUTED, "sub": "x@deep.sub.test"}.get(name, ADDRESS)
        detail = check(item, "get", 200, message_path(mid, address)).json
        if name != "set_aside":
            check(item + "/raw", "get", 200, detail["raw_url"])
        for att in detail["attachments"]:
            check(item + "/attachments/{index}", "get", 200, att["url"])
        check(item, "patch", 200, detail["url"], json={"seen": True})
    check(item, "delete", 204, message_path(env.ids["plain"]))

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
                   lambda d: d.update(id="xyz"), lambda d: d["from"].update(name=None)):
        broken = copy.deepcopy(detail)
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


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_error_answers_are_documented(tmp_path, name):
    bad = BAD_REQUESTS[name]
    env = make_env(tmp_path)
    (mid,) = env.deliver(eml(attachments=(("one.txt", "text/plain", b"one"),)))
    r = send(env, bad, mid)
    body = assert_error(r, bad.status, bad.code)
    validate(body, DOC["components"]["schemas"]["Error"])
    url = bad.path.replace("{mid}", mid)
    path = template_for(url)
    method = bad.method.lower()
    if path is None or method not in DOC["paths"][path]:
        # Unknown routes and methods: documented globally (info.description) as 404 / 405.
        assert (bad.status, body["error"]) in {(404, "not_found"), (405, "method_not_allowed")}
        assert f"{bad.status} (error: {body['error']})" in DOC["info"]["description"]
        return
    responses = DOC["paths"][path][method]["responses"]
    assert str(bad.status) in responses, f"{bad.method} {path} answers {bad.status}, undocumented"
    assert body["error"] in documented_codes(path, method, bad.status), (path, method, body)


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
