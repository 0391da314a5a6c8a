"""Every error the API gives is JSON: {"error": "<code>", "message": "<what was wrong>"}.

Resources raise :class:`ApiError`; Falcon's own errors (unknown route, wrong
method, bad JSON) are rendered the same way by :func:`serialize`. Anything
unexpected becomes a 500 with no stack trace in the body; it is logged.
"""

from __future__ import annotations

import logging
import re

import falcon

log = logging.getLogger(__name__)


class ApiError(falcon.HTTPError):
    def __init__(self, status: int | str, code: str, message: str, headers: dict | None = None):
        super().__init__(falcon.code_to_http_status(status), title=code, description=message,
                         headers=headers)
        self.code = code


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def not_found(message: str = "not found", code: str = "not_found") -> ApiError:
    return ApiError(404, code, message)


def unprocessable(message: str, code: str = "invalid") -> ApiError:
    return ApiError(422, code, message)


def _code_for(error: falcon.HTTPError) -> str:
    code = getattr(error, "code", None)
    if code:
        return code
    # Falcon's titles ("404 Not Found", "Malformed JSON") → "not_found", "malformed_json".
    title = re.sub(r"^\d+\s*", "", error.title or error.status or "error")
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "error"


def to_body(error: falcon.HTTPError) -> dict:
    message = error.description or re.sub(r"^\d+\s*", "", error.title or "") or "error"
    return {"error": _code_for(error), "message": message}


def serialize(req, resp, error: falcon.HTTPError) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.media = to_body(error)
    resp.append_header("Vary", "Accept")


async def unexpected(req, resp, exc, params, ws=None) -> None:
    """Last resort: never leak a trace, always answer JSON."""
    if isinstance(exc, falcon.HTTPError):
        raise exc
    log.exception("unhandled error on %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.content_type = falcon.MEDIA_JSON
    resp.media = {"error": "internal", "message": "internal error; it has been logged"}
