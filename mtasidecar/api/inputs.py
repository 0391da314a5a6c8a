"""Reading what clients send: JSON bodies and paging parameters, checked once."""

from __future__ import annotations

import json

from .errors import ApiError, bad_request, unprocessable

JSON_TYPES = ("application/json", "application/merge-patch+json")
MAX_BODY = 64 * 1024


def page_limit(req, default: int, maximum: int) -> int:
    text = req.get_param("limit")
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or not 1 <= int(text) <= maximum:
        raise bad_request(f"limit must be a whole number from 1 to {maximum}", "bad_limit")
    return int(text)


async def json_body(req, allow_empty: bool = False) -> dict:
    """The request's JSON object; ``allow_empty``: no body at all means {}."""
    ctype = (req.content_type or "").split(";", 1)[0].strip().lower()
    if allow_empty and not ctype and not req.content_length:
        return {}
    if ctype not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"send JSON (Content-Type: application/json), not {ctype or 'nothing'}")
    if (req.content_length or 0) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"request body over {MAX_BODY} bytes")
    raw = await req.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "malformed_json") from None
    if not isinstance(body, dict):
        raise unprocessable("request body must be a JSON object", "invalid_body")
    return body
