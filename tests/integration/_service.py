"""Helpers shared by the end-to-end tests (real Postfix, ingester, gunicorn)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from tests import conftest
from tests.conftest import service_dir


def passable_dir(prefix: str = "mtasidecar-it-") -> Path:
    """A fresh 0755 directory under /tmp (pytest's tmp_path is under a 0700 one,
    which Postfix's own users cannot enter)."""
    return service_dir(prefix)


@contextlib.contextmanager
def running_service(domains: list[str], extra_env: dict | None = None, keep_log_in: Path | None = None):
    """tests/conftest.py's running_service, with the operator token set (OPERATOR opens every mailbox)."""
    env = {"MTASIDECAR_API_OPERATOR_TOKEN": OPERATOR_TOKEN, **(extra_env or {})}
    with conftest.running_service(domains, env, prefix="mtasidecar-it-", keep_log_in=keep_log_in) as svc:
        yield svc


# The operator token opens every mailbox, also those no domain's mode makes
# readable: unrouted mail, and mail for addresses outside our domains.
OPERATOR_TOKEN = "op-" + "0123456789abcdef" * 2
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


# What Postfix prepends on delivery (virtual(8), or pipe(8) with flags DRO),
# in this order. The message as sent follows right after.
PREPENDED = re.compile(
    rb"Return-Path: <(?P<return_path>[^>]*)>\n"
    rb"X-Original-To: (?P<original_to>\S+)\n"
    rb"Delivered-To: (?P<delivered_to>\S+)\n"
    rb"Received: from (?P<helo>\S+) \((?:\S+ )?\[(?P<ip>[0-9.]+)\]\)\n"
    rb"\tby (?P<by>\S+) \(Postfix\) with \S+ id (?P<queue_id>[0-9A-Za-z]+)"
    rb"(?:\n\tfor <(?P<for>[^>]+)>)?;\s+[^\n]+\n"
)


def split_delivered(raw: bytes) -> tuple[re.Match, bytes]:
    """(Postfix's trace headers, the rest: the message as sent, with LF line ends)."""
    match = PREPENDED.match(raw)
    assert match, raw[:500]
    return match, raw[match.end():]


def lf(data: bytes) -> bytes:
    """CRLF → LF: what Postfix does to every line it stores."""
    return data.replace(b"\r\n", b"\n")


def crlf(data: bytes) -> bytes:
    """LF → CRLF (the wire form), without doubling existing CRs."""
    return lf(data).replace(b"\n", b"\r\n")


__all__ = ["OPERATOR", "OPERATOR_TOKEN", "PREPENDED", "crlf", "lf", "passable_dir", "running_service",
           "split_delivered"]
